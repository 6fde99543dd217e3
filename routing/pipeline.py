"""The request path of DESIGN.md: authenticate, validate, resolve the model
group, route with fallback, record exactly one usage record.

Database and cache work runs in worker threads (``in_thread``, which hands
each hop's database connection back to the pool), bundled so that a call makes
two hops; provider calls run on the event loop and never inside a database
transaction.
"""

import asyncio
import json
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from functools import partial
from typing import Any

from django.conf import settings
from django.db import transaction
from django.http import (
    HttpRequest,
    HttpResponseBase,
    JsonResponse,
    StreamingHttpResponse,
)
from django.utils import timezone

from billing.budgets import budgets_apply, budgets_reserve
from billing.models import Job, JobStatus, UsageRecord, UsageSource, UsageStatus
from billing.rollups import fell_back
from billing.selectors import model_price_at
from billing.services import (
    InsufficientCredits,
    call_settle,
    credits_for_call,
    credits_hold,
    credits_hold_may_wait,
    usage_cost_micros,
)
from gateway_project import metrics
from gateway_project.cache import cache, cache_names
from gateway_project.errors import GatewayError, NotFound
from gateway_project.generations import ROUTING
from gateway_project.money import MICROS
from gateway_project.threads import in_thread
from routing import limits, providers, response_cache
from routing.models import DeploymentStatus, ModelGroup, ModelGroupStatus
from routing.providers import ProviderError, Target
from tenants.authentication import (
    presented_key,
    virtual_key_authenticate,
    virtual_key_cache_names,
    virtual_key_check,
    virtual_key_recall,
    virtual_key_touch,
)
from tenants.key_cache import key_allowed_group_ids
from tenants.models import BudgetMode, CacheHitCharge, VirtualKey

logger = logging.getLogger(__name__)

# Calls that are charged, counted in metrics and stamp their key's last use.
_SUCCEEDED = (UsageStatus.SUCCESS, UsageStatus.CLIENT_DISCONNECTED)


class ModelNotFound(GatewayError):
    http_status = 404
    code = "model_not_found"


class ModelNotAllowed(GatewayError):
    http_status = 403
    code = "model_not_allowed"


@dataclass
class Call:
    """One request on its way through the pipeline."""

    request_id: str
    key: VirtualKey
    endpoint: str
    group: ModelGroup
    targets: list[Target]
    cooled: set[int]
    body: dict[str, Any]
    job: Job | None
    prices: dict[int, tuple[int, int]] = field(default_factory=dict)
    held_micros: int = 0
    # A hold not written yet: it is written with the settlement (_hold).
    unheld_micros: int | None = None
    budget_reserved_micros: int | None = None
    cache_key: str | None = None
    estimate: tuple[int, int] | None = None
    cached: dict[str, Any] | None = None
    admission: limits.Admission | None = None
    started: float = field(default_factory=time.monotonic)
    attempts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def estimated_tokens(self) -> int:
        return sum(self.estimate) if self.estimate else 0

    @property
    def latency_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)


# --- steps 1 and 2: authenticate, validate, resolve ---------------------------------


