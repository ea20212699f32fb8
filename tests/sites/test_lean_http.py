"""
The lean HTTP/1.1 channel of the inference paths (cllama_tx.sites.lean_http),
over real loopback sockets in front of a fake provider: requests it serves,
requests it refuses (each status, its error body in the surface's shape,
audited, nothing sent upstream), pipelining, 100-continue, HEAD, the hand-over
of other paths to twisted.web, and clients that leave mid-body and mid-stream.
"""

from __future__ import annotations

import json
import socket
from types import SimpleNamespace

from twisted.internet import defer, protocol, reactor, threads
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from cllama_tx.sites.lean_http import (
    BadRequest,
    LeanChannel,
    LeanRequest,
    parse_fields,
    parse_request_line,
)
from cllama_tx.testing import Reply, openai_completion, openai_sse_events, openai_stream_chunks
from tests.support import AGENT, SECRET, ProxyHarness, chat_body

AUTH = f"Authorization: Bearer {AGENT}:{SECRET}\r\n".encode()


class _Raw(protocol.Protocol):
    """Sends C{payload} (more with C{send}); collects what comes back until the server closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.parts: list[bytes] = []
        self.closed: defer.Deferred = defer.Deferred()
        self.arrived: list[tuple] = []  # (predicate, Deferred) waiting for received bytes

    def connectionMade(self) -> None:
        if self.payload:
            self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)
        got = self.received()
        for entry in list(self.arrived):
            if entry[0](got):
                self.arrived.remove(entry)
                entry[1].callback(got)

    def received(self) -> bytes:
        return b"".join(self.parts)

    def when(self, predicate) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        if predicate(self.received()):
            d.callback(self.received())
        else:
            self.arrived.append((predicate, d))
        return d

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(self.received())


def post(path: bytes, body: bytes, extra: bytes = b"", auth: bytes = AUTH) -> bytes:
    return (
        b"POST " + path + b" HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Type: application/json\r\n"
        + b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body
    )


def split(data: bytes) -> tuple[int, dict, bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


class LeanChannelTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield ProxyHarness(self, max_body_bytes=64 * 1024).start()
        self.port = self.h.port.getHost().port

    @defer.inlineCallbacks
    def connect(self, payload: bytes):
        client = _Raw(payload)
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), client)
        return client

    @defer.inlineCallbacks
    def exchange(self, payload: bytes):
        """Send C{payload}; everything the proxy sends until it closes."""
        client = yield self.connect(payload)
        return (yield client.closed)

    @defer.inlineCallbacks
    def refused(self, payload: bytes, status: int, code: str, shape: str = "openai"):
        """The proxy answers C{payload} with C{status} and closes; the body is in C{shape}; audited."""
        data = yield self.exchange(payload)
        got, headers, body = split(data)
        self.assertEqual(got, status, data[:300])
        self.assertEqual(headers[b"connection"], b"close")
        self.assertEqual(headers[b"content-type"], b"application/json")
        doc = json.loads(body)
        if shape == "anthropic":
            self.assertEqual(doc["type"], "error")
            self.assertIn(doc["error"]["type"], ("invalid_request_error", "request_too_large", "api_error"))
        else:
            self.assertEqual(doc["error"]["code"], code)
        self.assertEqual(self.h.fake.received, [])
        lines = [line for line in self.h.audit_lines() if line.get("status_code") == status]
        self.assertEqual(len(lines), 1, self.h.audit_lines())
        self.assertEqual(lines[0]["type"], "error")
        self.assertEqual(headers[b"x-cllama-request-id"].decode(), lines[0]["request_id"])
        return doc

    # -- served ------------------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_request_is_served_and_the_connection_kept(self):
        self.h.fake.enqueue(Reply(json=openai_completion("one", "gpt-4o-mini", 3, 1)))
        self.h.fake.enqueue(Reply(json=openai_completion("two", "gpt-4o-mini", 3, 1)))
        body = json.dumps(chat_body()).encode()
        client = yield self.connect(post(b"/v1/chat/completions", body))
        first = yield client.when(lambda got: got.count(b'"one"') == 1)
        client.transport.write(post(b"/v1/chat/completions", body, b"Connection: close\r\n"))
        data = yield client.closed
        self.assertTrue(data.startswith(first))
        answers = data.split(b"HTTP/1.1 ")[1:]
        self.assertEqual(len(answers), 2)
        for text, answer in zip(("one", "two"), answers, strict=True):
            status, headers, rest = split(b"HTTP/1.1 " + answer)
            self.assertEqual(status, 200)
            self.assertEqual(json.loads(rest)["choices"][0]["message"]["content"], text)
            self.assertEqual(int(headers[b"content-length"]), len(rest))
            self.assertIn(b"x-cllama-cost-usd", headers)
            self.assertIn(b"date", headers)
        self.assertEqual(split(b"HTTP/1.1 " + answers[1])[1][b"connection"], b"close")
        self.assertEqual(len(self.h.fake.received), 2)

    @defer.inlineCallbacks
    def test_pipelined_requests_are_answered_in_order(self):
        for text in ("first", "second", "third"):
            self.h.fake.enqueue(Reply(json=openai_completion(text, "gpt-4o-mini", 3, 1)))
        body = json.dumps(chat_body()).encode()
        payload = post(b"/v1/chat/completions", body) * 2 + post(b"/v1/chat/completions", body, b"Connection: close\r\n")
        data = yield self.exchange(payload)
        answers = [split(b"HTTP/1.1 " + a) for a in data.split(b"HTTP/1.1 ")[1:]]
        self.assertEqual([a[0] for a in answers], [200, 200, 200])
        self.assertEqual([json.loads(a[2])["choices"][0]["message"]["content"] for a in answers],
                         ["first", "second", "third"])

    @defer.inlineCallbacks
    def test_a_chunked_request_body(self):
        self.h.fake.enqueue(Reply(json=openai_completion("hi", "gpt-4o-mini", 3, 1)))
        body = json.dumps(chat_body())
        chunked = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(part), part.encode()) for part in (body[:10], body[10:]))
        payload = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH
                   + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + chunked + b"0\r\nX-Trailer: t\r\n\r\n")
        status, _, rest = split((yield self.exchange(payload)))
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(rest)["choices"][0]["message"]["content"], "hi")
        self.assertEqual(self.h.fake.received[0].json["messages"], chat_body()["messages"])

    @defer.inlineCallbacks
    def test_expect_100_continue_is_answered_before_the_body(self):
        self.h.fake.enqueue(Reply(json=openai_completion("hi", "gpt-4o-mini", 3, 1)))
        body = json.dumps(chat_body()).encode()
        head = post(b"/v1/chat/completions", b"", b"Expect: 100-continue\r\nConnection: close\r\n")
        head = head.replace(b"Content-Length: 0", b"Content-Length: %d" % len(body))
        client = yield self.connect(head)
        interim = yield client.when(lambda got: b"\r\n\r\n" in got)
        self.assertEqual(interim, b"HTTP/1.1 100 Continue\r\n\r\n")
        client.transport.write(body)
        data = yield client.closed
        status, _, rest = split(data[len(interim):])
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(rest)["choices"][0]["message"]["content"], "hi")

    @defer.inlineCallbacks
    def test_wrong_credentials_get_no_100_continue(self):
        head = post(b"/v1/chat/completions", b"", b"Expect: 100-continue\r\n", auth=b"Authorization: Bearer x:y\r\n")
        data = yield self.exchange(head.replace(b"Content-Length: 0", b"Content-Length: 100"))
        self.assertTrue(data.startswith(b"HTTP/1.1 403 "), data[:80])
        self.assertNotIn(b"100 Continue", data)

    @defer.inlineCallbacks
    def test_head_and_get_are_405_with_allow(self):
        for method in (b"GET", b"HEAD"):
            payload = method + b" /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Connection: close\r\n\r\n"
            status, headers, body = split((yield self.exchange(payload)))
            self.assertEqual(status, 405)
            self.assertEqual(headers[b"allow"], b"POST")
            if method == b"HEAD":
                self.assertEqual(body, b"")
                self.assertGreater(int(headers[b"content-length"]), 0)
            else:
                self.assertEqual(json.loads(body)["error"]["code"], "method_not_allowed")

    @defer.inlineCallbacks
    def test_other_paths_go_to_twisted_web_on_the_same_connection(self):
        """/health after an inference request on one keep-alive connection: both answered."""
        self.h.fake.enqueue(Reply(json=openai_completion("hi", "gpt-4o-mini", 3, 1)))
        body = json.dumps(chat_body()).encode()
        payload = (post(b"/v1/chat/completions", body) + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                   + post(b"/v1/chat/completions", body, b"Connection: close\r\n"))
        self.h.fake.enqueue(Reply(json=openai_completion("again", "gpt-4o-mini", 3, 1)))
        data = yield self.exchange(payload)
        answers = [split(b"HTTP/1.1 " + a) for a in data.split(b"HTTP/1.1 ")[1:]]
        self.assertEqual([a[0] for a in answers], [200, 200, 200])
        health = answers[1]
        if health[1].get(b"transfer-encoding") == b"chunked":
            health = (health[0], health[1], _dechunk(health[2]))
        self.assertEqual(json.loads(health[2]), {"ok": True})
        self.assertEqual(json.loads(answers[2][2])["choices"][0]["message"]["content"], "again")

    @defer.inlineCallbacks
    def test_a_stream_is_chunked_and_ends(self):
        events = openai_sse_events(openai_stream_chunks(["Hel", "lo"], "gpt-4o-mini", include_usage=True))
        self.h.fake.enqueue(Reply(sse=events))
        body = json.dumps(chat_body(stream=True)).encode()
        data = yield self.exchange(post(b"/v1/chat/completions", body, b"Connection: close\r\n"))
        status, headers, rest = split(data)
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"transfer-encoding"], b"chunked")
        self.assertTrue(rest.endswith(b"0\r\n\r\n"))
        text = _dechunk(rest)
        self.assertIn(b"data: [DONE]", text)
        self.assertIn(b'"Hel"', text)

    @defer.inlineCallbacks
    def test_streams_one_after_another_on_one_connection_end_at_once(self):
        """Each stream's terminating chunk leaves with it (40 ms each behind Nagle and a delayed ACK)."""
        body = json.dumps(chat_body(stream=True)).encode()
        events = openai_sse_events(openai_stream_chunks(["Hel", "lo"], "gpt-4o-mini", include_usage=True))
        client = yield self.connect(b"")
        started = reactor.seconds()
        for n in range(1, 11):
            self.h.fake.enqueue(Reply(sse=events))
            client.transport.write(post(b"/v1/chat/completions", body))
            yield client.when(lambda got, n=n: got.count(b"\r\n0\r\n\r\n") == n)
        self.assertLess(reactor.seconds() - started, 0.25)  # with the stall: 10 x 40 ms
        client.transport.loseConnection()
        yield client.closed

    @defer.inlineCallbacks
    def test_http_10_gets_its_answer_and_the_connection_closes(self):
        self.h.fake.enqueue(Reply(json=openai_completion("hi", "gpt-4o-mini", 3, 1)))
        body = json.dumps(chat_body()).encode()
        payload = post(b"/v1/chat/completions", body).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
        status, headers, rest = split((yield self.exchange(payload)))
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"connection"], b"close")
        self.assertEqual(json.loads(rest)["choices"][0]["message"]["content"], "hi")

    # -- refused -----------------------------------------------------------------------------

    def test_a_bad_request_line(self):
        return self.refused(b"POST /v1/chat/completions\r\nHost: x\r\n\r\n", 400, "bad_request_line")

    def test_a_target_that_is_not_a_path(self):
        return self.refused(b"POST v1/chat HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request_line")

    def test_an_http_version_not_spoken(self):
        return self.refused(b"POST /v1/chat/completions HTTP/2.0\r\nHost: x\r\n\r\n", 505, "http_version_not_supported")

    def test_a_bad_header_line(self):
        return self.refused(b"POST /v1/chat/completions HTTP/1.1\r\nHost x\r\n\r\n", 400, "bad_header")

    def test_a_header_name_with_a_space(self):
        return self.refused(b"POST /v1/chat/completions HTTP/1.1\r\nHost : x\r\n\r\n", 400, "bad_header")

    def test_an_oversized_head(self):
        payload = b"POST /v1/chat/completions HTTP/1.1\r\n" + b"X-Padding: " + b"p" * 17_000 + b"\r\n\r\n"
        return self.refused(payload, 431, "request_header_fields_too_large")

    def test_too_many_header_fields(self):
        payload = b"POST /v1/chat/completions HTTP/1.1\r\n" + b"X-P: p\r\n" * 600 + b"\r\n"
        return self.refused(payload, 431, "request_header_fields_too_large")

    def test_an_oversized_request_line(self):
        return self.refused(b"POST /v1/chat/completions?" + b"q" * 9000 + b" HTTP/1.1\r\n\r\n", 414, "uri_too_long")

    def test_both_lengths(self):
        payload = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH
                   + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
        return self.refused(payload, 400, "bad_framing")

    def test_two_different_lengths(self):
        payload = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 3, 4\r\n\r\n"
        return self.refused(payload, 400, "bad_framing")

    def test_a_transfer_coding_not_taken(self):
        payload = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: gzip\r\n\r\n"
        return self.refused(payload, 501, "unsupported_transfer_coding")

    def test_a_chunk_size_that_is_not_hex(self):
        payload = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH
                   + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n")
        return self.refused(payload, 400, "bad_chunked_body")

    def test_a_chunk_without_its_crlf(self):
        payload = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH
                   + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n")
        return self.refused(payload, 400, "bad_chunked_body")

    def test_an_oversized_body_by_its_length(self):
        payload = post(b"/v1/chat/completions", b"").replace(b"Content-Length: 0", b"Content-Length: 1000000")
        return self.refused(payload, 413, "request_too_large")

    @defer.inlineCallbacks
    def test_an_oversized_chunked_body_on_the_messages_surface(self):
        chunk = b"x" * 40_000
        payload = (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Transfer-Encoding: chunked\r\n\r\n"
                   + (b"%x\r\n%s\r\n" % (len(chunk), chunk)) * 2)
        doc = yield self.refused(payload, 413, "request_too_large", shape="anthropic")
        self.assertEqual(doc["error"]["type"], "request_too_large")

    def test_wrong_credentials_on_the_headers(self):
        payload = post(b"/v1/chat/completions", b"").replace(b"Content-Length: 0", b"Content-Length: 500")
        return self.refused(payload.replace(SECRET.encode(), b"wrong"), 403, "invalid_credentials")

    # -- clients that leave --------------------------------------------------------------------

    @defer.inlineCallbacks
    def test_a_client_gone_mid_body_sends_nothing_upstream(self):
        body = json.dumps(chat_body()).encode()
        payload = post(b"/v1/chat/completions", body)[:-10]
        client = yield self.connect(payload)
        client.transport.loseConnection()
        yield client.closed
        # A request after it is served: the proxy is none the worse.
        self.h.fake.enqueue(Reply(json=openai_completion("hi", "gpt-4o-mini", 3, 1)))
        status, _, _ = split((yield self.exchange(post(b"/v1/chat/completions", body, b"Connection: close\r\n"))))
        self.assertEqual(status, 200)
        self.assertEqual(len(self.h.fake.received), 1)
        self.assertEqual([line["status_code"] for line in self.h.audit_lines() if "status_code" in line], [200])

    @defer.inlineCallbacks
    def test_a_client_gone_mid_stream_is_settled_as_499(self):
        hold: defer.Deferred = defer.Deferred()
        events = openai_sse_events(openai_stream_chunks(["a"] * 50, "gpt-4o-mini", include_usage=True))
        self.h.fake.enqueue(Reply(sse=events, delay_between_chunks=0.01, hold_until=hold))
        body = json.dumps(chat_body(stream=True)).encode()
        client = yield self.connect(post(b"/v1/chat/completions", body))
        hold.callback(None)
        yield client.when(lambda got: got.count(b"data: ") >= 2)
        client.transport.abortConnection()
        line = yield self.h.wait_for_audit(lambda line: line.get("status_code") == 499)
        self.assertEqual(line["type"], "error")
        yield self.h.committed()


