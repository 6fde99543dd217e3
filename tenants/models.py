"""Organizations, their teams and the teams' virtual API keys.

Money fields are integers of micro-units (gateway_project/money.py).
"""

from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q

# Ids chosen by operators (seed 000: "org_demo_001", "team_demo_engineering").
identifier_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
    "Use letters, digits, '_', '.' or '-' (at most 128, starting with a letter or digit).",
)


class Status(models.TextChoices):
    ACTIVE = "active", "Active"
    SUSPENDED = "suspended", "Suspended"
    DELETED = "deleted", "Deleted"


class BudgetPeriod(models.TextChoices):
    NONE = "", "Never resets"
    DAILY = "daily", "Daily"
    WEEKLY = "weekly", "Weekly"
    MONTHLY = "monthly", "Monthly"
    DURATION = "duration", "Fixed duration"


class LimitedEntity(models.Model):
    """Rate limits and a USD budget, shared by organizations, teams and keys.

    Null means "no limit". The budget window starts at ``budget_window_start``
    and resets per ``budget_period``; ``budget_spent_micros`` is the spend of the
    current window.
    """

    rpm_limit = models.PositiveIntegerField(null=True, blank=True)
    tpm_limit = models.PositiveIntegerField(null=True, blank=True)
    max_parallel_requests = models.PositiveIntegerField(null=True, blank=True)
    budget_limit_micros = models.BigIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0)],
        help_text="USD budget in micro-USD (1 USD = 1,000,000); empty for none.",
    )
    budget_period = models.CharField(
        max_length=16,
        choices=BudgetPeriod.choices,
        default=BudgetPeriod.NONE,
        blank=True,
    )
    budget_period_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="Window length when the period is a duration."
    )
    budget_window_start = models.DateTimeField(null=True, blank=True)
    budget_spent_micros = models.BigIntegerField(default=0)

    class Meta:
        abstract = True

    @classmethod
    def limit_constraints(cls, prefix: str) -> list[models.BaseConstraint]:
        return [
            models.CheckConstraint(
                condition=Q(budget_limit_micros__isnull=True)
                | Q(budget_limit_micros__gte=0),
                name=f"{prefix}_budget_limit_nonnegative",
            ),
            models.CheckConstraint(
                condition=Q(budget_spent_micros__gte=0),
                name=f"{prefix}_budget_spent_nonnegative",
            ),
            models.CheckConstraint(
                # Spelled out as NOT NULL: a NULL would make "> 0" unknown,
                # which a CHECK constraint lets through.
                condition=~Q(budget_period=BudgetPeriod.DURATION)
                | Q(budget_period_seconds__isnull=False, budget_period_seconds__gt=0),
                name=f"{prefix}_budget_duration_has_seconds",
            ),
        ]


class RequestQuota(models.Model):
    """A monthly request quota (seed 004): null means unlimited."""

    monthly_request_quota = models.PositiveIntegerField(null=True, blank=True)
    quota_period_start = models.DateTimeField(null=True, blank=True)
    quota_requests_used = models.PositiveIntegerField(default=0)

    class Meta:
        abstract = True


class Organization(LimitedEntity):
    """A tenant organization; owns teams."""

    organization_id = models.CharField(
        max_length=128, unique=True, validators=[identifier_validator]
    )
    name = models.CharField(max_length=200)
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.ACTIVE
    )
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["organization_id"]
        constraints = LimitedEntity.limit_constraints("tenants_organization")

    def __str__(self) -> str:
        return self.organization_id


class BudgetMode(models.TextChoices):
    """How calls turn into credits (seed 000)."""

    JOB_BASED = "job_based", "1 credit per completed job"
    CONSUMPTION_USD = "consumption_usd", "Credits = cost x credits per dollar"
    CONSUMPTION_TOKENS = "consumption_tokens", "Credits = tokens ÷ tokens per credit"


class CacheMode(models.TextChoices):
    OFF = "off", "Never cache"
    PER_REQUEST = "per_request", "Cache when the request asks for it"
    ALWAYS = "always", "Cache every cacheable request"


class CacheHitCharge(models.TextChoices):
    FREE = "free", "Cache hits are free"
    DISCOUNTED = "discounted", "Cache hits cost a share of the call"
    FULL = "full", "Cache hits cost what the call would have"


