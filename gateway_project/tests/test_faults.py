"""The fault suite: real gateway processes (gunicorn + uvicorn) on PostgreSQL
and Redis, the fake upstream, and one fault per test — a worker killed
mid-stream, PostgreSQL stopped mid-load, Redis stopped mid-load (fail-open
and fail-closed), clients leaving at each point, one X-Request-Id reused by
two tenants at once. Every test ends with the same checker
(faults.assert_invariants): the books balance, every delivered call has one
record and one capture, reconciliation leaves nothing held, and no client
saw a status the README does not document for the situation."""

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from django_redis import get_redis_connection

from billing.models import CreditAccount, UsageRecord
from billing.tests.test_money_path import _children
from conftest import _test_database_url
from gateway_project.money import MICROS
from gateway_project.tests.faults import (
    Load,
    OwnDatabase,
    Seen,
    SuiteDatabase,
    Target,
    assert_invariants,
    call,
    fake_group,
    journal_lines,
    log_lines,
    redis_stop,
    start_servers,
    stop_servers,
    tenant,
    unlocked,
    until,
)
from gateway_project.tests.test_degraded import StoppablePostgres, StoppableRedis
from routing.tests.fake_upstream import Behaviour
from tenants.services import virtual_key_issue

pytestmark = pytest.mark.django_db(transaction=True)
HELLO = [{"role": "user", "content": "Say hello"}]


def _body(group: str, *, stream: bool = False, **extra):
    body = {"model": group, "messages": HELLO, **extra}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


# --- 1. kill -9 mid-stream ------------------------------------------------------


def test_a_worker_killed_mid_stream_under_load(fake_upstream, journal_dir, tmp_path):
    # Given 20 streams over two servers, each with its first chunk delivered
    # and in the journal, the upstream holding back the rest
    group = fake_group(fake_upstream, "kill", "chat")
    team, _, plaintext = tenant("team_kill", [group], credits=100 * MICROS)
    rest = threading.Event()
    fake_upstream.program(
        "kill", Behaviour(chunks=["Hello there, ", "my friend, ", "bye."], hold=rest)
    )
    servers = start_servers(tmp_path, ["A", "B"], {})
    firsts, go = [threading.Event() for _ in range(20)], threading.Event()
    pool = ThreadPoolExecutor(20)
    try:
        futures = [
            pool.submit(
                call,
                servers["AB"[n % 2]].url,
                plaintext,
                _body("chat", stream=True),
                server="AB"[n % 2],
                team="kill",
                first=firsts[n],
                go=go,
            )
            for n in range(20)
        ]
        until(lambda: all(e.is_set() for e in firsts), "every first chunk", 60)
        until(
            lambda: (
                fake_upstream.calls("kill") == 20
                and len(
                    {c for k, c, _ in journal_lines(journal_dir) if k == "progress"}
                )
                == 20
            ),
            "a progress line of every stream",
        )
        (worker,) = _children(servers["A"].process.pid)
        files_of_a = [
            p for p in journal_dir.glob("*.journal") if f"-{worker}-" in p.name
        ]
        assert files_of_a, list(journal_dir.iterdir())

        # When server A's worker and master are killed (SIGKILL), and once
        # they are gone the upstream sends the rest
        os.kill(worker, signal.SIGKILL)
        servers["A"].process.kill()
        servers["A"].process.wait(10)
        until(lambda: all(unlocked(p) for p in files_of_a), "A's journal is free")
        rest.set()
        go.set()
        seen = [f.result(timeout=60) for f in futures]
    finally:
        rest.set()
        go.set()
        pool.shutdown(wait=True, cancel_futures=True)
        stop_servers(servers.values())

    # Then B's streams finished, A's were cut after their first chunk
    by_server = {n: [s for s in seen if s.server == n] for n in "AB"}
    assert [(s.status, s.chunks > 0, s.done, s.cut) for s in by_server["B"]] == [
        (200, True, True, False)
    ] * 10, by_server["B"]
    assert [(s.status, s.chunks, s.done, s.cut) for s in by_server["A"]] == [
        (200, 1, False, True)
    ] * 10, by_server["A"]
    # and the books hold, with every stream recorded once: A's as
    # interrupted, charged what it relayed; B's as a success
    state = assert_invariants(
        SuiteDatabase(),
        seen,
        expected={(200, None)},
        killed={"A"},
        team_pks={"kill": team.pk},
    )
    for s in by_server["A"]:
        record = state.records[s.request_id]
        assert (record.status, record.streamed) == ("interrupted", True), record
        assert record.completion_tokens > 0 and record.credits > 0, record
        assert state.captured(s.request_id) == record.credits
    for s in by_server["B"]:
        assert state.records[s.request_id].status == "success"
    assert len(state.records) == 20


