"""Charts as server-rendered SVG: pure functions from numbers to markup (no JavaScript, no network).

`chart_series` turns the rows of `proxy.storage.browse.chart_rows` into series; the `*_svg`
functions draw them. Every label is escaped; the result is `markupsafe.Markup`, safe to insert.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from markupsafe import Markup, escape

from proxy.storage.browse import ChartRows

WINDOWS: dict[str, tuple[dt.timedelta, int]] = {
    "24h": (dt.timedelta(hours=24), 13),
    "7d": (dt.timedelta(days=7), 13),
    "30d": (dt.timedelta(days=30), 10),
}
"""Window name -> (length, bucket size as characters of the ISO timestamp: 13 hour, 10 day)."""

ROUTE_COLORS = {"student": "#4c78a8", "teacher": "#f58518", "shadow": "#54a24b"}
OTHER_COLORS = ("#72b7b2", "#b279a2", "#9d755d", "#bab0ac", "#eeca3b")
LINE_COLORS = {"p50": "#4c78a8", "p90": "#f58518", "p99": "#e45756", "ttft p50": "#54a24b"}

WIDTH, HEIGHT = 720, 240
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 40


def window_start(window: str, now: dt.datetime | None = None) -> tuple[str, int]:
    """(since_utc, bucket_chars) for a window name of WINDOWS; raises KeyError for others."""
    length, bucket_chars = WINDOWS[window]
    now = now or dt.datetime.now(dt.UTC)
    start = now - length
    if bucket_chars == 13:
        start = start.replace(minute=0, second=0, microsecond=0) + dt.timedelta(hours=1)
    else:
        start = start.replace(hour=0, minute=0, second=0, microsecond=0) + dt.timedelta(days=1)
    return start.isoformat(timespec="milliseconds"), bucket_chars


def bucket_labels(since_utc: str, bucket_chars: int, now: dt.datetime | None = None) -> list[str]:
    """Every bucket key from `since_utc` to now, so empty hours or days show as zero."""
    now = now or dt.datetime.now(dt.UTC)
    step = dt.timedelta(hours=1) if bucket_chars == 13 else dt.timedelta(days=1)
    current = dt.datetime.fromisoformat(since_utc)
    keys: list[str] = []
    while current <= now and len(keys) < 2000:
        keys.append(current.isoformat()[:bucket_chars])
        current += step
    return keys


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def tool_names(response_json: str) -> list[str]:
    """Names of the tool calls in a stored `chat.completion` body (all choices)."""
    try:
        body = json.loads(response_json)
    except ValueError:
        return []
    names: list[str] = []
    choices = body.get("choices") if isinstance(body, dict) else None
    for choice in choices if isinstance(choices, list) else []:
        message = choice.get("message") if isinstance(choice, dict) else None
        for call in (message or {}).get("tool_calls") or []:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and function.get("name"):
                names.append(str(function["name"]))
    return names


def chart_series(rows: ChartRows, buckets: list[str]) -> dict[str, Any]:
    """Series for the charts page and `GET /api/charts`.

    Keys: `buckets`; `exchanges_by_route` {route: [count per bucket]}; `teacher_share` [percent
    per bucket, None when no exchanges]; `latency_ms` {"p50"|"p90"|"p99"|"ttft p50": [ms per
    bucket]}; `tool_calls` [(name, count)] most frequent first (top 20); `tokens_by_model`
    [(model, prompt, completion)]; `totals`; `window_exchanges`; `teacher_share_total`.
    """
    index = {key: i for i, key in enumerate(buckets)}
    by_route: dict[str, list[float]] = {}
    for bucket, route, count in rows.by_bucket_route:
        if bucket in index:
            by_route.setdefault(route, [0.0] * len(buckets))[index[bucket]] += count
    totals = [sum(series[i] for series in by_route.values()) for i in range(len(buckets))]
    teacher = by_route.get("teacher", [0.0] * len(buckets))
    share = [100 * teacher[i] / totals[i] if totals[i] else None for i in range(len(buckets))]
    durations: list[list[float]] = [[] for _ in buckets]
    ttfts: list[list[float]] = [[] for _ in buckets]
    for bucket, duration_ms, ttft_ms in rows.latencies:
        if bucket not in index:
            continue
        if duration_ms is not None:
            durations[index[bucket]].append(float(duration_ms))
        if ttft_ms is not None:
            ttfts[index[bucket]].append(float(ttft_ms))
    latency = {
        "p50": [percentile(v, 50) for v in durations],
        "p90": [percentile(v, 90) for v in durations],
        "p99": [percentile(v, 99) for v in durations],
        "ttft p50": [percentile(v, 50) for v in ttfts],
    }
    calls: Counter[str] = Counter()
    for body in rows.tool_responses:
        calls.update(tool_names(body))
    window_total = sum(totals)
    return {
        "buckets": buckets,
        "exchanges_by_route": dict(sorted(by_route.items(), key=lambda kv: _route_order(kv[0]))),
        "teacher_share": share,
        "teacher_share_total": 100 * sum(teacher) / window_total if window_total else None,
        "latency_ms": latency,
        "tool_calls": calls.most_common(20),
        "tokens_by_model": sorted(
            [(m, p, c) for m, p, c, _ in rows.tokens_by_model], key=lambda r: -(r[1] + r[2])
        )[:20],
        "totals": rows.totals,
        "window_exchanges": int(window_total),
        "latency_samples": len(rows.latencies),
        "tool_call_samples": len(rows.tool_responses),
    }


def _route_order(route: str) -> tuple[int, str]:
    order = list(ROUTE_COLORS)
    return (order.index(route) if route in order else len(order), route)


def route_color(route: str, position: int = 0) -> str:
    """The color a route is drawn in (student blue, teacher orange, shadow green)."""
    return ROUTE_COLORS.get(route) or OTHER_COLORS[position % len(OTHER_COLORS)]


# -- drawing -----------------------------------------------------------------------------------


def nice_max(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten that is >= value (1 for value <= 0)."""
    if value <= 0:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for factor in (1, 2, 5, 10):
        if factor * power >= value:
            return float(factor * power)
    return float(10 * power)


