"""A hand-written SVG line chart of a faithfulness curve (no plotting library needed).

Faithfulness (everything outside the circuit patched) and necessity (the circuit's edges knocked
out) are plotted against circuit size — edges for edge circuits, kept components or groups for
node- and group-level ones (``unit``) — normalised so 1 is the clean and 0 the corrupt metric;
dotted grey lines mark those two levels. The chosen circuit's size is a vertical line labelled
with it, and a faithfulness target a horizontal dashed line labelled ``target 0.8`` (both only
when given). A second curve, the circuits a search refined (``refined``), adds their faithfulness
as a third line. The x axis turns logarithmic when sizes span a factor of 20 or more.
"""

from __future__ import annotations

import math
from html import escape

from ..circuit import FaithfulnessCurve

SERIES = (("faithfulness", "#2166ac", "", "circle"), ("necessity", "#d6604d", "6 4", "square"))
REFINED = ("refined faithfulness", "#1b7837", "2 2", "circle")
TARGET_COLOUR = "#4d9221"


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering ``[lo, hi]``."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(n, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.floor(lo / step + 1e-9) * step
    ticks, k = [], 0
    while start + k * step <= hi + step * 1e-9:
        ticks.append(round(start + k * step, 12))
        k += 1
    return ticks


def _tick_label(x: float) -> str:
    """A short tick label (``0.2``, ``1``, ``1e+03``)."""
    return f"{x:.4g}"


def _segments(points: list[tuple[float, float]]) -> list[list[tuple[float, float]]]:
    """Split a polyline where a y value is missing (NaN), so gaps stay gaps."""
    out: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if math.isfinite(y):
            out[-1].append((x, y))
        elif out[-1]:
            out.append([])
    return [s for s in out if s]


def _marker(shape: str, x: float, y: float, colour: str, tip: str) -> str:
    """A circle or square point marker with a hover tooltip."""
    title = f"<title>{escape(tip)}</title>"
    if shape == "circle":
        return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{colour}">{title}</circle>'
    return f'<rect x="{x - 3.5:.1f}" y="{y - 3.5:.1f}" width="7" height="7" fill="{colour}">{title}</rect>'


