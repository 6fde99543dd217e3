"""The admin in a real browser: headless Chromium, driven by Playwright, logs in
as an owner and as a read-only user, reads the dashboard drawn from real calls,
and runs every operator action, checking its effect in the database.

Runs against pytest-django's live server (a transactional database, flushed
after every test). Chromium is Debian's (/usr/bin/chromium, which `make test`
installs); Playwright never downloads a browser. Screenshots go to
var/test-artifacts/admin/ (var/ is not committed); with
UPDATE_README_SCREENSHOTS=1 the README's are written to docs/screenshots/ too.
"""

import os
import re
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.contrib.admin.forms import AdminAuthenticationForm
from django.db.models import Sum
from django.utils import timezone
from playwright.sync_api import Browser, Page, expect, sync_playwright

from accounts.models import AuditLogEntry, Role, User
from billing.models import CreditAccount, UsageRecord, UsageStatus
from billing.services import credit_account_open, credits_allocate, usage_record_create
from billing.tests.prices import price
from gateway_project.charts import format_count
from gateway_project.money import MICROS
from routing.models import Deployment, ModelGroup, ModelGroupMember
from routing.services import deployment_create, model_group_create
from tenants.keys import key_digest
from tenants.models import KeyStatus, Team, VirtualKey
from tenants.services import (
    organization_create,
    team_create,
    team_update,
    virtual_key_issue,
)

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(settings.BASE_DIR) / "var" / "test-artifacts" / "admin"
README_SCREENSHOTS = Path(settings.BASE_DIR) / "docs" / "screenshots"
WAIT_MS = 20_000

OWNER_EMAIL = "owner@example.com"
OWNER_PASSWORD = "Owner-Passw0rd!"
VIEWER_EMAIL = "viewer@example.com"
VIEWER_PASSWORD = "Viewer-Passw0rd!"
SHOWN_ONCE = re.compile(r"will not be shown again: (?P<key>\S+)")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} not found: the browser tests need Debian's chromium. "
            "Run `make test`, which installs it.",
            pytrace=False,
        )
    # Playwright's synchronous API keeps an event loop in this thread; the ORM
    # calls of the test itself are still plain synchronous code.
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(
                executable_path=str(CHROMIUM),
                args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
            )
            yield chromium
            chromium.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (no cookies) for every test."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    yield context.new_page()
    context.close()


def screenshot(
    page: Page,
    name: str,
    *,
    readme: bool = False,
    element: str = "",
    full_page: bool = True,
) -> Path:
    """The whole page (or one element of it) as an artifact of the test run."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    if element:
        page.locator(element).screenshot(path=str(path))
    else:
        page.screenshot(path=str(path), full_page=full_page)
    if readme and os.environ.get("UPDATE_README_SCREENSHOTS") == "1":
        README_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, README_SCREENSHOTS / f"{name}.png")
    return path


def login(page: Page, live_server, email: str, password: str) -> None:
    """Fills in and submits the admin's real login form."""
    page.goto(f"{live_server.url}/admin/login/")
    page.fill("input[name=username]", email)
    page.fill("input[name=password]", password)
    page.click("#login-form [type=submit]")
    page.wait_for_load_state()


def click_action(page: Page, action: str) -> None:
    """Clicks an object-tools button of a change page."""
    page.click(f'button[data-action="{action}"]')
    page.wait_for_load_state()


def confirm(page: Page) -> None:
    page.click("#action-confirmation-form input[name=confirm]")
    page.wait_for_load_state()


def messages(page: Page) -> list[str]:
    return page.locator("ul.messagelist li").all_inner_texts()


def data_values(page: Page, selector: str) -> list[int]:
    return page.locator(selector).evaluate_all(
        "elements => elements.map(e => Number(e.dataset.value))"
    )


def make_viewer() -> User:
    return User.objects.create_user(VIEWER_EMAIL, VIEWER_PASSWORD, role=Role.USER)


