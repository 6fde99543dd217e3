"""The admin in a real browser: headless Chromium logs in through the login form,
reads a team's credits and keys, and issues a key whose secret is shown once.

Runs against pytest-django's live server (a transactional database, flushed after
every test). Chromium and ChromeDriver come from Debian's packages, which
`make test` installs; Selenium Manager never downloads anything.
"""

import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.admin.forms import AdminAuthenticationForm
from django.core.management import call_command
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from accounts.models import User
from tenants.keys import key_digest
from tenants.models import Team, VirtualKey

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = Path("/tmp/admin-browser.png")  # noqa: S108 - a fixed path for humans
WAIT_SECONDS = 20

OWNER_EMAIL = "owner@example.com"
OWNER_PASSWORD = "Owner-Passw0rd!"
SEED_PASSWORD = "Seed-Passw0rd!"
SHOWN_ONCE = re.compile(r"will not be shown again: (?P<key>\S+)")


@pytest.fixture(scope="module")
def driver(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[WebDriver]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        pytest.fail(
            f"{' and '.join(missing)} not found: the browser tests need Debian's "
            "chromium and chromium-driver. Run `make test`, which installs them.",
            pytrace=False,
        )
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(argument)
    service = Service(executable_path=str(CHROMEDRIVER))
    with pytest.MonkeyPatch.context() as patch:
        # Belt and braces: with both paths given Selenium Manager has nothing to
        # fetch, and offline it would fail rather than download.
        patch.setenv("SE_OFFLINE", "true")
        browser = webdriver.Chrome(options=options, service=service)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(autouse=True)
def _fresh_session(driver: WebDriver) -> Iterator[None]:
    """Every test starts logged out, whatever the previous one left behind."""
    driver.delete_all_cookies()
    yield
    driver.delete_all_cookies()


def wait(driver: WebDriver) -> WebDriverWait:
    return WebDriverWait(driver, WAIT_SECONDS)


def submit(driver: WebDriver, button: WebElement) -> None:
    """Clicks a submit button and waits until the next page has loaded."""
    page = driver.find_element(By.TAG_NAME, "html")
    button.click()

    def old_page_gone(_: WebDriver) -> bool:
        # Chromium sometimes reports a detached node as a generic inspector
        # error ("Node ... does not belong to the document") rather than as
        # a stale element; both mean the old page is gone.
        try:
            page.is_enabled()
        except WebDriverException:  # StaleElementReferenceException included
            return True
        return False

    wait(driver).until(old_page_gone)
    wait(driver).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )


def login(driver: WebDriver, live_server, email: str, password: str) -> None:
    """Fills in and submits the admin's real login form."""
    driver.get(f"{live_server.url}/admin/login/")
    wait(driver).until(ec.presence_of_element_located((By.ID, "login-form")))
    driver.find_element(By.NAME, "username").send_keys(email)
    driver.find_element(By.NAME, "password").send_keys(password)
    submit(driver, driver.find_element(By.CSS_SELECTOR, "#login-form [type=submit]"))


def seed_demo() -> str:
    """Runs seed_demo (owner owner@example.com) and returns the printed demo key."""
    out = io.StringIO()
    call_command("seed_demo", password=SEED_PASSWORD, stdout=out)
    return next(
        line.removeprefix("Demo key: ")
        for line in out.getvalue().splitlines()
        if line.startswith("Demo key: ")
    )


def test_owner_logs_in_and_sees_the_gateway_admin(driver, live_server):
    # Given an owner
    User.objects.create_user(
        OWNER_EMAIL, OWNER_PASSWORD, display_name="Owner", role="owner"
    )

    # When they log in through the login form
    login(driver, live_server, OWNER_EMAIL, OWNER_PASSWORD)

    # Then they land on the admin index, branded, with links to teams and keys
    assert driver.current_url == f"{live_server.url}/admin/"
    assert driver.title == "Operations | LLM Gateway admin"
    assert driver.find_element(By.CSS_SELECTOR, "#site-name a").text == "LLM Gateway"
    assert driver.find_element(By.CSS_SELECTOR, "#content h1").text == "Operations"
    teams = driver.find_element(By.CSS_SELECTOR, "#content-main #tenants-team a")
    keys = driver.find_element(By.CSS_SELECTOR, "#content-main #tenants-virtualkey a")
    assert (teams.text, teams.get_attribute("href")) == (
        "Teams",
        f"{live_server.url}/admin/tenants/team/",
    )
    assert (keys.text, keys.get_attribute("href")) == (
        "Virtual keys",
        f"{live_server.url}/admin/tenants/virtualkey/",
    )


