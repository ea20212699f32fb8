"""
The upstream side: one persistent connection pool, and the streaming relay
that pipes an upstream body to the agent chunk by chunk.

The relay never holds the stream: each chunk is handed to the caller's
C{on_data} as it arrives (which meters it and writes it to the agent, or
collects a bounded JSON body).  The upstream transport is
registered as a push producer on the agent's request, so when the agent reads
slowly Twisted pauses the upstream socket instead of buffering.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import URI, Agent, HTTPConnectionPool, ResponseDone, _ensureValidURI, _HTTP11ClientFactory
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

log = Logger()


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body that is already in memory: written in one go, with its
    length known up front (no chunked upload, no extra reactor turn).
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class _QuietClientFactory(_HTTP11ClientFactory):
    """Upstream connections come and go all day; they are not log events."""

    noisy = False


class UpstreamTimeout(Exception):
    """The upstream sent nothing for too long."""

    def __init__(self, phase: str, seconds: float) -> None:
        super().__init__(f"upstream sent no {phase} within {seconds:g} s")
        self.phase = phase
        self.seconds = seconds


class UpstreamClient:
    """
    The one HTTP client of the daemon: a persistent pool shared by every
    request, no redirects, no cookies.
    """

    MAX_TARGETS = 256

    def __init__(
        self,
        reactor,
        connect_timeout: float,
        tls_policy: IPolicyForHTTPS | None = None,
        max_per_host: int = 64,
    ) -> None:
        self._reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool._factory = _QuietClientFactory
        self.pool.maxPersistentPerHost = max_per_host
        self.pool.cachedConnectionTimeout = 120
        kwargs = {"pool": self.pool, "connectTimeout": connect_timeout}
        if tls_policy is not None:
            kwargs["contextFactory"] = tls_policy
        self._agent = Agent(reactor, **kwargs)
        self._targets: dict[bytes, tuple] = {}
        # Agent's per-URL work is skipped through its two internal steps;
        # should a Twisted release rename them, requests take the public way.
        self._direct = all(hasattr(self._agent, name) for name in ("_requestWithEndpoint", "_getEndpoint"))

    def request(
        self, method: bytes, url: bytes, headers: Headers, body: bytes | None
    ) -> defer.Deferred:
        """Send one request; the Deferred fires with the response headers."""
        producer = BytesProducer(body) if body is not None else None
        target = self._targets.get(url)
        if target is None:
            if not self._direct:
                return self._agent.request(method, url, headers, producer)
            try:
                target = self._target(url)
            except Exception:
                return defer.fail()
        key, endpoint, parsed = target
        return self._agent._requestWithEndpoint(
            key, endpoint, method, parsed, headers, producer, parsed.originForm
        )

    def _target(self, url: bytes) -> tuple:
        """
        What C{Agent.request} works out from a URL on every call (validation,
        parsing, a new endpoint object): done once per upstream URL.  The
        URLs are few (providers times paths), the cache is bounded anyway.
        """
        parsed = URI.fromBytes(_ensureValidURI(url.strip()))
        target = (
            (parsed.scheme, parsed.host, parsed.port),
            self._agent._getEndpoint(parsed),
            parsed,
        )
        if len(self._targets) >= self.MAX_TARGETS:
            self._targets.clear()
        self._targets[url] = target
        return target

    def close(self) -> defer.Deferred:
        return self.pool.closeCachedConnections()


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


class StreamRelay(Protocol):
    """
    Pipes one upstream response body to the agent's request.

    C{done} fires with C{None} when the body ended normally, or fails with
    the reason (L{UpstreamTimeout}, a connection error) when it did not.  The
    caller decides what the agent sees in that case; this class only moves
    bytes, keeps the idle timer and propagates backpressure and aborts.
    """

    def __init__(
        self,
        request,
        clock,
        idle_timeout: float,
        first_byte_timeout: float,
        on_data: Callable[[bytes], None] | None = None,
        on_first_byte: Callable[[], None] | None = None,
    ) -> None:
        self._request = request
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._on_data = request.write if on_data is None else on_data
        self._on_first_byte = on_first_byte
        self.done: defer.Deferred = defer.Deferred()
        self.bytes_relayed = 0
        self._timer = clock.callLater(first_byte_timeout, self._timed_out, "first byte", first_byte_timeout)
        self._registered = False
        self._failure: Exception | None = None
        self._last_data = 0.0

    def connectionMade(self) -> None:
        self._request.registerProducer(self.transport, True)
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
        the time left since the last chunk.
        """
        silent = self._clock.seconds() - self._last_data
        if silent >= self._idle_timeout:
            self._timed_out("data", self._idle_timeout)
            return
        self._timer = self._clock.callLater(self._idle_timeout - silent, self._check_idle)

    def _timed_out(self, phase: str, seconds: float) -> None:
        self._timer = None
        self._failure = UpstreamTimeout(phase, seconds)
        self.abort()

    def abort(self) -> None:
        """Close the upstream connection (agent gone, or timed out)."""
        if self.transport is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason=None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
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
