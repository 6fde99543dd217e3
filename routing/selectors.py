"""Reads of the routing app."""

from django.db.models import Prefetch, QuerySet

from routing.models import ModelGroup, ModelGroupMember


def model_group_list() -> QuerySet[ModelGroup]:
    """Groups by name, each with its members in priority order (two queries)."""
    members = ModelGroupMember.objects.select_related("deployment").order_by(
        "priority", "id"
    )
    return ModelGroup.objects.order_by("group_name").prefetch_related(
        Prefetch("members", queryset=members)
    )
