"""Shared fixtures. The suite runs against real PostgreSQL and Redis: `make test`
starts throwaway instances and exports DATABASE_URL and REDIS_URL."""

import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.test import Client

from accounts.models import Role, User
from billing import statements
from billing.journal import journal_forget
from billing.services import credit_account_open, credits_allocate
from billing.tests.prices import price
from gateway_project.money import MICROS
from routing.inference.route import routes_forget
from routing.models import Deployment, ModelGroup
from routing.services import deployment_create, model_group_create
from tenants.models import Organization, Team
from tenants.services import organization_create, team_create

OWNER_PASSWORD = "Owner-Passw0rd!"


def pytest_configure(config: pytest.Config) -> None:
    if settings.DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
        raise pytest.UsageError(
            "The suite runs against PostgreSQL: use `make test`, or set "
            "DATABASE_URL and REDIS_URL yourself."
        )
    if not os.environ.get("REDIS_URL"):
        raise pytest.UsageError("REDIS_URL is not set: use `make test`.")
    # Production-strength hashing costs ~0.3 s a password; tests create many
    # operators. test_password_is_stored_hashed checks the real hasher.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # No journal thread in the test process: a test applies what it journals
    # itself (the servers it starts keep theirs).
    settings.GATEWAY_JOURNAL_RETRY_SECONDS = 0


def pytest_unconfigure(config: pytest.Config) -> None:
    # At interpreter exit, aiohttp sessions litellm left open log from their
    # __del__, and litellm's log filters raise there (their module is already
    # torn down): pages of tracebacks that bury the summary CI shows last.
    logging.disable(logging.CRITICAL)


@pytest.fixture(autouse=True)
def journal_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A settlement journal of the test's own, shared with the servers it
    starts: nothing journaled for an earlier test's (flushed) database is
    replayed into this one."""
    folder = tmp_path_factory.mktemp("journal")
    os.environ["GATEWAY_JOURNAL_DIR"] = str(folder)
    settings.GATEWAY_JOURNAL_DIR = folder
    yield folder
    journal_forget()


@pytest.fixture(autouse=True)
def _clear_cache() -> Iterator[None]:
    yield
    cache.clear()
    routes_forget()  # the flushed database's groups and prices
    statements.available_forget()  # what the process saw of their credits


@pytest.fixture
def owner(db: None) -> User:
    return User.objects.create_user(
        "owner@example.com", OWNER_PASSWORD, display_name="Owner", role=Role.OWNER
    )


@pytest.fixture
def owner_client(owner: User) -> Client:
    client = Client()
    client.force_login(owner)
    return client


@pytest.fixture
def deployment(db: None) -> Deployment:
    price("openai/mock-a")
    return deployment_create(
        name="mock-a", model="openai/mock-a", litellm_params={"mock_response": "hi"}
    )


@pytest.fixture
def model_group(deployment: Deployment) -> ModelGroup:
    return model_group_create(group_name="chat", members=[(deployment, 0)])


@pytest.fixture
def organization(db: None) -> Organization:
    return organization_create(organization_id="org_alice", name="Alice Inc")


@pytest.fixture
def team(organization: Organization, model_group: ModelGroup) -> Team:
    team = team_create(
        organization=organization, team_id="team_alice", model_groups=[model_group]
    )
    credit_account_open(team=team)
    credits_allocate(team=team, amount_micros=100 * MICROS, idempotency_key="t:alloc")
    return team


@dataclass
class RunningServer:
    url: str
    admin_key: str
    log: Path
    process: subprocess.Popen[bytes]


def _test_database_url() -> str:
    """The test database as a URL, for the processes a test starts."""
    database = connection.settings_dict
    return (
        f"postgresql://{quote(database['USER'] or '')}:{quote(database['PASSWORD'] or '')}"
        f"@{database['HOST']}:{database['PORT']}/{database['NAME']}"
    )


def _start_server(
    tmp_path: Path, name: str, extra_env: dict[str, str] | None = None
) -> RunningServer:
    """gunicorn with one uvicorn worker (ASGI) on a free port, serving the
    test database (unless ``extra_env`` says otherwise); returns once /healthz
    answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "DATABASE_URL": _test_database_url(),
        "SECRET_KEY": settings.SECRET_KEY,
        "GATEWAY_ADMIN_KEY": "running-server-admin-key",
        **(extra_env or {}),
    }
    log = tmp_path / f"{name}.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("gunicorn")),
                "gateway_project.asgi:application",
                "-k",
                "uvicorn_worker.UvicornWorker",
                "-b",
                f"127.0.0.1:{port}",
                "-w",
                "1",
                "--graceful-timeout",
                "2",
            ],
            cwd=Path(__file__).parent,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"server did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return RunningServer(
        url=url, admin_key=env["GATEWAY_ADMIN_KEY"], log=log, process=process
    )


def _stop_server(server: RunningServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.process.kill()
        server.process.wait(timeout=10)


@pytest.fixture
def server_env() -> dict[str, str]:
    """Extra environment of the servers below; a module may override it."""
    return {}


@pytest.fixture
def running_server(
    transactional_db: None, tmp_path: Path, server_env: dict[str, str]
) -> Iterator[RunningServer]:
    """The production stack serving the test database over real HTTP."""
    server = _start_server(tmp_path, "server", server_env)
    yield server
    _stop_server(server)
    # The server's connections must be gone before the test database is flushed.
    connection.close()


@pytest.fixture
def two_servers(
    transactional_db: None, tmp_path: Path, server_env: dict[str, str]
) -> Iterator[list[RunningServer]]:
    """Two gateway processes sharing the test database and Redis."""
    servers = [_start_server(tmp_path, f"server-{n}", server_env) for n in (1, 2)]
    yield servers
    for server in servers:
        _stop_server(server)
    connection.close()


@pytest.fixture
def celery_worker_process(transactional_db: None, tmp_path: Path) -> Iterator[Path]:
    """A real Celery worker process on the test Redis and PostgreSQL;
    yields its log file."""
    env = {
        **os.environ,
        "DATABASE_URL": _test_database_url(),
        "SECRET_KEY": settings.SECRET_KEY,
        "CELERY_TASK_ALWAYS_EAGER": "false",
    }
    log = tmp_path / "worker.log"
    with log.open("w") as output:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("celery")),
                "-A",
                "gateway_project",
                "worker",
                "--pool=solo",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                "-n",
                f"test-{os.getpid()}@%h",
            ],
            cwd=Path(__file__).parent,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while " ready." not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"worker did not start:\n{log.read_text()}")
        time.sleep(0.1)
    yield log
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)
    connection.close()


# --- Fake OpenAI-compatible upstream (routing/tests/fake_upstream.py) ----------

from routing.tests.fake_upstream import FakeUpstream  # noqa: E402


@pytest.fixture(scope="session")
def _fake_upstream_server() -> Iterator[FakeUpstream]:
    server = FakeUpstream()
    yield server
    server.close()


@pytest.fixture
def fake_upstream(_fake_upstream_server: FakeUpstream) -> FakeUpstream:
    """The session's fake upstream, with no programs and no recorded requests."""
    _fake_upstream_server.reset()
    return _fake_upstream_server
