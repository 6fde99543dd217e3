"""Every admin screen renders for an owner, redirects strangers, leaks no secret."""

import io
import re
from datetime import timedelta

import pytest
from django.contrib import admin
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from accounts.models import RevokedToken, User
from billing.models import Job, ModelPrice, UsageRecord
from billing.rollups import usage_roll_up
from gateway_project.crypto import decrypt_text
from routing.models import ModelGroupMember, ProviderCredential
from routing.services import provider_credential_create
from tenants.models import VirtualKey

pytestmark = pytest.mark.django_db

PROVIDER_KEY = "sk-proj-PROVIDERSECRET0123456789"
MODELS = sorted(admin.site._registry, key=lambda model: model._meta.label)
IDS = [model._meta.label for model in MODELS]


def _url(model, view, *args):
    return reverse(
        f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args
    )


@pytest.fixture
def seeded(db):
    out = io.StringIO()
    call_command("seed_demo", password="Seed-Passw0rd!", stdout=out)
    demo_key = next(
        line.split(": ", 1)[1]
        for line in out.getvalue().splitlines()
        if line.startswith("Demo key: ")
    )
    provider_credential_create(
        name="openai-main", provider="openai", api_key=PROVIDER_KEY
    )
    # One row of every model seed_demo does not create, so every change page renders.
    key = VirtualKey.objects.get(alias="demo")
    owner = User.objects.get()
    RevokedToken.objects.create(jti="j1", user=owner, expires_at=timezone.now())
    job = Job.objects.create(team=key.team, virtual_key=key, job_type="resume")
    ModelPrice.objects.create(
        model="openai/demo-mock",
        input_price_per_million_micros=1,
        output_price_per_million_micros=2,
        effective_from=timezone.now(),
    )
    UsageRecord.objects.create(
        request_id="req_seeded",
        organization=key.team.organization,
        team=key.team,
        virtual_key=key,
        job=job,
        endpoint="chat/completions",
        requested_model="demo",
        status="success",
        created_at=timezone.now() - timedelta(hours=2),
    )
    usage_roll_up(now=timezone.now())  # rollup rows and the rollup state
    return demo_key


def test_every_model_has_an_admin():
    from django.apps import apps

    ours = {
        m
        for m in apps.get_models()
        if m._meta.app_label in {"accounts", "tenants", "billing", "routing"}
    }
    inlined = {
        inline.model
        for model_admin in admin.site._registry.values()
        for inline in model_admin.inlines
    }

    assert ours - inlined <= set(admin.site._registry)
    assert ModelGroupMember in inlined


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_changelist_renders_for_an_owner(owner_client, seeded, model):
    response = owner_client.get(_url(model, "changelist"))

    assert response.status_code == 200


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_add_page_renders_or_is_forbidden_for_records_nobody_adds(
    owner_client, model, rf, owner
):
    request = rf.get("/")
    request.user = owner
    can_add = admin.site._registry[model].has_add_permission(request)

    response = owner_client.get(_url(model, "add"))

    assert response.status_code == (200 if can_add else 403)


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_change_page_renders_for_an_owner(owner_client, seeded, model):
    obj = model._default_manager.first()

    response = owner_client.get(_url(model, "change", obj.pk))

    assert response.status_code == 200


def test_dashboard_renders_for_an_owner_with_every_chart(owner_client, seeded):
    response = owner_client.get(reverse("admin:dashboard"), {"period": "30d"})

    assert response.status_code == 200
    assert response.context["title"] == "Dashboard"
    assert [caption for caption, _ in response.context["charts"]] == [
        "Requests",
        "Tokens",
        "Cost (USD)",
        "Credits charged",
        "Error and cache-hit rate",
        "Requests that fell back",
    ]
    assert [caption for caption, _ in response.context["tops"]] == [
        "Top teams by cost",
        "Top model groups by cost",
    ]
    html = response.content.decode()
    assert (
        html.count('<svg xmlns="http://www.w3.org/2000/svg" class="gateway-chart') == 8
    )
    # No asset from anywhere but this server: users run it on closed networks.
    assert not [
        url for url in re.findall(r'(?:src|href)="([^"]+)"', html) if "//" in url
    ]


