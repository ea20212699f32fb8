"""
A lean HTTP/1.1 server channel for the API's inference paths.

Why: twisted.web's C{HTTPChannel} and C{Request} cost about a sixth of a
proxied request's CPU (a line receiver per header, a request object with
dozens of attributes, a content spool, a producer dance per response).  The
inference paths need a small part of that: this channel parses a request's
head in one pass, reads its body (C{Content-Length} or chunked) under the
cap, and hands the pipeline a L{LeanRequest}, which has the subset of
twisted.web's C{Request} API the pipeline uses, so the pipeline does not
know which channel served it.

Any other path (the Klein app: models, the key API, history, health) is
handed over, with the bytes read so far, to a twisted.web channel that
serves that connection from then on: clarity matters more than
microseconds there.

Writes: on a plain TCP or UNIX transport the channel sends with the
socket's C{send()} (L{ITCPTransport.getHandle}, public) as long as nothing
it wrote is still in Twisted's buffer, which it knows without looking:
what the kernel does not take goes to C{transport.write()}, and a pull
producer registered on the transport until Twisted says its buffer is
empty (C{resumeProducing}) marks the time to send directly again.  So a
response leaves when it is written, not on the reactor's next turn, with
no writability registration; meanwhile the request's producer (a stream's
upstream) is paused, which is the backpressure.  Over TLS, or with
C{CLLAMA_WRITE_THROUGH=0}, every write takes C{transport.write()} and the
channel is the transport's push producer, as twisted.web's is.

What it refuses, each answered in the surface's error shape with
C{Connection: close}, audited, and never handed to the pipeline: a bad
request line or header (400), an HTTP version other than 1.0 and 1.1
(505), a head over L{MAX_HEAD} bytes or L{MAX_HEADERS} fields (431), a
transfer coding other than chunked (501), bad chunked framing or a body
length that is not one number (400), and, through the header gate, a body
over the cap (413) and wrong credentials (401/403).  Pipelined requests
are read one after another: the next one's bytes wait (reading is paused
past L{MAX_HEAD} of them) until the answer to the current one is sent.
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from twisted.internet import defer
from twisted.internet.interfaces import (
    IProtocol,
    IPushProducer,
    ISSLTransport,
    ITCPTransport,
    IUNIXTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, datetimeToString
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from cllama_tx.providers.lean_headers import LeanHeaders
from cllama_tx.sites.guard import (
    BODY,
    BODY_AUTHENTICATED,
    BUSY,
    DRAIN,
    HEAD,
    IDLE,
    GuardedConnection,
    refuse_request,
)
from cllama_tx.sites.header_gate import Refusal, refusal, shape_for_path
from cllama_tx.surfaces.errors import ProxyError

log = Logger()

MAX_HEAD = 16 * 1024
"""Largest request head (request line and headers), as twisted.web's own limit."""
MAX_REQUEST_LINE = 8 * 1024
MAX_HEADERS = 500
MAX_CHUNK_LINE = 1024
MAX_TRAILERS = 16 * 1024
NO_BODY_CODES = frozenset({204, 304})

# bytes.translate(None, these) leaves what is not a token character / a hex digit.
_TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_HEX = b"0123456789abcdefABCDEF"
# Header names seen valid: agents send the same dozen on every request.
_NAMES: set[bytes] = set()
_MAX_NAMES = 4096


