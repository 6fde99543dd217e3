from typing import Any, cast

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from accounts.admin_base import AuditedAdmin, format_micros
from accounts.models import User
from gateway_project.middleware import client_ip
from tenants.key_cache import key_cache_invalidate_on_commit
from tenants.models import Organization, Team, VirtualKey
from tenants.services import virtual_key_issue, virtual_key_revoke


class KeyCacheAdmin(AuditedAdmin):
    """Saves and deletes of organizations, teams and keys invalidate the key
    cache after commit, like the services do."""

    def save_related(
        self, request: HttpRequest, form: Any, formsets: Any, change: bool
    ) -> None:
        super().save_related(request, form, formsets, change)
        key_cache_invalidate_on_commit()

    def delete_model(self, request: HttpRequest, obj: Any) -> None:
        super().delete_model(request, obj)
        key_cache_invalidate_on_commit()

    def delete_queryset(self, request: HttpRequest, queryset: Any) -> None:
        super().delete_queryset(request, queryset)
        key_cache_invalidate_on_commit()


LIMIT_FIELDS = (
    "rpm_limit",
    "tpm_limit",
    "max_parallel_requests",
    "budget_limit_micros",
    "budget_period",
    "budget_period_seconds",
)


@admin.register(Organization)
class OrganizationAdmin(KeyCacheAdmin):
    audit_resource_type = "organization"
    list_display = ("organization_id", "name", "status", "team_count", "created_at")
    list_filter = ("status",)
    search_fields = ("organization_id", "name")
    readonly_fields = (
        "budget_window_start",
        "budget_spent_micros",
        "created_at",
        "updated_at",
    )
    fieldsets = [
        (None, {"fields": ("organization_id", "name", "status", "metadata")}),
        ("Limits and budget", {"fields": LIMIT_FIELDS, "classes": ["collapse"]}),
        (
            "State",
            {
                "fields": (
                    "budget_window_start",
                    "budget_spent_micros",
                    "created_at",
                    "updated_at",
                )
            },
        ),
    ]

    def get_queryset(self, request: HttpRequest) -> QuerySet[Organization]:
        return super().get_queryset(request).annotate(team_count=Count("teams"))

    @admin.display(ordering="team_count", description="teams")
    def team_count(self, obj: Any) -> int:
        return obj.team_count


class VirtualKeyInline(admin.TabularInline):
    """Keys of a team, read-only: keys are issued from the key screen, which
    shows the secret once."""

    model = VirtualKey
    fields = ("display_prefix", "alias", "status", "expires_at", "last_used_at")
    readonly_fields = fields
    extra = 0
    show_change_link = True
    can_delete = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Team)
class TeamAdmin(KeyCacheAdmin):
    audit_resource_type = "team"
    list_display = (
        "team_id",
        "team_alias",
        "organization",
        "status",
        "budget_mode",
        "credit_balance",
        "created_at",
    )
    list_filter = ("status", "budget_mode", "organization")
    search_fields = ("team_id", "team_alias", "organization__organization_id")
    list_select_related = ("organization", "credit_account")
    filter_horizontal = ("model_groups",)
    inlines = [VirtualKeyInline]
    readonly_fields = (
        "credits",
        "recent_ledger",
        "budget_window_start",
        "budget_spent_micros",
        "quota_period_start",
        "quota_requests_used",
        "created_at",
        "updated_at",
    )
    fieldsets = [
        (
            None,
            {
                "fields": (
                    "team_id",
                    "organization",
                    "team_alias",
                    "status",
                    "model_groups",
                    "metadata",
                )
            },
        ),
        (
            "Credits",
            {
                "fields": (
                    "credits",
                    "budget_mode",
                    "credits_per_dollar",
                    "tokens_per_credit",
                    "price_markup_bps",
                    "recent_ledger",
                )
            },
        ),
        (
            "Limits, budget and quota",
            {
                "fields": (*LIMIT_FIELDS, "monthly_request_quota"),
                "classes": ["collapse"],
            },
        ),
        (
            "Response cache",
            {
                "fields": (
                    "cache_mode",
                    "cache_ttl_seconds",
                    "cache_hit_charge",
                    "cache_hit_price_bps",
                ),
                "classes": ["collapse"],
            },
        ),
        (
            "State",
            {
                "fields": (
                    "budget_window_start",
                    "budget_spent_micros",
                    "quota_period_start",
                    "quota_requests_used",
                    "created_at",
                    "updated_at",
                )
            },
        ),
    ]

    @admin.display(ordering="credit_account__balance_micros", description="credits")
    def credit_balance(self, obj: Team) -> str:
        account = getattr(obj, "credit_account", None)
        return format_micros(account.balance_micros if account else None)

    @admin.display(description="credit account")
    def credits(self, obj: Team) -> str:
        account = getattr(obj, "credit_account", None)
        if account is None:
            return "no credit account"
        return format_html(
            "balance {} · held {} · overdraft limit {} · allocated {} · used {}",
            format_micros(account.balance_micros),
            format_micros(account.held_micros),
            format_micros(account.overdraft_limit_micros),
            format_micros(account.allocated_total_micros),
            format_micros(account.used_total_micros),
        )

    @admin.display(description="recent ledger")
    def recent_ledger(self, obj: Team) -> str:
        account = getattr(obj, "credit_account", None)
        if account is None:
            return "—"
        entries = account.entries.order_by("-id")[:20]
        rows = format_html_join(
            "",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    e.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                    e.entry_type,
                    format_micros(e.amount_micros),
                    format_micros(e.balance_after_micros),
                    e.reason or e.request_id,
                )
                for e in entries
            ),
        )
        url = (
            reverse("admin:billing_ledgerentry_changelist")
            + f"?account__id__exact={account.pk}"
        )
        return format_html(
            "<table><thead><tr><th>time</th><th>type</th><th>amount</th><th>balance after</th>"
            "<th>reason / request</th></tr></thead><tbody>{}</tbody></table>"
            '<a href="{}">All entries</a>',
            rows,
            url,
        )


