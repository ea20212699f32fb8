"""
The flat per-event path of a plain stream, end to end over loopback: an
upstream chunk read whole is passed on to the agent framed as it came, the
tap counts it, and what the agent gets is what the full path would send.
"""

import json

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseDone

from cllama_tx.pipeline.relay import StreamRelay
from cllama_tx.runtime.lean_client import LeanUpstream, whole_chunks
from cllama_tx.sites.lean_http import LeanRequest
from cllama_tx.testing import Reply, openai_sse_events, openai_stream_chunks
from tests.pipeline.test_relay_unit import FakeRequest, FakeTransport
from tests.support import AGENT, SECRET, ProxyHarness, chat_body

SSE = {"content-type": "text/event-stream"}


def _request_bytes(body: dict) -> bytes:
    raw = json.dumps(body).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
        b"Authorization: Bearer " + f"{AGENT}:{SECRET}".encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(raw)
    ) + raw


class _Agent(protocol.Protocol):
    """Reads one chunked answer whole (until its terminating chunk)."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.data = b""
        self.done: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.data.endswith(b"\r\n0\r\n\r\n") and not self.done.called:
            self.done.callback(self.data)


def dechunk(raw: bytes) -> tuple[bytes, list[bytes]]:
    """The head, and the chunks' data in order."""
    head, _, body = raw.partition(b"\r\n\r\n")
    chunks = []
    while True:
        line, _, body = body.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            return head, chunks
        chunks.append(body[:size])
        assert body[size : size + 2] == b"\r\n"
        body = body[size + 2 :]


class FlatRelayTests(TestCase):
    def setUp(self) -> None:
        self.framed: list[bytes] = []
        original = LeanRequest.write_framed

        def counting(request, framed, size):
            sent = original(request, framed, size)
            if sent:
                self.framed.append(framed)
            return sent

        self.patch(LeanRequest, "write_framed", counting)

    @defer.inlineCallbacks
    def stream(self, h, texts, include_usage=True):
        chunks = openai_stream_chunks(texts, "gpt-4o-mini", prompt_tokens=11, completion_tokens=7,
                                      include_usage=include_usage)
        events = openai_sse_events(chunks)
        h.fake.enqueue(Reply(sse=events, headers=SSE, delay_between_chunks=0.02))
        agent = _Agent(_request_bytes(chat_body(stream=True)))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", h.port.getHost().port), agent)
        raw = yield agent.done
        agent.transport.loseConnection()
        yield h.wait_for_audit(lambda line: line.get("type") == "response")
        [response] = [line for line in h.audit_lines() if line["type"] == "response"]
        return events, dechunk(raw), response

    @defer.inlineCallbacks
    def test_text_deltas_pass_framed_and_are_metered(self):
        h = yield ProxyHarness(self).start()
        texts = ["Hello", " w\u00f6rld", " \u2603", " plain", ' "quoted"', " end"]
        events, (head, chunks), response = yield self.stream(h, texts)
        self.assertIn(b"Transfer-Encoding: chunked", head)
        # The agent gets every event as the provider sent it, the usage-only
        # chunk removed (it did not ask for usage).
        kept = [e for e in events if b'"choices":[]' not in e]
        self.assertEqual(len(kept), len(events) - 1)
        self.assertEqual(chunks, kept)
        # The text deltas framed as the one before them went the flat way, as
        # they came: not the first (it teaches the tap the stream's framing),
        # not the one with an escaped quote (the tap reads it the full way).
        texts_events = [e for e in events if b'"content":"' in e and b'"role"' not in e]
        expected = [e for e in texts_events if b'"Hello"' not in e and b'\\"' not in e]
        self.assertEqual(len(expected), 4)
        self.assertEqual([f.partition(b"\r\n")[2][:-2] for f in self.framed], expected)
        for framed in self.framed:
            size, _, rest = framed.partition(b"\r\n")
            self.assertEqual(size, b"%x" % (len(rest) - 2))
        self.assertEqual((response["status_code"], response["tokens_in"], response["tokens_out"]), (200, 11, 7))

    @defer.inlineCallbacks
    def test_a_stream_without_usage_is_billed_the_same_either_way(self):
        """
        Without the provider's usage the output is estimated from the text
        the tap counted: the flat path counts what the full path counts.
        """
        texts = [" one", " tw\u00f6", " three and more words", " \U0001f600", " \\ back", " last"]
        h = yield ProxyHarness(self).start()
        _, (_, flat_chunks), flat = yield self.stream(h, texts, include_usage=False)
        self.assertEqual(len(self.framed), 4)
        self.patch(LeanRequest, "write_framed", None)  # the full path only
        self.framed.clear()
        h2 = yield ProxyHarness(self).start()
        _, (_, full_chunks), full = yield self.stream(h2, texts, include_usage=False)
        self.assertEqual(self.framed, [])
        self.assertEqual(flat_chunks, full_chunks)
        self.assertGreater(flat["tokens_out"], 0)
        for field in ("status_code", "tokens_in", "tokens_out", "cost_usd"):
            self.assertEqual(flat[field], full[field], field)


