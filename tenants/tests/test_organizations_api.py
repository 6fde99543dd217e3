"""Organizations of seed 000."""

import pytest
from rest_framework.test import APIClient

from accounts.models import AuditLogEntry
from tenants.models import Organization, Status
from tenants.services import team_delete

pytestmark = pytest.mark.django_db
ADMIN = {"HTTP_X_ADMIN_KEY": "orgs-admin-key"}
SEED = {
    "organization_id": "org_test_001",
    "name": "Test Organization",
    "metadata": {"plan": "dev"},
}


@pytest.fixture
def api(settings) -> APIClient:
    settings.GATEWAY_ADMIN_KEY = "orgs-admin-key"
    return APIClient()


def _state() -> tuple:
    return (
        sorted(
            Organization.objects.values_list(
                "organization_id", "name", "status", "metadata", "rpm_limit"
            )
        ),
        AuditLogEntry.objects.count(),
    )


def test_create_organization_as_in_seed_000(api):
    response = api.post("/api/organizations/create", SEED, format="json", **ADMIN)

    assert response.status_code == 200
    body = response.json()
    assert {k: body[k] for k in ("organization_id", "name", "status", "metadata")} == {
        **SEED,
        "status": "active",
    }
    assert {"created_at", "updated_at"} <= set(body)
    assert api.get("/api/organizations/org_test_001", **ADMIN).json() == body
    entry = AuditLogEntry.objects.get(action="organization.create")
    assert (entry.actor_label, entry.resource_id, entry.ip_address) == (
        "admin-key",
        "org_test_001",
        "127.0.0.1",
    )


def test_duplicate_organization_is_400(api):
    api.post("/api/organizations/create", SEED, format="json", **ADMIN)
    before = _state()

    response = api.post("/api/organizations/create", SEED, format="json", **ADMIN)

    assert response.status_code == 400
    assert "already exists" in response.content.decode()
    assert _state() == before


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"name": "x"}, "organization_id"),
        ({"organization_id": "bad id!", "name": "x"}, "organization_id"),
        ({"organization_id": "ok", "name": ""}, "name"),
        ({"organization_id": "ok", "name": "x", "metadata": "plan"}, "metadata"),
    ],
)
def test_bad_organization_is_400_and_writes_nothing(api, payload, param):
    response = api.post("/api/organizations/create", payload, format="json", **ADMIN)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert _state() == ([], 0)


def test_update_organization(api):
    api.post("/api/organizations/create", SEED, format="json", **ADMIN)

    response = api.patch(
        "/api/organizations/org_test_001",
        {"name": "Renamed", "rpm_limit": 100, "status": "suspended"},
        format="json",
        **ADMIN,
    )

    assert response.status_code == 200
    assert (
        response.json()["name"],
        response.json()["rpm_limit"],
        response.json()["status"],
    ) == ("Renamed", 100, "suspended")
    assert AuditLogEntry.objects.get(action="organization.update").details == {
        "name": ["Test Organization", "Renamed"],
        "rpm_limit": [None, 100],
        "status": ["active", "suspended"],
    }


def test_organization_with_active_teams_cannot_be_deleted(api, team):
    before = _state()

    response = api.delete("/api/organizations/org_alice", **ADMIN)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "organization_has_teams"
    assert "team_alice" in response.json()["error"]["message"]
    assert _state() == before


def test_organization_whose_teams_are_deleted_is_kept_as_deleted(api, team):
    team_delete(team=team)

    response = api.delete("/api/organizations/org_alice", **ADMIN)

    assert response.status_code == 200
    assert Organization.objects.get().status == Status.DELETED
    assert api.get("/api/organizations/org_alice", **ADMIN).status_code == 404
    assert api.get("/api/organizations", **ADMIN).json() == []
    # Its id stays taken, so history can never be confused.
    assert (
        api.post(
            "/api/organizations/create",
            {"organization_id": "org_alice", "name": "x"},
            format="json",
            **ADMIN,
        ).status_code
        == 400
    )


def test_empty_organization_is_deleted(api):
    api.post("/api/organizations/create", SEED, format="json", **ADMIN)

    response = api.delete("/api/organizations/org_test_001", **ADMIN)

    assert response.status_code == 200
    assert not Organization.objects.exists()


def test_unknown_organization_is_404(api, db):
    response = api.get("/api/organizations/nope", **ADMIN)

    assert response.status_code == 404
    assert response.json()["error"]["message"] == "Organization 'nope' not found"
