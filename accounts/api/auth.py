"""Authentication and permission classes for the management API.

Every management endpoint (organizations, teams, credits, …) uses
``ManagementApi``: an operator's JWT or the shared ``X-Admin-Key``. The
admin-user endpoints use ``OperatorApi``: JWT only.
"""

import hmac
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.request import Request
from rest_framework.views import APIView
from rest_framework_simplejwt.authentication import JWTAuthentication

from accounts.models import Role, User
from accounts.tokens import token_is_revoked


@dataclass(frozen=True)
class AdminKeyPrincipal:
    """Whoever presented the shared admin key: full management rights,
    recorded in the audit log as ``admin-key``."""

    role: str = Role.OWNER
    is_authenticated: bool = True
    is_active: bool = True
    label: str = "admin-key"


class OperatorJWTAuthentication(JWTAuthentication):
    """simplejwt's Bearer authentication plus revocation (logout)."""

    www_authenticate_realm = "gateway"

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        header = self.get_header(request)
        if header is None:
            return None
        raw = self.get_raw_token(header)
        if raw is None:
            # "Authorization: Basic …" or an empty header: not ours, but a
            # caller who sent credentials must not pass as anonymous.
            raise exceptions.AuthenticationFailed(
                "Authorization header must be 'Bearer <token>'"
            )
        token = self.get_validated_token(raw)
        if token_is_revoked(token=token):
            raise exceptions.AuthenticationFailed(
                "Token has been revoked", code="token_revoked"
            )
        return self.get_user(token), token


class AdminKeyAuthentication(BaseAuthentication):
    """``X-Admin-Key: <GATEWAY_ADMIN_KEY>``, compared in constant time."""

    def authenticate(self, request: Request) -> tuple[AdminKeyPrincipal, None] | None:
        presented = request.headers.get("X-Admin-Key")
        if presented is None:
            return None
        expected = settings.GATEWAY_ADMIN_KEY
        if not expected or not hmac.compare_digest(
            presented.encode(), expected.encode()
        ):
            raise exceptions.AuthenticationFailed("Invalid admin key")
        return AdminKeyPrincipal(), None

    def authenticate_header(self, request: Request) -> str:
        return "X-Admin-Key"


class RejectAdminKey(BaseAuthentication):
    """On JWT-only endpoints, an X-Admin-Key header earns a clear 401."""

    def authenticate(self, request: Request) -> None:
        if "X-Admin-Key" in request.headers and "Authorization" not in request.headers:
            raise exceptions.AuthenticationFailed(
                "This endpoint requires an operator's Bearer token; X-Admin-Key is not accepted"
            )
        return None

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="gateway"'


OPERATOR_ROLES = (Role.OWNER, Role.ADMIN, Role.USER)


class IsAnyOperator(BasePermission):
    """An operator (or the admin key), whatever the role and the method.

    Principals without an operator role — a team's virtual key — are
    authenticated but not allowed: 403.
    """

    message = "Only operators may do this; team keys cannot"

    def has_permission(self, request: Request, view: APIView) -> bool:
        principal = request.user
        if principal is None or not getattr(principal, "is_authenticated", False):
            raise exceptions.NotAuthenticated(
                "Authentication credentials were not provided"
            )
        return getattr(principal, "role", None) in OPERATOR_ROLES


class IsOperator(IsAnyOperator):
    """Any operator may read; only owners, admins and the admin key may write
    (the user role is read-only everywhere)."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        if not super().has_permission(request, view):
            return False
        if request.method in SAFE_METHODS:
            return True
        self.message = "Your role is read-only"
        return getattr(request.user, "role", None) in (Role.OWNER, Role.ADMIN)


class IsOwnerOrAdmin(IsAnyOperator):
    """Owners and admins only, for reading too."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        if not super().has_permission(request, view):
            return False
        self.message = "Only owners and admins may do this"
        return getattr(request.user, "role", None) in (Role.OWNER, Role.ADMIN)


class ManagementApi(APIView):
    """Base of management endpoints: operator JWT or X-Admin-Key.

    tenants/api/auth.py extends it to recognise team keys (refused with 403).
    """

    authentication_classes: list[type[BaseAuthentication]] = [
        OperatorJWTAuthentication,
        AdminKeyAuthentication,
    ]
    permission_classes: list[type[BasePermission]] = [IsOperator]

    def audit_context(self) -> dict[str, Any]:
        """actor and actor_label for the services' audit entries."""
        principal = self.request.user
        if isinstance(principal, User):
            return {"actor": principal, "actor_label": principal.email}
        return {"actor": None, "actor_label": getattr(principal, "label", "unknown")}


class OperatorApi(ManagementApi):
    """Base of admin-user endpoints: an operator's JWT only."""

    authentication_classes = [RejectAdminKey, OperatorJWTAuthentication]
    permission_classes = [IsOperator]

    @property
    def operator(self) -> User:
        assert isinstance(self.request.user, User)
        return self.request.user


class PublicApi(APIView):
    authentication_classes: list[type[BaseAuthentication]] = []
    permission_classes: list[type[BasePermission]] = []
