"""
Numbers and times as an operator reads them at a glance: dollars, counts,
percentages, latencies, "5 min ago".  Plain text, escaped by the pages'
templates like any other text.
"""

from __future__ import annotations

import math
import time
from decimal import ROUND_HALF_UP, Decimal

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
