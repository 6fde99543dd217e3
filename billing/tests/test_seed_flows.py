"""Seed 000's test_minimal_version.py and test_full_integration.py, over HTTP
against a running gunicorn + uvicorn server, authenticated with X-Admin-Key as
those scripts are. After each scenario the ledger invariant must hold."""

from datetime import datetime
from itertools import pairwise
from typing import Any

import httpx

from accounts.models import AuditLogEntry
from billing.models import LedgerEntry
from billing.tests.ledger import assert_ledger_consistent
from tenants.models import Organization, Team, VirtualKey

# --- Seed 000's payloads --------------------------------------------------------

ORG_TEST = {
    "organization_id": "org_test_001",
    "name": "Test Organization",
    "metadata": {"plan": "dev"},
}
ORG_DEMO = {
    "organization_id": "org_demo_001",
    "name": "Demo Organization",
    "metadata": {"plan": "demo"},
}
RESUME_AGENT = {
    "group_name": "ResumeAgent",
    "display_name": "Resume Analysis Agent",
    "description": "Analyzes resumes and extracts structured data",
    "models": [
        {"model_name": "gpt-4-turbo", "priority": 0},
        {"model_name": "gpt-3.5-turbo", "priority": 1},
    ],
}
CHAT_AGENT = {
    "group_name": "ChatAgent",
    "display_name": "Chat Agent",
    "description": "General chat",
    "models": [{"model_name": "gpt-3.5-turbo", "priority": 0}],
}
# Listed against priority order: the API must still answer in priority order.
ANALYSIS_AGENT = {
    "group_name": "AnalysisAgent",
    "display_name": "Analysis Agent",
    "description": "Analyzes documents",
    "models": [
        {"model_name": "gpt-3.5-turbo", "priority": 2},
        {"model_name": "gpt-4-turbo", "priority": 0},
    ],
}
SUMMARY_AGENT = {
    "group_name": "SummaryAgent",
    "display_name": "Summary Agent",
    "description": "Summarizes documents",
    "models": [{"model_name": "gpt-4-turbo", "priority": 0}],
}
TEAM_DEMO = {
    "organization_id": "org_demo_001",
    "team_id": "team_demo_engineering",
    "team_alias": "Demo Engineering Team",
    "model_groups": ["ChatAgent", "AnalysisAgent"],
    "credits_allocated": 100,
    "metadata": {"department": "engineering"},
}

ORGANIZATION_FIELDS = {
    "organization_id",
    "name",
    "status",
    "metadata",
    "created_at",
    "updated_at",
}


# --- Helpers --------------------------------------------------------------------


def admin_api(server) -> httpx.Client:
    return httpx.Client(
        base_url=server.url,
        headers={"X-Admin-Key": server.admin_key},
        timeout=10,
    )


def anonymous_api(server) -> httpx.Client:
    return httpx.Client(base_url=server.url, timeout=10)


def is_timestamp(value: Any) -> bool:
    return isinstance(value, str) and datetime.fromisoformat(value).tzinfo is not None


def already_exists(response: httpx.Response) -> bool:
    """The scripts' own idempotency test."""
    return response.status_code == 400 and "already exists" in response.text


def create(api: httpx.Client, path: str, payload: dict[str, Any]) -> dict[str, Any]:
    response = api.post(path, json=payload)
    assert response.status_code == 200, response.text
    return response.json()


def balance(api: httpx.Client, team_id: str) -> dict[str, Any]:
    response = api.get(f"/api/credits/teams/{team_id}/balance")
    assert response.status_code == 200, response.text
    return response.json()


def credits_of(body: dict[str, Any]) -> dict[str, Any]:
    return {
        key: body[key]
        for key in ("credits_allocated", "credits_used", "credits_remaining")
    }


def transactions(api: httpx.Client, team_id: str) -> list[dict[str, Any]]:
    response = api.get(f"/api/credits/teams/{team_id}/transactions")
    assert response.status_code == 200, response.text
    assert response.json()["team_id"] == team_id
    return response.json()["transactions"]


def movements(entries: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            entry["type"],
            entry["credits"],
            entry["balance_before"],
            entry["balance_after"],
            entry["reason"],
        )
        for entry in entries
    ]


