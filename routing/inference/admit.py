"""Steps 3 and 4: limits, then budgets, quotas and credits, before any
provider is called. What is taken here is on the call (``Call.admission``,
``held_micros``, ``budget_reserved_micros``) and given back by its one
settlement (settle.py)."""

import json
from functools import partial
from typing import Any

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from billing.budgets import budgets_apply, budgets_reserve
from billing.services import credits_hold, credits_hold_may_wait
from billing.settlement import Price, Usage, call_charge_micros, usage_cost_micros
from gateway_project.errors import GatewayError
from routing import limits, providers
from routing.inference.call import Call, Estimate
from tenants.models import VirtualKey

# What a request sends upstream beside its messages' text, counted as the
# JSON it is (a little over what a provider bills for it: the hold errs high).
_STRUCTURED = ("tools", "functions", "tool_choice", "response_format", "prediction")
# Tokens held for each image, audio clip or file a message carries: above
# what a provider bills for one high-detail image.
MEDIA_TOKENS = 2_000
_MEDIA = {"image_url", "image", "input_image", "input_audio", "audio", "file"}


def estimate(call: Call) -> Estimate:
    """The most a call may use: the prompt counted (its messages' text, and
    whatever else goes upstream: tools, schemas, structured contents, an
    allowance per media part), plus, per prompt, ``choices`` times the
    largest of ``max_tokens`` and ``max_completion_tokens``. A caller that
    gives neither gets the cap GATEWAY_DEFAULT_MAX_TOKENS, sent upstream as
    ``max_tokens``, so that no answer can outgrow the estimate. Counted once
    per call: the limits and the hold share it."""
    if call.estimate is not None:
        return call.estimate
    body = call.body
    completion = 0
    if call.endpoint != "embedding":
        caps = [
            value
            for name in ("max_tokens", "max_completion_tokens")
            if isinstance(value := body.get(name), int)
        ]
        if caps:
            cap = max(caps)
        else:
            cap = settings.GATEWAY_DEFAULT_MAX_TOKENS
            body["max_tokens"] = cap
        choices = body.get("n") or 1
        if call.endpoint == "completion":
            # Completions generate best_of candidates and bill them all, for
            # each prompt of a list.
            choices = max(choices, body.get("best_of") or 1) * _prompts(body)
        completion = choices * cap
    target = next((t for t in call.targets if t.deployment_id in call.prices), None)
    prompt = 0
    if target is not None:
        prompt = providers.estimate_tokens(target, body, "")[0]
        uncounted, media = _beside_the_text(body)
        if uncounted:
            prompt += providers.text_tokens(target, json.dumps(uncounted))
        prompt += media * MEDIA_TOKENS
    call.estimate = Estimate(prompt, completion)
    return call.estimate


def _prompts(body: dict[str, Any]) -> int:
    """How many prompts a completion request holds: a list of strings or of
    token lists is one each; a string or one token list is one."""
    given = body.get("prompt")
    if isinstance(given, list) and given and not isinstance(given[0], int):
        return len(given)
    return 1


def _beside_the_text(body: dict[str, Any]) -> tuple[list[Any], int]:
    """What goes upstream that a count of the messages' text misses, and how
    many media parts the messages carry."""
    uncounted: list[Any] = [body[name] for name in _STRUCTURED if name in body]
    media = 0
    for message in body.get("messages") or []:
        for name, value in message.items():
            if name in ("role", "name") or (
                name == "content" and isinstance(value, str)
            ):
                continue
            uncounted.append(value)
            if name == "content" and isinstance(value, list):
                media += sum(
                    1
                    for part in value
                    if isinstance(part, dict) and part.get("type") in _MEDIA
                )
    return uncounted, media


def scopes(key: VirtualKey) -> list[limits.Scope]:
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


def admit(call: Call) -> None:
    """Step 3: RPM, TPM and concurrency of the key, its team and its
    organization, in one round trip. Raises RateLimited (429)."""
    call.admission = limits.acquire(scopes(call.key), estimate=estimate(call).tokens)


def dearest(call: Call) -> Price | None:
    """The highest price of each token class among the deployments the call
    may reach: whichever serves it, its charge fits in a hold at this price."""
    prices = [
        call.prices[t.deployment_id]
        for t in call.targets
        if t.deployment_id in call.prices
    ]
    if not prices:
        return None
    return Price(
        max(p.input_per_million for p in prices),
        max(p.output_per_million for p in prices),
    )


def hold_amounts(call: Call) -> tuple[int, int] | None:
    """(cost in micro-USD, charge in micro-credits) of the most the call may
    use at the dearest price; None when no deployment has a price."""
    price = dearest(call)
    if price is None:
        return None
    most = estimate(call)
    team = call.key.team
    cost = usage_cost_micros(
        Usage(most.prompt_tokens, most.completion_tokens), price, team.price_markup_bps
    )
    charge = call_charge_micros(
        team=team,
        cost_micros=cost,
        tokens=most.tokens,
        succeeded=True,
        in_job=call.job is not None,
    )
    return cost, charge


def hold(call: Call, *, deferrable: bool = False) -> None:
    """Step 4: reserve the most the call can cost before any provider is
    called. Raises InsufficientCredits, BudgetExceeded or QuotaExhausted
    (402); nothing is written then.

    ``deferrable``: when the team's credits, as this process last saw them,
    cover the hold GATEWAY_DEFERRED_HOLD_MARGIN times over, the hold is left
    to ``call.unheld_micros``. A call answered at once writes it with its
    settlement, in the same statement and under the same guard; a stream
    writes it while the provider opens the stream, and its first chunk waits
    for it (``hold_unheld``). If the credits no longer cover it then, the
    answer is a 402 and nothing is written."""
    amounts = hold_amounts(call)
    if amounts is None:
        return  # routing will answer 503; nothing to hold
    cost, amount = amounts
    key = call.key
    budgeted = budgets_apply(key)
    if (
        deferrable
        and call.job is None
        and not budgeted
        and credits_hold_may_wait(
            team=key.team,
            amount_micros=amount,
            margin=settings.GATEWAY_DEFERRED_HOLD_MARGIN,
        )
    ):
        call.unheld_micros = amount
        return
    credits = partial(
        credits_hold,
        team=key.team,
        amount_micros=amount,
        request_id=call.request_id,
        job=call.job,
    )
    if not budgeted:
        call.held_micros = credits()  # one short transaction of its own
        return
    # Budgets, quotas and credits together: a 402 from any leaves nothing.
    with transaction.atomic():
        if budgets_reserve(key=key, cost_micros=cost, now=timezone.now()):
            call.budget_reserved_micros = cost
        call.held_micros = credits()


def hold_unheld(call: Call) -> None:
    """Write the hold ``hold`` left to a stream. Raises InsufficientCredits."""
    amount, call.unheld_micros = call.unheld_micros, None
    if amount is not None:
        call.held_micros = credits_hold(
            team=call.key.team, amount_micros=amount, request_id=call.request_id
        )


def refuse(call: Call, error: GatewayError) -> None:
    """A refusal after step 3: the limits taken are given back at once (the
    refusal itself writes nothing)."""
    limits.release(call.admission, actual_tokens=0)
    call.settled = True
    raise error
