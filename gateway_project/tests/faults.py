"""Helpers of the fault suite (test_faults.py): gateway processes started and
stopped together, callers that note exactly what they saw, the settlement
journal as the servers left it, and the one invariant checker every scenario
ends with (``assert_invariants``)."""

import contextlib
import fcntl
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from django.db import connection
from django.utils import timezone

from billing.reconciliation import holds_settle_stale
from billing.services import team_open
from billing.tests.prices import price
from conftest import RunningServer, _start_server, _stop_server
from routing.models import ModelGroup
from routing.services import deployment_create, model_group_create
from tenants.models import BudgetMode, Organization
from tenants.services import organization_create

# The journal retried every second. (DATABASE_POOL_TIMEOUT=1 is set only
# where the database goes away: with it, a burst of 20 calls on a fresh
# process can wait longer than 1 s for its pool to grow, and get a 503.)
FAST = {"GATEWAY_JOURNAL_RETRY_SECONDS": "1"}
MODEL = "openai/fake-model"
REPOSITORY = Path(__file__).resolve().parents[2]

# What a caller may see, per README ("Calling the gateway", "Money and limits
# on every call", "Every way out of a call", "Degraded modes"); 499 is only
# ever on a record, never sent.
DOCUMENTED = frozenset(
    {
        (200, None),
        (402, "insufficient_credits"),
        (402, "budget_exceeded"),
        (402, "quota_exhausted"),
        (429, "rate_limit_exceeded"),
        (502, "upstream_error"),
        (503, "service_unavailable"),
        (503, "rate_limiter_unavailable"),
        (503, "no_deployment_available"),
        (504, "upstream_timeout"),
    }
)
RECORD_STATUSES = frozenset({"success", "error", "client_disconnected", "interrupted"})
RECORD_HTTP = frozenset({200, 499, 502, 503, 504})
CHARGED = frozenset({"success", "client_disconnected", "interrupted"})


