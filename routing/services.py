"""Writes of the routing app: credentials, deployments, model groups."""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import wraps
from typing import Any, TypeVar, cast

from asgiref.sync import async_to_sync
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError

from accounts.models import User
from accounts.services import audit_log_record, changes_apply
from gateway_project.errors import AlreadyExists, GatewayError
from gateway_project.generations import routing_changed
from routing import providers
from routing.models import Deployment, ModelGroup, ModelGroupMember, ProviderCredential
from routing.providers import catalog_model

F = TypeVar("F", bound=Callable[..., Any])


def _changes_routes(function: F) -> F:
    """The request path's in-memory routes are reloaded after this write."""

    @wraps(function)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        result = function(*args, **kwargs)
        routing_changed()
        return result

    return cast(F, wrapped)


@_changes_routes
def provider_credential_create(
    *,
    name: str,
    provider: str,
    api_key: str,
    api_base: str = "",
    actor: User | None = None,
    actor_label: str = "",
) -> ProviderCredential:
    """Store a provider API key, encrypted. Raises AlreadyExists for a taken name."""
    credential = ProviderCredential(name=name, provider=provider, api_base=api_base)
    credential.set_api_key(api_key)
    try:
        with transaction.atomic():
            credential.save()
            audit_log_record(
                actor=actor,
                actor_label=actor_label,
                action="credential.create",
                resource_type="provider_credential",
                resource_id=name,
                details={"provider": provider, "api_base": api_base},
            )
    except IntegrityError:
        raise AlreadyExists(
            f"Credential '{name}' already exists", param="name"
        ) from None
    return credential


@_changes_routes
def deployment_create(
    *,
    name: str,
    model: str,
    credential: ProviderCredential | None = None,
    litellm_params: dict[str, Any] | None = None,
    actor: User | None = None,
    actor_label: str = "",
    **settings: Any,
) -> Deployment:
    """Register a provider model. Raises AlreadyExists for a taken name."""
    try:
        with transaction.atomic():
            deployment = Deployment.objects.create(
                name=name,
                model=model,
                credential=credential,
                litellm_params=litellm_params or {},
                **settings,
            )
            audit_log_record(
                actor=actor,
                actor_label=actor_label,
                action="deployment.create",
                resource_type="deployment",
                resource_id=name,
                details={"model": model},
            )
    except IntegrityError:
        raise AlreadyExists(
            f"Deployment '{name}' already exists", param="name"
        ) from None
    return deployment


@_changes_routes
def model_group_create(
    *,
    group_name: str,
    members: Sequence[tuple[Deployment, int]],
    display_name: str = "",
    description: str = "",
    actor: User | None = None,
    actor_label: str = "",
) -> ModelGroup:
    """Create a model group of (deployment, priority) members.

    Raises AlreadyExists ("Model group '<name>' already exists").
    """
    try:
        with transaction.atomic():
            group = ModelGroup.objects.create(
                group_name=group_name,
                display_name=display_name,
                description=description,
            )
            ModelGroupMember.objects.bulk_create(
                ModelGroupMember(
                    model_group=group, deployment=deployment, priority=priority
                )
                for deployment, priority in members
            )
            audit_log_record(
                actor=actor,
                actor_label=actor_label,
                action="model_group.create",
                resource_type="model_group",
                resource_id=group_name,
                details={
                    "models": [
                        {"model_name": deployment.name, "priority": priority}
                        for deployment, priority in members
                    ]
                },
            )
    except IntegrityError:
        raise AlreadyExists(
            f"Model group '{group_name}' already exists", param="group_name"
        ) from None
    return group


@_changes_routes
def deployment_resolve(
    *, model_name: str, actor: User | None = None, actor_label: str = ""
) -> Deployment:
    """The deployment a model group member names (seed 000's ``model_name``).

    Either a deployment of that name, or a model litellm knows: then a
    deployment of that name is created, bound to the first credential of its
    provider (or to none yet: calls fail with 503 until one is added).
    Raises GatewayError naming the model otherwise.
    """
    existing = Deployment.objects.filter(name=model_name).first()
    if existing is not None:
        return existing
    known = catalog_model(model_name)
    if known is None:
        raise GatewayError(
            f"Unknown model '{model_name}': not a deployment of this gateway "
            "nor a model litellm knows",
            code="unknown_model",
            param="models",
        )
    credential = (
        ProviderCredential.objects.filter(provider=known.provider)
        .order_by("pk")
        .first()
    )
    return deployment_create(
        name=model_name,
        model=known.litellm_model,
        credential=credential,
        actor=actor,
        actor_label=actor_label,
    )


def _members(
    models: Sequence[tuple[str, int]], *, actor: User | None, actor_label: str
) -> list[tuple[Deployment, int]]:
    names = [name for name, _ in models]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise GatewayError(
            f"Model '{duplicates[0]}' is listed more than once", param="models"
        )
    return [
        (
            deployment_resolve(model_name=name, actor=actor, actor_label=actor_label),
            priority,
        )
        for name, priority in models
    ]


