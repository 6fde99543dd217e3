"""The key cache in Redis: what authenticating a key needs, shared by every
gateway process, and the throttled ``last_used`` stamps.

An entry holds the key row (with its team and organization) and the model
groups it may use, stamped with a *generation*. Every change to an
organization, team or key bumps the generation after commit, so every process
stops trusting older entries at once: a revocation is visible to all instances
on their next request. A process that read the generation before loading a key
from the database writes its entry with that generation, so a change committed
meanwhile can never be masked by a stale entry.

A process also remembers the keys it has read (``key_recall``), so that the
request path can skip reading the entry: it proves, in the round trip it
makes anyway, that the generation is unchanged and the entry still exists.

When Redis is unreachable, keys are read from the database (and ``last_used``
is written there, throttled): authentication never depends on the cache.
"""

import logging
import pickle
import time
from datetime import UTC, datetime
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.db import transaction
from django.db.models import Max, Q
from django.utils import timezone

from gateway_project.cache import cache, cache_names
from gateway_project.generations import generation_bump, generation_changed
from gateway_project.metrics import BACKGROUND_FAILURES
from tenants.models import KeyStatus, Organization, Team, VirtualKey

logger = logging.getLogger(__name__)

GENERATION = "keys:generation"
SYNCED_THROUGH = "keys:synced_through"
LAST_USED_HASH = "keys:last_used"
# An entry lives this long at most, whatever happens to invalidation.
ENTRY_SECONDS = 300
# A process stamps a key's last use in Redis at most this often.
STAMP_SECONDS = 5.0

_stamped: dict[int, float] = {}
# Public id → (generation, when, the pickled key): the keys this process has
# read, see key_recall.
_remembered: dict[str, tuple[int, float, bytes]] = {}
_REMEMBERED_KEPT = 10_000  # past that the memory starts over


def _entry_name(public_id: str) -> str:
    return f"keys:entry:{public_id}"


def _redis_configured() -> bool:
    return bool(settings.REDIS_URL)


def _load(public_id: str) -> VirtualKey | None:
    key = (
        VirtualKey.objects.select_related("team__organization")
        .filter(public_id=public_id)
        .first()
    )
    if key is None:
        return None
    team_groups = set(key.team.model_groups.values_list("pk", flat=True))
    restricted = set(key.allowed_model_groups.values_list("pk", flat=True))
    key.__dict__["allowed_group_ids"] = frozenset(
        team_groups & restricted if restricted else team_groups
    )
    return key


def key_allowed_group_ids(key: VirtualKey) -> frozenset[int]:
    """The model groups (any status) a key may use: its own subset of its
    team's, or all of its team's."""
    cached = key.__dict__.get("allowed_group_ids")
    if cached is None:
        loaded = _load(key.public_id)
        cached = loaded.__dict__["allowed_group_ids"] if loaded else frozenset()
        key.__dict__["allowed_group_ids"] = cached
    return frozenset(cached)


def key_cache_names(public_id: str) -> list[str]:
    """The cache entries ``key_lookup`` reads, for a caller that reads them
    together with its own in one round trip."""
    return [GENERATION, _entry_name(public_id)]


def key_lookup(
    public_id: str, *, prefetched: dict[str, Any] | None = None
) -> VirtualKey | None:
    """The key with this public id, from the cache when its entry is current,
    else from the database (then cached). Unknown ids are not cached.
    ``prefetched``: the entries of ``key_cache_names``, already read."""
    name = _entry_name(public_id)
    if prefetched is not None:
        found = prefetched
    else:
        try:
            found = cache.get_many(key_cache_names(public_id))
        except Exception as error:  # Redis down: the database decides alone
            logger.warning("key cache unavailable, reading the database: %s", error)
            return _load(public_id)
    generation = found.get(GENERATION, 0)
    entry = found.get(name)
    if entry is not None and entry["generation"] == generation:
        key: VirtualKey = entry["key"]
        _remember(public_id, generation, key)
        return key
    loaded = _load(public_id)
    if loaded is not None:
        _remember(public_id, generation, loaded)
        try:
            cache.set(
                name, {"generation": generation, "key": loaded}, timeout=ENTRY_SECONDS
            )
        except Exception as error:
            logger.warning("key cache write failed: %s", error)
    return loaded


def _remember(public_id: str, generation: int, key: VirtualKey) -> None:
    if not _redis_configured():
        return  # nothing could prove it current
    if len(_remembered) >= _REMEMBERED_KEPT:
        _remembered.clear()
    _remembered[public_id] = (generation, time.monotonic(), pickle.dumps(key))


# The key, {the generation's full name: the value it was read under}, and
# the full name of its cache entry.
KeyRecalled = tuple[VirtualKey, dict[str, str], str]


def key_recall(public_id: str) -> KeyRecalled | None:
    """The key as this process last read it, for a caller that checks in
    Redis, in a round trip it makes anyway, that it is still current: that
    the generation (by its full name, in the returned dict) still holds the
    value it was read under (a change to any key bumps it), and that the
    key's cache entry (the returned name) still exists, which a flushed or
    expired cache does not. A fresh copy each time: a caller may change it."""
    remembered = _remembered.get(public_id)
    if remembered is None or time.monotonic() - remembered[1] >= ENTRY_SECONDS:
        return None
    key: VirtualKey = pickle.loads(remembered[2])  # noqa: S301 - our own bytes
    generation, entry = cache_names(GENERATION, _entry_name(public_id))
    return key, {generation: str(remembered[0])}, entry


