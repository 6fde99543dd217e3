"""Celery tasks of billing: fetch by id, call a service, nothing else."""

import logging
from datetime import timedelta
from functools import partial
from typing import Any

from celery import shared_task
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing.jobs import jobs_expire
from billing.models import CreditAccount
from billing.periods import budgets_reset, credit_account_refill, credit_accounts_refill
from billing.reconciliation import credit_account_reconcile, holds_settle_stale
from billing.rollups import usage_prune, usage_roll_up
from gateway_project.metrics import BACKGROUND_FAILURES

logger = logging.getLogger(__name__)


@shared_task(name="billing.credit_account_reconcile", time_limit=60, soft_time_limit=50)
def credit_account_reconcile_task(account_id: int) -> dict[str, Any]:
    """Repair one account's drift from its ledger."""
    return credit_account_reconcile(account_id=account_id)


@shared_task(
    name="billing.credit_accounts_reconcile", time_limit=60, soft_time_limit=50
)
def credit_accounts_reconcile_task() -> dict[str, int]:
    """Queue the reconciliation of every account (after commit), each its own
    task. An account that cannot be queued (or, run eagerly, fails) is logged
    and counted, and the others are still queued; the count is complete when
    the task returns if it runs outside a transaction, as on a worker."""
    ids = list(CreditAccount.objects.values_list("pk", flat=True))
    failed: list[int] = []
    for account_id in ids:
        transaction.on_commit(
            partial(_credit_account_reconcile_queue, account_id, failed)
        )
    return {"accounts": len(ids), "failed": len(failed)}


def _credit_account_reconcile_queue(account_id: int, failed: list[int]) -> None:
    try:
        credit_account_reconcile_task.delay(account_id)
    except Exception:
        logger.exception("reconciliation of credit account %s failed", account_id)
        BACKGROUND_FAILURES.labels(work="credit_account_reconcile").inc()
        failed.append(account_id)


@shared_task(name="billing.holds_settle_stale", time_limit=300, soft_time_limit=270)
def holds_settle_stale_task(older_than_seconds: int | None = None) -> dict[str, int]:
    """Settle holds older than ``older_than_seconds`` (default
    GATEWAY_STALE_HOLD_SECONDS) that nothing settled."""
    age = (
        settings.GATEWAY_STALE_HOLD_SECONDS
        if older_than_seconds is None
        else older_than_seconds
    )
    return holds_settle_stale(older_than=timedelta(seconds=age), now=timezone.now())


@shared_task(name="billing.jobs_expire", time_limit=300, soft_time_limit=270)
def jobs_expire_task() -> dict[str, int]:
    """Close as expired the jobs open longer than GATEWAY_JOB_TTL_SECONDS,
    settling their held credit."""
    return jobs_expire(now=timezone.now())


@shared_task(name="billing.usage_roll_up", time_limit=600, soft_time_limit=570)
def usage_roll_up_task() -> dict[str, int]:
    """Roll up raw usage into hourly and daily rows up to the grace period
    (at most 48 hours a run; the next one continues)."""
    return usage_roll_up(now=timezone.now())


@shared_task(name="billing.usage_prune", time_limit=1800, soft_time_limit=1770)
def usage_prune_task() -> int:
    """Delete raw usage past retention that is rolled up, in batches."""
    return usage_prune(now=timezone.now())


@shared_task(name="billing.budgets_reset", time_limit=300, soft_time_limit=270)
def budgets_reset_task() -> dict[str, int]:
    """Start the new budget and quota windows whose boundary has passed."""
    return budgets_reset(now=timezone.now())


@shared_task(name="billing.credit_account_refill", time_limit=60, soft_time_limit=50)
def credit_account_refill_task(account_id: int) -> bool:
    """Refill one account for the current period; whether a row was written."""
    return credit_account_refill(account_id=account_id, now=timezone.now())[1]


@shared_task(name="billing.credit_accounts_refill", time_limit=300, soft_time_limit=270)
def credit_accounts_refill_task() -> dict[str, int]:
    """Refill every account configured for auto-refill, once per period."""
    return credit_accounts_refill(now=timezone.now())