def _dechunk(data: bytes) -> bytes:
    out = []
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out.append(data[:size])
        data = data[size + 2:]
    return b"".join(out)


class TwistedChannelTests(TestCase):
    """CLLAMA_LEAN_HTTP=0: twisted.web serves the inference paths, as before."""

    @defer.inlineCallbacks
    def test_served_and_refused(self):
        h = yield ProxyHarness(self, max_body_bytes=64 * 1024, lean=False).start()
        site = h.port.factory
        self.assertNotIsInstance(site.buildProtocol(None), LeanChannel)
        h.fake.enqueue(Reply(json=openai_completion("hi", "gpt-4o-mini", 3, 1)))
        response = yield h.chat(chat_body())
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json())["choices"][0]["message"]["content"], "hi")
        response = yield h.chat(chat_body(), token=f"{AGENT}:wrong")
        self.assertEqual(response.code, 403)
        self.assertEqual((yield response.json())["error"]["code"], "invalid_credentials")


class ParserTests(SynchronousTestCase):
    def test_request_line(self):
        self.assertEqual(parse_request_line(b"POST /v1/x?y=1 HTTP/1.1"), (b"POST", b"/v1/x?y=1", b"HTTP/1.1"))
        for line, status in ((b"POST /x", 400), (b"POST /x HTTP/3.0", 505), (b"P\x00ST /x HTTP/1.1", 400),
                             (b"POST  /x HTTP/1.1", 400), (b"POST http://a/x HTTP/1.1", 400), (b"POST /x HTTP", 400)):
            error = self.assertRaises(BadRequest, parse_request_line, line)
            self.assertEqual(error.status, status, line)

    def test_fields(self):
        headers = parse_fields(b"Host: a\r\nX-Two: 1\r\nx-two:  2 \r\nEmpty:")
        self.assertEqual(headers.getRawHeaders(b"x-two"), [b"1", b"2"])
        self.assertEqual(headers.getRawHeaders(b"empty"), [b""])
        for bad in (b"Host a", b" Host: a", b"Ho st: a", b"Host: a\x00b", b": a"):
            self.assertEqual(self.assertRaises(BadRequest, parse_fields, bad).status, 400, bad)