def assert_chained(entries: list[dict[str, Any]]) -> None:
    """Newest first: each entry starts where the older one below it ended."""
    ids = [entry["transaction_id"] for entry in entries]
    assert ids == sorted(ids, reverse=True)
    for newer, older in pairwise(entries):
        assert newer["balance_before"] == older["balance_after"]
    for entry in entries:
        assert entry["balance_after"] == entry["balance_before"] + entry["credits"]
    assert entries[-1]["balance_before"] == 0


def models_of(group: dict[str, Any]) -> list[tuple[str, int]]:
    return [(model["model_name"], model["priority"]) for model in group["models"]]


# --- 1. test_minimal_version.py -------------------------------------------------


def test_minimal_version_flow(running_server):
    api = admin_api(running_server)

    # 1. health
    health = api.get("/health")
    assert (health.status_code, health.json()) == (200, {"status": "healthy"})

    # 2. create the organization: the documented fields, metadata stored
    created = api.post("/api/organizations/create", json=ORG_TEST)
    assert created.status_code == 200, created.text
    organization = created.json()
    assert set(organization) >= ORGANIZATION_FIELDS
    assert {key: organization[key] for key in ("organization_id", "name")} == {
        "organization_id": "org_test_001",
        "name": "Test Organization",
    }
    assert organization["status"] == "active"
    assert organization["metadata"] == {"plan": "dev"}
    assert is_timestamp(organization["created_at"])
    assert is_timestamp(organization["updated_at"])
    stored = api.get("/api/organizations/org_test_001")
    assert stored.status_code == 200
    assert stored.json()["metadata"] == {"plan": "dev"}

    # 3. a duplicate is a 400 the script recognises as "already exists"
    duplicate = api.post("/api/organizations/create", json=ORG_TEST)
    assert already_exists(duplicate)
    assert duplicate.json() == {
        "error": {
            "message": "Organization 'org_test_001' already exists",
            "type": "invalid_request_error",
            "code": "already_exists",
            "param": "organization_id",
        }
    }
    assert [org["organization_id"] for org in api.get("/api/organizations").json()] == [
        "org_test_001"
    ]

    # 4. model groups: exactly the seed's ResumeAgent, then two more
    resume = create(api, "/api/model-groups/create", RESUME_AGENT)
    assert (resume["group_name"], resume["display_name"], resume["description"]) == (
        "ResumeAgent",
        "Resume Analysis Agent",
        "Analyzes resumes and extracts structured data",
    )
    assert models_of(resume) == [("gpt-4-turbo", 0), ("gpt-3.5-turbo", 1)]
    create(api, "/api/model-groups/create", CHAT_AGENT)
    analysis = create(api, "/api/model-groups/create", ANALYSIS_AGENT)
    assert models_of(analysis) == [("gpt-4-turbo", 0), ("gpt-3.5-turbo", 2)]
    assert already_exists(api.post("/api/model-groups/create", json=RESUME_AGENT))

    # 5. the group reads back with its models in priority order
    fetched = api.get("/api/model-groups/ResumeAgent")
    assert fetched.status_code == 200
    assert fetched.json()["group_name"] == "ResumeAgent"
    assert models_of(fetched.json()) == [("gpt-4-turbo", 0), ("gpt-3.5-turbo", 1)]
    assert models_of(api.get("/api/model-groups/AnalysisAgent").json()) == [
        ("gpt-4-turbo", 0),
        ("gpt-3.5-turbo", 2),
    ]

    # 6. the team: a key shown once, its groups, its credits
    team_payload = {**TEAM_DEMO, "organization_id": "org_test_001"}
    team = create(api, "/api/teams/create", team_payload)
    assert team["team_id"] == "team_demo_engineering"
    assert team["organization_id"] == "org_test_001"
    assert team["team_alias"] == "Demo Engineering Team"
    assert team["virtual_key"].startswith("sk-")
    assert team["model_groups"] == ["AnalysisAgent", "ChatAgent"]
    assert team["credits_allocated"] == 100
    assert team["metadata"] == {"department": "engineering"}
    engineering_key = team["virtual_key"]

    # 7. the initial balance is the allocation
    initial = balance(api, "team_demo_engineering")
    assert (initial["team_id"], initial["organization_id"]) == (
        "team_demo_engineering",
        "org_test_001",
    )
    assert credits_of(initial) == {
        "credits_allocated": 100,
        "credits_used": 0,
        "credits_remaining": 100,
    }

    # 8. add credits
    added = api.post(
        "/api/credits/teams/team_demo_engineering/add",
        json={"credits": 50, "reason": "Test allocation"},
    )
    assert added.status_code == 200, added.text
    body = added.json()
    assert (body["team_id"], body["credits_added"], body["credits_remaining"]) == (
        "team_demo_engineering",
        50,
        150,
    )
    assert movements([body["transaction"]]) == [
        ("top_up", 50, 100, 150, "Test allocation")
    ]
    assert body["transaction"]["actor"] == "admin-key"

    # 9. the balance moved, and the history tells how, newest first
    assert credits_of(balance(api, "team_demo_engineering")) == {
        "credits_allocated": 150,
        "credits_used": 0,
        "credits_remaining": 150,
    }
    history = transactions(api, "team_demo_engineering")
    assert movements(history) == [
        ("top_up", 50, 100, 150, "Test allocation"),
        ("allocation", 100, 0, 100, "Initial allocation"),
    ]
    assert history[0] == body["transaction"]
    assert_chained(history)

    # 10. another group, and a team naming its groups with access_groups
    create(api, "/api/model-groups/create", SUMMARY_AGENT)
    hr = create(
        api,
        "/api/teams/create",
        {
            "organization_id": "org_test_001",
            "team_id": "team_test_hr",
            "team_alias": "HR Team",
            "access_groups": ["ResumeAgent", "SummaryAgent"],
            "credits_allocated": 25,
        },
    )
    assert hr["model_groups"] == ["ResumeAgent", "SummaryAgent"]
    assert hr["virtual_key"].startswith("sk-")
    assert hr["virtual_key"] != engineering_key
    assert credits_of(balance(api, "team_test_hr")) == {
        "credits_allocated": 25,
        "credits_used": 0,
        "credits_remaining": 25,
    }

    # 11. the secret is never shown again
    for team_id, key in (
        ("team_test_hr", hr["virtual_key"]),
        ("team_demo_engineering", engineering_key),
    ):
        detail = api.get(f"/api/teams/{team_id}")
        assert detail.status_code == 200
        assert detail.json()["team_id"] == team_id
        assert "virtual_key" not in detail.json()
        assert key not in detail.text
        keys = api.get(f"/api/teams/{team_id}/keys")
        assert keys.status_code == 200
        assert len(keys.json()) == 1
        assert key not in keys.text
        assert key.startswith(keys.json()[0]["key_prefix"])
    listing = api.get("/api/teams")
    assert [team["team_id"] for team in listing.json()] == [
        "team_demo_engineering",
        "team_test_hr",
    ]
    assert hr["virtual_key"] not in listing.text
    assert engineering_key not in listing.text
    assert (
        hr["model_groups"] == api.get("/api/teams/team_test_hr").json()["model_groups"]
    )

    assert_ledger_consistent()


