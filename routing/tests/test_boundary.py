"""Input is validated at the boundary (DESIGN.md): hostile or out-of-range
input is a 400 in the envelope naming the parameter, before any provider is
called, with nothing written; the hold covers the most a request allows; the
rate limiter cannot be overflowed, and only a real connection failure counts
as Redis being down."""

import json

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from billing.models import CreditAccount, Job, LedgerEntry, UsageRecord
from billing.tests.test_money_path import CALL, _open
from gateway_project.money import MICROS
from routing import limits
from routing.tests.calls import stream_in_process
from routing.tests.fake_upstream import Behaviour
from tenants.models import BudgetMode, Team

pytestmark = pytest.mark.django_db(transaction=True)


def _post(client, key, body, path="/v1/chat/completions"):
    raw = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(path, raw, content_type="application/json", HTTP_X_API_KEY=key)


def _refused_with_nothing_written(response, fake, code, param, status=400):
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert not UsageRecord.objects.exists()
    assert not LedgerEntry.objects.exclude(entry_type="allocation").exists()
    assert fake.calls("money") == 0


NUL = "\u0000"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(
    "field, value, param",
    [
        ("metadata", {"t": NUL}, "metadata"),
        ("metadata", {"nested": [{f"k{NUL}": 1}]}, "metadata"),
        ("messages", [{"role": "user", "content": f"a{NUL}b"}], "messages"),
        ("user", f"u{NUL}", "user"),
        ("model", f"chat{NUL}", "model"),
    ],
)
def test_nul_anywhere_is_refused_before_the_provider(
    client, fake_upstream, stream, field, value, param
):
    _, key = _open(fake_upstream)

    response = _post(
        client, key, {**CALL, field: value, "stream": stream, "max_tokens": 2000}
    )

    _refused_with_nothing_written(response, fake_upstream, "invalid_request", param)


@pytest.mark.parametrize(
    "raw",
    [
        '{"model": "chat", "messages": [], "temperature": NaN}',
        '{"model": "chat", "messages": [], "temperature": Infinity}',
        '{"model": "chat", "messages": [], "temperature": 1e999}',
        "[" * 100_000 + "]" * 100_000,
        '{"model": "chat", "metadata": ' + "[" * 50_000 + "]" * 50_000 + "}",
        '{"model": "chat", "n": 1' + "0" * 5_000 + "}",
        b'{"model": "\xff\xfe"}',
    ],
    ids=["nan", "infinity", "overflow", "deep", "deep-metadata", "huge-int", "bytes"],
)
def test_json_a_database_cannot_store_is_refused(client, fake_upstream, raw):
    _, key = _open(fake_upstream)

    response = _post(client, key, raw)

    _refused_with_nothing_written(response, fake_upstream, "invalid_json", None)


@pytest.mark.parametrize(
    "metadata, why",
    [
        ("trace-1", "must be an object"),
        ({"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": {"i": 1}}}}}}}}}, "levels"),
        ({"blob": "x" * 20_000}, "bytes"),
    ],
)
def test_metadata_is_an_object_of_bounded_size_and_depth(
    client, fake_upstream, metadata, why
):
    _, key = _open(fake_upstream)

    response = _post(client, key, {**CALL, "metadata": metadata})

    _refused_with_nothing_written(
        response, fake_upstream, "invalid_request", "metadata"
    )
    assert why in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "mode", [BudgetMode.CONSUMPTION_USD, BudgetMode.CONSUMPTION_TOKENS]
)
@pytest.mark.parametrize(
    "param, value",
    [
        ("max_tokens", 10**20),
        ("max_tokens", 0),
        ("max_tokens", -5),
        ("max_tokens", "100"),
        ("max_tokens", True),
        ("max_tokens", 1.5),
        ("max_completion_tokens", 10**20),
        ("n", 0),
        ("n", 129),
        ("temperature", 3),
        ("top_p", -0.1),
        ("presence_penalty", 2.5),
        ("top_logprobs", 21),
        ("seed", 2**64),
        ("logit_bias", {"50256": 1000}),
        ("stream_options", "yes"),
        ("stream", "true"),
    ],
)
def test_every_number_is_in_its_documented_range(
    client, fake_upstream, mode, param, value
):
    _, key = _open(fake_upstream, mode=mode)

    response = _post(client, key, {**CALL, param: value})

    _refused_with_nothing_written(response, fake_upstream, "invalid_request", param)