# --- 2. PostgreSQL stopped for 10 s -------------------------------------------------


def test_postgres_stopped_for_ten_seconds_mid_load(
    fake_upstream, journal_dir, tmp_path
):
    # Given two servers on a PostgreSQL of the test's own; a team far above
    # the deferral margin (its calls' holds wait for their settlements) and a
    # team below it (its calls hold first); plain and streamed calls, some
    # slow, going on
    groups = [
        fake_group(fake_upstream, f"pg-{name}", name)
        for name in ("fast", "slow", "gated", "held")
    ]
    fake_upstream.program(
        "pg-slow", latency=0.5, chunks=["a ", "b ", "c"], chunk_delay=0.3
    )
    gate, rest, go = threading.Event(), threading.Event(), threading.Event()
    fake_upstream.program("pg-gated", Behaviour(gate=gate))
    fake_upstream.program("pg-held", Behaviour(chunks=["one ", "two"], hold=rest))
    rich, _, rich_key = tenant("team_rich", groups, credits=1_000 * MICROS)
    modest, _, modest_key = tenant("team_modest", groups, credits=50 * MICROS)
    teams = {"rich": rich_key, "modest": modest_key}
    # The rich team's hold (16 output tokens) is far below its credits; the
    # modest team's (4,096, the default cap) is not 100 times below its own.
    extra = {"rich": {"max_tokens": 16}, "modest": {}}
    own = StoppablePostgres()
    try:
        own.load(_test_database_url())
        servers: dict = {}
        load = None
        pool = ThreadPoolExecutor(8)
        try:
            servers = start_servers(
                tmp_path,
                ["A", "B"],
                # A request waits 1 s (not 5) for a database that is gone.
                {"DATABASE_URL": own.url, "DATABASE_POOL_TIMEOUT": "1"},
            )
            load = Load(
                _targets(
                    servers,
                    teams,
                    lambda team: [
                        _body(group, stream=stream, **extra[team])
                        for group in ("fast", "slow")
                        for stream in (False, True)
                    ],
                ),
                workers=6,
                pace=0.15,
            )
            _each(load, servers, teams, 0, 3, "calls served before the stop")
            # and, on each server for each team, a plain call the upstream
            # has not answered yet and a stream whose first chunk is out
            firsts = {(n, t): threading.Event() for n in servers for t in teams}
            caught = {
                (name, team, kind): pool.submit(
                    call,
                    servers[name].url,
                    teams[team],
                    _body(
                        "gated" if kind == "plain" else "held",
                        stream=kind == "stream",
                        **extra[team],
                    ),
                    server=name,
                    team=team,
                    first=firsts[(name, team)] if kind == "stream" else None,
                    go=go if kind == "stream" else None,
                )
                for name in servers
                for team in teams
                for kind in ("plain", "stream")
            }
            until(
                lambda: (
                    fake_upstream.calls("pg-gated") == 4
                    and all(e.is_set() for e in firsts.values())
                ),
                "the caught calls are in flight",
            )

            # When PostgreSQL stops, the caught calls are answered, and the
            # load goes on for 10 s before it is started again
            own.stop()
            stopped = time.monotonic()
            gate.set()
            rest.set()
            go.set()
            caught_seen = {k: f.result(timeout=60) for k, f in caught.items()}
            time.sleep(max(0.0, 10 - (time.monotonic() - stopped)))  # the outage
            restarting = time.monotonic()
            own.start()
            up = time.monotonic()
            _each(load, servers, teams, up, 3, "calls served once back", served=True)
            seen = load.stop()
            # Then every call answered is recorded once the servers apply
            # their journals
            journaled = [*seen, *caught_seen.values()]
            wanted = {s.request_id for s in journaled if s.delivered} | {
                caught_seen[(n, "rich", "plain")].request_id for n in servers
            }
            until(
                lambda: wanted <= _recorded(own, wanted),
                "every journaled settlement applied",
                60,
            )
        finally:
            gate.set()
            rest.set()
            go.set()
            pool.shutdown(wait=True, cancel_futures=True)
            if load is not None:
                load.stop()
            stop_servers(servers.values())

        # the calls held before it stopped were served (200, the streams
        # whole); the plain calls whose holds waited for their settlement
        # were refused with 503, each recorded as failed, uncharged
        for (_, team, kind), s in caught_seen.items():
            if (team, kind) == ("rich", "plain"):
                assert (s.status, s.code) == (503, "service_unavailable"), s
            else:
                assert (s.status, s.cut) == (200, False), s
                assert kind == "plain" or s.done, s
        # and every call that started while it was down was refused with
        # 503 service_unavailable; every one started once it was back served
        down = [s for s in seen if s.started > stopped and s.ended < restarting]
        assert {(s.server, s.team) for s in down} == {
            (n, t) for n in servers for t in teams
        }
        assert {(s.status, s.code) for s in down} == {(503, "service_unavailable")}
        back = [s for s in seen if s.started > up]
        # (each server's pool reconnects on its own: 503 until it has, then
        # only 200)
        assert {(s.status, s.code) for s in back} <= {
            (200, None),
            (503, "service_unavailable"),
        }
        for name in servers:
            mine = [s for s in back if s.server == name]
            recovered = min(s.ended for s in mine if s.status == 200)
            late = [s for s in mine if s.started > recovered and s.status != 200]
            assert not late, late
        # and what the database could not take went through each journal
        for server in servers.values():
            assert log_lines(server, "settlement journaled"), server.log
        # and the books hold
        database = OwnDatabase(own.url, journal_dir)
        state = assert_invariants(
            database,
            journaled,
            expected={(200, None), (503, "service_unavailable")},
            team_pks={"rich": rich.pk, "modest": modest.pk},
        )
        assert " 0 repaired" in database.output, database.output
        for s in journaled:
            record = state.records.get(s.request_id or "")
            if s.status == 503:
                # refused with nothing written, or journaled as failed
                assert not state.of(s.request_id), s
                assert record is None or (
                    record.status,
                    record.error_code,
                    record.credits,
                ) == ("error", "service_unavailable", 0), (s, record)
            elif s.delivered:
                assert record.status == "success", (s, record)
                assert record.credits > 0 and state.captured(s.request_id) == (
                    record.credits
                )
        for name in servers:
            refused = caught_seen[(name, "rich", "plain")]
            assert state.records[refused.request_id].error_code == (
                "service_unavailable"
            )
    finally:
        own.destroy()


