"""The settlement journal (billing/journal.py): a settlement the database
cannot take is not lost, and a stream whose process dies is charged for what
it relayed — each applied exactly once, by the process that wrote it, by
whoever replays a dead process's file, or by reconciliation."""

import contextlib
import fcntl
import json
import os
import signal
import threading
import time
import uuid
from datetime import timedelta

import httpx
import pytest
from django.db import OperationalError
from django.utils import timezone

from billing import journal as journal_module
from billing.journal import journal, journal_replay
from billing.models import CreditAccount, LedgerEntry, UsageRecord
from billing.reconciliation import holds_settle_stale
from billing.services import call_settle, credits_hold
from billing.settlement import Settlement
from billing.tests.ledger import assert_ledger_consistent
from billing.tests.settlements import settlement
from billing.tests.test_money_path import CALL, _call, _open
from conftest import _start_server, _stop_server
from gateway_project.money import MICROS
from routing.inference import settle as settle_module
from routing.tests.calls import stream_in_process
from routing.tests.fake_upstream import Behaviour

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _ledger_stays_consistent():
    yield
    assert_ledger_consistent()


@pytest.fixture
def database_down_once(monkeypatch):
    """Once armed, the next settlement finds the database out of reach; the
    list holds the settlement it was given."""
    refused = []

    def unreachable(value):
        if not refused:
            refused.append(value)
            raise OperationalError("connection refused")
        return call_settle(value)

    def arm() -> list:
        monkeypatch.setattr(settle_module, "call_settle", unreachable)
        return refused

    return arm


def _lines(folder) -> list[str]:
    return [
        line.split(" ", 1)[0]
        for path in sorted(folder.glob("*.journal"))
        for line in path.read_text().splitlines()
    ]


def _captured(team, request_id) -> int:
    capture = LedgerEntry.objects.filter(
        account__team=team, request_id=request_id, entry_type="capture"
    ).first()
    return -capture.held_delta_micros - capture.amount_micros if capture else 0


def test_a_stream_settled_while_the_database_is_gone_is_applied_once_it_is_back(
    fake_upstream, database_down_once, journal_dir
):
    # Given a team whose call holds first (this process has not seen it)
    team, key = _open(fake_upstream)
    database_down_once()

    # When a stream is delivered whole, then its settlement cannot reach the
    # database
    response, body = stream_in_process(key, {**CALL, "stream": True})

    # Then the client got every chunk, nothing is recorded yet, the hold
    # stands, and the settlement is on disk
    assert response.status_code == 200 and body.endswith(b"data: [DONE]\n\n")
    request_id = response["x-request-id"]
    assert not UsageRecord.objects.exists()
    assert CreditAccount.objects.get(team=team).held_micros > 0
    assert "pending" in _lines(journal_dir)
    # and once the database answers, it is applied, exactly once
    assert journal().apply_waiting() == 1
    assert journal().apply_waiting() == 0
    assert journal_replay() == {"files": 0, "applied": 0, "failed": 0}
    record = UsageRecord.objects.get()
    assert (record.request_id, record.status, record.streamed) == (
        request_id,
        "success",
        True,
    )
    assert _captured(team, request_id) == record.credits_micros == 1_700
    assert CreditAccount.objects.get(team=team).held_micros == 0


def test_a_plain_call_held_first_is_answered_and_its_settlement_journaled(
    client, fake_upstream, database_down_once
):
    team, key = _open(fake_upstream)
    database_down_once()

    response = _call(client, key)

    assert response.status_code == 200, response.content
    assert not UsageRecord.objects.exists()
    assert journal().apply_waiting() == 1
    record = UsageRecord.objects.get()
    assert record.request_id == response["x-request-id"]
    assert _captured(team, record.request_id) == record.credits_micros == 1_700


def test_a_call_whose_hold_waited_fails_when_its_settlement_cannot_be_written(
    client, fake_upstream, database_down_once
):
    # Given a team far above the deferral margin, seen by this process, so
    # that its next call's hold waits for the settlement
    team, key = _open(fake_upstream)
    assert _call(client, key).status_code == 200
    entries = LedgerEntry.objects.count()
    down = database_down_once()

    # When its settlement finds the database gone
    response = _call(client, key)

    # Then nothing held it, so it is not served: 503, and it is journaled as
    # failed, recorded later with nothing charged and no ledger row
    assert down[0].unheld_micros is not None
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"
    assert journal().apply_waiting() == 1
    record = UsageRecord.objects.get(request_id=response["x-request-id"])
    assert (record.status, record.error_code, record.credits_micros) == (
        "error",
        "service_unavailable",
        0,
    )
    assert LedgerEntry.objects.count() == entries
    assert CreditAccount.objects.get(team=team).held_micros == 0


