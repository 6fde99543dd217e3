"""Every way out of a call settles once (DESIGN.md, the request path): the
server owns a call's identity, and a client that leaves at any point —
before a plain answer, before a stream's first chunk, while its call waits
for a row lock — leaves no hold and no concurrency slot behind. Real
gunicorn processes, real sockets; each wait is on an event, not a clock."""

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
from django.db import OperationalError, connection, transaction
from django.utils import timezone
from django_redis import get_redis_connection

from billing.models import CreditAccount, LedgerEntry, UsageRecord
from billing.reconciliation import holds_settle_stale
from billing.services import team_open
from billing.tests.ledger import assert_ledger_consistent
from billing.tests.prices import price
from gateway_project.money import MICROS
from routing.inference import admit
from routing.models import Deployment
from routing.services import model_group_create
from routing.tests.fake_upstream import Behaviour
from tenants.models import VirtualKey
from tenants.services import organization_create

pytestmark = pytest.mark.django_db(transaction=True)
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "Say hello"}]}


@pytest.fixture(autouse=True)
def _ledger_stays_consistent():
    yield
    assert_ledger_consistent()


def _team(fake, team_id: str, *, credits: int = 100 * MICROS, organization=None):
    price("openai/fake-model")
    deployment = Deployment.objects.filter(name="w").first()
    if deployment is None:
        deployment = Deployment.objects.create(
            name="w",
            model="openai/fake-model",
            litellm_params={"api_base": fake.base("w")},
            timeout_ms=20_000,
        )
        model_group_create(group_name="chat", members=[(deployment, 0)])
    organization = organization or organization_create(
        organization_id=f"org_{team_id}", name=team_id
    )
    team, key, plaintext = team_open(
        organization=organization,
        team_id=team_id,
        credits_allocated_micros=credits,
        model_groups=[deployment.model_groups.get()],
    )
    return team, key, plaintext


def _eventually(condition, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def _slot(key: VirtualKey) -> int:
    """Calls of the key in flight, as the rate limiter counts them."""
    return int(get_redis_connection("default").get(f"rl:key:{key.pk}:par") or 0)


def _open_and_leave(url: str, plaintext: str, body: dict, reached: threading.Event):
    """Send a call on a raw socket, wait until the upstream has it, then hang
    up without reading a byte."""
    host, port = url.removeprefix("http://").split(":")
    payload = httpx.Request(
        "POST",
        f"{url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {plaintext}"},
    )
    raw = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {plaintext}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload.content)}\r\n\r\n"
    ).encode() + payload.content
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(raw)
        assert reached.wait(20), "the call never reached the upstream"


def _left_nothing_behind(team, key, record) -> None:
    """The call is recorded as failed (499), not charged; its hold is
    released and its concurrency slot is free."""
    assert (record.status, record.error_code, record.http_status) == (
        "error",
        "client_disconnected",
        499,
    )
    assert record.credits_micros == 0
    _eventually(lambda: _slot(key) == 0, "the concurrency slot is freed")
    account = CreditAccount.objects.get(team=team)
    assert (account.held_micros, account.balance_micros) == (0, 100 * MICROS)


# --- identity -------------------------------------------------------------------


def test_a_reused_x_request_id_is_a_correlation_value_not_the_calls_identity(
    client, fake_upstream
):
    # Given a team, and a client that sends the same X-Request-Id five times
    team, _, plaintext = _team(fake_upstream, "team_dup")

    # When it calls five times
    responses = [
        client.post(
            "/v1/chat/completions",
            CHAT,
            content_type="application/json",
            HTTP_X_API_KEY=plaintext,
            HTTP_X_REQUEST_ID="dup-1",
        )
        for _ in range(5)
    ]

    # Then every call is answered, recorded and charged on its own, under an
    # id of the server's; the client's id is echoed and kept beside it
    assert [r.status_code for r in responses] == [200] * 5
    ids = {r["x-request-id"] for r in responses}
    assert len(ids) == 5 and all(i.startswith("req_") for i in ids)
    assert {r["x-client-request-id"] for r in responses} == {"dup-1"}
    records = UsageRecord.objects.filter(team=team)
    assert {r.request_id for r in records} == ids
    assert {r.client_request_id for r in records} == {"dup-1"}
    assert (
        LedgerEntry.objects.filter(account__team=team, entry_type="capture").count()
        == 5
    )
    assert all(r.credits_micros > 0 for r in records)


