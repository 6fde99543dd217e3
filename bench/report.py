"""The benchmark's table, its targets and its two result files."""

import json
from pathlib import Path
from typing import Any

SERVERS = ("direct", "bare", "gateway", "litellm")
SERVER_NAMES = {
    "direct": "direct (upstream)",
    "bare": "bare pass-through",
    "gateway": "gateway",
    "litellm": "LiteLLM proxy",
}
# (name, stream, concurrency)
LEVELS = (
    ("non-stream c=1", False, 1),
    ("non-stream c=10", False, 10),
    ("non-stream c=50", False, 50),
    ("stream c=1", True, 1),
    ("stream c=10", True, 10),
)


def _get(result: dict[str, Any] | None, *path: str) -> Any:
    value: Any = result
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return a / b


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def level_rows(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (load level, server) with the derived columns."""
    rows = []
    for level, _, _ in LEVELS:
        direct = results.get(f"direct/{level}")
        bare = results.get(f"bare/{level}")
        litellm = results.get(f"litellm/{level}")
        for server in SERVERS:
            result = results.get(f"{server}/{level}")
            if result is None:
                continue
            p50 = _get(result, "latency_ms", "p50")
            ttft = _get(result, "ttft_ms", "p50")
            rows.append(
                {
                    "load": level,
                    "server": server,
                    "rps": result.get("rps"),
                    "p50_ms": p50,
                    "p95_ms": _get(result, "latency_ms", "p95"),
                    "p99_ms": _get(result, "latency_ms", "p99"),
                    "added_p50_ms": None
                    if server == "direct"
                    else _minus(p50, _get(direct, "latency_ms", "p50")),
                    "ttft_p50_ms": ttft,
                    "added_ttft_p50_ms": None
                    if server == "direct"
                    else _minus(ttft, _get(direct, "ttft_ms", "p50")),
                    "cpu_ms_per_request": result.get("server_cpu_ms_per_request"),
                    "rss_mb_per_worker": round(result["worker_rss_kb"] / 1024, 1)
                    if result.get("worker_rss_kb")
                    else None,
                    "errors": result.get("errors"),
                    "error_kinds": result.get("error_kinds"),
                    "server_core_pct": result.get("server_core_pct"),
                    "cores_busy_pct": result.get("cores_busy_pct"),
                    "recorded_latency_ms_p50": result.get("recorded_latency_ms_p50"),
                    "postgres_connections": _get(
                        result, "books", "postgres_connections"
                    ),
                    "vs_litellm": _ratio(result.get("rps"), _get(litellm, "rps")),
                    "vs_bare": _ratio(result.get("rps"), _get(bare, "rps")),
                }
            )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| load | server | req/s | p50 ms | p95 ms | p99 ms | added p50 ms | "
        "TTFT p50 ms | added TTFT ms | CPU ms/req | RSS MB/worker | errors | "
        "x LiteLLM | x bare | server % of core1 | core0/core1 busy % |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        cores = row["cores_busy_pct"] or []
        lines.append(
            "| "
            + " | ".join(
                [
                    row["load"],
                    SERVER_NAMES[row["server"]],
                    _num(row["rps"], 1),
                    _num(row["p50_ms"]),
                    _num(row["p95_ms"]),
                    _num(row["p99_ms"]),
                    _num(row["added_p50_ms"]),
                    _num(row["ttft_p50_ms"]),
                    _num(row["added_ttft_p50_ms"]),
                    _num(row["cpu_ms_per_request"]),
                    _num(row["rss_mb_per_worker"], 1),
                    str(row["errors"]),
                    _num(row["vs_litellm"]),
                    _num(row["vs_bare"]),
                    _num(row["server_core_pct"], 0),
                    "/".join(f"{c:.0f}" for c in cores) or "-",
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def summary(
    results: dict[str, dict[str, Any]],
    starts: dict[str, float | None],
    checks: dict[str, Any],
) -> dict[str, Any]:
    """The headline numbers and the targets, as written to latest.json."""

    def value(server: str, level: str, *path: str) -> Any:
        return _get(results.get(f"{server}/{level}"), *path)

    def rss_mb(server: str) -> float | None:
        values = [
            results[f"{server}/{level}"]["worker_rss_kb"]
            for level, _, _ in LEVELS
            if results.get(f"{server}/{level}", {}).get("worker_rss_kb")
        ]
        return round(max(values) / 1024, 1) if values else None

    def rounded(number: float | None) -> float | None:
        return None if number is None else round(number, 3)

    rps_c10 = {s: value(s, "non-stream c=10", "rps") for s in SERVERS}
    added_p50 = {
        s: rounded(
            _minus(
                value(s, "non-stream c=1", "latency_ms", "p50"),
                value("direct", "non-stream c=1", "latency_ms", "p50"),
            )
        )
        for s in SERVERS
        if s != "direct"
    }
    added_ttft = {
        s: rounded(
            _minus(
                value(s, "stream c=1", "ttft_ms", "p50"),
                value("direct", "stream c=1", "ttft_ms", "p50"),
            )
        )
        for s in SERVERS
        if s != "direct"
    }
    rss = {s: rss_mb(s) for s in ("bare", "gateway", "litellm")}
    records = checks.get("usage_records") or {}
    ledger_ok = checks.get("ledger_matched")

    def target(
        name: str, measured: float | None, threshold: float, unit: str, ok: bool | None
    ) -> dict[str, Any]:
        return {
            "name": name,
            "value": None if measured is None else round(measured, 3),
            "threshold": threshold,
            "unit": unit,
            "pass": ok,
        }

    speedup = _ratio(rps_c10["gateway"], rps_c10["litellm"])
    start = starts.get("gateway")
    rss_share = _ratio(rss["gateway"], rss["litellm"])
    lost, doubled = records.get("lost"), records.get("doubled")
    unexpected = records.get("unexpected")
    exact = (
        None
        if lost is None or ledger_ok is None
        else lost == 0 and doubled == 0 and unexpected == 0 and bool(ledger_ok)
    )
    targets = [
        target(
            "non-stream c=10 req/s ≥ 5x LiteLLM's (1 worker each)",
            speedup,
            5,
            "x",
            None if speedup is None else speedup >= 5,
        ),
        target(
            "added p50 at c=1 ≤ 3 ms",
            added_p50["gateway"],
            3,
            "ms",
            None if added_p50["gateway"] is None else added_p50["gateway"] <= 3,
        ),
        target(
            "streaming TTFT added (p50, c=1) ≤ 3 ms",
            added_ttft["gateway"],
            3,
            "ms",
            None if added_ttft["gateway"] is None else added_ttft["gateway"] <= 3,
        ),
        target(
            "RSS per worker ≤ ½ LiteLLM's",
            rss_share,
            0.5,
            "x LiteLLM",
            None if rss_share is None else rss_share <= 0.5,
        ),
        target(
            "start to first served request ≤ 5 s",
            start,
            5,
            "s",
            None if start is None else start <= 5,
        ),
        target(
            "0 lost / 0 doubled usage records, exact ledger",
            None if lost is None else (lost or 0) + (doubled or 0) + (unexpected or 0),
            0,
            "records off",
            exact,
        ),
    ]
    return {
        "rps_c10": rps_c10,
        "added_p50_ms_c1": added_p50,
        "added_ttft_ms": added_ttft,
        "rss_mb_per_worker": rss,
        "start_to_first_request_s": {s: rounded(v) for s, v in starts.items()},
        "usage_records": records,
        "lost_usage_records": lost,
        "doubled_usage_records": doubled,
        "ledger_matched": ledger_ok,
        "ledger": checks.get("ledger"),
        "targets": targets,
        "all_targets_pass": all(t["pass"] is True for t in targets),
    }


def verdict(ok: bool | None) -> str:
    if ok is None:
        return "FAIL (not measured)"
    return "PASS" if ok else "FAIL"


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | threshold | result |", "|---|---|---|---|"]
    for t in targets:
        measured = "-" if t["value"] is None else f"{t['value']:,.2f} {t['unit']}"
        lines.append(
            f"| {t['name']} | {measured} | {t['threshold']} {t['unit']} | "
            f"{verdict(t['pass'])} |"
        )
    return "\n".join(lines)


def text(
    rows: list[dict[str, Any]],
    head: dict[str, Any],
    machine: dict[str, Any],
    versions: dict[str, Any],
    notes: list[str],
) -> str:
    """The whole report, Markdown: what is printed and written to latest.md."""
    starts = head["start_to_first_request_s"]
    records = head["usage_records"] or {}
    ledger = head["ledger"] or {}
    out = [
        "# Gateway benchmark",
        "",
        f"Run {machine.get('date', '')}, {machine.get('elapsed', '')}.",
        "",
        table(rows),
        "",
        "added = p50 minus the same load against the upstream called directly. "
        "TTFT = first SSE event with content. CPU = utime+stime of the server's "
        "processes over the measured window ÷ requests in it. RSS = VmRSS of the "
        "worker process at the end of the window. x LiteLLM, x bare = req/s ratios. "
        "server % of core1 = its CPU time ÷ the window; core busy % = the whole "
        "core, whoever used it (other processes on this machine included).",
        "",
        "**Start to first served request:** "
        + ", ".join(
            f"{SERVER_NAMES[s]} {_num(v)} s" for s, v in starts.items() if s in SERVERS
        ),
        "",
        "**Usage records (gateway):** "
        f"{records.get('ok_responses', '-')} successful responses seen, "
        f"{records.get('records', '-')} usage records, "
        f"lost {records.get('lost', '-')}, doubled {records.get('doubled', '-')}, "
        f"without a matching 200 {records.get('unexpected', '-')}, "
        f"error records {records.get('error_records', '-')}. "
        f"**Ledger:** {'matched' if head['ledger_matched'] else 'NOT matched'} "
        f"(balance {ledger.get('balance_micros', '-')} vs Σ entries "
        f"{ledger.get('sum_amount_micros', '-')}; held {ledger.get('held_micros', '-')} "
        f"vs Σ held deltas {ledger.get('sum_held_delta_micros', '-')}; "
        f"{ledger.get('captures', '-')} captures for "
        f"{ledger.get('charged_records', '-')} charged records; Σ captured "
        f"{ledger.get('captured_micros', '-')} vs Σ record credits "
        f"{ledger.get('record_credits_micros', '-')}; micro-credits).",
        "",
        "**Gateway, its own view** (p50 of `latency_ms` on the usage records "
        "of each level, next to the client's p50): "
        + "; ".join(
            f"{row['load']} {_num(row['recorded_latency_ms_p50'], 0)} ms vs "
            f"{_num(row['p50_ms'], 1)} ms"
            for row in rows
            if row["server"] == "gateway"
        ),
        "",
        "**Gateway's PostgreSQL connections** open after each level: "
        + "; ".join(
            f"{row['load']} {row['postgres_connections']}"
            for row in rows
            if row["server"] == "gateway"
        )
        + ". **Errors:** "
        + (
            "; ".join(
                f"{SERVER_NAMES[row['server']]} {row['load']}: "
                + ", ".join(f"{k}: {v}" for k, v in row["error_kinds"].items())
                for row in rows
                if row["errors"]
            )
            or "none"
        ),
        "",
        "## Targets",
        "",
        targets_table(head["targets"]),
        "",
        f"**{sum(1 for t in head['targets'] if t['pass'])}/{len(head['targets'])} "
        "targets pass.**",
        "",
        "## Machine",
        "",
    ]
    out += [f"- {key}: {value}" for key, value in machine.items()]
    out += ["", "## Versions", ""]
    for side, packages in versions.items():
        out.append(
            f"- {side}: " + ", ".join(f"{name} {v}" for name, v in packages.items())
        )
    if notes:
        out += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    return "\n".join(out) + "\n"


def write(
    directory: Path,
    markdown: str,
    head: dict[str, Any],
    rows: list[dict[str, Any]],
    extra: dict[str, Any],
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "latest.md").write_text(markdown)
    document = {**extra, **head, "rows": rows}
    (directory / "latest.json").write_text(json.dumps(document, indent=2) + "\n")