# --- 2. test_full_integration.py ------------------------------------------------


def test_full_integration_flow_team_key_sees_its_own_balance(running_server):
    api = admin_api(running_server)
    anonymous = anonymous_api(running_server)

    # Given the demo organization, its two groups, and two teams
    create(api, "/api/organizations/create", ORG_DEMO)
    create(api, "/api/model-groups/create", CHAT_AGENT)
    create(api, "/api/model-groups/create", ANALYSIS_AGENT)
    engineering = create(api, "/api/teams/create", TEAM_DEMO)
    assert {
        key: engineering[key]
        for key in (
            "team_id",
            "organization_id",
            "model_groups",
            "credits_allocated",
        )
    } == {
        "team_id": "team_demo_engineering",
        "organization_id": "org_demo_001",
        "model_groups": ["AnalysisAgent", "ChatAgent"],
        "credits_allocated": 100,
    }
    key = engineering["virtual_key"]
    assert key.startswith("sk-")
    sales = create(
        api,
        "/api/teams/create",
        {
            "organization_id": "org_demo_001",
            "team_id": "team_demo_sales",
            "model_groups": ["ChatAgent"],
            "credits_allocated": 40,
        },
    )

    # When the team reads its balance with its own key, both ways
    for headers in ({"Authorization": f"Bearer {key}"}, {"X-API-Key": key}):
        own = anonymous.get(
            "/api/credits/teams/team_demo_engineering/balance", headers=headers
        )
        # Then it sees it
        assert own.status_code == 200, own.text
        assert own.json()["team_id"] == "team_demo_engineering"
        assert credits_of(own.json()) == {
            "credits_allocated": 100,
            "credits_used": 0,
            "credits_remaining": 100,
        }
        assert anonymous.get(
            "/api/credits/teams/team_demo_engineering/transactions", headers=headers
        ).json()["transactions"] == transactions(api, "team_demo_engineering")

        # But not another team's, nor can it top itself up
        other = anonymous.get(
            "/api/credits/teams/team_demo_sales/balance", headers=headers
        )
        assert other.status_code == 403, other.text
        assert other.json()["error"]["type"] == "permission_error"
        assert "team_demo_sales" not in other.text
        assert (
            anonymous.get(
                "/api/credits/teams/team_demo_sales/transactions", headers=headers
            ).status_code
            == 403
        )
        top_up = anonymous.post(
            "/api/credits/teams/team_demo_engineering/add",
            headers=headers,
            json={"credits": 1000},
        )
        assert top_up.status_code == 403, top_up.text
        assert anonymous.get("/api/teams", headers=headers).status_code == 403

    # The sales key is its own team's only
    sales_key = {"Authorization": f"Bearer {sales['virtual_key']}"}
    assert (
        anonymous.get(
            "/api/credits/teams/team_demo_sales/balance", headers=sales_key
        ).json()["credits_remaining"]
        == 40
    )
    assert (
        anonymous.get(
            "/api/credits/teams/team_demo_engineering/balance", headers=sales_key
        ).status_code
        == 403
    )

    # When the operator adds credits, the dashboard sums it all up
    assert (
        api.post(
            "/api/credits/teams/team_demo_sales/add",
            json={"credits": 10, "reason": "Dashboard check"},
        ).status_code
        == 200
    )
    dashboard = api.get("/api/stats/dashboard")
    assert dashboard.status_code == 200
    assert dashboard.json() == {
        "organizations": 1,
        "teams": 2,
        "modelGroups": 2,
        "totalCredits": 150,
        "creditsRemaining": 150,
        "creditsUsed": 0,
    }
    assert anonymous.get("/api/stats/dashboard").status_code == 401
    assert (
        anonymous.get(
            "/api/stats/dashboard", headers={"Authorization": f"Bearer {key}"}
        ).status_code
        == 403
    )

    assert_ledger_consistent()


