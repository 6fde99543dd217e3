"""Import a LiteLLM proxy config.yaml (issue 8): idempotent, all or nothing."""

import os
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from gateway_project.errors import GatewayError
from routing.litellm_config import (
    LitellmConfigInvalid,
    litellm_config_import,
    litellm_config_parse,
    report_summary,
)

ACTOR = "import_litellm_config"


class Command(BaseCommand):
    help = (
        "Import a LiteLLM proxy config.yaml: each model_list entry becomes a "
        "deployment, each model_name a model group, each api_key an encrypted "
        "provider credential, model_info prices operator prices, and router "
        "fallbacks lower-priority members. os.environ/NAME is read from the "
        "environment. Running it again with the same file writes nothing."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("config", help="path of the LiteLLM config.yaml")
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="print what would be created and changed; write nothing",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        path = Path(options["config"])
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = getattr(error, "strerror", None) or "not UTF-8 text"
            raise CommandError(f"Cannot read {path}: {reason}") from None
        try:
            plan = litellm_config_parse(text=text, environ=os.environ)
        except LitellmConfigInvalid as error:
            raise CommandError(f"{path}: {error}") from None
        dry_run = bool(options["dry_run"])
        try:
            outcomes = litellm_config_import(
                plan=plan, dry_run=dry_run, actor_label=ACTOR
            )
        except GatewayError as error:  # e.g. another import created it meanwhile
            raise CommandError(f"{path}: nothing imported: {error.message}") from None
        for outcome in outcomes:
            self.stdout.write(outcome.line())
        self.stdout.write(report_summary(outcomes, dry_run=dry_run))
