"""USD budgets and monthly request quotas: reservation, correction, resets on
their boundaries (time injected), refusals that write nothing."""

from datetime import UTC, datetime, timedelta

import pytest

from billing.budgets import (
    BudgetExceeded,
    QuotaExhausted,
    budgets_reserve,
    budgets_settle,
    window_start,
)
from billing.models import LedgerEntry, UsageRecord
from billing.tests.prices import price
from routing.models import Deployment
from tenants.models import BudgetPeriod, Organization, Team, VirtualKey
from tenants.services import virtual_key_issue

pytestmark = pytest.mark.django_db
NOW = datetime(2026, 11, 18, 15, 30, tzinfo=UTC)  # a Wednesday


@pytest.mark.parametrize(
    ("period", "seconds", "started", "expected"),
    [
        (BudgetPeriod.DAILY, None, None, datetime(2026, 11, 18, tzinfo=UTC)),
        (BudgetPeriod.WEEKLY, None, None, datetime(2026, 11, 16, tzinfo=UTC)),
        (BudgetPeriod.MONTHLY, None, None, datetime(2026, 11, 1, tzinfo=UTC)),
        (
            BudgetPeriod.DURATION,
            3600,
            datetime(2026, 11, 18, 12, 10, tzinfo=UTC),
            datetime(2026, 11, 18, 15, 10, tzinfo=UTC),
        ),
        (BudgetPeriod.DURATION, 3600, None, NOW),
        (
            BudgetPeriod.NONE,
            None,
            datetime(2026, 1, 1, tzinfo=UTC),
            datetime(2026, 1, 1, tzinfo=UTC),
        ),
    ],
)
def test_window_boundaries(period, seconds, started, expected):
    assert window_start(period, seconds, started, NOW) == expected


@pytest.fixture
def key(team) -> VirtualKey:
    return virtual_key_issue(team=team)[0]


def _fresh(key: VirtualKey) -> VirtualKey:
    """The key as a request loads it, with its team and organization."""
    return VirtualKey.objects.select_related("team__organization").get(pk=key.pk)


def _spent(model, pk) -> int:
    return model.objects.get(pk=pk).budget_spent_micros


def test_budget_reserves_then_settles_to_the_actual_cost(key):
    VirtualKey.objects.filter(pk=key.pk).update(
        budget_limit_micros=100, budget_period=BudgetPeriod.DAILY
    )
    key.refresh_from_db()

    assert budgets_reserve(key=key, cost_micros=60, now=NOW) is True
    with pytest.raises(BudgetExceeded) as refused:
        budgets_reserve(key=key, cost_micros=60, now=NOW)
    assert refused.value.http_status == 402
    assert _spent(VirtualKey, key.pk) == 60  # the refusal wrote nothing

    budgets_settle(key=key, reserved_micros=60, cost_micros=17, succeeded=True)
    assert _spent(VirtualKey, key.pk) == 17
    assert budgets_reserve(key=key, cost_micros=60, now=NOW) is True


def test_budget_resets_at_the_boundary(key):
    VirtualKey.objects.filter(pk=key.pk).update(
        budget_limit_micros=100,
        budget_period=BudgetPeriod.DAILY,
        budget_window_start=datetime(2026, 11, 17, tzinfo=UTC),
        budget_spent_micros=100,
    )
    key.refresh_from_db()

    with pytest.raises(BudgetExceeded):
        budgets_reserve(
            key=key, cost_micros=1, now=datetime(2026, 11, 17, 23, 59, 59, tzinfo=UTC)
        )
    assert (
        budgets_reserve(
            key=key, cost_micros=1, now=datetime(2026, 11, 18, 0, 0, tzinfo=UTC)
        )
        is True
    )

    key.refresh_from_db()
    assert (key.budget_window_start, key.budget_spent_micros) == (
        datetime(2026, 11, 18, tzinfo=UTC),
        1,
    )


def test_team_and_organization_budgets_bound_every_key(key, team):
    Organization.objects.filter(pk=team.organization_id).update(
        budget_limit_micros=50, budget_period=BudgetPeriod.MONTHLY
    )
    other = _fresh(virtual_key_issue(team=team)[0])

    budgets_reserve(key=_fresh(key), cost_micros=30, now=NOW)
    with pytest.raises(BudgetExceeded, match="organization's budget"):
        budgets_reserve(key=other, cost_micros=30, now=NOW)


