"""Reads of the billing app."""

from django.db.models import QuerySet

from billing.models import CreditAccount, LedgerEntry
from tenants.models import Team


def credit_account_for(*, team: Team) -> CreditAccount:
    """The team's account; an empty one if it has none yet (never written here)."""
    return CreditAccount.objects.filter(team=team).first() or CreditAccount(team=team)


def ledger_entries(*, team: Team, limit: int) -> QuerySet[LedgerEntry]:
    return LedgerEntry.objects.filter(account__team=team).order_by("-id")[:limit]
