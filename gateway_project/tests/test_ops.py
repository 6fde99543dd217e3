import pytest


def test_health_answers_healthy(client):
    response = client.get("/health")

    assert response.status_code == 200
    assert response.json() == {"status": "healthy"}
    assert response["x-request-id"].startswith("req_")


def test_liveness(client):
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.django_db
def test_readiness_checks_database_redis_and_broker(client):
    response = client.get("/readyz")

    assert response.status_code == 200
    assert response.json() == {
        "status": "ready",
        "checks": {"database": "ok", "cache": "ok", "broker": "ok"},
        "required": ["database"],
        "mode": "service",
    }


def _redis_down(settings) -> None:
    dead = "redis://127.0.0.1:1/0"
    settings.CACHES = {
        "default": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": dead,
            "OPTIONS": {
                "SOCKET_CONNECT_TIMEOUT": 0.2,
                "SOCKET_TIMEOUT": 0.2,
                "IGNORE_EXCEPTIONS": True,
            },
        }
    }
    settings.CELERY_BROKER_URL = dead


@pytest.mark.django_db
def test_readiness_with_redis_down_is_degraded_when_limits_fail_open(client, settings):
    _redis_down(settings)
    settings.GATEWAY_RATE_LIMIT_FAIL_OPEN = True

    response = client.get("/readyz")

    assert response.status_code == 200
    assert (response.json()["status"], response.json()["checks"]) == (
        "degraded",
        {"database": "ok", "cache": "down", "broker": "down"},
    )


@pytest.mark.django_db
def test_readiness_is_503_when_redis_is_down_and_limits_fail_closed(client, settings):
    _redis_down(settings)
    settings.GATEWAY_RATE_LIMIT_FAIL_OPEN = False

    response = client.get("/readyz")

    assert response.status_code == 503
    assert response.json()["status"] == "not_ready"
    assert response.json()["required"] == ["cache", "database"]
    assert response.json()["checks"]["cache"] == "down"


@pytest.mark.django_db
def test_metrics_are_prometheus_text(client):
    response = client.get("/metrics")

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert b"python_info" in response.content


def test_unknown_api_path_answers_in_the_envelope(client):
    response = client.get("/api/nothing-here", HTTP_X_REQUEST_ID="abc-123")

    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "No route for GET /api/nothing-here",
            "type": "not_found_error",
            "code": "not_found",
            "param": None,
        }
    }
    # The id is the server's own; the caller's is echoed beside it.
    assert response["x-request-id"].startswith("req_")
    assert response["x-client-request-id"] == "abc-123"


def test_openapi_schema_is_served(client):
    response = client.get("/api/schema/")

    assert response.status_code == 200
    assert b"openapi" in response.content


@pytest.mark.parametrize(
    ("proxies", "forwarded", "expected"),
    [
        (0, "203.0.113.7", "10.0.0.1"),  # no proxy trusted: header ignored
        (1, "203.0.113.7", "203.0.113.7"),
        (1, "6.6.6.6, 203.0.113.7", "203.0.113.7"),  # client-forged first hop ignored
        (2, "6.6.6.6, 203.0.113.7, 10.0.0.2", "203.0.113.7"),
        (2, "203.0.113.7", "10.0.0.1"),  # fewer hops than proxies: fall back
        (1, "not-an-ip", "10.0.0.1"),
        (1, "", "10.0.0.1"),
    ],
)
def test_client_ip_trusts_only_our_own_proxies(
    rf, settings, proxies, forwarded, expected
):
    from gateway_project.middleware import client_ip

    settings.TRUSTED_PROXY_COUNT = proxies
    request = rf.get("/", REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR=forwarded)

    assert client_ip(request) == expected


@pytest.mark.django_db
def test_interactive_docs_are_served_from_our_own_static_files(client):
    page = client.get("/api/docs/")

    assert page.status_code == 200
    html = page.content.decode()
    assert (
        "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in html
    )
    assert "cdn.jsdelivr.net" not in html
    assert (
        client.get(
            "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js"
        ).status_code
        == 200
    )


@pytest.mark.django_db
def test_openapi_schema_lists_the_management_api(client):
    import yaml

    schema = yaml.safe_load(client.get("/api/schema/").content)

    for path in (
        "/api/organizations/create",
        "/api/teams/create",
        "/api/credits/teams/{team_id}/balance",
        "/api/admin-users/login",
    ):
        assert path in schema["paths"], path
