"""/metrics moves with real calls, and logs are JSON lines that carry the
request id and never a secret."""

import io
import json
import logging

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from billing.models import UsageRecord
from billing.services import credits_hold
from gateway_project.logs import JsonFormatter, RequestIdFilter
from gateway_project.money import MICROS
from tenants.services import virtual_key_issue

pytestmark = pytest.mark.django_db(transaction=True)
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "secret plan"}]}
ROUTE = "/v1/chat/completions"


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _post(client, plaintext: str, body=CHAT):
    return client.post(
        ROUTE, body, content_type="application/json", HTTP_X_API_KEY=plaintext
    )


def _scraped(client) -> dict[str, dict[tuple, float]]:
    response = client.get("/metrics")
    assert response.status_code == 200
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[
                tuple(sorted(sample.labels.items()))
            ] = sample.value
    return samples


def test_a_call_moves_the_request_token_cost_and_credit_metrics(client, team):
    _, plaintext = virtual_key_issue(team=team)
    labels = {"route": ROUTE, "status": "200", "model_group": "chat"}
    before = {
        "requests": _value("gateway_requests_total", **labels),
        "prompt": _value("gateway_tokens_total", model_group="chat", kind="prompt"),
        "cost": _value("gateway_cost_usd_micros_total", model_group="chat"),
        "credits": _value("gateway_credits_charged_micros_total", model_group="chat"),
        "latency": _value("gateway_request_duration_seconds_count", route=ROUTE),
        "upstream": _value(
            "gateway_upstream_duration_seconds_count", deployment="mock-a", outcome="ok"
        ),
    }

    response = _post(client, plaintext)

    assert response.status_code == 200, response.content
    record = UsageRecord.objects.get()
    assert _value("gateway_requests_total", **labels) == before["requests"] + 1
    assert (
        _value("gateway_tokens_total", model_group="chat", kind="prompt")
        == before["prompt"] + record.prompt_tokens
    )
    assert (
        _value("gateway_cost_usd_micros_total", model_group="chat")
        == before["cost"] + record.cost_micros
    )
    assert (
        _value("gateway_credits_charged_micros_total", model_group="chat")
        == before["credits"] + record.credits_micros
    )
    assert record.credits_micros > 0
    assert (
        _value("gateway_request_duration_seconds_count", route=ROUTE)
        == before["latency"] + 1
    )
    assert (
        _value(
            "gateway_upstream_duration_seconds_count", deployment="mock-a", outcome="ok"
        )
        == before["upstream"] + 1
    )
    scraped = _scraped(client)
    assert scraped["gateway_requests_total"][tuple(sorted(labels.items()))] == (
        before["requests"] + 1
    )


def test_refusals_are_counted_by_code(client, team):
    _, plaintext = virtual_key_issue(team=team)
    credits_hold(team=team, amount_micros=100 * MICROS, request_id="req_all")
    before = _value("gateway_refusals_total", code="insufficient_credits")

    response = _post(client, plaintext)

    assert response.status_code == 402, response.content
    assert _value("gateway_refusals_total", code="insufficient_credits") == before + 1
    assert (
        _value("gateway_requests_total", route=ROUTE, status="402", model_group="chat")
        >= 1
    )


def test_open_holds_are_read_from_the_database_at_scrape_time(client, team):
    credits_hold(team=team, amount_micros=3 * MICROS, request_id="req_in_flight")

    scraped = _scraped(client)

    assert scraped["gateway_held_credits_micros"][()] == 3 * MICROS
    assert scraped["gateway_accounts_with_open_holds"][()] == 1


def _capture(logger_name: str = "") -> tuple[io.StringIO, logging.Handler]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    logging.getLogger(logger_name).addHandler(handler)
    return stream, handler


@pytest.fixture(autouse=True)
def _info_logs():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    yield
    root.setLevel(level)


def test_log_lines_are_json_with_the_request_id_and_no_secret(client, team, settings):
    settings.GATEWAY_LOG_PROMPTS = False
    key, plaintext = virtual_key_issue(team=team)
    stream, handler = _capture()
    try:
        response = _post(client, plaintext)
    finally:
        logging.getLogger().removeHandler(handler)

    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    settled = [line for line in lines if line["message"] == "call settled"]
    assert response.status_code == 200
    assert len(settled) == 1
    assert settled[0]["request_id"] == response["x-request-id"]
    assert settled[0]["key"] == key.display_prefix
    assert (settled[0]["team"], settled[0]["model_group"]) == ("team_alice", "chat")
    assert "prompt" not in settled[0]
    assert plaintext not in stream.getvalue()
    assert plaintext.rsplit("_", 1)[1] not in stream.getvalue()
    assert "secret plan" not in stream.getvalue()


def test_prompts_are_logged_only_when_turned_on(client, team, settings):
    settings.GATEWAY_LOG_PROMPTS = True
    _, plaintext = virtual_key_issue(team=team)
    stream, handler = _capture("routing.inference.settle")
    try:
        _post(client, plaintext)
    finally:
        logging.getLogger("routing.inference.settle").removeHandler(handler)

    (settled,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert settled["prompt"] == CHAT["messages"]