def test_a_call_neither_the_database_nor_the_journal_takes_is_not_answered(
    client, fake_upstream, database_down_once, monkeypatch, caplog
):
    # Given a call held first, whose settlement finds the database gone and
    # the journal's disk unwritable
    team, key = _open(fake_upstream)
    database_down_once()

    def disk_full(self, value):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal_module.Journal, "pending", disk_full)

    # When it is called
    with caplog.at_level("CRITICAL", logger=settle_module.logger.name):
        response = _call(client, key)

    # Then it is refused rather than answered unpaid: 503, nothing recorded,
    # its hold left for reconciliation to release, and the settlement in the
    # critical log line so an operator can write it by hand
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "service_unavailable"
    assert not UsageRecord.objects.exists()
    [line] = [r for r in caplog.records if r.levelname == "CRITICAL"]
    assert json.loads(line.settlement)["call_id"] == response["x-request-id"]
    assert CreditAccount.objects.get(team=team).held_micros > 0


def _dead_process_file(folder, *lines: tuple[str, object]) -> None:
    """A journal file as a process that died left it: nobody holds it."""
    with (folder / "gone-1-abcd.journal").open("w") as file:
        for kind, value in lines:
            file.write(f"{kind} {value.to_json()}\n")


def test_a_dead_processs_journal_is_applied_once_and_deleted(
    client, fake_upstream, journal_dir
):
    # Given a stream that held, delivered output and then lost its process:
    # its journal has two progress lines, the later one with more output
    team, _ = _open(fake_upstream)
    held = credits_hold(team=team, amount_micros=MICROS, request_id="req_dead")
    early = settlement(
        team,
        "req_dead",
        status="interrupted",
        charge_micros=1_000,
        held_micros=held,
        streamed=True,
    )
    late = settlement(
        team,
        "req_dead",
        status="interrupted",
        charge_micros=2_500,
        held_micros=held,
        streamed=True,
    )
    _dead_process_file(journal_dir, ("progress", early), ("progress", late))

    # When it is replayed, twice
    first, second = journal_replay(), journal_replay()

    # Then the last line is applied once and the file is gone
    assert first == {"files": 1, "applied": 1, "failed": 0}
    assert second == {"files": 0, "applied": 0, "failed": 0}
    assert not list(journal_dir.glob("*.journal"))
    record = UsageRecord.objects.get()
    assert (record.status, record.credits_micros) == ("interrupted", 2_500)
    assert _captured(team, "req_dead") == 2_500
    assert CreditAccount.objects.get(team=team).held_micros == 0


def test_reconciliation_captures_a_hold_whose_call_delivered_output(
    fake_upstream, journal_dir
):
    # Given a stale hold whose stream's process died after relaying output
    team, _ = _open(fake_upstream)
    held = credits_hold(team=team, amount_micros=MICROS, request_id="req_out")
    _dead_process_file(
        journal_dir,
        (
            "progress",
            settlement(
                team,
                "req_out",
                status="interrupted",
                charge_micros=700,
                held_micros=held,
                streamed=True,
            ),
        ),
    )

    # When reconciliation settles stale holds
    outcome = holds_settle_stale(
        older_than=timedelta(0), now=timezone.now() + timedelta(seconds=1)
    )

    # Then the hold is captured through the journal, not released
    assert outcome == {
        "captured": 0,
        "released": 0,
        "failed": 0,
        "journaled": 0,
        "replayed": 1,
    }
    assert _captured(team, "req_out") == 700
    assert CreditAccount.objects.get(team=team).held_micros == 0


def test_a_live_processs_journal_is_left_to_it(fake_upstream, journal_dir):
    # Given a stale hold named in a journal file a live process holds
    team, _ = _open(fake_upstream)
    held = credits_hold(team=team, amount_micros=MICROS, request_id="req_live")
    _dead_process_file(
        journal_dir,
        (
            "pending",
            settlement(team, "req_live", charge_micros=700, held_micros=held),
        ),
    )
    (path,) = journal_dir.glob("*.journal")
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        # When reconciliation runs
        outcome = holds_settle_stale(
            older_than=timedelta(0), now=timezone.now() + timedelta(seconds=1)
        )
    finally:
        os.close(fd)

    # Then the hold is neither released nor applied: its process will
    assert (outcome["released"], outcome["journaled"], outcome["replayed"]) == (0, 1, 0)
    assert CreditAccount.objects.get(team=team).held_micros == held
    assert path.exists()
    # and once that process is gone, the next run applies it
    assert journal_replay()["applied"] == 1
    assert _captured(team, "req_live") == 700


