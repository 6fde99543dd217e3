"""ASGI entry point (gunicorn with uvicorn workers in production)."""

import os

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")

from typing import Any

from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.handlers.asgi import ASGIHandler

django_application = get_asgi_application()


class ApiHandler(ASGIHandler):
    """Django for /v1/: the same URLs and views, behind only the middleware
    those views use (settings.API_MIDDLEWARE). Django's own middleware runs
    its hooks through a worker thread under ASGI, two hops each; sessions,
    CSRF, messages and the admin's user have no part in a call made with a
    key."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Without Django's per-request ThreadSensitiveContext, which starts and
        # joins an OS thread per request for the request_started and
        # request_finished signals; those few thread-sensitive hops share one
        # long-lived thread, and the views' own work runs in_thread
        # (threads.py).
        await self.handle(scope, receive, send)

    def load_middleware(self, is_async: bool = False) -> None:
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.API_MIDDLEWARE
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = full


api_application = ApiHandler()


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"].startswith("/v1/"):
        await api_application(scope, receive, send)
    else:
        await django_application(scope, receive, send)
