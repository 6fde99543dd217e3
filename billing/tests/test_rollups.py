"""Usage rollups equal the raw records they sum, exactly, per hour and per day;
retention deletes only raw records that are old and rolled up — by the
services, by hand, and by a real Celery worker."""

import io
import random
import re
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command
from django.db import connection
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from billing.models import RollupState, UsageRecord, UsageRollup, UsageStatus
from billing.rollups import (
    LATENCY_BUCKETS_MS,
    SUMS,
    latency_bucket,
    latency_histogram_merge,
    latency_percentiles,
    usage_prune,
    usage_roll_up,
)
from billing.services import usage_record_create
from billing.tasks import usage_roll_up_task
from routing.services import model_group_create
from tenants.services import organization_create, team_create, virtual_key_issue

GRACE = timedelta(seconds=120)
# 22:00 on 1 March to 02:00 on 2 March: four hours across a UTC midnight.
FIRST_HOUR = datetime(2026, 3, 1, 22, tzinfo=UTC)
HOURS = [FIRST_HOUR + timedelta(hours=n) for n in range(4)]
DAY_1, DAY_2 = datetime(2026, 3, 1, tzinfo=UTC), datetime(2026, 3, 2, tzinfo=UTC)
# A deployment failed, the next one served: the call fell back.
FALLBACK = [
    {"deployment": "mock-z", "error_code": "rate_limited", "latency_ms": 9},
    {"deployment": "mock-a", "latency_ms": 40},
]
SERVED = [{"deployment": "mock-a", "latency_ms": 40}]


def _record(team, request_id, at, **fields):
    values = {
        "organization": team.organization,
        "team": team,
        "endpoint": "chat/completions",
        "requested_model": "chat",
        "status": UsageStatus.SUCCESS,
        "created_at": at,
        "prompt_tokens": 7,
        "completion_tokens": 5,
        "cost_micros": 11,
        "credits_micros": 13,
        "latency_ms": 100,
    }
    values.update(fields)
    return usage_record_create(request_id=request_id, **values)


def _bob(model_group):
    organization = organization_create(organization_id="org_bob", name="Bob Ltd")
    return team_create(
        organization=organization, team_id="team_bob", model_groups=[model_group]
    )


def _charlie():
    organization = organization_create(organization_id="org_charlie", name="C")
    return team_create(organization=organization, team_id="team_charlie")


def _mixed_records(team, deployment, model_group):
    """200 records of two teams over HOURS, every dimension varied; seeded."""
    bob = _bob(model_group)
    other_group = model_group_create(group_name="chat-2", members=[(deployment, 0)])
    alice_keys = [virtual_key_issue(team=team, alias=a)[0] for a in ("k1", "k2")]
    bob_key = virtual_key_issue(team=bob, alias="kb")[0]
    rng = random.Random(20260301)
    for n in range(200):
        owner, keys = rng.choice([(team, [*alice_keys, None]), (bob, [bob_key])])
        prompt, completion = rng.randint(0, 5000), rng.randint(0, 2000)
        _record(
            owner,
            f"req_{n}",
            rng.choice(HOURS) + timedelta(seconds=rng.randint(0, 3599)),
            virtual_key=rng.choice(keys),
            model_group=rng.choice([model_group, other_group, None]),
            deployment=rng.choice([deployment, None]),
            status=rng.choice(list(UsageStatus)),
            cached=rng.random() < 0.2,
            fallbacks_tried=FALLBACK if rng.random() < 0.3 else SERVED,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_micros=rng.randint(0, 10**7),
            credits_micros=rng.randint(0, 10**7),
            latency_ms=rng.choice([0, 1, 7, 250, 1999, 30_000, 700_000]),
        )
    return bob


def _raw_totals(key):
    """Sums of the raw records grouped by ``key(record)``, computed apart from
    the rollup code."""
    totals = defaultdict(lambda: [0] * len(SUMS))
    for r in UsageRecord.objects.all():
        success = r.status == UsageStatus.SUCCESS
        values = (
            1,
            int(success),
            int(not success),
            int(r.cached),
            int(len(r.fallbacks_tried) > 1),
            r.prompt_tokens,
            r.completion_tokens,
            r.total_tokens,
            r.cost_micros,
            r.credits_micros,
            r.latency_ms,
        )
        group = totals[key(r)]
        group[:] = [a + b for a, b in zip(group, values, strict=True)]
    return {k: tuple(v) for k, v in totals.items()}