def make_calls(live_server, team: Team, fake_upstream) -> str:
    """Five real calls over HTTP to the live server with a key of ``team``:
    the first falls back to mock-a, the third fails (400 upstream), the fourth
    is a cache hit. Returns the key."""
    price("openai/fake-model")
    upstream = deployment_create(
        name="upstream-a",
        model="openai/fake-model",
        litellm_params={"api_base": fake_upstream.base("browser")},
        timeout_ms=5_000,
    )
    group = ModelGroup.objects.get(group_name="chat")
    group.members.update(priority=1)
    ModelGroupMember.objects.create(model_group=group, deployment=upstream, priority=0)
    team_update(team=team, changes={"cache_mode": "always"})
    fake_upstream.program(
        "browser",
        {"status": 500},
        {"content": "ok"},
        {"status": 400},
        {"content": "ok"},
    )
    _, key = virtual_key_issue(team=team, alias="calls")
    statuses = [
        httpx.post(
            f"{live_server.url}/v1/chat/completions",
            json={"model": "chat", "messages": [{"role": "user", "content": text}]},
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        ).status_code
        for text in ("one", "two", "three", "two", "five")
    ]
    assert statuses == [200, 200, 400, 200, 200]
    assert UsageRecord.objects.count() == 5
    return key


# --- logging in ---------------------------------------------------------------


def test_owner_logs_in_and_sees_the_gateway_admin(page, live_server, owner):
    # Given an owner
    # When they log in through the login form
    login(page, live_server, OWNER_EMAIL, OWNER_PASSWORD)

    # Then they land on the admin index, branded, with the last 24 hours and
    # links to the dashboard, teams and keys
    expect(page).to_have_url(f"{live_server.url}/admin/")
    expect(page).to_have_title("Operations | LLM Gateway admin")
    expect(page.locator("#site-name a")).to_have_text("LLM Gateway")
    expect(page.locator("#content h1")).to_have_text("Operations")
    expect(
        page.locator('#gateway-headline [data-tile="requests"] .figure')
    ).to_have_text("0")
    teams = page.locator("#content-main #tenants-team a").first
    keys = page.locator("#content-main #tenants-virtualkey a").first
    assert (teams.inner_text(), teams.get_attribute("href")) == (
        "Teams",
        "/admin/tenants/team/",
    )
    assert (keys.inner_text(), keys.get_attribute("href")) == (
        "Virtual keys",
        "/admin/tenants/virtualkey/",
    )
    assert page.locator("#dashboard-link").get_attribute("href") == "/admin/dashboard/"


def test_wrong_password_shows_the_error_and_stays_on_the_login_page(
    page, live_server, owner
):
    # When the owner logs in with a wrong password
    login(page, live_server, OWNER_EMAIL, "Wrong-Passw0rd!")

    # Then the login page says so, and nobody is logged in
    expected = AdminAuthenticationForm.error_messages["invalid_login"] % {
        "username": User._meta.get_field("email").verbose_name
    }
    expect(page).to_have_url(f"{live_server.url}/admin/login/")
    assert page.locator("#content .errornote").all_inner_texts() == [expected]
    expect(page.locator("input[name=username]")).to_have_value(OWNER_EMAIL)
    expect(page.locator("input[name=password]")).to_have_value("")
    assert page.locator("#user-tools").count() == 0


# --- the dashboard ----------------------------------------------------------------


