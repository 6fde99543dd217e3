"""Period boundaries: budget and quota windows reset, and auto-refill — by the
services with injected time, by hand, and on a real Celery worker."""

import io
import logging
import time
from datetime import UTC, datetime

import pytest
from django.core.management import call_command
from django.utils import timezone

from billing import periods
from billing.models import CreditAccount, LedgerEntry, LedgerEntryType
from billing.periods import budgets_reset, credit_account_refill, credit_accounts_refill
from billing.services import credit_account_open, credits_allocate, credits_hold
from billing.tasks import budgets_reset_task, credit_accounts_refill_task
from billing.tests.ledger import assert_ledger_consistent
from gateway_project.money import MICROS
from tenants.models import BudgetPeriod, Organization, Team, VirtualKey
from tenants.services import team_create, virtual_key_issue

LAST_MONTH = datetime(2026, 10, 14, 9, 30, tzinfo=UTC)
NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
NOVEMBER = datetime(2026, 11, 1, tzinfo=UTC)
DECEMBER = datetime(2026, 12, 1, 0, 0, 5, tzinfo=UTC)


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the worker did not do it in time"
        time.sleep(0.1)


def _spent_world(team: Team) -> VirtualKey:
    """Budgets and quotas of last month, partly used."""
    key, _ = virtual_key_issue(team=team)
    VirtualKey.objects.filter(pk=key.pk).update(
        budget_limit_micros=10 * MICROS,
        budget_period=BudgetPeriod.MONTHLY,
        budget_window_start=datetime(2026, 10, 1, tzinfo=UTC),
        budget_spent_micros=4 * MICROS,
        monthly_request_quota=100,
        quota_period_start=datetime(2026, 10, 1, tzinfo=UTC),
        quota_requests_used=60,
    )
    Team.objects.filter(pk=team.pk).update(
        monthly_request_quota=1000,
        quota_period_start=datetime(2026, 10, 1, tzinfo=UTC),
        quota_requests_used=70,
    )
    Organization.objects.filter(pk=team.organization_id).update(
        budget_limit_micros=50 * MICROS,
        budget_period=BudgetPeriod.DAILY,
        budget_window_start=datetime(2026, 11, 20, tzinfo=UTC),
        budget_spent_micros=7 * MICROS,
    )
    return key


@pytest.mark.django_db
def test_windows_that_ended_are_reset_once(team):
    key = _spent_world(team)

    first = budgets_reset(now=NOW)
    second = budgets_reset(now=NOW)

    assert first == {"organization": 1, "team": 1, "virtualkey": 1, "failed": 0}
    assert second == {"organization": 0, "team": 0, "virtualkey": 0, "failed": 0}
    key.refresh_from_db()
    assert (
        key.budget_window_start,
        key.budget_spent_micros,
        key.quota_period_start,
        key.quota_requests_used,
    ) == (NOVEMBER, 0, NOVEMBER, 0)
    team.refresh_from_db()
    assert (team.quota_period_start, team.quota_requests_used) == (NOVEMBER, 0)
    organization = Organization.objects.get(pk=team.organization_id)
    assert (organization.budget_window_start, organization.budget_spent_micros) == (
        datetime(2026, 11, 21, tzinfo=UTC),
        0,
    )


@pytest.mark.django_db
def test_windows_still_running_are_left_alone(team):
    key = _spent_world(team)
    VirtualKey.objects.filter(pk=key.pk).update(
        budget_window_start=NOVEMBER, quota_period_start=NOVEMBER
    )

    result = budgets_reset(now=NOW)

    key.refresh_from_db()
    assert result["virtualkey"] == 0
    assert (key.budget_spent_micros, key.quota_requests_used) == (4 * MICROS, 60)


def _team_with(organization, team_id: str, credits: int, level: int | None) -> Team:
    team = team_create(organization=organization, team_id=team_id)
    account = credit_account_open(team=team)
    credits_allocate(
        team=team, amount_micros=credits * MICROS, idempotency_key=f"{team_id}:a"
    )
    CreditAccount.objects.filter(pk=account.pk).update(
        auto_refill_amount_micros=None if level is None else level * MICROS,
        auto_refill_period=BudgetPeriod.MONTHLY if level is not None else "",
    )
    return team


def _refills(team: Team) -> list[tuple[int, str]]:
    return list(
        LedgerEntry.objects.filter(
            account__team=team, entry_type=LedgerEntryType.REFILL
        )
        .order_by("id")
        .values_list("amount_micros", "idempotency_key")
    )


@pytest.mark.django_db
def test_auto_refill_tops_up_once_per_period(organization):
    low = _team_with(organization, "team_low", credits=10, level=50)
    full = _team_with(organization, "team_full", credits=80, level=50)
    plain = _team_with(organization, "team_plain", credits=5, level=None)

    first = credit_accounts_refill(now=NOW)
    second = credit_accounts_refill(now=NOW)
    next_month = credit_accounts_refill(now=DECEMBER)

    account = CreditAccount.objects.get(team=low)
    low_id = account.pk
    full_id = CreditAccount.objects.get(team=full).pk
    assert (first, second, next_month) == (
        {"refilled": 2, "already_refilled": 0, "failed": 0},
        {"refilled": 0, "already_refilled": 2, "failed": 0},
        {"refilled": 2, "already_refilled": 0, "failed": 0},
    )
    assert _refills(low) == [
        (40 * MICROS, f"refill:{low_id}:2026-11-01T00:00"),
        (0, f"refill:{low_id}:2026-12-01T00:00"),
    ]
    assert _refills(full) == [
        (0, f"refill:{full_id}:2026-11-01T00:00"),
        (0, f"refill:{full_id}:2026-12-01T00:00"),
    ]
    assert _refills(plain) == []
    assert account.balance_micros == 50 * MICROS
    assert_ledger_consistent()