@_changes_routes
def model_group_create_from_names(
    *,
    group_name: str,
    models: Sequence[tuple[str, int]],
    display_name: str = "",
    description: str = "",
    actor: User | None = None,
    actor_label: str = "",
) -> ModelGroup:
    """Create a group from (model_name, priority) pairs, resolving each name.

    One transaction: an unknown name or a duplicate group leaves nothing behind.
    """
    with transaction.atomic():
        if ModelGroup.objects.filter(group_name=group_name).exists():
            raise AlreadyExists(
                f"Model group '{group_name}' already exists", param="group_name"
            )
        members = _members(models, actor=actor, actor_label=actor_label)
        return model_group_create(
            group_name=group_name,
            members=members,
            display_name=display_name,
            description=description,
            actor=actor,
            actor_label=actor_label,
        )


@_changes_routes
def model_group_update(
    *,
    group: ModelGroup,
    changes: dict[str, Any],
    actor: User | None = None,
    actor_label: str = "",
) -> ModelGroup:
    """Change display_name, description or status; audited."""
    with transaction.atomic():
        changes_apply(
            group,
            changes,
            action="model_group.update",
            resource_type="model_group",
            resource_id=group.group_name,
            actor=actor,
            actor_label=actor_label,
        )
    return group


@_changes_routes
def model_group_replace_models(
    *,
    group: ModelGroup,
    models: Sequence[tuple[str, int]],
    actor: User | None = None,
    actor_label: str = "",
) -> ModelGroup:
    """Replace the group's members with (model_name, priority) pairs."""
    with transaction.atomic():
        before = [
            {"model_name": member.deployment.name, "priority": member.priority}
            for member in group.members.select_related("deployment").order_by(
                "priority", "id"
            )
        ]
        members = _members(models, actor=actor, actor_label=actor_label)
        group.members.all().delete()
        ModelGroupMember.objects.bulk_create(
            ModelGroupMember(
                model_group=group, deployment=deployment, priority=priority
            )
            for deployment, priority in members
        )
        group.save(update_fields=["updated_at"])
        audit_log_record(
            actor=actor,
            actor_label=actor_label,
            action="model_group.replace_models",
            resource_type="model_group",
            resource_id=group.group_name,
            details={
                "before": before,
                "after": [{"model_name": d.name, "priority": p} for d, p in members],
            },
        )
    return group


@_changes_routes
def model_group_delete(
    *, group: ModelGroup, actor: User | None = None, actor_label: str = ""
) -> None:
    """Delete a group. Refused while a team that is not deleted may use it."""
    teams = sorted(
        group.teams.exclude(status="deleted").values_list("team_id", flat=True)
    )
    if teams:
        raise GatewayError(
            f"Model group '{group.group_name}' is used by teams: {', '.join(teams)}",
            code="model_group_in_use",
        )
    try:
        with transaction.atomic():
            audit_log_record(
                actor=actor,
                actor_label=actor_label,
                action="model_group.delete",
                resource_type="model_group",
                resource_id=group.group_name,
            )
            group.delete()
    except ProtectedError:
        raise GatewayError(
            f"Model group '{group.group_name}' has usage history; disable it instead",
            code="model_group_has_usage",
        ) from None


# --- updates (first used by the LiteLLM config import) -------------------------


def _changed_fields(
    instance: Any, changes: dict[str, Any], *, allowed: set[str]
) -> dict[str, list[Any]]:
    unknown = sorted(set(changes) - allowed)
    if unknown:
        raise GatewayError(f"Unknown field: {unknown[0]}", param=unknown[0])
    return {
        field: [getattr(instance, field), value]
        for field, value in changes.items()
        if getattr(instance, field) != value
    }


@_changes_routes
def provider_credential_update(
    *,
    credential: ProviderCredential,
    changes: dict[str, Any],
    api_key: str | None = None,
    actor: User | None = None,
    actor_label: str = "",
) -> ProviderCredential:
    """Change provider, api_base or extra, and replace the key when one is given.

    Audited with the key's hint only; writes nothing when nothing changes.
    Raises GatewayError for any other field.
    """
    recorded = _changed_fields(
        credential, changes, allowed={"provider", "api_base", "extra"}
    )
    for field, (_, value) in recorded.items():
        setattr(credential, field, value)
    if api_key is not None:
        hint_before = credential.api_key_hint
        credential.set_api_key(api_key)
        recorded["api_key"] = [hint_before, credential.api_key_hint]
    if recorded:
        with transaction.atomic():
            credential.save()
            audit_log_record(
                actor=actor,
                actor_label=actor_label,
                action="credential.update",
                resource_type="provider_credential",
                resource_id=credential.name,
                details=recorded,
            )
    return credential


