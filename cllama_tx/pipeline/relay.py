"""
The upstream side of one request: the streaming relay that pipes an
upstream body to the agent chunk by chunk, and the helpers around it (small
bodies read whole, response headers copied).  The HTTP client that sends
the request is the daemon's (L{cllama_tx.runtime.upstream}), handed to the
proxy.

The relay never holds the stream: each chunk is handed to the caller's
C{on_data} as it arrives (which meters it and writes it to the agent, or
collects a bounded JSON body).  The relay is registered as a push producer
on the agent's request and passes pause and resume on to the upstream
transport, so when the agent reads slowly Twisted pauses the upstream socket
instead of buffering; while paused, the provider's silence is not the
provider's fault, so the idle timer waits and the agent's own stall timer
runs instead.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from zope.interface import implementer

log = Logger()


class UpstreamTimeout(Exception):
    """The upstream sent nothing for too long."""

    def __init__(self, phase: str, seconds: float) -> None:
        super().__init__(f"upstream sent no {phase} within {seconds:g} s")
        self.phase = phase
        self.seconds = seconds


class AgentStalled(Exception):
    """The agent read nothing of the answer for too long."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the agent read nothing for {seconds:g} s")
        self.seconds = seconds


def read_body(response, limit: int = 1024 * 1024) -> defer.Deferred:
    """Read a small response body (error bodies) completely, at most C{limit} bytes."""
    done: defer.Deferred = defer.Deferred()
    response.deliverBody(_Collector(done, limit))
    return done


class _Collector(Protocol):
    def __init__(self, done: defer.Deferred, limit: int) -> None:
        self._done = done
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def dataReceived(self, data: bytes) -> None:
        if self._size < self._limit:
            self._parts.append(data[: self._limit - self._size])
            self._size += len(data)

    def connectionLost(self, reason=None) -> None:
        self._done.callback(b"".join(self._parts))


# Response headers that describe one hop, not the message.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
    }
)


def copy_response_headers(source: Headers, target: Headers) -> None:
    """Copy an upstream response's end-to-end headers to the agent's response."""
    for name, values in source.getAllRawHeaders():
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in (b"date", b"server"):
            continue
        target.setRawHeaders(name, values)


