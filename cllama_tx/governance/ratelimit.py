"""
Requests-per-minute and tokens-per-minute limits, per key (usually an agent).

Pure logic with an injected clock (anything with C{seconds()}, e.g. the
reactor or L{twisted.internet.task.Clock}); no timers, no I/O.

The window
==========

Each key has a ring of L{SLOTS} one-second buckets (the current second and
the L{WINDOW} seconds before it), one ring for requests and one for tokens,
plus running totals.  Something counted at time C{t} sits in bucket
C{floor(t)} and leaves the window at C{floor(t) + SLOTS}, i.e. between 60 and
61 seconds after C{t}.  So in any 60-second interval a key is never admitted
more than its limits (the window errs on the strict side by under a second,
never on the generous side).

Every call costs a bounded constant (at most L{SLOTS} bucket steps), and each
key holds two fixed-size rings whatever its traffic.  A key with nothing left
in its window is forgotten (it would behave exactly like a new key), so
memory is bounded by the keys active in the last minute.

Reserve, then settle
====================

L{RateLimiter.check} admits or refuses a request; an admitted request is
counted at once (one request, C{tokens} tokens: an estimate), so concurrent
requests cannot overshoot.  When the real usage is known,
L{RateLimiter.settle} corrects the token count by C{actual - estimated}.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import attrs

WINDOW = 60
SLOTS = WINDOW + 1

RPM = "rpm"
TPM = "tpm"

# Bucket boundaries are whole seconds; this absorbs float rounding when a
# caller waits exactly C{retry_after} (0.1 + 60.9 may give 60.99999999999999).
_EPSILON = 1e-9


def _second(t: float) -> int:
    return math.floor(t + _EPSILON)


@attrs.frozen
class Admission:
    """
    The answer to L{RateLimiter.check}.

     - C{allowed}: the request was admitted (and is now counted).
     - C{retry_after}: seconds until this same request would be admitted if
       nothing else were admitted meanwhile (C{0.0} when allowed); exact, not
       the whole window.  For an HTTP C{Retry-After}, round it up.
     - C{reason}: C{"rpm"} or C{"tpm"}, the limit that holds the request back
       longest, or C{None} when allowed.
     - C{never}: the request can never be admitted under these limits (more
       tokens than the whole C{tpm}, or C{rpm == 0}); C{retry_after} is then
       L{WINDOW} only so that a client that ignores C{never} backs off.
     - C{at}: the clock time of the check; pass it to
       L{RateLimiter.settle} as C{admitted_at} for an exact settle.
    """

    allowed: bool
    retry_after: float
    reason: str | None
    never: bool = False
    at: float = 0.0


class _Window:
    """One key's rings.  C{head} is the newest second the rings have seen."""

    __slots__ = ("head", "last_add", "requests", "tokens", "request_total", "token_total")

    def __init__(self, second: int):
        self.head = second
        self.last_add = second
        self.requests = [0] * SLOTS
        self.tokens = [0] * SLOTS
        self.request_total = 0
        self.token_total = 0

    def advance(self, second: int) -> None:
        """Move the window to C{second}, emptying the buckets that left it."""
        if second <= self.head:
            return  # same second, or a clock that stepped back: keep counting
        if second - self.head >= SLOTS:
            for i in range(SLOTS):
                self.requests[i] = 0
                self.tokens[i] = 0
            self.request_total = 0
            self.token_total = 0
        else:
            for s in range(self.head + 1, second + 1):
                i = s % SLOTS
                self.request_total -= self.requests[i]
                self.token_total -= self.tokens[i]
                self.requests[i] = 0
                self.tokens[i] = 0
        self.head = second

    def in_window(self, second: int) -> bool:
        return self.head - SLOTS < second <= self.head

    def wait(self, ring: list, need: int, now: float) -> float:
        """
        Seconds from C{now} until at least C{need} leaves C{ring}: buckets
        leave oldest first, bucket C{b} at time C{b + SLOTS}.
        """
        freed = 0
        for b in range(self.head - SLOTS + 1, self.head + 1):
            freed += ring[b % SLOTS]
            if freed >= need:
                return max(0.0, (b + SLOTS) - now)
        return float(SLOTS)  # unreachable while need <= total

    def add_tokens(self, second: int, amount: int) -> None:
        self.tokens[second % SLOTS] += amount
        self.token_total += amount

    def refund_tokens(self, second: int, amount: int) -> int:
        """Take up to C{amount} from bucket C{second}; return what was taken."""
        i = second % SLOTS
        taken = min(amount, self.tokens[i])
        self.tokens[i] -= taken
        self.token_total -= taken
        return taken


