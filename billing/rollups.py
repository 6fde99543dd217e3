"""Usage rollups and the retention of raw usage.

``usage_roll_up`` sums raw usage records per UTC hour at the full grain
(organization, team, key, model group, deployment), whole hours after a
watermark, then recomputes the UTC days those hours touched from the hourly
rows. ``usage_prune`` deletes raw records past retention, never one that is not
rolled up yet. Latency is a histogram over fixed log-spaced buckets, so that
percentiles merge across rows, hours and days.
"""

from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing.models import (
    RollupGranularity,
    RollupState,
    UsageRecord,
    UsageRollup,
    UsageStatus,
)

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
STATE_NAME = "usage"
CHUNK_SIZE = 2000

GRAIN = (
    "organization_id",
    "team_id",
    "virtual_key_id",
    "model_group_id",
    "deployment_id",
)
SUMS = (
    "requests",
    "successes",
    "errors",
    "cache_hits",
    "fallbacks",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_micros",
    "credits_micros",
    "latency_sum_ms",
)
# The largest latency a record can hold (a PositiveIntegerField): the bound of
# the overflow bucket, so that every bucket has an upper bound.
LATENCY_OVERFLOW_MS = 2_147_483_647
LATENCY_TOP_MS = 600_000


def _latency_buckets() -> tuple[int, ...]:
    bounds = [1]
    while bounds[-1] < LATENCY_TOP_MS:
        # x1.25 rounded half up, in integers; 1 ms wider at least near the bottom.
        step = max(bounds[-1] + 1, (bounds[-1] * 5 + 2) // 4)
        bounds.append(min(step, LATENCY_TOP_MS))
    return (*bounds, LATENCY_OVERFLOW_MS)


# Upper bounds in ms, inclusive: a latency falls in the first bucket whose
# bound is not below it. 1 ms to 10 min in x1.25 steps, then the overflow.
LATENCY_BUCKETS_MS = _latency_buckets()

Grain = tuple[int | None, ...]


# The columns of a raw record that its figures are computed from, in the
# order Totals.add_record reads them.
RECORD_FIELDS = (
    "status",
    "cached",
    "fallbacks_tried",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_micros",
    "credits_micros",
    "latency_ms",
)


class Totals:
    """The running figures of one group (a rollup row, an analytics row):
    SUMS, the latency maximum and the latency histogram."""

    __slots__ = ("histogram", "latency_max_ms", "sums")

    def __init__(self) -> None:
        self.sums = [0] * len(SUMS)
        self.latency_max_ms = 0
        self.histogram: Counter[str] = Counter()

    def add(
        self, sums: Sequence[int], latency_max_ms: int, histogram: Mapping[str, int]
    ) -> None:
        self.sums = [a + b for a, b in zip(self.sums, sums, strict=True)]
        self.latency_max_ms = max(self.latency_max_ms, latency_max_ms)
        self.histogram.update(histogram)

    def add_record(self, values: Sequence[Any]) -> None:
        """Add one raw record (its RECORD_FIELDS): an error is anything but a
        success; a fallback is a call that tried more than one deployment."""
        status, cached, fallbacks, *tokens_and_money, latency = values
        success = status == UsageStatus.SUCCESS
        self.add(
            (
                1,
                int(success),
                int(not success),
                int(cached),
                int(fell_back(fallbacks)),
                *tokens_and_money,
                latency,
            ),
            latency,
            {str(latency_bucket(latency)): 1},
        )


def fell_back(attempts: object) -> bool:
    """Whether a call tried more than one deployment (skipped ones aside):
    ``fallbacks_tried`` lists every attempt, the one that served included.
    A malformed value (not a list of objects: a row written behind the
    services' back) counts only its objects and never raises, so that one
    bad record cannot stop the rollups, which go hour by hour in order."""
    if not isinstance(attempts, list | tuple):
        return False
    tried = [a for a in attempts if isinstance(a, Mapping) and "skipped" not in a]
    return len(tried) > 1


def latency_bucket(latency_ms: int) -> int:
    """The upper bound of the bucket holding a latency."""
    return LATENCY_BUCKETS_MS[
        min(bisect_left(LATENCY_BUCKETS_MS, latency_ms), len(LATENCY_BUCKETS_MS) - 1)
    ]


def latency_histogram_merge(histograms: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """The bucket-by-bucket sum of latency histograms (of any rows)."""
    merged: Counter[str] = Counter()
    for histogram in histograms:
        merged.update(histogram)
    return _histogram_json(merged)


def latency_percentiles(
    histogram: Mapping[str, int] | Sequence[int],
    quantiles: Sequence[int] = (50, 95, 99),
) -> dict[int, int]:
    """Per quantile, the upper bound in ms of the bucket holding it (nearest
    rank): the true value is at most that and above the bucket below. Takes a
    stored histogram or a list of counts aligned with LATENCY_BUCKETS_MS; 0 for
    an empty one. Raises ValueError for a quantile outside 1..100."""
    if isinstance(histogram, Mapping):
        counts = sorted((int(bound), count) for bound, count in histogram.items())
    else:
        counts = list(zip(LATENCY_BUCKETS_MS, histogram, strict=False))
    total = sum(count for _, count in counts)
    result = {}
    for quantile in quantiles:
        if not 0 < quantile <= 100:
            raise ValueError(f"quantile {quantile} is not in 1..100")
        result[quantile] = _bound_at_rank(counts, -(-quantile * total // 100))
    return result


def _bound_at_rank(counts: Iterable[tuple[int, int]], rank: int) -> int:
    seen = 0
    for bound, count in counts:
        seen += count
        if seen >= rank > 0:
            return bound
    return 0


def usage_roll_up(*, now: datetime, max_hours: int = 48) -> dict[str, int]:
    """Roll up the whole hours after the watermark that ended more than
    GATEWAY_ROLLUP_GRACE_SECONDS before ``now`` (at most ``max_hours``; the next
    run continues), then recompute the UTC days they touched. Replaces those
    UsageRollup rows and advances RollupState; a second run changes nothing."""
    until = _hour_floor(now - timedelta(seconds=settings.GATEWAY_ROLLUP_GRACE_SECONDS))
    RollupState.objects.get_or_create(name=STATE_NAME)
    done = {"hours": 0, "hour_rows": 0, "days": 0, "day_rows": 0}
    while done["hours"] < max_hours:
        # One short transaction per hour, the state row locked in each: runs
        # serialize hour by hour and never hold a lock across a long catch-up.
        with transaction.atomic():
            state = RollupState.objects.select_for_update().get(name=STATE_NAME)
            start = state.rolled_up_until or _oldest_record_hour()
            if start is None or start >= until:
                break
            done["hour_rows"] += _rollups_replace(
                RollupGranularity.HOUR, start, _totals_of_records(start)
            )
            state.rolled_up_until = start + HOUR
            if state.days_rolled_up_until is None:
                state.days_rolled_up_until = start
            state.save(update_fields=["rolled_up_until", "days_rolled_up_until"])
        done["hours"] += 1
    # Days follow their own watermark, so that a run stopped between the hours
    # and the days leaves the next run a day to redo, never a stale one.
    while True:
        with transaction.atomic():
            state = RollupState.objects.select_for_update().get(name=STATE_NAME)
            start, end = state.days_rolled_up_until, state.rolled_up_until
            if start is None or end is None or start >= end:
                break
            day = _hour_floor(start).replace(hour=0)
            done["day_rows"] += _rollups_replace(
                RollupGranularity.DAY, day, _totals_of_hours(day)
            )
            state.days_rolled_up_until = min(day + DAY, end)
            state.save(update_fields=["days_rolled_up_until"])
        done["days"] += 1
    return done


def usage_prune(*, now: datetime) -> int:
    """Delete raw usage records older than GATEWAY_USAGE_RETENTION_DAYS and
    rolled up already, GATEWAY_RETENTION_BATCH_SIZE per short transaction;
    returns how many. Nothing is deleted before the first rollup."""
    # Read without a lock: the watermark only moves forward, so a stale one
    # only keeps more.
    rolled_up_until = (
        RollupState.objects.filter(name=STATE_NAME)
        .values_list("rolled_up_until", flat=True)
        .first()
    )
    if rolled_up_until is None:
        return 0
    cutoff = min(
        now - timedelta(days=settings.GATEWAY_USAGE_RETENTION_DAYS), rolled_up_until
    )
    size = settings.GATEWAY_RETENTION_BATCH_SIZE
    deleted = 0
    while True:
        with transaction.atomic():
            batch = list(
                UsageRecord.objects.filter(created_at__lt=cutoff)
                .order_by("pk")
                .values_list("pk", flat=True)[:size]
            )
            if batch:
                deleted += UsageRecord.objects.filter(pk__in=batch).delete()[0]
        if len(batch) < size:
            return deleted


def _hour_floor(moment: datetime) -> datetime:
    if timezone.is_naive(moment):
        raise ValueError("rollups need an aware datetime")
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _oldest_record_hour() -> datetime | None:
    oldest = (
        UsageRecord.objects.order_by("created_at")
        .values_list("created_at", flat=True)
        .first()
    )
    return None if oldest is None else _hour_floor(oldest)


def _totals_of_records(start: datetime) -> dict[Grain, Totals]:
    totals: defaultdict[Grain, Totals] = defaultdict(Totals)
    rows: Iterator[tuple[Any, ...]] = (
        UsageRecord.objects.filter(created_at__gte=start, created_at__lt=start + HOUR)
        .order_by()
        .values_list(*GRAIN, *RECORD_FIELDS)
        .iterator(chunk_size=CHUNK_SIZE)
    )
    width = len(GRAIN)
    for row in rows:
        totals[row[:width]].add_record(row[width:])
    return totals


def _totals_of_hours(day: datetime) -> dict[Grain, Totals]:
    totals: defaultdict[Grain, Totals] = defaultdict(Totals)
    rows: Iterator[tuple[Any, ...]] = (
        UsageRollup.objects.filter(
            granularity=RollupGranularity.HOUR,
            bucket_start__gte=day,
            bucket_start__lt=day + DAY,
        )
        .order_by()
        .values_list(*GRAIN, *SUMS, "latency_max_ms", "latency_histogram")
        .iterator(chunk_size=CHUNK_SIZE)
    )
    width = len(GRAIN)
    for row in rows:
        totals[row[:width]].add(row[width:-2], row[-2], row[-1])
    return totals


def _rollups_replace(
    granularity: str, bucket_start: datetime, totals: Mapping[Grain, Totals]
) -> int:
    UsageRollup.objects.filter(
        granularity=granularity, bucket_start=bucket_start
    ).delete()
    UsageRollup.objects.bulk_create(
        (
            UsageRollup(
                granularity=granularity,
                bucket_start=bucket_start,
                **dict(zip(GRAIN, grain, strict=True)),
                **dict(zip(SUMS, total.sums, strict=True)),
                latency_max_ms=total.latency_max_ms,
                latency_histogram=_histogram_json(total.histogram),
            )
            for grain, total in totals.items()
        ),
        batch_size=CHUNK_SIZE,
    )
    return len(totals)


def _histogram_json(histogram: Mapping[str, int]) -> dict[str, int]:
    return {
        bound: histogram[bound]
        for bound in sorted(histogram, key=int)
        if histogram[bound]
    }
