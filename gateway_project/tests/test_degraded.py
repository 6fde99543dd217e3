"""Degraded modes, with the real dependency stopped mid-test: a Redis and a
PostgreSQL of the test's own, which it stops and starts again under a running
gateway (gunicorn + uvicorn)."""

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from billing.models import UsageRecord
from billing.tests.ledger import assert_ledger_consistent
from conftest import _start_server, _stop_server, _test_database_url
from tenants.services import team_update, virtual_key_issue, virtual_key_revoke

pytestmark = pytest.mark.django_db(transaction=True)
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not ready in time"
        time.sleep(0.1)


class StoppableRedis:
    """A redis-server of this test's own, on a fixed port across restarts."""

    def __init__(self, directory: Path) -> None:
        self.port = _free_port()
        self.directory = directory
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def _answers(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait(self._answers)

    def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=10)
        assert not self._answers()


def _pg_bin() -> str:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = candidates[-1] if candidates else shutil.which("initdb")
    assert initdb, "PostgreSQL server binaries not found (make test installs them)"
    return str(Path(os.path.realpath(initdb)).parent)


class StoppablePostgres:
    """A PostgreSQL cluster of this test's own, loaded with a copy of the test
    database, on a fixed port across restarts."""

    def __init__(self) -> None:
        self.bin = _pg_bin()
        self.directory = Path(tempfile.mkdtemp(prefix="degraded-pg-"))
        self.directory.chmod(0o755)
        self.as_owner: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(self.directory, "postgres", "postgres")
            self.as_owner = ["runuser", "-u", "postgres", "--"]
        self.data = self.directory / "data"
        self.port = _free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/gateway"
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--no-sync",
            "--no-locale",
            "--encoding=UTF8",
        )
        self.start()
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "gateway")

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self.as_owner, f"{self.bin}/{program}", *args],
            check=True,
            cwd=self.directory,
            capture_output=True,
        )

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-k {self.directory} -c fsync=off"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.directory / "log"),
            "-o",
            options,
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def load(self, source_url: str) -> None:
        dump = subprocess.run(
            [f"{self.bin}/pg_dump", "--no-owner", "--no-privileges", source_url],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(
            [f"{self.bin}/psql", "-q", "-v", "ON_ERROR_STOP=1", self.url],
            input=dump,
            check=True,
            capture_output=True,
        )

    def query(self, sql: str) -> list[tuple[object, ...]]:
        with psycopg.connect(self.url) as connection:
            return connection.execute(sql).fetchall()  # type: ignore[arg-type]

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _chat(url: str, plaintext: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json=CHAT,
        headers={"Authorization": f"Bearer {plaintext}"},
        timeout=30,
    )


def _ready(url: str) -> httpx.Response:
    return httpx.get(f"{url}/readyz", timeout=30)


def test_redis_stopped_mid_test(team, tmp_path):
    """Fail-open keeps serving (keys from the database, usage still recorded);
    fail-closed refuses with 503; /readyz says Redis and the broker are down;
    everything recovers when Redis is back."""
    own_redis = StoppableRedis(tmp_path)
    env = {"REDIS_URL": own_redis.url, "CELERY_BROKER_URL": own_redis.url}
    fail_open = _start_server(tmp_path, "fail-open", env)
    fail_closed = _start_server(
        tmp_path, "fail-closed", {**env, "GATEWAY_RATE_LIMIT_FAIL_OPEN": "false"}
    )
    try:
        team_update(team=team, changes={"rpm_limit": 1000})
        revoked_key, revoked_plaintext = virtual_key_issue(team=team, alias="soon")
        _, plaintext = virtual_key_issue(team=team, alias="kept")
        served = [_chat(s.url, plaintext) for s in (fail_open, fail_closed)]
        served.append(_chat(fail_open.url, revoked_plaintext))  # cached now
        assert [r.status_code for r in served] == [200, 200, 200]
        assert _ready(fail_open.url).json()["status"] == "ready"

        own_redis.stop()
        open_call = _chat(fail_open.url, plaintext)
        closed_call = _chat(fail_closed.url, plaintext)
        virtual_key_revoke(key=revoked_key)  # its invalidation cannot reach them
        revoked_call = _chat(fail_open.url, revoked_plaintext)
        open_ready, closed_ready = _ready(fail_open.url), _ready(fail_closed.url)
        scraped = httpx.get(f"{fail_open.url}/metrics", timeout=30)

        assert open_call.status_code == 200, open_call.text
        assert (closed_call.status_code, closed_call.json()["error"]["code"]) == (
            503,
            "rate_limiter_unavailable",
        )
        assert (revoked_call.status_code, revoked_call.json()["error"]["code"]) == (
            401,
            "invalid_api_key",
        )
        assert (open_ready.status_code, open_ready.json()["status"]) == (
            200,
            "degraded",
        )
        assert open_ready.json()["checks"] == {
            "database": "ok",
            "cache": "down",
            "broker": "down",
        }
        assert (closed_ready.status_code, closed_ready.json()["status"]) == (
            503,
            "not_ready",
        )
        assert scraped.status_code == 200
        assert "gateway_held_credits_micros" in scraped.text

        own_redis.start()
        recovered = _chat(fail_closed.url, plaintext)
        assert recovered.status_code == 200, recovered.text
        assert _ready(fail_closed.url).json()["status"] == "ready"
    finally:
        _stop_server(fail_open)
        _stop_server(fail_closed)
        own_redis.stop()

    successes = [*served, open_call, recovered]
    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == sorted(
        r.headers["x-request-id"] for r in successes
    )
    assert_ledger_consistent()


def test_database_stopped_mid_test(team, tmp_path):
    """Inference and the management API refuse with 503 service_unavailable
    (never serving unmetered), /readyz is 503 while /healthz stays up, and the
    gateway recovers when the database is back, with one usage record per
    served call and none for the refused one."""
    _, plaintext = virtual_key_issue(team=team)
    own_database = StoppablePostgres()
    try:
        own_database.load(_test_database_url())
        server = _start_server(tmp_path, "server", {"DATABASE_URL": own_database.url})
        try:
            before = _chat(server.url, plaintext)
            assert before.status_code == 200, before.text

            own_database.stop()
            refused = _chat(server.url, plaintext)
            management = httpx.get(
                f"{server.url}/api/organizations",
                headers={"X-Admin-Key": server.admin_key},
                timeout=30,
            )
            ready, alive = _ready(server.url), httpx.get(f"{server.url}/healthz")
            scraped = httpx.get(f"{server.url}/metrics", timeout=30)

            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["code"] == "service_unavailable"
            assert refused.headers["retry-after"] == "5"
            assert refused.headers["x-request-id"]
            assert (management.status_code, management.json()["error"]["code"]) == (
                503,
                "service_unavailable",
            )
            assert (ready.status_code, ready.json()["checks"]["database"]) == (
                503,
                "down",
            )
            assert alive.status_code == 200
            # Metrics still answer; what is read from the database is left out.
            assert scraped.status_code == 200
            assert 'gateway_refusals_total{code="service_unavailable"} 1.0' in (
                scraped.text
            )
            assert "gateway_requests_total" in scraped.text
            assert "gateway_held_credits_micros" not in scraped.text

            own_database.start()
            after = _chat(server.url, plaintext)
            assert after.status_code == 200, after.text
        finally:
            _stop_server(server)
        records = own_database.query(
            "SELECT request_id FROM billing_usagerecord ORDER BY request_id"
        )
        assert [row[0] for row in records] == sorted(
            r.headers["x-request-id"] for r in (before, after)
        )
        balance, ledger_sum, held = own_database.query(
            "SELECT a.balance_micros, SUM(e.amount_micros), a.held_micros "
            "FROM billing_creditaccount a JOIN billing_ledgerentry e "
            "ON e.account_id = a.id GROUP BY a.id"
        )[0]
        assert (balance, held) == (ledger_sum, 0)
    finally:
        own_database.destroy()
