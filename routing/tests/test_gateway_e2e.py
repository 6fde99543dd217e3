"""The gateway end to end: the official openai SDK → gunicorn + uvicorn (ASGI)
→ the request path (routing/inference/) → a provider adapter → the fake upstream, all over real HTTP.

Every test runs twice: with the lean pass-through adapter and with litellm,
which must behave the same."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from billing.models import LedgerEntry, UsageRecord
from billing.services import team_open
from billing.tests.prices import price
from gateway_project.money import MICROS
from routing.models import Deployment
from routing.services import model_group_create, provider_credential_create
from tenants.services import organization_create

MESSAGES = [{"role": "user", "content": "Say hello"}]


def _deployment(
    fake, name: str, scenario: str, *, timeout_ms: int = 5_000, credential=None
) -> Deployment:
    price("openai/fake-model")
    return Deployment.objects.create(
        name=name,
        model="openai/fake-model",
        credential=credential,
        litellm_params={"api_base": fake.base(scenario)},
        timeout_ms=timeout_ms,
    )


@pytest.fixture(params=["passthrough", "litellm"])
def adapter(request, settings) -> str:
    settings.GATEWAY_PASSTHROUGH = request.param == "passthrough"
    return request.param


@pytest.fixture
def server_env(adapter) -> dict[str, str]:
    return {"GATEWAY_PASSTHROUGH": "true" if adapter == "passthrough" else "false"}


@pytest.fixture
def gateway(running_server, fake_upstream):
    """A team whose group 'chat' is served by the fake upstream; returns an SDK client."""
    credential = provider_credential_create(
        name="fake", provider="openai", api_key="sk-upstream-secret"
    )
    primary = _deployment(fake_upstream, "primary", "primary", credential=credential)
    group = model_group_create(group_name="chat", members=[(primary, 0)])
    organization = organization_create(organization_id="org_e2e", name="E2E")
    _, _, plaintext = team_open(
        organization=organization,
        team_id="team_e2e",
        credits_allocated_micros=100 * MICROS,
        model_groups=[group],
    )
    client = openai.OpenAI(
        base_url=f"{running_server.url}/v1",
        api_key=plaintext,
        max_retries=0,
        timeout=20,
    )
    return {
        "client": client,
        "key": plaintext,
        "url": running_server.url,
        "fake": fake_upstream,
        "group": group,
    }


def _wait_for_records(count: int, timeout: float = 10.0) -> list[UsageRecord]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = list(UsageRecord.objects.order_by("created_at"))
        if len(records) >= count:
            return records
        time.sleep(0.05)
    raise AssertionError(
        f"expected {count} usage records, found {UsageRecord.objects.count()}"
    )


def test_sdk_chat_completion(gateway):
    completion = gateway["client"].chat.completions.with_raw_response.create(
        model="chat",
        messages=MESSAGES,
        extra_body={"metadata": {"trace_id": "abc"}},
    )

    body = completion.parse()
    assert body.choices[0].message.content == "Hello from the fake upstream."
    assert body.model == "chat"
    assert (body.usage.prompt_tokens, body.usage.completion_tokens) == (7, 5)
    assert completion.headers["x-gateway-deployment"] == "primary"
    record = UsageRecord.objects.get()
    assert (record.request_id, record.status, record.usage_source) == (
        completion.headers["x-request-id"],
        "success",
        "provider",
    )
    assert (record.prompt_tokens, record.completion_tokens, record.deployment.name) == (
        7,
        5,
        "primary",
    )
    assert record.metadata == {"trace_id": "abc"}
    # The provider got our credential, never the tenant's key; metadata stayed here.
    upstream = gateway["fake"].requests[-1]
    assert upstream.headers["authorization"] == "Bearer sk-upstream-secret"
    assert "metadata" not in upstream.json


def test_sdk_stream_with_and_without_usage(gateway):
    with_usage = list(
        gateway["client"].chat.completions.create(
            model="chat",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    without = list(
        gateway["client"].chat.completions.create(
            model="chat", messages=MESSAGES, stream=True
        )
    )

    text = "".join(c.choices[0].delta.content or "" for c in with_usage if c.choices)
    assert text == "Hello from the fake upstream."
    assert with_usage[-1].usage.completion_tokens == 5
    assert all(getattr(c, "usage", None) is None for c in without)
    # The gateway always asked the upstream for usage, so both are exact.
    assert all(
        r.json["stream_options"] == {"include_usage": True}
        for r in gateway["fake"].requests
    )
    records = _wait_for_records(2)
    assert [(r.streamed, r.usage_source, r.completion_tokens) for r in records] == [
        (True, "provider", 5)
    ] * 2


def test_stream_without_upstream_usage_is_estimated(gateway):
    gateway["fake"].program("primary", usage=False)

    chunks = list(
        gateway["client"].chat.completions.create(
            model="chat", messages=MESSAGES, stream=True
        )
    )

    assert chunks
    record = _wait_for_records(1)[0]
    assert record.usage_source == "estimated"
    assert record.completion_tokens > 0 and record.prompt_tokens > 0


def test_sdk_embeddings_and_models(gateway):
    embedding = gateway["client"].embeddings.create(
        model="chat", input=["a", "b"], encoding_format="float"
    )
    models = gateway["client"].models.list()

    assert [len(item.embedding) for item in embedding.data] == [8, 8]
    assert [model.id for model in models.data] == ["chat"]
    assert UsageRecord.objects.get().endpoint == "embedding"


def test_sdk_errors_carry_our_codes(gateway, running_server):
    bad_key = openai.OpenAI(
        base_url=f"{running_server.url}/v1",
        api_key="sk-gw_aaaaaaaaaaaa_" + "x" * 40,
        max_retries=0,
    )
    model_group_create(
        group_name="other", members=[(Deployment.objects.get(name="primary"), 0)]
    )

    with pytest.raises(openai.AuthenticationError) as unauthenticated:
        bad_key.chat.completions.create(model="chat", messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        gateway["client"].chat.completions.create(model="other", messages=MESSAGES)
    with pytest.raises(openai.NotFoundError) as missing:
        gateway["client"].chat.completions.create(model="nope", messages=MESSAGES)

    assert unauthenticated.value.code == "invalid_api_key"
    assert forbidden.value.code == "model_not_allowed"
    assert missing.value.code == "model_not_found"
    assert not UsageRecord.objects.exists()


def test_provider_bad_request_comes_back_in_our_envelope(gateway):
    gateway["fake"].program(
        "primary",
        status=400,
        error={
            "error": {
                "message": "max_tokens is too large",
                "type": "invalid_request_error",
            }
        },
    )

    with pytest.raises(openai.BadRequestError) as refused:
        gateway["client"].chat.completions.create(model="chat", messages=MESSAGES)

    assert refused.value.code == "upstream_invalid_request"
    assert "max_tokens is too large" in refused.value.message
    assert gateway["fake"].calls("primary") == 1  # not retried elsewhere
    record = UsageRecord.objects.get()
    assert (record.status, record.http_status, record.cost_micros) == ("error", 400, 0)


def test_fallback_across_failing_deployments(gateway):
    fake, group = gateway["fake"], gateway["group"]
    fake.program("primary", status=500)
    fake.program("limited", status=429)
    fake.program("slow", latency=3)
    fake.program("healthy", content="served by the fourth")
    for priority, name in enumerate(["limited", "slow", "healthy"], start=1):
        deployment = _deployment(
            fake, name, name, timeout_ms=1_000 if name == "slow" else 5_000
        )
        group.members.create(deployment=deployment, priority=priority)

    response = gateway["client"].chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES
    )

    assert response.parse().choices[0].message.content == "served by the fourth"
    assert response.headers["x-gateway-deployment"] == "healthy"
    record = UsageRecord.objects.get()
    assert record.deployment.name == "healthy"
    assert [(a["deployment"], a.get("error_code")) for a in record.fallbacks_tried] == [
        ("primary", "upstream_error"),
        ("limited", "upstream_rate_limited"),
        ("slow", "upstream_timeout"),
        ("healthy", None),
    ]
    assert [fake.calls(s) for s in ("primary", "limited", "slow", "healthy")] == [
        1,
        1,
        1,
        1,
    ]


@pytest.mark.parametrize(
    ("programs", "status", "code"),
    [
        ({"status": 500}, 502, "upstream_error"),
        ({"latency": 3}, 504, "upstream_timeout"),
    ],
)
def test_all_deployments_failing(gateway, programs, status, code):
    Deployment.objects.filter(name="primary").update(timeout_ms=1_000)
    gateway["fake"].program("primary", **programs)

    response = httpx.post(
        f"{gateway['url']}/v1/chat/completions",
        json={"model": "chat", "messages": MESSAGES},
        headers={"Authorization": f"Bearer {gateway['key']}"},
        timeout=20,
    )

    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert UsageRecord.objects.get().error_code == code


def test_cooldown_set_by_one_process_is_honoured_by_another(gateway, client, settings):
    """This test process routes one call (a 429 cools the deployment down, in
    Redis); the server process then skips that deployment without calling it."""
    fake, group = gateway["fake"], gateway["group"]
    fake.program("primary", status=429)
    backup = _deployment(fake, "backup", "backup")
    group.members.create(deployment=backup, priority=1)

    here = client.post(
        "/v1/chat/completions",
        {"model": "chat", "messages": MESSAGES},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {gateway['key']}",
    )
    there = gateway["client"].chat.completions.with_raw_response.create(
        model="chat", messages=MESSAGES
    )

    assert here.status_code == 200 and here["x-gateway-deployment"] == "backup"
    assert there.headers["x-gateway-deployment"] == "backup"
    assert fake.calls("primary") == 1  # only the first process tried it
    record = UsageRecord.objects.get(request_id=there.headers["x-request-id"])
    assert record.fallbacks_tried[0] == {"deployment": "primary", "skipped": "cooldown"}


def test_first_chunk_reaches_the_client_before_the_upstream_finishes(gateway):
    hold, first_sent = threading.Event(), threading.Event()
    gateway["fake"].program(
        "primary",
        chunks=["first ", "second ", "third"],
        hold=hold,
        first_chunk_sent=first_sent,
    )

    stream = gateway["client"].chat.completions.create(
        model="chat", messages=MESSAGES, stream=True
    )
    first = next(iter(stream))

    # The upstream is still holding the rest back: the gateway did not buffer.
    # (The fake sets first_sent just after its write returns, which a fast
    # gateway may beat.)
    assert first_sent.wait(5) and not hold.is_set()
    hold.set()
    rest = list(stream)
    text = (first.choices[0].delta.content or "") + "".join(
        c.choices[0].delta.content or "" for c in rest if c.choices
    )
    assert text == "first second third"


def test_client_disconnect_mid_stream_leaves_one_record(gateway):
    hold, first_sent, finished = threading.Event(), threading.Event(), threading.Event()
    gateway["fake"].program(
        "primary",
        chunks=["partial ", "never sent"],
        hold=hold,
        first_chunk_sent=first_sent,
        finished=finished,
    )

    with httpx.stream(
        "POST",
        f"{gateway['url']}/v1/chat/completions",
        json={"model": "chat", "messages": MESSAGES, "stream": True},
        headers={"Authorization": f"Bearer {gateway['key']}"},
        timeout=20,
    ) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
    # The client is gone while the upstream still holds the rest back: the
    # gateway must notice, cancel the upstream call and record what it got.
    record = _wait_for_records(1)[0]
    hold.set()
    # The upstream's rest found the connection closed: the gateway had
    # cancelled the call, so nothing more can reach it to settle again.
    assert finished.wait(10)
    assert gateway["fake"].requests[-1].hung_up
    assert UsageRecord.objects.count() == 1
    assert (record.status, record.streamed, record.http_status) == (
        "client_disconnected",
        True,
        200,
    )
    assert record.completion_tokens > 0  # what was generated is paid for
    capture = LedgerEntry.objects.get(
        request_id=record.request_id, entry_type="capture"
    )
    assert -capture.held_delta_micros == record.credits_micros > 0


def test_fifty_concurrent_calls_leave_fifty_records(gateway):
    def one(_: int) -> str:
        response = httpx.post(
            f"{gateway['url']}/v1/chat/completions",
            json={"model": "chat", "messages": MESSAGES},
            headers={"Authorization": f"Bearer {gateway['key']}"},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        return response.headers["x-request-id"]

    with ThreadPoolExecutor(max_workers=25) as pool:
        request_ids = list(pool.map(one, range(50)))

    assert len(set(request_ids)) == 50
    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == sorted(
        request_ids
    )


def test_unknown_top_level_fields_are_accepted_and_not_forwarded(gateway):
    response = httpx.post(
        f"{gateway['url']}/v1/chat/completions",
        json={
            "model": "chat",
            "messages": MESSAGES,
            "user": "u-42",
            "timeout": 30,
            "vendor_flag": {"x": 1},
            "metadata": {"tenant": "t1"},
        },
        headers={"X-API-Key": gateway["key"]},
        timeout=20,
    )

    assert response.status_code == 200, response.text
    sent = gateway["fake"].requests[-1].json
    # Our own and unknown fields stay here; which OpenAI parameters reach a
    # provider is litellm's per-provider mapping.
    assert not {"vendor_flag", "metadata", "timeout"} & set(sent)
    assert sent["messages"] == MESSAGES
    assert UsageRecord.objects.get().metadata == {"tenant": "t1"}


def test_the_adapter_in_use_is_the_one_configured(gateway, adapter):
    gateway["client"].chat.completions.create(model="chat", messages=MESSAGES)

    (received,) = gateway["fake"].requests
    agent = received.headers.get("user-agent", "")
    assert ("aiohttp" in agent) == (adapter == "passthrough"), agent
    assert received.headers["authorization"] == "Bearer sk-upstream-secret"
