"""StreamRelay without a reactor: timers, producer registration, outcomes; and the upstream client's per-URL targets, against a fake provider."""

import json

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import ResponseDone
from twisted.internet.error import ConnectionLost

from cllama_tx.relay import StreamRelay, UpstreamTimeout


class FakeTransport:
    def __init__(self):
        self.stopped = 0

    def stopProducing(self):
        self.stopped += 1


class FakeRequest:
    def __init__(self):
        self.channel = object()
        self.written = []
        self.producer = None
        self.unregistered = 0

    def registerProducer(self, producer, streaming):
        self.producer = (producer, streaming)

    def unregisterProducer(self):
        self.unregistered += 1

    def write(self, data):
        self.written.append(data)


class StreamRelayTests(SynchronousTestCase):
    def make(self, first=5.0, idle=1.0, on_data=None):
        self.clock, self.request, self.transport = Clock(), FakeRequest(), FakeTransport()
        relay = StreamRelay(self.request, self.clock, idle_timeout=idle, first_byte_timeout=first, on_data=on_data)
        relay.makeConnection(self.transport)
        return relay

    def test_registers_upstream_as_streaming_producer(self):
        relay = self.make()
        self.assertEqual(self.request.producer, (self.transport, True))
        relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.request.unregistered, 1)
        self.assertIsNone(self.successResultOf(relay.done))

    def test_chunks_go_to_the_request_by_default(self):
        relay = self.make()
        relay.dataReceived(b"a")
        relay.dataReceived(b"bc")
        self.assertEqual(self.request.written, [b"a", b"bc"])
        self.assertEqual(relay.bytes_relayed, 3)

    def test_chunks_go_to_on_data_in_order(self):
        seen = []
        relay = self.make(on_data=seen.append)
        relay.dataReceived(b"a")
        relay.dataReceived(b"bc")
        self.assertEqual(seen, [b"a", b"bc"])
        self.assertEqual(self.request.written, [])

    def test_first_byte_timeout(self):
        relay = self.make(first=5.0)
        self.clock.advance(4.9)
        self.assertNoResult(relay.done)
        self.clock.advance(0.2)
        self.assertEqual(self.transport.stopped, 1)
        relay.connectionLost(Failure(ConnectionLost()))
        failure = self.failureResultOf(relay.done, UpstreamTimeout)
        self.assertEqual(failure.value.phase, "first byte")

    def test_idle_timer_counts_from_the_last_chunk(self):
        relay = self.make(first=5.0, idle=1.0)
        relay.dataReceived(b"x")  # t=0: idle timer armed for t=1
        self.clock.advance(0.6)
        relay.dataReceived(b"y")  # t=0.6
        self.clock.advance(0.5)  # t=1.1: silent 0.5, re-armed for t=1.6
        self.assertEqual(self.transport.stopped, 0)
        self.clock.advance(0.4)  # t=1.5
        self.assertEqual(self.transport.stopped, 0)
        self.clock.advance(0.2)  # t=1.7
        self.assertEqual(self.transport.stopped, 1)
        relay.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.failureResultOf(relay.done, UpstreamTimeout).value.phase, "data")

    def test_broken_connection_fails_done(self):
        relay = self.make()
        relay.dataReceived(b"x")
        relay.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(relay.done, ConnectionLost)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_agent_gone_skips_unregister(self):
        relay = self.make()
        self.request.channel = None
        relay.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.request.unregistered, 0)
        self.failureResultOf(relay.done, ConnectionLost)


class UpstreamTargetTests(TestCase):
    """The per-URL work of Agent.request, done once per upstream URL."""

    @defer.inlineCallbacks
    def test_same_url_reuses_its_target_and_still_arrives(self):
        from twisted.internet import reactor
        from twisted.web.http_headers import Headers

        from cllama_tx.relay import UpstreamClient, read_body
        from cllama_tx.testing import FakeProvider, Reply

        fake = FakeProvider(reactor)
        yield fake.start()
        self.addCleanup(fake.stop)
        client = UpstreamClient(reactor, 5.0)
        self.addCleanup(client.close)
        url = f"http://127.0.0.1:{fake.port}/v1/chat/completions?x=1".encode()
        for n in range(2):
            fake.enqueue(Reply(json={"n": n}))
            response = yield client.request(b"POST", url, Headers({b"content-type": [b"application/json"]}), b"{}")
            self.assertEqual(response.code, 200)
            self.assertEqual(json.loads((yield read_body(response))), {"n": n})
        self.assertEqual(list(client._targets), [url])
        key, endpoint, parsed = client._targets[url]
        self.assertEqual(key, (b"http", b"127.0.0.1", fake.port))
        self.assertEqual([(r.method, r.path, r.query) for r in fake.received],
                         [("POST", "/v1/chat/completions", "x=1")] * 2)
        self.assertEqual(fake.received[1].headers["host"], [f"127.0.0.1:{fake.port}"])

    @defer.inlineCallbacks
    def test_bad_url_fails_the_deferred(self):
        from twisted.internet import reactor
        from twisted.web.http_headers import Headers

        from cllama_tx.relay import UpstreamClient

        client = UpstreamClient(reactor, 5.0)
        self.addCleanup(client.close)
        d = client.request(b"GET", b"http://bad host/\x00", Headers(), None)
        yield self.assertFailure(d, ValueError)
        self.assertEqual(client._targets, {})

    def test_the_cache_is_bounded(self):
        from twisted.internet import reactor

        from cllama_tx.relay import UpstreamClient

        client = UpstreamClient(reactor, 5.0)
        self.patch(UpstreamClient, "MAX_TARGETS", 3)
        for i in range(5):
            client._target(f"http://127.0.0.1:1/{i}".encode())
        self.assertLessEqual(len(client._targets), 3)
        self.assertIn(b"http://127.0.0.1:1/4", client._targets)
