"""The admin-user API of seed 000: setup, login, tokens, roles, audit log."""

import pytest
from django.test import override_settings

from accounts.models import AuditLogEntry, RevokedToken, Role, User
from accounts.tests.conftest import PASSWORD, bearer, expired_bearer, make_operator

pytestmark = pytest.mark.django_db

USER_FIELDS = {
    "user_id",
    "email",
    "display_name",
    "role",
    "is_active",
    "created_at",
    "created_by",
    "last_login",
    "metadata",
}


def _state() -> tuple:
    """Everything the account endpoints can write, to prove a refusal wrote nothing."""
    return (
        sorted(
            User.objects.values_list(
                "id",
                "email",
                "role",
                "is_active",
                "password",
                "display_name",
                "metadata",
            )
        ),
        sorted(RevokedToken.objects.values_list("jti", flat=True)),
        AuditLogEntry.objects.count(),
    )


def _error(response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "code", "param"}
    return body["error"]


# --- setup -------------------------------------------------------------------


def test_first_run_setup_creates_the_owner_and_signs_in(api):
    assert api.get("/api/admin-users/setup/status").json() == {
        "needs_setup": True,
        "has_users": False,
    }

    response = api.post(
        "/api/admin-users/setup",
        {
            "email": "Admin@Example.com",
            "display_name": "Admin User",
            "password": "SecurePassword123!",
        },
        format="json",
    )

    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert set(body["user"]) == USER_FIELDS
    assert (body["user"]["email"], body["user"]["role"]) == (
        "admin@example.com",
        "owner",
    )
    me = api.get(
        "/api/admin-users/me", HTTP_AUTHORIZATION=f"Bearer {body['access_token']}"
    )
    assert me.json()["user_id"] == body["user"]["user_id"]
    assert api.get("/api/admin-users/setup/status").json() == {
        "needs_setup": False,
        "has_users": True,
    }
    assert list(
        AuditLogEntry.objects.order_by("created_at").values_list("action", flat=True)
    ) == [
        "user.create",
        "user.setup",
    ]


def test_setup_is_refused_once_an_account_exists(api, owner_user):
    before = _state()

    response = api.post(
        "/api/admin-users/setup",
        {"email": "intruder@example.com", "password": "SecurePassword123!"},
        format="json",
    )

    assert response.status_code == 400
    assert _error(response)["code"] == "setup_completed"
    assert _state() == before


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"email": "a@example.com", "password": "short"}, "password"),
        ({"email": "not-an-email", "password": "SecurePassword123!"}, "email"),
        ({"password": "SecurePassword123!"}, "email"),
        (
            {
                "email": "a@example.com",
                "password": "SecurePassword123!",
                "role": "owner",
            },
            "role",
        ),
    ],
)
def test_setup_with_bad_input_is_400_and_writes_nothing(api, payload, param):
    response = api.post("/api/admin-users/setup", payload, format="json")

    assert response.status_code == 400
    assert _error(response)["param"] == param
    assert not User.objects.exists()
    assert not AuditLogEntry.objects.exists()


def test_setup_refuses_malformed_json(api):
    response = api.post(
        "/api/admin-users/setup", "{not json", content_type="application/json"
    )

    assert response.status_code == 400
    assert _error(response)["code"] == "invalid_json"
    assert not User.objects.exists()


# --- login and logout ---------------------------------------------------------


