"""Roll up raw usage into hourly and daily rows now, by hand (incidents)."""

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from billing.models import RollupState
from billing.rollups import STATE_NAME, usage_roll_up


class Command(BaseCommand):
    help = (
        "Roll up the whole hours of raw usage after the watermark that ended "
        "more than GATEWAY_ROLLUP_GRACE_SECONDS ago (at most --max-hours), then "
        "recompute the UTC days they touched. Safe to run beside the beat task."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--max-hours",
            type=int,
            default=48,
            help="Roll up at most this many hours; run again to continue.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        done = usage_roll_up(now=timezone.now(), max_hours=options["max_hours"])
        until = (
            RollupState.objects.filter(name=STATE_NAME)
            .values_list("rolled_up_until", flat=True)
            .first()
        )
        self.stdout.write(
            f"{done['hours']} hours rolled up ({done['hour_rows']} rows), "
            f"{done['days']} days recomputed ({done['day_rows']} rows); "
            f"rolled up until {until.isoformat() if until else 'nothing yet'}"
        )
