"""Operator access tokens (JWT, simplejwt) and their revocation."""

from datetime import UTC, datetime

from django.db import IntegrityError, transaction
from rest_framework_simplejwt.tokens import AccessToken, Token

from accounts.models import RevokedToken, User


def token_issue(*, user: User) -> tuple[str, int]:
    """A signed access token for the user and its lifetime in seconds."""
    token = AccessToken.for_user(user)
    token["role"] = user.role
    return str(token), int(token.lifetime.total_seconds())


def token_revoke(*, token: Token, user: User) -> None:
    """Revoke one token until it would have expired; revoking twice is a no-op."""
    expires_at = datetime.fromtimestamp(int(token["exp"]), tz=UTC)
    try:
        with transaction.atomic():
            RevokedToken.objects.create(
                jti=token["jti"], user=user, expires_at=expires_at
            )
    except IntegrityError:
        pass  # already revoked


def token_is_revoked(*, token: Token) -> bool:
    return RevokedToken.objects.filter(jti=token.get("jti", "")).exists()
