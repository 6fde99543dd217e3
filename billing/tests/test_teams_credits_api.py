"""Teams and credits of seed 000, over the API."""

import pytest
from rest_framework.test import APIClient

from accounts.models import AuditLogEntry
from billing.models import CreditAccount, LedgerEntry
from billing.tests.ledger import assert_ledger_consistent
from gateway_project.money import MICROS
from routing.services import model_group_create
from tenants.models import Team, VirtualKey
from tenants.services import organization_create

pytestmark = pytest.mark.django_db
ADMIN = {"HTTP_X_ADMIN_KEY": "teams-admin-key"}
TEAM = {
    "organization_id": "org_alice",
    "team_id": "team_demo_engineering",
    "team_alias": "Demo Engineering Team",
    "model_groups": ["chat"],
    "credits_allocated": 100,
    "metadata": {"department": "engineering"},
}


@pytest.fixture
def api(settings) -> APIClient:
    settings.GATEWAY_ADMIN_KEY = "teams-admin-key"
    return APIClient()


@pytest.fixture(autouse=True)
def _ledger_stays_consistent():
    yield
    assert_ledger_consistent()


def _state() -> tuple:
    return (
        sorted(
            Team.objects.values_list(
                "team_id", "status", "team_alias", "rpm_limit", "budget_mode"
            )
        ),
        sorted(
            Team.model_groups.through.objects.values_list("team_id", "modelgroup_id")
        ),
        VirtualKey.objects.count(),
        sorted(
            CreditAccount.objects.values_list(
                "team_id",
                "balance_micros",
                "auto_refill_amount_micros",
                "overdraft_limit_micros",
            )
        ),
        LedgerEntry.objects.count(),
        AuditLogEntry.objects.count(),
    )


@pytest.fixture
def alice_org(db):
    return organization_create(organization_id="org_alice", name="Alice Inc")


@pytest.fixture
def created(api, alice_org, model_group):
    response = api.post("/api/teams/create", TEAM, format="json", **ADMIN)
    assert response.status_code == 200
    return response.json()


def test_team_creation_opens_credits_and_a_key(created):
    assert {
        k: created[k]
        for k in (
            "team_id",
            "organization_id",
            "team_alias",
            "model_groups",
            "credits_allocated",
            "credits_remaining",
            "metadata",
        )
    } == {
        "team_id": "team_demo_engineering",
        "organization_id": "org_alice",
        "team_alias": "Demo Engineering Team",
        "model_groups": ["chat"],
        "credits_allocated": 100,
        "credits_remaining": 100,
        "metadata": {"department": "engineering"},
    }
    assert created["virtual_key"].startswith("sk-")
    entry = LedgerEntry.objects.get()
    assert (
        entry.entry_type,
        entry.amount_micros,
        entry.balance_before_micros,
        entry.balance_after_micros,
    ) == (
        "allocation",
        100 * MICROS,
        0,
        100 * MICROS,
    )
    assert {"team.create", "credits.add", "key.issue"} <= set(
        AuditLogEntry.objects.values_list("action", flat=True)
    )


def test_team_detail_never_shows_the_secret_again(api, created):
    detail = api.get("/api/teams/team_demo_engineering", **ADMIN)
    listed = api.get("/api/teams", **ADMIN)

    assert detail.status_code == listed.status_code == 200
    assert (
        created["virtual_key"] not in detail.content.decode() + listed.content.decode()
    )
    assert detail.json()["credits_remaining"] == 100


def test_access_groups_is_a_synonym_of_model_groups(api, alice_org, model_group):
    payload = {k: v for k, v in TEAM.items() if k != "model_groups"} | {
        "access_groups": ["chat"]
    }

    response = api.post("/api/teams/create", payload, format="json", **ADMIN)

    assert response.status_code == 200
    assert response.json()["model_groups"] == ["chat"]


