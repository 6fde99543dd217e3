"""Every actor by every management and tenant endpoint → one pinned status
(seed 001's way of testing; the admin-user endpoints have their own matrix in
accounts/tests/test_authorization_matrix.py).

Each test builds a fresh world through the services, so every allowed request
truly succeeds (200), and each refusal proves it wrote nothing: every row of
every model of accounts, tenants, billing and routing — M2M links included —
is the same before and after.
"""

import uuid

import pytest
from django.apps import apps
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, resolve

from accounts.models import Role, User
from accounts.tests.conftest import bearer, make_operator
from accounts.tests.test_authorization_matrix import ENDPOINTS as ACCOUNTS_ENDPOINTS
from billing.services import team_open
from gateway_project.money import MICROS
from routing.services import deployment_create, model_group_create
from routing.tests.test_jobs import ENDPOINTS as JOBS_ENDPOINTS
from tenants.models import Status, Team, VirtualKey
from tenants.services import organization_create, team_create, virtual_key_issue

ADMIN_KEY = "matrix-admin-key"
ACTORS = [
    "anonymous",
    "admin_key",
    "owner",
    "admin",
    "user",
    "key_a",
    "key_b",
    "bad_key",
]

#             anon akey owner admin user key_a key_b bad_key
READ = dict(zip(ACTORS, [401, 200, 200, 200, 200, 403, 403, 401], strict=True))
WRITE = dict(zip(ACTORS, [401, 200, 200, 200, 403, 403, 403, 401], strict=True))
TENANT = dict(zip(ACTORS, [401, 200, 200, 200, 200, 200, 403, 401], strict=True))

# The world: org_a ∋ team_a (group chat-a), org_b ∋ team_b (group chat-b),
# org_empty without teams, group spare used by nobody, team_paused (org_a,
# suspended) to resume; team_a's first key is key_a, its second {spare_key}.
MODELS = [{"model_name": "mock-a", "priority": 0}]

