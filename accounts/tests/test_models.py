import pytest
from django.conf import global_settings
from django.db import IntegrityError, transaction

from accounts.models import AuditLogEntry, Role, User
from accounts.services import owner_ensure, user_create
from gateway_project.errors import AlreadyExists, GatewayError


@pytest.mark.django_db
def test_email_is_unique_whatever_its_case():
    User.objects.create_user("Ops@Example.com", "Long-enough-1")

    with pytest.raises(IntegrityError), transaction.atomic():
        User.objects.create_user("ops@example.COM", "Long-enough-1")

    assert User.objects.get().email == "ops@example.com"


@pytest.mark.django_db
def test_database_refuses_an_unknown_role_and_a_mixed_case_email():
    user = User.objects.create_user("a@example.com", "Long-enough-1")

    with pytest.raises(IntegrityError), transaction.atomic():
        User.objects.filter(pk=user.pk).update(role="superhero")
    with pytest.raises(IntegrityError), transaction.atomic():
        User.objects.filter(pk=user.pk).update(email="A@example.com")


@pytest.mark.django_db
def test_user_create_refuses_duplicate_email_and_writes_nothing():
    user_create(email="dup@example.com", password="Long-enough-1")
    audit_rows = AuditLogEntry.objects.count()

    with pytest.raises(AlreadyExists, match="Email already registered"):
        user_create(email="DUP@example.com", password="Long-enough-1")

    assert User.objects.count() == 1
    assert AuditLogEntry.objects.count() == audit_rows


@pytest.mark.django_db
def test_user_create_refuses_short_password_and_writes_nothing():
    with pytest.raises(GatewayError) as raised:
        user_create(email="short@example.com", password="short")

    assert raised.value.param == "password"
    assert "at least 8 characters" in raised.value.message
    assert not User.objects.exists()
    assert not AuditLogEntry.objects.exists()


@pytest.mark.django_db
def test_password_is_stored_hashed(settings):
    settings.PASSWORD_HASHERS = global_settings.PASSWORD_HASHERS  # as in production

    user = user_create(email="h@example.com", password="Long-enough-1")

    user.refresh_from_db()
    assert "Long-enough-1" not in user.password
    assert user.password.startswith("pbkdf2_sha256$")
    assert user.check_password("Long-enough-1")


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("role", "can_change", "can_view"),
    [(Role.OWNER, True, True), (Role.ADMIN, True, True), (Role.USER, False, True)],
)
def test_admin_permissions_follow_the_role(role, can_change, can_view):
    user = User.objects.create_user(f"{role}@example.com", "Long-enough-1", role=role)

    assert user.is_staff
    assert user.has_perm("tenants.change_team") is can_change
    assert user.has_perm("tenants.view_team") is can_view


@pytest.mark.django_db
def test_inactive_user_has_no_permission():
    user = User.objects.create_user(
        "gone@example.com", "Long-enough-1", role=Role.OWNER, is_active=False
    )

    assert not user.is_staff
    assert not user.has_perm("tenants.view_team")


@pytest.mark.django_db
def test_owner_ensure_is_idempotent_and_keeps_the_password():
    first, created = owner_ensure(email="boss@example.com", password="Long-enough-1")
    again, created_again = owner_ensure(
        email="boss@example.com", password="Other-pass-2"
    )

    assert (created, created_again) == (True, False)
    assert first.pk == again.pk
    again.refresh_from_db()
    assert again.check_password("Long-enough-1")
    assert again.role == Role.OWNER
    assert AuditLogEntry.objects.filter(action="user.create").count() == 1
    assert AuditLogEntry.objects.count() == 1