@pytest.mark.parametrize(
    ("change", "status", "code", "fragment"),
    [
        (
            {"organization_id": "org_nope"},
            404,
            "not_found",
            "Organization 'org_nope' not found",
        ),
        (
            {"model_groups": ["chat", "ghost"]},
            404,
            "not_found",
            "Model group 'ghost' not found",
        ),
        ({"credits_allocated": -1}, 400, "invalid_request", "credits_allocated"),
        ({"credits_allocated": 2.5}, 400, "invalid_request", "credits_allocated"),
        ({"team_id": "bad id"}, 400, "invalid_request", "team_id"),
        ({"budget_mode": "free_lunch"}, 400, "invalid_request", "budget_mode"),
        ({"colour": "blue"}, 400, "invalid_request", "colour"),
    ],
)
def test_bad_team_is_refused_and_writes_nothing(
    api, alice_org, model_group, change, status, code, fragment
):
    before = _state()

    response = api.post("/api/teams/create", {**TEAM, **change}, format="json", **ADMIN)

    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert fragment in response.json()["error"]["message"]
    assert _state() == before


def test_duplicate_team_is_400_and_writes_nothing(api, created):
    before = _state()

    response = api.post("/api/teams/create", TEAM, format="json", **ADMIN)

    assert response.status_code == 400
    assert (
        response.json()["error"]["message"]
        == "Team 'team_demo_engineering' already exists"
    )
    assert _state() == before


def test_team_limits_stay_within_the_organization(api, alice_org, model_group):
    api.patch(
        "/api/organizations/org_alice", {"tpm_limit": 1000}, format="json", **ADMIN
    )
    before = _state()

    response = api.post(
        "/api/teams/create", {**TEAM, "tpm_limit": 1001}, format="json", **ADMIN
    )

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tpm_limit"
    assert _state() == before


def test_update_suspend_and_resume_a_team(api, created, deployment):
    model_group_create(group_name="extra", members=[(deployment, 0)])

    patched = api.patch(
        "/api/teams/team_demo_engineering",
        {
            "model_groups": ["chat", "extra"],
            "rpm_limit": 60,
            "budget_mode": "consumption_usd",
            "credits_per_dollar": "50",
        },
        format="json",
        **ADMIN,
    )
    suspended = api.post("/api/teams/team_demo_engineering/suspend", **ADMIN)
    refused = api.get(
        "/api/credits/teams/team_demo_engineering/balance",
        HTTP_X_API_KEY=created["virtual_key"],
    )
    resumed = api.post("/api/teams/team_demo_engineering/resume", **ADMIN)
    allowed = api.get(
        "/api/credits/teams/team_demo_engineering/balance",
        HTTP_X_API_KEY=created["virtual_key"],
    )

    assert patched.status_code == 200
    assert (
        patched.json()["model_groups"],
        patched.json()["rpm_limit"],
        patched.json()["budget_mode"],
        patched.json()["credits_per_dollar"],
    ) == (
        ["chat", "extra"],
        60,
        "consumption_usd",
        "50.0000",
    )
    assert suspended.json()["status"] == "suspended"
    assert (refused.status_code, refused.json()["error"]["code"]) == (
        403,
        "team_inactive",
    )
    assert resumed.json()["status"] == "active"
    assert allowed.status_code == 200


# --- credits ------------------------------------------------------------------


def test_balance_with_the_teams_key_or_an_operator(api, created):
    by_key = api.get(
        "/api/credits/teams/team_demo_engineering/balance",
        HTTP_AUTHORIZATION=f"Bearer {created['virtual_key']}",
    )
    by_admin = api.get("/api/credits/teams/team_demo_engineering/balance", **ADMIN)

    assert by_key.json() == by_admin.json()
    assert {
        k: by_key.json()[k]
        for k in (
            "team_id",
            "organization_id",
            "credits_allocated",
            "credits_used",
            "credits_remaining",
            "budget_mode",
        )
    } == {
        "team_id": "team_demo_engineering",
        "organization_id": "org_alice",
        "credits_allocated": 100,
        "credits_used": 0,
        "credits_remaining": 100,
        "budget_mode": "job_based",
    }


def test_add_credits_and_list_transactions(api, created):
    added = api.post(
        "/api/credits/teams/team_demo_engineering/add",
        {"credits": 50, "reason": "Test allocation"},
        format="json",
        **ADMIN,
    )
    transactions = api.get(
        "/api/credits/teams/team_demo_engineering/transactions?limit=10",
        HTTP_X_API_KEY=created["virtual_key"],
    )

    assert added.status_code == 200
    assert (added.json()["credits_added"], added.json()["credits_remaining"]) == (
        50,
        150,
    )
    assert added.json()["transaction"]["type"] == "top_up"
    rows = transactions.json()["transactions"]
    assert [
        (r["type"], r["credits"], r["balance_before"], r["balance_after"]) for r in rows
    ] == [
        ("top_up", 50, 100, 150),
        ("allocation", 100, 0, 100),
    ]


