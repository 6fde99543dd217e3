"""Secrets at rest: symmetric encryption of provider credentials and keyed digests.

Encryption uses Fernet (AES-128-CBC + HMAC-SHA256). ``GATEWAY_ENCRYPTION_KEYS``
holds one or more Fernet keys, newest first; old ones still decrypt, so keys
can be rotated. Without it a key derived from SECRET_KEY is used.
"""

import base64
import hashlib
import hmac
from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


def derived_secret(purpose: str) -> bytes:
    """32 bytes derived from SECRET_KEY for one purpose (HMAC-SHA256 as a KDF)."""
    return hmac.new(
        settings.SECRET_KEY.encode(), f"gateway:{purpose}".encode(), hashlib.sha256
    ).digest()


@cache
def _fernet() -> MultiFernet:
    configured = settings.GATEWAY_ENCRYPTION_KEYS
    try:
        keys = [Fernet(key.encode()) for key in configured]
    except ValueError:
        raise ImproperlyConfigured(
            "GATEWAY_ENCRYPTION_KEYS must be comma-separated Fernet keys "
            "(generate one with: python -c 'from cryptography.fernet import "
            "Fernet; print(Fernet.generate_key().decode())')"
        ) from None
    if not keys:
        keys = [Fernet(base64.urlsafe_b64encode(derived_secret("encryption")))]
    return MultiFernet(keys)


def encrypt_text(plaintext: str) -> str:
    return _fernet().encrypt(plaintext.encode()).decode()


def decrypt_text(token: str) -> str:
    """Decrypt; raises ``DecryptionError`` if no configured key fits."""
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        raise DecryptionError(
            "stored secret cannot be decrypted with GATEWAY_ENCRYPTION_KEYS"
        ) from None


class DecryptionError(Exception):
    pass


def mask_secret(secret: str, *, visible: int = 4) -> str:
    """``'…' + last few characters``; enough to recognise, useless to steal."""
    if len(secret) <= visible * 2:
        return "…"
    return f"…{secret[-visible:]}"
