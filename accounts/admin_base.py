"""Building blocks shared by every app's admin screens."""

from dataclasses import dataclass
from typing import Any, cast

from django import forms
from django.contrib import admin
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied
from django.db import models, transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.utils.http import url_has_allowed_host_and_scheme

from accounts.models import User
from accounts.services import audit_log_record
from gateway_project.generations import routing_changed
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


def operator(request: HttpRequest) -> User:
    """The signed-in operator (the admin site only lets operators in)."""
    return cast(User, request.user)


@dataclass(frozen=True)
class ObjectAction:
    """A button on a change page: runs the admin action ``action`` on the
    object (through the changelist, so confirmation and permissions are the
    action's), or follows ``url``."""

    label: str
    action: str = ""
    url: str = ""
    danger: bool = False


@dataclass(frozen=True)
class Confirmation:
    """What the intermediate page of an action asks, and the form it needs."""

    title: str
    question: str
    button: str
    form_class: type[forms.Form] | None = None
    danger: bool = True


class AuditedAdmin(admin.ModelAdmin):
    """Every save and delete made through the admin lands in the audit log.

    Also the frame of the operator's actions: an intermediate confirmation
    page (``confirm``), buttons on the change page (``get_object_actions``),
    and a 403 for an action posted by an operator who may not change.
    """

    audit_resource_type = ""
    # Set on the admins of model groups, deployments, credentials and prices:
    # a save makes every gateway process reload its routes.
    changes_routing = False

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        # Django answers an action it does not offer with "no action selected";
        # a read-only operator posting one is refused outright instead.
        if (
            request.method == "POST"
            and "action" in request.POST
            and not self.has_change_permission(request)
        ):
            raise PermissionDenied
        return super().changelist_view(request, extra_context)

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        obj = self.get_object(request, object_id)
        actions = (
            self.get_object_actions(request, obj)
            if obj is not None and self.has_change_permission(request, obj)
            else []
        )
        return super().change_view(
            request,
            object_id,
            form_url,
            {**(extra_context or {}), "object_actions": actions},
        )

    def get_object_actions(self, request: HttpRequest, obj: Any) -> list[ObjectAction]:
        """The buttons of an object's change page (for operators who may change)."""
        return []

    def confirm(
        self,
        request: HttpRequest,
        queryset: QuerySet[Any],
        confirmation: Confirmation,
        initial: dict[str, Any] | None = None,
    ) -> TemplateResponse | dict[str, Any]:
        """The intermediate page of an action or, once the operator confirmed
        it with a valid form, the form's cleaned data ({} without a form)."""
        form_class = confirmation.form_class or forms.Form
        if request.POST.get("post") == "yes":
            form = form_class(request.POST)
            if form.is_valid():
                return dict(form.cleaned_data)
        else:
            form = form_class(initial=initial)
        context = {
            **self.admin_site.each_context(request),
            "title": confirmation.title,
            "question": confirmation.question,
            "button": confirmation.button,
            "danger": confirmation.danger,
            "form": form,
            "queryset": queryset,
            "action": request.POST.get("action", ""),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            "next": self._next_url(request),
            "opts": self.opts,
            "media": self.media + form.media,
        }
        return TemplateResponse(
            request, "admin/gateway/action_confirmation.html", context
        )

    def action_done(self, request: HttpRequest) -> HttpResponseRedirect | None:
        """Back to the page the action was started from (a change page), or
        None for the changelist."""
        next_url = self._next_url(request)
        return HttpResponseRedirect(next_url) if next_url else None

    def _next_url(self, request: HttpRequest) -> str:
        next_url = request.POST.get("next", "")
        safe = url_has_allowed_host_and_scheme(
            next_url,
            allowed_hosts={request.get_host()},
            require_https=request.is_secure(),
        )
        return next_url if safe else ""

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

    def save_related(
        self, request: HttpRequest, form: Any, formsets: Any, change: bool
    ) -> None:
        super().save_related(request, form, formsets, change)
        if self.changes_routing:
            routing_changed()

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        with transaction.atomic():
            self._audit(request, "delete", obj, {})
            super().delete_model(request, obj)
            if self.changes_routing:
                routing_changed()

    def delete_queryset(self, request: HttpRequest, queryset: Any) -> None:
        with transaction.atomic():
            for obj in queryset:
                self._audit(request, "delete", obj, {})
            super().delete_queryset(request, queryset)
