"""Rate limits: RPM, TPM and concurrent requests for a key, its team and its
organization, in one atomic Redis round trip per request.

Windows are fixed minutes, shared by every gateway process through Redis, so
the counts are exact across processes. TPM reserves the estimate up front and
is corrected to the actual tokens after the call. Without Redis (the embedded
default) the same rules run in-process.
"""

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway_project.errors import GatewayError

logger = logging.getLogger(__name__)

WINDOW = 60
# A crashed process cannot release its concurrency slots; they expire.
CONCURRENCY_TTL = 600

# The admission, after k0 keys and a0 arguments the script's start has used.
# KEYS: per scope, 3 keys (requests, tokens, concurrent).
# ARGV: estimate, window ttl, then per scope rpm, tpm, parallel (-1 = none).
# Returns {0, ...state, ...read} when admitted (two state values a scope),
# {1, kind, retry_after} when refused.
_ADMIT = """
local estimate = tonumber(ARGV[a0 + 1])
local ttl = tonumber(ARGV[a0 + 2])
local scopes = (#KEYS - k0) / 3
local state = {}
for i = 0, scopes - 1 do
  local rpm = tonumber(ARGV[a0 + 3 + i * 3])
  local tpm = tonumber(ARGV[a0 + 4 + i * 3])
  local parallel = tonumber(ARGV[a0 + 5 + i * 3])
  local requests = tonumber(redis.call('GET', KEYS[k0 + 1 + i * 3]) or '0')
  local tokens = tonumber(redis.call('GET', KEYS[k0 + 2 + i * 3]) or '0')
  local running = tonumber(redis.call('GET', KEYS[k0 + 3 + i * 3]) or '0')
  if rpm >= 0 and requests + 1 > rpm then return {1, 'requests', ttl} end
  if tpm >= 0 and tokens + estimate > tpm then return {1, 'tokens', ttl} end
  if parallel >= 0 and running + 1 > parallel then return {1, 'parallel', 1} end
  table.insert(state, requests)
  table.insert(state, tokens)
end
for i = 0, scopes - 1 do
  local base = k0 + i * 3
  redis.call('INCR', KEYS[base + 1])
  redis.call('EXPIRE', KEYS[base + 1], ttl + 1)
  redis.call('INCRBY', KEYS[base + 2], estimate)
  redis.call('EXPIRE', KEYS[base + 2], ttl + 1)
  redis.call('INCR', KEYS[base + 3])
  redis.call('EXPIRE', KEYS[base + 3], CONCURRENCY_TTL)
end
local result = {0}
for _, value in ipairs(state) do table.insert(result, value) end
for _, value in ipairs(read) do table.insert(result, value) end
return result
""".replace("CONCURRENCY_TTL", str(CONCURRENCY_TTL))

_ACQUIRE = "local k0, a0, read = 0, 0, {}\n" + _ADMIT

# First checks and reads, then admits. KEYS: n_expected keys, each to hold
# ARGV[3 + i] (a missing key holds '0'), n_present keys that must exist,
# n_read keys to read (a missing one reads ''), then the scopes' keys. ARGV:
# n_expected, n_present, n_read, the expected values, then the admission's.
# Returns {2} (nothing written) when a key is not as expected.
_ACQUIRE_WHEN_CURRENT = (
    """
local n_expected = tonumber(ARGV[1])
local n_present, n_read = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 1, n_expected do
  if (redis.call('GET', KEYS[i]) or '0') ~= ARGV[3 + i] then return {2} end
end
for i = n_expected + 1, n_expected + n_present do
  if redis.call('EXISTS', KEYS[i]) == 0 then return {2} end
end
local read = {}
for i = 1, n_read do
  table.insert(read, redis.call('GET', KEYS[n_expected + n_present + i]) or '')
end
local k0, a0 = n_expected + n_present + n_read, 3 + n_expected
"""
    + _ADMIT
)


class RateLimited(GatewayError):
    http_status = 429
    code = "rate_limit_exceeded"


@dataclass(frozen=True)
class Scope:
    """One limited entity: ``name`` like key:12, team:3, organization:1."""

    name: str
    rpm: int | None
    tpm: int | None
    parallel: int | None


@dataclass
class Admission:
    """What was reserved, to be corrected and released after the call."""

    scopes: list[Scope]
    window: int
    estimate: int
    reset_seconds: int
    requests_used: list[int] = field(default_factory=list)
    tokens_used: list[int] = field(default_factory=list)
    released: bool = False

    def headers(self) -> dict[str, str]:
        """x-ratelimit-* of the most constraining limits (none when unlimited)."""
        headers: dict[str, str] = {}
        for kind in ("requests", "tokens"):
            tightest: tuple[int, int] | None = None  # (remaining, limit)
            for i, scope in enumerate(self.scopes):
                limit = scope.rpm if kind == "requests" else scope.tpm
                if limit is None or i >= len(self.requests_used):
                    continue
                used = (
                    self.requests_used[i] + 1
                    if kind == "requests"
                    else self.tokens_used[i] + self.estimate
                )
                if tightest is None or limit - used < tightest[0]:
                    tightest = (limit - used, limit)
            if tightest is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(tightest[1])
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(tightest[0], 0))
                headers[f"x-ratelimit-reset-{kind}"] = f"{self.reset_seconds}s"
        return headers


