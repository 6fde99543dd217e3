"""The production deployment: docker-compose.yml, .env.example and the Dockerfile.

No Docker engine is needed: the files are checked as data, and a Compose binary
(the v2 plugin or Debian's docker-compose 1.29), when one is installed, is asked
to validate and interpolate the file; those tests skip without one.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

APP_SERVICES = ("migrate", "web", "worker", "beat")
LONG_RUNNING_SERVICES = ("postgres", "redis", "web", "worker", "beat")
SHARED_APP_VARIABLES = (
    "DATABASE_URL",
    "REDIS_URL",
    "SECRET_KEY",
    "GATEWAY_ADMIN_KEY",
    "ALLOWED_HOSTS",
)
# The variables compose refuses to run without (${NAME:?...}), with test values.
REQUIRED_VARIABLES = {
    "POSTGRES_PASSWORD": "compose-test-db-password",
    "SECRET_KEY": "compose-test-secret-key-0123456789-abcdefghij",
    "GATEWAY_ENCRYPTION_KEYS": "compose-test-encryption-key",
    "GATEWAY_KEY_DIGEST_SECRET": "compose-test-digest-secret",
    "GATEWAY_OWNER_EMAIL": "owner@example.com",
}

# `$$` is Compose's escape for a literal `$`; it must not count as a reference.
_INTERPOLATION = re.compile(
    r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)|\$([A-Za-z_][A-Za-z0-9_]*)"
)


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def _strings(node: object) -> list[str]:
    """Every string in a parsed YAML document, keys included."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [
            s for key, value in node.items() for s in _strings(key) + _strings(value)
        ]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    return []


def _referenced_variables(document: object) -> set[str]:
    # Parsed values, not raw text: a `$NAME` in a YAML comment is not interpolated.
    names = set()
    for text in _strings(document):
        for match in _INTERPOLATION.finditer(text):
            name = match.group(1) or match.group(2)
            if name:
                names.add(name)
    return names


