"""Work done at period boundaries: budget and quota windows reset, and
credit accounts refilled.

Both are idempotent: a window that already starts at the current boundary is
left alone, and a refill's ledger row carries the period in its idempotency
key, so a second run in the same period writes nothing. Each row is its own
transaction: one that fails is logged and counted, and the others go on.
"""

import logging
from datetime import datetime
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.db import transaction
from django.db.models import Q

from billing.budgets import _roll, window_start
from billing.models import CreditAccount, LedgerEntry, LedgerEntryType
from billing.services import _entry
from gateway_project.metrics import BACKGROUND_FAILURES
from tenants.models import BudgetPeriod, Organization, Team, VirtualKey

logger = logging.getLogger(__name__)

REFILL_PERIODS = (BudgetPeriod.DAILY, BudgetPeriod.WEEKLY, BudgetPeriod.MONTHLY)


def budgets_reset(*, now: datetime) -> dict[str, int]:
    """Start the new budget and quota windows of every organization, team and
    key whose window ``now`` has left; returns how many rows were reset per
    model, and how many failed (logged; the others are still reset). The
    request path rolls a window lazily too (billing/budgets.py); this makes
    the reset visible to operators at the boundary."""
    counts: dict[str, int] = {}
    failed = 0
    limited: list[tuple[Any, Q]] = [
        (Organization, Q(budget_limit_micros__isnull=False)),
        (
            Team,
            Q(budget_limit_micros__isnull=False)
            | Q(monthly_request_quota__isnull=False),
        ),
        (
            VirtualKey,
            Q(budget_limit_micros__isnull=False)
            | Q(monthly_request_quota__isnull=False),
        ),
    ]
    for model, condition in limited:
        reset = 0
        name = model.__name__.lower()
        for pk in model.objects.filter(condition).values_list("pk", flat=True):
            try:
                reset += _window_reset(model, pk, now)
            except SoftTimeLimitExceeded:
                raise  # the task's time is up: stop, not the row's fault
            except Exception:
                logger.exception("budget windows of %s %s could not be reset", name, pk)
                BACKGROUND_FAILURES.labels(work="budgets_reset").inc()
                failed += 1
        counts[name] = reset
    counts["failed"] = failed
    return counts


def _window_reset(model: Any, pk: Any, now: datetime) -> bool:
    # One short transaction per row, under the same row lock that
    # budgets_reserve takes, so a call reserving at the boundary and the
    # reset never both start the window.
    with transaction.atomic():
        entity = model.objects.select_for_update().get(pk=pk)
        changes = _roll(entity, now)
        if changes:
            model.objects.filter(pk=pk).update(**changes)
    return bool(changes)


def refill_key(account_id: int, period_start: datetime) -> str:
    return f"refill:{account_id}:{period_start:%Y-%m-%dT%H:%M}"


def credit_account_refill(
    *, account_id: int, now: datetime
) -> tuple[LedgerEntry | None, bool]:
    """Top the account's balance up to its ``auto_refill_amount_micros`` once
    per ``auto_refill_period`` (UTC calendar day, week or month).

    Writes one REFILL ledger row per period — of zero when the balance is
    already at the level, so that the period counts as refilled and spending
    later in it is not topped up again. Returns the period's row and whether
    this call wrote it; (None, False) when the account has no refill.
    """
    with transaction.atomic():
        account = CreditAccount.objects.select_for_update().get(pk=account_id)
        level = account.auto_refill_amount_micros
        if level is None or account.auto_refill_period not in REFILL_PERIODS:
            return None, False
        start = window_start(account.auto_refill_period, None, None, now)
        assert start is not None  # calendar periods always have a start
        key = refill_key(account.pk, start)
        existing = LedgerEntry.objects.filter(idempotency_key=key).first()
        if existing is not None:
            return existing, False
        entry = _entry(
            account,
            entry_type=LedgerEntryType.REFILL,
            amount=max(level - account.balance_micros, 0),
            held_delta=0,
            key=key,
            reason=f"{account.auto_refill_period} auto-refill from {start:%Y-%m-%d}",
            actor_label="auto-refill",
        )
    return entry, True


def credit_accounts_refill(*, now: datetime) -> dict[str, int]:
    """Refill every account configured for it, each in its own transaction;
    returns how many ledger rows were written, how many accounts were already
    refilled this period, and how many failed (logged; the others are still
    refilled, and the next run tries them again)."""
    written = already = failed = 0
    accounts = CreditAccount.objects.filter(
        auto_refill_amount_micros__isnull=False,
        auto_refill_period__in=REFILL_PERIODS,
    ).values_list("pk", flat=True)
    for account_id in accounts:
        try:
            _, created = credit_account_refill(account_id=account_id, now=now)
        except SoftTimeLimitExceeded:
            raise  # the task's time is up: stop, not the account's fault
        except Exception:
            logger.exception("credit account %s could not be refilled", account_id)
            BACKGROUND_FAILURES.labels(work="credit_accounts_refill").inc()
            failed += 1
            continue
        written, already = written + created, already + (not created)
    return {"refilled": written, "already_refilled": already, "failed": failed}
