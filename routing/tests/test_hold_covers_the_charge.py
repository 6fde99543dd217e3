"""The hold covers the worst case (DESIGN.md): for any request the boundary
accepts, whatever deployment serves it and whatever it uses within what the
request allows, the charge never exceeds the hold. Request shapes, prices and
team terms are generated (hypothesis); the functions are the request path's
own (routing/inference/admit.py, settle.py, billing/settlement.py)."""

import uuid
from decimal import Decimal

import pytest
from django.conf import settings as django_settings
from hypothesis import given, settings
from hypothesis import strategies as st

from billing.models import Job, UsageStatus
from billing.settlement import Price, Usage
from gateway_project.money import MICROS
from routing import providers
from routing.inference import admit
from routing.inference.call import Call
from routing.inference.parse import MAX_OUTPUT_TOKENS, validate
from routing.inference.settle import settlement_of
from routing.models import ModelGroup
from routing.providers import Target
from tenants.models import BudgetMode, CacheHitCharge, Organization, Team, VirtualKey

ENDPOINT_INPUT = {
    "chat": ("messages", [{"role": "user", "content": "hi"}]),
    "completion": ("prompt", "hi"),
    "embedding": ("input", "hi"),
}
cap = st.none() | st.integers(1, MAX_OUTPUT_TOKENS)
price = st.builds(Price, st.integers(0, 200_000_000), st.integers(0, 800_000_000))


@st.composite
def requests(draw):
    endpoint = draw(st.sampled_from(sorted(ENDPOINT_INPUT)))
    field, value = ENDPOINT_INPUT[endpoint]
    body = {"model": "g", field: value}
    for name, strategy in (
        ("max_tokens", cap),
        ("max_completion_tokens", cap),
        ("n", st.none() | st.integers(1, 128)),
        ("best_of", st.none() | st.integers(1, 20)),
    ):
        chosen = draw(strategy)
        if chosen is not None:
            body[name] = chosen
    return endpoint, body


@st.composite
def teams(draw):
    organization = Organization(pk=1, organization_id="o")
    return Team(
        pk=1,
        team_id="t",
        organization=organization,
        budget_mode=draw(st.sampled_from(list(BudgetMode.values))),
        credits_per_dollar=Decimal(draw(st.integers(0, 1_000_000))) / 100,
        tokens_per_credit=draw(st.integers(1, 1_000_000)),
        price_markup_bps=draw(st.integers(0, 50_000)),
        cache_hit_charge=draw(st.sampled_from(list(CacheHitCharge.values))),
        cache_hit_price_bps=draw(st.integers(0, 10_000)),
    )


def _target(number: int) -> Target:
    return Target(
        deployment_id=number,
        deployment_name=f"d{number}",
        model=f"openai/m{number}",
        api_key="",
        api_base="http://upstream",
        params={},
        timeout_seconds=1,
    )


@settings(max_examples=400, deadline=None)
@given(
    shape=requests(),
    team=teams(),
    prices=st.lists(price, min_size=1, max_size=4),
    in_job=st.booleans(),
    prompt=st.integers(0, 2_000_000),
    data=st.data(),
)
def test_the_charge_never_exceeds_the_hold(shape, team, prices, in_job, prompt, data):
    # Given a request the boundary accepts, routed to deployments at these
    # prices, whose prompt counts ``prompt`` tokens
    endpoint, body = shape
    validate(endpoint, body)
    targets = [_target(n) for n in range(len(prices))]
    call = Call(
        request_id="req_x",
        client_request_id="",
        key=VirtualKey(pk=1, team=team),
        endpoint=endpoint,
        group=ModelGroup(pk=1, group_name="g"),
        targets=targets,
        body=body,
        prices={t.deployment_id: p for t, p in zip(targets, prices, strict=True)},
        job=Job(job_id=uuid.uuid4()) if in_job else None,
    )

    # When it is held, then served by any of them using any amount the
    # request allows: the whole prompt at most, and per choice (n, or
    # best_of for completions) the largest output cap it gave, or the
    # default cap, which the gateway then sends upstream
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(providers, "estimate_tokens", lambda *_: (prompt, 0))
        amounts = admit.hold_amounts(call)
    assert amounts is not None
    hold_cost, hold = amounts
    allowed = _allowed_output(endpoint, body)
    served = data.draw(st.sampled_from(targets))
    used = Usage(data.draw(st.integers(0, prompt)), data.draw(st.integers(0, allowed)))
    settlement = settlement_of(
        call,
        status=UsageStatus.SUCCESS,
        target=served,
        usage=used,
        cached=data.draw(st.booleans()),
    )

    # Then the charge and the cost fit in the hold
    assert settlement.charge_micros <= hold
    assert settlement.cost_micros <= hold_cost
    if team.budget_mode == BudgetMode.JOB_BASED:
        assert hold == (0 if in_job else MICROS)


def _allowed_output(endpoint: str, body: dict) -> int:
    """The most output tokens a provider may bill for this request."""
    if endpoint == "embedding":
        return 0
    choices = body.get("n") or 1
    if endpoint == "completion":
        choices = max(choices, body.get("best_of") or 1)
    caps = [body[k] for k in ("max_tokens", "max_completion_tokens") if k in body]
    return choices * max(caps or [django_settings.GATEWAY_DEFAULT_MAX_TOKENS])
