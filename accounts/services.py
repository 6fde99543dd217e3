"""Writes of the accounts app: operators and the audit log."""

from typing import Any

from django.contrib.auth import authenticate
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.utils import timezone
from rest_framework_simplejwt.tokens import Token

from accounts.models import AuditLogEntry, Role, User
from accounts.throttle import (
    login_failure_record,
    login_success_record,
    login_throttle_check,
)
from accounts.tokens import token_revoke
from gateway_project.errors import (
    AlreadyExists,
    Forbidden,
    GatewayError,
    Unauthenticated,
)
from gateway_project.middleware import current_client_ip

# Any 64-bit number, the same in every process: serializes first-run setup.
_SETUP_LOCK_ID = 0x6761746577617931


def audit_log_record(
    *,
    actor: User | None,
    action: str,
    resource_type: str,
    resource_id: str = "",
    details: dict[str, Any] | None = None,
    ip_address: str | None = None,
    actor_label: str = "",
) -> AuditLogEntry:
    """Append one audit entry. Call it inside the transaction of the change.

    Without ``ip_address``, the address of the request being served is used.
    """
    return AuditLogEntry.objects.create(
        actor=actor,
        actor_label=actor_label or (actor.email if actor else "system"),
        action=action,
        resource_type=resource_type,
        resource_id=str(resource_id),
        details=details or {},
        ip_address=ip_address or current_client_ip(),
    )


def changes_apply(
    instance: Any,
    changes: dict[str, Any],
    *,
    action: str,
    resource_type: str,
    resource_id: str,
    actor: User | None,
    actor_label: str,
) -> dict[str, Any]:
    """Set the fields that really change, validate, save and audit them.

    Returns {field: [before, after]}; nothing is written when nothing changes.
    Call it inside the caller's transaction.
    """
    recorded = {
        field: [getattr(instance, field), value]
        for field, value in changes.items()
        if getattr(instance, field) != value
    }
    if recorded:
        for field, (_, value) in recorded.items():
            setattr(instance, field, value)
        instance.full_clean(validate_unique=False, validate_constraints=False)
        instance.save()
        audit_log_record(
            actor=actor,
            actor_label=actor_label,
            action=action,
            resource_type=resource_type,
            resource_id=resource_id,
            details=recorded,
        )
    return recorded


def user_create(
    *,
    email: str,
    password: str,
    display_name: str = "",
    role: str = Role.USER,
    metadata: dict[str, Any] | None = None,
    created_by: User | None = None,
    actor_label: str = "",
    ip_address: str | None = None,
) -> User:
    """Create an operator account.

    Raises Forbidden when ``created_by`` may not grant ``role``, AlreadyExists
    ("Email already registered") and GatewayError for a password that fails
    the validators.
    """
    if created_by is not None:
        user_manage_check(actor=created_by, target=None, role=role)
    email = email.strip().lower()
    candidate = User(email=email, display_name=display_name, role=role)
    _password_validate(password, candidate)
    with transaction.atomic():
        if User.objects.filter(email__iexact=email).exists():
            raise AlreadyExists("Email already registered", param="email")
        user = User.objects.create_user(
            email,
            password,
            display_name=display_name,
            role=role,
            metadata=metadata or {},
            created_by=created_by,
        )
        audit_log_record(
            actor=created_by,
            actor_label=actor_label,
            action="user.create",
            resource_type="user",
            resource_id=str(user.id),
            details={"email": user.email, "role": user.role},
            ip_address=ip_address,
        )
    return user


def _password_validate(password: str, user: User) -> None:
    try:
        validate_password(password, user=user)
    except ValidationError as error:
        raise GatewayError(
            " ".join(error.messages), code="invalid_password", param="password"
        ) from None


def user_manage_check(*, actor: User, target: User | None, role: str | None) -> None:
    """Raise Forbidden unless ``actor`` may create or change ``target`` (None:
    a new user) and give it ``role`` (None: role unchanged).

    Owners manage everyone; admins manage only users and grant only the user
    role; users manage nobody.
    """
    if actor.role == Role.OWNER:
        return
    if actor.role == Role.ADMIN:
        if target is not None and target.role != Role.USER:
            raise Forbidden("Admins cannot change owners or admins")
        if role is not None and role != Role.USER:
            raise Forbidden("Admins can only grant the user role", param="role")
        return
    raise Forbidden("Your role is read-only")


