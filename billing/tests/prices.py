"""Operator prices for the models the tests call (the fake upstream's models
are in no price map, and an unpriced model is never routed to)."""

from datetime import UTC, datetime
from decimal import Decimal

from billing.models import ModelPrice, PriceSource
from gateway_project.generations import routing_changed
from gateway_project.money import to_micros

SINCE = datetime(2020, 1, 1, tzinfo=UTC)


def price(model: str, input_usd: str = "1.00", output_usd: str = "2.00") -> ModelPrice:
    """Price ``model`` at the given USD per million tokens, in force since 2020."""
    row, _ = ModelPrice.objects.update_or_create(
        model=model,
        effective_from=SINCE,
        defaults={
            "input_price_per_million_micros": to_micros(Decimal(input_usd)),
            "output_price_per_million_micros": to_micros(Decimal(output_usd)),
            "source": PriceSource.OPERATOR,
        },
    )
    routing_changed()
    return row