def test_a_jobs_call_metadata_is_checked_as_metadata(client, fake_upstream):
    team, key = _open(fake_upstream)
    job = client.post(
        "/api/jobs/create",
        {"team_id": team.team_id, "job_type": "t"},
        content_type="application/json",
        HTTP_X_API_KEY=key,
    ).json()

    response = _post(
        client,
        key,
        {**CALL, "call_metadata": {"t": NUL}},
        path=f"/api/jobs/{job['job_id']}/llm-call",
    )

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "call_metadata"
    assert not UsageRecord.objects.exists()
    assert fake_upstream.calls("money") == 0


def test_what_an_upstream_sends_back_is_stored_as_the_database_can(
    client, fake_upstream
):
    # Given an upstream whose error carries a NUL, then one whose usage is
    # nonsense
    _, key = _open(fake_upstream)
    fake_upstream.program(
        "money",
        Behaviour(status=500, error={"error": {"message": f"bad{NUL}thing"}}),
    )
    failed = _post(client, key, CALL)
    fake_upstream.program("money", Behaviour(prompt_tokens=-3, completion_tokens=2**40))
    odd = _post(client, key, CALL)

    # Then both calls are recorded: the message without its NUL, the usage
    # counted by the gateway
    assert failed.status_code == 502
    record = UsageRecord.objects.get(request_id=failed["x-request-id"])
    assert NUL not in record.error_message and "bad" in record.error_message
    assert odd.status_code == 200
    counted = UsageRecord.objects.get(request_id=odd["x-request-id"])
    assert counted.usage_source == "estimated"
    assert 0 < counted.completion_tokens < 100


# --- the hold covers the most a request allows --------------------------------


def _held(team) -> int:
    return LedgerEntry.objects.get(
        account__team=team, entry_type="hold"
    ).held_delta_micros


@pytest.mark.parametrize(
    "extra, output",
    [
        ({"n": 100, "max_tokens": 100}, 100 * 100),
        ({"max_tokens": 1, "max_completion_tokens": 20_000}, 20_000),
        ({"max_completion_tokens": 30}, 30),
        ({"n": 3}, 3 * 4096),
    ],
)
def test_the_hold_covers_n_times_the_largest_output_cap(
    client, fake_upstream, extra, output
):
    # Given prices of $1 / $2 per million and 100 credits per dollar, and an
    # upstream that uses all the request allows
    team, key = _open(fake_upstream)
    fake_upstream.program("money", Behaviour(completion_tokens=output))

    response = _post(client, key, {**CALL, **extra})

    # Then the hold covered the output (2 micro-USD a token, x100 credits)
    # and the charge was taken from it whole: nothing uncollected
    assert response.status_code == 200, response.content
    held = _held(team)
    assert output * 2 * 100 <= held < (output + 100) * 2 * 100
    capture = LedgerEntry.objects.get(account__team=team, entry_type="capture")
    assert capture.reason == "" and capture.amount_micros == 0
    record = UsageRecord.objects.get()
    assert record.credits_micros == -capture.held_delta_micros <= held


def test_a_request_whose_worst_case_the_credits_do_not_cover_is_refused(
    client, fake_upstream
):
    # Given a team with 1 credit: n=100 x 100 tokens may cost about 2 credits
    _, key = _open(fake_upstream, credits_micros=MICROS)

    response = _post(client, key, {**CALL, "n": 100, "max_tokens": 100})

    _refused_with_nothing_written(
        response, fake_upstream, "insufficient_credits", None, status=402
    )


# --- the rate limiter ------------------------------------------------------------


