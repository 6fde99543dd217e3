"""Every actor by every endpoint → one pinned status (seed 001's way of testing).

Each refusal also proves nothing was written. The one write a refusal makes on
purpose is the audit row of a failed login.
"""

import pytest
from django.test import Client
from rest_framework_simplejwt.tokens import AccessToken

from accounts.models import AuditLogEntry, RevokedToken, Role, User
from accounts.tests.conftest import PASSWORD, bearer, expired_bearer, make_operator
from accounts.tokens import token_issue, token_revoke

ADMIN_KEY = "matrix-admin-key"
ACTORS = [
    "anonymous",
    "malformed",
    "expired",
    "revoked",
    "admin_key",
    "owner",
    "admin",
    "user",
]

#                 anon malf expd revk akey owner admin user
JWT_ANY = dict(zip(ACTORS, [401, 401, 401, 401, 401, 200, 200, 200], strict=True))
JWT_STAFF = dict(zip(ACTORS, [401, 401, 401, 401, 401, 200, 200, 403], strict=True))
DUAL_READ = dict(zip(ACTORS, [401, 401, 401, 401, 200, 200, 200, 200], strict=True))
PUBLIC = dict(zip(ACTORS, [200] * 8, strict=True))
SETUP_DONE = dict(zip(ACTORS, [400] * 8, strict=True))
BAD_LOGIN = dict(zip(ACTORS, [401] * 8, strict=True))

# (name, method, path, body, expected statuses); {victim} is a role-user target.
ENDPOINTS = [
    ("setup status", "get", "/api/admin-users/setup/status", None, PUBLIC),
    (
        "setup",
        "post",
        "/api/admin-users/setup",
        {"email": "new@example.com", "password": "SecurePass456!"},
        SETUP_DONE,
    ),
    (
        "login (wrong password)",
        "post",
        "/api/admin-users/login",
        {"email": "owner@example.com", "password": "wrong-one"},
        BAD_LOGIN,
    ),
    ("logout", "post", "/api/admin-users/logout", None, JWT_ANY),
    ("me", "get", "/api/admin-users/me", None, JWT_ANY),
    (
        "change password",
        "post",
        "/api/admin-users/me/change-password",
        {"current_password": PASSWORD, "new_password": "Brand-new-pass-2"},
        JWT_ANY,
    ),
    ("list users", "get", "/api/admin-users", None, JWT_STAFF),
    (
        "create user",
        "post",
        "/api/admin-users",
        {"email": "made@example.com", "password": "SecurePass456!", "role": "user"},
        JWT_STAFF,
    ),
    ("get user", "get", "/api/admin-users/{victim}", None, JWT_STAFF),
    (
        "update user",
        "patch",
        "/api/admin-users/{victim}",
        {"display_name": "Renamed"},
        JWT_STAFF,
    ),
    ("delete user", "delete", "/api/admin-users/{victim}", None, JWT_STAFF),
    ("audit logs", "get", "/api/admin-users/audit-logs", None, JWT_STAFF),
    ("list organizations", "get", "/api/organizations", None, DUAL_READ),
    ("list model groups", "get", "/api/model-groups", None, DUAL_READ),
]


def _headers(actor: str, world: dict[str, User]) -> dict[str, str]:
    if actor == "anonymous":
        return {}
    if actor == "malformed":
        return {"HTTP_AUTHORIZATION": "Bearer not.a.jwt"}
    if actor == "expired":
        return expired_bearer(world["owner"])
    if actor == "revoked":
        token_string, _ = token_issue(user=world["owner"])
        token_revoke(token=AccessToken(token_string), user=world["owner"])
        return {"HTTP_AUTHORIZATION": f"Bearer {token_string}"}
    if actor == "admin_key":
        return {"HTTP_X_ADMIN_KEY": ADMIN_KEY}
    return bearer(world[actor])


def _state() -> tuple:
    return (
        sorted(
            User.objects.values_list(
                "id", "email", "role", "is_active", "password", "display_name"
            )
        ),
        sorted(RevokedToken.objects.values_list("jti", flat=True)),
        sorted(AuditLogEntry.objects.values_list("action", "resource_id")),
    )


CASES = [
    pytest.param(
        name, method, path, body, actor, expected[actor], id=f"{name} as {actor}"
    )
    for name, method, path, body, expected in ENDPOINTS
    for actor in ACTORS
]


@pytest.mark.django_db
@pytest.mark.parametrize(("name", "method", "path", "body", "actor", "status"), CASES)
def test_authorization_matrix(settings, name, method, path, body, actor, status):
    settings.GATEWAY_ADMIN_KEY = ADMIN_KEY
    world = {
        "owner": make_operator("owner@example.com", Role.OWNER),
        "admin": make_operator("admin@example.com", Role.ADMIN),
        "user": make_operator("user@example.com", Role.USER),
    }
    victim = make_operator("victim@example.com", Role.USER)
    headers = _headers(actor, world)
    before = _state()
    client = Client()

    kwargs = (
        {"data": body, "content_type": "application/json"} if body is not None else {}
    )
    response = getattr(client, method)(
        path.format(victim=victim.pk), **kwargs, **headers
    )

    assert response.status_code == status, response.content
    if status >= 400:
        assert set(response.json()["error"]) == {"message", "type", "code", "param"}
        users, revoked, audit = _state()
        assert (users, revoked) == before[:2]
        if name.startswith("login"):
            # A failed login is itself audited, and nothing else changes.
            assert audit == sorted([*before[2], ("user.login_failed", "")])
        else:
            assert audit == before[2]
