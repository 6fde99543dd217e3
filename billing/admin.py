import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

from django import forms
from django.contrib import admin
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from accounts.admin_base import (
    AuditedAdmin,
    Confirmation,
    ObjectAction,
    ReadOnlyAdmin,
    format_micros,
    operator,
)
from accounts.services import audit_log_record
from billing.analytics import usage_series
from billing.models import (
    CreditAccount,
    Job,
    LedgerEntry,
    LedgerEntryType,
    ModelPrice,
    RollupState,
    UsageRecord,
    UsageRollup,
)
from billing.reconciliation import credit_account_reconcile
from billing.services import credits_allocate
from gateway_project.admin_site import PERIODS, period_bounds, usage_charts
from gateway_project.middleware import client_ip
from gateway_project.money import from_micros, to_micros
from tenants.admin import TeamAdmin
from tenants.models import Status, Team

RECENT_USAGE_ROWS = 10


def accounts_reconcile(request: HttpRequest, accounts: QuerySet[CreditAccount]) -> str:
    """Reconcile each account with its ledger now; audited as the operator's
    request (a repair is audited by the service too). Returns a summary."""
    repaired: list[str] = []
    matching: list[str] = []
    for account in accounts.select_related("team").order_by("pk"):
        with transaction.atomic():
            result = credit_account_reconcile(account_id=account.pk)
            audit_log_record(
                actor=operator(request),
                action="credits.reconcile",
                resource_type="team",
                resource_id=account.team.team_id,
                details={"via": "admin", "drift": result["drift"]},
                ip_address=client_ip(request),
            )
        (repaired if result["drift"] else matching).append(account.team.team_id)
    parts = []
    if repaired:
        parts.append(f"repaired {len(repaired)}: {', '.join(repaired)}")
    if matching:
        parts.append(f"{len(matching)} already matched their ledger")
    return f"Reconciled {len(repaired) + len(matching)} account(s): " + (
        "; ".join(parts) or "none"
    )


class CreditsAddForm(forms.Form):
    credits = forms.DecimalField(
        min_value=Decimal("0.000001"),
        max_digits=18,
        decimal_places=6,
        help_text="Added to each selected team's balance, as a top-up.",
    )
    reason = forms.CharField(max_length=500, required=False)
    # One top-up per confirmation page: the ledger's idempotency key, so that
    # submitting the page twice adds the credits once.
    token = forms.CharField(widget=forms.HiddenInput, max_length=64)


@admin.register(CreditAccount)
class CreditAccountAdmin(AuditedAdmin):
    """Balances move only through the ledger; here only the overdraft limit
    and the auto-refill settings are editable."""

    audit_resource_type = "credit_account"
    list_display = (
        "team",
        "balance",
        "held",
        "overdraft",
        "allocated",
        "used",
        "updated_at",
    )
    search_fields = ("team__team_id",)
    list_select_related = ("team",)
    fields = (
        "team",
        "balance",
        "held",
        "allocated",
        "used",
        "overdraft_limit_micros",
        "auto_refill_amount_micros",
        "auto_refill_period",
        "updated_at",
    )
    readonly_fields = ("team", "balance", "held", "allocated", "used", "updated_at")
    actions = ["reconcile_accounts"]

    def get_object_actions(self, request: HttpRequest, obj: Any) -> list[ObjectAction]:
        return [ObjectAction("Reconcile now", action="reconcile_accounts")]

    @admin.action(description="Reconcile selected accounts now", permissions=["change"])
    def reconcile_accounts(
        self, request: HttpRequest, queryset: QuerySet[CreditAccount]
    ) -> HttpResponse | None:
        self.message_user(request, accounts_reconcile(request, queryset))
        return self.action_done(request)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(ordering="balance_micros")
    def balance(self, obj: CreditAccount) -> str:
        return format_micros(obj.balance_micros)

    @admin.display(ordering="held_micros")
    def held(self, obj: CreditAccount) -> str:
        return format_micros(obj.held_micros)

    @admin.display(description="overdraft limit")
    def overdraft(self, obj: CreditAccount) -> str:
        return format_micros(obj.overdraft_limit_micros)

    @admin.display(description="allocated (lifetime)")
    def allocated(self, obj: CreditAccount) -> str:
        return format_micros(obj.allocated_total_micros)

    @admin.display(description="used (lifetime)")
    def used(self, obj: CreditAccount) -> str:
        return format_micros(obj.used_total_micros)


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "team",
        "entry_type",
        "amount",
        "held_delta",
        "balance_after",
        "reason",
        "request_id",
        "actor_label",
    )
    list_filter = ("entry_type",)
    search_fields = (
        "idempotency_key",
        "request_id",
        "account__team__team_id",
        "reason",
    )
    date_hierarchy = "created_at"
    list_select_related = ("account__team",)
    readonly_fields = [f.name for f in LedgerEntry._meta.fields]

    @admin.display(ordering="account__team__team_id")
    def team(self, obj: LedgerEntry) -> str:
        return obj.account.team.team_id

    @admin.display(ordering="amount_micros")
    def amount(self, obj: LedgerEntry) -> str:
        return format_micros(obj.amount_micros)

    @admin.display(description="held Δ")
    def held_delta(self, obj: LedgerEntry) -> str:
        return format_micros(obj.held_delta_micros)

    @admin.display(description="balance after")
    def balance_after(self, obj: LedgerEntry) -> str:
        return format_micros(obj.balance_after_micros)


