"""The end of a call as one typed, frozen value: what it used, at what price,
what it costs and what it holds, and everything its usage record keeps.

The request path (routing/inference/) builds a ``Settlement``; pricing
(``usage_cost_micros``), charging and ``billing.services.call_settle`` take
it whole, and the settlement journal (billing/journal.py) stores it as JSON
to apply later, so that a settlement the database could not take is written
exactly as it would have been.
"""

import json
from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from uuid import UUID

from billing.models import UsageRecord, UsageSource, UsageStatus
from gateway_project.money import MICROS
from tenants.models import BudgetMode, CacheHitCharge, Team

# Calls that are charged, counted in metrics and stamp their key's last use.
SUCCEEDED = (
    UsageStatus.SUCCESS,
    UsageStatus.CLIENT_DISCONNECTED,
    UsageStatus.INTERRUPTED,
)


@dataclass(frozen=True)
class Usage:
    """Tokens a call used, and who counted them."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    source: str = UsageSource.PROVIDER

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Price:
    """Micro-USD per million tokens, by token class."""

    input_per_million: int
    output_per_million: int


FREE = Price(0, 0)


def usage_cost_micros(usage: Usage, price: Price, markup_bps: int = 0) -> int:
    """Cost in micro-USD of ``usage`` at ``price`` with the team's markup: one
    rounding, half up, at the end."""
    numerator = (
        usage.prompt_tokens * price.input_per_million
        + usage.completion_tokens * price.output_per_million
    ) * (10_000 + markup_bps)
    denominator = 1_000_000 * 10_000
    return (2 * numerator + denominator) // (2 * denominator)


def credits_for_call(*, team: Team, cost_micros: int, tokens: int) -> int:
    """Micro-credits a call costs in the team's budget mode (one rounding,
    half up). job_based teams pay per job, not per call: 0 here."""
    if team.budget_mode == BudgetMode.CONSUMPTION_USD:
        credits = Decimal(cost_micros) * team.credits_per_dollar
    elif team.budget_mode == BudgetMode.CONSUMPTION_TOKENS:
        credits = Decimal(tokens) * MICROS / team.tokens_per_credit
    else:
        return 0
    return int(credits.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def call_charge_micros(
    *,
    team: Team,
    cost_micros: int,
    tokens: int,
    succeeded: bool,
    cached: bool = False,
    in_job: bool = False,
) -> int:
    """What a call costs the team, in micro-credits. A failed call costs
    nothing; a cache hit what the team's cache policy says; a job_based team
    pays one credit per job, and a call outside any job counts as a job of
    its own. Never more for less usage: the hold, priced the same way on the
    most a call may use, covers the charge."""
    if not succeeded or (cached and team.cache_hit_charge == CacheHitCharge.FREE):
        return 0
    if team.budget_mode == BudgetMode.JOB_BASED:
        full = 0 if in_job else MICROS
    else:
        full = credits_for_call(team=team, cost_micros=cost_micros, tokens=tokens)
    if cached and team.cache_hit_charge == CacheHitCharge.DISCOUNTED:
        # Half up, the one rounding rule.
        return (2 * full * team.cache_hit_price_bps + 10_000) // 20_000
    return full


@dataclass(frozen=True)
class Settlement:
    """One call's outcome, ready to be written: its usage record, and the
    capture of ``charge_micros`` from its hold with the release of the rest.

    The hold is one of: ``held_micros`` (written before the provider was
    called), ``unheld_micros`` (to be written now, with the settlement, under
    the hold's guard), or neither (nothing held: a failed call whose deferred
    hold was never written). ``budget_reserved_micros`` is what the key's
    budgets reserved at admission, corrected to ``cost_micros`` now."""

    call_id: str
    team_id: int
    organization_id: int
    endpoint: str
    requested_model: str
    status: str
    usage: Usage
    price: Price
    cost_micros: int
    charge_micros: int
    created_at: datetime
    virtual_key_id: int | None = None
    model_group_id: int | None = None
    deployment_id: int | None = None
    job_id: UUID | None = None
    provider_model: str = ""
    markup_bps: int = 0
    held_micros: int | None = None
    unheld_micros: int | None = None
    budget_reserved_micros: int | None = None
    latency_ms: int = 0
    http_status: int = 200
    error_code: str = ""
    error_message: str = ""
    streamed: bool = False
    cached: bool = False
    fallbacks_tried: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    client_request_id: str = ""

    @property
    def succeeded(self) -> bool:
        return self.status in SUCCEEDED

    def record(self, *, credits_micros: int) -> UsageRecord:
        """The (unsaved) usage record of this settlement."""
        return UsageRecord(
            request_id=self.call_id,
            client_request_id=self.client_request_id,
            organization_id=self.organization_id,
            team_id=self.team_id,
            virtual_key_id=self.virtual_key_id,
            model_group_id=self.model_group_id,
            deployment_id=self.deployment_id,
            job_id=self.job_id,
            endpoint=self.endpoint,
            requested_model=self.requested_model,
            provider_model=self.provider_model,
            prompt_tokens=self.usage.prompt_tokens,
            completion_tokens=self.usage.completion_tokens,
            total_tokens=self.usage.total_tokens,
            input_price_per_million_micros=self.price.input_per_million,
            output_price_per_million_micros=self.price.output_per_million,
            price_markup_bps=self.markup_bps,
            cost_micros=self.cost_micros,
            credits_micros=credits_micros,
            latency_ms=self.latency_ms,
            status=self.status,
            http_status=self.http_status,
            error_code=self.error_code,
            error_message=self.error_message,
            usage_source=self.usage.source,
            streamed=self.streamed,
            cached=self.cached,
            fallbacks_tried=self.fallbacks_tried,
            metadata=self.metadata,
            created_at=self.created_at,
        )

    def to_json(self) -> str:
        """One line of JSON (the journal's); ``from_json`` reads it back."""
        # Shallow: asdict() deep-copies every list and dict first, which
        # cost most of a stream's journal line (json.dumps copies nothing).
        value = _shallow(self)
        value["usage"] = _shallow(self.usage)
        value["price"] = _shallow(self.price)
        value["created_at"] = self.created_at.isoformat()
        value["job_id"] = str(self.job_id) if self.job_id is not None else None
        return json.dumps(value, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "Settlement":
        """Read a line back; fields this build does not know (a line written
        by another version) are left out, and missing ones take defaults."""
        value = json.loads(text)
        known = {f.name for f in fields(cls)}
        value = {k: v for k, v in value.items() if k in known}
        value["usage"] = Usage(**value["usage"])
        value["price"] = Price(**value["price"])
        value["created_at"] = datetime.fromisoformat(value["created_at"])
        if value["job_id"] is not None:
            value["job_id"] = UUID(value["job_id"])
        return cls(**value)


_NAMES: dict[type, tuple[str, ...]] = {}


def _shallow(value: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict, values as they are (not copied)."""
    names = _NAMES.get(type(value))
    if names is None:
        names = _NAMES[type(value)] = tuple(f.name for f in fields(value))
    return {name: getattr(value, name) for name in names}
