"""Team keys as a DRF authentication, and the base views that use them.

``TeamAwareManagementApi``: management endpoints; a team key is recognised but
refused (403). ``TenantApi``: a team's own data, for its keys or operators.
"""

from dataclasses import dataclass
from typing import Any

from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request
from rest_framework.views import APIView

from accounts.api.auth import (
    OPERATOR_ROLES,
    AdminKeyAuthentication,
    IsOperator,
    ManagementApi,
    OperatorJWTAuthentication,
)
from accounts.models import Role
from gateway_project.errors import NotFound
from tenants.authentication import (
    looks_like_virtual_key,
    presented_key,
    virtual_key_authenticate,
    virtual_key_touch,
)
from tenants.models import Status, Team, VirtualKey


@dataclass(frozen=True)
class TeamKeyPrincipal:
    """A request made with a team's virtual key."""

    key: VirtualKey
    is_authenticated: bool = True
    role: None = None

    @property
    def label(self) -> str:
        return f"key:{self.key.display_prefix}"


class TeamKeyAuthentication(BaseAuthentication):
    """``X-API-Key: <key>`` or ``Authorization: Bearer <key>`` for keys that look
    like ours; other Bearer tokens are left to the JWT authentication."""

    def authenticate(
        self, request: Request
    ) -> tuple[TeamKeyPrincipal, VirtualKey] | None:
        credential = presented_key(request)
        if credential is None:
            return None
        if "X-API-Key" not in request.headers and not looks_like_virtual_key(
            credential
        ):
            return None
        key = virtual_key_authenticate(plaintext=credential)
        return TeamKeyPrincipal(key=key), key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="gateway"'


AUTHENTICATIONS: list[type[BaseAuthentication]] = [
    TeamKeyAuthentication,
    OperatorJWTAuthentication,
    AdminKeyAuthentication,
]


class TeamAwareManagementApi(ManagementApi):
    """Management endpoints: operators (JWT) or the admin key; team keys 403."""

    authentication_classes = AUTHENTICATIONS
    permission_classes = [IsOperator]


class IsOwnTeamOrOperator(BasePermission):
    """Operators by role (reads for all, writes for owners and admins); a team
    key only for its own team (``team_id`` of the URL) and only to read."""

    message = "This key belongs to another team"

    def has_permission(self, request: Request, view: APIView) -> bool:
        principal = request.user
        read_only = request.method in SAFE_METHODS or getattr(view, "read_only", False)
        if isinstance(principal, TeamKeyPrincipal):
            if not read_only:
                self.message = "Team keys may only read"
                return False
            return bool(principal.key.team.team_id == view.kwargs.get("team_id"))
        if getattr(principal, "role", None) in OPERATOR_ROLES:
            if read_only:
                return True
            self.message = "Your role is read-only"
            return getattr(principal, "role", None) in (Role.OWNER, Role.ADMIN)
        return IsOperator().has_permission(request, view)


class TenantApi(TeamAwareManagementApi):
    """A team's own resources (balance, transactions): its keys or operators.

    Set ``read_only = True`` on a view whose POST changes nothing.
    """

    permission_classes = [IsOwnTeamOrOperator]
    read_only = False

    def finalize_response(
        self, request: Request, response: Any, *args: Any, **kwargs: Any
    ) -> Any:
        # Not request.user: after a failed authentication that would run the
        # authenticators again while the error is being rendered.
        principal = request.__dict__.get("_user")
        if isinstance(principal, TeamKeyPrincipal) and response.status_code < 400:
            virtual_key_touch(key=principal.key)
        return super().finalize_response(request, response, *args, **kwargs)

    def team(self, team_id: str) -> Team:
        principal = self.request.user
        if isinstance(principal, TeamKeyPrincipal):
            return principal.key.team
        return team_get_or_404(team_id)


def team_get_or_404(team_id: str) -> Team:
    team = (
        Team.objects.select_related("organization")
        .exclude(status=Status.DELETED)
        .filter(team_id=team_id)
        .first()
    )
    if team is None:
        raise NotFound(f"Team '{team_id}' not found", param="team_id")
    return team
