"""Django admin enforces the same operator rules as the API."""

import pytest
from django.test import Client
from django.urls import reverse

from accounts.models import AuditLogEntry, Role, User
from accounts.tests.conftest import make_operator

pytestmark = pytest.mark.django_db


def _client(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def _change(user: User) -> str:
    return reverse("admin:accounts_user_change", args=[user.pk])


def _form(user: User, **changes) -> dict:
    data = {
        "email": user.email,
        "display_name": user.display_name,
        "role": user.role,
        "is_active": "on" if user.is_active else "",
        "metadata": "{}",
    }
    data.update(changes)
    return {key: value for key, value in data.items() if value != ""}


def test_admin_role_cannot_change_or_delete_owners_and_admins(owner_user, admin_user):
    other_admin = make_operator("admin2@example.com", Role.ADMIN)
    client = _client(admin_user)

    for target in (owner_user, other_admin):
        response = client.post(_change(target), _form(target, display_name="hijacked"))
        assert response.status_code == 403
        delete = client.post(
            reverse("admin:accounts_user_delete", args=[target.pk]), {"post": "yes"}
        )
        assert delete.status_code == 403
    assert User.objects.filter(display_name="hijacked").count() == 0
    assert User.objects.count() == 3


def test_admin_role_cannot_promote_a_user(admin_user, plain_user):
    response = _client(admin_user).post(
        _change(plain_user), _form(plain_user, role="admin")
    )

    assert response.status_code == 200  # the form again, with the error
    assert "Admins can only grant the user role" in response.content.decode()
    assert User.objects.get(pk=plain_user.pk).role == Role.USER
    assert not AuditLogEntry.objects.exists()


def test_admin_role_edits_a_user_and_it_is_audited(admin_user, plain_user):
    response = _client(admin_user).post(
        _change(plain_user), _form(plain_user, display_name="Renamed")
    )

    assert response.status_code == 302
    assert User.objects.get(pk=plain_user.pk).display_name == "Renamed"
    entry = AuditLogEntry.objects.get(action="user.update")
    assert (entry.actor, entry.details) == (
        admin_user,
        {"display_name": ["User", "Renamed"]},
    )


def test_admin_role_cannot_add_an_admin(admin_user):
    response = _client(admin_user).post(
        reverse("admin:accounts_user_add"),
        {
            "email": "x@example.com",
            "display_name": "X",
            "role": "admin",
            "password1": "SecurePass456!",
            "password2": "SecurePass456!",
        },
    )

    assert response.status_code == 200
    assert "Admins can only grant the user role" in response.content.decode()
    assert not User.objects.filter(email="x@example.com").exists()


def test_owner_adds_an_operator_through_the_service(owner_user):
    response = _client(owner_user).post(
        reverse("admin:accounts_user_add"),
        {
            "email": "New@Example.com",
            "display_name": "New",
            "role": "admin",
            "password1": "SecurePass456!",
            "password2": "SecurePass456!",
        },
    )

    assert response.status_code == 302
    created = User.objects.get(email="new@example.com")
    assert (created.role, created.created_by) == (Role.ADMIN, owner_user)
    assert created.check_password("SecurePass456!")
    assert AuditLogEntry.objects.get(action="user.create").actor == owner_user


def test_last_owner_cannot_be_demoted_in_the_admin(owner_user):
    response = _client(owner_user).post(
        _change(owner_user), _form(owner_user, role="admin")
    )

    assert response.status_code == 200
    assert "last active owner" in response.content.decode()
    assert User.objects.get(pk=owner_user.pk).role == Role.OWNER


def test_owner_cannot_delete_itself_in_the_admin(owner_user):
    make_operator("owner2@example.com", Role.OWNER)

    response = _client(owner_user).post(
        reverse("admin:accounts_user_delete", args=[owner_user.pk]), {"post": "yes"}
    )

    assert response.status_code == 403
    assert User.objects.filter(pk=owner_user.pk).exists()


def test_audit_entries_cannot_be_changed_or_deleted_in_the_admin(
    owner_user, plain_user
):
    _client(owner_user).post(
        _change(plain_user), _form(plain_user, display_name="Renamed")
    )
    entry = AuditLogEntry.objects.get()
    client = _client(owner_user)

    delete = client.post(
        reverse("admin:accounts_auditlogentry_delete", args=[entry.pk]), {"post": "yes"}
    )
    change = client.post(
        reverse("admin:accounts_auditlogentry_change", args=[entry.pk]),
        {"action": "forged"},
    )

    assert (delete.status_code, change.status_code) == (403, 403)
    assert AuditLogEntry.objects.get().action == "user.update"


# --- operator actions: the role decides, the read-only role changes nothing ------

ACTIONS = [
    ("tenants_team", "suspend_teams", "team", 200),
    ("tenants_team", "resume_teams", "team", 302),
    ("tenants_team", "add_credits", "team", 200),
    ("tenants_team", "reconcile_credits", "team", 302),
    ("tenants_virtualkey", "rotate_keys", "key", 200),
    ("tenants_virtualkey", "revoke_keys", "key", 200),
    ("routing_deployment", "test_deployments", "deployment", 302),
    ("billing_creditaccount", "reconcile_accounts", "account", 302),
]


def _world(team) -> dict:
    from billing.models import CreditAccount
    from tenants.services import virtual_key_issue

    key, _ = virtual_key_issue(team=team, alias="roles")
    return {
        "team": team,
        "key": key,
        "deployment": team.model_groups.get().deployments.get(),
        "account": CreditAccount.objects.get(team=team),
    }


def _snapshot(world: dict) -> tuple:
    from billing.models import LedgerEntry
    from tenants.models import VirtualKey

    return (
        AuditLogEntry.objects.count(),
        LedgerEntry.objects.count(),
        type(world["team"]).objects.get(pk=world["team"].pk).status,
        list(VirtualKey.objects.order_by("pk").values_list("status", "grace_until")),
    )


@pytest.mark.parametrize("confirmed", [False, True], ids=["asked", "confirmed"])
@pytest.mark.parametrize(
    ("model", "action", "target", "allowed_status"),
    ACTIONS,
    ids=[action for _, action, _, _ in ACTIONS],
)
@pytest.mark.parametrize("role", [Role.OWNER, Role.ADMIN, Role.USER])
def test_operator_actions_by_role(
    team, role, model, action, target, allowed_status, confirmed
):
    world = _world(team)
    actor = make_operator(f"{role}@example.com", role)
    before = _snapshot(world)
    data = {"action": action, "_selected_action": [world[target].pk]}
    if confirmed:
        data |= {"post": "yes", "credits": "1", "grace_seconds": "0", "token": "t1"}

    response = _client(actor).post(reverse(f"admin:{model}_changelist"), data)

    if role == Role.USER:
        assert response.status_code == 403
        assert _snapshot(world) == before
    else:
        assert response.status_code == (302 if confirmed else allowed_status)
