"""The provider adapter: the only module that touches litellm, and the only
one that decrypts provider credentials.

``model_catalog`` reads litellm's bundled model map (the same file litellm
itself uses with LITELLM_LOCAL_MODEL_COST_MAP=True) without importing litellm,
so management requests stay fast; prices are parsed as Decimal, never float.
"""

import asyncio
import importlib.util
import json
import os
import threading
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

from routing import passthrough

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"

_MODEL_MAP_FILE = "model_prices_and_context_window_backup.json"


@dataclass(frozen=True)
class CatalogModel:
    """A model litellm knows: its provider and, per token, its list prices."""

    name: str
    provider: str
    mode: str
    input_cost_per_token: Decimal | None
    output_cost_per_token: Decimal | None

    @property
    def litellm_model(self) -> str:
        """The model string litellm routes: ``provider/name``."""
        return (
            self.name
            if self.name.startswith(f"{self.provider}/")
            else f"{self.provider}/{self.name}"
        )


@cache
def model_catalog() -> dict[str, CatalogModel]:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / _MODEL_MAP_FILE
    raw: dict[str, Any] = json.loads(path.read_text(), parse_float=Decimal)
    catalog = {}
    for name, entry in raw.items():
        if (
            name == "sample_spec"
            or not isinstance(entry, dict)
            or not entry.get("litellm_provider")
        ):
            continue  # "sample_spec" documents the file's format
        catalog[name] = CatalogModel(
            name=name,
            provider=str(entry["litellm_provider"]),
            mode=str(entry.get("mode", "")),
            input_cost_per_token=_decimal(entry.get("input_cost_per_token")),
            output_cost_per_token=_decimal(entry.get("output_cost_per_token")),
        )
    return catalog


def _decimal(value: Any) -> Decimal | None:
    return None if value is None else Decimal(value)


def catalog_model(name: str) -> CatalogModel | None:
    return model_catalog().get(name)


# --- calling providers ---------------------------------------------------------

# What the gateway forwards of an OpenAI request; everything else (metadata,
# timeout, our own fields) stays here.
_FORWARDED = {
    "messages",
    "prompt",
    "input",
    "temperature",
    "top_p",
    "n",
    "stop",
    "max_tokens",
    "max_completion_tokens",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "response_format",
    "seed",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "logprobs",
    "top_logprobs",
    "dimensions",
    "encoding_format",
    "suffix",
    "echo",
    "best_of",
    "reasoning_effort",
    "modalities",
    "audio",
    "prediction",
    "top_k",
}


