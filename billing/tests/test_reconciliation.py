"""Reconciliation: drift repaired from the ledger, stale holds settled exactly
once — by the services, by hand, and by a real Celery worker."""

import io
import logging
import re
import time
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from accounts.models import AuditLogEntry
from billing.models import (
    CreditAccount,
    LedgerEntry,
    LedgerEntryType,
    UsageRecord,
    UsageStatus,
)
from billing.reconciliation import credit_account_reconcile, holds_settle_stale
from billing.services import credits_hold, job_create, team_open, usage_record_create
from billing.tasks import credit_accounts_reconcile_task, holds_settle_stale_task
from billing.tests.ledger import assert_ledger_consistent
from gateway_project.celery import app as celery_app
from gateway_project.money import MICROS
from tenants.models import BudgetMode
from tenants.services import organization_create

LATER = timedelta(seconds=1)


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the worker did not do it in time"
        time.sleep(0.1)


def _record(team, request_id: str, credits_micros: int) -> UsageRecord:
    return usage_record_create(
        request_id=request_id,
        organization=team.organization,
        team=team,
        endpoint="chat",
        requested_model="chat",
        status=UsageStatus.SUCCESS,
        created_at=timezone.now(),
        prompt_tokens=7,
        completion_tokens=5,
        credits_micros=credits_micros,
    )


@pytest.mark.django_db
def test_drift_behind_the_services_back_is_repaired_and_audited(team):
    account = CreditAccount.objects.get(team=team)
    CreditAccount.objects.filter(pk=account.pk).update(balance_micros=5, held_micros=3)

    result = credit_account_reconcile(account_id=account.pk)
    again = credit_account_reconcile(account_id=account.pk)

    assert result["drift"] == {
        "balance_micros": [5, 100 * MICROS],
        "held_micros": [3, 0],
    }
    assert again["drift"] == {}
    assert_ledger_consistent()
    entry = AuditLogEntry.objects.get(action="credits.drift_repaired")
    assert (entry.actor_label, entry.resource_id) == ("reconciliation", "team_alice")


@pytest.mark.django_db
def test_a_hold_with_a_usage_record_but_no_capture_is_captured_once(team):
    credits_hold(team=team, amount_micros=5 * MICROS, request_id="req_lost_capture")
    _record(team, "req_lost_capture", 2 * MICROS)  # the capture never happened

    first = holds_settle_stale(older_than=timedelta(0), now=timezone.now() + LATER)
    second = holds_settle_stale(older_than=timedelta(0), now=timezone.now() + LATER)

    assert (first, second) == (
        {"captured": 1, "released": 0, "failed": 0, "journaled": 0, "replayed": 0},
        {"captured": 0, "released": 0, "failed": 0, "journaled": 0, "replayed": 0},
    )
    kinds = list(
        LedgerEntry.objects.filter(request_id="req_lost_capture")
        .order_by("id")
        .values_list("entry_type", "amount_micros", "held_delta_micros")
    )
    assert kinds == [
        ("hold", -5 * MICROS, 5 * MICROS),
        ("capture", 0, -2 * MICROS),
        ("release", 3 * MICROS, -3 * MICROS),
    ]
    assert CreditAccount.objects.get(team=team).balance_micros == 98 * MICROS
    assert_ledger_consistent()


@pytest.mark.django_db
def test_a_hold_without_a_record_is_released_and_fresh_or_job_holds_wait(team):
    credits_hold(team=team, amount_micros=5 * MICROS, request_id="req_orphan")
    team.budget_mode = BudgetMode.JOB_BASED
    team.save()
    job_create(team=team, job_type="long")

    young = holds_settle_stale(older_than=timedelta(hours=1), now=timezone.now())
    settled = holds_settle_stale(older_than=timedelta(0), now=timezone.now() + LATER)

    assert young == {
        "captured": 0,
        "released": 0,
        "failed": 0,
        "journaled": 0,
        "replayed": 0,
    }
    # The job's hold is left to the job (its completion or its expiry).
    assert settled == {
        "captured": 0,
        "released": 1,
        "failed": 0,
        "journaled": 0,
        "replayed": 0,
    }
    assert CreditAccount.objects.get(team=team).held_micros == MICROS
    assert AuditLogEntry.objects.filter(action="credits.hold_released").count() == 1


@pytest.mark.django_db
def test_the_manual_command_reconciles_and_settles(team):
    credits_hold(team=team, amount_micros=MICROS, request_id="req_cmd")
    CreditAccount.objects.filter(team=team).update(balance_micros=1)
    time.sleep(0.01)
    out = io.StringIO()

    call_command("reconcile_credits", hold_age=0, stdout=out)

    assert out.getvalue().splitlines()[-1] == (
        "1 accounts checked, 1 repaired; "
        "journal: 0 settlements applied, 0 holds left to it; stale holds: 0 captured, 1 released; "
        "expired jobs: 0 captured, 0 released, 0 with nothing held"
    )
    assert_ledger_consistent()


