"""SVG charts: integer geometry, escaped text, exact figures."""

import re
from decimal import Decimal

import pytest

from gateway_project.charts import (
    NO_DATA,
    Series,
    axis_top,
    bar_chart,
    basis_points,
    format_count,
    format_credits,
    format_percent,
    format_usd,
    line_chart,
    nice_step,
)


def _attributes(svg: str, tag: str, name: str) -> list[str]:
    return re.findall(rf"<{tag}\b[^>]*\b{name}=\"([^\"]*)\"", svg)


@pytest.mark.parametrize(
    ("value", "step"),
    [(0, 1), (1, 1), (2, 2), (3, 5), (5, 5), (6, 10), (11, 20), (21, 50), (501, 1000)],
)
def test_nice_step(value, step):
    assert nice_step(value) == step


@pytest.mark.parametrize(
    ("largest", "top"), [(1, 4), (4, 4), (5, 8), (37, 40), (1234, 2000), (9, 20)]
)
def test_axis_top_is_four_round_steps(largest, top):
    assert axis_top(largest) == top


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "$0"),
        (12, "$0.000012"),
        (5_000, "$0.005"),
        (10_000, "$0.01"),
        (1_234_567, "$1.23"),
        (1_235_000, "$1.24"),
        (1_234_000_000, "$1,234.00"),
    ],
)
def test_format_usd(micros, text):
    assert format_usd(micros) == text


@pytest.mark.parametrize(
    ("micros", "text"),
    [(0, "0"), (1, "0.000001"), (1_500_000, "1.5"), (2_000_000_000, "2,000")],
)
def test_format_credits(micros, text):
    assert format_credits(micros) == text


@pytest.mark.parametrize(
    ("value", "text"), [(0, "0"), (999_999, "999,999"), (1_250_000, "1.3M")]
)
def test_format_count(value, text):
    assert format_count(value) == text


@pytest.mark.parametrize(
    ("part", "whole", "bps", "text"),
    [
        (0, 0, 0, "0.0%"),
        (1, 3, 3333, "33.3%"),
        (2, 3, 6667, "66.7%"),
        (1, 8, 1250, "12.5%"),
    ],
)
def test_basis_points_round_half_up(part, whole, bps, text):
    assert basis_points(part, whole) == bps
    assert format_percent(bps) == text


def test_line_chart_draws_one_point_per_label_at_integer_coordinates():
    svg = line_chart(
        chart_id="chart-requests",
        title="Requests",
        labels=["00:00", "01:00", "02:00"],
        series=[Series("requests", [0, 3, 8]), Series("errors", [0, 1, 0])],
    )

    assert svg.startswith(
        '<svg xmlns="http://www.w3.org/2000/svg" class="gateway-chart chart-line"'
    )
    assert 'id="chart-requests"' in svg
    assert 'data-points="3" data-max="8"' in svg
    assert _attributes(svg, "circle", "data-value") == ["0", "3", "8", "0", "1", "0"]
    # Plot: x from 84 to 704, y from 34 (value 8) to 208 (value 0); axis top 8.
    assert _attributes(svg, "polyline", "points") == [
        "84,208 394,143 704,34",
        "84,208 394,187 704,208",
    ]
    assert re.findall(r'class="tick"[^>]*>([^<]*)<', svg) == ["0", "2", "4", "6", "8"]
    assert "<title>01:00: requests 3</title>" in svg
    assert NO_DATA not in svg


def test_line_chart_without_usage_says_so():
    svg = line_chart(
        chart_id="c", title="Cost", labels=["a", "b"], series=[Series("cost", [0, 0])]
    )

    assert 'data-max="0"' in svg
    assert NO_DATA in svg


def test_line_chart_escapes_names_and_labels():
    svg = line_chart(
        chart_id="c",
        title='<b>"T"</b>',
        labels=["<x>"],
        series=[Series("<script>alert(1)</script>", [1])],
    )

    assert "<script>" not in svg
    assert "<b>" not in svg
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in svg
    assert 'aria-label="&lt;b&gt;&quot;T&quot;&lt;/b&gt;"' in svg
    assert "<title>&lt;x&gt;: &lt;script&gt;" in svg


@pytest.mark.parametrize("value", [1.5, Decimal("1.5"), True])
def test_charts_refuse_anything_but_integers(value):
    with pytest.raises(TypeError):
        line_chart(chart_id="c", title="t", labels=["a"], series=[Series("s", [value])])
    with pytest.raises(TypeError):
        bar_chart(chart_id="c", title="t", bars=[("a", value)])


def test_line_chart_needs_a_value_per_label():
    with pytest.raises(ValueError, match="one value a label"):
        line_chart(
            chart_id="c", title="t", labels=["a", "b"], series=[Series("s", [1])]
        )


def test_bar_chart_scales_bars_to_the_largest():
    svg = bar_chart(
        chart_id="chart-top-teams",
        title="Top teams",
        bars=[("team_alice", 3_000_000), ("team_bob", 1_000_000), ("idle", 0)],
        value_format=format_usd,
    )

    assert 'data-bars="3" data-max="3000000"' in svg
    assert _attributes(svg, "rect", "data-value") == ["3000000", "1000000", "0"]
    assert _attributes(svg, "rect", "width") == ["420", "140", "0"]
    assert "<title>team_alice: $3.00</title>" in svg
    assert NO_DATA not in svg


def test_bar_chart_shortens_long_labels_but_keeps_them_in_the_tooltip():
    label = "a-very-long-team-identifier-of-forty-chars"
    svg = bar_chart(chart_id="c", title="t", bars=[(label, 1)])

    assert ">a-very-long-team-identifier…<" in svg
    assert f"<title>{label}: 1</title>" in svg


def test_bar_chart_without_rows_says_so():
    svg = bar_chart(chart_id="c", title="t", bars=[])

    assert 'data-bars="0" data-max="0"' in svg
    assert NO_DATA in svg
