"""The benchmark: the gateway against the upstream called directly, a bare
pass-through and the LiteLLM proxy, one at a time, in one run.

Core 0 holds this script, the fake upstream, the load generator, PostgreSQL
and Redis; core 1 holds the server under test (one worker), so that each
server has a core of its own. See bench/README.md.

Run by ``make bench`` (bench/run.sh) inside scripts/with-services.sh, which
exports DATABASE_URL and REDIS_URL. Environment knobs: BENCH_WARMUP and
BENCH_DURATION (seconds per load level, default 2 and 8), BENCH_SERVERS
(comma list of direct,bare,gateway,litellm; default all).
"""

import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from bench import report
from bench.loadgen import core_ticks, process_tree

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
WORK = BENCH / ".run"
RESULTS = BENCH / "results"
PYTHON = str(ROOT / ".venv" / "bin" / "python")
LITELLM_VENV = BENCH / ".venv-litellm"
LOAD_CORE, SERVER_CORE = 0, 1
MASTER_KEY = "sk-bench-litellm-master-key"
SECRET_KEY = "bench-only-secret-key-not-for-production-use-0123456789"  # noqa: S105 - throwaway database
START_TIMEOUT = 120.0
GATEWAY_PACKAGES = (
    "Django",
    "litellm",
    "gunicorn",
    "uvicorn",
    "uvicorn-worker",
    "psycopg",
    "redis",
    "django-redis",
    "aiohttp",
    "httpx",
    "openai",
    "uvloop",
    "httptools",
)
LITELLM_PACKAGES = (
    "litellm",
    "fastapi",
    "starlette",
    "uvicorn",
    "uvloop",
    "httptools",
    "httpx",
    "aiohttp",
    "openai",
    "pydantic",
    "orjson",
    "certifi",
    "litellm-proxy-extras",
    "litellm-enterprise",
)


def log(message: str) -> None:
    sys.stderr.write(f"bench: {message}\n")
    sys.stderr.flush()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin(pid: int, core: int) -> None:
    """Every thread of ``pid`` and of its descendants onto ``core``."""
    for process in process_tree(pid):
        try:
            tasks = os.listdir(f"/proc/{process}/task")
        except OSError:
            continue
        for task in tasks:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(task), {core})


# --- servers --------------------------------------------------------------------


