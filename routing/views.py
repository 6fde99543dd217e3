"""The OpenAI-compatible API (/v1/): thin async views over the request path (routing/inference/)."""

import time
from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponseBase
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from gateway_project import metrics
from gateway_project.errors import GatewayError, error_response
from gateway_project.middleware import database_unavailable
from routing.inference import entry

View = Callable[[HttpRequest], Awaitable[HttpResponseBase]]


async def _measured(
    request: HttpRequest, serve: Callable[[], Awaitable[HttpResponseBase]]
) -> HttpResponseBase:
    """Serve, rendering our errors in the envelope, and count the request by
    route, status and model group (metrics.py)."""
    started = time.monotonic()
    try:
        try:
            response = await serve()
        except (OperationalError, InterfaceError) as failure:
            raise database_unavailable(failure) from None
    except GatewayError as error:
        metrics.REFUSALS.labels(error.code).inc()
        response = error_response(error)
    match = request.resolver_match
    route = "/" + match.route if match is not None else request.path
    metrics.REQUEST_SECONDS.labels(route).observe(time.monotonic() - started)
    metrics.REQUESTS.labels(
        route,
        str(response.status_code),
        getattr(request, "gateway_model_group", ""),
    ).inc()
    return response


def openai_view(view: View) -> Any:
    """Our envelope and metrics; no CSRF (keys, not cookies)."""

    @wraps(view)
    async def wrapped(request: HttpRequest) -> HttpResponseBase:
        return await _measured(request, lambda: view(request))

    return csrf_exempt(wrapped)


@openai_view
@require_POST
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    return await entry.handle(request, "chat")


@openai_view
@require_POST
async def completions(request: HttpRequest) -> HttpResponseBase:
    return await entry.handle(request, "completion")


@openai_view
@require_POST
async def embeddings(request: HttpRequest) -> HttpResponseBase:
    return await entry.handle(request, "embedding")


@openai_view
@require_GET
async def models(request: HttpRequest) -> HttpResponseBase:
    return await entry.models(request)


@openai_view
@require_POST
async def generate(request: HttpRequest) -> HttpResponseBase:
    return await entry.generate(request)


def _job_view(
    function: Callable[[HttpRequest, str], Awaitable[HttpResponseBase]],
) -> Any:
    @wraps(function)
    async def view(request: HttpRequest, job_id: str) -> HttpResponseBase:
        if request.method != "POST":
            return error_response(
                GatewayError("Use POST", code="method_not_allowed", http_status=405)
            )
        return await _measured(request, lambda: function(request, job_id))

    view.http_methods = ("post",)  # type: ignore[attr-defined]
    return csrf_exempt(view)


job_llm_call = _job_view(entry.job_llm_call)
job_llm_call_stream = _job_view(entry.job_llm_call_stream)
