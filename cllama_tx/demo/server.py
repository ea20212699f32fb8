"""
A loopback provider server (plain C{twisted.web}) that speaks OpenAI Chat
Completions and Anthropic Messages: it records what it received, answers
scripted L{Reply}s in order and otherwise asks a responder (the demo model,
or a test's), and exposes Deferreds that fire on events (request received,
client gone, producer paused) so tests never sleep to synchronise.

The offline demo serves its model with it; the test kit (L{cllama_tx.testing})
builds on it.
"""

from __future__ import annotations

import json as _json
import socket
import struct
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attr
from twisted.internet.defer import (
    Deferred,
    fail,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from cllama_tx.demo.responses_wire import responses_sse_events, responses_stream_events
from cllama_tx.demo.wire import (
    JSON_CONTENT_TYPE,
    SSE_CONTENT_TYPE,
    anthropic_error,
    anthropic_sse_events,
    anthropic_stream_events,
    dumps,
    openai_error,
    openai_sse_events,
    openai_stream_chunks,
)
from cllama_tx.interfaces import IFakeProvider
from cllama_tx.sites.guard import LISTEN_BACKLOG

__all__ = ["FakeProvider", "ReceivedRequest", "Reply", "Responder", "Script", "wire_format"]

_log = Logger()

# ---------------------------------------------------------------------------
# The fake server
# ---------------------------------------------------------------------------


@attr.s(auto_attribs=True, frozen=True)
class ReceivedRequest:
    """
    One request as the fake provider saw it.

    @ivar headers: lower-cased header name -> list of values (C{str}).
    @ivar json: the parsed body, or L{None} when it is not JSON.
    @ivar query: the query string (without C{?}), usually empty.
    """

    method: str
    path: str
    headers: dict[str, list[str]]
    body: bytes
    json: Any = None
    query: str = ""

    def header(self, name: str) -> str | None:
        """
        The first value of header C{name} (any case), or L{None}.
        """
        values = self.headers.get(name.lower())
        return values[0] if values else None


@attr.s(auto_attribs=True, frozen=True, eq=False)
class Reply:
    """
    One scripted answer.  At most one of C{json}, C{sse}, C{raw} and
    C{firehose_bytes} should be set (none: an empty body).

    @ivar status: the HTTP status.
    @ivar headers: extra response headers (C{str} or list of C{str} values);
        they override the default C{Content-Type}.
    @ivar json: a body, serialised compactly with a C{Content-Length}.
    @ivar sse: a list of byte chunks (e.g. L{openai_sse_events}), written
        one by one with chunked transfer encoding.
    @ivar raw: a body sent verbatim with a C{Content-Length}.
    @ivar delay_before_headers: seconds to wait before the status line.
    @ivar delay_between_chunks: seconds between two SSE chunks.
    @ivar cut_after_chunks: after the headers and that many body chunks (a
        C{json}/C{raw} body is one chunk), close the TCP connection without
        finishing the response (what was written is flushed first), so the
        client sees a truncated body.  C{0} means headers only.
    @ivar reset_after_chunks: like C{cut_after_chunks}, but the connection is
        reset (RST, C{SO_LINGER} 0) once those chunks were flushed.
    @ivar stall_after_chunks: after the headers and that many body chunks,
        send nothing more and keep the connection open (a provider that
        hangs mid-answer); the client must give up.
    @ivar abort_before_headers: abort the connection instead of answering
        (after C{hold_until} and C{delay_before_headers}): a transport error.
    @ivar firehose_bytes: stream at least that many bytes of valid SSE (in the
        request's wire format) as fast as the transport accepts, as a
        streaming push producer registered on the request, so TCP
        backpressure pauses it (see L{FakeProvider.paused}).
    @ivar hold_until: a Deferred that must fire before the headers are sent
        (lets a test keep a request in flight for as long as it wants).
    """

    status: int = 200
    headers: Mapping[str, str | Sequence[str]] = attr.ib(factory=dict)
    json: Any = None
    sse: Sequence[bytes] | None = None
    raw: bytes | None = None
    delay_before_headers: float = 0.0
    delay_between_chunks: float = 0.0
    cut_after_chunks: int | None = None
    reset_after_chunks: int | None = None
    stall_after_chunks: int | None = None
    abort_before_headers: bool = False
    firehose_bytes: int | None = None
    hold_until: Deferred | None = None


Responder = Callable[[ReceivedRequest], Reply]
Script = Reply | Responder


def wire_format(path: str) -> str:
    """The wire format a request path speaks."""
    if "/messages" in path:
        return "anthropic"
    return "responses" if path.rstrip("/").endswith("/responses") else "openai"


def _firehose_events(received: ReceivedRequest, minimum: int) -> Iterator[bytes]:
    """
    Lazily generate a valid SSE stream of at least C{minimum} bytes in the
    request's wire format (never held in memory as a whole).
    """
    body = received.json if isinstance(received.json, dict) else {}
    model = str(body.get("model") or "firehose-1")
    piece = ("firehose " * 112)[:1000]
    wire = wire_format(received.path)
    if wire == "anthropic":
        # message_start, content_block_start, ping, one delta, ... : keep the
        # first three, repeat the delta, then close with a real tail.
        template = anthropic_sse_events(anthropic_stream_events([piece], model, 1, 1))
        head, middle = template[:3], template[3]
    elif wire == "responses":
        # created, in_progress, item added, part added, one delta, ...
        template = responses_sse_events(responses_stream_events([piece], model, 1, 1))
        head, middle = template[:4], template[4]
    else:
        options = body.get("stream_options")
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        template = openai_sse_events(openai_stream_chunks([piece], model, include_usage=include_usage))
        head, middle = template[:1], template[1]
    sent = 0
    count = 0
    for chunk in head:
        sent += len(chunk)
        yield chunk
    while sent < minimum:
        sent += len(middle)
        count += 1
        yield middle
    tokens = (count * len(piece.encode("utf-8")) + 3) // 4
    if wire == "anthropic":
        yield from anthropic_sse_events(anthropic_stream_events([], model, 1, tokens, ping=False))[-3:]
    elif wire == "responses":
        # text done, part done, item done, completed (its text is not the
        # repeated one: only the usage matters to a firehose's reader).
        yield from responses_sse_events(responses_stream_events([piece], model, 1, tokens))[-4:]
    else:
        tail = openai_stream_chunks([], model, 1, tokens, include_usage=include_usage)
        yield from openai_sse_events(tail[1:])


class _Exchange:
    """
    The fake's side of one request: the scheduled writes and what became of
    the connection.
    """

    def __init__(self, fake: FakeProvider, request: Any, received: ReceivedRequest) -> None:
        self.fake = fake
        self.request = request
        self.received = received
        self.state = "active"  # then "finished" or "lost"
        self.calls: list[Any] = []
        self.lost_waiters: list[Deferred] = []
        self.producer: _Firehose | None = None
        request.notifyFinish().addCallbacks(self._finished, self._lost)

    # bookkeeping

    @property
    def active(self) -> bool:
        return self.state == "active"

    def call_later(self, delay: float, f: Callable[..., Any], *args: Any) -> None:
        self.calls = [c for c in self.calls if c.active()]
        self.calls.append(self.fake._reactor.callLater(delay, f, *args))

    def cancel_calls(self) -> None:
        for call in self.calls:
            if call.active():
                call.cancel()
        self.calls = []
        if self.producer is not None:
            self.producer.stopProducing()

    def _finished(self, _: Any) -> None:
        self.state = "finished"
        self.cancel_calls()
        waiters, self.lost_waiters = self.lost_waiters, []
        for d in waiters:
            d.errback(AssertionError("the request finished normally, its connection was not lost"))

    def _lost(self, reason: Any) -> None:
        self.state = "lost"
        self.cancel_calls()
        waiters, self.lost_waiters = self.lost_waiters, []
        for d in waiters:
            d.callback(None)

    def wait_lost(self) -> Deferred:
        if self.state == "lost":
            return succeed(None)
        if self.state == "finished":
            return fail(AssertionError("the request finished normally, its connection was not lost"))
        d: Deferred = Deferred()
        self.lost_waiters.append(d)
        return d

    # answering

    def play(self, reply: Reply) -> None:
        if reply.hold_until is None:
            self._after_hold(reply)
            return

        def released(result: Any) -> Any:
            self._after_hold(reply)
            return result

        reply.hold_until.addBoth(released)

    def _after_hold(self, reply: Reply) -> None:
        if not self.active:
            return
        if reply.delay_before_headers > 0:
            self.call_later(reply.delay_before_headers, self._headers, reply)
        else:
            self._headers(reply)

    def _transport(self) -> Any:
        return self.request.channel.transport if self.request.channel is not None else None

    def _headers(self, reply: Reply) -> None:
        if not self.active:
            return
        transport = self._transport()
        if reply.abort_before_headers:
            if transport is not None:
                transport.abortConnection()
            return
        request = self.request
        request.setResponseCode(reply.status)
        chunks: list[bytes]
        if reply.firehose_bytes is not None:
            content_type: str | None = SSE_CONTENT_TYPE
            chunks = []
        elif reply.sse is not None:
            content_type = SSE_CONTENT_TYPE
            chunks = [bytes(c) for c in reply.sse]
        elif reply.json is not None:
            content_type = JSON_CONTENT_TYPE
            chunks = [dumps(reply.json)]
        elif reply.raw is not None:
            content_type = "application/octet-stream"
            chunks = [bytes(reply.raw)]
        else:
            content_type = None
            chunks = []
        if content_type is not None:
            request.setHeader(b"content-type", content_type.encode("latin-1"))
        if reply.sse is not None or reply.firehose_bytes is not None:
            # no Content-Length: chunked transfer encoding, like the providers
            request.setHeader(b"cache-control", b"no-cache")
        else:
            request.setHeader(b"content-length", b"%d" % sum(len(c) for c in chunks))
        for name, value in reply.headers.items():
            values = [value] if isinstance(value, str) else list(value)
            request.responseHeaders.setRawHeaders(name, values)
        request.write(b"")  # the status line and headers go out now
        if reply.cut_after_chunks == 0:
            self._cut()
            return
        if reply.firehose_bytes is not None:
            self.producer = _Firehose(self, _firehose_events(self.received, reply.firehose_bytes))
            self.producer.start()
            return
        self._write(reply, chunks, 0)

    def _write(self, reply: Reply, chunks: list[bytes], index: int) -> None:
        if not self.active:
            return
        if index >= len(chunks):
            self.finish()
            return
        self.request.write(chunks[index])
        if reply.cut_after_chunks is not None and index + 1 >= reply.cut_after_chunks:
            self._cut()
            return
        if reply.reset_after_chunks is not None and index + 1 >= reply.reset_after_chunks:
            self._cut(reset=True)
            return
        if reply.stall_after_chunks is not None and index + 1 >= reply.stall_after_chunks:
            return  # silence, until the client hangs up
        if index + 1 < len(chunks) and reply.delay_between_chunks > 0:
            self.call_later(reply.delay_between_chunks, self._write, reply, chunks, index + 1)
        else:
            self._write(reply, chunks, index + 1)

    def _cut(self, reset: bool = False) -> None:
        # loseConnection flushes what was written first, then closes: the
        # client gets exactly the chunks so far and then an unexpected EOF
        # (or, with a zero linger time, a reset).
        # The HTTP channel is the transport's producer: once a large write
        # paused it, loseConnection would wait for it to go away.
        transport = self._transport()
        if transport is not None:
            if reset:
                transport.getHandle().setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            transport.unregisterProducer()
            transport.loseConnection()

    def finish(self) -> None:
        if self.active:
            self.request.finish()


@implementer(IPushProducer)
class _Firehose:
    """
    Writes SSE as fast as the transport accepts, paused by TCP backpressure.
    """

    #: Bytes written per reactor turn; small enough that a reader keeping
    #: up never fills the transport's 64 KiB buffer.
    batch = 16 * 1024

    def __init__(self, exchange: _Exchange, events: Iterator[bytes]) -> None:
        self.exchange = exchange
        self.events = events
        self.paused = False
        self.stopped = False
        self.call: Any = None

    def start(self) -> None:
        self.exchange.request.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if self.call is None and not self.paused and not self.stopped:
            self.call = self.exchange.fake._reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        self.call = None
        written = 0
        while not self.paused and not self.stopped and written < self.batch:
            try:
                chunk = next(self.events)
            except StopIteration:
                self.stopped = True
                self.exchange.request.unregisterProducer()
                self.exchange.finish()
                return
            self.exchange.request.write(chunk)
            written += len(chunk)
        self._schedule()

    def _cancel(self) -> None:
        if self.call is not None:
            if self.call.active():
                self.call.cancel()
            self.call = None

    def pauseProducing(self) -> None:
        if self.stopped or self.paused:
            return
        self.paused = True
        self._cancel()
        self.exchange.fake._producer_paused()

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        self.paused = False
        self.exchange.fake.resume_count += 1
        self._schedule()

    def stopProducing(self) -> None:
        self.stopped = True
        self._cancel()


class _Router(Resource):
    isLeaf = True

    routes = {
        "/v1/chat/completions": b"POST",
        "/v1/messages": b"POST",
        "/v1/messages/count_tokens": b"POST",
        "/v1/responses": b"POST",
        "/v1/models": b"GET",
    }

    def __init__(self, fake: FakeProvider) -> None:
        super().__init__()
        self._fake = fake

    def render(self, request: Any) -> Any:
        return self._fake._handle(request)


class _QuietSite(Site):
    """No access log lines from a fake."""

    def log(self, request: Any) -> None:
        pass


class _TrackingFactory(WrappingFactory):
    """
    Knows every open connection, so L{FakeProvider.stop} can drop them and
    wait until they are gone (no dirty reactor).
    """

    noisy = False

    def __init__(self, wrapped: Site) -> None:
        super().__init__(wrapped)
        self._gone: dict[Any, list[Deferred]] = {}
        self.connections_made = 0

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.connections_made += 1

    def when_gone(self, protocol: Any) -> Deferred:
        d: Deferred = Deferred()
        self._gone.setdefault(protocol, []).append(d)
        return d

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        for d in self._gone.pop(p, []):
            d.callback(None)


@implementer(IFakeProvider)
class FakeProvider:
    """
    A loopback provider speaking OpenAI Chat Completions and Anthropic
    Messages.  See the module docstring.

    @ivar received: every L{ReceivedRequest}, in arrival order.
    @ivar pause_count: how often a firehose was paused by backpressure.
    @ivar resume_count: how often a firehose was resumed.
    """

    def __init__(self, reactor: Any, responder: Responder, port: int = 0) -> None:
        self._reactor = reactor
        self._responder = responder
        self._wanted_port = port
        self._script: deque[Script] = deque()
        self._port: Any = None
        self._factory: _TrackingFactory | None = None
        self._connections_made = 0
        self._exchanges: list[_Exchange] = []
        self._request_waiters: list[tuple[int, Deferred]] = []
        self._disconnect_waiters: list[tuple[int, Deferred]] = []
        self._pause_waiters: list[Deferred] = []
        self.received: list[ReceivedRequest] = []
        self.pause_count = 0
        self.resume_count = 0

    # IFakeProvider

    @property
    def base_url(self) -> str | None:
        """
        C{http://127.0.0.1:<port>/v1} while listening, else L{None}.
        """
        if self._port is None:
            return None
        return f"http://127.0.0.1:{self._port.getHost().port}/v1"

    @property
    def port(self) -> int:
        """
        The TCP port it listens on.
        """
        if self._port is None:
            raise RuntimeError("the fake provider is not listening; call start() first")
        return self._port.getHost().port

    def start(self) -> Deferred:
        """
        Listen on 127.0.0.1 (synchronously: C{base_url} works as soon as this
        returns) and return a Deferred firing with C{self}.
        """
        if self._port is None:
            site = _QuietSite(_Router(self), reactor=self._reactor)
            site.displayTracebacks = False
            site.noisy = False
            self._factory = _TrackingFactory(site)
            # A deep accept queue, as the daemon's listeners have: a burst of
            # concurrent requests must not overflow it.
            self._port = self._reactor.listenTCP(
                self._wanted_port, self._factory, interface="127.0.0.1", backlog=LISTEN_BACKLOG
            )
        return succeed(self)

    def stop(self) -> Deferred:
        """
        Stop listening, cancel every scheduled write, abort every open
        connection and fire once they are all gone.
        """
        if self._port is None:
            return succeed(None)
        port, self._port = self._port, None
        factory, self._factory = self._factory, None
        assert factory is not None
        self._connections_made = factory.connections_made
        for exchange in self._exchanges:
            exchange.cancel_calls()
        waits = [maybeDeferred(port.stopListening)]
        for protocol in list(factory.protocols):
            waits.append(factory.when_gone(protocol))
            protocol.transport.abortConnection()
        return gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    # scripting

    def enqueue(self, *replies: Script) -> None:
        """
        Script the next answers, consumed in arrival order by every routed
        request.  Each item is a L{Reply} or a callable taking the
        L{ReceivedRequest} and returning one.  When the script is empty the
        responder answers.
        """
        self._script.extend(replies)

    @property
    def connections_made(self) -> int:
        """
        How many TCP connections it accepted since C{start()} (to check that
        a client reuses persistent connections).
        """
        return self._factory.connections_made if self._factory is not None else self._connections_made

    @property
    def open_connections(self) -> int:
        """
        How many TCP connections are open right now.
        """
        return len(self._factory.protocols) if self._factory is not None else 0

    @property
    def pending(self) -> int:
        """
        How many scripted replies are still unused.
        """
        return len(self._script)

    # observation

    def wait_for_request(self, n: int = 1) -> Deferred:
        """
        A Deferred firing with the L{ReceivedRequest} number C{n} (1-based)
        once C{n} requests were received.
        """
        if len(self.received) >= n:
            return succeed(self.received[n - 1])
        d: Deferred = Deferred()
        self._request_waiters.append((n, d))
        return d

    def wait_for_disconnect(self, n: int | None = None) -> Deferred:
        """
        A Deferred firing when the connection of a request is lost before
        its response finished (the client went away, or a C{cut_after_chunks}
        / C{abort_before_headers} reply closed it); at once if that already
        happened.  Fails with L{AssertionError} if that request's response
        finishes normally instead.

        @param n: which request (1-based); by default the most recent one,
            or, when none was received yet, the next one.
        """
        if n is None:
            if not self._exchanges:
                n = 1
            else:
                return self._exchanges[-1].wait_lost()
        if len(self._exchanges) >= n:
            return self._exchanges[n - 1].wait_lost()
        d: Deferred = Deferred()
        self._disconnect_waiters.append((n, d))
        return d

    @property
    def paused(self) -> Deferred:
        """
        A (new) Deferred firing with the pause count once a firehose was paused
        by TCP backpressure (at once if that already happened).
        """
        if self.pause_count:
            return succeed(self.pause_count)
        d: Deferred = Deferred()
        self._pause_waiters.append(d)
        return d

    def _producer_paused(self) -> None:
        self.pause_count += 1
        waiters, self._pause_waiters = self._pause_waiters, []
        for d in waiters:
            d.callback(self.pause_count)

    # serving

    def _handle(self, request: Any) -> Any:
        path = request.path.decode("latin-1")
        _, _, query = request.uri.decode("latin-1").partition("?")
        headers: dict[str, list[str]] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            headers.setdefault(name.decode("latin-1").lower(), []).extend(v.decode("latin-1") for v in values)
        body = request.content.read() if request.content is not None else b""
        try:
            parsed = _json.loads(body) if body else None
        except ValueError:
            parsed = None
        received = ReceivedRequest(
            method=request.method.decode("latin-1"),
            path=path,
            headers=headers,
            body=body,
            json=parsed,
            query=query,
        )
        self.received.append(received)
        exchange = _Exchange(self, request, received)
        self._exchanges.append(exchange)
        number = len(self._exchanges)
        for _, d in [(n, d) for (n, d) in self._disconnect_waiters if n == number]:
            exchange.wait_lost().chainDeferred(d)
        self._disconnect_waiters = [(n, d) for (n, d) in self._disconnect_waiters if n != number]
        ready = [(n, d) for (n, d) in self._request_waiters if len(self.received) >= n]
        self._request_waiters = [(n, d) for (n, d) in self._request_waiters if len(self.received) < n]
        for n, d in ready:
            d.callback(self.received[n - 1])

        expected = _Router.routes.get(path)
        if expected is None:
            reply = self._not_found(received, 404, f"no route for {path}")
        elif request.method != expected:
            reply = self._not_found(received, 405, "method not allowed")
        else:
            try:
                reply = self._next_reply(received)
            except Exception:
                _log.failure("fake provider responder failed")
                reply = self._not_found(received, 500, "the fake provider's responder failed")
        exchange.play(reply)
        return NOT_DONE_YET

    def _next_reply(self, received: ReceivedRequest) -> Reply:
        script: Script = self._script.popleft() if self._script else self._responder
        if isinstance(script, Reply):
            return script
        return script(received)

    @staticmethod
    def _not_found(received: ReceivedRequest, status: int, message: str) -> Reply:
        if wire_format(received.path) == "anthropic":
            kind = {404: "not_found_error", 405: "invalid_request_error"}.get(status, "api_error")
            return Reply(status=status, json=anthropic_error(kind, message))
        kind = {404: "invalid_request_error", 405: "invalid_request_error"}.get(status, "server_error")
        return Reply(status=status, json=openai_error(message, kind))
