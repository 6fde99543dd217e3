"""Inputs and outputs of the organization, team and key APIs."""

from decimal import Decimal
from typing import Any

from rest_framework import serializers

from accounts.api.serializers import StrictSerializer
from gateway_project.inputs import MetadataField
from gateway_project.money import credits_json, to_micros
from tenants.models import (
    BudgetPeriod,
    LimitedEntity,
    Organization,
    Status,
    VirtualKey,
    identifier_validator,
)

LIFECYCLE_STATUSES = [Status.ACTIVE, Status.SUSPENDED]


class LimitsInput(StrictSerializer):
    """Rate limits and a USD budget (``max_budget`` in dollars, up to 6 decimals)."""

    rpm_limit = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    tpm_limit = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    max_parallel_requests = serializers.IntegerField(
        min_value=1, required=False, allow_null=True
    )
    max_budget = serializers.DecimalField(
        max_digits=18,
        decimal_places=6,
        min_value=Decimal(0),
        required=False,
        allow_null=True,
    )
    budget_period = serializers.ChoiceField(
        choices=BudgetPeriod.choices, required=False
    )
    budget_period_seconds = serializers.IntegerField(
        min_value=60, required=False, allow_null=True
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs.get("budget_period") == BudgetPeriod.DURATION and not attrs.get(
            "budget_period_seconds"
        ):
            raise serializers.ValidationError(
                {
                    "budget_period_seconds": [
                        "Required when budget_period is 'duration'."
                    ]
                }
            )
        return attrs


def model_fields(data: dict[str, Any]) -> dict[str, Any]:
    """API names → model fields (``max_budget`` dollars → micro-USD)."""
    fields = dict(data)
    if "max_budget" in fields:
        budget = fields.pop("max_budget")
        fields["budget_limit_micros"] = None if budget is None else to_micros(budget)
    return fields


def limits_output(entity: LimitedEntity) -> dict[str, Any]:
    return {
        "rpm_limit": entity.rpm_limit,
        "tpm_limit": entity.tpm_limit,
        "max_parallel_requests": entity.max_parallel_requests,
        "max_budget": None
        if entity.budget_limit_micros is None
        else credits_json(entity.budget_limit_micros),
        "budget_period": entity.budget_period or None,
        "budget_period_seconds": entity.budget_period_seconds,
        "spend": credits_json(entity.budget_spent_micros),
    }


class OrganizationCreateInput(StrictSerializer):
    organization_id = serializers.CharField(
        max_length=128, validators=[identifier_validator]
    )
    name = serializers.CharField(max_length=200)
    metadata = MetadataField(required=False, default=dict)


class OrganizationUpdateInput(LimitsInput):
    name = serializers.CharField(max_length=200, required=False)
    status = serializers.ChoiceField(choices=LIFECYCLE_STATUSES, required=False)
    metadata = MetadataField(required=False)


def organization_output(organization: Organization) -> dict[str, Any]:
    return {
        "organization_id": organization.organization_id,
        "name": organization.name,
        "status": organization.status,
        "metadata": organization.metadata,
        **limits_output(organization),
        "created_at": organization.created_at.isoformat(),
        "updated_at": organization.updated_at.isoformat(),
    }


class KeyIssueInput(LimitsInput):
    alias = serializers.CharField(
        max_length=200, required=False, default="", allow_blank=True
    )
    expires_at = serializers.DateTimeField(
        required=False, allow_null=True, default=None
    )
    allowed_model_groups = serializers.ListField(
        child=serializers.CharField(max_length=200), required=False, default=list
    )
    monthly_request_quota = serializers.IntegerField(
        min_value=1, required=False, allow_null=True
    )
    metadata = MetadataField(required=False, default=dict)


class KeyRotateInput(StrictSerializer):
    grace_seconds = serializers.IntegerField(min_value=0, default=3600)
    idempotency_key = serializers.CharField(max_length=100, required=False)


def key_output(key: VirtualKey, state: str) -> dict[str, Any]:
    return {
        "key_id": key.public_id,
        "key_prefix": key.display_prefix,
        "team_id": key.team.team_id,
        "alias": key.alias,
        "status": key.status,
        "state": state,
        "expires_at": key.expires_at.isoformat() if key.expires_at else None,
        "grace_until": key.grace_until.isoformat() if key.grace_until else None,
        "allowed_model_groups": sorted(
            group.group_name for group in key.allowed_model_groups.all()
        ),
        **limits_output(key),
        "monthly_request_quota": key.monthly_request_quota,
        "metadata": key.metadata,
        "last_used_at": key.last_used_at.isoformat() if key.last_used_at else None,
        "created_at": key.created_at.isoformat(),
    }