@implementer(IPushProducer)
class StreamRelay(Protocol):
    """
    Pipes one upstream response body to the agent's request.

    C{done} fires with C{None} when the body ended normally, or fails with
    the reason (L{UpstreamTimeout}, L{AgentStalled}, a connection error)
    when it did not.  The caller decides what the agent sees in that case;
    this class only moves bytes, keeps the timers and propagates
    backpressure and aborts.

    Two clocks, one for each side: the idle timer measures the provider
    (silence since its last chunk) and stands still while the agent's
    backpressure pauses the upstream; the stall timer measures the agent:
    a pause that lasts C{stall_timeout} cuts the stream.  With
    C{agent_progress} (a count that grows while the agent reads, or None
    when unknown) the pause is looked at four times a period and what
    counts is the time since the count last grew: a slow reader that keeps
    reading is never cut, one that reads nothing is cut after between one
    and one and a quarter periods.  C{stall_timeout=None} turns the stall
    timer off.
    """

    def __init__(
        self,
        request,
        clock,
        idle_timeout: float,
        first_byte_timeout: float,
        on_data: Callable[[bytes], None] | None = None,
        on_first_byte: Callable[[], None] | None = None,
        stall_timeout: float | None = None,
        agent_progress: Callable[[], int | None] | None = None,
    ) -> None:
        self._request = request
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._stall_timeout = stall_timeout
        self._on_data = request.write if on_data is None else on_data
        self._on_first_byte = on_first_byte
        self.done: defer.Deferred = defer.Deferred()
        self.bytes_relayed = 0
        self._timer = clock.callLater(first_byte_timeout, self._timed_out, "first byte", first_byte_timeout)
        self._stall_timer = None
        self._agent_progress = agent_progress
        self._progress_mark: int | None = None
        self._progress_at = 0.0
        self._registered = False
        self._failure: Exception | None = None
        self._last_data = 0.0
        self.paused = False

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._registered = True

    def dataReceived(self, data: bytes) -> None:
        if self.bytes_relayed == 0:
            self._first_byte()
        self.bytes_relayed += len(data)
        self._last_data = self._clock.seconds()
        self._on_data(data)

    def _first_byte(self) -> None:
        """Switch the timer from the first-byte deadline to the idle timeout."""
        if self._on_first_byte is not None:
            self._on_first_byte()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self._clock.callLater(self._idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        """
        The idle timer is not reset per chunk (that would cost a heap
        operation per chunk): it fires once per period and re-arms itself for
        the time left since the last chunk, or since the agent last let the
        upstream go on.  While the agent holds the upstream paused it only
        re-arms: the provider cannot send what nobody reads.
        """
        if self.paused:
            self._timer = self._clock.callLater(self._idle_timeout, self._check_idle)
            return
        silent = self._clock.seconds() - self._last_data
        if silent >= self._idle_timeout:
            self._timed_out("data", self._idle_timeout)
            return
        self._timer = self._clock.callLater(self._idle_timeout - silent, self._check_idle)

    def _timed_out(self, phase: str, seconds: float) -> None:
        self._timer = None
        self._failure = UpstreamTimeout(phase, seconds)
        self.abort()

    # IPushProducer, called by the agent's connection

    def pauseProducing(self) -> None:
        """The agent's buffer is full: pause the upstream, start the stall timer."""
        if self.paused:
            return
        self.paused = True
        upstream = self._upstream
        if upstream is not None:
            upstream.pauseProducing()
        if self._stall_timeout is not None and self._failure is None:
            self._progress_at = self._clock.seconds()
            step = self._stall_timeout
            if self._agent_progress is not None:
                self._progress_mark = self._agent_progress()
                step /= 4
            self._stall_timer = self._clock.callLater(step, self._check_stall)

    def resumeProducing(self) -> None:
        """The agent read its buffer: the provider's silence counts from now."""
        if not self.paused:
            return
        self.paused = False
        if self._stall_timer is not None:
            if self._stall_timer.active():
                self._stall_timer.cancel()
            self._stall_timer = None
        self._last_data = self._clock.seconds()
        upstream = self._upstream
        if upstream is not None:
            upstream.resumeProducing()

    def stopProducing(self) -> None:
        """The agent's connection is gone."""
        self.abort()

    def _check_stall(self) -> None:
        self._stall_timer = None
        stall = self._stall_timeout
        if stall is None:
            return
        now = self._clock.seconds()
        step = stall
        if self._agent_progress is not None:
            step = stall / 4
            mark = self._agent_progress()
            if mark is not None and (self._progress_mark is None or mark > self._progress_mark):
                # Still paused, but the agent read some: slow, not stalled.
                self._progress_mark = mark
                self._progress_at = now
        left = stall - (now - self._progress_at)
        if left > 0:
            self._stall_timer = self._clock.callLater(min(step, left), self._check_stall)
            return
        if self._failure is None:
            self._failure = AgentStalled(stall)
        self.abort()

    def abort(self) -> None:
        """Close the upstream connection (agent gone, or timed out)."""
        upstream = self._upstream
        if upstream is not None:
            upstream.stopProducing()

    @property
    def _upstream(self) -> IPushProducer | None:
        """The upstream body: a response body's protocol is connected to a
        push producer (IResponse.deliverBody), not to a full transport."""
        return cast("IPushProducer | None", self.transport)

    def connectionLost(self, reason=None) -> None:
        for timer in (self._timer, self._stall_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._stall_timer = None
        if self._registered:
            self._registered = False
            if self._request.channel is not None:  # None once the agent left
                self._request.unregisterProducer()
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            if self._failure is None:
                self.done.callback(None)
                return
        if self._failure is not None:
            self.done.errback(self._failure)
        else:
            self.done.errback(reason)
