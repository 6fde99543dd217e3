"""Routing as the README promises it: priorities first, weights among equals,
fallback on a rejected credential (but not on a refused request), and
cooldowns shared through Redis. Calls go through Django's test client to the
fake upstream over HTTP."""

import math

import pytest
from django.core.cache import cache

from billing.models import UsageRecord
from billing.services import team_open
from billing.tests.prices import price
from gateway_project.money import MICROS
from routing.models import Deployment
from routing.services import (
    deployment_create,
    model_group_create,
    model_group_members_set,
)
from tenants.services import organization_create

pytestmark = pytest.mark.django_db(transaction=True)
CALL = {
    "model": "chat",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 10,
}
# Odds of a spurious failure of a statistical assertion below.
FALSE_ALARM = 1e-9


def _open(
    fake, members: list[tuple[str, int, int]]
) -> tuple[dict[str, Deployment], str]:
    """A team whose group 'chat' has these (name, priority, weight) members,
    each deployment served by the fake upstream's scenario of its name.
    Returns the deployments by name and the team's key."""
    price("openai/fake-model")
    deployments = {
        name: deployment_create(
            name=name,
            model="openai/fake-model",
            litellm_params={"api_base": fake.base(name)},
        )
        for name, _, _ in members
    }
    group = model_group_create(group_name="chat", members=[])
    model_group_members_set(
        group=group,
        members=[
            (deployments[name], priority, weight) for name, priority, weight in members
        ],
    )
    _, _, plaintext = team_open(
        organization=organization_create(organization_id="org_routing", name="R"),
        team_id="team_routing",
        credits_allocated_micros=1000 * MICROS,
        model_groups=[group],
    )
    return deployments, plaintext


def _post(client, plaintext: str):
    return client.post(
        "/v1/chat/completions",
        CALL,
        content_type="application/json",
        HTTP_X_API_KEY=plaintext,
    )


def _tried(response) -> list[dict]:
    return UsageRecord.objects.get(request_id=response["x-request-id"]).fallbacks_tried


