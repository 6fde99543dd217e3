"""Writes of the billing app: credit accounts and ledger movements."""

from collections.abc import Iterable
from typing import Any

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from accounts.models import User
from accounts.services import audit_log_record
from billing.models import (
    CreditAccount,
    Job,
    JobStatus,
    LedgerEntry,
    LedgerEntryType,
    UsageRecord,
    UsageStatus,
)
from gateway_project.errors import GatewayError
from tenants.models import Organization, Team, VirtualKey
from tenants.services import limits_within, team_create, virtual_key_issue


def credit_account_open(*, team: Team) -> CreditAccount:
    """The team's credit account, created empty when missing."""
    account, _ = CreditAccount.objects.get_or_create(team=team)
    return account


def credits_allocate(
    *,
    team: Team,
    amount_micros: int,
    idempotency_key: str,
    reason: str = "",
    entry_type: str = LedgerEntryType.ALLOCATION,
    actor: User | None = None,
    actor_label: str = "",
) -> LedgerEntry:
    """Add credits to a team's account; a retry with the same key is a no-op.

    Returns the ledger entry (the existing one on a retry). Raises ValueError
    for a non-positive amount.
    """
    if amount_micros <= 0:
        raise ValueError("amount_micros must be positive")
    with transaction.atomic():
        credit_account_open(team=team)
        # Lock the account row so that concurrent movements serialize and the
        # before/after balances of the ledger chain up exactly; a retry that
        # waited on the lock then sees the first attempt's entry.
        account = CreditAccount.objects.select_for_update().get(team=team)
        existing = LedgerEntry.objects.filter(idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing
        entry = LedgerEntry.objects.create(
            account=account,
            entry_type=entry_type,
            amount_micros=amount_micros,
            balance_before_micros=account.balance_micros,
            balance_after_micros=account.balance_micros + amount_micros,
            idempotency_key=idempotency_key,
            reason=reason,
            actor=actor,
            actor_label=actor_label or (actor.email if actor else "system"),
        )
        CreditAccount.objects.filter(pk=account.pk).update(
            balance_micros=F("balance_micros") + amount_micros,
            allocated_total_micros=F("allocated_total_micros") + amount_micros,
        )
        audit_log_record(
            actor=actor,
            actor_label=actor_label,
            action="credits.add",
            resource_type="team",
            resource_id=team.team_id,
            details={
                "amount_micros": amount_micros,
                "reason": reason,
                "entry_type": entry_type,
            },
        )
    return entry


def team_open(
    *,
    organization: Organization,
    team_id: str,
    credits_allocated_micros: int,
    team_alias: str = "",
    model_groups: Iterable[Any] = (),
    metadata: dict[str, Any] | None = None,
    actor: User | None = None,
    actor_label: str = "",
    **settings: Any,
) -> tuple[Team, VirtualKey, str]:
    """Seed 000's team creation: the team, its credit account with the initial
    allocation, and its first key — all or nothing.

    Returns (team, key, key plaintext shown once). Raises AlreadyExists for a
    taken id and GatewayError for limits above the organization's.
    """
    if credits_allocated_micros < 0:
        raise GatewayError(
            "credits_allocated must not be negative", param="credits_allocated"
        )
    limits_within(child=settings, parent=organization, parent_name="organization")
    with transaction.atomic():
        team = team_create(
            organization=organization,
            team_id=team_id,
            team_alias=team_alias,
            model_groups=model_groups,
            metadata=metadata,
            actor=actor,
            actor_label=actor_label,
            **settings,
        )
        credit_account_open(team=team)
        if credits_allocated_micros:
            credits_allocate(
                team=team,
                amount_micros=credits_allocated_micros,
                idempotency_key=f"team:{team.pk}:initial-allocation",
                reason="Initial allocation",
                actor=actor,
                actor_label=actor_label,
            )
        key, plaintext = virtual_key_issue(
            team=team, alias="default", actor=actor, actor_label=actor_label
        )
    return team, key, plaintext


def credit_account_update(
    *,
    team: Team,
    changes: dict[str, Any],
    actor: User | None = None,
    actor_label: str = "",
) -> CreditAccount:
    """Change the overdraft limit or the auto-refill amount and period."""
    allowed = {
        "overdraft_limit_micros",
        "auto_refill_amount_micros",
        "auto_refill_period",
    }
    unknown = set(changes) - allowed
    if unknown:
        raise GatewayError(
            f"Unknown field: {sorted(unknown)[0]}", param=sorted(unknown)[0]
        )
    with transaction.atomic():
        credit_account_open(team=team)
        account = CreditAccount.objects.select_for_update().get(team=team)
        recorded = {
            field: [getattr(account, field), value]
            for field, value in changes.items()
            if getattr(account, field) != value
        }
        if recorded:
            CreditAccount.objects.filter(pk=account.pk).update(**changes)
            audit_log_record(
                actor=actor,
                actor_label=actor_label,
                action="credits.settings",
                resource_type="team",
                resource_id=team.team_id,
                details=recorded,
            )
        account.refresh_from_db()
    return account


def usage_cost_micros(
    *,
    prompt_tokens: int,
    completion_tokens: int,
    input_price: int,
    output_price: int,
    markup_bps: int = 0,
) -> int:
    """Cost in micro-USD: prices are micro-USD per million tokens; one rounding,
    half up, at the end."""
    numerator = (prompt_tokens * input_price + completion_tokens * output_price) * (
        10_000 + markup_bps
    )
    denominator = 1_000_000 * 10_000
    return (2 * numerator + denominator) // (2 * denominator)


def usage_record_create(*, request_id: str, **fields: Any) -> UsageRecord:
    """The one usage record of a request; a second call for the same request id
    returns the first record unchanged (settlement is idempotent). A call
    attached to a job adds to the job's totals in the same transaction."""
    fields.setdefault(
        "total_tokens",
        fields.get("prompt_tokens", 0) + fields.get("completion_tokens", 0),
    )
    with transaction.atomic():
        record, created = UsageRecord.objects.get_or_create(
            request_id=request_id, defaults=fields
        )
        if created and record.job_id is not None:
            success = record.status != UsageStatus.ERROR
            Job.objects.filter(pk=record.job_id).update(
                total_calls=F("total_calls") + 1,
                successful_calls=F("successful_calls") + int(success),
                failed_calls=F("failed_calls") + int(not success),
                total_tokens=F("total_tokens") + record.total_tokens,
                total_cost_micros=F("total_cost_micros") + record.cost_micros,
            )
            Job.objects.filter(pk=record.job_id, status=JobStatus.PENDING).update(
                status=JobStatus.IN_PROGRESS, started_at=record.created_at
            )
    return record


def job_create(
    *,
    team: Team,
    job_type: str,
    user_id: str = "",
    metadata: dict[str, Any] | None = None,
    key: VirtualKey | None = None,
) -> Job:
    """Open a job for a team (seed 000)."""
    return Job.objects.create(
        team=team,
        virtual_key=key,
        job_type=job_type,
        user_id=user_id,
        metadata=metadata or {},
    )


def job_complete(
    *,
    job: Job,
    status: str,
    metadata: dict[str, Any] | None = None,
    error_message: str = "",
) -> Job:
    """Close a job as completed or failed. Raises GatewayError if it is closed.

    Charging job_based teams 1 credit per completed job comes with the money
    issue, here.
    """
    with transaction.atomic():
        job = Job.objects.select_for_update().get(pk=job.pk)
        if job.status in (JobStatus.COMPLETED, JobStatus.FAILED):
            raise GatewayError(
                f"Job is already {job.status}", code="job_closed", http_status=409
            )
        job.status = status
        job.completed_at = timezone.now()
        job.error_message = error_message
        if metadata:
            job.metadata = {**job.metadata, **metadata}
        job.save(update_fields=["status", "completed_at", "error_message", "metadata"])
    return job
