"""Delete raw usage past retention now, by hand (incidents)."""

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand
from django.utils import timezone

from billing.rollups import usage_prune


class Command(BaseCommand):
    help = (
        "Delete raw usage records older than GATEWAY_USAGE_RETENTION_DAYS that "
        "are rolled up already, GATEWAY_RETENTION_BATCH_SIZE per transaction. "
        "Records not rolled up yet are kept: run roll_up_usage first."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        deleted = usage_prune(now=timezone.now())
        self.stdout.write(
            f"{deleted} usage records deleted: rolled up and past the "
            f"{settings.GATEWAY_USAGE_RETENTION_DAYS}-day retention"
        )