def _binomial_bounds(n: int, p: float, alpha: float) -> tuple[int, int]:
    """[low, high] such that a Binomial(n, p) count falls outside with
    probability below ``alpha`` (each tail below alpha / 2)."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    low, tail = 0, 0.0
    while tail + pmf[low] < alpha / 2:
        tail += pmf[low]
        low += 1
    high, tail = n, 0.0
    while tail + pmf[high] < alpha / 2:
        tail += pmf[high]
        high -= 1
    return low, high


# --- priorities and weights ----------------------------------------------------


def test_equal_priorities_share_calls_by_weight_and_a_lower_tier_waits(
    client, fake_upstream
):
    # Given a tier of two deployments weighted 3:1, and behind it a
    # deployment created first and weighted far heavier
    _, key = _open(
        fake_upstream, [("behind", 1, 1000), ("heavy", 0, 3), ("light", 0, 1)]
    )
    calls = 400

    # When many calls are made
    served = [_post(client, key)["x-gateway-deployment"] for _ in range(calls)]

    # Then the lower priority number served every one, shared by weight
    low, high = _binomial_bounds(calls, 3 / 4, FALSE_ALARM)
    assert high < calls and low > calls / 2  # the bounds tell 3:1 from 1:1
    assert served.count("heavy") + served.count("light") == calls
    assert low <= served.count("heavy") <= high, (served.count("heavy"), low, high)
    assert (fake_upstream.calls("heavy"), fake_upstream.calls("light")) == (
        served.count("heavy"),
        served.count("light"),
    )
    assert fake_upstream.calls("behind") == 0


def test_every_deployment_of_a_tier_is_tried_before_the_next_tier(
    client, fake_upstream
):
    _, key = _open(fake_upstream, [("a", 0, 1), ("b", 0, 1), ("next", 1, 1)])
    fake_upstream.program("a", status=500)
    fake_upstream.program("b", status=503)

    response = _post(client, key)

    assert response.status_code == 200
    assert response["x-gateway-deployment"] == "next"
    tried = _tried(response)
    assert sorted((a["deployment"], a.get("error_code")) for a in tried[:2]) == [
        ("a", "upstream_error"),
        ("b", "upstream_error"),
    ]
    assert (tried[2]["deployment"], len(tried)) == ("next", 3)
    assert [fake_upstream.calls(s) for s in ("a", "b", "next")] == [1, 1, 1]


def test_a_failing_deployment_leaves_the_calls_to_its_equals(
    client, fake_upstream, settings
):
    settings.GATEWAY_COOLDOWN_FAILURES = 1000  # keep "broken" in the rotation
    _, key = _open(fake_upstream, [("broken", 0, 3), ("sound", 0, 1), ("next", 1, 1)])
    fake_upstream.program("broken", status=500)

    responses = [_post(client, key) for _ in range(20)]

    assert {(r.status_code, r["x-gateway-deployment"]) for r in responses} == {
        (200, "sound")
    }
    tries = [[a["deployment"] for a in _tried(r)] for r in responses]
    assert set(map(tuple, tries)) <= {("sound",), ("broken", "sound")}
    assert fake_upstream.calls("broken") == sum(len(t) - 1 for t in tries)
    assert fake_upstream.calls("next") == 0


# --- fallback on a rejected credential, none on a refused request ------------------


@pytest.fixture(params=["passthrough", "litellm"])
def adapter(request, settings) -> str:
    settings.GATEWAY_PASSTHROUGH = request.param == "passthrough"
    return request.param


def _adapter_of(fake) -> str:
    agent = fake.requests[-1].headers.get("user-agent", "")
    return "passthrough" if "aiohttp" in agent else "litellm"


def test_a_rejected_credential_falls_back_to_the_next_deployment(
    client, fake_upstream, adapter
):
    _, key = _open(fake_upstream, [("revoked", 0, 1), ("backup", 1, 1)])
    fake_upstream.program(
        "revoked",
        status=401,
        error={
            "error": {
                "message": "Incorrect API key provided",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
        },
    )

    response = _post(client, key)

    assert response.status_code == 200, response.content
    assert response["x-gateway-deployment"] == "backup"
    assert _adapter_of(fake_upstream) == adapter
    tried = _tried(response)
    assert [(a["deployment"], a.get("error_code")) for a in tried] == [
        ("revoked", "upstream_error"),
        ("backup", None),
    ]
    assert (fake_upstream.calls("revoked"), fake_upstream.calls("backup")) == (1, 1)


def test_a_refused_request_does_not_fall_back(client, fake_upstream, adapter):
    _, key = _open(fake_upstream, [("primary", 0, 1), ("backup", 1, 1)])
    fake_upstream.program(
        "primary",
        status=400,
        error={
            "error": {"message": "bad tool schema", "type": "invalid_request_error"}
        },
    )

    response = _post(client, key)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "upstream_invalid_request"
    assert _adapter_of(fake_upstream) == adapter
    assert (fake_upstream.calls("primary"), fake_upstream.calls("backup")) == (1, 0)
    record = UsageRecord.objects.get(request_id=response["x-request-id"])
    assert (record.status, record.http_status, record.credits_micros) == (
        "error",
        400,
        0,
    )
    assert [a["deployment"] for a in record.fallbacks_tried] == ["primary"]


# --- cooldowns -----------------------------------------------------------------


# The shared cache's entries of a deployment, as routing/ names them: its
# cooldown, and its count of failures within the window. Both expire in Redis;
# a test ends them by deleting them, after checking they would expire in time.
def _cooldown(deployment: Deployment) -> str:
    return f"cooldown:deployment:{deployment.pk}"


def _failures(deployment: Deployment) -> str:
    return f"failures:deployment:{deployment.pk}"


def _failure(attempt: dict) -> tuple[str, str]:
    return attempt["deployment"], attempt["error_code"]


@pytest.fixture
def cooling(settings, fake_upstream):
    """'primary' then 'backup'; three failures within a minute cool a
    deployment down for 30 seconds."""
    settings.GATEWAY_COOLDOWN_FAILURES = 3
    settings.GATEWAY_FAILURE_WINDOW_SECONDS = 60
    settings.GATEWAY_COOLDOWN_SECONDS = 30
    deployments, key = _open(fake_upstream, [("primary", 0, 1), ("backup", 1, 1)])
    return deployments["primary"], key


def test_a_deployment_cools_down_after_n_failures_and_serves_again_after(
    client, fake_upstream, cooling
):
    primary, key = cooling
    fake_upstream.program("primary", status=500)

    # N - 1 failures: still in the rotation
    first = [_post(client, key) for _ in range(2)]
    assert cache.get(_cooldown(primary)) is None
    # the Nth failure cools it down, for GATEWAY_COOLDOWN_SECONDS
    third = _post(client, key)
    assert 0 < cache.ttl(_cooldown(primary)) <= 30
    skipped = _post(client, key)

    assert [r["x-gateway-deployment"] for r in [*first, third, skipped]] == [
        "backup"
    ] * 4
    assert [_failure(_tried(r)[0]) for r in [*first, third]] == [
        ("primary", "upstream_error")
    ] * 3
    assert _tried(skipped)[0] == {"deployment": "primary", "skipped": "cooldown"}
    assert fake_upstream.calls("primary") == 3  # not called while cooling down

    # When the cooldown ends
    fake_upstream.program("primary", content="healthy again")
    cache.delete(_cooldown(primary))
    again = _post(client, key)

    # Then it serves again
    assert again["x-gateway-deployment"] == "primary"
    assert [a["deployment"] for a in _tried(again)] == ["primary"]
    assert fake_upstream.calls("primary") == 4


def test_failures_outside_the_window_do_not_add_up(client, fake_upstream, cooling):
    primary, key = cooling
    fake_upstream.program("primary", status=500)
    for _ in range(2):
        _post(client, key)
    # two failures, counted for GATEWAY_FAILURE_WINDOW_SECONDS
    assert cache.get(_failures(primary)) == 2
    assert 0 < cache.ttl(_failures(primary)) <= 60

    # When their window has passed, two more failures
    cache.delete(_failures(primary))
    _post(client, key)
    after = _post(client, key)

    assert cache.get(_cooldown(primary)) is None
    assert _tried(after)[0]["deployment"] == "primary"
    assert "skipped" not in _tried(after)[0]
    assert fake_upstream.calls("primary") == 4


def test_one_429_cools_a_deployment_down_at_once(client, fake_upstream, cooling):
    primary, key = cooling
    fake_upstream.program("primary", status=429)

    limited = _post(client, key)
    assert cache.get(_cooldown(primary)) is not None  # one failure, not three
    skipped = _post(client, key)

    assert _failure(_tried(limited)[0]) == ("primary", "upstream_rate_limited")
    assert _tried(skipped)[0] == {"deployment": "primary", "skipped": "cooldown"}
    assert (limited["x-gateway-deployment"], skipped["x-gateway-deployment"]) == (
        "backup",
        "backup",
    )
    assert fake_upstream.calls("primary") == 1
