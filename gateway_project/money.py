"""Money arithmetic. No floats anywhere.

Amounts are integers of micro-units: 1 USD = 1_000_000 micro-USD and
1 credit = 1_000_000 micro-credits. Conversions from ``Decimal`` round half up
to the nearest micro-unit — the one rounding rule of the gateway.
"""

from decimal import ROUND_HALF_UP, Decimal

MICROS = 1_000_000


def to_micros(amount: Decimal | int | str) -> int:
    """Decimal units → integer micro-units, rounding half up."""
    if isinstance(amount, float):
        raise TypeError("money must not be a float")
    value = Decimal(amount) * MICROS
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def from_micros(micros: int) -> Decimal:
    """Integer micro-units → Decimal units with six places."""
    return (Decimal(micros) / MICROS).quantize(Decimal("0.000001"))


def credits_json(micros: int) -> int | float:
    """An amount for a JSON body: an integer when whole, else a number with at
    most six decimals. The float is only the JSON encoder's vehicle: any amount
    below 10**9 round-trips to the same decimal text; arithmetic never sees it."""
    if micros % MICROS == 0:
        return micros // MICROS
    return float(from_micros(micros))
