"""Typed readers for environment variables.

Every reader raises ImproperlyConfigured naming the variable when its value is
malformed, so a bad deployment stops at start-up instead of misbehaving later.
"""

import os
from typing import Any
from urllib.parse import urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _raw(name: str) -> str | None:
    value = os.environ.get(name)
    return None if value is None else value.strip()


def env_str(name: str, default: str = "") -> str:
    value = _raw(name)
    return default if value is None or value == "" else value


def env_bool(name: str, default: bool) -> bool:
    value = _raw(name)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ImproperlyConfigured(
        f"{name} must be a boolean (true/false, 1/0, yes/no), got {value!r}"
    )


def env_int(name: str, default: int, *, minimum: int = 0) -> int:
    value = _raw(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except ValueError:
        raise ImproperlyConfigured(
            f"{name} must be an integer, got {value!r}"
        ) from None
    if number < minimum:
        raise ImproperlyConfigured(f"{name} must be >= {minimum}, got {number}")
    return number


def env_list(name: str, default: list[str]) -> list[str]:
    value = _raw(name)
    if value is None:
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


def env_choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = env_str(name, default)
    if value not in choices:
        raise ImproperlyConfigured(
            f"{name} must be one of {', '.join(choices)}, got {value!r}"
        )
    return value


def env_database(name: str, default: str) -> dict[str, Any]:
    """Parse a database URL; only PostgreSQL and SQLite are supported."""
    value = env_str(name, default)
    scheme = urlsplit(value).scheme
    if scheme not in {"postgres", "postgresql", "pgsql", "sqlite"}:
        raise ImproperlyConfigured(
            f"{name} must be a postgresql:// or sqlite:// URL, got {_redact(value)!r}"
        )
    try:
        config = dict(dj_database_url.parse(value))
        if scheme != "sqlite":
            # urlsplit validates the port lazily; touch it so "host:notaport"
            # fails here, not at the first query.
            urlsplit(value).port  # noqa: B018
            if not config.get("NAME"):
                raise ValueError("no database name")
    except ValueError as error:
        raise ImproperlyConfigured(
            f"{name} is not a valid database URL ({error}): {_redact(value)!r}"
        ) from None
    return config


def env_redis_url(name: str, default: str = "") -> str:
    value = env_str(name, default)
    if not value:
        return ""
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018
    except ValueError:
        raise ImproperlyConfigured(
            f"{name} has an invalid port: {_redact(value)!r}"
        ) from None
    if parts.scheme not in {"redis", "rediss", "unix"} or not (
        parts.hostname or parts.path
    ):
        raise ImproperlyConfigured(
            f"{name} must be a redis://, rediss:// or unix:// URL, "
            f"got {_redact(value)!r}"
        )
    return value


def _redact(url: str) -> str:
    """The URL with any password replaced, safe to put in an error message."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return parts._replace(netloc=netloc).geturl()
    return url


def env_price_pair(name: str) -> tuple[int, int] | None:
    """'input,output' in USD per million tokens → micro-USD per million, or None."""
    from decimal import Decimal, InvalidOperation

    value = env_str(name)
    if not value:
        return None
    try:
        parts = [Decimal(part.strip()) for part in value.split(",")]
    except InvalidOperation:
        parts = []
    if len(parts) != 2 or any(part < 0 for part in parts):
        raise ImproperlyConfigured(
            f"{name} must be 'input,output' USD per million tokens (e.g. 1.50,6.00), got {value!r}"
        )
    return int(parts[0] * 1_000_000), int(parts[1] * 1_000_000)
