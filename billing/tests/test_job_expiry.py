"""Job expiry: a job left open past GATEWAY_JOB_TTL_SECONDS is closed as
expired, and a job_based team's held credit is captured when the job recorded
a successful call and released otherwise — once, whoever closes it first."""

import io
import logging
import threading
from datetime import timedelta

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings
from django.core.management import call_command
from django.db import connection, transaction
from django.utils import timezone

from accounts.models import AuditLogEntry
from billing import jobs
from billing.jobs import job_expire, jobs_expire
from billing.models import (
    CreditAccount,
    Job,
    JobStatus,
    LedgerEntry,
    LedgerEntryType,
    UsageRecord,
    UsageStatus,
)
from billing.services import job_complete, job_create, team_open, usage_record_create
from billing.tasks import jobs_expire_task
from billing.tests.ledger import assert_ledger_consistent
from gateway_project.money import MICROS
from tenants.models import BudgetMode
from tenants.services import organization_create, team_update, virtual_key_issue

DAY = timedelta(seconds=86400)
NOTHING = {"captured": 0, "released": 0, "nothing_held": 0, "failed": 0}


def _job(team, *, age=DAY + timedelta(seconds=1), calls=()):
    """A job of ``team`` opened ``age`` ago, with one usage record per status
    in ``calls``."""
    job = job_create(team=team, job_type="resume_analysis")
    for n, status in enumerate(calls):
        usage_record_create(
            request_id=f"req_{job.job_id}_{n}",
            organization=team.organization,
            team=team,
            job=job,
            endpoint="chat/completions",
            requested_model="chat",
            status=status,
            created_at=timezone.now(),
            prompt_tokens=7,
            completion_tokens=5,
        )
    Job.objects.filter(pk=job.pk).update(created_at=timezone.now() - age)
    return Job.objects.get(pk=job.pk)


def _money(job):
    """The ledger rows of a job's credit: (type, amount, held delta)."""
    return list(
        LedgerEntry.objects.filter(request_id=f"job:{job.job_id}")
        .order_by("id")
        .values_list("entry_type", "amount_micros", "held_delta_micros")
    )


def _account(team):
    account = CreditAccount.objects.get(team=team)
    return account.balance_micros, account.held_micros


def _rows():
    return (
        LedgerEntry.objects.count(),
        AuditLogEntry.objects.count(),
        list(Job.objects.order_by("pk").values_list("pk", "status", "completed_at")),
    )


def test_the_ttl_defaults_to_a_day_and_is_expired_every_five_minutes():
    assert settings.GATEWAY_JOB_TTL_SECONDS == 86400
    assert settings.CELERY_BEAT_SCHEDULE["expire-jobs"] == {
        "task": "billing.jobs_expire",
        "schedule": 300,
    }


@pytest.mark.django_db
def test_an_old_job_with_a_successful_call_expires_and_its_credit_is_captured(team):
    # Given a job_based team's job, open for over a day, with one good call.
    job = _job(team, calls=[UsageStatus.ERROR, UsageStatus.SUCCESS])
    now = timezone.now()

    # When job expiry runs.
    result = jobs_expire(now=now)

    # Then the job is expired and its held credit captured, audited.
    assert result == {**NOTHING, "captured": 1}
    job.refresh_from_db()
    assert (
        job.status,
        job.completed_at,
        job.error_message,
        job.credits_charged_micros,
    ) == (
        JobStatus.EXPIRED,
        now,
        "expired after 24 h without being closed",
        MICROS,
    )
    assert _money(job) == [
        (LedgerEntryType.HOLD, -MICROS, MICROS),
        (LedgerEntryType.CAPTURE, 0, -MICROS),
    ]
    assert _account(team) == (99 * MICROS, 0)
    audit = AuditLogEntry.objects.get(action="job.expired")
    assert (audit.actor, audit.actor_label, audit.resource_type) == (
        None,
        "job expiry",
        "job",
    )
    assert audit.resource_id == str(job.job_id)
    assert audit.details == {
        "team_id": "team_alice",
        "created_at": job.created_at.isoformat(),
        "successful_calls": 1,
        "credit": "captured",
        "charged_micros": MICROS,
    }
    assert_ledger_consistent()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "calls", [(), (UsageStatus.ERROR,)], ids=["no call", "only failed calls"]
)
def test_an_old_job_without_a_successful_call_expires_and_its_credit_is_released(
    team, calls
):
    job = _job(team, calls=calls)
    now = timezone.now()

    result = jobs_expire(now=now)

    assert result == {**NOTHING, "released": 1}
    job.refresh_from_db()
    assert (job.status, job.completed_at, job.credits_charged_micros) == (
        JobStatus.EXPIRED,
        now,
        0,
    )
    assert _money(job) == [
        (LedgerEntryType.HOLD, -MICROS, MICROS),
        (LedgerEntryType.RELEASE, MICROS, -MICROS),
    ]
    assert _account(team) == (100 * MICROS, 0)
    assert AuditLogEntry.objects.get(action="job.expired").details["credit"] == (
        "released"
    )
    assert_ledger_consistent()


