"""The settlement journal: what the database must learn of a call but could
not be told yet, kept on the local disk and applied exactly once later.

Two kinds of line, each a ``Settlement`` as JSON:

- ``pending``: a settlement the database did not take (PostgreSQL
  unreachable). Flushed to disk before the caller goes on. The process that
  wrote it applies it when the database is back (``JOURNAL_RETRY_SECONDS``).
- ``progress``: a stream that has delivered output, as it would be settled if
  it ended now (status ``interrupted``, the tokens relayed so far). Written
  when its first chunk is out and then every ``PROGRESS_SECONDS``; its real
  settlement makes it moot. If the process dies mid-stream, the last one is
  what the call is charged.

Each process appends to a file of its own under GATEWAY_JOURNAL_DIR and holds
an exclusive lock on it (flock) while it lives: a file nobody holds is a dead
process's, and is replayed (``journal_replay``) by the next gateway process
on the machine, by the process's successor after a restart, and by
reconciliation before it settles stale holds. Applying is idempotent (the
usage record is unique per call, the ledger rows per idempotency key), so
a line applied twice is written once. A file whose lines are all settled is
emptied by its owner (deleted once it has rotated), or deleted by whoever
replayed it.
"""

import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from prometheus_client import Counter

from billing.models import UsageRecord
from billing.services import InsufficientCredits, call_settle
from billing.settlement import Settlement

logger = logging.getLogger(__name__)

PENDING, PROGRESS = "pending", "progress"
PROGRESS_SECONDS = 1.0
_ROTATE_BYTES = 16 * 1024 * 1024
_SUFFIX = ".journal"
_BATCH = 500

JOURNALED = Counter(
    "gateway_settlements_journaled_total",
    "Settlements the database did not take, kept in the journal",
)
APPLIED = Counter(
    "gateway_journal_applied_total",
    "Journal lines applied to the database",
    ["kind"],
)
REFUSED = Counter(
    "gateway_journal_rejected_total",
    "Journal lines that could not be read or applied, set aside in *.rejected",
)

# The database is out of reach: try again later.
_UNREACHABLE = (OperationalError, InterfaceError)


def directory() -> Path:
    return Path(settings.GATEWAY_JOURNAL_DIR)


