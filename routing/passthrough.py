"""The lean adapter: deployments whose provider speaks OpenAI's protocol
(OpenAI itself, vLLM and most OpenAI-compatible servers) are called over one
pooled aiohttp session per event loop, with no translation.

It keeps the litellm adapter's behaviour (routing/providers.py): the same
forwarded fields, the same error mapping (timeouts and connection errors,
429, 5xx and rejected credentials move on to the next deployment; 400, 413
and 422 do not), the same OpenAI-shaped answers and stream chunks, always
asking a stream for its usage. litellm stays in charge of every other
provider, of token counting and of prices. It costs a fraction of litellm's
CPU per call (see bench/).
"""

import asyncio
import json
import weakref
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp

if TYPE_CHECKING:
    from routing.providers import ProviderError, Target

# The providers whose API is OpenAI's, and their default base URL ("" when a
# deployment must name its own server).
PROVIDERS = {"openai": "https://api.openai.com/v1", "hosted_vllm": ""}
# OpenAI's reasoning models take other parameters (max_completion_tokens, no
# temperature): litellm translates for them.
_TRANSLATED_PREFIXES = ("o1", "o3", "o4", "gpt-5")
# Deployment parameters the lean adapter can send as they are.
_PLAIN_PARAMS = {
    "temperature",
    "top_p",
    "max_tokens",
    "presence_penalty",
    "frequency_penalty",
    "stop",
    "seed",
    "user",
    "response_format",
    "extra_headers",
}
_PATHS = {"chat": "/chat/completions", "completion": "/completions"}
_PATHS["embedding"] = "/embeddings"

_sessions: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession]"
_sessions = weakref.WeakKeyDictionary()


def eligible(model: str, api_base: str, params: dict[str, Any]) -> bool:
    """Whether a deployment can be served by the lean adapter."""
    provider, _, name = model.partition("/")
    if provider not in PROVIDERS or not name:
        return False
    if not (api_base or PROVIDERS[provider]):
        return False
    if name.startswith(_TRANSLATED_PREFIXES):
        return False
    return set(params) <= _PLAIN_PARAMS


def _session() -> aiohttp.ClientSession:
    loop = asyncio.get_running_loop()
    session = _sessions.get(loop)
    if session is None or session.closed:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            json_serialize=json.dumps,
        )
        _sessions[loop] = session
    return session


def _request(
    target: "Target", kind: str, arguments: dict[str, Any]
) -> tuple[str, dict[str, str], dict[str, Any]]:
    provider, _, name = target.model.partition("/")
    base = (target.api_base or PROVIDERS[provider]).rstrip("/")
    headers = {"Content-Type": "application/json"}
    headers.update(arguments.pop("extra_headers", None) or {})
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    return base + _PATHS[kind], headers, {**arguments, "model": name}


def _error(status: int, text: str) -> "ProviderError":
    from routing.providers import ProviderError

    try:
        detail = json.loads(text).get("error") or {}
        message = str(detail.get("message") if isinstance(detail, dict) else detail)
    except (ValueError, AttributeError):
        message = text
    message = (message or f"HTTP {status}")[:500]
    if status == 429:
        return ProviderError(
            message, status=429, code="upstream_rate_limited", retryable=True
        )
    if status in (400, 413, 422):
        return ProviderError(
            message, status=400, code="upstream_invalid_request", retryable=False
        )
    return ProviderError(message, status=502, code="upstream_error", retryable=True)


def _timeout_error(target: "Target") -> "ProviderError":
    from routing.providers import ProviderError

    return ProviderError(
        f"Upstream timed out after {target.timeout_seconds:g}s",
        status=504,
        code="upstream_timeout",
        retryable=True,
    )


def _connection_error(error: BaseException) -> "ProviderError":
    from routing.providers import ProviderError

    return ProviderError(
        f"Upstream unreachable: {error}"[:500],
        status=502,
        code="upstream_error",
        retryable=True,
    )


async def call(
    target: "Target", kind: str, arguments: dict[str, Any]
) -> dict[str, Any]:
    """One attempt; the upstream's JSON answer. Raises ProviderError."""
    url, headers, payload = _request(target, kind, arguments)
    try:
        async with _session().post(
            url,
            json=payload,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=target.timeout_seconds),
        ) as response:
            text = await response.text()
            if response.status >= 400:
                raise _error(response.status, text)
    except TimeoutError:
        raise _timeout_error(target) from None
    except aiohttp.ClientError as error:
        raise _connection_error(error) from error
    try:
        result: dict[str, Any] = json.loads(text)
    except ValueError:
        raise _error(502, "Upstream answered with invalid JSON") from None
    return result


async def stream(
    target: "Target", arguments: dict[str, Any]
) -> AsyncIterator[dict[str, Any]]:
    """One streaming attempt: chunk dicts as the upstream sends them (server-sent
    events). Raises ProviderError before or during the stream."""
    url, headers, payload = _request(target, "chat", arguments)
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=target.timeout_seconds,
        sock_read=target.timeout_seconds,
    )
    try:
        async with _session().post(
            url, json=payload, headers=headers, timeout=timeout
        ) as response:
            if response.status >= 400:
                raise _error(response.status, await response.text())
            # An OpenAI stream ends with [DONE]: without it, it was cut.
            async for line in response.content:
                data = line.strip()
                if not data.startswith(b"data:"):
                    continue  # blank lines between events, comments
                data = data[5:].strip()
                if data == b"[DONE]":
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise _error(502, "Upstream sent an invalid chunk") from None
                if (
                    isinstance(chunk, dict)
                    and "error" in chunk
                    and "choices" not in chunk
                ):
                    raise _error(502, json.dumps(chunk))
                yield chunk
            raise _error(502, "Upstream closed the stream before its end")
    except TimeoutError:
        raise _timeout_error(target) from None
    except aiohttp.ClientError as error:
        raise _connection_error(error) from error
