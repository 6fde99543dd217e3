"""manage.py import_litellm_config (issue 8): a LiteLLM proxy model_list becomes
credentials, deployments, model groups and prices; idempotent; all or nothing."""

from io import StringIO
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from accounts.models import AuditLogEntry
from billing.models import ModelPrice, UsageRecord
from billing.services import credit_account_open, credits_allocate
from gateway_project.crypto import decrypt_text
from gateway_project.money import MICROS
from routing.models import Deployment, ModelGroup, ModelGroupMember, ProviderCredential
from tenants.services import team_create, virtual_key_issue

CONFIG = """
model_list:
  - model_name: gpt-4o
    litellm_params:
      model: openai/gpt-4o
      api_key: os.environ/OPENAI_API_KEY
      api_base: os.environ/OPENAI_API_BASE
      rpm: 500
      timeout: 30
      max_retries: 2
    model_info:
      input_cost_per_token: 0.0000025
      output_cost_per_token: 1.0e-05
  - model_name: gpt-4o
    litellm_params:
      model: azure/gpt-4o-prod
      api_base: https://example-resource.openai.azure.com
      api_key: os.environ/AZURE_API_KEY
      api_version: "2024-06-01"
      weight: 2
    model_info:
      id: azure-gpt-4o
      base_model: azure/gpt-4o
      mode: chat
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_key: os.environ/OPENAI_API_KEY
      api_base: os.environ/OPENAI_API_BASE
    model_info:
      input_cost_per_token: 0.00000015
      output_cost_per_token: 0.0000006
  - model_name: claude
    litellm_params:
      model: anthropic/claude-sonnet-4-5-20250929
      api_key: sk-ant-literal-secret-3333
      temperature: 0.2
router_settings:
  routing_strategy: simple-shuffle
  fallbacks: [{"gpt-4o": ["gpt-4o-mini"]}]
"""
OPENAI_KEY, AZURE_KEY, ANTHROPIC_KEY = (
    "sk-openai-secret-1111",
    "azure-secret-2222",
    "sk-ant-literal-secret-3333",
)
BASE = "http://127.0.0.1:9/openai/v1"
OPENAI_CREDENTIAL = "openai:OPENAI_API_KEY@127.0.0.1"
AZURE_CREDENTIAL = "azure:AZURE_API_KEY@example-resource.openai.azure.com"
FIRST_RUN = [
    f"created   credential  {OPENAI_CREDENTIAL}: openai, key …1111",
    f"created   credential  {AZURE_CREDENTIAL}: azure, key …2222",
    "created   credential  anthropic:claude: anthropic, key …3333",
    "created   price       openai/gpt-4o: $2.50 in, $10.00 out per 1M tokens",
    "created   price       azure/gpt-4o-prod: $2.50 in, $10.00 out per 1M tokens",
    "created   price       openai/gpt-4o-mini: $0.15 in, $0.60 out per 1M tokens",
    f"created   deployment  gpt-4o: openai/gpt-4o, credential {OPENAI_CREDENTIAL}",
    f"created   deployment  azure-gpt-4o: azure/gpt-4o-prod, credential {AZURE_CREDENTIAL}",
    f"created   deployment  gpt-4o-mini: openai/gpt-4o-mini, credential {OPENAI_CREDENTIAL}",
    "created   deployment  claude: anthropic/claude-sonnet-4-5-20250929, credential anthropic:claude",
    "created   model group gpt-4o: gpt-4o (priority 0), azure-gpt-4o (priority 0, weight 2), gpt-4o-mini (priority 1, fallback)",
    "created   model group gpt-4o-mini: gpt-4o-mini (priority 0)",
    "created   model group claude: claude (priority 0)",
    "ignored   setting     litellm_params.max_retries: a deployment is tried once; fallback is the gateway's",
    "ignored   setting     model_info.mode: not used by the gateway",
    "ignored   setting     router_settings.routing_strategy: the gateway routes by priority, then weight",
    "Imported: 13 created, 0 changed, 0 unchanged, 0 skipped, 3 ignored.",
]


