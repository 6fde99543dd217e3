"""The admin-user API of seed 000. Views parse, call one service, render."""

from typing import Any

from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework_simplejwt.tokens import Token

from accounts import selectors, services
from accounts.api import serializers as io
from accounts.api.auth import IsAnyOperator, IsOwnerOrAdmin, OperatorApi, PublicApi
from accounts.models import User
from accounts.tokens import token_issue
from gateway_project.errors import NotFound
from gateway_project.middleware import client_ip


def valid(serializer_class: type[Any], data: Any) -> dict[str, Any]:
    """Validated input, or a 400 in the envelope naming the first bad field."""
    serializer = serializer_class(data=data)
    serializer.is_valid(raise_exception=True)
    return dict(serializer.validated_data)


def _signed_in(user: User) -> Response:
    access_token, expires_in = token_issue(user=user)
    return Response(io.token_output(user, access_token, expires_in))


class SetupStatusApi(PublicApi):
    def get(self, request: Request) -> Response:
        has_users = User.objects.exists()
        return Response({"needs_setup": not has_users, "has_users": has_users})


class SetupApi(PublicApi):
    def post(self, request: Request) -> Response:
        data = valid(io.SetupInput, request.data)
        user = services.owner_setup(**data, ip_address=client_ip(request))
        return _signed_in(user)


class LoginApi(PublicApi):
    def post(self, request: Request) -> Response:
        data = valid(io.LoginInput, request.data)
        user = services.operator_login(**data, ip_address=client_ip(request))
        return _signed_in(user)


class LogoutApi(OperatorApi):
    permission_classes = [IsAnyOperator]

    def post(self, request: Request) -> Response:
        assert isinstance(request.auth, Token)
        services.operator_logout(
            user=self.operator, token=request.auth, ip_address=client_ip(request)
        )
        return Response({"message": "Logged out"})


class MeApi(OperatorApi):
    def get(self, request: Request) -> Response:
        return Response(io.user_output(self.operator))


class PasswordChangeApi(OperatorApi):
    # Changing one's own password is not a write to the operator directory:
    # the read-only user role may do it too.
    permission_classes = [IsAnyOperator]

    def post(self, request: Request) -> Response:
        data = valid(io.PasswordChangeInput, request.data)
        user = services.password_change(
            user=self.operator, ip_address=client_ip(request), **data
        )
        return _signed_in(user)


class UserListCreateApi(OperatorApi):
    permission_classes = [IsOwnerOrAdmin]

    def get(self, request: Request) -> Response:
        return Response([io.user_output(user) for user in selectors.user_list()])

    def post(self, request: Request) -> Response:
        data = valid(io.UserCreateInput, request.data)
        user = services.user_create(
            **data, created_by=self.operator, ip_address=client_ip(request)
        )
        return Response(io.user_output(user))


class UserDetailApi(OperatorApi):
    permission_classes = [IsOwnerOrAdmin]

    def _target(self, user_id: str) -> User:
        user = selectors.user_get(user_id=user_id)
        if user is None:
            raise NotFound(f"User '{user_id}' not found")
        return user

    def get(self, request: Request, user_id: str) -> Response:
        return Response(io.user_output(self._target(user_id)))

    def patch(self, request: Request, user_id: str) -> Response:
        changes = valid(io.UserUpdateInput, request.data)
        user = services.user_update(
            actor=self.operator,
            target=self._target(user_id),
            changes=changes,
            ip_address=client_ip(request),
        )
        return Response(io.user_output(user))

    def delete(self, request: Request, user_id: str) -> Response:
        services.user_delete(
            actor=self.operator,
            target=self._target(user_id),
            ip_address=client_ip(request),
        )
        return Response({"message": "User deleted", "user_id": user_id})


class AuditLogListApi(OperatorApi):
    permission_classes = [IsOwnerOrAdmin]

    def get(self, request: Request) -> Response:
        query = valid(io.AuditLogQuery, request.query_params)
        entries = selectors.audit_log_list(
            action=query["action"],
            user_id=query["user_id"],
            resource_type=query["resource_type"],
        )
        page = entries[query["offset"] : query["offset"] + query["limit"]]
        return Response([io.audit_output(entry) for entry in page])
