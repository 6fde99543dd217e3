"""Credit reconciliation: the ledger is the truth.

``credit_account_reconcile`` recomputes an account from its ledger and repairs
drift (an audit entry and a metric). ``holds_settle_stale`` settles holds that
no settlement followed (a process died mid-call): captured when the request
has a usage record, released otherwise — exactly once, through the same
idempotency keys as the request path.
"""

from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import Sum
from django.db.models.functions import Coalesce
from prometheus_client import Counter

from accounts.services import audit_log_record
from billing.models import CreditAccount, LedgerEntry, LedgerEntryType, UsageRecord
from billing.services import _settle

DRIFT_REPAIRED = Counter(
    "gateway_credit_drift_repaired_total",
    "Credit accounts whose balance drifted from their ledger",
)
HOLDS_SETTLED = Counter(
    "gateway_stale_holds_settled_total",
    "Stale holds settled by reconciliation",
    ["outcome"],
)


def credit_account_reconcile(*, account_id: int) -> dict[str, Any]:
    """Make an account equal the sums of its ledger; report what was wrong."""
    with transaction.atomic():
        account = (
            CreditAccount.objects.select_for_update()
            .select_related("team")
            .get(pk=account_id)
        )
        sums = LedgerEntry.objects.filter(account=account).aggregate(
            balance=Coalesce(Sum("amount_micros"), 0),
            held=Coalesce(Sum("held_delta_micros"), 0),
        )
        drift = {
            field: [getattr(account, field), sums[key]]
            for field, key in (("balance_micros", "balance"), ("held_micros", "held"))
            if getattr(account, field) != sums[key]
        }
        if drift:
            CreditAccount.objects.filter(pk=account.pk).update(
                balance_micros=sums["balance"], held_micros=sums["held"]
            )
            audit_log_record(
                actor=None,
                actor_label="reconciliation",
                action="credits.drift_repaired",
                resource_type="team",
                resource_id=account.team.team_id,
                details=drift,
            )
            DRIFT_REPAIRED.inc()
    return {"account_id": account_id, "drift": drift}


def _unsettled_holds(cutoff: datetime) -> list[LedgerEntry]:
    settled = LedgerEntry.objects.filter(
        entry_type__in=[LedgerEntryType.CAPTURE, LedgerEntryType.RELEASE]
    ).values("request_id")
    return list(
        LedgerEntry.objects.filter(
            entry_type=LedgerEntryType.HOLD, created_at__lt=cutoff
        )
        .exclude(
            request_id__startswith="job:"
        )  # a job's credit settles when the job closes
        .exclude(request_id__in=settled)
        .order_by("id")
    )


def holds_settle_stale(*, older_than: timedelta, now: datetime) -> dict[str, int]:
    """Settle every hold older than ``older_than`` that nothing settled."""
    outcome = {"captured": 0, "released": 0}
    for hold in _unsettled_holds(now - older_than):
        with transaction.atomic():
            # Repair drift first, under the same lock, so that the rows written
            # below chain from the ledger's balance, not a drifted one.
            credit_account_reconcile(account_id=hold.account_id)
            account = CreditAccount.objects.select_for_update().get(pk=hold.account_id)
            # Under the lock: the call's own settlement may have come late.
            if LedgerEntry.objects.filter(
                request_id=hold.request_id,
                entry_type__in=[LedgerEntryType.CAPTURE, LedgerEntryType.RELEASE],
            ).exists():
                continue
            record = UsageRecord.objects.filter(request_id=hold.request_id).first()
            charge = record.credits_micros if record is not None else 0
            taken = _settle(
                account, request_id=hold.request_id, charge_micros=charge, job=hold.job
            )
            kind = "captured" if record is not None else "released"
            outcome[kind] += 1
            HOLDS_SETTLED.labels(outcome=kind).inc()
            audit_log_record(
                actor=None,
                actor_label="reconciliation",
                action=f"credits.hold_{kind}",
                resource_type="request",
                resource_id=hold.request_id,
                details={
                    "held_micros": hold.held_delta_micros,
                    "charged_micros": taken,
                },
            )
    return outcome