def faithfulness_svg(f: FaithfulnessCurve, *, title: str = "Faithfulness and necessity by circuit size",
                     width: int = 560, height: int = 340, unit: str = "edges", chosen: int | None = None,
                     target: float | None = None, refined: FaithfulnessCurve | None = None) -> str:
    """An SVG document plotting ``f.faithfulness`` and ``f.necessity`` against ``f.sizes`` (counted
    in ``unit``), with the ``chosen`` circuit's size and the faithfulness ``target`` marked when given,
    and the ``refined`` circuits' faithfulness as a third line."""
    left, right, top, bottom = 64, 60, 62, 52
    pw, ph = width - left - right, height - top - bottom
    sizes = [float(s) for s in f.sizes]
    extra = [] if refined is None else [float(s) for s in refined.sizes]
    spread = sizes + extra + ([] if chosen is None else [float(chosen)])
    log = bool(spread) and min(spread) > 0 and max(spread) / min(spread) >= 20
    tx = [math.log10(s) for s in sizes] if log else sizes
    t_spread = [math.log10(s) for s in spread] if log else spread
    x_lo, x_hi = (min(t_spread), max(t_spread)) if t_spread else (0.0, 1.0)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    x_ticks = sorted(set(sizes + extra)) if 0 < len(set(sizes + extra)) <= 8 else (
        [10.0 ** e for e in range(math.ceil(x_lo), math.floor(x_hi) + 1)] if log else nice_ticks(x_lo, x_hi))
    x_pad = 0.04 * (x_hi - x_lo)
    x_lo, x_hi = x_lo - x_pad, x_hi + x_pad
    more = () if refined is None else refined.faithfulness
    values = [v for v in (*f.faithfulness, *f.necessity, *more, *([] if target is None else [target]))
              if math.isfinite(v)]
    y_ticks = nice_ticks(min([0.0, *values]), max([1.0, *values]), 6)
    y_lo, y_hi = min(y_ticks[0], min([0.0, *values])), max(y_ticks[-1], max([1.0, *values]))
    y_pad = 0.04 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - y_pad, y_hi + y_pad

    def px(v: float) -> float:
        """Plot x coordinate of an (already log-transformed) size."""
        return left + (v - x_lo) / (x_hi - x_lo) * pw

    def py(v: float) -> float:
        """Plot y coordinate of a normalised metric value."""
        return top + (y_hi - v) / (y_hi - y_lo) * ph

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, sans-serif" font-size="11">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="13">{escape(title)}</text>']
    for y in y_ticks:
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(y):.1f}" y2="{py(y):.1f}" stroke="#eeeeee"/>')
        parts.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{_tick_label(y)}</text>')
    for x in x_ticks:
        xx = px(math.log10(x) if log else x)
        parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top + ph}" y2="{top + ph + 5}" stroke="#333333"/>')
        parts.append(f'<text x="{xx:.1f}" y="{top + ph + 18}" text-anchor="middle">{_tick_label(x)}</text>')
    for level, name in ((1.0, "clean"), (0.0, "corrupt")):
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{py(level):.1f}" y2="{py(level):.1f}" '
                     f'stroke="#999999" stroke-dasharray="2 3"/>')
        parts.append(f'<text x="{left + pw + 4}" y="{py(level) + 4:.1f}" fill="#777777">{name}</text>')
    parts.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + ph}" stroke="#333333"/>')
    parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{top + ph}" y2="{top + ph}" stroke="#333333"/>')
    if target is not None and math.isfinite(target):
        ty = py(target)
        parts.append(f'<line class="target" x1="{left}" x2="{left + pw}" y1="{ty:.1f}" y2="{ty:.1f}" '
                     f'stroke="{TARGET_COLOUR}" stroke-dasharray="6 4"/>')
        parts.append(f'<text x="{left + 4}" y="{ty - 4:.1f}" fill="{TARGET_COLOUR}">target {target:g}</text>')
    if chosen is not None:
        cx = px(math.log10(chosen) if log else float(chosen))
        right_half = cx > left + pw / 2
        parts.append(f'<line class="chosen" x1="{cx:.1f}" x2="{cx:.1f}" y1="{top}" y2="{top + ph}" stroke="#333333" '
                     f'stroke-dasharray="3 3"/>')
        parts.append(f'<text x="{cx + (-4 if right_half else 4):.1f}" y="{top - 5}" '
                     f'text-anchor="{"end" if right_half else "start"}">chosen: {chosen} {escape(unit)}</text>')
    x_label = f"circuit size ({escape(unit)}" + (", log scale)" if log else ")")
    parts.append(f'<text x="{left + pw / 2:.1f}" y="{height - 12}" text-anchor="middle">{x_label}</text>')
    parts.append(f'<text transform="translate(16 {top + ph / 2:.1f}) rotate(-90)" text-anchor="middle">'
                 f'normalised metric (1 = clean, 0 = corrupt)</text>')
    series = [(name, colour, dash, shape, tx, f.sizes, getattr(f, name)) for name, colour, dash, shape in SERIES]
    if refined is not None:
        rx = [math.log10(s) for s in extra] if log else extra
        series.append((*REFINED, rx, refined.sizes, refined.faithfulness))
    for i, (name, colour, dash, shape, xs, size_list, ys) in enumerate(series):
        pts = [(px(x), py(y) if math.isfinite(y) else math.nan) for x, y in zip(xs, ys)]
        for seg in _segments(pts):
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in seg)
            dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
            parts.append(f'<polyline class="{name}" points="{path}" fill="none" stroke="{colour}" '
                         f'stroke-width="2"{dash_attr}/>')
        for (x, y), size, v in zip(pts, size_list, ys):
            if math.isfinite(y):
                parts.append(_marker(shape, x, y, colour, f"{name} at {size} {unit}: {v:.4g}"))
        lx = left + i * 130
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        parts.append(f'<line x1="{lx}" x2="{lx + 24}" y1="38" y2="38" stroke="{colour}" stroke-width="2"{dash_attr}/>')
        parts.append(_marker(shape, lx + 12, 38, colour, name))
        parts.append(f'<text x="{lx + 30}" y="42">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
