"""Inputs and outputs of the model-group API (seed 000)."""

from typing import Any

from rest_framework import serializers

from accounts.api.serializers import StrictSerializer
from routing.models import ModelGroup, ModelGroupStatus


class ModelInput(StrictSerializer):
    model_name = serializers.CharField(max_length=200)
    priority = serializers.IntegerField(min_value=0, max_value=1000, default=0)


class ModelGroupCreateInput(StrictSerializer):
    group_name = serializers.RegexField(
        r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}$",
        max_length=200,
        error_messages={
            "invalid": "Use letters, digits and '_ . : @ -', starting with a letter or digit."
        },
    )
    display_name = serializers.CharField(
        max_length=200, required=False, default="", allow_blank=True
    )
    description = serializers.CharField(required=False, default="", allow_blank=True)
    models = ModelInput(many=True, allow_empty=False)


class ModelsReplaceInput(StrictSerializer):
    models = ModelInput(many=True, allow_empty=False)


class ModelGroupUpdateInput(StrictSerializer):
    display_name = serializers.CharField(
        max_length=200, required=False, allow_blank=True
    )
    description = serializers.CharField(required=False, allow_blank=True)
    status = serializers.ChoiceField(choices=ModelGroupStatus.choices, required=False)


def model_pairs(models: list[dict[str, Any]]) -> list[tuple[str, int]]:
    return [(model["model_name"], model["priority"]) for model in models]


def model_group_output(group: ModelGroup) -> dict[str, Any]:
    return {
        "group_name": group.group_name,
        "display_name": group.display_name,
        "description": group.description,
        "status": group.status,
        "models": [
            {"model_name": member.deployment.name, "priority": member.priority}
            for member in sorted(group.members.all(), key=lambda m: (m.priority, m.pk))
        ],
        "created_at": group.created_at.isoformat(),
        "updated_at": group.updated_at.isoformat(),
    }
