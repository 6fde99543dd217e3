"""Management API of organizations (seed 000)."""

from typing import Any

from rest_framework.request import Request
from rest_framework.response import Response

from accounts.api.auth import ManagementApi
from tenants.models import Organization
from tenants.selectors import organization_list


def organization_output(organization: Organization) -> dict[str, Any]:
    return {
        "organization_id": organization.organization_id,
        "name": organization.name,
        "status": organization.status,
        "metadata": organization.metadata,
        "created_at": organization.created_at.isoformat(),
        "updated_at": organization.updated_at.isoformat(),
    }


class OrganizationListApi(ManagementApi):
    def get(self, request: Request) -> Response:
        return Response([organization_output(org) for org in organization_list()])
