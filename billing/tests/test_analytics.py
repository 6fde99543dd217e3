"""Usage analytics equal sums taken directly over UsageRecord, exactly, across
a rollup boundary: whole days and hours come from the rollups, the edges and
the tail after the watermark from raw records — for operators and team keys."""

import csv
import io
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal

import pytest
from django.apps import apps
from django.conf import settings as django_settings
from django.test import Client
from django.utils import timezone

from billing.analytics import usage_by, usage_series, usage_summary
from billing.models import RollupState, UsageRecord, UsageRollup, UsageStatus
from billing.rollups import latency_bucket, usage_prune, usage_roll_up
from billing.services import usage_record_create
from routing.models import ModelGroup
from routing.services import deployment_create, model_group_create
from tenants.models import Team, VirtualKey
from tenants.services import organization_create, team_create, virtual_key_issue

ADMIN_KEY = "analytics-admin-key"
# Records from 20:00 on 28 February to 03:00 on 2 March, none from 05:00 to
# 06:00 on 1 March. Rolled up until 01:00 on 2 March: 1 March is a whole day
# of the daily rollups, the hours around it come from the hourly ones.
FIRST_HOUR = datetime(2026, 2, 28, 20, tzinfo=UTC)
EMPTY_HOUR = datetime(2026, 3, 1, 5, tzinfo=UTC)
HOURS = [
    hour
    for hour in (FIRST_HOUR + timedelta(hours=n) for n in range(31))
    if hour != EMPTY_HOUR
]
WATERMARK = datetime(2026, 3, 2, 1, tzinfo=UTC)
# Both edges cut an hour: the first before the watermark, the last after it.
START = datetime(2026, 2, 28, 20, 30, tzinfo=UTC)
END = datetime(2026, 3, 2, 2, 15, tzinfo=UTC)
COUNTS = (
    "requests",
    "successes",
    "errors",
    "cache_hits",
    "fallbacks",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
)
# A deployment failed, the next one served: the call fell back.
FALLBACK = [
    {"deployment": "mock-b", "error_code": "rate_limited", "latency_ms": 9},
    {"deployment": "mock-a", "latency_ms": 40},
]
SERVED = [{"deployment": "mock-a", "latency_ms": 40}]
LATENCIES = [0, 1, 7, 99, 250, 1999, 30_000, 700_000]


@dataclass
class World:
    alice: Team
    alice_2: Team  # another team of Alice's organization
    bob: Team
    charlie: Team  # has keys, never any usage
    keys: dict[str, tuple[VirtualKey, str]]


def _record(team, request_id, at, rng, keys, groups, deployments):
    prompt, completion = rng.randint(0, 5000), rng.randint(0, 2000)
    return usage_record_create(
        request_id=request_id,
        organization=team.organization,
        team=team,
        virtual_key=rng.choice(keys),
        model_group=rng.choice(groups),
        deployment=rng.choice(deployments),
        endpoint="chat/completions",
        requested_model="chat",
        status=rng.choice(list(UsageStatus)),
        cached=rng.random() < 0.2,
        fallbacks_tried=FALLBACK if rng.random() < 0.3 else SERVED,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost_micros=rng.randint(0, 10**7),
        credits_micros=rng.randint(0, 10**7),
        latency_ms=rng.choice(LATENCIES),
        created_at=at,
    )


@pytest.fixture
def world(team, deployment, model_group) -> World:
    """Three organizations' usage over HOURS, rolled up until WATERMARK, then
    more usage in the tail after it; seeded."""
    mock_b = deployment_create(
        name="mock-b", model="openai/mock-b", litellm_params={"mock_response": "b"}
    )
    chat_2 = model_group_create(group_name="chat-2", members=[(mock_b, 0)])
    alice_2 = team_create(organization=team.organization, team_id="team_alice_2")
    bob = team_create(
        organization=organization_create(organization_id="org_bob", name="Bob"),
        team_id="team_bob",
    )
    charlie = team_create(
        organization=organization_create(organization_id="org_charlie", name="C"),
        team_id="team_charlie",
    )
    keys = {
        name: virtual_key_issue(team=owner, alias=name)
        for name, owner in [
            ("alice", team),
            ("alice_spare", team),
            ("alice_2", alice_2),
            ("bob", bob),
            ("charlie", charlie),
        ]
    }
    owners = [
        (team, [keys["alice"][0], keys["alice_spare"][0], None]),
        (alice_2, [keys["alice_2"][0]]),
        (bob, [keys["bob"][0]]),
    ]
    groups, deployments = [model_group, chat_2, None], [deployment, mock_b, None]
    rng = random.Random(20260228)

    def record(n: int, hours: list[datetime]) -> None:
        owner, owner_keys = rng.choice(owners)
        at = rng.choice(hours) + timedelta(seconds=rng.randint(0, 3599))
        _record(owner, f"req_{n}", at, rng, owner_keys, groups, deployments)

    for n in range(300):
        record(n, HOURS)
    grace = timedelta(seconds=django_settings.GATEWAY_ROLLUP_GRACE_SECONDS)
    usage_roll_up(now=WATERMARK + grace)
    state = RollupState.objects.get(name="usage")
    assert (state.rolled_up_until, state.days_rolled_up_until) == (WATERMARK,) * 2
    for n in range(300, 340):
        record(n, [WATERMARK, WATERMARK + timedelta(hours=1)])
    return World(alice=team, alice_2=alice_2, bob=bob, charlie=charlie, keys=keys)


