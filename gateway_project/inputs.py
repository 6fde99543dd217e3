"""What the database can store, checked at the boundary: no NUL character
(PostgreSQL's text and jsonb refuse it) and no lone UTF-16 surrogate (not
encodable as UTF-8), in any string or key of a JSON value; and metadata of a
bounded size and depth. Used by the request path and the REST API alike."""

import json
import re
from collections.abc import Mapping
from typing import Any

from rest_framework import parsers, serializers
from rest_framework.exceptions import ParseError

METADATA_MAX_BYTES = 16_384
METADATA_MAX_DEPTH = 8

# The only ways JSON text can carry what is checked here: the escapes \u0000
# and \uD800-\uDFFF (a raw NUL byte or a lone surrogate is invalid JSON or
# invalid UTF-8 and refused by the parser).
_SUSPECT = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def suspect(raw: bytes) -> bool:
    """Whether JSON text may hold a string the database cannot store."""
    return _SUSPECT.search(raw) is not None


def unstorable(value: Any) -> bool:
    """Whether a JSON value holds a string or key the database cannot store."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
            try:
                item.encode()
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


def storable_text(text: str) -> str:
    """``text`` as the database can store it: NUL dropped, unpaired
    surrogates replaced (for what a provider sends back)."""
    return text.encode("utf-8", "replace").decode().replace("\x00", "")


def depth(value: Any) -> int:
    """How deep a JSON value nests (a scalar is 0, ``[]`` is 1)."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, level + 1) for child in children)
    return deepest


def metadata_problem(value: Any) -> str | None:
    """Why ``value`` is not acceptable metadata (an object, at most
    METADATA_MAX_BYTES as JSON and METADATA_MAX_DEPTH deep, storable), or
    None when it is."""
    if not isinstance(value, dict):
        return "must be an object"
    if depth(value) > METADATA_MAX_DEPTH:
        return f"may be nested at most {METADATA_MAX_DEPTH} levels deep"
    if unstorable(value):
        return "must not contain the NUL character or unpaired surrogates"
    if len(json.dumps(value, ensure_ascii=False).encode()) > METADATA_MAX_BYTES:
        return f"must be at most {METADATA_MAX_BYTES} bytes as JSON"
    return None


class MetadataField(serializers.DictField):
    """A metadata object the database can store, of bounded size and depth;
    refused (400, naming the field) otherwise."""

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        problem = metadata_problem(data)
        if problem is not None:
            raise serializers.ValidationError(problem)
        value: dict[str, Any] = super().to_internal_value(data)
        return value


class JSONParser(parsers.JSONParser):
    """DRF's JSON parser, refusing (400, in the envelope) what it would
    otherwise pass on to a 500: nesting past what Python's parser allows,
    text that is not UTF-8, and strings the database cannot store."""

    def parse(
        self,
        stream: Any,
        media_type: str | None = None,
        parser_context: Mapping[str, Any] | None = None,
    ) -> Any:
        raw = stream.read() if stream is not None else b""
        try:
            data = json.loads(raw.decode("utf-8"), parse_constant=_not_a_number)
        except (ValueError, RecursionError) as error:
            raise ParseError(f"JSON parse error - {error}") from None
        if suspect(raw) and unstorable(data):
            raise ParseError(
                "JSON must not contain the NUL character or unpaired surrogates"
            )
        return data


def _not_a_number(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")
