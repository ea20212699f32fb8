"""
Standing in for the Execwall OR gate, in process and over real loopback
sockets, against a fake OpenRouter (cllama_tx.testing.openrouter): the model
OpenRouter says answered a fallback list is the one metered, every model of
the list is held for, OpenRouter models without a packaged price are held at
the ceiling and settled with usage.cost, the request's model is ignored for
the gate's agents, the 402 comes only once the budget is spent (in the
surface's shape), and every answer carries its cost and budget headers.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from cllama_tx.runtime.gate import GateSettings, wire
from cllama_tx.testing import FakeProvider, parse_sse
from cllama_tx.testing.openrouter import OpenRouterModel
from tests.support import AGENT, PROVIDER_KEY, UI_TOKEN, ProxyHarness, write_agent

GATE_POLICY = """\
cost_routing:
  openrouter:
    base_url: "https://openrouter.ai/api/v1"
    api_key: "${OPENROUTER_API_KEY}"
  agents:
    AGENT_ID:
      budget_total: 10.00
      period: none
      tiers:
        - threshold: 0.50
          models: ["openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet"]
        - threshold: 0.00
          models: ["mistralai/mistral-7b-instruct"]
""".replace("AGENT_ID", AGENT)

PLAIN_SECRET = "ab" * 24


class GateHarness:
    """A ProxyHarness whose only provider is a fake OpenRouter, with the gate's policy file."""

    def __init__(self, testcase: TestCase) -> None:
        self.case = testcase

    @defer.inlineCallbacks
    def start(self, policy: str = GATE_POLICY, settings: GateSettings | None = None):
        case = self.case
        self.model = OpenRouterModel()
        self.openrouter = FakeProvider(reactor, responder=self.model.respond, strict=False)
        yield self.openrouter.start()
        case.addCleanup(self.openrouter.stop)
        path = os.path.join(os.path.abspath(case.mktemp()))
        os.makedirs(path)
        self.policy_path = os.path.join(path, "policy.yaml")
        with open(self.policy_path, "w") as f:
            f.write(policy)
        env = {"OPENROUTER_API_KEY": PROVIDER_KEY, "OPENROUTER_BASE_URL": self.openrouter.base_url}
        self.proxy = yield ProxyHarness(case, env=env, fake_providers=(), policy_file=self.policy_path).start()
        wire(settings or GateSettings(), governance=self.proxy.governance, contexts=self.proxy.contexts,
             operations=self.proxy.operations, ledger=self.proxy.ledger, providers=self.proxy.providers,
             proxy=self.proxy.proxy, api_site=None, clock=reactor)
        return self

    def sent(self) -> dict:
        return self.openrouter.received[-1].json

    @defer.inlineCallbacks
    def chat(self, doc, **kwargs):
        response = yield self.proxy.chat(doc, **kwargs)
        raw = yield response.content()
        return response, raw

    @defer.inlineCallbacks
    def committed_rows(self):
        yield self.proxy.committed()
        rows = yield self.proxy.ledger_rows()
        return rows


def hello(**extra) -> dict:
    return {"messages": [{"role": "user", "content": "Hello"}], **extra}


