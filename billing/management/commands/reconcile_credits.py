"""Reconcile credit accounts and settle stale holds now, by hand (incidents)."""

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from billing.models import CreditAccount
from billing.reconciliation import credit_account_reconcile, holds_settle_stale


class Command(BaseCommand):
    help = (
        "Recompute every credit account from its ledger (repairing and auditing "
        "drift), then settle holds older than --hold-age seconds that nothing "
        "settled: captured when the call has a usage record, released otherwise."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--account", type=int, help="Only this account id.")
        parser.add_argument(
            "--hold-age",
            type=int,
            default=settings.GATEWAY_STALE_HOLD_SECONDS,
            help="Settle holds older than this many seconds.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        ids = (
            [options["account"]]
            if options["account"]
            else list(CreditAccount.objects.values_list("pk", flat=True))
        )
        repaired = [
            r
            for r in (credit_account_reconcile(account_id=i) for i in ids)
            if r["drift"]
        ]
        for result in repaired:
            self.stdout.write(
                f"account {result['account_id']}: repaired {result['drift']}"
            )
        settled = holds_settle_stale(
            older_than=timedelta(seconds=options["hold_age"]), now=timezone.now()
        )
        self.stdout.write(
            f"{len(ids)} accounts checked, {len(repaired)} repaired; stale holds: "
            f"{settled['captured']} captured, {settled['released']} released"
        )