def _recorded(own: StoppablePostgres, wanted: set) -> set:
    """Which of the wanted calls have a usage record in ``own`` (none while
    it cannot be asked)."""
    try:
        rows = OwnDatabase(own.url, Path()).query(
            "SELECT request_id FROM billing_usagerecord WHERE request_id = ANY(%s)",
            [list(wanted)],
        )
    except psycopg.OperationalError:
        return set()
    return {row[0] for row in rows}


# --- 3. Redis stopped mid-load ----------------------------------------------------


def _targets(servers, teams, bodies) -> list[Target]:
    """Every server, team and body, interleaved: consecutive calls go to
    another server or team."""
    return [
        Target(name, server.url, team, plaintext, body)
        for index in range(len(bodies(next(iter(teams)))))
        for team, plaintext in teams.items()
        for name, server in servers.items()
        for body in [bodies(team)[index]]
    ]


def _each(
    load: Load, servers, teams, since: float, count: int, what: str, served=False
) -> None:
    """Wait until every server has answered ``count`` calls of every team
    that started after ``since`` (``served``: with a 200)."""

    def enough() -> bool:
        done = load.calls()
        return all(
            sum(
                s.server == n
                and s.team == t
                and s.started > since
                and (s.status == 200 or not served)
                for s in done
            )
            >= count
            for n in servers
            for t in teams
        )

    until(enough, what, 60)


