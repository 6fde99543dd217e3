from datetime import timedelta

import pytest
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import AccessToken

from accounts.models import Role, User
from accounts.tokens import token_issue

PASSWORD = "Long-enough-1"


def make_operator(email: str, role: str, **fields) -> User:
    return User.objects.create_user(email, PASSWORD, role=role, **fields)


def bearer(user: User) -> dict[str, str]:
    token, _ = token_issue(user=user)
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


def expired_bearer(user: User) -> dict[str, str]:
    token = AccessToken.for_user(user)
    token.set_exp(lifetime=-timedelta(minutes=1))
    return {"HTTP_AUTHORIZATION": f"Bearer {token}"}


@pytest.fixture
def api() -> APIClient:
    return APIClient()


@pytest.fixture
def owner_user(db) -> User:
    return make_operator("owner@example.com", Role.OWNER, display_name="Owner")


@pytest.fixture
def admin_user(db) -> User:
    return make_operator("admin@example.com", Role.ADMIN, display_name="Admin")


@pytest.fixture
def plain_user(db) -> User:
    return make_operator("user@example.com", Role.USER, display_name="User")
