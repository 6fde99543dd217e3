"""Run key sync now, by hand (incidents): expiry, cache, last_used."""

from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from tenants.key_cache import key_cache_invalidate, virtual_keys_sync


class Command(BaseCommand):
    help = (
        "Mark keys past their expiry as expired, make every instance reload keys "
        "from the database when anything changed (always, with --invalidate), "
        "and write the last_used stamps collected in Redis to the database."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument(
            "--invalidate",
            action="store_true",
            help="Drop every cached key entry, changed or not.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["invalidate"]:
            key_cache_invalidate()
        result = virtual_keys_sync(now=timezone.now())
        self.stdout.write(
            f"{result['expired']} key(s) marked expired; cache "
            f"{'invalidated' if result['invalidated'] or options['invalidate'] else 'unchanged'}; "
            f"last_used flushed for {result['last_used_flushed']} key(s)"
        )
        if result["last_used_failed"]:
            raise CommandError(
                f"{result['last_used_failed']} last_used stamp(s) failed (see the log)"
            )
