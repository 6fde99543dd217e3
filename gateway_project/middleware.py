"""Request-id plumbing: every response carries the server's ``x-request-id``."""

import ipaddress
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.conf import settings
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponseBase
from django.middleware.security import SecurityMiddleware
from whitenoise.middleware import WhiteNoiseMiddleware

from gateway_project.errors import GatewayError, error_response
from gateway_project.logs import current_request_id

logger = logging.getLogger(__name__)

# A caller-supplied id is kept only when it is short and harmless to log.
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

# The address of the request being served, for audit entries written deep in
# services (a ContextVar is per thread and per asyncio task).
_current_client_ip: ContextVar[str | None] = ContextVar("client_ip", default=None)


def current_client_ip() -> str | None:
    return _current_client_ip.get()


def client_request_id_for(request: HttpRequest) -> str:
    """The caller's own id of its request (``X-Client-Request-Id``, as
    OpenAI's SDKs send it, or ``X-Request-Id``) when short and harmless to
    log; else "". A correlation value only: never the call's identity."""
    supplied = request.headers.get("x-client-request-id") or request.headers.get(
        "x-request-id", ""
    )
    return supplied if _SAFE_ID.match(supplied) else ""


class RequestIdMiddleware:
    """Gives every request the server's own id (``request.request_id``,
    answered as ``x-request-id``): it keys a call's hold, capture, release
    and usage record, so no caller can choose it. The caller's own id is
    kept as ``request.client_request_id`` and echoed as
    ``x-client-request-id``."""

    sync_capable = True
    async_capable = True

    def __init__(
        self,
        get_response: Callable[[HttpRequest], HttpResponseBase]
        | Callable[[HttpRequest], Awaitable[HttpResponseBase]],
    ) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):  # type: ignore[no-untyped-def]
        if self.is_async:
            return self.__acall__(request)
        self._identify(request)
        token = _current_client_ip.set(client_ip(request))
        id_token = current_request_id.set(request.request_id)  # type: ignore[attr-defined]
        try:
            response = self.get_response(request)
        finally:
            _current_client_ip.reset(token)
            current_request_id.reset(id_token)
        return self._answer(request, response)  # type: ignore[arg-type]

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        self._identify(request)
        token = _current_client_ip.set(client_ip(request))
        id_token = current_request_id.set(request.request_id)  # type: ignore[attr-defined]
        try:
            response: HttpResponseBase = await self.get_response(request)  # type: ignore[misc]
        finally:
            _current_client_ip.reset(token)
            current_request_id.reset(id_token)
        return self._answer(request, response)

    @staticmethod
    def _identify(request: HttpRequest) -> None:
        request.request_id = f"req_{uuid.uuid4().hex}"  # type: ignore[attr-defined]
        request.client_request_id = client_request_id_for(request)  # type: ignore[attr-defined]

    @staticmethod
    def _answer(request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        response["x-request-id"] = request.request_id  # type: ignore[attr-defined]
        if request.client_request_id:  # type: ignore[attr-defined]
            response["x-client-request-id"] = request.client_request_id  # type: ignore[attr-defined]
        return response


class StaticFilesMiddleware(WhiteNoiseMiddleware):  # type: ignore[misc]
    """WhiteNoise, able to sit in an async middleware chain.

    WhiteNoise's own middleware is sync only: under ASGI that makes Django run
    the whole chain of every request in a worker thread and hop back to the
    event loop for the async /v1/ views, two thread hops per call. Looking a
    path up in WhiteNoise's table is a dict lookup (no I/O), so it runs on the
    loop; only serving a file goes to a thread.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Any, settings: Any = settings) -> None:
        super().__init__(get_response, settings=settings)
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):  # type: ignore[no-untyped-def]
        if self.is_async:
            return self.__acall__(request)
        return super().__call__(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        if self.autorefresh:
            static_file = await sync_to_async(self.find_file)(request.path_info)
        else:
            static_file = self.files.get(request.path_info)
        if static_file is not None:
            response: HttpResponseBase = await sync_to_async(self.serve)(
                static_file, request
            )
            return response
        return await self.get_response(request)  # type: ignore[no-any-return]


class ApiMiddleware(SecurityMiddleware):
    """For /v1/: Django's SecurityMiddleware (HTTPS redirect, HSTS, nosniff,
    referrer and opener policies) with its hooks run on the event loop, as
    they do no I/O and Django's adapter would run each in a worker thread;
    and the Content-Length that CommonMiddleware sets elsewhere."""

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        response: Any = self.process_request(request)
        if response is None:
            response = await self.get_response(request)  # type: ignore[misc]
        response = self.process_response(request, response)
        if not response.streaming and not response.has_header("Content-Length"):
            response.headers["Content-Length"] = str(len(response.content))
        return response  # type: ignore[no-any-return]


class ServiceUnavailable(GatewayError):
    http_status = 503
    code = "service_unavailable"


class DatabaseUnavailableMiddleware:
    """A view that cannot reach the database answers 503
    ``service_unavailable`` in the envelope (never a 500 page, and never a
    call served unmetered: nothing on the request path skips the database)."""

    sync_capable = True
    async_capable = True

    def __init__(
        self,
        get_response: Callable[[HttpRequest], HttpResponseBase]
        | Callable[[HttpRequest], Awaitable[HttpResponseBase]],
    ) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):  # type: ignore[no-untyped-def]
        return self.get_response(request)

    def process_exception(
        self, request: HttpRequest, exception: Exception
    ) -> HttpResponseBase | None:
        if not isinstance(exception, OperationalError | InterfaceError):
            return None
        return error_response(database_unavailable(exception))


def database_unavailable(failure: Exception) -> GatewayError:
    """The 503 a request gets when the database cannot be reached."""
    logger.error("database unavailable: %s", failure)
    return ServiceUnavailable(
        "The gateway's database is unavailable; nothing was done. Retry later.",
        headers={"Retry-After": "5"},
    )


def client_ip(request: HttpRequest) -> str | None:
    """The caller's address: REMOTE_ADDR, or with TRUSTED_PROXY_COUNT = n > 0,
    the address the n-th proxy from us saw in X-Forwarded-For.

    Only addresses appended by our own proxies are trusted; whatever the client
    itself put at the front of the header is ignored.
    """
    proxies = settings.TRUSTED_PROXY_COUNT
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if proxies and forwarded:
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        if len(hops) >= proxies:
            candidate = hops[-proxies]
            try:
                return str(ipaddress.ip_address(candidate))
            except ValueError:
                pass
    return request.META.get("REMOTE_ADDR") or None
