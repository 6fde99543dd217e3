"""Writes of the routing app: credentials, deployments, model groups."""

from collections.abc import Sequence
from typing import Any

from django.db import IntegrityError, transaction

from accounts.models import User
from accounts.services import audit_log_record
from gateway_project.errors import AlreadyExists
from routing.models import Deployment, ModelGroup, ModelGroupMember, ProviderCredential


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