@pytest.mark.django_db
def test_a_job_not_older_than_the_ttl_is_left_open(team):
    # Given jobs exactly a day old and younger (the TTL is "more than").
    now = timezone.now()
    job = _job(team, age=timedelta(0))
    Job.objects.filter(pk=job.pk).update(created_at=now - DAY)
    young = _job(team, age=timedelta(hours=23), calls=[UsageStatus.SUCCESS])
    before = _rows()

    result = jobs_expire(now=now)

    assert result == NOTHING
    assert _rows() == before
    assert dict(Job.objects.values_list("pk", "status")) == {
        job.pk: JobStatus.PENDING,
        young.pk: JobStatus.IN_PROGRESS,
    }
    assert _account(team) == (98 * MICROS, 2 * MICROS)
    assert_ledger_consistent()


@pytest.mark.django_db
def test_completed_and_failed_jobs_are_left_alone(team):
    completed = job_complete(job=_job(team), status=JobStatus.COMPLETED)
    failed = job_complete(
        job=_job(team), status=JobStatus.FAILED, error_message="bad input"
    )
    before = _rows()

    result = jobs_expire(now=timezone.now())

    assert result == NOTHING
    assert _rows() == before
    completed.refresh_from_db()
    failed.refresh_from_db()
    assert (completed.status, completed.error_message) == (JobStatus.COMPLETED, "")
    assert (failed.status, failed.error_message) == (JobStatus.FAILED, "bad input")
    assert _account(team) == (99 * MICROS, 0)
    assert_ledger_consistent()


@pytest.mark.django_db
def test_a_second_run_writes_nothing(team):
    _job(team, calls=[UsageStatus.SUCCESS])
    _job(team)
    now = timezone.now()
    first = jobs_expire(now=now)
    after_first = _rows()

    second = jobs_expire(now=now + timedelta(minutes=5))

    assert first == {**NOTHING, "captured": 1, "released": 1}
    assert second == NOTHING
    assert _rows() == after_first
    assert _account(team) == (99 * MICROS, 0)
    assert_ledger_consistent()


@pytest.mark.django_db
def test_a_job_closed_before_its_expiry_takes_its_lock_is_skipped(team):
    # Given a job listed as open, then completed before expiry locks it.
    job = _job(team)
    job_complete(job=job, status=JobStatus.COMPLETED)
    before = _rows()

    outcome = job_expire(job_id=job.pk, now=timezone.now())

    assert outcome is None
    assert _rows() == before
    assert _money(job) == [
        (LedgerEntryType.HOLD, -MICROS, MICROS),
        (LedgerEntryType.CAPTURE, 0, -MICROS),
    ]


@pytest.mark.django_db
def test_jobs_of_teams_not_job_based_just_close(team):
    # Given a consumption team's old job: it held no credit.
    team_update(team=team, changes={"budget_mode": BudgetMode.CONSUMPTION_USD})
    team.refresh_from_db()
    job = _job(team, calls=[UsageStatus.SUCCESS])
    ledger_rows = LedgerEntry.objects.count()

    result = jobs_expire(now=timezone.now())

    assert result == {**NOTHING, "nothing_held": 1}
    job.refresh_from_db()
    assert (job.status, job.credits_charged_micros) == (JobStatus.EXPIRED, 0)
    assert _money(job) == []
    assert LedgerEntry.objects.count() == ledger_rows
    assert _account(team) == (100 * MICROS, 0)
    assert_ledger_consistent()


@pytest.mark.django_db
def test_an_expired_job_cannot_be_completed(client, team):
    _, plaintext = virtual_key_issue(team=team)
    job = _job(team, calls=[UsageStatus.SUCCESS])
    jobs_expire(now=timezone.now())
    before = _rows()

    response = client.post(
        f"/api/jobs/{job.job_id}/complete",
        {"status": "completed"},
        content_type="application/json",
        HTTP_X_API_KEY=plaintext,
    )

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_closed"
    assert response.json()["error"]["message"] == "Job is already expired"
    assert _rows() == before
    assert _account(team) == (99 * MICROS, 0)
    assert_ledger_consistent()


@pytest.mark.django_db
def test_the_task_reads_the_ttl_setting(team, settings):
    settings.GATEWAY_JOB_TTL_SECONDS = 60
    job = _job(team, age=timedelta(seconds=61))

    result = jobs_expire_task()

    assert result == {**NOTHING, "released": 1}
    job.refresh_from_db()
    assert (job.status, job.error_message) == (
        JobStatus.EXPIRED,
        "expired after 1 min without being closed",
    )
    assert_ledger_consistent()


@pytest.mark.django_db
def test_reconcile_credits_also_expires_jobs(team):
    job = _job(team, calls=[UsageStatus.SUCCESS])
    out = io.StringIO()

    call_command("reconcile_credits", stdout=out)

    assert out.getvalue() == (
        "1 accounts checked, 0 repaired; "
        "journal: 0 settlements applied, 0 holds left to it; stale holds: 0 captured, 0 released; "
        "expired jobs: 1 captured, 0 released, 0 with nothing held\n"
    )
    assert Job.objects.get(pk=job.pk).status == JobStatus.EXPIRED
    assert_ledger_consistent()