# (name, method, path, body, expected statuses); {key_a} and {spare_key} are
# key ids of team_a.
ENDPOINTS = [
    # organizations
    ("list organizations", "get", "/api/organizations", None, READ),
    ("get organization", "get", "/api/organizations/org_a", None, READ),
    (
        "create organization",
        "post",
        "/api/organizations/create",
        {"organization_id": "org_new", "name": "New Org"},
        WRITE,
    ),
    (
        "update organization",
        "patch",
        "/api/organizations/org_a",
        {"name": "Renamed"},
        WRITE,
    ),
    ("delete organization", "delete", "/api/organizations/org_empty", None, WRITE),
    # model groups
    ("list model groups", "get", "/api/model-groups", None, READ),
    ("get model group", "get", "/api/model-groups/chat-a", None, READ),
    (
        "create model group",
        "post",
        "/api/model-groups/create",
        {"group_name": "new-group", "models": MODELS},
        WRITE,
    ),
    (
        "update model group",
        "patch",
        "/api/model-groups/chat-a",
        {"display_name": "Renamed"},
        WRITE,
    ),
    ("delete model group", "delete", "/api/model-groups/spare", None, WRITE),
    (
        "replace models",
        "put",
        "/api/model-groups/chat-a/models",
        {"models": [{"model_name": "mock-b", "priority": 1}]},
        WRITE,
    ),
    # teams
    ("list teams", "get", "/api/teams", None, READ),
    ("get team", "get", "/api/teams/team_a", None, READ),
    (
        "create team",
        "post",
        "/api/teams/create",
        {
            "organization_id": "org_a",
            "team_id": "team_new",
            "model_groups": ["chat-a"],
            "credits_allocated": 10,
        },
        WRITE,
    ),
    ("update team", "patch", "/api/teams/team_a", {"team_alias": "Renamed"}, WRITE),
    ("delete team", "delete", "/api/teams/team_a", None, WRITE),
    ("suspend team", "post", "/api/teams/team_a/suspend", None, WRITE),
    ("resume team", "post", "/api/teams/team_paused/resume", None, WRITE),
    # keys
    ("list team keys", "get", "/api/teams/team_a/keys", None, READ),
    ("issue key", "post", "/api/teams/team_a/keys", {"alias": "issued"}, WRITE),
    ("get key", "get", "/api/keys/{key_a}", None, READ),
    (
        "rotate key",
        "post",
        "/api/keys/{spare_key}/rotate",
        {"grace_seconds": 60},
        WRITE,
    ),
    ("revoke key", "post", "/api/keys/{spare_key}/revoke", None, WRITE),
    # credits
    ("credit balance", "get", "/api/credits/teams/team_a/balance", None, TENANT),
    (
        "credit transactions",
        "get",
        "/api/credits/teams/team_a/transactions",
        None,
        TENANT,
    ),
    (
        "credit check",
        "post",
        "/api/credits/teams/team_a/check?credits_needed=1",
        None,
        TENANT,
    ),
    (
        "add credits",
        "post",
        "/api/credits/teams/team_a/add",
        {"credits": 5, "reason": "top-up"},
        WRITE,
    ),
    (
        "set budget mode",
        "put",
        "/api/credits/teams/team_a/budget-mode",
        {"budget_mode": "consumption_usd"},
        WRITE,
    ),
    (
        "set auto-refill",
        "put",
        "/api/credits/teams/team_a/auto-refill",
        {"amount": 10, "period": "monthly"},
        WRITE,
    ),
    # dashboard
    ("dashboard", "get", "/api/stats/dashboard", None, READ),
    # usage analytics: a team key reads its own team's only (key_b asks for team_a)
    ("usage summary", "get", "/api/usage/summary?team_id=team_a", None, TENANT),
    (
        "usage by model group",
        "get",
        "/api/usage/by-model-group?team_id=team_a",
        None,
        TENANT,
    ),
    (
        "usage by deployment",
        "get",
        "/api/usage/by-deployment?team_id=team_a",
        None,
        TENANT,
    ),
    ("usage by key", "get", "/api/usage/by-key?team_id=team_a", None, TENANT),
    (
        "usage series",
        "get",
        "/api/usage/series?team_id=team_a&granularity=day",
        None,
        TENANT,
    ),
    (
        "usage export",
        "get",
        "/api/usage/export.csv?team_id=team_a&report=by-key",
        None,
        TENANT,
    ),
]


def _world() -> dict[str, object]:
    mock_a = deployment_create(
        name="mock-a", model="openai/mock-a", litellm_params={"mock_response": "a"}
    )
    mock_b = deployment_create(
        name="mock-b", model="openai/mock-b", litellm_params={"mock_response": "b"}
    )
    chat_a = model_group_create(group_name="chat-a", members=[(mock_a, 0)])
    chat_b = model_group_create(group_name="chat-b", members=[(mock_b, 0)])
    model_group_create(group_name="spare", members=[(mock_a, 0)])
    org_a = organization_create(organization_id="org_a", name="Org A")
    org_b = organization_create(organization_id="org_b", name="Org B")
    organization_create(organization_id="org_empty", name="Empty Org")
    team_a, key_a, key_a_plain = team_open(
        organization=org_a,
        team_id="team_a",
        credits_allocated_micros=100 * MICROS,
        model_groups=[chat_a],
    )
    _, _, key_b_plain = team_open(
        organization=org_b,
        team_id="team_b",
        credits_allocated_micros=100 * MICROS,
        model_groups=[chat_b],
    )
    team_create(organization=org_a, team_id="team_paused", status=Status.SUSPENDED)
    spare_key, _ = virtual_key_issue(
        team=team_a, alias="spare", allowed_model_groups=[chat_a]
    )
    # Same shape as key_a's plaintext, one character off: parsed, then refused.
    bad_key = key_a_plain[:-1] + ("b" if key_a_plain[-1] == "a" else "a")
    return {
        "owner": make_operator("owner@example.com", Role.OWNER),
        "admin": make_operator("admin@example.com", Role.ADMIN),
        "user": make_operator("user@example.com", Role.USER),
        "key_a": key_a_plain,
        "key_b": key_b_plain,
        "bad_key": bad_key,
        "ids": {"key_a": key_a.public_id, "spare_key": spare_key.public_id},
    }


