"""Charts as server-rendered SVG: no JavaScript, no CDN, nothing to download.

Values are integers (counts, tokens, micro-units, basis points) and every
coordinate is computed with integer arithmetic, so money never meets a float.
Labels and names are escaped; the markup is returned as a SafeString ready to
drop into a template. Each point and bar carries its value in ``data-value``
and a ``<title>`` tooltip.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from gateway_project.money import MICROS

# Readable on the admin's light and dark themes alike.
PALETTE = ("#2f7ed8", "#e4572e", "#17a589", "#a05195", "#f0a202", "#5d6d7e")
WIDTH = 720
TICKS = 4
NO_DATA = "No usage in this period"

Formatter = Callable[[int], str]


@dataclass(frozen=True)
class Series:
    """One line of a line chart: a value per label."""

    name: str
    values: Sequence[int]


def _check(values: Sequence[int]) -> None:
    for value in values:
        # bool is an int, and a float has no place near money.
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"chart values must be integers, not {value!r}")


def _decimal_text(value: Decimal, places: int) -> str:
    return f"{value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP):,}"


def format_count(value: int) -> str:
    """1234 → "1,234"; above a million, "1.2M"."""
    if abs(value) >= 1_000_000:
        return _decimal_text(Decimal(value) / 1_000_000, 1) + "M"
    return f"{value:,}"


def format_usd(micros: int) -> str:
    """Micro-USD as dollars: cents from a cent up, all six places below."""
    if abs(micros) >= MICROS // 100:
        return "$" + _decimal_text(Decimal(micros) / MICROS, 2)
    return "$" + _decimal_text(Decimal(micros) / MICROS, 6).rstrip("0").rstrip(".")


def format_credits(micros: int) -> str:
    """Micro-credits as credits, with as many places as they need (up to six)."""
    text = _decimal_text(Decimal(micros) / MICROS, 6)
    return text.rstrip("0").rstrip(".") if "." in text else text


def format_percent(basis_points: int) -> str:
    """Basis points as a percentage: 1250 → "12.5%"."""
    return _decimal_text(Decimal(basis_points) / 100, 1) + "%"


def basis_points(part: int, whole: int) -> int:
    """part / whole in basis points, rounded half up; 0 when whole is 0."""
    if whole <= 0:
        return 0
    return (part * 20_000 + whole) // (whole * 2)


def nice_step(value: int) -> int:
    """The smallest of 1, 2 or 5 times a power of ten that is at least ``value``."""
    step = 1
    while True:
        for multiple in (1, 2, 5):
            if step * multiple >= value:
                return step * multiple
        step *= 10


def axis_top(largest: int) -> int:
    """The top of a value axis with TICKS even, round steps."""
    return TICKS * nice_step(-(-largest // TICKS))


def _svg(
    chart_id: str, kind: str, title: str, height: int, body: SafeString, **data: int
) -> SafeString:
    attributes = format_html_join(
        "", ' data-{}="{}"', ((name.replace("_", "-"), v) for name, v in data.items())
    )
    return format_html(
        '<svg xmlns="http://www.w3.org/2000/svg" class="gateway-chart chart-{}" '
        'id="{}" viewBox="0 0 {} {}" width="100%" role="img" aria-label="{}"{}>'
        "<title>{}</title>{}</svg>",
        kind,
        chart_id,
        WIDTH,
        height,
        title,
        attributes,
        title,
        body,
    )


def _no_data(x: int, y: int) -> SafeString:
    return format_html(
        '<text class="no-data" x="{}" y="{}" text-anchor="middle" '
        'fill="currentColor" opacity="0.6">{}</text>',
        x,
        y,
        NO_DATA,
    )


def line_chart(
    *,
    chart_id: str,
    title: str,
    labels: Sequence[str],
    series: Sequence[Series],
    value_format: Formatter = format_count,
    height: int = 240,
) -> SafeString:
    """Lines over time: one point per label for each series, a legend on top,
    a value axis with round steps on the left, some labels along the bottom."""
    for line in series:
        _check(line.values)
        if len(line.values) != len(labels):
            raise ValueError(f"series {line.name!r} does not have one value a label")
    left, right, top, bottom = 84, 16, 34, 32
    plot_width, plot_height = WIDTH - left - right, height - top - bottom
    largest = max((v for line in series for v in line.values), default=0)
    top_value = axis_top(max(largest, 1))
    count = len(labels)

    def x(index: int) -> int:
        if count == 1:
            return left + plot_width // 2
        return left + index * plot_width // (count - 1)

    def y(value: int) -> int:
        return top + plot_height - value * plot_height // top_value

    parts: list[SafeString] = []
    for tick in range(TICKS + 1):
        value = top_value * tick // TICKS
        parts.append(
            format_html(
                '<line class="grid" x1="{}" x2="{}" y1="{}" y2="{}" '
                'stroke="currentColor" stroke-opacity="0.15"/>'
                '<text class="tick" x="{}" y="{}" text-anchor="end" font-size="13" '
                'fill="currentColor">{}</text>',
                left,
                left + plot_width,
                y(value),
                y(value),
                left - 6,
                y(value) + 4,
                value_format(value),
            )
        )
    shown_every = max(1, -(-count // 6))
    for index, label in enumerate(labels):
        if index % shown_every == 0:
            parts.append(
                format_html(
                    '<text class="label" x="{}" y="{}" text-anchor="middle" '
                    'font-size="13" fill="currentColor">{}</text>',
                    x(index),
                    height - 10,
                    label,
                )
            )
    for number, line in enumerate(series):
        colour = PALETTE[number % len(PALETTE)]
        parts.append(
            format_html(
                '<rect x="{}" y="8" width="12" height="12" fill="{}"/>'
                '<text class="legend" x="{}" y="19" font-size="14" '
                'fill="currentColor">{}</text>',
                left + number * 150,
                colour,
                left + number * 150 + 17,
                line.name,
            )
        )
        points = " ".join(f"{x(i)},{y(v)}" for i, v in enumerate(line.values))
        parts.append(
            format_html(
                '<polyline class="series series-{}" points="{}" fill="none" '
                'stroke="{}" stroke-width="2" stroke-linejoin="round"/>',
                number,
                points,
                colour,
            )
        )
        parts.extend(
            format_html(
                '<circle class="point series-{}" cx="{}" cy="{}" r="{}" fill="{}" '
                'data-value="{}"><title>{}: {} {}</title></circle>',
                number,
                x(index),
                y(value),
                3 if count <= 48 else 2,
                colour,
                value,
                labels[index],
                line.name,
                value_format(value),
            )
            for index, value in enumerate(line.values)
        )
    if largest == 0:
        parts.append(_no_data(left + plot_width // 2, top + plot_height // 2))
    return _svg(
        chart_id,
        "line",
        title,
        height,
        mark_safe("".join(parts)),  # noqa: S308 - every part came from format_html
        points=count,
        max=largest,
    )


def bar_chart(
    *,
    chart_id: str,
    title: str,
    bars: Sequence[tuple[str, int]],
    value_format: Formatter = format_count,
) -> SafeString:
    """Horizontal bars, largest first as given: a label, a bar, its value."""
    _check([value for _, value in bars])
    label_width, value_width, row, top = 190, 110, 30, 8
    bar_width = WIDTH - label_width - value_width
    height = top * 2 + row * max(len(bars), 1)
    largest = max((value for _, value in bars), default=0)
    parts: list[SafeString] = []
    for index, (label, value) in enumerate(bars):
        width = value * bar_width // largest if largest else 0
        if value > 0:
            width = max(width, 1)
        short = label if len(label) <= 28 else label[:27] + "…"
        y = top + index * row
        parts.append(
            format_html(
                '<text class="label" x="{}" y="{}" text-anchor="end" font-size="14" '
                'fill="currentColor">{}</text>'
                '<rect class="bar" x="{}" y="{}" width="{}" height="{}" fill="{}" '
                'data-value="{}"><title>{}: {}</title></rect>'
                '<text class="value" x="{}" y="{}" font-size="14" '
                'fill="currentColor">{}</text>',
                label_width - 8,
                y + 20,
                short,
                label_width,
                y + 4,
                width,
                row - 8,
                PALETTE[0],
                value,
                label,
                value_format(value),
                label_width + width + 6,
                y + 20,
                value_format(value),
            )
        )
    if not bars:
        parts.append(_no_data(WIDTH // 2, top + row // 2 + 4))
    return _svg(
        chart_id,
        "bar",
        title,
        height,
        mark_safe("".join(parts)),  # noqa: S308 - every part came from format_html
        bars=len(bars),
        max=largest,
    )
