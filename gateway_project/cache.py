"""The shared cache as one backend object per process, for the request path.

``django.core.cache.cache`` is kept per async context: under ASGI every
request built a new backend and a new Redis client, and redis-py's
constructor alone cost about a tenth of a call's CPU. Redis clients are
thread-safe and share their connection pool, so one object serves every
request; it is rebuilt when the CACHES setting is replaced (tests do).
"""

from typing import Any

from django.conf import settings
from django.core.cache import BaseCache, caches

_shared: tuple[Any, BaseCache] | None = None


def _backend() -> BaseCache:
    global _shared
    configured = settings.CACHES["default"]
    if _shared is None or _shared[0] is not configured:
        _shared = (configured, caches.create_connection("default"))
    return _shared[1]


class _SharedCache:
    def __getattr__(self, name: str) -> Any:
        return getattr(_backend(), name)


cache: Any = _SharedCache()


def cache_names(*names: str) -> list[str]:
    """The names under which the cache stores ``names`` in Redis (prefix and
    version added), for a Lua script that reads them itself."""
    backend = _backend()
    return [str(backend.make_key(name)) for name in names]
