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

import openai
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
        # The banner ends with the blank line after its "Try:" block.
        if any(seen.strip().startswith("Try:") for seen in banner) and not line.strip():
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


DEMO_ANSWER = "Hello from the gateway's demo model group."


def _curl_line(banner: str) -> str:
    """The multi-line curl command the banner prints, joined into one."""
    lines = banner.splitlines()
    start = next(i for i, line in enumerate(lines) if "/v1/chat/completions" in line)
    command = []
    for line in lines[start:]:
        command.append(line.strip().removesuffix("\\").strip())
        if not line.rstrip().endswith("\\"):
            break
    return "curl" + " ".join(command).split("curl", 1)[1]


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
        key = re.search(r"Demo key: (\S+)", banner)[1]  # type: ignore[index]
        # The banner's curl line, as a user would paste it.
        curl = _curl_line(banner)
        answer = subprocess.run(
            curl, shell=True, capture_output=True, text=True, timeout=60, check=True
        )
        assert (
            json.loads(answer.stdout)["choices"][0]["message"]["content"] == DEMO_ANSWER
        )
        # And the official SDK.
        sdk = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0
        )
        reply = sdk.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "Hello"}]
        )
        assert reply.choices[0].message.content == DEMO_ANSWER
        assert [model.id for model in sdk.models.list().data] == ["demo"]
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