def until(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """Poll ``condition`` until it is truthy (returned), failing after
    ``timeout`` seconds with ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.05)


# --- the world a scenario calls -----------------------------------------------


def fake_group(fake: Any, scenario: str, group_name: str) -> ModelGroup:
    """A model group of one deployment, served by the fake upstream's
    ``scenario``, priced at $1/$2 per million tokens."""
    price(MODEL)
    deployment = deployment_create(
        name=f"{group_name}-deployment",
        model=MODEL,
        litellm_params={"api_base": fake.base(scenario)},
        timeout_ms=60_000,
    )
    return model_group_create(group_name=group_name, members=[(deployment, 0)])


def tenant(
    team_id: str,
    groups: Sequence[ModelGroup],
    *,
    credits: int,
    organization: Organization | None = None,
    **settings: Any,
) -> tuple[Any, Any, str]:
    """A team in consumption_usd mode (100 credits per dollar) with
    ``credits`` micro-credits: (team, key, key plaintext)."""
    organization = organization or organization_create(
        organization_id=f"org_{team_id}", name=team_id
    )
    return team_open(
        organization=organization,
        team_id=team_id,
        credits_allocated_micros=credits,
        model_groups=list(groups),
        budget_mode=BudgetMode.CONSUMPTION_USD,
        **settings,
    )


# --- gateway processes ----------------------------------------------------------


def start_servers(
    tmp_path: Path,
    names: Sequence[str],
    env: dict[str, str] | None = None,
    **own: dict[str, str],
) -> dict[str, RunningServer]:
    """Gateway processes (gunicorn, one uvicorn worker each) started side by
    side, with ``env`` and each its ``own`` extra environment; if one fails to
    start, the others are stopped."""
    with ThreadPoolExecutor(len(names)) as pool:
        futures = {
            name: pool.submit(
                _start_server,
                tmp_path,
                name,
                {**FAST, **(env or {}), **own.get(name, {})},
            )
            for name in names
        }
    started = {n: f.result() for n, f in futures.items() if f.exception() is None}
    failed = [f.exception() for f in futures.values() if f.exception() is not None]
    if failed:
        stop_servers(started.values())
        raise failed[0]  # type: ignore[misc]
    return started


def stop_servers(servers: Iterable[RunningServer]) -> None:
    """Stop each (a killed one is just reaped), print the end of each log
    (shown when the test fails), then drop the test process's connection."""
    for server in servers:
        with contextlib.suppress(Exception):
            if server.process.poll() is None:
                _stop_server(server)
            else:
                server.process.wait(timeout=10)
        with contextlib.suppress(OSError):
            lines = server.log.read_text(errors="replace").splitlines()
            print(f"--- {server.log.name} (last 60 of {len(lines)} lines) ---")
            print("\n".join(lines[-60:]))
    connection.close()


def redis_stop(own: Any) -> None:
    """Stop a StoppableRedis at once (its own stop() asks a stopped Redis
    with retries for seconds); a connection is then refused."""
    if own.process is not None and own.process.poll() is None:
        own.process.terminate()
        own.process.wait(timeout=10)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", own.port)) != 0, "Redis still answers"


def log_lines(server: RunningServer, needle: str) -> list[str]:
    return [
        line
        for line in server.log.read_text(errors="replace").splitlines()
        if needle in line
    ]


# --- callers --------------------------------------------------------------------


@dataclass
class Seen:
    """One call as its client saw it."""

    server: str
    team: str
    kind: str  # "plain" or "stream"
    group: str = ""
    status: int | None = None  # None: no response at all
    code: str | None = None  # the envelope's error code
    request_id: str | None = None  # the server's x-request-id
    client_request_id: str | None = None  # echoed x-client-request-id
    chunks: int = 0  # data events before [DONE]
    done: bool = False  # [DONE] arrived
    stream_error: str | None = None  # an error event inside the stream
    error: str | None = None  # a transport error (reset, cut)
    body: str = ""  # the start of a refusal's body, for evidence
    left: bool = False  # the client hung up on purpose
    started: float = 0.0
    ended: float = 0.0

    @property
    def delivered(self) -> bool:
        """A 200, or a stream that delivered at least one chunk."""
        return self.status == 200 and (self.kind == "plain" or self.chunks > 0)

    @property
    def cut(self) -> bool:
        return self.error is not None


def _note(seen: Seen, line: str) -> None:
    if not line.startswith("data:"):
        return
    data = line.removeprefix("data:").strip()
    if data == "[DONE]":
        seen.done = True
        return
    seen.chunks += 1
    with contextlib.suppress(ValueError):
        parsed = json.loads(data)
        if isinstance(parsed, dict) and "error" in parsed:
            seen.stream_error = str(parsed["error"].get("code"))


def call(
    url: str,
    plaintext: str,
    body: dict[str, Any],
    *,
    server: str,
    team: str,
    headers: dict[str, str] | None = None,
    client: httpx.Client | None = None,
    first: threading.Event | None = None,
    go: threading.Event | None = None,
) -> Seen:
    """POST /v1/chat/completions and note what came back. A stream given
    ``first`` and ``go`` sets ``first`` once its first chunk is in, then
    waits for ``go`` before it reads the rest (its line iterator is kept:
    dropping it would hang up)."""
    stream = bool(body.get("stream"))
    seen = Seen(
        server=server,
        team=team,
        kind="stream" if stream else "plain",
        group=str(body.get("model")),
        started=time.monotonic(),
    )
    sender = client or httpx.Client(timeout=60)
    try:
        with sender.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json=body,
            headers={"X-API-Key": plaintext, **(headers or {})},
        ) as response:
            seen.status = response.status_code
            seen.request_id = response.headers.get("x-request-id")
            seen.client_request_id = response.headers.get("x-client-request-id")
            if response.status_code != 200 or not stream:
                text = response.read().decode(errors="replace")
                seen.body = text[:300]
                if response.status_code != 200:
                    with contextlib.suppress(ValueError, AttributeError, TypeError):
                        seen.code = json.loads(text)["error"]["code"]
            else:
                lines = response.iter_lines()
                if first is not None:
                    for line in lines:
                        _note(seen, line)
                        if seen.chunks or seen.done:
                            break
                    first.set()
                    assert go is not None
                    go.wait(60)
                for line in lines:
                    _note(seen, line)
    except httpx.HTTPError as failure:
        seen.error = f"{type(failure).__name__}: {failure}"
    finally:
        if first is not None:
            first.set()
        if client is None:
            sender.close()
    seen.ended = time.monotonic()
    return seen


