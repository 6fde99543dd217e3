"""The usage analytics API: a summary, breakdowns, a time series and CSV.

Operators see any tenant (optionally one team or organization); a team's key
sees only its own team. Figures come from billing.analytics, exact to the usage
records; money is rendered as decimal strings next to its integer micro-units.
"""

import csv
import io
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from django.http import HttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.permissions import SAFE_METHODS, BasePermission
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.api.auth import IsOperator
from accounts.api.serializers import StrictSerializer
from accounts.api.views import valid
from billing.analytics import GRANULARITIES, usage_by, usage_series, usage_summary
from gateway_project.money import from_micros
from tenants.api.auth import TeamKeyPrincipal, TenantApi, team_get_or_404
from tenants.api.views import organization_get_or_404
from tenants.models import Organization, Team

DEFAULT_RANGE = timedelta(hours=24)
MAX_RANGE = timedelta(days=400)
MAX_HOURLY_RANGE = timedelta(days=31)
# Endpoint name → usage_by dimension.
BREAKDOWNS = {
    "by-model-group": "model_group",
    "by-deployment": "deployment",
    "by-key": "virtual_key",
}
REPORTS = ("summary", "series", *BREAKDOWNS)
FIGURES = (
    "requests",
    "successes",
    "errors",
    "cache_hits",
    "fallbacks",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "cost_micros",
    "credits",
    "credits_micros",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "latency_max_ms",
    "error_rate",
    "cache_hit_rate",
)
ROW_LABELS = {
    "summary": (),
    "series": ("bucket_start",),
    "by-model-group": ("model_group",),
    "by-deployment": ("deployment",),
    "by-key": ("key_id", "key", "alias"),
}


class IsOperatorOrOwnTeamKey(BasePermission):
    """Operators by role; a team key only to read its own team's usage: a
    ``team_id`` or ``organization_id`` other than its own is refused."""

    message = "This key belongs to another team"

    def has_permission(self, request: Request, view: APIView) -> bool:
        principal = request.user
        if not isinstance(principal, TeamKeyPrincipal):
            return IsOperator().has_permission(request, view)
        if request.method not in SAFE_METHODS:
            self.message = "Team keys may only read"
            return False
        team = principal.key.team
        return request.query_params.get("team_id", team.team_id) == team.team_id and (
            request.query_params.get(
                "organization_id", team.organization.organization_id
            )
            == team.organization.organization_id
        )


class UsageQuery(StrictSerializer):
    start = serializers.DateTimeField(required=False, default_timezone=UTC)
    end = serializers.DateTimeField(required=False, default_timezone=UTC)
    team_id = serializers.CharField(max_length=200, required=False)
    organization_id = serializers.CharField(max_length=200, required=False)

    def longest(self, data: Mapping[str, Any]) -> timedelta:
        return MAX_RANGE

    def validate(self, data: dict[str, Any]) -> dict[str, Any]:
        end = data.get("end") or timezone.now()
        start = data.get("start") or end - DEFAULT_RANGE
        longest = self.longest(data)
        if end <= start:
            raise serializers.ValidationError({"end": ["Must be after start."]})
        if end - start > longest:
            raise serializers.ValidationError(
                {"end": [f"The range may span at most {longest.days} days."]}
            )
        return {**data, "start": start, "end": end}


class UsageSeriesQuery(UsageQuery):
    granularity = serializers.ChoiceField(choices=GRANULARITIES, default="hour")

    def longest(self, data: Mapping[str, Any]) -> timedelta:
        return MAX_HOURLY_RANGE if data["granularity"] == "hour" else MAX_RANGE


class UsageExportQuery(UsageSeriesQuery):
    report = serializers.ChoiceField(choices=REPORTS, default="series")

    def longest(self, data: Mapping[str, Any]) -> timedelta:
        if data["report"] == "series":
            return super().longest(data)
        return MAX_RANGE


class CsvRenderer(BaseRenderer):
    """Lets a client that asks for text/csv through content negotiation."""

    media_type = "text/csv"
    format = "csv"

    def render(
        self,
        data: Any,
        accepted_media_type: str | None = None,
        renderer_context: Mapping[str, Any] | None = None,
    ) -> bytes:
        return str(data).encode()


