"""Jobs of seed 000: create, calls attached to the job, complete, costs."""

import json

import httpx
import pytest
from django.test import Client

from billing.models import Job, UsageRecord
from billing.services import team_open
from billing.tests.prices import price
from gateway_project.money import MICROS
from routing.services import deployment_create, model_group_create
from tenants.services import organization_create

pytestmark = pytest.mark.django_db(transaction=True)
MESSAGES = [{"role": "user", "content": "Extract the skills from this resume."}]


@pytest.fixture
def world(db, fake_upstream):
    """Two teams of two organizations, each with a key; a deployment on the
    fake upstream."""
    fake_upstream.program("resume", content="Python, SQL")
    price("openai/fake-model")
    mock = deployment_create(
        name="resume-llm",
        model="openai/fake-model",
        litellm_params={"api_base": fake_upstream.base("resume")},
    )
    group = model_group_create(group_name="ResumeAgent", members=[(mock, 0)])
    keys = {}
    for name in ("a", "b"):
        organization = organization_create(organization_id=f"org_{name}", name=name)
        _, _, keys[name] = team_open(
            organization=organization,
            team_id=f"team_{name}",
            credits_allocated_micros=10 * MICROS,
            model_groups=[group],
        )
    return keys


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _key(key: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {key}"}


def _create_job(client: Client, key: str, team_id: str = "team_a") -> str:
    response = client.post(
        "/api/jobs/create",
        {
            "team_id": team_id,
            "job_type": "resume_analysis",
            "user_id": "u-1",
            "metadata": {"doc": 7},
        },
        content_type="application/json",
        **_key(key),
    )
    assert response.status_code == 200, response.content
    return response.json()["job_id"]


def test_job_flow_as_in_seed_000(client, world):
    job_id = _create_job(client, world["a"])

    call = client.post(
        f"/api/jobs/{job_id}/llm-call",
        {
            "model": "ResumeAgent",
            "messages": MESSAGES,
            "purpose": "skills",
            "temperature": 0.2,
            "call_metadata": {"page": 1},
        },
        content_type="application/json",
        **_key(world["a"]),
    )
    via_header = client.post(
        "/v1/chat/completions",
        {"model": "ResumeAgent", "messages": MESSAGES},
        content_type="application/json",
        HTTP_X_JOB_ID=job_id,
        **_key(world["a"]),
    )
    completed = client.post(
        f"/api/jobs/{job_id}/complete",
        {"status": "completed", "metadata": {"result": "ok"}},
        content_type="application/json",
        **_key(world["a"]),
    )
    costs = client.get(f"/api/jobs/{job_id}/costs", **_key(world["a"]))
    detail = client.get(f"/api/jobs/{job_id}", **_key(world["a"]))

    assert call.status_code == 200, call.content
    body = call.json()
    assert body["response"] == {"content": "Python, SQL", "finish_reason": "stop"}
    assert set(body["metadata"]) == {"tokens_used", "latency_ms", "model"}
    assert body["metadata"]["model"] == "ResumeAgent"
    assert body["call_id"] == call["x-request-id"]
    assert via_header.status_code == 200
    assert completed.status_code == 200
    assert completed.json()["status"] == "completed"
    assert costs.json()["total_calls"] == 2
    assert costs.json()["successful_calls"] == 2
    assert [c["call_id"] for c in costs.json()["calls"]] == [
        body["call_id"],
        via_header["x-request-id"],
    ]
    assert costs.json()["calls"][0]["purpose"] == "skills"
    assert detail.json()["metadata"] == {"doc": 7, "result": "ok"}
    assert UsageRecord.objects.filter(job_id=job_id).count() == 2
    record = UsageRecord.objects.get(request_id=body["call_id"])
    assert record.metadata == {"page": 1, "purpose": "skills"}
    job = Job.objects.get()
    assert (
        job.total_tokens == sum(r.total_tokens for r in UsageRecord.objects.all()) > 0
    )


def test_closed_job_takes_no_more_calls(client, world):
    job_id = _create_job(client, world["a"])
    client.post(
        f"/api/jobs/{job_id}/complete",
        {"status": "failed", "error_message": "bad input"},
        content_type="application/json",
        **_key(world["a"]),
    )

    again = client.post(
        f"/api/jobs/{job_id}/complete",
        {"status": "completed"},
        content_type="application/json",
        **_key(world["a"]),
    )
    call = client.post(
        f"/api/jobs/{job_id}/llm-call",
        {"model": "ResumeAgent", "messages": MESSAGES},
        content_type="application/json",
        **_key(world["a"]),
    )

    assert (again.status_code, again.json()["error"]["code"]) == (409, "job_closed")
    assert (call.status_code, call.json()["error"]["code"]) == (409, "job_closed")
    assert Job.objects.get().error_message == "bad input"
    assert not UsageRecord.objects.exists()


def test_job_stream_relays_every_chunk_and_is_recorded(client, world, running_server):
    job_id = _create_job(client, world["a"])

    # Over the real ASGI server: a stream is opened and drained in one loop.
    response = httpx.post(
        f"{running_server.url}/api/jobs/{job_id}/llm-call-stream",
        json={"model": "ResumeAgent", "messages": MESSAGES},
        headers=_auth(world["a"]),
        timeout=30,
    )

    assert response.status_code == 200
    chunks = [
        line.removeprefix("data: ")
        for line in response.text.splitlines()
        if line.startswith("data: ")
    ]
    assert chunks[-1] == "[DONE]"
    content = "".join(
        (json.loads(chunk)["choices"] or [{}])[0].get("delta", {}).get("content") or ""
        for chunk in chunks[:-1]
    )
    assert content == "Python, SQL"
    record = UsageRecord.objects.get()
    assert (str(record.job_id), record.streamed, record.status) == (
        job_id,
        True,
        "success",
    )


@pytest.mark.parametrize(
    ("payload", "status", "param"),
    [
        ({"team_id": "team_b", "job_type": "x"}, 403, "team_id"),
        ({"team_id": "team_a"}, 400, "job_type"),
        ({"team_id": "team_a", "job_type": "x", "colour": "red"}, 400, "colour"),
    ],
)
def test_bad_job_creation_writes_nothing(client, world, payload, status, param):
    response = client.post(
        "/api/jobs/create", payload, content_type="application/json", **_key(world["a"])
    )

    assert response.status_code == status
    assert response.json()["error"]["param"] == param
    assert not Job.objects.exists()


def test_unknown_job_is_404(client, world):
    for path in (
        "/api/jobs/not-a-uuid",
        "/api/jobs/00000000-0000-0000-0000-000000000000/costs",
    ):
        assert client.get(path, **_key(world["a"])).status_code == 404


# --- the matrix ------------------------------------------------------------------------

ACTORS = ["anonymous", "admin_key", "owner", "key_a", "key_b", "bad_key"]
JOB_ROUTE = dict(zip(ACTORS, [401, 401, 401, 200, 403, 401], strict=True))
CREATE = dict(zip(ACTORS, [401, 401, 401, 200, 403, 401], strict=True))
CALL = {"model": "ResumeAgent", "messages": MESSAGES}

ENDPOINTS = [
    (
        "create job",
        "post",
        "/api/jobs/create",
        {"team_id": "team_a", "job_type": "t"},
        CREATE,
    ),
    ("get job", "get", "/api/jobs/{job}", None, JOB_ROUTE),
    ("job costs", "get", "/api/jobs/{job}/costs", None, JOB_ROUTE),
    (
        "complete job",
        "post",
        "/api/jobs/{job}/complete",
        {"status": "completed"},
        JOB_ROUTE,
    ),
    ("job call", "post", "/api/jobs/{job}/llm-call", CALL, JOB_ROUTE),
    ("job stream", "post", "/api/jobs/{job}/llm-call-stream", CALL, JOB_ROUTE),
]


def _headers(actor: str, keys: dict[str, str], settings) -> dict[str, str]:
    from accounts.tests.conftest import bearer, make_operator

    if actor == "anonymous":
        return {}
    if actor == "admin_key":
        settings.GATEWAY_ADMIN_KEY = "jobs-admin-key"
        return {"HTTP_X_ADMIN_KEY": "jobs-admin-key"}
    if actor == "owner":
        return bearer(make_operator("owner@example.com", "owner"))
    if actor == "bad_key":
        return _key(keys["a"][:-1] + ("x" if keys["a"][-1] != "x" else "y"))
    return _key(keys[actor.removeprefix("key_")])


def _state() -> tuple:
    return (
        sorted(Job.objects.values_list("job_id", "status", "total_calls", "metadata")),
        sorted(UsageRecord.objects.values_list("request_id", flat=True)),
    )


@pytest.mark.parametrize(
    ("name", "method", "path", "body", "actor", "status"),
    [
        pytest.param(
            name, method, path, body, actor, expected[actor], id=f"{name} as {actor}"
        )
        for name, method, path, body, expected in ENDPOINTS
        for actor in ACTORS
    ],
)
def test_jobs_matrix(client, world, settings, name, method, path, body, actor, status):
    job_id = _create_job(client, world["a"])
    headers = _headers(actor, world, settings)
    before = _state()

    kwargs = (
        {"data": body, "content_type": "application/json"} if body is not None else {}
    )
    response = getattr(client, method)(path.format(job=job_id), **kwargs, **headers)

    assert response.status_code == status, response.content
    if status >= 400:
        assert set(response.json()["error"]) == {"message", "type", "code", "param"}
        assert _state() == before