def test_two_teams_reusing_one_id_at_once_each_pay_for_their_own_call(
    running_server, fake_upstream
):
    # Given two teams of two organizations, whose calls carry the same
    # X-Request-Id and are in flight together
    team_x, _, key_x = _team(fake_upstream, "team_x")
    team_y, _, key_y = _team(fake_upstream, "team_y")
    gate = threading.Event()
    fake_upstream.program("w", Behaviour(gate=gate))

    def call(plaintext: str) -> httpx.Response:
        return httpx.post(
            f"{running_server.url}/v1/chat/completions",
            json=CHAT,
            headers={"X-API-Key": plaintext, "X-Request-Id": "shared-7"},
            timeout=30,
        )

    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(call, key) for key in (key_x, key_y)]
        _eventually(lambda: fake_upstream.calls("w") == 2, "both calls in flight")
        gate.set()
        seen = [f.result() for f in futures]

    # Then each is answered and charged once, in its own account only
    assert [r.status_code for r in seen] == [200, 200]
    assert seen[0].headers["x-request-id"] != seen[1].headers["x-request-id"]
    for team, response in ((team_x, seen[0]), (team_y, seen[1])):
        record = UsageRecord.objects.get(team=team)
        assert record.request_id == response.headers["x-request-id"]
        assert record.client_request_id == "shared-7"
        movements = LedgerEntry.objects.filter(account__team=team).exclude(
            entry_type="allocation"
        )
        assert {m.request_id for m in movements} == {record.request_id}
        assert "capture" in {m.entry_type for m in movements}
        assert CreditAccount.objects.get(team=team).held_micros == 0
    # and reconciliation has nothing to settle, and nothing fails
    assert holds_settle_stale(older_than=timedelta(0), now=timezone.now()) == {
        "captured": 0,
        "released": 0,
        "failed": 0,
        "journaled": 0,
        "replayed": 0,
    }


# --- clients that leave ---------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_client_leaving_before_the_answer_leaves_no_hold_and_no_slot(
    running_server, fake_upstream, stream
):
    # Given a key allowed one call at a time, and an upstream that has the
    # call but has not answered (no headers, no first chunk)
    team, key, plaintext = _team(fake_upstream, "team_leave")
    VirtualKey.objects.filter(pk=key.pk).update(max_parallel_requests=1)
    gate, received = threading.Event(), threading.Event()
    fake_upstream.program("w", Behaviour(gate=gate, received=received), Behaviour())

    # When the client hangs up then
    _open_and_leave(running_server.url, plaintext, {**CHAT, "stream": stream}, received)
    record = _eventually(
        lambda: UsageRecord.objects.filter(team=team).first(), "the call is recorded"
    )
    gate.set()

    # Then the call is settled as failed, uncharged, its hold released and its
    # slot free: the key's next call is served at once
    _left_nothing_behind(team, key, record)
    assert record.streamed is False  # nothing was streamed
    holds = LedgerEntry.objects.filter(account__team=team, entry_type="hold")
    for hold in holds:
        assert LedgerEntry.objects.filter(
            request_id=hold.request_id, entry_type="release"
        ).exists()
    after = httpx.post(
        f"{running_server.url}/v1/chat/completions",
        json=CHAT,
        headers={"X-API-Key": plaintext},
        timeout=30,
    )
    assert after.status_code == 200, after.text
    assert UsageRecord.objects.filter(team=team).count() == 2


