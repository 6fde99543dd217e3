"""Reads of the routing app."""

from typing import Any

from django.db.models import Prefetch, QuerySet, Sum

from billing.models import CreditAccount
from routing.models import ModelGroup, ModelGroupMember
from tenants.models import Organization, Status, Team


def model_group_list() -> QuerySet[ModelGroup]:
    """Groups by name, each with its members in priority order (two queries)."""
    members = ModelGroupMember.objects.select_related("deployment").order_by(
        "priority", "id"
    )
    return ModelGroup.objects.order_by("group_name").prefetch_related(
        Prefetch("members", queryset=members)
    )


def dashboard_totals() -> dict[str, Any]:
    """Seed 000's dashboard: counts of live resources and credit totals (micros)."""
    totals = CreditAccount.objects.exclude(team__status=Status.DELETED).aggregate(
        allocated=Sum("allocated_total_micros"),
        remaining=Sum("balance_micros"),
        used=Sum("used_total_micros"),
    )
    return {
        "organizations": Organization.objects.exclude(status=Status.DELETED).count(),
        "teams": Team.objects.exclude(status=Status.DELETED).count(),
        "model_groups": ModelGroup.objects.count(),
        "allocated_micros": totals["allocated"] or 0,
        "remaining_micros": totals["remaining"] or 0,
        "used_micros": totals["used"] or 0,
    }
