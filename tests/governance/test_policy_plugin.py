"""
In-process policy plugins: loaded by name, held to the sidecar's rules
(answers of any shape turned into decisions, the request a copy).
"""

from __future__ import annotations

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cllama_tx.governance.policy_plane import (
    DecorateCall,
    Decoration,
    GateDecision,
    GateRequestCall,
    GateResponseCall,
    PolicyAnswerError,
    RequestMeta,
    ResponseDecision,
    ScoreCall,
)
from cllama_tx.governance.policy_plugin import PluginError, PluginHost, find_factory, load_plugin
from cllama_tx.interfaces import IRequestPolicy

HERE = "tests.governance.policy_plugins"
META = RequestMeta("tiverton", "openai", model="openai/gpt-4o")


class Loading(SynchronousTestCase):
    def setUp(self):
        self.host = PluginHost(task.Clock(), {"MY_SETTING": "1"})

    def test_by_colon_or_dot(self):
        for spec in (f"{HERE}:recording", f"{HERE}.recording"):
            policy = load_plugin(spec, self.host)
            verifyObject(IRequestPolicy, policy)
            self.assertIs(policy.plugin.host, self.host)

    def test_what_cannot_be_loaded(self):
        cases = {
            "no_such_module_xyz:make": "cannot import 'no_such_module_xyz': ModuleNotFoundError",
            f"{HERE}:missing": "has no 'missing'",
            f"{HERE}:NOT_CALLABLE": "is not callable",
            f"{HERE}:failing": "failed: ValueError: no settings",
            f"{HERE}:shapeless": "did not build an IRequestPolicy",
            "nodots": "is not 'package.module:factory'",
        }
        for spec, message in cases.items():
            with self.assertRaises(PluginError) as caught:
                load_plugin(spec, self.host)
            self.assertIn(message, str(caught.exception))
        self.assertRaises(PluginError, find_factory, "no_such_module_xyz:make")


class Answers(SynchronousTestCase):
    def setUp(self):
        self.policy = load_plugin(f"{HERE}:recording", PluginHost(task.Clock(), {}))

    def test_a_decision_a_dict_a_coroutine(self):
        doc = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        self.assertEqual(
            self.successResultOf(self.policy.gate_request(GateRequestCall(META, doc))), GateDecision(verdict="allow")
        )
        self.assertEqual(doc["model"], "openai/gpt-4o")  # the plugin changed its copy only
        denied = self.successResultOf(self.policy.gate_request(
            GateRequestCall(META, {"messages": [{"role": "user", "content": "deny"}]})))
        self.assertEqual((denied.denied, denied.reason), (True, "as a dict"))
        self.assertEqual(
            self.successResultOf(self.policy.decorate(DecorateCall(META, {}))),
            Decoration(system_patch="from a coroutine"),
        )

    def test_none_a_failure_and_nonsense(self):
        def gate(body):
            return self.policy.gate_response(GateResponseCall(META, "", 200, {}, body))

        self.assertEqual(self.successResultOf(gate("fine")), ResponseDecision())
        self.failureResultOf(gate("boom"), RuntimeError)
        failure = self.failureResultOf(gate("nonsense"), PolicyAnswerError)
        self.assertEqual(str(failure.value), "the plugin's answer cannot be used: 'verdict' is not a string")

    def test_score_is_optional(self):
        self.assertIsNone(self.successResultOf(self.policy.score(ScoreCall(META, "", 200, {}, "{}"))))
