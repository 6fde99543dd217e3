"""Settlements as the request path builds them, for the billing tests."""

from dataclasses import replace
from typing import Any

from django.utils import timezone

from billing.models import UsageStatus
from billing.settlement import Price, Settlement, Usage


def settlement(team, call_id: str, **fields: Any) -> Settlement:
    """A successful chat call of ``team``: 7 + 5 tokens at $1 / $2 per million
    (17 micro-USD), charged ``charge_micros`` (0 unless given)."""
    base = Settlement(
        call_id=call_id,
        team_id=team.pk,
        organization_id=team.organization_id,
        endpoint="chat",
        requested_model="chat",
        provider_model="openai/mock-a",
        status=UsageStatus.SUCCESS,
        usage=Usage(7, 5),
        price=Price(1_000_000, 2_000_000),
        cost_micros=17,
        charge_micros=0,
        latency_ms=12,
        fallbacks_tried=[{"deployment": "mock-a", "latency_ms": 3}],
        metadata={"trace": "t-1"},
        created_at=timezone.now(),
    )
    return replace(base, **fields)
