"""
The API site decides on a request's headers with the request line the
runtime's accessor reads off Twisted's channel
(L{cllama_tx.runtime.twisted_private.pending_request_line}); without it (a
Twisted that no longer keeps the line there) it serves as before the header
gate existed: bodies capped by the site-wide limit only, credentials
checked by the proxy once the body is in.  A real proxy on loopback in
front of a fake provider.
"""

from __future__ import annotations

import json

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from cllama_tx.testing import Reply, openai_completion
from tests import support
from tests.support import AGENT, ProxyHarness, chat_body


class _Raw(protocol.Protocol):
    """Sends C{payload}, collects the answer until the proxy closes."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.parts: list[bytes] = []
        self.closed: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(b"".join(self.parts))


@defer.inlineCallbacks
def raw(port: int, payload: bytes):
    client = _Raw(payload)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return (yield client.closed)


GIGABYTE_WRONG_SECRET = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
    + f"{AGENT}:not-the-secret".encode()
    + b"\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n"
)


class WithTheRequestLineTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield ProxyHarness(self).start()

    @defer.inlineCallbacks
    def test_wrong_credentials_are_refused_on_the_headers(self):
        """A gigabyte declared, no body byte sent: answered at once, 403 in OpenAI's shape."""
        data = yield raw(self.h.port.getHost().port, GIGABYTE_WRONG_SECRET)
        head, body = data.split(b"\r\n\r\n", 1)
        self.assertTrue(head.startswith(b"HTTP/1.1 403 "), head)
        self.assertEqual(json.loads(body)["error"]["code"], "invalid_credentials")
        self.assertEqual(self.h.fake.received, [])


class WithoutTheRequestLineTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.patch(support, "pending_request_line", lambda channel: None)
        # twisted.web's channel: the lean one reads the request line itself.
        self.h = yield ProxyHarness(self, max_body_bytes=256 * 1024, lean=False).start()

    @defer.inlineCallbacks
    def test_a_large_inference_body_is_still_served(self):
        """100 KB: over the 64 KiB of non-inference routes, under the site's cap."""
        self.h.fake.enqueue(Reply(json=openai_completion("hi", "gpt-4o-mini", 3, 1)))
        # A long prompt, as a real client sends one (an unknown top-level field
        # would be refused by the provider).
        response = yield self.h.chat(chat_body(messages=[{"role": "user", "content": "p" * 100_000}]))
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json())["choices"][0]["message"]["content"], "hi")
        self.assertEqual(self.h.fake.received[0].json["messages"], [{"role": "user", "content": "p" * 100_000}])

    @defer.inlineCallbacks
    def test_wrong_credentials_are_refused_by_the_proxy(self):
        response = yield self.h.chat(chat_body(), token=f"{AGENT}:not-the-secret")
        self.assertEqual(response.code, 403)
        self.assertEqual((yield response.json())["error"]["code"], "invalid_credentials")
        self.assertEqual(self.h.fake.received, [])
        [line] = self.h.audit_lines()
        self.assertEqual((line["type"], line["status_code"]), ("error", 403))

    @defer.inlineCallbacks
    def test_the_site_cap_still_holds(self):
        data = yield raw(self.h.port.getHost().port, GIGABYTE_WRONG_SECRET)
        head, body = data.split(b"\r\n\r\n", 1)
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), head)
        self.assertEqual(json.loads(body)["error"]["code"], "request_too_large")
        self.assertEqual(self.h.fake.received, [])
