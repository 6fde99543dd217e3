"""Writes of the accounts app: operators and the audit log."""

from typing import Any

from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.db import transaction

from accounts.models import AuditLogEntry, Role, User
from gateway_project.errors import AlreadyExists, GatewayError


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
    """Append one audit entry. Call it inside the transaction of the change."""
    return AuditLogEntry.objects.create(
        actor=actor,
        actor_label=actor_label or (actor.email if actor else "system"),
        action=action,
        resource_type=resource_type,
        resource_id=str(resource_id),
        details=details or {},
        ip_address=ip_address,
    )


def user_create(
    *,
    email: str,
    password: str,
    display_name: str = "",
    role: str = Role.USER,
    metadata: dict[str, Any] | None = None,
    created_by: User | None = None,
    actor_label: str = "",
) -> User:
    """Create an operator account.

    Raises AlreadyExists ("Email already registered") and GatewayError for a
    password that fails the validators.
    """
    email = email.strip().lower()
    candidate = User(email=email, display_name=display_name, role=role)
    try:
        validate_password(password, user=candidate)
    except ValidationError as error:
        raise GatewayError(
            " ".join(error.messages), code="invalid_password", param="password"
        ) from None
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
    """
    existing = User.objects.filter(email__iexact=email.strip()).first()
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
        try:
            validate_password(password, user=existing)
        except ValidationError as error:
            raise GatewayError(" ".join(error.messages), param="password") from None
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
