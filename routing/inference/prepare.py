"""Steps 1 to 5 in one trip to a worker thread: authenticate the key,
validate the body, resolve the model group, admit (limits, then budgets,
quotas and credits) and look in the response cache.

A known key and route go the short way (``_prepare_known``): one Redis round
trip proves both current and admits the call. Anything else reads afresh.
"""

import time
import uuid
from typing import Any

from django.conf import settings
from django.http import HttpRequest

from billing.models import JOB_CLOSED_STATUSES, Job
from gateway_project.cache import cache, cache_names
from gateway_project.errors import GatewayError, NotFound
from gateway_project.generations import ROUTING
from gateway_project.threads import in_thread_or_undo
from routing import limits, response_cache
from routing.inference import admit, settle
from routing.inference.call import Call, ModelNotAllowed, ModelNotFound
from routing.inference.parse import validate
from routing.inference.route import (
    Route,
    cooldown_key,
    ordered,
    route_for,
    route_kept,
    route_names,
)
from routing.models import ModelGroup
from tenants.authentication import (
    presented_key,
    virtual_key_authenticate,
    virtual_key_cache_names,
    virtual_key_check,
    virtual_key_recall,
)
from tenants.key_cache import key_allowed_group_ids
from tenants.models import VirtualKey


async def prepare(
    request: HttpRequest, endpoint: str, body: dict[str, Any], job_id: str | None = None
) -> Call:
    """A call admitted, held and ready for its provider. A client that leaves
    meanwhile cannot strand what the worker thread took: once it is done, the
    call is settled as disconnected (its limits and hold given back)."""
    return await in_thread_or_undo(
        _prepared, settle.abandoned, request, endpoint, body, job_id
    )


def _prepared(
    request: HttpRequest, endpoint: str, body: dict[str, Any], job_id: str | None
) -> Call:
    job_id = job_id or request.headers.get("X-Job-Id")
    call = _prepare_known(request, endpoint, body, job_id)
    if call is None:
        call = _prepare(request, endpoint, body, job_id)
        admit.admit(call)
    cache_wanted = response_cache.wanted(request, body, call.key.team)
    try:
        # A cached answer's hold is written first; a stream's may be written
        # while its first chunk is on the way (entry.stream).
        admit.hold(call, deferrable=not cache_wanted)
    except BaseException:
        # Refused (402), or the database out of reach (503): nothing was
        # written, and the limits taken are given back at once.
        limits.release(call.admission, actual_tokens=0)
        call.settled = True
        raise
    if cache_wanted:
        # Step 5: the team's response cache.
        call.cache_key = response_cache.key_for(
            call.key.team, call.group.group_name, endpoint, body
        )
        call.cached = response_cache.lookup(call.cache_key)
    return call


def _prepare(
    request: HttpRequest, endpoint: str, body: dict[str, Any], job_id: str | None
) -> Call:
    """Authenticate, validate and resolve, reading the key's cache entry and
    the route's in one round trip."""
    plaintext = presented_key(request)
    kept = route_kept(body.get("model"))
    found = cache.get_many([*virtual_key_cache_names(plaintext), *route_names(kept)])
    key = virtual_key_authenticate(plaintext=plaintext, prefetched=found)
    validate(endpoint, body)
    route, cooling = route_for(body["model"], kept, found)
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
    job = _job_for(job_id, key)
    call = _call(request, key, endpoint, group, route, body, job)
    call.cooled = {
        t.deployment_id
        for t in call.targets
        if cooling.get(cooldown_key(t.deployment_id))
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
    targets = ordered(route.members)
    prices = {
        t.deployment_id: price
        for t in targets
        if (price := route.prices.get(t.deployment_id)) is not None
    }
    return Call(
        request_id=request.request_id,  # type: ignore[attr-defined]
        client_request_id=getattr(request, "client_request_id", ""),
        key=key,
        endpoint=endpoint,
        group=group,
        targets=targets,
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
    if not settings.REDIS_URL or job_id:
        return None  # nothing to prove against, or a job to read
    plaintext = presented_key(request)
    recalled = virtual_key_recall(plaintext)
    route = route_kept(body.get("model"))
    if (
        recalled is None
        or plaintext is None
        or route is None
        or route.group is None
        or not route.current(time.monotonic())
    ):
        return None
    key, expected, entry = recalled
    try:
        virtual_key_check(key=key, plaintext=plaintext)
        validate(endpoint, body)
    except GatewayError:
        return None
    if route.group.pk not in key_allowed_group_ids(key):
        return None
    request.gateway_model_group = route.group.group_name  # type: ignore[attr-defined]
    call = _call(request, key, endpoint, route.group, route, body, job=None)
    most = admit.estimate(call)
    routing, *cooldowns = cache_names(
        ROUTING, *(cooldown_key(t.deployment_id) for t in call.targets)
    )
    try:
        call.admission, cooling = limits.acquire_when_current(
            admit.scopes(key),
            estimate=most.tokens,
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
    if job.status in JOB_CLOSED_STATUSES:
        raise GatewayError(
            f"Job is already {job.status}", code="job_closed", http_status=409
        )
    return job