def _env_example_variables() -> list[str]:
    return re.findall(r"^([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), re.MULTILINE)


def _variables_the_app_reads() -> set[str]:
    settings_source = (ROOT / "gateway_project" / "settings.py").read_text()
    names = set(re.findall(r"\benv_[a-z_]+\(\s*\"([A-Z][A-Z0-9_]*)\"", settings_source))
    for command in ROOT.glob("*/management/commands/*.py"):
        names |= set(
            re.findall(
                r"os\.environ\.get\(\s*\"([A-Z][A-Z0-9_]*)\"", command.read_text()
            )
        )
    return names


def _option(command: list[str], flag: str) -> str:
    """The argument that follows ``flag`` in an exec-form command."""
    return command[command.index(flag) + 1]


# --- docker-compose.yml, as data ----------------------------------------------


def test_compose_file_defines_the_deployment_services() -> None:
    compose = _compose()

    assert "version" not in compose
    assert set(compose["services"]) == {
        "postgres",
        "redis",
        "migrate",
        "web",
        "worker",
        "beat",
    }


def test_every_long_running_service_restarts_and_has_a_healthcheck() -> None:
    services = _compose()["services"]

    restarting = {name for name, s in services.items() if s.get("restart") != "no"}

    assert restarting == set(LONG_RUNNING_SERVICES)
    for name in LONG_RUNNING_SERVICES:
        assert services[name]["restart"] == "unless-stopped", name
        assert services[name]["healthcheck"]["test"], name


def test_migrate_runs_once_migrations_then_owner_setup() -> None:
    migrate = _compose()["services"]["migrate"]

    assert migrate["restart"] == "no"
    assert migrate["command"] == [
        "sh",
        "-c",
        "python manage.py migrate --noinput && python manage.py setup_gateway",
    ]
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert "healthcheck" not in migrate


def test_postgres_and_redis_are_configured_for_the_gateway() -> None:
    services = _compose()["services"]
    postgres, redis = services["postgres"], services["redis"]

    assert postgres["image"] == "postgres:16-alpine"
    assert postgres["environment"] == {
        "POSTGRES_DB": "gateway",
        "POSTGRES_USER": "gateway",
        "POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}",
    }
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert redis["image"] == "redis:7-alpine"
    assert _option(redis["command"], "--appendonly") == "yes"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    # Named volumes, so data outlives `docker compose down`.
    volumes = set(_compose()["volumes"])
    assert {v.split(":")[0] for v in postgres["volumes"] + redis["volumes"]} == (
        volumes - {"journal"}
    )


def test_web_and_worker_share_the_settlement_journal_on_a_volume() -> None:
    # A stream whose web process died is replayed by reconciliation on the
    # worker: both must see the same journal directory, kept across restarts.
    compose = _compose()
    directory = compose["x-gateway-env"]["GATEWAY_JOURNAL_DIR"]

    assert "journal" in compose["volumes"]
    for service in ("web", "worker"):
        assert f"journal:{directory}" in compose["services"][service]["volumes"]
    assert f"mkdir -p {directory}" in DOCKERFILE.read_text()


def test_web_serves_asgi_with_gunicorn_and_uvicorn_workers() -> None:
    web = _compose()["services"]["web"]
    command = web["command"]

    assert command[:2] == ["gunicorn", "gateway_project.asgi:application"]
    assert _option(command, "-k") == "uvicorn_worker.UvicornWorker"
    assert _option(command, "--bind") == "0.0.0.0:8000"
    assert web["build"] == "."
    assert web["ports"] == ["${PORT:-8000}:8000"]


def test_web_runs_the_same_command_as_the_image_default() -> None:
    # Given the Dockerfile's CMD, a shell line so that WEB_CONCURRENCY expands
    cmd_line = next(
        line for line in DOCKERFILE.read_text().splitlines() if line.startswith("CMD ")
    )
    shell, flag, script = json.loads(cmd_line.removeprefix("CMD "))

    # When compose's exec-form command is written out as that shell line
    web_command = _compose()["services"]["web"]["command"]
    as_shell = "exec " + " ".join(web_command)

    # Then both start the same server
    assert (shell, flag) == ("sh", "-c")
    assert as_shell == script


def test_web_healthcheck_probes_readiness_without_curl() -> None:
    healthcheck = _compose()["services"]["web"]["healthcheck"]

    assert healthcheck["test"][:3] == ["CMD", "python", "-c"]
    assert (
        "urllib.request.urlopen('http://127.0.0.1:8000/readyz'"
        in (healthcheck["test"][3])
    )


def test_web_waits_for_healthy_backends_and_a_successful_migrate() -> None:
    depends_on = _compose()["services"]["web"]["depends_on"]

    assert depends_on == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
        "migrate": {"condition": "service_completed_successfully"},
    }


@pytest.mark.parametrize("service", ["worker", "beat"])
def test_worker_and_beat_run_celery_on_the_gateway_app(service: str) -> None:
    command = _compose()["services"][service]["command"]

    assert command[:4] == ["celery", "-A", "gateway_project", service]


def test_worker_healthcheck_pings_its_own_node() -> None:
    test = _compose()["services"]["worker"]["healthcheck"]["test"]

    assert test[0] == "CMD-SHELL"
    assert "celery -A gateway_project inspect ping -d celery@$$HOSTNAME" in test[1]


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_services_get_the_shared_environment(service: str) -> None:
    compose = _compose()
    shared = compose["x-gateway-env"]
    environment = compose["services"][service]["environment"]

    assert set(SHARED_APP_VARIABLES) <= set(shared)
    assert shared.items() <= environment.items()
    assert environment["DEBUG"] == "false"


def test_only_migrate_gets_the_owner_credentials() -> None:
    services = _compose()["services"]

    with_owner = {
        name
        for name in APP_SERVICES
        if {"GATEWAY_OWNER_EMAIL", "GATEWAY_OWNER_PASSWORD"}
        <= set(services[name]["environment"])
    }

    assert with_owner == {"migrate"}


# --- .env.example against compose and the app --------------------------------


def test_every_variable_compose_references_is_in_env_example() -> None:
    missing = _referenced_variables(_compose()) - set(_env_example_variables())

    assert missing == set()


def test_env_example_lists_each_variable_once_and_only_used_ones() -> None:
    listed = _env_example_variables()

    assert len(listed) == len(set(listed))
    assert set(listed) - _referenced_variables(_compose()) == set()


