"""The ledger invariant every test may assert at its end.

Each credit account's ``balance_micros`` and ``held_micros`` are the sums of the
matching columns of its ledger (billing/models.py, CreditAccount), and the
entries chain up: each one starts from the balance the previous one ended at.
Read with the ORM, so it also covers what a server process under test wrote to
the shared test database.
"""

from django.db.models import Count, Sum
from django.db.models.functions import Coalesce

from billing.models import CreditAccount, LedgerEntry


def assert_ledger_consistent() -> None:
    """Fail, naming every offending account, unless for each CreditAccount
    ``balance == Σ amount``, ``held == Σ held_delta`` and its entries (in id
    order, the order the account lock serialised them in) chain from 0."""
    problems: list[str] = []
    accounts = (
        CreditAccount.objects.select_related("team")
        .annotate(
            ledger_balance=Coalesce(Sum("entries__amount_micros"), 0),
            ledger_held=Coalesce(Sum("entries__held_delta_micros"), 0),
            ledger_count=Count("entries"),
        )
        .order_by("pk")
    )
    for account in accounts:
        name = f"account {account.pk} (team {account.team.team_id})"
        if account.balance_micros != account.ledger_balance:
            problems.append(
                f"{name}: balance_micros={account.balance_micros} but the ledger "
                f"sums to {account.ledger_balance} over {account.ledger_count} entries"
            )
        if account.held_micros != account.ledger_held:
            problems.append(
                f"{name}: held_micros={account.held_micros} but the ledger's "
                f"held deltas sum to {account.ledger_held}"
            )
        running = 0
        for entry in LedgerEntry.objects.filter(account=account).order_by("pk"):
            if entry.balance_before_micros != running:
                problems.append(
                    f"{name}: entry {entry.pk} ({entry.entry_type}) starts at "
                    f"{entry.balance_before_micros}, the previous one ended at {running}"
                )
            running = entry.balance_after_micros
    assert not problems, "ledger inconsistent:\n" + "\n".join(problems)
