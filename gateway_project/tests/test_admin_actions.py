"""The operator's console: the dashboard drawn from real calls, and every admin
action calling its service — with a confirmation page where it destroys, an
audit entry, and the effect in the database."""

import re

import pytest
from django.db.models import F, Sum
from django.test import Client
from django.urls import reverse

from accounts.models import AuditLogEntry, Role, User
from billing.models import CreditAccount, LedgerEntry, UsageRecord
from billing.tests.prices import price
from gateway_project.charts import (
    basis_points,
    format_count,
    format_credits,
    format_usd,
)
from gateway_project.money import MICROS
from routing.models import Deployment, ModelGroup, ModelGroupMember, ProviderCredential
from routing.services import deployment_create, provider_credential_create
from tenants.keys import key_digest
from tenants.models import KeyStatus, Team, VirtualKey
from tenants.services import team_update, virtual_key_issue

TEAMS = "admin:tenants_team_changelist"
KEYS = "admin:tenants_virtualkey_changelist"
DEPLOYMENTS = "admin:routing_deployment_changelist"
ACCOUNTS = "admin:billing_creditaccount_changelist"
SHOWN_ONCE = re.compile(r"will not be shown again: (?P<key>\S+)$")


def _messages(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def _action(client: Client, changelist: str, action: str, pk, **data):
    return client.post(
        reverse(changelist), {"action": action, "_selected_action": [pk], **data}
    )


def _svg(html: str, chart_id: str) -> str:
    match = re.search(rf'<svg [^>]*id="{chart_id}".*?</svg>', html, re.DOTALL)
    assert match is not None, f"no chart {chart_id}"
    return match.group(0)


def _series_sums(svg: str) -> list[int]:
    sums: dict[int, int] = {}
    for series, value in re.findall(
        r'<circle class="point series-(\d+)"[^>]*data-value="(\d+)"', svg
    ):
        sums[int(series)] = sums.get(int(series), 0) + int(value)
    return [sums[series] for series in sorted(sums)]


def _bars(svg: str) -> list[tuple[str, int]]:
    return [
        (label, int(value))
        for label, value in re.findall(
            r'<text class="label"[^>]*>([^<]*)</text><rect class="bar"[^>]*'
            r'data-value="(\d+)"',
            svg,
        )
    ]


def _points(svg: str, series: int) -> list[int]:
    return [
        int(value)
        for value in re.findall(
            rf'<circle class="point series-{series}"[^>]*data-value="(\d+)"', svg
        )
    ]


def _rates_of_busy_hours(rates: str, requests: str) -> tuple[list[int], list[int]]:
    """Error and cache-hit rates (basis points) of the hours that had calls."""
    busy = [i for i, count in enumerate(_points(requests, 0)) if count]
    return (
        [_points(rates, 0)[i] for i in busy],
        [_points(rates, 1)[i] for i in busy],
    )


def _tiles(html: str) -> dict[str, str]:
    return dict(
        re.findall(
            r'<li data-tile="([a-z0-9-]+)"><span class="figure">([^<]*)</span>', html
        )
    )


def _chat(client: Client, key: str, content: str):
    return client.post(
        "/v1/chat/completions",
        {"model": "chat", "messages": [{"role": "user", "content": content}]},
        content_type="application/json",
        HTTP_AUTHORIZATION=f"Bearer {key}",
    )


@pytest.fixture
def viewer(db) -> User:
    return User.objects.create_user(
        "viewer@example.com", "Long-enough-1", role=Role.USER
    )


@pytest.fixture
def viewer_client(viewer) -> Client:
    client = Client()
    client.force_login(viewer)
    return client


@pytest.fixture
def key(team) -> VirtualKey:
    return virtual_key_issue(team=team, alias="main")[0]


@pytest.fixture
def used_team(team, fake_upstream) -> Team:
    """team_alice after five real calls to its group "chat": one fell back, one
    failed, one was a cache hit."""
    price("openai/fake-model")
    upstream = deployment_create(
        name="upstream-a",
        model="openai/fake-model",
        litellm_params={"api_base": fake_upstream.base("dashboard")},
        timeout_ms=5_000,
    )
    group = ModelGroup.objects.get(group_name="chat")
    group.members.update(priority=1)
    ModelGroupMember.objects.create(model_group=group, deployment=upstream, priority=0)
    team_update(team=team, changes={"cache_mode": "always"})
    fake_upstream.program(
        "dashboard",
        {"status": 500},
        {"content": "ok"},
        {"status": 400},
        {"content": "ok"},
    )
    _, plaintext = virtual_key_issue(team=team, alias="calls")
    client = Client()

    responses = [
        _chat(client, plaintext, content)
        for content in ("one", "two", "three", "two", "five")
    ]

    assert [r.status_code for r in responses] == [200, 200, 400, 200, 200]
    assert responses[0]["x-gateway-deployment"] == "mock-a"
    assert responses[3]["x-cache"] == "hit"
    assert UsageRecord.objects.count() == 5
    return team


@pytest.mark.django_db(transaction=True)
def test_dashboard_draws_its_charts_from_real_calls(owner_client, used_team):
    totals = UsageRecord.objects.aggregate(
        tokens=Sum("total_tokens"),
        cost=Sum("cost_micros"),
        credits=Sum("credits_micros"),
    )
    assert totals["cost"] > 0

    response = owner_client.get(reverse("admin:dashboard"))

    assert response.status_code == 200
    html = response.content.decode()
    tiles = _tiles(html)
    assert tiles.pop("p50-latency").endswith(" ms")
    assert tiles.pop("p95-latency").endswith(" ms")
    assert tiles == {
        "requests": "5",
        "error-rate": "20.0%",
        "cache-hit-rate": "20.0%",
        "fallbacks": "1",
        "tokens": format_count(totals["tokens"]),
        "cost": format_usd(totals["cost"]),
        "credits": format_credits(totals["credits"]),
    }
    requests = _svg(html, "chart-requests")
    assert 'data-points="24"' in requests
    assert _series_sums(requests) == [5, 1, 1]  # requests, errors, cache hits
    assert _series_sums(_svg(html, "chart-tokens")) == [
        UsageRecord.objects.aggregate(s=Sum("prompt_tokens"))["s"],
        UsageRecord.objects.aggregate(s=Sum("completion_tokens"))["s"],
    ]
    assert _series_sums(_svg(html, "chart-cost")) == [totals["cost"]]
    assert _series_sums(_svg(html, "chart-credits")) == [totals["credits"]]
    assert _series_sums(_svg(html, "chart-fallbacks")) == [1]  # the first call
    # Per hour with calls (one, unless the calls straddled an hour).
    hours: dict = {}
    for record in UsageRecord.objects.all():
        hour = hours.setdefault(
            record.created_at.replace(minute=0, second=0, microsecond=0), [0, 0, 0]
        )
        hour[0] += 1
        hour[1] += record.status == "error"
        hour[2] += record.cached
    assert _rates_of_busy_hours(_svg(html, "chart-rates"), requests) == (
        [basis_points(errors, count) for count, errors, _ in hours.values()],
        [basis_points(hits, count) for count, _, hits in hours.values()],
    )
    assert _bars(_svg(html, "chart-top-teams")) == [("team_alice", totals["cost"])]
    assert _bars(_svg(html, "chart-top-model-groups")) == [("chat", totals["cost"])]


@pytest.mark.django_db(transaction=True)
def test_team_page_shows_usage_chart_and_recent_usage(owner_client, used_team):
    response = owner_client.get(
        reverse("admin:tenants_team_change", args=[used_team.pk])
    )

    html = response.content.decode()
    assert _series_sums(_svg(html, "team-24h-requests")) == [5, 1, 1]
    assert _series_sums(_svg(html, "team-30d-credits")) == [
        UsageRecord.objects.aggregate(s=Sum("credits_micros"))["s"]
    ]
    recent = re.search(r'<table id="recent-usage">.*?</table>', html, re.DOTALL).group(
        0
    )
    shown = re.findall(r'/admin/billing/usagerecord/\d+/change/">([^<]+)</a>', recent)
    assert shown == list(
        UsageRecord.objects.order_by("-created_at").values_list("request_id", flat=True)
    )
    assert re.search(r"balance [0-9.,]+ · held [0-9.,]+", html).group(0) == (
        # Three calls charged 1 credit each; the error and the cache hit were free.
        "balance 97.000000 · held 0.000000"
    )
    assert 'id="keys-group"' in html


@pytest.mark.parametrize(
    ("period", "points"),
    [("24h", 24), ("7d", 168), ("30d", 30), ("90d", 90), ("x", 24)],
)
def test_dashboard_periods(owner_client, period, points):
    response = owner_client.get(reverse("admin:dashboard"), {"period": period})

    svg = _svg(response.content.decode(), "chart-requests")
    assert f'data-points="{points}" data-max="0"' in svg
    assert "No usage in this period" in svg


@pytest.mark.django_db(transaction=True)
def test_dashboard_of_another_organization_shows_none_of_the_usage(
    owner_client, used_team
):
    from tenants.services import organization_create

    organization_create(organization_id="org_bob", name="Bob")

    response = owner_client.get(reverse("admin:dashboard"), {"organization": "org_bob"})

    html = response.content.decode()
    assert _tiles(html)["requests"] == "0"
    assert _bars(_svg(html, "chart-top-teams")) == []


def test_index_shows_the_last_24_hours_and_links_the_dashboard(owner_client):
    html = owner_client.get(reverse("admin:index")).content.decode()

    assert _tiles(html)["requests"] == "0"
    assert f'href="{reverse("admin:dashboard")}" id="open-dashboard"' in html
    assert f'href="{reverse("admin:dashboard")}" id="dashboard-link"' in html


def test_the_read_only_role_sees_the_dashboard(viewer_client, client):
    assert viewer_client.get(reverse("admin:dashboard")).status_code == 200
    anonymous = client.get(reverse("admin:dashboard"))
    assert anonymous.status_code == 302
    assert anonymous["Location"].startswith(reverse("admin:login"))


# --- actions ---------------------------------------------------------------------


def test_add_credits_asks_how_many_then_tops_up_once(owner_client, owner, team):
    # Given team_alice with 100 credits
    # When the owner picks "add credits" for it
    page = _action(owner_client, TEAMS, "add_credits", team.pk)

    # Then a form asks how many, and nothing is written yet
    assert page.status_code == 200
    assert page.templates[0].name == "admin/gateway/action_confirmation.html"
    token = page.context["form"].initial["token"]
    assert LedgerEntry.objects.filter(entry_type="top_up").count() == 0

    # When they fill it in (and submit the same page twice)
    data = {"post": "yes", "credits": "25.5", "reason": "invoice 7", "token": token}
    first = _action(owner_client, TEAMS, "add_credits", team.pk, **data)
    second = _action(owner_client, TEAMS, "add_credits", team.pk, **data)

    # Then the credits are added once, as a top-up, and audited
    assert (first.status_code, second.status_code) == (302, 302)
    account = CreditAccount.objects.get(team=team)
    assert account.balance_micros == 125_500_000
    entry = LedgerEntry.objects.get(entry_type="top_up")
    assert (entry.amount_micros, entry.reason, entry.actor) == (
        25_500_000,
        "invoice 7",
        owner,
    )
    audit = AuditLogEntry.objects.get(
        action="credits.add", details__entry_type="top_up"
    )
    assert (audit.actor, audit.resource_id, audit.details["amount_micros"]) == (
        owner,
        "team_alice",
        25_500_000,
    )


def test_add_credits_refuses_a_non_positive_amount(owner_client, team):
    response = _action(
        owner_client, TEAMS, "add_credits", team.pk, post="yes", credits="0", token="t"
    )

    assert response.status_code == 200
    assert "credits" in response.context["form"].errors
    assert CreditAccount.objects.get(team=team).balance_micros == 100 * MICROS


def test_suspend_is_confirmed_then_audited_and_resume_brings_it_back(
    owner_client, owner, team
):
    change = reverse("admin:tenants_team_change", args=[team.pk])

    page = _action(owner_client, TEAMS, "suspend_teams", team.pk, next=change)

    assert page.status_code == 200
    assert "Their keys stop working at once" in page.content.decode()
    assert Team.objects.get(pk=team.pk).status == "active"

    done = _action(
        owner_client, TEAMS, "suspend_teams", team.pk, next=change, post="yes"
    )

    assert (done.status_code, done["Location"]) == (302, change)
    assert Team.objects.get(pk=team.pk).status == "suspended"
    audit = AuditLogEntry.objects.get(action="team.update")
    assert (audit.actor, audit.details) == (owner, {"status": ["active", "suspended"]})

    resumed = _action(owner_client, TEAMS, "resume_teams", team.pk)

    assert resumed.status_code == 302
    assert Team.objects.get(pk=team.pk).status == "active"
    assert list(
        AuditLogEntry.objects.filter(action="team.update")
        .order_by("created_at")
        .values_list("details", flat=True)
    ) == [{"status": ["active", "suspended"]}, {"status": ["suspended", "active"]}]


def test_issue_a_key_from_the_team_page_preselects_the_team(owner_client, team):
    page = owner_client.get(reverse("admin:tenants_team_change", args=[team.pk]))
    issue = reverse("admin:tenants_virtualkey_add") + f"?team={team.pk}"
    assert f'href="{issue}"' in page.content.decode()

    form = owner_client.get(issue)
    response = owner_client.post(
        issue,
        {"team": team.pk, "alias": "issued", "expires_at_0": "", "expires_at_1": ""},
        follow=True,
    )

    assert form.context["adminform"].form.initial["team"] == str(team.pk)
    key = VirtualKey.objects.get(alias="issued")
    shown = [m for m in _messages(response) if "will not be shown again" in m]
    assert len(shown) == 1
    assert key_digest(SHOWN_ONCE.search(shown[0])["key"]) == key.digest
    assert (
        AuditLogEntry.objects.get(action="key.issue").resource_id == key.display_prefix
    )


def test_rotate_shows_the_new_secret_once_and_keeps_the_old_for_the_grace(
    owner_client, owner, key
):
    page = _action(owner_client, KEYS, "rotate_keys", key.pk)
    token = page.context["form"].initial["token"]
    assert not VirtualKey.objects.filter(predecessor=key).exists()

    response = owner_client.post(
        reverse(KEYS),
        {
            "action": "rotate_keys",
            "_selected_action": [key.pk],
            "post": "yes",
            "grace_seconds": "60",
            "token": token,
        },
        follow=True,
    )

    successor = VirtualKey.objects.get(predecessor=key)
    old = VirtualKey.objects.get(pk=key.pk)
    assert 59 <= (old.grace_until - successor.created_at).total_seconds() <= 61
    shown = [m for m in _messages(response) if "will not be shown again" in m]
    assert len(shown) == 1
    assert shown[0].startswith(
        f"Rotated {key.display_prefix} to {successor.display_prefix}."
    )
    assert key_digest(SHOWN_ONCE.search(shown[0])["key"]) == successor.digest
    audit = AuditLogEntry.objects.get(action="key.rotate")
    assert (audit.actor, audit.details) == (
        owner,
        {"successor": successor.display_prefix, "grace_seconds": 60},
    )


def test_revoke_is_confirmed_then_audited(owner_client, owner, key):
    page = _action(owner_client, KEYS, "revoke_keys", key.pk)

    assert page.status_code == 200
    assert VirtualKey.objects.get(pk=key.pk).status == KeyStatus.ACTIVE

    response = _action(owner_client, KEYS, "revoke_keys", key.pk, post="yes")

    assert response.status_code == 302
    assert VirtualKey.objects.get(pk=key.pk).status == KeyStatus.REVOKED
    audit = AuditLogEntry.objects.get(action="key.revoke")
    assert (audit.actor, audit.resource_id) == (owner, key.display_prefix)


def test_test_deployment_makes_one_tiny_call_and_shows_the_answer(
    owner_client, owner, deployment
):
    response = owner_client.post(
        reverse(DEPLOYMENTS),
        {"action": "test_deployments", "_selected_action": [deployment.pk]},
        follow=True,
    )

    [message] = _messages(response)
    assert re.fullmatch(
        r"Deployment mock-a answered 'hi' \(\d+ prompt \+ \d+ completion tokens\) in \d+ ms\.",
        message,
    )
    audit = AuditLogEntry.objects.get(action="deployment.test")
    assert (audit.actor, audit.resource_id, audit.details["succeeded"]) == (
        owner,
        "mock-a",
        True,
    )
    assert UsageRecord.objects.count() == 0  # the operator's call, billed to nobody


def test_test_deployment_shows_the_provider_error(owner_client, fake_upstream, db):
    fake_upstream.program("broken", status=500)
    broken = deployment_create(
        name="broken",
        model="openai/fake-model",
        litellm_params={"api_base": fake_upstream.base("broken")},
        timeout_ms=5_000,
    )

    response = owner_client.post(
        reverse(DEPLOYMENTS),
        {"action": "test_deployments", "_selected_action": [broken.pk]},
        follow=True,
    )

    [message] = response.context["messages"]
    assert message.level_tag == "error"
    assert str(message).startswith(
        "Deployment broken failed with upstream_error (502): "
    )
    assert fake_upstream.calls("broken") == 1
    assert fake_upstream.requests[0].json["max_tokens"] == 5
    assert (
        AuditLogEntry.objects.get(action="deployment.test").details["succeeded"]
        is False
    )


@pytest.mark.parametrize(
    ("changelist", "action"),
    [(TEAMS, "reconcile_credits"), (ACCOUNTS, "reconcile_accounts")],
)
def test_reconcile_now_repairs_drift_and_is_audited(
    owner_client, owner, team, changelist, action
):
    account = CreditAccount.objects.get(team=team)
    CreditAccount.objects.filter(pk=account.pk).update(
        balance_micros=F("balance_micros") + 5
    )
    pk = team.pk if changelist == TEAMS else account.pk

    response = owner_client.post(
        reverse(changelist), {"action": action, "_selected_action": [pk]}, follow=True
    )

    assert _messages(response) == ["Reconciled 1 account(s): repaired 1: team_alice"]
    assert CreditAccount.objects.get(pk=account.pk).balance_micros == 100 * MICROS
    drift = {"balance_micros": [100 * MICROS + 5, 100 * MICROS]}
    assert AuditLogEntry.objects.get(action="credits.drift_repaired").details == drift
    audit = AuditLogEntry.objects.get(action="credits.reconcile")
    assert (audit.actor, audit.details) == (owner, {"via": "admin", "drift": drift})

    again = owner_client.post(
        reverse(changelist), {"action": action, "_selected_action": [pk]}, follow=True
    )

    assert _messages(again) == [
        "Reconciled 1 account(s): 1 already matched their ledger"
    ]


@pytest.mark.parametrize(
    ("url_name", "fixture", "buttons"),
    [
        (
            "admin:tenants_team_change",
            "team",
            ["suspend_teams", "add_credits", "reconcile_credits"],
        ),
        ("admin:tenants_virtualkey_change", "key", ["rotate_keys", "revoke_keys"]),
        ("admin:routing_deployment_change", "deployment", ["test_deployments"]),
    ],
)
def test_change_pages_offer_their_actions_to_owners_only(
    owner_client, viewer_client, request, url_name, fixture, buttons
):
    obj = request.getfixturevalue(fixture)
    url = reverse(url_name, args=[obj.pk])

    owners = owner_client.get(url).content.decode()
    viewers = viewer_client.get(url).content.decode()

    assert re.findall(r'data-action="([a-z_]+)"', owners) == buttons
    assert re.findall(r'data-action="([a-z_]+)"', viewers) == []
    assert (
        'name="action"'
        not in viewer_client.get(
            reverse(url_name.replace("_change", "_changelist"))
        ).content.decode()
    )


def test_model_group_priorities_are_edited_inline_and_audited(
    owner_client, owner, team
):
    group = ModelGroup.objects.get(group_name="chat")
    member = group.members.get()
    second = deployment_create(
        name="mock-b", model="openai/mock-a", litellm_params={"mock_response": "hi"}
    )

    response = owner_client.post(
        reverse("admin:routing_modelgroup_change", args=[group.pk]),
        {
            "group_name": "chat",
            "display_name": "",
            "description": "",
            "status": "active",
            "members-TOTAL_FORMS": "2",
            "members-INITIAL_FORMS": "1",
            "members-MIN_NUM_FORMS": "0",
            "members-MAX_NUM_FORMS": "1000",
            "members-0-id": member.pk,
            "members-0-model_group": group.pk,
            "members-0-deployment": member.deployment_id,
            "members-0-priority": "5",
            "members-0-weight": "1",
            "members-1-model_group": group.pk,
            "members-1-deployment": second.pk,
            "members-1-priority": "0",
            "members-1-weight": "2",
        },
    )

    assert response.status_code == 302
    assert list(
        group.members.order_by("priority").values_list(
            "deployment__name", "priority", "weight"
        )
    ) == [("mock-b", 0, 2), ("mock-a", 5, 1)]
    audit = AuditLogEntry.objects.get(action="model_group.members")
    assert (audit.actor, audit.details) == (
        owner,
        {
            "via": "admin",
            "before": [{"deployment": "mock-a", "priority": 0, "weight": 1}],
            "after": [
                {"deployment": "mock-b", "priority": 0, "weight": 2},
                {"deployment": "mock-a", "priority": 5, "weight": 1},
            ],
        },
    )


def test_provider_credential_form_masks_the_secret(owner_client, db):
    credential = provider_credential_create(
        name="openai-main", provider="openai", api_key="sk-proj-SECRET0123456789"
    )

    html = owner_client.get(
        reverse("admin:routing_providercredential_change", args=[credential.pk])
    ).content.decode()

    assert "SECRET" not in html
    assert credential.api_key_encrypted not in html
    assert '<input type="password" name="api_key"' in html
    assert "The current key ends …6789 and is stored encrypted." in html
    assert ProviderCredential.objects.get().api_key_hint == "…6789"
    assert Deployment.objects.count() == 0
