"""A demo tenant that answers without any provider account (idempotent)."""

import os
from datetime import UTC, datetime
from typing import Any

from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from billing.models import ModelPrice, PriceSource
from billing.services import credit_account_open, credits_allocate
from gateway_project.crypto import derived_secret
from gateway_project.money import MICROS
from routing.models import Deployment, ModelGroup
from routing.services import deployment_create, model_group_create
from tenants.keys import key_generate
from tenants.models import Organization, Team, VirtualKey
from tenants.services import organization_create, team_create, virtual_key_issue

DEMO_ORGANIZATION = "demo-org"
DEMO_TEAM = "demo-team"
DEMO_GROUP = "demo"
DEMO_DEPLOYMENT = "demo-mock"
DEMO_CREDITS = 1000
ACTOR = "seed_demo"
DEMO_OWNER_EMAIL = "owner@example.com"
DEMO_PRICE_SINCE = datetime(2020, 1, 1, tzinfo=UTC)


class Command(BaseCommand):
    help = (
        "Seed a demo: owner (as setup_gateway), organization 'demo-org', team "
        "'demo-team' with 1000 credits, model group 'demo' served by litellm's "
        "mock_response (no provider account), and one key. Running it again "
        "changes nothing and prints the same key."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--email", default=None)
        parser.add_argument("--password", default=None)

    def handle(self, *args: Any, **options: Any) -> None:
        owner_options = {
            "email": options["email"]
            or os.environ.get("GATEWAY_OWNER_EMAIL")
            or DEMO_OWNER_EMAIL
        }
        if options["password"]:
            owner_options["password"] = options["password"]
        call_command("setup_gateway", stdout=self.stdout, **owner_options)
        with transaction.atomic():
            key_plaintext = self._seed()
        self.stdout.write(f"Demo organization: {DEMO_ORGANIZATION}, team: {DEMO_TEAM}")
        self.stdout.write(f"Demo model group: {DEMO_GROUP}")
        self.stdout.write(f"Demo key: {key_plaintext}")

    def _seed(self) -> str:
        deployment = Deployment.objects.filter(name=DEMO_DEPLOYMENT).first()
        if deployment is None:
            deployment = deployment_create(
                name=DEMO_DEPLOYMENT,
                model="openai/demo-mock",
                litellm_params={
                    "mock_response": "Hello from the gateway's demo model group."
                },
                actor_label=ACTOR,
            )
        # An explicit operator price: the demo model is in no price map, and
        # an unpriced model is never routed to.
        ModelPrice.objects.get_or_create(
            model=deployment.model,
            effective_from=DEMO_PRICE_SINCE,
            defaults={
                "input_price_per_million_micros": 500_000,  # $0.50 per 1M tokens
                "output_price_per_million_micros": 1_500_000,  # $1.50 per 1M tokens
                "source": PriceSource.OPERATOR,
                "note": "demo",
            },
        )
        group = ModelGroup.objects.filter(group_name=DEMO_GROUP).first()
        if group is None:
            group = model_group_create(
                group_name=DEMO_GROUP,
                members=[(deployment, 0)],
                display_name="Demo (mock responses)",
                description="Answers with a fixed text; needs no provider account.",
                actor_label=ACTOR,
            )
        organization = Organization.objects.filter(
            organization_id=DEMO_ORGANIZATION
        ).first()
        if organization is None:
            organization = organization_create(
                organization_id=DEMO_ORGANIZATION,
                name="Demo Organization",
                actor_label=ACTOR,
            )
        team = Team.objects.filter(team_id=DEMO_TEAM).first()
        if team is None:
            team = team_create(
                organization=organization,
                team_id=DEMO_TEAM,
                team_alias="Demo Team",
                model_groups=[group],
                actor_label=ACTOR,
            )
        credit_account_open(team=team)
        credits_allocate(
            team=team,
            amount_micros=DEMO_CREDITS * MICROS,
            idempotency_key=f"seed_demo:{DEMO_TEAM}:allocation",
            reason="Demo allocation",
            actor_label=ACTOR,
        )
        # The demo key is derived from SECRET_KEY, so every run can print it
        # again while only its digest is stored.
        seed = derived_secret("seed-demo-key")
        expected = key_generate(seed=seed)
        if not VirtualKey.objects.filter(public_id=expected.public_id).exists():
            virtual_key_issue(team=team, alias="demo", seed=seed, actor_label=ACTOR)
        return expected.plaintext
