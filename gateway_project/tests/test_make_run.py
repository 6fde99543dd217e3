"""`make run`'s script on the embedded default: a real server process over HTTP."""

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - loopback only
        return response.status, response.read()


def _start(
    var_dir: Path, port: int, **extra_env: str
) -> tuple[subprocess.Popen[str], str]:
    """Start scripts/run.sh; return it and its banner once /health answers."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in {
            "DATABASE_URL",
            "REDIS_URL",
            "SECRET_KEY",
            "GATEWAY_OWNER_EMAIL",
            "GATEWAY_OWNER_PASSWORD",
        }
    }
    env.update(
        GATEWAY_VAR_DIR=str(var_dir), HOST="127.0.0.1", PORT=str(port), **extra_env
    )
    process = subprocess.Popen(
        ["scripts/run.sh"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    banner: list[str] = []
    deadline = time.monotonic() + 90
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            raise AssertionError("server exited:\n" + "".join(banner))
        banner.append(line)
        if line.strip().startswith("Try:"):
            break
    while time.monotonic() < deadline:
        try:
            if _get(f"http://127.0.0.1:{port}/health")[0] == 200:
                return process, "".join(banner)
        except OSError:
            time.sleep(0.2)
    raise AssertionError("server did not answer /health:\n" + "".join(banner))


def _stop(process: subprocess.Popen[str]) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=20)


@pytest.fixture
def var_dir(tmp_path: Path) -> Path:
    return tmp_path / "var"


def test_make_run_serves_admin_and_health_and_prints_what_works(var_dir):
    port = _free_port()
    process, banner = _start(var_dir, port)
    try:
        status, body = _get(f"http://127.0.0.1:{port}/health")
        assert (status, json.loads(body)) == (200, {"status": "healthy"})
        status, body = _get(f"http://127.0.0.1:{port}/admin/login/")
        assert status == 200
        assert b"LLM Gateway" in body
        status, body = _get(f"http://127.0.0.1:{port}/readyz")
        assert (status, json.loads(body)["mode"]) == (200, "embedded")
    finally:
        _stop(process)

    assert f"Admin:    http://127.0.0.1:{port}/admin/" in banner
    assert "Login:    owner@example.com" in banner
    assert re.search(r"Password: \S+ +\(generated; shown this once\)", banner)
    assert re.search(r"Demo key: sk-gw_[a-z0-9]{12}_[A-Za-z0-9]{40}", banner)
    assert f"curl -s http://127.0.0.1:{port}/health" in banner
    assert (var_dir / "db.sqlite3").exists()

    # A second start reuses the database: same key, no new password.
    second_port = _free_port()
    process, second_banner = _start(var_dir, second_port)
    _stop(process)
    key = re.search(r"Demo key: (\S+)", banner)[1]  # type: ignore[index]
    assert f"Demo key: {key}" in second_banner
    assert "generated; shown this once" not in second_banner


def test_make_run_takes_the_owner_from_the_environment(var_dir):
    port = _free_port()
    process, banner = _start(
        var_dir,
        port,
        GATEWAY_OWNER_EMAIL="ops@example.com",
        GATEWAY_OWNER_PASSWORD="Ops-passw0rd!",
    )
    _stop(process)

    assert "Login:    ops@example.com" in banner
    assert "Password: (from GATEWAY_OWNER_PASSWORD)" in banner
    assert "Ops-passw0rd!" not in banner
