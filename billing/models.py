"""Credit accounts and their append-only ledger, prices, usage records, jobs.

All amounts are integers of micro-units (gateway_project/money.py): credits in
micro-credits, costs and prices in micro-USD. No floats.
"""

import uuid
from typing import Any

from django.db import models
from django.db.models import F, Q
from django.db.models.functions import Coalesce

from tenants.models import BudgetPeriod


class AppendOnlyError(Exception):
    pass


class CreditAccount(models.Model):
    """A team's prepaid credits.

    ``balance_micros`` is what the team can still spend; ``held_micros`` is
    reserved by calls in flight. Both always equal the sum of the matching
    columns of the account's ledger. The balance may go below zero only down
    to ``-overdraft_limit_micros``.
    """

    team = models.OneToOneField(
        "tenants.Team", on_delete=models.PROTECT, related_name="credit_account"
    )
    balance_micros = models.BigIntegerField(default=0)
    held_micros = models.BigIntegerField(default=0)
    overdraft_limit_micros = models.BigIntegerField(default=0)
    # Lifetime totals, for the dashboard; derivable from the ledger but kept
    # so that reading a balance never scans it.
    allocated_total_micros = models.BigIntegerField(default=0)
    used_total_micros = models.BigIntegerField(default=0)
    auto_refill_amount_micros = models.BigIntegerField(null=True, blank=True)
    auto_refill_period = models.CharField(
        max_length=16,
        choices=BudgetPeriod.choices,
        default=BudgetPeriod.NONE,
        blank=True,
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=Q(held_micros__gte=0), name="billing_account_held_nonnegative"
            ),
            models.CheckConstraint(
                condition=Q(overdraft_limit_micros__gte=0),
                name="billing_account_overdraft_nonnegative",
            ),
            models.CheckConstraint(
                condition=Q(balance_micros__gte=-F("overdraft_limit_micros")),
                name="billing_account_no_overspend",
            ),
            models.CheckConstraint(
                condition=Q(auto_refill_amount_micros__isnull=True)
                | Q(auto_refill_amount_micros__gt=0),
                name="billing_account_refill_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"credits of {self.team_id}"


class LedgerEntryType(models.TextChoices):
    ALLOCATION = "allocation", "Allocation"
    TOP_UP = "top_up", "Top-up"
    HOLD = "hold", "Hold"
    CAPTURE = "capture", "Capture"
    RELEASE = "release", "Release"
    REFUND = "refund", "Refund"
    ADJUSTMENT = "adjustment", "Adjustment"
    REFILL = "refill", "Auto-refill"


class LedgerEntry(models.Model):
    """One movement of credits. Append-only: never updated, never deleted.

    ``amount_micros`` changes the balance (before → after); ``held_delta_micros``
    changes the held part. A hold is (-x, +x), a capture of c from a hold is
    (0, -c), a release of r is (+r, -r).
    """

    # Indexed by (account, -created_at) below; each index costs every movement.
    account = models.ForeignKey(
        CreditAccount,
        on_delete=models.PROTECT,
        related_name="entries",
        db_index=False,
    )
    entry_type = models.CharField(max_length=16, choices=LedgerEntryType.choices)
    amount_micros = models.BigIntegerField()
    held_delta_micros = models.BigIntegerField(default=0)
    balance_before_micros = models.BigIntegerField()
    balance_after_micros = models.BigIntegerField()
    idempotency_key = models.CharField(max_length=200)  # unique: Meta
    reason = models.CharField(max_length=500, blank=True)
    request_id = models.CharField(max_length=64, blank=True)  # indexed: Meta
    job = models.ForeignKey(
        "billing.Job", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    actor = models.ForeignKey(
        "accounts.User",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    actor_label = models.CharField(max_length=254, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "ledger entries"
        constraints = [
            models.CheckConstraint(
                condition=Q(
                    balance_after_micros=F("balance_before_micros") + F("amount_micros")
                ),
                name="billing_ledger_balance_arithmetic",
            ),
            models.CheckConstraint(
                condition=Q(entry_type__in=LedgerEntryType.values),
                name="billing_ledger_type_valid",
            ),
            # In Meta rather than unique=True/db_index=True on the fields, which
            # on PostgreSQL add a second (LIKE) index that nothing queries.
            models.UniqueConstraint(
                fields=["idempotency_key"], name="billing_ledger_idempotency_unique"
            ),
        ]
        indexes = [
            models.Index(fields=["account", "-created_at"]),
            models.Index(fields=["request_id"], name="billing_ledger_request_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.entry_type} {self.amount_micros} ({self.idempotency_key})"

    def save(self, *args: Any, **kwargs: Any) -> None:
        if not self._state.adding:
            raise AppendOnlyError("ledger entries are never updated")
        super().save(*args, **kwargs)

    def delete(self, *args: Any, **kwargs: Any) -> Any:
        raise AppendOnlyError("ledger entries are never deleted")


class PriceSource(models.TextChoices):
    LITELLM = "litellm", "litellm cost map"
    OPERATOR = "operator", "Set by an operator"


class ModelPrice(models.Model):
    """A price of a provider model from ``effective_from`` on.

    Prices are micro-USD per million tokens: $2.50 per 1M tokens is 2,500,000.
    The row in force at a moment is the latest one not after it.
    """

    model = models.CharField(max_length=200, help_text="litellm model string")
    input_price_per_million_micros = models.BigIntegerField()
    output_price_per_million_micros = models.BigIntegerField()
    effective_from = models.DateTimeField()
    source = models.CharField(
        max_length=16, choices=PriceSource.choices, default=PriceSource.OPERATOR
    )
    note = models.CharField(max_length=200, blank=True)
    created_by = models.ForeignKey(
        "accounts.User",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["model", "-effective_from"]
        constraints = [
            models.UniqueConstraint(
                fields=["model", "effective_from"], name="billing_price_unique_from"
            ),
            models.CheckConstraint(
                condition=Q(input_price_per_million_micros__gte=0)
                & Q(output_price_per_million_micros__gte=0),
                name="billing_price_nonnegative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model} from {self.effective_from:%Y-%m-%d}"


class JobStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    IN_PROGRESS = "in_progress", "In progress"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    EXPIRED = "expired", "Expired"


# A job in one of these takes no more calls and cannot be completed (409
# job_closed); its held credit, if any, is settled.
JOB_CLOSED_STATUSES = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.EXPIRED)
JOB_OPEN_STATUSES = (JobStatus.PENDING, JobStatus.IN_PROGRESS)


class Job(models.Model):
    """A unit of tenant work grouping LLM calls (seed 000); totals kept on it."""

    job_id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    team = models.ForeignKey(
        "tenants.Team", on_delete=models.PROTECT, related_name="jobs"
    )
    virtual_key = models.ForeignKey(
        "tenants.VirtualKey",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    job_type = models.CharField(max_length=100)
    status = models.CharField(
        max_length=16, choices=JobStatus.choices, default=JobStatus.PENDING
    )
    user_id = models.CharField(max_length=200, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    error_message = models.TextField(blank=True)
    total_calls = models.PositiveIntegerField(default=0)
    successful_calls = models.PositiveIntegerField(default=0)
    failed_calls = models.PositiveIntegerField(default=0)
    total_tokens = models.BigIntegerField(default=0)
    total_cost_micros = models.BigIntegerField(default=0)
    credits_charged_micros = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["team", "-created_at"]),
            models.Index(fields=["team", "status"]),
            # What job expiry scans every few minutes: only the open jobs.
            models.Index(
                fields=["created_at"],
                condition=Q(status__in=JOB_OPEN_STATUSES),
                name="billing_job_open_created_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.job_type} {self.job_id}"


class UsageStatus(models.TextChoices):
    SUCCESS = "success", "Success"
    ERROR = "error", "Error"
    CLIENT_DISCONNECTED = "client_disconnected", "Client disconnected"
    # A stream cut off before its end by the provider, or by the gateway's
    # own end (its process died: settled from the settlement journal);
    # charged for what it had relayed.
    INTERRUPTED = "interrupted", "Interrupted"


class UsageSource(models.TextChoices):
    PROVIDER = "provider", "Reported by the provider"
    ESTIMATED = "estimated", "Counted by the gateway"
    CACHE = "cache", "Served from cache"


class UsageRecord(models.Model):
    """Exactly one per request id: what a call used and what it was charged.

    The price columns are a snapshot of the price book at the time of the call,
    so later price changes never rewrite history.
    """

    # The gateway's own id of the call; the caller's X-Request-Id, if any,
    # is only a correlation value beside it.
    request_id = models.CharField(max_length=64)  # unique: Meta
    client_request_id = models.CharField(max_length=64, blank=True, default="")
    # Every call inserts a row here, and pays for each index and each foreign
    # key check. The references every call carries (organization, team, key,
    # model group, deployment) are therefore not checked by the database: a
    # check locks the referenced row (FOR KEY SHARE) on every call, so all
    # concurrent calls of a team queued on its row, and the checks were half
    # of the settlement's time in PostgreSQL. Django still refuses to delete a
    # referenced row (PROTECT is enforced by the ORM, whose deletions
    # query for referencing usage first). The keys that lead an
    # (x, created_at) index in Meta have no index of their own.
    organization = models.ForeignKey(
        "tenants.Organization",
        on_delete=models.PROTECT,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    team = models.ForeignKey(
        "tenants.Team",
        on_delete=models.PROTECT,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    virtual_key = models.ForeignKey(
        "tenants.VirtualKey",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    model_group = models.ForeignKey(
        "routing.ModelGroup",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        db_index=False,
        db_constraint=False,
    )
    deployment = models.ForeignKey(
        "routing.Deployment",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        db_constraint=False,
    )
    job = models.ForeignKey(
        Job,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="usage_records",
    )
    endpoint = models.CharField(max_length=64)
    requested_model = models.CharField(max_length=200)
    provider_model = models.CharField(max_length=200, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    total_tokens = models.PositiveIntegerField(default=0)
    input_price_per_million_micros = models.BigIntegerField(default=0)
    output_price_per_million_micros = models.BigIntegerField(default=0)
    price_markup_bps = models.PositiveIntegerField(default=0)
    cost_micros = models.BigIntegerField(default=0)
    credits_micros = models.BigIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(default=0)
    time_to_first_token_ms = models.PositiveIntegerField(null=True, blank=True)
    status = models.CharField(max_length=24, choices=UsageStatus.choices)
    http_status = models.PositiveSmallIntegerField(default=200)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.TextField(blank=True)
    cached = models.BooleanField(default=False)
    streamed = models.BooleanField(default=False)
    usage_source = models.CharField(
        max_length=16, choices=UsageSource.choices, default=UsageSource.PROVIDER
    )
    # [{"deployment": "...", "error_code": "...", "latency_ms": 12}, ...]
    fallbacks_tried = models.JSONField(default=list, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(cost_micros__gte=0) & Q(credits_micros__gte=0),
                name="billing_usage_charges_nonnegative",
            ),
            models.CheckConstraint(
                condition=Q(total_tokens=F("prompt_tokens") + F("completion_tokens")),
                name="billing_usage_total_tokens_sum",
            ),
            # Not unique=True, which on PostgreSQL adds an unused LIKE index.
            models.UniqueConstraint(
                fields=["request_id"], name="billing_usage_request_unique"
            ),
        ]
        indexes = [
            models.Index(fields=["team", "created_at"]),
            models.Index(fields=["virtual_key", "created_at"]),
            models.Index(fields=["organization", "created_at"]),
            models.Index(fields=["model_group", "created_at"]),
        ]

    def __str__(self) -> str:
        return self.request_id


class RollupGranularity(models.TextChoices):
    HOUR = "hour", "Hour"
    DAY = "day", "Day"


def _grain_part(field: str) -> Coalesce:
    # NULL never equals NULL in a unique index: an absent key, group or
    # deployment counts as 0 so that each grain has exactly one row.
    return Coalesce(field, 0, output_field=models.BigIntegerField())


class UsageRollup(models.Model):
    """Usage of one UTC hour or day at the full grain (organization, team,
    key, model group, deployment): every aggregate is a GROUP BY over it.

    Written only by billing.rollups; ``latency_histogram`` maps the upper bound
    in ms of each bucket of rollups.LATENCY_BUCKETS_MS to its count, so that
    percentiles merge across rows.
    """

    granularity = models.CharField(max_length=8, choices=RollupGranularity.choices)
    bucket_start = models.DateTimeField()
    organization = models.ForeignKey(
        "tenants.Organization", on_delete=models.PROTECT, related_name="+"
    )
    team = models.ForeignKey("tenants.Team", on_delete=models.PROTECT, related_name="+")
    virtual_key = models.ForeignKey(
        "tenants.VirtualKey",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    model_group = models.ForeignKey(
        "routing.ModelGroup",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    deployment = models.ForeignKey(
        "routing.Deployment",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    requests = models.BigIntegerField(default=0)
    successes = models.BigIntegerField(default=0)
    errors = models.BigIntegerField(default=0)
    cache_hits = models.BigIntegerField(default=0)
    fallbacks = models.BigIntegerField(default=0)
    prompt_tokens = models.BigIntegerField(default=0)
    completion_tokens = models.BigIntegerField(default=0)
    total_tokens = models.BigIntegerField(default=0)
    cost_micros = models.BigIntegerField(default=0)
    credits_micros = models.BigIntegerField(default=0)
    latency_sum_ms = models.BigIntegerField(default=0)
    latency_max_ms = models.BigIntegerField(default=0)
    latency_histogram = models.JSONField(default=dict, blank=True)

    class Meta:
        constraints = [
            # Also the index of (granularity, bucket_start) scans.
            models.UniqueConstraint(
                "granularity",
                "bucket_start",
                "organization",
                "team",
                _grain_part("virtual_key"),
                _grain_part("model_group"),
                _grain_part("deployment"),
                name="billing_rollup_unique_grain",
            ),
            models.CheckConstraint(
                condition=Q(granularity__in=RollupGranularity.values),
                name="billing_rollup_granularity_valid",
            ),
        ]
        indexes = [models.Index(fields=["team", "granularity", "bucket_start"])]

    def __str__(self) -> str:
        return f"{self.granularity} {self.bucket_start:%Y-%m-%d %H:%M} {self.team_id}"


class RollupState(models.Model):
    """How far raw usage is rolled up: every hour before ``rolled_up_until``
    has its hourly rows, and daily rows are recomputed up to
    ``days_rolled_up_until`` (equal to it, unless a run stopped in between)."""

    name = models.CharField(max_length=32, unique=True)
    rolled_up_until = models.DateTimeField(null=True, blank=True)
    days_rolled_up_until = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.name} until {self.rolled_up_until}"
