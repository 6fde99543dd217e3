"""One call on its way through the request path: what it asked, where it
may go, and what it has taken (limits, hold, budgets) that its settlement
gives back."""

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from billing.models import Job
from billing.settlement import Price
from gateway_project.errors import GatewayError
from routing import limits
from routing.models import ModelGroup
from routing.providers import Target
from tenants.models import VirtualKey


class ModelNotFound(GatewayError):
    http_status = 404
    code = "model_not_found"


class ModelNotAllowed(GatewayError):
    http_status = 403
    code = "model_not_allowed"


def client_disconnected() -> GatewayError:
    """The outcome of a call whose client left before its answer."""
    return GatewayError(
        "The client closed the connection before the answer",
        code="client_disconnected",
        http_status=499,
    )


@dataclass(frozen=True)
class Estimate:
    """The most a call may use: its prompt as counted, and ``choices`` times
    the largest output the request allows."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Call:
    """``request_id`` is the server's: it keys the call's hold, capture,
    release and usage record. The client's ``X-Request-Id`` is only
    ``client_request_id``, kept on the record."""

    request_id: str
    client_request_id: str
    key: VirtualKey
    endpoint: str
    group: ModelGroup
    targets: list[Target]
    body: dict[str, Any]
    job: Job | None = None
    prices: dict[int, Price] = field(default_factory=dict)
    cooled: set[int] = field(default_factory=set)
    estimate: Estimate | None = None
    # The call's hold: written before the provider (held), or left to be
    # written with the settlement (unheld), or being written by a stream
    # while the provider opens it (holding).
    held_micros: int = 0
    unheld_micros: int | None = None
    holding: "asyncio.Future[None] | None" = None
    budget_reserved_micros: int | None = None
    cache_key: str | None = None
    cached: dict[str, Any] | None = None
    # The key's, team's and organization's limits, given back by the
    # settlement.
    admission: limits.Admission | None = None
    started: float = field(default_factory=time.monotonic)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    settled: bool = False
    # A stream's progress is in the settlement journal (relay.py).
    journaled: bool = False

    @property
    def streamed(self) -> bool:
        return self.endpoint == "chat" and self.body.get("stream") is True

    @property
    def estimated_tokens(self) -> int:
        return self.estimate.tokens if self.estimate else 0

    @property
    def latency_ms(self) -> int:
        return int((time.monotonic() - self.started) * 1000)

    @property
    def wants_usage(self) -> bool:
        """Whether a streaming client asked for the usage chunk."""
        options = self.body.get("stream_options") or {}
        return bool(options.get("include_usage"))
