import uuid
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from accounts.admin_base import (
    AuditedAdmin,
    Confirmation,
    ObjectAction,
    format_micros,
    operator,
)
from gateway_project.errors import GatewayError
from gateway_project.middleware import client_ip
from tenants.key_cache import key_cache_invalidate_on_commit
from tenants.models import KeyStatus, Organization, Status, Team, VirtualKey
from tenants.services import (
    MAX_GRACE_SECONDS,
    key_state,
    team_update,
    virtual_key_issue,
    virtual_key_revoke,
    virtual_key_rotate,
)


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
    actions = ["suspend_teams", "resume_teams"]
    readonly_fields = (
        # Suspend and resume are actions, through team_update (audited, and
        # the key cache invalidated), never a bare field edit.
        "status",
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

    def get_object_actions(self, request: HttpRequest, obj: Any) -> list[ObjectAction]:
        actions = []
        if obj.status == Status.ACTIVE:
            actions.append(ObjectAction("Suspend", action="suspend_teams", danger=True))
        if obj.status == Status.SUSPENDED:
            actions.append(ObjectAction("Resume", action="resume_teams"))
        if obj.status != Status.DELETED:
            add_key = reverse("admin:tenants_virtualkey_add") + f"?team={obj.pk}"
            actions.append(ObjectAction("Issue a key", url=add_key))
        return actions

    def _set_status(
        self, request: HttpRequest, teams: QuerySet[Team], *, before: str, after: str
    ) -> list[str]:
        changed = []
        for team in teams.filter(status=before).order_by("team_id"):
            team_update(team=team, changes={"status": after}, actor=operator(request))
            changed.append(team.team_id)
        return changed

    @admin.action(description="Suspend selected teams", permissions=["change"])
    def suspend_teams(
        self, request: HttpRequest, queryset: QuerySet[Team]
    ) -> HttpResponse | None:
        confirmed = self.confirm(
            request,
            queryset,
            Confirmation(
                title="Suspend teams",
                question="Suspend these teams? Their keys stop working at once, "
                "until the team is resumed.",
                button="Yes, suspend",
            ),
        )
        if not isinstance(confirmed, dict):
            return confirmed
        suspended = self._set_status(
            request, queryset, before=Status.ACTIVE, after=Status.SUSPENDED
        )
        self.message_user(
            request, f"Suspended {len(suspended)} team(s): {', '.join(suspended)}."
        )
        return self.action_done(request)

    @admin.action(description="Resume selected teams", permissions=["change"])
    def resume_teams(
        self, request: HttpRequest, queryset: QuerySet[Team]
    ) -> HttpResponse | None:
        resumed = self._set_status(
            request, queryset, before=Status.SUSPENDED, after=Status.ACTIVE
        )
        self.message_user(
            request, f"Resumed {len(resumed)} team(s): {', '.join(resumed)}."
        )
        return self.action_done(request)

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


class KeyRotateForm(forms.Form):
    grace_seconds = forms.IntegerField(
        min_value=0,
        max_value=MAX_GRACE_SECONDS,
        initial=3600,
        label="Grace period (seconds)",
        help_text="How long the old key keeps working next to the new one.",
    )
    # One rotation per confirmation page: a resubmitted form returns the same
    # successor instead of rotating twice.
    token = forms.CharField(widget=forms.HiddenInput, max_length=64)


SHOW_ONCE = "Copy the new key now, it will not be shown again: {}"


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
    actions = ["rotate_keys", "revoke_keys"]
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
            actor=operator(request),
        )
        # The admin goes on with `obj` (messages, redirect): make it the issued row.
        obj.pk = key.pk
        obj.refresh_from_db()
        obj._state.adding = False
        messages.warning(request, SHOW_ONCE.format(plaintext))

    def get_object_actions(self, request: HttpRequest, obj: Any) -> list[ObjectAction]:
        actions = []
        if key_state(obj) == "valid" and obj.grace_until is None:
            actions.append(ObjectAction("Rotate", action="rotate_keys"))
        if obj.status != KeyStatus.REVOKED:
            actions.append(ObjectAction("Revoke", action="revoke_keys", danger=True))
        return actions

    @admin.action(description="Rotate selected keys", permissions=["change"])
    def rotate_keys(
        self, request: HttpRequest, queryset: QuerySet[VirtualKey]
    ) -> HttpResponse | None:
        confirmed = self.confirm(
            request,
            queryset,
            Confirmation(
                title="Rotate keys",
                question="Issue a new secret for these keys? Each new key is "
                "shown once; the old one stops working after the grace period.",
                button="Yes, rotate",
                form_class=KeyRotateForm,
            ),
            initial={"token": uuid.uuid4().hex},
        )
        if not isinstance(confirmed, dict):
            return confirmed
        for key in queryset.select_related("team").order_by("pk"):
            try:
                successor, plaintext = virtual_key_rotate(
                    key=key,
                    grace_seconds=confirmed["grace_seconds"],
                    idempotency_key=f"admin:{confirmed['token']}",
                    actor=operator(request),
                )
            except GatewayError as error:
                self.message_user(
                    request,
                    f"Key {key.display_prefix} was not rotated: {error.message}",
                    messages.ERROR,
                )
                continue
            messages.warning(
                request,
                f"Rotated {key.display_prefix} to {successor.display_prefix}. "
                + SHOW_ONCE.format(plaintext),
            )
        return self.action_done(request)

    @admin.action(description="Revoke selected keys", permissions=["change"])
    def revoke_keys(
        self, request: HttpRequest, queryset: QuerySet[VirtualKey]
    ) -> HttpResponse | None:
        confirmed = self.confirm(
            request,
            queryset,
            Confirmation(
                title="Revoke keys",
                question="Revoke these keys? They stop working at once, on every "
                "instance, and cannot be brought back.",
                button="Yes, revoke",
            ),
        )
        if not isinstance(confirmed, dict):
            return confirmed
        revoked = [
            key.display_prefix
            for key in queryset.select_related("team").order_by("pk")
            if virtual_key_revoke(
                key=key, actor=operator(request), ip_address=client_ip(request)
            )
        ]
        self.message_user(
            request, f"Revoked {len(revoked)} key(s): {', '.join(revoked)}."
        )
        return self.action_done(request)
