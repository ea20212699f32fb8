"""
A lean HTTP/1.1 client for the upstream side: persistent connections per
host, one request at a time on each, the answer handed over as an
C{IResponse} whose C{deliverBody} gets the connection as a push producer.

Why: twisted.web's C{Agent} builds, per request, a C{Request}, a response
parser with a state machine dispatching every event through
C{makeStatefulDispatcher}, a C{Response}, a C{_TransportProxyProducer}, and
a dozen Deferreds on the way in and out of its pool: about an eighth of a
proxied request's CPU.  The proxy sends one request with a body already in
memory and relays one answer; this does that and no more.

What it keeps of Agent's behaviour: an idle connection is reused while the
server keeps it open (HTTP/1.1 without C{Connection: close}, a framed
body read to its end); a request fails with L{ResponseNeverReceived} when
the connection ends before an answer's head, and a body with
L{ResponseFailed} (the reasons inside, as Twisted's); an answer without
C{Content-Length} or chunked framing ends with the connection
(L{PotentialDataLoss}); idempotent requests without a body are tried again
once on a new connection when a reused one was closed under them (a POST
never is); cancelling the request's Deferred before the head arrived
aborts the connection; TLS with the same policy object as Agent's
(C{creatorForNetloc}), through the public C{wrapClientTLS}.

Writes on a plain TCP connection are sent with the socket's C{send()}
while nothing is waiting in Twisted's buffer (see
L{cllama_tx.sites.lean_http}); over TLS through the transport.

A read that begins with whole chunks of a chunked answer (a stream's
event, as providers send it: one chunk a write; several when the reader
fell behind) is handed to a body protocol that has
C{chunk_received(framed, spans)} with their framing: C{framed} is the read,
C{spans} (a sequence of ints) the start and stop offsets of each chunk's data in order (its size
line before it, exactly C{b"%x" % size}, and its CRLF after it); what
follows the last one is read as ever.  A relay can pass such chunks on to a
chunked answer as they are, without taking them apart and framing them
again; a protocol without that method gets C{dataReceived} with the data.
"""

from __future__ import annotations

import re
import socket
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    BrowserLikePolicyForHTTPS,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

from cllama_tx.providers.lean_headers import LeanHeaders

log = Logger()

MAX_RESPONSE_HEAD = 64 * 1024
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"DELETE", b"TRACE"})
_NO_BODY = frozenset({204, 304})


class BadResponse(Exception):
    """The upstream's answer is not HTTP/1.x as it should be."""


class _Target:
    """What is worked out once per upstream URL."""

    __slots__ = ("key", "host", "port", "tls", "request_target", "host_header")

    def __init__(self, url: bytes) -> None:
        parsed = URI.fromBytes(url.strip())
        if parsed.scheme not in (b"http", b"https"):
            raise ValueError(f"unsupported scheme {parsed.scheme!r}")
        host = parsed.host
        if not host or any(c in host for c in b" \t\r\n\x00/"):
            raise ValueError(f"bad host {host!r}")
        self.tls = parsed.scheme == b"https"
        self.host = host
        self.port = parsed.port
        self.key = (parsed.scheme, host, parsed.port)
        self.request_target = parsed.originForm
        default = 443 if self.tls else 80
        self.host_header = host if parsed.port == default else b"%s:%d" % (host, parsed.port)
        if b":" in host and not host.startswith(b"["):  # an IPv6 literal
            self.host_header = b"[%s]" % host if parsed.port == default else b"[%s]:%d" % (host, parsed.port)