class WholeChunksTests(SynchronousTestCase):
    """Which reads the upstream client hands on framed, and where their chunks' data is."""

    def test_one_chunk(self):
        self.assertEqual(list(whole_chunks(b"3\r\nabc\r\n")), [3, 6])
        self.assertEqual(list(whole_chunks(b"a\r\n0123456789\r\n")), [3, 13])

    def test_several_chunks_then_what_is_not_whole(self):
        self.assertEqual(list(whole_chunks(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")), [3, 6, 11, 13])
        self.assertEqual(list(whole_chunks(b"3\r\nabc\r\n2\r\nd")), [3, 6])

    def test_what_is_read_the_usual_way(self):
        for data in (
            b"03\r\nabc\r\n",  # a size line not as the relay would write it
            b"A\r\n0123456789\r\n",
            b"+3\r\nabc\r\n",
            b"3;ext=1\r\nabc\r\n",  # an extension
            b"0\r\n\r\n",  # the last chunk
            b"3\r\nabcd\r\n",  # no CRLF where the data ends
            b"3\r\nab",  # cut
            b"",
        ):
            self.assertEqual(list(whole_chunks(data)), [], data)


class _FramedRequest(FakeRequest):
    def __init__(self, takes_framed=True):
        super().__init__()
        self.takes_framed = takes_framed
        self.framed = []

    def write_framed(self, framed, size):
        if not self.takes_framed:
            return False
        self.framed.append((framed, size))
        return True


def _chunks(*payloads):
    """The framed read of these payloads, and their spans."""
    data, spans = b"", []
    for payload in payloads:
        data += b"%x\r\n" % len(payload)
        spans += [len(data), len(data) + len(payload)]
        data += payload + b"\r\n"
    return data, spans


class FramedRelayTests(SynchronousTestCase):
    def make(self, takes_framed=True):
        self.clock, self.request, self.transport = Clock(), _FramedRequest(takes_framed), FakeTransport()
        self.data: list[bytes] = []
        self.passed: list[bytes] = []

        def passthrough(framed, start, stop):
            event = framed[start:stop]
            if event.startswith(b"T"):
                self.passed.append(event)
                return True
            return False

        relay = StreamRelay(self.request, self.clock, idle_timeout=1.0, first_byte_timeout=5.0,
                            on_data=self.data.append, passthrough=passthrough)
        relay.makeConnection(self.transport)
        return relay

    def test_the_first_read_goes_the_full_way(self):
        relay = self.make()
        data, spans = _chunks(b"Ta", b"Tb")
        relay.chunk_received(data, spans)
        self.assertEqual((self.data, self.passed, self.request.framed), ([b"Ta", b"Tb"], [], []))
        self.assertEqual(relay.bytes_relayed, 4)

    def test_one_event_passes_framed_as_it_came(self):
        relay = self.make()
        relay.dataReceived(b"X0")
        self.clock.advance(0.5)
        data, spans = _chunks(b"Tone")
        relay.chunk_received(data, spans)
        self.assertEqual(self.request.framed, [(data, 4)])
        self.assertIs(self.request.framed[0][0], data)  # not a copy
        self.assertEqual((self.data, self.passed, relay.bytes_relayed), ([b"X0"], [b"Tone"], 6))
        # It counts for the idle timer as any data does.
        self.clock.advance(0.9)
        self.assertFalse(relay.done.called)

    def test_a_run_of_events_is_one_send_others_go_in_order(self):
        relay = self.make()
        relay.dataReceived(b"X0")
        data, spans = _chunks(b"Ta", b"Tbb", b"Xc", b"Td", b"Tee")
        relay.chunk_received(data, spans)
        first_two = _chunks(b"Ta", b"Tbb")[0]
        last_two = _chunks(b"Td", b"Tee")[0]
        self.assertEqual(self.request.framed, [(first_two, 5), (last_two, 5)])
        self.assertEqual(self.data, [b"X0", b"Xc"])
        self.assertEqual(relay.bytes_relayed, 2 + 5 + 2 + 5)

    def test_nothing_more_after_an_abort(self):
        relay = self.make()
        relay.dataReceived(b"X0")
        relay._on_data = lambda data: (self.data.append(data), relay.abort())
        data, spans = _chunks(b"Ta", b"Xb", b"Tc")
        relay.chunk_received(data, spans)
        self.assertEqual(self.request.framed, [(_chunks(b"Ta")[0], 2)])
        self.assertEqual(self.data, [b"X0", b"Xb"])
        self.assertEqual(self.passed, [b"Ta"])  # Tc was not even counted
        self.assertEqual(self.transport.stopped, 1)

    def test_an_answer_that_is_not_chunked_gets_the_data(self):
        relay = self.make(takes_framed=False)
        relay.dataReceived(b"X0")
        data, spans = _chunks(b"Ta", b"Tb")
        relay.chunk_received(data, spans)
        self.assertEqual(self.request.written, [b"Ta", b"Tb"])
        self.assertEqual(self.data, [b"X0"])

    def test_without_a_passthrough_every_event_goes_to_on_data(self):
        self.clock, self.request, self.transport = Clock(), _FramedRequest(), FakeTransport()
        seen: list[bytes] = []
        relay = StreamRelay(self.request, self.clock, idle_timeout=1.0, first_byte_timeout=5.0, on_data=seen.append)
        relay.makeConnection(self.transport)
        relay.dataReceived(b"X0")
        relay.chunk_received(*_chunks(b"Ta", b"Tb"))
        self.assertEqual((seen, self.request.framed), ([b"X0", b"Ta", b"Tb"], []))


class _ChunkReader(protocol.Protocol):
    """A body protocol that takes whole chunks framed; C{next} is called after each read."""

    def __init__(self, next_write) -> None:
        self.framed: list[tuple[bytes, list[int]]] = []
        self.data: list[bytes] = []
        self.done: defer.Deferred = defer.Deferred()
        self.next_write = next_write

    def chunk_received(self, framed, spans):
        self.framed.append((framed, spans))
        self.next_write()

    def dataReceived(self, data):
        self.data.append(data)
        self.next_write()

    def connectionLost(self, reason=None):
        self.reason = reason
        self.done.callback(None)


class ClientFramedTests(TestCase):
    """The upstream client hands whole chunks on framed, and reads the rest as ever."""

    @defer.inlineCallbacks
    def test_reads_of_whole_chunks_and_the_end(self):
        # Each write once the reader had the one before: each is one read.
        writes = [b"5\r\nhello\r\n", b"1\r\n \r\n5\r\nworld\r\n", b"3\r\nab", b"c\r\n", b"1\r\n!\r\n0\r\n\r\n"]
        servers: list[protocol.Protocol] = []

        class Server(protocol.Protocol):
            def connectionMade(self):
                self.transport.setTcpNoDelay(True)
                servers.append(self)

            def dataReceived(self, data):
                if b"\r\n\r\n" in data:
                    self.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + writes.pop(0))

        def next_write():
            if writes:
                reactor.callLater(0, servers[0].transport.write, writes.pop(0))

        sent = list(writes)
        factory = protocol.Factory.forProtocol(Server)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = LeanUpstream(reactor, 5.0)
        self.addCleanup(client.close)
        url = b"http://127.0.0.1:%d/" % port.getHost().port
        response = yield client.request(b"GET", url, None, None)
        reader = _ChunkReader(next_write)
        response.deliverBody(reader)
        yield reader.done
        self.assertTrue(reader.reason.check(ResponseDone))
        self.assertEqual([(f, list(s)) for f, s in reader.framed], [(sent[1], [3, 4, 9, 14]), (sent[4], [3, 4])])
        # The chunk read with the head, and one cut across reads, the usual
        # way; the last chunk ends the answer.
        self.assertEqual(reader.data, [b"hello", b"ab", b"c"])
        self.assertEqual(client.idle_connections(url), 1)


class FlatBackpressureTests(TestCase):
    """An agent that stops reading pauses the upstream on the flat path too."""

    @defer.inlineCallbacks
    def test_a_stalled_agent_pauses_the_upstream(self):
        relays: list[StreamRelay] = []
        paused: defer.Deferred = defer.Deferred()
        framed: list[int] = []
        original_init, original_pause = StreamRelay.__init__, StreamRelay.pauseProducing
        original_write = LeanRequest.write_framed

        def init(relay, *args, **kwargs):
            original_init(relay, *args, **kwargs)
            relays.append(relay)

        def pause(relay):
            original_pause(relay)
            if not paused.called:
                paused.callback(relay)

        def write_framed(request, data, size):
            sent = original_write(request, data, size)
            if sent:
                framed.append(size)
            return sent

        self.patch(StreamRelay, "__init__", init)
        self.patch(StreamRelay, "pauseProducing", pause)
        self.patch(LeanRequest, "write_framed", write_framed)
        h = yield ProxyHarness(self, idle_timeout=60).start()
        # 4 KiB of plain text an event, one chunk a write, 2 ms apart: each is
        # one read at the proxy; 40 MiB in all, far more than the sockets hold.
        text = "flat " * (4 * 1024 // 5)
        events = openai_sse_events(openai_stream_chunks([text] * 10000, "gpt-4o-mini"))
        h.fake.enqueue(Reply(sse=events, headers=SSE, delay_between_chunks=0.002))
        agent = _Agent(_request_bytes(chat_body(stream=True)))
        agent.dataReceived = lambda data: agent.transport.pauseProducing()  # reads once, then nothing
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", h.port.getHost().port), agent)
        self.addCleanup(lambda: agent.transport.abortConnection() if agent.transport.connected else None)
        relay = yield paused
        self.assertTrue(relay.paused)
        self.assertGreater(len(framed), 0)  # the flat path was taken until the agent backed up
        # Nothing more is read from the provider while the agent reads nothing:
        # at most what was in flight when the pause came.
        relayed = relay.bytes_relayed
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertTrue(relay.paused)
        self.assertLessEqual(relay.bytes_relayed - relayed, 2 * len(events[5]))
        self.assertLess(relay.bytes_relayed, len(b"".join(events)) // 4)
        agent.transport.abortConnection()
        yield h.fake.wait_for_disconnect()
        line = yield h.wait_for_audit(lambda line: line.get("status_code") == 499)
        self.assertEqual(line["error"], "client disconnected")
