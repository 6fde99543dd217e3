"""Step 6: the model group's deployments in order, with fallback, for plain
and streamed calls alike. There is one loop: a plain call opens an answer, a
stream opens its first chunk, and everything else (skipping, a deployment's
own limits, cooldowns, which failures fall back, what is recorded of each
attempt, how a call that fails or is abandoned is settled) is the same.
"""

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from gateway_project import metrics
from gateway_project.errors import GatewayError
from gateway_project.threads import in_thread, in_thread_or_undo
from routing import limits, providers
from routing.inference import settle
from routing.inference.call import Call, client_disconnected
from routing.inference.route import failure_record
from routing.providers import ProviderError, Target

T = TypeVar("T")
Chunks = AsyncGenerator[dict[str, Any], None]


async def answer(
    call: Call,
    opener: Callable[[Target], Awaitable[T]],
    tokens: Callable[[T], int],
) -> tuple[Target, T]:
    """The first deployment that opens: (target, what ``opener`` returned).
    ``tokens`` tells what the opened attempt used of the deployment's TPM.

    Every other way out is settled here, once: all deployments failed, a
    refusal that does not fall back, the client leaving at any await, an
    unexpected error. The call is recorded as failed, not charged, and its
    limits and hold are given back."""
    try:
        return await _attempt_all(call, opener, tokens)
    except BaseException as failure:
        if isinstance(failure, GatewayError):
            error = failure
        elif isinstance(failure, asyncio.CancelledError):
            error = client_disconnected()
        else:
            error = GatewayError(
                "The gateway failed while calling the provider",
                code="internal_error",
                http_status=500,
            )
        await settle.failed(call, error)
        raise


def plain(call: Call) -> Callable[[Target], Awaitable[providers.Completion]]:
    """An opener for a call answered at once."""

    def opener(target: Target) -> Awaitable[providers.Completion]:
        return providers.call(target, call.endpoint, call.body)

    return opener


def streamed(
    call: Call,
) -> Callable[[Target], Awaitable[tuple[dict[str, Any], Chunks]]]:
    """An opener for a stream: opened once its first chunk came."""

    async def opener(target: Target) -> tuple[dict[str, Any], Chunks]:
        chunks = providers.stream(target, call.body)
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            raise ProviderError(
                "Upstream closed the stream without data",
                status=502,
                code="upstream_error",
                retryable=True,
            ) from None
        return first, chunks

    return opener


def used(completion: providers.Completion) -> int:
    return completion.prompt_tokens + completion.completion_tokens


async def _attempt_all(
    call: Call,
    opener: Callable[[Target], Awaitable[T]],
    tokens: Callable[[T], int],
) -> tuple[Target, T]:
    tried: list[ProviderError] = []
    for target in candidates(call):
        admitted, admission = await _deployment_admit(call, target)
        if not admitted:
            continue
        started = time.monotonic()
        try:
            opened = await opener(target)
        except ProviderError as error:
            limits.release(admission, actual_tokens=0)
            call.attempts.append(_attempt(target, started, error))
            if not error.retryable:
                raise GatewayError(
                    error.message, code=error.code, http_status=error.status
                ) from None
            tried.append(error)
            await in_thread(failure_record, target.deployment_id, error)
            continue
        except BaseException:
            limits.release(admission, actual_tokens=0)
            raise
        call.attempts.append(_attempt(target, started, None))
        limits.release(admission, actual_tokens=tokens(opened))
        return target, opened
    raise _all_failed(call, tried)


def candidates(call: Call) -> list[Target]:
    """The targets to try, in order; the others are noted as skipped."""
    usable = []
    for target in call.targets:
        if target.deployment_id in call.cooled:
            reason = "cooldown"
        elif not target.available:
            reason = "no_credential"
        elif target.deployment_id not in call.prices:
            # Never silently free: a model without a known price is not routed to.
            reason = "no_price"
        else:
            usable.append(target)
            continue
        call.attempts.append({"deployment": target.deployment_name, "skipped": reason})
    return usable


async def _deployment_admit(
    call: Call, target: Target
) -> tuple[bool, limits.Admission | None]:
    """A deployment's own RPM/TPM: (False, None) while exhausted — skip it.
    No trip to a worker thread when it has no limits (the common case)."""
    if target.rpm_limit is None and target.tpm_limit is None:
        return True, None
    return await in_thread_or_undo(_deployment_acquire, _deployment_undo, call, target)


def _deployment_acquire(
    call: Call, target: Target
) -> tuple[bool, limits.Admission | None]:
    scope = limits.Scope(
        f"deployment:{target.deployment_id}", target.rpm_limit, target.tpm_limit, None
    )
    try:
        admission = limits.acquire([scope], estimate=call.estimated_tokens)
    except limits.RateLimited:
        call.attempts.append(
            {"deployment": target.deployment_name, "skipped": "rate_limited"}
        )
        return False, None
    return True, admission


async def _deployment_undo(result: tuple[bool, limits.Admission | None]) -> None:
    await in_thread(limits.release, result[1], actual_tokens=0)


def _all_failed(call: Call, tried: list[ProviderError]) -> GatewayError:
    if not tried:
        return GatewayError(
            f"No deployment of '{call.group.group_name}' is available right now",
            code="no_deployment_available",
            http_status=503,
        )
    if all(error.code == "upstream_timeout" for error in tried):
        return GatewayError(
            "Every deployment timed out", code="upstream_timeout", http_status=504
        )
    return GatewayError(
        f"Every deployment failed; last error: {tried[-1].message}",
        code="upstream_error",
        http_status=502,
    )


def _attempt(
    target: Target, started: float, error: ProviderError | None
) -> dict[str, Any]:
    elapsed = time.monotonic() - started
    attempt: dict[str, Any] = {
        "deployment": target.deployment_name,
        "latency_ms": int(elapsed * 1000),
    }
    metrics.UPSTREAM_SECONDS.labels(
        target.deployment_name, error.code if error is not None else "ok"
    ).observe(elapsed)
    if error is not None:
        attempt.update(error_code=error.code, status=error.status)
    return attempt