def _succeeded(log, task: str) -> int:
    """How many runs of ``task`` the worker's log shows as succeeded."""
    pattern = rf"Task {re.escape(task)}\[[^\]]+\] succeeded in"
    return len(re.findall(pattern, log.read_text()))


def test_a_real_worker_reconciles_and_settles_idempotently(celery_worker_process, team):
    account = CreditAccount.objects.get(team=team)
    credits_hold(team=team, amount_micros=MICROS, request_id="req_worker")
    CreditAccount.objects.filter(pk=account.pk).update(balance_micros=42)

    for _ in range(2):  # run twice: the same result
        credit_accounts_reconcile_task.delay()
        holds_settle_stale_task.delay(older_than_seconds=0)

    _wait(
        lambda: LedgerEntry.objects.filter(
            request_id="req_worker", entry_type="release"
        ).exists()
    )
    _wait(
        lambda: AuditLogEntry.objects.filter(action="credits.drift_repaired").exists()
    )
    # Both rounds are over once the worker has logged every task of them
    # (the first queues one reconciliation per account).
    rounds = {
        "billing.credit_accounts_reconcile": 2,
        "billing.credit_account_reconcile": 2 * CreditAccount.objects.count(),
        "billing.holds_settle_stale": 2,
    }
    _wait(
        lambda: all(
            _succeeded(celery_worker_process, task) == runs
            for task, runs in rounds.items()
        )
    )
    assert AuditLogEntry.objects.filter(action="credits.drift_repaired").count() == 1
    assert LedgerEntry.objects.filter(request_id="req_worker").count() == 2
    assert CreditAccount.objects.get(pk=account.pk).balance_micros == 100 * MICROS
    assert_ledger_consistent()
    assert "billing.holds_settle_stale" in celery_worker_process.read_text()


# --- one bad row never stops the others ---------------------------------------


def _bob(credits_micros: int = 5 * MICROS):
    """A second tenant with its own account."""
    team, _, _ = team_open(
        organization=organization_create(organization_id="org_bob", name="Bob"),
        team_id="team_bob",
        credits_allocated_micros=credits_micros,
    )
    return team


def _rogue_release(team, amount_micros: int) -> None:
    """Corrupt a team's ledger: a release that no hold preceded, written
    behind the services' back (the account's columns follow the ledger as far
    as its constraints allow: never below zero held)."""
    account = CreditAccount.objects.get(team=team)
    LedgerEntry.objects.create(
        account=account,
        entry_type=LedgerEntryType.RELEASE,
        amount_micros=amount_micros,
        held_delta_micros=-amount_micros,
        balance_before_micros=account.balance_micros,
        balance_after_micros=account.balance_micros + amount_micros,
        idempotency_key=f"release:rogue-{account.pk}",
        request_id=f"rogue-{account.pk}",
    )
    CreditAccount.objects.filter(pk=account.pk).update(
        balance_micros=account.balance_micros + amount_micros,
        held_micros=max(account.held_micros - amount_micros, 0),
    )


