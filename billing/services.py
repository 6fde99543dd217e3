"""Writes of the billing app: credit accounts and ledger movements."""

from django.db import transaction
from django.db.models import F

from accounts.models import User
from accounts.services import audit_log_record
from billing.models import CreditAccount, LedgerEntry, LedgerEntryType
from tenants.models import Team


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