class _Producer:
    paused = False

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    parts, got = [], 0
    while got < size:
        data = sock.recv(1 << 20)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)


class DirectSendTests(TestCase):
    """On a real TCP connection: sent with send() at once; what the kernel refuses waits in Twisted's buffer."""

    @defer.inlineCallbacks
    def connect(self, direct: bool = True):
        made: defer.Deferred = defer.Deferred()

        class Factory(protocol.Factory):
            def buildProtocol(self, addr):
                channel = LeanChannel(site=None, fallback=lambda: None, direct=direct)
                reactor.callLater(0, made.callback, channel)  # once connected
                return channel

        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = socket.socket()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.connect(("127.0.0.1", port.getHost().port))
        self.addCleanup(peer.close)
        channel = yield made
        self.addCleanup(channel.transport.abortConnection)
        return channel, peer

    @defer.inlineCallbacks
    def test_a_backlog_pauses_the_answer_until_twisteds_buffer_is_empty(self):
        channel, peer = yield self.connect()
        self.assertIsNotNone(channel._sock)
        self.assertIsNone(channel.transport.producer)  # nothing registered while sending directly
        channel.send(b"small")
        self.assertEqual(peer.recv(5), b"small")
        producer = _Producer()
        channel._request = SimpleNamespace(producer=producer)
        self.addCleanup(setattr, channel, "_request", None)
        big = b"y" * (16 * 1024 * 1024)
        channel.send(big)
        self.assertTrue(channel._backlog)
        self.assertTrue(producer.paused)
        self.assertIs(channel.transport.producer, channel._watch)
        channel.send(b"tail")  # after what waits, never before it
        data = yield threads.deferToThread(_read_exactly, peer, len(big) + 4)
        self.assertEqual(len(data), len(big) + 4)
        self.assertTrue(data == big + b"tail")
        for _ in range(100):
            if not channel._backlog:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(channel._backlog)
        self.assertFalse(producer.paused)
        self.assertIsNone(channel.transport.producer)
        channel.send(b"direct")
        self.assertEqual(peer.recv(6), b"direct")

    @defer.inlineCallbacks
    def test_the_next_answer_starts_paused_while_the_last_one_waits(self):
        channel, peer = yield self.connect()
        first = LeanRequest(channel, b"POST", b"/v1/chat/completions", b"HTTP/1.1", Headers(), True)
        channel._request = first
        channel.send(b"y" * (16 * 1024 * 1024))
        self.assertTrue(channel._backlog)
        channel.request_done(first)
        second = LeanRequest(channel, b"POST", b"/v1/chat/completions", b"HTTP/1.1", Headers(), True)
        channel._request = second
        self.addCleanup(setattr, channel, "_request", None)
        producer = _Producer()
        second.registerProducer(producer, True)
        self.assertTrue(producer.paused)
        yield threads.deferToThread(_read_exactly, peer, 16 * 1024 * 1024)
        for _ in range(100):
            if not producer.paused:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(producer.paused)

    @defer.inlineCallbacks
    def test_no_delay(self):
        """Nagle's algorithm off: a stream's last chunk never waits for the agent's delayed ACK."""
        for direct in (True, False):
            channel, _ = yield self.connect(direct=direct)
            handle = channel.transport.getHandle()
            self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    @defer.inlineCallbacks
    def test_without_direct_sends_the_channel_is_the_transports_producer(self):
        channel, peer = yield self.connect(direct=False)
        self.assertIsNone(channel._sock)
        self.assertIs(channel.transport.producer, channel)
        producer = _Producer()
        channel._request = SimpleNamespace(producer=producer)
        self.addCleanup(setattr, channel, "_request", None)
        channel.send(b"z" * (1024 * 1024))
        self.assertTrue(producer.paused)  # Twisted's buffer is over its size: paused through the channel
        data = yield threads.deferToThread(_read_exactly, peer, 1024 * 1024)
        self.assertEqual(len(data), 1024 * 1024)
        for _ in range(100):
            if not producer.paused:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertFalse(producer.paused)

    @defer.inlineCallbacks
    def test_a_hand_over_while_a_write_waits(self):
        """twisted.web's channel registers itself as the transport's producer: the drain watch makes way."""

        class Web(protocol.Protocol):
            def connectionMade(self):
                self.transport.registerProducer(self, True)
                self.got = b""

            def dataReceived(self, data):
                self.got += data

            def pauseProducing(self):
                pass

            def resumeProducing(self):
                pass

            def stopProducing(self):
                pass

        channel, peer = yield self.connect()
        web = Web()
        channel._fallback = lambda: web
        channel.send(b"y" * (16 * 1024 * 1024))
        self.assertTrue(channel._backlog)
        channel._hand_over(b"GET /health HTTP/1.1\r\n\r\n")
        self.assertIs(channel.transport.producer, web)
        self.assertEqual(web.got, b"GET /health HTTP/1.1\r\n\r\n")
        data = yield threads.deferToThread(_read_exactly, peer, 16 * 1024 * 1024)
        self.assertEqual(len(data), 16 * 1024 * 1024)
