"""
An agent's request body streamed to the provider as it arrives (the
passthrough's uploads: audio, files), never held whole.

The site hands each chunk of the agent's body to L{StreamingBody.write} as
Twisted reads it; the upstream HTTP client consumes the body as an
C{IBodyProducer}.  Between the two at most a bounded buffer waits (while the
upstream connection is being made, or while its socket is full): past it
the agent's connection is paused, so a fast sender and a slow provider
cost this process no more memory than that buffer, and the provider sees
the body in chunks before the agent has finished sending it.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

__all__ = ["HIGH_WATER", "StreamingBody"]

#: Bytes of the agent's body held at most before its connection is paused.
HIGH_WATER = 256 * 1024


@implementer(IBodyProducer)
class StreamingBody:
    """
    The body of one upload, from the agent's connection (C{source}, paused
    and resumed here) to the upstream request's consumer.

    C{length} is the agent's C{Content-Length}, or None for a chunked upload
    (sent upstream chunked too).  C{received} counts what the agent sent,
    C{sent} what went upstream.
    """

    def __init__(self, length: int | None, source: IPushProducer | None, high_water: int = HIGH_WATER) -> None:
        self.length: Any = UNKNOWN_LENGTH if length is None else length
        self._source = source
        self._high_water = high_water
        self._consumer: Any = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._done: defer.Deferred | None = None
        self._finished = False  # the agent sent its whole body
        self._stopped = False  # the upstream will take no more: what comes is dropped
        self._upstream_paused = False
        self._source_paused = False
        self.received = 0
        self.sent = 0
        self.buffered_peak = 0

    # -- the agent's side ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """A chunk of the agent's body."""
        self.received += len(data)
        if self._stopped or not data:
            return
        if self._consumer is not None and not self._upstream_paused and not self._buffer:
            self._consumer.write(data)
            self.sent += len(data)
            return
        self._buffer.append(data)
        self._buffered += len(data)
        self.buffered_peak = max(self.buffered_peak, self._buffered)
        if self._buffered >= self._high_water:
            self._pause_source()

    def finish(self) -> None:
        """The agent's body is complete."""
        self._finished = True
        self._maybe_done()

    def abandon(self) -> None:
        """
        The upstream request failed: what the agent still sends is read and
        dropped (it will get the error once its body is in).
        """
        self._stop()

    def fail(self, reason: Failure | BaseException) -> None:
        """The agent is gone: the upload ends in error (the upstream request is aborted)."""
        self._stop()
        done, self._done = self._done, None
        if done is not None and not done.called:
            done.errback(reason)

    # -- IBodyProducer: the upstream's side ---------------------------------------

    def startProducing(self, consumer) -> defer.Deferred:
        self._consumer = consumer
        self._done = defer.Deferred(lambda _: self._stop())
        self._flush()
        self._maybe_done()
        return self._done

    def pauseProducing(self) -> None:
        """The upstream socket is full: hold what comes, pause the agent once the buffer is."""
        self._upstream_paused = True

    def resumeProducing(self) -> None:
        self._upstream_paused = False
        self._flush()
        self._maybe_done()

    def stopProducing(self) -> None:
        """The upstream request is over (its Deferred is then never fired)."""
        self._done = None
        self._stop()

    # -- internals ---------------------------------------------------------------------

    def _flush(self) -> None:
        consumer = self._consumer
        while self._buffer and consumer is not None and not self._upstream_paused and not self._stopped:
            data = self._buffer.pop(0)
            self._buffered -= len(data)
            consumer.write(data)
            self.sent += len(data)
        if self._buffered < self._high_water // 2:
            self._resume_source()

    def _maybe_done(self) -> None:
        done = self._done
        if self._finished and not self._buffer and done is not None and not done.called and not self._stopped:
            self._done = None
            done.callback(None)

    def _stop(self) -> None:
        self._stopped = True
        self._buffer = []
        self._buffered = 0
        self._resume_source()

    def _pause_source(self) -> None:
        if not self._source_paused and self._source is not None:
            self._source_paused = True
            self._source.pauseProducing()

    def _resume_source(self) -> None:
        if self._source_paused and self._source is not None:
            self._source_paused = False
            self._source.resumeProducing()