def _limit(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be None or an integer >= 0, not {value!r}")
    return value


def _tokens(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, not {value!r}")
    if isinstance(value, float):
        if math.isinf(value):
            raise ValueError(f"{name} must be finite")
        return math.ceil(value)
    return value


class RateLimiter:
    """
    Sliding one-minute request and token limits per key.

    Limits are given on every call, so a changed limit applies at once to
    what the window already holds.
    """

    def __init__(self, clock):
        self._clock = clock
        # Ordered by the second of their last addition, oldest first.
        self._states: OrderedDict[str, _Window] = OrderedDict()
        # Before this second nothing can expire: the first key's last
        # addition + SLOTS when last looked at (None: look again).  Any
        # insertion or move drops it, so it never outlives the first key.
        self._quiet_until: int | None = None

    def __len__(self) -> int:
        """How many keys hold state (after forgetting the idle ones)."""
        self._expire(_second(self._clock.seconds()))
        return len(self._states)

    def _expire(self, second: int) -> None:
        """Forget keys whose whole window is empty: amortised O(1)."""
        quiet = self._quiet_until
        if quiet is not None and second < quiet:
            return
        states = self._states
        while states:
            key, state = next(iter(states.items()))
            if state.last_add + SLOTS > second:
                self._quiet_until = state.last_add + SLOTS
                return
            del states[key]
        self._quiet_until = None

    def _state(self, key: str, second: int) -> _Window | None:
        self._expire(second)
        state = self._states.get(key)
        if state is not None:
            state.advance(second)
        return state

    def _touch(self, key: str, state: _Window, second: int) -> None:
        if second > state.last_add:
            state.last_add = second
            self._states.move_to_end(key)
            self._quiet_until = None

    def usage(self, key: str) -> tuple[int, int]:
        """C{(requests, tokens)} counted for C{key} in the current window."""
        state = self._state(key, _second(self._clock.seconds()))
        if state is None:
            return (0, 0)
        return (state.request_total, state.token_total)

    def check(self, key: str, rpm: int | None, tpm: int | None, tokens: int) -> Admission:
        """
        Admit one request of (an estimated) C{tokens} tokens for C{key}, or
        say when it could be.  C{None} means no limit of that kind; C{0}
        admits nothing (C{never}).  An admitted request is counted at once,
        even with no limits (so a limit set later sees recent traffic).

        @raise ValueError: a negative or non-integer limit, negative tokens.
        """
        verdict = self.admit(key, rpm, tpm, tokens)
        return verdict if isinstance(verdict, Admission) else Admission(True, 0.0, None, at=verdict)

    def admit(self, key: str, rpm: int | None, tpm: int | None, tokens: int) -> float | Admission:
        """
        L{check} for the request path: an admitted request gets only the
        clock time it was admitted at (its C{at}, for L{settle}), without an
        L{Admission} object; a refused one gets the refusal.
        """
        # Whole non-negative numbers (every call of the request path) skip the checks.
        if rpm is not None and (type(rpm) is not int or rpm < 0):
            rpm = _limit("rpm", rpm)
        if tpm is not None and (type(tpm) is not int or tpm < 0):
            tpm = _limit("tpm", tpm)
        if type(tokens) is not int or tokens < 0:
            tokens = _tokens("tokens", tokens)
        now = self._clock.seconds()
        second = _second(now)

        if tpm is not None and tokens > tpm:
            return Admission(False, float(WINDOW), TPM, never=True, at=now)
        if rpm == 0:
            return Admission(False, float(WINDOW), RPM, never=True, at=now)

        state = self._state(key, second)
        if state is not None:
            waits = []
            if rpm is not None and state.request_total + 1 > rpm:
                need = state.request_total + 1 - rpm
                waits.append((state.wait(state.requests, need, now), RPM))
            if tpm is not None and state.token_total + tokens > tpm:
                need = state.token_total + tokens - tpm
                waits.append((state.wait(state.tokens, need, now), TPM))
            if waits:
                # Both limits must clear; each only clears further with time.
                retry_after, reason = max(waits, key=lambda w: w[0])
                return Admission(False, retry_after, reason, at=now)
        else:
            state = self._states[key] = _Window(second)

        second = max(second, state.head)  # a clock that stepped back
        i = second % SLOTS
        state.requests[i] += 1
        state.request_total += 1
        state.add_tokens(second, tokens)
        self._touch(key, state, second)
        return now

    def absorb(self, key: str, at: float, tokens: int) -> None:
        """
        Count one request another instance admitted at C{at} with C{tokens}
        (estimated) tokens, as if admitted here (shared store: read under
        the key's lock, so every instance's window holds the whole fleet's
        traffic).  A request already out of the window is ignored; one
        stamped ahead of this clock counts in the current second.
        """
        tokens = _tokens("tokens", tokens)
        second = _second(self._clock.seconds())
        state = self._state(key, second)
        if state is None:
            state = self._states[key] = _Window(second)
        head = max(second, state.head)
        target = min(_second(at), head)
        if not state.in_window(target):
            return
        state.requests[target % SLOTS] += 1
        state.request_total += 1
        state.add_tokens(target, tokens)
        self._touch(key, state, target)

    def settle(
        self,
        key: str,
        estimated_tokens: int,
        actual_tokens: int,
        admitted_at: float | None = None,
    ) -> None:
        """
        Correct an admitted request's reservation by
        C{actual_tokens - estimated_tokens}.

        With C{admitted_at} (the L{Admission}'s C{at}) the correction lands in
        the reservation's own bucket while that is still in the window, so
        the tokens count as of admission; once it has left the window, extra
        tokens are charged to the current second and a refund is dropped
        (there is nothing left to refund).  Without C{admitted_at}, extra
        tokens are charged to the current second and a refund is taken from
        the most recent seconds backwards, never below zero.
        """
        estimated, actual = estimated_tokens, actual_tokens
        if type(estimated) is not int or estimated < 0:
            estimated = _tokens("estimated_tokens", estimated)
        if type(actual) is not int or actual < 0:
            actual = _tokens("actual_tokens", actual)
        delta = actual - estimated
        if delta == 0:
            return
        second = _second(self._clock.seconds())
        state = self._state(key, second)

        target = None
        if admitted_at is None:
            target = second if state is None else max(second, state.head)
        elif state is not None and state.in_window(_second(admitted_at)):
            target = _second(admitted_at)

        if delta > 0:
            if state is None:
                state = self._states[key] = _Window(second)
            if target is None:
                target = max(second, state.head)
            state.add_tokens(target, delta)
            self._touch(key, state, target)
            return

        if state is None or target is None:
            return
        refund = -delta
        if admitted_at is not None:
            state.refund_tokens(target, refund)
            return
        for s in range(target, target - SLOTS, -1):
            refund -= state.refund_tokens(s, refund)
            if refund <= 0:
                return
