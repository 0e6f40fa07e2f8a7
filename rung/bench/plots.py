"""Inline SVG plots for the HTML report: scatter plots with a shaded passing region, and latency
distributions. Hand-written SVG keeps the report one self-contained file with no plotting library."""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

from rung.bench.measure import percentile

WIDTH, HEIGHT = 560, 340
LEFT, RIGHT, TOP, BOTTOM = 64, 150, 20, 48  # margins; labels of points may run into the right one
COLORS = {"chosen": "#1a7f37", "pass": "#0969da", "fail": "#cf222e", "error": "#8c959f"}


@dataclass
class Point:
    label: str
    x: float | None
    y: float | None
    status: str  # chosen | pass | fail | error


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 2.5, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:g}"
    return f"{v:.3g}"


def scatter(points: list[Point], x_label: str, y_label: str, x_max_pass: float | None = None,
            y_min_pass: float | None = None, y_is_rate: bool = True, title: str = "") -> str:
    """Points with the region that passes (x ≤ x_max_pass, y ≥ y_min_pass) shaded green."""
    shown = [p for p in points if p.x is not None and p.y is not None]
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
             f'role="img" aria-label="{escape(title or y_label + " against " + x_label)}" font-family="system-ui, sans-serif" font-size="11">']
    if not shown:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" fill="#57606a">'
                     f'no candidate has both {escape(x_label)} and {escape(y_label)}</text></svg>')
        return "".join(parts)
    xs = [p.x for p in shown] + ([x_max_pass] if x_max_pass is not None else [])
    x_hi = max(xs) * 1.15 or 1.0
    x_lo = 0.0
    y_lo, y_hi = (0.0, 1.0) if y_is_rate else (0.0, max(p.y for p in shown) * 1.15 or 1.0)

    def X(v: float) -> float:
        return LEFT + (v - x_lo) / (x_hi - x_lo) * pw

    def Y(v: float) -> float:
        return TOP + ph - (v - y_lo) / (y_hi - y_lo) * ph

    # the passing region first, under everything else
    rx1 = X(min(x_max_pass, x_hi)) if x_max_pass is not None else X(x_hi)
    ry0 = Y(max(min(y_min_pass, y_hi), y_lo)) if y_min_pass is not None else Y(y_lo)
    parts.append(f'<rect x="{X(x_lo):.1f}" y="{Y(y_hi):.1f}" width="{rx1 - X(x_lo):.1f}" height="{ry0 - Y(y_hi):.1f}" '
                 f'fill="#dafbe1" stroke="#4ac26b" stroke-dasharray="4 3"><title>passing region</title></rect>')
    parts.append(f'<text x="{X(x_lo) + 6:.1f}" y="{Y(y_hi) + 14:.1f}" fill="#1a7f37">passes</text>')
    for t in _ticks(x_lo, x_hi):
        parts.append(f'<line x1="{X(t):.1f}" y1="{TOP + ph}" x2="{X(t):.1f}" y2="{TOP + ph + 4}" stroke="#57606a"/>'
                     f'<text x="{X(t):.1f}" y="{TOP + ph + 16}" text-anchor="middle" fill="#57606a">{_fmt(t)}</text>')
    for t in _ticks(y_lo, y_hi):
        label = f"{t:.0%}" if y_is_rate else _fmt(t)
        parts.append(f'<line x1="{LEFT}" y1="{Y(t):.1f}" x2="{LEFT + pw}" y2="{Y(t):.1f}" stroke="#eaeef2"/>'
                     f'<text x="{LEFT - 6}" y="{Y(t) + 4:.1f}" text-anchor="end" fill="#57606a">{label}</text>')
    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#57606a"/>')
    parts.append(f'<text x="{LEFT + pw / 2}" y="{HEIGHT - 10}" text-anchor="middle">{escape(x_label)}</text>')
    parts.append(f'<text transform="translate(14 {TOP + ph / 2}) rotate(-90)" text-anchor="middle">{escape(y_label)}</text>')
    # labels avoid the markers and each other
    placed: list[tuple[float, float, float, float]] = [(X(p.x) - 6, Y(p.y) - 6, X(p.x) + 6, Y(p.y) + 6) for p in shown]
    for p in sorted(shown, key=lambda p: (-p.y, p.x)):
        cx, cy = X(p.x), Y(p.y)
        color = COLORS.get(p.status, "#57606a")
        y_text = f"{p.y:.0%}" if y_is_rate else _fmt(p.y)
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{6 if p.status == "chosen" else 4.5}" fill="{color}">'
                     f'<title>{escape(p.label)}: {escape(x_label)} {_fmt(p.x)}, {escape(y_label)} {y_text}</title></circle>')
        ly = _free_row(placed, cx + 8, cy + 4, 6.2 * len(p.label))
        if abs(ly - (cy + 4)) > 1:  # moved off a neighbour's label: a thin leader back to the point
            parts.append(f'<line x1="{cx:.1f}" y1="{cy:.1f}" x2="{cx + 7:.1f}" y2="{ly - 4:.1f}" stroke="{color}" stroke-width="0.6"/>')
        parts.append(f'<text x="{cx + 8:.1f}" y="{ly:.1f}" fill="{color}">{escape(p.label)}</text>')
    missing = [p.label for p in points if p.x is None or p.y is None]
    if missing:
        parts.append(f'<text x="{LEFT}" y="{HEIGHT - 26}" fill="#57606a" font-size="10">not shown (no figure): '
                     f'{escape(", ".join(missing))}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _free_row(placed: list, x: float, y: float, width: float, height: float = 12.0) -> float:
    """The baseline nearest ``y`` where a label of ``width`` at ``x`` overlaps no placed label."""
    for dy in (0, 13, -13, 26, -26, 39, -39, 52, -52):
        box = (x, y + dy - height + 2, x + width, y + dy + 2)
        if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
            placed.append(box)
            return y + dy
    placed.append((x, y - height + 2, x + width, y + 2))
    return y


def distributions(series: list[tuple[str, list[float], list[float]]], x_label: str = "milliseconds",
                  x_max_pass: float | None = None) -> str:
    """Per candidate: end-to-end latencies as a box (p25–p75, median, p95 tick) over the samples as
    dots, and time to first token below it in lighter colour."""
    row = 44
    height = TOP + BOTTOM + 8 + row * max(1, len(series))
    pw = WIDTH - 190 - 24
    left = 190
    values = [v for _, a, b in series for v in a + b]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" height="{height}" '
             f'role="img" aria-label="latency distributions" font-family="system-ui, sans-serif" font-size="11">']
    if not values:
        parts.append(f'<text x="{WIDTH / 2}" y="{height / 2}" text-anchor="middle" fill="#57606a">no latencies</text></svg>')
        return "".join(parts)
    hi = max(values + ([x_max_pass] if x_max_pass else [])) * 1.08

    def X(v: float) -> float:
        return left + v / hi * pw

    for t in _ticks(0, hi):
        parts.append(f'<line x1="{X(t):.1f}" y1="{TOP}" x2="{X(t):.1f}" y2="{height - BOTTOM}" stroke="#eaeef2"/>'
                     f'<text x="{X(t):.1f}" y="{height - BOTTOM + 16}" text-anchor="middle" fill="#57606a">{_fmt(t)}</text>')
    if x_max_pass:
        parts.append(f'<line x1="{X(x_max_pass):.1f}" y1="{TOP}" x2="{X(x_max_pass):.1f}" y2="{height - BOTTOM}" '
                     f'stroke="#1a7f37" stroke-dasharray="4 3"/><text x="{X(x_max_pass) + 4:.1f}" y="{TOP + 10}" '
                     f'fill="#1a7f37">threshold</text>')
    for i, (label, e2e, ttft) in enumerate(series):
        y = TOP + i * row + row / 2
        parts.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{escape(label)}</text>')
        for values_, dy, color, name in ((e2e, -7, "#0969da", "end to end"), (ttft, 9, "#bf8700", "first token")):
            if not values_:
                continue
            q = {k: percentile(values_, k) for k in (0, 25, 50, 75, 95, 100)}
            yy = y + dy
            parts.append(f'<line x1="{X(q[0]):.1f}" y1="{yy:.1f}" x2="{X(q[100]):.1f}" y2="{yy:.1f}" stroke="{color}"/>')
            parts.append(f'<rect x="{X(q[25]):.1f}" y="{yy - 5:.1f}" width="{max(1.0, X(q[75]) - X(q[25])):.1f}" height="10" '
                         f'fill="{color}" fill-opacity="0.25" stroke="{color}"><title>{escape(label)} {name}: '
                         f'p50 {q[50]:,.0f} ms, p95 {q[95]:,.0f} ms</title></rect>')
            parts.append(f'<line x1="{X(q[50]):.1f}" y1="{yy - 5:.1f}" x2="{X(q[50]):.1f}" y2="{yy + 5:.1f}" stroke="{color}" stroke-width="2"/>')
            parts.append(f'<line x1="{X(q[95]):.1f}" y1="{yy - 6:.1f}" x2="{X(q[95]):.1f}" y2="{yy + 6:.1f}" stroke="{color}" stroke-dasharray="2 1"/>')
            for v in values_:
                parts.append(f'<circle cx="{X(v):.1f}" cy="{yy:.1f}" r="1.6" fill="{color}" fill-opacity="0.6"/>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 22}" text-anchor="middle">{escape(x_label)}</text>'
                 f'<text x="{WIDTH / 2}" y="{height - 6}" text-anchor="middle" fill="#57606a" font-size="10">'
                 'blue: end to end · amber: first token · box p25–p75, bar median, dashed tick p95</text>')
    parts.append("</svg>")
    return "".join(parts)
