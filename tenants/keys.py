"""The virtual-key format: ``<prefix>_<public_id>_<secret>``.

Only ``public_id`` and an HMAC-SHA256 digest of the whole key are stored; the
digest's key is GATEWAY_KEY_DIGEST_SECRET (or one derived from SECRET_KEY).
"""

import hashlib
import hmac
import re
import secrets
import string
from dataclasses import dataclass

from django.conf import settings

from gateway_project.crypto import derived_secret

PUBLIC_ID_LENGTH = 12
SECRET_LENGTH = 40
_PUBLIC_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
_KEY_PATTERN = re.compile(
    rf"^(?P<prefix>[A-Za-z0-9-]+)_(?P<public_id>[a-z0-9]{{{PUBLIC_ID_LENGTH}}})"
    rf"_(?P<secret>[A-Za-z0-9]{{{SECRET_LENGTH}}})$"
)


@dataclass(frozen=True)
class NewKey:
    """A freshly generated key; ``plaintext`` is shown once and never stored."""

    plaintext: str
    public_id: str
    digest: str
    display_prefix: str


def _digest_secret() -> bytes:
    configured = settings.GATEWAY_KEY_DIGEST_SECRET
    return configured.encode() if configured else derived_secret("key-digest")


def key_digest(plaintext: str) -> str:
    return hmac.new(_digest_secret(), plaintext.encode(), hashlib.sha256).hexdigest()


def key_generate(*, seed: bytes | None = None) -> NewKey:
    """A new random key; ``seed`` makes it deterministic (the demo key only)."""
    if seed is None:
        public_id = "".join(
            secrets.choice(_PUBLIC_ALPHABET) for _ in range(PUBLIC_ID_LENGTH)
        )
        secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH))
    else:
        stream = hashlib.shake_256(seed).digest(PUBLIC_ID_LENGTH + SECRET_LENGTH)
        public_id = "".join(_PUBLIC_ALPHABET[b % 36] for b in stream[:PUBLIC_ID_LENGTH])
        secret = "".join(_SECRET_ALPHABET[b % 62] for b in stream[PUBLIC_ID_LENGTH:])
    prefix = settings.GATEWAY_KEY_PREFIX
    plaintext = f"{prefix}_{public_id}_{secret}"
    return NewKey(
        plaintext=plaintext,
        public_id=public_id,
        digest=key_digest(plaintext),
        display_prefix=f"{prefix}_{public_id}",
    )


def key_parse(plaintext: str) -> str | None:
    """The public id of a well-formed key, or None."""
    match = _KEY_PATTERN.match(plaintext)
    return match["public_id"] if match else None


def key_matches(plaintext: str, digest: str) -> bool:
    """Constant-time comparison of a presented key with a stored digest."""
    return hmac.compare_digest(key_digest(plaintext), digest)