def test_login_returns_a_token_and_stamps_last_login(api, owner_user):
    response = api.post(
        "/api/admin-users/login",
        {"email": "OWNER@example.com", "password": PASSWORD},
        format="json",
    )

    assert response.status_code == 200
    body = response.json()
    assert body["user"]["last_login"] is not None
    owner_user.refresh_from_db()
    assert owner_user.last_login is not None
    assert (
        AuditLogEntry.objects.filter(action="user.login", actor=owner_user).count() == 1
    )
    assert (
        api.get(
            "/api/admin-users/me", HTTP_AUTHORIZATION=f"Bearer {body['access_token']}"
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("email", "password"),
    [
        ("owner@example.com", "wrong-password"),
        ("nobody@example.com", PASSWORD),
        ("inactive@example.com", PASSWORD),
    ],
    ids=["wrong password", "unknown email", "inactive"],
)
def test_failed_logins_all_look_the_same(api, owner_user, email, password):
    make_operator("inactive@example.com", Role.ADMIN, is_active=False)

    response = api.post(
        "/api/admin-users/login", {"email": email, "password": password}, format="json"
    )

    assert response.status_code == 401
    assert _error(response) == {
        "message": "Incorrect email or password",
        "type": "authentication_error",
        "code": "invalid_credentials",
        "param": None,
    }
    failure = AuditLogEntry.objects.get(action="user.login_failed")
    assert (failure.actor, failure.details) == (None, {"email": email})
    assert failure.ip_address == "127.0.0.1"
    assert not AuditLogEntry.objects.filter(action="user.login").exists()


@override_settings(LOGIN_FAILURES_PER_EMAIL=3)
def test_repeated_failures_for_one_email_are_throttled(api, owner_user):
    for _ in range(3):
        assert (
            api.post(
                "/api/admin-users/login",
                {"email": "owner@example.com", "password": "nope-nope"},
                format="json",
            ).status_code
            == 401
        )

    response = api.post(
        "/api/admin-users/login",
        {"email": "owner@example.com", "password": PASSWORD},
        format="json",
    )

    assert response.status_code == 429
    assert _error(response)["code"] == "too_many_login_attempts"
    assert "Too many failed login attempts" in _error(response)["message"]
    assert 0 < int(response["Retry-After"]) <= 900
    assert not AuditLogEntry.objects.filter(action="user.login").exists()
    # Another email from another address is not affected.
    other = api.post(
        "/api/admin-users/login",
        {"email": "nobody@example.com", "password": "x" * 9},
        format="json",
        REMOTE_ADDR="10.0.0.9",
    )
    assert other.status_code == 401


@override_settings(LOGIN_FAILURES_PER_IP=4)
def test_repeated_failures_from_one_address_are_throttled(api, owner_user):
    for number in range(4):
        api.post(
            "/api/admin-users/login",
            {"email": f"guess{number}@example.com", "password": "nope-nope"},
            format="json",
        )

    response = api.post(
        "/api/admin-users/login",
        {"email": "owner@example.com", "password": PASSWORD},
        format="json",
    )

    assert response.status_code == 429
    elsewhere = api.post(
        "/api/admin-users/login",
        {"email": "owner@example.com", "password": PASSWORD},
        format="json",
        REMOTE_ADDR="10.0.0.8",
    )
    assert elsewhere.status_code == 200


def test_logout_revokes_the_token(api, owner_user):
    headers = bearer(owner_user)

    response = api.post("/api/admin-users/logout", **headers)

    assert response.status_code == 200
    assert RevokedToken.objects.filter(user=owner_user).count() == 1
    again = api.get("/api/admin-users/me", **headers)
    assert again.status_code == 401
    assert _error(again)["message"] == "Token has been revoked"
    assert AuditLogEntry.objects.filter(action="user.logout").count() == 1
    # Other tokens of the same operator keep working.
    assert api.get("/api/admin-users/me", **bearer(owner_user)).status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer invalid-token",
        "Bearer",
        "Bearer a.b.c",
        "Basic b3duZXI6cGFzcw==",
        "Token abc",
    ],
)
def test_malformed_authorization_is_401(api, owner_user, authorization):
    response = api.get("/api/admin-users/me", HTTP_AUTHORIZATION=authorization)

    assert response.status_code == 401
    assert _error(response)["type"] == "authentication_error"


def test_expired_token_is_401(api, owner_user):
    assert (
        api.get("/api/admin-users/me", **expired_bearer(owner_user)).status_code == 401
    )


def test_token_of_a_deactivated_operator_is_401(api, owner_user, admin_user):
    headers = bearer(admin_user)
    User.objects.filter(pk=admin_user.pk).update(is_active=False)

    assert api.get("/api/admin-users/me", **headers).status_code == 401


def test_admin_key_is_not_accepted_on_operator_endpoints(api, owner_user, settings):
    settings.GATEWAY_ADMIN_KEY = "the-admin-key"

    response = api.get("/api/admin-users", HTTP_X_ADMIN_KEY="the-admin-key")

    assert response.status_code == 401
    assert "X-Admin-Key is not accepted" in _error(response)["message"]


# --- me and password ----------------------------------------------------------


def test_me_returns_the_user_object(api, admin_user):
    body = api.get("/api/admin-users/me", **bearer(admin_user)).json()

    assert set(body) == USER_FIELDS
    assert body["email"] == "admin@example.com"
    assert "password" not in str(body)


def test_change_password_invalidates_earlier_tokens(api, plain_user):
    old_headers = bearer(plain_user)

    response = api.post(
        "/api/admin-users/me/change-password",
        {"current_password": PASSWORD, "new_password": "Brand-new-pass-2"},
        format="json",
        **old_headers,
    )

    assert response.status_code == 200
    assert api.get("/api/admin-users/me", **old_headers).status_code == 401
    new_token = response.json()["access_token"]
    assert (
        api.get(
            "/api/admin-users/me", HTTP_AUTHORIZATION=f"Bearer {new_token}"
        ).status_code
        == 200
    )
    plain_user.refresh_from_db()
    assert plain_user.check_password("Brand-new-pass-2")
    assert (
        AuditLogEntry.objects.filter(
            action="user.password_change", actor=plain_user
        ).count()
        == 1
    )