def test_owner_sees_the_dashboard_drawn_from_real_calls(
    page, live_server, owner, team, fake_upstream
):
    # Given five real calls of team_alice through the live server
    make_calls(live_server, team, fake_upstream)
    totals = UsageRecord.objects.aggregate(
        cost=Sum("cost_micros"), tokens=Sum("total_tokens")
    )

    # When the owner logs in and follows the dashboard link
    login(page, live_server, OWNER_EMAIL, OWNER_PASSWORD)
    page.click("#dashboard-link")
    page.wait_for_load_state()

    # Then every chart is drawn, from the calls
    expect(page).to_have_url(f"{live_server.url}/admin/dashboard/")
    expect(page.locator("#content h1")).to_have_text("Dashboard · Last 24 hours")
    charts = page.locator("svg.gateway-chart")
    expect(charts).to_have_count(8)
    for index in range(8):
        box = charts.nth(index).bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 20
    requests = "svg#chart-requests circle.point"
    assert len(data_values(page, f"{requests}.series-0")) == 24
    assert sum(data_values(page, f"{requests}.series-0")) == 5
    assert sum(data_values(page, f"{requests}.series-1")) == 1  # the 400
    assert sum(data_values(page, f"{requests}.series-2")) == 1  # the cache hit
    assert sum(data_values(page, "svg#chart-cost circle.point")) == totals["cost"]
    assert sum(data_values(page, "svg#chart-fallbacks circle.point")) == 1
    assert data_values(page, "svg#chart-top-teams rect.bar") == [totals["cost"]]
    assert page.locator("svg#chart-top-teams text.label").all_text_contents() == [
        "team_alice"
    ]
    assert page.locator(
        "svg#chart-top-model-groups text.label"
    ).all_text_contents() == ["chat"]
    tile = '#dashboard-tiles [data-tile="{}"] .figure'
    expect(page.locator(tile.format("requests"))).to_have_text("5")
    expect(page.locator(tile.format("error-rate"))).to_have_text("20.0%")
    expect(page.locator(tile.format("cache-hit-rate"))).to_have_text("20.0%")
    expect(page.locator(tile.format("fallbacks"))).to_have_text("1")
    expect(page.locator(tile.format("tokens"))).to_have_text(
        format_count(totals["tokens"])
    )
    screenshot(page, "dashboard-owner-24h")

    # ...and by day over 30 days too
    page.click('a[data-period="30d"]')
    page.wait_for_load_state()
    assert len(data_values(page, "svg#chart-requests circle.point.series-0")) == 30
    assert sum(data_values(page, "svg#chart-requests circle.point.series-0")) == 5
    screenshot(page, "dashboard-owner-30d")


def test_user_role_sees_the_dashboard_but_cannot_change_anything(
    page, live_server, team, fake_upstream
):
    # Given real usage, and an operator with the read-only role
    make_calls(live_server, team, fake_upstream)
    make_viewer()
    key = VirtualKey.objects.get(alias="calls")
    audited = AuditLogEntry.objects.count()

    # When they log in and open the dashboard
    login(page, live_server, VIEWER_EMAIL, VIEWER_PASSWORD)
    page.goto(f"{live_server.url}/admin/dashboard/")

    # Then the charts show the same usage
    assert sum(data_values(page, "svg#chart-requests circle.point.series-0")) == 5
    screenshot(page, "dashboard-user")

    # ...the team page shows its usage but offers no action
    page.goto(f"{live_server.url}/admin/tenants/team/{team.pk}/change/")
    assert sum(data_values(page, "svg#team-24h-requests circle.point.series-0")) == 5
    assert page.locator("button.object-action").count() == 0
    assert page.locator(".submit-row input[name=_save]").count() == 0
    screenshot(page, "team-user")

    # ...nor do the team and key lists
    for path in ("tenants/team", "tenants/virtualkey", "routing/deployment"):
        page.goto(f"{live_server.url}/admin/{path}/")
        assert page.locator("select[name=action]").count() == 0

    # ...and an action posted anyway is refused, and changes nothing
    csrf = next(c["value"] for c in page.context.cookies() if c["name"] == "csrftoken")
    for path, action, pk in (
        ("tenants/team", "suspend_teams", team.pk),
        ("tenants/team", "add_credits", team.pk),
        ("tenants/virtualkey", "revoke_keys", key.pk),
    ):
        response = page.request.post(
            f"{live_server.url}/admin/{path}/",
            form={
                "csrfmiddlewaretoken": csrf,
                "action": action,
                "_selected_action": str(pk),
                "post": "yes",
                "credits": "5",
                "token": "t",
            },
            headers={"Referer": f"{live_server.url}/admin/{path}/"},
        )
        assert response.status == 403
    assert Team.objects.get(pk=team.pk).status == "active"
    assert VirtualKey.objects.get(pk=key.pk).status == KeyStatus.ACTIVE
    assert AuditLogEntry.objects.count() == audited


