"""
Key pools (CONTRACT 3.3): which key to use next, and what an upstream
failure means for the key that got it.

Pure logic: time comes from an injected clock with C{seconds()}; state
changes are reported through callbacks, never written anywhere from here.
Nothing in this module puts a secret into an event, a message or a repr.
"""

from __future__ import annotations

import math
import time
from email.utils import mktime_tz, parsedate_tz
from typing import Callable, Iterable

import attrs

from .store import COOLDOWN, DEAD, DISABLED, READY, KeyRecord, format_timestamp

MAX_TRIES = 5
"""How many keys the caller tries for one request before giving up."""

DEFAULT_COOLDOWN = 10
MAX_COOLDOWN = 60
MIN_COOLDOWN = 1

# How much of an error body is searched for quota words.
_BODY_SCAN_LIMIT = 64 * 1024

# Always means the quota or credit is gone (OpenAI's error code).
_EXHAUSTED_CERTAIN = (b"insufficient_quota",)
# Usually means the quota, billing or credit is gone...
_EXHAUSTED_WORDS = (b"quota", b"billing", b"credit")
# ...unless the answer also says to come back soon: Gemini's per-minute rate
# limit says "You exceeded your current quota, please check your plan and
# billing details ... Please retry in 38s" and carries a retryDelay.  Killing
# a key for a per-minute limit would be far worse than retrying a spent key
# once a minute.
_TRANSIENT_HINTS = (
    b"retry",
    b"try again",
    b"per minute",
    b"per_minute",
    b"perminute",
    b"per second",
    b"rate limit",
    b"rate_limit",
    b"ratelimit",
    b"rate-limit",
)

ACTION_DEAD = "dead"
ACTION_COOLDOWN = "cooldown"


@attrs.frozen
class Verdict:
    """What an upstream failure means for the key: C{dead} or C{cooldown}."""

    action: str
    reason: str
    cooldown_seconds: int | None = None
    status: int | None = None


def parse_retry_after(value: bytes | None, now: float) -> float | None:
    """
    Seconds to wait from a C{Retry-After} value (delta seconds or an
    HTTP-date), or L{None} when absent or unreadable.
    """
    if not value:
        return None
    text = value.strip().decode("latin-1")
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds):
            return seconds
        return None
    parsed = parsedate_tz(text)
    if parsed is None:
        return None
    try:
        return mktime_tz(parsed) - now
    except (OverflowError, ValueError):
        return None


def _cooldown_for(retry_after: bytes | None, now: float) -> int:
    seconds = parse_retry_after(retry_after, now)
    if seconds is None:
        return DEFAULT_COOLDOWN
    return int(min(MAX_COOLDOWN, max(MIN_COOLDOWN, math.ceil(seconds))))


def classify_failure(
    status: int,
    retry_after: bytes | None,
    body: bytes,
    now: float | None = None,
) -> Verdict | None:
    """
    What an upstream answer says about the key that was used:

      - 401: the key is dead (C{unauthorized});
      - 402, or a 429 saying the quota, billing or credit is exhausted: dead;
      - any other 429: cool the key down for C{Retry-After} seconds (delta
        seconds or an HTTP-date; default 10, at most 60, at least 1);
      - anything else: L{None}, not a key problem.

    C{now} (epoch seconds) is needed only for an HTTP-date C{Retry-After};
    pass the clock's time (the wall clock is used when omitted).
    """
    if status == 401:
        return Verdict(ACTION_DEAD, "unauthorized", None, status)
    if status == 402:
        return Verdict(ACTION_DEAD, "payment required", None, status)
    if status != 429:
        return None
    text = (body or b"")[:_BODY_SCAN_LIMIT].lower()
    if any(word in text for word in _EXHAUSTED_CERTAIN):
        return Verdict(ACTION_DEAD, "quota exhausted", None, status)
    if any(word in text for word in _EXHAUSTED_WORDS):
        transient = bool(retry_after) or any(h in text for h in _TRANSIENT_HINTS)
        if not transient:
            return Verdict(ACTION_DEAD, "quota exhausted", None, status)
    if now is None:
        now = time.time()
    return Verdict(ACTION_COOLDOWN, "rate limited", _cooldown_for(retry_after, now), status)


def mask_secret(secret: str | None) -> str:
    """
    C{sk-a…wxyz} for secrets of 16 characters or more; shorter ones (where
    eight characters would give most of it away) are masked completely.
    """
    if not secret:
        return ""
    if len(secret) < 16:
        return "…" * 4
    return f"{secret[:4]}…{secret[-4:]}"


