"""Operational endpoints: health, liveness, readiness and Prometheus metrics."""

import logging

from django.conf import settings
from django.core.cache import cache
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

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


@require_GET
def readyz(request: HttpRequest) -> JsonResponse:
    """Readiness: 200 when every required dependency answers, 503 otherwise."""
    checks = {"database": _check_database, "cache": _check_cache}
    results: dict[str, str] = {}
    ready = True
    for name, check in checks.items():
        try:
            results[name] = check()
        except Exception as error:  # any failure means "not ready"
            logger.warning("readiness check %s failed: %s", name, error)
            results[name] = "down"
            ready = False
    body = {
        "status": "ready" if ready else "not_ready",
        "checks": results,
        "mode": "embedded" if settings.EMBEDDED else "service",
    }
    return JsonResponse(body, status=200 if ready else 503)


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus exposition of this process's registry."""
    return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