@pytest.fixture
def env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    monkeypatch.setenv("OPENAI_API_BASE", BASE)
    monkeypatch.setenv("AZURE_API_KEY", AZURE_KEY)


def _write(tmp_path: Path, text: str = CONFIG) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def _import(path: Path, *args: str) -> list[str]:
    out = StringIO()
    call_command("import_litellm_config", str(path), *args, stdout=out)
    return out.getvalue().splitlines()


def _rows() -> dict[str, list[dict]]:
    """Every row the import may write, with its timestamps."""
    return {
        model.__name__: list(model.objects.order_by("pk").values())
        for model in (
            ProviderCredential,
            Deployment,
            ModelGroup,
            ModelGroupMember,
            ModelPrice,
            AuditLogEntry,
        )
    }


def _members(group_name: str) -> list[tuple[str, int, int]]:
    return [
        (m.deployment.name, m.priority, m.weight)
        for m in ModelGroupMember.objects.filter(model_group__group_name=group_name)
        .select_related("deployment")
        .order_by("priority", "deployment__name")
    ]


def test_a_realistic_config_creates_everything_and_says_so(db, env, tmp_path):
    output = _import(_write(tmp_path))

    assert output == FIRST_RUN
    assert list(
        ProviderCredential.objects.order_by("name").values_list(
            "name", "provider", "api_base", "api_key_hint"
        )
    ) == [
        ("anthropic:claude", "anthropic", "", "…3333"),
        (
            AZURE_CREDENTIAL,
            "azure",
            "https://example-resource.openai.azure.com",
            "…2222",
        ),
        (OPENAI_CREDENTIAL, "openai", BASE, "…1111"),
    ]
    assert list(
        Deployment.objects.order_by("name").values_list(
            "name",
            "model",
            "credential__name",
            "litellm_params",
            "timeout_ms",
            "rpm_limit",
            "tpm_limit",
        )
    ) == [
        (
            "azure-gpt-4o",
            "azure/gpt-4o-prod",
            AZURE_CREDENTIAL,
            {"api_version": "2024-06-01"},
            60_000,
            None,
            None,
        ),
        (
            "claude",
            "anthropic/claude-sonnet-4-5-20250929",
            "anthropic:claude",
            {"temperature": 0.2},
            60_000,
            None,
            None,
        ),
        ("gpt-4o", "openai/gpt-4o", OPENAI_CREDENTIAL, {}, 30_000, 500, None),
        (
            "gpt-4o-mini",
            "openai/gpt-4o-mini",
            OPENAI_CREDENTIAL,
            {},
            60_000,
            None,
            None,
        ),
    ]
    # Two entries under one model_name share the group; the fallback group's
    # deployment follows at a lower priority.
    assert _members("gpt-4o") == [
        ("azure-gpt-4o", 0, 2),
        ("gpt-4o", 0, 1),
        ("gpt-4o-mini", 1, 1),
    ]
    assert _members("gpt-4o-mini") == [("gpt-4o-mini", 0, 1)]
    assert _members("claude") == [("claude", 0, 1)]
    assert list(
        ModelPrice.objects.order_by("model").values_list(
            "model",
            "input_price_per_million_micros",
            "output_price_per_million_micros",
            "source",
        )
    ) == [
        ("azure/gpt-4o-prod", 2_500_000, 10_000_000, "operator"),
        ("openai/gpt-4o", 2_500_000, 10_000_000, "operator"),
        ("openai/gpt-4o-mini", 150_000, 600_000, "operator"),
    ]
    assert set(
        AuditLogEntry.objects.values_list("actor_label", flat=True).distinct()
    ) == {"import_litellm_config"}


def test_secrets_are_encrypted_at_rest_and_never_printed(db, env, tmp_path):
    path = _write(tmp_path)

    output = "\n".join(_import(path) + _import(path, "--dry-run"))

    for secret in (OPENAI_KEY, AZURE_KEY, ANTHROPIC_KEY):
        assert secret not in output
        assert not ProviderCredential.objects.filter(
            api_key_encrypted__contains=secret
        ).exists()
        assert secret not in str(list(Deployment.objects.values("litellm_params")))
        assert secret not in str(list(AuditLogEntry.objects.values("details")))
    stored = {
        c.name: decrypt_text(c.api_key_encrypted)
        for c in ProviderCredential.objects.all()
    }
    assert stored == {
        OPENAI_CREDENTIAL: OPENAI_KEY,
        AZURE_CREDENTIAL: AZURE_KEY,
        "anthropic:claude": ANTHROPIC_KEY,
    }