def _last_active_owner_guard(target: User, *, action: str) -> None:
    """Refuse to remove the last active owner; locks the owners' rows so that
    two owners demoting each other concurrently cannot both succeed."""
    owners = list(
        User.objects.select_for_update()
        .filter(role=Role.OWNER, is_active=True)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    if owners == [target.pk]:
        raise GatewayError(f"Cannot {action} the last active owner", code="last_owner")


_UPDATABLE = ("email", "display_name", "role", "is_active", "metadata", "password")


def user_update(
    *,
    actor: User,
    target: User,
    changes: dict[str, Any],
    ip_address: str | None = None,
) -> User:
    """Change an operator's fields (any of email, display_name, role,
    is_active, metadata, password).

    Raises Forbidden (role rules), GatewayError ``last_owner`` when the change
    would leave no active owner, AlreadyExists for a taken email.
    """
    unknown = set(changes) - set(_UPDATABLE)
    if unknown:
        raise GatewayError(
            f"Unknown field: {sorted(unknown)[0]}", param=sorted(unknown)[0]
        )
    user_manage_check(actor=actor, target=target, role=changes.get("role"))
    if "password" in changes:
        _password_validate(changes["password"], target)
    with transaction.atomic():
        target = User.objects.select_for_update().get(pk=target.pk)
        demoted = changes.get("role", target.role) != Role.OWNER
        deactivated = changes.get("is_active", target.is_active) is False
        if target.role == Role.OWNER and target.is_active and (demoted or deactivated):
            _last_active_owner_guard(target, action="demote or deactivate")
        if "email" in changes:
            changes["email"] = changes["email"].strip().lower()
            if (
                User.objects.filter(email=changes["email"])
                .exclude(pk=target.pk)
                .exists()
            ):
                raise AlreadyExists("Email already registered", param="email")
        recorded: dict[str, Any] = {}
        for field, value in changes.items():
            if field == "password":
                target.set_password(value)
                recorded["password"] = "changed"  # noqa: S105 - an audit note
            elif getattr(target, field) != value:
                recorded[field] = [getattr(target, field), value]
                setattr(target, field, value)
        if recorded:
            target.save()
            audit_log_record(
                actor=actor,
                action="user.update",
                resource_type="user",
                resource_id=str(target.pk),
                details=recorded,
                ip_address=ip_address,
            )
    return target


def user_delete(*, actor: User, target: User, ip_address: str | None = None) -> None:
    """Delete an operator. Raises Forbidden (role rules) and GatewayError for
    deleting oneself or the last active owner."""
    user_manage_check(actor=actor, target=target, role=None)
    if actor.pk == target.pk:
        raise GatewayError(
            "You cannot delete your own account", code="cannot_delete_self"
        )
    with transaction.atomic():
        if target.role == Role.OWNER and target.is_active:
            _last_active_owner_guard(target, action="delete")
        audit_log_record(
            actor=actor,
            action="user.delete",
            resource_type="user",
            resource_id=str(target.pk),
            details={"email": target.email, "role": target.role},
            ip_address=ip_address,
        )
        target.delete()


def owner_setup(
    *, email: str, display_name: str, password: str, ip_address: str | None = None
) -> User:
    """First-run setup: create the first account, an owner.

    Raises GatewayError ``setup_completed`` once any account exists.
    """
    with transaction.atomic():
        if connection.vendor == "postgresql":
            # Two concurrent setups must not both create an owner; there is no
            # row to lock yet, so take a transaction-scoped advisory lock.
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_SETUP_LOCK_ID])
        if User.objects.exists():
            raise GatewayError(
                "Setup has already been completed; log in instead",
                code="setup_completed",
            )
        user = user_create(
            email=email,
            password=password,
            display_name=display_name,
            role=Role.OWNER,
            actor_label="setup",
            ip_address=ip_address,
        )
        audit_log_record(
            actor=user,
            action="user.setup",
            resource_type="user",
            resource_id=str(user.pk),
            details={"email": user.email},
            ip_address=ip_address,
        )
    return user