class Server:
    """A process this script started (on the server core unless told)."""

    def __init__(
        self,
        name: str,
        command: list[str],
        port: int,
        env: dict[str, str],
        core: int = SERVER_CORE,
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = WORK / f"{name}.log"
        self.started = time.monotonic()
        with self.log_path.open("wb") as output:
            self.process = subprocess.Popen(
                ["taskset", "-c", str(core), *command],
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if not self.alive():
            return
        tree = process_tree(self.pid)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            for pid in tree:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(
                self.log_path.read_text(errors="replace").splitlines()[-lines:]
            )
        except OSError:
            return ""


def chat_request(
    port: int, path: str, model: str, key: str, timeout: float
) -> tuple[int, str]:
    """One non-streamed chat completion: (status, x-request-id)."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello in a few words."}],
            "max_tokens": 64,
        }
    )
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(
            "POST",
            path,
            body,
            {"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
        )
        response = connection.getresponse()
        response.read()
        return response.status, response.getheader("x-request-id") or ""
    finally:
        connection.close()


def first_served(
    server: Server, path: str, model: str, key: str, seen: list[tuple[int, str]]
) -> float:
    """Seconds from the process start to its first 200 for a chat completion."""
    deadline = server.started + START_TIMEOUT
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(
                f"{server.name} exited with {server.process.returncode}:\n"
                + server.log_tail()
            )
        try:
            status, request_id = chat_request(
                server.port, path, model, key, timeout=deadline - time.monotonic()
            )
        except OSError:
            time.sleep(0.02)
            continue
        seen.append((status, request_id))
        if status == 200:
            return time.monotonic() - server.started
        time.sleep(0.05)
    raise RuntimeError(f"{server.name} served nothing in {START_TIMEOUT:.0f} s")


# --- load ------------------------------------------------------------------------


def load(
    port: int,
    path: str,
    model: str,
    key: str,
    stream: bool,
    concurrency: int,
    pid: int,
    tag: str,
) -> dict[str, Any]:
    out = WORK / f"load-{tag}.json"
    command = [
        PYTHON,
        "-m",
        "bench.loadgen",
        "--url",
        f"http://127.0.0.1:{port}{path}",
        "--model",
        model,
        "--key",
        key,
        "--concurrency",
        str(concurrency),
        "--warmup",
        str(WARMUP),
        "--duration",
        str(DURATION),
        "--pid",
        str(pid),
        "--collect-ids",
        "--out",
        str(out),
    ]
    if stream:
        command.append("--stream")
    subprocess.run(
        ["taskset", "-c", str(LOAD_CORE), *command], cwd=ROOT, check=True, timeout=120
    )
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def run_levels(
    server: str,
    port: int,
    path: str,
    model: str,
    key: str,
    pid: int,
    results: dict[str, dict[str, Any]],
    after: Any = None,
) -> None:
    for level, stream, concurrency in report.LEVELS:
        tag = f"{server}-{level.replace(' ', '-').replace('=', '')}"
        result = load(port, path, model, key, stream, concurrency, pid, tag)
        ids = result.pop("request_ids")
        results[f"{server}/{level}"] = result
        errors = f", errors {result['error_kinds']}" if result["errors"] else ""
        log(
            f"{server:8} {level:16} {result['rps']:9.1f} req/s  p50 "
            f"{(result['latency_ms'] or {}).get('p50', '-')} ms{errors}"
        )
        if after is not None:
            after(ids, result)


# --- the gateway's books -------------------------------------------------------------


def books(dsn: str, ok_ids: set[str]) -> dict[str, Any]:
    """Usage records against the 200s the clients saw, and the ledger."""
    with psycopg.connect(dsn, autocommit=True) as connection:
        records = connection.execute(
            "SELECT request_id, status, count(*) FROM billing_usagerecord "
            "GROUP BY request_id, status"
        ).fetchall()
        captures = connection.execute(
            "SELECT request_id, count(*), "
            "sum(-(amount_micros + held_delta_micros))::bigint "
            "FROM billing_ledgerentry WHERE entry_type = 'capture' GROUP BY request_id"
        ).fetchall()
        accounts = connection.execute(
            "SELECT a.id, a.balance_micros, a.held_micros, "
            "coalesce(sum(e.amount_micros), 0)::bigint, "
            "coalesce(sum(e.held_delta_micros), 0)::bigint "
            "FROM billing_creditaccount a LEFT JOIN billing_ledgerentry e "
            "ON e.account_id = a.id GROUP BY a.id, a.balance_micros, a.held_micros"
        ).fetchall()
        connections = connection.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND pid <> pg_backend_pid()"
        ).fetchone()
        credits = connection.execute(
            "SELECT coalesce(sum(credits_micros), 0)::bigint, count(*) FILTER "
            "(WHERE credits_micros > 0) FROM billing_usagerecord"
        ).fetchone()
    per_id: dict[str, int] = {}
    success: set[str] = set()
    error_records = 0
    for request_id, status, count in records:
        per_id[request_id] = per_id.get(request_id, 0) + count
        if status == "success":
            success.add(request_id)
        else:
            error_records += count
    doubled = sum(count - 1 for count in per_id.values() if count > 1)
    doubled += sum(count - 1 for _, count, _ in captures if count > 1)
    balance = sum(row[1] for row in accounts)
    held = sum(row[2] for row in accounts)
    captured = sum(row[2] or 0 for row in captures)
    record_credits, charged_records = credits if credits is not None else (0, 0)
    ledger = {
        "accounts": len(accounts),
        "balance_micros": balance,
        "sum_amount_micros": sum(row[3] for row in accounts),
        "held_micros": held,
        "sum_held_delta_micros": sum(row[4] for row in accounts),
        "captures": len(captures),
        "charged_records": charged_records,
        "captured_micros": captured,
        "record_credits_micros": record_credits,
        # balance = Σ amounts and held = Σ held deltas, for every account
        "sums_match": all(row[1] == row[3] and row[2] == row[4] for row in accounts),
        # every hold captured or released once the calls are over
        "no_open_holds": held == 0,
        # one capture per charged record, for the credits on the records
        "captures_match": captured == record_credits
        and len(captures) == charged_records,
    }
    matched = (
        ledger["sums_match"] and ledger["no_open_holds"] and ledger["captures_match"]
    )
    return {
        "usage_records": {
            "ok_responses": len(ok_ids),
            "records": sum(per_id.values()),
            "success_records": len(success),
            "lost": len(ok_ids - success),
            "doubled": doubled,
            "unexpected": len(success - ok_ids),
            "error_records": error_records,
        },
        "ledger_matched": matched,
        "ledger": ledger,
        # Open client connections to PostgreSQL (all the gateway's: nothing
        # else holds one between levels).
        "postgres_connections": int(connections[0]) if connections else None,
    }


def recorded_latency(dsn: str, ids: list[str]) -> float | None:
    """p50 of the latency_ms the gateway wrote on these calls' usage records
    (its own view of a call, next to what the client measured)."""
    if not ids:
        return None
    with psycopg.connect(dsn, autocommit=True) as connection:
        row = connection.execute(
            "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY latency_ms) "
            "FROM billing_usagerecord WHERE request_id = ANY(%s)",
            (ids,),
        ).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def settled_books(dsn: str, ok_ids: set[str]) -> dict[str, Any]:
    """The books once the last settlements landed (streams settle after
    their last byte): polled until nothing is missing, for at most 10 s."""
    deadline = time.monotonic() + 10
    while True:
        state = books(dsn, ok_ids)
        records = state["usage_records"]
        settled = records["lost"] == 0 and state["ledger"]["held_micros"] == 0
        if settled or time.monotonic() > deadline:
            return state
        time.sleep(0.25)


# --- machine and versions ----------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kb = int(line.split()[1])
    load1, load5, _ = os.getloadavg()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(memory_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": f"{load1:.2f} (1 min), {load5:.2f} (5 min)",
    }


def background_busy() -> list[float]:
    """Busy % of each core over one second before anything of ours runs."""
    before = core_ticks()
    time.sleep(1)
    after = core_ticks()
    return [
        round(100 * (a[0] - b[0]) / max(1, a[1] - b[1]), 1)
        for a, b in zip(after, before, strict=False)
    ]


def versions(python: str, packages: tuple[str, ...]) -> dict[str, str]:
    script = (
        "import importlib.metadata as m, json, platform, sys\n"
        "out = {'python': platform.python_version()}\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        out[name] = m.version(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        out[name] = 'not installed'\n"
        "print(json.dumps(out))\n"
    )
    try:
        output = subprocess.run(
            [python, "-c", script, *packages],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        result: dict[str, str] = json.loads(output)
        return result
    except (OSError, subprocess.SubprocessError, ValueError) as error:
        return {"error": str(error)}


def service_versions(dsn: str, redis_url: str) -> dict[str, str]:
    import redis

    with psycopg.connect(dsn) as connection:
        row = connection.execute("SHOW server_version").fetchone()
    client = redis.Redis.from_url(redis_url)
    return {
        "postgresql": str(row[0]) if row else "?",
        "redis": str(client.info("server").get("redis_version", "?")),
    }


def pin_services(dsn: str, redis_url: str) -> list[str]:
    """PostgreSQL (postmaster: its future backends inherit) and Redis onto the
    load core, off the server core."""
    import redis

    pinned = []
    with psycopg.connect(dsn) as connection:
        row = connection.execute("SHOW data_directory").fetchone()
    if row:
        pid_file = Path(str(row[0])) / "postmaster.pid"
        try:
            postmaster = int(pid_file.read_text().split()[0])
            pin(postmaster, LOAD_CORE)
            pinned.append(f"PostgreSQL (pid {postmaster})")
        except (OSError, ValueError, IndexError) as error:
            log(f"could not pin PostgreSQL: {error}")
    try:
        redis_pid = int(redis.Redis.from_url(redis_url).info("server")["process_id"])
        pin(redis_pid, LOAD_CORE)
        pinned.append(f"Redis (pid {redis_pid})")
    except Exception as error:
        log(f"could not pin Redis: {error}")
    return pinned


def log_problems(path: Path, limit: int = 6) -> list[str]:
    """A server log's distinct warning and error lines (times and request
    ids left out), most frequent first, each with its count."""
    pattern = re.compile(r"WARNING|ERROR|CRITICAL|Traceback|Exception", re.IGNORECASE)
    noise = re.compile(
        r'"time": "[^"]*", |req_[0-9a-f]{32}|^\S+ \S+ - |\d\d:\d\d:\d\d(\.\d+)? ?'
    )
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    counts: dict[str, int] = {}
    for line in lines:
        if pattern.search(line):
            key = noise.sub("", line)[:300]
            counts[key] = counts.get(key, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:limit]
    return [f"{count} x {line}" for line, count in ranked]


# --- the run ---------------------------------------------------------------------

WARMUP = float(os.environ.get("BENCH_WARMUP", "2"))
DURATION = float(os.environ.get("BENCH_DURATION", "8"))


def main() -> int:
    started_at = float(os.environ.get("BENCH_STARTED_AT") or time.time())
    wanted = os.environ.get("BENCH_SERVERS", ",".join(report.SERVERS)).split(",")
    dsn, redis_url = os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL")
    if not dsn or not redis_url:
        log("DATABASE_URL and REDIS_URL must be set: run `make bench`")
        return 2
    if os.cpu_count() != 2:
        log(f"built for 2 cores; this machine has {os.cpu_count()}")
    WORK.mkdir(exist_ok=True)
    os.sched_setaffinity(0, {LOAD_CORE})
    notes: list[str] = []
    idle = background_busy()
    if max(idle) > 10:
        notes.append(
            f"The machine was not idle before the run: cores busy {idle} % over 1 s "
            "with nothing of the benchmark running (other processes share it; "
            "numbers are noisier)."
        )
    pinned = pin_services(dsn, redis_url)
    base_env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "PYTHONUNBUFFERED": "1",
    }
    for name in ("BENCH_STARTED_AT", "BENCH_SERVERS", "BENCH_WARMUP", "BENCH_DURATION"):
        base_env.pop(name, None)

    results: dict[str, dict[str, Any]] = {}
    starts: dict[str, float | None] = {}
    checks: dict[str, Any] = {}
    server_logs: dict[str, list[str]] = {}
    failures: list[str] = []

    upstream_port = free_port()
    upstream = Server(
        "upstream",
        [PYTHON, "-m", "bench.upstream", "--port", str(upstream_port)],
        upstream_port,
        base_env,
        core=LOAD_CORE,
    )
    try:
        starts["direct"] = first_served(
            upstream, "/v1/chat/completions", "bench-model", "x", []
        )
        upstream_base = f"http://127.0.0.1:{upstream_port}"
        if "direct" in wanted:
            log("direct: the load generator against the fake upstream")
            run_levels(
                "direct",
                upstream_port,
                "/v1/chat/completions",
                "bench-model",
                "x",
                upstream.pid,
                results,
            )
        if "bare" in wanted:
            try:
                bench_bare(upstream_base, base_env, results, starts, server_logs)
            except Exception as error:
                failures.append(f"bare pass-through: {error}")
                log(f"bare pass-through failed: {error}")
        if "gateway" in wanted:
            try:
                bench_gateway(
                    upstream_base, base_env, dsn, results, starts, checks, server_logs
                )
            except Exception as error:
                failures.append(f"gateway: {error}")
                log(f"gateway failed: {error}")
        if "litellm" in wanted:
            try:
                bench_litellm(upstream_base, base_env, results, starts, server_logs)
            except Exception as error:
                failures.append(f"LiteLLM proxy: {error}")
                log(f"LiteLLM proxy failed: {error}")
    finally:
        upstream.stop()

    elapsed = time.time() - started_at
    host = machine()
    host["date"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    host["elapsed"] = f"{elapsed:.0f} s from `make bench` to the report"
    host["cores busy before the run"] = f"{idle} %"
    host["placement"] = (
        f"core {LOAD_CORE}: fake upstream, load generator, this script, "
        f"{', '.join(pinned) or 'PostgreSQL and Redis (unpinned)'}; "
        f"core {SERVER_CORE}: the server under test, one worker, one at a time"
    )
    host["load levels"] = f"{WARMUP:g} s warm-up + {DURATION:g} s measured each"
    all_versions = {
        "gateway venv": versions(PYTHON, GATEWAY_PACKAGES),
        "LiteLLM venv": versions(
            str(LITELLM_VENV / "bin" / "python"), LITELLM_PACKAGES
        ),
    }
    if dsn and redis_url:
        all_versions["services"] = service_versions(dsn, redis_url)
    install_notes = LITELLM_VENV / ".bench-install-notes"
    if install_notes.exists():
        notes += [
            line for line in install_notes.read_text().splitlines() if line.strip()
        ]
    notes += [f"FAILED: {failure}" for failure in failures]
    for name, lines in server_logs.items():
        if lines:
            notes.append(
                f"{name} log, distinct warning/error lines: "
                + " | ".join(f"`{line}`" for line in lines)
            )

    rows = report.level_rows(results)
    head = report.summary(results, starts, checks)
    markdown = report.text(rows, head, host, all_versions, notes)
    report.write(
        RESULTS,
        markdown,
        head,
        rows,
        {
            "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "elapsed_s": round(elapsed, 1),
            "machine": host,
            "versions": all_versions,
            "settings": {
                "warmup_s": WARMUP,
                "duration_s": DURATION,
                "levels": [
                    {"name": n, "stream": s, "concurrency": c}
                    for n, s, c in report.LEVELS
                ],
                "load_core": LOAD_CORE,
                "server_core": SERVER_CORE,
            },
            "failures": failures,
            "notes": notes,
            "results": results,
        },
    )
    print(markdown)
    log(f"written: {RESULTS / 'latest.md'}, {RESULTS / 'latest.json'}")
    return 1 if failures else 0


def bench_bare(
    upstream: str,
    env: dict[str, str],
    results: dict[str, dict[str, Any]],
    starts: dict[str, float | None],
    logs: dict[str, list[str]],
) -> None:
    port = free_port()
    log("bare: a minimal aiohttp pass-through")
    server = Server(
        "bare",
        [
            PYTHON,
            "-m",
            "bench.passthrough",
            "--port",
            str(port),
            "--upstream",
            upstream,
        ],
        port,
        env,
    )
    try:
        starts["bare"] = first_served(
            server, "/v1/chat/completions", "bench-model", "x", []
        )
        run_levels(
            "bare",
            port,
            "/v1/chat/completions",
            "bench-model",
            "x",
            server.pid,
            results,
        )
    finally:
        server.stop()
        logs["bare"] = log_problems(server.log_path)


def bench_gateway(
    upstream: str,
    base_env: dict[str, str],
    dsn: str,
    results: dict[str, dict[str, Any]],
    starts: dict[str, float | None],
    checks: dict[str, Any],
    logs: dict[str, list[str]],
) -> None:
    # A settlement journal of this run's own: a previous run's lines name
    # calls of a database that is gone.
    journal = WORK / "journal"
    shutil.rmtree(journal, ignore_errors=True)
    env = {
        **base_env,
        "SECRET_KEY": SECRET_KEY,
        "LOG_LEVEL": "WARNING",
        "GATEWAY_JOURNAL_DIR": str(journal),
    }
    log("gateway: migrate and seed")
    subprocess.run(
        [PYTHON, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
    )
    seeded = subprocess.run(
        [PYTHON, "-m", "bench.seed", "--upstream", f"{upstream}/v1"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )
    seed = json.loads(seeded.stdout.strip().splitlines()[-1])
    port = free_port()
    log("gateway: gunicorn, one uvicorn worker, the whole pipeline")
    server = Server(
        "gateway",
        [
            str(ROOT / ".venv" / "bin" / "gunicorn"),
            "gateway_project.asgi:application",
            "-k",
            "uvicorn_worker.UvicornWorker",
            "-w",
            "1",
            "-b",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "5",
        ],
        port,
        env,
    )
    ok_ids: set[str] = set()
    path = "/v1/chat/completions"
    try:
        seen: list[tuple[int, str]] = []
        starts["gateway"] = first_served(server, path, seed["model"], seed["key"], seen)
        ok_ids.update(request_id for status, request_id in seen if status == 200)

        def after(ids: list[str], result: dict[str, Any]) -> None:
            ok_ids.update(ids)
            result["recorded_latency_ms_p50"] = recorded_latency(dsn, ids)
            if result.get("ok_without_request_id"):
                log(f"{result['ok_without_request_id']} 200s without x-request-id")
            state = settled_books(dsn, ok_ids)
            result["books"] = state
            checks.update(state)
            records = state["usage_records"]
            log(
                f"gateway books: {records['ok_responses']} 200s, "
                f"{records['success_records']} success records, lost "
                f"{records['lost']}, doubled {records['doubled']}, unexpected "
                f"{records['unexpected']}, ledger "
                f"{'matched' if state['ledger_matched'] else 'NOT matched'}, "
                f"{state['postgres_connections']} PostgreSQL connections open"
            )

        run_levels(
            "gateway",
            port,
            path,
            seed["model"],
            seed["key"],
            server.pid,
            results,
            after=after,
        )
    finally:
        server.stop()
        logs["gateway"] = log_problems(server.log_path)


def bench_litellm(
    upstream: str,
    base_env: dict[str, str],
    results: dict[str, dict[str, Any]],
    starts: dict[str, float | None],
    logs: dict[str, list[str]],
) -> None:
    executable = LITELLM_VENV / "bin" / "litellm"
    if not executable.exists():
        raise RuntimeError(f"{executable} is missing: run bench/install-litellm.sh")
    config = WORK / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: bench-model\n"
        "    litellm_params:\n"
        "      model: openai/bench-model\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: x\n"
        "general_settings:\n"
        f"  master_key: {MASTER_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    env = {
        key: value
        for key, value in base_env.items()
        if key not in ("DATABASE_URL", "REDIS_URL")
        and not key.startswith("VIRTUAL_ENV")
    }
    # Its own logs at WARNING like the gateway's (no access log line per call).
    env["LITELLM_LOG"] = "WARNING"
    port = free_port()
    log("litellm: the LiteLLM proxy, one worker, master key, no database")
    server = Server(
        "litellm",
        [
            str(executable),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        port,
        env,
    )
    try:
        starts["litellm"] = first_served(
            server, "/v1/chat/completions", "bench-model", MASTER_KEY, []
        )
        run_levels(
            "litellm",
            port,
            "/v1/chat/completions",
            "bench-model",
            MASTER_KEY,
            server.pid,
            results,
        )
    finally:
        server.stop()
        logs["LiteLLM proxy"] = log_problems(server.log_path)


if __name__ == "__main__":
    sys.exit(main())