@_changes_routes
def deployment_update(
    *,
    deployment: Deployment,
    changes: dict[str, Any],
    actor: User | None = None,
    actor_label: str = "",
) -> Deployment:
    """Change a deployment's model, credential, litellm_params, timeout, limits
    or status; audited (the credential by name); writes nothing when nothing
    changes. Raises GatewayError for any other field."""
    recorded = _changed_fields(
        deployment,
        changes,
        allowed={
            "model",
            "credential",
            "litellm_params",
            "timeout_ms",
            "rpm_limit",
            "tpm_limit",
            "status",
        },
    )
    if not recorded:
        return deployment
    for field, (_, value) in recorded.items():
        setattr(deployment, field, value)
    if "credential" in recorded:
        recorded["credential"] = [
            credential.name if credential else None
            for credential in recorded["credential"]
        ]
    with transaction.atomic():
        deployment.save()
        audit_log_record(
            actor=actor,
            actor_label=actor_label,
            action="deployment.update",
            resource_type="deployment",
            resource_id=deployment.name,
            details=recorded,
        )
    return deployment


@_changes_routes
def model_group_members_set(
    *,
    group: ModelGroup,
    members: Sequence[tuple[Deployment, int, int]],
    actor: User | None = None,
    actor_label: str = "",
) -> ModelGroup:
    """Make the group's members exactly these (deployment, priority, weight).

    Rows already right are kept; audited as ``model_group.replace_models``;
    writes nothing when nothing changes. Raises GatewayError for a deployment
    listed twice.
    """
    wanted = {deployment.pk: (deployment, p, w) for deployment, p, w in members}
    if len(wanted) != len(members):
        raise GatewayError("A deployment is listed more than once", param="models")
    with transaction.atomic():
        current = {
            member.deployment_id: member
            for member in group.members.select_related("deployment").order_by(
                "priority", "id"
            )
        }
        before = [
            {
                "model_name": m.deployment.name,
                "priority": m.priority,
                "weight": m.weight,
            }
            for m in current.values()
        ]
        removed = [m.pk for pk, m in current.items() if pk not in wanted]
        updated, added = [], []
        for pk, (deployment, priority, weight) in wanted.items():
            member = current.get(pk)
            if member is None:
                added.append(
                    ModelGroupMember(
                        model_group=group,
                        deployment=deployment,
                        priority=priority,
                        weight=weight,
                    )
                )
            elif (member.priority, member.weight) != (priority, weight):
                member.priority, member.weight = priority, weight
                updated.append(member)
        if not (removed or updated or added):
            return group
        ModelGroupMember.objects.filter(pk__in=removed).delete()
        ModelGroupMember.objects.bulk_update(updated, ["priority", "weight"])
        ModelGroupMember.objects.bulk_create(added)
        group.save(update_fields=["updated_at"])
        audit_log_record(
            actor=actor,
            actor_label=actor_label,
            action="model_group.replace_models",
            resource_type="model_group",
            resource_id=group.group_name,
            details={
                "before": before,
                "after": [
                    {"model_name": d.name, "priority": p, "weight": w}
                    for d, p, w in members
                ],
            },
        )
    return group


# The smallest useful call: a few tokens, billed by the provider, never to a team.
TEST_PROMPT = "Reply with the word OK."
TEST_MAX_TOKENS = 5


@dataclass(frozen=True)
class DeploymentTestResult:
    succeeded: bool
    summary: str
    latency_ms: int


def deployment_test(
    *, deployment: Deployment, actor: User, ip_address: str | None
) -> DeploymentTestResult:
    """Make one tiny call to a deployment, as it is configured, and report.

    Not billed to any team and not a usage record (the operator's call); audited
    as ``deployment.test``. Never raises for the provider's failures.
    """
    target = providers.target_for(deployment)
    catalog = providers.catalog_model(deployment.model) or providers.catalog_model(
        deployment.model.split("/", 1)[-1]
    )
    embedding = catalog is not None and catalog.mode == "embedding"
    body: dict[str, Any] = (
        {"input": TEST_PROMPT}
        if embedding
        else {
            "messages": [{"role": "user", "content": TEST_PROMPT}],
            "max_tokens": TEST_MAX_TOKENS,
        }
    )
    started = time.monotonic_ns()
    if not target.available:
        succeeded, summary = False, "no credential, API base or mock response"
    else:
        try:
            completion = async_to_sync(providers.call)(
                target, "embedding" if embedding else "chat", body
            )
        except providers.ProviderError as error:
            succeeded = False
            summary = f"failed with {error.code} ({error.status}): {error.message}"
        else:
            succeeded = True
            choices = completion.body.get("choices") or [{}]
            answer = str((choices[0].get("message") or {}).get("content") or "")
            summary = (
                f"answered {answer[:80]!r} "
                if not embedding
                else "returned an embedding "
            ) + (
                f"({completion.prompt_tokens} prompt + "
                f"{completion.completion_tokens} completion tokens)"
            )
    latency_ms = (time.monotonic_ns() - started) // 1_000_000
    audit_log_record(
        actor=actor,
        action="deployment.test",
        resource_type="deployment",
        resource_id=deployment.name,
        details={
            "succeeded": succeeded,
            "latency_ms": latency_ms,
            "summary": summary[:500],
        },
        ip_address=ip_address,
    )
    return DeploymentTestResult(succeeded, summary, latency_ms)