# --- expected figures, computed over the raw records apart from the code ------


def _records(start=START, end=END, **scope):
    return list(
        UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end, **scope)
    )


def _rate(part, whole):
    if not whole:
        return Decimal("0.0000")
    return (Decimal(part) / Decimal(whole)).quantize(Decimal("0.0001"), ROUND_HALF_UP)


def _percentile(bounds, quantile, slowest):
    """Nearest rank over the latencies' bucket bounds, capped at the slowest."""
    if not bounds:
        return 0
    return min(bounds[math.ceil(quantile * len(bounds) / 100) - 1], slowest)


def _expected(records):
    successes = sum(r.status == UsageStatus.SUCCESS for r in records)
    bounds = sorted(latency_bucket(r.latency_ms) for r in records)
    slowest = max((r.latency_ms for r in records), default=0)
    figures = {
        "requests": len(records),
        "successes": successes,
        "errors": len(records) - successes,
        "cache_hits": sum(r.cached for r in records),
        "fallbacks": sum(len(r.fallbacks_tried) > 1 for r in records),
        "prompt_tokens": sum(r.prompt_tokens for r in records),
        "completion_tokens": sum(r.completion_tokens for r in records),
        "total_tokens": sum(r.total_tokens for r in records),
        "cost_micros": sum(r.cost_micros for r in records),
        "credits_micros": sum(r.credits_micros for r in records),
        "latency_sum_ms": sum(r.latency_ms for r in records),
        "latency_max_ms": slowest,
        "latency_p50_ms": _percentile(bounds, 50, slowest),
        "latency_p95_ms": _percentile(bounds, 95, slowest),
        "latency_p99_ms": _percentile(bounds, 99, slowest),
    }
    figures["error_rate"] = _rate(figures["errors"], len(records))
    figures["cache_hit_rate"] = _rate(figures["cache_hits"], len(records))
    return figures


def _grouped(records, key):
    groups = defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    return {value: _expected(group) for value, group in groups.items()}


def _usd(micros):
    return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"


def _json(figures):
    """The expected JSON of figures: money and rates as decimal strings."""
    return {
        **{name: figures[name] for name in COUNTS},
        "cost_usd": _usd(figures["cost_micros"]),
        "cost_micros": figures["cost_micros"],
        "credits": _usd(figures["credits_micros"]),
        "credits_micros": figures["credits_micros"],
        "latency_p50_ms": figures["latency_p50_ms"],
        "latency_p95_ms": figures["latency_p95_ms"],
        "latency_p99_ms": figures["latency_p99_ms"],
        "latency_max_ms": figures["latency_max_ms"],
        "error_rate": str(figures["error_rate"]),
        "cache_hit_rate": str(figures["cache_hit_rate"]),
    }


def _floor(moment, granularity):
    hour = moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return hour.replace(hour=0) if granularity == "day" else hour


def _buckets(granularity, start=START, end=END):
    step = timedelta(days=1) if granularity == "day" else timedelta(hours=1)
    bucket, buckets = _floor(start, granularity), []
    while bucket < end:
        buckets.append(bucket)
        bucket += step
    return buckets


# --- the API -------------------------------------------------------------------


def _get(path, *, key=None, **params):
    headers = (
        {"HTTP_AUTHORIZATION": f"Bearer {key}"}
        if key
        else {"HTTP_X_ADMIN_KEY": ADMIN_KEY}
    )
    return Client().get(path, params, **headers)