def axis_top(value: float, ticks: int = 4) -> float:
    """The top of a y axis with `ticks` equal steps, each a nice number (1, 2 or 5 x 10^k)."""
    return nice_max(value / ticks) * ticks


def fmt_number(value: float) -> str:
    """Short axis labels: 950, 1.2k, 3.4M; whole numbers without decimals."""
    magnitude = abs(value)
    if magnitude >= 1_000_000:
        return f"{value / 1_000_000:.1f}M".replace(".0M", "M")
    if magnitude >= 10_000:
        return f"{value / 1000:.0f}k"
    if magnitude >= 1000:
        return f"{value / 1000:.1f}k".replace(".0k", "k")
    if value == int(value):
        return str(int(value))
    return f"{value:.1f}"


def fmt_ms_tick(value: float) -> str:
    """Axis labels for milliseconds: 250 ms, 1 s, 1.5 s."""
    if value >= 1000:
        return f"{value / 1000:g} s"
    return f"{value:g} ms"


def _bucket_label(key: str) -> str:
    if len(key) >= 13:
        return f"{key[5:10]} {key[11:13]}h"
    return key[5:10]


def _svg(body: list[str], label: str, height: int = HEIGHT) -> Markup:
    return Markup(
        f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">'
        + "".join(body)
        + "</svg>"
    )


def _label(value: float, unit: str) -> str:
    return fmt_ms_tick(value) if unit == " ms" else fmt_number(value) + unit


def _y_axis(top_value: float, unit: str) -> list[str]:
    plot_h = HEIGHT - TOP - BOTTOM
    out = []
    for i in range(5):
        value = top_value * i / 4
        y = TOP + plot_h - plot_h * i / 4
        out.append(
            f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(_label(value, unit))}</text>"
        )
    return out


def _x_labels(buckets: Sequence[str], slot: float) -> list[str]:
    out = []
    every = max(1, math.ceil(len(buckets) / 8))
    for i, key in enumerate(buckets):
        if i % every:
            continue
        x = LEFT + slot * (i + 0.5)
        out.append(
            f'<text class="tick" x="{x:.1f}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">'
            f"{escape(_bucket_label(key))}</text>"
        )
    return out


def _empty(label: str) -> Markup:
    return _svg(
        [
            f'<text class="empty" x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">'
            "no data in this window</text>"
        ],
        label,
    )