def key_cache_invalidate() -> None:
    """Make every cached key entry stale (all instances at once). Call after
    commit of any change to an organization, team or key. While Redis is down
    entries cannot be read either; key sync bumps again once it finds the
    changed rows."""
    generation_bump(GENERATION)


def key_cache_invalidate_on_commit() -> None:
    """Invalidate now and again once the current transaction commits."""
    generation_changed(GENERATION)


def key_last_used_stamp(*, key: VirtualKey) -> None:
    """Note that the key was just used. With Redis, a stamp in a hash that key
    sync flushes to the database; without it, a throttled database write."""
    now = time.monotonic()
    if now - _stamped.get(key.pk, -STAMP_SECONDS) < STAMP_SECONDS:
        return
    _stamped[key.pk] = now
    if _redis_configured():
        try:
            from django_redis import get_redis_connection

            get_redis_connection("default").hset(
                _raw_name(LAST_USED_HASH), str(key.pk), int(time.time())
            )
            return
        except Exception as error:
            logger.warning("last_used stamp to Redis failed: %s", error)
    stamp = timezone.now()
    VirtualKey.objects.filter(pk=key.pk).filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=stamp)
    ).update(last_used_at=stamp)


def _raw_name(name: str) -> str:
    prefix = settings.CACHES["default"].get("KEY_PREFIX", "")
    return f"{prefix}:{name}" if prefix else name


def key_last_used_flush() -> dict[str, int]:
    """Write the stamps collected in Redis to ``last_used_at``; returns how many
    keys were stamped and how many stamps failed (malformed or refused by the
    database: logged, counted and dropped, never blocking the others). A
    flush interrupted half-way is resumed by the next."""
    done = {"flushed": 0, "failed": 0}
    if not _redis_configured():
        return done
    from django_redis import get_redis_connection

    client = get_redis_connection("default")
    live, flushing = _raw_name(LAST_USED_HASH), _raw_name(LAST_USED_HASH + ":flushing")
    if not client.exists(flushing):
        if not client.exists(live):
            return done
        client.rename(live, flushing)
    with transaction.atomic():
        # In one order, so that two flushes of the same hash never deadlock.
        for field, value in sorted(client.hgetall(flushing).items()):
            try:
                pk, stamp = int(field), datetime.fromtimestamp(int(value), tz=UTC)
                # A savepoint: a stamp the database refuses undoes only itself.
                with transaction.atomic():
                    VirtualKey.objects.filter(pk=pk).filter(
                        Q(last_used_at__isnull=True) | Q(last_used_at__lt=stamp)
                    ).update(last_used_at=stamp)
            except SoftTimeLimitExceeded:
                raise  # the task's time is up: stop, not the stamp's fault
            except Exception:
                # The field is a key's pk (never its secret), or garbage.
                logger.exception(
                    "last_used stamp of key %r could not be written", field
                )
                BACKGROUND_FAILURES.labels(work="key_last_used_flush").inc()
                done["failed"] += 1
                continue
            done["flushed"] += 1
    # A stamp that failed is dropped: retrying a malformed one would fail
    # every flush, and the next use of the key stamps it again.
    client.delete(flushing)
    return done


def virtual_keys_expire(*, now: datetime) -> int:
    """Mark keys past their expiry ``expired``; returns how many."""
    return VirtualKey.objects.filter(
        status=KeyStatus.ACTIVE, expires_at__lte=now
    ).update(status=KeyStatus.EXPIRED, updated_at=now)


def _latest_change() -> datetime | None:
    stamps = [
        model.objects.aggregate(latest=Max("updated_at"))["latest"]
        for model in (Organization, Team, VirtualKey)
    ]
    present = [stamp for stamp in stamps if stamp is not None]
    return max(present) if present else None


def virtual_keys_sync(*, now: datetime) -> dict[str, Any]:
    """Key sync: mark expired keys, invalidate the cache when any organization,
    team or key changed since the last sync (also changes made behind the
    services' back), and flush ``last_used`` stamps (a stamp that fails is
    logged and counted in ``last_used_failed``). Idempotent."""
    expired = virtual_keys_expire(now=now)
    latest = _latest_change()
    try:
        synced: datetime | None = cache.get(SYNCED_THROUGH)
    except Exception as error:
        logger.warning("key sync cannot reach Redis: %s", error)
        synced = None
    changed = expired > 0 or (
        latest is not None and (synced is None or latest > synced)
    )
    if changed:
        key_cache_invalidate()
        try:
            cache.set(SYNCED_THROUGH, latest, timeout=None)
        except Exception as error:
            logger.warning("key sync cannot reach Redis: %s", error)
    flushed = key_last_used_flush()
    return {
        "expired": expired,
        "invalidated": changed,
        "last_used_flushed": flushed["flushed"],
        "last_used_failed": flushed["failed"],
    }