def test_change_password_with_wrong_current_password_is_401(api, plain_user):
    headers = bearer(plain_user)
    before = _state()

    response = api.post(
        "/api/admin-users/me/change-password",
        {"current_password": "not-it-at-all", "new_password": "Brand-new-pass-2"},
        format="json",
        **headers,
    )

    assert response.status_code == 401
    assert _error(response)["param"] == "current_password"
    assert _state() == before


def test_change_password_to_a_weak_one_is_400(api, plain_user):
    headers = bearer(plain_user)
    before = _state()

    response = api.post(
        "/api/admin-users/me/change-password",
        {"current_password": PASSWORD, "new_password": "short"},
        format="json",
        **headers,
    )

    assert response.status_code == 400
    assert _error(response)["code"] == "invalid_password"
    assert _state() == before


# --- managing operators -------------------------------------------------------


def test_owner_creates_an_admin(api, owner_user):
    response = api.post(
        "/api/admin-users",
        {
            "email": "newadmin@example.com",
            "display_name": "New Admin",
            "password": "SecurePass456!",
            "role": "admin",
            "metadata": {"team": "ops"},
        },
        format="json",
        **bearer(owner_user),
    )

    assert response.status_code == 200
    body = response.json()
    assert (body["role"], body["created_by"], body["metadata"]) == (
        "admin",
        str(owner_user.pk),
        {"team": "ops"},
    )
    entry = AuditLogEntry.objects.get(action="user.create")
    assert (entry.actor, entry.resource_id) == (owner_user, body["user_id"])


def test_duplicate_email_is_400_already_registered(api, owner_user):
    before = _state()

    response = api.post(
        "/api/admin-users",
        {
            "email": "ADMIN@example.com".replace("ADMIN", "owner"),
            "password": "SecurePass456!",
        },
        format="json",
        **bearer(owner_user),
    )

    assert response.status_code == 400
    assert _error(response)["message"] == "Email already registered"
    assert _error(response)["code"] == "already_exists"
    assert _state() == before


@pytest.mark.parametrize("role", ["admin", "owner"])
def test_admin_cannot_create_admins_or_owners(api, admin_user, role):
    before = _state()

    response = api.post(
        "/api/admin-users",
        {"email": "x@example.com", "password": "SecurePass456!", "role": role},
        format="json",
        **bearer(admin_user),
    )

    assert response.status_code == 403
    assert _state() == before


def test_admin_manages_users_but_not_owners_or_admins(
    api, owner_user, admin_user, plain_user
):
    headers = bearer(admin_user)
    other_admin = make_operator("admin2@example.com", Role.ADMIN)
    before = _state()

    assert (
        api.patch(
            f"/api/admin-users/{owner_user.pk}",
            {"display_name": "x"},
            format="json",
            **headers,
        ).status_code
        == 403
    )
    assert (
        api.patch(
            f"/api/admin-users/{other_admin.pk}",
            {"display_name": "x"},
            format="json",
            **headers,
        ).status_code
        == 403
    )
    assert (
        api.patch(
            f"/api/admin-users/{plain_user.pk}",
            {"role": "admin"},
            format="json",
            **headers,
        ).status_code
        == 403
    )
    assert api.delete(f"/api/admin-users/{owner_user.pk}", **headers).status_code == 403
    assert _state() == before

    response = api.patch(
        f"/api/admin-users/{plain_user.pk}",
        {"display_name": "Renamed"},
        format="json",
        **headers,
    )
    assert response.status_code == 200
    assert response.json()["display_name"] == "Renamed"
    assert AuditLogEntry.objects.get(action="user.update").details == {
        "display_name": ["User", "Renamed"]
    }


def test_last_active_owner_cannot_be_demoted_deactivated_or_deleted(api, owner_user):
    second = make_operator("owner2@example.com", Role.OWNER)
    headers = bearer(second)
    User.objects.filter(pk=second.pk).update(is_active=False)
    headers = bearer(owner_user)
    before = _state()

    for change in ({"role": "admin"}, {"is_active": False}):
        response = api.patch(
            f"/api/admin-users/{owner_user.pk}", change, format="json", **headers
        )
        assert response.status_code == 400
        assert _error(response)["code"] == "last_owner"
    assert _state() == before


def test_an_owner_may_demote_another_owner(api, owner_user):
    second = make_operator("owner2@example.com", Role.OWNER)

    response = api.patch(
        f"/api/admin-users/{second.pk}",
        {"role": "admin"},
        format="json",
        **bearer(owner_user),
    )

    assert response.status_code == 200
    assert User.objects.get(pk=second.pk).role == Role.ADMIN


