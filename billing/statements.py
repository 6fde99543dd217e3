"""The money of a call in one SQL statement each, on PostgreSQL.

``credits_hold`` and ``call_settle`` (services.py) are the reference: locked
rows, ORM writes, a dozen statements per call. On the request path that cost
more CPU than everything else together, so the common case runs as one
statement each here, with the same rows, the same arithmetic and the same
guards:

- the hold is one ``UPDATE … WHERE balance + overdraft >= amount`` (the row
  lock and the re-check under it are PostgreSQL's) feeding the ledger insert;
- the settlement is one account update feeding the capture row, the release
  row and the usage record.

A call whose hold was deferred (``call_settle_unheld_statement``) writes its
hold with its settlement, in one statement, under the same guard as the hold:
the ledger gets the same three rows, and nothing at all when the credits no
longer cover the hold.

Each is atomic as a single statement. Whatever is not the common case — no
account yet, not enough credits (the service words the 402), a duplicate
request id (a unique key refuses the whole statement, and the service answers
as it always did), a settlement whose hold is not open in the ledger, a charge
above the hold, jobs, key budgets — returns
``None`` so that the caller runs the service instead.

Each statement also returns what the team then had available (balance plus
overdraft), which this process remembers for a few seconds
(``available_recall``): the pipeline defers the hold of a call that is a
small part of it (routing/inference/admit.py).
"""

import threading
import time
import uuid
from functools import cache
from typing import Any

import psycopg
from django.db import (
    DEFAULT_DB_ALIAS,
    IntegrityError,
    connection,
    connections,
    transaction,
)
from django.utils import timezone

from billing.models import CreditAccount, LedgerEntry, LedgerEntryType, UsageRecord

_LEDGER_COLUMNS = (
    "account_id, entry_type, amount_micros, held_delta_micros, "
    "balance_before_micros, balance_after_micros, idempotency_key, reason, "
    "request_id, job_id, actor_id, actor_label, created_at"
)


# How long a team's available credits, as a statement returned them, are
# remembered; and for how many teams at most (the memory is cleared when full).
AVAILABLE_SECONDS = 5.0
_AVAILABLE_TEAMS = 10_000
_available: dict[int, tuple[int, float]] = {}
_available_lock = threading.Lock()


def available() -> bool:
    return connection.vendor == "postgresql"


def available_recall(team_id: int) -> int | None:
    """The team's balance plus overdraft as this process last wrote it, if
    that was less than AVAILABLE_SECONDS ago; None when unknown. Other
    processes may have spent since: a hint, never a guard."""
    seen = _available.get(team_id)
    if seen is None or time.monotonic() - seen[1] > AVAILABLE_SECONDS:
        return None
    return seen[0]


def available_forget(team_id: int | None = None) -> None:
    """Forget one team's available credits, or every team's."""
    if team_id is None:
        _available.clear()
    else:
        _available.pop(team_id, None)


def _available_note(team_id: int, row: tuple[Any, ...]) -> None:
    if row[1] is None:
        return  # no account
    with _available_lock:
        if len(_available) >= _AVAILABLE_TEAMS:
            _available.clear()
        _available[team_id] = (int(row[1]), time.monotonic())


@cache
def _hold_sql() -> str:
    account, ledger = CreditAccount._meta.db_table, LedgerEntry._meta.db_table
    # Table and column names come from the models; every value is a parameter.
    return f"""
        WITH moved AS (
            UPDATE {account}
               SET balance_micros = balance_micros - %(amount)s,
                   held_micros = held_micros + %(amount)s
             WHERE team_id = %(team)s
               AND balance_micros + overdraft_limit_micros >= %(amount)s
         RETURNING id, balance_micros,
                   balance_micros + overdraft_limit_micros AS available
        )
        INSERT INTO {ledger} ({_LEDGER_COLUMNS})
        SELECT id, '{LedgerEntryType.HOLD}', -%(amount)s, %(amount)s,
               balance_micros + %(amount)s, balance_micros, %(key)s::text, '',
               %(request)s::text, %(job)s::uuid, NULL, 'gateway',
               %(now)s::timestamptz
          FROM moved
        RETURNING id, (SELECT available FROM moved)
    """  # noqa: S608


@cache
def _usage_fields() -> list[Any]:
    return [f for f in UsageRecord._meta.concrete_fields if not f.primary_key]