def _json_body(request: HttpRequest) -> dict[str, Any]:
    try:
        body = json.loads(request.body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise GatewayError(
            "Request body is not valid JSON", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise GatewayError("Request body must be a JSON object", code="invalid_json")
    return body


def _validate(endpoint: str, body: dict[str, Any]) -> None:
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise GatewayError("model is required", param="model")
    required = {"chat": "messages", "completion": "prompt", "embedding": "input"}[
        endpoint
    ]
    value = body.get(required)
    if endpoint == "chat" and (not isinstance(value, list) or not value):
        raise GatewayError("messages must be a non-empty list", param="messages")
    if endpoint != "chat" and not isinstance(value, str | list):
        raise GatewayError(f"{required} is required", param=required)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise GatewayError("stream must be a boolean", param="stream")


def allowed_groups(key: VirtualKey) -> list[ModelGroup]:
    """The active groups a key may use: its own list if it has one, else its team's."""
    return list(
        ModelGroup.objects.filter(
            pk__in=key_allowed_group_ids(key), status=ModelGroupStatus.ACTIVE
        ).order_by("group_name")
    )


@dataclass(frozen=True)
class Member:
    priority: int
    weight: int
    target: Target


@dataclass(frozen=True)
class Route:
    """A model group as the request path needs it, kept in memory per process:
    its active members as targets, and the price of each in force when loaded."""

    group: ModelGroup | None
    members: list[Member]
    prices: dict[int, tuple[int, int] | None]
    generation: int
    loaded: float  # time.monotonic()


_routes: dict[str, Route] = {}
_ROUTES_KEPT = 1000  # names, known or not; past that the memory starts over


def routes_forget() -> None:
    """Drop every route this process keeps (tests, after a flush)."""
    _routes.clear()


def _route_names(name: Any) -> tuple[Route | None, list[str]]:
    """The route kept for a group name, if any, and the cache entries that
    tell whether it is current and which of its deployments cool down."""
    route = _routes.get(name) if isinstance(name, str) else None
    cooldowns = (
        [_cooldown_key(m.target.deployment_id) for m in route.members] if route else []
    )
    return route, [ROUTING, *cooldowns]


def _route(
    name: str, route: Route | None, found: dict[str, Any]
) -> tuple[Route, dict[str, Any]]:
    """The route of a group name and the cooldowns of its deployments. With
    ``route`` and ``found`` from ``_route_names`` (read in the call's one
    cache round trip) nothing more is read while the kept route is current:
    its generation matches and it is younger than
    GATEWAY_ROUTE_CACHE_SECONDS."""
    generation = found.get(ROUTING, 0)
    now = time.monotonic()
    if (
        route is None
        or route.generation != generation
        or now - route.loaded >= settings.GATEWAY_ROUTE_CACHE_SECONDS
    ):
        route = _route_load(name, generation, now)
        if len(_routes) >= _ROUTES_KEPT:
            _routes.clear()
        _routes[name] = route
        found = cache.get_many(
            [_cooldown_key(m.target.deployment_id) for m in route.members]
        )
    return route, found


def _route_load(name: str, generation: int, now: float) -> Route:
    group = (
        ModelGroup.objects.filter(group_name=name, status=ModelGroupStatus.ACTIVE)
        .prefetch_related("members__deployment__credential")
        .first()
    )
    members = (
        [
            Member(m.priority, m.weight, providers.target_for(m.deployment))
            for m in group.members.all()
            if m.deployment.status == DeploymentStatus.ACTIVE
        ]
        if group is not None
        else []
    )
    at = timezone.now()
    return Route(
        group=group,
        members=members,
        prices={m.target.deployment_id: _price(m.target.model, at) for m in members},
        generation=generation,
        loaded=now,
    )


def _ordered(members: list[Member]) -> list[Target]:
    """Targets by priority; within one priority a weighted random order, so
    that load spreads across equals."""
    ordered: list[Target] = []
    for priority in sorted({member.priority for member in members}):
        tier = [member for member in members if member.priority == priority]
        while tier:
            chosen = random.choices(tier, weights=[m.weight for m in tier])[0]  # noqa: S311 - load spreading
            ordered.append(chosen.target)
            tier.remove(chosen)
    return ordered


def _cooldown_key(deployment_id: int) -> str:
    return f"cooldown:deployment:{deployment_id}"


def _prepare(
    request: HttpRequest, endpoint: str, body: dict[str, Any], job_id: str | None = None
) -> Call:
    """Authenticate, validate and resolve in one trip to the worker thread,
    reading the key's cache entry and the route's in one round trip."""
    plaintext = presented_key(request)
    kept, route_names = _route_names(body.get("model"))
    found = cache.get_many([*virtual_key_cache_names(plaintext), *route_names])
    key = virtual_key_authenticate(plaintext=plaintext, prefetched=found)
    _validate(endpoint, body)
    route, cooling = _route(body["model"], kept, found)
    group = route.group
    if group is None:
        raise ModelNotFound(
            f"The model '{body['model']}' does not exist", param="model"
        )
    request.gateway_model_group = group.group_name  # type: ignore[attr-defined]
    if group.pk not in key_allowed_group_ids(key):
        raise ModelNotAllowed(
            f"This key may not use the model '{body['model']}'", param="model"
        )
    job = _job_for(job_id or request.headers.get("X-Job-Id"), key)
    call = _call(request, key, endpoint, group, route, body, job)
    call.cooled = {
        t.deployment_id
        for t in call.targets
        if cooling.get(_cooldown_key(t.deployment_id))
    }
    return call


def _call(
    request: HttpRequest,
    key: VirtualKey,
    endpoint: str,
    group: ModelGroup,
    route: Route,
    body: dict[str, Any],
    job: Job | None,
) -> Call:
    targets = _ordered(route.members)
    prices = {
        t.deployment_id: price
        for t in targets
        if (price := route.prices.get(t.deployment_id)) is not None
    }
    return Call(
        request_id=request.request_id,  # type: ignore[attr-defined]
        key=key,
        endpoint=endpoint,
        group=group,
        targets=targets,
        cooled=set(),
        body=body,
        job=job,
        prices=prices,
    )


def _prepare_known(
    request: HttpRequest, endpoint: str, body: dict[str, Any], job_id: str | None
) -> Call | None:
    """Steps 1 to 3 from what this process holds, in one round trip: the key
    as this process last read it and the route it keeps, both proven current
    by the limit script, which reads the cooldowns and admits the call in the
    same trip (limits.acquire_when_current). None, with nothing written, when
    any of it is missing or stale, or would refuse the call: then ``_prepare``
    reads afresh and answers. Raises RateLimited."""
    if not settings.REDIS_URL or job_id or request.headers.get("X-Job-Id"):
        return None  # nothing to prove against, or a job to read
    plaintext = presented_key(request)
    recalled = virtual_key_recall(plaintext)
    name = body.get("model")
    route = _routes.get(name) if isinstance(name, str) else None
    if (
        recalled is None
        or plaintext is None
        or route is None
        or route.group is None
        or time.monotonic() - route.loaded >= settings.GATEWAY_ROUTE_CACHE_SECONDS
    ):
        return None
    key, expected, entry = recalled
    try:
        virtual_key_check(key=key, plaintext=plaintext)
        _validate(endpoint, body)
    except GatewayError:
        return None
    if route.group.pk not in key_allowed_group_ids(key):
        return None
    request.gateway_model_group = route.group.group_name  # type: ignore[attr-defined]
    call = _call(request, key, endpoint, route.group, route, body, job=None)
    prompt, completion = _estimate(call)
    routing, *cooldowns = cache_names(
        ROUTING, *(_cooldown_key(t.deployment_id) for t in call.targets)
    )
    try:
        call.admission, cooling = limits.acquire_when_current(
            _scopes(key),
            estimate=prompt + completion,
            expected={**expected, routing: str(route.generation)},
            present=[entry],
            read=cooldowns,
        )
    except limits.Stale:
        return None
    call.cooled = {
        t.deployment_id
        for t, cooling_down in zip(call.targets, cooling, strict=True)
        if cooling_down
    }
    return call


def _job_for(job_id: str | None, key: VirtualKey) -> Job | None:
    """The job a call is attached to: unknown → 404, another team's → 403,
    closed → 409."""
    if not job_id:
        return None
    try:
        job = Job.objects.filter(job_id=uuid.UUID(str(job_id))).first()
    except ValueError:
        job = None
    if job is None:
        raise NotFound(f"Job '{job_id}' not found", param="job_id")
    if job.team_id != key.team_id:
        raise GatewayError(
            "This job belongs to another team",
            code="permission_denied",
            http_status=403,
        )
    if job.status in (JobStatus.COMPLETED, JobStatus.FAILED):
        raise GatewayError(
            f"Job is already {job.status}", code="job_closed", http_status=409
        )
    return job


# --- step 6: route with fallback and shared cooldowns ----------------------------


def _record_failure(deployment_id: int, error: ProviderError) -> None:
    """Count a retryable failure; too many within the window (or a 429) cool
    the deployment down for every gateway process, through Redis."""
    window = settings.GATEWAY_FAILURE_WINDOW_SECONDS
    counter = f"failures:deployment:{deployment_id}"
    if not cache.add(counter, 1, timeout=window):
        try:
            # None when Redis is down (the cache ignores its errors).
            failures = cache.incr(counter) or 1
        except ValueError:
            failures = 1
    else:
        failures = 1
    if error.status == 429 or failures >= settings.GATEWAY_COOLDOWN_FAILURES:
        cache.set(
            _cooldown_key(deployment_id), 1, timeout=settings.GATEWAY_COOLDOWN_SECONDS
        )


def _candidates(call: Call) -> list[Target]:
    """The targets to try, in order; the others are noted as skipped."""
    usable = []
    for target in call.targets:
        if target.deployment_id in call.cooled:
            reason = "cooldown"
        elif not target.available:
            reason = "no_credential"
        elif target.deployment_id not in call.prices:
            # Never silently free: a model without a known price is not routed to.
            reason = "no_price"
        else:
            usable.append(target)
            continue
        call.attempts.append({"deployment": target.deployment_name, "skipped": reason})
    return usable


def _deployment_admit(
    call: Call, target: Target
) -> tuple[bool, limits.Admission | None]:
    """A deployment's own RPM/TPM: (False, None) while exhausted — skip it."""
    if target.rpm_limit is None and target.tpm_limit is None:
        return True, None
    scope = limits.Scope(
        f"deployment:{target.deployment_id}", target.rpm_limit, target.tpm_limit, None
    )
    try:
        return True, limits.acquire([scope], estimate=call.estimated_tokens)
    except limits.RateLimited:
        call.attempts.append(
            {"deployment": target.deployment_name, "skipped": "rate_limited"}
        )
        return False, None


async def _deployment_admit_async(
    call: Call, target: Target
) -> tuple[bool, limits.Admission | None]:
    """_deployment_admit, with no trip to a worker thread when the deployment
    has no limits of its own (the common case)."""
    if target.rpm_limit is None and target.tpm_limit is None:
        return True, None
    return await in_thread(_deployment_admit, call, target)


def _all_failed(call: Call, tried: list[ProviderError]) -> GatewayError:
    if not tried:
        return GatewayError(
            f"No deployment of '{call.group.group_name}' is available right now",
            code="no_deployment_available",
            http_status=503,
        )
    if all(error.code == "upstream_timeout" for error in tried):
        return GatewayError(
            "Every deployment timed out", code="upstream_timeout", http_status=504
        )
    return GatewayError(
        f"Every deployment failed; last error: {tried[-1].message}",
        code="upstream_error",
        http_status=502,
    )


async def _attempt_all(call: Call) -> tuple[Target, providers.Completion]:
    tried: list[ProviderError] = []
    for target in _candidates(call):
        admitted, admission = await _deployment_admit_async(call, target)
        if not admitted:
            continue
        started = time.monotonic()
        try:
            completion = await providers.call(target, call.endpoint, call.body)
        except asyncio.CancelledError:
            limits.release(admission, actual_tokens=0)
            raise
        except ProviderError as error:
            limits.release(admission, actual_tokens=0)
            call.attempts.append(_attempt(target, started, error))
            if not error.retryable:
                raise GatewayError(
                    error.message, code=error.code, http_status=error.status
                ) from None
            tried.append(error)
            await in_thread(_record_failure, target.deployment_id, error)
            continue
        call.attempts.append(_attempt(target, started, None))
        limits.release(
            admission,
            actual_tokens=completion.prompt_tokens + completion.completion_tokens,
        )
        return target, completion
    raise _all_failed(call, tried)


def _attempt(
    target: Target, started: float, error: ProviderError | None
) -> dict[str, Any]:
    elapsed = time.monotonic() - started
    attempt: dict[str, Any] = {
        "deployment": target.deployment_name,
        "latency_ms": int(elapsed * 1000),
    }
    metrics.UPSTREAM_SECONDS.labels(
        target.deployment_name, error.code if error is not None else "ok"
    ).observe(elapsed)
    if error is not None:
        attempt.update(error_code=error.code, status=error.status)
    return attempt


# --- step 7: settle -------------------------------------------------------------------


def _price(model: str, at: datetime) -> tuple[int, int] | None:
    """Micro-USD per million tokens: the operator's price in force, else
    litellm's map, else the operator's fallback price, else None (unknown)."""
    price = model_price_at(model=model, at=at)
    if price is not None:
        return (
            price.input_price_per_million_micros,
            price.output_price_per_million_micros,
        )
    known = providers.catalog_model(model) or providers.catalog_model(
        model.split("/", 1)[-1]
    )
    if known is not None and known.input_cost_per_token is not None:
        per_million = Decimal(1_000_000_000_000)
        return (
            int(
                (known.input_cost_per_token * per_million).quantize(
                    Decimal(1), rounding=ROUND_HALF_UP
                )
            ),
            int(
                ((known.output_cost_per_token or Decimal(0)) * per_million).quantize(
                    Decimal(1), rounding=ROUND_HALF_UP
                )
            ),
        )
    fallback: tuple[int, int] | None = settings.GATEWAY_FALLBACK_PRICE
    return fallback


def _charge(
    call: Call, *, cost_micros: int, tokens: int, succeeded: bool, cached: bool = False
) -> int:
    """What a call costs the team, in micro-credits. A job_based team pays one
    credit per job, and a call outside any job counts as a job of its own."""
    team = call.key.team
    if not succeeded or (cached and team.cache_hit_charge == CacheHitCharge.FREE):
        return 0
    if cached and team.cache_hit_charge == CacheHitCharge.DISCOUNTED:
        full = _charge(call, cost_micros=cost_micros, tokens=tokens, succeeded=True)
        # Half up, the one rounding rule.
        return (2 * full * team.cache_hit_price_bps + 10_000) // 20_000
    if team.budget_mode == BudgetMode.JOB_BASED:
        return 0 if call.job else MICROS
    return credits_for_call(team=team, cost_micros=cost_micros, tokens=tokens)


def _estimate(call: Call) -> tuple[int, int]:
    """(prompt, completion) tokens a call may use: the prompt counted, plus
    ``max_tokens`` — set to the configured cap when the caller gave none, and
    then sent upstream, so that the completion cannot outgrow the estimate.
    Counted once per call: limits and the hold share it."""
    if call.estimate is not None:
        return call.estimate
    completion = 0
    if call.endpoint != "embedding":
        given = call.body.get("max_tokens") or call.body.get("max_completion_tokens")
        if not isinstance(given, int) or given <= 0:
            given = settings.GATEWAY_DEFAULT_MAX_TOKENS
            call.body["max_tokens"] = given
        completion = given
    target = next((t for t in call.targets if t.deployment_id in call.prices), None)
    prompt = providers.estimate_tokens(target, call.body, "")[0] if target else 0
    call.estimate = (prompt, completion)
    return call.estimate


def _admit(call: Call) -> None:
    """Step 3: RPM, TPM and concurrency of the key, its team and its
    organization, in one round trip. Raises RateLimited (429)."""
    prompt, completion = _estimate(call)
    call.admission = limits.acquire(_scopes(call.key), estimate=prompt + completion)


def _scopes(key: VirtualKey) -> list[limits.Scope]:
    team = key.team
    organization = team.organization
    return [
        limits.Scope(
            f"key:{key.pk}", key.rpm_limit, key.tpm_limit, key.max_parallel_requests
        ),
        limits.Scope(
            f"team:{team.pk}",
            team.rpm_limit,
            team.tpm_limit,
            team.max_parallel_requests,
        ),
        limits.Scope(
            f"organization:{organization.pk}",
            organization.rpm_limit,
            organization.tpm_limit,
            organization.max_parallel_requests,
        ),
    ]


def _hold(call: Call, *, deferrable: bool = False) -> None:
    """Step 4: reserve the most the call can cost before any provider is
    called: the estimate at the dearest candidate's price.
    Raises InsufficientCredits (402); nothing is written then.

    ``deferrable``: when the team's credits, as this process last saw them,
    cover the hold GATEWAY_DEFERRED_HOLD_MARGIN times over, the hold is left
    to ``call.unheld_micros``. A call answered at once writes it with its
    settlement, in the same statement and under the same guard (one round
    trip to the database per call instead of two); a stream writes it while
    the provider opens the stream, and its first chunk waits for it
    (_stream). If the credits no longer cover it then, the answer is a 402
    and nothing is written."""
    candidates = [t for t in call.targets if t.deployment_id in call.prices]
    if not candidates:
        return  # routing will answer 503; nothing to hold
    prompt, completion = _estimate(call)
    dearest = max(call.prices[t.deployment_id] for t in candidates)
    cost = usage_cost_micros(
        prompt_tokens=prompt,
        completion_tokens=completion,
        input_price=dearest[0],
        output_price=dearest[1],
        markup_bps=call.key.team.price_markup_bps,
    )
    amount = _charge(call, cost_micros=cost, tokens=prompt + completion, succeeded=True)
    if (
        deferrable
        and call.job is None
        and not budgets_apply(call.key)
        and credits_hold_may_wait(
            team=call.key.team,
            amount_micros=amount,
            margin=settings.GATEWAY_DEFERRED_HOLD_MARGIN,
        )
    ):
        call.unheld_micros = amount
        return
    hold = partial(
        credits_hold,
        team=call.key.team,
        amount_micros=amount,
        request_id=call.request_id,
        job=call.job,
    )
    if not budgets_apply(call.key):
        call.held_micros = hold()  # one short transaction of its own
        return
    # Budgets, quotas and credits together: a 402 from any leaves nothing.
    with transaction.atomic():
        if budgets_reserve(key=call.key, cost_micros=cost, now=timezone.now()):
            call.budget_reserved_micros = cost
        call.held_micros = hold()


def _record(
    call: Call,
    *,
    target: Target | None,
    status: str,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    usage_source: str = UsageSource.PROVIDER,
    error: GatewayError | None = None,
    streamed: bool = False,
    cached: bool = False,
) -> None:
    """Step 7: the usage record, the capture and the release, at once; the
    rate-limit reservation is corrected to the tokens used (sent first, and
    its reply read after the settlement: one wait for both)."""
    released = limits.release_start(
        call.admission, actual_tokens=prompt_tokens + completion_tokens
    )
    try:
        record = _settle(
            call,
            target=target,
            status=status,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            usage_source=usage_source,
            error=error,
            streamed=streamed,
            cached=cached,
        )
    except InsufficientCredits:
        # Only a deferred hold can be refused here: the provider answered,
        # and the call is neither charged nor recorded.
        logger.warning(
            "deferred hold refused at settlement",
            extra={"team": call.key.team.team_id, "held_micros": call.unheld_micros},
        )
        raise
    finally:
        released()
    if record.status in _SUCCEEDED:
        virtual_key_touch(key=call.key)
    _count(call, record)


def _settle(
    call: Call,
    *,
    target: Target | None,
    status: str,
    prompt_tokens: int,
    completion_tokens: int,
    usage_source: str,
    error: GatewayError | None,
    streamed: bool,
    cached: bool,
) -> UsageRecord:
    input_price, output_price = (
        call.prices.get(target.deployment_id, (0, 0)) if target else (0, 0)
    )
    markup = call.key.team.price_markup_bps
    succeeded = status in _SUCCEEDED
    cost = (
        usage_cost_micros(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            input_price=input_price,
            output_price=output_price,
            markup_bps=markup,
        )
        if succeeded
        else 0
    )
    metadata = call.body.get("metadata")
    # A deferred hold is written only for a call that is charged: a failed
    # one held nothing.
    unheld = call.unheld_micros if succeeded else None
    record = call_settle(
        team=call.key.team,
        request_id=call.request_id,
        budget_reserved_micros=call.budget_reserved_micros,
        held_micros=call.held_micros if unheld is None else None,
        unheld_micros=unheld,
        charge_micros=_charge(
            call,
            cost_micros=cost,
            tokens=prompt_tokens + completion_tokens,
            succeeded=succeeded,
            cached=cached,
        ),
        organization_id=call.key.team.organization_id,
        team_id=call.key.team_id,
        virtual_key=call.key,
        model_group=call.group,
        deployment_id=target.deployment_id if target else None,
        job=call.job,
        endpoint=call.endpoint,
        requested_model=call.group.group_name,
        provider_model=target.model if target else "",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        input_price_per_million_micros=input_price,
        output_price_per_million_micros=output_price,
        price_markup_bps=markup,
        cost_micros=cost,
        latency_ms=call.latency_ms,
        status=status,
        http_status=error.http_status if error else 200,
        error_code=error.code if error else "",
        error_message=error.message if error else "",
        usage_source=usage_source,
        streamed=streamed,
        cached=cached,
        fallbacks_tried=call.attempts,
        metadata=metadata if isinstance(metadata, dict) else {},
        created_at=timezone.now(),
    )
    return record


def _count(call: Call, record: UsageRecord) -> None:
    """Metrics and the log line of a settled call (after its transaction).
    The key appears by its display prefix only; prompt text only with
    GATEWAY_LOG_PROMPTS."""
    group = call.group.group_name
    line: dict[str, Any] = {
        "team": call.key.team.team_id,
        "key": call.key.display_prefix,
        "model_group": group,
        "deployment": record.provider_model,
        "status": record.status,
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cost_micros": record.cost_micros,
        "credits_micros": record.credits_micros,
        "latency_ms": record.latency_ms,
        "cached": record.cached,
    }
    if settings.GATEWAY_LOG_PROMPTS:
        line["prompt"] = call.body.get("messages", call.body.get("prompt"))
    if record.error_code:
        line["error_code"] = record.error_code
    logger.info("call settled", extra=line)
    if record.status not in _SUCCEEDED:
        return
    metrics.TOKENS.labels(group, "prompt").inc(record.prompt_tokens)
    metrics.TOKENS.labels(group, "completion").inc(record.completion_tokens)
    metrics.COST.labels(group).inc(record.cost_micros)
    metrics.CREDITS.labels(group).inc(record.credits_micros)
    if record.cached:
        metrics.CACHE_HITS.labels(group).inc()
    if fell_back(call.attempts):
        metrics.FALLBACKS.labels(group).inc()


def _headers(
    response: HttpResponseBase, call: Call, target: Target | None
) -> HttpResponseBase:
    if call.admission is not None:
        for name, value in call.admission.headers().items():
            response[name] = value
    if call.cache_key is not None:
        response["x-cache"] = "hit" if call.cached is not None else "miss"
    response["x-gateway-model-group"] = call.group.group_name
    if target is not None:
        response["x-gateway-deployment"] = target.deployment_name
    response["x-gateway-attempts"] = str(
        sum(1 for a in call.attempts if "skipped" not in a)
    )
    return response


# --- the entry points ---------------------------------------------------------------


async def prepare(
    request: HttpRequest, endpoint: str, body: dict[str, Any], job_id: str | None = None
) -> Call:
    """Steps 1, 2 and 4 for a parsed body (3 and 5, limits and cache, to come)."""

    def prepared() -> Call:
        call = _prepare_known(request, endpoint, body, job_id)
        if call is None:
            call = _prepare(request, endpoint, body, job_id)
            _admit(call)
        cache_wanted = response_cache.wanted(request, body, call.key.team)
        try:
            # A cached answer's hold is written first; a stream's may be
            # written while its first chunk is on the way (_stream).
            _hold(call, deferrable=not cache_wanted)
        except GatewayError:
            limits.release(call.admission, actual_tokens=0)
            raise
        # Step 5: the team's response cache.
        if cache_wanted:
            call.cache_key = response_cache.key_for(
                call.key.team, call.group.group_name, endpoint, body
            )
            call.cached = response_cache.lookup(call.cache_key)
        return call

    return await in_thread(prepared)


async def complete(call: Call) -> tuple[Target | None, providers.Completion]:
    """Steps 5-7 for a call that is not streamed: the answer, recorded."""
    if call.cached is not None:
        return None, await _from_cache(call)
    try:
        target, completion = await _attempt_all(call)
    except GatewayError as error:
        await in_thread(
            _record, call, target=None, status=UsageStatus.ERROR, error=error
        )
        raise
    except asyncio.CancelledError:
        # The client went away before the answer (asgi.py cancels the view):
        # the call is recorded as failed and not charged, and its hold and
        # rate-limit slot are released now rather than when they expire.
        # (A stream pays for what it generated: _relay.)
        await asyncio.shield(
            in_thread(
                _record,
                call,
                target=None,
                status=UsageStatus.ERROR,
                error=GatewayError(
                    "The client closed the connection before the answer",
                    code="client_disconnected",
                    http_status=499,
                ),
            )
        )
        raise
    source = (
        UsageSource.PROVIDER if completion.usage_reported else UsageSource.ESTIMATED
    )
    await in_thread(
        _record,
        call,
        target=target,
        status=UsageStatus.SUCCESS,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        usage_source=source,
    )
    completion.body["model"] = call.group.group_name
    if call.cache_key is not None:
        entry = {
            "body": completion.body,
            "prompt_tokens": completion.prompt_tokens,
            "completion_tokens": completion.completion_tokens,
            "deployment": target.deployment_id,
        }
        await in_thread(
            response_cache.store, call.cache_key, entry, call.key.team.cache_ttl_seconds
        )
    return target, completion


async def _from_cache(call: Call) -> providers.Completion:
    """A cache hit: the stored answer, recorded (cached=true) and billed by
    the team's cache policy at the prices of the deployment that made it."""
    assert call.cached is not None
    entry = call.cached
    target = next(
        (t for t in call.targets if t.deployment_id == entry.get("deployment")), None
    )
    await in_thread(
        _record,
        call,
        target=target,
        status=UsageStatus.SUCCESS,
        prompt_tokens=int(entry["prompt_tokens"]),
        completion_tokens=int(entry["completion_tokens"]),
        usage_source=UsageSource.CACHE,
        cached=True,
    )
    body = dict(entry["body"])
    body["model"] = call.group.group_name
    return providers.Completion(
        body=body,
        prompt_tokens=int(entry["prompt_tokens"]),
        completion_tokens=int(entry["completion_tokens"]),
        usage_reported=True,
    )


async def handle(
    request: HttpRequest,
    endpoint: str,
    body: dict[str, Any] | None = None,
    job_id: str | None = None,
) -> HttpResponseBase:
    """POST /v1/chat/completions, /v1/completions, /v1/embeddings."""
    body = _json_body(request) if body is None else body
    call = await prepare(request, endpoint, body, job_id)
    if endpoint == "chat" and body.get("stream"):
        if call.cached is not None:
            return await _stream_from_cache(call)
        return await _stream(call)
    target, completion = await complete(call)
    return _headers(JsonResponse(completion.body), call, target)


async def _stream_from_cache(call: Call) -> HttpResponseBase:
    """A cache hit for a streaming request, answered as a stream."""
    completion = await _from_cache(call)
    choice = (completion.body.get("choices") or [{}])[0]
    content = str((choice.get("message") or {}).get("content") or "")
    base = {
        "id": completion.body.get("id", "chatcmpl-cache"),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": call.group.group_name,
    }
    chunks = [
        {
            **base,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": content}}
            ],
        },
        {
            **base,
            "choices": [
                {
                    "index": 0,
                    "delta": {},
                    "finish_reason": choice.get("finish_reason", "stop"),
                }
            ],
        },
    ]
    if (call.body.get("stream_options") or {}).get("include_usage"):
        chunks.append(
            {
                **base,
                "choices": [],
                "usage": {
                    "prompt_tokens": completion.prompt_tokens,
                    "completion_tokens": completion.completion_tokens,
                    "total_tokens": completion.prompt_tokens
                    + completion.completion_tokens,
                },
            }
        )

    async def events() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    return _headers(response, call, None)


def _hold_unheld(call: Call) -> None:
    """Write the hold ``_hold`` left to the call. Raises InsufficientCredits."""
    amount, call.unheld_micros = call.unheld_micros, None
    if amount is not None:
        call.held_micros = credits_hold(
            team=call.key.team, amount_micros=amount, request_id=call.request_id
        )


async def _stream(call: Call) -> HttpResponseBase:
    """Open the stream on the first deployment that yields a first chunk; then
    relay chunk by chunk. Failures before the first chunk fall back.

    A hold ``_hold`` left to the call is written meanwhile, and nothing leaves
    and nothing is recorded before it is: if it is refused, the stream is
    closed and the answer is the 402, with nothing written."""
    holding = (
        asyncio.ensure_future(in_thread(_hold_unheld, call))
        if call.unheld_micros is not None
        else None
    )

    async def held() -> None:
        if holding is None:
            return
        try:
            await holding
        except GatewayError:
            limits.release(call.admission, actual_tokens=0)
            raise

    tried: list[ProviderError] = []
    for target in _candidates(call):
        admitted, admission = await _deployment_admit_async(call, target)
        if not admitted:
            continue
        started = time.monotonic()
        chunks = providers.stream(target, call.body)
        try:
            first = await chunks.__anext__()
        except (ProviderError, StopAsyncIteration) as failure:
            limits.release(admission, actual_tokens=0)
            error = (
                failure
                if isinstance(failure, ProviderError)
                else ProviderError(
                    "Upstream closed the stream without data",
                    status=502,
                    code="upstream_error",
                    retryable=True,
                )
            )
            call.attempts.append(_attempt(target, started, error))
            if not error.retryable:
                gateway_error = GatewayError(
                    error.message, code=error.code, http_status=error.status
                )
                await held()
                await in_thread(
                    _record,
                    call,
                    target=None,
                    status=UsageStatus.ERROR,
                    error=gateway_error,
                )
                raise gateway_error from None
            tried.append(error)
            await in_thread(_record_failure, target.deployment_id, error)
            continue
        call.attempts.append(_attempt(target, started, None))
        # The deployment keeps the estimate reserved: a stream settles later.
        limits.release(admission, actual_tokens=call.estimated_tokens)
        try:
            await held()
        except GatewayError:
            await chunks.aclose()
            raise
        response = StreamingHttpResponse(
            _relay(call, target, first, chunks), content_type="text/event-stream"
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
        return _headers(response, call, target)
    refusal = _all_failed(call, tried)
    await held()
    await in_thread(_record, call, target=None, status=UsageStatus.ERROR, error=refusal)
    raise refusal


async def _relay(
    call: Call,
    target: Target,
    first: dict[str, Any],
    chunks: AsyncIterator[dict[str, Any]],
) -> AsyncIterator[bytes]:
    """Forward chunks as they arrive; settle exactly once however it ends."""
    wants_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
    usage: dict[str, Any] = {}
    usage_estimated = False
    text: list[str] = []
    status = UsageStatus.CLIENT_DISCONNECTED
    error: GatewayError | None = None
    try:
        pending: dict[str, Any] | None = first
        while pending is not None:
            chunk = pending
            if chunk.pop("_usage_estimated", False):
                usage_estimated = True
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or []:
                text.append(str((choice.get("delta") or {}).get("content") or ""))
            is_usage_only = bool(chunk.get("usage")) and not any(
                (c.get("delta") or {}).get("content") or c.get("finish_reason")
                for c in chunk.get("choices") or []
            )
            if chunk.get("usage") and not wants_usage:
                chunk = {k: v for k, v in chunk.items() if k != "usage"}
            if not (is_usage_only and not wants_usage):
                chunk["model"] = call.group.group_name
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            try:
                pending = await chunks.__anext__()
            except StopAsyncIteration:
                pending = None
        status = UsageStatus.SUCCESS
        yield b"data: [DONE]\n\n"
    except ProviderError as failure:
        status = UsageStatus.ERROR
        error = GatewayError(
            failure.message, code=failure.code, http_status=failure.status
        )
        body = {
            "error": {
                "message": failure.message,
                "type": "api_error",
                "code": failure.code,
                "param": None,
            }
        }
        yield f"data: {json.dumps(body)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    finally:
        await _settle_stream(
            call, target, usage, usage_estimated, "".join(text), status, error
        )
        if status == UsageStatus.SUCCESS and call.cache_key is not None and usage:
            await in_thread(
                response_cache.store,
                call.cache_key,
                _stream_entry(call, target, "".join(text), usage),
                call.key.team.cache_ttl_seconds,
            )


def _stream_entry(
    call: Call, target: Target, text: str, usage: dict[str, Any]
) -> dict[str, Any]:
    """A streamed answer, stored in the cache as a plain completion."""
    counts = {k: int(usage.get(k) or 0) for k in ("prompt_tokens", "completion_tokens")}
    return {
        "body": {
            "id": f"chatcmpl-{call.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": call.group.group_name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {**counts, "total_tokens": sum(counts.values())},
        },
        **counts,
        "deployment": target.deployment_id,
    }


async def _settle_stream(
    call: Call,
    target: Target,
    usage: dict[str, Any],
    usage_estimated: bool,
    text: str,
    status: str,
    error: GatewayError | None,
) -> None:
    if usage:
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
    else:  # the stream ended (or was cut) before any usage came
        prompt, completion = providers.estimate_tokens(target, call.body, text)
    source = (
        UsageSource.ESTIMATED if usage_estimated or not usage else UsageSource.PROVIDER
    )
    # The client may be gone and this task cancelled: shield the write so that
    # what was generated is recorded all the same.
    await asyncio.shield(
        in_thread(
            _record,
            call,
            target=target,
            status=status,
            prompt_tokens=prompt,
            completion_tokens=completion,
            usage_source=source,
            error=error,
            streamed=True,
        )
    )


async def models(request: HttpRequest) -> JsonResponse:
    """GET /v1/models: the groups this key may use, in OpenAI's list shape."""

    def groups() -> list[ModelGroup]:
        return allowed_groups(
            virtual_key_authenticate(plaintext=presented_key(request))
        )

    listed = await in_thread(groups)
    return JsonResponse(
        {
            "object": "list",
            "data": [
                {
                    "id": group.group_name,
                    "object": "model",
                    "created": int(group.created_at.timestamp()),
                    "owned_by": "gateway",
                }
                for group in listed
            ],
        }
    )


# --- /v1/generate (seed 004) ------------------------------------------------------

_GENERATE_RANGES: dict[str, tuple[type, float, float]] = {
    "max_new_tokens": (int, 1, 32_768),
    "temperature": (float, 0, 2),
    "top_p": (float, 0, 1),
    "top_k": (int, 1, 1_000),
}


def generate_body(body: dict[str, Any], default_model: str | None) -> dict[str, Any]:
    """Seed 004's generate request as a chat request; out-of-range → 400 naming it."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise GatewayError("prompt is required", param="prompt")
    chat: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
    for name, (kind, low, high) in _GENERATE_RANGES.items():
        value = body.get(name)
        if value is None:
            continue
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (kind is int and not isinstance(value, int))
        ):
            raise GatewayError(
                f"{name} must be {'an integer' if kind is int else 'a number'}",
                param=name,
            )
        if not low <= value <= high:
            raise GatewayError(
                f"{name} must be between {low:g} and {high:g}", param=name
            )
        chat["max_tokens" if name == "max_new_tokens" else name] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if (
            not isinstance(stops, list)
            or not 1 <= len(stops) <= 4
            or not all(isinstance(s, str) and s for s in stops)
        ):
            raise GatewayError(
                "stop must be a string or a list of 1 to 4 strings", param="stop"
            )
        chat["stop"] = stops
    model = body.get("model") or default_model
    if not model:
        raise GatewayError(
            "model is required: this key may use several model groups", param="model"
        )
    chat["model"] = model
    return chat


async def generate(request: HttpRequest) -> HttpResponseBase:
    """POST /v1/generate → {model, output, cached}."""
    body = _json_body(request)

    def default_model() -> str | None:
        if body.get("model"):
            return None
        groups = allowed_groups(
            virtual_key_authenticate(plaintext=presented_key(request))
        )
        return groups[0].group_name if len(groups) == 1 else None

    chat = generate_body(body, await in_thread(default_model))
    call = await prepare(request, "chat", chat)
    target, completion = await complete(call)
    choice = (completion.body.get("choices") or [{}])[0]
    output = str((choice.get("message") or {}).get("content") or "")
    return _headers(
        JsonResponse(
            {
                "model": call.group.group_name,
                "output": output,
                "cached": call.cached is not None,
            }
        ),
        call,
        target,
    )


# --- jobs (seed 000) -----------------------------------------------------------------

_JOB_CALL_FIELDS = {
    "temperature",
    "max_tokens",
    "response_format",
    "tools",
    "tool_choice",
    "top_p",
    "stop",
}


def job_call_body(body: dict[str, Any]) -> dict[str, Any]:
    """Seed 000's llm-call body as a chat request; purpose and call_metadata
    become the usage record's metadata."""
    chat = {key: value for key, value in body.items() if key in _JOB_CALL_FIELDS}
    chat["model"] = body.get("model")
    chat["messages"] = body.get("messages")
    metadata = body.get("call_metadata") or {}
    if not isinstance(metadata, dict):
        raise GatewayError("call_metadata must be an object", param="call_metadata")
    chat["metadata"] = {
        **metadata,
        **({"purpose": body["purpose"]} if body.get("purpose") else {}),
    }
    return chat


async def job_llm_call(request: HttpRequest, job_id: str) -> HttpResponseBase:
    """POST /api/jobs/{job_id}/llm-call."""
    call = await prepare(request, "chat", job_call_body(_json_body(request)), job_id)
    target, completion = await complete(call)
    choice = (completion.body.get("choices") or [{}])[0]
    return _headers(
        JsonResponse(
            {
                "call_id": call.request_id,
                "response": {
                    "content": (choice.get("message") or {}).get("content"),
                    "finish_reason": choice.get("finish_reason"),
                },
                "metadata": {
                    "tokens_used": completion.prompt_tokens
                    + completion.completion_tokens,
                    "latency_ms": call.latency_ms,
                    "model": call.group.group_name,
                },
            }
        ),
        call,
        target,
    )


async def job_llm_call_stream(request: HttpRequest, job_id: str) -> HttpResponseBase:
    """POST /api/jobs/{job_id}/llm-call-stream: SSE of OpenAI chunks."""
    body = {**job_call_body(_json_body(request)), "stream": True}
    call = await prepare(request, "chat", body, job_id)
    return await _stream(call)