def test_a_second_run_writes_nothing_and_says_so(db, env, tmp_path):
    path = _write(tmp_path)
    _import(path)
    before = _rows()

    output = _import(path)

    assert _rows() == before
    assert output == [
        f"unchanged credential  {OPENAI_CREDENTIAL}",
        f"unchanged credential  {AZURE_CREDENTIAL}",
        "unchanged credential  anthropic:claude",
        "unchanged price       openai/gpt-4o",
        "unchanged price       azure/gpt-4o-prod",
        "unchanged price       openai/gpt-4o-mini",
        "unchanged deployment  gpt-4o",
        "unchanged deployment  azure-gpt-4o",
        "unchanged deployment  gpt-4o-mini",
        "unchanged deployment  claude",
        "unchanged model group gpt-4o",
        "unchanged model group gpt-4o-mini",
        "unchanged model group claude",
        *FIRST_RUN[-4:-1],
        "Nothing to write: 0 created, 0 changed, 13 unchanged, 0 skipped, 3 ignored.",
    ]


def test_a_changed_file_changes_only_what_changed(db, env, monkeypatch, tmp_path):
    path = _write(tmp_path)
    _import(path)
    untouched = {
        "credential": ProviderCredential.objects.get(name=OPENAI_CREDENTIAL).updated_at,
        "deployment": Deployment.objects.get(name="gpt-4o-mini").updated_at,
        "group": ModelGroup.objects.get(group_name="claude").updated_at,
    }
    monkeypatch.setenv("AZURE_API_KEY", "azure-rotated-4444")
    changed = (
        CONFIG.replace("timeout: 30", "timeout: 12.5")
        .replace('"2024-06-01"', '"2024-10-21"')
        .replace("weight: 2", "weight: 3")
        .replace("output_cost_per_token: 1.0e-05", "output_cost_per_token: 0.000012")
    )

    output = _import(_write(tmp_path, changed))

    assert [
        line for line in output if not line.startswith(("unchanged", "ignored"))
    ] == [
        f"changed   credential  {AZURE_CREDENTIAL}: api_key …2222 → …4444",
        "changed   price       openai/gpt-4o: $2.50 in, $10.00 out per 1M tokens → $2.50 in, $12.00 out per 1M tokens",
        "changed   deployment  gpt-4o: timeout_ms 30000 → 12500",
        "changed   deployment  azure-gpt-4o: litellm_params (api_version)",
        "changed   model group gpt-4o: azure-gpt-4o (priority 0, weight 2) → (priority 0, weight 3)",
        "Imported: 0 created, 5 changed, 8 unchanged, 0 skipped, 3 ignored.",
    ]
    assert (
        decrypt_text(
            ProviderCredential.objects.get(name=AZURE_CREDENTIAL).api_key_encrypted
        )
        == "azure-rotated-4444"
    )
    assert Deployment.objects.get(name="gpt-4o").timeout_ms == 12_500
    assert Deployment.objects.get(name="azure-gpt-4o").litellm_params == {
        "api_version": "2024-10-21"
    }
    assert _members("gpt-4o") == [
        ("azure-gpt-4o", 0, 3),
        ("gpt-4o", 0, 1),
        ("gpt-4o-mini", 1, 1),
    ]
    # The old price stays in the book for the usage it priced; the new one follows.
    assert list(
        ModelPrice.objects.filter(model="openai/gpt-4o")
        .order_by("effective_from")
        .values_list("output_price_per_million_micros", flat=True)
    ) == [10_000_000, 12_000_000]
    assert {
        "credential": ProviderCredential.objects.get(name=OPENAI_CREDENTIAL).updated_at,
        "deployment": Deployment.objects.get(name="gpt-4o-mini").updated_at,
        "group": ModelGroup.objects.get(group_name="claude").updated_at,
    } == untouched