# --- actions ----------------------------------------------------------------------


def test_owner_adds_credits_suspends_resumes_and_reconciles_a_team(
    page, live_server, owner, team
):
    login(page, live_server, OWNER_EMAIL, OWNER_PASSWORD)
    team_page = f"{live_server.url}/admin/tenants/team/{team.pk}/change/"
    page.goto(team_page)
    credits = page.locator(".field-credits .readonly")
    expect(credits).to_contain_text("balance 100.000000 ")

    # Add credits: a form asks how many; the team page shows the new balance
    click_action(page, "add_credits")
    expect(page.locator("#content h1")).to_have_text("Add credits")
    page.fill("input[name=credits]", "25.5")
    page.fill("input[name=reason]", "invoice 7")
    screenshot(page, "action-add-credits")
    confirm(page)
    expect(page).to_have_url(team_page)
    assert messages(page) == ["Added 25.500000 credits to 1 team(s): team_alice."]
    expect(credits).to_contain_text("balance 125.500000 ")
    assert CreditAccount.objects.get(team=team).balance_micros == 125_500_000

    # Suspend: a confirmation page first, then the team is suspended
    click_action(page, "suspend_teams")
    expect(page.locator(".action-question")).to_contain_text("Suspend these teams?")
    assert Team.objects.get(pk=team.pk).status == "active"
    confirm(page)
    assert messages(page) == ["Suspended 1 team(s): team_alice."]
    assert Team.objects.get(pk=team.pk).status == "suspended"

    # Resume: straight back
    click_action(page, "resume_teams")
    assert messages(page) == ["Resumed 1 team(s): team_alice."]
    assert Team.objects.get(pk=team.pk).status == "active"

    # Reconcile: the account already matches its ledger
    click_action(page, "reconcile_credits")
    assert messages(page) == ["Reconciled 1 account(s): 1 already matched their ledger"]

    assert list(
        AuditLogEntry.objects.filter(actor=owner)
        .order_by("created_at")
        .values_list("action", flat=True)
    ) == ["credits.add", "team.update", "team.update", "credits.reconcile"]


def test_owner_issues_rotates_and_revokes_a_key(page, live_server, owner, team):
    login(page, live_server, OWNER_EMAIL, OWNER_PASSWORD)
    page.goto(f"{live_server.url}/admin/tenants/team/{team.pk}/change/")

    # Issue: from the team page, the add form comes with the team chosen
    page.click("text=Issue a key")
    page.wait_for_load_state()
    expect(page.locator("#id_team")).to_have_value(str(team.pk))
    page.fill("#id_alias", "browser-key")
    page.click("input[name=_save]")
    page.wait_for_load_state()
    [warning] = page.locator("ul.messagelist li.warning").all_inner_texts()
    issued = VirtualKey.objects.get(alias="browser-key")
    plaintext = SHOWN_ONCE.search(warning)["key"]
    assert key_digest(plaintext) == issued.digest
    page.reload()
    assert plaintext not in page.content()

    # Rotate: a grace period is asked; the new secret is shown once
    page.goto(f"{live_server.url}/admin/tenants/virtualkey/{issued.pk}/change/")
    click_action(page, "rotate_keys")
    page.fill("input[name=grace_seconds]", "60")
    screenshot(page, "action-rotate-key")
    confirm(page)
    successor = VirtualKey.objects.get(predecessor=issued)
    [warning] = page.locator("ul.messagelist li.warning").all_inner_texts()
    assert warning.startswith(
        f"Rotated {issued.display_prefix} to {successor.display_prefix}."
    )
    assert key_digest(SHOWN_ONCE.search(warning)["key"]) == successor.digest
    assert VirtualKey.objects.get(pk=issued.pk).grace_until is not None

    # Revoke the successor: confirmed first
    page.goto(f"{live_server.url}/admin/tenants/virtualkey/{successor.pk}/change/")
    click_action(page, "revoke_keys")
    expect(page.locator(".action-question")).to_contain_text("Revoke these keys?")
    assert VirtualKey.objects.get(pk=successor.pk).status == KeyStatus.ACTIVE
    confirm(page)
    assert messages(page) == [f"Revoked 1 key(s): {successor.display_prefix}."]
    assert VirtualKey.objects.get(pk=successor.pk).status == KeyStatus.REVOKED
    assert page.locator('button[data-action="revoke_keys"]').count() == 0

    assert list(
        AuditLogEntry.objects.filter(actor=owner)
        .order_by("created_at")
        .values_list("action", flat=True)
    ) == ["key.issue", "key.rotate", "key.revoke"]


