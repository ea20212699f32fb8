"""
The pipeline's policy hooks without a network: who is exempt, a hook's
timeout on a fake clock, a plugin that raises, the decoration kept for each
candidate's body.
"""

from __future__ import annotations

from twisted.internet import defer, task
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.governance.policy_plane import Decoration, PolicyPlane
from cllama_tx.identity.contexts import AgentContext
from cllama_tx.identity.principals import KeyPrincipal
from cllama_tx.identity.virtual_keys import VirtualKey
from cllama_tx.pipeline.metering import Exchange
from cllama_tx.pipeline.policy_hooks import PolicyHooks, PolicyTurn, policy_exempt
from cllama_tx.pipeline.proxy import Surface
from cllama_tx.surfaces.errors import ProxyError

CHAT = Surface("openai-chat-completions", "/v1/chat/completions", "openai", "openai")


def agent(**metadata):
    return AgentContext(agent_id="a", path="/nonexistent/a", metadata=metadata, secret="s")


class Recorder:
    """Metering's and the audit's part the hooks use."""

    def __init__(self):
        self.on_settled = []
        self.lines = []

    def intervention(self, ex, name, **details):
        self.lines.append(("intervention", name, details))

    def emit(self, event_type, claw_id, model, request_id=None, **fields):
        self.lines.append((event_type, fields.get("error"), fields))


class Stub:
    """An evaluator whose answers the test sets: a value, a Deferred, or an exception."""

    def __init__(self, **answers):
        self.answers = answers

    def _answer(self, hook):
        answer = self.answers.get(hook)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def gate_request(self, call):
        return self._answer("gate_request")

    def decorate(self, call):
        return self._answer("decorate")

    def gate_response(self, call):
        return self._answer("gate_response")


class Exempt(SynchronousTestCase):
    def test_agents_and_keys(self):
        self.assertTrue(policy_exempt(agent(policy_exempt=True)))
        self.assertTrue(policy_exempt(agent(policy_exempt=" TRUE ")))
        self.assertFalse(policy_exempt(agent(policy_exempt="yes")))
        self.assertFalse(policy_exempt(agent(policy_exempt=1)))
        self.assertFalse(policy_exempt(agent()))
        key = KeyPrincipal(VirtualKey("h" * 64, "sk-...abcd", metadata={"policy_exempt": True}))
        self.assertTrue(policy_exempt(key))
        self.assertFalse(policy_exempt(KeyPrincipal(VirtualKey("h" * 64, "sk-...abcd"))))


class Hooks(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.recorder = Recorder()
        self.ex = Exchange("rid", 0.0, CHAT, claw_id="a", model="openai/gpt-4o")

    def hooks(self, evaluator, fail_open=False):
        return PolicyHooks(PolicyPlane(evaluator, 1.5, fail_open), clock=self.clock,
                           metering=self.recorder, audit=self.recorder)

    def test_a_hook_that_never_answers_times_out(self):
        hooks = self.hooks(Stub(gate_request=defer.Deferred()))
        d = defer.ensureDeferred(hooks.before_dispatch(self.ex, agent(), {"model": "m"}))
        self.assertNoResult(d)
        self.clock.advance(1.49)
        self.assertNoResult(d)
        self.clock.advance(0.01)
        error = self.failureResultOf(d, ProxyError).value
        self.assertEqual((error.status, error.code, error.message), (403, "policy_unavailable", "policy evaluator unavailable"))
        self.assertEqual(self.recorder.lines, [
            ("intervention", "policy_unavailable", {"hook": "gate-request", "reason": "no answer within 1500 ms"})])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_plugin_that_raises(self):
        hooks = self.hooks(Stub(gate_request=RuntimeError("bug")))
        d = defer.ensureDeferred(hooks.before_dispatch(self.ex, agent(), {}))
        self.assertEqual(self.failureResultOf(d, ProxyError).value.code, "policy_unavailable")
        self.assertEqual(self.recorder.lines[-1][2]["reason"], "the policy failed (RuntimeError)")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # its traceback is in the log

    def test_failing_open(self):
        hooks = self.hooks(Stub(gate_request=RuntimeError("bug"), decorate=Decoration(system_patch="x")), fail_open=True)
        doc = {"messages": []}
        self.clock.advance(0.25)
        out = self.successResultOf(defer.ensureDeferred(hooks.before_dispatch(self.ex, agent(), doc)))
        self.assertIs(out, doc)  # an OpenAI request ignores a system patch: nothing decorated
        self.assertEqual(self.recorder.lines, [
            ("error", "policy request gate: the policy failed (RuntimeError)",
             {"status_code": 0, "latency_ms": 250.0, "error": "policy request gate: the policy failed (RuntimeError)"})])
        self.flushLoggedErrors(RuntimeError)

    def test_exempt_callers_are_not_asked(self):
        hooks = self.hooks(Stub(gate_request=RuntimeError("never called")))
        doc = {}
        self.assertIs(self.successResultOf(defer.ensureDeferred(
            hooks.before_dispatch(self.ex, agent(policy_exempt=True), doc))), doc)
        self.assertIsNone(self.ex.policy)

    def test_the_decoration_is_added_to_every_candidate(self):
        patch = {"role": "system", "content": "p"}
        hooks = self.hooks(Stub(decorate={"messages_patch": [patch]}))
        self.successResultOf(defer.ensureDeferred(hooks.before_dispatch(self.ex, agent(), {"messages": []})))
        turn: PolicyTurn = self.ex.policy
        first = turn.decorated({"model": "one", "messages": []})
        second = turn.decorated({"model": "two", "messages": []})
        self.assertEqual((first["messages"], second["messages"]), ([patch], [patch]))
        self.assertIs(turn.effective, second)
        self.assertEqual([line[1] for line in self.recorder.lines], ["policy_decorated"])