def test_entries_and_fallbacks_leaving_the_file_leave_their_groups(db, env, tmp_path):
    _import(_write(tmp_path))
    without_azure_and_fallback = CONFIG.replace(
        CONFIG[
            CONFIG.index(
                "  - model_name: gpt-4o\n    litellm_params:\n      model: azure"
            ) : CONFIG.index("  - model_name: gpt-4o-mini")
        ],
        "",
    ).replace('  fallbacks: [{"gpt-4o": ["gpt-4o-mini"]}]\n', "")

    output = _import(_write(tmp_path, without_azure_and_fallback))

    assert [line for line in output if line.startswith("changed")] == [
        "changed   model group gpt-4o: -azure-gpt-4o (priority 0, weight 2); -gpt-4o-mini (priority 1)",
    ]
    assert _members("gpt-4o") == [("gpt-4o", 0, 1)]
    # Nothing is deleted: the deployment and its credential stay for the admin.
    assert Deployment.objects.filter(name="azure-gpt-4o").exists()


def test_a_missing_environment_variable_fails_naming_it_and_writes_nothing(
    db, env, monkeypatch, tmp_path
):
    monkeypatch.delenv("AZURE_API_KEY")
    before = _rows()

    with pytest.raises(CommandError) as error:
        _import(_write(tmp_path))

    assert str(error.value) == (
        f"{tmp_path / 'config.yaml'}: The config cannot be imported:\n"
        "  - environment variable AZURE_API_KEY is not set "
        "(used by model_list[1] (gpt-4o) api_key)"
    )
    assert _rows() == before


def test_dry_run_prints_the_plan_and_writes_nothing(db, env, tmp_path):
    before = _rows()

    output = _import(_write(tmp_path), "--dry-run")

    assert _rows() == before
    assert output == [
        *FIRST_RUN[:-1],
        "Dry run, nothing written: 13 created, 0 changed, 0 unchanged, 0 skipped, 3 ignored.",
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("general_settings: {}\n", "no model_list: expected a list of models"),
        ("model_list: []\n", "model_list is empty"),
        (
            "model_list:\n  - litellm_params: {model: openai/gpt-4o}\n",
            "model_list[0]: model_name is missing",
        ),
        (
            "model_list:\n  - model_name: chat\n    litellm_params: {api_key: sk-x}\n",
            "model_list[0] (chat): litellm_params.model is missing",
        ),
        (
            "model_list:\n  - model_name: chat\n    litellm_params: {model: [unclosed\n",
            "not valid YAML at line 4, column 1: expected ',' or ']', but got '<stream end>'",
        ),
        (
            "model_list:\n  - model_name: chat\n    litellm_params: {model: openai/x, rpm: lots}\n",
            "model_list[0] (chat): rpm must be from 1 to 2147483647",
        ),
        (
            "model_list:\n  - model_name: has space\n    litellm_params: {model: openai/x}\n",
            "model_list[0] (has space): model_name 'has space' Use letters, digits and '_ . : / @ -', starting with a letter or digit.",
        ),
    ],
)
def test_an_invalid_config_is_refused_and_writes_nothing(db, tmp_path, text, message):
    before = _rows()

    with pytest.raises(CommandError) as error:
        _import(_write(tmp_path, text))

    assert str(error.value) == (
        f"{tmp_path / 'config.yaml'}: The config cannot be imported:\n  - {message}"
    )
    assert _rows() == before


def test_an_unreadable_file_is_refused(db, tmp_path):
    with pytest.raises(CommandError) as error:
        _import(tmp_path / "missing.yaml")

    assert (
        str(error.value)
        == f"Cannot read {tmp_path / 'missing.yaml'}: No such file or directory"
    )


