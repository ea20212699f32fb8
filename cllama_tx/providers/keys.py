"""
Key pools (CONTRACT 3.3): which key to use next, and what an upstream
failure means for the key that got it.

A key shared by every agent must not be broken by one of them, so:

  - a 401 makes a key I{suspect}, not dead: a re-check that carries nothing
    from any agent (L{cllama_tx.providers.health}) decides;
  - a dead key is re-probed with exponential backoff and comes back by
    itself when the provider accepts it again;
  - where a provider limits each model separately, a rate limit cools the
    key down for that model only.

Pure logic: time comes from an injected clock with C{seconds()}; state
changes are reported through callbacks, never written anywhere from here;
re-checks are delegated to an optional C{health} collaborator.
Nothing in this module puts a secret into an event, a message or a repr.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from email.utils import mktime_tz, parsedate_tz

import attrs
from twisted.internet.defer import succeed

from cllama_tx.providers.store import (
    COOLDOWN,
    DEAD,
    DISABLED,
    READY,
    SUSPECT,
    KeyRecord,
    format_timestamp,
)

MAX_TRIES = 5
"""How many keys the caller tries for one request before giving up."""

DEFAULT_COOLDOWN = 10
MAX_COOLDOWN = 60
MIN_COOLDOWN = 1

REPROBE_FIRST = 30.0
"""Seconds from a key's death to its first re-probe; doubled per failure."""
REPROBE_MAX = 30 * 60.0
"""The longest wait between two re-probes of a dead key."""
RECHECK_WINDOW = 10.0
"""A key a re-check found valid this recently is not re-checked on a 401:
that 401 is about the request (this also bounds the probe rate)."""
STRIKES_TO_DEAD = 3
"""Consecutive 401s whose re-check could not tell (the provider has no
probe endpoint, or it failed) after which the key is dead anyway."""

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
ACTION_SUSPECT = "suspect"
ACTION_RECOVERED = "recovered"


