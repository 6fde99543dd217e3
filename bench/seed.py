"""Seed the gateway's database for the benchmark, through the project's services.

A deployment on the fake upstream (``openai/bench-model``) with an operator
price, a model group, an organization and a team billed by consumption (so
every call holds and captures credits) with rate limits set far above what
the benchmark reaches (so every call runs the limit script in Redis), plenty
of credits, and a key with its own limits. Prints one JSON line:
``{"key": ..., "model": ..., "team_id": ...}``.

    DATABASE_URL=... REDIS_URL=... SECRET_KEY=... \
        python -m bench.seed --upstream http://127.0.0.1:9000/v1
"""

import argparse
import json
import os
import uuid
from datetime import UTC, datetime
from typing import Any

GROUP = "bench"
DEPLOYMENT = "bench-upstream"
ORGANIZATION = "bench-org"
TEAM = "bench-team"
CREDITS = 1_000_000  # credits; 1 credit = 1,000,000 micro-credits
ACTOR = "bench"
# Far above anything a 10 s load level reaches, yet enforced.
TEAM_LIMITS: dict[str, Any] = {
    "rpm_limit": 2_000_000_000,
    "tpm_limit": 2_000_000_000,
    "max_parallel_requests": 100_000,
}
KEY_LIMITS: dict[str, Any] = {
    "rpm_limit": 1_000_000_000,
    "tpm_limit": 1_000_000_000,
    "max_parallel_requests": 10_000,
}


def seed(upstream: str) -> dict[str, str]:
    from django.db import transaction

    from billing.models import ModelPrice, PriceSource
    from billing.services import credit_account_open, credits_allocate
    from gateway_project.money import MICROS
    from routing.models import Deployment, ModelGroup
    from routing.services import deployment_create, model_group_create
    from tenants.models import BudgetMode, Organization, Team
    from tenants.services import organization_create, team_create, virtual_key_issue

    run = uuid.uuid4().hex[:8]
    with transaction.atomic():
        deployment = Deployment.objects.filter(name=DEPLOYMENT).first()
        if deployment is None:
            deployment = deployment_create(
                name=DEPLOYMENT,
                model="openai/bench-model",
                litellm_params={"api_base": upstream, "api_key": "x"},
                actor_label=ACTOR,
            )
        # The fake model is in no price map: an operator price, $1 / $2 per 1M.
        ModelPrice.objects.update_or_create(
            model=deployment.model,
            effective_from=datetime(2020, 1, 1, tzinfo=UTC),
            defaults={
                "input_price_per_million_micros": 1_000_000,
                "output_price_per_million_micros": 2_000_000,
                "source": PriceSource.OPERATOR,
                "note": "bench",
            },
        )
        group = ModelGroup.objects.filter(group_name=GROUP).first()
        if group is None:
            group = model_group_create(
                group_name=GROUP, members=[(deployment, 0)], actor_label=ACTOR
            )
        organization = Organization.objects.filter(organization_id=ORGANIZATION).first()
        if organization is None:
            organization = organization_create(
                organization_id=ORGANIZATION, name="Bench", actor_label=ACTOR
            )
        team = Team.objects.filter(team_id=TEAM).first()
        if team is None:
            team = team_create(
                organization=organization,
                team_id=TEAM,
                model_groups=[group],
                budget_mode=BudgetMode.CONSUMPTION_USD,
                actor_label=ACTOR,
                **TEAM_LIMITS,
            )
        credit_account_open(team=team)
        credits_allocate(
            team=team,
            amount_micros=CREDITS * MICROS,
            idempotency_key=f"bench:{run}:allocation",
            reason="bench",
            actor_label=ACTOR,
        )
        _, plaintext = virtual_key_issue(
            team=team, alias=f"bench-{run}", actor_label=ACTOR, **KEY_LIMITS
        )
    return {"key": plaintext, "model": GROUP, "team_id": TEAM}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True, help="base URL, ending in /v1")
    args = parser.parse_args()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")
    import django

    django.setup()
    print(json.dumps(seed(args.upstream)))


if __name__ == "__main__":
    main()
