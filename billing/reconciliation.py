"""Credit reconciliation: the ledger is the truth.

``credit_account_reconcile`` recomputes an account from its ledger and repairs
drift (an audit entry and a metric). ``holds_settle_stale`` settles holds that
no settlement followed (a process died mid-call): captured when the request
has a usage record, released otherwise — exactly once, through the same
idempotency keys as the request path. The settlement journal is replayed
first, so a call that delivered output is captured, not released. One hold or account that cannot be
settled (a corrupt ledger) is logged and counted; it never stops the others.
"""

import logging
from datetime import datetime, timedelta
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.db import transaction
from django.db.models import Exists, OuterRef, QuerySet, Sum
from django.db.models.functions import Coalesce
from prometheus_client import Counter

from accounts.services import audit_log_record
from billing.journal import journal_calls, journal_replay
from billing.models import CreditAccount, LedgerEntry, LedgerEntryType, UsageRecord
from billing.services import _settle
from gateway_project.metrics import BACKGROUND_FAILURES

logger = logging.getLogger(__name__)

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


_SETTLEMENTS = (LedgerEntryType.CAPTURE, LedgerEntryType.RELEASE)


def _settlements(*, account_id: Any, request_id: Any) -> QuerySet[LedgerEntry]:
    """The capture and release rows of a request in one account: a request id
    is looked up within the hold's account and team, never across them."""
    return LedgerEntry.objects.filter(
        account_id=account_id, request_id=request_id, entry_type__in=_SETTLEMENTS
    )


def _unsettled_holds(cutoff: datetime) -> list[LedgerEntry]:
    settled = _settlements(
        account_id=OuterRef("account_id"), request_id=OuterRef("request_id")
    )
    return list(
        LedgerEntry.objects.filter(
            ~Exists(settled), entry_type=LedgerEntryType.HOLD, created_at__lt=cutoff
        )
        # A job's credit settles when the job closes or expires (billing/jobs.py).
        .exclude(request_id__startswith="job:")
        .order_by("id")
    )


def hold_settle(*, hold: LedgerEntry) -> str | None:
    """Settle one stale hold in one transaction, after repairing its account's
    drift: captured when its team has a usage record of the request, released
    otherwise; audited. Returns "captured" or "released", or None when its
    settlement came meanwhile. Raises (nothing written) when the account
    cannot take it, e.g. IntegrityError from a corrupt ledger whose held sum
    would go below zero, or RuntimeError when the request's settlement keys
    belong to another account."""
    with transaction.atomic():
        # Repair drift first, under the same lock, so that the rows written
        # below chain from the ledger's balance, not a drifted one.
        credit_account_reconcile(account_id=hold.account_id)
        account = CreditAccount.objects.select_for_update().get(pk=hold.account_id)
        # Under the lock: the call's own settlement may have come late.
        if _settlements(account_id=account.pk, request_id=hold.request_id).exists():
            return None
        record = UsageRecord.objects.filter(
            team_id=account.team_id, request_id=hold.request_id
        ).first()
        charge = record.credits_micros if record is not None else 0
        taken = _settle(
            account,
            request_id=hold.request_id,
            charge_micros=charge,
            job_id=hold.job_id,
        )
        # The idempotency keys are global: another account's rows under this
        # request's keys would make _settle write nothing, silently.
        if not _settlements(account_id=account.pk, request_id=hold.request_id).exists():
            raise RuntimeError(
                f"the capture or release key of request {hold.request_id} is "
                "taken by another account"
            )
        kind = "captured" if record is not None else "released"
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
    HOLDS_SETTLED.labels(outcome=kind).inc()
    return kind


def holds_settle_stale(*, older_than: timedelta, now: datetime) -> dict[str, int]:
    """Replay the settlement journal, then settle every hold older than
    ``older_than`` that nothing settled, each in its own transaction
    (``hold_settle``). A hold that fails is logged with
    its id and counted, and the others are still settled; the next run tries
    it again."""
    # What the settlement journal knows comes first: settlements the
    # database could not take, and streams whose process died mid-way, are
    # applied (captured with their record) before any hold is called stale;
    # a hold named in a live process's journal is left to that process.
    outcome = {"captured": 0, "released": 0, "failed": 0, "journaled": 0}
    try:
        replayed = journal_replay()
        journaled = journal_calls()
    except SoftTimeLimitExceeded:
        raise
    except Exception:
        # Not knowing what the journal holds, no hold may be called stale.
        logger.exception("the settlement journal could not be read: no hold settled")
        BACKGROUND_FAILURES.labels(work="journal_replay").inc()
        return {**outcome, "failed": 1, "replayed": 0}
    outcome["failed"] = replayed["failed"]
    outcome["replayed"] = replayed["applied"]
    for hold in _unsettled_holds(now - older_than):
        if hold.request_id in journaled:
            outcome["journaled"] += 1
            continue
        try:
            kind = hold_settle(hold=hold)
        except SoftTimeLimitExceeded:
            raise  # the task's time is up: stop, not the hold's fault
        except Exception:
            logger.exception(
                "stale hold %s (account %s, request %s) could not be settled",
                hold.pk,
                hold.account_id,
                hold.request_id,
            )
            outcome["failed"] += 1
            BACKGROUND_FAILURES.labels(work="holds_settle_stale").inc()
            continue
        if kind is not None:
            outcome[kind] += 1
    return outcome