class BadRequest(Exception):
    """The request cannot be read; answered with C{status} and the connection closed."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _is_token(value: bytes) -> bool:
    return bool(value) and not value.translate(None, _TOKEN)


def parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """C{(method, target, version)} of a request line.  Raises L{BadRequest}."""
    if len(line) > MAX_REQUEST_LINE:
        raise BadRequest(414, "uri_too_long", f"the request line is longer than {MAX_REQUEST_LINE} bytes")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise BadRequest(400, "bad_request_line", "the request line is not 'METHOD target HTTP/1.1'")
    method, target, version = parts
    if not _is_token(method):
        raise BadRequest(400, "bad_request_line", "the request method is not a token")
    if not target.startswith(b"/") or b"\x00" in target or b"\x7f" in target or b"\t" in target:
        raise BadRequest(400, "bad_request_line", "the request target is not an absolute path")
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        if version.startswith(b"HTTP/") and len(version) == 8 and version[5:6].isdigit() and version[7:8].isdigit():
            raise BadRequest(505, "http_version_not_supported", "HTTP/1.1 and HTTP/1.0 only")
        raise BadRequest(400, "bad_request_line", "the request line has no HTTP version")
    return method, target, version


def parse_fields(rest: bytes) -> Headers:
    """The header fields of a request head (after its request line).  Raises L{BadRequest}."""
    headers = LeanHeaders()
    if not rest:
        return headers
    lines = rest.split(b"\r\n")
    if len(lines) > MAX_HEADERS:
        raise BadRequest(431, "request_header_fields_too_large", f"more than {MAX_HEADERS} header fields")
    add = headers.addRawHeader
    names = _NAMES
    for field in lines:
        name, colon, value = field.partition(b":")
        if name not in names:
            if not colon or not _is_token(name):
                raise BadRequest(400, "bad_header", "a header line is not 'name: value'")
            if len(names) < _MAX_NAMES:
                names.add(name)
        elif not colon:
            raise BadRequest(400, "bad_header", "a header line is not 'name: value'")
        value = value.strip(b" \t")
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            raise BadRequest(400, "bad_header", "a header value holds a control character")
        add(name, value)
    return headers


class _Date:
    """The Date header's value, made once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def __call__(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = datetimeToString(now)
        return self._value


_date = _Date()


