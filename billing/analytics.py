"""Usage analytics: a summary, breakdowns and time series, exact to the records.

A half-open UTC range [start, end) is read in pieces that cover it exactly
once: whole days from the daily rollups, whole hours from the hourly rollups
(both only before their watermarks), and the rest — partial hours at the edges
and everything at or after the watermark — from the raw usage records. So every
figure equals the same sum taken over UsageRecord, as long as the raw records
of the range's partial edge hours are not pruned yet (retention only deletes
whole hours behind the watermark, which the rollups hold).
"""

from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, cast

from django.db.models import Model, Q
from django.utils import timezone

from billing.models import (
    RollupGranularity,
    RollupState,
    UsageRecord,
    UsageRollup,
)
from billing.rollups import (
    DAY,
    HOUR,
    RECORD_FIELDS,
    STATE_NAME,
    SUMS,
    Totals,
    latency_percentiles,
)
from tenants.models import Organization, Team

CHUNK_SIZE = 2000
DIMENSIONS = ("model_group", "deployment", "virtual_key", "team", "organization")
HOURLY, DAILY = RollupGranularity.HOUR.value, RollupGranularity.DAY.value
GRANULARITIES = (HOURLY, DAILY)
# The readable label of each dimension's rows: a field of the related model.
LABEL_FIELDS = {
    "model_group": "group_name",
    "deployment": "name",
    "virtual_key": "display_prefix",
    "team": "team_id",
    "organization": "organization_id",
}
NONE_LABEL = "(none)"
RATE_PLACES = Decimal("0.0001")
Range = tuple[datetime, datetime]


class _Tally(Totals):
    """A group's running figures, read out as the API's figures."""

    __slots__ = ()

    def figures(self) -> dict[str, Any]:
        figures: dict[str, Any] = dict(zip(SUMS, self.sums, strict=True))
        # A bucket's upper bound, but never above the slowest call: the
        # overflow bucket's bound is 2**31 - 1 ms.
        percentiles = {
            quantile: min(bound, self.latency_max_ms)
            for quantile, bound in latency_percentiles(self.histogram).items()
        }
        figures.update(
            latency_p50_ms=percentiles[50],
            latency_p95_ms=percentiles[95],
            latency_p99_ms=percentiles[99],
            latency_max_ms=self.latency_max_ms,
            error_rate=_rate(figures["errors"], figures["requests"]),
            cache_hit_rate=_rate(figures["cache_hits"], figures["requests"]),
        )
        return figures


def usage_summary(
    *,
    start: datetime,
    end: datetime,
    team: Team | None = None,
    organization: Organization | None = None,
) -> dict[str, Any]:
    """Every figure of the usage in [start, end), optionally of one team or
    organization; zeros when there is none. Raises ValueError for naive or
    reversed bounds."""
    tallies = _tallies(
        start=start, end=end, group=None, team=team, organization=organization
    )
    return tallies.get(None, _Tally()).figures()


def usage_by(
    *,
    dimension: str,
    start: datetime,
    end: datetime,
    team: Team | None = None,
    organization: Organization | None = None,
) -> list[dict[str, Any]]:
    """The figures of [start, end) per value of a dimension, with its id (None
    for usage without one) and label, by cost descending then label. Raises
    ValueError for an unknown dimension, naive or reversed bounds."""
    if dimension not in DIMENSIONS:
        raise ValueError(f"unknown dimension {dimension!r}")
    tallies = _tallies(
        start=start, end=end, group=dimension, team=team, organization=organization
    )
    labels = _labels(dimension, [pk for pk in tallies if pk is not None])
    rows = []
    for pk, tally in tallies.items():
        row = {"id": pk, **labels.get(pk, {"label": NONE_LABEL}), **tally.figures()}
        rows.append(row)
    rows.sort(key=lambda row: (-row["cost_micros"], row["label"], row["id"] or 0))
    return rows


