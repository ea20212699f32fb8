"""
HTML for the operator UI: escaping, the page templates of C{web/}, and the
number formats an operator reads at a glance.

Everything that reaches a page goes through L{escape} unless it is an
L{Html} value, and an L{Html} value is only ever made here (by L{el},
L{Templates.render} or L{Html.join}) from escaped parts.  Templates are
logic-free: C{{{ name }}} slots filled with text (escaped) or L{Html}.
"""

from __future__ import annotations

import hashlib
import html
import math
import os
import re
import time
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Iterable, Mapping

import cllama_tx


class Html(str):
    """Markup that is already safe to send (escaped parts only)."""

    __slots__ = ()

    @classmethod
    def join(cls, parts: Iterable[Any], separator: str = "") -> "Html":
        return cls(escape(separator).join(escape(p) for p in parts))


def escape(value: Any) -> str:
    """Text as HTML (quotes too, so it is safe in attributes); L{Html} as is."""
    if value is None or value is False:
        return ""
    if isinstance(value, Html):
        return value
    if isinstance(value, (list, tuple)):
        return "".join(escape(v) for v in value)
    return html.escape(str(value), quote=True)


_VOID = frozenset({"area", "br", "col", "hr", "img", "input", "link", "meta", "source", "wbr"})
_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9:_-]*$")


def el(tag: str, attrs: Mapping[str, Any] | None = None, *children: Any) -> Html:
    """
    One element: C{el("td", {"class": "num"}, "12")}.  Attribute values are
    escaped; C{True} writes a bare attribute, C{None}/C{False} leaves it out.
    Children are escaped text, L{Html}, numbers, lists of those, or None.
    """
    if not _NAME.match(tag):
        raise ValueError(f"bad tag {tag!r}")
    parts = [f"<{tag}"]
    for name, value in (attrs or {}).items():
        name = name.rstrip("_")  # class_ -> class
        if not _NAME.match(name):
            raise ValueError(f"bad attribute {name!r}")
        if value is None or value is False:
            continue
        if value is True:
            parts.append(f" {name}")
        else:
            parts.append(f' {name}="{escape(value)}"')
    parts.append(">")
    if tag in _VOID:
        return Html("".join(parts))
    parts.append(escape(list(children)))
    parts.append(f"</{tag}>")
    return Html("".join(parts))


# --- templates -----------------------------------------------------------------

_SLOT = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}")


def web_root() -> str:
    """
    The directory of templates and static files: C{cllama_tx/web} in an
    installed package (shipped as package data), else the repository's
    C{web/} beside the C{cllama_tx} package (a source checkout).
    """
    package = os.path.dirname(os.path.abspath(cllama_tx.__file__))
    for candidate in (os.path.join(package, "web"), os.path.join(os.path.dirname(package), "web")):
        if os.path.isdir(os.path.join(candidate, "templates")):
            return candidate
    raise FileNotFoundError(
        "the operator UI's web/ directory (templates, static files) is missing from this installation"
    )


class Templates:
    """
    The C{web/templates/*.html} files, read once.  L{render} fills slots;
    a slot the caller did not give is an error (caught by the tests), and so
    is a slot given that the template does not have.
    """

    def __init__(self, root: str | None = None) -> None:
        self.root = root or web_root()
        self._cache: dict[str, tuple[str, frozenset[str]]] = {}

    def _load(self, name: str) -> tuple[str, frozenset[str]]:
        found = self._cache.get(name)
        if found is None:
            with open(os.path.join(self.root, "templates", name + ".html"), encoding="utf-8") as f:
                text = f.read()
            found = (text, frozenset(_SLOT.findall(text)))
            self._cache[name] = found
        return found

    def render(self, name: str, **slots: Any) -> Html:
        text, names = self._load(name)
        missing = names - set(slots)
        extra = set(slots) - names
        if missing or extra:
            raise KeyError(f"template {name}: missing slots {sorted(missing)}, unknown slots {sorted(extra)}")
        return Html(_SLOT.sub(lambda m: escape(slots[m.group(1)]), text))


