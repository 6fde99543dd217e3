"""Credits on the request path: hold, capture, release, refusals, budget modes.

Prices are $1 (input) and $2 (output) per million tokens; the fake upstream
reports 7 prompt and 5 completion tokens, so a call costs 7 + 10 = 17 micro-USD.
"""

import contextlib
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone

from billing.models import CreditAccount, Job, LedgerEntry, UsageRecord
from billing.reconciliation import holds_settle_stale
from billing.services import call_settle, team_open
from billing.tests.ledger import assert_ledger_consistent
from billing.tests.prices import price
from billing.tests.settlements import settlement
from gateway_project.money import MICROS
from routing.inference.route import routes_forget
from routing.models import Deployment
from routing.services import model_group_create
from tenants.models import BudgetMode
from tenants.services import organization_create, team_update

pytestmark = pytest.mark.django_db(transaction=True)
MESSAGES = [{"role": "user", "content": "Say hello"}]
CALL = {"model": "chat", "messages": MESSAGES}


@pytest.fixture(autouse=True)
def _ledger_stays_consistent():
    yield
    assert_ledger_consistent()


def _open(
    fake,
    *,
    mode=BudgetMode.CONSUMPTION_USD,
    credits_micros=100 * MICROS,
    team_id="team_money",
    organization=None,
):
    price("openai/fake-model")
    deployment = Deployment.objects.filter(
        name="fake"
    ).first() or Deployment.objects.create(
        name="fake",
        model="openai/fake-model",
        litellm_params={"api_base": fake.base("money")},
        timeout_ms=5_000,
    )
    group = (
        model_group_create(group_name="chat", members=[(deployment, 0)])
        if not Deployment.objects.filter(memberships__isnull=False).exists()
        else deployment.model_groups.get()
    )
    organization = organization or organization_create(
        organization_id="org_money", name="Money"
    )
    team, _, key = team_open(
        organization=organization,
        team_id=team_id,
        credits_allocated_micros=credits_micros,
        model_groups=[group],
        budget_mode=mode,
    )
    return team, key


def _call(client, key, body=CALL, path="/v1/chat/completions", **headers):
    return client.post(
        path, body, content_type="application/json", HTTP_X_API_KEY=key, **headers
    )


def _entries(team, request_id):
    return list(
        LedgerEntry.objects.filter(account__team=team, request_id=request_id)
        .order_by("id")
        .values_list("entry_type", "amount_micros", "held_delta_micros")
    )


def test_a_call_holds_then_captures_its_cost_and_releases_the_rest(
    client, fake_upstream
):
    team, key = _open(fake_upstream)

    response = _call(client, key)

    assert response.status_code == 200, response.content
    request_id = response["x-request-id"]
    (hold_type, hold_amount, hold_held), capture, release = _entries(team, request_id)
    held = hold_held
    assert (hold_type, hold_amount) == ("hold", -held)
    # 17 micro-USD x 100 credits per dollar = 1,700 micro-credits.
    assert capture == ("capture", 0, -1_700)
    assert release == ("release", held - 1_700, -(held - 1_700))
    # The hold covered the prompt plus the default max_tokens, at this price.
    assert held >= (4096 * 2) * 100
    account = CreditAccount.objects.get(team=team)
    assert (account.balance_micros, account.held_micros, account.used_total_micros) == (
        100 * MICROS - 1_700,
        0,
        1_700,
    )
    record = UsageRecord.objects.get()
    assert (record.cost_micros, record.credits_micros) == (17, 1_700)
    assert (
        record.input_price_per_million_micros,
        record.output_price_per_million_micros,
    ) == (1_000_000, 2_000_000)
    # max_tokens was set to the cap and sent upstream, so the hold bounds the charge.
    assert fake_upstream.requests[-1].json["max_tokens"] == 4096


def test_the_callers_max_tokens_sizes_the_hold(client, fake_upstream):
    team, key = _open(fake_upstream)

    response = _call(client, key, {**CALL, "max_tokens": 10})

    hold = _entries(team, response["x-request-id"])[0]
    assert 10 * 2 * 100 <= hold[2] < 4096 * 2 * 100
    assert fake_upstream.requests[-1].json["max_tokens"] == 10


def test_not_enough_credits_is_402_and_nothing_is_written(client, fake_upstream):
    _, key = _open(fake_upstream, credits_micros=1_000)  # 0.001 credits
    before = list(LedgerEntry.objects.values_list("id", flat=True))

    response = _call(client, key)

    assert response.status_code == 402
    assert response.json()["error"]["code"] == "insufficient_credits"
    assert list(LedgerEntry.objects.values_list("id", flat=True)) == before
    assert not UsageRecord.objects.exists()
    assert fake_upstream.calls("money") == 0