class FallbackMeteringTests(TestCase):
    @defer.inlineCallbacks
    def test_json_answer_is_metered_with_the_model_openrouter_used(self):
        gate = yield GateHarness(self).start()
        gate.model.down.add("openai/gpt-4o-mini")
        response, raw = yield gate.chat(hello())
        body = json.loads(raw)
        self.assertEqual(response.code, 200, body)
        self.assertEqual((gate.sent()["model"], gate.sent()["models"], gate.sent()["route"]),
                         ("openai/gpt-4o-mini", ["openai/gpt-4o-mini", "anthropic/claude-3.5-sonnet"], "fallback"))
        self.assertEqual(body["model"], "anthropic/claude-3.5-sonnet")
        rows = yield gate.committed_rows()
        row = rows[-1]
        self.assertEqual((row["provider"], row["effective_model"], row["priced"]),
                         ("openrouter", "anthropic/claude-3.5-sonnet", True))
        self.assertAlmostEqual(row["cost_usd"], body["usage"]["cost"], places=10)
        line = yield gate.proxy.wait_for_audit(lambda line: line["type"] == "response")
        self.assertEqual(line["effective_model"], "anthropic/claude-3.5-sonnet")
        self.assertEqual(body["_execwall"]["cost"], round(body["usage"]["cost"], 6))

    @defer.inlineCallbacks
    def test_stream_is_metered_with_the_model_openrouter_used(self):
        gate = yield GateHarness(self).start()
        gate.model.down.add("openai/gpt-4o-mini")
        response, raw = yield gate.chat(hello(stream=True))
        self.assertEqual(response.code, 200)
        events = [json.loads(data) for _, data in parse_sse(raw) if data.startswith("{")]
        self.assertEqual({e["model"] for e in events}, {"anthropic/claude-3.5-sonnet"})
        self.assertFalse(any("usage" in e for e in events))  # the agent did not ask for usage
        self.assertNotIn(b"_execwall", raw)
        # Known before the body: who, which models, what was left when admitted.
        self.assertEqual(response.headers.getRawHeaders("x-cllama-agent-id"), [AGENT])
        self.assertEqual(response.headers.getRawHeaders("x-cllama-models-allowed"),
                         ["openai/gpt-4o-mini, anthropic/claude-3.5-sonnet"])
        self.assertEqual(response.headers.getRawHeaders("x-cllama-budget-remaining-usd"), ["10"])
        self.assertIsNone(response.headers.getRawHeaders("x-cllama-cost-usd"))
        rows = yield gate.committed_rows()
        self.assertEqual(rows[-1]["effective_model"], "anthropic/claude-3.5-sonnet")
        self.assertTrue(rows[-1]["cost_usd"] > 0)

    @defer.inlineCallbacks
    def test_the_dearest_model_of_the_list_is_held_for(self):
        gate = yield GateHarness(self).start()
        # $0.01 left pays 4,000 tokens of gpt-4o-mini's output, not of claude-3.5-sonnet's:
        # the request is lowered to what the dearer model of the list may cost.
        response = yield gate.proxy.ui_client.post(
            f"http://ui/api/budget/{AGENT}", json={"limit_usd": 0.01}, headers={"Authorization": [f"Bearer {UI_TOKEN}"]}
        )
        answer = yield response.json()
        self.assertEqual((response.code, answer["budget_total"]), (200, 0.01), answer)
        response, raw = yield gate.chat(hello(max_tokens=4000))
        self.assertEqual(response.code, 200, raw)
        lowered = int(response.headers.getRawHeaders("x-cllama-max-tokens-lowered")[0])
        self.assertLess(lowered, 4000)
        self.assertLessEqual(lowered * 15.0 / 1e6, 0.01)
        self.assertEqual(gate.sent()["max_tokens"], lowered)


class GateAgentTests(TestCase):
    @defer.inlineCallbacks
    def test_the_requested_model_is_ignored_and_said_so(self):
        gate = yield GateHarness(self).start()
        response, raw = yield gate.chat(hello(model="openai/gpt-4o"))
        body = json.loads(raw)
        self.assertEqual(response.code, 200, body)
        self.assertEqual(gate.sent()["model"], "openai/gpt-4o-mini")
        self.assertEqual(body["_execwall"]["original_model"], "openai/gpt-4o")
        line = yield gate.proxy.wait_for_audit(lambda line: line.get("intervention") == "requested_model_ignored")
        self.assertEqual((line["requested_model"], line["to_model"]), ("openai/gpt-4o", "openrouter/openai/gpt-4o-mini"))

    @defer.inlineCallbacks
    def test_402_only_once_spent_and_in_the_surface_shape(self):
        gate = yield GateHarness(self).start()
        console = gate.proxy.operations.gate_console
        # $0.00001 left: not exhausted, but not even a short answer of the economy
        # tier fits (256 tokens at $0.20 a million): ours (429), as safer.
        yield console.set_budget(AGENT, {"budget_spent": 10.0 - 0.00001}, "test")
        response, raw = yield gate.chat(hello())
        body = json.loads(raw)
        self.assertEqual(response.code, 429, body)
        self.assertEqual(body["error"]["code"], "budget_exceeded")
        self.assertNotIn("detail", body)
        # Spent: the gate's 402, on the Messages surface in Anthropic's shape.
        yield console.set_budget(AGENT, {"budget_spent": 10.0}, "test")
        response = yield gate.proxy.post("/v1/messages", {"model": "x", "max_tokens": 10, "messages": [
            {"role": "user", "content": "Hello"}]}, headers={"anthropic-version": ["2023-06-01"]})
        body = yield response.json()
        self.assertEqual(response.code, 402, body)
        self.assertEqual(body["type"], "error")
        self.assertEqual((body["error"]["type"], body["error"]["code"]), ("budget_exceeded", "budget_exceeded"))
        self.assertEqual((body["detail"]["error"], body["detail"]["budget_remaining"]), ("budget_exhausted", 0.0))
        self.assertEqual(body["budget"]["window"], "lifetime")
        self.assertIsNone(response.headers.getRawHeaders("retry-after"))  # a lifetime budget never resets

    @defer.inlineCallbacks
    def test_reset_keeps_the_console_limit_and_drops_the_file_offset(self):
        policy = GATE_POLICY.replace("budget_total: 10.00", "budget_total: 10.00\n      budget_spent: 4.00")
        gate = yield GateHarness(self).start(policy)
        console = gate.proxy.operations.gate_console
        self.assertEqual(console.spend(AGENT)["budget_spent"], 4.0)
        yield console.set_budget(AGENT, {"budget_total": 20.0}, "test")
        self.assertEqual((console.spend(AGENT)["budget_total"], console.spend(AGENT)["budget_source"]), (20.0, "console"))
        answer = yield console.reset(AGENT, "test")
        self.assertEqual((answer["status"], answer["budget_spent"]), ("reset", 0.0))
        fields = console.spend(AGENT)
        self.assertEqual((fields["budget_total"], fields["budget_spent"], fields["period"]), (20.0, 0.0, "none"))

    @defer.inlineCallbacks
    def test_the_gate_refusals_of_the_console(self):
        gate = yield GateHarness(self).start()
        console = gate.proxy.operations.gate_console
        for doc, detail in (({}, "budget_total or budget_spent required"),
                            ({"budget_total": 0}, "budget_total must be a number of dollars > 0"),
                            ({"budget_spent": -1}, "budget_spent must be a number of dollars >= 0"),
                            ({"budget_total": "lots"}, "budget_total must be a number of dollars > 0")):
            with self.subTest(doc=doc):
                error = yield self.assertFailure(defer.ensureDeferred(console.set_budget(AGENT, doc, "test")), Exception)
                self.assertEqual((error.status, error.extra["detail"]), (400, detail))
        error = yield self.assertFailure(defer.ensureDeferred(console.set_budget("nobody", {"budget_total": 1}, "test")), Exception)
        self.assertEqual((error.status, error.extra["detail"]), (404, "agent not found"))
        # A refused change resets nothing.
        error = yield self.assertFailure(
            defer.ensureDeferred(console.set_budget(AGENT, {"budget_spent": 1.0, "period": "yearly"}, "test")), Exception)
        self.assertEqual(error.status, 400)
        self.assertIsNone(gate.proxy.ledger.budget_override(AGENT))


