"""USD budgets (key, team, organization) and monthly request quotas (key,
team) on the request path.

At admission the estimated cost is reserved against every budget and one
request against every quota, under row locks taken in a fixed order
(organization, team, key), so concurrent calls in any number of processes
cannot overshoot; settlement corrects the reservation to the actual cost.
Windows reset on their boundaries, computed from ``now`` (injectable).
"""

from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import F

from gateway_project.errors import GatewayError
from gateway_project.money import from_micros
from tenants.models import BudgetPeriod, LimitedEntity, Organization, Team, VirtualKey


class BudgetExceeded(GatewayError):
    http_status = 402
    code = "budget_exceeded"


class QuotaExhausted(GatewayError):
    http_status = 402
    code = "quota_exhausted"


def window_start(
    period: str, seconds: int | None, started: datetime | None, now: datetime
) -> datetime | None:
    """The start of the budget window that contains ``now`` (UTC calendar
    boundaries; a duration counts from the previous window's start)."""
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == BudgetPeriod.DAILY:
        return midnight
    if period == BudgetPeriod.WEEKLY:
        return midnight - timedelta(days=now.weekday())
    if period == BudgetPeriod.MONTHLY:
        return midnight.replace(day=1)
    if period == BudgetPeriod.DURATION and seconds:
        if started is None or started > now:
            return now
        elapsed = int((now - started).total_seconds()) // seconds
        return started + timedelta(seconds=elapsed * seconds)
    return started  # never resets


def _month_start(now: datetime) -> datetime:
    return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def _roll(entity: LimitedEntity, now: datetime) -> dict[str, Any]:
    """Field changes that start a new budget or quota window when ``now`` has
    crossed a boundary."""
    changes: dict[str, Any] = {}
    if entity.budget_limit_micros is not None:
        start = window_start(
            entity.budget_period,
            entity.budget_period_seconds,
            entity.budget_window_start,
            now,
        )
        if start is not None and start != entity.budget_window_start:
            changes.update(budget_window_start=start, budget_spent_micros=0)
    if getattr(entity, "monthly_request_quota", None) is not None:
        start = _month_start(now)
        if entity.quota_period_start != start:  # type: ignore[attr-defined]
            changes.update(quota_period_start=start, quota_requests_used=0)
    return changes


def _locked(key: VirtualKey) -> list[LimitedEntity]:
    """Organization, team and key rows, locked in that (fixed) order."""
    team = key.team
    return [
        Organization.objects.select_for_update().get(pk=team.organization_id),
        Team.objects.select_for_update().get(pk=team.pk),
        VirtualKey.objects.select_for_update().get(pk=key.pk),
    ]


def budgets_apply(key: VirtualKey) -> bool:
    """Whether any budget or quota bounds this key's calls."""
    return _needs_locks(key)


def _needs_locks(key: VirtualKey) -> bool:
    entities: list[Any] = [key.team.organization, key.team, key]
    return any(
        e.budget_limit_micros is not None
        or getattr(e, "monthly_request_quota", None) is not None
        for e in entities
    )


def budgets_reserve(*, key: VirtualKey, cost_micros: int, now: datetime) -> bool:
    """Reserve ``cost_micros`` on every budget and one request on every quota.

    Returns whether anything was reserved. Raises BudgetExceeded or
    QuotaExhausted (402); nothing is written then.
    """
    if not _needs_locks(key):
        return False
    with transaction.atomic():
        entities = _locked(key)
        updates: list[tuple[Any, dict[str, Any]]] = []
        for entity in entities:
            changes = _roll(entity, now)
            spent = changes.get("budget_spent_micros", entity.budget_spent_micros)
            if (
                entity.budget_limit_micros is not None
                and spent + cost_micros > entity.budget_limit_micros
            ):
                raise BudgetExceeded(
                    f"The {type(entity).__name__.lower()}'s budget of "
                    f"${from_micros(entity.budget_limit_micros)} is spent "
                    f"(${from_micros(spent)} used this period)"
                )
            quota = getattr(entity, "monthly_request_quota", None)
            used = changes.get(
                "quota_requests_used", getattr(entity, "quota_requests_used", 0)
            )
            if quota is not None and used + 1 > quota:
                raise QuotaExhausted(
                    f"The {type(entity).__name__.lower()}'s monthly quota of {quota} requests is used up"
                )
            updates.append((entity, changes))
        for entity, changes in updates:
            reservation: dict[str, Any] = dict(changes)
            if entity.budget_limit_micros is not None:
                reservation["budget_spent_micros"] = (
                    cost_micros
                    if "budget_spent_micros" in changes
                    else F("budget_spent_micros") + cost_micros
                )
            if getattr(entity, "monthly_request_quota", None) is not None:
                reservation["quota_requests_used"] = (
                    1
                    if "quota_requests_used" in changes
                    else F("quota_requests_used") + 1
                )
            if reservation:
                type(entity).objects.filter(pk=entity.pk).update(**reservation)
    return True


def budgets_settle(
    *, key: VirtualKey, reserved_micros: int, cost_micros: int, succeeded: bool
) -> None:
    """Correct the reservation to the actual cost; a failed call gives its
    request back to the quotas. Call inside the settlement's transaction."""
    correction = cost_micros - reserved_micros
    entities: list[Any] = [
        (Organization, key.team.organization_id, key.team.organization),
        (Team, key.team_id, key.team),
        (VirtualKey, key.pk, key),
    ]
    for model, pk, entity in entities:
        if entity.budget_limit_micros is not None and correction:
            model.objects.filter(pk=pk).update(
                budget_spent_micros=F("budget_spent_micros") + correction
            )
            # Never below zero: the window may have rolled since the reservation.
            model.objects.filter(pk=pk, budget_spent_micros__lt=0).update(
                budget_spent_micros=0
            )
        if not succeeded and getattr(entity, "monthly_request_quota", None) is not None:
            model.objects.filter(pk=pk, quota_requests_used__gt=0).update(
                quota_requests_used=F("quota_requests_used") - 1
            )
