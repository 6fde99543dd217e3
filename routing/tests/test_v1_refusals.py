"""/v1/ refusals: each in the envelope with our code, and none writes anything."""

import pytest
from django.core.management import call_command

from billing.models import UsageRecord
from routing.models import ModelGroup
from routing.services import deployment_create, model_group_create
from tenants.models import VirtualKey
from tenants.services import virtual_key_issue, virtual_key_revoke

pytestmark = pytest.mark.django_db(transaction=True)
CHAT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def key(team) -> str:
    return virtual_key_issue(team=team)[1]


def _post(client, body, key=None, path="/v1/chat/completions", **headers):
    if key is not None:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    return client.post(path, body, content_type="application/json", **headers)


def _refused(response, status: int, code: str, param=None) -> None:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert set(error) == {"message", "type", "code", "param"}
    assert response["x-request-id"]
    assert not UsageRecord.objects.exists()


def test_missing_key_is_401_missing_api_key(client, team):
    _refused(_post(client, CHAT), 401, "missing_api_key")


@pytest.mark.parametrize(
    "presented", ["sk-gw_aaaaaaaaaaaa_" + "b" * 40, "nonsense", "Bearer"]
)
def test_wrong_key_is_401_invalid_api_key(client, team, presented):
    _refused(_post(client, CHAT, HTTP_X_API_KEY=presented), 401, "invalid_api_key")


def test_revoked_key_is_401_invalid_api_key(client, team):
    key, plaintext = virtual_key_issue(team=team)
    virtual_key_revoke(key=key)

    _refused(_post(client, CHAT, plaintext), 401, "invalid_api_key")


def test_unknown_model_is_404_model_not_found(client, key):
    _refused(
        _post(client, {**CHAT, "model": "nope"}, key), 404, "model_not_found", "model"
    )


def test_model_of_another_team_is_403_model_not_allowed(client, key, deployment):
    model_group_create(group_name="private", members=[(deployment, 0)])

    _refused(
        _post(client, {**CHAT, "model": "private"}, key),
        403,
        "model_not_allowed",
        "model",
    )


def test_group_outside_the_keys_own_list_is_403(client, team, deployment, model_group):
    other = model_group_create(group_name="other", members=[(deployment, 0)])
    team.model_groups.add(other)
    _, plaintext = virtual_key_issue(team=team, allowed_model_groups=[model_group])

    _refused(
        _post(client, {**CHAT, "model": "other"}, plaintext),
        403,
        "model_not_allowed",
        "model",
    )


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_json", None),
        ({"messages": [{"role": "user", "content": "hi"}]}, "invalid_request", "model"),
        ({"model": "chat"}, "invalid_request", "messages"),
        ({"model": "chat", "messages": []}, "invalid_request", "messages"),
        ({**CHAT, "stream": "yes"}, "invalid_request", "stream"),
    ],
)
def test_bad_bodies_are_400(client, key, body, code, param):
    _refused(_post(client, body, key), 400, code, param)


def test_embeddings_need_input(client, key):
    _refused(
        _post(client, {"model": "chat"}, key, path="/v1/embeddings"),
        400,
        "invalid_request",
        "input",
    )


def test_get_on_a_post_endpoint_is_405(client, key):
    response = client.get("/v1/chat/completions", HTTP_AUTHORIZATION=f"Bearer {key}")

    assert response.status_code == 405


def test_group_without_a_usable_deployment_is_503_and_recorded(client, team):
    # A catalog model with no credential yet: valid group, nothing to call.
    waiting = deployment_create(name="gpt-4o", model="openai/gpt-4o")
    group = model_group_create(group_name="waiting", members=[(waiting, 0)])
    team.model_groups.add(group)
    _, plaintext = virtual_key_issue(team=team)

    response = _post(client, {**CHAT, "model": "waiting"}, plaintext)

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_deployment_available"
    record = UsageRecord.objects.get()
    assert (
        record.status,
        record.error_code,
        record.deployment,
        record.cost_micros,
    ) == ("error", "no_deployment_available", None, 0)
    assert record.fallbacks_tried == [
        {"deployment": "gpt-4o", "skipped": "no_credential"}
    ]


def test_models_lists_only_what_the_key_may_use(client, team, key, deployment):
    model_group_create(group_name="private", members=[(deployment, 0)])

    response = client.get("/v1/models", HTTP_X_API_KEY=key)

    assert response.status_code == 200
    assert [m["id"] for m in response.json()["data"]] == ["chat"]
    assert response.json()["object"] == "list"
    assert client.get("/v1/models").json()["error"]["code"] == "missing_api_key"


def test_demo_group_answers_through_the_pipeline(client):
    call_command(
        "seed_demo", password="Seed-Passw0rd!", stdout=__import__("io").StringIO()
    )
    key = VirtualKey.objects.get(alias="demo")
    from gateway_project.crypto import derived_secret
    from tenants.keys import key_generate

    plaintext = key_generate(seed=derived_secret("seed-demo-key")).plaintext
    assert key.public_id in plaintext

    response = _post(
        client,
        {
            "model": "demo",
            "messages": [{"role": "user", "content": "hi"}],
            "metadata": {"trace_id": "t-1"},
        },
        plaintext,
    )

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["model"] == "demo"
    assert (
        body["choices"][0]["message"]["content"]
        == "Hello from the gateway's demo model group."
    )
    assert response["x-gateway-deployment"] == "demo-mock"
    record = UsageRecord.objects.get()
    assert (
        record.request_id,
        record.status,
        record.model_group,
        record.deployment.name,
    ) == (
        response["x-request-id"],
        "success",
        ModelGroup.objects.get(group_name="demo"),
        "demo-mock",
    )
    assert record.metadata == {"trace_id": "t-1"}
    assert record.total_tokens == record.prompt_tokens + record.completion_tokens > 0
