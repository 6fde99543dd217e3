"""Step 2's second half and the routing of step 6: a model group as the
request path needs it (its deployments, in priority and weight order, with
their prices), kept in memory per process, and the cooldowns every gateway
process shares through Redis."""

import random
import time
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from django.conf import settings
from django.utils import timezone

from billing.selectors import model_price_at
from billing.settlement import Price
from gateway_project.cache import cache
from gateway_project.generations import ROUTING
from routing import providers
from routing.models import DeploymentStatus, ModelGroup, ModelGroupStatus
from routing.providers import ProviderError, Target
from tenants.key_cache import key_allowed_group_ids
from tenants.models import VirtualKey


@dataclass(frozen=True)
class Member:
    priority: int
    weight: int
    target: Target


@dataclass(frozen=True)
class Route:
    """A model group's active members as targets, and the price of each in
    force when loaded (None: no price known, never routed to)."""

    group: ModelGroup | None
    members: list[Member]
    prices: dict[int, Price | None]
    generation: int
    loaded: float  # time.monotonic()

    def current(self, now: float) -> bool:
        return now - self.loaded < settings.GATEWAY_ROUTE_CACHE_SECONDS


_routes: dict[str, Route] = {}
_ROUTES_KEPT = 1000  # names, known or not; past that the memory starts over


def routes_forget() -> None:
    """Drop every route this process keeps (tests, after a flush)."""
    _routes.clear()


def route_kept(name: Any) -> Route | None:
    return _routes.get(name) if isinstance(name, str) else None


def route_names(route: Route | None) -> list[str]:
    """The cache entries that tell whether a kept route is current and which
    of its deployments cool down, read in the call's one round trip."""
    members = route.members if route else []
    return [ROUTING, *(cooldown_key(m.target.deployment_id) for m in members)]


def route_for(
    name: str, route: Route | None, found: dict[str, Any]
) -> tuple[Route, dict[str, Any]]:
    """The route of a group name and the cooldowns of its deployments. With
    ``route`` and ``found`` read by the caller nothing more is read while the
    kept route is current: its generation matches and it is younger than
    GATEWAY_ROUTE_CACHE_SECONDS."""
    generation = found.get(ROUTING, 0)
    now = time.monotonic()
    if route is None or route.generation != generation or not route.current(now):
        route = _route_load(name, generation, now)
        if len(_routes) >= _ROUTES_KEPT:
            _routes.clear()
        _routes[name] = route
        found = cache.get_many(
            [cooldown_key(m.target.deployment_id) for m in route.members]
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
        prices={m.target.deployment_id: price_of(m.target.model, at) for m in members},
        generation=generation,
        loaded=now,
    )


def price_of(model: str, at: datetime) -> Price | None:
    """The operator's price in force, else litellm's map, else the operator's
    fallback price, else None (unknown: never routed to, never free)."""
    price = model_price_at(model=model, at=at)
    if price is not None:
        return Price(
            price.input_price_per_million_micros,
            price.output_price_per_million_micros,
        )
    known = providers.catalog_model(model) or providers.catalog_model(
        model.split("/", 1)[-1]
    )
    if known is not None and known.input_cost_per_token is not None:
        return Price(
            _per_million(known.input_cost_per_token),
            _per_million(known.output_cost_per_token or Decimal(0)),
        )
    fallback: tuple[int, int] | None = settings.GATEWAY_FALLBACK_PRICE
    return Price(*fallback) if fallback is not None else None


def _per_million(per_token: Decimal) -> int:
    micros = per_token * Decimal(1_000_000_000_000)
    return int(micros.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def ordered(members: list[Member]) -> list[Target]:
    """Targets by priority; within one priority a weighted random order, so
    that load spreads across equals."""
    targets: list[Target] = []
    for priority in sorted({member.priority for member in members}):
        tier = [member for member in members if member.priority == priority]
        while tier:
            chosen = random.choices(tier, weights=[m.weight for m in tier])[0]  # noqa: S311 - load spreading
            targets.append(chosen.target)
            tier.remove(chosen)
    return targets


def allowed_groups(key: VirtualKey) -> list[ModelGroup]:
    """The active groups a key may use: its own list if it has one, else its team's."""
    return list(
        ModelGroup.objects.filter(
            pk__in=key_allowed_group_ids(key), status=ModelGroupStatus.ACTIVE
        ).order_by("group_name")
    )


def cooldown_key(deployment_id: int) -> str:
    return f"cooldown:deployment:{deployment_id}"


def failure_record(deployment_id: int, error: ProviderError) -> None:
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
            cooldown_key(deployment_id), 1, timeout=settings.GATEWAY_COOLDOWN_SECONDS
        )
