"""Input validation and output shapes of the admin-user API (seed 000)."""

from typing import Any

from rest_framework import serializers

from accounts.models import AuditLogEntry, Role, User
from gateway_project.inputs import MetadataField


class StrictSerializer(serializers.Serializer):  # type: ignore[type-arg]
    """Refuses fields it does not know, so a typo is a 400, not a silent no-op."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError({unknown[0]: ["Unknown field."]})
        return super().to_internal_value(data)


class SetupInput(StrictSerializer):
    email = serializers.EmailField()
    display_name = serializers.CharField(max_length=150, required=False, default="")
    password = serializers.CharField(trim_whitespace=False)


class LoginInput(StrictSerializer):
    email = serializers.CharField(max_length=254)
    password = serializers.CharField(trim_whitespace=False)


class PasswordChangeInput(StrictSerializer):
    current_password = serializers.CharField(trim_whitespace=False)
    new_password = serializers.CharField(trim_whitespace=False)


class UserCreateInput(StrictSerializer):
    email = serializers.EmailField()
    display_name = serializers.CharField(max_length=150, required=False, default="")
    password = serializers.CharField(trim_whitespace=False)
    role = serializers.ChoiceField(choices=Role.choices, default=Role.USER)
    metadata = MetadataField(required=False, default=dict)


class UserUpdateInput(StrictSerializer):
    email = serializers.EmailField(required=False)
    display_name = serializers.CharField(max_length=150, required=False)
    password = serializers.CharField(trim_whitespace=False, required=False)
    role = serializers.ChoiceField(choices=Role.choices, required=False)
    is_active = serializers.BooleanField(required=False)
    metadata = MetadataField(required=False)


class AuditLogQuery(serializers.Serializer):  # type: ignore[type-arg]
    limit = serializers.IntegerField(min_value=1, max_value=500, default=100)
    offset = serializers.IntegerField(min_value=0, default=0)
    action = serializers.CharField(required=False, default="")
    user_id = serializers.UUIDField(required=False, default=None)
    resource_type = serializers.CharField(required=False, default="")


def user_output(user: User) -> dict[str, Any]:
    return {
        "user_id": str(user.pk),
        "email": user.email,
        "display_name": user.display_name,
        "role": user.role,
        "is_active": user.is_active,
        "created_at": user.created_at.isoformat(),
        "created_by": str(user.created_by_id) if user.created_by_id else None,
        "last_login": user.last_login.isoformat() if user.last_login else None,
        "metadata": user.metadata,
    }


def audit_output(entry: AuditLogEntry) -> dict[str, Any]:
    return {
        "audit_id": str(entry.pk),
        "user_id": str(entry.actor_id) if entry.actor_id else None,
        "actor": entry.actor_label,
        "action": entry.action,
        "resource_type": entry.resource_type,
        "resource_id": entry.resource_id,
        "details": entry.details,
        "ip_address": entry.ip_address,
        "created_at": entry.created_at.isoformat(),
    }


def token_output(user: User, access_token: str, expires_in: int) -> dict[str, Any]:
    return {
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": expires_in,
        "user": user_output(user),
    }
