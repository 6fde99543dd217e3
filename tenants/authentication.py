"""Authenticating a team's virtual key: the one implementation the management
API, the tenant API and the inference path all use."""

from typing import Any

from django.http import HttpRequest
from django.utils import timezone

from gateway_project.errors import GatewayError
from tenants.key_cache import (
    KeyRecalled,
    key_cache_names,
    key_last_used_stamp,
    key_lookup,
    key_recall,
)
from tenants.keys import key_matches, key_parse
from tenants.models import Status, VirtualKey
from tenants.services import key_state


class MissingApiKey(GatewayError):
    http_status = 401
    code = "missing_api_key"


class InvalidApiKey(GatewayError):
    http_status = 401
    code = "invalid_api_key"


class TeamInactive(GatewayError):
    http_status = 403
    code = "team_inactive"


def presented_key(request: HttpRequest) -> str | None:
    """The key from ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``."""
    explicit = request.headers.get("X-API-Key")
    if explicit is not None:
        return explicit.strip()
    authorization = request.headers.get("Authorization", "")
    scheme, _, credential = authorization.partition(" ")
    if scheme.lower() == "bearer" and credential.strip():
        return credential.strip()
    return None


def looks_like_virtual_key(credential: str) -> bool:
    return key_parse(credential) is not None


def virtual_key_recall(plaintext: str | None) -> KeyRecalled | None:
    """The key of ``plaintext`` as this process last read it, if it did, with
    what proves it current (tenants.key_cache.key_recall); not checked."""
    public_id = key_parse(plaintext) if plaintext else None
    return key_recall(public_id) if public_id else None


def virtual_key_cache_names(plaintext: str | None) -> list[str]:
    """The cache entries authenticating ``plaintext`` reads (none for a
    malformed key), to be read with others in one round trip and handed to
    ``virtual_key_authenticate(prefetched=...)``."""
    public_id = key_parse(plaintext) if plaintext else None
    return key_cache_names(public_id) if public_id else []


def virtual_key_authenticate(
    *, plaintext: str | None, prefetched: dict[str, Any] | None = None
) -> VirtualKey:
    """The key (with its team and organization) for a presented secret;
    ``prefetched`` holds the entries of ``virtual_key_cache_names`` if read.

    Raises MissingApiKey, InvalidApiKey (unknown, wrong secret, revoked,
    expired, or rotated past its grace period: one message for all), and
    TeamInactive for a suspended team.
    """
    if not plaintext:
        raise MissingApiKey(
            "Missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key'"
        )
    public_id = key_parse(plaintext)
    key = key_lookup(public_id, prefetched=prefetched) if public_id else None
    # Unknown id and wrong secret are indistinguishable.
    if key is None:
        raise InvalidApiKey("Invalid API key")
    return virtual_key_check(key=key, plaintext=plaintext)


def virtual_key_check(*, key: VirtualKey, plaintext: str) -> VirtualKey:
    """``key`` if ``plaintext`` is its secret and it may be used now; raises
    as ``virtual_key_authenticate`` does."""
    # The digest comparison is constant-time.
    if not key_matches(plaintext, key.digest):
        raise InvalidApiKey("Invalid API key")
    now = timezone.now()
    if key_state(key, now=now) != "valid":
        raise InvalidApiKey("Invalid API key")
    if key.team.status != Status.ACTIVE:
        raise TeamInactive(f"Team '{key.team.team_id}' is {key.team.status}")
    organization = key.team.organization
    if organization.status != Status.ACTIVE:
        raise TeamInactive(
            f"Organization '{organization.organization_id}' is {organization.status}"
        )
    return key


def virtual_key_touch(*, key: VirtualKey) -> None:
    """Note the key's use after a request it was allowed to make (never on a
    refusal: a refused request writes nothing). Key sync flushes the stamps
    to ``last_used_at``."""
    key_last_used_stamp(key=key)
