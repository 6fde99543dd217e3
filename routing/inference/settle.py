"""Step 7: the one settlement of a call, however it ended.

``settle`` runs once per call (``Call.settled``), shielded from the client's
cancellation: the usage record, the capture of what the call cost and the
release of the rest of its hold, the budgets corrected, the rate-limit
reservation corrected to the tokens used and its concurrency slot freed.
It takes the call's outcome as one frozen ``Settlement``
(billing/settlement.py) and hands it to ``billing.services.call_settle``.
"""

import asyncio
import contextlib
import logging
from dataclasses import replace
from typing import Any

from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.utils import timezone

from billing import statements
from billing.journal import journal
from billing.models import UsageRecord, UsageStatus
from billing.rollups import fell_back
from billing.services import InsufficientCredits, call_settle
from billing.settlement import (
    FREE,
    SUCCEEDED,
    Settlement,
    Usage,
    call_charge_micros,
    usage_cost_micros,
)
from gateway_project import metrics
from gateway_project.errors import GatewayError
from gateway_project.inputs import storable_text
from gateway_project.middleware import database_unavailable
from gateway_project.threads import in_thread
from routing import limits
from routing.inference.call import Call, client_disconnected
from routing.providers import Target
from tenants.authentication import virtual_key_touch

logger = logging.getLogger(__name__)


async def settle(
    call: Call,
    *,
    status: str,
    target: Target | None = None,
    usage: Usage | None = None,
    error: GatewayError | None = None,
    streamed: bool = False,
    cached: bool = False,
) -> UsageRecord | None:
    """Settle ``call`` with this outcome, unless it was settled already (then
    None). The record, or None when the settlement went to the journal.
    Raises InsufficientCredits when a hold left to the settlement is refused
    (nothing is written then), and ServiceUnavailable when such a call's
    settlement finds the database out of reach (journaled as failed)."""
    if call.settled:
        return None
    call.settled = True
    outcome = _settled(call, status, target, usage or Usage(), error, streamed, cached)
    # Shielded: a client that leaves does not stop what is being written.
    return await asyncio.shield(outcome)


async def failed(call: Call, error: GatewayError) -> None:
    """Settle a call that got no answer: recorded, not charged."""
    await settle(call, status=UsageStatus.ERROR, error=error)


async def abandoned(call: Call) -> None:
    """Settle a call whose client left while it was being admitted."""
    await failed(call, client_disconnected())


async def _settled(
    call: Call,
    status: str,
    target: Target | None,
    usage: Usage,
    error: GatewayError | None,
    streamed: bool,
    cached: bool,
) -> UsageRecord | None:
    if call.holding is not None:
        # A stream's hold, being written while the provider opened it, is
        # settled with the call; a refused (or failed) one wrote nothing.
        with contextlib.suppress(Exception):
            await call.holding
    settlement = settlement_of(
        call,
        status=status,
        target=target,
        usage=usage,
        error=error,
        streamed=streamed,
        cached=cached,
    )
    return await in_thread(_write, call, settlement)


def settlement_of(
    call: Call,
    *,
    status: str,
    target: Target | None,
    usage: Usage,
    error: GatewayError | None = None,
    streamed: bool = False,
    cached: bool = False,
) -> Settlement:
    """A call's outcome as the frozen value billing writes: its price, cost
    and charge, its hold, and its usage record's fields."""
    team = call.key.team
    price = call.prices.get(target.deployment_id, FREE) if target else FREE
    succeeded = status in SUCCEEDED
    cost = usage_cost_micros(usage, price, team.price_markup_bps) if succeeded else 0
    # A hold left to the settlement is written only for a call that is
    # charged: a failed one holds nothing.
    unheld = call.unheld_micros if succeeded else None
    metadata = call.body.get("metadata")
    return Settlement(
        call_id=call.request_id,
        client_request_id=call.client_request_id,
        team_id=team.pk,
        organization_id=team.organization_id,
        virtual_key_id=call.key.pk,
        model_group_id=call.group.pk,
        deployment_id=target.deployment_id if target else None,
        job_id=call.job.pk if call.job is not None else None,
        endpoint=call.endpoint,
        requested_model=call.group.group_name,
        provider_model=target.model if target else "",
        status=status,
        usage=usage,
        price=price,
        markup_bps=team.price_markup_bps,
        cost_micros=cost,
        charge_micros=call_charge_micros(
            team=team,
            cost_micros=cost,
            tokens=usage.total_tokens,
            succeeded=succeeded,
            cached=cached,
            in_job=call.job is not None,
        ),
        held_micros=call.held_micros if unheld is None else None,
        unheld_micros=unheld,
        budget_reserved_micros=call.budget_reserved_micros,
        latency_ms=call.latency_ms,
        http_status=error.http_status if error else 200,
        error_code=error.code if error else "",
        # An upstream's message may carry what the database cannot store.
        error_message=storable_text(error.message) if error else "",
        streamed=streamed,
        cached=cached,
        fallbacks_tried=call.attempts,
        metadata=metadata if isinstance(metadata, dict) else {},
        created_at=timezone.now(),
    )