def test_a_line_cut_by_a_crash_is_set_aside_and_the_rest_applied(
    fake_upstream, journal_dir, caplog
):
    team, _ = _open(fake_upstream)
    held = credits_hold(team=team, amount_micros=MICROS, request_id="req_cut")
    _dead_process_file(
        journal_dir,
        ("progress", settlement(team, "req_cut", charge_micros=5, held_micros=held)),
    )
    with (journal_dir / "gone-1-abcd.journal").open("a") as file:
        file.write('progress {"call_id": "req_cu')  # the process died here

    assert journal_replay() == {"files": 1, "applied": 1, "failed": 1}
    assert "unreadable journal line 2 skipped" in caplog.text
    assert not list(journal_dir.glob("*.journal"))
    (rejected,) = journal_dir.glob("*.rejected")
    assert rejected.read_text() == 'unreadable progress {"call_id": "req_cu\n'


def test_a_line_of_another_version_is_applied_with_what_this_one_knows(
    fake_upstream, journal_dir
):
    # Given a dead process's line, written by a build whose settlement had
    # a field this one does not know
    team, _ = _open(fake_upstream)
    held = credits_hold(team=team, amount_micros=MICROS, request_id="req_other")
    line = json.loads(
        settlement(team, "req_other", charge_micros=1_700, held_micros=held).to_json()
    )
    line["reasoning_tokens"] = 0
    (journal_dir / "gone-2-abcd.journal").write_text(f"pending {json.dumps(line)}\n")

    # Then it is applied, not lost
    assert journal_replay() == {"files": 1, "applied": 1, "failed": 0}
    assert _captured(team, "req_other") == 1_700


def test_a_line_that_cannot_be_applied_never_blocks_the_others(
    fake_upstream, journal_dir
):
    # Given a dead process's file with a line the database cannot store (a
    # lone surrogate, as an older build could write) and a good one
    team, _ = _open(fake_upstream)
    bad_hold = credits_hold(team=team, amount_micros=MICROS, request_id="req_bad")
    good_hold = credits_hold(team=team, amount_micros=MICROS, request_id="req_good")
    bad = json.loads(
        settlement(team, "req_bad", charge_micros=5, held_micros=bad_hold).to_json()
    )
    bad["error_message"] = "bad \ud800 thing"
    good = settlement(team, "req_good", charge_micros=7, held_micros=good_hold)
    (journal_dir / "gone-3-abcd.journal").write_text(
        f"pending {json.dumps(bad)}\npending {good.to_json()}\n"
    )

    # When reconciliation runs
    outcome = holds_settle_stale(
        older_than=timedelta(0), now=timezone.now() + timedelta(seconds=1)
    )

    # Then the good line is applied, the bad one set aside (counted as
    # failed), and its hold, no longer shielded, released as stale
    assert outcome == {
        "captured": 0,
        "released": 1,
        "failed": 1,
        "journaled": 0,
        "replayed": 1,
    }
    assert _captured(team, "req_good") == 7
    assert CreditAccount.objects.get(team=team).held_micros == 0
    assert len(list(journal_dir.glob("*.rejected"))) == 1


def test_a_call_settled_after_reconciliation_released_its_hold_still_pays(
    fake_upstream,
):
    # Given a call that outlived the stale-hold age: reconciliation released
    # its hold while the provider was still answering
    team, _ = _open(fake_upstream)
    held = credits_hold(team=team, amount_micros=MICROS, request_id="req_long")
    assert (
        holds_settle_stale(
            older_than=timedelta(0), now=timezone.now() + timedelta(seconds=1)
        )["released"]
        == 1
    )

    # When its settlement comes
    record = call_settle(
        settlement(team, "req_long", charge_micros=1_700, held_micros=held)
    )

    # Then it is charged all the same, from the balance
    assert record.credits_micros == 1_700
    capture = LedgerEntry.objects.get(request_id="req_long", entry_type="capture")
    assert (capture.amount_micros, capture.held_delta_micros) == (-1_700, 0)
    assert capture.reason == "captured after its hold was released"
    account = CreditAccount.objects.get(team=team)
    assert (account.balance_micros, account.held_micros) == (100 * MICROS - 1_700, 0)


