"""A hold written with its settlement (GATEWAY_DEFERRED_HOLD_MARGIN): when the
team's credits, as the process last saw them, cover a call's hold many times
over, the hold, the capture, the release and the usage record are one
statement after the provider answers, under the hold's own guard. Anything
else holds first, as before (test_money_path.py)."""

import threading
import time

import pytest
from django.db import connection, transaction

from billing import statements
from billing.models import CreditAccount, LedgerEntry, UsageRecord
from billing.services import credits_hold
from billing.tests.ledger import assert_ledger_consistent
from billing.tests.test_money_path import (
    CALL,
    _call,
    _entries,
    _open,
    assert_charged_at_most,
    calls_at_once,
    post,
)
from gateway_project.money import MICROS
from routing import limits
from tenants.models import BudgetMode, VirtualKey

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _ledger_stays_consistent():
    yield
    assert_ledger_consistent()


def _wait_until_blocked_by_us(timeout: float = 10.0) -> None:
    """Until another connection waits for a lock this connection holds
    (pg_locks is live, unlike pg_stat_activity within a transaction)."""
    deadline = time.monotonic() + timeout
    while True:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE NOT granted"
                " AND pg_backend_pid() = ANY(pg_blocking_pids(pid)))"
            )
            if cursor.fetchone()[0]:
                return
        assert time.monotonic() < deadline, "nothing waited for our lock"
        time.sleep(0.01)


def _warm(client, key) -> None:
    """A first call, held first: it tells this process what the team has."""
    assert _call(client, key).status_code == 200


def test_a_call_far_within_the_credits_is_one_statement_with_the_same_ledger(
    client, fake_upstream, django_assert_num_queries
):
    team, key = _open(fake_upstream)
    _warm(client, key)

    with django_assert_num_queries(1):
        response = _call(client, key)

    assert response.status_code == 200, response.content
    (hold_type, hold_amount, held), capture, release = _entries(
        team, response["x-request-id"]
    )
    assert (hold_type, hold_amount) == ("hold", -held)
    assert held >= 4096 * 2 * 100  # the same hold as before the provider
    assert capture == ("capture", 0, -1_700)
    assert release == ("release", held - 1_700, -(held - 1_700))
    account = CreditAccount.objects.get(team=team)
    assert (account.balance_micros, account.held_micros, account.used_total_micros) == (
        100 * MICROS - 2 * 1_700,
        0,
        2 * 1_700,
    )
    record = UsageRecord.objects.get(request_id=response["x-request-id"])
    assert (record.credits_micros, record.cost_micros, record.total_tokens) == (
        1_700,
        17,
        record.prompt_tokens + record.completion_tokens,
    )


def test_without_a_margin_every_call_holds_first(
    client, fake_upstream, django_assert_num_queries, settings
):
    settings.GATEWAY_DEFERRED_HOLD_MARGIN = 0
    _, key = _open(fake_upstream)
    _warm(client, key)

    with django_assert_num_queries(2):  # the hold, then the settlement
        assert _call(client, key).status_code == 200


def test_credits_below_the_margin_are_held_before_the_provider(
    client, fake_upstream, django_assert_num_queries, settings
):
    # 100 credits cover a hold of ~0.82 credits about 120 times.
    settings.GATEWAY_DEFERRED_HOLD_MARGIN = 200
    _, key = _open(fake_upstream)
    _warm(client, key)

    with django_assert_num_queries(2):
        assert _call(client, key).status_code == 200


def _spend_elsewhere(team) -> None:
    """Hold all but 0.001 of the team's credits the way another process
    would: out of this process's sight (the ORM path notes nothing)."""
    available = CreditAccount.objects.get(team=team).balance_micros
    with pytest.MonkeyPatch.context() as elsewhere:
        elsewhere.setattr(statements, "available", lambda: False)
        credits_hold(team=team, amount_micros=available - 1_000, request_id="other")


def test_credits_spent_meanwhile_refuse_the_call_at_settlement_with_nothing_written(
    client, fake_upstream
):
    """Another process spent nearly everything after this one last looked:
    the provider has answered, but the hold's guard refuses the settlement,
    so the caller gets the 402 and no ledger row, usage record or rate-limit
    slot remains."""
    team, key = _open(fake_upstream)
    VirtualKey.objects.filter(team=team).update(max_parallel_requests=5)
    _warm(client, key)
    _spend_elsewhere(team)
    entries = list(LedgerEntry.objects.values_list("id", flat=True))

    response = _call(client, key)

    assert response.status_code == 402, response.content
    assert response.json()["error"]["code"] == "insufficient_credits"
    assert fake_upstream.calls("money") == 2  # answered, and not charged
    assert list(LedgerEntry.objects.values_list("id", flat=True)) == entries
    assert not UsageRecord.objects.filter(request_id=response["x-request-id"]).exists()
    key_pk = VirtualKey.objects.get(team=team).pk
    assert limits._backend().client.get(f"rl:key:{key_pk}:par") == b"0"
    # This process knows better now: the next call is refused before the
    # provider is asked.
    assert _call(client, key).status_code == 402
    assert fake_upstream.calls("money") == 2