class Static:
    """
    C{web/static/*}, read once, each with a content hash: pages link
    C{/static/ui.css?v=<hash>} so browsers may cache them for long.
    """

    TYPES = {
        ".css": "text/css; charset=utf-8",
        ".js": "text/javascript; charset=utf-8",
        ".svg": "image/svg+xml",
        ".png": "image/png",
        ".ico": "image/x-icon",
    }

    def __init__(self, root: str | None = None) -> None:
        self.root = os.path.join(root or web_root(), "static")
        self.files: dict[str, tuple[bytes, str, str]] = {}
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            ext = os.path.splitext(name)[1]
            if os.path.isfile(path) and ext in self.TYPES:
                with open(path, "rb") as f:
                    data = f.read()
                digest = hashlib.sha256(data).hexdigest()[:12]
                self.files[name] = (data, self.TYPES[ext], digest)

    def url(self, name: str) -> str:
        return f"/static/{name}?v={self.files[name][2]}"


# --- numbers -------------------------------------------------------------------


def money(value: float | None) -> str:
    """Dollars for people: C{$1,234}, C{$12.34}, C{$0.0042}, C{$0.00}."""
    if value is None:
        return "–"
    if value < 0:
        return "-" + money(-value)
    if value == 0:
        return "$0.00"
    if value >= 10000:
        return f"${value:,.0f}"
    if value >= 0.995:
        return f"${value:,.2f}"
    if value >= 0.01:
        return f"${value:.3f}".rstrip("0").rstrip(".") if value < 0.1 else f"${value:.2f}"
    # Small amounts keep two significant digits: $0.0042, $0.000017.
    digits = max(2, -int(math.floor(math.log10(value))) + 1)
    return f"${value:.{min(digits, 8)}f}"


def money_short(value: float | None) -> str:
    """L{money} for headline figures: amounts under a cent are C{<$0.01}."""
    if value is not None and 0 < value < 0.01:
        return "<$0.01"
    return money(value)


def plural(n: int | None, word: str) -> str:
    """C{"1 request"}, C{"1,204 requests"}."""
    return f"{count(n)} {word}{'' if n == 1 else 's'}"


def count(value: int | float | None) -> str:
    if value is None:
        return "–"
    return f"{int(value):,}"


_COMPACT_UNITS = (("", 1), ("k", 10**3), ("M", 10**6), ("B", 10**9))


def compact(value: int | float | None) -> str:
    """
    A count at a glance, in three significant digits and a unit: C{987},
    C{12.3k}, C{100k}, C{230k}, C{4.56M}, C{1.2B}.  Rounded half up; only
    zeros after the decimal point are dropped (100,300 is C{100k}, never
    C{1k}); a count that rounds up to 1,000 of a unit takes the next unit
    (999,950 is C{1M}).  Exact figures are in the JSON twins (docs/UI.md).
    """
    if value is None or not math.isfinite(value):
        return "–"
    number = Decimal(value) if isinstance(value, int) else Decimal(repr(float(value)))
    sign = "-" if number < 0 else ""
    number = abs(number)
    last = len(_COMPACT_UNITS) - 1
    for index, (suffix, size) in enumerate(_COMPACT_UNITS):
        scaled = number / size
        if index < last and scaled >= 1000:
            continue
        decimals = 0 if not suffix or scaled >= 100 else 1 if scaled >= 10 else 2
        rounded = scaled.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP)
        if index < last and rounded >= 1000:
            continue  # 999.95k is 1M
        text = f"{rounded:,.{decimals}f}"
        if decimals:
            text = text.rstrip("0").rstrip(".")
        return sign + text + suffix
    raise AssertionError("unreachable: the last unit always answers")


def percent(fraction: float | None, digits: int = 0) -> str:
    if fraction is None:
        return "–"
    value = fraction * 100
    if 0 < value < 1 and digits == 0:
        return "<1%"
    return f"{value:.{digits}f}%"


