"""First-run setup: the owner account, from flags or the environment."""

import os
import secrets
import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from accounts.services import owner_ensure
from gateway_project.errors import GatewayError


class Command(BaseCommand):
    help = (
        "Create the owner account (idempotent). Email and password come from "
        "--email/--password or GATEWAY_OWNER_EMAIL/GATEWAY_OWNER_PASSWORD; "
        "without a password one is generated and printed once."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--email", default=os.environ.get("GATEWAY_OWNER_EMAIL", "")
        )
        parser.add_argument(
            "--password", default=os.environ.get("GATEWAY_OWNER_PASSWORD", "")
        )
        parser.add_argument("--display-name", default="Owner")
        parser.add_argument(
            "--reset-password",
            action="store_true",
            help=(
                "Set the password of an existing account (generated if not "
                "given); refuses, creating nothing, when no account has the email."
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        email = options["email"].strip()
        if not email:
            if sys.stdin.isatty():
                email = input("Owner email: ").strip()
            if not email:
                raise CommandError("--email or GATEWAY_OWNER_EMAIL is required")
        password = options["password"]
        generated = not password
        if generated:
            password = secrets.token_urlsafe(18)
        try:
            user, created = owner_ensure(
                email=email,
                password=password,
                display_name=options["display_name"],
                reset_password=options["reset_password"],
            )
        except GatewayError as error:
            raise CommandError(error.message) from None
        if created or options["reset_password"]:
            verb = "created" if created else "password reset for"
            self.stdout.write(f"Owner {verb}: {user.email}")
            if generated:
                self.stdout.write(f"Generated password (shown once): {password}")
        else:
            self.stdout.write(f"Owner exists: {user.email} (password unchanged)")