def _keys(scope: Scope, window: int) -> list[str]:
    return [
        f"rl:{scope.name}:req:{window}",
        f"rl:{scope.name}:tok:{window}",
        f"rl:{scope.name}:par",
    ]


def _limited(scopes: list[Scope]) -> list[Scope]:
    return [
        s
        for s in scopes
        if s.rpm is not None or s.tpm is not None or s.parallel is not None
    ]


class Stale(Exception):
    """A value the caller expected in Redis changed (or Redis could not be
    asked): nothing was written."""


def acquire(
    scopes: list[Scope], *, estimate: int, now: float | None = None
) -> Admission | None:
    """Admit a request against every scope at once, or raise RateLimited (429,
    Retry-After). None when no scope has a limit.

    When Redis cannot be reached, GATEWAY_RATE_LIMIT_FAIL_OPEN decides: admit,
    or refuse with 503 — every call then, limited or not. Any other failure
    of the limiter refuses (503): only a connection that cannot be made is
    "Redis is down"."""
    limited = _limited(scopes)
    if not limited:
        if not settings.GATEWAY_RATE_LIMIT_FAIL_OPEN and settings.REDIS_URL:
            _guarded(lambda: _backend().ping())
        return None
    now = time.time() if now is None else now
    window, reset = int(now // WINDOW), WINDOW - int(now % WINDOW)
    keys, argv = _arguments(limited, window, reset, estimate)
    result = _guarded(lambda: _backend().acquire(keys, argv))
    if result is None:
        return None  # Redis down, fail-open
    return _admitted(result, limited, window, reset, min(estimate, MOST_TOKENS))


def _guarded(ask: Callable[[], Any]) -> Any:
    """``ask`` Redis; None when it is down and the limiter fails open."""
    try:
        return ask()
    except GatewayError:
        raise
    except (RedisConnectionError, RedisTimeoutError, OSError) as error:
        if settings.GATEWAY_RATE_LIMIT_FAIL_OPEN:
            logger.warning("rate limiter unavailable, admitting (fail-open): %s", error)
            return None
        logger.error("rate limiter unavailable, refusing (fail-closed): %s", error)
    except Exception:
        logger.exception("rate limiter failed, refusing")
    raise GatewayError(
        "Rate limiter unavailable", code="rate_limiter_unavailable", http_status=503
    )


def acquire_when_current(
    scopes: list[Scope],
    *,
    estimate: int,
    expected: dict[str, str],
    present: list[str],
    read: list[str],
    now: float | None = None,
) -> tuple[Admission | None, list[bytes | None]]:
    """``acquire`` and a read, in the round trip that checks that each
    ``expected`` Redis key (by its full name) still holds its value and that
    each ``present`` key exists: the admission and the values of ``read``
    (None for a missing key). Raises
    Stale when a key changed, or when Redis is not shared or cannot be
    reached (the caller then reads afresh and calls ``acquire``, which knows
    fail-open), and RateLimited."""
    if not settings.REDIS_URL:
        raise Stale
    limited = _limited(scopes)
    now = time.time() if now is None else now
    window, reset = int(now // WINDOW), WINDOW - int(now % WINDOW)
    keys, argv = _arguments(limited, window, reset, estimate)
    try:
        result = _backend().acquire_when_current(
            [*expected, *present, *read, *keys],
            [len(expected), len(present), len(read), *expected.values(), *argv],
        )
    except Exception as error:
        raise Stale from error
    if int(result[0]) == 2:
        raise Stale
    admitted = 1 + 2 * len(limited)  # the status and the scopes' state
    admission = _admitted(
        result[:admitted], limited, window, reset, min(estimate, MOST_TOKENS)
    )
    values: list[bytes | None] = [v or None for v in result[admitted:]]
    return (admission if limited else None), values


# The most tokens one call may reserve: every counter stays far inside what
# Redis's INCRBY can add up (the request path's own bounds are lower).
MOST_TOKENS = 2**40


def _arguments(
    limited: list[Scope], window: int, reset: int, estimate: int
) -> tuple[list[str], list[int]]:
    argv: list[int] = [max(0, min(estimate, MOST_TOKENS)), reset]
    keys: list[str] = []
    for scope in limited:
        keys += _keys(scope, window)
        argv += [
            -1 if limit is None else limit
            for limit in (scope.rpm, scope.tpm, scope.parallel)
        ]
    return keys, argv


def _admitted(
    result: list[Any], limited: list[Scope], window: int, reset: int, estimate: int
) -> Admission:
    if int(result[0]) == 1:
        kind, retry_after = (
            str(result[1], "utf-8") if isinstance(result[1], bytes) else str(result[1]),
            int(result[2]),
        )
        raise RateLimited(
            f"Rate limit exceeded ({kind}); retry in {retry_after}s",
            headers={"Retry-After": str(retry_after)},
        )
    values = [int(value) for value in result[1:]]
    return Admission(
        scopes=limited,
        window=window,
        estimate=estimate,
        reset_seconds=reset,
        requests_used=values[0::2],
        tokens_used=values[1::2],
    )


def release(admission: Admission | None, *, actual_tokens: int) -> None:
    """After the call: correct the token reservation to what was used and free
    the concurrency slot. Safe to call twice."""
    release_start(admission, actual_tokens=actual_tokens)()


def release_start(
    admission: Admission | None, *, actual_tokens: int
) -> Callable[[], None]:
    """``release``, sent now and completed by calling what it returns: the
    caller's own I/O (the settlement) runs while Redis answers, instead of one
    round trip after the other. Safe to call twice."""
    if admission is None or admission.released:
        return _nothing
    admission.released = True
    correction = actual_tokens - admission.estimate
    operations = []
    for scope in admission.scopes:
        _, tokens, running = _keys(scope, admission.window)
        operations.append((tokens, correction))
        operations.append((running, -1))
    try:
        finish: Callable[[], None] = _backend().adjust_start(operations)
    except Exception as error:  # Redis down: the keys expire on their own
        logger.warning("rate limiter release failed: %s", error)
        return _nothing
    return finish


def _nothing() -> None:
    return None


# --- backends --------------------------------------------------------------------------


class _RedisBackend:
    def __init__(self) -> None:
        from django_redis import get_redis_connection

        self.client = get_redis_connection("default")
        self.script = self.client.register_script(_ACQUIRE)
        self.script_when_current = self.client.register_script(_ACQUIRE_WHEN_CURRENT)

    def acquire(self, keys: list[str], argv: list[int]) -> list[Any]:
        return self._run(self.script, keys, argv)

    def ping(self) -> None:
        self.client.ping()

    def acquire_when_current(self, keys: list[str], argv: list[Any]) -> list[Any]:
        return self._run(self.script_when_current, keys, argv)

    def _run(self, script: Any, keys: list[str], argv: list[Any]) -> list[Any]:
        # EVALSHA by hand: redis-py's Script and evalsha inspect their own
        # arguments on every call (a deprecation wrapper), a few percent of a
        # call's CPU. Loaded again if Redis lost it (a restart, SCRIPT FLUSH).
        try:
            return list(self._evalsha(script.sha, keys, argv))
        except NoScriptError:
            script.sha = self.client.script_load(script.script)
        return list(self._evalsha(script.sha, keys, argv))

    def _evalsha(self, sha: str, keys: list[str], argv: list[Any]) -> Any:
        return self.client.execute_command("EVALSHA", sha, len(keys), *keys, *argv)

    def adjust_start(self, operations: list[tuple[str, int]]) -> Callable[[], None]:
        """Send the INCRBYs at once, as a pipeline would; the replies are read
        by the function returned, which also gives the connection back."""
        pool = self.client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command(
                connection.pack_commands(
                    [("INCRBY", key, delta) for key, delta in operations]
                )
            )
        except BaseException:
            pool.release(connection)
            raise

        def finish() -> None:
            try:
                for _ in operations:
                    connection.read_response()
            except Exception as error:  # the keys expire on their own
                connection.disconnect()  # replies may be left unread
                logger.warning("rate limiter release failed: %s", error)
            finally:
                pool.release(connection)

        return finish


class _MemoryBackend:
    """The embedded default's single process: the same rules under a lock."""

    def __init__(self) -> None:
        self.values: dict[str, int] = {}
        self.lock = threading.Lock()

    def ping(self) -> None:
        return None

    def acquire(self, keys: list[str], argv: list[int]) -> list[Any]:
        estimate, ttl = argv[0], argv[1]
        with self.lock:
            state: list[int] = []
            for i in range(len(keys) // 3):
                rpm, tpm, parallel = argv[2 + i * 3 : 5 + i * 3]
                requests, tokens, running = (
                    self.values.get(k, 0) for k in keys[i * 3 : i * 3 + 3]
                )
                if rpm >= 0 and requests + 1 > rpm:
                    return [1, "requests", ttl]
                if tpm >= 0 and tokens + estimate > tpm:
                    return [1, "tokens", ttl]
                if parallel >= 0 and running + 1 > parallel:
                    return [1, "parallel", 1]
                state += [requests, tokens]
            for i in range(len(keys) // 3):
                requests_key, tokens_key, running_key = keys[i * 3 : i * 3 + 3]
                self.values[requests_key] = self.values.get(requests_key, 0) + 1
                self.values[tokens_key] = self.values.get(tokens_key, 0) + estimate
                self.values[running_key] = self.values.get(running_key, 0) + 1
            return [0, *state]

    def adjust_start(self, operations: list[tuple[str, int]]) -> Callable[[], None]:
        with self.lock:
            for key, delta in operations:
                self.values[key] = self.values.get(key, 0) + delta
        return _nothing


_backends: dict[str, Any] = {}


def _backend() -> Any:
    kind = "redis" if settings.REDIS_URL else "memory"
    if kind not in _backends:
        _backends[kind] = _RedisBackend() if kind == "redis" else _MemoryBackend()
    return _backends[kind]