@implementer(IPushProducer)
class _BodyProducer:
    """The connection as C{deliverBody}'s protocol sees it: pause, resume, stop."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    def pauseProducing(self) -> None:
        self._connection.pause_reading()

    def resumeProducing(self) -> None:
        self._connection.resume_reading()

    def stopProducing(self) -> None:
        self._connection.abandon()


@implementer(IResponse)
class LeanResponse:
    """One upstream answer: status, headers, and its body once C{deliverBody} is called."""

    request = None
    previousResponse = None

    def __init__(self, connection: _Connection, version: tuple, code: int, phrase: bytes, headers: Headers,
                 length: int | object) -> None:
        self._connection = connection
        self.version = version
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._protocol: Any = None
        # The body, when it came whole with the head (then also delivered as usual).
        self.whole_body: bytes | None = None
        self._early: list[bytes] = []
        self._ended: Failure | None = None

    def setPreviousResponse(self, response) -> None:
        self.previousResponse = response

    def deliverBody(self, protocol) -> None:
        if self._protocol is not None:
            raise RuntimeError("the body is delivered once")
        self._protocol = protocol
        protocol.makeConnection(_BodyProducer(self._connection))
        early, self._early = self._early, []
        for data in early:
            protocol.dataReceived(data)
        if self._ended is not None:
            protocol.connectionLost(self._ended)
        elif self._connection._response is self:
            self._connection._sink = getattr(protocol, "chunk_received", None)

    def _data(self, data: bytes) -> None:
        protocol = self._protocol
        if protocol is None:
            self._early.append(data)
        else:
            protocol.dataReceived(data)

    def _end(self, reason: Failure) -> None:
        if self._ended is not None:
            return
        self._ended = reason
        if self._protocol is not None:
            self._protocol.connectionLost(reason)


def whole_chunks(data: bytes) -> Sequence[int]:
    """
    The data offsets (start, stop, start, stop, ...) of the whole chunks
    of a chunked body that C{data} begins with (a chunk's size line is
    exactly C{b"%x" % size}, no extension; the last chunk, C{0}, is not
    taken): empty when it does not begin with one.
    """
    spans: list[int] = []
    n = len(data)
    at = 0
    match = _CANONICAL_SIZE.match
    while True:
        line = match(data, at)
        if line is None:
            return spans
        start = line.end()
        stop = start + int(line.group(1), 16)
        if stop + 2 > n or not data.startswith(b"\r\n", stop):
            return spans
        spans.append(start)
        spans.append(stop)
        at = stop + 2


#: A chunk's size line as this client's peers and the lean channel write it:
#: lower-case hexadecimal without leading zeros (so never the last chunk's 0).
_CANONICAL_SIZE = re.compile(rb"([1-9a-f][0-9a-f]{0,14})\r\n")


# How every complete answer ends: one Failure for all (its type's names, which
# every reader's check() looks up, are worked out once).
_RESPONSE_DONE = Failure(ResponseDone())

# Parsing states.
_IDLE = 0
_HEAD = 1
_BODY_LENGTH = 2
_BODY_CHUNKED = 3
_BODY_CLOSE = 4


class _Connection(Protocol):
    """One upstream connection: one request at a time, answered in order."""

    transport: Any  # TCP or TLS: each can pause, resume and abort

    def __init__(self, client: LeanUpstream, key: tuple) -> None:
        self._client = client
        self.key = key
        self._sock: socket.socket | None = None
        self._backlog = False
        self._watch: _Drain | None = None
        self._state = _IDLE
        self._buffer = b""
        self._waiting: defer.Deferred | None = None
        self._response: LeanResponse | None = None
        self._method = b""
        self._left = 0
        self._chunk_state = 0
        self._sink: Any = None  # the body protocol's chunk_received, while it reads this answer
        self._keep = True
        self.reused = False
        self.idle_since = 0.0
        self.connected = False
        self._paused = False
        self.on_lost: defer.Deferred | None = None

    # -- connection ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected = True
        transport = self.transport
        if ITCPTransport.providedBy(transport):
            try:
                transport.setTcpNoDelay(True)  # a request is one write: never held for an ACK
            except Exception:
                pass
        if self._client.direct and ITCPTransport.providedBy(transport) and not ISSLTransport.providedBy(transport):
            try:
                handle = getattr(transport, "getHandle")()  # noqa: B009 (ITCPTransport)
            except Exception:
                handle = None
            if isinstance(handle, socket.socket):
                self._sock = handle

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        self._client._forget(self)
        on_lost, self.on_lost = self.on_lost, None
        if on_lost is not None:
            on_lost.callback(None)
        waiting, self._waiting = self._waiting, None
        state, self._state = self._state, _IDLE
        response, self._response = self._response, None
        self._sink = None
        if waiting is not None:
            waiting.errback(Failure(ResponseNeverReceived([reason])))
        elif response is not None:
            if state == _BODY_CLOSE and reason.check(ConnectionDone):
                response._end(Failure(PotentialDataLoss()))
            elif state == _BODY_CLOSE:
                response._end(Failure(ResponseFailed([reason, Failure(PotentialDataLoss())])))
            else:
                response._end(Failure(ResponseFailed([reason])))

    # -- the request ------------------------------------------------------------------------

    def send_request(self, method: bytes, target: _Target, headers: Headers | None, body: bytes | None,
                     d: defer.Deferred) -> None:
        self._method = method
        self._waiting = d
        self._state = _HEAD
        self._keep = True
        lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (method, target.request_target, target.host_header)]
        if headers is not None:
            for name, values in headers.getAllRawHeaders():
                lowered = name.lower()
                if lowered == b"host" or lowered == b"content-length" or lowered == b"transfer-encoding":
                    continue
                for value in values:
                    lines.append(b"%s: %s\r\n" % (name, value))
        if body is not None:
            lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
            lines.append(body)
        else:
            lines.append(b"\r\n")
        self._send(b"".join(lines))

    def _send(self, data: bytes) -> None:
        sock = self._sock
        if sock is None or self._backlog:
            self.transport.write(data)
            return
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._sock = None  # broken: Twisted's write finds out; nothing direct after it
            self.transport.write(data)
            return
        if sent == len(data):
            return
        self._backlog = True
        self.transport.write(data[sent:])
        self._watch = _Drain(self)
        self.transport.registerProducer(self._watch, False)

    def drained(self) -> None:
        self._backlog = False
        if self._watch is not None:
            self._watch = None
            self.transport.unregisterProducer()

    def cancel(self) -> None:
        """The caller gave up before the answer's head: this connection is not reused."""
        self._waiting = None
        self._keep = False
        if self.transport is not None:
            self.transport.abortConnection()

    # -- the body's producer ------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resumeProducing()

    def abandon(self) -> None:
        """The reader wants no more of the body: the connection goes (the reader hears of it then)."""
        self._keep = False
        self._state = _IDLE
        self._buffer = b""
        self._sink = None
        if self.connected and self.transport is not None:
            self.transport.abortConnection()

    # -- the answer ------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self._state == _BODY_CHUNKED and not self._buffer and not self._chunk_state and self._sink is not None:
            # The usual read of a stream: whole chunks, passed on framed.
            # One chunk is the most usual (see whole_chunks).
            end = data.find(b"\r\n")
            size = len(data) - end - 4
            spans: Sequence[int]
            if 0 < end < 17 and size > 0 and data[:end] == b"%x" % size and data[-2:] == b"\r\n":
                spans = (end + 2, size + end + 2)
            else:
                spans = whole_chunks(data)
            if spans:
                self._sink(data, spans)
                end = spans[-1] + 2
                if end == len(data) or self._state != _BODY_CHUNKED:
                    return  # all of it, or the reader abandoned the answer
                data = data[end:]
        self._buffer = self._buffer + data if self._buffer else data
        try:
            self._advance()
        except BadResponse as e:
            self._fail(e)

    def _fail(self, error: Exception) -> None:
        self._keep = False
        self._buffer = b""
        self._sink = None
        if self.transport is not None:
            self.transport.abortConnection()
        # connectionLost reports it; say why first where a Deferred waits.
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.errback(Failure(ResponseNeverReceived([Failure(error)])))
        response, self._response = self._response, None
        self._state = _IDLE
        if response is not None:
            response._end(Failure(ResponseFailed([Failure(error)])))

    def _advance(self) -> None:
        while self._buffer or self._state == _BODY_LENGTH and self._left == 0:
            state = self._state
            if state == _HEAD:
                if not self._read_head():
                    return
            elif state == _BODY_LENGTH:
                buffer = self._buffer
                if self._left:
                    take = buffer[: self._left]
                    self._buffer = buffer[len(take):]
                    self._left -= len(take)
                    self._deliver(take)
                    if self._state != _BODY_LENGTH:
                        return  # abandoned by the reader
                if self._left == 0:
                    self._done()
                elif not self._buffer:
                    return
            elif state == _BODY_CHUNKED:
                if not self._read_chunks():
                    return
            elif state == _BODY_CLOSE:
                data, self._buffer = self._buffer, b""
                self._deliver(data)
                return
            else:  # idle: bytes nobody asked for
                raise BadResponse("the server sent bytes without a request")

    def _read_head(self) -> bool:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_RESPONSE_HEAD:
                raise BadResponse("the response head is too large")
            return False
        head, self._buffer = buffer[:end], buffer[end + 4:]
        line, _, rest = head.partition(b"\r\n")
        parts = line.split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or len(parts[1]) != 3 or not parts[1].isdigit():
            raise BadResponse(f"bad status line {line[:100]!r}")
        version = (b"HTTP", 1, 1 if parts[0] == b"HTTP/1.1" else 0)
        code = int(parts[1])
        phrase = parts[2] if len(parts) > 2 else b""
        headers = LeanHeaders()
        add = headers.addRawHeader
        if rest:
            for field in rest.split(b"\r\n"):
                name, colon, value = field.partition(b":")
                if not colon or not name or name != name.strip():
                    raise BadResponse("a response header line is not 'name: value'")
                add(name, value.strip(b" \t"))
        if 100 <= code < 200:
            return True  # 100 Continue, 103 Early Hints: the answer follows
        connection = b",".join(headers.getRawHeaders(b"connection") or ()).lower()
        if b"close" in connection or (version[2] == 0 and b"keep-alive" not in connection):
            self._keep = False
        length: int | object = UNKNOWN_LENGTH
        encodings = headers.getRawHeaders(b"transfer-encoding")
        if self._method == b"HEAD" or code in _NO_BODY:
            state = _BODY_LENGTH
            self._left = 0
            length = 0
        elif encodings is not None and b"chunked" in b",".join(encodings).lower():
            state = _BODY_CHUNKED
            self._chunk_state = 0
        else:
            lengths = headers.getRawHeaders(b"content-length")
            if lengths is not None:
                values = {v.strip() for value in lengths for v in value.split(b",")}
                text = values.pop() if len(values) == 1 else b""
                if not text.isdigit():
                    raise BadResponse("the response's Content-Length is not one number")
                state = _BODY_LENGTH
                self._left = length = int(text)
            else:
                state = _BODY_CLOSE
                self._keep = False
        self._state = state
        response = LeanResponse(self, version, code, phrase, headers, length)
        self._response = response
        waiting, self._waiting = self._waiting, None
        if state == _BODY_LENGTH and waiting is not None and len(self._buffer) >= self._left:
            # The whole body came with the head (a JSON answer usually does): the caller
            # gets the answer complete, its connection back in the pool, in one step.
            body, self._buffer = self._buffer[: self._left], self._buffer[self._left :]
            self._left = 0
            response.whole_body = body
            self._deliver(body)
            self._done()
            waiting.callback(response)
            return False
        if waiting is not None:
            waiting.callback(response)
        return self._state == state  # False when the callback already ended this answer

    def _read_chunks(self) -> bool:
        while True:
            buffer = self._buffer
            state = self._chunk_state
            if state == 0:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > 1024:
                        raise BadResponse("a chunk size line is too long")
                    return False
                text = buffer[:end].split(b";", 1)[0].strip()
                try:
                    size = int(text, 16)
                except ValueError:
                    raise BadResponse("a chunk size is not hexadecimal") from None
                if size < 0:
                    raise BadResponse("a chunk size is negative")
                self._buffer = buffer[end + 2:]
                if size == 0:
                    self._chunk_state = 3
                else:
                    self._left = size
                    self._chunk_state = 1
            elif state == 1:
                if not buffer:
                    return False
                take = buffer[: self._left]
                self._buffer = buffer[len(take):]
                self._left -= len(take)
                if not self._left:
                    self._chunk_state = 2
                self._deliver(take)
                if self._state != _BODY_CHUNKED:
                    return False  # abandoned by the reader
            elif state == 2:
                if len(buffer) < 2:
                    return False
                if buffer[:2] != b"\r\n":
                    raise BadResponse("a chunk does not end with CRLF")
                self._buffer = buffer[2:]
                self._chunk_state = 0
            else:  # trailers until the empty line
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_RESPONSE_HEAD:
                        raise BadResponse("the trailers are too large")
                    return False
                self._buffer = buffer[end + 2:]
                if end == 0:
                    self._done()
                    return True

    def _deliver(self, data: bytes) -> None:
        response = self._response
        if response is not None and data:
            response._data(data)

    def _done(self) -> None:
        """The answer's body is complete: back to the pool, then tell the reader."""
        response, self._response = self._response, None
        self._state = _IDLE
        self._sink = None
        if self._buffer:
            self._keep = False  # bytes after the answer: nothing sane can follow
            self._buffer = b""
        if self._keep and self.connected:
            self._client._release(self)
        elif self.connected and self.transport is not None:
            self.transport.loseConnection()
        if response is not None:
            response._end(_RESPONSE_DONE)


