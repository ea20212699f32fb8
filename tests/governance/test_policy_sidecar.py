"""
The policy sidecar client over real loopback sockets, against the fake
sidecar: the reference's requests, its answers read, failures described
without secrets, and a cancelled call closing its connection.
"""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from cllama_tx.governance.policy_plane import (
    DecorateCall,
    Decoration,
    GateDecision,
    GateRequestCall,
    GateResponseCall,
    RequestMeta,
    ResponseDecision,
    ScoreCall,
    ToolFilter,
)
from cllama_tx.governance.policy_sidecar import PolicySidecar, PolicyUnavailable
from cllama_tx.interfaces import IRequestPolicy
from cllama_tx.testing.policy import FakePolicySidecar, PolicyReply, amend, decorate, filter_tools
from tests.secret_scan import SCANNER

TOKEN = "sidecar-client-token-4669"
SCANNER.register(TOKEN)
META = RequestMeta("tiverton", "openai", model="openai/gpt-4o", request_id="0123456789abcdef")


class Client(TestCase):
    timeout = 20

    @defer.inlineCallbacks
    def setUp(self):
        self.sidecar = FakePolicySidecar(reactor, token=TOKEN)
        yield self.sidecar.start()
        self.addCleanup(self.sidecar.stop)
        self.client = self.make_client()

    def make_client(self, **kwargs):
        client = PolicySidecar(reactor, self.sidecar.url + "/", TOKEN, **kwargs)
        # A turn later: a connection whose answer was just handed over is back in the pool by then.
        self.addCleanup(lambda: task.deferLater(reactor, 0, client.pool.closeCachedConnections))
        return client

    @defer.inlineCallbacks
    def test_each_hook_posts_the_references_body(self):
        verifyObject(IRequestPolicy, self.client)
        self.sidecar.answer("gate-request", filter_tools("deny_list", ["shell"], intervention="tools_trimmed"))
        self.sidecar.answer("decorate", decorate(system_patch="be careful"))
        self.sidecar.answer("gate-response", amend({"choices": []}))
        doc = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "héllo"}]}
        gate = yield self.client.gate_request(GateRequestCall(META, doc))
        self.assertEqual(gate, GateDecision(verdict="allow", intervention="tools_trimmed",
                                            tool_filter=ToolFilter("deny_list", ("shell",))))
        decoration = yield self.client.decorate(DecorateCall(META, doc))
        self.assertEqual(decoration, Decoration(system_patch="be careful"))
        response = yield self.client.gate_response(GateResponseCall(META, "{}", 200, {"Content-Type": ["x"]}, "{}"))
        self.assertEqual(response, ResponseDecision(verdict="amend", amended_body=b'{"choices":[]}'))
        calls = self.sidecar.received
        self.assertEqual([call.hook for call in calls], ["gate-request", "decorate", "gate-response"])
        self.assertEqual(calls[0].json, GateRequestCall(META, doc).wire())
        self.assertIn("héllo".encode(), calls[0].body)
        for call in calls:
            self.assertEqual(call.header("authorization"), f"Bearer {TOKEN}")
            self.assertEqual(call.header("x-cllama-request-id"), "0123456789abcdef")

    @defer.inlineCallbacks
    def test_score_is_posted_and_its_answer_unread(self):
        call = ScoreCall(META, "{}", 200, {"Content-Type": ["application/json"]}, '{"id":"x"}')
        self.assertIsNone((yield self.client.score(call)))
        (scored,) = self.sidecar.calls("score")
        self.assertEqual(scored.json, call.wire())
        self.sidecar.answer("score", PolicyReply(status=500, raw=b"down"))
        failure = yield self.assertFailure(self.client.score(call), PolicyUnavailable)
        self.assertEqual(str(failure), "the sidecar answered HTTP 500")

    @defer.inlineCallbacks
    def test_null_is_an_empty_answer(self):
        self.sidecar.answer("decorate", PolicyReply(json=None))
        self.assertEqual((yield self.client.decorate(DecorateCall(META, {}))), Decoration())

    @defer.inlineCallbacks
    def test_failures_say_why_without_secrets(self):
        for reply, reason in [
            (PolicyReply(raw=b""), "the answer is not JSON"),
            (PolicyReply(status=302, raw=b""), "the sidecar answered HTTP 302"),
            (PolicyReply(json={"messages_patch": "x"}), "the answer cannot be used: 'messages_patch' is not a list of message objects"),
        ]:
            self.sidecar.answer("decorate", reply)
            failure = yield self.assertFailure(self.client.decorate(DecorateCall(META, {})), PolicyUnavailable)
            self.assertEqual(str(failure), reason)
        yield self.sidecar.stop()
        yield self.client.pool.closeCachedConnections()  # not a stale connection: a refused one
        failure = yield self.assertFailure(self.client.decorate(DecorateCall(META, {})), PolicyUnavailable)
        self.assertEqual(str(failure), "connection refused")

    @defer.inlineCallbacks
    def test_a_large_answer_is_refused(self):
        client = self.make_client(max_answer=100)
        self.sidecar.answer("decorate", decorate(system_patch="x" * 200))
        failure = yield self.assertFailure(client.decorate(DecorateCall(META, {})), PolicyUnavailable)
        self.assertEqual(str(failure), "answer larger than 100 bytes")

    @defer.inlineCallbacks
    def test_cancelling_a_call_hangs_up(self):
        """The pipeline's timeout cancels a call: the sidecar sees its caller go."""
        held = defer.Deferred()
        self.addCleanup(lambda: held.called or held.callback(None))
        self.sidecar.answer("gate-request", PolicyReply(json={"verdict": "allow"}, hold_until=held))
        call = self.client.gate_request(GateRequestCall(META, {}))
        yield self.sidecar.arrived("gate-request")
        dropped = self.sidecar.call_dropped()
        call.cancel()
        yield self.assertFailure(call, defer.CancelledError)
        yield dropped
        self.assertEqual(self.sidecar.dropped[0].hook, "gate-request")
