from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from accounts.admin_base import AuditedAdmin, ReadOnlyAdmin, format_micros
from billing.models import (
    CreditAccount,
    Job,
    LedgerEntry,
    ModelPrice,
    RollupState,
    UsageRecord,
    UsageRollup,
)


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