def _write(call: Call, settlement: Settlement) -> UsageRecord | None:
    """The settlement and the limits' correction: the correction is sent
    first and its reply read after the settlement (one wait for both).

    A settlement the database does not take goes to the journal, to be
    applied when it is back: None then. A call whose hold was left to the
    settlement has no hold to pay from yet, so it fails instead (503),
    journaled as failed and not charged."""
    released = limits.release_start(
        call.admission, actual_tokens=settlement.usage.total_tokens
    )
    try:
        record: UsageRecord | None = call_settle(settlement)
    except InsufficientCredits:
        # Only a hold left to the settlement can be refused here: the
        # provider answered, and the call is neither charged nor recorded.
        logger.warning(
            "deferred hold refused at settlement",
            extra={"team": call.key.team.team_id, "held_micros": call.unheld_micros},
        )
        raise
    except (OperationalError, InterfaceError) as failure:
        # The next calls hold first, and fail before any provider is asked.
        statements.available_forget()
        refusal = database_unavailable(failure)
        if settlement.unheld_micros is not None:
            _journal(_failed(settlement, refusal), refusal)
            raise refusal from None
        _journal(settlement, refusal)
        record = None
    finally:
        released()
    if call.journaled and record is not None:
        journal().done(call.request_id)
    if settlement.succeeded:
        virtual_key_touch(key=call.key)
    _count(call, record or settlement.record(credits_micros=settlement.charge_micros))
    return record


def _journal(settlement: Settlement, refusal: GatewayError) -> None:
    """Journal a settlement the database did not take. A journal that cannot
    be written either (disk full, folder gone) leaves the call unrecorded:
    said loudly, with everything needed to write it by hand, and the call
    answered 503 where it has not been answered yet."""
    try:
        journal().pending(settlement)
    except OSError:
        logger.critical(
            "settlement lost: neither the database nor the journal took it",
            exc_info=True,
            extra={"settlement": settlement.to_json()},
        )
        raise refusal from None


def _failed(settlement: Settlement, error: GatewayError) -> Settlement:
    """A settlement that ended as ``error``: recorded, not charged, holding
    nothing."""
    return replace(
        settlement,
        status=UsageStatus.ERROR,
        cost_micros=0,
        charge_micros=0,
        held_micros=None,
        unheld_micros=None,
        http_status=error.http_status,
        error_code=error.code,
        error_message=error.message,
    )


def _count(call: Call, record: UsageRecord) -> None:
    """Metrics and the log line of a settled call (after its transaction).
    The key appears by its display prefix only; prompt text only with
    GATEWAY_LOG_PROMPTS."""
    group = call.group.group_name
    line: dict[str, Any] = {
        "team": call.key.team.team_id,
        "key": call.key.display_prefix,
        "model_group": group,
        "deployment": record.provider_model,
        "status": record.status,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cost_micros": record.cost_micros,
        "credits_micros": record.credits_micros,
        "latency_ms": record.latency_ms,
        "cached": record.cached,
    }
    if call.client_request_id:
        line["client_request_id"] = call.client_request_id
    if settings.GATEWAY_LOG_PROMPTS:
        line["prompt"] = call.body.get("messages", call.body.get("prompt"))
    if record.error_code:
        line["error_code"] = record.error_code
    logger.info("call settled", extra=line)
    if record.status not in SUCCEEDED:
        return
    metrics.TOKENS.labels(group, "prompt").inc(record.prompt_tokens)
    metrics.TOKENS.labels(group, "completion").inc(record.completion_tokens)
    metrics.COST.labels(group).inc(record.cost_micros)
    metrics.CREDITS.labels(group).inc(record.credits_micros)
    if record.cached:
        metrics.CACHE_HITS.labels(group).inc()
    if fell_back(call.attempts):
        metrics.FALLBACKS.labels(group).inc()
