"""Model groups of seed 000: names resolve to deployments or litellm models."""

import subprocess
import sys

import pytest
from django.conf import settings
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import AuditLogEntry
from routing.models import Deployment, ModelGroup, ModelGroupMember
from routing.providers import catalog_model, model_catalog
from routing.services import deployment_create, provider_credential_create

pytestmark = pytest.mark.django_db
ADMIN = {"HTTP_X_ADMIN_KEY": "groups-admin-key"}
RESUME_AGENT = {
    "group_name": "ResumeAgent",
    "display_name": "Resume Analysis Agent",
    "description": "Analyzes resumes and extracts structured data",
    "models": [
        {"model_name": "gpt-4-turbo", "priority": 0},
        {"model_name": "gpt-3.5-turbo", "priority": 1},
    ],
}


@pytest.fixture
def api(settings) -> APIClient:
    settings.GATEWAY_ADMIN_KEY = "groups-admin-key"
    return APIClient()


def _state() -> tuple:
    return (
        sorted(ModelGroup.objects.values_list("group_name", "display_name", "status")),
        sorted(
            ModelGroupMember.objects.values_list(
                "model_group__group_name", "deployment__name", "priority"
            )
        ),
        sorted(Deployment.objects.values_list("name", "model")),
        AuditLogEntry.objects.count(),
    )


def test_catalog_reads_litellm_prices_as_decimals_without_importing_litellm():
    model = catalog_model("gpt-4-turbo")

    assert model is not None
    assert (model.provider, model.mode, model.litellm_model) == (
        "openai",
        "chat",
        "openai/gpt-4-turbo",
    )
    assert str(model.input_cost_per_token) == "0.00001"
    assert len(model_catalog()) > 1000
    assert "sample_spec" not in model_catalog()
    # Other tests of this process call providers, which imports litellm: check
    # the import in a fresh interpreter.
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from routing.providers import catalog_model; "
            "assert catalog_model('gpt-4-turbo') is not None; "
            "print('litellm' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=settings.BASE_DIR,
    )
    assert probe.stdout.strip() == "False"


def test_seed_group_from_litellm_model_names(api):
    response = api.post(
        "/api/model-groups/create", RESUME_AGENT, format="json", **ADMIN
    )

    assert response.status_code == 200
    body = response.json()
    assert body["models"] == RESUME_AGENT["models"]
    assert (body["group_name"], body["display_name"]) == (
        "ResumeAgent",
        "Resume Analysis Agent",
    )
    deployments = dict(Deployment.objects.values_list("name", "model"))
    assert deployments == {
        "gpt-4-turbo": "openai/gpt-4-turbo",
        "gpt-3.5-turbo": "openai/gpt-3.5-turbo",
    }
    # Valid before any credential exists: the deployments wait for one.
    assert set(Deployment.objects.values_list("credential", flat=True)) == {None}
    assert api.get("/api/model-groups/ResumeAgent", **ADMIN).json() == body


def test_new_deployment_binds_to_its_providers_credential(api):
    credential = provider_credential_create(
        name="openai-main", provider="openai", api_key="sk-secret-abcdef123456"
    )
    provider_credential_create(
        name="anthropic-main", provider="anthropic", api_key="sk-ant-secret-123456"
    )

    api.post("/api/model-groups/create", RESUME_AGENT, format="json", **ADMIN)

    assert set(Deployment.objects.values_list("credential", flat=True)) == {
        credential.pk
    }


def test_group_may_name_an_existing_deployment(api):
    deployment_create(
        name="my-vllm",
        model="hosted_vllm/llama-3",
        litellm_params={"api_base": "http://vllm:8000/v1"},
    )

    response = api.post(
        "/api/model-groups/create",
        {"group_name": "Local", "models": [{"model_name": "my-vllm", "priority": 0}]},
        format="json",
        **ADMIN,
    )

    assert response.status_code == 200
    assert Deployment.objects.count() == 1
    assert ModelGroupMember.objects.get().deployment.name == "my-vllm"


def test_models_come_back_in_priority_order(api):
    payload = {
        **RESUME_AGENT,
        "models": [
            {"model_name": "gpt-3.5-turbo", "priority": 5},
            {"model_name": "gpt-4-turbo", "priority": 1},
        ],
    }

    body = api.post("/api/model-groups/create", payload, format="json", **ADMIN).json()

    assert [m["model_name"] for m in body["models"]] == ["gpt-4-turbo", "gpt-3.5-turbo"]


