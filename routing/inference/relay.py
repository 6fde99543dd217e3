"""A streamed answer, relayed chunk by chunk as it arrives (server-sent
events), and settled exactly once however it ends: finished, cut by the
provider, or abandoned by the client at any point, including before its
body was ever read (the server then calls ``Relay.finish``)."""

import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from billing.journal import PROGRESS_SECONDS, journal
from billing.models import UsageSource, UsageStatus
from billing.settlement import Usage
from gateway_project.errors import GatewayError
from gateway_project.threads import in_thread
from routing import limits, providers, response_cache
from routing.inference import settle
from routing.inference.call import Call
from routing.providers import ProviderError, Target

logger = logging.getLogger(__name__)
DONE = b"data: [DONE]\n\n"
# What a stream settled from the journal says of its end.
INTERRUPTED = GatewayError(
    "The gateway stopped before the stream ended; charged for what it had relayed",
    code="gateway_interrupted",
    http_status=200,
)


def event(chunk: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(chunk)}\n\n".encode()


class Relay:
    """The body of a streaming response: an async iterable of SSE events."""

    def __init__(
        self,
        call: Call,
        target: Target,
        first: dict[str, Any],
        chunks: AsyncGenerator[dict[str, Any], None],
    ) -> None:
        self.call = call
        self.target = target
        self.first = first
        self.chunks = chunks
        self.usage: dict[str, Any] = {}
        self.usage_estimated = False
        self.text: list[str] = []
        # Until the last chunk is out, an end is the client's.
        self.status: str = UsageStatus.CLIENT_DISCONNECTED
        self.error: GatewayError | None = None
        self.started = False
        self.finished = False
        self.next_progress = 0.0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._events()

    async def _events(self) -> AsyncIterator[bytes]:
        self.started = True
        try:
            pending: dict[str, Any] | None = self.first
            while pending is not None:
                relayed = self._take(pending)
                if relayed is not None:
                    yield event(relayed)
                    self._checkpoint()
                try:
                    pending = await self.chunks.__anext__()
                except StopAsyncIteration:
                    pending = None
            self.status = UsageStatus.SUCCESS
            yield DONE
        except ProviderError as failure:
            # The provider broke the stream after output went out: that
            # output is paid for, as a stream the client cut is.
            self.status = UsageStatus.INTERRUPTED
            self.error = GatewayError(
                failure.message, code=failure.code, http_status=failure.status
            )
            yield event(
                {
                    "error": {
                        "message": failure.message,
                        "type": "api_error",
                        "code": failure.code,
                        "param": None,
                    }
                }
            )
            yield DONE
        finally:
            await self.finish()

    def _take(self, chunk: dict[str, Any]) -> dict[str, Any] | None:
        """Note what a chunk carries (text, usage); the chunk as the client
        gets it, or None when it is the usage the client did not ask for."""
        if chunk.pop("_usage_estimated", False):
            self.usage_estimated = True
        usage = chunk.get("usage")
        choices = chunk.get("choices") or []
        for choice in choices:
            self.text.append(str((choice.get("delta") or {}).get("content") or ""))
        if usage:
            self.usage = usage
            if not self.call.wants_usage:
                if not any(
                    (c.get("delta") or {}).get("content") or c.get("finish_reason")
                    for c in choices
                ):
                    return None
                chunk = {k: v for k, v in chunk.items() if k != "usage"}
        chunk["model"] = self.call.group.group_name
        return chunk

    def _checkpoint(self) -> None:
        """Output has been delivered: the journal learns, when the first
        chunk is out and then every PROGRESS_SECONDS, what the stream would
        be charged if this process died now (billing/journal.py)."""
        now = time.monotonic()
        if now < self.next_progress:
            return
        self.next_progress = now + PROGRESS_SECONDS
        prompt = self.call.estimate.prompt_tokens if self.call.estimate else 0
        completion = providers.text_tokens(self.target, "".join(self.text))
        try:
            journal().progress(
                settle.settlement_of(
                    self.call,
                    status=UsageStatus.INTERRUPTED,
                    target=self.target,
                    usage=Usage(prompt, completion, UsageSource.ESTIMATED),
                    error=INTERRUPTED,
                    streamed=True,
                )
            )
        except OSError:
            # A journal that cannot be written never breaks a stream; what
            # it risks is a stream unpaid if this process dies too.
            logger.exception("stream progress not journaled")
            return
        self.call.journaled = True

    async def finish(self) -> None:
        """Settle the stream once: what was generated is paid for (a client
        that leaves pays for it too); the upstream is closed if still open."""
        if self.finished:
            return
        self.finished = True
        if not self.started:
            self._take(self.first)  # generated, though never sent
        text = "".join(self.text)
        counted = providers.reported_usage(self.usage)
        if counted is None:  # the stream ended (or was cut) before any usage
            counted = providers.estimate_tokens(self.target, self.call.body, text)
        source = (
            UsageSource.ESTIMATED
            if self.usage_estimated or not self.usage
            else UsageSource.PROVIDER
        )
        usage = Usage(*counted, source=source)
        # The settlement starts before anything else is awaited: a second
        # cancellation (a shutdown) cannot stop it, it is shielded.
        settling = settle.settle(
            self.call,
            status=self.status,
            target=self.target,
            usage=usage,
            error=self.error,
            streamed=True,
        )
        try:
            await settling
        finally:
            if self.status != UsageStatus.SUCCESS:
                # Not running (its reader is gone or finished): closing frees
                # the upstream connection.
                with contextlib.suppress(Exception):
                    await self.chunks.aclose()
        if self.status == UsageStatus.SUCCESS and self.call.cache_key is not None:
            await in_thread(
                response_cache.store,
                self.call.cache_key,
                _cache_entry(self.call, self.target, text, usage),
                self.call.key.team.cache_ttl_seconds,
            )

    async def refuse(self) -> None:
        """The stream's hold was refused: close it, write nothing."""
        self.finished = True
        self.call.settled = True
        limits.release(self.call.admission, actual_tokens=0)
        with contextlib.suppress(Exception):
            await self.chunks.aclose()


def _cache_entry(call: Call, target: Target, text: str, usage: Usage) -> dict[str, Any]:
    """A streamed answer, stored in the cache as a plain completion."""
    counts = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
    }
    return {
        "body": {
            "id": f"chatcmpl-{call.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.group.group_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {**counts, "total_tokens": usage.total_tokens},
        },
        **counts,
        "deployment": target.deployment_id,
    }


def from_cache(call: Call, completion: providers.Completion) -> AsyncIterator[bytes]:
    """A cache hit for a streaming request, answered as a stream."""
    choice = (completion.body.get("choices") or [{}])[0]
    content = str((choice.get("message") or {}).get("content") or "")
    base = {
        "id": completion.body.get("id", "chatcmpl-cache"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": call.group.group_name,
    }
    chunks = [
        {
            **base,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": content}}
            ],
        },
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {},
                    "finish_reason": choice.get("finish_reason", "stop"),
                }
            ],
        },
    ]
    if call.wants_usage:
        chunks.append(
            {
                **base,
                "choices": [],
                "usage": {
                    "prompt_tokens": completion.prompt_tokens,
                    "completion_tokens": completion.completion_tokens,
                    "total_tokens": completion.prompt_tokens
                    + completion.completion_tokens,
                },
            }
        )

    async def events() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield event(chunk)
        yield DONE

    return events()