class Team(LimitedEntity, RequestQuota):
    """A team of an organization: the unit that holds credits and keys."""

    team_id = models.CharField(
        max_length=128, unique=True, validators=[identifier_validator]
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.PROTECT, related_name="teams"
    )
    team_alias = models.CharField(max_length=200, blank=True)
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.ACTIVE
    )
    model_groups = models.ManyToManyField(
        "routing.ModelGroup", blank=True, related_name="teams"
    )
    budget_mode = models.CharField(
        max_length=24, choices=BudgetMode.choices, default=BudgetMode.JOB_BASED
    )
    credits_per_dollar = models.DecimalField(
        max_digits=12,
        decimal_places=4,
        default=100,
        validators=[MinValueValidator(0)],
        help_text="consumption_usd: credits charged per USD of provider cost.",
    )
    tokens_per_credit = models.PositiveIntegerField(
        default=10_000,
        validators=[MinValueValidator(1)],
        help_text="consumption_tokens: tokens that make one credit.",
    )
    price_markup_bps = models.PositiveIntegerField(
        default=0, help_text="Markup on provider cost in basis points (100 = 1%)."
    )
    cache_mode = models.CharField(
        max_length=16, choices=CacheMode.choices, default=CacheMode.PER_REQUEST
    )
    cache_ttl_seconds = models.PositiveIntegerField(default=3600)
    cache_hit_charge = models.CharField(
        max_length=16, choices=CacheHitCharge.choices, default=CacheHitCharge.FREE
    )
    cache_hit_price_bps = models.PositiveIntegerField(
        default=5_000,
        validators=[MaxValueValidator(10_000)],
        help_text="discounted: the share of the full charge a hit costs, in basis points.",
    )
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["team_id"]
        constraints = [
            *LimitedEntity.limit_constraints("tenants_team"),
            models.CheckConstraint(
                condition=Q(tokens_per_credit__gte=1),
                name="tenants_team_tokens_per_credit_positive",
            ),
            models.CheckConstraint(
                condition=Q(credits_per_dollar__gte=0),
                name="tenants_team_credits_per_dollar_nonnegative",
            ),
        ]
        indexes = [models.Index(fields=["organization", "status"])]

    def __str__(self) -> str:
        return self.team_id


class KeyStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    REVOKED = "revoked", "Revoked"
    EXPIRED = "expired", "Expired"


class VirtualKey(LimitedEntity, RequestQuota):
    """A team's API key. The secret is never stored: only a keyed digest of it.

    A key reads ``<prefix>_<public_id>_<secret>``; ``public_id`` finds the row,
    ``digest`` (HMAC-SHA256 of the whole key) proves the secret. ``display_prefix``
    is what screens and logs may show.
    """

    public_id = models.CharField(max_length=32, unique=True, editable=False)
    digest = models.CharField(max_length=64, editable=False)
    display_prefix = models.CharField(max_length=64, editable=False)
    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="keys")
    alias = models.CharField(max_length=200, blank=True)
    status = models.CharField(
        max_length=16, choices=KeyStatus.choices, default=KeyStatus.ACTIVE
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    allowed_model_groups = models.ManyToManyField(
        "routing.ModelGroup",
        blank=True,
        related_name="+",
        help_text="A subset of the team's groups; empty means all of them.",
    )
    metadata = models.JSONField(default=dict, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    # Rotation: the new key points at the one it replaces, which keeps working
    # until its grace_until.
    predecessor = models.OneToOneField(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="successor",
    )
    grace_until = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_by = models.ForeignKey(
        "accounts.User",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "virtual key"
        constraints = [
            *LimitedEntity.limit_constraints("tenants_virtualkey"),
            models.UniqueConstraint(
                fields=["team", "alias"],
                condition=~Q(alias=""),
                name="tenants_virtualkey_alias_unique_per_team",
            ),
            models.CheckConstraint(
                condition=Q(digest__regex=r"^[0-9a-f]{64}$"),
                name="tenants_virtualkey_digest_is_sha256_hex",
            ),
        ]
        indexes = [
            models.Index(fields=["team", "status"]),
            models.Index(fields=["status", "expires_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.display_prefix}… ({self.alias or self.team_id})"
