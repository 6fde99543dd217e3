"""Celery tasks of billing: fetch by id, call a service, nothing else."""

from datetime import timedelta
from functools import partial
from typing import Any

from celery import shared_task
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing.models import CreditAccount
from billing.reconciliation import credit_account_reconcile, holds_settle_stale


@shared_task(name="billing.credit_account_reconcile", time_limit=60, soft_time_limit=50)
def credit_account_reconcile_task(account_id: int) -> dict[str, Any]:
    """Repair one account's drift from its ledger."""
    return credit_account_reconcile(account_id=account_id)


@shared_task(
    name="billing.credit_accounts_reconcile", time_limit=60, soft_time_limit=50
)
def credit_accounts_reconcile_task() -> int:
    """Queue the reconciliation of every account (after commit)."""
    ids = list(CreditAccount.objects.values_list("pk", flat=True))
    for account_id in ids:
        transaction.on_commit(partial(credit_account_reconcile_task.delay, account_id))
    return len(ids)


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