def test_redis_stopped_mid_load_fail_open_and_fail_closed(
    fake_upstream, journal_dir, tmp_path
):
    # Given a Redis of the test's own, a fail-open server and a fail-closed
    # one on it, a team with an RPM limit and one without, and calls (plain
    # and streamed, some slow) going on
    fast = fake_group(fake_upstream, "redis-fast", "fast")
    slow = fake_group(fake_upstream, "redis-slow", "slow")
    fake_upstream.program(
        "redis-slow", latency=0.4, chunks=["a ", "b ", "c"], chunk_delay=0.2
    )
    limited, _, limited_key = tenant(
        "team_limited", [fast, slow], credits=100 * MICROS, rpm_limit=100_000
    )
    free, _, free_key = tenant("team_free", [fast, slow], credits=100 * MICROS)
    teams = {"limited": limited_key, "free": free_key}
    (tmp_path / "redis").mkdir()
    own_redis = StoppableRedis(tmp_path / "redis")
    servers: dict = {}
    load = None
    try:
        env = {"REDIS_URL": own_redis.url, "CELERY_BROKER_URL": own_redis.url}
        servers = start_servers(
            tmp_path,
            ["open", "closed"],
            env,
            closed={"GATEWAY_RATE_LIMIT_FAIL_OPEN": "false"},
        )
        load = Load(
            _targets(
                servers,
                teams,
                lambda team: [
                    _body(group, stream=stream)
                    for group in ("fast", "slow")
                    for stream in (False, True)
                ],
            ),
            workers=6,
            pace=0.15,
        )
        _each(load, servers, teams, 0, 2, "calls served before the stop")

        # When Redis stops under the load, for a while, then comes back
        redis_stop(own_redis)
        stopped = time.monotonic()
        _each(load, servers, teams, stopped, 4, "calls made while Redis is down")
        restarting = time.monotonic()
        own_redis.start()
        up = time.monotonic()
        _each(load, servers, teams, up, 4, "calls made once Redis is back")
        seen = load.stop()
    finally:
        if load is not None:
            load.stop()
        stop_servers(servers.values())
        redis_stop(own_redis)

    # Then while it was down, the fail-open server served every call and the
    # fail-closed one refused every call, limited or not, writing nothing;
    # once it was back, both served every call
    down = [s for s in seen if s.started > stopped and s.ended < restarting]
    back = [s for s in seen if s.started > up]
    assert {(s.server, s.team) for s in down} == {
        (n, t) for n in servers for t in teams
    }
    assert {(s.status, s.code) for s in down if s.server == "open"} == {(200, None)}
    refused = [s for s in down if s.server == "closed"]
    assert {(s.status, s.code) for s in refused} == {
        (503, "rate_limiter_unavailable")
    }, refused
    assert {(s.status, s.code) for s in back} == {(200, None)}, [
        s for s in back if s.status != 200
    ]
    # and the books hold, each served call recorded and charged once
    state = assert_invariants(
        SuiteDatabase(),
        seen,
        expected={(200, None), (503, "rate_limiter_unavailable")},
        team_pks={"limited": limited.pk, "free": free.pk},
    )
    for s in seen:
        if s.status == 503:
            assert s.request_id not in state.records, s
            assert not state.of(s.request_id), s
    served = [s for s in seen if s.status == 200]
    assert {s.request_id for s in served} == set(state.records)
    assert all(state.records[s.request_id].status == "success" for s in served)


# --- 4. clients leaving -----------------------------------------------------------