# --- 3. The scripts' idempotency ------------------------------------------------


def run_setup(api: httpx.Client) -> list[httpx.Response]:
    """The setup part of both scripts: organizations, groups, team."""
    return [
        api.post(path, json=payload)
        for path, payload in (
            ("/api/organizations/create", ORG_TEST),
            ("/api/organizations/create", ORG_DEMO),
            ("/api/model-groups/create", RESUME_AGENT),
            ("/api/model-groups/create", CHAT_AGENT),
            ("/api/model-groups/create", ANALYSIS_AGENT),
            ("/api/teams/create", TEAM_DEMO),
        )
    ]


def state(api: httpx.Client) -> dict[str, Any]:
    return {
        "organizations": api.get("/api/organizations").json(),
        "model_groups": api.get("/api/model-groups").json(),
        "teams": api.get("/api/teams").json(),
        "keys": api.get("/api/teams/team_demo_engineering/keys").json(),
        "balance": balance(api, "team_demo_engineering"),
        "transactions": transactions(api, "team_demo_engineering"),
        "dashboard": api.get("/api/stats/dashboard").json(),
        "rows": (
            Organization.objects.count(),
            Team.objects.count(),
            VirtualKey.objects.count(),
            LedgerEntry.objects.count(),
        ),
    }


def test_seed_scripts_are_idempotent(running_server):
    api = admin_api(running_server)

    # Given a first run of the setup, which creates everything
    first = run_setup(api)
    assert [response.status_code for response in first] == [200] * 6
    before = state(api)
    assert before["rows"] == (2, 1, 1, 1)
    assert credits_of(before["balance"]) == {
        "credits_allocated": 100,
        "credits_used": 0,
        "credits_remaining": 100,
    }

    # When the script runs again
    second = run_setup(api)

    # Then every create is refused the way the script tolerates
    assert [already_exists(response) for response in second] == [True] * 6
    assert [response.json()["error"]["message"] for response in second] == [
        "Organization 'org_test_001' already exists",
        "Organization 'org_demo_001' already exists",
        "Model group 'ResumeAgent' already exists",
        "Model group 'ChatAgent' already exists",
        "Model group 'AnalysisAgent' already exists",
        "Team 'team_demo_engineering' already exists",
    ]
    assert all("sk-" not in response.text for response in second)

    # And nothing changed: no second key, no second allocation
    assert state(api) == before

    assert_ledger_consistent()


