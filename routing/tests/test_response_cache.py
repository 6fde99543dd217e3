"""The response cache: per team, opt-in, billed by the team's policy."""

import httpx
import pytest

from billing.models import UsageRecord
from billing.services import team_open
from billing.tests.prices import price
from gateway_project.money import MICROS
from routing.models import Deployment
from routing.services import model_group_create
from tenants.models import BudgetMode, CacheHitCharge, CacheMode, Team
from tenants.services import organization_create

pytestmark = pytest.mark.django_db(transaction=True)
CALL = {
    "model": "chat",
    "messages": [{"role": "user", "content": "What is 2+2?"}],
    "max_tokens": 5,
}


@pytest.fixture
def teams(fake_upstream):
    price("openai/fake-model")
    deployment = Deployment.objects.create(
        name="fake",
        model="openai/fake-model",
        litellm_params={"api_base": fake_upstream.base("cache")},
    )
    group = model_group_create(group_name="chat", members=[(deployment, 0)])
    organization = organization_create(organization_id="org_cache", name="Cache")
    keys = {}
    for name in ("a", "b"):
        _, _, keys[name] = team_open(
            organization=organization,
            team_id=f"team_{name}",
            credits_allocated_micros=100 * MICROS,
            model_groups=[group],
            budget_mode=BudgetMode.CONSUMPTION_USD,
        )
    return keys


def _post(client, key, body=CALL, path="/v1/chat/completions", **headers):
    return client.post(
        path, body, content_type="application/json", HTTP_X_API_KEY=key, **headers
    )


def test_opted_in_repeat_is_a_hit_recorded_and_free_by_default(
    client, teams, fake_upstream
):
    first = _post(client, teams["a"], HTTP_X_GATEWAY_CACHE="on")
    second = _post(client, teams["a"], HTTP_X_GATEWAY_CACHE="on")

    assert (first["x-cache"], second["x-cache"]) == ("miss", "hit")
    assert second.json()["choices"] == first.json()["choices"]
    assert fake_upstream.calls("cache") == 1
    miss, hit = UsageRecord.objects.order_by("created_at")
    assert (miss.cached, hit.cached, hit.usage_source) == (False, True, "cache")
    assert (hit.prompt_tokens, hit.completion_tokens, hit.cost_micros) == (
        7,
        5,
        miss.cost_micros,
    )
    assert (miss.credits_micros > 0, hit.credits_micros) == (True, 0)


def test_a_full_charge_policy_bills_hits_like_calls(client, teams):
    Team.objects.filter(team_id="team_a").update(cache_hit_charge=CacheHitCharge.FULL)

    _post(client, teams["a"], HTTP_X_GATEWAY_CACHE="on")
    _post(client, teams["a"], HTTP_X_GATEWAY_CACHE="on")

    miss, hit = UsageRecord.objects.order_by("created_at")
    assert hit.cached and hit.credits_micros == miss.credits_micros > 0


def test_other_parameters_miss(client, teams, fake_upstream):
    _post(client, teams["a"], HTTP_X_GATEWAY_CACHE="on")

    other = _post(
        client, teams["a"], {**CALL, "temperature": 0.9}, HTTP_X_GATEWAY_CACHE="on"
    )

    assert other["x-cache"] == "miss"
    assert fake_upstream.calls("cache") == 2


def test_teams_never_share_answers(client, teams, fake_upstream):
    _post(client, teams["a"], HTTP_X_GATEWAY_CACHE="on")

    other_team = _post(client, teams["b"], HTTP_X_GATEWAY_CACHE="on")

    assert other_team["x-cache"] == "miss"
    assert fake_upstream.calls("cache") == 2


def test_not_opted_in_means_no_cache(client, teams, fake_upstream):
    first, second = _post(client, teams["a"]), _post(client, teams["a"])

    assert "x-cache" not in first and "x-cache" not in second
    assert fake_upstream.calls("cache") == 2
    assert not UsageRecord.objects.filter(cached=True).exists()


@pytest.mark.parametrize(
    ("mode", "opt", "calls"),
    [
        (CacheMode.OFF, {"HTTP_X_GATEWAY_CACHE": "on"}, 2),
        (CacheMode.ALWAYS, {}, 1),
        (CacheMode.ALWAYS, {"HTTP_X_GATEWAY_CACHE": "off"}, 2),
    ],
)
def test_team_cache_modes(client, teams, fake_upstream, mode, opt, calls):
    Team.objects.filter(team_id="team_a").update(cache_mode=mode)

    _post(client, teams["a"], **opt)
    _post(client, teams["a"], **opt)

    assert fake_upstream.calls("cache") == calls


def test_the_body_field_opts_in_too(client, teams, fake_upstream):
    _post(client, teams["a"], {**CALL, "cache": True})
    hit = _post(client, teams["a"], {**CALL, "cache": True})

    assert hit["x-cache"] == "hit"
    assert "cache" not in fake_upstream.requests[-1].json


def _http(server, key, body, **headers):
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        json=body,
        headers={"X-API-Key": key, "X-Gateway-Cache": "on", **headers},
        timeout=30,
    )


def test_a_stream_can_be_answered_from_the_cache(running_server, teams, fake_upstream):
    _http(running_server, teams["a"], CALL)

    response = _http(
        running_server,
        teams["a"],
        {**CALL, "stream": True, "stream_options": {"include_usage": True}},
    )

    assert response.headers["x-cache"] == "hit"
    assert '"content": "Hello from the fake upstream."' in response.text
    assert '"prompt_tokens": 7' in response.text
    assert response.text.rstrip().endswith("data: [DONE]")
    assert fake_upstream.calls("cache") == 1


def test_a_streamed_answer_is_cached_for_later(running_server, teams, fake_upstream):
    streamed = _http(running_server, teams["a"], {**CALL, "stream": True})
    assert streamed.headers["x-cache"] == "miss"

    hit = _http(running_server, teams["a"], CALL)

    assert hit.headers["x-cache"] == "hit"
    assert (
        hit.json()["choices"][0]["message"]["content"]
        == "Hello from the fake upstream."
    )
    assert fake_upstream.calls("cache") == 1


def test_generate_reports_cached(client, teams):
    body = {"prompt": "What is 2+2?", "model": "chat", "max_new_tokens": 5}

    first = _post(
        client, teams["a"], body, path="/v1/generate", HTTP_X_GATEWAY_CACHE="on"
    )
    second = _post(
        client, teams["a"], body, path="/v1/generate", HTTP_X_GATEWAY_CACHE="on"
    )

    assert (first.json()["cached"], second.json()["cached"]) == (False, True)
    assert second.json()["output"] == first.json()["output"]


def test_a_discounted_policy_bills_hits_at_a_share(client, teams):
    Team.objects.filter(team_id="team_a").update(
        cache_hit_charge=CacheHitCharge.DISCOUNTED, cache_hit_price_bps=2_500
    )

    _post(client, teams["a"], HTTP_X_GATEWAY_CACHE="on")
    _post(client, teams["a"], HTTP_X_GATEWAY_CACHE="on")

    miss, hit = UsageRecord.objects.order_by("created_at")
    # A quarter of the full charge, rounded half up.
    assert hit.credits_micros == (miss.credits_micros * 2_500 + 5_000) // 10_000 > 0
