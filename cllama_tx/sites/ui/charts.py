"""
The charts of the operator UI as inline SVG, built as L{Tag}s (escaped by
the flattener like everything else on a page).  Presentation attributes
only, never a style attribute: the Content-Security-Policy allows no inline
style.  Charts are sized by their viewBox so they scale with their card.
"""

from __future__ import annotations

import math

from twisted.web.template import Tag

from cllama_tx.sites.ui.markup import h
from cllama_tx.sites.ui.render import money


def _nice_ceiling(value: float) -> float:
    """The next 'round' number at or above C{value}: 1, 2, 2.5, 5 x 10^n."""
    if value <= 0:
        return 1.0
    exponent = math.floor(math.log10(value))
    base = 10.0**exponent
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * base + 1e-12:
            return step * base
    return 10 * base


def bar_chart(
    points: list[tuple[str, float, str]],
    *,
    label: str,
    fmt=money,
    width: int = 720,
    height: int = 220,
    highlight_last: bool = True,
) -> Tag:
    """
    Vertical bars: C{points} are C{(axis label, value, tooltip)}.  Four grid
    lines with values, axis labels thinned to fit, the last bar (today)
    highlighted.
    """
    peak = max((v for _, v, _ in points), default=0.0)
    ceiling = _nice_ceiling(peak) if peak > 0 else 1.0
    # Room for the longest tick label (about 6.5 units a character at 11px).
    longest = max(len(fmt(ceiling * i / 4)) for i in range(5))
    left, right, top, bottom = max(44, int(longest * 6.5) + 14), 8, 12, 26
    plot_w, plot_h = width - left - right, height - top - bottom
    parts: list[Tag] = []
    for i in range(5):
        y = top + plot_h - plot_h * i / 4
        parts.append(h("line", {"x1": left, "x2": width - right, "y1": f"{y:.1f}", "y2": f"{y:.1f}", "class": "grid"}))
        parts.append(
            h("text", {"x": left - 8, "y": f"{y + 4:.1f}", "class": "axis", "text-anchor": "end"}, fmt(ceiling * i / 4) if peak > 0 or i == 0 else "")
        )
    n = max(len(points), 1)
    slot = plot_w / n
    bar_w = max(2.0, slot * 0.72)
    every = max(1, math.ceil(n / 8))
    for index, (axis, value, tooltip) in enumerate(points):
        x = left + slot * index + (slot - bar_w) / 2
        bar_h = 0.0 if value <= 0 else max(1.5, plot_h * value / ceiling)
        css = "bar bar-now" if highlight_last and index == n - 1 else "bar"
        parts.append(
            h(
                "rect",
                {"x": f"{x:.1f}", "y": f"{top + plot_h - bar_h:.1f}", "width": f"{bar_w:.1f}", "height": f"{bar_h:.1f}", "rx": 2, "class": css},
                h("title", None, tooltip),
            )
        )
        if (n - 1 - index) % every == 0:
            parts.append(h("text", {"x": f"{x + bar_w / 2:.1f}", "y": height - 8, "class": "axis", "text-anchor": "middle"}, axis))
    return h(
        "svg",
        {"viewBox": f"0 0 {width} {height}", "class": "chart", "role": "img", "aria-label": label},
        h("title", None, label),
        parts,
    )


def hbar(fraction: float, *, marker: float | None = None, tone: str = "accent", width: int = 100, height: int = 8) -> Tag:
    """A horizontal bar filled to C{fraction} (0..1), with an optional marker line."""
    fraction = min(max(fraction, 0.0), 1.0)
    parts = [
        h("rect", {"x": 0, "y": 0, "width": width, "height": height, "rx": height / 2, "class": "track"}),
        h("rect", {"x": 0, "y": 0, "width": f"{width * fraction:.2f}", "height": height, "rx": height / 2, "class": f"fill fill-{tone}"}),
    ]
    if marker is not None:
        mx = width * min(max(marker, 0.0), 1.0)
        parts.append(h("line", {"x1": f"{mx:.2f}", "x2": f"{mx:.2f}", "y1": -2, "y2": height + 2, "class": "marker"}))
    return h(
        "svg",
        {"viewBox": f"0 -2 {width} {height + 4}", "preserveAspectRatio": "none", "class": "hbar", "aria-hidden": "true"},
        parts,
    )


def gauge(fraction: float | None, tone: str, label: str, text: str | None = None) -> Tag:
    """
    A semicircle gauge of C{fraction} used (0..1; over 1 is drawn full),
    with C{text} (the percentage) written inside the arc.
    """
    width, stroke = 132, 12
    r = (width - stroke) / 2
    cx, cy = width / 2, r + stroke / 2
    length = math.pi * r
    arc = f"M {cx - r:.2f} {cy:.2f} A {r:.2f} {r:.2f} 0 0 1 {cx + r:.2f} {cy:.2f}"
    used = 0.0 if fraction is None else min(max(fraction, 0.0), 1.0)
    return h(
        "svg",
        {"viewBox": f"0 0 {width} {cy + stroke / 2 + 1:.0f}", "class": "gauge", "role": "img", "aria-label": label},
        h("title", None, label),
        h("path", {"d": arc, "class": "gauge-track", "stroke-width": stroke, "fill": "none", "stroke-linecap": "round"}),
        h(
            "path",
            {
                "d": arc,
                "class": f"gauge-fill fill-{tone}",
                "stroke-width": stroke,
                "fill": "none",
                "stroke-linecap": "round",
                "stroke-dasharray": f"{length * used:.2f} {length:.2f}",
            },
        )
        if used > 0
        else None,
        h("text", {"x": f"{cx:.1f}", "y": f"{cy - 4:.1f}", "text-anchor": "middle", "class": f"gauge-text text-{tone}"}, text or "")
        if text
        else None,
    )