@admin.register(ModelPrice)
class ModelPriceAdmin(AuditedAdmin):
    changes_routing = True
    audit_resource_type = "model_price"
    list_display = (
        "model",
        "input_price_per_million_micros",
        "output_price_per_million_micros",
        "effective_from",
        "source",
        "note",
    )
    list_filter = ("source",)
    search_fields = ("model", "note")
    date_hierarchy = "effective_from"
    readonly_fields = ("created_by", "created_at")

    def save_model(
        self, request: HttpRequest, obj: Any, form: Any, change: bool
    ) -> None:
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    list_display = (
        "created_at",
        "request_id",
        "team",
        "model_group",
        "deployment",
        "status",
        "total_tokens",
        "cost",
        "credits",
        "latency_ms",
        "cached",
    )
    list_filter = ("status", "cached", "usage_source", "endpoint")
    search_fields = ("request_id", "team__team_id", "requested_model", "provider_model")
    date_hierarchy = "created_at"
    list_select_related = ("team", "model_group", "deployment")
    readonly_fields = [f.name for f in UsageRecord._meta.fields]

    @admin.display(ordering="cost_micros", description="cost (USD)")
    def cost(self, obj: UsageRecord) -> str:
        return format_micros(obj.cost_micros)

    @admin.display(ordering="credits_micros")
    def credits(self, obj: UsageRecord) -> str:
        return format_micros(obj.credits_micros)


@admin.register(UsageRollup)
class UsageRollupAdmin(ReadOnlyAdmin):
    """Hourly and daily aggregates written by the usage rollup task."""

    list_display = (
        "bucket_start",
        "granularity",
        "team",
        "virtual_key",
        "model_group",
        "deployment",
        "requests",
        "errors",
        "total_tokens",
        "cost",
        "credits",
    )
    list_filter = ("granularity",)
    search_fields = ("team__team_id", "organization__organization_id")
    date_hierarchy = "bucket_start"
    list_select_related = ("team", "virtual_key", "model_group", "deployment")
    readonly_fields = [f.name for f in UsageRollup._meta.fields]

    @admin.display(ordering="cost_micros", description="cost (USD)")
    def cost(self, obj: UsageRollup) -> str:
        return format_micros(obj.cost_micros)

    @admin.display(ordering="credits_micros")
    def credits(self, obj: UsageRollup) -> str:
        return format_micros(obj.credits_micros)


@admin.register(RollupState)
class RollupStateAdmin(ReadOnlyAdmin):
    list_display = ("name", "rolled_up_until", "days_rolled_up_until", "updated_at")
    readonly_fields = [f.name for f in RollupState._meta.fields]


@admin.register(Job)
class JobAdmin(ReadOnlyAdmin):
    list_display = (
        "job_id",
        "team",
        "job_type",
        "status",
        "total_calls",
        "total_tokens",
        "credits_charged",
        "created_at",
        "completed_at",
    )
    list_filter = ("status", "job_type")
    search_fields = ("job_id", "team__team_id", "user_id", "job_type")
    date_hierarchy = "created_at"
    list_select_related = ("team",)
    readonly_fields = [f.name for f in Job._meta.fields]

    @admin.display(ordering="credits_charged_micros", description="credits charged")
    def credits_charged(self, obj: Job) -> str:
        return format_micros(obj.credits_charged_micros)


# The team screen of tenants/admin.py, with what belongs to billing: credits,
# reconciliation and usage (tenants may not import billing).
admin.site.unregister(Team)


