"""
Key health: re-checking a suspect key before anyone declares it dead, and
re-probing dead keys with backoff so that they come back by themselves.

A 401 may be about the request rather than the key (it once was: one
agent's bogus organization header killed the only key for every agent).
A re-check asks the provider about the key alone, with a request that
carries nothing from any agent (L{cllama_tx.providers.probe}); only its
answer condemns the key.  One L{KeyHealth} per pool: it runs one probe per
key at a time, shares the outcome with every request waiting on it, and
keeps one timer for the pool's next due re-probe.  Time comes from the
injected clock.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from cllama_tx.providers.store import KeyRecord

VALID = "valid"
INVALID = "invalid"
INCONCLUSIVE = "inconclusive"


@attrs.frozen
class ProbeResult:
    """What a probe learnt about a key: an outcome and a secret-free detail."""

    outcome: str
    detail: str


class KeyHealth:
    """
    Re-checks and re-probes for one L{cllama_tx.providers.keys.KeyPool}.
    C{probe(key)} returns a Deferred firing with a L{ProbeResult}.
    """

    def __init__(
        self,
        pool,
        probe: Callable[[KeyRecord], defer.Deferred],
        clock,
        log: Logger | None = None,
    ) -> None:
        self._pool = pool
        self._probe = probe
        self._clock = clock
        self._log = log if log is not None else Logger(namespace="cllama_tx.providers")
        self._inflight: dict[str, list[defer.Deferred]] = {}
        self._idle_waiters: list[defer.Deferred] = []
        self._timer = None
        self._stopped = False

    # --- asked by the request path -----------------------------------------

    def recheck(self, key: KeyRecord) -> defer.Deferred:
        """The outcome (C{valid}, C{invalid}, C{inconclusive}) of re-checking C{key}."""
        return self._run(key)

    def idle(self) -> defer.Deferred | None:
        """Fires once no probe is in flight; L{None} when none is now."""
        if not self._inflight:
            return None
        d: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def checking(self) -> frozenset[str]:
        """The ids of the keys being probed now."""
        return frozenset(self._inflight)

    # --- probing -------------------------------------------------------------

    def _run(self, key: KeyRecord) -> defer.Deferred:
        waiter: defer.Deferred = defer.Deferred()
        waiters = self._inflight.get(key.id)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._inflight[key.id] = [waiter]
        self._pool.begin_probe(key)
        defer.maybeDeferred(self._probe, key).addBoth(self._finished, key)
        return waiter

    def _finished(self, result, key: KeyRecord) -> None:
        waiters = self._inflight.pop(key.id, [])
        if isinstance(result, Failure):
            self._log.failure(
                "Probing key {key_id} of provider {provider} failed",
                result,
                key_id=key.id,
                provider=self._pool.provider,
            )
            result = ProbeResult(INCONCLUSIVE, "the probe failed")
        pool = self._pool
        self._log.info(
            "Key {key_id} of provider {provider}: probe {outcome} ({detail})",
            key_id=key.id,
            provider=pool.provider,
            outcome=result.outcome,
            detail=result.detail,
        )
        if result.outcome == VALID:
            pool.check_passed(key, result.detail)
        elif result.outcome == INVALID:
            pool.check_failed(key, result.detail)
        else:
            pool.check_inconclusive(key, result.detail)
        for waiter in waiters:
            waiter.callback(result.outcome)
        if not self._inflight:
            idle, self._idle_waiters = self._idle_waiters, []
            for d in idle:
                d.callback(None)
        self.reschedule()

    # --- the re-probe timer ----------------------------------------------------

    def reschedule(self) -> None:
        """Aim the timer at the pool's next due re-probe (or stop it)."""
        if self._stopped:
            return
        due = self._pool.next_probe_at()
        timer = self._timer
        if timer is not None and timer.active():
            if due is not None and timer.getTime() == due:
                return
            timer.cancel()
        self._timer = None
        if due is None:
            return
        delay = max(0.0, due - self._clock.seconds())
        self._timer = self._clock.callLater(delay, self._probe_due)

    def _probe_due(self) -> None:
        self._timer = None
        if self._stopped:
            return
        for key in self._pool.due_probes(self._clock.seconds()):
            if key.id in self._inflight:
                self._pool.begin_probe(key)
            else:
                self._run(key)
        self.reschedule()

    def stop(self) -> None:
        """No more re-probes (shutdown); probes in flight finish by themselves."""
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
