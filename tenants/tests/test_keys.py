"""Virtual keys: issue, rotation with grace, revocation, expiry, authentication."""

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import AuditLogEntry
from gateway_project.errors import AlreadyExists, GatewayError
from routing.services import model_group_create
from tenants.authentication import (
    InvalidApiKey,
    MissingApiKey,
    TeamInactive,
    virtual_key_authenticate,
)
from tenants.key_cache import key_cache_invalidate, key_last_used_flush
from tenants.models import KeyStatus, Status, VirtualKey
from tenants.services import (
    key_state,
    team_update,
    virtual_key_issue,
    virtual_key_revoke,
    virtual_key_rotate,
)

pytestmark = pytest.mark.django_db
ADMIN = {"HTTP_X_ADMIN_KEY": "keys-admin-key"}


@pytest.fixture
def api(settings) -> APIClient:
    settings.GATEWAY_ADMIN_KEY = "keys-admin-key"
    return APIClient()


def _error(response) -> dict:
    return response.json()["error"]


# --- authentication -----------------------------------------------------------


def test_a_fresh_key_authenticates(team):
    key, plaintext = virtual_key_issue(team=team)

    assert virtual_key_authenticate(plaintext=plaintext) == key


@pytest.mark.parametrize("presented", [None, ""])
def test_missing_key_is_missing_api_key(presented):
    with pytest.raises(MissingApiKey) as raised:
        virtual_key_authenticate(plaintext=presented)
    assert (raised.value.http_status, raised.value.code) == (401, "missing_api_key")


def test_wrong_unknown_and_malformed_keys_are_one_invalid_api_key(team):
    _, plaintext = virtual_key_issue(team=team)
    candidates = [
        plaintext[:-1] + ("a" if plaintext[-1] != "a" else "b"),  # wrong secret
        plaintext.replace(plaintext.split("_")[1], "zzzzzzzzzzzz"),  # unknown id
        "sk-not-a-gateway-key",
    ]

    messages = set()
    for candidate in candidates:
        with pytest.raises(InvalidApiKey) as raised:
            virtual_key_authenticate(plaintext=candidate)
        messages.add(
            (raised.value.http_status, raised.value.code, raised.value.message)
        )

    assert messages == {(401, "invalid_api_key", "Invalid API key")}


def test_revoked_key_stops_at_once(team):
    key, plaintext = virtual_key_issue(team=team)

    virtual_key_revoke(key=key)

    with pytest.raises(InvalidApiKey):
        virtual_key_authenticate(plaintext=plaintext)
    assert AuditLogEntry.objects.filter(action="key.revoke").count() == 1


def test_expired_key_is_invalid(team):
    key, plaintext = virtual_key_issue(
        team=team, expires_at=timezone.now() + timedelta(hours=1)
    )
    VirtualKey.objects.filter(pk=key.pk).update(
        expires_at=timezone.now() - timedelta(seconds=1)
    )

    with pytest.raises(InvalidApiKey):
        virtual_key_authenticate(plaintext=plaintext)
    key.refresh_from_db()
    assert key_state(key) == "expired"


def test_key_of_a_suspended_team_or_organization_is_refused(team):
    _, plaintext = virtual_key_issue(team=team)
    team_update(team=team, changes={"status": Status.SUSPENDED})

    with pytest.raises(TeamInactive) as raised:
        virtual_key_authenticate(plaintext=plaintext)
    assert (raised.value.http_status, raised.value.code) == (403, "team_inactive")

    team_update(team=team, changes={"status": Status.ACTIVE})
    team.organization.status = Status.SUSPENDED
    team.organization.save()
    with pytest.raises(TeamInactive, match="Organization 'org_alice' is suspended"):
        virtual_key_authenticate(plaintext=plaintext)


def test_authentication_itself_writes_nothing(team):
    key, plaintext = virtual_key_issue(team=team)

    virtual_key_authenticate(plaintext=plaintext)

    key.refresh_from_db()
    assert key.last_used_at is None


# --- issue --------------------------------------------------------------------


def test_issue_refuses_limits_above_the_teams_and_writes_nothing(team):
    team_update(team=team, changes={"rpm_limit": 100, "budget_limit_micros": 5_000_000})
    before = (VirtualKey.objects.count(), AuditLogEntry.objects.count())

    with pytest.raises(GatewayError) as raised:
        virtual_key_issue(team=team, rpm_limit=101)
    assert raised.value.param == "rpm_limit"
    assert raised.value.message == "rpm_limit 101 exceeds the team's 100"
    with pytest.raises(GatewayError) as raised:
        virtual_key_issue(team=team, budget_limit_micros=5_000_001)
    assert raised.value.param == "budget_limit_micros"

    assert (VirtualKey.objects.count(), AuditLogEntry.objects.count()) == before
    key, _ = virtual_key_issue(team=team, rpm_limit=100)
    assert key.rpm_limit == 100


