"""Perplexity as a function of position in the book, drawn as a standalone SVG (no plotting deps).

A model that uses long context gets lower perplexity deeper into a book; a flat curve means the
extra context is not used.
"""
from __future__ import annotations

import html
import math

from .likelihood import PositionCurve


def position_perplexities(curve: PositionCurve) -> list[tuple[int, float]]:
    """(first token position of the bucket, perplexity over the bucket) for non-empty buckets."""
    return [(b * curve.bucket, math.exp(nll / n))
            for b, (nll, n) in enumerate(zip(curve.nll, curve.count)) if n]


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / target
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _label(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 10 or value == int(value) else f"{value:.2g}"


def position_curve_svg(curve: PositionCurve, name: str, width: int = 640, height: int = 360) -> str:
    """A line plot of perplexity against token position for the run `name`, with round ticks."""
    points = position_perplexities(curve)
    if not points:
        raise ValueError("position curve is empty: no tokens were scored")
    left, right, top, bottom = 70, 20, 40, 50
    x_ticks = nice_ticks(0, max(points[-1][0], 1))
    y_ticks = nice_ticks(min(p for _, p in points), max(p for _, p in points))
    x_max, y_lo, y_hi = x_ticks[-1], y_ticks[0], y_ticks[-1]

    def x_of(pos: float) -> float:
        return left + (width - left - right) * pos / x_max

    def y_of(ppl: float) -> float:
        return top + (height - top - bottom) * (1 - (ppl - y_lo) / (y_hi - y_lo))

    x0, y0 = left, height - bottom
    line = " ".join(f"{x_of(pos):.1f},{y_of(ppl):.1f}" for pos, ppl in points)
    ticks = [f'<line x1="{x_of(t):.1f}" y1="{y0}" x2="{x_of(t):.1f}" y2="{y0 + 5}" stroke="black"/>'
             f'<text x="{x_of(t):.1f}" y="{y0 + 18}" text-anchor="middle">{_label(t)}</text>'
             for t in x_ticks]
    ticks += [f'<line x1="{x0 - 5}" y1="{y_of(t):.1f}" x2="{x0}" y2="{y_of(t):.1f}" stroke="black"/>'
              f'<text x="{x0 - 8}" y="{y_of(t) + 4:.1f}" text-anchor="end">{_label(t)}</text>'
              for t in y_ticks]
    tick_lines = "\n".join(ticks)
    return f"""<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{(width + left) / 2}" y="20" text-anchor="middle" font-size="14">{html.escape(name)}</text>
<line x1="{x0}" y1="{y0}" x2="{width - right}" y2="{y0}" stroke="black"/>
<line x1="{x0}" y1="{top}" x2="{x0}" y2="{y0}" stroke="black"/>
{tick_lines}
<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>
<text x="{(width + left) / 2}" y="{height - 10}" text-anchor="middle">token position in book (bucket of {curve.bucket})</text>
<text x="15" y="{(top + y0) / 2}" transform="rotate(-90 15 {(top + y0) / 2})" text-anchor="middle">perplexity</text>
</svg>
"""
