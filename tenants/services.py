"""Writes of the tenants app: organizations, teams, virtual keys."""

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import User
from accounts.services import audit_log_record, changes_apply
from gateway_project.crypto import derived_secret
from gateway_project.errors import AlreadyExists, GatewayError
from tenants.key_cache import key_cache_invalidate_on_commit
from tenants.keys import NewKey, key_generate
from tenants.models import (
    KeyStatus,
    LimitedEntity,
    Organization,
    Status,
    Team,
    VirtualKey,
)


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


KEY_SETTINGS = (
    "rpm_limit",
    "tpm_limit",
    "max_parallel_requests",
    "budget_limit_micros",
    "budget_period",
    "budget_period_seconds",
    "monthly_request_quota",
)
MAX_GRACE_SECONDS = 30 * 24 * 3600


def virtual_key_issue(
    *,
    team: Team,
    alias: str = "",
    expires_at: datetime | None = None,
    metadata: dict[str, Any] | None = None,
    allowed_model_groups: Iterable[Any] | None = None,
    actor: User | None = None,
    actor_label: str = "",
    seed: bytes | None = None,
    **settings: Any,
) -> tuple[VirtualKey, str]:
    """Issue a key for a team; returns the row and the plaintext, shown once.

    ``settings`` are limits, budget and quota (KEY_SETTINGS). Raises
    GatewayError when allowed groups are not the team's, a limit exceeds the
    team's, the expiry is past, or the alias is taken in the team. ``seed``
    derives the secret deterministically (seed_demo, rotation retries) so it
    can be given again without ever being stored.
    """
    unknown = set(settings) - set(KEY_SETTINGS)
    if unknown:
        raise GatewayError(
            f"Unknown key setting: {sorted(unknown)[0]}", param=sorted(unknown)[0]
        )
    limits_within(child=settings, parent=team, parent_name="team")
    if expires_at is not None and expires_at <= timezone.now():
        raise GatewayError("expires_at must be in the future", param="expires_at")
    groups = list(allowed_model_groups or [])
    if groups:
        team_groups = set(team.model_groups.values_list("pk", flat=True))
        outside = sorted(str(group) for group in groups if group.pk not in team_groups)
        if outside:
            raise GatewayError(
                f"Model group '{outside[0]}' is not one of the team's",
                param="allowed_model_groups",
            )
    if alias and team.keys.filter(alias=alias).exists():
        raise AlreadyExists(
            f"Key alias '{alias}' already exists in this team", param="alias"
        )
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
            **settings,
        )
        key.allowed_model_groups.set(groups)
        audit_log_record(
            actor=actor,
            actor_label=actor_label,
            action="key.issue",
            resource_type="virtual_key",
            resource_id=new.display_prefix,
            details={"team_id": team.team_id, "alias": alias},
        )
    return key, new.plaintext


def virtual_key_rotate(
    *,
    key: VirtualKey,
    grace_seconds: int,
    idempotency_key: str,
    actor: User | None = None,
    actor_label: str = "",
) -> tuple[VirtualKey, str]:
    """Issue the successor of a key; the old one works ``grace_seconds`` more.

    The successor's secret is derived from the server's secret, the old key
    and ``idempotency_key``: a retry with the same idempotency key returns the
    same key and secret, without the secret ever being stored. Raises
    GatewayError for a key that is not active, already rotated (with another
    idempotency key), or a grace period out of range.
    """
    if not 0 <= grace_seconds <= MAX_GRACE_SECONDS:
        raise GatewayError(
            f"grace_seconds must be between 0 and {MAX_GRACE_SECONDS}",
            param="grace_seconds",
        )
    seed = (
        derived_secret("key-rotation") + f"{key.public_id}:{idempotency_key}".encode()
    )
    expected = key_generate(seed=seed)
    with transaction.atomic():
        key = VirtualKey.objects.select_for_update().get(pk=key.pk)
        successor = VirtualKey.objects.filter(predecessor=key).first()
        if successor is not None:
            if successor.public_id == expected.public_id:
                return successor, expected.plaintext
            raise GatewayError(
                "This key has already been rotated",
                code="key_already_rotated",
                http_status=409,
            )
        if key_state(key) != "valid":
            raise GatewayError(
                f"Only a working key can be rotated (this one is {key_state(key)})",
                code="key_not_active",
            )
        now = timezone.now()
        alias, key.alias = key.alias, ""
        key.grace_until = now + timedelta(seconds=grace_seconds)
        key.save(update_fields=["alias", "grace_until", "updated_at"])
        # The successor carries everything over, the budget window and quota
        # use included, so rotating never resets spend.
        carried = {
            field: getattr(key, field)
            for field in (
                *KEY_SETTINGS,
                "budget_window_start",
                "budget_spent_micros",
                "quota_period_start",
                "quota_requests_used",
                "metadata",
                "expires_at",
            )
        }
        successor = VirtualKey.objects.create(
            team=key.team,
            public_id=expected.public_id,
            digest=expected.digest,
            display_prefix=expected.display_prefix,
            alias=alias,
            predecessor=key,
            created_by=actor,
            **carried,
        )
        successor.allowed_model_groups.set(key.allowed_model_groups.all())
        audit_log_record(
            actor=actor,
            actor_label=actor_label,
            action="key.rotate",
            resource_type="virtual_key",
            resource_id=key.display_prefix,
            details={
                "successor": successor.display_prefix,
                "grace_seconds": grace_seconds,
            },
        )
        key_cache_invalidate_on_commit()
    return successor, expected.plaintext