@pytest.mark.parametrize(
    ("payload", "param", "message"),
    [
        (
            {
                "group_name": "G",
                "models": [{"model_name": "not-a-real-model", "priority": 0}],
            },
            "models",
            "Unknown model 'not-a-real-model'",
        ),
        (
            {
                "group_name": "G",
                "models": [
                    {"model_name": "gpt-4-turbo", "priority": 0},
                    {"model_name": "gpt-4-turbo", "priority": 1},
                ],
            },
            "models",
            "listed more than once",
        ),
        ({"group_name": "G", "models": []}, "models", ""),
        ({"group_name": "G"}, "models", ""),
        (
            {
                "group_name": "has/slash",
                "models": [{"model_name": "gpt-4-turbo", "priority": 0}],
            },
            "group_name",
            "",
        ),
        (
            {
                "group_name": "G",
                "models": [{"model_name": "gpt-4-turbo", "priority": -1}],
            },
            "models.0.priority",
            "",
        ),
        (
            {
                "group_name": "G",
                "models": [{"model_name": "gpt-4-turbo", "priority": 0, "weight": 3}],
            },
            "models.0.weight",
            "",
        ),
    ],
)
def test_bad_groups_are_400_and_write_nothing(api, payload, param, message):
    before = _state()

    response = api.post("/api/model-groups/create", payload, format="json", **ADMIN)

    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert message in error["message"]
    assert _state() == before


def test_unknown_model_after_a_known_one_leaves_no_deployment_behind(api):
    payload = {
        "group_name": "G",
        "models": [
            {"model_name": "gpt-4-turbo", "priority": 0},
            {"model_name": "nope-model", "priority": 1},
        ],
    }

    response = api.post("/api/model-groups/create", payload, format="json", **ADMIN)

    assert response.status_code == 400
    assert not Deployment.objects.exists()
    assert not AuditLogEntry.objects.exists()


def test_duplicate_group_is_400_already_exists(api):
    api.post("/api/model-groups/create", RESUME_AGENT, format="json", **ADMIN)
    before = _state()

    response = api.post(
        "/api/model-groups/create", RESUME_AGENT, format="json", **ADMIN
    )

    assert response.status_code == 400
    assert (
        response.json()["error"]["message"]
        == "Model group 'ResumeAgent' already exists"
    )
    assert _state() == before


def test_replace_models(api):
    api.post("/api/model-groups/create", RESUME_AGENT, format="json", **ADMIN)

    response = api.put(
        "/api/model-groups/ResumeAgent/models",
        {"models": [{"model_name": "gpt-4o", "priority": 0}]},
        format="json",
        **ADMIN,
    )

    assert response.status_code == 200
    assert response.json()["models"] == [{"model_name": "gpt-4o", "priority": 0}]
    entry = AuditLogEntry.objects.get(action="model_group.replace_models")
    assert entry.details["before"] == RESUME_AGENT["models"]


def test_replace_with_an_unknown_model_keeps_the_old_list(api):
    api.post("/api/model-groups/create", RESUME_AGENT, format="json", **ADMIN)
    before = _state()

    response = api.put(
        "/api/model-groups/ResumeAgent/models",
        {"models": [{"model_name": "nope-model", "priority": 0}]},
        format="json",
        **ADMIN,
    )

    assert response.status_code == 400
    assert _state() == before


def test_update_and_delete_a_group(api):
    api.post("/api/model-groups/create", RESUME_AGENT, format="json", **ADMIN)

    patched = api.patch(
        "/api/model-groups/ResumeAgent",
        {"status": "disabled", "display_name": "Old"},
        format="json",
        **ADMIN,
    )
    deleted = api.delete("/api/model-groups/ResumeAgent", **ADMIN)

    assert (
        patched.status_code,
        patched.json()["status"],
        patched.json()["display_name"],
    ) == (200, "disabled", "Old")
    assert deleted.status_code == 200
    assert not ModelGroup.objects.exists()
    assert Deployment.objects.count() == 2  # deployments outlive the group
    assert api.get("/api/model-groups/ResumeAgent", **ADMIN).status_code == 404


def test_group_used_by_a_team_cannot_be_deleted(api, team, model_group):
    before = _state()

    response = api.delete("/api/model-groups/chat", **ADMIN)

    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": "Model group 'chat' is used by teams: team_alice",
        "type": "invalid_request_error",
        "code": "model_group_in_use",
        "param": None,
    }
    assert _state() == before


def test_group_with_usage_history_cannot_be_deleted(api, team, model_group):
    # Given a call's usage record names the group (no database constraint
    # guards that reference: the ORM's PROTECT does), and no live team uses it
    from billing.models import UsageRecord
    from tenants.services import team_delete

    UsageRecord.objects.create(
        request_id="req_history",
        organization_id=team.organization_id,
        team=team,
        model_group=model_group,
        endpoint="chat",
        requested_model="chat",
        status="success",
        created_at=timezone.now(),
    )
    team_delete(team=team)
    before = _state()

    response = api.delete("/api/model-groups/chat", **ADMIN)

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "model_group_has_usage"
    assert _state() == before
    assert UsageRecord.objects.get().model_group_id == model_group.pk


def test_unknown_group_is_404(api, db):
    for method, path in [
        ("get", "/api/model-groups/nope"),
        ("put", "/api/model-groups/nope/models"),
        ("delete", "/api/model-groups/nope"),
    ]:
        response = getattr(api, method)(
            path, {"models": [{"model_name": "gpt-4o"}]}, format="json", **ADMIN
        )
        assert response.status_code == 404, path