def test_owner_tests_a_deployment(page, live_server, owner, deployment):
    login(page, live_server, OWNER_EMAIL, OWNER_PASSWORD)
    page.goto(f"{live_server.url}/admin/routing/deployment/{deployment.pk}/change/")

    click_action(page, "test_deployments")

    [message] = page.locator("ul.messagelist li.success").all_inner_texts()
    assert re.fullmatch(
        r"Deployment mock-a answered 'hi' \(\d+ prompt \+ \d+ completion tokens\) in \d+ ms\.",
        message,
    )
    audit = AuditLogEntry.objects.get(action="deployment.test")
    assert (audit.actor, audit.details["succeeded"]) == (owner, True)
    screenshot(page, "action-test-deployment")


def test_model_group_priorities_are_edited_inline(
    page, live_server, owner, model_group
):
    # Given chat served by mock-a first, then mock-b
    second = deployment_create(
        name="mock-b", model="openai/mock-a", litellm_params={"mock_response": "hi"}
    )
    model_group.members.create(deployment=second, priority=1)
    login(page, live_server, OWNER_EMAIL, OWNER_PASSWORD)
    page.goto(f"{live_server.url}/admin/routing/modelgroup/{model_group.pk}/change/")

    # When the owner puts mock-b first, in the members table of the group's page
    rows = page.locator("#members-group tr.form-row.has_original")
    expect(rows).to_have_count(2)
    page.fill("input[name=members-0-priority]", "2")
    page.fill("input[name=members-1-priority]", "0")
    page.click("input[name=_continue]")
    page.wait_for_load_state()

    # Then the order is saved and audited
    assert messages(page)[0].startswith("The model group “chat” was changed")
    assert list(
        model_group.members.order_by("priority").values_list(
            "deployment__name", "priority"
        )
    ) == [("mock-b", 0), ("mock-a", 2)]
    audit = AuditLogEntry.objects.get(action="model_group.members")
    assert audit.details["after"] == [
        {"deployment": "mock-b", "priority": 0, "weight": 1},
        {"deployment": "mock-a", "priority": 2, "weight": 1},
    ]


def test_team_page_shows_credits_and_key_prefix_but_never_the_key(
    page, live_server, owner, team
):
    # Given a key of team_alice, shown once at issue
    key, plaintext = virtual_key_issue(team=team, alias="demo")
    login(page, live_server, OWNER_EMAIL, OWNER_PASSWORD)

    # When the owner opens team_alice from the teams list
    page.goto(f"{live_server.url}/admin/tenants/team/")
    page.click("#result_list >> text=team_alice")
    page.wait_for_load_state()

    # Then the credit account and the key's prefix show, the key itself does not
    expect(page).to_have_url(f"{live_server.url}/admin/tenants/team/{team.pk}/change/")
    expect(page.locator(".field-credits .readonly")).to_have_text(
        "balance 100.000000 · held 0.000000 · overdraft limit 0.000000 · "
        "allocated 100.000000 · used 0.000000"
    )
    prefixes = page.locator("#keys-group td.field-display_prefix")
    assert prefixes.all_inner_texts() == [key.display_prefix]
    assert plaintext not in page.content()