@pytest.mark.django_db
def test_spending_after_the_refill_waits_for_the_next_period(organization):
    team = _team_with(organization, "team_spender", credits=10, level=50)
    account_id = CreditAccount.objects.get(team=team).pk
    credit_account_refill(account_id=account_id, now=NOW)
    credits_hold(team=team, amount_micros=30 * MICROS, request_id="req_spend")

    entry, created = credit_account_refill(account_id=account_id, now=NOW)

    assert created is False
    assert entry is not None and entry.amount_micros == 40 * MICROS
    assert CreditAccount.objects.get(pk=account_id).balance_micros == 20 * MICROS
    assert_ledger_consistent()


@pytest.mark.django_db
def test_reset_budgets_command(team):
    _spent_world(team)
    CreditAccount.objects.filter(team=team).update(
        auto_refill_amount_micros=200 * MICROS,
        auto_refill_period=BudgetPeriod.DAILY,
    )
    output = io.StringIO()

    call_command("reset_budgets", stdout=output)
    call_command("reset_budgets", stdout=output)

    assert output.getvalue().splitlines() == [
        "windows reset: 1 organization(s), 1 team(s), 1 key(s); auto-refill: "
        "1 account(s) refilled, 0 already refilled this period",
        "windows reset: 0 organization(s), 0 team(s), 0 key(s); auto-refill: "
        "0 account(s) refilled, 1 already refilled this period",
    ]
    assert CreditAccount.objects.get(team=team).balance_micros == 200 * MICROS


def test_resets_and_refills_run_on_a_real_worker_twice_with_one_effect(
    celery_worker_process, team
):
    key = _spent_world(team)
    CreditAccount.objects.filter(team=team).update(
        auto_refill_amount_micros=150 * MICROS,
        auto_refill_period=BudgetPeriod.MONTHLY,
    )

    for _ in range(2):
        budgets_reset_task.delay()
        credit_accounts_refill_task.delay()
    _wait(lambda: celery_worker_process.read_text().count("succeeded") >= 4)

    key.refresh_from_db()
    month = timezone.now().replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    assert (key.budget_window_start, key.budget_spent_micros) == (month, 0)
    assert [amount for amount, _ in _refills(team)] == [50 * MICROS]
    assert CreditAccount.objects.get(team=team).balance_micros == 150 * MICROS
    assert_ledger_consistent()


@pytest.mark.django_db
def test_a_window_that_cannot_be_reset_is_logged_and_the_others_reset(
    team, caplog, monkeypatch
):
    # Given an organization, a team and a key whose windows ended, and a team
    # row that cannot be rolled.
    key = _spent_world(team)
    roll = periods._roll

    def roll_but_not_the_team(entity, now):
        if isinstance(entity, Team):
            raise ValueError("corrupt window")
        return roll(entity, now)

    monkeypatch.setattr(periods, "_roll", roll_but_not_the_team)

    with caplog.at_level(logging.ERROR, logger="billing.periods"):
        result = budgets_reset(now=NOW)

    # Then the team is logged, counted and left; the others are reset.
    assert result == {"organization": 1, "team": 0, "virtualkey": 1, "failed": 1}
    assert [r.getMessage() for r in caplog.records if r.name == "billing.periods"] == [
        f"budget windows of team {team.pk} could not be reset"
    ]
    assert "corrupt window" in caplog.text
    team.refresh_from_db()
    assert (team.quota_period_start, team.quota_requests_used) == (
        datetime(2026, 10, 1, tzinfo=UTC),
        70,
    )
    key.refresh_from_db()
    assert (key.budget_window_start, key.quota_requests_used) == (NOVEMBER, 0)


@pytest.mark.django_db
def test_an_account_that_cannot_be_refilled_is_logged_and_the_others_refill(
    organization, caplog
):
    # Given an account in its overdraft whose refill level is the largest
    # amount a ledger row holds: topping it up takes one micro-credit more,
    # which the database refuses (bigint out of range).
    huge = _team_with(organization, "team_huge", credits=1, level=None)
    account = CreditAccount.objects.get(team=huge)
    CreditAccount.objects.filter(pk=account.pk).update(
        overdraft_limit_micros=1,
        auto_refill_amount_micros=2**63 - 1,
        auto_refill_period=BudgetPeriod.MONTHLY,
    )
    credits_hold(team=huge, amount_micros=MICROS + 1, request_id="req_overdraft")
    low = _team_with(organization, "team_low", credits=10, level=50)

    with caplog.at_level(logging.ERROR, logger="billing.periods"):
        result = credit_accounts_refill(now=NOW)

    assert result == {"refilled": 1, "already_refilled": 0, "failed": 1}
    assert [r.getMessage() for r in caplog.records if r.name == "billing.periods"] == [
        f"credit account {account.pk} could not be refilled"
    ]
    assert _refills(huge) == []
    assert CreditAccount.objects.get(pk=account.pk).balance_micros == -1
    assert CreditAccount.objects.get(team=low).balance_micros == 50 * MICROS
    assert_ledger_consistent()