def millis(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 10000:
        return f"{value / 1000:.1f} s"
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    return f"{value:.0f} ms"


def utc(ts: float | None, with_seconds: bool = True) -> str:
    if ts is None:
        return "–"
    return time.strftime("%Y-%m-%d %H:%M:%S" if with_seconds else "%Y-%m-%d %H:%M", time.gmtime(ts)) + " UTC"


def ago(ts: float | None, now: float) -> str:
    """C{"12 s ago"}, C{"5 min ago"}, C{"3 h ago"}, C{"2 d ago"}."""
    if ts is None:
        return "never"
    delta = max(0.0, now - ts)
    if delta < 60:
        return f"{delta:.0f} s ago"
    if delta < 3600:
        return f"{delta // 60:.0f} min ago"
    if delta < 86400:
        return f"{delta // 3600:.0f} h ago"
    return f"{delta // 86400:.0f} d ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


# --- SVG -----------------------------------------------------------------------
#
# Charts are drawn here, as inline SVG with presentation attributes only (no
# style attributes: the Content-Security-Policy allows no inline style), and
# sized by their viewBox so they scale with the card they sit in.


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
) -> Html:
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
    parts: list[Html] = []
    for i in range(5):
        y = top + plot_h - plot_h * i / 4
        parts.append(el("line", {"x1": left, "x2": width - right, "y1": f"{y:.1f}", "y2": f"{y:.1f}", "class": "grid"}))
        parts.append(
            el("text", {"x": left - 8, "y": f"{y + 4:.1f}", "class": "axis", "text-anchor": "end"}, fmt(ceiling * i / 4) if peak > 0 or i == 0 else "")
        )
    n = max(len(points), 1)
    slot = plot_w / n
    bar_w = max(2.0, slot * 0.72)
    every = max(1, math.ceil(n / 8))
    for index, (axis, value, tooltip) in enumerate(points):
        x = left + slot * index + (slot - bar_w) / 2
        h = 0.0 if value <= 0 else max(1.5, plot_h * value / ceiling)
        css = "bar bar-now" if highlight_last and index == n - 1 else "bar"
        parts.append(
            el(
                "rect",
                {"x": f"{x:.1f}", "y": f"{top + plot_h - h:.1f}", "width": f"{bar_w:.1f}", "height": f"{h:.1f}", "rx": 2, "class": css},
                el("title", None, tooltip),
            )
        )
        if (n - 1 - index) % every == 0:
            parts.append(el("text", {"x": f"{x + bar_w / 2:.1f}", "y": height - 8, "class": "axis", "text-anchor": "middle"}, axis))
    return el(
        "svg",
        {"viewBox": f"0 0 {width} {height}", "class": "chart", "role": "img", "aria-label": label},
        el("title", None, label),
        parts,
    )


def hbar(fraction: float, *, marker: float | None = None, tone: str = "accent", width: int = 100, height: int = 8) -> Html:
    """A horizontal bar filled to C{fraction} (0..1), with an optional marker line."""
    fraction = min(max(fraction, 0.0), 1.0)
    parts = [
        el("rect", {"x": 0, "y": 0, "width": width, "height": height, "rx": height / 2, "class": "track"}),
        el("rect", {"x": 0, "y": 0, "width": f"{width * fraction:.2f}", "height": height, "rx": height / 2, "class": f"fill fill-{tone}"}),
    ]
    if marker is not None:
        mx = width * min(max(marker, 0.0), 1.0)
        parts.append(el("line", {"x1": f"{mx:.2f}", "x2": f"{mx:.2f}", "y1": -2, "y2": height + 2, "class": "marker"}))
    return el(
        "svg",
        {"viewBox": f"0 -2 {width} {height + 4}", "preserveAspectRatio": "none", "class": "hbar", "aria-hidden": "true"},
        parts,
    )


def gauge(fraction: float | None, tone: str, label: str, text: str | None = None) -> Html:
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
    return el(
        "svg",
        {"viewBox": f"0 0 {width} {cy + stroke / 2 + 1:.0f}", "class": "gauge", "role": "img", "aria-label": label},
        el("title", None, label),
        el("path", {"d": arc, "class": "gauge-track", "stroke-width": stroke, "fill": "none", "stroke-linecap": "round"}),
        el(
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
        el("text", {"x": f"{cx:.1f}", "y": f"{cy - 4:.1f}", "text-anchor": "middle", "class": f"gauge-text text-{tone}"}, text or "")
        if text
        else None,
    )


def sparkline(values: list[float], label: str, width: int = 240, height: int = 48) -> Html:
    """Per-interval counts as a small filled line."""
    if not values:
        values = [0.0]
    peak = max(values) or 1.0
    n = len(values)
    step = width / max(n - 1, 1)
    coords = [(i * step, height - 2 - (height - 4) * v / peak) for i, v in enumerate(values)]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
    area = f"0,{height} {line} {width},{height}"
    return el(
        "svg",
        {"viewBox": f"0 0 {width} {height}", "preserveAspectRatio": "none", "class": "spark", "role": "img", "aria-label": label},
        el("title", None, label),
        el("polygon", {"points": area, "class": "spark-area"}),
        el("polyline", {"points": line, "class": "spark-line", "fill": "none"}),
    )
