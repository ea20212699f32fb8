"""
The lean upstream client (cllama_tx.runtime.lean_client) against scripted
servers on loopback: the framings an answer comes in, connection reuse and
when a connection is not reused, failures before and during a body, the
retry of an idempotent request on a stale connection (never a POST),
cancellation, and backpressure on the body.
"""

from __future__ import annotations

import gc
import io
import socket

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import (
    PotentialDataLoss,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface.verify import verifyObject

from cllama_tx.pipeline.relay import read_body
from cllama_tx.runtime.config import Config, ConfigError
from cllama_tx.runtime.daemon import build_daemon
from cllama_tx.runtime.lean_client import LeanUpstream
from cllama_tx.runtime.upstream import UpstreamClient
from cllama_tx.sites.lean_http import LeanChannel
from cllama_tx.testing import FakeProvider, Reply


class _Scripted(protocol.Protocol):
    """Answers each complete request head (and its Content-Length body) with the server's next script."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.buffer = b""

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, _, rest = self.buffer.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            self.buffer = rest[length:]
            self.factory.requests.append(head + b"\r\n\r\n" + rest[:length])
            script = self.factory.scripts.pop(0)
            script(self.transport)


class _Server(protocol.Factory):
    protocol = _Scripted

    def __init__(self) -> None:
        self.scripts: list = []
        self.requests: list[bytes] = []
        self.connections: list[_Scripted] = []


class _Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.done: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason=None) -> None:
        self.done.callback((b"".join(self.parts), reason))


def answer(raw: bytes, close: bool = False):
    def script(transport):
        transport.write(raw)
        if close:
            transport.loseConnection()
    return script


class LeanClientTests(TestCase):
    def setUp(self):
        self.server = _Server()
        self.port = reactor.listenTCP(0, self.server, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.client = LeanUpstream(reactor, 5.0)
        self.addCleanup(self.client.close)
        self.url = b"http://127.0.0.1:%d/v1/chat/completions?a=1" % self.port.getHost().port

    def request(self, method=b"POST", body=b"{}", headers=None):
        return self.client.request(method, self.url, headers or Headers({b"content-type": [b"application/json"]}),
                                   body if method == b"POST" else None)

    @defer.inlineCallbacks
    def body(self, response):
        collect = _Collect()
        response.deliverBody(collect)
        return (yield collect.done)

    @defer.inlineCallbacks
    def test_a_content_length_answer_and_the_connection_reused(self):
        for n in range(2):
            self.server.scripts.append(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-N: %d\r\n\r\n{\"n\":%d}" % (n, n)))
        for n in range(2):
            response = yield self.request()
            verifyObject(IResponse, response)
            self.assertEqual((response.code, response.phrase, response.length), (200, b"OK", 7))
            self.assertEqual(response.headers.getRawHeaders(b"x-n"), [b"%d" % n])
            data, reason = yield self.body(response)
            self.assertEqual(data, b'{"n":%d}' % n)
            self.assertTrue(reason.check(ResponseDone))
        self.assertEqual(len(self.server.connections), 1)
        [connection] = self.client._idle[next(iter(self.client._idle))]
        self.assertTrue(connection.transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        first = self.server.requests[0]
        self.assertTrue(first.startswith(b"POST /v1/chat/completions?a=1 HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                                         % self.port.getHost().port))
        self.assertIn(b"\r\nContent-Length: 2\r\n\r\n{}", first)
        self.assertIn(b"\r\nContent-Type: application/json\r\n", first)

    @defer.inlineCallbacks
    def test_a_body_that_came_with_its_head_is_handed_over_whole(self):
        # Head and body in one write: the answer comes complete, its connection already idle.
        self.server.scripts.append(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"n\":1}"))
        response = yield self.request()
        self.assertEqual(response.whole_body, b'{"n":1}')
        self.assertEqual(self.client.idle_connections(self.url), 1)
        # Read the usual way too, it is the same body.
        data, reason = yield self.body(response)
        self.assertEqual(data, b'{"n":1}')
        self.assertTrue(reason.check(ResponseDone))

        # The body after the head, in a later write: read as it comes, not whole.
        def later(transport):
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{\"n\"")
            reactor.callLater(0.01, transport.write, b":2}")
        self.server.scripts.append(later)
        response = yield self.request()
        self.assertIsNone(response.whole_body)
        self.assertEqual(self.client.idle_connections(self.url), 0)
        data, reason = yield self.body(response)
        self.assertEqual(data, b'{"n":2}')
        self.assertTrue(reason.check(ResponseDone))
        self.assertEqual(len(self.server.connections), 1)

    @defer.inlineCallbacks
    def test_a_chunked_answer_with_trailers_arriving_in_pieces(self):
        def script(transport):
            transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel")
            reactor.callLater(0.01, transport.write, b"lo\r\n6;x=y\r\n world\r\n0\r\nT: 1\r\n\r\n")
        self.server.scripts.append(script)
        response = yield self.request()
        self.assertIs(response.length, UNKNOWN_LENGTH)
        data, reason = yield self.body(response)
        self.assertEqual(data, b"hello world")
        self.assertTrue(reason.check(ResponseDone))
        self.assertEqual(self.client.idle_connections(self.url), 1)

    @defer.inlineCallbacks
    def test_an_answer_that_ends_with_the_connection(self):
        self.server.scripts.append(answer(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", close=True))
        response = yield self.request()
        data, reason = yield self.body(response)
        self.assertEqual(data, b"until the end")
        self.assertTrue(reason.check(PotentialDataLoss))
        self.assertEqual(self.client.idle_connections(), 0)

    @defer.inlineCallbacks
    def test_connection_close_and_interim_answers(self):
        self.server.scripts.append(answer(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n"))
        response = yield self.request()
        self.assertEqual(response.code, 204)
        data, reason = yield self.body(response)
        self.assertEqual(data, b"")
        self.assertTrue(reason.check(ResponseDone))
        self.assertEqual(self.client.idle_connections(), 0)

    @defer.inlineCallbacks
    def test_closed_before_the_head(self):
        self.server.scripts.append(answer(b"HTTP/1.1 200 O", close=True))
        failure = yield self.assertFailure(self.request(), ResponseNeverReceived)
        self.assertEqual(len(failure.reasons), 1)

    @defer.inlineCallbacks
    def test_cut_mid_body(self):
        self.server.scripts.append(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort", close=True))
        response = yield self.request()
        data, reason = yield self.body(response)
        self.assertEqual(data, b"short")
        self.assertTrue(reason.check(ResponseFailed))

    @defer.inlineCallbacks
    def test_a_bad_status_line(self):
        self.server.scripts.append(answer(b"SMTP ready\r\n\r\n"))
        yield self.assertFailure(self.request(), ResponseNeverReceived)

    @defer.inlineCallbacks
    def test_a_stale_connection_is_retried_for_get_not_for_post(self):
        self.server.scripts.append(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"))
        response = yield self.request(b"GET")
        yield self.body(response)
        # The server closes the idle connection just as the next request goes out.
        self.server.scripts.append(lambda transport: transport.abortConnection())
        self.server.scripts.append(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb"))
        response = yield self.request(b"GET")
        data, _ = yield self.body(response)
        self.assertEqual(data, b"b")
        self.assertEqual(len(self.server.connections), 2)
        self.server.scripts.append(lambda transport: transport.abortConnection())
        yield self.assertFailure(self.request(b"POST"), ResponseNeverReceived)
        self.assertEqual(len(self.server.requests), 4)

    @defer.inlineCallbacks
    def test_cancelled_before_the_head(self):
        self.server.scripts.append(lambda transport: None)  # never answers
        d = self.request()
        yield deferLater(reactor, 0.05, lambda: None)
        d.cancel()
        yield self.assertFailure(d, defer.CancelledError)
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(self.server.connections[0].transport.connected)
        self.assertEqual(self.client.idle_connections(), 0)

    @defer.inlineCallbacks
    def test_a_refused_connection(self):
        port = self.port.getHost().port
        yield self.port.stopListening()
        failure = yield self.assertFailure(
            self.client.request(b"POST", b"http://127.0.0.1:%d/" % port, Headers(), b"{}"), Exception)
        self.assertIn("refused", str(failure).lower())

    @defer.inlineCallbacks
    def test_a_bad_url(self):
        yield self.assertFailure(self.client.request(b"GET", b"ftp://x/", Headers(), None), ValueError)

    @defer.inlineCallbacks
    def test_the_body_reader_pauses_the_connection(self):
        self.server.scripts.append(answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n"))
        response = yield self.request()
        collect = _Collect()
        response.deliverBody(collect)
        producer = collect.transport
        producer.pauseProducing()
        connection = self.server.connections[0]
        connection.transport.write(b"1\r\nb\r\n0\r\n\r\n")
        yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(b"".join(collect.parts), b"a")  # paused: nothing read
        producer.resumeProducing()
        data, reason = yield collect.done
        self.assertEqual(data, b"ab")
        self.assertTrue(reason.check(ResponseDone))

    @defer.inlineCallbacks
    def test_stop_producing_aborts_and_the_connection_is_not_reused(self):
        self.server.scripts.append(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart"))
        response = yield self.request()
        collect = _Collect()
        response.deliverBody(collect)
        collect.transport.stopProducing()
        data, reason = yield collect.done
        self.assertIn(data, (b"", b"part"))  # whatever came with the head, nothing after
        self.assertTrue(reason.check(ResponseFailed))
        self.assertEqual(self.client.idle_connections(), 0)

    @defer.inlineCallbacks
    def test_idle_connections_are_closed_after_the_idle_timeout(self):
        self.client.idle_timeout = 0.0
        self.patch(LeanUpstream, "SWEEP", 0.01)
        self.server.scripts.append(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na"))
        yield self.body((yield self.request()))
        self.assertEqual(self.client.idle_connections(), 1)
        yield deferLater(reactor, 0.1, lambda: None)
        self.assertEqual(self.client.idle_connections(), 0)


class UpstreamClientTests(TestCase):
    @defer.inlineCallbacks
    def test_lean_by_default_against_the_fake_provider(self):
        fake = FakeProvider(reactor, strict=False)
        yield fake.start()
        self.addCleanup(fake.stop)
        client = UpstreamClient(reactor, 5.0)
        self.addCleanup(client.close)
        self.assertIsNotNone(client.lean)
        url = f"http://127.0.0.1:{fake.port}/v1/chat/completions".encode()
        fake.enqueue(Reply(json={"ok": 1}))
        response = yield client.request(b"POST", url, Headers({b"content-type": [b"application/json"]}), b"{}")
        self.assertEqual(response.code, 200)
        self.assertEqual((yield read_body(response)), b'{"ok":1}')
        self.assertEqual(client.lean.idle_connections(url), 1)
        self.assertEqual(fake.received[0].json, {})


class SettingTests(TestCase):
    """CLLAMA_LEAN_HTTP and CLLAMA_WRITE_THROUGH, read and wired by the daemon."""

    def env(self, **extra) -> dict:
        base = self.mktemp()
        env = {
            "CLAW_CONTEXT_ROOT": base + "/context",
            "CLAW_AUTH_DIR": base + "/auth",
            "CLLAMA_STATE_DIR": base + "/state",
            "CLLAMA_UI_TOKEN": "t" * 32,
        }
        env.update(extra)
        return env

    def test_values(self) -> None:
        config = Config.from_env(self.env())
        self.assertEqual((config.lean_http, config.write_through), (True, True))
        for name in ("CLLAMA_LEAN_HTTP", "CLLAMA_WRITE_THROUGH"):
            for off in ("0", "off", "false", "NO"):
                config = Config.from_env(self.env(**{name: off}))
                self.assertFalse(config.lean_http if name == "CLLAMA_LEAN_HTTP" else config.write_through)
            error = self.assertRaises(ConfigError, Config.from_env, self.env(**{name: "maybe"}))
            self.assertIn(name, str(error))

    def test_the_daemon_wires_them(self) -> None:
        self.addCleanup(gc.unfreeze)
        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        for env, lean, direct in (({}, True, True), ({"CLLAMA_WRITE_THROUGH": "0"}, True, False),
                                  ({"CLLAMA_LEAN_HTTP": "0"}, False, True)):
            daemon = build_daemon(Config.from_env(self.env(**env)), reactor, io.StringIO())
            [site] = [s.factory for s in daemon if getattr(s, "label", None) == "API"]
            self.assertEqual((site.lean, site.direct), (lean, direct))
            self.assertEqual(isinstance(site.build_channel(None), LeanChannel), lean)
            upstream = daemon.proxy._upstream
            self.assertEqual(upstream.lean is not None, lean)
            if lean:
                self.assertEqual(upstream.lean.direct, direct)
