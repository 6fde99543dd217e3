"""The gateway's admin site: Django's, with the operator's dashboard.

The dashboard reads billing.analytics (exact to the usage records) and draws
it as server-rendered SVG (gateway_project/charts.py): requests, tokens, cost
and credits by hour or day, error and cache-hit rates, fallbacks, top teams
and top model groups.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, URLResolver, path
from django.utils import timezone
from django.utils.safestring import SafeString

from billing.analytics import usage_by, usage_series, usage_summary
from gateway_project.charts import (
    Series,
    bar_chart,
    basis_points,
    format_count,
    format_credits,
    format_percent,
    format_usd,
    line_chart,
)
from tenants.models import Organization

TOP_ROWS = 10


@dataclass(frozen=True)
class Period:
    """A dashboard range: how far back, and the buckets of its series."""

    label: str
    length: timedelta
    granularity: str


PERIODS = {
    "24h": Period("Last 24 hours", timedelta(hours=24), "hour"),
    "7d": Period("Last 7 days", timedelta(days=7), "hour"),
    "30d": Period("Last 30 days", timedelta(days=30), "day"),
    "90d": Period("Last 90 days", timedelta(days=90), "day"),
}
DEFAULT_PERIOD = "24h"


def period_bounds(period: Period, now: datetime) -> tuple[datetime, datetime]:
    """[start, end) of whole buckets, the current one (still filling) last."""
    now = now.astimezone(UTC)
    end = now.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
    if period.granularity == "day":
        end = now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    return end - period.length, end


def bucket_label(bucket: datetime, granularity: str, *, with_date: bool) -> str:
    if granularity == "day":
        return bucket.strftime("%m-%d")
    return bucket.strftime("%m-%d %H:%M" if with_date else "%H:%M")


def rate_basis_points(rate: Decimal) -> int:
    """analytics' rates have four places: exactly basis points."""
    return int(rate * 10_000)


def usage_charts(
    points: list[dict[str, Any]], granularity: str, *, prefix: str, names: list[str]
) -> list[tuple[str, SafeString]]:
    """(caption, SVG) of the time charts named, from usage_series points."""
    labels = [
        bucket_label(p["bucket_start"], granularity, with_date=len(points) > 24)
        for p in points
    ]

    def column(name: str) -> list[int]:
        return [int(point[name]) for point in points]

    rates = [
        Series(
            "error rate", [basis_points(p["errors"], p["requests"]) for p in points]
        ),
        Series(
            "cache-hit rate",
            [basis_points(p["cache_hits"], p["requests"]) for p in points],
        ),
    ]
    available: dict[str, tuple[str, list[Series], Any]] = {
        "requests": (
            "Requests",
            [
                Series("requests", column("requests")),
                Series("errors", column("errors")),
                Series("cache hits", column("cache_hits")),
            ],
            format_count,
        ),
        "tokens": (
            "Tokens",
            [
                Series("prompt", column("prompt_tokens")),
                Series("completion", column("completion_tokens")),
            ],
            format_count,
        ),
        "cost": ("Cost (USD)", [Series("cost", column("cost_micros"))], format_usd),
        "credits": (
            "Credits charged",
            [Series("credits", column("credits_micros"))],
            format_credits,
        ),
        "rates": ("Error and cache-hit rate", rates, format_percent),
        "fallbacks": (
            "Requests that fell back",
            [Series("fallbacks", column("fallbacks"))],
            format_count,
        ),
    }
    charts = []
    for name in names:
        caption, series, formatter = available[name]
        chart = line_chart(
            chart_id=f"{prefix}-{name}",
            title=caption,
            labels=labels,
            series=series,
            value_format=formatter,
        )
        charts.append((caption, chart))
    return charts


def top_chart(
    rows: list[dict[str, Any]], *, chart_id: str, title: str
) -> tuple[str, SafeString]:
    bars = [(str(row["label"]), int(row["cost_micros"])) for row in rows[:TOP_ROWS]]
    return title, bar_chart(
        chart_id=chart_id, title=title, bars=bars, value_format=format_usd
    )


def summary_tiles(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, figure) of the headline numbers."""
    return [
        ("requests", format_count(summary["requests"])),
        ("error rate", format_percent(rate_basis_points(summary["error_rate"]))),
        (
            "cache-hit rate",
            format_percent(rate_basis_points(summary["cache_hit_rate"])),
        ),
        ("fallbacks", format_count(summary["fallbacks"])),
        ("tokens", format_count(summary["total_tokens"])),
        ("cost", format_usd(summary["cost_micros"])),
        ("credits", format_credits(summary["credits_micros"])),
        ("p50 latency", f"{summary['latency_p50_ms']:,} ms"),
        ("p95 latency", f"{summary['latency_p95_ms']:,} ms"),
    ]


class GatewayAdminSite(admin.AdminSite):
    """Django's admin plus ``dashboard/``; the index shows the last 24 hours."""

    site_header = "LLM Gateway"
    site_title = "LLM Gateway admin"
    index_title = "Operations"

    def get_urls(self) -> list[URLResolver | URLPattern]:
        return [
            path("dashboard/", self.admin_view(self.dashboard), name="dashboard"),
            *super().get_urls(),
        ]

    def index(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> TemplateResponse:
        start, end = period_bounds(PERIODS[DEFAULT_PERIOD], timezone.now())
        summary = usage_summary(start=start, end=end)
        context = {"headline": summary_tiles(summary), **(extra_context or {})}
        return super().index(request, context)

    def dashboard(self, request: HttpRequest) -> HttpResponse:
        """Every operator may look (the read-only role included)."""
        key = request.GET.get("period", DEFAULT_PERIOD)
        if key not in PERIODS:
            key = DEFAULT_PERIOD
        period = PERIODS[key]
        organization = (
            Organization.objects.filter(
                organization_id=request.GET.get("organization", "")
            ).first()
            if request.GET.get("organization")
            else None
        )
        start, end = period_bounds(period, timezone.now())
        scope: dict[str, Any] = {"start": start, "end": end}
        if organization is not None:
            scope["organization"] = organization
        summary = usage_summary(**scope)
        points = usage_series(granularity=period.granularity, **scope)
        charts = usage_charts(
            points,
            period.granularity,
            prefix="chart",
            names=["requests", "tokens", "cost", "credits", "rates", "fallbacks"],
        )
        tops = [
            top_chart(
                usage_by(dimension="team", **scope),
                chart_id="chart-top-teams",
                title="Top teams by cost",
            ),
            top_chart(
                usage_by(dimension="model_group", **scope),
                chart_id="chart-top-model-groups",
                title="Top model groups by cost",
            ),
        ]
        context = {
            **self.each_context(request),
            "title": "Dashboard",
            "periods": [(k, p.label) for k, p in PERIODS.items()],
            "period_key": key,
            "period": period,
            "start": start,
            "end": end,
            "organizations": Organization.objects.order_by("organization_id"),
            "organization": organization,
            "tiles": summary_tiles(summary),
            "charts": charts,
            "tops": tops,
        }
        return TemplateResponse(request, "admin/gateway/dashboard.html", context)