def test_a_huge_estimate_cannot_overflow_the_counters():
    scope = limits.Scope("key:overflow", rpm=None, tpm=10**18, parallel=None)

    admission = limits.acquire([scope], estimate=10**30)

    assert admission is not None and admission.estimate == limits.MOST_TOKENS
    limits.release(admission, actual_tokens=0)


class _Broken:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def ping(self):
        raise self.error

    def acquire(self, keys, argv):
        raise self.error

    def adjust_start(self, operations):
        raise self.error


@pytest.mark.parametrize("limited", [True, False], ids=["limited", "unlimited"])
def test_fail_closed_refuses_every_call_while_redis_is_down(
    client, fake_upstream, settings, monkeypatch, limited
):
    # Given a limiter that fails closed, a team with or without limits, and
    # Redis out of reach
    team, key = _open(fake_upstream)
    if limited:
        Team.objects.filter(pk=team.pk).update(rpm_limit=1_000)
    settings.GATEWAY_RATE_LIMIT_FAIL_OPEN = False
    monkeypatch.setattr(
        limits, "_backend", lambda: _Broken(RedisConnectionError("refused"))
    )

    response = _post(client, key, CALL)

    _refused_with_nothing_written(
        response, fake_upstream, "rate_limiter_unavailable", None, status=503
    )
    assert CreditAccount.objects.get(team=team).held_micros == 0


def test_a_limiter_that_fails_otherwise_never_admits(
    client, fake_upstream, settings, monkeypatch
):
    # Given fail-open, and a limiter that answers with an error (not a
    # connection failure)
    team, key = _open(fake_upstream)
    Team.objects.filter(pk=team.pk).update(rpm_limit=1_000)
    settings.GATEWAY_RATE_LIMIT_FAIL_OPEN = True
    monkeypatch.setattr(
        limits, "_backend", lambda: _Broken(ResponseError("ERR increment overflow"))
    )

    response = _post(client, key, CALL)

    _refused_with_nothing_written(
        response, fake_upstream, "rate_limiter_unavailable", None, status=503
    )


# --- what the hold counts beside the messages' text ----------------------------


def test_the_hold_counts_tools_and_schemas_sent_upstream(client, fake_upstream):
    # Given a tool whose description is 20,000 words, and an upstream that
    # bills every one of them
    team, key = _open(fake_upstream)
    tool = {
        "type": "function",
        "function": {"name": "f", "description": "word " * 20_000, "parameters": {}},
    }
    fake_upstream.program(
        "money", Behaviour(prompt_tokens=20_008, completion_tokens=10)
    )

    response = _post(client, key, {**CALL, "max_tokens": 10, "tools": [tool]})

    # Then the hold covered them: nothing uncollected
    assert response.status_code == 200, response.content
    assert _held(team) >= 20_008 * 1 * 100
    capture = LedgerEntry.objects.get(account__team=team, entry_type="capture")
    assert capture.reason == "" and capture.amount_micros == 0


def test_the_hold_counts_each_prompt_of_a_completion_list(client, fake_upstream):
    team, key = _open(fake_upstream)
    fake_upstream.program("money", Behaviour(completion_tokens=100 * 1_000))

    response = _post(
        client,
        key,
        {"model": "chat", "prompt": ["a"] * 100, "max_tokens": 1_000},
        path="/v1/completions",
    )

    assert response.status_code == 200, response.content
    assert _held(team) >= 100 * 1_000 * 2 * 100
    capture = LedgerEntry.objects.get(account__team=team, entry_type="capture")
    assert capture.reason == ""


def test_the_hold_allows_for_each_image(client, fake_upstream):
    team, key = _open(fake_upstream)
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    content = [{"type": "text", "text": "what is this"}, image, image]

    response = _post(
        client,
        key,
        {
            "model": "chat",
            "max_tokens": 10,
            "messages": [{"role": "user", "content": content}],
        },
    )

    assert response.status_code == 200, response.content
    assert _held(team) >= 2 * 2_000 * 1 * 100


