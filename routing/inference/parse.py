"""Step 2's first half: the body, read and validated at the boundary.

Every input a call carries is checked here, before anything is read from the
database or asked of a provider: a refusal is a 400 in the envelope naming
the parameter, with nothing written. The ranges are the README's (*Calling
the gateway*): they keep every number the hold, the limits and the ledger
compute with far inside what PostgreSQL and Redis can store, and every string
the database keeps free of NUL, which PostgreSQL cannot store.
"""

import json
import math
from typing import Any

from gateway_project.errors import GatewayError
from gateway_project.inputs import (
    depth,
    metadata_problem,
    storable_text,
    suspect,
    unstorable,
)

# Bounds of the numeric parameters: (integer only, lowest, highest).
MAX_OUTPUT_TOKENS = 1_048_576
_RANGES: dict[str, tuple[bool, float, float]] = {
    "max_tokens": (True, 1, MAX_OUTPUT_TOKENS),
    "max_completion_tokens": (True, 1, MAX_OUTPUT_TOKENS),
    "n": (True, 1, 128),
    "best_of": (True, 1, 20),
    "temperature": (False, 0, 2),
    "top_p": (False, 0, 1),
    "top_k": (True, -1, 1_000_000),
    "presence_penalty": (False, -2, 2),
    "frequency_penalty": (False, -2, 2),
    "top_logprobs": (True, 0, 20),
    "seed": (True, -(2**63), 2**63 - 1),
    "dimensions": (True, 1, 65_536),
}
_MAX_NAME = 256
_MAX_LIST = 4_096
# Nesting of a whole body: far beyond any real request, far within what the
# provider adapters' JSON encoders can recurse through.
MAX_DEPTH = 64


def json_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object, in UTF-8. NaN, infinities, numbers
    out of range, nesting deeper than MAX_DEPTH, and strings the database
    cannot store (NUL, unpaired surrogates) are refused here."""
    try:
        body = json.loads(
            raw.decode("utf-8-sig") if raw else "{}",
            parse_constant=_non_finite,
            parse_float=_finite,
        )
    except (ValueError, RecursionError):
        raise GatewayError(
            "Request body is not valid JSON", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise GatewayError("Request body must be a JSON object", code="invalid_json")
    # Each check only where the raw text could fail it (cheap on every call).
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and depth(body) > MAX_DEPTH:
        raise GatewayError(
            f"Request body is nested deeper than {MAX_DEPTH} levels",
            code="invalid_json",
        )
    if suspect(raw):
        for name, value in body.items():
            if unstorable(name) or unstorable(value):
                raise GatewayError(
                    f"{storable_text(name)} must not contain the NUL character "
                    "(\\u0000) or unpaired surrogates",
                    param=storable_text(name),
                )
    return body


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is out of range")
    return number


def _non_finite(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def validate(endpoint: str, body: dict[str, Any]) -> None:
    """The fields of a chat, completion or embedding request that the gateway
    reads or keeps; unknown top-level fields are accepted (and not sent on)."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError("model is required", param="model")
    if len(model) > _MAX_NAME:
        raise GatewayError(
            f"model must be at most {_MAX_NAME} characters", param="model"
        )
    required = {"chat": "messages", "completion": "prompt", "embedding": "input"}[
        endpoint
    ]
    value = body.get(required)
    if endpoint == "chat":
        if not isinstance(value, list) or not value:
            raise GatewayError("messages must be a non-empty list", param="messages")
        if not all(isinstance(message, dict) for message in value):
            raise GatewayError("each message must be an object", param="messages")
    elif not isinstance(value, str | list):
        raise GatewayError(f"{required} is required", param=required)
    if isinstance(value, list) and len(value) > _MAX_LIST:
        raise GatewayError(
            f"{required} may have at most {_MAX_LIST} items", param=required
        )
    if "stream" in body and not isinstance(body["stream"], bool):
        raise GatewayError("stream must be a boolean", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise GatewayError("stream_options must be an object", param="stream_options")
    user = body.get("user")
    if user is not None and (not isinstance(user, str) or len(user) > _MAX_NAME):
        raise GatewayError(
            f"user must be a string of at most {_MAX_NAME} characters", param="user"
        )
    for name, (integer, low, high) in _RANGES.items():
        number = body.get(name)
        if number is not None:
            _in_range(name, number, integer=integer, low=low, high=high)
    _logit_bias(body.get("logit_bias"))
    metadata_validate(body.get("metadata"), param="metadata")


def _in_range(name: str, value: Any, *, integer: bool, low: float, high: float) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (integer and not isinstance(value, int))
    ):
        raise GatewayError(
            f"{name} must be {'an integer' if integer else 'a number'}", param=name
        )
    if not (math.isfinite(value) and low <= value <= high):
        raise GatewayError(f"{name} must be between {low:g} and {high:g}", param=name)


