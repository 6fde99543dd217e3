"""Job expiry: a job that is never closed does not hold its credit forever.

``jobs_expire`` closes every job still open GATEWAY_JOB_TTL_SECONDS after it
was created, as ``expired``. A job_based team's held credit is captured when
the job recorded a successful call and released otherwise, through the same
idempotency keys as ``job_complete``, so that an expiry racing a completion
of the same job settles it once.
"""

import logging
import uuid
from datetime import datetime, timedelta
from typing import Literal

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction
from prometheus_client import Counter

from accounts.services import audit_log_record
from billing.models import JOB_OPEN_STATUSES, Job, JobStatus, LedgerEntry
from billing.services import _locked_account, _settle
from gateway_project.metrics import BACKGROUND_FAILURES
from gateway_project.money import MICROS
from tenants.models import BudgetMode

logger = logging.getLogger(__name__)

JOBS_EXPIRED = Counter(
    "gateway_jobs_expired_total",
    "Jobs closed as expired, by what happened to their held credit",
    ["outcome"],
)

JobOutcome = Literal["captured", "released", "nothing_held"]


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def job_expire(*, job_id: uuid.UUID, now: datetime) -> JobOutcome | None:
    """Close one open job as expired, in one transaction: its held credit is
    captured if it recorded a successful call and released otherwise (job_based
    teams); audited. Returns what happened to the credit, or None when the job
    was closed or deleted meanwhile (nothing written)."""
    ttl = settings.GATEWAY_JOB_TTL_SECONDS
    with transaction.atomic():
        found = Job.objects.select_related("team").filter(pk=job_id).first()
        if found is None:
            return None
        team = found.team
        # The account first, then the job: job_complete's order, so that an
        # expiry and a completion of the same job serialize without deadlock
        # and the second one sees the job closed.
        account = _locked_account(team)
        job = Job.objects.select_for_update().filter(pk=job_id).first()
        if job is None or job.status not in JOB_OPEN_STATUSES:
            return None
        request_id = f"job:{job.job_id}"
        held = LedgerEntry.objects.filter(
            account=account, idempotency_key=f"hold:{request_id}"
        ).exists()
        # The rule of job_complete for a completed job, when the job did some
        # work; a job that did none pays nothing.
        charge = (
            MICROS
            if job.successful_calls > 0 and team.budget_mode == BudgetMode.JOB_BASED
            else 0
        )
        taken = _settle(
            account, request_id=request_id, charge_micros=charge, job_id=job.pk
        )
        outcome: JobOutcome = (
            "captured" if taken else "released" if held else "nothing_held"
        )
        job.status = JobStatus.EXPIRED
        job.completed_at = now
        job.error_message = f"expired after {_duration(ttl)} without being closed"
        job.credits_charged_micros += taken
        job.save(
            update_fields=[
                "status",
                "completed_at",
                "error_message",
                "credits_charged_micros",
            ]
        )
        audit_log_record(
            actor=None,
            actor_label="job expiry",
            action="job.expired",
            resource_type="job",
            resource_id=str(job.job_id),
            details={
                "team_id": team.team_id,
                "created_at": job.created_at.isoformat(),
                "successful_calls": job.successful_calls,
                "credit": outcome,
                "charged_micros": taken,
            },
        )
    return outcome


def jobs_expire(*, now: datetime) -> dict[str, int]:
    """Close as expired every job open (pending or in progress) and created
    more than GATEWAY_JOB_TTL_SECONDS before ``now``, each in its own
    transaction (``job_expire``). A job that fails is logged and counted, and
    the others go on. Returns how many expired per credit outcome and how
    many failed; a second run writes nothing."""
    cutoff = now - timedelta(seconds=settings.GATEWAY_JOB_TTL_SECONDS)
    outcome = {"captured": 0, "released": 0, "nothing_held": 0, "failed": 0}
    job_ids = list(
        Job.objects.filter(status__in=JOB_OPEN_STATUSES, created_at__lt=cutoff)
        .order_by("created_at", "pk")
        .values_list("pk", flat=True)
    )
    for job_id in job_ids:
        try:
            result = job_expire(job_id=job_id, now=now)
        except SoftTimeLimitExceeded:
            raise  # the task's time is up: stop, not the row's fault
        except Exception:
            logger.exception("job %s could not be expired", job_id)
            outcome["failed"] += 1
            BACKGROUND_FAILURES.labels(work="jobs_expire").inc()
            continue
        if result is not None:
            outcome[result] += 1
            JOBS_EXPIRED.labels(outcome=result).inc()
    return outcome