def test_a_client_leaving_while_its_hold_waits_on_a_row_lock_leaves_nothing(
    running_server, fake_upstream
):
    # Given a key allowed one call at a time, and the team's credit account
    # locked by someone else, so that the call waits before any provider
    team, key, plaintext = _team(fake_upstream, "team_locked")
    VirtualKey.objects.filter(pk=key.pk).update(max_parallel_requests=1)
    left = threading.Event()

    def call_and_leave() -> None:
        host, port = running_server.url.removeprefix("http://").split(":")
        body = httpx.Request("POST", "http://x", json=CHAT).content
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(
                (
                    f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                    f"X-API-Key: {plaintext}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                ).encode()
                + body
            )
            left.wait(30)

    with transaction.atomic():
        CreditAccount.objects.select_for_update().get(team=team)
        caller = threading.Thread(target=call_and_leave)
        caller.start()
        _eventually(_blocked_by_us, "the call waits for our lock")
        # When the client hangs up while it waits
        left.set()
        caller.join()
    # (the lock is gone: the hold it waited for is written, then given back)

    # Then the call is settled as failed, its hold released, its slot free,
    # and the provider was never asked
    record = _eventually(
        lambda: UsageRecord.objects.filter(team=team).first(), "the call is recorded"
    )
    _left_nothing_behind(team, key, record)
    assert fake_upstream.calls("w") == 0


def _blocked_by_us() -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted"
            " AND pg_backend_pid() = ANY(pg_blocking_pids(pid)))"
        )
        return bool(cursor.fetchone()[0])


# --- the database out of reach before the provider ------------------------------


def test_a_hold_that_cannot_reach_the_database_gives_the_slot_back(
    client, fake_upstream, monkeypatch
):
    # Given a key allowed one call at a time, whose call's hold finds the
    # database out of reach
    _, key, plaintext = _team(fake_upstream, "team_hold_down")
    VirtualKey.objects.filter(pk=key.pk).update(max_parallel_requests=1)
    monkeypatch.setattr(admit, "credits_hold", _unreachable)

    refused = _chat(client, plaintext)

    # Then it is a 503 before any provider, nothing is written, and the slot
    # is free: the next call, with the database back, is served
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "service_unavailable"
    assert fake_upstream.calls("w") == 0
    assert not UsageRecord.objects.exists()
    assert _slot(key) == 0
    monkeypatch.undo()
    assert _chat(client, plaintext).status_code == 200


def test_a_streams_late_hold_that_cannot_reach_the_database_writes_nothing(
    client, fake_upstream, monkeypatch, settings
):
    # Given a team this process saw above the deferral margin, so that a
    # stream's hold is written while the provider opens it — and fails
    settings.GATEWAY_DEFERRED_HOLD_MARGIN = 1
    _, key, plaintext = _team(fake_upstream, "team_late_hold")
    VirtualKey.objects.filter(pk=key.pk).update(max_parallel_requests=1)
    assert _chat(client, plaintext).status_code == 200
    entries = LedgerEntry.objects.count()
    monkeypatch.setattr(admit, "credits_hold", _unreachable)

    refused = _chat(client, plaintext, stream=True)

    # Then no chunk leaves, nothing is written, the slot is free (the
    # provider was asked meanwhile: the hold was indeed left to the stream)
    assert fake_upstream.calls("w") == 2
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "service_unavailable"
    assert LedgerEntry.objects.count() == entries
    assert UsageRecord.objects.count() == 1
    assert _slot(key) == 0


def _unreachable(**_: object) -> int:
    raise OperationalError("connection refused")


def _chat(client, plaintext: str, *, stream: bool = False):
    return client.post(
        "/v1/chat/completions",
        {**CHAT, "stream": stream},
        content_type="application/json",
        HTTP_X_API_KEY=plaintext,
    )
