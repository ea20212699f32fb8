"""
Budget windows: rolling windows (C{"window": "24h"}), calendar periods
(C{"period": "daily"|"weekly"|"monthly"} in UTC or the agent's timezone),
the lifetime period (C{"period": "lifetime"}: everything ever spent counts,
nothing resets; the OR gate's C{period: none}),
reset schedules (C{"period": "every:6h"}, C{"every:14d@<epoch>"}: LiteLLM's
C{budget_duration}s that are not a day, a week or a month, see
L{schedule_bounds}), and the compact spend timeline that answers "how much
is in the window" and "when will enough of it leave".

Pure logic: times are epoch seconds (floats) passed in by the caller.

Timeline
========

L{SpendTimeline} keeps, per agent, the committed spend that can still count:
a deque of entries C{[first_ts, last_ts, cost_usd, requests,
unknown_cost_requests]} in time order, plus running totals.  Spend recorded
at C{ts} joins the newest entry when both fall in the same aligned bucket of
C{quantum} seconds (C{floor(ts / quantum)}), else starts a new entry.  The
quantum comes from L{QUANTA}, whose members each divide the next and divide
900 s, so:

 - no entry ever straddles a calendar-period boundary (local midnights are
   whole quarter hours in UTC for every timezone in use today);
 - coarsening the quantum (after a budget change) merges whole entries.

An entry counts in a rolling window while C{now < last_ts + window} and
leaves at C{last_ts + window}: merged spend is counted at most one quantum
longer than strictly needed, never shorter.  A single request is exact.
Entries are dropped as soon as they cannot count any more, so an agent holds
at most about C{window / quantum} entries (see L{quantum_for}).
"""

from __future__ import annotations

import datetime
import math
import re
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError


class BudgetError(ValueError):
    """A budget (or a budget policy file) is malformed; the message says why."""


DAILY = "daily"
WEEKLY = "weekly"
MONTHLY = "monthly"
#: Everything ever spent counts and the budget never resets (until an operator resets it).
LIFETIME = "lifetime"
PERIODS = (DAILY, WEEKLY, MONTHLY, LIFETIME)

#: Bucket sizes (seconds) of the spend timeline; each divides the next and 900.
QUANTA = (1, 5, 15, 60, 300, 900)

#: At most about this many timeline entries per rolling window.
MAX_ENTRIES_PER_WINDOW = 1000

_PERIOD_QUANTUM = {DAILY: 60, WEEKLY: 300, MONTHLY: 900, LIFETIME: 900}

#: The start and end of the lifetime period: it never began and never ends.
LIFETIME_BOUNDS = (0.0, math.inf)

# Money comparisons forgive float noise (0.1 * 10 is 0.9999999999999999).
EPSILON_USD = 1e-9

UTC = datetime.timezone.utc

# --------------------------------------------------------------------------
# Durations (Go's time.ParseDuration syntax, plus d and w)

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5
    "μs": 1e-6,  # U+03BC
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 604800.0,
}
_COMPONENT = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h|d|w)")


def parse_window(text: Any) -> float:
    """
    Seconds of a rolling window written as a Go duration (C{"1h"},
    C{"24h"}, C{"90m"}, C{"1h30m"}, C{"0.5h"}), also accepting C{d} (24 h)
    and C{w} (7 d).  Surrounding spaces are ignored.

    @raise BudgetError: not a string, not a duration, or not positive.
    """
    if not isinstance(text, str):
        raise BudgetError("'window' must be a duration string such as \"1h\" or \"24h\"")
    s = text.strip()
    body = s[1:] if s.startswith("+") else s
    if not body:
        raise BudgetError("'window' is empty")
    total = 0.0
    pos = 0
    while pos < len(body):
        match = _COMPONENT.match(body, pos)
        if match is None:
            raise BudgetError(
                f"'window' {text!r} is not a duration (use e.g. \"30m\", \"1h\", \"24h\", \"7d\")"
            )
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if not math.isfinite(total) or total <= 0:
        raise BudgetError(f"'window' {text!r} must be a positive duration")
    return total


# --------------------------------------------------------------------------
# Timezones and bounds


