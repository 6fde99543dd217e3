"""Exact-match response cache, scoped per team (step 5 of the request path).

A team's ``cache_mode`` decides: ``off``; ``per_request`` (only requests that
opt in with ``X-Gateway-Cache: on`` or ``"cache": true``); ``always`` (every
request, unless it sends ``X-Gateway-Cache: off`` or ``"cache": false``).
Keys hash the model group and everything that shapes the output, under the
team's own prefix, so one tenant never sees another's answers.
"""

import hashlib
import json
from typing import Any

from django.http import HttpRequest

from gateway_project.cache import cache
from tenants.models import CacheMode, Team

# The request fields that change what a model answers.
_SHAPING = (
    "messages",
    "prompt",
    "input",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stop",
    "max_tokens",
    "max_completion_tokens",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "seed",
    "tools",
    "tool_choice",
    "response_format",
    "dimensions",
    "encoding_format",
    "suffix",
)


def wanted(request: HttpRequest, body: dict[str, Any], team: Team) -> bool:
    """Whether this request may be served from, and stored in, the cache."""
    asked = request.headers.get("X-Gateway-Cache", "").strip().lower()
    flag = body.get("cache")
    if team.cache_mode == CacheMode.OFF:
        return False
    if team.cache_mode == CacheMode.ALWAYS:
        return not (asked == "off" or flag is False)
    return asked == "on" or flag is True


def key_for(team: Team, group_name: str, endpoint: str, body: dict[str, Any]) -> str:
    shaping = {name: body[name] for name in _SHAPING if name in body}
    canonical = json.dumps(
        {"group": group_name, "endpoint": endpoint, **shaping},
        sort_keys=True,
        separators=(",", ":"),
    )
    return f"response:team:{team.pk}:{hashlib.sha256(canonical.encode()).hexdigest()}"


def lookup(key: str) -> dict[str, Any] | None:
    value = cache.get(key)
    return value if isinstance(value, dict) else None


def store(key: str, entry: dict[str, Any], ttl_seconds: int) -> None:
    cache.set(key, entry, timeout=ttl_seconds)