def _messages(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


@pytest.mark.django_db
def test_a_hold_that_cannot_be_settled_is_logged_and_the_others_are_settled(
    team, caplog
):
    # Given a stale hold on a corrupt ledger (releasing it would take the
    # held credits below zero) and a stale hold of another tenant.
    credits_hold(team=team, amount_micros=5 * MICROS, request_id="req_bad")
    _rogue_release(team, 5 * MICROS)
    bad = LedgerEntry.objects.get(request_id="req_bad")
    bob = _bob()
    credits_hold(team=bob, amount_micros=2 * MICROS, request_id="req_good")
    before = CreditAccount.objects.values_list("balance_micros", "held_micros").get(
        team=team
    )

    with caplog.at_level(logging.ERROR, logger="billing.reconciliation"):
        first = holds_settle_stale(older_than=timedelta(0), now=timezone.now() + LATER)
        second = holds_settle_stale(older_than=timedelta(0), now=timezone.now() + LATER)

    # Then the bad hold is logged and counted on each run, nothing written
    # for it; the other tenant's hold is released once.
    assert (first, second) == (
        {"captured": 0, "released": 1, "failed": 1, "journaled": 0, "replayed": 0},
        {"captured": 0, "released": 0, "failed": 1, "journaled": 0, "replayed": 0},
    )
    message = (
        f"stale hold {bad.pk} (account {bad.account_id}, request req_bad) "
        "could not be settled"
    )
    assert _messages(caplog, "billing.reconciliation") == [message, message]
    assert "billing_account_held_nonnegative" in caplog.text
    assert LedgerEntry.objects.filter(request_id="req_bad").count() == 1
    assert (
        CreditAccount.objects.values_list("balance_micros", "held_micros").get(
            team=team
        )
        == before
    )
    assert list(
        LedgerEntry.objects.filter(request_id="req_good")
        .order_by("id")
        .values_list("entry_type", "amount_micros", "held_delta_micros")
    ) == [("hold", -2 * MICROS, 2 * MICROS), ("release", 2 * MICROS, -2 * MICROS)]
    assert CreditAccount.objects.get(team=bob).balance_micros == 5 * MICROS
    assert AuditLogEntry.objects.filter(action="credits.hold_released").count() == 1


@pytest.mark.django_db
def test_a_stale_hold_reads_only_its_own_teams_record_and_settlements(team):
    # Given a stale hold whose request id another tenant's rows also carry: a
    # usage record and a capture (written behind the services' back).
    credits_hold(team=team, amount_micros=5 * MICROS, request_id="req_shared")
    bob = _bob()
    _record(bob, "req_shared", 2 * MICROS)
    bob_account = CreditAccount.objects.get(team=bob)
    LedgerEntry.objects.create(
        account=bob_account,
        entry_type=LedgerEntryType.CAPTURE,
        amount_micros=-MICROS,
        balance_before_micros=5 * MICROS,
        balance_after_micros=4 * MICROS,
        idempotency_key="capture:bob:req_shared",
        request_id="req_shared",
    )
    CreditAccount.objects.filter(pk=bob_account.pk).update(balance_micros=4 * MICROS)

    result = holds_settle_stale(older_than=timedelta(0), now=timezone.now() + LATER)

    # Then it is settled, as a call without a record: all released, nothing
    # charged for the other tenant's record.
    assert result == {
        "captured": 0,
        "released": 1,
        "failed": 0,
        "journaled": 0,
        "replayed": 0,
    }
    assert list(
        LedgerEntry.objects.filter(account__team=team, request_id="req_shared")
        .order_by("id")
        .values_list("entry_type", "amount_micros", "held_delta_micros")
    ) == [("hold", -5 * MICROS, 5 * MICROS), ("release", 5 * MICROS, -5 * MICROS)]
    assert CreditAccount.objects.get(team=team).balance_micros == 100 * MICROS
    assert CreditAccount.objects.get(team=bob).balance_micros == 4 * MICROS
    assert_ledger_consistent()


@pytest.mark.django_db
def test_the_manual_command_goes_on_after_an_account_fails_and_then_fails(team, caplog):
    # Given an account whose ledger holds less than nothing (it cannot be made
    # equal to it) and another tenant's account that drifted.
    _rogue_release(team, MICROS)
    bad = CreditAccount.objects.get(team=team)
    bob = _bob()
    credits_hold(team=bob, amount_micros=MICROS, request_id="req_cmd")
    drifted = CreditAccount.objects.get(team=bob)
    CreditAccount.objects.filter(pk=drifted.pk).update(balance_micros=7)
    out = io.StringIO()

    with (
        caplog.at_level(logging.ERROR, logger="billing.management.commands"),
        pytest.raises(CommandError) as failure,
    ):
        call_command("reconcile_credits", hold_age=0, stdout=out)

    assert str(failure.value) == (
        "failed (see the log): 1 account(s), 0 stale hold(s), 0 job(s)"
    )
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        f"credit account {bad.pk} could not be reconciled"
    ]
    assert out.getvalue().splitlines() == [
        f"account {drifted.pk}: repaired {{'balance_micros': [7, {4 * MICROS}]}}",
        "2 accounts checked, 1 repaired; "
        "journal: 0 settlements applied, 0 holds left to it; stale holds: 0 captured, 1 released; "
        "expired jobs: 0 captured, 0 released, 0 with nothing held",
    ]
    assert CreditAccount.objects.get(pk=drifted.pk).balance_micros == 5 * MICROS
    assert CreditAccount.objects.get(pk=bad.pk).balance_micros == 101 * MICROS


@pytest.mark.django_db(transaction=True)
def test_the_reconcile_fan_out_goes_on_after_an_account_fails(
    team, caplog, monkeypatch
):
    # Given eager tasks (as in embedded mode), a corrupt account and another
    # tenant's drifted account.
    monkeypatch.setitem(celery_app.conf, "task_always_eager", True)
    _rogue_release(team, MICROS)
    bad = CreditAccount.objects.get(team=team)
    bob = _bob()
    CreditAccount.objects.filter(team=bob).update(balance_micros=7)

    with caplog.at_level(logging.ERROR, logger="billing.tasks"):
        result = credit_accounts_reconcile_task()

    assert result == {"accounts": 2, "failed": 1}
    assert _messages(caplog, "billing.tasks") == [
        f"reconciliation of credit account {bad.pk} failed"
    ]
    assert CreditAccount.objects.get(team=bob).balance_micros == 5 * MICROS
    assert list(
        AuditLogEntry.objects.filter(action="credits.drift_repaired").values_list(
            "resource_id", flat=True
        )
    ) == ["team_bob"]
