"""Shared fixtures. The suite runs against real PostgreSQL and Redis: `make test`
starts throwaway instances and exports DATABASE_URL and REDIS_URL."""

import os
from collections.abc import Iterator

import pytest
from django.conf import settings
from django.core.cache import cache
from django.test import Client

from accounts.models import Role, User
from billing.services import credit_account_open, credits_allocate
from gateway_project.money import MICROS
from routing.models import Deployment, ModelGroup
from routing.services import deployment_create, model_group_create
from tenants.models import Organization, Team
from tenants.services import organization_create, team_create

OWNER_PASSWORD = "Owner-Passw0rd!"


def pytest_configure(config: pytest.Config) -> None:
    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        raise pytest.UsageError(
            "The suite runs against PostgreSQL: use `make test`, or set "
            "DATABASE_URL and REDIS_URL yourself."
        )
    if not os.environ.get("REDIS_URL"):
        raise pytest.UsageError("REDIS_URL is not set: use `make test`.")


@pytest.fixture(autouse=True)
def _clear_cache() -> Iterator[None]:
    yield
    cache.clear()


@pytest.fixture
def owner(db: None) -> User:
    return User.objects.create_user(
        "owner@example.com", OWNER_PASSWORD, display_name="Owner", role=Role.OWNER
    )


@pytest.fixture
def owner_client(owner: User) -> Client:
    client = Client()
    client.force_login(owner)
    return client


@pytest.fixture
def deployment(db: None) -> Deployment:
    return deployment_create(
        name="mock-a", model="openai/mock-a", litellm_params={"mock_response": "hi"}
    )


@pytest.fixture
def model_group(deployment: Deployment) -> ModelGroup:
    return model_group_create(group_name="chat", members=[(deployment, 0)])


@pytest.fixture
def organization(db: None) -> Organization:
    return organization_create(organization_id="org_alice", name="Alice Inc")


@pytest.fixture
def team(organization: Organization, model_group: ModelGroup) -> Team:
    team = team_create(
        organization=organization, team_id="team_alice", model_groups=[model_group]
    )
    credit_account_open(team=team)
    credits_allocate(team=team, amount_micros=100 * MICROS, idempotency_key="t:alloc")
    return team