def _range(start=START, end=END):
    return {"start": start.isoformat(), "end": end.isoformat()}


def _snapshot():
    return {
        model._meta.label: list(model._base_manager.order_by("pk").values())
        for label in ("accounts", "tenants", "billing")
        for model in apps.get_app_config(label).get_models()
    }


@pytest.fixture(autouse=True)
def _admin_key(settings):
    settings.GATEWAY_ADMIN_KEY = ADMIN_KEY


# --- the selectors -----------------------------------------------------------


@pytest.mark.django_db
def test_the_range_is_read_from_rollups_and_raw_records(world):
    # Given: the rollups hold whole hours before WATERMARK and 1 March as a day
    assert UsageRollup.objects.filter(granularity="day").exists()
    assert UsageRollup.objects.filter(bucket_start__gte=WATERMARK).count() == 0
    tail = _records(start=WATERMARK)
    assert len(tail) > 20  # the tail has records rolled up nowhere
    edge = _records(end=datetime(2026, 2, 28, 21, tzinfo=UTC))
    assert edge  # so has the partial first hour

    # When
    summary = usage_summary(start=START, end=END)

    # Then
    assert summary == _expected(_records())


@pytest.mark.django_db
@pytest.mark.parametrize("scope", ["all", "team", "organization"])
def test_summary_equals_the_records(world, scope):
    arguments, filters = {
        "all": ({}, {}),
        "team": ({"team": world.alice}, {"team": world.alice}),
        "organization": (
            {"organization": world.alice.organization},
            {"organization": world.alice.organization},
        ),
    }[scope]

    summary = usage_summary(start=START, end=END, **arguments)

    assert summary == _expected(_records(**filters))
    assert summary["requests"] > 0


@pytest.mark.django_db
@pytest.mark.parametrize(
    "dimension", ["model_group", "deployment", "virtual_key", "team", "organization"]
)
def test_usage_by_equals_the_records_per_value(world, dimension):
    rows = usage_by(dimension=dimension, start=START, end=END)

    figures = {row["id"]: {name: row[name] for name in _expected([])} for row in rows}
    expected = _grouped(_records(), lambda r: getattr(r, f"{dimension}_id"))
    assert figures == expected
    assert len(rows) > 1
    costs = [row["cost_micros"] for row in rows]
    assert costs == sorted(costs, reverse=True)


@pytest.mark.django_db
def test_usage_by_labels_each_value(world, model_group):
    rows = usage_by(dimension="model_group", start=START, end=END, team=world.alice)
    keys = usage_by(dimension="virtual_key", start=START, end=END, team=world.alice)

    assert {row["id"]: row["label"] for row in rows} == {
        model_group.pk: "chat",
        ModelGroup.objects.get(group_name="chat-2").pk: "chat-2",
        None: "(none)",
    }
    alice, _ = world.keys["alice"]
    labelled = {
        row["id"]: (row["label"], row.get("alias"), row.get("key_id")) for row in keys
    }
    assert labelled[alice.pk] == (alice.display_prefix, "alice", alice.public_id)
    assert labelled[None] == ("(none)", None, None)
    assert set(labelled) == {alice.pk, world.keys["alice_spare"][0].pk, None}


@pytest.mark.django_db
@pytest.mark.parametrize("granularity", ["hour", "day"])
def test_series_equals_the_records_per_bucket_with_empty_ones(world, granularity):
    points = usage_series(
        granularity=granularity, start=START, end=END, team=world.alice
    )

    records = _records(team=world.alice)
    expected = _grouped(records, lambda r: _floor(r.created_at, granularity))
    empty = _expected([])
    assert [point["bucket_start"] for point in points] == _buckets(granularity)
    assert points == [
        {"bucket_start": bucket, **expected.get(bucket, empty)}
        for bucket in _buckets(granularity)
    ]
    assert len(points) == {"hour": 31, "day": 3}[granularity]
    if granularity == "hour":
        (gap,) = [p for p in points if p["bucket_start"] == EMPTY_HOUR]
        assert gap == {"bucket_start": EMPTY_HOUR, **empty}
        assert gap["requests"] == 0


