"""Reads of the billing app."""

from datetime import datetime

from django.db.models import QuerySet

from billing.models import CreditAccount, LedgerEntry, ModelPrice
from tenants.models import Team


def credit_account_for(*, team: Team) -> CreditAccount:
    """The team's account; an empty one if it has none yet (never written here)."""
    return CreditAccount.objects.filter(team=team).first() or CreditAccount(team=team)


def ledger_entries(*, team: Team, limit: int) -> QuerySet[LedgerEntry]:
    return LedgerEntry.objects.filter(account__team=team).order_by("-id")[:limit]


def model_price_at(*, model: str, at: datetime) -> ModelPrice | None:
    """The operator's price for a model in force at a moment, if any."""
    return (
        ModelPrice.objects.filter(model=model, effective_from__lte=at)
        .order_by("-effective_from")
        .first()
    )
