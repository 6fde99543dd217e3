import io
import sys

import pytest
from django.apps import apps
from django.core.management import CommandError, call_command

from accounts.models import Role, User
from billing.models import CreditAccount
from tenants.keys import key_matches
from tenants.models import VirtualKey

pytestmark = pytest.mark.django_db


def _snapshot():
    """Every row of our apps, as comparable values."""
    rows = {}
    for model in apps.get_models():
        if model._meta.app_label in {"accounts", "tenants", "billing", "routing"}:
            rows[model._meta.label] = sorted(
                map(
                    repr,
                    model._default_manager.values_list(
                        *[f.attname for f in model._meta.concrete_fields]
                    ),
                )
            )
    return rows


def _run(command, **options):
    out = io.StringIO()
    call_command(command, stdout=out, **options)
    return out.getvalue()


def test_seed_demo_twice_leaves_the_same_rows():
    first_output = _run("seed_demo")
    first = _snapshot()

    second_output = _run("seed_demo")

    assert _snapshot() == first
    assert "Generated password (shown once)" in first_output
    assert "Generated password" not in second_output
    key_line = [
        line for line in first_output.splitlines() if line.startswith("Demo key: ")
    ]
    assert key_line and key_line == [
        line for line in second_output.splitlines() if line.startswith("Demo key: ")
    ]
    plaintext = key_line[0].removeprefix("Demo key: ")
    key = VirtualKey.objects.get()
    assert key_matches(plaintext, key.digest)
    assert CreditAccount.objects.get().balance_micros == 1000 * 1_000_000
    assert key.team.model_groups.get().group_name == "demo"
    assert (
        key.team.model_groups.get()
        .members.get()
        .deployment.litellm_params["mock_response"]
    )


def test_setup_gateway_twice_leaves_the_same_rows():
    _run("setup_gateway", email="Boss@Example.com", password="Long-enough-1")
    first = _snapshot()

    output = _run("setup_gateway", email="boss@example.com", password="Another-pass-2")

    assert _snapshot() == first
    assert "password unchanged" in output
    owner = User.objects.get()
    assert owner.role == Role.OWNER
    assert owner.check_password("Long-enough-1")


def test_setup_gateway_reads_the_environment(monkeypatch):
    monkeypatch.setenv("GATEWAY_OWNER_EMAIL", "env-owner@example.com")
    monkeypatch.setenv("GATEWAY_OWNER_PASSWORD", "From-the-env-1")

    output = _run("setup_gateway")

    assert "Owner created: env-owner@example.com" in output
    assert "Generated password" not in output
    assert User.objects.get().check_password("From-the-env-1")


def test_setup_gateway_without_email_fails_without_prompting(monkeypatch):
    monkeypatch.delenv("GATEWAY_OWNER_EMAIL", raising=False)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: False)

    with pytest.raises(CommandError, match="GATEWAY_OWNER_EMAIL"):
        _run("setup_gateway")
    assert not User.objects.exists()


def test_setup_gateway_refuses_a_weak_password_and_writes_nothing():
    with pytest.raises(CommandError, match="too short"):
        _run("setup_gateway", email="o@example.com", password="short")
    assert not User.objects.exists()


def test_reset_password_changes_only_the_password():
    _run("setup_gateway", email="o@example.com", password="Long-enough-1")

    output = _run("setup_gateway", email="o@example.com", reset_password=True)

    generated = output.split("Generated password (shown once): ")[1].strip()
    assert User.objects.get().check_password(generated)


def test_reset_password_for_an_unknown_email_refuses_and_creates_nothing(
    monkeypatch,
):
    # Given an owner, and GATEWAY_OWNER_EMAIL naming another address
    _run("setup_gateway", email="o@example.com", password="Long-enough-1")
    monkeypatch.setenv("GATEWAY_OWNER_EMAIL", "someone-else@example.com")
    before = _snapshot()

    # When a password reset names an email no account has
    with pytest.raises(CommandError, match="never creates one"):
        _run(
            "setup_gateway",
            email="owner@example.com",
            password="Another-long-1",
            reset_password=True,
        )

    # Then nothing is written: no second owner
    assert _snapshot() == before
    assert list(User.objects.values_list("email", flat=True)) == ["o@example.com"]


def test_createsuperuser_makes_an_owner(monkeypatch):
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "Super-user-pass-1")

    _run("createsuperuser", interactive=False, email="SU@example.com")

    user = User.objects.get()
    assert (user.email, user.role, user.is_superuser) == (
        "su@example.com",
        Role.OWNER,
        True,
    )
    assert user.check_password("Super-user-pass-1")