def test_a_failed_call_with_its_hold_deferred_writes_no_ledger_rows(
    client, fake_upstream
):
    team, key = _open(fake_upstream)
    _warm(client, key)
    balance = CreditAccount.objects.get(team=team).balance_micros
    fake_upstream.program("money", status=500)

    response = _call(client, key)

    assert response.status_code == 502
    assert _entries(team, response["x-request-id"]) == []
    record = UsageRecord.objects.get(request_id=response["x-request-id"])
    assert (record.status, record.credits_micros) == ("error", 0)
    assert CreditAccount.objects.get(team=team).balance_micros == balance


def test_a_streams_hold_is_written_while_the_provider_opens_it(client, fake_upstream):
    """The hold waits on the account's row lock (another transaction holds
    it): the provider is asked meanwhile, and no chunk leaves before the hold
    is written."""
    team, key = _open(fake_upstream)
    _warm(client, key)
    answered: list = []
    caller = threading.Thread(
        target=lambda: answered.append(_stream(client, key)), daemon=True
    )

    with transaction.atomic():
        CreditAccount.objects.select_for_update().get(team=team)
        caller.start()
        deadline = time.monotonic() + 10
        while fake_upstream.calls("money") < 2:
            assert time.monotonic() < deadline, "the provider was not asked"
            time.sleep(0.01)
        # The caller now waits on our row lock: until we let go, it cannot end.
        _wait_until_blocked_by_us()
        assert caller.is_alive() and not answered  # waiting for the hold

    caller.join(10)
    (response, content) = answered[0]
    assert response.status_code == 200
    assert b"[DONE]" in content
    hold, capture, release = _entries(team, response["x-request-id"])
    assert (hold[0], capture[0], release[0]) == ("hold", "capture", "release")


def test_a_streams_hold_refused_closes_it_before_any_chunk(client, fake_upstream):
    team, key = _open(fake_upstream)
    VirtualKey.objects.filter(team=team).update(max_parallel_requests=5)
    _warm(client, key)
    _spend_elsewhere(team)
    entries = list(LedgerEntry.objects.values_list("id", flat=True))

    response, content = _stream(client, key)

    assert response.status_code == 402, content
    assert b"insufficient_credits" in content and b"data:" not in content
    assert list(LedgerEntry.objects.values_list("id", flat=True)) == entries
    assert not UsageRecord.objects.filter(request_id=response["x-request-id"]).exists()
    key_pk = VirtualKey.objects.get(team=team).pk
    assert limits._backend().client.get(f"rl:key:{key_pk}:par") == b"0"


def _stream(client, key):
    response = _call(client, key, {**CALL, "stream": True})
    return response, b"".join(response)


def test_a_job_based_team_with_few_credits_holds_first(
    client, fake_upstream, django_assert_num_queries
):
    _, key = _open(fake_upstream, mode=BudgetMode.JOB_BASED, credits_micros=50 * MICROS)
    _warm(client, key)

    with django_assert_num_queries(2):  # 1 credit a call, 49 left: under 100x
        assert _call(client, key).status_code == 200


@pytest.fixture
def server_env() -> dict[str, str]:
    # Every call whose hold the credits cover at all may defer it.
    return {"GATEWAY_DEFERRED_HOLD_MARGIN": "1"}


def test_deferred_holds_on_two_processes_never_overspend(two_servers, fake_upstream):
    """60 calls over two processes against credits that cover exactly 10,
    with every hold free to wait for its settlement once a process has seen
    the balance: at most 10 are charged, every other one is a 402, and each
    success has its one usage record and capture."""
    team, key = _open(
        fake_upstream, mode=BudgetMode.JOB_BASED, credits_micros=12 * MICROS
    )
    warm = []
    for server in two_servers:  # each process sees 11 credits, then 10
        response = post(server, key)
        assert response.status_code == 200, response.text
        warm.append(response.headers["x-request-id"])
    fake_upstream.program("money", latency=0.2)  # keep calls in flight together

    results = calls_at_once(two_servers, key, 60)

    successes = assert_charged_at_most(team, results, 10, settled_before=warm)
    # More calls reached the provider than were charged: the deferred ones
    # refused at their settlement.
    assert fake_upstream.calls("money") > len(successes) + 2
