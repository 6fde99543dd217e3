"""Inputs and outputs of the team and credit APIs (seed 000)."""

from decimal import Decimal
from typing import Any

from rest_framework import serializers

from accounts.api.serializers import StrictSerializer
from billing.models import CreditAccount, LedgerEntry
from gateway_project.inputs import MetadataField
from gateway_project.money import credits_json
from tenants.api.serializers import LIFECYCLE_STATUSES, LimitsInput, limits_output
from tenants.models import (
    BudgetMode,
    BudgetPeriod,
    CacheHitCharge,
    CacheMode,
    Team,
    identifier_validator,
)


class WholeCredits(serializers.IntegerField):
    """A whole number of credits: 10 or "10", never 1.5, "1.5", true or 1e3."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool | float):
            self.fail("invalid")
        if isinstance(data, str) and not data.strip().lstrip("-").isdigit():
            self.fail("invalid")
        return int(super().to_internal_value(data))


class TeamSettingsInput(LimitsInput):
    """Everything about a team an operator may set (create and update)."""

    team_alias = serializers.CharField(max_length=200, required=False, allow_blank=True)
    budget_mode = serializers.ChoiceField(choices=BudgetMode.choices, required=False)
    credits_per_dollar = serializers.DecimalField(
        max_digits=12, decimal_places=4, min_value=Decimal(0), required=False
    )
    tokens_per_credit = serializers.IntegerField(min_value=1, required=False)
    price_markup_bps = serializers.IntegerField(
        min_value=0, max_value=100_000, required=False
    )
    monthly_request_quota = serializers.IntegerField(
        min_value=1, required=False, allow_null=True
    )
    cache_mode = serializers.ChoiceField(choices=CacheMode.choices, required=False)
    cache_ttl_seconds = serializers.IntegerField(
        min_value=1, max_value=30 * 86400, required=False
    )
    cache_hit_charge = serializers.ChoiceField(
        choices=CacheHitCharge.choices, required=False
    )
    cache_hit_price_bps = serializers.IntegerField(
        min_value=0, max_value=10_000, required=False
    )
    metadata = MetadataField(required=False)
    model_groups = serializers.ListField(
        child=serializers.CharField(max_length=200), required=False
    )


class TeamCreateInput(TeamSettingsInput):
    organization_id = serializers.CharField(max_length=128)
    team_id = serializers.CharField(max_length=128, validators=[identifier_validator])
    # Seed 000 sends access_groups in some versions; it means model_groups.
    access_groups = serializers.ListField(
        child=serializers.CharField(max_length=200), required=False
    )
    credits_allocated = WholeCredits(min_value=0, default=0)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        attrs = super().validate(attrs)
        if "access_groups" in attrs:
            synonyms = attrs.pop("access_groups")
            attrs["model_groups"] = attrs.get("model_groups", []) + [
                name for name in synonyms if name not in attrs.get("model_groups", [])
            ]
        return attrs


class TeamUpdateInput(TeamSettingsInput):
    status = serializers.ChoiceField(choices=LIFECYCLE_STATUSES, required=False)


class CreditsAddInput(StrictSerializer):
    credits = WholeCredits(min_value=1, max_value=10**12)
    reason = serializers.CharField(
        max_length=500, required=False, default="", allow_blank=True
    )
    idempotency_key = serializers.CharField(max_length=100, required=False)


class TransactionsQuery(serializers.Serializer):  # type: ignore[type-arg]
    limit = serializers.IntegerField(min_value=1, max_value=1000, default=50)


class CreditsCheckQuery(serializers.Serializer):  # type: ignore[type-arg]
    credits_needed = serializers.DecimalField(
        max_digits=18, decimal_places=6, min_value=Decimal(0)
    )


class BudgetModeInput(StrictSerializer):
    budget_mode = serializers.ChoiceField(choices=BudgetMode.choices)
    credits_per_dollar = serializers.DecimalField(
        max_digits=12, decimal_places=4, min_value=Decimal(0), required=False
    )
    tokens_per_credit = serializers.IntegerField(min_value=1, required=False)


class AutoRefillInput(StrictSerializer):
    amount = WholeCredits(min_value=1, allow_null=True)
    period = serializers.ChoiceField(
        choices=[BudgetPeriod.DAILY, BudgetPeriod.WEEKLY, BudgetPeriod.MONTHLY]
    )
    overdraft_limit = WholeCredits(min_value=0, required=False)


def rate_output(value: Decimal | int) -> str:
    """A conversion rate as a fixed four-decimal string, however it was loaded."""
    return str(Decimal(value).quantize(Decimal("0.0001")))


def balance_output(team: Team, account: CreditAccount) -> dict[str, Any]:
    return {
        "team_id": team.team_id,
        "organization_id": team.organization.organization_id,
        "credits_allocated": credits_json(account.allocated_total_micros),
        "credits_used": credits_json(account.used_total_micros),
        "credits_remaining": credits_json(account.balance_micros),
        "credits_held": credits_json(account.held_micros),
        "overdraft_limit": credits_json(account.overdraft_limit_micros),
        "budget_mode": team.budget_mode,
        "credits_per_dollar": rate_output(team.credits_per_dollar),
        "tokens_per_credit": team.tokens_per_credit,
        "auto_refill": {
            "amount": None
            if account.auto_refill_amount_micros is None
            else credits_json(account.auto_refill_amount_micros),
            "period": account.auto_refill_period or None,
        },
    }


def team_output(team: Team, account: CreditAccount) -> dict[str, Any]:
    return {
        "team_id": team.team_id,
        "organization_id": team.organization.organization_id,
        "team_alias": team.team_alias,
        "status": team.status,
        "model_groups": sorted(group.group_name for group in team.model_groups.all()),
        "credits_allocated": credits_json(account.allocated_total_micros),
        "credits_remaining": credits_json(account.balance_micros),
        "credits_used": credits_json(account.used_total_micros),
        "budget_mode": team.budget_mode,
        "credits_per_dollar": rate_output(team.credits_per_dollar),
        "tokens_per_credit": team.tokens_per_credit,
        "price_markup_bps": team.price_markup_bps,
        **limits_output(team),
        "monthly_request_quota": team.monthly_request_quota,
        "cache_mode": team.cache_mode,
        "cache_ttl_seconds": team.cache_ttl_seconds,
        "cache_hit_charge": team.cache_hit_charge,
        "cache_hit_price_bps": team.cache_hit_price_bps,
        "metadata": team.metadata,
        "created_at": team.created_at.isoformat(),
        "updated_at": team.updated_at.isoformat(),
    }


def transaction_output(entry: LedgerEntry) -> dict[str, Any]:
    return {
        "transaction_id": entry.pk,
        "type": entry.entry_type,
        "credits": credits_json(entry.amount_micros),
        "credits_held_change": credits_json(entry.held_delta_micros),
        "balance_before": credits_json(entry.balance_before_micros),
        "balance_after": credits_json(entry.balance_after_micros),
        "reason": entry.reason,
        "request_id": entry.request_id or None,
        "job_id": str(entry.job_id) if entry.job_id else None,
        "actor": entry.actor_label,
        "created_at": entry.created_at.isoformat(),
    }