def _headers(actor: str, world: dict[str, object]) -> dict[str, str]:
    if actor == "anonymous":
        return {}
    if actor == "admin_key":
        return {"HTTP_X_ADMIN_KEY": ADMIN_KEY}
    credential = world[actor]
    if isinstance(credential, User):
        return bearer(credential)
    return {"HTTP_AUTHORIZATION": f"Bearer {credential}"}


SNAPSHOT_APPS = ("accounts", "tenants", "billing", "routing")


def _snapshot_models() -> list:
    """Every model of the four apps, M2M link tables included."""
    return [
        model
        for label in SNAPSHOT_APPS
        for model in apps.get_app_config(label).get_models(include_auto_created=True)
    ]


def _state() -> dict[str, list[tuple]]:
    return {
        model._meta.label: list(
            model._base_manager.order_by("pk").values_list(
                *(field.attname for field in model._meta.concrete_fields)
            )
        )
        for model in _snapshot_models()
    }


def test_snapshot_covers_the_m2m_links():
    models = _snapshot_models()
    assert Team.model_groups.through in models
    assert VirtualKey.allowed_model_groups.through in models


CASES = [
    pytest.param(
        name,
        method,
        path,
        body,
        actor,
        expected[actor],
        id=f"{name} as {actor}",
    )
    for name, method, path, body, expected in ENDPOINTS
    for actor in ACTORS
]


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "method", "path", "body", "actor", "status"), CASES)
def test_management_matrix(settings, name, method, path, body, actor, status):
    settings.GATEWAY_ADMIN_KEY = ADMIN_KEY
    world = _world()
    headers = _headers(actor, world)
    before = _state()
    client = Client()

    kwargs = (
        {"data": body, "content_type": "application/json"} if body is not None else {}
    )
    response = getattr(client, method)(path.format(**world["ids"]), **kwargs, **headers)

    assert response.status_code == status, response.content
    if status >= 400:
        assert set(response.json()["error"]) == {"message", "type", "code", "param"}
        assert _state() == before


HTTP_METHODS = ("get", "post", "put", "patch", "delete")


def _api_routes() -> set[tuple[str, str]]:
    """(route, method) of every view under api/, docs and schema aside."""
    found: set[tuple[str, str]] = set()

    def walk(patterns, prefix: str) -> None:
        for pattern in patterns:
            route = prefix + str(pattern.pattern)
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, route)
            elif isinstance(pattern, URLPattern) and _is_api(route):
                view_class = getattr(pattern.callback, "view_class", None)
                methods = getattr(pattern.callback, "http_methods", None)
                assert view_class or methods, f"{route} declares no methods"
                found.update(
                    (route, method)
                    for method in HTTP_METHODS
                    if (methods and method in methods) or hasattr(view_class, method)
                )

    walk(get_resolver().url_patterns, "")
    return found


def _is_api(route: str) -> bool:
    return route.startswith("api/") and not route.startswith(
        ("api/schema/", "api/docs/")
    )


def _covered() -> set[tuple[str, str]]:
    """(route, method) the two matrices request, resolved to their patterns."""
    placeholders = {
        "key_a": "key1",
        "spare_key": "key2",
        "victim": uuid.uuid4(),
        "job": uuid.uuid4(),
    }
    covered = set()
    for _, method, path, _, _ in [*ENDPOINTS, *ACCOUNTS_ENDPOINTS, *JOBS_ENDPOINTS]:
        concrete = path.format(**placeholders).partition("?")[0]
        covered.add((resolve(concrete).route, method))
    return covered


def test_every_api_route_is_in_a_matrix():
    routes = _api_routes()
    assert len(routes) > 30  # the walk found the API
    assert sorted(routes - _covered()) == []