def _send_raw(url: str, plaintext: str, body: dict, client_request_id: str):
    """A call on a raw socket, left open: the caller decides when to hang up."""
    host, port = url.removeprefix("http://").split(":")
    content = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(
        (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"X-API-Key: {plaintext}\r\nX-Request-Id: {client_request_id}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(content)}\r\n\r\n"
        ).encode()
        + content
    )
    return sock


def _first_chunk(sock: socket.socket) -> tuple[int, dict[str, str]]:
    """Read a stream's response up to its first data event: (status, headers)."""
    received = b""
    while b"data:" not in received.partition(b"\r\n\r\n")[2]:
        piece = sock.recv(65536)
        assert piece, f"closed before the first chunk: {received!r}"
        received += piece
    head = received.partition(b"\r\n\r\n")[0].decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), headers


def test_clients_leaving_at_each_point_across_two_servers(
    fake_upstream, journal_dir, tmp_path
):
    # Given a key with a concurrency limit (so Redis counts its calls in
    # flight), and three upstreams: one that has the call but sends no
    # headers, one that holds a stream after its first chunk, one that has a
    # plain call but does not answer
    first = fake_group(fake_upstream, "leave-first", "first")
    mid = fake_group(fake_upstream, "leave-mid", "mid")
    plain = fake_group(fake_upstream, "leave-plain", "plain")
    team, _, _ = tenant("team_leave", [first, mid, plain], credits=100 * MICROS)
    kinds_of = ("first", "mid", "plain")
    key, plaintext = virtual_key_issue(
        team=team, alias="leaver", max_parallel_requests=100
    )
    # Four calls of each kind, each taking the next behaviour (and its own
    # `received` event) as it arrives.
    gate, rest = threading.Event(), threading.Event()
    received = {kind: [threading.Event() for _ in range(4)] for kind in kinds_of}
    for kind in ("first", "plain"):
        fake_upstream.program(
            f"leave-{kind}", *[Behaviour(gate=gate, received=e) for e in received[kind]]
        )
    fake_upstream.program(
        "leave-mid",
        *[
            Behaviour(chunks=["Hi ", "there"], hold=rest, received=e)
            for e in received["mid"]
        ],
    )
    servers = start_servers(tmp_path, ["A", "B"], {})
    sockets: list[socket.socket] = []
    try:
        # When two clients of each kind call each server at once
        kinds = {
            "first": _body("first", stream=True),
            "mid": _body("mid", stream=True),
            "plain": _body("plain"),
        }
        callers = {
            f"{kind}-{name}-{n}": (servers[name].url, body)
            for kind, body in kinds.items()
            for name in "AB"
            for n in range(2)
        }
        opened = {
            cid: _send_raw(url, plaintext, body, cid)
            for cid, (url, body) in callers.items()
        }
        sockets = list(opened.values())
        until(
            lambda: all(e.is_set() for events in received.values() for e in events),
            "the upstream has every call",
        )
        answered = {
            cid: _first_chunk(sock)
            for cid, sock in opened.items()
            if cid.startswith("mid")
        }
        assert _slot(key) == len(callers)  # all in flight, each counted
        # and each hangs up: before the stream's first chunk, mid-stream,
        # before the plain answer
        for sock in sockets:
            sock.close()
        records = until(
            lambda: len(rows := _records_of(callers)) == len(callers) and rows,
            "a record of every call",
        )
        until(lambda: _held(team) == 0, "every hold given back")
        until(lambda: _slot(key) == 0, "every concurrency slot given back")
        gate.set()
        rest.set()
        # and the key's next calls are served on both servers
        after = [
            call(servers[name].url, plaintext, _body("plain"), server=name, team="t")
            for name in "AB"
        ]
    finally:
        for sock in sockets:
            sock.close()
        gate.set()
        rest.set()
        stop_servers(servers.values())

    # Then each call has one record: uncharged 499 for those that left before
    # any output, charged for what was generated for those that left mid-stream
    for cid, record in records.items():
        if cid.startswith("mid"):
            assert (record.status, record.streamed) == (
                "client_disconnected",
                True,
            ), record
            assert record.credits_micros > 0, record
        else:
            assert (
                record.status,
                record.error_code,
                record.http_status,
                record.credits_micros,
            ) == ("error", "client_disconnected", 499, 0), record
    assert [s.status for s in after] == [200, 200], after
    seen = [
        Seen(
            server=cid.split("-")[1],
            team="t",
            kind="stream",
            status=status,
            request_id=headers["x-request-id"],
            chunks=1,
            left=True,
        )
        for cid, (status, headers) in answered.items()
    ] + after
    state = assert_invariants(
        SuiteDatabase(), seen, expected={(200, None)}, team_pks={"t": team.pk}
    )
    for cid, record in records.items():
        assert record.request_id in state.records
        if cid.startswith("mid"):
            assert state.captured(record.request_id) == record.credits_micros
    assert state.reconciled == _NOTHING_STALE


