"""Generation counters in the shared cache: a write bumps one after commit,
and every process drops what it cached under an older value at once.

The routing generation covers model groups, their members, deployments,
provider credentials and prices, which the request path keeps in memory
(routing/inference/route.py); a process also reloads them every
GATEWAY_ROUTE_CACHE_SECONDS, so a change made without a bump (a raw SQL
update) is picked up too.
"""

import logging

from django.db import transaction

from gateway_project.cache import cache

logger = logging.getLogger(__name__)

ROUTING = "routing:generation"


def generation_bump(name: str) -> None:
    try:
        cache.add(name, 0, timeout=None)
        cache.incr(name)
    except Exception as error:  # Redis down: the reload period bounds staleness
        logger.warning("generation %s not bumped: %s", name, error)


def generation_changed(name: str) -> None:
    """Call inside or after a write: bumps now (the writing transaction sees
    its change) and again after commit, the bump that matters (a process may
    reload the old rows in between)."""
    generation_bump(name)
    transaction.on_commit(lambda: generation_bump(name))


def routing_changed() -> None:
    """After a write to routing configuration or prices."""
    generation_changed(ROUTING)