# --- the README's screenshots -------------------------------------------------------


def _history(teams: list[Team], routes: list[tuple[ModelGroup, Deployment]]) -> None:
    """A day of earlier usage, so the charts have a shape: deterministic,
    written as the request path writes it."""
    now = timezone.now()
    for hour in range(1, 24):
        at = now - timedelta(hours=hour)
        for index, team in enumerate(teams):
            for call in range((hour * 7 + index * 5) % 9 + 2 - index):
                group, deployment = routes[(call + index) % len(routes)]
                failed = (hour + call + index) % 17 == 0
                prompt, completion = 200 + 37 * call, 80 + 13 * hour
                usage_record_create(
                    request_id=f"req_history_{team.pk}_{hour}_{call}",
                    organization=team.organization,
                    team=team,
                    model_group=group,
                    deployment=deployment,
                    endpoint="chat/completions",
                    requested_model=group.group_name,
                    status=UsageStatus.ERROR if failed else UsageStatus.SUCCESS,
                    cached=(hour + call) % 11 == 0,
                    fallbacks_tried=(
                        [{"deployment": "x", "error_code": "upstream_error"}, {}]
                        if (hour + call) % 13 == 0
                        else []
                    ),
                    prompt_tokens=0 if failed else prompt,
                    completion_tokens=0 if failed else completion,
                    cost_micros=0 if failed else prompt * 3 + completion * 12,
                    credits_micros=0 if failed else MICROS,
                    latency_ms=300 + 41 * call + 7 * hour,
                    created_at=at - timedelta(minutes=7 * call),
                )


def test_readme_screenshots(page, live_server, owner, team, fake_upstream):
    # Given a day of usage of three teams, and five real calls just now
    make_calls(live_server, team, fake_upstream)
    price("openai/mock-large")
    large = deployment_create(
        name="mock-large",
        model="openai/mock-large",
        litellm_params={"mock_response": "hello"},
    )
    summarize = model_group_create(group_name="summarize", members=[(large, 0)])
    bob = organization_create(organization_id="org_bob", name="Bob Ltd")
    others = []
    for organization, team_id in ((bob, "team_bob"), (team.organization, "team_carol")):
        other = team_create(organization=organization, team_id=team_id)
        credit_account_open(team=other)
        credits_allocate(
            team=other, amount_micros=500 * MICROS, idempotency_key=team_id
        )
        others.append(other)
    _history(
        [team, *others],
        [
            (summarize, large),
            (
                ModelGroup.objects.get(group_name="chat"),
                Deployment.objects.get(name="mock-a"),
            ),
        ],
    )

    # When the owner opens the dashboard and a team
    login(page, live_server, OWNER_EMAIL, OWNER_PASSWORD)
    page.goto(f"{live_server.url}/admin/dashboard/")
    assert sum(data_values(page, "svg#chart-requests circle.point.series-0")) > 5
    screenshot(page, "dashboard", readme=True)
    page.goto(f"{live_server.url}/admin/tenants/team/{team.pk}/change/")
    screenshot(page, "team", readme=True, element="fieldset:has(.field-usage_chart)")
    click_action(page, "add_credits")
    page.fill("input[name=credits]", "250")
    page.fill("input[name=reason]", "invoice 2026-11")
    confirm(page)
    screenshot(page, "team-actions", readme=True, full_page=False)

    # Then the screenshots are there
    for name in ("dashboard", "team", "team-actions"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000
