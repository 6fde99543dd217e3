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
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from asgiref.sync import AsyncToSync, sync_to_async
from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

T = TypeVar("T")


class _Workers:
    """Long-lived threads taking calls from one queue. Leaner than a
    ThreadPoolExecutor behind run_in_executor (no concurrent future chained
    to an asyncio one, no idle-thread bookkeeping per call): the request
    path makes two hops per call."""

    def __init__(self, count: int) -> None:
        self.calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for number in range(count):
            threading.Thread(
                target=self._work, name=f"gateway-io-{number}", daemon=True
            ).start()

    def _work(self) -> None:
        while True:
            loop, future, context, function, args, kwargs = self.calls.get()
            try:
                result = context.run(_released, function, *args, **kwargs)
            except BaseException as error:  # handed to the awaiting task
                loop.call_soon_threadsafe(_settle, future, None, error)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)


def _settle(
    future: "asyncio.Future[Any]", result: Any, error: BaseException | None
) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


_workers: _Workers | None = None
_workers_lock = threading.Lock()


def _pool() -> _Workers:
    global _workers
    if _workers is None:
        with _workers_lock:
            if _workers is None:
                # One thread per pooled database connection: more would only
                # queue for a connection.
                options = settings.DATABASES["default"].get("OPTIONS", {})
                pool = options.get("pool") or {}
                size = pool.get("max_size", 8) if isinstance(pool, dict) else 8
                _workers = _Workers(max(4, size))
    return _workers


def _released(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run, then give the thread's database connection back to the pool, so
    that none is held while the provider works. Never inside a transaction
    (tests run in one)."""
    try:
        return function(*args, **kwargs)
    finally:
        db = connections[DEFAULT_DB_ALIAS]  # one context-local lookup, not two
        if not db.in_atomic_block:
            db.close()  # back to the pool (no-op without a connection)


async def in_thread(function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run blocking ``function`` off the event loop and await its result;
    context variables (request id, client address) go with it."""
    if getattr(AsyncToSync.executors, "current", None) is not None:
        result: T = await sync_to_async(_released)(function, *args, **kwargs)
        return result
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    _pool().calls.put(
        (loop, future, contextvars.copy_context(), function, args, kwargs)
    )
    return await future
