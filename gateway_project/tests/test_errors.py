"""The one envelope, as DRF views will render it."""

import json

import pytest
from rest_framework import exceptions, serializers
from rest_framework.exceptions import ErrorDetail

from gateway_project.errors import AlreadyExists, GatewayError, drf_exception_handler


def _render(exc: Exception) -> tuple[int, dict, dict]:
    response = drf_exception_handler(exc, {})
    return response.status_code, json.loads(response.content), dict(response.items())


def test_gateway_error_keeps_status_code_param_and_headers():
    error = GatewayError(
        "Rate limit exceeded",
        code="rate_limit_exceeded",
        http_status=429,
        headers={"Retry-After": "3"},
    )

    status, body, headers = _render(error)

    assert status == 429
    assert body == {
        "error": {
            "message": "Rate limit exceeded",
            "type": "rate_limit_error",
            "code": "rate_limit_exceeded",
            "param": None,
        }
    }
    assert headers["Retry-After"] == "3"


def test_duplicate_is_400_already_exists():
    status, body, _ = _render(AlreadyExists("Team 'x' already exists", param="team_id"))

    assert status == 400
    assert body["error"]["code"] == "already_exists"
    assert body["error"]["param"] == "team_id"
    assert "already exists" in body["error"]["message"]


def test_validation_error_names_the_first_bad_field():
    class Input(serializers.Serializer):
        email = serializers.EmailField()

    serializer = Input(data={"email": "nope"})
    assert not serializer.is_valid()

    status, body, _ = _render(exceptions.ValidationError(serializer.errors))

    assert status == 400
    assert body["error"] == {
        "message": "email: Enter a valid email address.",
        "type": "invalid_request_error",
        "code": "invalid_request",
        "param": "email",
    }


def test_nested_validation_error_uses_a_dotted_param():
    detail = {
        "models": [{"priority": [ErrorDetail("Must be >= 0.", code="min_value")]}]
    }

    _, body, _ = _render(exceptions.ValidationError(detail))

    assert body["error"]["param"] == "models.priority"
    assert body["error"]["message"] == "models.priority: Must be >= 0."


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (exceptions.NotAuthenticated(), 401, "not_authenticated"),
        (
            exceptions.AuthenticationFailed("Invalid token"),
            401,
            "authentication_failed",
        ),
        (exceptions.PermissionDenied(), 403, "permission_denied"),
        (exceptions.NotFound(), 404, "not_found"),
        (exceptions.ParseError(), 400, "invalid_json"),
        (exceptions.MethodNotAllowed("DELETE"), 405, "method_not_allowed"),
    ],
)
def test_drf_exceptions_render_in_the_envelope(exc, status, code):
    rendered_status, body, _ = _render(exc)

    assert rendered_status == status
    assert set(body["error"]) == {"message", "type", "code", "param"}
    assert body["error"]["code"] == code


def test_unhandled_exceptions_are_left_to_django():
    assert drf_exception_handler(RuntimeError("boom"), {}) is None