def _rollup_totals(granularity, *dimensions):
    rows = (
        UsageRollup.objects.filter(granularity=granularity)
        .values(*dimensions)
        .annotate(**{f"sum_{f}": Sum(f) for f in SUMS})
        .order_by()
    )
    return {
        tuple(row[d] for d in dimensions): tuple(row[f"sum_{f}"] for f in SUMS)
        for row in rows
    }


def _hour_of(moment):
    return moment.replace(minute=0, second=0, microsecond=0)


def _day_of(moment):
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def _all_rows():
    fields = [f.attname for f in UsageRollup._meta.concrete_fields if f.name != "id"]
    return sorted(
        tuple(str(v) for v in row) for row in UsageRollup.objects.values_list(*fields)
    )


def _state():
    state = RollupState.objects.get(name="usage")
    return state.rolled_up_until, state.days_rolled_up_until


@pytest.mark.django_db
@pytest.mark.parametrize(
    "dimension", ["organization", "team", "virtual_key", "model_group", "deployment"]
)
def test_rollups_sum_exactly_to_the_raw_records(
    team, deployment, model_group, dimension
):
    _mixed_records(team, deployment, model_group)

    done = usage_roll_up(now=HOURS[-1] + timedelta(hours=1) + GRACE)

    assert (done["hours"], done["days"]) == (4, 2)
    assert UsageRollup.objects.filter(granularity="hour").count() == done["hour_rows"]
    assert UsageRollup.objects.filter(granularity="day").count() == done["day_rows"]
    attribute = f"{dimension}_id"
    overall = _raw_totals(lambda r: (getattr(r, attribute),))
    assert len(overall) > 1
    assert _rollup_totals("hour", dimension) == overall
    assert _rollup_totals("day", dimension) == overall
    per_hour = _raw_totals(lambda r: (_hour_of(r.created_at), getattr(r, attribute)))
    assert _rollup_totals("hour", "bucket_start", dimension) == per_hour
    per_day = _raw_totals(lambda r: (_day_of(r.created_at), getattr(r, attribute)))
    assert _rollup_totals("day", "bucket_start", dimension) == per_day
    assert _state() == (HOURS[-1] + timedelta(hours=1),) * 2


@pytest.mark.django_db
def test_rollups_sum_per_team_and_model_group_and_keep_tenants_apart(
    team, deployment, model_group
):
    bob = _mixed_records(team, deployment, model_group)
    charlie = _charlie()

    usage_roll_up(now=HOURS[-1] + timedelta(hours=1) + GRACE)

    expected = _raw_totals(lambda r: (r.team_id, r.model_group_id))
    assert _rollup_totals("day", "team", "model_group") == expected
    alice_rows = UsageRollup.objects.filter(team=team)
    assert set(alice_rows.values_list("organization_id", flat=True)) == {
        team.organization_id
    }
    assert not alice_rows.filter(virtual_key__team=bob).exists()
    assert not UsageRollup.objects.filter(team=bob, virtual_key__team=team).exists()
    assert not UsageRollup.objects.filter(team=charlie).exists()
    assert not UsageRollup.objects.filter(organization=charlie.organization).exists()


@pytest.mark.django_db
def test_latency_max_and_histogram_of_each_row_match_its_records(
    team, deployment, model_group
):
    _mixed_records(team, deployment, model_group)

    usage_roll_up(now=HOURS[-1] + timedelta(hours=1) + GRACE)

    latencies = defaultdict(list)
    for r in UsageRecord.objects.all():
        grain = (r.team_id, r.virtual_key_id, r.model_group_id, r.deployment_id)
        latencies["hour", _hour_of(r.created_at), *grain].append(r.latency_ms)
        latencies["day", _day_of(r.created_at), *grain].append(r.latency_ms)
    rows = UsageRollup.objects.all()
    assert rows.count() == len(latencies)
    for row in rows:
        values = latencies[
            row.granularity,
            row.bucket_start,
            row.team_id,
            row.virtual_key_id,
            row.model_group_id,
            row.deployment_id,
        ]
        histogram = defaultdict(int)
        for value in values:
            histogram[str(latency_bucket(value))] += 1
        assert (row.requests, row.latency_max_ms) == (len(values), max(values))
        assert row.latency_histogram == dict(histogram)