def test_wrong_password_shows_the_error_and_stays_on_the_login_page(
    driver, live_server
):
    # Given an owner
    User.objects.create_user(
        OWNER_EMAIL, OWNER_PASSWORD, display_name="Owner", role="owner"
    )

    # When they log in with a wrong password
    login(driver, live_server, OWNER_EMAIL, "Wrong-Passw0rd!")

    # Then the login page says so, and nobody is logged in
    expected = AdminAuthenticationForm.error_messages["invalid_login"] % {
        "username": User._meta.get_field("email").verbose_name
    }
    assert driver.current_url == f"{live_server.url}/admin/login/"
    errors = driver.find_elements(By.CSS_SELECTOR, "#content .errornote")
    assert [error.text for error in errors] == [expected]
    assert driver.find_element(By.NAME, "username").get_attribute("value") == (
        OWNER_EMAIL
    )
    assert driver.find_element(By.NAME, "password").get_attribute("value") == ""
    assert driver.find_elements(By.ID, "user-tools") == []


def test_team_page_shows_credits_and_key_prefix_but_never_the_key(driver, live_server):
    # Given the demo tenant, and its owner logged in
    demo_key = seed_demo()
    key = VirtualKey.objects.get(alias="demo")
    assert demo_key.startswith(key.display_prefix)
    assert demo_key != key.display_prefix
    login(driver, live_server, OWNER_EMAIL, SEED_PASSWORD)

    # When they open demo-team from the teams list
    driver.get(f"{live_server.url}/admin/tenants/team/")
    wait(driver).until(ec.presence_of_element_located((By.ID, "result_list")))
    demo_team_link = driver.find_element(By.LINK_TEXT, "demo-team")
    submit(driver, demo_team_link)

    # Then the credit account and the key's prefix show, the key itself does not
    team = Team.objects.get(team_id="demo-team")
    assert driver.current_url == (
        f"{live_server.url}/admin/tenants/team/{team.pk}/change/"
    )
    credits = driver.find_element(By.CSS_SELECTOR, ".field-credits .readonly").text
    assert credits == (
        "balance 1,000.000000 · held 0.000000 · overdraft limit 0.000000 · "
        "allocated 1,000.000000 · used 0.000000"
    )
    prefixes = driver.find_elements(
        By.CSS_SELECTOR, "#keys-group td.field-display_prefix"
    )
    assert [prefix.text for prefix in prefixes] == [key.display_prefix]
    assert demo_key not in driver.page_source


def test_adding_a_key_shows_it_once(driver, live_server):
    # Given the demo tenant, and its owner logged in
    seed_demo()
    team = Team.objects.get(team_id="demo-team")
    login(driver, live_server, OWNER_EMAIL, SEED_PASSWORD)

    # When they add a key for demo-team through the add form
    driver.get(f"{live_server.url}/admin/tenants/virtualkey/add/")
    wait(driver).until(ec.presence_of_element_located((By.ID, "id_team")))
    team_select = Select(driver.find_element(By.ID, "id_team"))
    team_select.select_by_visible_text("demo-team")
    assert team_select.first_selected_option.get_attribute("value") == str(team.pk)
    driver.find_element(By.ID, "id_alias").send_keys("browser-key")
    submit(driver, driver.find_element(By.NAME, "_save"))
    driver.save_screenshot(str(SCREENSHOT))

    # Then a warning shows the new key, once
    key = VirtualKey.objects.get(alias="browser-key")
    assert key.team == team
    assert driver.current_url == f"{live_server.url}/admin/tenants/virtualkey/"
    warnings = driver.find_elements(By.CSS_SELECTOR, "ul.messagelist li.warning")
    assert len(warnings) == 1
    assert "will not be shown again" in warnings[0].text
    match = SHOWN_ONCE.search(warnings[0].text)
    assert match is not None
    plaintext = match["key"]
    assert plaintext.startswith(key.display_prefix)
    assert plaintext != key.display_prefix
    assert key_digest(plaintext) == key.digest
    assert SCREENSHOT.is_file()

    # ...and neither reloading nor the key's own page shows it again
    driver.refresh()
    wait(driver).until(ec.presence_of_element_located((By.ID, "result_list")))
    assert driver.find_elements(By.CSS_SELECTOR, "ul.messagelist") == []
    assert plaintext not in driver.page_source

    driver.get(f"{live_server.url}/admin/tenants/virtualkey/{key.pk}/change/")
    wait(driver).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, ".field-display_prefix"))
    )
    shown_prefix = driver.find_element(
        By.CSS_SELECTOR, ".field-display_prefix .readonly"
    ).text
    assert shown_prefix == key.display_prefix
    assert driver.find_elements(By.CSS_SELECTOR, "ul.messagelist") == []
    assert plaintext not in driver.page_source