@admin.register(Team)
class TeamBillingAdmin(TeamAdmin):
    actions = [*TeamAdmin.actions, "add_credits", "reconcile_credits"]
    fieldsets = [
        *TeamAdmin.fieldsets[:2],
        ("Usage", {"fields": ("usage_chart", "recent_usage")}),
        *TeamAdmin.fieldsets[2:],
    ]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return (
            *super().get_readonly_fields(request, obj),
            "usage_chart",
            "recent_usage",
        )

    def get_object_actions(self, request: HttpRequest, obj: Any) -> list[ObjectAction]:
        actions = super().get_object_actions(request, obj)
        if obj.status != Status.DELETED:
            actions += [
                ObjectAction("Add credits", action="add_credits"),
                ObjectAction("Reconcile credits", action="reconcile_credits"),
            ]
        return actions

    @admin.action(description="Add credits to selected teams", permissions=["change"])
    def add_credits(
        self, request: HttpRequest, queryset: QuerySet[Team]
    ) -> HttpResponse | None:
        confirmed = self.confirm(
            request,
            queryset,
            Confirmation(
                title="Add credits",
                question="Add credits to these teams:",
                button="Add credits",
                form_class=CreditsAddForm,
                danger=False,
            ),
            initial={"token": uuid.uuid4().hex},
        )
        if not isinstance(confirmed, dict):
            return confirmed
        amount = to_micros(confirmed["credits"])
        added = []
        for team in queryset.exclude(status=Status.DELETED).order_by("team_id"):
            credits_allocate(
                team=team,
                amount_micros=amount,
                idempotency_key=f"team:{team.pk}:admin:{confirmed['token']}",
                reason=confirmed["reason"],
                entry_type=LedgerEntryType.TOP_UP,
                actor=operator(request),
            )
            added.append(team.team_id)
        self.message_user(
            request,
            f"Added {format_micros(amount)} credits to {len(added)} team(s): "
            f"{', '.join(added)}.",
        )
        return self.action_done(request)

    @admin.action(
        description="Reconcile credits of selected teams now", permissions=["change"]
    )
    def reconcile_credits(
        self, request: HttpRequest, queryset: QuerySet[Team]
    ) -> HttpResponse | None:
        accounts = CreditAccount.objects.filter(team__in=queryset)
        self.message_user(request, accounts_reconcile(request, accounts))
        return self.action_done(request)

    @admin.display(description="usage")
    def usage_chart(self, obj: Team) -> SafeString:
        charts = []
        for key, names in (("24h", ["requests"]), ("30d", ["credits"])):
            period = PERIODS[key]
            start, end = period_bounds(period, timezone.now())
            points = usage_series(
                granularity=period.granularity, start=start, end=end, team=obj
            )
            charts += [
                (f"{caption}, {period.label.lower()}", chart)
                for caption, chart in usage_charts(
                    points, period.granularity, prefix=f"team-{key}", names=names
                )
            ]
        return format_html(
            '<div class="gateway-charts">{}</div>',
            format_html_join(
                "",
                "<figure><figcaption>{}</figcaption>{}</figure>",
                charts,
            ),
        )

    @admin.display(description="recent usage")
    def recent_usage(self, obj: Team) -> SafeString:
        since = timezone.now() - timedelta(days=30)
        records = (
            UsageRecord.objects.filter(team=obj, created_at__gte=since)
            .select_related("model_group", "deployment")
            .order_by("-created_at")[:RECENT_USAGE_ROWS]
        )
        rows = format_html_join(
            "",
            '<tr><td>{}</td><td><a href="{}">{}</a></td><td>{}</td><td>{}</td>'
            "<td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td></tr>",
            (
                (
                    record.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                    reverse("admin:billing_usagerecord_change", args=[record.pk]),
                    record.request_id,
                    record.model_group or "—",
                    record.deployment or "—",
                    record.status + (" (cache)" if record.cached else ""),
                    record.total_tokens,
                    f"${from_micros(record.cost_micros)}",
                    format_micros(record.credits_micros),
                    record.latency_ms,
                )
                for record in records
            ),
        )
        url = (
            reverse("admin:billing_usagerecord_changelist")
            + f"?team__id__exact={obj.pk}"
        )
        return format_html(
            '<table id="recent-usage"><thead><tr><th>time</th><th>request</th>'
            "<th>model group</th><th>deployment</th><th>status</th><th>tokens</th>"
            "<th>cost</th><th>credits</th><th>latency</th></tr></thead>"
            '<tbody>{}</tbody></table><a href="{}">All usage records</a>',
            rows or format_html('<tr><td colspan="9">{}</td></tr>', "No usage yet"),
            url,
        )
