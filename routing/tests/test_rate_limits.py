"""Rate limits: RPM, TPM and concurrency per key, team and organization,
exact across gateway processes, with their headers."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from django_redis import get_redis_connection

from billing.models import LedgerEntry, UsageRecord
from billing.services import team_open
from billing.tests.prices import price
from gateway_project.money import MICROS
from routing import limits
from routing.models import Deployment
from routing.services import model_group_create
from tenants.models import Organization, Team, VirtualKey
from tenants.services import organization_create

pytestmark = pytest.mark.django_db(transaction=True)
CALL = {
    "model": "chat",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 10,
}


@pytest.fixture
def world(fake_upstream):
    price("openai/fake-model")
    deployment = Deployment.objects.create(
        name="fake",
        model="openai/fake-model",
        litellm_params={"api_base": fake_upstream.base("rl")},
    )
    group = model_group_create(group_name="chat", members=[(deployment, 0)])
    organization = organization_create(organization_id="org_rl", name="RL")
    team, key, plaintext = team_open(
        organization=organization,
        team_id="team_rl",
        credits_allocated_micros=1000 * MICROS,
        model_groups=[group],
    )
    return {
        "team": team,
        "key": key,
        "plaintext": plaintext,
        "organization": organization,
    }


@pytest.fixture(autouse=True)
def _clean_counters():
    yield
    client = get_redis_connection("default")
    for key in client.scan_iter("rl:*"):
        client.delete(key)


def _away_from_a_minute_boundary() -> None:
    """Windows are fixed minutes; a burst that straddles two would be split.
    Start well inside one (a bounded guard, not a timing assertion)."""
    if time.time() % 60 > 45:
        time.sleep(60 - time.time() % 60 + 0.5)


def _post(client, plaintext, body=CALL):
    return client.post(
        "/v1/chat/completions",
        body,
        content_type="application/json",
        HTTP_X_API_KEY=plaintext,
    )


def test_key_rpm_is_exact_across_two_processes(two_servers, world):
    VirtualKey.objects.filter(pk=world["key"].pk).update(rpm_limit=5)
    _away_from_a_minute_boundary()

    responses = [
        httpx.post(
            f"{two_servers[n % 2].url}/v1/chat/completions",
            json=CALL,
            headers={"X-API-Key": world["plaintext"]},
            timeout=30,
        )
        for n in range(8)
    ]

    assert [r.status_code for r in responses] == [200] * 5 + [429] * 3
    assert [r.headers["x-ratelimit-remaining-requests"] for r in responses[:5]] == [
        "4",
        "3",
        "2",
        "1",
        "0",
    ]
    assert {r.headers["x-ratelimit-limit-requests"] for r in responses[:5]} == {"5"}
    refused = responses[5]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 0 < int(refused.headers["Retry-After"]) <= 60
    assert UsageRecord.objects.count() == 5


def test_concurrent_burst_on_two_processes_admits_exactly_the_limit(
    two_servers, world, fake_upstream
):
    Team.objects.filter(pk=world["team"].pk).update(rpm_limit=7)
    fake_upstream.program("rl", latency=0.3)
    _away_from_a_minute_boundary()

    def one(n: int) -> int:
        return httpx.post(
            f"{two_servers[n % 2].url}/v1/chat/completions",
            json=CALL,
            headers={"X-API-Key": world["plaintext"]},
            timeout=30,
        ).status_code

    with ThreadPoolExecutor(max_workers=20) as pool:
        statuses = list(pool.map(one, range(20)))

    assert sorted(statuses) == [200] * 7 + [429] * 13


def test_tpm_reserves_the_estimate_and_keeps_the_actual(client, world):
    Team.objects.filter(pk=world["team"].pk).update(tpm_limit=1_000)
    _away_from_a_minute_boundary()
    response = _post(client, world["plaintext"])

    assert response.status_code == 200
    window = int(time.time() // 60)
    redis = get_redis_connection("default")
    # The fake upstream reports 7 + 5 tokens: the reservation was corrected.
    assert int(redis.get(f"rl:team:{world['team'].pk}:tok:{window}")) == 12
    assert int(redis.get(f"rl:team:{world['team'].pk}:par")) == 0


def test_tpm_refuses_what_the_estimate_would_exceed(client, world):
    _away_from_a_minute_boundary()
    Organization.objects.filter(pk=world["organization"].pk).update(tpm_limit=30)

    first = _post(client, world["plaintext"])  # ~18 reserved, 12 kept
    second = _post(client, world["plaintext"])  # 12 + ~18 fits 30, 24 kept
    third = _post(client, world["plaintext"])  # 24 + ~18 does not

    assert [first.status_code, second.status_code, third.status_code] == [200, 200, 429]
    assert first["x-ratelimit-limit-tokens"] == "30"
    assert third.json()["error"]["code"] == "rate_limit_exceeded"
    assert UsageRecord.objects.count() == 2


def test_parallel_requests_are_limited_and_released(
    client, world, fake_upstream, running_server
):
    Organization.objects.filter(pk=world["organization"].pk).update(
        max_parallel_requests=1
    )
    hold, first_sent = threading.Event(), threading.Event()
    fake_upstream.program(
        "rl", chunks=["a", "b"], hold=hold, first_chunk_sent=first_sent
    )

    with httpx.stream(
        "POST",
        f"{running_server.url}/v1/chat/completions",
        json={**CALL, "stream": True},
        headers={"X-API-Key": world["plaintext"]},
        timeout=30,
    ) as streaming:
        assert streaming.status_code == 200
        assert first_sent.wait(10)
        blocked = _post(client, world["plaintext"])  # while the stream runs
        hold.set()
        streaming.read()

    assert blocked.status_code == 429
    assert blocked["Retry-After"] == "1"
    deadline = time.monotonic() + 10
    while UsageRecord.objects.count() < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _post(client, world["plaintext"]).status_code == 200  # the slot came back


def test_a_refusal_writes_nothing(client, world):
    VirtualKey.objects.filter(pk=world["key"].pk).update(rpm_limit=1)
    _away_from_a_minute_boundary()
    _post(client, world["plaintext"])
    entries, records = LedgerEntry.objects.count(), UsageRecord.objects.count()

    refused = _post(client, world["plaintext"])

    assert refused.status_code == 429
    assert (LedgerEntry.objects.count(), UsageRecord.objects.count()) == (
        entries,
        records,
    )


def test_no_limits_no_headers(client, world):
    response = _post(client, world["plaintext"])

    assert response.status_code == 200
    assert not [
        name for name in response.headers if name.lower().startswith("x-ratelimit")
    ]


@pytest.mark.parametrize(("fail_open", "status"), [(True, 200), (False, 503)])
def test_redis_unreachable_fails_open_or_closed_as_configured(
    client, world, settings, monkeypatch, fail_open, status
):
    VirtualKey.objects.filter(pk=world["key"].pk).update(rpm_limit=100)
    settings.GATEWAY_RATE_LIMIT_FAIL_OPEN = fail_open

    class Down:
        def acquire(self, keys, argv):
            raise ConnectionError("redis is down")

        def adjust_start(self, operations):
            raise ConnectionError("redis is down")

    monkeypatch.setattr(limits, "_backend", lambda: Down())
    records = UsageRecord.objects.count()

    response = _post(client, world["plaintext"])

    assert response.status_code == status
    if status == 503:
        assert response.json()["error"]["code"] == "rate_limiter_unavailable"
        assert UsageRecord.objects.count() == records


def test_the_embedded_backend_applies_the_same_rules():
    backend = limits._MemoryBackend()
    keys = ["r", "t", "p"]

    admitted = [backend.acquire(keys, [10, 60, 2, -1, -1])[0] for _ in range(3)]

    assert admitted == [0, 0, 1]
    backend.adjust_start([("p", -2)])()
    assert backend.values == {"r": 2, "t": 20, "p": 0}


def test_a_release_is_sent_at_once_and_its_replies_read_later():
    # Given a slot held in Redis
    backend = limits._RedisBackend()
    backend.acquire(["r", "t", "p"], [10, 60, -1, -1, 5])
    pool = backend.client.connection_pool
    idle = len(pool._available_connections)

    # When the release is started, its connection stays out until it finishes
    finish = backend.adjust_start([("t", -4), ("p", -1)])
    assert len(pool._available_connections) == idle - 1
    finish()

    # Then both corrections were applied and the connection is back
    assert [int(backend.client.get(k)) for k in ("t", "p")] == [6, 0]
    assert len(pool._available_connections) == idle


def test_an_exhausted_deployment_leaves_the_rotation(client, world, fake_upstream):
    primary = Deployment.objects.get(name="fake")
    Deployment.objects.filter(pk=primary.pk).update(rpm_limit=1)
    backup = Deployment.objects.create(
        name="backup",
        model="openai/fake-model",
        litellm_params={"api_base": fake_upstream.base("backup")},
    )
    primary.model_groups.get().members.create(deployment=backup, priority=1)
    _away_from_a_minute_boundary()

    first = _post(client, world["plaintext"])
    second = _post(client, world["plaintext"])

    assert (first["x-gateway-deployment"], second["x-gateway-deployment"]) == (
        "fake",
        "backup",
    )
    assert (fake_upstream.calls("rl"), fake_upstream.calls("backup")) == (1, 1)
    record = UsageRecord.objects.get(request_id=second["x-request-id"])
    assert record.fallbacks_tried[0] == {
        "deployment": "fake",
        "skipped": "rate_limited",
    }


def test_tpm_is_exact_across_two_processes(two_servers, world):
    Organization.objects.filter(pk=world["organization"].pk).update(tpm_limit=30)
    _away_from_a_minute_boundary()

    statuses = [
        httpx.post(
            f"{two_servers[n % 2].url}/v1/chat/completions",
            json=CALL,
            headers={"X-API-Key": world["plaintext"]},
            timeout=30,
        ).status_code
        for n in range(3)
    ]

    # ~18 reserved then 12 kept per call: the third no longer fits, whichever process serves it.
    assert statuses == [200, 200, 429]


def _wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        time.sleep(0.02)


def _held_burst(servers, plaintext, fake, calls: int):
    """``calls`` streamed calls at once, alternating between the servers,
    while the fake upstream holds every admitted one after its first chunk.
    Once every call has its status (refused, or admitted and streaming),
    returns the statuses, how many calls the upstream had received by then,
    and the full bodies after the held calls were let finish."""
    hold = threading.Event()
    fake.program("rl", chunks=["a", "b"], hold=hold)
    before = fake.calls("rl")
    seen: list[int] = []

    def one(n: int) -> tuple[int, bytes]:
        with httpx.stream(
            "POST",
            f"{servers[n % 2].url}/v1/chat/completions",
            json={**CALL, "stream": True},
            headers={"X-API-Key": plaintext},
            timeout=60,
        ) as response:
            seen.append(response.status_code)
            return response.status_code, response.read()

    with ThreadPoolExecutor(max_workers=calls) as pool:
        futures = [pool.submit(one, n) for n in range(calls)]
        try:
            _wait_until(lambda: len(seen) == calls)
            reached_upstream = fake.calls("rl") - before
        finally:
            hold.set()
        results = [future.result() for future in futures]
    return sorted(seen), reached_upstream, results


def test_concurrent_burst_on_two_processes_admits_exactly_the_tpm_limit(
    two_servers, world, fake_upstream
):
    # Given the estimate a call reserves, read from the headers of a call of
    # another organization (so as not to touch the counters under test)
    group = Deployment.objects.get(name="fake").model_groups.get()
    _, _, probe_key = team_open(
        organization=organization_create(organization_id="org_probe", name="P"),
        team_id="team_probe",
        credits_allocated_micros=10 * MICROS,
        model_groups=[group],
        tpm_limit=100_000,
    )
    probe = httpx.post(
        f"{two_servers[0].url}/v1/chat/completions",
        json={**CALL, "stream": True},
        headers={"X-API-Key": probe_key},
        timeout=30,
    )
    assert b"data: [DONE]" in probe.content
    estimate = 100_000 - int(probe.headers["x-ratelimit-remaining-tokens"])
    assert estimate > 0
    # and a team whose TPM fits exactly three such estimates
    Team.objects.filter(pk=world["team"].pk).update(tpm_limit=3 * estimate)
    _away_from_a_minute_boundary()

    # When eight calls come at once, to two processes, and stay in flight
    statuses, reached_upstream, results = _held_burst(
        two_servers, world["plaintext"], fake_upstream, 8
    )

    # Then exactly three were admitted, whichever process each reached
    assert statuses == [200] * 3 + [429] * 5
    assert reached_upstream == 3
    refused = [json.loads(body) for status, body in results if status == 429]
    assert {r["error"]["code"] for r in refused} == {"rate_limit_exceeded"}
    assert all(b"data: [DONE]" in body for status, body in results if status == 200)


def test_concurrent_calls_on_two_processes_get_exactly_the_parallel_slots(
    two_servers, world, fake_upstream
):
    # Given a key allowed two calls in flight
    VirtualKey.objects.filter(pk=world["key"].pk).update(max_parallel_requests=2)

    # When six calls come at once, to two processes, and stay in flight
    statuses, reached_upstream, results = _held_burst(
        two_servers, world["plaintext"], fake_upstream, 6
    )

    # Then exactly two were admitted
    assert statuses == [200] * 2 + [429] * 4
    assert reached_upstream == 2
    refused = [json.loads(body) for status, body in results if status == 429]
    assert {r["error"]["code"] for r in refused} == {"rate_limit_exceeded"}
    # and once they are settled, their slots are free for the next call
    redis = get_redis_connection("default")
    _wait_until(
        lambda: (
            UsageRecord.objects.count() == 2
            and int(redis.get(f"rl:key:{world['key'].pk}:par") or 0) == 0
        )
    )
    following = httpx.post(
        f"{two_servers[0].url}/v1/chat/completions",
        json=CALL,
        headers={"X-API-Key": world["plaintext"]},
        timeout=30,
    )
    assert following.status_code == 200, following.text
