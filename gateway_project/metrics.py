"""The gateway's Prometheus metrics, in one place.

Counters and histograms are per process; with several gunicorn workers set
PROMETHEUS_MULTIPROC_DIR (an empty, writable directory) and /metrics adds up
every worker. Figures read from the database (held credits) are collected at
scrape time and skipped, not failed, while the database is down.
"""

from collections.abc import Iterator
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter(
    "gateway_requests_total",
    "Requests to the OpenAI-compatible API by route, status and model group",
    ["route", "status", "model_group"],
)
REQUEST_SECONDS = Histogram(
    "gateway_request_duration_seconds",
    "Time to the response (to its headers for a stream), gateway included",
    ["route"],
    buckets=SECONDS,
)
UPSTREAM_SECONDS = Histogram(
    "gateway_upstream_duration_seconds",
    "One provider attempt: time to the answer, or to a stream's first chunk",
    ["deployment", "outcome"],
    buckets=SECONDS,
)
TOKENS = Counter(
    "gateway_tokens_total", "Tokens of settled calls", ["model_group", "kind"]
)
COST = Counter(
    "gateway_cost_usd_micros_total",
    "Provider cost of settled calls, in micro-USD",
    ["model_group"],
)
CREDITS = Counter(
    "gateway_credits_charged_micros_total",
    "Credits charged for settled calls, in micro-credits",
    ["model_group"],
)
CACHE_HITS = Counter(
    "gateway_cache_hits_total",
    "Calls answered from the response cache",
    ["model_group"],
)
FALLBACKS = Counter(
    "gateway_fallbacks_total",
    "Calls served after another deployment failed",
    ["model_group"],
)
REFUSALS = Counter(
    "gateway_refusals_total",
    "Refused calls by error code (rate_limit_exceeded, insufficient_credits, ...)",
    ["code"],
)

BACKGROUND_FAILURES = Counter(
    "gateway_background_failures_total",
    "Rows a background task could not process (each logged with its id); "
    "the task went on with the others and retries them on its next run",
    ["work"],
)


class HeldCreditsCollector(Collector):
    """Open holds, read from the credit accounts at scrape time."""

    def collect(self) -> Iterator[Any]:
        from django.db import DatabaseError
        from django.db.models import Count, Q, Sum

        from billing.models import CreditAccount

        try:
            totals = CreditAccount.objects.aggregate(
                held=Sum("held_micros"),
                accounts=Count("pk", filter=Q(held_micros__gt=0)),
            )
        except DatabaseError:
            return
        yield GaugeMetricFamily(
            "gateway_held_credits_micros",
            "Credits held by calls in flight (or left by a crash), in micro-credits",
            value=totals["held"] or 0,
        )
        yield GaugeMetricFamily(
            "gateway_accounts_with_open_holds",
            "Credit accounts with credits held",
            value=totals["accounts"],
        )