@implementer(IPushProducer)
class _DrainWatch:
    """
    A pull producer registered on the transport while part of a write
    waits in Twisted's buffer: Twisted calls C{resumeProducing} when that
    buffer is empty (and once at registration, ignored).
    """

    def __init__(self, channel: LeanChannel) -> None:
        self._channel = channel
        self._armed = False

    def resumeProducing(self) -> None:
        if not self._armed:
            self._armed = True  # the call registerProducer makes at once
            return
        self._channel._drained()

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class LeanRequest:
    """
    One inference request: the part of twisted.web's C{Request} the
    pipeline uses (headers in and out, status, write, finish,
    notifyFinish, a producer, the client's address, the body).
    """

    def __init__(
        self, channel: LeanChannel, method: bytes, uri: bytes, version: bytes, headers: Headers, keep_alive: bool
    ) -> None:
        self.channel: LeanChannel | None = channel
        self.transport: Any = channel.transport
        self.method = method
        self.uri = uri
        self.path = uri.split(b"?", 1)[0]
        self.clientproto = version
        self.requestHeaders = headers
        self.responseHeaders: Headers = LeanHeaders()
        self.code = 200
        self.code_message: bytes | None = None
        self.startedWriting = False
        self.finished = False
        self.content: io.BytesIO | None = None
        self.principal: Any = None
        self.resource: Any = None  # what serves it (the site's inference resource)
        self.producer: IPushProducer | None = None
        self.keep_alive = keep_alive
        self.sentLength = 0
        self._chunked = False
        self._no_body = method == b"HEAD"
        self._finishing: list[defer.Deferred] | None = []
        self._lost: Failure | None = None

    # -- what the pipeline reads --------------------------------------------------------

    @property
    def args(self) -> dict[bytes, list[bytes]]:
        _, _, query = self.uri.partition(b"?")
        return parse_qs(query, keep_blank_values=True)

    def getHeader(self, name: bytes) -> bytes | None:
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def getClientAddress(self):
        return self.transport.getPeer()

    def getHost(self):
        return self.transport.getHost()

    def isSecure(self) -> bool:
        return ISSLTransport.providedBy(self.transport)

    # -- the answer ----------------------------------------------------------------------

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        self.code_message = message

    def setHeader(self, name: bytes | str, value: bytes | str) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def notifyFinish(self) -> defer.Deferred:
        """Fires when the answer is sent; fails when the connection is lost before."""
        d: defer.Deferred = defer.Deferred()
        if self._lost is not None:
            d.errback(self._lost)
        elif self._finishing is None:
            d.callback(None)
        else:
            self._finishing.append(d)
        return d

    def _head(self) -> bytes:
        code = self.code
        message = self.code_message or RESPONSES.get(code, b"Unknown Status")
        headers = self.responseHeaders
        out = [b"HTTP/1.1 %d %s\r\n" % (code, message)]
        has_length = headers.hasHeader(b"content-length")
        if code in NO_BODY_CODES:
            self._no_body = True
        elif not has_length and not self._no_body:
            if self.clientproto == b"HTTP/1.1":
                self._chunked = True
                out.append(b"Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False  # the end of the body is the end of the connection
        for name, values in headers.getAllRawHeaders():
            for value in values:
                out.append(b"%s: %s\r\n" % (name, value))
        if not headers.hasHeader(b"date"):
            out.append(b"Date: %s\r\n" % _date())
        if not self.keep_alive:
            out.append(b"Connection: close\r\n")
        elif self.clientproto == b"HTTP/1.0":
            out.append(b"Connection: keep-alive\r\n")
        out.append(b"\r\n")
        return b"".join(out)

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("LeanRequest.write called after finish")
        channel = self.channel
        if channel is None:
            return  # the connection is gone: nobody reads this
        if not self.startedWriting:
            self.startedWriting = True
            head = self._head()
            if self._no_body or not data:
                channel.send(head)
                return
            self.sentLength += len(data)
            channel.send(head + (b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data))
            return
        if not data or self._no_body:
            return
        self.sentLength += len(data)
        channel.send(b"%x\r\n%s\r\n" % (len(data), data) if self._chunked else data)

    def write_framed(self, framed: bytes, size: int) -> bool:
        """
        Send C{framed}, one chunk with its framing (C{size} bytes of data),
        as it is: a stream's relay passes an upstream chunk on this way
        without taking it apart.  False when this answer does not take it
        (not chunked, its head not sent yet, finished): the caller writes
        the data instead.
        """
        if not self._chunked or not self.startedWriting or self.finished:
            return False
        channel = self.channel
        if channel is not None:
            self.sentLength += size
            channel.send(framed)
        return True

    def finish(self) -> None:
        if self.finished:
            return
        channel = self.channel
        if channel is None:
            self.finished = True
            return
        if not self.startedWriting:
            if not self._no_body and not self.responseHeaders.hasHeader(b"content-length"):
                self.responseHeaders.setRawHeaders(b"content-length", [b"0"])
            self.write(b"")
        self.finished = True
        if self._chunked:
            channel.send(b"0\r\n\r\n")
        if self.producer is not None:
            self.unregisterProducer()
        waiting, self._finishing = self._finishing, None
        for d in waiting or ():
            d.callback(None)
        channel.request_done(self)

    # -- backpressure -----------------------------------------------------------------

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError(f"cannot register {producer!r}: {self.producer!r} is registered")
        self.producer = producer
        channel = self.channel
        if channel is None:
            producer.stopProducing()
        elif channel.paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    # -- the channel's side ----------------------------------------------------------------

    def connection_lost(self, reason: Failure) -> None:
        self.channel = None
        if self.finished:
            return
        self._lost = reason
        producer, self.producer = self.producer, None
        if producer is not None:
            producer.stopProducing()
        waiting, self._finishing = self._finishing, None
        for d in waiting or ():
            d.errback(reason)


# Reading states.
_HEAD = 0
_BODY = 1
_SERVING = 2
_DONE = 3  # refused or closing: nothing more is read
_HANDED = 4  # twisted.web serves this connection now


@implementer(IPushProducer)
class LeanChannel(Protocol):
    """
    One API connection, read by hand for the inference paths.

    @param site: the L{cllama_tx.sites.api.ApiSite} (its C{hot} resources,
        C{gate}, C{max_body_bytes} and C{audit}).
    @param fallback: builds the twisted.web channel a connection is handed
        to for any other path.
    @param direct: send with the socket's C{send()} where the transport
        allows (see the module's docstring).
    """

    transport: Any  # TCP, TLS, UNIX, or the guard's wrapper: each can pause, resume and abort

    def __init__(self, site: Any, fallback: Callable[[], Any], direct: bool = True) -> None:
        self._site = site
        self._fallback = fallback
        self._want_direct = direct
        self._sock: socket.socket | None = None
        self._backlog = False
        self._watch: _DrainWatch | None = None
        self._guard: GuardedConnection | None = None
        self._registered = False  # the channel is the transport's push producer
        self._buffer = b""
        self._state = _HEAD
        self._request: LeanRequest | None = None
        self._handed: Any = None
        self._read_paused = False
        self.paused = False  # the agent's side is backed up: the request's producer is paused
        # The body being read.
        self._length: int | None = None
        self._chunked = False
        self._limit = 0
        self._parts: list[bytes] = []
        self._received = 0
        self._chunk_left = 0
        self._chunk_state = 0
        self._trailers = 0
        self._deciding = False

    # -- connection ---------------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        self._guard = self._guarded()  # looked up once, not on every send
        if ITCPTransport.providedBy(transport):
            # An answer's pieces go out as they are written: without this the
            # last one (a stream's terminating chunk) waits for the agent's
            # delayed ACK, 40 ms, behind Nagle's algorithm.
            try:
                transport.setTcpNoDelay(True)
            except Exception:
                pass
        if (
            self._want_direct
            and not ISSLTransport.providedBy(transport)
            and (ITCPTransport.providedBy(transport) or IUNIXTransport.providedBy(transport))
        ):
            try:
                handle = getattr(transport, "getHandle")()  # noqa: B009 (ITCPTransport, IUNIXTransport)
            except Exception:
                handle = None
            if isinstance(handle, socket.socket):
                self._sock = handle
        if self._sock is None:
            # Twisted's buffered writes: its buffer's pressure reaches us as
            # pause and resume, as it reaches twisted.web's channel.
            transport.registerProducer(self, True)
            self._registered = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        state, self._state = self._state, _DONE
        if state == _HANDED and self._handed is not None:
            self._handed.connectionLost(reason)
            return
        request, self._request = self._request, None
        if request is not None:
            request.connection_lost(reason)

    def _guarded(self) -> GuardedConnection | None:
        transport = self.transport
        return transport if isinstance(transport, GuardedConnection) else None

    def _move(self, state: str) -> None:
        conn = self._guarded()
        if conn is not None:
            conn.factory.move(conn, state)

    # -- writing -------------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Write C{data}: at once where the socket takes it, else through Twisted's buffer."""
        sock = self._sock
        if sock is None or self._backlog:
            self.transport.write(data)
            return
        guard = self._guard
        if guard is not None and guard.state == DRAIN:
            return  # refused: the guard drops what is still written
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            # Broken: Twisted's write and its next poll find out and close;
            # nothing is sent directly after it any more.
            self._sock = None
            self.transport.write(data)
            return
        if sent == len(data):
            return
        self._backlog = True
        self.transport.write(data[sent:])
        self._watch = _DrainWatch(self)
        self.transport.registerProducer(self._watch, False)
        self._pause_answer()

    def _drained(self) -> None:
        """Twisted's buffer is empty again: send directly, let the answer go on."""
        self._backlog = False
        if self._watch is not None:
            self._watch = None
            self.transport.unregisterProducer()
        self._resume_answer()

    def _pause_answer(self) -> None:
        if self.paused:
            return
        self.paused = True
        request = self._request
        if request is not None and request.producer is not None:
            request.producer.pauseProducing()

    def _resume_answer(self) -> None:
        if not self.paused:
            return
        self.paused = False
        request = self._request
        if request is not None and request.producer is not None:
            request.producer.resumeProducing()

    # IPushProducer, when registered on the transport (buffered writes).

    def pauseProducing(self) -> None:
        self._pause_answer()

    def resumeProducing(self) -> None:
        self._resume_answer()

    def stopProducing(self) -> None:
        pass  # connectionLost follows

    # -- reading -------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state == _HANDED:
            self._handed.dataReceived(data)
            return
        if state == _DONE:
            return
        self._buffer = self._buffer + data if self._buffer else data
        if state == _SERVING or self._deciding:
            if len(self._buffer) > MAX_HEAD and not self._read_paused:
                # A pipelined request waits; so does the client past this.
                self._read_paused = True
                self.transport.pauseProducing()
            return
        self._advance()

    def _advance(self) -> None:
        """Read what the buffer holds: heads, bodies, until a request is being served."""
        try:
            while self._state == _HEAD or self._state == _BODY:
                if self._state == _HEAD:
                    if not self._read_head():
                        return
                elif not self._read_body():
                    return
        except BadRequest as bad:
            self._bad(bad)

    def _read_head(self) -> bool:
        buffer = self._buffer
        # Empty lines before a request line are allowed (RFC 9112, 2.2).
        while buffer.startswith(b"\r\n"):
            buffer = buffer[2:]
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            self._buffer = buffer
            if len(buffer) > MAX_HEAD:
                line_end = buffer.find(b"\r\n")
                if line_end < 0 and len(buffer) > MAX_REQUEST_LINE:
                    raise BadRequest(414, "uri_too_long", f"the request line is longer than {MAX_REQUEST_LINE} bytes")
                raise BadRequest(431, "request_header_fields_too_large", f"the request head is over {MAX_HEAD} bytes")
            return False
        if end > MAX_HEAD:
            raise BadRequest(431, "request_header_fields_too_large", f"the request head is over {MAX_HEAD} bytes")
        head, self._buffer = buffer[:end], buffer[end + 4:]
        line, _, rest = head.partition(b"\r\n")
        method, target, version = parse_request_line(line)
        path = target.split(b"?", 1)[0]
        resource = self._site.hot.get(path)
        if resource is None:
            self._hand_over(head + b"\r\n\r\n" + self._buffer)
            return False
        headers = parse_fields(rest)
        connection = (headers.getRawHeaders(b"connection") or [b""])[-1].lower()
        if version == b"HTTP/1.1":
            keep_alive = b"close" not in connection
        else:
            keep_alive = b"keep-alive" in connection
        request = LeanRequest(self, method, target, version, headers, keep_alive)
        request.resource = resource
        self._request = request
        self._begin_body(request, method, path, headers, version)
        return self._state == _BODY

    def _begin_body(self, request: LeanRequest, method: bytes, path: bytes, headers: Headers, version: bytes) -> None:
        encodings = headers.getRawHeaders(b"transfer-encoding")
        lengths = headers.getRawHeaders(b"content-length")
        length: int | None
        if encodings is not None:
            if lengths is not None:
                raise BadRequest(400, "bad_framing", "a request with both Transfer-Encoding and Content-Length")
            coding = b",".join(encodings).strip().lower()
            if coding != b"chunked":
                raise BadRequest(501, "unsupported_transfer_coding", "the only transfer coding taken is chunked")
            if version != b"HTTP/1.1":
                raise BadRequest(400, "bad_framing", "chunked bodies need HTTP/1.1")
            self._chunked, length = True, None
        elif lengths is not None:
            values = {v.strip() for value in lengths for v in value.split(b",")}
            if len(values) != 1:
                raise BadRequest(400, "bad_framing", "Content-Length is not one number")
            text = values.pop()
            if not text.isdigit() or len(text) > 18:
                raise BadRequest(400, "bad_framing", "Content-Length is not a number")
            self._chunked, length = False, int(text)
        else:
            self._chunked, length = False, 0
        self._length = length
        self._parts = []
        self._received = 0
        self._chunk_left = 0
        self._chunk_state = 0
        self._trailers = 0
        site = self._site
        gate = site.gate
        self._limit = site.max_body_bytes
        if gate is not None:
            self._limit = gate.body_limit(method, path)
            refused = gate.check(request, method, path, length)
            if isinstance(refused, defer.Deferred):
                self._decide_later(request, refused, path, length)
                return
            if refused is not None:
                self._refuse(refused, path)
                return
        self._accept(request, path, length)

    def _accept(self, request: LeanRequest, path: bytes, length: int | None) -> None:
        if length is not None and length > self._limit:
            self._refuse_oversized(path)
            return
        self._move(BODY if request.principal is None else BODY_AUTHENTICATED)
        self._state = _BODY
        expect = request.requestHeaders.getRawHeaders(b"expect")
        if expect and request.clientproto == b"HTTP/1.1" and expect[-1].lower() == b"100-continue" and length != 0:
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def _decide_later(self, request: LeanRequest, deciding: defer.Deferred, path: bytes, length: int | None) -> None:
        """The gate reads the caller's key from the shared store: read nothing more until it answers."""
        self._deciding = True
        self.transport.pauseProducing()

        def decided(refused: Refusal | None) -> None:
            self._deciding = False
            if self._state == _DONE or self._request is not request:
                return  # the client left meanwhile
            self.transport.resumeProducing()
            if refused is not None:
                self._refuse(refused, path)
                return
            self._accept(request, path, length)
            if self._state == _BODY:
                self._advance()

        deciding.addCallback(decided).addErrback(lambda f: log.failure("deciding on a request's headers", f))

    def _read_body(self) -> bool:
        """Take body bytes from the buffer; True once the request went to be served."""
        if not self._chunked:
            need = (self._length or 0) - self._received
            buffer = self._buffer
            if need > 0 and buffer:
                take = buffer[:need]
                self._buffer = buffer[need:]
                self._parts.append(take)
                self._received += len(take)
                need -= len(take)
            if need > 0:
                return False
            self._serve()
            return True
        return self._read_chunks()

    def _read_chunks(self) -> bool:
        while True:
            buffer = self._buffer
            if self._chunk_state == 0:  # a chunk's size line
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_CHUNK_LINE:
                        raise BadRequest(400, "bad_chunked_body", "a chunk size line is too long")
                    return False
                size_text = buffer[:end].split(b";", 1)[0].strip(b" \t")
                if not size_text or size_text.translate(None, _HEX) or len(size_text) > 15:
                    raise BadRequest(400, "bad_chunked_body", "a chunk size is not a hexadecimal number")
                self._buffer = buffer[end + 2:]
                size = int(size_text, 16)
                if size == 0:
                    self._chunk_state = 3
                    continue
                if self._received + size > self._limit:
                    self._refuse_oversized(self._request.path if self._request is not None else b"")
                    return False
                self._chunk_left = size
                self._chunk_state = 1
            elif self._chunk_state == 1:  # chunk data
                if not buffer:
                    return False
                take = buffer[: self._chunk_left]
                self._buffer = buffer[len(take):]
                self._parts.append(take)
                self._received += len(take)
                self._chunk_left -= len(take)
                if self._chunk_left:
                    return False
                self._chunk_state = 2
            elif self._chunk_state == 2:  # the CRLF after a chunk's data
                if len(buffer) < 2:
                    return False
                if buffer[:2] != b"\r\n":
                    raise BadRequest(400, "bad_chunked_body", "a chunk's data does not end with CRLF")
                self._buffer = buffer[2:]
                self._chunk_state = 0
            else:  # trailers, up to the empty line
                end = buffer.find(b"\r\n")
                if end < 0:
                    if self._trailers + len(buffer) > MAX_TRAILERS:
                        raise BadRequest(431, "request_header_fields_too_large", "the trailers are too large")
                    return False
                self._trailers += end + 2
                if self._trailers > MAX_TRAILERS:
                    raise BadRequest(431, "request_header_fields_too_large", "the trailers are too large")
                self._buffer = buffer[end + 2:]
                if end == 0:
                    self._serve()
                    return True

    def _serve(self) -> None:
        request = self._request
        assert request is not None
        self._state = _SERVING
        parts, self._parts = self._parts, []
        request.content = io.BytesIO(parts[0] if len(parts) == 1 else b"".join(parts))
        self._move(BUSY)
        resource = request.resource
        try:
            body = resource.render(request)
        except Exception:
            log.failure("rendering {path}", path=request.path)
            if not request.startedWriting:
                error = ProxyError(500, "internal_error", "internal error")
                self._answer_now(request, refusal(error, shape_for_path(request.path)))
            elif self.transport is not None:
                self.transport.abortConnection()
            return
        if body is not NOT_DONE_YET and not request.finished:
            request.setHeader(b"content-length", b"%d" % len(body))
            request.write(body)
            request.finish()

    def _answer_now(self, request: LeanRequest, refused: Refusal) -> None:
        request.setResponseCode(refused.status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(refused.body))
        request.write(refused.body)
        request.finish()

    def request_done(self, request: LeanRequest) -> None:
        """The answer to C{request} is sent: the next request, or the end."""
        if request is not self._request:
            return
        self._request = None
        # self.paused stays as it is: it is the connection's, and the next
        # answer's producer starts paused while Twisted's buffer is not empty.
        if not request.keep_alive or self._state == _DONE:
            self._state = _DONE
            self._close()
            return
        self._move(IDLE)
        self._state = _HEAD
        if self._read_paused:
            self._read_paused = False
            self.transport.resumeProducing()
        if self._buffer:
            self._move(HEAD)
            self._advance()

    def _close(self) -> None:
        transport = self.transport
        if transport is None:
            return
        if self._registered:
            self._registered = False
            transport.unregisterProducer()
        transport.loseConnection()

    # -- refusals --------------------------------------------------------------------------

    def _refuse_oversized(self, path: bytes) -> None:
        error = ProxyError(413, "request_too_large", f"the request body is larger than {self._limit} bytes")
        gate = self._site.gate
        shape = gate.shape(path) if gate is not None else shape_for_path(path)
        self._refuse(refusal(error, shape), path)

    def _refuse(self, refused: Refusal, path: bytes) -> None:
        """Answer on the headers (audited), read no more."""
        self._state = _DONE
        request = self._request
        self._request = None
        if request is None:
            return
        request.finished = True
        request._finishing = None
        answer_refusal(self._site, request, refused, path)

    def _bad(self, bad: BadRequest) -> None:
        """An unreadable request: its status in the path's error shape, audited, and closed."""
        request = self._request
        path = request.path if request is not None else b""
        error = ProxyError(bad.status, bad.code, bad.message)
        shape = self._site.gate.shape(path) if self._site.gate is not None and path else shape_for_path(path)
        self._state = _DONE
        self._request = None
        if request is not None:
            request.finished = True
            request._finishing = None
        audit = self._site.audit
        request_id = _new_request_id()
        if audit is not None:
            audit.emit(
                "error", None, None, request_id=request_id, status_code=bad.status, latency_ms=0,
                error=bad.message, path=path.decode("latin-1")[:500],
            )
        body = refusal(error, shape).body
        lines = [
            b"HTTP/1.1 %d %s" % (bad.status, RESPONSES.get(bad.status, b"Error")),
            b"Content-Type: application/json",
            b"Content-Length: %d" % len(body),
            b"X-Cllama-Request-Id: %s" % request_id.encode("ascii"),
            b"Connection: close",
        ]
        response = b"\r\n".join(lines) + b"\r\n\r\n" + body
        conn = self._guarded()
        if conn is not None:
            conn.refuse(response)
            return
        self.send(response)
        self._close()

    # -- other paths: twisted.web ----------------------------------------------------------

    def _hand_over(self, data: bytes) -> None:
        """Let twisted.web serve this connection from now on, starting with C{data}."""
        self._state = _HANDED
        self._buffer = b""
        transport = self.transport
        if self._registered or self._watch is not None:
            # twisted.web's channel registers itself as the transport's
            # producer; what is still in Twisted's buffer goes out first.
            self._registered = False
            self._watch = None
            self._backlog = False
            transport.unregisterProducer()
        channel: IProtocol = self._fallback()
        self._handed = channel
        conn = self._guarded()
        if conn is not None:
            conn.wrappedProtocol = channel  # the guard's wrapper talks to it directly from now on
        channel.makeConnection(transport)
        channel.dataReceived(data)


def _new_request_id() -> str:
    from cllama_tx.pipeline.proxy import new_request_id

    return new_request_id()


def answer_refusal(site: Any, request: Any, refused: Refusal, path: bytes) -> None:
    """
    Answer C{request} with C{refused} on its headers, audited unless the
    proxy settled it already, and read no more of it.
    """
    request_id = refused.request_id
    if request_id is None:  # not settled by the proxy: audited here
        request_id = _new_request_id()
        audit = site.audit
        if audit is not None:
            audit.emit(
                "error", None, None, request_id=request_id, status_code=refused.status, latency_ms=0,
                error=refused.message, path=path.decode("latin-1"),
            )
    headers = [(b"X-Cllama-Request-Id", request_id.encode("ascii"))]
    if refused.retry_after is not None:
        headers.append((b"Retry-After", b"%d" % refused.retry_after))
    refuse_request(request, refused.status, refused.body, headers)