def test_monthly_quota_counts_requests_and_resets_next_month(key, team):
    Team.objects.filter(pk=team.pk).update(monthly_request_quota=2)
    key = _fresh(key)

    budgets_reserve(key=key, cost_micros=0, now=NOW)
    budgets_reserve(key=key, cost_micros=0, now=NOW)
    with pytest.raises(QuotaExhausted) as refused:
        budgets_reserve(key=key, cost_micros=0, now=NOW)
    assert (refused.value.http_status, refused.value.code) == (402, "quota_exhausted")

    assert (
        budgets_reserve(key=key, cost_micros=0, now=datetime(2026, 12, 1, tzinfo=UTC))
        is True
    )
    team.refresh_from_db()
    assert (team.quota_period_start, team.quota_requests_used) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        1,
    )


def test_a_failed_call_gives_its_request_back(key):
    VirtualKey.objects.filter(pk=key.pk).update(monthly_request_quota=1)
    key.refresh_from_db()
    budgets_reserve(key=key, cost_micros=0, now=NOW)

    budgets_settle(key=key, reserved_micros=0, cost_micros=0, succeeded=False)

    assert VirtualKey.objects.get(pk=key.pk).quota_requests_used == 0
    assert budgets_reserve(key=key, cost_micros=0, now=NOW) is True


def test_nothing_to_lock_without_budgets_or_quotas(key):
    assert budgets_reserve(key=key, cost_micros=10**9, now=NOW) is False


# --- on the request path --------------------------------------------------------------


@pytest.fixture
def priced_team(team, fake_upstream, model_group):
    price("openai/fake-model")
    Deployment.objects.filter(name="mock-a").update(
        model="openai/fake-model",
        litellm_params={"api_base": fake_upstream.base("budget")},
    )
    return team


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("configure", "code"),
    [
        (
            lambda team, key: VirtualKey.objects.filter(pk=key.pk).update(
                budget_limit_micros=1, budget_period=BudgetPeriod.MONTHLY
            ),
            "budget_exceeded",
        ),
        (
            lambda team, key: Team.objects.filter(pk=team.pk).update(
                monthly_request_quota=1,
                quota_period_start=datetime.now(UTC).replace(
                    day=1, hour=0, minute=0, second=0, microsecond=0
                ),
                quota_requests_used=1,
            ),
            "quota_exhausted",
        ),
    ],
)
def test_refused_calls_are_402_and_write_nothing(
    client, priced_team, fake_upstream, configure, code
):
    key, plaintext = virtual_key_issue(team=priced_team)
    configure(priced_team, key)
    entries = LedgerEntry.objects.count()

    response = client.post(
        "/v1/chat/completions",
        {
            "model": "chat",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
        },
        content_type="application/json",
        HTTP_X_API_KEY=plaintext,
    )

    assert (response.status_code, response.json()["error"]["code"]) == (402, code)
    assert LedgerEntry.objects.count() == entries
    assert not UsageRecord.objects.exists()
    assert fake_upstream.calls("budget") == 0


@pytest.mark.django_db(transaction=True)
def test_a_call_spends_its_actual_cost_on_every_budget(client, priced_team):
    key, plaintext = virtual_key_issue(team=priced_team)
    VirtualKey.objects.filter(pk=key.pk).update(
        budget_limit_micros=10**6, budget_period=BudgetPeriod.MONTHLY
    )
    Team.objects.filter(pk=priced_team.pk).update(
        budget_limit_micros=10**6, budget_period=BudgetPeriod.DAILY
    )

    response = client.post(
        "/v1/chat/completions",
        {
            "model": "chat",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
        },
        content_type="application/json",
        HTTP_X_API_KEY=plaintext,
    )

    assert response.status_code == 200
    # 7 prompt tokens at $1/M + 5 completion tokens at $2/M = 17 micro-USD.
    assert (_spent(VirtualKey, key.pk), _spent(Team, priced_team.pk)) == (17, 17)
    assert _spent(Organization, priced_team.organization_id) == 0  # no budget there
    assert (
        timedelta(0)
        <= datetime.now(UTC) - VirtualKey.objects.get(pk=key.pk).budget_window_start
        < timedelta(days=32)
    )