_BAD_CREDENTIALS = "Incorrect email or password"


def operator_login(*, email: str, password: str, ip_address: str | None = None) -> User:
    """Check an operator's credentials and stamp ``last_login``.

    Raises LoginThrottled (429) after repeated failures and Unauthenticated
    with one message for an unknown email, a wrong password or an inactive
    account. Failures are audited.
    """
    email = email.strip().lower()
    login_throttle_check(email=email, ip_address=ip_address)
    # ModelBackend hashes a dummy password for unknown emails, so timing does
    # not reveal which emails exist, and refuses inactive accounts.
    user = authenticate(username=email, password=password)
    if not isinstance(user, User):
        login_failure_record(email=email, ip_address=ip_address)
        audit_log_record(
            actor=None,
            actor_label=email[:254],
            action="user.login_failed",
            resource_type="user",
            resource_id="",
            details={"email": email},
            ip_address=ip_address,
        )
        raise Unauthenticated(_BAD_CREDENTIALS)
    login_success_record(email=email)
    with transaction.atomic():
        User.objects.filter(pk=user.pk).update(last_login=timezone.now())
        audit_log_record(
            actor=user,
            action="user.login",
            resource_type="user",
            resource_id=str(user.pk),
            ip_address=ip_address,
        )
    user.refresh_from_db(fields=["last_login"])
    return user


def operator_logout(*, user: User, token: Token, ip_address: str | None = None) -> None:
    """Revoke the token the operator used; later uses of it get 401."""
    with transaction.atomic():
        token_revoke(token=token, user=user)
        audit_log_record(
            actor=user,
            action="user.logout",
            resource_type="user",
            resource_id=str(user.pk),
            ip_address=ip_address,
        )


def password_change(
    *,
    user: User,
    current_password: str,
    new_password: str,
    ip_address: str | None = None,
) -> User:
    """Change one's own password; every token issued before stops working.

    Raises Unauthenticated for a wrong current password, GatewayError for a new
    password that fails the validators.
    """
    if not user.check_password(current_password):
        raise Unauthenticated("Current password is incorrect", param="current_password")
    _password_validate(new_password, user)
    with transaction.atomic():
        user.set_password(new_password)
        user.save(update_fields=["password", "updated_at"])
        audit_log_record(
            actor=user,
            action="user.password_change",
            resource_type="user",
            resource_id=str(user.pk),
            ip_address=ip_address,
        )
    return user


def owner_ensure(
    *,
    email: str,
    password: str | None,
    display_name: str = "",
    reset_password: bool = False,
) -> tuple[User, bool]:
    """The owner account with this email, created when missing.

    Returns (user, created). An existing account keeps its password unless
    ``reset_password``; it is promoted to owner and re-activated if needed.
    ``reset_password`` never creates an account: without one, it refuses.
    """
    existing = User.objects.filter(email__iexact=email.strip()).first()
    if existing is None and reset_password:
        raise GatewayError(
            f"no account has the email {email.strip()}: --reset-password resets "
            "an existing account's password and never creates one (leave it "
            "out to create the owner)",
            param="email",
        )
    if existing is None:
        if not password:
            raise GatewayError(
                "a password is required to create the owner", param="password"
            )
        user = user_create(
            email=email,
            password=password,
            display_name=display_name,
            role=Role.OWNER,
            actor_label="setup",
        )
        return user, True
    changes: dict[str, Any] = {}
    if existing.role != Role.OWNER:
        changes["role"] = [existing.role, Role.OWNER]
        existing.role = Role.OWNER
    if not existing.is_active:
        changes["is_active"] = [False, True]
        existing.is_active = True
    if reset_password and password:
        _password_validate(password, existing)
        existing.set_password(password)
        changes["password"] = "reset"  # noqa: S105 - an audit note, not a password
    if changes:
        with transaction.atomic():
            existing.save()
            audit_log_record(
                actor=None,
                actor_label="setup",
                action="user.update",
                resource_type="user",
                resource_id=str(existing.id),
                details=changes,
            )
    return existing, False
