"""Perplexity as a function of position in the book, drawn as a standalone SVG (no plotting deps).

A model that uses long context gets lower perplexity deeper into a book; a flat curve means the
extra context is not used.
"""
from __future__ import annotations

import math

from .likelihood import PositionCurve


def position_perplexities(curve: PositionCurve) -> list[tuple[int, float]]:
    """(first token position of the bucket, perplexity over the bucket) for non-empty buckets."""
    return [(b * curve.bucket, math.exp(nll / n))
            for b, (nll, n) in enumerate(zip(curve.nll, curve.count)) if n]


def position_curve_svg(curve: PositionCurve, width: int = 640, height: int = 360) -> str:
    """A line plot of perplexity against token position (linear axes, labelled ends)."""
    points = position_perplexities(curve)
    if not points:
        raise ValueError("position curve is empty: no tokens were scored")
    left, right, top, bottom = 70, 20, 20, 50
    x_max = max(points[-1][0], 1)
    y_lo, y_hi = min(p for _, p in points), max(p for _, p in points)
    y_span = (y_hi - y_lo) or 1.0

    def xy(pos: int, ppl: float) -> str:
        x = left + (width - left - right) * pos / x_max
        y = top + (height - top - bottom) * (1 - (ppl - y_lo) / y_span)
        return f"{x:.1f},{y:.1f}"

    line = " ".join(xy(pos, ppl) for pos, ppl in points)
    x0, y0 = left, height - bottom
    return f"""<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<line x1="{x0}" y1="{y0}" x2="{width - right}" y2="{y0}" stroke="black"/>
<line x1="{x0}" y1="{top}" x2="{x0}" y2="{y0}" stroke="black"/>
<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>
<text x="{x0}" y="{y0 + 18}">0</text>
<text x="{width - right}" y="{y0 + 18}" text-anchor="end">{x_max}</text>
<text x="{(width + left) / 2}" y="{height - 10}" text-anchor="middle">token position in book (bucket of {curve.bucket})</text>
<text x="{x0 - 5}" y="{top + 4}" text-anchor="end">{y_hi:.1f}</text>
<text x="{x0 - 5}" y="{y0}" text-anchor="end">{y_lo:.1f}</text>
<text x="15" y="{(top + y0) / 2}" transform="rotate(-90 15 {(top + y0) / 2})" text-anchor="middle">perplexity</text>
</svg>
"""
