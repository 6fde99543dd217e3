"""Reads of the accounts app."""

from uuid import UUID

from django.db.models import QuerySet

from accounts.models import AuditLogEntry, User


def user_list() -> QuerySet[User]:
    return User.objects.order_by("created_at", "email")


def user_get(*, user_id: str) -> User | None:
    return User.objects.filter(pk=user_id).first()


def audit_log_list(
    *,
    action: str = "",
    user_id: UUID | None = None,
    resource_type: str = "",
) -> QuerySet[AuditLogEntry]:
    """Audit entries, newest first, filtered by exact action, actor and type."""
    entries = AuditLogEntry.objects.order_by("-created_at", "-id")
    if action:
        entries = entries.filter(action=action)
    if user_id is not None:
        entries = entries.filter(actor_id=user_id)
    if resource_type:
        entries = entries.filter(resource_type=resource_type)
    return entries
