"""Provider credentials, deployments and model groups.

Nothing here imports litellm: routing/providers.py alone does.
"""

from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q

from gateway_project.crypto import encrypt_text, mask_secret

name_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_.:/@-]{0,199}$",
    "Use letters, digits and '_ . : / @ -', starting with a letter or digit.",
)


class ProviderCredential(models.Model):
    """An API key for one provider account, encrypted at rest.

    ``api_key_encrypted`` is a Fernet token (gateway_project/crypto.py);
    ``api_key_hint`` is its last characters, so screens can tell keys apart
    without decrypting anything.
    """

    name = models.CharField(max_length=100, unique=True, validators=[name_validator])
    provider = models.CharField(
        max_length=64, help_text="litellm provider: openai, anthropic, azure, …"
    )
    api_base = models.URLField(max_length=500, blank=True)
    api_key_encrypted = models.TextField(blank=True, editable=False)
    api_key_hint = models.CharField(max_length=8, blank=True, editable=False)
    extra = models.JSONField(
        default=dict,
        blank=True,
        help_text="Provider settings that are not secret (api_version, organization).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["provider", "name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.provider})"

    def set_api_key(self, api_key: str) -> None:
        self.api_key_encrypted = encrypt_text(api_key) if api_key else ""
        self.api_key_hint = mask_secret(api_key) if api_key else ""


class DeploymentStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    DISABLED = "disabled", "Disabled"


class Deployment(models.Model):
    """One concrete provider model the gateway can call, e.g. ``openai/gpt-4o``."""

    name = models.CharField(max_length=200, unique=True, validators=[name_validator])
    model = models.CharField(
        max_length=200, help_text="The litellm model string (provider/model)."
    )
    credential = models.ForeignKey(
        ProviderCredential,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="deployments",
    )
    litellm_params = models.JSONField(
        default=dict,
        blank=True,
        help_text="Extra parameters passed to litellm (never secrets).",
    )
    timeout_ms = models.PositiveIntegerField(
        default=60_000, validators=[MinValueValidator(100)]
    )
    rpm_limit = models.PositiveIntegerField(null=True, blank=True)
    tpm_limit = models.PositiveIntegerField(null=True, blank=True)
    status = models.CharField(
        max_length=16, choices=DeploymentStatus.choices, default=DeploymentStatus.ACTIVE
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(timeout_ms__gte=100), name="routing_deployment_timeout_min"
            )
        ]

    def __str__(self) -> str:
        return self.name


class ModelGroupStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    DISABLED = "disabled", "Disabled"


class ModelGroup(models.Model):
    """A named set of deployments tried in priority order (seed 000)."""

    group_name = models.CharField(
        max_length=200, unique=True, validators=[name_validator]
    )
    display_name = models.CharField(max_length=200, blank=True)
    description = models.TextField(blank=True)
    status = models.CharField(
        max_length=16, choices=ModelGroupStatus.choices, default=ModelGroupStatus.ACTIVE
    )
    deployments = models.ManyToManyField(
        Deployment, through="ModelGroupMember", related_name="model_groups"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["group_name"]

    def __str__(self) -> str:
        return self.group_name


class ModelGroupMember(models.Model):
    """A deployment in a group. Lower priority is tried first; weight spreads
    load among members of equal priority."""

    model_group = models.ForeignKey(
        ModelGroup, on_delete=models.CASCADE, related_name="members"
    )
    deployment = models.ForeignKey(
        Deployment, on_delete=models.PROTECT, related_name="memberships"
    )
    priority = models.PositiveSmallIntegerField(default=0)
    weight = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1)]
    )

    class Meta:
        ordering = ["model_group", "priority", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["model_group", "deployment"], name="routing_member_unique"
            ),
            models.CheckConstraint(
                condition=Q(weight__gte=1), name="routing_member_weight_positive"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model_group_id}:{self.deployment_id}@{self.priority}"