def test_an_overdraft_limit_lets_the_balance_go_below_zero_that_far(
    client, fake_upstream
):
    team, key = _open(fake_upstream, credits_micros=1_000)
    CreditAccount.objects.filter(team=team).update(overdraft_limit_micros=10 * MICROS)

    response = _call(client, key)

    assert response.status_code == 200
    assert CreditAccount.objects.get(team=team).balance_micros == 1_000 - 1_700


def test_a_failed_call_releases_everything(client, fake_upstream):
    team, key = _open(fake_upstream)
    fake_upstream.program("money", status=500)

    response = _call(client, key)

    assert response.status_code == 502
    (_, _, held), release = _entries(team, response["x-request-id"])
    assert release == ("release", held, -held)
    assert CreditAccount.objects.get(team=team).balance_micros == 100 * MICROS
    assert UsageRecord.objects.get().credits_micros == 0


def test_tokens_mode_charges_tokens_per_credit(client, fake_upstream):
    team, key = _open(fake_upstream, mode=BudgetMode.CONSUMPTION_TOKENS)
    team_update(team=team, changes={"tokens_per_credit": 10})

    # (At 10 tokens a credit the default 4096-token hold would not fit.)
    response = _call(client, key, {**CALL, "max_tokens": 20})

    # 12 tokens / 10 tokens per credit = 1.2 credits.
    assert (
        UsageRecord.objects.get(request_id=response["x-request-id"]).credits_micros
        == 1_200_000
    )


def test_job_based_teams_pay_one_credit_per_completed_job(client, fake_upstream):
    team, key = _open(
        fake_upstream, mode=BudgetMode.JOB_BASED, credits_micros=5 * MICROS
    )

    outside = _call(client, key)  # a call outside a job counts as a job
    job = client.post(
        "/api/jobs/create",
        {"team_id": team.team_id, "job_type": "t"},
        content_type="application/json",
        HTTP_X_API_KEY=key,
    ).json()
    inside = [_call(client, key, HTTP_X_JOB_ID=job["job_id"]) for _ in range(3)]
    client.post(
        f"/api/jobs/{job['job_id']}/complete",
        {"status": "completed"},
        content_type="application/json",
        HTTP_X_API_KEY=key,
    )
    failed = client.post(
        "/api/jobs/create",
        {"team_id": team.team_id, "job_type": "t"},
        content_type="application/json",
        HTTP_X_API_KEY=key,
    ).json()
    client.post(
        f"/api/jobs/{failed['job_id']}/complete",
        {"status": "failed"},
        content_type="application/json",
        HTTP_X_API_KEY=key,
    )

    assert outside.status_code == 200 and all(r.status_code == 200 for r in inside)
    assert (
        UsageRecord.objects.get(request_id=outside["x-request-id"]).credits_micros
        == MICROS
    )
    assert {
        UsageRecord.objects.get(request_id=r["x-request-id"]).credits_micros
        for r in inside
    } == {0}
    assert Job.objects.get(job_id=job["job_id"]).credits_charged_micros == MICROS
    assert Job.objects.get(job_id=failed["job_id"]).credits_charged_micros == 0
    assert CreditAccount.objects.get(team=team).balance_micros == 3 * MICROS


def test_a_job_based_team_without_a_credit_cannot_open_a_job(client, fake_upstream):
    team, key = _open(
        fake_upstream, mode=BudgetMode.JOB_BASED, credits_micros=MICROS // 2
    )

    response = client.post(
        "/api/jobs/create",
        {"team_id": team.team_id, "job_type": "t"},
        content_type="application/json",
        HTTP_X_API_KEY=key,
    )

    assert (response.status_code, response.json()["error"]["code"]) == (
        402,
        "insufficient_credits",
    )
    assert not Job.objects.exists()


def test_a_model_without_any_price_is_never_silently_free(
    client, fake_upstream, settings
):
    team, key = _open(fake_upstream)
    Deployment.objects.filter(name="fake").update(model="openai/unpriced-model")

    refused = _call(client, key)

    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "no_deployment_available"
    assert UsageRecord.objects.get().fallbacks_tried == [
        {"deployment": "fake", "skipped": "no_price"}
    ]
    assert CreditAccount.objects.get(team=team).balance_micros == 100 * MICROS

    settings.GATEWAY_FALLBACK_PRICE = (3_000_000, 4_000_000)
    routes_forget()  # a setting changes with a restart, which forgets routes
    charged = _call(client, key)
    assert charged.status_code == 200
    record = UsageRecord.objects.get(request_id=charged["x-request-id"])
    assert (
        record.input_price_per_million_micros,
        record.output_price_per_million_micros,
        record.cost_micros,
    ) == (3_000_000, 4_000_000, 41)


def test_settlement_is_idempotent_by_request_id(client, fake_upstream):
    team, key = _open(fake_upstream)
    response = _call(client, key)
    record = UsageRecord.objects.get()
    entries = LedgerEntry.objects.count()

    again = call_settle(
        settlement(team, response["x-request-id"], charge_micros=999_999)
    )

    assert again == record
    assert LedgerEntry.objects.count() == entries