@dataclass
class Target:
    """What one call of a load asks: which server, as which team, what."""

    server: str
    url: str
    team: str
    plaintext: str
    body: dict[str, Any]


class Load:
    """Workers calling round the ``targets`` until stopped, each at most
    every ``pace`` seconds; every call is noted in ``seen``."""

    def __init__(
        self, targets: Sequence[Target], *, workers: int, pace: float = 0.1
    ) -> None:
        self.targets = list(targets)
        self.pace = pace
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.seen: list[Seen] = []
        self.threads = [
            threading.Thread(target=self._work, args=(n,), daemon=True)
            for n in range(workers)
        ]
        for thread in self.threads:
            thread.start()

    def _work(self, number: int) -> None:
        step = max(1, len(self.targets) // len(self.threads))
        position = number * step
        with httpx.Client(timeout=60) as client:
            while not self.stopping.is_set():
                target = self.targets[position % len(self.targets)]
                position += 1
                begun = time.monotonic()
                seen = call(
                    target.url,
                    target.plaintext,
                    target.body,
                    server=target.server,
                    team=target.team,
                    client=client,
                )
                with self.lock:
                    self.seen.append(seen)
                self.stopping.wait(max(0.0, self.pace - (time.monotonic() - begun)))

    def calls(self) -> list[Seen]:
        with self.lock:
            return list(self.seen)

    def stop(self) -> list[Seen]:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=90)
        assert not any(t.is_alive() for t in self.threads), "a caller hung"
        return self.calls()


# --- the settlement journal -------------------------------------------------------


def journal_lines(folder: Path) -> list[tuple[str, str, Path]]:
    """(kind, call id, file) of every whole line in the journal files."""
    found = []
    for path in sorted(folder.glob("*.journal")):
        with contextlib.suppress(FileNotFoundError):
            for raw in path.read_text(errors="replace").splitlines():
                kind, _, text = raw.partition(" ")
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    found.append((kind, json.loads(text)["call_id"], path))
    return found


def unlocked(path: Path) -> bool:
    """Whether nobody holds the journal file's lock (its process is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


# --- where the money is ---------------------------------------------------------


class SuiteDatabase:
    """The test database, read through this process's connection and
    reconciled in-process."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())

    def reconcile(self) -> dict[str, int]:
        return holds_settle_stale(
            older_than=timedelta(0), now=timezone.now() + timedelta(seconds=1)
        )


_RECONCILED = re.compile(
    r"(?P<accounts>\d+) accounts checked, (?P<repaired>\d+) repaired; "
    r"journal: (?P<replayed>\d+) settlements applied, (?P<journaled>\d+) holds "
    r"left to it; stale holds: (?P<captured>\d+) captured, (?P<released>\d+) released"
)


