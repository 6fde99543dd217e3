from typing import Any, cast

from django import forms
from django.contrib import admin
from django.contrib.auth.forms import BaseUserCreationForm
from django.contrib.auth.models import Group
from django.db.models import QuerySet
from django.http import HttpRequest

from accounts.admin_base import ReadOnlyAdmin
from accounts.models import AuditLogEntry, RevokedToken, Role, User
from accounts.services import user_create, user_delete, user_manage_check, user_update
from gateway_project.errors import GatewayError
from gateway_project.middleware import client_ip


def _operator(request: HttpRequest) -> User:
    """The signed-in operator (the admin site only lets operators in)."""
    return cast(User, request.user)


# Permissions come from the operator's role, not from Django's groups.
admin.site.unregister(Group)


class _RoleRulesMixin:
    """Refuses, as a form error, what the services would refuse."""

    actor: User
    instance: User
    cleaned_data: dict[str, Any]

    def clean_email(self) -> str:
        # Stored lower-case (a database constraint), so compare and save so.
        return str(self.cleaned_data["email"]).strip().lower()

    def _check_rules(self) -> None:
        target = self.instance if self.instance.pk else None
        role = self.cleaned_data.get("role")
        try:
            user_manage_check(
                actor=self.actor,
                target=target,
                role=role if target is None or role != target.role else None,
            )
        except GatewayError as error:
            raise forms.ValidationError(error.message) from None
        if target is not None and target.role == Role.OWNER and target.is_active:
            leaving = role != Role.OWNER or not self.cleaned_data.get("is_active", True)
            others = User.objects.filter(role=Role.OWNER, is_active=True).exclude(
                pk=target.pk
            )
            if leaving and not others.exists():
                raise forms.ValidationError(
                    "Cannot demote or deactivate the last active owner"
                )


class OperatorCreationForm(_RoleRulesMixin, BaseUserCreationForm):
    class Meta:
        model = User
        fields = ("email", "display_name", "role")

    def clean(self) -> dict[str, Any] | None:
        cleaned = super().clean()
        self._check_rules()
        return cleaned


class OperatorChangeForm(_RoleRulesMixin, forms.ModelForm):
    class Meta:
        model = User
        fields = ("email", "display_name", "role", "is_active", "metadata")

    def clean(self) -> dict[str, Any] | None:
        cleaned = super().clean()
        self._check_rules()
        return cleaned


@admin.register(User)
class UserAdmin(admin.ModelAdmin):
    """Operators. Writes go through the account services, so the role rules
    and the audit log apply here exactly as in the API."""

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
        form = super().get_form(request, obj, change, **kwargs)
        form.actor = _operator(request)  # type: ignore[attr-defined]
        return form

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

    def _may_manage(self, request: HttpRequest, obj: User | None) -> bool:
        try:
            user_manage_check(actor=_operator(request), target=obj, role=None)
        except GatewayError:
            return False
        return True

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return super().has_change_permission(request, obj) and (
            obj is None or self._may_manage(request, obj)
        )

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return (
            super().has_delete_permission(request, obj)
            and (obj is None or self._may_manage(request, obj))
            and (obj is None or obj.pk != request.user.pk)
        )

    def save_model(
        self, request: HttpRequest, obj: Any, form: Any, change: bool
    ) -> None:
        if change:
            changes = {name: form.cleaned_data[name] for name in form.changed_data}
            user_update(
                actor=_operator(request),
                target=User.objects.get(pk=obj.pk),
                changes=changes,
                ip_address=client_ip(request),
            )
            return
        created = user_create(
            email=form.cleaned_data["email"],
            password=form.cleaned_data["password1"],
            display_name=form.cleaned_data.get("display_name", ""),
            role=form.cleaned_data["role"],
            created_by=_operator(request),
            ip_address=client_ip(request),
        )
        obj.pk = created.pk
        obj.refresh_from_db()
        obj._state.adding = False

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        user_delete(actor=_operator(request), target=obj, ip_address=client_ip(request))

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[User]) -> None:
        for user in queryset:
            self.delete_model(request, user)


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