@pytest.mark.django_db
def test_records_land_in_their_hour_and_day_across_boundaries(team):
    _record(team, "req_a", datetime(2026, 3, 1, 22, 59, 59, 999999, tzinfo=UTC))
    _record(team, "req_b", datetime(2026, 3, 1, 23, 0, tzinfo=UTC))
    _record(team, "req_c", datetime(2026, 3, 1, 23, 59, 59, 999999, tzinfo=UTC))
    _record(team, "req_d", datetime(2026, 3, 2, 0, 0, tzinfo=UTC))

    usage_roll_up(now=datetime(2026, 3, 2, 1, tzinfo=UTC) + GRACE)

    rows = UsageRollup.objects.order_by("granularity", "bucket_start")
    assert list(rows.values_list("granularity", "bucket_start", "requests")) == [
        ("day", DAY_1, 3),
        ("day", DAY_2, 1),
        ("hour", datetime(2026, 3, 1, 22, tzinfo=UTC), 1),
        ("hour", datetime(2026, 3, 1, 23, tzinfo=UTC), 2),
        ("hour", DAY_2, 1),
    ]


@pytest.mark.django_db
def test_a_record_with_malformed_fallbacks_is_rolled_up_with_the_others(team):
    # Given records of one hour, two of whose attempt lists were written
    # behind the services' back (hours roll up in order: one record that
    # raised would stop the rollups of every tenant).
    hour = datetime(2026, 3, 1, 10, tzinfo=UTC)
    _record(team, "req_ints", hour, fallbacks_tried=[1, 2, 3])
    _record(team, "req_dict", hour, fallbacks_tried={"deployment": "mock-a"})
    _record(team, "req_fell_back", hour, fallbacks_tried=FALLBACK)

    done = usage_roll_up(now=hour + timedelta(hours=1) + GRACE)

    assert done == {"hours": 1, "hour_rows": 1, "days": 1, "day_rows": 1}
    assert list(
        UsageRollup.objects.order_by("granularity").values_list(
            "granularity", "requests", "fallbacks"
        )
    ) == [("day", 3, 1), ("hour", 3, 1)]


@pytest.mark.django_db
def test_records_within_the_grace_period_wait_for_the_next_run(team):
    _record(team, "req_early", datetime(2026, 3, 1, 10, 30, tzinfo=UTC))
    _record(team, "req_late", datetime(2026, 3, 1, 11, 59, 50, tzinfo=UTC))
    noon = datetime(2026, 3, 1, 12, tzinfo=UTC)

    rows = UsageRollup.objects.order_by("granularity", "bucket_start")

    inside = usage_roll_up(now=noon + GRACE - timedelta(microseconds=1))
    rows_inside = list(rows.values_list("granularity", "bucket_start", "requests"))
    past = usage_roll_up(now=noon + GRACE)

    assert (inside["hours"], past["hours"]) == (1, 1)
    assert rows_inside == [
        ("day", DAY_1, 1),
        ("hour", datetime(2026, 3, 1, 10, tzinfo=UTC), 1),
    ]
    assert list(rows.values_list("granularity", "bucket_start", "requests")) == [
        ("day", DAY_1, 2),
        ("hour", datetime(2026, 3, 1, 10, tzinfo=UTC), 1),
        ("hour", datetime(2026, 3, 1, 11, tzinfo=UTC), 1),
    ]
    assert _state() == (noon, noon)


@pytest.mark.django_db
def test_a_second_run_and_a_forced_recompute_change_nothing(
    team, deployment, model_group
):
    _mixed_records(team, deployment, model_group)
    now = HOURS[-1] + timedelta(hours=1) + GRACE
    usage_roll_up(now=now)
    first = _all_rows()

    again = usage_roll_up(now=now)
    unchanged = _all_rows()
    RollupState.objects.update(rolled_up_until=None, days_rolled_up_until=None)
    redone = usage_roll_up(now=now)

    assert again == {"hours": 0, "hour_rows": 0, "days": 0, "day_rows": 0}
    assert unchanged == first
    assert (redone["hours"], redone["days"]) == (4, 2)
    assert _all_rows() == first


