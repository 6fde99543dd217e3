"""Building blocks shared by every app's admin screens."""

from typing import Any

from django.contrib import admin
from django.db import models, transaction
from django.http import HttpRequest

from accounts.services import audit_log_record
from gateway_project.middleware import client_ip
from gateway_project.money import from_micros


def format_micros(micros: int | None) -> str:
    return "—" if micros is None else f"{from_micros(micros):,}"


class ReadOnlyAdmin(admin.ModelAdmin):
    """For records nobody edits by hand: ledger, usage, audit log."""

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class AuditedAdmin(admin.ModelAdmin):
    """Every save and delete made through the admin lands in the audit log."""

    audit_resource_type = ""

    def _audit(
        self,
        request: HttpRequest,
        action: str,
        obj: models.Model,
        details: dict[str, Any],
    ) -> None:
        audit_log_record(
            actor=request.user if request.user.is_authenticated else None,
            action=f"{self.audit_resource_type}.{action}",
            resource_type=self.audit_resource_type,
            resource_id=str(obj),
            details={"via": "admin", **details},
            ip_address=client_ip(request),
        )

    def save_model(
        self, request: HttpRequest, obj: Any, form: Any, change: bool
    ) -> None:
        with transaction.atomic():
            super().save_model(request, obj, form, change)
            changed = sorted(form.changed_data) if change else []
            self._audit(
                request, "update" if change else "create", obj, {"fields": changed}
            )

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        with transaction.atomic():
            self._audit(request, "delete", obj, {})
            super().delete_model(request, obj)

    def delete_queryset(self, request: HttpRequest, queryset: Any) -> None:
        with transaction.atomic():
            for obj in queryset:
                self._audit(request, "delete", obj, {})
            super().delete_queryset(request, queryset)