@pytest.mark.django_db
def test_figures_survive_the_retention_of_rolled_up_records(world):
    # Given: hour-aligned start, so every raw record before the watermark is
    # in the range's rollups
    start = FIRST_HOUR
    expected = _expected(_records(start=start))
    by_key = _grouped(_records(start=start), lambda r: r.virtual_key_id)
    series = _grouped(_records(start=start), lambda r: _floor(r.created_at, "day"))

    # When: retention deletes every raw record behind the watermark
    deleted = usage_prune(now=WATERMARK + timedelta(days=400))

    # Then
    assert deleted > 250
    assert UsageRecord.objects.filter(created_at__lt=WATERMARK).count() == 0
    assert usage_summary(start=start, end=END) == expected
    rows = usage_by(dimension="virtual_key", start=start, end=END)
    assert {row["id"]: row["cost_micros"] for row in rows} == {
        pk: figures["cost_micros"] for pk, figures in by_key.items()
    }
    points = usage_series(granularity="day", start=start, end=END)
    assert [p["requests"] for p in points] == [
        series[bucket]["requests"] for bucket in _buckets("day", start=start)
    ]


@pytest.mark.django_db
def test_a_day_behind_the_daily_watermark_is_read_from_its_hours(world):
    # Given: 1 March's daily rows are wrong, and read while the daily
    # watermark says they are whole
    day = datetime(2026, 3, 1, tzinfo=UTC)
    UsageRollup.objects.filter(granularity="day", bucket_start=day).update(
        requests=0, cost_micros=0
    )
    assert usage_summary(start=START, end=END) != _expected(_records())
    # ... and a run stopped between the hours and the days: the daily
    # watermark still at the start of 1 March
    RollupState.objects.filter(name="usage").update(days_rolled_up_until=day)

    summary = usage_summary(start=START, end=END)
    points = usage_series(granularity="day", start=START, end=END)

    assert summary == _expected(_records())
    assert points[1] == {
        "bucket_start": day,
        **_expected(_records(start=day, end=day + timedelta(days=1))),
    }


@pytest.mark.django_db
def test_without_any_rollup_everything_comes_from_raw_records(team):
    # Given: records and no rollup run at all
    rng = random.Random(7)
    for n in range(30):
        _record(team, f"raw_{n}", rng.choice(HOURS), rng, [None], [None], [None])

    summary = usage_summary(start=START, end=END, team=team)

    assert not RollupState.objects.exists()
    assert summary == _expected(_records(team=team))


@pytest.mark.django_db
def test_selectors_refuse_bad_arguments():
    with pytest.raises(ValueError, match="dimension"):
        usage_by(dimension="colour", start=START, end=END)
    with pytest.raises(ValueError, match="granularity"):
        usage_series(granularity="minute", start=START, end=END)
    with pytest.raises(ValueError, match="after start"):
        usage_summary(start=END, end=START)
    with pytest.raises(ValueError, match="aware"):
        usage_summary(start=START.replace(tzinfo=None), end=END)


# --- the API ---------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("actor", ["admin", "team_key"])
def test_summary_api_equals_the_records(world, actor):
    key = world.keys["alice"][1] if actor == "team_key" else None

    response = _get("/api/usage/summary", key=key, **_range())

    filters = {"team": world.alice} if key else {}
    assert response.status_code == 200, response.content
    assert response.json() == {
        "start": "2026-02-28T20:30:00+00:00",
        "end": "2026-03-02T02:15:00+00:00",
        "team_id": "team_alice" if key else None,
        "organization_id": None,
        "summary": _json(_expected(_records(**filters))),
    }


def _labels(path, record):
    """The label columns of a breakdown row for a record's value."""
    if path == "by-model-group":
        group = record.model_group
        return {"model_group": None if group is None else group.group_name}
    if path == "by-deployment":
        deployment = record.deployment
        return {"deployment": None if deployment is None else deployment.name}
    key = record.virtual_key
    if key is None:
        return {"key_id": None, "key": None, "alias": None}
    return {"key_id": key.public_id, "key": key.display_prefix, "alias": key.alias}


