"""Management API of organizations (seed 000) and of virtual keys."""

import hashlib

from rest_framework.request import Request
from rest_framework.response import Response

from accounts.api.views import valid
from gateway_project.errors import GatewayError, NotFound
from tenants import services
from tenants.api import serializers as io
from tenants.api.auth import TeamAwareManagementApi, team_get_or_404
from tenants.models import Organization, Status, VirtualKey
from tenants.selectors import organization_list


def organization_get_or_404(organization_id: str) -> Organization:
    organization = (
        Organization.objects.exclude(status=Status.DELETED)
        .filter(organization_id=organization_id)
        .first()
    )
    if organization is None:
        raise NotFound(
            f"Organization '{organization_id}' not found", param="organization_id"
        )
    return organization


class OrganizationCreateApi(TeamAwareManagementApi):
    def post(self, request: Request) -> Response:
        data = valid(io.OrganizationCreateInput, request.data)
        organization = services.organization_create(**data, **self.audit_context())
        return Response(io.organization_output(organization))


class OrganizationListApi(TeamAwareManagementApi):
    def get(self, request: Request) -> Response:
        return Response([io.organization_output(org) for org in organization_list()])


class OrganizationDetailApi(TeamAwareManagementApi):
    def get(self, request: Request, organization_id: str) -> Response:
        return Response(
            io.organization_output(organization_get_or_404(organization_id))
        )

    def patch(self, request: Request, organization_id: str) -> Response:
        organization = organization_get_or_404(organization_id)
        changes = io.model_fields(valid(io.OrganizationUpdateInput, request.data))
        services.organization_update(
            organization=organization, changes=changes, **self.audit_context()
        )
        return Response(io.organization_output(organization))

    def delete(self, request: Request, organization_id: str) -> Response:
        services.organization_delete(
            organization=organization_get_or_404(organization_id),
            **self.audit_context(),
        )
        return Response({"message": f"Organization '{organization_id}' deleted"})


def key_get_or_404(key_id: str) -> VirtualKey:
    key = VirtualKey.objects.select_related("team").filter(public_id=key_id).first()
    if key is None:
        raise NotFound(f"Key '{key_id}' not found", param="key_id")
    return key


class TeamKeyListIssueApi(TeamAwareManagementApi):
    def get(self, request: Request, team_id: str) -> Response:
        team = team_get_or_404(team_id)
        keys = team.keys.select_related("team").prefetch_related("allowed_model_groups")
        return Response([io.key_output(key, services.key_state(key)) for key in keys])

    def post(self, request: Request, team_id: str) -> Response:
        team = team_get_or_404(team_id)
        data = io.model_fields(valid(io.KeyIssueInput, request.data))
        names = data.pop("allowed_model_groups")
        groups = list(team.model_groups.filter(group_name__in=names))
        missing = sorted(set(names) - {group.group_name for group in groups})
        if missing:
            raise GatewayError(
                f"Model group '{missing[0]}' is not one of the team's",
                param="allowed_model_groups",
            )
        key, plaintext = services.virtual_key_issue(
            team=team, allowed_model_groups=groups, **data, **self.audit_context()
        )
        return Response({**io.key_output(key, "valid"), "virtual_key": plaintext})


class KeyDetailApi(TeamAwareManagementApi):
    def get(self, request: Request, key_id: str) -> Response:
        key = key_get_or_404(key_id)
        return Response(io.key_output(key, services.key_state(key)))


class KeyRotateApi(TeamAwareManagementApi):
    def post(self, request: Request, key_id: str) -> Response:
        key = key_get_or_404(key_id)
        data = valid(io.KeyRotateInput, request.data)
        idempotency_key = (
            data.get("idempotency_key")
            or request.headers.get("Idempotency-Key")
            # Without one, a retry of the very same request body still maps
            # to the same rotation within the key's lifetime.
            or hashlib.sha256(
                f"{key.public_id}:{data['grace_seconds']}".encode()
            ).hexdigest()[:32]
        )
        successor, plaintext = services.virtual_key_rotate(
            key=key,
            grace_seconds=data["grace_seconds"],
            idempotency_key=idempotency_key,
            **self.audit_context(),
        )
        key.refresh_from_db()
        return Response(
            {
                **io.key_output(successor, services.key_state(successor)),
                "virtual_key": plaintext,
                "previous_key": io.key_output(key, services.key_state(key)),
            }
        )


class KeyRevokeApi(TeamAwareManagementApi):
    def post(self, request: Request, key_id: str) -> Response:
        key = key_get_or_404(key_id)
        services.virtual_key_revoke(key=key, **self.audit_context())
        key.refresh_from_db()
        return Response(io.key_output(key, services.key_state(key)))