class _File:
    """One journal file, written and locked by this process."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = folder / f"{name}{_SUFFIX}"
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        self.size = 0
        self.current = True
        self.streams: set[str] = set()  # progress written, not settled yet
        self.pending: set[str] = set()  # written, not applied yet

    def append(self, kind: str, settlement: Settlement, *, flush: bool) -> None:
        line = f"{kind} {settlement.to_json()}\n".encode()
        os.write(self.fd, line)  # O_APPEND: one write, one whole line
        if flush:
            os.fsync(self.fd)
        self.size += len(line)

    def retire_if_done(self) -> None:
        """A file whose every line is settled is moot: one no longer written
        goes; the one being written is emptied. So what a process leaves
        when it stops, however it stops, is only what is still unsettled
        (uvicorn ends a worker by its signal: no exit handler runs)."""
        if self.streams or self.pending:
            return
        if self.current:
            if self.size:
                os.ftruncate(self.fd, 0)  # O_APPEND: the next line goes first
                self.size = 0
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # before the lock goes: nobody replays it
        os.close(self.fd)


class Journal:
    """This process's journal (``journal()``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.lock = threading.Lock()
        self.file: _File | None = None
        self.files: dict[str, _File] = {}  # each call's file
        self.waiting: dict[str, Settlement] = {}

    def _current(self) -> _File:
        if self.file is not None and self.file.size >= _ROTATE_BYTES:
            self.file.current = False
            self.file.retire_if_done()
            self.file = None
        if self.file is None:
            self.file = _File(self.folder)
        return self.file

    def progress(self, settlement: Settlement) -> None:
        """A stream's output so far, as it would be settled now. Not flushed:
        it outlives the process (the page cache does), not the machine."""
        with self.lock:
            file = self.files.get(settlement.call_id) or self._current()
            file.append(PROGRESS, settlement, flush=False)
            file.streams.add(settlement.call_id)
            self.files[settlement.call_id] = file

    def done(self, call_id: str) -> None:
        """The call is settled in the database: its lines are moot."""
        with self.lock:
            self._done(call_id)

    def _done(self, call_id: str) -> None:
        file = self.files.pop(call_id, None)
        if file is not None:
            file.streams.discard(call_id)
            file.retire_if_done()

    def pending(self, settlement: Settlement) -> None:
        """A settlement the database did not take: on disk before this
        returns, applied later by ``apply_waiting``."""
        with self.lock:
            file = self.files.get(settlement.call_id) or self._current()
            file.append(PENDING, settlement, flush=True)
            file.pending.add(settlement.call_id)
            self.files[settlement.call_id] = file
            self.waiting[settlement.call_id] = settlement
        JOURNALED.inc()
        logger.warning(
            "settlement journaled: the database did not take it",
            extra={"call_id": settlement.call_id, "journal": str(file.path)},
        )
        retry_start()

    def apply_waiting(self) -> int:
        """Apply this process's pending settlements, in order, until the
        database refuses; returns how many were applied."""
        applied = 0
        for call_id, settlement in list(self.waiting.items()):
            try:
                _apply(settlement)
            except _UNREACHABLE:
                break
            except Exception:
                # Never applicable: set aside for the operator, not retried.
                _reject(self.folder, PENDING, settlement)
            else:
                applied += 1
                APPLIED.labels(kind=PENDING).inc()
            with self.lock:
                self.waiting.pop(call_id, None)
                file = self.files.get(call_id)
                if file is not None:
                    file.pending.discard(call_id)
                self._done(call_id)
        return applied


_journals: dict[int, Journal] = {}
_journals_lock = threading.Lock()


def journal() -> Journal:
    """The journal of this process (a forked worker gets its own)."""
    pid = os.getpid()
    found = _journals.get(pid)
    if found is None:
        with _journals_lock:
            found = _journals.get(pid)
            if found is None:
                found = _journals[pid] = Journal(directory())
    return found


def journal_forget() -> None:
    """Close this process's journal files and forget them (tests give each
    test a journal directory of its own)."""
    with _journals_lock:
        for kept in _journals.values():
            with kept.lock:
                for file in {*kept.files.values(), *([kept.file] if kept.file else [])}:
                    with contextlib.suppress(OSError):
                        os.close(file.fd)
        _journals.clear()


def _apply(settlement: Settlement) -> None:
    try:
        call_settle(settlement)
    except InsufficientCredits:
        # A hold left to the settlement that the credits no longer cover:
        # nothing is written, as it would not have been then.
        logger.warning(
            "journaled settlement refused: not enough credits",
            extra={"call_id": settlement.call_id},
        )


REJECTED = ".rejected"


def _reject(folder: Path, kind: str, settlement: Settlement | str) -> None:
    """Set a line that cannot be read or applied aside, in ``*.rejected``
    beside the journal: kept for the operator, never replayed, and no longer
    shielding its call's hold from reconciliation."""
    text = settlement if isinstance(settlement, str) else settlement.to_json()
    name = f"{socket.gethostname()}-{os.getpid()}{REJECTED}"
    with (folder / name).open("a") as file:
        file.write(f"{kind} {text.rstrip()}\n")
    REFUSED.inc()
    logger.error("journal line set aside: it cannot be applied (see %s)", folder / name)


def _lines(
    fd: int, unreadable: list[str] | None = None
) -> Iterator[tuple[str, Settlement]]:
    """The journal's lines; ``unreadable`` gets the text of those that are
    not (a line cut by a crash mid-write, a foreign one)."""
    with os.fdopen(os.dup(fd), "rb") as reader:
        for number, raw in enumerate(reader, start=1):
            kind, _, text = raw.decode(errors="replace").partition(" ")
            try:
                yield kind, Settlement.from_json(text)
            except Exception:
                logger.warning("unreadable journal line %d skipped", number)
                if unreadable is not None:
                    unreadable.append(raw.decode(errors="replace"))


