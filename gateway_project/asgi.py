"""ASGI entry point (gunicorn with uvicorn workers in production)."""

import os

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway_project.settings")

import asyncio
import contextlib
import logging
from typing import Any

from django.conf import settings
from django.core.asgi import get_asgi_application
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.urls import set_script_prefix

django_application = get_asgi_application()
logger = logging.getLogger(__name__)

from billing.journal import retry_start  # noqa: E402 - after Django is set up

# A serving process applies the settlements it journaled, and replays the
# journals of processes that died, as soon as the database takes them.
retry_start()


class ApiHandler(ASGIHandler):
    """Django for /v1/: the same URLs and views, behind only the middleware
    those views use (settings.API_MIDDLEWARE). Django's own middleware runs
    its hooks through a worker thread under ASGI, two hops each; sessions,
    CSRF, messages and the admin's user have no part in a call made with a
    key."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Without Django's per-request ThreadSensitiveContext, which starts and
        # joins an OS thread per request: nothing here is thread-sensitive
        # (no signals, below; the views' work runs in_thread, threads.py).
        await self.handle(scope, receive, send)

    async def handle(self, scope: Any, receive: Any, send: Any) -> None:
        """Django's ASGIHandler.handle without the request_started and
        request_finished signals. Their receivers close the stale database
        connections and caches of the thread they run in, and a /v1/ view
        keeps none between hops (threads.py hands each hop's connection back
        to the pool); each signal was a trip to a worker thread per call."""
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            if error_response is not None:
                await self.send_response(error_response, send)
            return

        async def process_request() -> Any:
            response = await self.run_get_response(request)
            with contextlib.suppress(asyncio.CancelledError):  # client gone
                await self.send_response(response, send)
            return response

        # As Django does: a client that disconnects cancels the view (a
        # stream then settles what was generated, routing/inference/relay.py).
        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request()),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # What the view left to finish whatever happened: a streamed answer
        # whose body was cut, or never read, is settled here (once).
        for finalize in request.__dict__.get("finalizers", ()):
            try:
                await asyncio.shield(finalize())
            except Exception:
                logger.exception("finalizing a request failed")
        body_file.close()

    def load_middleware(self, is_async: bool = False) -> None:
        full = settings.MIDDLEWARE
        settings.MIDDLEWARE = settings.API_MIDDLEWARE
        try:
            super().load_middleware(is_async)
        finally:
            settings.MIDDLEWARE = full


api_application = ApiHandler()


def _served_with_a_key(path: str) -> bool:
    """/v1/ and the jobs' LLM calls (/api/jobs/<id>/llm-call[-stream]): the
    calls of the request path, all made with a key."""
    return path.startswith("/v1/") or (
        path.startswith("/api/jobs/") and path.rstrip("/").endswith(_LLM_CALLS)
    )


_LLM_CALLS = ("/llm-call", "/llm-call-stream")


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http" and _served_with_a_key(scope["path"]):
        await api_application(scope, receive, send)
    else:
        await django_application(scope, receive, send)
