"""Start-up configuration: malformed values stop the process with a clear message."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BOOT = "import django; django.setup(); print('booted')"


def _boot(code: str = BOOT, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL"}
    }
    environment.update(DJANGO_SETTINGS_MODULE="gateway_project.settings", **env)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "DATABASE_URL",
            "mysql://u:p@db/x",
            "DATABASE_URL must be a postgresql:// or sqlite:// URL",
        ),
        (
            "DATABASE_URL",
            "postgresql://u:hunter2@db:notaport/x",
            "DATABASE_URL is not a valid database URL",
        ),
        (
            "DATABASE_URL",
            "not a url at all",
            "DATABASE_URL must be a postgresql:// or sqlite:// URL",
        ),
        ("REDIS_URL", "http://cache:6379", "REDIS_URL must be a redis://"),
        ("REDIS_URL", "redis://cache:port/0", "REDIS_URL has an invalid port"),
        ("DEBUG", "maybe", "DEBUG must be a boolean"),
        ("DATABASE_POOL_MAX_SIZE", "many", "DATABASE_POOL_MAX_SIZE must be an integer"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL must be one of"),
        ("SECRET_KEY", "short", "SECRET_KEY must be at least 32 characters"),
    ],
)
def test_malformed_value_stops_start_up_naming_the_variable(
    name, value, message, tmp_path
):
    env = {"SECRET_KEY": "x" * 40, "GATEWAY_VAR_DIR": str(tmp_path), name: value}
    if name == "DATABASE_POOL_MAX_SIZE":
        env["DATABASE_URL"] = "postgresql://u@db/x"

    result = _boot(**env)

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert message in result.stderr
    assert "hunter2" not in result.stderr


def test_service_mode_requires_a_secret_key(tmp_path):
    result = _boot(
        DATABASE_URL="postgresql://u@db/x", SECRET_KEY="", GATEWAY_VAR_DIR=str(tmp_path)
    )

    assert result.returncode != 0
    assert "SECRET_KEY must be set when DATABASE_URL is set" in result.stderr


def test_embedded_default_needs_no_environment(tmp_path):
    code = (
        "import django; django.setup(); from django.conf import settings as s; "
        "print(s.DATABASES['default']['ENGINE'], s.CACHES['default']['BACKEND'], "
        "s.CELERY_TASK_ALWAYS_EAGER)"
    )

    result = _boot(code, SECRET_KEY="", GATEWAY_VAR_DIR=str(tmp_path))

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "django.db.backends.sqlite3",
        "django.core.cache.backends.locmem.LocMemCache",
        "True",
    ]
    assert (tmp_path / "secret_key").stat().st_mode & 0o077 == 0


def test_litellm_is_not_imported_by_settings_models_or_admin(tmp_path):
    code = (
        "import os, sys, django; django.setup(); "
        "from django.contrib import admin; admin.autodiscover(); "
        "import gateway_project.urls; "
        "print('litellm' in sys.modules, os.environ['LITELLM_LOCAL_MODEL_COST_MAP'])"
    )

    result = _boot(code, SECRET_KEY="", GATEWAY_VAR_DIR=str(tmp_path))

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True"]
