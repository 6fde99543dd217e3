"""Login throttling: failures counted per email and per IP address in the cache.

Redis makes the counters shared by every gateway process. After too many
failures the login is refused before the password is even checked, until the
window (counted from the first failure) ends.
"""

import hashlib

from django.conf import settings
from django.core.cache import cache

from gateway_project.errors import GatewayError


class LoginThrottled(GatewayError):
    http_status = 429
    code = "too_many_login_attempts"


def _keys(email: str, ip_address: str | None) -> list[tuple[str, int]]:
    digest = hashlib.sha256(email.strip().lower().encode()).hexdigest()[:32]
    keys = [(f"login-failures:email:{digest}", settings.LOGIN_FAILURES_PER_EMAIL)]
    if ip_address:
        keys.append((f"login-failures:ip:{ip_address}", settings.LOGIN_FAILURES_PER_IP))
    return keys


def login_throttle_check(*, email: str, ip_address: str | None) -> None:
    """Raise LoginThrottled (429, Retry-After) when this email or IP is locked out."""
    window = settings.LOGIN_FAILURE_WINDOW_SECONDS
    counts = cache.get_many([key for key, _ in _keys(email, ip_address)])
    for key, limit in _keys(email, ip_address):
        if counts.get(key, 0) >= limit:
            ttl = getattr(cache, "ttl", lambda _key: window)(key) or window
            raise LoginThrottled(
                "Too many failed login attempts. Try again later.",
                headers={"Retry-After": str(max(int(ttl), 1))},
            )


def login_failure_record(*, email: str, ip_address: str | None) -> None:
    window = settings.LOGIN_FAILURE_WINDOW_SECONDS
    for key, _ in _keys(email, ip_address):
        # add() starts the window on the first failure; incr() is atomic in Redis.
        if not cache.add(key, 1, timeout=window):
            try:
                cache.incr(key)
            except ValueError:  # expired between add() and incr()
                cache.add(key, 1, timeout=window)


def login_success_record(*, email: str) -> None:
    """A successful login clears the email's failures (not the IP's)."""
    cache.delete(_keys(email, None)[0][0])
