"""The one-statement hold and settlement (billing/statements.py) write what the
services' ORM path writes, row for row, and hand every other case back to it.

Each test runs the same movements through both paths, on two teams of equal
balance, and compares the rows. The end-to-end money tests (test_money_path.py,
concurrency included) go through the statements too: their servers run on
PostgreSQL.
"""

import threading

import pytest
from django.db import connections
from django.utils import timezone

from billing import statements
from billing.models import CreditAccount, LedgerEntry, UsageRecord
from billing.services import InsufficientCredits, call_settle, credits_hold
from billing.tests.ledger import assert_ledger_consistent
from billing.tests.settlements import settlement
from gateway_project.money import MICROS
from tenants.services import team_create

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _ledger_stays_consistent():
    yield
    assert_ledger_consistent()


@pytest.fixture
def twin(organization, model_group, team):
    """A second team with the same 100 credits as ``team``."""
    from billing.services import credit_account_open, credits_allocate

    other = team_create(
        organization=organization, team_id="team_twin", model_groups=[model_group]
    )
    credit_account_open(team=other)
    credits_allocate(team=other, amount_micros=100 * MICROS, idempotency_key="t:twin")
    return other


@pytest.fixture
def orm_only(monkeypatch):
    """The services with the statements switched off (as on SQLite)."""

    def switch(on: bool) -> None:
        monkeypatch.setattr(statements, "available", lambda: on)

    return switch


def _entries(team):
    return [
        (
            e.entry_type,
            e.amount_micros,
            e.held_delta_micros,
            e.balance_before_micros,
            e.balance_after_micros,
            e.idempotency_key.split(":")[0],
            e.reason,
            e.actor_label,
        )
        for e in LedgerEntry.objects.filter(account__team=team).order_by("id")
    ]


def _account(team):
    account = CreditAccount.objects.get(team=team)
    return (
        account.balance_micros,
        account.held_micros,
        account.used_total_micros,
        account.allocated_total_micros,
    )


def _record_row(record):
    return {
        field.attname: getattr(record, field.attname)
        for field in UsageRecord._meta.concrete_fields
        if field.attname not in ("id", "request_id", "team_id", "virtual_key_id")
    }


@pytest.mark.parametrize(
    "hold, charge",
    [
        (3 * MICROS, 2 * MICROS),  # capture and release
        (3 * MICROS, 3 * MICROS),  # capture of the whole hold, no release
        (3 * MICROS, 0),  # a failed call: release only
    ],
)
def test_hold_and_settle_write_what_the_services_write(
    team, twin, orm_only, hold, charge
):
    # Given two teams with the same balance, one settled by the statements
    # and one by the ORM path
    results = {}
    at = timezone.now()
    for subject, statements_on in ((team, True), (twin, False)):
        orm_only(statements_on)
        assert statements.available() is statements_on
        # When a call holds, then settles
        held = credits_hold(
            team=subject, amount_micros=hold, request_id=f"r-{subject.pk}"
        )
        record = call_settle(
            settlement(
                subject,
                f"r-{subject.pk}",
                charge_micros=charge,
                held_micros=held,
                created_at=at,
            )
        )
        results[subject.pk] = (
            held,
            _entries(subject),
            _account(subject),
            _record_row(UsageRecord.objects.get(pk=record.pk)),
            record.credits_micros,
        )

    # Then both wrote the same rows, balances and record
    assert results[team.pk] == results[twin.pk]
    held, entries, account, _, credited = results[team.pk]
    assert held == hold
    assert credited == charge
    assert account[:3] == (100 * MICROS - charge, 0, charge)
    assert [e[0] for e in entries] == (
        ["allocation", "hold"]
        + (["capture"] if charge else [])
        + (["release"] if charge < hold else [])
    )


def test_a_hold_the_balance_does_not_cover_is_refused_with_nothing_written(team):
    before = (_entries(team), _account(team))

    assert not statements.credits_hold_statement(
        team_id=team.pk, amount_micros=101 * MICROS, request_id="r-big", job_id=None
    )
    with pytest.raises(InsufficientCredits):
        credits_hold(team=team, amount_micros=101 * MICROS, request_id="r-big")

    assert (_entries(team), _account(team)) == before


def test_a_repeated_request_id_holds_once(team):
    assert credits_hold(team=team, amount_micros=2 * MICROS, request_id="r-1") == (
        2 * MICROS
    )
    after_first = (_entries(team), _account(team))

    # The statement is refused by the unique idempotency key; the service
    # answers with the hold already there.
    assert not statements.credits_hold_statement(
        team_id=team.pk, amount_micros=2 * MICROS, request_id="r-1", job_id=None
    )
    assert credits_hold(team=team, amount_micros=2 * MICROS, request_id="r-1") == (
        2 * MICROS
    )

    assert (_entries(team), _account(team)) == after_first


def test_a_second_settlement_changes_nothing(team):
    held = credits_hold(team=team, amount_micros=2 * MICROS, request_id="r-1")
    first = call_settle(settlement(team, "r-1", charge_micros=MICROS, held_micros=held))
    after_first = (_entries(team), _account(team), UsageRecord.objects.count())

    again = call_settle(
        settlement(
            team, "r-1", charge_micros=2 * MICROS, held_micros=held, cost_micros=99
        )
    )

    assert again.pk == first.pk
    assert again.credits_micros == MICROS
    assert (_entries(team), _account(team), UsageRecord.objects.count()) == after_first