@pytest.mark.django_db
def test_an_incremental_run_adds_only_the_new_hour(team, deployment, model_group):
    _mixed_records(team, deployment, model_group)
    usage_roll_up(now=HOURS[-1] + timedelta(hours=1) + GRACE)
    hourly_before = sorted(
        UsageRollup.objects.filter(granularity="hour").values_list("pk", "requests")
    )
    day_1_before = sorted(
        UsageRollup.objects.filter(bucket_start=DAY_1).values_list("pk", "requests")
    )
    later = HOURS[-1] + timedelta(hours=2, minutes=5)  # 03:05; 02:00 stays empty
    _record(team, "req_new_1", later, cost_micros=1000)
    _record(team, "req_new_2", later, cost_micros=2000, status=UsageStatus.ERROR)
    day_2_raw = _raw_totals(lambda r: _day_of(r.created_at))[DAY_2]

    done = usage_roll_up(now=later + timedelta(hours=1))

    assert (done["hours"], done["hour_rows"], done["days"]) == (2, 1, 1)
    new = UsageRollup.objects.filter(granularity="hour").exclude(
        pk__in=[pk for pk, _ in hourly_before]
    )
    assert list(
        new.values_list("bucket_start", "requests", "errors", "cost_micros")
    ) == [(datetime(2026, 3, 2, 3, tzinfo=UTC), 2, 1, 3000)]
    assert (
        sorted(
            UsageRollup.objects.filter(
                granularity="hour", pk__in=[pk for pk, _ in hourly_before]
            ).values_list("pk", "requests")
        )
        == hourly_before
    )
    assert (
        sorted(
            UsageRollup.objects.filter(bucket_start=DAY_1).values_list("pk", "requests")
        )
        == day_1_before
    )
    assert _rollup_totals("day", "bucket_start")[DAY_2,] == day_2_raw
    assert _state() == (datetime(2026, 3, 2, 4, tzinfo=UTC),) * 2


@pytest.mark.django_db
def test_at_most_max_hours_a_run_and_the_next_run_continues(team):
    for n in range(5):
        _record(team, f"req_{n}", FIRST_HOUR + timedelta(hours=n, minutes=1))
    now = FIRST_HOUR + timedelta(hours=5) + GRACE

    first = usage_roll_up(now=now, max_hours=2)
    state_after_first = _state()
    second = usage_roll_up(now=now, max_hours=2)
    third = usage_roll_up(now=now, max_hours=2)

    assert [first["hours"], second["hours"], third["hours"]] == [2, 2, 1]
    assert state_after_first == (HOURS[2], HOURS[2])
    assert _rollup_totals("day", "bucket_start") == _raw_totals(
        lambda r: (_day_of(r.created_at),)
    )


@pytest.mark.django_db
def test_nothing_to_roll_up_without_records(db):
    done = usage_roll_up(now=FIRST_HOUR)

    assert done == {"hours": 0, "hour_rows": 0, "days": 0, "day_rows": 0}
    assert _state() == (None, None)
    assert usage_prune(now=FIRST_HOUR) == 0


def test_latency_buckets_are_fixed_log_spaced_with_an_overflow():
    assert LATENCY_BUCKETS_MS[:12] == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20, 25)
    assert LATENCY_BUCKETS_MS[-3:] == (574_586, 600_000, 2_147_483_647)
    assert len(LATENCY_BUCKETS_MS) == 59
    assert [latency_bucket(v) for v in (0, 1, 7, 8, 600_000, 600_001)] == [
        1,
        1,
        8,
        8,
        600_000,
        2_147_483_647,
    ]


def test_percentiles_of_a_histogram_are_bucket_bounds():
    histogram = {"10": 50, "13": 45, "600000": 4, "2147483647": 1}
    dense = [0] * len(LATENCY_BUCKETS_MS)
    dense[LATENCY_BUCKETS_MS.index(10)] = 3

    assert latency_percentiles(histogram, (1, 50, 95, 96, 99, 100)) == {
        1: 10,
        50: 10,
        95: 13,
        96: 600_000,
        99: 600_000,
        100: 2_147_483_647,
    }
    assert latency_percentiles(dense, (50,)) == {50: 10}
    assert latency_percentiles({}) == {50: 0, 95: 0, 99: 0}
    assert latency_histogram_merge([{"10": 1, "13": 2}, {"13": 3, "8": 4}]) == {
        "8": 4,
        "10": 1,
        "13": 5,
    }
    with pytest.raises(ValueError, match=r"quantile 0 is not in 1\.\.100"):
        latency_percentiles(histogram, (0,))


