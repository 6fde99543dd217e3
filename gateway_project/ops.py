"""Operational endpoints: health, liveness, readiness and Prometheus metrics."""

import logging
import os
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

from gateway_project.metrics import HeldCreditsCollector

logger = logging.getLogger(__name__)


@require_GET
def health(request: HttpRequest) -> JsonResponse:
    """The seed-000 health check: the process answers."""
    return JsonResponse({"status": "healthy"})


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Liveness: the process answers; dependencies are /readyz's business."""
    return JsonResponse({"status": "ok"})


def _check_database() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return "ok"


def _check_cache() -> str:
    cache.set("readyz:probe", "1", timeout=5)
    if cache.get("readyz:probe") != "1":
        raise RuntimeError("cache did not return what was written")
    return "ok"


def _check_broker() -> str:
    url = settings.CELERY_BROKER_URL
    if not url.startswith(("redis://", "rediss://")):
        return "ok"  # the embedded default runs tasks in-process
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    finally:
        client.close()
    return "ok"


def _required() -> set[str]:
    """The database always; Redis only when rate limits fail closed. With
    fail-open, a gateway without Redis still serves (keys from the database,
    no response cache) and stays in rotation, reported as degraded; the broker
    only delays background work."""
    return {"database"} | (
        set() if settings.GATEWAY_RATE_LIMIT_FAIL_OPEN else {"cache"}
    )


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: each dependency's state; 503 when a required one is down."""
    checks = {
        "database": _check_database,
        "cache": _check_cache,
        "broker": _check_broker,
    }
    results: dict[str, str] = {}
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception as error:  # any failure means "down"
            logger.warning("readiness check %s failed: %s", name, error)
            results[name] = "down"
    down = {name for name, state in results.items() if state != "ok"}
    ready = not (down & _required())
    body = {
        "status": ("degraded" if down else "ready") if ready else "not_ready",
        "checks": results,
        "required": sorted(_required()),
        "mode": "embedded" if settings.EMBEDDED else "service",
    }
    return JsonResponse(body, status=200 if ready else 503)


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus exposition: this process's metrics (every worker's with
    PROMETHEUS_MULTIPROC_DIR), plus the held credits read from the database."""
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ProcessRegistry())
    registry.register(HeldCreditsCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)


class _ProcessRegistry(Collector):
    """The default registry's metrics (ours, process and Python ones)."""

    def collect(self) -> Iterator[Any]:
        yield from REGISTRY.collect()
