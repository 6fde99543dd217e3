"""Reset budget and quota windows and run auto-refills now, by hand."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from billing.periods import budgets_reset, credit_accounts_refill


class Command(BaseCommand):
    help = (
        "Start the new budget and quota windows of organizations, teams and keys "
        "whose period has ended, then top up accounts configured for auto-refill "
        "(once per period: running it again changes nothing). A row that fails "
        "is logged and the others go on; the command then exits with an error."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        now = timezone.now()
        reset = budgets_reset(now=now)
        refilled = credit_accounts_refill(now=now)
        self.stdout.write(
            f"windows reset: {reset['organization']} organization(s), "
            f"{reset['team']} team(s), {reset['virtualkey']} key(s); auto-refill: "
            f"{refilled['refilled']} account(s) refilled, "
            f"{refilled['already_refilled']} already refilled this period"
        )
        if reset["failed"] or refilled["failed"]:
            raise CommandError(
                f"failed (see the log): {reset['failed']} budget window(s), "
                f"{refilled['failed']} auto-refill(s)"
            )