class VirtualKeyAddForm(forms.ModelForm):
    class Meta:
        model = VirtualKey
        fields = ("team", "alias", "expires_at")


@admin.register(VirtualKey)
class VirtualKeyAdmin(KeyCacheAdmin):
    audit_resource_type = "virtual_key"
    list_display = (
        "display_prefix",
        "alias",
        "team",
        "status",
        "expires_at",
        "last_used_at",
        "created_at",
    )
    list_filter = ("status",)
    search_fields = ("display_prefix", "alias", "team__team_id")
    list_select_related = ("team",)
    filter_horizontal = ("allowed_model_groups",)
    actions = ["revoke_keys"]
    readonly_fields = (
        "display_prefix",
        "team",
        "status",
        "predecessor",
        "grace_until",
        "revoked_at",
        "last_used_at",
        "budget_window_start",
        "budget_spent_micros",
        "quota_period_start",
        "quota_requests_used",
        "created_by",
        "created_at",
        "updated_at",
    )
    fieldsets = [
        (
            None,
            {
                "fields": (
                    "display_prefix",
                    "team",
                    "alias",
                    "status",
                    "expires_at",
                    "allowed_model_groups",
                    "metadata",
                )
            },
        ),
        (
            "Limits, budget and quota",
            {
                "fields": (*LIMIT_FIELDS, "monthly_request_quota"),
                "classes": ["collapse"],
            },
        ),
        (
            "History",
            {
                "fields": (
                    "predecessor",
                    "grace_until",
                    "revoked_at",
                    "last_used_at",
                    "budget_window_start",
                    "budget_spent_micros",
                    "quota_period_start",
                    "quota_requests_used",
                    "created_by",
                    "created_at",
                    "updated_at",
                )
            },
        ),
    ]

    def get_form(
        self, request: HttpRequest, obj: Any = None, change: bool = False, **kwargs: Any
    ) -> Any:
        if obj is None:
            kwargs["form"] = VirtualKeyAddForm
            kwargs["fields"] = VirtualKeyAddForm.Meta.fields
        return super().get_form(request, obj, change, **kwargs)

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        if obj is None:
            return [(None, {"fields": VirtualKeyAddForm.Meta.fields})]
        return super().get_fieldsets(request, obj)

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return () if obj is None else self.readonly_fields

    def save_model(
        self, request: HttpRequest, obj: Any, form: Any, change: bool
    ) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        # Issued through the service so the secret is generated, digested and
        # shown exactly once, here.
        key, plaintext = virtual_key_issue(
            team=form.cleaned_data["team"],
            alias=form.cleaned_data["alias"],
            expires_at=form.cleaned_data["expires_at"],
            actor=cast(User, request.user),
        )
        # The admin goes on with `obj` (messages, redirect): make it the issued row.
        obj.pk = key.pk
        obj.refresh_from_db()
        obj._state.adding = False
        messages.warning(
            request, f"Copy the new key now, it will not be shown again: {plaintext}"
        )

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_keys(self, request: HttpRequest, queryset: QuerySet[VirtualKey]) -> None:
        count = 0
        for key in queryset:
            if virtual_key_revoke(
                key=key, actor=cast(User, request.user), ip_address=client_ip(request)
            ):
                count += 1
        self.message_user(request, f"Revoked {count} key(s).")
