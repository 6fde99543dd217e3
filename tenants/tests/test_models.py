import pytest
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError

from accounts.models import AuditLogEntry
from gateway_project.errors import AlreadyExists
from tenants.keys import key_digest, key_generate, key_matches, key_parse
from tenants.models import BudgetPeriod, KeyStatus, Organization, Team, VirtualKey
from tenants.services import (
    organization_create,
    team_create,
    virtual_key_issue,
    virtual_key_revoke,
)

pytestmark = pytest.mark.django_db


def test_duplicate_organization_is_refused_and_writes_nothing(organization):
    audit_rows = AuditLogEntry.objects.count()

    with pytest.raises(AlreadyExists, match="Organization 'org_alice' already exists"):
        organization_create(organization_id="org_alice", name="Again")

    assert Organization.objects.get().name == "Alice Inc"
    assert AuditLogEntry.objects.count() == audit_rows


def test_duplicate_team_is_refused_and_writes_nothing(team, organization):
    audit_rows = AuditLogEntry.objects.count()

    with pytest.raises(AlreadyExists, match="Team 'team_alice' already exists"):
        team_create(organization=organization, team_id="team_alice")

    assert Team.objects.count() == 1
    assert AuditLogEntry.objects.count() == audit_rows


def test_organization_with_teams_cannot_be_deleted(team, organization):
    with pytest.raises(ProtectedError):
        organization.delete()

    assert Organization.objects.filter(pk=organization.pk).exists()


def test_team_with_keys_cannot_be_deleted(team):
    virtual_key_issue(team=team)
    # The team's credit account protects it too; drop nothing else first.
    with pytest.raises(ProtectedError):
        team.delete()

    assert Team.objects.filter(pk=team.pk).exists()


def test_budget_constraints_refuse_bad_rows(organization):
    with pytest.raises(IntegrityError), transaction.atomic():
        Organization.objects.filter(pk=organization.pk).update(budget_limit_micros=-1)
    with pytest.raises(IntegrityError), transaction.atomic():
        Organization.objects.filter(pk=organization.pk).update(budget_spent_micros=-5)
    with pytest.raises(IntegrityError), transaction.atomic():
        Organization.objects.filter(pk=organization.pk).update(
            budget_period=BudgetPeriod.DURATION, budget_period_seconds=None
        )

    organization.refresh_from_db()
    assert organization.budget_limit_micros is None


def test_issued_key_stores_only_public_id_and_digest(team):
    key, plaintext = virtual_key_issue(team=team, alias="ci")

    row = VirtualKey.objects.values().get(pk=key.pk)
    assert plaintext.startswith(f"sk-gw_{key.public_id}_")
    assert all(plaintext not in str(value) for value in row.values())
    secret = plaintext.rsplit("_", 1)[1]
    assert all(secret not in str(value) for value in row.values())
    assert row["digest"] == key_digest(plaintext)
    assert row["display_prefix"] == f"sk-gw_{key.public_id}"


def test_key_public_id_is_unique(team):
    key, _ = virtual_key_issue(team=team)

    with pytest.raises(IntegrityError), transaction.atomic():
        VirtualKey.objects.create(
            team=team, public_id=key.public_id, digest="0" * 64, display_prefix="x"
        )


def test_key_alias_is_unique_within_a_team_but_blank_repeats(team):
    virtual_key_issue(team=team, alias="ci")
    virtual_key_issue(team=team)
    virtual_key_issue(team=team)

    with pytest.raises(AlreadyExists, match="Key alias 'ci' already exists"):
        virtual_key_issue(team=team, alias="ci")
    with pytest.raises(IntegrityError), transaction.atomic():
        VirtualKey.objects.create(
            team=team,
            public_id="x" * 12,
            digest="0" * 64,
            display_prefix="x",
            alias="ci",
        )

    assert VirtualKey.objects.filter(team=team).count() == 3


def test_digest_must_be_sha256_hex(team):
    key, _ = virtual_key_issue(team=team)

    with pytest.raises(IntegrityError), transaction.atomic():
        VirtualKey.objects.filter(pk=key.pk).update(digest="plaintext-secret")


def test_key_format_parses_and_matches_only_its_own_digest():
    new = key_generate()
    other = key_generate()

    assert key_parse(new.plaintext) == new.public_id
    assert key_matches(new.plaintext, new.digest)
    assert not key_matches(other.plaintext, new.digest)
    assert not key_matches(new.plaintext[:-1] + "x", new.digest)
    assert key_parse("sk-gw_short_secret") is None
    assert key_parse("Bearer " + new.plaintext) is None


def test_seeded_key_is_deterministic_and_random_keys_are_not():
    assert key_generate(seed=b"s").plaintext == key_generate(seed=b"s").plaintext
    assert key_generate().plaintext != key_generate().plaintext


def test_revoke_is_audited_once(team):
    key, _ = virtual_key_issue(team=team)

    assert virtual_key_revoke(key=key) is True
    assert virtual_key_revoke(key=key) is False

    key.refresh_from_db()
    assert key.status == KeyStatus.REVOKED
    assert key.revoked_at is not None
    assert AuditLogEntry.objects.filter(action="key.revoke").count() == 1