class UsageApi(TenantApi):
    """Base of the usage endpoints: reads the range and the tenant scope."""

    permission_classes = [IsOperatorOrOwnTeamKey]
    query_class: type[UsageQuery] = UsageQuery

    def query(self) -> dict[str, Any]:
        """The validated parameters plus the team and organization to scope to."""
        query = valid(self.query_class, self.request.query_params)
        team: Team | None = None
        organization: Organization | None = None
        principal = self.request.user
        if isinstance(principal, TeamKeyPrincipal):
            team = principal.key.team
        else:
            if "team_id" in query:
                team = team_get_or_404(query["team_id"])
            if "organization_id" in query:
                organization = organization_get_or_404(query["organization_id"])
        return {**query, "team": team, "organization": organization}

    def envelope(self, query: Mapping[str, Any], **body: Any) -> dict[str, Any]:
        team, organization = query["team"], query["organization"]
        return {
            "start": query["start"].isoformat(),
            "end": query["end"].isoformat(),
            "team_id": None if team is None else team.team_id,
            "organization_id": None
            if organization is None
            else organization.organization_id,
            **body,
        }


def _selector_args(query: Mapping[str, Any]) -> dict[str, Any]:
    return {name: query[name] for name in ("start", "end", "team", "organization")}


def figures_output(figures: Mapping[str, Any]) -> dict[str, Any]:
    """The figures of a selector for JSON: money and rates as decimal strings."""
    output = {
        name: figures[name]
        for name in FIGURES
        if name not in ("cost_usd", "credits", "error_rate", "cache_hit_rate")
    }
    output.update(
        cost_usd=str(from_micros(figures["cost_micros"])),
        credits=str(from_micros(figures["credits_micros"])),
        error_rate=str(figures["error_rate"]),
        cache_hit_rate=str(figures["cache_hit_rate"]),
    )
    return {name: output[name] for name in FIGURES}


def point_output(point: Mapping[str, Any]) -> dict[str, Any]:
    return {"bucket_start": point["bucket_start"].isoformat(), **figures_output(point)}


def row_output(report: str, row: Mapping[str, Any]) -> dict[str, Any]:
    if report == "by-key":
        labels = {
            "key_id": row.get("key_id"),
            "key": None if row["id"] is None else row["label"],
            "alias": row.get("alias"),
        }
    else:
        labels = {ROW_LABELS[report][0]: None if row["id"] is None else row["label"]}
    return {**labels, **figures_output(row)}


def report_rows(report: str, query: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The rows of one report, rendered for JSON and CSV alike."""
    args = _selector_args(query)
    if report == "summary":
        return [figures_output(usage_summary(**args))]
    if report == "series":
        points = usage_series(granularity=query["granularity"], **args)
        return [point_output(point) for point in points]
    rows = usage_by(dimension=BREAKDOWNS[report], **args)
    return [row_output(report, row) for row in rows]


class UsageSummaryApi(UsageApi):
    @extend_schema(parameters=[UsageQuery], responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        query = self.query()
        summary = report_rows("summary", query)[0]
        return Response(self.envelope(query, summary=summary))


class UsageBreakdownApi(UsageApi):
    """GET /api/usage/by-model-group, /by-deployment and /by-key."""

    report = "by-model-group"

    @extend_schema(parameters=[UsageQuery], responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        query = self.query()
        rows = report_rows(self.report, query)
        return Response(
            self.envelope(query, dimension=BREAKDOWNS[self.report], rows=rows)
        )


class UsageSeriesApi(UsageApi):
    query_class = UsageSeriesQuery

    @extend_schema(parameters=[UsageSeriesQuery], responses=OpenApiTypes.OBJECT)
    def get(self, request: Request) -> Response:
        query = self.query()
        points = report_rows("series", query)
        return Response(
            self.envelope(query, granularity=query["granularity"], points=points)
        )


class UsageExportApi(UsageApi):
    """GET /api/usage/export.csv: one report as CSV with a header row."""

    query_class = UsageExportQuery
    renderer_classes = [CsvRenderer, JSONRenderer]

    @extend_schema(
        parameters=[UsageExportQuery], responses={(200, "text/csv"): OpenApiTypes.STR}
    )
    def get(self, request: Request) -> HttpResponse:
        query = self.query()
        report = query["report"]
        rows = report_rows(report, query)
        columns = [*ROW_LABELS[report], *FIGURES]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        response = HttpResponse(buffer.getvalue(), content_type="text/csv")
        name = f"usage-{report}-{_stamp(query['start'])}-{_stamp(query['end'])}.csv"
        response["Content-Disposition"] = f'attachment; filename="{name}"'
        return response


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%SZ")