class ProviderError(Exception):
    """A failed attempt. ``retryable`` failures move on to the next deployment."""

    def __init__(
        self, message: str, *, status: int, code: str, retryable: bool
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.retryable = retryable


@dataclass(frozen=True)
class Target:
    """Everything an attempt needs, detached from the ORM (usable in async code)."""

    deployment_id: int
    deployment_name: str
    model: str
    api_key: str
    api_base: str
    params: dict[str, Any]
    timeout_seconds: float
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    # "passthrough" (routing/passthrough.py) for providers that speak OpenAI's
    # protocol, else "litellm".
    adapter: str = "litellm"

    @property
    def available(self) -> bool:
        """Whether it can be called at all: a credential, or a local server or
        a mock that needs none."""
        return bool(self.api_key or self.api_base or "mock_response" in self.params)


def target_for(deployment: Any) -> Target:
    """A deployment (with its credential loaded) as an attempt target.

    The one place credentials are decrypted.
    """
    from gateway_project.crypto import decrypt_text

    credential = deployment.credential
    params = dict(deployment.litellm_params)
    api_base = str(
        params.pop("api_base", "") or (credential.api_base if credential else "")
    )
    api_key = str(params.pop("api_key", "") or "")
    if credential is not None and credential.api_key_encrypted:
        api_key = decrypt_text(credential.api_key_encrypted)
    if credential is not None:
        params = {**credential.extra, **params}
    from django.conf import settings

    lean = settings.GATEWAY_PASSTHROUGH and passthrough.eligible(
        deployment.model, api_base, params
    )
    return Target(
        adapter="passthrough" if lean else "litellm",
        deployment_id=deployment.pk,
        deployment_name=deployment.name,
        model=deployment.model,
        api_key=api_key,
        api_base=api_base,
        params=params,
        timeout_seconds=deployment.timeout_ms / 1000,
        rpm_limit=deployment.rpm_limit,
        tpm_limit=deployment.tpm_limit,
    )


def _litellm() -> Any:
    import litellm  # heavy: imported on the first call only

    litellm.drop_params = True
    litellm.suppress_debug_info = True
    return litellm


def _forwarded(target: Target, body: dict[str, Any]) -> dict[str, Any]:
    """The request's OpenAI fields, with the deployment's own parameters."""
    arguments = {key: value for key, value in body.items() if key in _FORWARDED}
    arguments.update(target.params)
    return arguments


def _arguments(target: Target, body: dict[str, Any]) -> dict[str, Any]:
    arguments = _forwarded(target, body)
    # No retries inside litellm or its openai client: fallback is ours.
    arguments.update(
        model=target.model, timeout=target.timeout_seconds, num_retries=0, max_retries=0
    )
    if target.api_key:
        arguments["api_key"] = target.api_key
    elif target.api_base:
        # A local OpenAI-compatible server (vLLM, Ollama, llama.cpp) wants no
        # credential, but the openai client refuses to start without one.
        arguments["api_key"] = "no-key-needed"
    if target.api_base:
        arguments["api_base"] = target.api_base
    return arguments


def provider_error(error: BaseException) -> ProviderError:
    """Map litellm's (and the network's) exceptions to ours."""
    exceptions = _litellm().exceptions
    message = str(getattr(error, "message", "") or error)[:500]
    if isinstance(error, exceptions.Timeout | TimeoutError):
        return ProviderError(
            f"Upstream timed out: {message}",
            status=504,
            code="upstream_timeout",
            retryable=True,
        )
    status = getattr(error, "status_code", None)
    if isinstance(error, exceptions.RateLimitError) or status == 429:
        return ProviderError(
            message, status=429, code="upstream_rate_limited", retryable=True
        )
    if isinstance(
        error,
        exceptions.ContextWindowExceededError | exceptions.ContentPolicyViolationError,
    ):
        return ProviderError(
            message, status=400, code="upstream_invalid_request", retryable=False
        )
    if isinstance(
        error, exceptions.BadRequestError | exceptions.UnprocessableEntityError
    ) or status in (400, 413, 422):
        return ProviderError(
            message, status=400, code="upstream_invalid_request", retryable=False
        )
    # Connection errors, 5xx, a provider that rejects our credential (another
    # deployment may hold a good one) and anything unexpected: try the next.
    return ProviderError(message, status=502, code="upstream_error", retryable=True)


@dataclass
class Completion:
    """A provider's answer as an OpenAI-shaped body, with its token counts."""

    body: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int
    usage_reported: bool


async def call(target: Target, kind: str, body: dict[str, Any]) -> Completion:
    """One attempt: ``kind`` is chat, completion or embedding.

    Raises ProviderError.
    """
    if target.adapter == "passthrough":
        result = await passthrough.call(target, kind, _forwarded(target, body))
    else:
        litellm = _litellm()
        function = {
            "chat": litellm.acompletion,
            "completion": litellm.atext_completion,
            "embedding": litellm.aembedding,
        }[kind]
        try:
            response = await asyncio.wait_for(
                function(**_arguments(target, body)),
                timeout=target.timeout_seconds + 1,
            )
            result = response.model_dump(exclude_none=True)
        except ProviderError:
            raise
        except Exception as error:
            raise provider_error(error) from error
    prompt, completion = reported_usage(result.get("usage")) or (0, 0)
    # litellm reports zeros when the upstream sent no usage: count them here.
    reported = prompt + completion > 0
    if not reported:
        texts = [
            str(
                (choice.get("message") or {}).get("content") or choice.get("text") or ""
            )
            for choice in result.get("choices") or []
        ]
        prompt, completion = estimate_tokens(target, body, "".join(texts))
        if kind == "embedding":
            completion = 0
    return Completion(
        body=result,
        prompt_tokens=prompt,
        completion_tokens=completion,
        usage_reported=reported,
    )


# The usage record keeps token counts as PostgreSQL integers.
_MOST_TOKENS = 2**31 - 1


def reported_usage(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens of an upstream's ``usage`` object; None
    when it sent none, or counts that are not whole numbers in range (then
    the gateway counts them itself)."""
    if not isinstance(usage, dict) or not usage:
        return None
    counts = []
    for name in ("prompt_tokens", "completion_tokens"):
        value = usage.get(name) or 0
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        if not 0 <= value <= _MOST_TOKENS:
            return None
        counts.append(value)
    return counts[0], counts[1]


async def stream(
    target: Target, body: dict[str, Any]
) -> AsyncGenerator[dict[str, Any], None]:
    """One streaming attempt: OpenAI chunk dicts as they arrive; the upstream is
    always asked for a usage chunk. Raises ProviderError (before or during)."""
    if target.adapter == "passthrough":
        arguments = _forwarded(target, body)
        arguments.update(stream=True, stream_options={"include_usage": True})
        async for relayed in passthrough.stream(target, arguments):
            yield relayed
        return
    litellm = _litellm()
    arguments = _arguments(target, body)
    arguments.update(stream=True, stream_options={"include_usage": True})
    try:
        response = await asyncio.wait_for(
            litellm.acompletion(**arguments), timeout=target.timeout_seconds + 1
        )
    except Exception as error:
        raise provider_error(error) from error
    iterator = response.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(
                iterator.__anext__(), timeout=target.timeout_seconds
            )
        except StopAsyncIteration:
            return
        except Exception as error:
            raise provider_error(error) from error
        data = chunk.model_dump(exclude_none=True)
        if data.get("usage") and not _upstream_sent_usage(response):
            # litellm counted these itself: the upstream sent no usage chunk.
            data["_usage_estimated"] = True
        yield data


def _upstream_sent_usage(wrapper: Any) -> bool:
    """Whether the upstream's own chunks (kept by litellm's stream wrapper)
    carried usage, as opposed to usage litellm computed at the end."""
    for raw in getattr(wrapper, "chunks", []) or []:
        usage = (
            raw.get("usage") if isinstance(raw, dict) else getattr(raw, "usage", None)
        )
        if usage:
            return True
    return False


# Model names litellm counts with a Hugging Face tokenizer, not tiktoken.
_HUGGING_FACE_TOKENIZED = ("llama-2", "llama-3", "replicate", "claude", "command-r")


_cl100k_lock = threading.Lock()


def _cl100k() -> Any:
    """tiktoken's cl100k_base from the copy litellm bundles (never fetched).
    Loaded once per process (about 0.3 s): the first calls of a new worker
    arrive together, and each would otherwise load its own."""
    with _cl100k_lock:
        return _cl100k_load()


@cache
def _cl100k_load() -> Any:
    spec = importlib.util.find_spec("litellm")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations)))
        os.environ.setdefault(
            "TIKTOKEN_CACHE_DIR", str(bundled / "litellm_core_utils" / "tokenizers")
        )
    import tiktoken

    return tiktoken.get_encoding("cl100k_base")


def _counted_here(
    target: Target, body: dict[str, Any], completion_text: str
) -> tuple[int, int] | None:
    """litellm's count, without importing litellm (160 MB and 2.4 s per
    worker), for the case the request path meets most: a provider-prefixed
    OpenAI-protocol model, which litellm counts with cl100k_base (3 tokens a
    message, 1 more for a name, 3 to prime the reply), and plain string
    fields. None otherwise: litellm counts."""
    provider = target.model.split("/", 1)[0]
    if (
        "/" not in target.model
        or provider not in passthrough.PROVIDERS
        or any(name in target.model.lower() for name in _HUGGING_FACE_TOKENIZED)
    ):
        return None
    messages = body.get("messages")
    given = body.get("prompt") or body.get("input") or ""
    if messages is not None and not (
        isinstance(messages, list)
        and all(
            isinstance(m, dict)
            and set(m) <= {"role", "content", "name"}
            and all(isinstance(v, str) for v in m.values())
            for m in messages
        )
    ):
        return None
    if messages is None and not isinstance(given, str | list):
        return None
    encoding = _cl100k()

    def count(text: str) -> int:
        return len(encoding.encode(text, disallowed_special=()))

    if messages:
        prompt = 3 + sum(
            3 + sum(count(v) for v in m.values()) + ("name" in m) for m in messages
        )
    else:
        prompt = count(given if isinstance(given, str) else " ".join(map(str, given)))
    return prompt, count(completion_text) if completion_text else 0


def estimate_tokens(
    target: Target, body: dict[str, Any], completion_text: str
) -> tuple[int, int]:
    """(prompt, completion) tokens counted here, for a stream whose upstream
    sent no usage: litellm's tokenizer for the model, else ~4 characters a token."""
    counted = _counted_here(target, body, completion_text)
    if counted is not None:
        return counted
    messages = body.get("messages") or []
    try:
        counter = _litellm().token_counter
        if messages:
            prompt = int(counter(model=target.model, messages=messages))
        else:
            given = body.get("prompt") or body.get("input") or ""
            text = given if isinstance(given, str) else " ".join(map(str, given))
            prompt = int(counter(model=target.model, text=text))
        completion = (
            int(counter(model=target.model, text=completion_text))
            if completion_text
            else 0
        )
    except Exception:  # an unknown tokenizer must not lose the record
        prompt = max(1, len(json.dumps(messages)) // 4)
        completion = (len(completion_text) + 3) // 4
    return prompt, completion


def text_tokens(target: Target, text: str) -> int:
    """Tokens of ``text`` as ``estimate_tokens`` counts a completion."""
    return estimate_tokens(target, {"prompt": ""}, text)[1] if text else 0