def test_owner_cannot_delete_itself(api, owner_user):
    make_operator("owner2@example.com", Role.OWNER)
    before = _state()

    response = api.delete(f"/api/admin-users/{owner_user.pk}", **bearer(owner_user))

    assert response.status_code == 400
    assert _error(response)["code"] == "cannot_delete_self"
    assert _state() == before


def test_deleted_operator_is_gone_and_its_token_stops_working(
    api, owner_user, admin_user
):
    admin_headers = bearer(admin_user)

    response = api.delete(f"/api/admin-users/{admin_user.pk}", **bearer(owner_user))

    assert response.status_code == 200
    assert not User.objects.filter(pk=admin_user.pk).exists()
    assert api.get("/api/admin-users/me", **admin_headers).status_code == 401
    entry = AuditLogEntry.objects.get(action="user.delete")
    assert entry.details == {"email": "admin@example.com", "role": "admin"}


def test_unknown_user_is_404(api, owner_user):
    response = api.get(
        "/api/admin-users/00000000-0000-0000-0000-000000000000", **bearer(owner_user)
    )

    assert response.status_code == 404
    assert _error(response)["code"] == "not_found"


def test_patch_refuses_unknown_fields_and_bad_values(api, owner_user, plain_user):
    headers = bearer(owner_user)
    before = _state()

    unknown = api.patch(
        f"/api/admin-users/{plain_user.pk}", {"shoe_size": 44}, format="json", **headers
    )
    bad_role = api.patch(
        f"/api/admin-users/{plain_user.pk}", {"role": "god"}, format="json", **headers
    )
    weak = api.patch(
        f"/api/admin-users/{plain_user.pk}",
        {"password": "short"},
        format="json",
        **headers,
    )

    assert [r.status_code for r in (unknown, bad_role, weak)] == [400, 400, 400]
    assert [_error(r)["param"] for r in (unknown, bad_role, weak)] == [
        "shoe_size",
        "role",
        "password",
    ]
    assert _state() == before


# --- audit log ----------------------------------------------------------------


def test_audit_log_is_newest_first_and_filterable(api, owner_user, plain_user):
    headers = bearer(owner_user)
    api.patch(
        f"/api/admin-users/{plain_user.pk}",
        {"display_name": "A"},
        format="json",
        **headers,
    )
    api.patch(
        f"/api/admin-users/{plain_user.pk}",
        {"display_name": "B"},
        format="json",
        **headers,
    )
    api.post(
        "/api/admin-users/login",
        {"email": "owner@example.com", "password": "bad-password"},
        format="json",
    )

    everything = api.get("/api/admin-users/audit-logs", **headers).json()
    updates = api.get(
        "/api/admin-users/audit-logs?action=user.update", **headers
    ).json()
    by_owner = api.get(
        f"/api/admin-users/audit-logs?user_id={owner_user.pk}", **headers
    ).json()
    second_page = api.get(
        "/api/admin-users/audit-logs?limit=1&offset=1", **headers
    ).json()

    assert [entry["action"] for entry in everything] == [
        "user.login_failed",
        "user.update",
        "user.update",
    ]
    assert set(everything[0]) == {
        "audit_id",
        "user_id",
        "actor",
        "action",
        "resource_type",
        "resource_id",
        "details",
        "ip_address",
        "created_at",
    }
    assert [entry["details"]["display_name"] for entry in updates] == [
        ["A", "B"],
        ["User", "A"],
    ]
    assert {entry["user_id"] for entry in by_owner} == {str(owner_user.pk)}
    assert len(by_owner) == 2
    assert second_page == [everything[1]]


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=501", "offset=-1", "user_id=not-a-uuid", "limit=ten"]
)
def test_audit_log_refuses_bad_queries(api, owner_user, query):
    response = api.get(f"/api/admin-users/audit-logs?{query}", **bearer(owner_user))

    assert response.status_code == 400
    assert _error(response)["param"] == query.split("=")[0]


@pytest.mark.parametrize("method", ["post", "put", "patch", "delete"])
def test_audit_log_cannot_be_changed_through_the_api(api, owner_user, method):
    api.post(
        "/api/admin-users/login",
        {"email": "owner@example.com", "password": "bad-password"},
        format="json",
    )
    before = list(AuditLogEntry.objects.values())

    response = getattr(api, method)(
        "/api/admin-users/audit-logs", {}, format="json", **bearer(owner_user)
    )

    assert response.status_code == 405
    assert list(AuditLogEntry.objects.values()) == before