@pytest.mark.django_db
def test_percentiles_from_merged_rows_bound_the_true_percentiles(team):
    alice_key = virtual_key_issue(team=team, alias="k1")[0]
    rng = random.Random(7)
    latencies = [rng.randint(0, 20_000) for _ in range(500)]
    for n, latency in enumerate(latencies):
        _record(
            team,
            f"req_{n}",
            HOURS[n % 4] + timedelta(minutes=n % 60),
            virtual_key=alice_key if n % 2 else None,
            latency_ms=latency,
        )
    usage_roll_up(now=HOURS[-1] + timedelta(hours=1) + GRACE)
    ordered = sorted(latencies)

    for granularity in ("hour", "day"):
        rows = UsageRollup.objects.filter(granularity=granularity, team=team)
        merged = latency_histogram_merge(r.latency_histogram for r in rows)
        estimates = latency_percentiles(merged, (50, 90, 95, 99, 100))

        assert sum(merged.values()) == 500
        for quantile, estimate in estimates.items():
            true = ordered[-(-quantile * 500 // 100) - 1]
            below = LATENCY_BUCKETS_MS[LATENCY_BUCKETS_MS.index(estimate) - 1]
            assert below < true <= estimate, (quantile, true, estimate)


@pytest.mark.django_db
def test_prune_deletes_old_rolled_up_records_in_batches_only(team, settings):
    settings.GATEWAY_USAGE_RETENTION_DAYS = 2
    settings.GATEWAY_RETENTION_BATCH_SIZE = 2
    now = datetime(2026, 6, 1, 12, 30, tzinfo=UTC)
    old_hour = now - timedelta(days=3)
    for n in range(5):
        _record(team, f"req_old_{n}", old_hour + timedelta(minutes=n))
    _record(team, "req_old_later", old_hour + timedelta(hours=1, minutes=5))
    _record(team, "req_young", now - timedelta(days=1))
    usage_roll_up(now=_hour_of(old_hour) + timedelta(hours=1) + GRACE, max_hours=1)
    rollups = _all_rows()

    with CaptureQueriesContext(connection) as queries:
        deleted = usage_prune(now=now)

    assert deleted == 5
    deletes = [q for q in queries.captured_queries if q["sql"].startswith("DELETE")]
    assert len(deletes) == 3  # batches of 2, 2 and 1
    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == [
        "req_old_later",  # old, but not rolled up yet
        "req_young",
    ]
    assert _all_rows() == rollups

    usage_roll_up(now=now, max_hours=100)
    assert usage_prune(now=now) == 1
    assert list(UsageRecord.objects.values_list("request_id", flat=True)) == [
        "req_young"
    ]
    assert usage_prune(now=now) == 0
    assert UsageRollup.objects.filter(granularity="hour").aggregate(
        total=Sum("requests")
    ) == {"total": 7}


@pytest.mark.django_db
def test_the_manual_commands_roll_up_and_prune(team, settings):
    settings.GATEWAY_USAGE_RETENTION_DAYS = 1
    now = timezone.now()
    _record(team, "req_old", now - timedelta(days=2))
    _record(team, "req_recent", now - timedelta(hours=3))
    _record(team, "req_now", now)
    roll_out, prune_out = io.StringIO(), io.StringIO()

    call_command("roll_up_usage", max_hours=1000, stdout=roll_out)
    call_command("prune_usage", stdout=prune_out)

    rolled = re.fullmatch(
        r"(\d+) hours rolled up \(2 rows\), (\d) days recomputed \(2 rows\); "
        r"rolled up until (\S+)\n",
        roll_out.getvalue(),
    )
    assert rolled is not None, roll_out.getvalue()
    assert int(rolled[2]) in (2, 3)  # 3 unless the watermark is at midnight
    until = datetime.fromisoformat(rolled[3])
    assert _state()[0] == until
    assert _hour_of(now - GRACE) <= until <= _hour_of(timezone.now() - GRACE)
    assert int(rolled[1]) == (until - _hour_of(now - timedelta(days=2))) // timedelta(
        hours=1
    )
    assert prune_out.getvalue() == (
        "1 usage records deleted: rolled up and past the 1-day retention\n"
    )
    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == [
        "req_now",
        "req_recent",
    ]


SUCCEEDED = re.compile(r"Task billing\.usage_roll_up\[[^\]]+\] succeeded in")


def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the worker did not do it in time"
        time.sleep(0.1)


def test_a_real_worker_rolls_up_once_when_sent_twice(
    celery_worker_process, team, model_group
):
    bob = _bob(model_group)
    now = timezone.now()
    for n, owner in enumerate([team, team, bob, team]):
        _record(owner, f"req_{n}", now - timedelta(hours=3 - n % 2), cost_micros=n)

    usage_roll_up_task.delay()
    usage_roll_up_task.delay()

    def finished() -> int:
        return len(SUCCEEDED.findall(celery_worker_process.read_text()))

    _wait(lambda: finished() == 2)
    log = celery_worker_process.read_text()
    assert "{'hours': 0, 'hour_rows': 0, 'days': 0, 'day_rows': 0}" in log
    assert _rollup_totals("hour", "bucket_start", "team") == _raw_totals(
        lambda r: (_hour_of(r.created_at), r.team_id)
    )
    assert _rollup_totals("day", "team") == _raw_totals(lambda r: (r.team_id,))
    assert UsageRollup.objects.filter(granularity="hour").count() == 3
    rolled_up_until, days_until = _state()
    assert rolled_up_until == days_until >= _hour_of(now - timedelta(hours=1))
