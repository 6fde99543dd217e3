"""Writes of the tenants app: organizations, teams, virtual keys."""

from collections.abc import Iterable
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import User
from accounts.services import audit_log_record
from gateway_project.errors import AlreadyExists
from tenants.keys import NewKey, key_generate
from tenants.models import KeyStatus, Organization, Team, VirtualKey


def organization_create(
    *,
    organization_id: str,
    name: str,
    metadata: dict[str, Any] | None = None,
    actor: User | None = None,
    actor_label: str = "",
) -> Organization:
    """Create an organization. Raises AlreadyExists for a taken id."""
    try:
        with transaction.atomic():
            organization = Organization.objects.create(
                organization_id=organization_id, name=name, metadata=metadata or {}
            )
            audit_log_record(
                actor=actor,
                actor_label=actor_label,
                action="organization.create",
                resource_type="organization",
                resource_id=organization_id,
                details={"name": name},
            )
    except IntegrityError:
        raise AlreadyExists(
            f"Organization '{organization_id}' already exists", param="organization_id"
        ) from None
    return organization


def team_create(
    *,
    organization: Organization,
    team_id: str,
    team_alias: str = "",
    model_groups: Iterable[Any] = (),
    metadata: dict[str, Any] | None = None,
    actor: User | None = None,
    actor_label: str = "",
    **settings: Any,
) -> Team:
    """Create a team of an organization with access to ``model_groups``.

    ``settings`` are further Team fields (budget mode, limits, cache policy).
    Raises AlreadyExists for a taken id. Credits are opened by billing.
    """
    groups = list(model_groups)
    try:
        with transaction.atomic():
            team = Team.objects.create(
                organization=organization,
                team_id=team_id,
                team_alias=team_alias,
                metadata=metadata or {},
                **settings,
            )
            team.model_groups.set(groups)
            audit_log_record(
                actor=actor,
                actor_label=actor_label,
                action="team.create",
                resource_type="team",
                resource_id=team_id,
                details={
                    "organization_id": organization.organization_id,
                    "model_groups": sorted(str(group) for group in groups),
                },
            )
    except IntegrityError:
        raise AlreadyExists(
            f"Team '{team_id}' already exists", param="team_id"
        ) from None
    return team


def virtual_key_issue(
    *,
    team: Team,
    alias: str = "",
    expires_at: datetime | None = None,
    metadata: dict[str, Any] | None = None,
    actor: User | None = None,
    actor_label: str = "",
    seed: bytes | None = None,
) -> tuple[VirtualKey, str]:
    """Issue a key for a team; returns the row and the plaintext, shown once.

    ``seed`` derives the secret deterministically — used only by seed_demo so
    that the demo key is stable without ever being stored.
    """
    new: NewKey = key_generate(seed=seed)
    with transaction.atomic():
        key = VirtualKey.objects.create(
            team=team,
            public_id=new.public_id,
            digest=new.digest,
            display_prefix=new.display_prefix,
            alias=alias,
            expires_at=expires_at,
            metadata=metadata or {},
            created_by=actor,
        )
        audit_log_record(
            actor=actor,
            actor_label=actor_label,
            action="key.issue",
            resource_type="virtual_key",
            resource_id=new.display_prefix,
            details={"team_id": team.team_id, "alias": alias},
        )
    return key, new.plaintext


def virtual_key_revoke(
    *,
    key: VirtualKey,
    actor: User | None = None,
    actor_label: str = "",
    ip_address: str | None = None,
) -> bool:
    """Revoke a key at once. Returns False when it was already revoked."""
    with transaction.atomic():
        updated = (
            VirtualKey.objects.filter(pk=key.pk)
            .exclude(status=KeyStatus.REVOKED)
            .update(status=KeyStatus.REVOKED, revoked_at=timezone.now())
        )
        if updated:
            audit_log_record(
                actor=actor,
                actor_label=actor_label,
                action="key.revoke",
                resource_type="virtual_key",
                resource_id=key.display_prefix,
                details={"team_id": key.team.team_id},
                ip_address=ip_address,
            )
    return bool(updated)
