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
