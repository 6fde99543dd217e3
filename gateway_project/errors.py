"""The one error type of the gateway and the one renderer of its envelope.

Every refusal — inference, management API, tenant API — is rendered as
``{"error": {"message", "type", "code", "param"}}`` with an ``x-request-id``
header (DESIGN.md, Errors).
"""

from typing import Any

from django.http import JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.views import exception_handler as drf_default_handler

# The OpenAI "type" that goes with each HTTP status family.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
}


class GatewayError(Exception):
    """A refusal with an HTTP status, a stable code and optional headers."""

    http_status = 400
    code = "invalid_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        http_status: int | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if http_status is not None:
            self.http_status = http_status
        self.param = param
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return error_type(self.http_status)


class AlreadyExists(GatewayError):
    code = "already_exists"


class NotFound(GatewayError):
    http_status = 404
    code = "not_found"


def error_type(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "api_error" if status >= 500 else "invalid_request_error"


def error_body(
    message: str, *, code: str, status: int, param: str | None = None
) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": error_type(status),
            "code": code,
            "param": param,
        }
    }


def error_response(error: GatewayError) -> JsonResponse:
    response = JsonResponse(
        error_body(
            error.message,
            code=error.code,
            status=error.http_status,
            param=error.param,
        ),
        status=error.http_status,
    )
    for name, value in error.headers.items():
        response[name] = value
    return response


_DRF_CODES = {
    drf_exceptions.NotAuthenticated: "not_authenticated",
    drf_exceptions.AuthenticationFailed: "authentication_failed",
    drf_exceptions.PermissionDenied: "permission_denied",
    drf_exceptions.NotFound: "not_found",
    drf_exceptions.MethodNotAllowed: "method_not_allowed",
    drf_exceptions.UnsupportedMediaType: "unsupported_media_type",
    drf_exceptions.ParseError: "invalid_json",
    drf_exceptions.Throttled: "rate_limit_exceeded",
    drf_exceptions.ValidationError: "invalid_request",
}


def _first_validation_error(detail: Any, path: str = "") -> tuple[str, str | None]:
    """The first message of a DRF validation error and the field it concerns."""
    if isinstance(detail, dict):
        for field, value in detail.items():
            name = str(field) if field != "non_field_errors" else ""
            message, param = _first_validation_error(
                value, f"{path}.{name}" if path and name else (name or path)
            )
            return message, param
    if isinstance(detail, list) and detail:
        return _first_validation_error(detail[0], path)
    message = str(detail)
    return (f"{path}: {message}" if path else message), (path or None)


def drf_exception_handler(exc: Exception, context: dict[str, Any]) -> Any:
    """DRF's handler, re-rendered into the gateway envelope."""
    if isinstance(exc, GatewayError):
        return error_response(exc)
    response = drf_default_handler(exc, context)
    if response is None:
        return None
    code = next(
        (c for kind, c in _DRF_CODES.items() if isinstance(exc, kind)), "api_error"
    )
    if isinstance(exc, drf_exceptions.ValidationError):
        message, param = _first_validation_error(exc.detail)
    else:
        detail = getattr(exc, "detail", "")
        if isinstance(detail, dict):
            # simplejwt's InvalidToken carries {"detail": ..., "messages": [...]}.
            detail = detail.get("detail", "Invalid token")
        message, param = str(detail), None
    # DRF answers 403 for a missing or bad credential when no authenticator
    # offers a WWW-Authenticate header; here an unauthenticated caller always
    # gets 401.
    unauthenticated = (
        drf_exceptions.NotAuthenticated,
        drf_exceptions.AuthenticationFailed,
    )
    status = 401 if isinstance(exc, unauthenticated) else response.status_code
    rendered = JsonResponse(
        error_body(message, code=code, status=status, param=param), status=status
    )
    for name in ("Retry-After", "WWW-Authenticate", "Allow"):
        if name in response:
            rendered[name] = response[name]
    return rendered


class Unauthenticated(GatewayError):
    http_status = 401
    code = "invalid_credentials"


class Forbidden(GatewayError):
    http_status = 403
    code = "permission_denied"