def resolve_timezone(tz: Any) -> datetime.tzinfo:
    """
    A tzinfo for C{tz}: L{None} or C{""} is UTC, a string is an IANA name
    (C{"America/Los_Angeles"}; C{"UTC"}), a tzinfo is returned as is.

    @raise BudgetError: an unknown or invalid name.
    """
    if tz is None or tz == "":
        return UTC
    if isinstance(tz, datetime.tzinfo):
        return tz
    if not isinstance(tz, str):
        raise BudgetError(f"timezone must be an IANA name such as \"Europe/Paris\", not {tz!r}")
    name = tz.strip()
    if name.upper() in ("UTC", "Z", "ETC/UTC"):
        return UTC
    try:
        return _zone(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise BudgetError(f"unknown timezone {tz!r} (use an IANA name such as \"Europe/Paris\")") from None


_ZONES: dict[str, ZoneInfo] = {}


def _zone(name: str) -> ZoneInfo:
    zone = _ZONES.get(name)
    if zone is None:
        if len(_ZONES) > 256:
            _ZONES.clear()
        zone = _ZONES[name] = ZoneInfo(name)
    return zone


def _local_midnight(date: datetime.date, tz: datetime.tzinfo) -> float:
    # fold=0: on a day whose midnight does not exist (DST gap at 00:00) this
    # is the first instant of the day; on a day where midnight happens twice
    # it is the first of the two.
    return datetime.datetime(date.year, date.month, date.day, tzinfo=tz).timestamp()


# --------------------------------------------------------------------------
# Reset schedules

SCHEDULE_PREFIX = "every:"
_SCHEDULE = re.compile(r"every:(\d{1,10})(mo|[smhdw])(?:@(-?\d{1,12}))?")
_SCHEDULE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DAY = 86400


def _parse_schedule(spec: str) -> tuple[int, str, int | None]:
    match = _SCHEDULE.fullmatch(spec)
    if match is None:
        raise BudgetError(
            f"'period' {spec!r} is not a reset schedule (\"every:6h\", \"every:14d@<epoch>\", \"every:2mo@<epoch>\")"
        )
    value, unit = int(match.group(1)), match.group(2)
    anchor = int(match.group(3)) if match.group(3) is not None else None
    if value <= 0:
        raise BudgetError(f"'period' {spec!r} must be positive")
    length = value * _SCHEDULE_UNITS.get(unit, 0)
    if unit == "mo" or length >= _DAY:
        if anchor is None:
            raise BudgetError(f"'period' {spec!r} needs the day it counts from (@<epoch>)")
    return value, unit, anchor


def is_schedule(period: Any) -> bool:
    return isinstance(period, str) and period.startswith(SCHEDULE_PREFIX)


def _add_months(date: datetime.date, months: int) -> datetime.date:
    index = date.year * 12 + date.month - 1 + months
    return datetime.date(index // 12, index % 12 + 1, 1)


def schedule_bounds(spec: str, now: float, tz: Any = None) -> tuple[float, float]:
    """
    C{(start, end)} of the period of a reset schedule that contains C{now}:

      - shorter than a day (C{every:30s}, C{every:15m}, C{every:6h}):
        multiples of the length from the local midnight of C{now}'s day,
        the day's last period ending at the next midnight (as LiteLLM
        aligns sub-day resets: a C{6h} budget resets at 00:00, 06:00,
        12:00 and 18:00);
      - a day or more (C{every:14d@<epoch>}, C{every:36h@<epoch>}): that
        length again and again from the local midnight of the anchor's
        day (LiteLLM's first reset of a C{14d} budget is at the midnight
        14 days after the day it was set);
      - months (C{every:2mo@<epoch>}): that many calendar months from the
        first of the anchor's month.
    """
    value, unit, anchor = _parse_schedule(spec)
    zone = resolve_timezone(tz)
    if unit == "mo":
        first = datetime.datetime.fromtimestamp(anchor, zone).date().replace(day=1)  # type: ignore[arg-type]
        local = datetime.datetime.fromtimestamp(now, zone).date()
        elapsed = (local.year - first.year) * 12 + local.month - first.month
        first_day = _add_months(first, (elapsed // value) * value)
        return _local_midnight(first_day, zone), _local_midnight(_add_months(first_day, value), zone)
    length = value * _SCHEDULE_UNITS[unit]
    if length < _DAY:
        local = datetime.datetime.fromtimestamp(now, zone).date()
        midnight = _local_midnight(local, zone)
        following = _local_midnight(local + datetime.timedelta(days=1), zone)
        begins = midnight + math.floor((now - midnight) / length) * length
        return begins, min(begins + length, following)
    base = _local_midnight(datetime.datetime.fromtimestamp(anchor, zone).date(), zone)  # type: ignore[arg-type]
    begins = base + math.floor((now - base) / length) * length
    return begins, begins + length


def schedule_quantum(spec: str) -> int:
    """The largest timeline bucket that never straddles one of the schedule's boundaries."""
    value, unit, _anchor = _parse_schedule(spec)
    if unit == "mo":
        return QUANTA[-1]
    length = value * _SCHEDULE_UNITS[unit]
    best = QUANTA[0]
    for q in QUANTA:
        if length % q == 0 and q * MAX_ENTRIES_PER_WINDOW <= max(length, q):
            best = q
    return best


def check_period(period: Any) -> str:
    """A budget's C{period}: a calendar period name, or a reset schedule.  @raise BudgetError: anything else."""
    if isinstance(period, str) and period.strip().lower() in PERIODS:
        return period.strip().lower()
    if is_schedule(period):
        _parse_schedule(period.strip())
        return period.strip()
    raise BudgetError(f"'period' must be one of {', '.join(PERIODS)} or a reset schedule, not {period!r}")


def period_bounds(period: str, now: float, tz: Any = None) -> tuple[float, float]:
    """
    C{(start, end)} in epoch seconds of the calendar period containing
    C{now}, in C{tz}: the local day, the ISO week (Monday 00:00 to the next
    Monday 00:00), or the month.  C{start <= now < end}.  Days are not
    assumed to last 86400 s: a DST change day is 23 or 25 hours long.  The
    lifetime period is C{(0, inf)}: its end is never a time to announce.
    """
    if is_schedule(period):
        return schedule_bounds(period, now, tz)
    if period == LIFETIME:
        return LIFETIME_BOUNDS
    zone = resolve_timezone(tz)
    local = datetime.datetime.fromtimestamp(now, zone).date()
    if period == DAILY:
        first = local
        following = local + datetime.timedelta(days=1)
    elif period == WEEKLY:
        first = local - datetime.timedelta(days=local.weekday())
        following = first + datetime.timedelta(days=7)
    elif period == MONTHLY:
        first = local.replace(day=1)
        following = (first + datetime.timedelta(days=32)).replace(day=1)
    else:
        raise BudgetError(f"unknown period {period!r} (use one of {', '.join(PERIODS)})")
    return _local_midnight(first, zone), _local_midnight(following, zone)


def window_bounds(budget: Any, now: float, tz: Any = None) -> tuple[float, float]:
    """
    C{(start, end)} of the spend that counts at C{now}: for a rolling
    window C{(now - window, now)} (an entry at C{ts} counts while
    C{ts > start}); for a calendar period its bounds (L{period_bounds}),
    counting C{start <= ts}.
    """
    if budget.period is not None:
        return period_bounds(budget.period, now, tz)
    return now - budget.window_seconds, now


def quantum_for(budget: Any) -> int:
    """The timeline bucket size (seconds) suited to C{budget}'s window."""
    if budget.period is not None:
        if is_schedule(budget.period):
            return schedule_quantum(budget.period)
        return _PERIOD_QUANTUM[budget.period]
    best = QUANTA[0]
    for q in QUANTA:
        if q * MAX_ENTRIES_PER_WINDOW <= budget.window_seconds:
            best = q
    return best


# --------------------------------------------------------------------------
# The timeline


class SpendTimeline:
    """
    Committed spend of one agent, bounded by its window (see the module
    docstring).  C{cost}, C{requests} and C{unknown} are the totals of the
    entries kept; call L{prune} with the current budget before reading them.
    """

    __slots__ = ("entries", "cost", "requests", "unknown", "quantum")

    def __init__(self, quantum: int = 60) -> None:
        self.entries: deque[list] = deque()
        self.cost = 0.0
        self.requests = 0
        self.unknown = 0
        self.quantum = quantum

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, ts: float, cost: float, requests: int = 1, unknown: int = 0) -> None:
        """Record spend at C{ts} (normally now; never before the newest entry)."""
        entries = self.entries
        if entries:
            last = entries[-1]
            if ts < last[1]:
                ts = last[1]  # clock stepped back: count it later, not earlier
            if math.floor(ts / self.quantum) == math.floor(last[0] / self.quantum):
                last[1] = ts
                last[2] += cost
                last[3] += requests
                last[4] += unknown
                self._count(cost, requests, unknown)
                return
        entries.append([ts, ts, cost, requests, unknown])
        self._count(cost, requests, unknown)

    def _count(self, cost: float, requests: int, unknown: int) -> None:
        self.cost += cost
        self.requests += requests
        self.unknown += unknown

    def set_quantum(self, quantum: int) -> None:
        """Use C{quantum} from now on; a coarser one merges existing entries."""
        if quantum == self.quantum:
            return
        coarser = quantum > self.quantum
        self.quantum = quantum
        if coarser and len(self.entries) > 1:
            self._rebuild(list(self.entries))

    def load(self, rows: Iterable[tuple[float, float, int, int]]) -> None:
        """Add C{(ts, cost, requests, unknown)} rows in any order."""
        merged = list(self.entries)
        merged.extend([ts, ts, cost, requests, unknown] for ts, cost, requests, unknown in rows)
        merged.sort(key=lambda e: (e[0], e[1]))
        self._rebuild(merged)

    def clear(self) -> None:
        self.entries.clear()
        self.cost = 0.0
        self.requests = 0
        self.unknown = 0

    def _rebuild(self, items: list[list]) -> None:
        self.clear()
        q = self.quantum
        entries = self.entries
        for first, last, cost, requests, unknown in items:
            if entries and math.floor(first / q) == math.floor(entries[-1][0] / q):
                tail = entries[-1]
                tail[1] = max(tail[1], last)
                tail[2] += cost
                tail[3] += requests
                tail[4] += unknown
            else:
                entries.append([first, last, cost, requests, unknown])
            self._count(cost, requests, unknown)

    def prune(self, budget: Any, now: float, tz: Any = None) -> None:
        """Drop the entries that no longer count under C{budget} at C{now}."""
        entries = self.entries
        if budget.period is not None:
            start, _ = period_bounds(budget.period, now, tz)
            while entries and entries[0][1] < start:
                self._drop()
        else:
            window = budget.window_seconds
            while entries and entries[0][1] + window <= now:
                self._drop()
        if not entries:
            self.clear()  # no float residue once empty

    def _drop(self) -> None:
        _, _, cost, requests, unknown = self.entries.popleft()
        self.cost -= cost
        self.requests -= requests
        self.unknown -= unknown

    def leaving(self) -> Iterator[tuple[float, float, int]]:
        """C{(last_ts, cost, requests)} of each entry, oldest first."""
        for _first, last, cost, requests, _unknown in self.entries:
            yield last, cost, requests


def retry_after(
    budget: Any,
    spend: Iterable[tuple[float, float, int]],
    now: float,
    tz: Any = None,
    free_usd: float = 0.0,
    free_requests: int = 0,
) -> float | None:
    """
    Seconds from C{now} until at least C{free_usd} dollars and
    C{free_requests} requests of the committed C{spend} have left the
    window, i.e. until a request needing that much room fits.

    @param spend: C{(ts, cost_usd, requests)} of committed spend in the
        window, oldest first (L{SpendTimeline.leaving}).
    @return: C{0.0} when nothing needs to leave; for a calendar period the
        time to the next boundary (everything leaves then); for a rolling
        window the moment the oldest spend that makes enough room leaves
        (C{ts + window}); L{None} when even an empty window would not make
        enough room.
    """
    need_usd = free_usd > EPSILON_USD
    need_requests = free_requests > 0
    if not need_usd and not need_requests:
        return 0.0
    if budget.period is not None:
        _, end = period_bounds(budget.period, now, tz)
        if not math.isfinite(end):
            return None  # a lifetime budget: nothing ever leaves
        total_usd = 0.0
        total_requests = 0
        for _, cost, requests in spend:
            total_usd += cost
            total_requests += requests
        if (need_usd and total_usd < free_usd - EPSILON_USD) or (
            need_requests and total_requests < free_requests
        ):
            return None
        return end - now
    window = budget.window_seconds
    freed_usd = 0.0
    freed_requests = 0
    for ts, cost, requests in spend:
        freed_usd += cost
        freed_requests += requests
        if (not need_usd or freed_usd >= free_usd - EPSILON_USD) and (
            not need_requests or freed_requests >= free_requests
        ):
            return max(0.0, ts + window - now)
    return None