# --- 4. Refusals write nothing --------------------------------------------------


def test_refused_requests_write_nothing(running_server):
    api = admin_api(running_server)
    anonymous = anonymous_api(running_server)

    # Given an organization and a team with 100 credits
    create(api, "/api/organizations/create", ORG_DEMO)
    create(api, "/api/model-groups/create", CHAT_AGENT)
    create(api, "/api/teams/create", {**TEAM_DEMO, "model_groups": ["ChatAgent"]})
    organizations = api.get("/api/organizations").json()
    team_balance = balance(api, "team_demo_engineering")
    history = transactions(api, "team_demo_engineering")
    rows = (LedgerEntry.objects.count(), AuditLogEntry.objects.count())

    # When an organization is created without credentials, or with a wrong key
    intruder = {"organization_id": "org_intruder", "name": "Intruder"}
    unauthenticated = anonymous.post("/api/organizations/create", json=intruder)
    wrong_key = anonymous.post(
        "/api/organizations/create",
        json=intruder,
        headers={"X-Admin-Key": "wrong-key"},
    )
    # Then both are 401 in the error envelope
    for response in (unauthenticated, wrong_key):
        assert response.status_code == 401, response.text
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["x-request-id"]

    # When credits are added without credentials or with a wrong key: 401
    add = "/api/credits/teams/team_demo_engineering/add"
    assert anonymous.post(add, json={"credits": 50}).status_code == 401
    assert (
        anonymous.post(
            add, json={"credits": 50}, headers={"X-Admin-Key": "wrong-key"}
        ).status_code
        == 401
    )

    # When an operator adds amounts that are not a positive whole number
    refusals = [
        api.post(add, json={"credits": credits, "reason": "bad"})
        for credits in (0, -5, 1.5, "abc", "1.5", True, None, 1e3)
    ] + [api.post(add, json={"reason": "no amount"})]
    # Then each is a 400 naming "credits"
    assert [
        (response.status_code, response.json()["error"]["param"])
        for response in refusals
    ] == [(400, "credits")] * 9

    # And nothing was written
    assert api.get("/api/organizations").json() == organizations
    assert api.get("/api/organizations/org_intruder").status_code == 404
    assert not Organization.objects.filter(organization_id="org_intruder").exists()
    assert balance(api, "team_demo_engineering") == team_balance
    assert transactions(api, "team_demo_engineering") == history
    assert (LedgerEntry.objects.count(), AuditLogEntry.objects.count()) == rows

    assert_ledger_consistent()


# --- Top-ups and their idempotency key ------------------------------------------


def test_every_top_up_without_an_idempotency_key_counts(running_server):
    # Given a team with 100 credits
    api = admin_api(running_server)
    create(api, "/api/organizations/create", ORG_DEMO)
    create(api, "/api/model-groups/create", CHAT_AGENT)
    create(api, "/api/teams/create", {**TEAM_DEMO, "model_groups": ["ChatAgent"]})
    add = "/api/credits/teams/team_demo_engineering/add"

    # When a top-up is retried with its idempotency key, it counts once
    keyed = [
        api.post(add, json={"credits": 5, "reason": "keyed", "idempotency_key": "k1"})
        for _ in range(2)
    ]
    assert [response.status_code for response in keyed] == [200, 200]
    assert keyed[0].json()["transaction"] == keyed[1].json()["transaction"]
    assert balance(api, "team_demo_engineering")["credits_remaining"] == 105

    # When the seed script's top-up runs twice (it sends no key), both count
    for run in (1, 2):
        response = api.post(
            add, json={"credits": 50, "reason": f"Test allocation {run}"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["transaction"]["reason"] == f"Test allocation {run}"
    assert_ledger_consistent()
    assert credits_of(balance(api, "team_demo_engineering")) == {
        "credits_allocated": 205,
        "credits_used": 0,
        "credits_remaining": 205,
    }
    assert [
        entry["reason"] for entry in transactions(api, "team_demo_engineering")
    ] == [
        "Test allocation 2",
        "Test allocation 1",
        "keyed",
        "Initial allocation",
    ]