@contextlib.contextmanager
def _relaying(fake_upstream, url, journal_dir):
    """A stream that has relayed its first chunk, written to the journal as
    progress, and waits for the rest (``rest``); yields its team, response,
    the rest of its lines and ``rest``."""
    team, key = _open(fake_upstream)
    rest = threading.Event()
    fake_upstream.program(
        "money", Behaviour(chunks=["Hello there, ", "and the rest"], hold=rest)
    )
    try:
        with httpx.stream(
            "POST",
            f"{url}/v1/chat/completions",
            json={**CALL, "stream": True},
            headers={"X-API-Key": key},
            timeout=30,
        ) as response:
            lines = response.iter_lines()  # kept: dropping it would hang up
            assert "Hello there" in next(x for x in lines if x.startswith("data:"))
            _until(lambda: "progress" in _lines(journal_dir))
            yield team, response, lines, rest
    finally:
        rest.set()


def test_a_worker_killed_mid_stream_is_charged_for_what_it_relayed(
    running_server, fake_upstream, journal_dir
):
    # Given a stream that has relayed its first chunk and waits for the rest
    with _relaying(fake_upstream, running_server.url, journal_dir) as (
        team,
        response,
        _,
        _,
    ):
        request_id = response.headers["x-request-id"]

        # When its process is killed
        workers = _children(running_server.process.pid)
        for worker in workers:
            os.kill(worker, signal.SIGKILL)
        running_server.process.kill()
        running_server.process.wait(10)
        _until(lambda: _unlocked(journal_dir))
    assert not UsageRecord.objects.exists()

    # Then the journal it left charges what it relayed, once
    assert journal_replay()["applied"] == 1
    record = UsageRecord.objects.get()
    assert (record.request_id, record.status, record.streamed) == (
        request_id,
        "interrupted",
        True,
    )
    assert record.completion_tokens > 0 and record.usage_source == "estimated"
    assert _captured(team, request_id) == record.credits_micros > 0
    assert CreditAccount.objects.get(team=team).held_micros == 0


def test_a_stopped_process_leaves_nothing_to_replay_of_settled_streams(
    fake_upstream, journal_dir, tmp_path
):
    # Given a server relaying a stream, whose first chunk is out and written
    # to the journal as progress, which then finishes and is settled
    server = _start_server(tmp_path, "server")
    try:
        with _relaying(fake_upstream, server.url, journal_dir) as (_, _, lines, rest):
            rest.set()
            assert "data: [DONE]" in list(lines)
        _until(lambda: UsageRecord.objects.exists())
    finally:
        # When it is stopped as gunicorn stops it (SIGTERM)
        _stop_server(server)

    # Then what it left holds nothing for a replay to apply: the line went
    # with the settlement (uvicorn ends a worker by its signal, so no exit
    # handler could have tidied up)
    assert _lines(journal_dir) == []
    assert journal_replay()["applied"] == 0
    assert list(journal_dir.glob("*.journal")) == []


def _until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.02)


def _unlocked(folder) -> bool:
    """Whether every journal file is free: their processes are gone (the
    lock goes with the last thread of a process, after its pid looks dead)."""
    for path in folder.glob("*.journal"):
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
    return True


def _children(pid: int) -> list[int]:
    from billing.tests.test_money_path import _children as children

    return children(pid)


def test_the_journal_rotates_and_deletes_what_is_settled(
    journal_dir, monkeypatch, fake_upstream
):
    # Given a tiny rotation size
    team, _ = _open(fake_upstream)
    monkeypatch.setattr(journal_module, "_ROTATE_BYTES", 1)
    kept = journal()

    # When two streams write progress, then one settles
    kept.progress(settlement(team, "req_a", status="interrupted"))
    kept.progress(settlement(team, "req_b", status="interrupted"))
    assert len(list(journal_dir.glob("*.journal"))) == 2
    kept.done("req_a")

    # Then the first file, no longer written and all settled, is gone
    assert len(list(journal_dir.glob("*.journal"))) == 1
    kept.done("req_b")
    kept.progress(settlement(team, "req_c", status="interrupted"))
    assert len(list(journal_dir.glob("*.journal"))) == 1


def test_a_journal_line_reads_back_as_the_settlement_it_was(team):
    # Nested metadata, attempts, a job and a deferred hold: every field
    # survives the line (it is what a replay charges and records).
    written = settlement(
        team,
        "req_line",
        charge_micros=1_700,
        unheld_micros=9_000,
        job_id=uuid.uuid4(),
        metadata={"trace": {"span": [1, "two", None]}, "ok": True},
        fallbacks_tried=[{"deployment": "a", "error": "upstream_timeout"}],
    )

    assert Settlement.from_json(written.to_json()) == written
