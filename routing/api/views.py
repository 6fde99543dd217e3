"""Management API of model groups (seed 000)."""

from typing import Any

from rest_framework.request import Request
from rest_framework.response import Response

from accounts.api.auth import ManagementApi
from routing.models import ModelGroup
from routing.selectors import model_group_list


def model_group_output(group: ModelGroup) -> dict[str, Any]:
    return {
        "group_name": group.group_name,
        "display_name": group.display_name,
        "description": group.description,
        "status": group.status,
        "models": [
            {"model_name": member.deployment.name, "priority": member.priority}
            for member in group.members.all()
        ],
        "created_at": group.created_at.isoformat(),
        "updated_at": group.updated_at.isoformat(),
    }


class ModelGroupListApi(ManagementApi):
    def get(self, request: Request) -> Response:
        return Response([model_group_output(group) for group in model_group_list()])