def test_env_example_leaves_required_secrets_empty() -> None:
    # An unedited copy must make compose fail, not run with a published secret.
    values = dict(
        re.findall(r"^([A-Z][A-Z0-9_]*)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE)
    )

    assert {name: values[name] for name in REQUIRED_VARIABLES} == dict.fromkeys(
        REQUIRED_VARIABLES, ""
    )


@pytest.mark.parametrize("service", APP_SERVICES)
def test_app_services_set_only_variables_the_app_reads(service: str) -> None:
    # A misspelt or stale name would be silently ignored by the gateway.
    environment = _compose()["services"][service]["environment"]

    assert set(environment) - _variables_the_app_reads() == set()


# --- Dockerfile ---------------------------------------------------------------


def test_dockerfile_installs_hash_pinned_requirements_as_a_non_root_image() -> None:
    dockerfile = DOCKERFILE.read_text()

    assert re.search(r"^FROM python:3\.11-slim-bookworm$", dockerfile, re.MULTILINE)
    assert (
        "RUN pip install --no-cache-dir --require-hashes -r requirements.txt"
        in dockerfile
    )
    assert re.search(
        r"^ENV LITELLM_LOCAL_MODEL_COST_MAP=True\b", dockerfile, re.MULTILINE
    )
    assert "python manage.py collectstatic --noinput" in dockerfile
    assert re.findall(r"^USER (\S+)$", dockerfile, re.MULTILINE) == ["gateway"]
    assert re.search(r"^EXPOSE 8000$", dockerfile, re.MULTILINE)


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_image() -> None:
    ignored = set(DOCKERIGNORE.read_text().split())

    assert {".git", ".venv", "var", "staticfiles", ".env"} <= ignored


# --- A real Compose binary ----------------------------------------------------


def _compose_binary() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run(
            [docker, "compose", "version"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.fixture
def run_compose(tmp_path: Path):
    binary = _compose_binary()
    if binary is None:
        pytest.skip(
            "no Compose binary: neither `docker compose` (v2 plugin) nor "
            "`docker-compose` (Debian: apt-get install docker-compose) is installed"
        )
    # An empty env file, so a developer's own .env cannot change the outcome.
    empty_env_file = tmp_path / "empty.env"
    empty_env_file.write_text("")

    def run(
        *args: str, variables: dict[str, str], env_file: Path = empty_env_file
    ) -> subprocess.CompletedProcess[str]:
        environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **variables}
        return subprocess.run(
            [*binary, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
            cwd=ROOT,
            env=environment,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    return run


def test_compose_accepts_the_file_with_the_required_variables_set(
    run_compose,
) -> None:
    result = run_compose("config", "-q", variables=REQUIRED_VARIABLES)

    assert result.returncode == 0, result.stderr


def test_compose_interpolates_the_shared_environment(run_compose) -> None:
    result = run_compose(
        "config", variables={**REQUIRED_VARIABLES, "WEB_CONCURRENCY": "5"}
    )

    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    password = REQUIRED_VARIABLES["POSTGRES_PASSWORD"]
    for name in APP_SERVICES:
        environment = services[name]["environment"]
        assert environment["DATABASE_URL"] == (
            f"postgresql://gateway:{password}@postgres:5432/gateway"
        ), name
        assert environment["ALLOWED_HOSTS"] == "localhost,127.0.0.1", name
    assert _option(services["web"]["command"], "--workers") == "5"


@pytest.mark.parametrize("missing", sorted(REQUIRED_VARIABLES))
def test_compose_refuses_to_run_without_a_required_variable(
    run_compose, missing: str
) -> None:
    variables = {k: v for k, v in REQUIRED_VARIABLES.items() if k != missing}

    result = run_compose("config", "-q", variables=variables)

    assert result.returncode != 0
    assert f"set {missing}" in result.stderr


def test_compose_refuses_an_unedited_copy_of_env_example(run_compose) -> None:
    result = run_compose("config", "-q", variables={}, env_file=ENV_EXAMPLE)

    assert result.returncode != 0
    assert any(f"set {name}" in result.stderr for name in REQUIRED_VARIABLES)