def _logit_bias(value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict) or len(value) > 1_024:
        raise GatewayError(
            "logit_bias must be an object of at most 1024 entries", param="logit_bias"
        )
    for bias in value.values():
        _in_range("logit_bias", bias, integer=False, low=-100, high=100)


def metadata_validate(value: Any, *, param: str) -> None:
    """The caller's metadata, kept on the usage record: an object (or null)
    the database can store, of bounded size and depth (gateway_project/inputs.py)."""
    if value is None:
        return
    problem = metadata_problem(value)
    if problem is not None:
        raise GatewayError(f"{param} {problem}", param=param)


# --- /v1/generate (seed 004) -------------------------------------------------

_GENERATE_RANGES: dict[str, tuple[bool, float, float]] = {
    "max_new_tokens": (True, 1, 32_768),
    "temperature": (False, 0, 2),
    "top_p": (False, 0, 1),
    "top_k": (True, 1, 1_000),
}


def generate_body(body: dict[str, Any], default_model: str | None) -> dict[str, Any]:
    """Seed 004's generate request as a chat request; out-of-range → 400 naming it."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise GatewayError("prompt is required", param="prompt")
    chat: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
    for name, (integer, low, high) in _GENERATE_RANGES.items():
        value = body.get(name)
        if value is not None:
            _in_range(name, value, integer=integer, low=low, high=high)
            chat["max_tokens" if name == "max_new_tokens" else name] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stops, list)
            or not 1 <= len(stops) <= 4
            or not all(isinstance(s, str) and s for s in stops)
        ):
            raise GatewayError(
                "stop must be a string or a list of 1 to 4 strings", param="stop"
            )
        chat["stop"] = stops
    model = body.get("model") or default_model
    if not model:
        raise GatewayError(
            "model is required: this key may use several model groups", param="model"
        )
    chat["model"] = model
    return chat


# --- jobs (seed 000) ----------------------------------------------------------

_JOB_CALL_FIELDS = {
    "temperature",
    "max_tokens",
    "response_format",
    "tools",
    "tool_choice",
    "top_p",
    "stop",
}


def job_call_body(body: dict[str, Any]) -> dict[str, Any]:
    """Seed 000's llm-call body as a chat request; purpose and call_metadata
    become the usage record's metadata."""
    chat = {key: value for key, value in body.items() if key in _JOB_CALL_FIELDS}
    chat["model"] = body.get("model")
    chat["messages"] = body.get("messages")
    metadata = body.get("call_metadata") or {}
    metadata_validate(metadata, param="call_metadata")
    purpose = body.get("purpose")
    if purpose is not None and (
        not isinstance(purpose, str) or len(purpose) > _MAX_NAME
    ):
        raise GatewayError(
            f"purpose must be a string of at most {_MAX_NAME} characters",
            param="purpose",
        )
    chat["metadata"] = {**metadata, **({"purpose": purpose} if purpose else {})}
    return chat
