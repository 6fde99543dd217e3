from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.auth.forms import BaseUserCreationForm
from django.contrib.auth.models import Group
from django.http import HttpRequest

from accounts.admin_base import AuditedAdmin, ReadOnlyAdmin
from accounts.models import AuditLogEntry, RevokedToken, User


class OperatorCreationForm(BaseUserCreationForm):
    class Meta:
        model = User
        fields = ("email", "display_name", "role")


class OperatorChangeForm(forms.ModelForm):
    class Meta:
        model = User
        fields = ("email", "display_name", "role", "is_active", "metadata")


# Permissions come from the operator's role, not from Django's groups.
admin.site.unregister(Group)


@admin.register(User)
class UserAdmin(AuditedAdmin):
    audit_resource_type = "user"
    form = OperatorChangeForm
    add_form = OperatorCreationForm
    list_display = (
        "email",
        "display_name",
        "role",
        "is_active",
        "last_login",
        "created_at",
    )
    list_filter = ("role", "is_active")
    search_fields = ("email", "display_name")
    ordering = ("email",)
    readonly_fields = ("created_by", "last_login", "created_at", "updated_at")

    def get_form(
        self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any
    ) -> Any:
        if obj is None:
            kwargs["form"] = self.add_form
        return super().get_form(request, obj, change, **kwargs)

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return [
                (
                    None,
                    {
                        "fields": (
                            "email",
                            "display_name",
                            "role",
                            "password1",
                            "password2",
                        )
                    },
                )
            ]
        return [
            (
                None,
                {"fields": ("email", "display_name", "role", "is_active", "metadata")},
            ),
            (
                "History",
                {"fields": ("created_by", "last_login", "created_at", "updated_at")},
            ),
        ]

    def save_model(
        self, request: HttpRequest, obj: Any, form: Any, change: bool
    ) -> None:
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)


@admin.register(AuditLogEntry)
class AuditLogEntryAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "actor_label",
        "action",
        "resource_type",
        "resource_id",
        "ip_address",
    )
    list_filter = ("action", "resource_type")
    search_fields = ("actor_label", "resource_id", "action")
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in AuditLogEntry._meta.fields]


@admin.register(RevokedToken)
class RevokedTokenAdmin(ReadOnlyAdmin):
    list_display = ("jti", "user", "revoked_at", "expires_at")
    search_fields = ("user__email",)
    readonly_fields = ("jti", "user", "revoked_at", "expires_at")