def test_unsupported_entries_are_skipped_and_unpriced_ones_warned(db, tmp_path):
    text = """
model_list:
  - model_name: "*"
    litellm_params: {model: "openai/*"}
  - model_name: bedrock-claude
    litellm_params:
      model: bedrock/anthropic.claude-v2
      aws_secret_access_key: os.environ/NOT_READ_BECAUSE_SKIPPED
  - model_name: local
    litellm_params: {model: openai/my-local-model, api_base: "http://vllm:8000/v1"}
environment_variables: {SOME: value}
"""

    output = _import(_write(tmp_path, text))

    assert output == [
        "created   deployment  local: openai/my-local-model",
        "created   model group local: local (priority 0)",
        "skipped   entry       model_list[0] (*): wildcard models are not supported: name each model",
        "skipped   entry       model_list[1] (bedrock-claude): aws_secret_access_key cannot be stored: only api_key is kept (encrypted); add this deployment in the admin",
        "skipped   model group *: every entry was skipped",
        "skipped   model group bedrock-claude: every entry was skipped",
        "ignored   setting     environment_variables: not read: os.environ/ resolves from the environment",
        "warning   deployment  local: no price for openai/my-local-model: calls skip it until one is set (model_info.input_cost_per_token, or Model prices in the admin)",
        "Imported: 2 created, 0 changed, 0 unchanged, 4 skipped, 1 ignored.",
    ]
    assert Deployment.objects.get(name="local").litellm_params == {
        "api_base": "http://vllm:8000/v1"
    }


def test_order_weight_and_fallbacks_become_priorities(db, tmp_path):
    text = """
model_list:
  - model_name: chat
    litellm_params: {model: openai/gpt-4o-mini, api_base: "http://a:8000/v1", order: 2}
  - model_name: chat
    litellm_params: {model: openai/gpt-4o-mini, api_base: "http://b:8000/v1", order: 1, weight: 3}
  - model_name: small
    litellm_params: {model: openai/gpt-4.1-nano, api_base: "http://c:8000/v1"}
  - model_name: tiny
    litellm_params: {model: openai/gpt-4.1-nano, api_base: "http://d:8000/v1"}
litellm_settings:
  fallbacks: [{chat: [small, tiny, absent]}, {small: tiny}]
"""

    output = _import(_write(tmp_path, text))

    assert _members("chat") == [
        ("chat:2", 0, 3),
        ("chat", 1, 1),
        ("small", 2, 1),
        ("tiny", 3, 1),
    ]
    assert _members("small") == [("small", 0, 1), ("tiny", 1, 1)]
    assert Deployment.objects.get(name="chat:2").litellm_params == {
        "api_base": "http://b:8000/v1"
    }
    assert output[-2:] == [
        "ignored   setting     litellm_settings.fallbacks: chat → absent: 'absent' is not an imported model_name",
        "Imported: 7 created, 0 changed, 0 unchanged, 0 skipped, 1 ignored.",
    ]


@pytest.mark.django_db(transaction=True)
def test_the_imported_group_serves_a_call(
    env, monkeypatch, tmp_path, organization, client, fake_upstream
):
    monkeypatch.setenv("OPENAI_API_BASE", fake_upstream.base("imported"))
    _import(_write(tmp_path))
    group = ModelGroup.objects.get(group_name="gpt-4o-mini")
    team = team_create(
        organization=organization, team_id="team_import", model_groups=[group]
    )
    credit_account_open(team=team)
    credits_allocate(team=team, amount_micros=10 * MICROS, idempotency_key="i:alloc")
    _, key = virtual_key_issue(team=team)

    response = client.post(
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {key}",
    )

    assert response.status_code == 200, response.content
    assert response.json()["choices"][0]["message"]["content"] == (
        "Hello from the fake upstream."
    )
    assert response["x-gateway-deployment"] == "gpt-4o-mini"
    upstream = fake_upstream.requests[-1]
    assert (upstream.scenario, upstream.json["model"]) == ("imported", "gpt-4o-mini")
    assert upstream.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    record = UsageRecord.objects.get()
    # Charged at the price the import put in the book.
    assert (
        record.deployment.name,
        record.input_price_per_million_micros,
        record.output_price_per_million_micros,
    ) == ("gpt-4o-mini", 150_000, 600_000)
