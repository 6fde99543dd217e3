"""Writes of the billing app: credit accounts and ledger movements."""

from collections.abc import Iterable
from typing import Any
from uuid import UUID

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from accounts.models import User
from accounts.services import audit_log_record
from billing import statements
from billing.budgets import budgets_settle
from billing.models import (
    JOB_CLOSED_STATUSES,
    CreditAccount,
    Job,
    JobStatus,
    LedgerEntry,
    LedgerEntryType,
    UsageRecord,
    UsageStatus,
)
from billing.settlement import Settlement
from gateway_project.errors import GatewayError
from gateway_project.money import MICROS, from_micros
from tenants.models import BudgetMode, Organization, Team, VirtualKey
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
        # The account row is locked so that concurrent movements serialize and
        # the before/after balances chain up exactly; a retry that waited on
        # the lock then sees the first attempt's entry.
        account = _locked_account(team)
        existing = LedgerEntry.objects.filter(idempotency_key=idempotency_key).first()
        if existing is not None:
            return existing
        entry = _entry(
            account,
            entry_type=entry_type,
            amount=amount_micros,
            held_delta=0,
            key=idempotency_key,
            reason=reason,
            actor=actor,
            actor_label=actor_label or (actor.email if actor else "system"),
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
        if created:
            _job_count(record)
    return record


def _job_count(record: UsageRecord) -> None:
    """Add a new usage record to its job's totals (same transaction)."""
    if record.job_id is None:
        return
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


def job_create(
    *,
    team: Team,
    job_type: str,
    user_id: str = "",
    metadata: dict[str, Any] | None = None,
    key: VirtualKey | None = None,
) -> Job:
    """Open a job for a team (seed 000). A job_based team holds its one credit
    now: InsufficientCredits (402) and nothing written when it has none."""
    with transaction.atomic():
        job = Job.objects.create(
            team=team,
            virtual_key=key,
            job_type=job_type,
            user_id=user_id,
            metadata=metadata or {},
        )
        if team.budget_mode == BudgetMode.JOB_BASED:
            credits_hold(
                team=team, amount_micros=MICROS, request_id=f"job:{job.job_id}", job=job
            )
    return job


def job_complete(
    *,
    job: Job,
    status: str,
    metadata: dict[str, Any] | None = None,
    error_message: str = "",
) -> Job:
    """Close a job as completed or failed. A job_based team's held credit is
    captured for a completed job and released for a failed one. Raises
    GatewayError (409 job_closed) if the job is already closed (completed,
    failed or expired)."""
    with transaction.atomic():
        account = _locked_account(job.team)
        job = Job.objects.select_for_update().get(pk=job.pk)
        if job.status in JOB_CLOSED_STATUSES:
            raise GatewayError(
                f"Job is already {job.status}", code="job_closed", http_status=409
            )
        job.status = status
        job.completed_at = timezone.now()
        job.error_message = error_message
        if metadata:
            job.metadata = {**job.metadata, **metadata}
        charge = (
            MICROS
            if status == JobStatus.COMPLETED
            and job.team.budget_mode == BudgetMode.JOB_BASED
            else 0
        )
        job.credits_charged_micros += _settle(
            account,
            request_id=f"job:{job.job_id}",
            charge_micros=charge,
            job_id=job.pk,
        )
        job.save(
            update_fields=[
                "status",
                "completed_at",
                "error_message",
                "metadata",
                "credits_charged_micros",
            ]
        )
    return job


# --- holds and settlement on the request path -----------------------------------------


class InsufficientCredits(GatewayError):
    http_status = 402
    code = "insufficient_credits"


_ADDITIONS = {
    LedgerEntryType.ALLOCATION,
    LedgerEntryType.TOP_UP,
    LedgerEntryType.REFILL,
    LedgerEntryType.REFUND,
}


def _entry(
    account: CreditAccount,
    *,
    entry_type: str,
    amount: int,
    held_delta: int,
    key: str,
    request_id: str = "",
    job_id: UUID | None = None,
    reason: str = "",
    actor: User | None = None,
    actor_label: str = "gateway",
) -> LedgerEntry:
    """Append one movement to a locked account and apply it with F(): the
    one place ledger rows are written."""
    entry = LedgerEntry.objects.create(
        account=account,
        entry_type=entry_type,
        amount_micros=amount,
        held_delta_micros=held_delta,
        balance_before_micros=account.balance_micros,
        balance_after_micros=account.balance_micros + amount,
        idempotency_key=key,
        request_id=request_id,
        job_id=job_id,
        reason=reason,
        actor=actor,
        actor_label=actor_label,
    )
    # A capture uses what it takes from the hold plus what it takes from the balance.
    used = -(amount + held_delta) if entry_type == LedgerEntryType.CAPTURE else 0
    # Money put in (allocations, top-ups, refills, refunds) counts as allocated.
    added = amount if entry_type in _ADDITIONS else 0
    CreditAccount.objects.filter(pk=account.pk).update(
        balance_micros=F("balance_micros") + amount,
        held_micros=F("held_micros") + held_delta,
        used_total_micros=F("used_total_micros") + used,
        allocated_total_micros=F("allocated_total_micros") + added,
    )
    account.balance_micros += amount
    account.held_micros += held_delta
    return entry


def _locked_account(team: Team | int) -> CreditAccount:
    """The team's credit account (opened if missing), locked."""
    team_id = team if isinstance(team, int) else team.pk
    try:
        return CreditAccount.objects.select_for_update().get(team_id=team_id)
    except CreditAccount.DoesNotExist:
        CreditAccount.objects.get_or_create(team_id=team_id)
        return CreditAccount.objects.select_for_update().get(team_id=team_id)


# The most a hold may be: far below what the ledger's columns can add up.
_MOST_HELD = 2**62


def credits_hold(
    *, team: Team | int, amount_micros: int, request_id: str, job: Job | None = None
) -> int:
    """Reserve credits before a provider call; idempotent by request id
    within the team's account.

    Raises InsufficientCredits (402) when the balance plus the overdraft limit
    does not cover it; nothing is written then. Returns the amount held.
    """
    team_id = team if isinstance(team, int) else team.pk
    job_id = job.pk if job is not None else None
    if amount_micros <= 0:
        return 0
    if amount_micros > _MOST_HELD:
        raise InsufficientCredits(
            f"Not enough credits: this call may cost {from_micros(amount_micros)} credits"
        )
    if statements.available() and statements.credits_hold_statement(
        team_id=team_id,
        amount_micros=amount_micros,
        request_id=request_id,
        job_id=job_id,
    ):
        return amount_micros
    with transaction.atomic():
        account = _locked_account(team_id)
        key = f"hold:{request_id}"
        existing = LedgerEntry.objects.filter(
            account=account, idempotency_key=key
        ).first()
        if existing is not None:
            return existing.held_delta_micros
        available = account.balance_micros + account.overdraft_limit_micros
        if amount_micros > available:
            # What this process saw of the team's credits is out of date: its
            # next calls hold first (credits_hold_may_wait) until a hold or a
            # settlement tells it again.
            statements.available_forget(team_id)
            raise InsufficientCredits(
                f"Not enough credits: this call may cost {from_micros(amount_micros)} "
                f"credits and {from_micros(max(available, 0))} are available"
            )
        _entry(
            account,
            entry_type=LedgerEntryType.HOLD,
            amount=-amount_micros,
            held_delta=amount_micros,
            key=key,
            request_id=request_id,
            job_id=job_id,
        )
    return amount_micros


def _settle(
    account: CreditAccount,
    *,
    request_id: str,
    charge_micros: int,
    job_id: UUID | None = None,
) -> int:
    """Capture ``charge_micros`` of a request's hold and release the rest.

    Returns what was captured. A charge above the hold (a provider that
    overran), or after the hold was released, is taken from the balance down
    to the overdraft floor, never below; the shortfall is reported in the
    capture's reason. Rows of the request in this account only: another
    account's are never touched.
    """
    # The request's hold, capture and release rows, in one read.
    entries = dict(
        LedgerEntry.objects.filter(
            account=account,
            idempotency_key__in=[
                f"hold:{request_id}",
                f"capture:{request_id}",
                f"release:{request_id}",
            ],
        ).values_list("idempotency_key", "held_delta_micros")
    )
    if f"capture:{request_id}" in entries:
        return 0  # already settled
    held = entries.get(f"hold:{request_id}", 0)
    reason = ""
    if f"release:{request_id}" in entries:
        # The hold went back already: reconciliation took the call for dead
        # (it outlived GATEWAY_STALE_HOLD_SECONDS), or it failed. What it
        # costs now comes from the balance, as a charge above a hold does.
        held = 0
        reason = "captured after its hold was released"
    captured = min(charge_micros, held)
    extra = charge_micros - captured
    if extra > 0:
        floor = -account.overdraft_limit_micros
        extra = max(0, min(extra, account.balance_micros - floor))
    if captured + extra < charge_micros:
        shortfall = charge_micros - captured - extra
        reason = " ".join(
            filter(
                None,
                [reason, f"uncollected {shortfall} micro-credits (balance exhausted)"],
            )
        )
    if captured or extra:
        _entry(
            account,
            entry_type=LedgerEntryType.CAPTURE,
            amount=-extra,
            held_delta=-captured,
            key=f"capture:{request_id}",
            request_id=request_id,
            job_id=job_id,
            reason=reason,
        )
    if held - captured > 0:
        _entry(
            account,
            entry_type=LedgerEntryType.RELEASE,
            amount=held - captured,
            held_delta=-(held - captured),
            key=f"release:{request_id}",
            request_id=request_id,
            job_id=job_id,
        )
    return captured + extra


def credits_hold_may_wait(*, team: Team, amount_micros: int, margin: int) -> bool:
    """Whether a call's hold may be written with its settlement instead of
    before the provider is called (``Settlement.unheld_micros``): on
    PostgreSQL, when this process saw the team's available credits within the
    last seconds at ``margin`` times the amount or more. The settlement still
    holds under the same guard, and a 402 then writes nothing; what waiting
    risks is a provider call that is not charged, and only when the credits
    fell by all that margin meanwhile."""
    if margin <= 0 or amount_micros <= 0 or not statements.available():
        return False
    seen = statements.available_recall(team.pk)
    return seen is not None and seen >= amount_micros * margin


def call_settle(settlement: Settlement) -> UsageRecord:
    """The end of a call, in one short transaction: its usage record, the
    capture of what it cost and the release of the rest of its hold, its
    budgets corrected. Idempotent by the call's id: a second settlement
    changes nothing and returns the first record.

    The common case (no job, no key budget, a charge within the hold) runs
    as one statement on PostgreSQL (statements.py). A hold left to the
    settlement (``unheld_micros``) is written now, under the hold's guard:
    raises InsufficientCredits (402), with nothing written, when the credits
    no longer cover it."""
    s = settlement
    if s.budget_reserved_micros is None and s.job_id is None and statements.available():
        record: UsageRecord | None = None
        if s.unheld_micros is not None:
            record = statements.call_settle_unheld_statement(
                team_id=s.team_id,
                hold_micros=s.unheld_micros,
                charge_micros=s.charge_micros,
                record=s.record(credits_micros=s.charge_micros),
            )
        elif s.held_micros is not None:
            record = statements.call_settle_statement(
                team_id=s.team_id,
                held_micros=s.held_micros,
                charge_micros=s.charge_micros,
                record=s.record(credits_micros=s.charge_micros),
            )
        if record is not None:
            return record
    with transaction.atomic():
        if s.unheld_micros is not None:
            credits_hold(
                team=s.team_id, amount_micros=s.unheld_micros, request_id=s.call_id
            )
        account = _locked_account(s.team_id)
        existing = UsageRecord.objects.filter(
            request_id=s.call_id, team_id=s.team_id
        ).first()
        if existing is not None:
            return existing
        charged = _settle(
            account,
            request_id=s.call_id,
            charge_micros=s.charge_micros,
            job_id=s.job_id,
        )
        # The account lock serializes settlements of a call, and the record
        # was not there under it: a plain insert (the unique id still guards it).
        record = s.record(credits_micros=charged)
        record.save(force_insert=True)
        _job_count(record)
        if s.budget_reserved_micros is not None and s.virtual_key_id is not None:
            budgets_settle(
                key=VirtualKey.objects.select_related("team__organization").get(
                    pk=s.virtual_key_id
                ),
                reserved_micros=s.budget_reserved_micros,
                cost_micros=s.cost_micros,
                succeeded=s.succeeded,
            )
        if s.job_id is not None and charged:
            Job.objects.filter(pk=s.job_id).update(
                credits_charged_micros=F("credits_charged_micros") + charged
            )
    return record