@implementer(IPushProducer)
class _Drain:
    """Told by Twisted when its write buffer is empty (and once at registration, ignored)."""

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection
        self._armed = False

    def resumeProducing(self) -> None:
        if not self._armed:
            self._armed = True
            return
        self._connection.drained()

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Factory(Factory):
    noisy = False  # upstream connections come and go all day: not log events

    def __init__(self, client: LeanUpstream, key: tuple) -> None:
        self._client = client
        self._key = key

    def buildProtocol(self, addr):
        connection = _Connection(self._client, self._key)
        connection.factory = self
        return connection


class LeanUpstream:
    """
    The daemon's upstream HTTP client (see the module docstring): the
    interface the proxy and the key prober use, C{request(method, url,
    headers, body)} and C{close()}.
    """

    MAX_TARGETS = 256
    SWEEP = 10.0

    def __init__(self, reactor, connect_timeout: float, tls_policy=None, max_per_host: int = 64,
                 idle_timeout: float = 120.0, direct: bool = True) -> None:
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._tls_policy = tls_policy if tls_policy is not None else BrowserLikePolicyForHTTPS()
        self.max_per_host = max_per_host
        self.idle_timeout = idle_timeout
        self.direct = direct
        self._targets: dict[bytes, _Target] = {}
        self._idle: dict[tuple, list[_Connection]] = defaultdict(list)
        self._all: set[_Connection] = set()
        self._sweeper: Any = None
        self._closed = False

    def _target(self, url: bytes) -> _Target:
        target = self._targets.get(url)
        if target is None:
            target = _Target(url)
            if len(self._targets) >= self.MAX_TARGETS:
                self._targets.clear()
            self._targets[url] = target
        return target

    def request(self, method: bytes, url: bytes, headers: Headers | None, body: bytes | None) -> defer.Deferred:
        """Send one request; the Deferred fires with the answer's head (an IResponse)."""
        try:
            target = self._target(url)
        except Exception:
            return defer.fail()
        if self._closed:
            return defer.fail(ResponseNeverReceived([Failure(ConnectionDone("the client is closed"))]))
        retry = method in IDEMPOTENT and body is None
        return self._request(method, target, headers, body, retry)

    def _request(self, method: bytes, target: _Target, headers, body, retry: bool) -> defer.Deferred:
        connection = self._take(target.key)
        if connection is not None:
            d = self._on(connection, method, target, headers, body)
            if retry:
                d.addErrback(self._again, method, target, headers, body)
            return d
        state: dict = {}

        def cancel(_d: defer.Deferred) -> None:
            pending = state.get("pending")
            if pending is not None:
                pending.cancel()
            made = state.get("connection")
            if made is not None:
                made.cancel()

        outer: defer.Deferred = defer.Deferred(cancel)
        pending = self._connect(target)
        state["pending"] = pending

        def connected(connection: _Connection) -> None:
            state["pending"] = None
            if outer.called:  # cancelled meanwhile
                connection.transport.loseConnection()
                return
            self._all.add(connection)
            state["connection"] = connection
            inner: defer.Deferred = defer.Deferred()
            inner.addCallbacks(outer.callback, outer.errback)
            connection.send_request(method, target, headers, body, inner)

        def failed(failure: Failure) -> None:
            state["pending"] = None
            if not outer.called:
                outer.errback(failure)

        pending.addCallbacks(connected, failed)
        return outer

    def _again(self, failure: Failure, method, target, headers, body) -> Any:
        reasons = getattr(failure.value, "reasons", None) or []
        if failure.check(ResponseNeverReceived) and not any(r.check(defer.CancelledError) for r in reasons):
            return self._request(method, target, headers, body, False)
        return failure

    def _on(self, connection: _Connection, method, target, headers, body) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred(lambda _d: connection.cancel())
        connection.reused = True
        connection.send_request(method, target, headers, body, d)
        return d

    def _connect(self, target: _Target) -> defer.Deferred:
        endpoint: Any = HostnameEndpoint(self._reactor, target.host, target.port, timeout=self._connect_timeout)
        if target.tls:
            creator = self._tls_policy.creatorForNetloc(target.host, target.port)
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint.connect(_Factory(self, target.key))

    def _take(self, key: tuple) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.connected:
                return connection
        return None

    def _release(self, connection: _Connection) -> None:
        if self._closed:
            connection.transport.loseConnection()
            return
        idle = self._idle[connection.key]
        if len(idle) >= self.max_per_host:
            connection.transport.loseConnection()
            return
        connection.idle_since = self._reactor.seconds()
        idle.append(connection)
        if self._sweeper is None:
            self._sweeper = self._reactor.callLater(self.SWEEP, self._sweep)

    def _forget(self, connection: _Connection) -> None:
        self._all.discard(connection)
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def _sweep(self) -> None:
        """Close connections idle longer than C{idle_timeout}."""
        self._sweeper = None
        limit = self._reactor.seconds() - self.idle_timeout
        left = False
        for idle in self._idle.values():
            for connection in [c for c in idle if c.idle_since <= limit]:
                idle.remove(connection)
                connection.transport.loseConnection()
            left = left or bool(idle)
        if left and not self._closed:
            self._sweeper = self._reactor.callLater(self.SWEEP, self._sweep)

    def idle_connections(self, url: bytes | None = None) -> int:
        """How many connections wait in the pool (for one URL's host, or all)."""
        if url is not None:
            return len(self._idle.get(self._target(url).key, ()))
        return sum(len(idle) for idle in self._idle.values())

    def close(self) -> defer.Deferred:
        """Close every idle connection; fires once they are gone."""
        self._closed = True
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None
        waits = []
        for idle in self._idle.values():
            for connection in idle:
                d: defer.Deferred = defer.Deferred()
                connection.on_lost = d
                waits.append(d)
                connection.transport.loseConnection()
            idle.clear()
        return defer.DeferredList(waits) if waits else defer.succeed(None)
