"""The upstream client: per-URL targets, and Agent's public way when Twisted's seams are gone; against a fake provider over loopback."""

import json

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from cllama_tx.pipeline.relay import read_body
from cllama_tx.runtime import upstream as upstream_module
from cllama_tx.runtime.upstream import UpstreamClient
from cllama_tx.testing import FakeProvider, Reply

JSON = Headers({b"content-type": [b"application/json"]})


class UpstreamTargetTests(TestCase):
    """The per-URL work of Agent.request, done once per upstream URL."""

    @defer.inlineCallbacks
    def test_same_url_reuses_its_target_and_still_arrives(self):
        fake = FakeProvider(reactor, strict=False)
        yield fake.start()
        self.addCleanup(fake.stop)
        client = UpstreamClient(reactor, 5.0, lean=False)
        self.addCleanup(client.close)
        url = f"http://127.0.0.1:{fake.port}/v1/chat/completions?x=1".encode()
        for n in range(2):
            fake.enqueue(Reply(json={"n": n}))
            response = yield client.request(b"POST", url, JSON, b"{}")
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
        client = UpstreamClient(reactor, 5.0, lean=False)
        self.addCleanup(client.close)
        d = client.request(b"GET", b"http://bad host/\x00", Headers(), None)
        yield self.assertFailure(d, ValueError)
        self.assertEqual(client._targets, {})

    def test_the_cache_is_bounded(self):
        client = UpstreamClient(reactor, 5.0, lean=False)
        self.patch(UpstreamClient, "MAX_TARGETS", 3)
        for i in range(5):
            client._target(f"http://127.0.0.1:1/{i}".encode())
        self.assertLessEqual(len(client._targets), 3)
        self.assertIn(b"http://127.0.0.1:1/4", client._targets)


class WithoutTwistedsSeamsTests(TestCase):
    """A Twisted without Agent's private steps: every request takes Agent.request, and arrives."""

    @defer.inlineCallbacks
    def test_requests_take_the_public_way(self):
        self.patch(upstream_module, "agent_steps", lambda agent: None)
        fake = FakeProvider(reactor, strict=False)
        yield fake.start()
        self.addCleanup(fake.stop)
        client = UpstreamClient(reactor, 5.0, lean=False)
        self.addCleanup(client.close)
        url = f"http://127.0.0.1:{fake.port}/v1/chat/completions?x=2".encode()
        for n in range(2):
            fake.enqueue(Reply(json={"n": n}))
            response = yield client.request(b"POST", url, JSON, b'{"model":"m"}')
            self.assertEqual(json.loads((yield read_body(response))), {"n": n})
        self.assertEqual(client._targets, {})  # nothing cached: Agent did the work each time
        self.assertEqual([(r.method, r.path, r.query, r.body) for r in fake.received],
                         [("POST", "/v1/chat/completions", "x=2", b'{"model":"m"}')] * 2)

    @defer.inlineCallbacks
    def test_a_bad_url_still_fails_the_deferred(self):
        self.patch(upstream_module, "agent_steps", lambda agent: None)
        client = UpstreamClient(reactor, 5.0, lean=False)
        self.addCleanup(client.close)
        yield self.assertFailure(client.request(b"GET", b"http://bad host/\x00", Headers(), None), ValueError)