def test_issue_refuses_groups_outside_the_team_and_past_expiry(team, deployment):
    foreign = model_group_create(group_name="foreign", members=[(deployment, 0)])

    with pytest.raises(GatewayError, match="'foreign' is not one of the team's"):
        virtual_key_issue(team=team, allowed_model_groups=[foreign])
    with pytest.raises(GatewayError, match="expires_at must be in the future"):
        virtual_key_issue(team=team, expires_at=timezone.now() - timedelta(minutes=1))
    with pytest.raises(GatewayError, match="Unknown key setting"):
        virtual_key_issue(team=team, colour="blue")
    assert not VirtualKey.objects.exists()


def test_issue_through_the_api_shows_the_secret_once(api, team, model_group):
    response = api.post(
        "/api/teams/team_alice/keys",
        {
            "alias": "ci",
            "allowed_model_groups": ["chat"],
            "rpm_limit": 5,
            "max_budget": "12.50",
            "budget_period": "monthly",
        },
        format="json",
        **ADMIN,
    )

    assert response.status_code == 200
    body = response.json()
    key = VirtualKey.objects.get(public_id=body["key_id"])
    assert virtual_key_authenticate(plaintext=body["virtual_key"]) == key
    assert (body["alias"], body["allowed_model_groups"], body["rpm_limit"]) == (
        "ci",
        ["chat"],
        5,
    )
    assert (body["max_budget"], key.budget_limit_micros) == (12.5, 12_500_000)
    listed = api.get("/api/teams/team_alice/keys", **ADMIN)
    assert body["virtual_key"] not in listed.content.decode()
    assert [k["key_prefix"] for k in listed.json()] == [key.display_prefix]
    assert set(listed.json()[0]) >= {
        "key_id",
        "key_prefix",
        "alias",
        "status",
        "state",
        "last_used_at",
        "spend",
    }


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"rpm_limit": 0}, "rpm_limit"),
        ({"max_budget": "-1"}, "max_budget"),
        ({"budget_period": "duration"}, "budget_period_seconds"),
        ({"allowed_model_groups": ["nope"]}, "allowed_model_groups"),
        ({"expires_at": "yesterday"}, "expires_at"),
        ({"flavour": "mint"}, "flavour"),
    ],
)
def test_issue_with_bad_input_is_400_and_writes_nothing(api, team, payload, param):
    before = (VirtualKey.objects.count(), AuditLogEntry.objects.count())

    response = api.post("/api/teams/team_alice/keys", payload, format="json", **ADMIN)

    assert response.status_code == 400
    assert _error(response)["param"] == param
    assert (VirtualKey.objects.count(), AuditLogEntry.objects.count()) == before


def test_duplicate_alias_in_a_team_is_400(api, team):
    virtual_key_issue(team=team, alias="ci")

    response = api.post(
        "/api/teams/team_alice/keys", {"alias": "ci"}, format="json", **ADMIN
    )

    assert response.status_code == 400
    assert _error(response)["code"] == "already_exists"


# --- rotation -----------------------------------------------------------------


def test_rotation_keeps_the_old_key_for_the_grace_period(team):
    old, old_plaintext = virtual_key_issue(team=team, alias="ci", rpm_limit=7)

    new, new_plaintext = virtual_key_rotate(
        key=old, grace_seconds=300, idempotency_key="r1"
    )

    assert virtual_key_authenticate(plaintext=new_plaintext) == new
    assert virtual_key_authenticate(plaintext=old_plaintext) == old
    old.refresh_from_db()
    assert (new.predecessor, new.alias, new.rpm_limit, old.alias) == (old, "ci", 7, "")
    # When the grace period is over the old key stops working.
    VirtualKey.objects.filter(pk=old.pk).update(
        grace_until=timezone.now() - timedelta(seconds=1)
    )
    key_cache_invalidate()  # changed behind the services' back, as key sync would
    with pytest.raises(InvalidApiKey):
        virtual_key_authenticate(plaintext=old_plaintext)
    assert virtual_key_authenticate(plaintext=new_plaintext) == new


def test_rotation_with_zero_grace_ends_the_old_key_now(team):
    old, old_plaintext = virtual_key_issue(team=team)

    virtual_key_rotate(key=old, grace_seconds=0, idempotency_key="r1")

    with pytest.raises(InvalidApiKey):
        virtual_key_authenticate(plaintext=old_plaintext)


def test_rotation_is_idempotent_by_key_and_refused_otherwise(team):
    old, _ = virtual_key_issue(team=team)
    first = virtual_key_rotate(key=old, grace_seconds=60, idempotency_key="r1")

    again = virtual_key_rotate(key=old, grace_seconds=60, idempotency_key="r1")

    assert again == first
    assert VirtualKey.objects.count() == 2
    with pytest.raises(GatewayError) as raised:
        virtual_key_rotate(key=old, grace_seconds=60, idempotency_key="r2")
    assert (raised.value.http_status, raised.value.code) == (409, "key_already_rotated")
    assert AuditLogEntry.objects.filter(action="key.rotate").count() == 1