class OwnDatabase:
    """A scenario's own PostgreSQL (StoppablePostgres), read over SQL and
    reconciled by ``manage.py reconcile_credits --hold-age 0``, run as the
    operator would, on the scenario's database and journal."""

    def __init__(self, url: str, journal_dir: Path) -> None:
        self.url = url
        self.journal_dir = journal_dir
        self.output = ""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url) as database:
            return database.execute(sql, params).fetchall()  # type: ignore[arg-type]

    def reconcile(self) -> dict[str, int]:
        done = subprocess.run(
            [sys.executable, "manage.py", "reconcile_credits", "--hold-age", "0"],
            cwd=REPOSITORY,
            env={
                **os.environ,
                "DATABASE_URL": self.url,
                "GATEWAY_JOURNAL_DIR": str(self.journal_dir),
            },
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.output = done.stdout + done.stderr
        found = _RECONCILED.search(done.stdout)
        assert done.returncode == 0 and found, (
            f"reconcile_credits exited {done.returncode}:\n{self.output}"
        )
        outcome = {name: int(value) for name, value in found.groupdict().items()}
        outcome["failed"] = 0  # it exits with an error when any row failed
        return outcome


@dataclass
class Entry:
    id: int
    account: int
    team: int
    kind: str
    amount: int
    held: int
    before: int
    after: int
    request_id: str


@dataclass
class Record:
    request_id: str
    team: int
    status: str
    http_status: int
    error_code: str
    credits: int
    client_request_id: str
    streamed: bool
    completion_tokens: int


@dataclass
class Books:
    """Accounts, ledger and usage records as one scenario left them."""

    accounts: dict[int, tuple[int, int, int]]  # id → (team, balance, held)
    entries: list[Entry]
    records: dict[str, Record]
    reconciled: dict[str, int] = field(default_factory=dict)

    def of(self, request_id: str) -> list[Entry]:
        return [e for e in self.entries if e.request_id == request_id]

    def captured(self, request_id: str) -> int:
        """Credits captured for the call: a capture of c is (0, -c)."""
        return sum(
            -e.held - e.amount for e in self.of(request_id) if e.kind == "capture"
        )


def books(database: Any) -> Books:
    accounts = {
        row[0]: (row[1], row[2], row[3])
        for row in database.query(
            "SELECT id, team_id, balance_micros, held_micros FROM billing_creditaccount"
        )
    }
    entries = [
        Entry(*row)
        for row in database.query(
            "SELECT e.id, e.account_id, a.team_id, e.entry_type, e.amount_micros, "
            "e.held_delta_micros, e.balance_before_micros, e.balance_after_micros, "
            "e.request_id FROM billing_ledgerentry e "
            "JOIN billing_creditaccount a ON a.id = e.account_id ORDER BY e.id"
        )
    ]
    records = {
        row[0]: Record(*row)
        for row in database.query(
            "SELECT request_id, team_id, status, http_status, error_code, "
            "credits_micros, client_request_id, streamed, completion_tokens "
            "FROM billing_usagerecord"
        )
    }
    return Books(accounts, entries, records)


def _ledger_problems(state: Books, when: str) -> list[str]:
    """balance == Σ amount, held == Σ held deltas, and the chain, per account."""
    problems = []
    by_account: dict[int, list[Entry]] = defaultdict(list)
    for entry in state.entries:
        by_account[entry.account].append(entry)
    for account, (team, balance, held) in state.accounts.items():
        entries = by_account[account]
        total = sum(e.amount for e in entries)
        total_held = sum(e.held for e in entries)
        if (balance, held) != (total, total_held):
            problems.append(
                f"{when}: account {account} (team {team}): balance/held "
                f"{balance}/{held} but the ledger sums to {total}/{total_held}"
            )
        running = 0
        for entry in entries:
            if entry.before != running:
                problems.append(
                    f"{when}: account {account}: entry {entry.id} ({entry.kind}) "
                    f"starts at {entry.before}, the previous one ended at {running}"
                )
            running = entry.after
    return problems


def _settled_problems(state: Books) -> list[str]:
    """After reconciliation: nothing held, every hold captured or released,
    every ledger row of a call beside a hold of the same account."""
    problems = [
        f"account {account} (team {team}) still holds {held}"
        for account, (team, _, held) in state.accounts.items()
        if held != 0
    ]
    kinds: dict[tuple[int, str], list[str]] = defaultdict(list)
    for entry in state.entries:
        if entry.request_id:
            kinds[(entry.account, entry.request_id)].append(entry.kind)
    for (account, request_id), found in kinds.items():
        if "hold" not in found:
            problems.append(
                f"ledger rows {found} of {request_id} in account {account}, "
                "which holds nothing for it"
            )
        elif not {"capture", "release"} & set(found):
            problems.append(f"hold of {request_id} in account {account} still open")
        for kind in ("hold", "capture", "release"):
            if found.count(kind) > 1:
                problems.append(f"{request_id}: {found.count(kind)} {kind} rows")
    accounts_of: dict[str, set[int]] = defaultdict(set)
    for account, request_id in kinds:
        accounts_of[request_id].add(account)
    problems += [
        f"{request_id} has ledger rows in accounts {sorted(accounts)}"
        for request_id, accounts in accounts_of.items()
        if len(accounts) > 1
    ]
    return problems


def _record_problems(state: Books, seen: Sequence[Seen]) -> list[str]:
    problems = []
    team_of_account = {a: team for a, (team, _, _) in state.accounts.items()}
    ids = Counter(s.request_id for s in seen if s.request_id)
    problems += [f"{i} answered {n} times" for i, n in ids.items() if n > 1]
    for call_seen in seen:
        if not call_seen.delivered:
            continue
        record = state.records.get(call_seen.request_id or "")
        if record is None:
            problems.append(f"no usage record for a delivered call: {call_seen}")
    for record in state.records.values():
        if record.status not in RECORD_STATUSES:
            problems.append(f"{record.request_id}: status {record.status!r}")
        if record.http_status not in RECORD_HTTP:
            problems.append(f"{record.request_id}: http_status {record.http_status}")
        rows = state.of(record.request_id)
        captures = [e for e in rows if e.kind == "capture"]
        if record.credits > 0:
            if len(captures) != 1 or state.captured(record.request_id) != (
                record.credits
            ):
                problems.append(
                    f"{record.request_id}: {record.credits} credits charged, "
                    f"captured {[(e.amount, e.held) for e in captures]}"
                )
        elif captures and state.captured(record.request_id) != 0:
            problems.append(f"{record.request_id}: uncharged but captured")
        if record.status not in CHARGED and record.credits != 0:
            problems.append(f"{record.request_id}: {record.status} charged")
        # Every team here pays by consumption for priced models, uncached.
        if record.status == "success" and record.credits <= 0:
            problems.append(f"{record.request_id}: a success charged nothing")
        strangers = {team_of_account[e.account] for e in rows} - {record.team}
        if strangers:
            problems.append(
                f"{record.request_id}: ledger rows in other teams {strangers}"
            )
    charged: Counter[int] = Counter()
    for record in state.records.values():
        charged[record.team] += record.credits
    captured: Counter[int] = Counter()
    for entry in state.entries:
        if entry.kind == "capture":
            captured[entry.team] += -entry.held - entry.amount
    for team in set(charged) | set(captured):
        if charged[team] != captured[team]:
            problems.append(
                f"team {team}: records charge {charged[team]}, "
                f"the ledger captured {captured[team]}"
            )
    return problems


def assert_invariants(
    database: Any,
    seen: Sequence[Seen],
    *,
    expected: Iterable[tuple[int, str | None]],
    killed: Iterable[str] = (),
    team_pks: dict[str, int] | None = None,
) -> Books:
    """The end of every scenario, once all its servers are stopped:

    - each status a client saw is in ``expected`` (all documented), and a
      transport error only on a server that was ``killed``;
    - balance == Σ ledger and held == Σ held deltas per account, and the
      ledger chains, before and after reconciliation;
    - reconciliation fails nothing and leaves no hold open, nothing held;
    - every delivered call (a 200, or a stream with a chunk out) has one
      usage record under its x-request-id, in its caller's team; a record
      charged has one capture of exactly its credits; every team's captures
      sum to its records' credits; no ledger row without its hold.

    Returns the books after reconciliation, with its outcome."""
    expected = set(expected)
    assert expected <= DOCUMENTED, expected - DOCUMENTED
    killed = set(killed)
    problems = []
    for call_seen in seen:
        if call_seen.status is not None and (call_seen.status, call_seen.code) not in (
            expected
        ):
            problems.append(f"status not expected here: {call_seen}")
        if (call_seen.status is None or call_seen.cut) and (
            call_seen.server not in killed
        ):
            problems.append(f"transport error on a live server: {call_seen}")
    problems += [
        f"{request_id} has {count} usage records"
        for request_id, count in database.query(
            "SELECT request_id, COUNT(*) FROM billing_usagerecord "
            "GROUP BY request_id HAVING COUNT(*) > 1"
        )
    ]
    before = books(database)
    problems += _ledger_problems(before, "before reconciliation")
    reconciled = database.reconcile()
    if reconciled.get("failed"):
        problems.append(f"reconciliation failed on some: {reconciled}")
    after = books(database)
    after.reconciled = reconciled
    problems += _ledger_problems(after, "after reconciliation")
    problems += _settled_problems(after)
    problems += _record_problems(after, seen)
    if team_pks:
        for call_seen in seen:
            record = after.records.get(call_seen.request_id or "")
            if record is not None and record.team != team_pks[call_seen.team]:
                problems.append(
                    f"{record.request_id} recorded in team {record.team}: {call_seen}"
                )
    assert not problems, f"{len(problems)} invariant(s) broken:\n" + "\n".join(
        problems[:60]
    )
    return after