class UnknownKey(LookupError):
    """No key with that id in the pool."""

    def __init__(self, provider: str, key_id: str) -> None:
        super().__init__(f"provider {provider!r} has no key {key_id!r}")
        self.provider = provider
        self.key_id = key_id


KEYLESS = KeyRecord(
    id="keyless", label="no key needed", secret="", source="seed", state=READY
)
"""
What a keyless pool (auth C{none}) hands out: no key is needed.  Reporting a
failure for it does nothing; there is no other key to try.
"""


class KeyPool:
    """
    The ordered keys of one provider and which one is active.

    C{on_change(event)} is called for every state change and management
    operation with the contract's C{provider_pool} audit fields
    (C{provider}, C{key_id}, C{action}, C{reason}, C{cooldown_until}) and
    never a secret.  Actions: C{dead}, C{cooldown}, C{ready} (a cooldown
    ended), C{added}, C{activated}, C{disabled}, C{deleted}.
    C{on_dirty()} is called whenever anything worth saving changed,
    including error details that do not change a key's state.
    """

    def __init__(
        self,
        provider: str,
        keys: Iterable[KeyRecord],
        clock,
        active_key_id: str | None = None,
        keyless: bool = False,
        on_change: Callable[[dict], None] | None = None,
        on_dirty: Callable[[], None] | None = None,
    ) -> None:
        self.provider = provider
        self.keyless = keyless
        self.on_change = on_change
        self.on_dirty = on_dirty
        self._clock = clock
        self.reset(keys, active_key_id)

    def __repr__(self) -> str:
        return (
            f"<KeyPool {self.provider!r} keys={len(self._keys)} "
            f"active={self.active_key_id!r} keyless={self.keyless}>"
        )

    # --- state -----------------------------------------------------------

    def reset(self, keys: Iterable[KeyRecord], active_key_id: str | None) -> None:
        """Replace the keys (used when the configuration is reloaded)."""
        self._keys: list[KeyRecord] = []
        self._by_id: dict[str, KeyRecord] = {}
        for key in keys:
            if key.id in self._by_id:
                raise ValueError(f"provider {self.provider!r}: key id {key.id!r} appears twice")
            self._keys.append(key)
            self._by_id[key.id] = key
        if active_key_id not in self._by_id:
            active_key_id = self._keys[0].id if self._keys else None
        self.active_key_id = active_key_id
        self._count_enabled()

    def _count_enabled(self) -> None:
        self.enabled_count = sum(1 for k in self._keys if k.state != DISABLED)

    @property
    def keys(self) -> tuple[KeyRecord, ...]:
        return tuple(self._keys)

    def get(self, key_id: str) -> KeyRecord:
        try:
            return self._by_id[key_id]
        except KeyError:
            raise UnknownKey(self.provider, key_id) from None

    def _emit(self, key: KeyRecord, action: str, reason: str | None) -> None:
        event = {
            "provider": self.provider,
            "key_id": key.id,
            "action": action,
            "reason": reason,
            "cooldown_until": format_timestamp(key.cooldown_until)
            if key.state == COOLDOWN
            else None,
        }
        if self.on_change is not None:
            self.on_change(event)
        self._dirty()

    def _dirty(self) -> None:
        if self.on_dirty is not None:
            self.on_dirty()

    def _usable(self, key: KeyRecord, now: float) -> bool:
        state = key.state
        if state == READY:
            return True
        if state == COOLDOWN:
            if key.cooldown_until is None or key.cooldown_until <= now:
                key.state = READY
                key.cooldown_until = None
                self._emit(key, READY, "cooldown ended")
                return True
        return False

    # --- the request path -------------------------------------------------

    def acquire(self, exclude: set[str] | frozenset[str] = frozenset()) -> KeyRecord | None:
        """
        The key to use: the active key if usable, else the next usable one
        after it in order (wrapping around), skipping ids in C{exclude}.  A
        key whose cooldown has passed becomes ready again.  L{None} when no
        key is usable; L{KEYLESS} for a keyless pool.
        """
        if self.keyless:
            return KEYLESS
        keys = self._keys
        count = len(keys)
        if not count:
            return None
        now = self._clock.seconds()
        active = self._by_id.get(self.active_key_id) if self.active_key_id else None
        start = 0
        if active is not None:
            if active.id not in exclude and self._usable(active, now):
                return active
            start = next(i for i, k in enumerate(keys) if k is active) + 1
        for offset in range(count):
            key = keys[(start + offset) % count]
            if key is active or key.id in exclude:
                continue
            if self._usable(key, now):
                return key
        return None

    def report(self, key: KeyRecord, verdict: Verdict | None) -> bool:
        """
        Apply C{verdict} (from L{classify_failure}) to C{key}: record the
        error and mark it dead or cooling down.  A key that is already dead
        stays dead; a disabled one stays disabled; a cooldown only extends.

        Returns whether trying another key makes sense: L{False} for no
        verdict and for a keyless pool, whose upstream answer should simply
        be passed on.
        """
        if verdict is None or key is KEYLESS or self.keyless:
            return False
        record = self._by_id.get(key.id)
        if record is None:
            # Deleted (or reloaded away) while the request was in flight.
            return True
        now = self._clock.seconds()
        record.last_error_code = verdict.status
        record.last_error_reason = verdict.reason
        record.last_error_at = now
        if record.state == DISABLED:
            self._dirty()
            return True
        if verdict.action == ACTION_DEAD:
            if record.state != DEAD:
                record.state = DEAD
                record.cooldown_until = None
                self._emit(record, DEAD, verdict.reason)
                return True
        elif verdict.action == ACTION_COOLDOWN and record.state != DEAD:
            until = now + (verdict.cooldown_seconds or DEFAULT_COOLDOWN)
            current = record.cooldown_until if record.state == COOLDOWN else None
            if current is None or until > current:
                record.state = COOLDOWN
                record.cooldown_until = until
                self._emit(record, COOLDOWN, verdict.reason)
                return True
        self._dirty()
        return True

    def retry_after(self) -> int | None:
        """
        Whole seconds (at least 1) until a key may be usable again: until the
        earliest cooldown ends, or 1 when some key is ready already.  L{None}
        when no key will come back by itself (all dead or disabled, no keys,
        or a keyless pool).
        """
        if self.keyless:
            return None
        now = self._clock.seconds()
        earliest = None
        for key in self._keys:
            if key.state == READY:
                return 1
            if key.state == COOLDOWN:
                until = key.cooldown_until if key.cooldown_until is not None else now
                if earliest is None or until < earliest:
                    earliest = until
        if earliest is None:
            return None
        return max(1, math.ceil(earliest - now))

    # --- management (operator UI) ----------------------------------------

    def add(self, key: KeyRecord) -> None:
        """
        Append C{key}; it becomes active when the pool had no active key.

        @raise ValueError: the id or the secret is already in the pool.
        """
        if key.id in self._by_id:
            raise ValueError(f"provider {self.provider!r} already has a key {key.id!r}")
        for existing in self._keys:
            if existing.secret == key.secret:
                raise ValueError(
                    f"provider {self.provider!r} already has this key (as {existing.id!r})"
                )
        self._keys.append(key)
        self._by_id[key.id] = key
        if self.active_key_id is None:
            self.active_key_id = key.id
        self._count_enabled()
        self._emit(key, "added", "operator")

    def activate(self, key_id: str) -> None:
        """Make C{key_id} the active key and ready, whatever its state."""
        key = self.get(key_id)
        key.state = READY
        key.cooldown_until = None
        self.active_key_id = key_id
        self._count_enabled()
        self._emit(key, "activated", "operator")

    def disable(self, key_id: str) -> None:
        """Take C{key_id} out of rotation until it is activated again."""
        key = self.get(key_id)
        key.state = DISABLED
        key.cooldown_until = None
        self._count_enabled()
        self._emit(key, "disabled", "operator")

    def delete(self, key_id: str) -> None:
        """Remove C{key_id}; if it was active, the first remaining key is."""
        key = self.get(key_id)
        self._keys.remove(key)
        del self._by_id[key_id]
        if self.active_key_id == key_id:
            self.active_key_id = self._keys[0].id if self._keys else None
        self._count_enabled()
        self._emit(key, "deleted", "operator")

    def snapshot(self) -> dict:
        """The pool for display: masked secrets only."""
        now = self._clock.seconds()
        for key in self._keys:
            if key.state == COOLDOWN:
                self._usable(key, now)
        return {
            "provider": self.provider,
            "keyless": self.keyless,
            "active_key_id": self.active_key_id,
            "retry_after": self.retry_after(),
            "keys": [
                {
                    "id": key.id,
                    "label": key.label,
                    "masked_secret": mask_secret(key.secret),
                    "source": key.source,
                    "from_environment": key.from_environment,
                    "state": key.state,
                    "active": key.id == self.active_key_id,
                    "cooldown_until": format_timestamp(key.cooldown_until)
                    if key.state == COOLDOWN
                    else None,
                    "last_error_code": key.last_error_code,
                    "last_error_reason": key.last_error_reason,
                    "last_error_at": format_timestamp(key.last_error_at),
                    "added_at": format_timestamp(key.added_at),
                }
                for key in self._keys
            ],
        }