@pytest.mark.parametrize("model", MODELS, ids=IDS)
def test_anonymous_is_sent_to_login(client, model):
    url = _url(model, "changelist")

    response = client.get(url)

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_no_secret_appears_in_any_admin_page(owner_client, seeded):
    key = VirtualKey.objects.get(alias="demo")
    credential = ProviderCredential.objects.get(name="openai-main")
    owner = User.objects.get(email="owner@example.com")
    secrets = {
        "demo key": seeded,
        "demo key secret part": seeded.rsplit("_", 1)[1],
        "key digest": key.digest,
        "provider key": PROVIDER_KEY,
        "provider key ciphertext": credential.api_key_encrypted,
        "password hash": owner.password.split("$")[-1],
    }
    pages = [reverse("admin:index"), reverse("admin:dashboard")]
    pages += [_url(model, "changelist") for model in MODELS]
    pages += [
        _url(model, "change", obj.pk)
        for model in MODELS
        for obj in model._default_manager.all()[:3]
    ]

    for page in pages:
        html = owner_client.get(page).content.decode()
        leaked = [name for name, value in secrets.items() if value in html]
        assert leaked == [], f"{page} shows {leaked}"
    assert (
        credential.api_key_hint
        in owner_client.get(_url(ProviderCredential, "changelist")).content.decode()
    )


def test_key_added_in_admin_is_shown_once_then_never(owner_client, seeded):
    team_pk = VirtualKey.objects.get(alias="demo").team_id

    response = owner_client.post(
        _url(VirtualKey, "add"),
        {
            "team": team_pk,
            "alias": "from-admin",
            "expires_at_0": "",
            "expires_at_1": "",
        },
        follow=True,
    )

    assert response.status_code == 200
    shown = [
        str(m)
        for m in response.context["messages"]
        if "will not be shown again" in str(m)
    ]
    assert len(shown) == 1
    plaintext = shown[0].rsplit(": ", 1)[1]
    key = VirtualKey.objects.get(alias="from-admin")
    assert plaintext.startswith(key.display_prefix + "_")
    added = [
        str(m)
        for m in response.context["messages"]
        if "was added successfully" in str(m)
    ]
    link = reverse("admin:tenants_virtualkey_change", args=[key.pk])
    assert added == [
        f'The virtual key “<a href="{link}">{key}</a>” was added successfully.'
    ]
    assert str(key).startswith(key.display_prefix)
    assert (
        plaintext
        not in owner_client.get(_url(VirtualKey, "change", key.pk)).content.decode()
    )
    assert (
        plaintext
        not in owner_client.get(_url(VirtualKey, "changelist")).content.decode()
    )


def test_credential_key_set_in_admin_is_stored_encrypted(owner_client):
    response = owner_client.post(
        _url(ProviderCredential, "add"),
        {
            "name": "anthropic",
            "provider": "anthropic",
            "api_base": "",
            "api_key": PROVIDER_KEY,
            "extra": "{}",
        },
    )

    assert response.status_code == 302
    credential = ProviderCredential.objects.get(name="anthropic")
    assert PROVIDER_KEY not in credential.api_key_encrypted
    assert decrypt_text(credential.api_key_encrypted) == PROVIDER_KEY
    page = owner_client.get(
        _url(ProviderCredential, "change", credential.pk)
    ).content.decode()
    assert PROVIDER_KEY not in page


def test_read_only_operator_can_view_but_not_change(seeded):
    viewer = User.objects.create_user(
        "viewer@example.com", "Long-enough-1", role="user"
    )
    client = Client()
    client.force_login(viewer)
    team_pk = VirtualKey.objects.get(alias="demo").team_id

    assert client.get(reverse("admin:tenants_team_changelist")).status_code == 200
    assert client.get(reverse("admin:tenants_team_add")).status_code == 403
    response = client.post(
        reverse("admin:tenants_team_change", args=[team_pk]), {"team_alias": "hacked"}
    )
    assert response.status_code == 403


def test_admin_header_names_the_deployment_mode(owner_client):
    html = owner_client.get(reverse("admin:index")).content.decode()

    assert "LLM Gateway" in html
    assert (
        '<span class="gateway-mode" title="PostgreSQL and Redis">production</span>'
        in html
    )
