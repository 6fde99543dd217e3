"""Reconcile credit accounts, settle stale holds and expire jobs now, by hand
(incidents)."""

import logging
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from billing.jobs import jobs_expire
from billing.models import CreditAccount
from billing.reconciliation import credit_account_reconcile, holds_settle_stale
from gateway_project.metrics import BACKGROUND_FAILURES

logger = logging.getLogger(__name__)


class Command(BaseCommand):
    help = (
        "Recompute every credit account from its ledger (repairing and auditing "
        "drift), then settle holds older than --hold-age seconds that nothing "
        "settled: captured when the call has a usage record, released otherwise. "
        "Then close as expired the jobs open longer than GATEWAY_JOB_TTL_SECONDS, "
        "as the jobs_expire task does. An account, hold or job that fails is "
        "logged and the others go on; the command then exits with an error."
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
        repaired = failed = 0
        for account_id in ids:
            try:
                result = credit_account_reconcile(account_id=account_id)
            except Exception:
                logger.exception(
                    "credit account %s could not be reconciled", account_id
                )
                BACKGROUND_FAILURES.labels(work="credit_account_reconcile").inc()
                failed += 1
                continue
            if result["drift"]:
                repaired += 1
                self.stdout.write(f"account {account_id}: repaired {result['drift']}")
        now = timezone.now()
        settled = holds_settle_stale(
            older_than=timedelta(seconds=options["hold_age"]), now=now
        )
        expired = jobs_expire(now=now)
        self.stdout.write(
            f"{len(ids)} accounts checked, {repaired} repaired; "
            f"journal: {settled['replayed']} settlements applied, "
            f"{settled['journaled']} holds left to it; stale holds: "
            f"{settled['captured']} captured, {settled['released']} released; "
            f"expired jobs: {expired['captured']} captured, "
            f"{expired['released']} released, {expired['nothing_held']} with nothing held"
        )
        if failed or settled["failed"] or expired["failed"]:
            raise CommandError(
                f"failed (see the log): {failed} account(s), "
                f"{settled['failed']} stale hold(s), {expired['failed']} job(s)"
            )