def journal_replay(folder: Path | None = None) -> dict[str, int]:
    """Apply the journal files of processes that are gone (nobody holds
    their lock): the last line of each call that has no usage record yet.
    A line that cannot be read or applied is set aside (``_reject``) and
    counted as failed; the file is deleted once each of its lines is applied
    or set aside. A database out of reach stops the replay (the next one goes
    on)."""
    outcome = {"files": 0, "applied": 0, "failed": 0}
    folder = folder or directory()
    if not folder.is_dir():
        return outcome
    for path in sorted(folder.glob(f"*{_SUFFIX}")):
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process lives and applies it itself
            if not path.exists():
                continue  # deleted by whoever replayed it just before
            latest: dict[str, tuple[str, Settlement]] = {}
            unreadable: list[str] = []
            for kind, settlement in _lines(fd, unreadable):
                latest[settlement.call_id] = (kind, settlement)
            for text in unreadable:
                _reject(folder, "unreadable", text)
            failed = len(unreadable)
            for batch in _batches(list(latest.values())):
                recorded = set(
                    UsageRecord.objects.filter(
                        request_id__in=[s.call_id for _, s in batch]
                    ).values_list("request_id", flat=True)
                )
                for kind, settlement in batch:
                    if settlement.call_id in recorded:
                        continue
                    try:
                        _apply(settlement)
                    except _UNREACHABLE:
                        raise
                    except Exception:
                        failed += 1
                        logger.exception(
                            "journal line refused",
                            extra={"call_id": settlement.call_id},
                        )
                        _reject(folder, kind, settlement)
                        continue
                    outcome["applied"] += 1
                    APPLIED.labels(kind=kind).inc()
            outcome["files"] += 1
            outcome["failed"] += failed
            # Every line is applied, or set aside: the file has done its work.
            path.unlink()
        except _UNREACHABLE:
            logger.warning("journal replay stopped: the database is unreachable")
            break
        finally:
            os.close(fd)
    return outcome


def _batches(
    entries: list[tuple[str, Settlement]],
) -> Iterator[list[tuple[str, Settlement]]]:
    for start in range(0, len(entries), _BATCH):
        yield entries[start : start + _BATCH]


def journal_calls(folder: Path | None = None) -> set[str]:
    """The calls named in any journal file, live processes' included: their
    holds are settled through the journal, never released as stale."""
    folder = folder or directory()
    calls: set[str] = set()
    if not folder.is_dir():
        return calls
    for path in folder.glob(f"*{_SUFFIX}"):
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            calls.update(settlement.call_id for _, settlement in _lines(fd))
        finally:
            os.close(fd)
    return calls


# --- the process's own retries ------------------------------------------------

_retry_lock = threading.Lock()
_retrying: set[int] = set()


def retry_start() -> None:
    """Start, once per process, the thread that applies this process's
    pending settlements and replays dead processes' files, every
    GATEWAY_JOURNAL_RETRY_SECONDS."""
    if settings.GATEWAY_JOURNAL_RETRY_SECONDS <= 0:
        return  # off: something else applies the journal (the tests do)
    pid = os.getpid()
    with _retry_lock:
        if pid in _retrying:
            return
        _retrying.add(pid)
    threading.Thread(target=_retry, name="gateway-journal", daemon=True).start()


def _retry() -> None:
    while True:
        time.sleep(settings.GATEWAY_JOURNAL_RETRY_SECONDS)
        try:
            journal().apply_waiting()
            journal_replay()
        except Exception:
            logger.exception("journal retry failed")
        finally:
            with contextlib.suppress(Exception):
                connection.close()
