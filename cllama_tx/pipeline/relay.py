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

The per-event path of a plain stream is kept flat: the upstream client
hands a chunk that arrived whole with its framing (C{chunk_received}), the
caller's C{passthrough} (the usage tap) counts an event it would forward
unchanged in one call, and the chunk goes to the agent's chunked answer as
it came (C{write_framed}): no de-chunking, no re-framing, no copy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def _takes_none(framed: bytes, size: int) -> bool:
    return False


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

    C{passthrough(framed, start, stop)}, when given, says whether the event
    C{framed[start:stop]} is one that C{on_data} would write to the agent
    unchanged, and counts it as C{on_data} would: such an event goes to the
    agent's request framed as it came (C{write_framed}) instead of through
    C{on_data}.
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
        passthrough: Callable[[bytes, int, int], bool] | None = None,
    ) -> None:
        self._request = request
        self._clock = clock
        self._seconds = clock.seconds
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
        # The flat path: only where the tap's verdict is all that on_data does
        # with an event it forwards unchanged, and the agent's answer takes
        # framed chunks.
        write_framed: Callable[[bytes, int], bool] | None = getattr(request, "write_framed", None)
        self._passthrough = passthrough if write_framed is not None else None
        self._write_framed: Callable[[bytes, int], bool] = write_framed or _takes_none
        self._stopped = False  # aborted: no more of what was read goes on

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._registered = True

    def dataReceived(self, data: bytes) -> None:
        if self.bytes_relayed == 0:
            self._first_byte()
        self.bytes_relayed += len(data)
        self._last_data = self._seconds()
        self._on_data(data)

    def chunk_received(self, framed: bytes, spans: Sequence[int]) -> None:
        """
        Whole upstream chunks read at once: C{spans} holds the start and
        stop of each one's data in C{framed}, the rest is their framing
        (L{cllama_tx.runtime.lean_client}).  A run of events the passthrough
        forwards unchanged goes to the agent as it came, in one send.
        """
        passthrough = self._passthrough
        count = len(spans)
        if passthrough is None or not self.bytes_relayed:
            i = 0
            while i < count and not self._stopped:
                self.dataReceived(framed[spans[i] : spans[i + 1]])
                i += 2
            return
        if count == 2:  # the usual read: one event (_pass_on, inlined)
            start, stop = spans
            if passthrough(framed, start, stop):
                size = stop - start
                self.bytes_relayed += size
                self._last_data = self._seconds()
                end = stop + 2
                if not self._write_framed(framed if end == len(framed) else framed[:end], size):
                    self._request.write(framed[start:stop])  # the answer is not chunked: the data alone
            else:
                self.dataReceived(framed[start:stop])
            return
        first = 0  # the first chunk of the run passed but not yet sent
        size = 0
        i = 0
        while i < count:
            start, stop = spans[i], spans[i + 1]
            if passthrough(framed, start, stop):
                size += stop - start
            else:
                if i > first:
                    self._pass_on(framed, spans, first, i, size)
                if self._stopped:
                    return
                self.dataReceived(framed[start:stop])
                if self._stopped:
                    return
                first, size = i + 2, 0
            i += 2
        if count > first:
            self._pass_on(framed, spans, first, count, size)

    def _pass_on(self, framed: bytes, spans: Sequence[int], first: int, end: int, size: int) -> None:
        """Send the agent chunks C{first} to C{end} of C{spans} (C{size} bytes of data) framed."""
        self.bytes_relayed += size
        self._last_data = self._seconds()
        begin = spans[first - 1] + 2 if first else 0
        stop = spans[end - 1] + 2
        if not self._write_framed(framed if begin == 0 and stop == len(framed) else framed[begin:stop], size):
            # The answer is not chunked: the data alone.
            for i in range(first, end, 2):
                self._request.write(framed[spans[i] : spans[i + 1]])

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
        self._stopped = True
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
