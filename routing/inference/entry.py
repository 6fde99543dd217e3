"""The entry points of the request path, one per kind of call: each parses,
prepares (steps 1-5), answers through the one attempt loop (step 6) and
settles (step 7), then renders (step 8)."""

import asyncio
from typing import Any

from django.http import (
    HttpRequest,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)

from billing.models import UsageSource, UsageStatus
from billing.settlement import Usage
from gateway_project.threads import in_thread
from routing import providers, response_cache
from routing.inference import admit, attempt, relay, settle
from routing.inference.call import Call
from routing.inference.parse import generate_body, job_call_body, json_body
from routing.inference.prepare import prepare
from routing.inference.route import allowed_groups
from routing.providers import Target
from tenants.authentication import presented_key, virtual_key_authenticate


async def handle(
    request: HttpRequest,
    endpoint: str,
    body: dict[str, Any] | None = None,
    job_id: str | None = None,
) -> HttpResponseBase:
    """POST /v1/chat/completions, /v1/completions, /v1/embeddings."""
    body = json_body(request.body) if body is None else body
    call = await prepare(request, endpoint, body, job_id)
    if call.streamed:
        return await stream(request, call)
    target, completion = await complete(call)
    return headers(JsonResponse(completion.body), call, target)


async def complete(call: Call) -> tuple[Target | None, providers.Completion]:
    """Steps 5-7 for a call that is not streamed: the answer, settled."""
    if call.cached is not None:
        return None, await _from_cache(call)
    target, completion = await attempt.answer(call, attempt.plain(call), attempt.used)
    await settle.settle(
        call,
        status=UsageStatus.SUCCESS,
        target=target,
        usage=Usage(
            completion.prompt_tokens,
            completion.completion_tokens,
            UsageSource.PROVIDER
            if completion.usage_reported
            else UsageSource.ESTIMATED,
        ),
    )
    completion.body["model"] = call.group.group_name
    if call.cache_key is not None:
        entry = {
            "body": completion.body,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "deployment": target.deployment_id,
        }
        await in_thread(
            response_cache.store, call.cache_key, entry, call.key.team.cache_ttl_seconds
        )
    return target, completion


async def _from_cache(call: Call) -> providers.Completion:
    """A cache hit: the stored answer, settled (cached=true) and billed by
    the team's cache policy at the prices of the deployment that made it."""
    assert call.cached is not None
    entry = call.cached
    target = next(
        (t for t in call.targets if t.deployment_id == entry.get("deployment")), None
    )
    prompt, completion = int(entry["prompt_tokens"]), int(entry["completion_tokens"])
    await settle.settle(
        call,
        status=UsageStatus.SUCCESS,
        target=target,
        usage=Usage(prompt, completion, UsageSource.CACHE),
        cached=True,
    )
    body = dict(entry["body"])
    body["model"] = call.group.group_name
    return providers.Completion(
        body=body,
        prompt_tokens=prompt,
        completion_tokens=completion,
        usage_reported=True,
    )


async def stream(request: HttpRequest, call: Call) -> HttpResponseBase:
    """Open the stream on the first deployment that yields a first chunk
    (failures before it fall back), then relay it chunk by chunk.

    A hold ``admit.hold`` left to the call is written meanwhile; nothing
    leaves and nothing is recorded before it is. If it is refused, the
    stream is closed and the answer is the 402, with nothing written."""
    if call.cached is not None:
        completion = await _from_cache(call)
        response: HttpResponseBase = StreamingHttpResponse(
            relay.from_cache(call, completion), content_type="text/event-stream"
        )
        response["Cache-Control"] = "no-cache"
        return headers(response, call, None)
    if call.unheld_micros is not None:
        call.holding = asyncio.ensure_future(in_thread(admit.hold_unheld, call))
    target, (first, chunks) = await attempt.answer(
        call, attempt.streamed(call), lambda _: call.estimated_tokens
    )
    body = relay.Relay(call, target, first, chunks)
    # The server settles the body itself if it is never read (asgi.py).
    request.__dict__.setdefault("finalizers", []).append(body.finish)
    if call.holding is not None:
        try:
            await asyncio.shield(call.holding)
        except asyncio.CancelledError:
            await body.finish()
            raise
        except Exception:
            # Refused (402), or the database out of reach (503): nothing
            # was held, nothing leaves, nothing is written.
            await body.refuse()
            raise
    response = StreamingHttpResponse(body, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return headers(response, call, target)


def headers(
    response: HttpResponseBase, call: Call, target: Target | None
) -> HttpResponseBase:
    if call.admission is not None:
        for name, value in call.admission.headers().items():
            response[name] = value
    if call.cache_key is not None:
        response["x-cache"] = "hit" if call.cached is not None else "miss"
    response["x-gateway-model-group"] = call.group.group_name
    if target is not None:
        response["x-gateway-deployment"] = target.deployment_name
    response["x-gateway-attempts"] = str(
        sum(1 for a in call.attempts if "skipped" not in a)
    )
    return response


async def models(request: HttpRequest) -> JsonResponse:
    """GET /v1/models: the groups this key may use, in OpenAI's list shape."""

    def groups() -> list[Any]:
        return allowed_groups(
            virtual_key_authenticate(plaintext=presented_key(request))
        )

    listed = await in_thread(groups)
    return JsonResponse(
        {
            "object": "list",
            "data": [
                {
                    "id": group.group_name,
                    "object": "model",
                    "created": int(group.created_at.timestamp()),
                    "owned_by": "gateway",
                }
                for group in listed
            ],
        }
    )


async def generate(request: HttpRequest) -> HttpResponseBase:
    """POST /v1/generate → {model, output, cached} (seed 004)."""
    body = json_body(request.body)

    def default_model() -> str | None:
        if body.get("model"):
            return None
        groups = allowed_groups(
            virtual_key_authenticate(plaintext=presented_key(request))
        )
        return groups[0].group_name if len(groups) == 1 else None

    chat = generate_body(body, await in_thread(default_model))
    call = await prepare(request, "chat", chat)
    target, completion = await complete(call)
    choice = (completion.body.get("choices") or [{}])[0]
    output = str((choice.get("message") or {}).get("content") or "")
    return headers(
        JsonResponse(
            {
                "model": call.group.group_name,
                "output": output,
                "cached": call.cached is not None,
            }
        ),
        call,
        target,
    )


async def job_llm_call(request: HttpRequest, job_id: str) -> HttpResponseBase:
    """POST /api/jobs/{job_id}/llm-call (seed 000)."""
    body = job_call_body(json_body(request.body))
    call = await prepare(request, "chat", body, job_id)
    target, completion = await complete(call)
    choice = (completion.body.get("choices") or [{}])[0]
    return headers(
        JsonResponse(
            {
                "call_id": call.request_id,
                "response": {
                    "content": (choice.get("message") or {}).get("content"),
                    "finish_reason": choice.get("finish_reason"),
                },
                "metadata": {
                    "tokens_used": completion.prompt_tokens
                    + completion.completion_tokens,
                    "latency_ms": call.latency_ms,
                    "model": call.group.group_name,
                },
            }
        ),
        call,
        target,
    )


async def job_llm_call_stream(request: HttpRequest, job_id: str) -> HttpResponseBase:
    """POST /api/jobs/{job_id}/llm-call-stream: SSE of OpenAI chunks."""
    body = {**job_call_body(json_body(request.body)), "stream": True}
    call = await prepare(request, "chat", body, job_id)
    return await stream(request, call)