@pytest.mark.django_db
@pytest.mark.parametrize("actor", ["admin", "team_key"])
@pytest.mark.parametrize(
    ("path", "dimension"),
    [
        ("by-model-group", "model_group"),
        ("by-deployment", "deployment"),
        ("by-key", "virtual_key"),
    ],
)
def test_breakdown_api_equals_the_records(world, actor, path, dimension):
    key = world.keys["alice"][1] if actor == "team_key" else None

    response = _get(f"/api/usage/{path}", key=key, **_range())

    records = _records(**({"team": world.alice} if key else {}))
    groups = defaultdict(list)
    for record in records:
        groups[getattr(record, f"{dimension}_id")].append(record)
    expected = [
        {**_labels(path, group[0]), **_json(_expected(group))}
        for group in groups.values()
    ]
    expected.sort(
        key=lambda row: (
            -row["cost_micros"],
            (row.get("key") if path == "by-key" else row[path[3:].replace("-", "_")])
            or "(none)",
        )
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["dimension"] == dimension
    assert body["team_id"] == ("team_alice" if key else None)
    assert body["rows"] == expected


@pytest.mark.django_db
@pytest.mark.parametrize("actor", ["admin", "team_key"])
@pytest.mark.parametrize("granularity", ["hour", "day"])
def test_series_api_equals_the_records(world, actor, granularity):
    key = world.keys["alice"][1] if actor == "team_key" else None
    params = {**_range(), "granularity": granularity}
    if not key:
        params["team_id"] = "team_alice"

    response = _get("/api/usage/series", key=key, **params)

    grouped = _grouped(
        _records(team=world.alice), lambda r: _floor(r.created_at, granularity)
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["granularity"], body["team_id"]) == (granularity, "team_alice")
    assert body["points"] == [
        {
            "bucket_start": bucket.isoformat(),
            **_json(grouped.get(bucket, _expected([]))),
        }
        for bucket in _buckets(granularity)
    ]


@pytest.mark.django_db
def test_admin_filters_by_organization(world):
    response = _get("/api/usage/summary", organization_id="org_alice", **_range())

    assert response.status_code == 200
    assert response.json()["organization_id"] == "org_alice"
    organization = world.alice.organization
    assert response.json()["summary"] == _json(
        _expected(_records(organization=organization))
    )
    assert response.json()["summary"] != _json(_expected(_records(team=world.alice)))


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path",
    [
        "summary",
        "by-model-group",
        "by-deployment",
        "by-key",
        "series",
        "export.csv?report=by-key",
    ],
)
def test_a_team_without_usage_sees_nothing_of_the_others(world, path):
    # Given: Charlie's key; Alice and Bob have usage in the range
    _, charlie_key = world.keys["charlie"]
    url, _, report = path.partition("?report=")
    params = {**_range(), **({"report": report} if report else {})}

    response = _get(f"/api/usage/{url}", key=charlie_key, **params)

    assert response.status_code == 200, response.content
    if url == "export.csv":
        assert response.content.decode().count("\n") == 1  # the header only
        return
    body = response.json()
    assert body["team_id"] == "team_charlie"
    if url == "summary":
        assert body["summary"] == _json(_expected([]))
    elif url == "series":
        assert {p["requests"] for p in body["points"]} == {0}
        assert len(body["points"]) == 31
    else:
        assert body["rows"] == []


@pytest.mark.django_db
@pytest.mark.parametrize(
    "params",
    [
        {"team_id": "team_bob"},
        {"team_id": "team_alice_2"},
        {"team_id": "team_nobody"},
        {"organization_id": "org_bob"},
    ],
)
@pytest.mark.parametrize(
    "path", ["summary", "by-key", "series", "by-deployment", "export.csv"]
)
def test_a_team_key_asking_for_another_team_is_refused(world, params, path):
    _, alice_key = world.keys["alice"]
    before = _snapshot()

    response = _get(f"/api/usage/{path}", key=alice_key, **_range(), **params)

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "permission_denied"
    assert response.json()["error"]["type"] == "permission_error"
    assert _snapshot() == before


@pytest.mark.django_db
def test_a_team_key_may_name_its_own_team_and_organization(world):
    _, alice_key = world.keys["alice"]

    response = _get(
        "/api/usage/summary",
        key=alice_key,
        team_id="team_alice",
        organization_id="org_alice",
        **_range(),
    )

    assert response.status_code == 200
    assert response.json()["summary"] == _json(_expected(_records(team=world.alice)))


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("report", "path", "field"),
    [
        ("summary", "summary", "summary"),
        ("series", "series?granularity=day", "points"),
        ("series", "series?granularity=hour", "points"),
        ("by-model-group", "by-model-group", "rows"),
        ("by-deployment", "by-deployment", "rows"),
        ("by-key", "by-key", "rows"),
    ],
)
def test_csv_export_equals_the_json(world, report, path, field):
    url, _, granularity = path.partition("?granularity=")
    extra = {"granularity": granularity} if granularity else {}
    body = _get(f"/api/usage/{url}", **_range(), **extra).json()

    response = _get("/api/usage/export.csv", report=report, **_range(), **extra)

    assert response.status_code == 200
    assert response["Content-Type"] == "text/csv"
    assert response["Content-Disposition"] == (
        f'attachment; filename="usage-{report}-20260228T203000Z-20260302T021500Z.csv"'
    )
    rows = list(csv.DictReader(io.StringIO(response.content.decode())))
    expected = body[field] if isinstance(body[field], list) else [body[field]]
    assert len(rows) == len(expected) > 0
    assert rows == [
        {name: "" if value is None else str(value) for name, value in row.items()}
        for row in expected
    ]
    if report == "summary":
        assert rows[0]["cost_usd"] == _usd(_expected(_records())["cost_micros"])