def test_add_credits_is_idempotent_with_a_key(api, created):
    for _ in range(2):
        response = api.post(
            "/api/credits/teams/team_demo_engineering/add",
            {"credits": 50, "idempotency_key": "invoice-42"},
            format="json",
            **ADMIN,
        )
        assert response.status_code == 200

    assert CreditAccount.objects.get().balance_micros == 150 * MICROS
    assert LedgerEntry.objects.count() == 2


@pytest.mark.parametrize("credits", [0, -5, 1.5, "1.5", "abc", True, None, 10**13])
def test_bad_credit_amounts_are_400_and_write_nothing(api, created, credits):
    before = _state()

    response = api.post(
        "/api/credits/teams/team_demo_engineering/add",
        {"credits": credits},
        format="json",
        **ADMIN,
    )

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "credits"
    assert _state() == before


def test_check_credits(api, created):
    enough = api.post(
        "/api/credits/teams/team_demo_engineering/check?credits_needed=100",
        HTTP_X_API_KEY=created["virtual_key"],
    )
    short = api.post(
        "/api/credits/teams/team_demo_engineering/check?credits_needed=100.5",
        HTTP_X_API_KEY=created["virtual_key"],
    )
    bad = api.post(
        "/api/credits/teams/team_demo_engineering/check?credits_needed=-1",
        HTTP_X_API_KEY=created["virtual_key"],
    )

    assert (enough.json()["sufficient"], short.json()["sufficient"]) == (True, False)
    assert short.json()["credits_needed"] == 100.5
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "credits_needed")


def test_budget_mode_and_auto_refill_settings(api, created):
    mode = api.put(
        "/api/credits/teams/team_demo_engineering/budget-mode",
        {"budget_mode": "consumption_tokens", "tokens_per_credit": 2000},
        format="json",
        **ADMIN,
    )
    refill = api.put(
        "/api/credits/teams/team_demo_engineering/auto-refill",
        {"amount": 25, "period": "monthly", "overdraft_limit": 10},
        format="json",
        **ADMIN,
    )
    off = api.put(
        "/api/credits/teams/team_demo_engineering/auto-refill",
        {"amount": None, "period": "monthly"},
        format="json",
        **ADMIN,
    )

    assert (mode.json()["budget_mode"], mode.json()["tokens_per_credit"]) == (
        "consumption_tokens",
        2000,
    )
    assert refill.json()["auto_refill"] == {"amount": 25, "period": "monthly"}
    assert refill.json()["overdraft_limit"] == 10
    assert off.json()["auto_refill"] == {"amount": None, "period": None}
    assert AuditLogEntry.objects.filter(action="credits.settings").count() == 2


def test_key_of_another_team_cannot_read_this_team(
    api, created, alice_org, model_group
):
    other = api.post(
        "/api/teams/create", {**TEAM, "team_id": "team_other"}, format="json", **ADMIN
    ).json()

    for path in ("balance", "transactions"):
        response = api.get(
            f"/api/credits/teams/team_demo_engineering/{path}",
            HTTP_X_API_KEY=other["virtual_key"],
        )
        assert response.status_code == 403
        assert response.json()["error"]["message"] == "This key belongs to another team"


def test_dashboard_counts_live_resources(api, created, alice_org, model_group):
    api.post(
        "/api/teams/create",
        {**TEAM, "team_id": "team_gone", "credits_allocated": 7},
        format="json",
        **ADMIN,
    )
    api.delete("/api/teams/team_gone", **ADMIN)
    api.post(
        "/api/credits/teams/team_demo_engineering/add",
        {"credits": 5},
        format="json",
        **ADMIN,
    )

    response = api.get("/api/stats/dashboard", **ADMIN)

    assert response.json() == {
        "organizations": 1,
        "teams": 1,
        "modelGroups": 1,
        "totalCredits": 105,
        "creditsRemaining": 105,
        "creditsUsed": 0,
    }
