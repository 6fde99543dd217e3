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
from collections.abc import Awaitable, Callable
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
            loop, future, undo, context, function, args, kwargs = self.calls.get()
            try:
                result = context.run(_released, function, *args, **kwargs)
            except BaseException as error:  # handed to the awaiting task
                loop.call_soon_threadsafe(_settle, future, None, error, undo)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None, undo)


Undo = Callable[[Any], Awaitable[None]]
# Undos under way: a task is only weakly referenced by the event loop.
_undoing: set["asyncio.Future[None]"] = set()


def _settle(
    future: "asyncio.Future[Any]",
    result: Any,
    error: BaseException | None,
    undo: Undo | None,
) -> None:
    if future.cancelled():
        if undo is not None and error is None:
            _undo(undo, result)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _undo(undo: Undo, result: Any) -> None:
    task = asyncio.ensure_future(undo(result))
    _undoing.add(task)
    task.add_done_callback(_undoing.discard)


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
    return await _in_thread(None, function, *args, **kwargs)


async def in_thread_or_undo(
    function: Callable[..., T],
    undo: Callable[[T], Awaitable[None]],
    *args: Any,
    **kwargs: Any,
) -> T:
    """``in_thread`` for work whose result holds something that must be given
    back: if the awaiting task is cancelled (its client left) while the work
    runs, a thread cannot be stopped, so the work finishes and ``undo`` then
    runs on its result, in the background. Nothing taken is stranded."""
    return await _in_thread(undo, function, *args, **kwargs)


async def _in_thread(
    undo: Undo | None, function: Callable[..., T], *args: Any, **kwargs: Any
) -> T:
    if getattr(AsyncToSync.executors, "current", None) is not None:
        # Under async_to_sync (tests, commands): the calling thread's.
        work = sync_to_async(_released)(function, *args, **kwargs)
        if undo is None:
            result: T = await work
            return result
        task = asyncio.ensure_future(work)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(
                lambda done: (
                    None
                    if done.cancelled() or done.exception() is not None
                    else _undo(undo, done.result())
                )
            )
            raise
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    _pool().calls.put(
        (loop, future, undo, contextvars.copy_context(), function, args, kwargs)
    )
    if undo is None:
        return await future
    try:
        return await future
    except asyncio.CancelledError:
        # Cancelled in the loop turn between the result's arrival and this
        # task's wake-up: the result is there, and must be undone too.
        if future.done() and not future.cancelled() and future.exception() is None:
            _undo(undo, future.result())
        raise