# --- more hostile input -----------------------------------------------------------


SURROGATE = "\ud800"


@pytest.mark.parametrize(
    "body, param",
    [
        ({**CALL, "metadata": {"t": SURROGATE}}, "metadata"),
        ({**CALL, "model": f"chat{SURROGATE}"}, "model"),
        ({**CALL, "user": SURROGATE}, "user"),
    ],
    ids=["metadata", "model", "user"],
)
def test_unpaired_surrogates_are_refused_like_nul(client, fake_upstream, body, param):
    _, key = _open(fake_upstream)

    response = _post(client, key, json.dumps(body))

    _refused_with_nothing_written(response, fake_upstream, "invalid_request", param)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_a_body_not_in_utf8_is_refused(client, fake_upstream, encoding):
    _, key = _open(fake_upstream)

    response = _post(
        client, key, json.dumps({**CALL, "model": "chat\u0000"}).encode(encoding)
    )

    _refused_with_nothing_written(response, fake_upstream, "invalid_json", None)


def test_nesting_the_providers_encoders_cannot_take_is_refused(client, fake_upstream):
    _, key = _open(fake_upstream)
    deep = "[" * 960 + "]" * 960
    raw = '{"model": "chat", "messages": [{"role": "user", "content": ' + deep + "}]}"

    response = _post(client, key, raw)

    _refused_with_nothing_written(response, fake_upstream, "invalid_json", None)


def test_a_provider_message_with_a_lone_surrogate_is_recorded(client, fake_upstream):
    team, key = _open(fake_upstream)
    fake_upstream.program(
        "money",
        Behaviour(status=500, error='{"error": {"message": "bad \\ud800 thing"}}'),
    )

    response = _post(client, key, CALL)

    assert response.status_code == 502
    record = UsageRecord.objects.get(request_id=response["x-request-id"])
    assert "bad" in record.error_message and record.credits_micros == 0
    assert CreditAccount.objects.get(team=team).held_micros == 0


@pytest.mark.parametrize(
    "metadata",
    [{"a": NUL}, {f"a{NUL}": 1}, {"a": SURROGATE}, {"a": [[[[[[[[[1]]]]]]]]]}],
    ids=["nul", "nul-key", "surrogate", "deep"],
)
def test_the_jobs_api_refuses_metadata_the_database_cannot_store(
    client, fake_upstream, metadata
):
    team, key = _open(fake_upstream)

    response = client.post(
        "/api/jobs/create",
        json.dumps({"team_id": team.team_id, "job_type": "t", "metadata": metadata}),
        content_type="application/json",
        HTTP_X_API_KEY=key,
    )

    assert response.status_code == 400, response.content
    assert set(response.json()["error"]) == {"message", "type", "code", "param"}
    assert not Job.objects.exists()


def test_the_rest_api_refuses_json_too_deep_for_its_parser(client, fake_upstream):
    _, key = _open(fake_upstream)

    response = client.post(
        "/api/jobs/create",
        '{"team_id": "x", "metadata": ' + "[" * 100_000 + "]" * 100_000 + "}",
        content_type="application/json",
        HTTP_X_API_KEY=key,
    )

    assert response.status_code == 400, response.content
    assert not Job.objects.exists()


def test_a_stream_the_provider_cuts_is_charged_for_what_it_relayed(fake_upstream):
    # Given an upstream that closes the stream after its first chunk
    team, key = _open(fake_upstream)
    fake_upstream.program("money", Behaviour(drop_mid_stream=True))

    _, body = stream_in_process(key, {**CALL, "stream": True})

    # Then the client gets the chunk, then an error event, and the call is
    # recorded as interrupted and charged for what it relayed
    assert b'"error"' in body and body.endswith(b"data: [DONE]\n\n")
    record = UsageRecord.objects.get()
    assert (record.status, record.error_code) == ("interrupted", "upstream_error")
    assert record.completion_tokens > 0 and record.credits_micros > 0
    assert CreditAccount.objects.get(team=team).held_micros == 0
