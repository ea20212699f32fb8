"""
How fast one client may guess an operator credential (the UI token, the
master key), and never a lock on the right one.

Operator credentials are long random strings: what keeps them safe is
that wrong guesses are slow, not that the right one is kept out.  The
rules, per client source (an IPv4 address, or an IPv6 /64):

 - its first C{free} wrong guesses cost nothing: the next credential it
   presents is compared at once, whatever else happens;
 - every further wrong guess makes the source wait before its next
   credential is even compared: 1 s, 2 s, 4 s, ... at most C{max_delay};
 - across all sources, wrong guesses spend a shared budget
   (C{global_burst}, refilled at C{global_rate} a second); while it is
   spent, sources past their free guesses wait for it too (so many
   sources cannot add up their waits into a fast guessing rate);
 - a source is forgotten C{forget_after} seconds after its last wrong
   guess, and at most C{max_sources} sources are remembered.

While a source waits, its requests are refused B{without comparing} the
credential they carry.  Comparing and letting the right one through would
make every refusal a verdict ("wrong"), and the wait would slow nothing.
So nobody else's failures ever stop the operator (a source within its free
guesses is always heard, whatever the rest of the world does); only a
source that keeps guessing waits, and whoever shares its address with it.

Pure logic: the clock is passed in, nothing here does I/O.
"""

from __future__ import annotations

import collections
import ipaddress
import math

import attrs

DEFAULT_FREE = 5
DEFAULT_BASE_DELAY = 1.0
DEFAULT_MAX_DELAY = 60.0
DEFAULT_FORGET_AFTER = 900.0
DEFAULT_GLOBAL_BURST = 100
DEFAULT_GLOBAL_RATE = 1.0
DEFAULT_MAX_SOURCES = 10000


def source_of(host: str | None) -> str:
    """
    The throttled unit of a client address: an IPv4 address as it is, an
    IPv6 address's /64 (one host commonly owns a whole /64), an
    IPv4-mapped IPv6 address as IPv4, anything else (a UNIX socket) as
    itself or C{"unknown"}.
    """
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@attrs.define
class _Source:
    failures: int = 0
    last: float = 0.0
    # Whether a refusal was already reported since the last failure.
    reported: bool = False


class FailureThrottle:
    """Wrong-guess bookkeeping per source and in total (see the module docstring)."""

    def __init__(
        self,
        clock,
        *,
        free: int = DEFAULT_FREE,
        base_delay: float = DEFAULT_BASE_DELAY,
        max_delay: float = DEFAULT_MAX_DELAY,
        forget_after: float = DEFAULT_FORGET_AFTER,
        global_burst: int = DEFAULT_GLOBAL_BURST,
        global_rate: float = DEFAULT_GLOBAL_RATE,
        max_sources: int = DEFAULT_MAX_SOURCES,
    ) -> None:
        self._clock = clock
        self.free = free
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.forget_after = forget_after
        self.global_burst = global_burst
        self.global_rate = global_rate
        self.max_sources = max_sources
        self._sources: collections.OrderedDict[str, _Source] = collections.OrderedDict()
        self._tokens = float(global_burst)
        self._refilled = clock.seconds()

    # -- the schedule

    def delay_after(self, failures: int) -> float:
        """Seconds a source waits after its C{failures}-th wrong guess."""
        if failures <= self.free:
            return 0.0
        return min(self.max_delay, self.base_delay * 2 ** min(failures - self.free - 1, 62))

    def _refill(self, now: float) -> float:
        elapsed = max(0.0, now - self._refilled)
        self._tokens = min(float(self.global_burst), self._tokens + elapsed * self.global_rate)
        self._refilled = now
        return self._tokens

    def _record(self, source: str, now: float) -> _Source | None:
        record = self._sources.get(source)
        if record is not None and now - record.last >= self.forget_after:
            del self._sources[source]
            return None
        return record

    # -- the questions callers ask

    def wait(self, source: str) -> float | None:
        """
        Seconds C{source} must wait before its next credential may be
        compared, or None when it may be compared now.
        """
        now = self._clock.seconds()
        record = self._record(source, now)
        if record is None or record.failures <= self.free:
            return None
        waits = []
        until = record.last + self.delay_after(record.failures)
        if until > now:
            waits.append(until - now)
        tokens = self._refill(now)
        if tokens < 1.0 and self.global_rate > 0:
            waits.append((1.0 - tokens) / self.global_rate)
        elif tokens < 1.0:
            waits.append(self.forget_after)
        return max(waits) if waits else None

    def retry_after(self, source: str) -> int | None:
        """L{wait} in whole seconds, at least 1 (for C{Retry-After})."""
        wait = self.wait(source)
        return None if wait is None else max(1, math.ceil(wait))

    def first_refusal(self, source: str) -> bool:
        """
        True the first time it is asked after each wrong guess of
        C{source}: what to report (audit) once per wait, not per request.
        """
        record = self._sources.get(source)
        if record is None or record.reported:
            return False
        record.reported = True
        return True

    def failures(self, source: str) -> int:
        """Wrong guesses of C{source} still remembered."""
        record = self._record(source, self._clock.seconds())
        return 0 if record is None else record.failures

    # -- what happened

    def failed(self, source: str) -> int:
        """Count a wrong guess of C{source}; returns its remembered total."""
        now = self._clock.seconds()
        self._tokens = max(0.0, self._refill(now) - 1.0)
        record = self._record(source, now)
        if record is None:
            record = _Source()
        else:
            del self._sources[source]
        record.failures += 1
        record.last = now
        record.reported = False
        self._sources[source] = record  # most recent last
        while len(self._sources) > self.max_sources:
            self._sources.popitem(last=False)
        return record.failures

    def __len__(self) -> int:
        return len(self._sources)
