"""Reconciliation: drift repaired from the ledger, stale holds settled exactly
once — by the services, by hand, and by a real Celery worker."""

import io
import time
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from accounts.models import AuditLogEntry
from billing.models import CreditAccount, LedgerEntry, UsageRecord, UsageStatus
from billing.reconciliation import credit_account_reconcile, holds_settle_stale
from billing.services import credits_hold, job_create, usage_record_create
from billing.tasks import credit_accounts_reconcile_task, holds_settle_stale_task
from billing.tests.ledger import assert_ledger_consistent
from gateway_project.money import MICROS
from tenants.models import BudgetMode

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
        {"captured": 1, "released": 0},
        {"captured": 0, "released": 0},
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

    assert young == {"captured": 0, "released": 0}
    assert settled == {
        "captured": 0,
        "released": 1,
    }  # the job's hold is left to the job
    assert CreditAccount.objects.get(team=team).held_micros == MICROS
    assert AuditLogEntry.objects.filter(action="credits.hold_released").count() == 1


@pytest.mark.django_db
def test_the_manual_command_reconciles_and_settles(team):
    credits_hold(team=team, amount_micros=MICROS, request_id="req_cmd")
    CreditAccount.objects.filter(team=team).update(balance_micros=1)
    time.sleep(0.01)
    out = io.StringIO()

    call_command("reconcile_credits", hold_age=0, stdout=out)

    assert (
        "1 accounts checked, 1 repaired; stale holds: 0 captured, 1 released"
        in out.getvalue()
    )
    assert_ledger_consistent()


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
    time.sleep(1)  # let the second round finish
    assert AuditLogEntry.objects.filter(action="credits.drift_repaired").count() == 1
    assert LedgerEntry.objects.filter(request_id="req_worker").count() == 2
    assert CreditAccount.objects.get(pk=account.pk).balance_micros == 100 * MICROS
    assert_ledger_consistent()
    assert "billing.holds_settle_stale" in celery_worker_process.read_text()