def test_rotation_keeps_the_budget_window(team):
    old, _ = virtual_key_issue(
        team=team, budget_limit_micros=10_000_000, budget_period="monthly"
    )
    start = timezone.now() - timedelta(days=3)
    VirtualKey.objects.filter(pk=old.pk).update(
        budget_window_start=start, budget_spent_micros=4_000_000
    )
    old.refresh_from_db()

    new, _ = virtual_key_rotate(key=old, grace_seconds=60, idempotency_key="r1")

    assert (new.budget_window_start, new.budget_spent_micros) == (start, 4_000_000)


def test_revoked_key_cannot_be_rotated(team):
    old, _ = virtual_key_issue(team=team)
    virtual_key_revoke(key=old)

    with pytest.raises(GatewayError, match="this one is revoked"):
        virtual_key_rotate(key=old, grace_seconds=60, idempotency_key="r1")
    assert VirtualKey.objects.count() == 1


def test_rotate_and_revoke_through_the_api(api, team):
    old, old_plaintext = virtual_key_issue(team=team, alias="ci")

    rotated = api.post(
        f"/api/keys/{old.public_id}/rotate",
        {"grace_seconds": 120},
        format="json",
        HTTP_IDEMPOTENCY_KEY="abc",
        **ADMIN,
    )
    retried = api.post(
        f"/api/keys/{old.public_id}/rotate",
        {"grace_seconds": 120},
        format="json",
        HTTP_IDEMPOTENCY_KEY="abc",
        **ADMIN,
    )

    assert rotated.status_code == retried.status_code == 200
    assert rotated.json()["virtual_key"] == retried.json()["virtual_key"]
    assert rotated.json()["previous_key"]["grace_until"] is not None
    new_id = rotated.json()["key_id"]
    revoked = api.post(f"/api/keys/{new_id}/revoke", **ADMIN)
    assert (revoked.status_code, revoked.json()["status"], revoked.json()["state"]) == (
        200,
        "revoked",
        "revoked",
    )
    with pytest.raises(InvalidApiKey):
        virtual_key_authenticate(plaintext=rotated.json()["virtual_key"])
    # The old key is still inside its grace period.
    assert virtual_key_authenticate(plaintext=old_plaintext) == old


@pytest.mark.parametrize("grace", [-1, 30 * 24 * 3600 + 1])
def test_rotation_grace_out_of_range_is_400(api, team, grace):
    old, _ = virtual_key_issue(team=team)

    response = api.post(
        f"/api/keys/{old.public_id}/rotate",
        {"grace_seconds": grace},
        format="json",
        **ADMIN,
    )

    assert response.status_code == 400
    assert _error(response)["param"] == "grace_seconds"
    assert VirtualKey.objects.count() == 1


def test_unknown_key_is_404(api, db):
    response = api.post("/api/keys/zzzzzzzzzzzz/revoke", **ADMIN)

    assert response.status_code == 404
    assert _error(response)["code"] == "not_found"


def test_deleting_a_team_revokes_its_keys(api, team):
    _, plaintext = virtual_key_issue(team=team)

    response = api.delete("/api/teams/team_alice", **ADMIN)

    assert response.status_code == 200
    assert set(team.keys.values_list("status", flat=True)) == {KeyStatus.REVOKED}
    with pytest.raises(InvalidApiKey):
        virtual_key_authenticate(plaintext=plaintext)
    assert api.get("/api/teams/team_alice", **ADMIN).status_code == 404


def test_team_key_use_is_stamped_only_when_allowed(api, team, organization):
    key, plaintext = virtual_key_issue(team=team)

    refused = api.get("/api/teams/team_alice", HTTP_AUTHORIZATION=f"Bearer {plaintext}")
    key_last_used_flush()
    key.refresh_from_db()
    assert (refused.status_code, key.last_used_at) == (403, None)

    allowed = api.get("/api/credits/teams/team_alice/balance", HTTP_X_API_KEY=plaintext)
    key_last_used_flush()  # key sync writes the stamps collected in Redis
    key.refresh_from_db()
    assert allowed.status_code == 200
    assert key.last_used_at is not None


def test_alias_unique_error_is_not_raised_for_other_teams(team, organization):
    from tenants.services import team_create

    other = team_create(organization=organization, team_id="team_other")
    virtual_key_issue(team=team, alias="ci")

    key, _ = virtual_key_issue(team=other, alias="ci")

    assert key.alias == "ci"
    with pytest.raises(AlreadyExists):
        virtual_key_issue(team=other, alias="ci")


def test_team_keys_may_only_read_their_own_team(rf, team):
    from tenants.api.auth import IsOwnTeamOrOperator, TeamKeyPrincipal

    key, _ = virtual_key_issue(team=team)
    permission = IsOwnTeamOrOperator()

    class View:
        kwargs = {"team_id": "team_alice"}
        read_only = False

    def allowed(method: str, view=View) -> bool:
        request = getattr(rf, method)("/")
        request.user = TeamKeyPrincipal(key=key)
        return permission.has_permission(request, view())

    class ReadOnlyPost(View):
        read_only = True

    class OtherTeam(View):
        kwargs = {"team_id": "team_bob"}

    assert allowed("get") is True
    assert allowed("post") is False
    assert allowed("delete") is False
    assert allowed("post", ReadOnlyPost) is True
    assert allowed("get", OtherTeam) is False