@cache
def _settle_sql() -> str:
    account, ledger = CreditAccount._meta.db_table, LedgerEntry._meta.db_table
    fields = _usage_fields()
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    # Typed: in a SELECT list an untyped parameter would be text.
    values = ", ".join(f"%s::{f.cast_db_type(connection)}" for f in fields)
    # Only a hold that is in this account's ledger and not settled yet is
    # settled here: the statement takes what it was told was held, so a
    # settlement of a hold that was released (reconciliation), or never
    # written (a journal line from another database), would otherwise take
    # other calls' held credits. Then nothing is written, the usage record
    # included (FROM account), and the service reads the ledger instead.
    # Capture, then release, as the service writes them (the ledger chains in
    # id order, and ids follow the ORDER BY): the capture leaves the balance as
    # it was (it takes from the hold), the release gives back the rest. Names
    # come from the models; values are parameters.
    return f"""
        WITH account AS (
            UPDATE {account}
               SET balance_micros = balance_micros + %s,
                   held_micros = held_micros - %s,
                   used_total_micros = used_total_micros + %s
             WHERE team_id = %s
               AND EXISTS (SELECT 1 FROM {ledger} h
                            WHERE h.idempotency_key = %s::text
                              AND h.account_id = {account}.id)
               AND NOT EXISTS (SELECT 1 FROM {ledger} s
                                WHERE s.idempotency_key IN (%s::text, %s::text))
         RETURNING id, balance_micros - %s AS before,
                   balance_micros + overdraft_limit_micros AS available
        ),
        ledger AS (
            INSERT INTO {ledger} ({_LEDGER_COLUMNS})
            SELECT account.id, v.entry_type, v.amount, v.held_delta, account.before,
                   account.before + v.amount, v.key, '', %s::text, NULL,
                   NULL, 'gateway', %s::timestamptz
              FROM account,
                   (VALUES (1, '{LedgerEntryType.CAPTURE}', 0::bigint,
                            -%s::bigint, %s::text),
                           (2, '{LedgerEntryType.RELEASE}', %s::bigint,
                            -%s::bigint, %s::text))
                   AS v (n, entry_type, amount, held_delta, key)
             WHERE v.held_delta < 0
             ORDER BY v.n
        )
        INSERT INTO {UsageRecord._meta.db_table} ({columns})
        SELECT {values} FROM account
        RETURNING id, (SELECT available FROM account)
    """  # noqa: S608


@cache
def _settle_unheld_sql() -> str:
    account, ledger = CreditAccount._meta.db_table, LedgerEntry._meta.db_table
    fields = _usage_fields()
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    # Typed: in a SELECT list an untyped parameter would be text.
    values = ", ".join(f"%s::{f.cast_db_type(connection)}" for f in fields)
    # The hold's guard on the account, then hold, capture and release as the
    # two statements would have written them, and the usage record only with
    # the account row (FROM account): when the credits do not cover the hold,
    # the statement writes nothing. The balance moves by the charge; what is
    # held comes back to where it was.
    return f"""
        WITH account AS (
            UPDATE {account}
               SET balance_micros = balance_micros - %s,
                   used_total_micros = used_total_micros + %s
             WHERE team_id = %s
               AND balance_micros + overdraft_limit_micros >= %s
         RETURNING id, balance_micros + %s AS before,
                   balance_micros + overdraft_limit_micros AS available
        ),
        ledger AS (
            INSERT INTO {ledger} ({_LEDGER_COLUMNS})
            SELECT account.id, v.entry_type, v.amount, v.held_delta,
                   account.before + v.prior, account.before + v.prior + v.amount,
                   v.key, '', %s::text, NULL, NULL, 'gateway', %s::timestamptz
              FROM account,
                   (VALUES (1, '{LedgerEntryType.HOLD}', -%s::bigint, %s::bigint,
                            0::bigint, %s::text),
                           (2, '{LedgerEntryType.CAPTURE}', 0::bigint,
                            -%s::bigint, -%s::bigint, %s::text),
                           (3, '{LedgerEntryType.RELEASE}', %s::bigint,
                            -%s::bigint, -%s::bigint, %s::text))
                   AS v (n, entry_type, amount, held_delta, prior, key)
             WHERE v.n = 1 OR v.held_delta < 0
             ORDER BY v.n
        )
        INSERT INTO {UsageRecord._meta.db_table} ({columns})
        SELECT {values} FROM account
        RETURNING id, (SELECT available FROM account)
    """  # noqa: S608


def _run(sql: str, params: Any) -> tuple[Any, ...] | None:
    """The row the statement returned, or None when it wrote nothing or a
    unique key refused it (then nothing at all was written). Inside a
    transaction (tests) a savepoint keeps that transaction usable."""
    # The thread's connection, looked up once: each use of the ``connection``
    # proxy is a context-local lookup.
    db = connections[DEFAULT_DB_ALIAS]
    try:
        if db.in_atomic_block:
            with transaction.atomic():
                return _execute(db, sql, params)
        return _execute(db, sql, params)
    except IntegrityError:
        return None


