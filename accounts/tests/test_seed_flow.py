"""Seed 000's JWT and dual-auth walkthrough, over HTTP against a running
gunicorn + uvicorn server, as an operator's script would do it."""

import httpx

from routing.models import Deployment
from routing.services import model_group_create

OWNER = {
    "email": "admin@example.com",
    "display_name": "Admin User",
    "password": "SecurePassword123!",
}


def test_seed_000_admin_flow_end_to_end(running_server):
    # Given a fresh gateway with two model groups configured
    deployment = Deployment.objects.create(
        name="gpt-4-turbo", model="openai/gpt-4-turbo"
    )
    model_group_create(group_name="ChatAgent", members=[(deployment, 0)])
    model_group_create(group_name="AnalysisAgent", members=[(deployment, 0)])
    api = httpx.Client(base_url=running_server.url, timeout=10)

    # 1. health
    assert api.get("/health").json() == {"status": "healthy"}

    # 2. setup status, then setup of the owner
    assert api.get("/api/admin-users/setup/status").json() == {
        "needs_setup": True,
        "has_users": False,
    }
    setup = api.post("/api/admin-users/setup", json=OWNER)
    assert setup.status_code == 200
    owner_token = setup.json()["access_token"]
    assert setup.json()["user"]["role"] == "owner"
    owner = {"Authorization": f"Bearer {owner_token}"}

    # 3. login and me
    login = api.post(
        "/api/admin-users/login",
        json={"email": OWNER["email"], "password": OWNER["password"]},
    )
    assert login.status_code == 200
    me = api.get(
        "/api/admin-users/me",
        headers={"Authorization": f"Bearer {login.json()['access_token']}"},
    )
    assert (me.json()["email"], me.json()["role"]) == ("admin@example.com", "owner")

    # 4. legacy X-Admin-Key, and dual auth on organizations
    legacy = api.get(
        "/api/model-groups", headers={"X-Admin-Key": running_server.admin_key}
    )
    assert legacy.status_code == 200
    assert [group["group_name"] for group in legacy.json()] == [
        "AnalysisAgent",
        "ChatAgent",
    ]
    assert api.get("/api/organizations", headers=owner).status_code == 200
    assert (
        api.get(
            "/api/organizations", headers={"X-Admin-Key": running_server.admin_key}
        ).status_code
        == 200
    )

    # 5. list users, create an admin, who can sign in
    assert [
        user["email"] for user in api.get("/api/admin-users", headers=owner).json()
    ] == ["admin@example.com"]
    created = api.post(
        "/api/admin-users",
        headers=owner,
        json={
            "email": "newadmin@example.com",
            "display_name": "New Admin",
            "password": "SecurePass456!",
            "role": "admin",
        },
    )
    assert created.status_code == 200
    assert created.json()["role"] == "admin"
    new_admin = api.post(
        "/api/admin-users/login",
        json={"email": "newadmin@example.com", "password": "SecurePass456!"},
    )
    assert new_admin.status_code == 200

    # 6. the audit log tells the story, newest first
    audit = api.get("/api/admin-users/audit-logs", headers=owner)
    assert audit.status_code == 200
    assert [entry["action"] for entry in audit.json()][:3] == [
        "user.login",
        "user.create",
        "user.login",
    ]
    assert {"user.setup", "user.create", "user.login"} <= {
        entry["action"] for entry in audit.json()
    }
    assert {
        entry["ip_address"]
        for entry in audit.json()
        if entry["action"].startswith("user.")
    } == {"127.0.0.1"}

    # 7. unauthorized calls are refused
    assert api.get("/api/admin-users").status_code == 401
    assert (
        api.get(
            "/api/admin-users", headers={"Authorization": "Bearer invalid-token"}
        ).status_code
        == 401
    )
    assert (
        api.get(
            "/api/admin-users", headers={"X-Admin-Key": running_server.admin_key}
        ).status_code
        == 401
    )
    assert (
        api.get("/api/organizations", headers={"X-Admin-Key": "wrong-key"}).status_code
        == 401
    )
    refused = api.get("/api/admin-users")
    assert refused.json()["error"]["type"] == "authentication_error"
    assert refused.headers["x-request-id"]

    # 8. logout revokes the token
    assert api.post("/api/admin-users/logout", headers=owner).status_code == 200
    assert api.get("/api/admin-users/me", headers=owner).status_code == 401