def test_a_charge_above_the_hold_goes_to_the_service(team, twin, orm_only):
    # A provider that overran its estimate: the service takes the rest from
    # the balance; the statement declines without writing.
    held = credits_hold(team=team, amount_micros=MICROS, request_id="r-over")
    over = settlement(team, "r-over", charge_micros=3 * MICROS, held_micros=held)
    assert (
        statements.call_settle_statement(
            team_id=team.pk,
            held_micros=held,
            charge_micros=3 * MICROS,
            record=over.record(credits_micros=3 * MICROS),
        )
        is None
    )
    assert UsageRecord.objects.count() == 0

    record = call_settle(over)

    assert record.credits_micros == 3 * MICROS
    assert _account(team)[:3] == (97 * MICROS, 0, 3 * MICROS)
    assert [e[:3] for e in _entries(team)][-1] == ("capture", -2 * MICROS, -MICROS)


def test_concurrent_holds_never_overspend(team):
    # Given 100 credits and 30 threads each holding 4 (25 fit)
    barrier = threading.Barrier(30)
    held: list[bool] = []

    def hold(n: int) -> None:
        try:
            barrier.wait()
            held.append(
                statements.credits_hold_statement(
                    team_id=team.pk,
                    amount_micros=4 * MICROS,
                    request_id=f"r-{n}",
                    job_id=None,
                )
            )
        finally:
            connections.close_all()

    threads = [threading.Thread(target=hold, args=(n,)) for n in range(30)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then exactly 25 held, and the balance is 0 with 100 held
    assert held.count(True) == 25
    assert _account(team)[:2] == (0, 100 * MICROS)
    assert LedgerEntry.objects.filter(entry_type="hold").count() == 25


def test_the_hold_is_prepared_on_its_connection_at_its_second_use(team):
    # Given a connection that has prepared nothing (psycopg notices the
    # DEALLOCATE and forgets its own list too), where the hold ran once
    connection = connections["default"]
    connection.ensure_connection()
    connection.connection.execute("DEALLOCATE ALL")
    credits_hold(team=team, amount_micros=MICROS, request_id="r-first")
    assert _prepared_holds() == 0

    # When it runs again
    credits_hold(team=team, amount_micros=MICROS, request_id="r-second")

    # Then PostgreSQL keeps it prepared: no more parsing and planning per call
    assert _prepared_holds() == 1
    assert LedgerEntry.objects.filter(entry_type="hold").count() == 2


def _prepared_holds() -> int:
    with connections["default"].cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_prepared_statements "
            "WHERE statement LIKE %s AND statement LIKE %s",
            [f"%UPDATE {CreditAccount._meta.db_table}%", "%'hold'%"],
        )
        (count,) = cursor.fetchone()
    return int(count)


@pytest.mark.parametrize("charge", [2 * MICROS, 3 * MICROS])
def test_a_settlement_after_reconciliation_released_its_hold_takes_no_held_credits(
    team, charge
):
    # Given two calls holding 3 credits each, the first one's hold released
    # by reconciliation (it outlived GATEWAY_STALE_HOLD_SECONDS)
    from billing.reconciliation import hold_settle

    first = credits_hold(team=team, amount_micros=3 * MICROS, request_id="r-late")
    credits_hold(team=team, amount_micros=3 * MICROS, request_id="r-live")
    hold_settle(hold=LedgerEntry.objects.get(idempotency_key="hold:r-late"))
    assert _account(team)[:2] == (97 * MICROS, 3 * MICROS)

    # When the late call settles with what it was told it held (a full
    # capture writes no release row, which no unique key can refuse)
    late = settlement(team, "r-late", charge_micros=charge, held_micros=first)
    assert (
        statements.call_settle_statement(
            team_id=team.pk,
            held_micros=first,
            charge_micros=charge,
            record=late.record(credits_micros=charge),
        )
        is None
    )
    assert UsageRecord.objects.count() == 0
    record = call_settle(late)

    # Then its charge comes from the balance, and the live call's hold is
    # still held in full
    assert record.credits_micros == charge
    assert _account(team)[:2] == (97 * MICROS - charge, 3 * MICROS)
    capture = LedgerEntry.objects.get(idempotency_key="capture:r-late")
    assert (capture.amount_micros, capture.held_delta_micros) == (-charge, 0)
    assert "after its hold was released" in capture.reason


def test_a_settlement_whose_hold_was_never_written_takes_no_held_credits(team):
    # Given a live call holding 3 credits, and a settlement naming a hold of
    # 3 credits the ledger never had (a journal line from another database)
    credits_hold(team=team, amount_micros=3 * MICROS, request_id="r-live")
    stray = settlement(team, "r-stray", charge_micros=MICROS, held_micros=3 * MICROS)

    # When it is applied
    assert (
        statements.call_settle_statement(
            team_id=team.pk,
            held_micros=3 * MICROS,
            charge_micros=MICROS,
            record=stray.record(credits_micros=MICROS),
        )
        is None
    )
    assert UsageRecord.objects.count() == 0
    call_settle(stray)

    # Then it is charged from the balance, and the live hold is untouched
    assert _account(team)[:2] == (96 * MICROS, 3 * MICROS)
    assert not LedgerEntry.objects.filter(idempotency_key="release:r-stray").exists()