def key_state(key: VirtualKey, *, now: datetime | None = None) -> str:
    """valid, revoked, expired or rotated (its grace period over)."""
    now = now or timezone.now()
    if key.status == KeyStatus.REVOKED:
        return "revoked"
    if key.status == KeyStatus.EXPIRED or (
        key.expires_at is not None and key.expires_at <= now
    ):
        return "expired"
    if key.grace_until is not None and key.grace_until <= now:
        return "rotated"
    return "valid"


def virtual_key_revoke(
    *,
    key: VirtualKey,
    actor: User | None = None,
    actor_label: str = "",
    ip_address: str | None = None,
) -> bool:
    """Revoke a key at once. Returns False when it was already revoked."""
    with transaction.atomic():
        now = timezone.now()
        updated = (
            VirtualKey.objects.filter(pk=key.pk)
            .exclude(status=KeyStatus.REVOKED)
            .update(status=KeyStatus.REVOKED, revoked_at=now, updated_at=now)
        )
        if updated:
            key_cache_invalidate_on_commit()
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


# --- organizations -----------------------------------------------------------

LIMIT_FIELDS = (
    "rpm_limit",
    "tpm_limit",
    "max_parallel_requests",
    "budget_limit_micros",
)


def limits_within(
    *, child: dict[str, Any], parent: LimitedEntity | None, parent_name: str
) -> None:
    """Refuse a limit above the parent's: a key within its team, a team
    within its organization. Raises GatewayError naming the field."""
    if parent is None:
        return
    for field in LIMIT_FIELDS:
        ceiling = getattr(parent, field)
        value = child.get(field)
        if ceiling is not None and value is not None and value > ceiling:
            raise GatewayError(
                f"{field} {value} exceeds the {parent_name}'s {ceiling}", param=field
            )


def organization_update(
    *,
    organization: Organization,
    changes: dict[str, Any],
    actor: User | None = None,
    actor_label: str = "",
) -> Organization:
    """Change name, status, metadata, limits or budget; audited."""
    with transaction.atomic():
        changes_apply(
            organization,
            changes,
            action="organization.update",
            resource_type="organization",
            resource_id=organization.organization_id,
            actor=actor,
            actor_label=actor_label,
        )
        key_cache_invalidate_on_commit()
    return organization


def organization_delete(
    *, organization: Organization, actor: User | None = None, actor_label: str = ""
) -> None:
    """Delete an organization. Refused while it has teams that are not deleted;
    one whose teams are all deleted is kept as ``deleted`` for their history."""
    with transaction.atomic():
        live = sorted(
            organization.teams.exclude(status=Status.DELETED).values_list(
                "team_id", flat=True
            )
        )
        if live:
            raise GatewayError(
                f"Organization '{organization.organization_id}' still has active teams: "
                f"{', '.join(live)}",
                code="organization_has_teams",
            )
        audit_log_record(
            actor=actor,
            actor_label=actor_label,
            action="organization.delete",
            resource_type="organization",
            resource_id=organization.organization_id,
        )
        key_cache_invalidate_on_commit()
        if organization.teams.exists():
            organization.status = Status.DELETED
            organization.save(update_fields=["status", "updated_at"])
        else:
            organization.delete()


# --- teams -------------------------------------------------------------------


def team_update(
    *,
    team: Team,
    changes: dict[str, Any],
    model_groups: Iterable[Any] | None = None,
    actor: User | None = None,
    actor_label: str = "",
) -> Team:
    """Change a team's groups, limits, budget mode, cache policy or status
    (suspend / resume). Limits must stay within the organization's."""
    limits_within(child=changes, parent=team.organization, parent_name="organization")
    with transaction.atomic():
        changes_apply(
            team,
            changes,
            action="team.update",
            resource_type="team",
            resource_id=team.team_id,
            actor=actor,
            actor_label=actor_label,
        )
        key_cache_invalidate_on_commit()
        if model_groups is not None:
            groups = list(model_groups)
            before = sorted(str(group) for group in team.model_groups.all())
            after = sorted(str(group) for group in groups)
            if before != after:
                team.model_groups.set(groups)
                audit_log_record(
                    actor=actor,
                    actor_label=actor_label,
                    action="team.update",
                    resource_type="team",
                    resource_id=team.team_id,
                    details={"model_groups": [before, after]},
                )
    # Keys of a suspended team stop working at once: key authentication
    # checks the team's status too.
    return team


def team_delete(
    *, team: Team, actor: User | None = None, actor_label: str = ""
) -> None:
    """Delete a team: its keys are revoked and the team is kept as ``deleted``,
    because its ledger and usage history must stay."""
    with transaction.atomic():
        now = timezone.now()
        revoked = team.keys.exclude(status=KeyStatus.REVOKED).update(
            status=KeyStatus.REVOKED, revoked_at=now, updated_at=now
        )
        key_cache_invalidate_on_commit()
        team.status = Status.DELETED
        team.save(update_fields=["status", "updated_at"])
        audit_log_record(
            actor=actor,
            actor_label=actor_label,
            action="team.delete",
            resource_type="team",
            resource_id=team.team_id,
            details={"keys_revoked": revoked},
        )