def usage_series(
    *,
    granularity: str,
    start: datetime,
    end: datetime,
    team: Team | None = None,
    organization: Organization | None = None,
) -> list[dict[str, Any]]:
    """One point per UTC hour or day from the one holding ``start`` to the one
    holding the last moment before ``end``, empty ones included, each with its
    ``bucket_start`` and the figures of its part of [start, end). Raises
    ValueError for an unknown granularity, naive or reversed bounds."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}")
    tallies = _tallies(
        start=start, end=end, group=granularity, team=team, organization=organization
    )
    return [
        {"bucket_start": bucket, **tallies.get(bucket, _Tally()).figures()}
        for bucket in _buckets(start, end, _unit(granularity))
    ]


def _tallies(
    *,
    start: datetime,
    end: datetime,
    group: str | None,
    team: Team | None,
    organization: Organization | None,
) -> dict[Any, _Tally]:
    """The tallies of [start, end) per group key: None for no grouping, the
    dimension's id, or the bucket start of a granularity."""
    if timezone.is_naive(start) or timezone.is_naive(end):
        raise ValueError("analytics need aware datetimes")
    if end <= start:
        raise ValueError("end must be after start")
    scope = Q()
    if team is not None:
        scope &= Q(team_id=team.pk)
    if organization is not None:
        scope &= Q(organization_id=organization.pk)
    hours_until, days_until = _watermarks()
    # Day rows cannot be split into hours: an hourly series reads hour rows.
    rollup_ranges, raw_ranges = _pieces(
        start=start,
        end=end,
        hours_until=hours_until,
        days_until=None if group == HOURLY else days_until,
    )
    # The column each source is grouped by, and how its value becomes a key.
    if group is None:
        rollup_fields: list[str] = []
        record_fields: list[str] = []
    elif group in DIMENSIONS:
        rollup_fields = record_fields = [f"{group}_id"]
    else:
        rollup_fields, record_fields = ["bucket_start"], ["created_at"]

    def key(row: tuple[Any, ...]) -> Any:
        if group is None:
            return None
        if group in DIMENSIONS:
            return row[0]
        return _floor(row[0], _unit(group))

    tallies: defaultdict[Any, _Tally] = defaultdict(_Tally)
    if rollup_ranges:
        rows: Iterator[tuple[Any, ...]] = (
            UsageRollup.objects.filter(
                _any_of(
                    Q(granularity=granularity, bucket_start__gte=a, bucket_start__lt=b)
                    for granularity, a, b in rollup_ranges
                ),
                scope,
            )
            .order_by()
            .values_list(*rollup_fields, *SUMS, "latency_max_ms", "latency_histogram")
            .iterator(chunk_size=CHUNK_SIZE)
        )
        width = len(rollup_fields)
        for row in rows:
            tallies[key(row)].add(row[width:-2], row[-2], row[-1])
    if raw_ranges:
        rows = (
            UsageRecord.objects.filter(
                _any_of(Q(created_at__gte=a, created_at__lt=b) for a, b in raw_ranges),
                scope,
            )
            .order_by()
            .values_list(*record_fields, *RECORD_FIELDS)
            .iterator(chunk_size=CHUNK_SIZE)
        )
        width = len(record_fields)
        for row in rows:
            tallies[key(row)].add_record(row[width:])
    return dict(tallies)


def _watermarks() -> tuple[datetime | None, datetime | None]:
    """Hourly rows exist for every hour before the first; daily rows are whole
    for every day before the second."""
    state = (
        RollupState.objects.filter(name=STATE_NAME)
        .values_list("rolled_up_until", "days_rolled_up_until")
        .first()
    )
    return state if state is not None else (None, None)


def _pieces(
    *,
    start: datetime,
    end: datetime,
    hours_until: datetime | None,
    days_until: datetime | None,
) -> tuple[list[tuple[str, datetime, datetime]], list[Range]]:
    """Rollup ranges (granularity, from, to) and raw ranges that cover
    [start, end) exactly once, as much as possible from rollups."""
    if hours_until is None:
        return [], [(start, end)]
    first, last = _ceil(start, HOUR), _floor(min(end, hours_until), HOUR)
    if first >= last:
        return [], [(start, end)]
    raw = _nonempty([(start, first), (last, end)])
    hours = [(HOURLY, first, last)]
    if days_until is None:
        return hours, raw
    first_day, last_day = _ceil(first, DAY), _floor(min(last, days_until), DAY)
    if first_day >= last_day:
        return hours, raw
    return [
        (DAILY, first_day, last_day),
        *((HOURLY, a, b) for a, b in _nonempty([(first, first_day), (last_day, last)])),
    ], raw


def _labels(dimension: str, pks: list[int]) -> dict[int, dict[str, Any]]:
    """The label of each id of a dimension (and a key's alias and key id)."""
    # Through the foreign key, not an import: routing imports billing.
    related = cast(type[Model], UsageRollup._meta.get_field(dimension).related_model)
    objects = related._default_manager.filter(pk__in=pks)
    if dimension == "virtual_key":
        return {
            pk: {"label": prefix, "alias": alias, "key_id": public_id}
            for pk, prefix, alias, public_id in objects.values_list(
                "pk", "display_prefix", "alias", "public_id"
            )
        }
    return {
        pk: {"label": label}
        for pk, label in objects.values_list("pk", LABEL_FIELDS[dimension])
    }


def _any_of(conditions: Iterator[Q]) -> Q:
    combined = Q()
    for condition in conditions:
        combined |= condition
    return combined


def _nonempty(ranges: list[Range]) -> list[Range]:
    return [(a, b) for a, b in ranges if a < b]


def _unit(granularity: str) -> timedelta:
    return HOUR if granularity == HOURLY else DAY


def _floor(moment: datetime, unit: timedelta) -> datetime:
    floored = moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return floored.replace(hour=0) if unit == DAY else floored


def _ceil(moment: datetime, unit: timedelta) -> datetime:
    floored = _floor(moment, unit)
    return floored if floored == moment else floored + unit


def _buckets(start: datetime, end: datetime, unit: timedelta) -> Iterator[datetime]:
    bucket = _floor(start, unit)
    while bucket < end:
        yield bucket
        bucket += unit


def _rate(part: int, whole: int) -> Decimal:
    if not whole:
        return Decimal(0).quantize(RATE_PLACES)
    return (Decimal(part) / Decimal(whole)).quantize(RATE_PLACES, ROUND_HALF_UP)