def stacked_bars_svg(
    buckets: Sequence[str], series: dict[str, list[float]], *, label: str, unit: str = ""
) -> Markup:
    """Bars per bucket, one stacked segment per series (e.g. exchanges per hour by route)."""
    if not buckets or not any(any(v) for v in series.values()):
        return _empty(label)
    totals = [sum(s[i] for s in series.values()) for i in range(len(buckets))]
    top_value = axis_top(max(totals))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / len(buckets)
    bar_w = max(1.0, slot * 0.8)
    body = _y_axis(top_value, unit)
    for position, (name, values) in enumerate(series.items()):
        color = route_color(name, position)
        for i, value in enumerate(values):
            if not value:
                continue
            below = sum(list(series.values())[k][i] for k in range(position))
            height = plot_h * value / top_value
            y = TOP + plot_h - plot_h * (below + value) / top_value
            x = LEFT + slot * i + (slot - bar_w) / 2
            body.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w:.1f}" height="{height:.1f}" '
                f'fill="{color}"><title>{escape(_bucket_label(buckets[i]))} '
                f"{escape(name)}: {escape(fmt_number(value))}</title></rect>"
            )
    body += _x_labels(buckets, slot)
    body.append(
        f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}" y2="{TOP + plot_h}"/>'
    )
    return _svg(body, label)


def lines_svg(
    buckets: Sequence[str],
    series: dict[str, list[float | None]],
    *,
    label: str,
    unit: str = "",
    top: float | None = None,
) -> Markup:
    """One line per series over the buckets; None values leave gaps. `top` fixes the y range."""
    values = [v for s in series.values() for v in s if v is not None]
    if not buckets or not values:
        return _empty(label)
    top_value = top or axis_top(max(values))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / len(buckets)
    body = _y_axis(top_value, unit)
    for position, (name, points) in enumerate(series.items()):
        color = LINE_COLORS.get(name) or OTHER_COLORS[position % len(OTHER_COLORS)]
        segment: list[str] = []
        segments: list[list[str]] = []
        for i, value in enumerate(points):
            if value is None:
                if segment:
                    segments.append(segment)
                segment = []
                continue
            x = LEFT + slot * (i + 0.5)
            y = TOP + plot_h - plot_h * min(value, top_value) / top_value
            segment.append(f"{x:.1f},{y:.1f}")
            body.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"><title>'
                f"{escape(_bucket_label(buckets[i]))} {escape(name)}: "
                f"{escape(_label(value, unit))}</title></circle>"
            )
        if segment:
            segments.append(segment)
        for points_text in segments:
            if len(points_text) > 1:
                body.append(
                    f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                    f'points="{" ".join(points_text)}"/>'
                )
    body += _x_labels(buckets, slot)
    body.append(
        f'<line class="axis" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{TOP + plot_h}" y2="{TOP + plot_h}"/>'
    )
    return _svg(body, label)


def hbars_svg(
    items: Sequence[tuple[str, Sequence[float]]],
    *,
    label: str,
    parts: Sequence[str] = ("count",),
    colors: Sequence[str] = ("#4c78a8", "#f58518"),
) -> Markup:
    """Horizontal bars, one row per item, each split into `parts` (e.g. prompt / completion)."""
    if not items:
        return _empty(label)
    row_h = 22
    height = TOP + row_h * len(items) + 24
    label_w = 180
    plot_w = WIDTH - label_w - RIGHT - 60
    top_value = nice_max(max(sum(values) for _, values in items))
    body: list[str] = []
    for row, (name, values) in enumerate(items):
        y = TOP + row * row_h
        shown = name if len(name) <= 26 else name[:25] + "\u2026"
        body.append(
            f'<text class="tick" x="{label_w - 8}" y="{y + 15}" text-anchor="end">'
            f"<title>{escape(name)}</title>{escape(shown)}</text>"
        )
        x = float(label_w)
        for k, value in enumerate(values):
            width = plot_w * value / top_value
            if width > 0:
                body.append(
                    f'<rect x="{x:.1f}" y="{y + 3}" width="{max(width, 1):.1f}" height="{row_h - 6}" '
                    f'fill="{colors[k % len(colors)]}"><title>{escape(name)} '
                    f"{escape(parts[k] if k < len(parts) else '')}: {escape(fmt_number(value))}"
                    "</title></rect>"
                )
            x += width
        body.append(
            f'<text class="value" x="{x + 6:.1f}" y="{y + 15}">{escape(fmt_number(sum(values)))}</text>'
        )
    return _svg(body, label, height)