def test_markup_raises_the_cost(client, fake_upstream):
    team, key = _open(fake_upstream)
    team_update(team=team, changes={"price_markup_bps": 5_000})  # +50 %

    response = _call(client, key)

    record = UsageRecord.objects.get(request_id=response["x-request-id"])
    assert (record.cost_micros, record.price_markup_bps, record.credits_micros) == (
        26,
        5_000,
        2_600,
    )  # 17 x 1.5 = 25.5 → 26


# --- across processes -------------------------------------------------------------------


def post(server, key: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        json=CALL,
        headers={"X-API-Key": key},
        timeout=60,
    )


def calls_at_once(servers, key: str, count: int) -> list[tuple[int, str]]:
    """``count`` calls, 30 in flight at a time, to ``servers`` in turn: the
    status and request id of each."""

    def one(n: int) -> tuple[int, str]:
        response = post(servers[n % len(servers)], key)
        return response.status_code, response.headers.get("x-request-id", "")

    with ThreadPoolExecutor(max_workers=30) as pool:
        return list(pool.map(one, range(count)))


def test_concurrent_calls_on_two_processes_never_overspend(two_servers, fake_upstream):
    """60 calls, split over two gateway processes, against credits that cover
    exactly K = 10 holds: at most 10 succeed, all others are 402, the ledger
    sums to the balance and every success has exactly one usage record."""
    team, key = _open(
        fake_upstream, mode=BudgetMode.JOB_BASED, credits_micros=10 * MICROS
    )
    fake_upstream.program("money", latency=0.2)  # keep calls in flight together

    results = calls_at_once(two_servers, key, 60)

    assert_charged_at_most(team, results, 10)


def assert_charged_at_most(
    team, results: list[tuple[int, str]], covered: int, settled_before=()
) -> list[str]:
    """Of ``results`` (status, request id), between 1 and ``covered`` are
    200s (1 credit each) and all the others are 402s; the account kept what
    they did not spend and holds nothing; each 200, and each earlier call in
    ``settled_before``, has its one usage record and capture. Returns the
    request ids of the 200s."""
    statuses = [status for status, _ in results]
    assert set(statuses) <= {200, 402}
    successes = [request_id for status, request_id in results if status == 200]
    assert 1 <= len(successes) <= covered
    assert statuses.count(402) == len(results) - len(successes)
    account = CreditAccount.objects.get(team=team)
    assert account.balance_micros == (covered - len(successes)) * MICROS >= 0
    assert account.held_micros == 0
    charged = [*settled_before, *successes]
    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == sorted(
        charged
    )
    assert LedgerEntry.objects.filter(entry_type="capture").count() == len(charged)
    return successes


def test_a_process_killed_mid_call_leaves_a_visible_hold(running_server, fake_upstream):
    team, key = _open(fake_upstream)
    fake_upstream.program("money", latency=30)  # the call will still be in flight

    def call() -> None:
        with contextlib.suppress(httpx.HTTPError):  # the server dies under it
            httpx.post(
                f"{running_server.url}/v1/chat/completions",
                json=CALL,
                headers={"X-API-Key": key},
                timeout=60,
            )

    caller = threading.Thread(target=call)
    caller.start()
    deadline = time.monotonic() + 20
    while not LedgerEntry.objects.filter(
        entry_type="hold", account__team=team
    ).exists():
        assert time.monotonic() < deadline, "the hold never appeared"
        time.sleep(0.05)
    for child in _children(running_server.process.pid):
        os.kill(child, signal.SIGKILL)
    running_server.process.kill()
    caller.join(timeout=30)

    hold = LedgerEntry.objects.get(entry_type="hold", account__team=team)
    assert (
        not LedgerEntry.objects.filter(request_id=hold.request_id)
        .exclude(pk=hold.pk)
        .exists()
    )
    assert not UsageRecord.objects.filter(request_id=hold.request_id).exists()
    assert (
        CreditAccount.objects.get(team=team).held_micros == hold.held_delta_micros > 0
    )

    # Reconciliation settles it, exactly once: no record, so all is released.
    later = timezone.now() + timedelta(seconds=1)
    first = holds_settle_stale(older_than=timedelta(0), now=later)
    second = holds_settle_stale(older_than=timedelta(0), now=later)
    assert (first, second) == (
        {"captured": 0, "released": 1, "failed": 0, "journaled": 0, "replayed": 0},
        {"captured": 0, "released": 0, "failed": 0, "journaled": 0, "replayed": 0},
    )
    account = CreditAccount.objects.get(team=team)
    assert (account.held_micros, account.balance_micros) == (0, 100 * MICROS)


def _children(pid: int) -> list[int]:
    """The worker processes gunicorn forked (Linux /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().split(")")[1].split()[1]) == pid:
                        children.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return children