_NOTHING_STALE = {
    "captured": 0,
    "released": 0,
    "failed": 0,
    "journaled": 0,
    "replayed": 0,
}


def _records_of(callers) -> dict:
    rows = UsageRecord.objects.filter(client_request_id__in=list(callers))
    found: dict = {}
    for row in rows:
        assert row.client_request_id not in found, f"two records: {row}"
        found[row.client_request_id] = row
    return found


def _held(team) -> int:
    return CreditAccount.objects.get(team=team).held_micros


def _slot(key) -> int:
    """Calls of the key in flight, as the rate limiter counts them."""
    return int(get_redis_connection("default").get(f"rl:key:{key.pk}:par") or 0)


# --- 5. one X-Request-Id, two tenants ---------------------------------------------


def test_one_x_request_id_from_two_tenants_at_once(fake_upstream, tmp_path):
    # Given two teams of two organizations, and an upstream that holds every
    # call until all 40 are in flight
    group = fake_group(fake_upstream, "same", "chat")
    teams = {
        name: tenant(f"team_{name}", [group], credits=100 * MICROS)
        for name in ("x", "y")
    }
    gate = threading.Event()
    fake_upstream.program("same", Behaviour(gate=gate))
    servers = start_servers(tmp_path, ["A", "B"], {})
    pool = ThreadPoolExecutor(40)
    try:
        # When each sends 20 calls, plain and streamed, over both servers,
        # every one with X-Request-Id: same-1
        futures = [
            pool.submit(
                call,
                servers["AB"[n % 2]].url,
                teams[name][2],
                _body("chat", stream=n % 4 < 2),
                server="AB"[n % 2],
                team=name,
                headers={"X-Request-Id": "same-1"},
            )
            for n in range(20)
            for name in ("x", "y")
        ]
        until(
            lambda: fake_upstream.calls("same") + sum(f.done() for f in futures) >= 40,
            "every call in flight (or answered)",
            60,
        )
        assert fake_upstream.calls("same") == 40, [
            f.result() for f in futures if f.done()
        ]
        gate.set()
        seen = [f.result(timeout=60) for f in futures]
    finally:
        gate.set()
        pool.shutdown(wait=True, cancel_futures=True)
        stop_servers(servers.values())

    # Then every call is answered under an id of the server's, the client's
    # echoed beside it
    assert [(s.status, s.cut) for s in seen] == [(200, False)] * 40, seen
    assert all(s.done for s in seen if s.kind == "stream"), seen
    assert len({s.request_id for s in seen}) == 40
    assert {s.client_request_id for s in seen} == {"same-1"}
    # and each is recorded and charged once, in its own team only, and
    # reconciliation finds nothing to settle and fails nothing
    state = assert_invariants(
        SuiteDatabase(),
        seen,
        expected={(200, None)},
        team_pks={name: t[0].pk for name, t in teams.items()},
    )
    assert {r.client_request_id for r in state.records.values()} == {"same-1"}
    assert len(state.records) == 40
    for name, (team, _, _) in teams.items():
        mine = [s.request_id for s in seen if s.team == name]
        assert {r.request_id for r in state.records.values() if r.team == team.pk} == (
            set(mine)
        )
        assert all(state.records[i].credits > 0 for i in mine)
    assert state.reconciled == _NOTHING_STALE