class CeilingTests(TestCase):
    """An OpenRouter model the price table does not know, under an agent's dollar budget."""

    @defer.inlineCallbacks
    def start(self, report_cost=True):
        gate = yield GateHarness(self).start(policy="cost_routing:\n  agents: {}\n")
        gate.model.report_cost = report_cost
        write_agent(gate.proxy.context_root, "coder", PLAIN_SECRET,
                    budget={"limit_usd": 1.0, "window": "24h", "behavior": "hard_stop"})
        gate.proxy.contexts.scan()
        return gate

    @defer.inlineCallbacks
    def test_held_at_the_ceiling_and_settled_with_the_reported_cost(self):
        gate = yield self.start()
        response, raw = yield gate.chat({"model": "openrouter/qwen/qwen-2.5-coder-32b-instruct", **hello()},
                                        token=f"coder:{PLAIN_SECRET}")
        body = json.loads(raw)
        self.assertEqual(response.code, 200, body)  # not 403 unpriced_model
        rows = yield gate.committed_rows()
        self.assertEqual((rows[-1]["priced"], rows[-1]["cost_usd"]), (True, body["usage"]["cost"]))
        budget = gate.proxy.governance.budget(gate.proxy.contexts.get("coder"))
        usage = gate.proxy.governance.book.usage("coder", budget)
        self.assertAlmostEqual(usage.cost_usd, body["usage"]["cost"], places=10)
        self.assertEqual(usage.reserved_usd, 0.0)
        self.assertNotIn("_execwall", body)  # not an agent of the gate's file

    @defer.inlineCallbacks
    def test_without_a_reported_cost_it_counts_at_the_ceiling(self):
        gate = yield self.start(report_cost=False)
        response, raw = yield gate.chat({"model": "openrouter/qwen/qwen-2.5-coder-32b-instruct", **hello()},
                                        token=f"coder:{PLAIN_SECRET}")
        body = json.loads(raw)
        self.assertEqual(response.code, 200, body)
        rows = yield gate.committed_rows()
        self.assertEqual((rows[-1]["priced"], rows[-1]["cost_usd"]), (False, 0.0))  # the ledger says it is unpriced
        ceiling = gate.proxy.governance.book.pricing.ceiling
        expected = (body["usage"]["prompt_tokens"] * ceiling.input + body["usage"]["completion_tokens"] * ceiling.output) / 1e6
        budget = gate.proxy.governance.budget(gate.proxy.contexts.get("coder"))
        usage = gate.proxy.governance.book.usage("coder", budget)
        self.assertAlmostEqual(usage.cost_usd, expected, places=10)
        self.assertEqual(usage.unknown_cost_requests, 0)
