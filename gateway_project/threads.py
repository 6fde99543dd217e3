"""Worker threads for the request path's database and cache work.

``sync_to_async`` under Django's ASGI handler is thread-sensitive per request:
every request got a new single-thread executor, so a new OS thread, for its
first hop. The request path needs no thread affinity (no transaction spans two
hops, and each hop hands its database connection back to the pool at its
end), so its hops run on one long-lived pool of threads instead.

Under ``async_to_sync`` (Django's test client, management commands) the
calling thread holds the connection and any open transaction: hops go there,
as ``sync_to_async`` would send them.
"""

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from asgiref.sync import AsyncToSync, sync_to_async
from django.conf import settings
from django.db import connection

T = TypeVar("T")

_executor: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        # One thread per pooled database connection: more would only queue
        # for a connection.
        pool = settings.DATABASES["default"].get("OPTIONS", {}).get("pool") or {}
        workers = max(4, pool.get("max_size", 8) if isinstance(pool, dict) else 8)
        _executor = ThreadPoolExecutor(workers, thread_name_prefix="gateway-io")
    return _executor


def _released(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return function(*args, **kwargs)
    finally:
        if not connection.in_atomic_block:
            connection.close()  # back to the pool (no-op without a connection)


async def in_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking ``function`` off the event loop and await its result;
    context variables (request id, client address) go with it."""
    if getattr(AsyncToSync.executors, "current", None) is not None:
        result: T = await sync_to_async(function)(*args, **kwargs)
        return result
    context = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(
        _pool(), partial(context.run, _released, function, *args, **kwargs)
    )
