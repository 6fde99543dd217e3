"""The OpenAI-compatible API (/v1/): thin async views over routing/pipeline.py."""

from collections.abc import Awaitable, Callable
from functools import wraps
from typing import Any

from django.http import HttpRequest, HttpResponseBase
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from gateway_project.errors import GatewayError, error_response
from routing import pipeline

View = Callable[[HttpRequest], Awaitable[HttpResponseBase]]


def openai_view(view: View) -> Any:
    """Render our errors in the envelope; no CSRF (keys, not cookies)."""

    @wraps(view)
    async def wrapped(request: HttpRequest) -> HttpResponseBase:
        try:
            return await view(request)
        except GatewayError as error:
            return error_response(error)

    return csrf_exempt(wrapped)


@openai_view
@require_POST
async def chat_completions(request: HttpRequest) -> HttpResponseBase:
    return await pipeline.handle(request, "chat")


@openai_view
@require_POST
async def completions(request: HttpRequest) -> HttpResponseBase:
    return await pipeline.handle(request, "completion")


@openai_view
@require_POST
async def embeddings(request: HttpRequest) -> HttpResponseBase:
    return await pipeline.handle(request, "embedding")


@openai_view
@require_GET
async def models(request: HttpRequest) -> HttpResponseBase:
    return await pipeline.models(request)


@openai_view
@require_POST
async def generate(request: HttpRequest) -> HttpResponseBase:
    return await pipeline.generate(request)


def _job_view(
    function: Callable[[HttpRequest, str], Awaitable[HttpResponseBase]],
) -> Any:
    @wraps(function)
    async def view(request: HttpRequest, job_id: str) -> HttpResponseBase:
        if request.method != "POST":
            return error_response(
                GatewayError("Use POST", code="method_not_allowed", http_status=405)
            )
        try:
            return await function(request, job_id)
        except GatewayError as error:
            return error_response(error)

    view.http_methods = ("post",)  # type: ignore[attr-defined]
    return csrf_exempt(view)


job_llm_call = _job_view(pipeline.job_llm_call)
job_llm_call_stream = _job_view(pipeline.job_llm_call_stream)