@pytest.mark.django_db
def test_csv_export_defaults_to_the_hourly_series(world):
    response = Client().get(
        "/api/usage/export.csv",
        _range(),
        HTTP_X_ADMIN_KEY=ADMIN_KEY,
        HTTP_ACCEPT="text/csv",
    )

    assert response.status_code == 200
    header, *rows = list(csv.reader(io.StringIO(response.content.decode())))
    assert header[:3] == ["bucket_start", "requests", "successes"]
    assert len(rows) == 31
    assert rows[0][0] == "2026-02-28T20:00:00+00:00"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "params", "status", "param"),
    [
        ("summary", {"start": "yesterday"}, 400, "start"),
        ("summary", {"end": "2026-13-01T00:00:00Z"}, 400, "end"),
        ("summary", {"start": END.isoformat(), "end": START.isoformat()}, 400, "end"),
        ("summary", {"start": START.isoformat(), "end": START.isoformat()}, 400, "end"),
        (
            "by-key",
            {"start": "2025-01-01T00:00:00Z", "end": "2026-02-05T00:00:01Z"},
            400,
            "end",
        ),
        (
            "series",
            {"start": "2026-01-01T00:00:00Z", "end": "2026-02-01T00:00:01Z"},
            400,
            "end",
        ),
        ("series", {"granularity": "minute"}, 400, "granularity"),
        ("export.csv", {"report": "by-colour"}, 400, "report"),
        (
            "export.csv",
            {"start": "2026-01-01T00:00:00Z", "end": "2026-02-01T00:00:01Z"},
            400,
            "end",
        ),
        ("export.csv", {"granularity": "week"}, 400, "granularity"),
        ("summary", {"teamid": "team_alice"}, 400, "teamid"),
        ("summary", {"team_id": "team_nobody"}, 404, "team_id"),
        ("by-key", {"organization_id": "org_nobody"}, 404, "organization_id"),
    ],
)
def test_bad_parameters_are_refused_in_the_envelope(team, path, params, status, param):
    before = _snapshot()

    response = _get(f"/api/usage/{path}", **params)

    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["param"] == param
    assert _snapshot() == before


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("summary", {"start": "2025-01-01T00:00:00Z", "end": "2026-02-05T00:00:00Z"}),
        (
            "series",
            {
                "granularity": "hour",
                "start": "2026-01-01T00:00:00Z",
                "end": "2026-02-01T00:00:00Z",
            },
        ),
        (
            "series",
            {
                "granularity": "day",
                "start": "2025-01-01T00:00:00Z",
                "end": "2026-02-05T00:00:00Z",
            },
        ),
        (
            "export.csv",
            {
                "report": "by-key",
                "start": "2025-01-01T00:00:00Z",
                "end": "2026-02-05T00:00:00Z",
            },
        ),
    ],
)
def test_the_longest_ranges_are_accepted(team, path, params):
    response = _get(f"/api/usage/{path}", **params)

    assert response.status_code == 200, response.content


@pytest.mark.django_db
def test_the_default_range_is_the_last_24_hours(team):
    # The one test on the real clock: the API's default range ends now.
    rng = random.Random(1)
    now = timezone.now()
    for name, at in [
        ("recent", now - timedelta(minutes=5)),
        ("old", now - timedelta(hours=25)),
    ]:
        _record(team, name, at, rng, [None], [None], [None])

    response = _get("/api/usage/summary")

    assert response.status_code == 200
    body = response.json()
    start = datetime.fromisoformat(body["start"])
    end = datetime.fromisoformat(body["end"])
    assert end - start == timedelta(hours=24)
    assert now <= end <= timezone.now()
    recent = UsageRecord.objects.get(request_id="recent")
    assert body["summary"] == _json(_expected([recent]))
    assert Counter(r.request_id for r in _records(start=start, end=end)) == {
        "recent": 1
    }