def _execute(db: Any, sql: str, params: Any) -> tuple[Any, ...] | None:
    # A server-binding cursor rather than Django's client-binding one: the
    # values travel apart from the SQL (no quoting and splicing on every call),
    # and psycopg prepares a statement it has run a few times on a connection
    # (``prepare_threshold``), so PostgreSQL stops parsing and planning it.
    # Django's wrapper stays around it (query logging, error translation).
    db.ensure_connection()
    raw: Any = psycopg.Cursor(db.connection)  # the stubs want a wrapper
    wrapped = db.make_debug_cursor(raw) if db.queries_logged else db.make_cursor(raw)
    with wrapped as cursor:
        cursor.execute(sql, params)
        row: tuple[Any, ...] | None = cursor.fetchone()
    return row


def _prepared(record: UsageRecord, field: Any) -> Any:
    """A column's value as the ORM would send it. Plain values (what every
    field but the JSON and date fields holds here) go as they are: the field
    would hand them on unchanged, at several calls each."""
    value = getattr(record, field.attname)
    if value is None or type(value) in (int, str, bool):
        return value
    return field.get_db_prep_save(field.pre_save(record, True), connection)


def credits_hold_statement(
    *, team_id: int, amount_micros: int, request_id: str, job_id: uuid.UUID | None
) -> bool:
    """Hold ``amount_micros`` (> 0) of the team's credits in one statement.
    False when it did not (no account, not enough credits, the request's hold
    already written): nothing was written, and the service decides."""
    row = _run(
        _hold_sql(),
        {
            "amount": amount_micros,
            "team": team_id,
            "key": f"hold:{request_id}",
            "request": request_id,
            "job": job_id,
            "now": timezone.now(),
        },
    )
    if row is None:
        return False
    _available_note(team_id, row)
    return True


def call_settle_statement(
    *, team_id: int, held_micros: int, charge_micros: int, record: UsageRecord
) -> UsageRecord | None:
    """Settle a call without a job or key budget whose charge fits in its
    hold, in one statement: capture the charge, release the rest, write the
    (unsaved) ``record``. None when the call's hold is not open in the
    ledger (settled before, released by reconciliation, never written):
    nothing was written, and the service answers."""
    if not 0 <= charge_micros <= held_micros:
        return None
    release = held_micros - charge_micros
    request_id = record.request_id
    now = timezone.now()
    usage = _usage(record, charge_micros)
    params = [
        release,
        held_micros,
        charge_micros,
        team_id,
        f"hold:{request_id}",
        f"capture:{request_id}",
        f"release:{request_id}",
        release,
        request_id,
        now,
        charge_micros,
        f"capture:{request_id}",
        release,
        release,
        f"release:{request_id}",
        *usage,
    ]
    return _settled(team_id, record, _run(_settle_sql(), params))


def call_settle_unheld_statement(
    *, team_id: int, hold_micros: int, charge_micros: int, record: UsageRecord
) -> UsageRecord | None:
    """Hold ``hold_micros`` and settle the call at once: what
    ``credits_hold_statement`` then ``call_settle_statement`` would write, in
    one statement, under the hold's guard. None when it wrote nothing (no
    account, credits that no longer cover the hold, a charge above it, a
    request settled before): the service decides."""
    if not 0 <= charge_micros <= hold_micros:
        return None
    release = hold_micros - charge_micros
    request_id = record.request_id
    params = [
        charge_micros,
        charge_micros,
        team_id,
        hold_micros,
        charge_micros,
        request_id,
        timezone.now(),
        hold_micros,
        hold_micros,
        f"hold:{request_id}",
        charge_micros,
        hold_micros,
        f"capture:{request_id}",
        release,
        release,
        hold_micros,
        f"release:{request_id}",
        *_usage(record, charge_micros),
    ]
    return _settled(team_id, record, _run(_settle_unheld_sql(), params))


def _usage(record: UsageRecord, charge_micros: int) -> list[Any]:
    record.credits_micros = charge_micros
    record.total_tokens = record.prompt_tokens + record.completion_tokens
    return [_prepared(record, f) for f in _usage_fields()]


def _settled(
    team_id: int, record: UsageRecord, row: tuple[Any, ...] | None
) -> UsageRecord | None:
    if row is None:
        return None
    _available_note(team_id, row)
    record.pk = int(row[0])
    record._state.adding = False
    return record
