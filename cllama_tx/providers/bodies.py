"""
Reading an upstream's small bodies (error answers, key probes) whole, with
a size cap and a deadline: a provider that sends the headers of an error and
then stalls must not hold the request, or a key check, forever.
"""

from __future__ import annotations

from typing import cast

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol

ERROR_BODY_LIMIT = 1024 * 1024


def read_small(response, clock, timeout: float, limit: int = ERROR_BODY_LIMIT) -> defer.Deferred:
    """
    Fires with at most C{limit} bytes of C{response}'s body: all of it, or
    what arrived before C{timeout} seconds passed (the connection is then
    closed).  Never fails.
    """
    done: defer.Deferred = defer.Deferred()
    response.deliverBody(_Capped(done, limit, clock, timeout))
    return done


class _Capped(Protocol):
    def __init__(self, done: defer.Deferred, limit: int, clock, timeout: float) -> None:
        self._done = done
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._timer = clock.callLater(max(timeout, 0.0), self._expire)

    def dataReceived(self, data: bytes) -> None:
        if self._size < self._limit:
            self._parts.append(data[: self._limit - self._size])
            self._size += len(data)

    def _expire(self) -> None:
        self._timer = None
        if self.transport is not None:
            # A response body's protocol is connected to a push producer
            # (IResponse.deliverBody), not to a full transport.
            cast(IPushProducer, self.transport).stopProducing()
        self._fire()

    def connectionLost(self, reason=None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._fire()

    def _fire(self) -> None:
        if not self._done.called:
            self._done.callback(b"".join(self._parts))