def reprobe_delay(level: int, first: float = REPROBE_FIRST, ceiling: float = REPROBE_MAX) -> float:
    """Seconds before re-probe number C{level + 1}: C{first} doubled C{level} times, capped."""
    return min(ceiling, first * (2.0 ** min(level, 32)))


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

      - 401: the key is suspect (C{unauthorized}) until a re-check says;
      - 402, or a 429 saying the quota, billing or credit is exhausted: dead;
      - any other 429: cool the key down for C{Retry-After} seconds (delta
        seconds or an HTTP-date; default 10, at most 60, at least 1);
      - anything else: L{None}, not a key problem.

    C{now} (epoch seconds) is needed only for an HTTP-date C{Retry-After};
    pass the clock's time (the wall clock is used when omitted).
    """
    if status == 401:
        return Verdict(ACTION_SUSPECT, "unauthorized", None, status)
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
    never a secret; a per-model cooldown adds C{model}, a death with a
    re-probe scheduled C{next_probe_at}.  Actions: C{suspect}, C{dead}, C{recovered} (a dead
    key's re-probe passed), C{cooldown}, C{ready} (a cooldown ended, or a
    suspect key's re-check passed), C{added}, C{activated}, C{disabled},
    C{deleted}.  C{on_dirty()} is called whenever anything worth saving
    changed, including error details that do not change a key's state.

    C{per_model}: rate limits cool a key down for the model that hit them
    only.  C{health}: the re-checker (L{cllama_tx.providers.health.KeyHealth})
    or L{None}, when a 401 is taken as the provider's last word.
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
        per_model: bool = False,
        reprobe_first: float = REPROBE_FIRST,
        reprobe_max: float = REPROBE_MAX,
    ) -> None:
        self.provider = provider
        self.keyless = keyless
        self.per_model = per_model
        self.on_change = on_change
        self.on_dirty = on_dirty
        self.reprobe_first = reprobe_first
        self.reprobe_max = reprobe_max
        self.health = None
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
        self.arm_reprobes()

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

    def _emit(
        self,
        key: KeyRecord,
        action: str,
        reason: str | None,
        model: str | None = None,
        until: float | None = None,
    ) -> None:
        event = {
            "provider": self.provider,
            "key_id": key.id,
            "action": action,
            "reason": reason,
            "cooldown_until": format_timestamp(until if until is not None else key.cooldown_until)
            if key.state == COOLDOWN or until is not None
            else None,
        }
        if model is not None:
            event["model"] = model
        if action == DEAD and key.next_probe_at is not None:
            event["next_probe_at"] = format_timestamp(key.next_probe_at)
        if self.on_change is not None:
            self.on_change(event)
        self._dirty()

    def _dirty(self) -> None:
        if self.on_dirty is not None:
            self.on_dirty()

    def _rearm(self) -> None:
        if self.health is not None:
            self.health.reschedule()

    def _usable(self, key: KeyRecord, now: float, model: str | None = None) -> bool:
        state = key.state
        if state == COOLDOWN:
            if key.cooldown_until is None or key.cooldown_until <= now:
                key.state = READY
                key.cooldown_until = None
                self._emit(key, READY, "cooldown ended")
            else:
                return False
        elif state != READY:
            return False
        if model is not None and key.model_cooldowns:
            until = key.model_cooldowns.get(model)
            if until is not None:
                if until > now:
                    return False
                del key.model_cooldowns[model]
                self._emit(key, READY, "cooldown ended", model=model)
        return True

    # --- the request path -------------------------------------------------

    def acquire(
        self, exclude: set[str] | frozenset[str] = frozenset(), model: str | None = None
    ) -> KeyRecord | None:
        """
        The key to use for C{model}: the active key if usable, else the next
        usable one after it in order (wrapping around), skipping ids in
        C{exclude}, suspect, dead and disabled keys, and keys cooling down
        (for C{model}, or for every model).  A key whose cooldown has passed
        becomes ready again.  L{None} when no key is usable; L{KEYLESS} for
        a keyless pool.
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
            if active.id not in exclude and self._usable(active, now, model):
                return active
            start = next(i for i, k in enumerate(keys) if k is active) + 1
        for offset in range(count):
            key = keys[(start + offset) % count]
            if key is active or key.id in exclude:
                continue
            if self._usable(key, now, model):
                return key
        return None

    def report(self, key: KeyRecord, verdict: Verdict | None, model: str | None = None) -> bool:
        """
        Apply C{verdict} (from L{classify_failure}) to C{key}, used for
        C{model}: record the error and mark the key suspect, dead or cooling
        down (for C{model} only when the pool is C{per_model}).  A key that
        is already dead stays dead; a disabled one stays disabled; a
        cooldown only extends.  A 401 on a key that a re-check found valid
        within L{RECHECK_WINDOW} leaves it as it is: that 401 is about the
        request.

        Returns whether trying another key makes sense: L{False} for no
        verdict, for a 401 that is about the request, and for a keyless
        pool, whose upstream answer should simply be passed on.  After a
        C{True} for a key that is now suspect, the caller awaits
        L{recheck}.
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
        action = verdict.action
        state = record.state
        if state == DISABLED:
            self._dirty()
            return True
        if action == ACTION_SUSPECT:
            if state in (READY, COOLDOWN):
                checked = record.checked_at
                if checked is not None and now - checked < RECHECK_WINDOW:
                    self._dirty()
                    return False
                record.state = SUSPECT
                record.cooldown_until = None
                self._emit(record, ACTION_SUSPECT, f"{verdict.reason}: re-checking the key")
                return True
        elif action == ACTION_DEAD:
            if state != DEAD:
                self._kill(record, verdict.reason, now)
                return True
        elif action == ACTION_COOLDOWN and state not in (DEAD, SUSPECT):
            until = now + (verdict.cooldown_seconds or DEFAULT_COOLDOWN)
            if self.per_model and model is not None:
                current = record.model_cooldowns.get(model)
                if current is None or until > current:
                    record.model_cooldowns[model] = until
                    self._emit(record, ACTION_COOLDOWN, verdict.reason, model=model, until=until)
                return True
            current = record.cooldown_until if state == COOLDOWN else None
            if current is None or until > current:
                record.state = COOLDOWN
                record.cooldown_until = until
                self._emit(record, ACTION_COOLDOWN, verdict.reason)
                return True
        self._dirty()
        return True

    def succeeded(self, key: KeyRecord) -> None:
        """
        C{key} served a request: the backoff and the inconclusive 401s
        counted against it start over.  Cheap enough for every response.
        """
        if key.backoff_level or key.strikes:
            key.backoff_level = 0
            key.strikes = 0

    def is_suspect(self, key: KeyRecord) -> bool:
        return key.state == SUSPECT

    def recheck(self, key: KeyRecord):
        """
        A Deferred firing with the re-check's outcome for suspect C{key}
        (C{valid}, C{invalid} or C{inconclusive}, see
        L{cllama_tx.providers.health}); concurrent calls share one probe.
        Without a re-checker the 401 stands: the key dies at once.
        """
        if self.health is not None:
            return self.health.recheck(key)
        self.check_failed(key, "no re-check available")
        return succeed("invalid")

    def checks_pending(self):
        """
        A Deferred firing once the re-checks in flight are over, or L{None}
        when there are none: a request that found no usable key because one
        is suspect waits for the verdict instead of failing.
        """
        return self.health.idle() if self.health is not None else None

    # --- health verdicts (from the re-checker) ------------------------------

    def _current(self, key: KeyRecord) -> KeyRecord | None:
        record = self._by_id.get(key.id)
        return record if record is key else None

    def _kill(self, record: KeyRecord, reason: str, now: float) -> None:
        record.state = DEAD
        record.cooldown_until = None
        record.model_cooldowns.clear()
        record.next_probe_at = None
        if self.health is not None:
            record.next_probe_at = now + reprobe_delay(
                record.backoff_level, self.reprobe_first, self.reprobe_max
            )
        record.backoff_level += 1
        self._emit(record, DEAD, reason)
        self._rearm()

    def check_passed(self, key: KeyRecord, detail: str) -> None:
        """A re-check or re-probe found C{key} valid."""
        record = self._current(key)
        if record is None:
            return
        now = self._clock.seconds()
        record.checked_at = now
        if record.state == SUSPECT:
            record.state = READY
            self._emit(
                record, READY, f"re-check passed ({detail}): the 401 was about the request, not the key"
            )
        elif record.state == DEAD:
            record.state = READY
            record.next_probe_at = None
            self._emit(record, ACTION_RECOVERED, f"re-probe passed ({detail})")

    def check_failed(self, key: KeyRecord, detail: str) -> None:
        """The provider refused C{key} on a request carrying nothing from any agent."""
        record = self._current(key)
        if record is None:
            return
        now = self._clock.seconds()
        record.last_error_code = 401
        record.last_error_reason = f"unauthorized ({detail})"
        record.last_error_at = now
        if record.state == DEAD:
            # A failed re-probe: wait longer before the next one.
            if self.health is not None:
                record.next_probe_at = now + reprobe_delay(
                    record.backoff_level, self.reprobe_first, self.reprobe_max
                )
            record.backoff_level += 1
            self._dirty()
            self._rearm()
        elif record.state == SUSPECT:
            self._kill(record, f"unauthorized: re-check confirmed ({detail})", now)
        else:
            # The operator activated or disabled it meanwhile: theirs to decide.
            self._dirty()

    def check_inconclusive(self, key: KeyRecord, detail: str) -> None:
        """
        The re-check could not tell.  A suspect key is kept in use (the
        proof is missing) until L{STRIKES_TO_DEAD} such 401s in a row; a
        dead key comes back for a trial (its next failure kills it again,
        with a longer backoff).
        """
        record = self._current(key)
        if record is None:
            return
        now = self._clock.seconds()
        if record.state == SUSPECT:
            record.strikes += 1
            if record.strikes >= STRIKES_TO_DEAD:
                self._kill(
                    record,
                    f"unauthorized {record.strikes} times in a row, re-check inconclusive ({detail})",
                    now,
                )
                return
            record.state = READY
            self._emit(record, READY, f"re-check inconclusive ({detail}): kept in use")
        elif record.state == DEAD:
            record.state = READY
            record.next_probe_at = None
            self._emit(record, ACTION_RECOVERED, f"re-probe inconclusive ({detail}): back in use on trial")

    def begin_probe(self, key: KeyRecord) -> None:
        """A re-probe of dead C{key} starts: it is no longer due."""
        record = self._current(key)
        if record is not None:
            record.next_probe_at = None

    def due_probes(self, now: float) -> list[KeyRecord]:
        """The dead keys whose re-probe is due."""
        return [
            k
            for k in self._keys
            if k.state == DEAD and k.next_probe_at is not None and k.next_probe_at <= now
        ]

    def next_probe_at(self) -> float | None:
        """When the earliest re-probe is due, or L{None}."""
        times = [k.next_probe_at for k in self._keys if k.state == DEAD and k.next_probe_at is not None]
        return min(times) if times else None

    def arm_reprobes(self) -> None:
        """
        Schedule a re-probe for every dead key without one (keys loaded dead
        from the file, or dead before a re-checker was attached).
        """
        if self.health is None:
            return
        now = self._clock.seconds()
        for key in self._keys:
            if key.state == DEAD and key.next_probe_at is None:
                key.next_probe_at = now + reprobe_delay(
                    key.backoff_level, self.reprobe_first, self.reprobe_max
                )
        self._rearm()

    # --- waiting ------------------------------------------------------------

    def retry_after(self, model: str | None = None) -> int | None:
        """
        Whole seconds (at least 1) until a key may be usable again for
        C{model}: until the earliest cooldown ends, or 1 when some key is
        ready (or being re-checked) already.  L{None} when no key will come
        back by itself soon (all dead or disabled, no keys, or a keyless
        pool); see L{next_probe_in} for those.
        """
        if self.keyless:
            return None
        now = self._clock.seconds()
        earliest = None
        for key in self._keys:
            state = key.state
            if state in (READY, SUSPECT):
                until = now
            elif state == COOLDOWN:
                until = key.cooldown_until if key.cooldown_until is not None else now
            else:
                continue
            if model is not None and key.model_cooldowns:
                until = max(until, key.model_cooldowns.get(model, until))
            if until <= now:
                return 1
            if earliest is None or until < earliest:
                earliest = until
        if earliest is None:
            return None
        return max(1, math.ceil(earliest - now))

    def next_probe_in(self) -> int | None:
        """Whole seconds (at least 1) until the next re-probe of a dead key, or L{None}."""
        due = self.next_probe_at()
        if due is None:
            return None
        return max(1, math.ceil(due - self._clock.seconds()))

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

    def _clear_health(self, key: KeyRecord) -> None:
        key.cooldown_until = None
        key.next_probe_at = None
        key.model_cooldowns.clear()
        key.backoff_level = 0
        key.strikes = 0

    def activate(self, key_id: str) -> None:
        """Make C{key_id} the active key and ready, whatever its state."""
        key = self.get(key_id)
        key.state = READY
        self._clear_health(key)
        self.active_key_id = key_id
        self._count_enabled()
        self._emit(key, "activated", "operator")
        self._rearm()

    def disable(self, key_id: str) -> None:
        """Take C{key_id} out of rotation until it is activated again."""
        key = self.get(key_id)
        key.state = DISABLED
        self._clear_health(key)
        self._count_enabled()
        self._emit(key, "disabled", "operator")
        self._rearm()

    def delete(self, key_id: str) -> None:
        """Remove C{key_id}; if it was active, the first remaining key is."""
        key = self.get(key_id)
        self._keys.remove(key)
        del self._by_id[key_id]
        if self.active_key_id == key_id:
            self.active_key_id = self._keys[0].id if self._keys else None
        self._count_enabled()
        self._emit(key, "deleted", "operator")
        self._rearm()

    def snapshot(self) -> dict:
        """The pool for display: masked secrets only."""
        now = self._clock.seconds()
        for key in self._keys:
            if key.state == COOLDOWN:
                self._usable(key, now)
            if key.model_cooldowns:
                for model, until in list(key.model_cooldowns.items()):
                    if until <= now:
                        del key.model_cooldowns[model]
        checking: frozenset[str] = self.health.checking() if self.health is not None else frozenset()
        return {
            "provider": self.provider,
            "keyless": self.keyless,
            "per_model": self.per_model,
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
                    "model_cooldowns": [
                        {"model": model, "until": format_timestamp(until)}
                        for model, until in sorted(key.model_cooldowns.items())
                    ],
                    "next_probe_at": format_timestamp(key.next_probe_at)
                    if key.state == DEAD
                    else None,
                    "probing": key.id in checking,
                    "last_error_code": key.last_error_code,
                    "last_error_reason": key.last_error_reason,
                    "last_error_at": format_timestamp(key.last_error_at),
                    "added_at": format_timestamp(key.added_at),
                }
                for key in self._keys
            ],
        }
