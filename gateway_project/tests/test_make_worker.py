"""`make worker` and `make beat`, as the README runs them: a real Celery
worker on a broker shared with the web, and a clear refusal without one."""

import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _environment(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"REDIS_URL", "CELERY_BROKER_URL", "MAKEFLAGS", "MAKELEVEL"}
    }
    return {**env, **extra}


def test_make_worker_without_a_broker_refuses_and_says_why():
    # Given the embedded default: no REDIS_URL, no CELERY_BROKER_URL
    for target in ("worker", "beat"):
        # When make worker (or beat) is run
        result = subprocess.run(
            ["make", "--no-print-directory", target],
            cwd=ROOT,
            env=_environment(),
            capture_output=True,
            text=True,
            timeout=120,
        )

        # Then it refuses, naming what to set, and starts nothing
        assert result.returncode == 2
        assert "set REDIS_URL" in result.stderr
        assert "celery -A" not in result.stdout


def test_make_worker_runs_a_celery_worker_on_the_shared_broker(tmp_path):
    # Given a broker (a Redis database of its own: no task another test
    # queued is taken)
    broker = os.environ["REDIS_URL"].rsplit("/", 1)[0] + "/15"
    log = tmp_path / "worker.log"
    with log.open("w") as output:
        # When make worker is run
        process = subprocess.Popen(
            ["make", "--no-print-directory", "worker"],
            cwd=ROOT,
            env=_environment(CELERY_BROKER_URL=broker),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # make and its celery: one group to stop
        )
    try:
        # Then a worker of the gateway's app comes up, with its tasks
        deadline = time.monotonic() + 90
        while " ready." not in log.read_text():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        text = log.read_text()
        assert ".venv/bin/celery -A gateway_project worker" in text
        assert "billing.holds_settle_stale" in text
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