@pytest.mark.django_db
def test_a_job_that_cannot_be_expired_is_logged_and_the_others_expire(team, caplog):
    # Given two teams' old jobs, and a corrupt ledger on the first team: a
    # release that no hold preceded, so releasing the job's credit would take
    # its held credits below zero (billing_account_held_nonnegative).
    bad = _job(team)
    account = CreditAccount.objects.get(team=team)
    LedgerEntry.objects.create(
        account=account,
        entry_type=LedgerEntryType.RELEASE,
        amount_micros=MICROS,
        held_delta_micros=-MICROS,
        balance_before_micros=99 * MICROS,
        balance_after_micros=100 * MICROS,
        idempotency_key="release:rogue",
        request_id="rogue",
    )
    CreditAccount.objects.filter(pk=account.pk).update(
        balance_micros=100 * MICROS, held_micros=0
    )
    bob, _, _ = team_open(
        organization=organization_create(organization_id="org_bob", name="Bob"),
        team_id="team_bob",
        credits_allocated_micros=5 * MICROS,
    )
    good = _job(bob, calls=[UsageStatus.SUCCESS])

    with caplog.at_level(logging.ERROR, logger="billing.jobs"):
        result = jobs_expire(now=timezone.now())

    # Then the bad job is logged, counted and left as it was; the other expired.
    assert result == {**NOTHING, "captured": 1, "failed": 1}
    assert [r.getMessage() for r in caplog.records] == [
        f"job {bad.job_id} could not be expired"
    ]
    assert "billing_account_held_nonnegative" in caplog.text
    assert Job.objects.get(pk=bad.pk).status == JobStatus.PENDING
    assert _money(bad) == [(LedgerEntryType.HOLD, -MICROS, MICROS)]
    assert Job.objects.get(pk=good.pk).status == JobStatus.EXPIRED
    assert _account(bob) == (4 * MICROS, 0)
    assert AuditLogEntry.objects.filter(action="job.expired").count() == 1


@pytest.mark.django_db(transaction=True)
def test_an_expiry_waiting_on_a_completion_of_the_same_job_settles_once(team):
    # Given a completion of an old job, not yet committed, holding its locks.
    job = _job(team, calls=[UsageStatus.SUCCESS])
    completed, release = threading.Event(), threading.Event()
    results = {}

    def complete():
        try:
            with transaction.atomic():
                job_complete(job=job, status=JobStatus.FAILED)
                completed.set()
                release.wait(30)
        finally:
            connection.close()

    def expire():
        try:
            results["expiry"] = jobs_expire(now=timezone.now())
        finally:
            connection.close()

    completing = threading.Thread(target=complete)
    completing.start()
    assert completed.wait(30)

    # When expiry runs meanwhile: it listed the job as open and waits on a lock.
    expiring = threading.Thread(target=expire)
    expiring.start()
    with connection.cursor() as cursor:
        for _ in range(600):
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if cursor.fetchone()[0]:
                break
            threading.Event().wait(0.05)
        else:
            pytest.fail("the expiry never waited on the completion's lock")
    release.set()
    completing.join(30)
    expiring.join(30)

    # Then the completion won and the expiry skipped the job: settled once.
    assert results["expiry"] == NOTHING
    job.refresh_from_db()
    assert (job.status, job.credits_charged_micros) == (JobStatus.FAILED, 0)
    assert _money(job) == [
        (LedgerEntryType.HOLD, -MICROS, MICROS),
        (LedgerEntryType.RELEASE, MICROS, -MICROS),
    ]
    assert not AuditLogEntry.objects.filter(action="job.expired").exists()
    assert_ledger_consistent()


@pytest.mark.django_db
def test_the_tasks_time_limit_stops_expiry_instead_of_counting_a_failure(
    team, monkeypatch
):
    job = _job(team)

    def out_of_time(**kwargs):
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(jobs, "job_expire", out_of_time)

    with pytest.raises(SoftTimeLimitExceeded):
        jobs_expire(now=timezone.now())
    assert Job.objects.get(pk=job.pk).status == JobStatus.PENDING


@pytest.mark.django_db(transaction=True)
def test_an_expired_job_takes_no_more_calls(client, team):
    _, plaintext = virtual_key_issue(team=team)
    job = _job(team, calls=[UsageStatus.SUCCESS])
    jobs_expire(now=timezone.now())
    before = (_rows(), UsageRecord.objects.count())

    response = client.post(
        f"/api/jobs/{job.job_id}/llm-call",
        {"model": "chat", "messages": [{"role": "user", "content": "hi"}]},
        content_type="application/json",
        HTTP_X_API_KEY=plaintext,
    )

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_closed"
    assert (_rows(), UsageRecord.objects.count()) == before
