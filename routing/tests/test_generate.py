"""/v1/generate of seed 004: {prompt, ...} → {model, output, cached}."""

import pytest

from billing.models import UsageRecord
from billing.tests.prices import price
from routing.services import deployment_create, model_group_create
from tenants.services import virtual_key_issue

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def key(team, fake_upstream) -> str:
    fake_upstream.program("writer", content="Once upon a time.")
    price("openai/fake-model")
    mock = deployment_create(
        name="writer",
        model="openai/fake-model",
        litellm_params={"api_base": fake_upstream.base("writer")},
    )
    group = model_group_create(group_name="writer", members=[(mock, 0)])
    team.model_groups.set([group])
    return virtual_key_issue(team=team)[1]


def _generate(client, key, body):
    return client.post(
        "/v1/generate", body, content_type="application/json", HTTP_X_API_KEY=key
    )


def test_generate_answers_with_model_output_and_cached(client, key, fake_upstream):
    response = _generate(
        client,
        key,
        {
            "prompt": "Tell a story",
            "model": "writer",
            "max_new_tokens": 50,
            "temperature": 0.7,
            "top_p": 0.9,
            "top_k": 40,
            "stop": ["\n\n"],
        },
    )

    assert response.status_code == 200, response.content
    assert response.json() == {
        "model": "writer",
        "output": "Once upon a time.",
        "cached": False,
    }
    record = UsageRecord.objects.get()
    assert (record.endpoint, record.status, record.request_id) == (
        "chat",
        "success",
        response["x-request-id"],
    )
    # The parameters reached the provider under their OpenAI names.
    sent = fake_upstream.requests[-1].json
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"], sent["stop"]) == (
        50,
        0.7,
        0.9,
        ["\n\n"],
    )


def test_model_defaults_to_the_keys_only_group(client, key):
    assert _generate(client, key, {"prompt": "hi"}).json()["model"] == "writer"


def test_model_is_required_when_the_key_has_several_groups(
    client, key, team, model_group
):
    team.model_groups.add(model_group)

    response = _generate(client, key, {"prompt": "hi"})

    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"
    assert not UsageRecord.objects.exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("prompt", ""),
        ("prompt", 42),
        ("max_new_tokens", 0),
        ("max_new_tokens", 40_000),
        ("max_new_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", 2.5),
        ("temperature", "hot"),
        ("top_p", 1.5),
        ("top_k", 0),
        ("top_k", True),
        ("stop", []),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("stop", 7),
    ],
)
def test_out_of_range_parameters_are_400_naming_them(client, key, field, value):
    body = {"prompt": "hi", "model": "writer", field: value}

    response = _generate(client, key, body)

    assert response.status_code == 400
    assert response.json()["error"]["param"] == field
    assert not UsageRecord.objects.exists()


def test_generate_needs_a_key(client, key):
    response = client.post(
        "/v1/generate", {"prompt": "hi"}, content_type="application/json"
    )

    assert (response.status_code, response.json()["error"]["code"]) == (
        401,
        "missing_api_key",
    )
