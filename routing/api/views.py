"""Management API of model groups (seed 000) and the dashboard."""

from rest_framework.request import Request
from rest_framework.response import Response

from accounts.api.views import valid
from gateway_project.errors import NotFound
from gateway_project.money import credits_json
from routing import services
from routing.api import serializers as io
from routing.models import ModelGroup
from routing.selectors import dashboard_totals, model_group_list
from tenants.api.auth import TeamAwareManagementApi


def model_group_get_or_404(group_name: str) -> ModelGroup:
    group = model_group_list().filter(group_name=group_name).first()
    if group is None:
        raise NotFound(f"Model group '{group_name}' not found", param="group_name")
    return group


class ModelGroupCreateApi(TeamAwareManagementApi):
    def post(self, request: Request) -> Response:
        data = valid(io.ModelGroupCreateInput, request.data)
        group = services.model_group_create_from_names(
            group_name=data["group_name"],
            models=io.model_pairs(data["models"]),
            display_name=data["display_name"],
            description=data["description"],
            **self.audit_context(),
        )
        return Response(io.model_group_output(model_group_get_or_404(group.group_name)))


class ModelGroupListApi(TeamAwareManagementApi):
    def get(self, request: Request) -> Response:
        return Response([io.model_group_output(group) for group in model_group_list()])


class ModelGroupDetailApi(TeamAwareManagementApi):
    def get(self, request: Request, group_name: str) -> Response:
        return Response(io.model_group_output(model_group_get_or_404(group_name)))

    def patch(self, request: Request, group_name: str) -> Response:
        group = model_group_get_or_404(group_name)
        changes = valid(io.ModelGroupUpdateInput, request.data)
        services.model_group_update(
            group=group, changes=changes, **self.audit_context()
        )
        return Response(io.model_group_output(model_group_get_or_404(group_name)))

    def delete(self, request: Request, group_name: str) -> Response:
        services.model_group_delete(
            group=model_group_get_or_404(group_name), **self.audit_context()
        )
        return Response({"message": f"Model group '{group_name}' deleted"})


class ModelGroupModelsApi(TeamAwareManagementApi):
    def put(self, request: Request, group_name: str) -> Response:
        group = model_group_get_or_404(group_name)
        data = valid(io.ModelsReplaceInput, request.data)
        services.model_group_replace_models(
            group=group, models=io.model_pairs(data["models"]), **self.audit_context()
        )
        return Response(io.model_group_output(model_group_get_or_404(group_name)))


class DashboardApi(TeamAwareManagementApi):
    def get(self, request: Request) -> Response:
        totals = dashboard_totals()
        return Response(
            {
                "organizations": totals["organizations"],
                "teams": totals["teams"],
                "modelGroups": totals["model_groups"],
                "totalCredits": credits_json(totals["allocated_micros"]),
                "creditsRemaining": credits_json(totals["remaining_micros"]),
                "creditsUsed": credits_json(totals["used_micros"]),
            }
        )
