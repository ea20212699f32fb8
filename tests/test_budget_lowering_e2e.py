"""
Budgets that refuse only when they must, end to end over loopback: a
virtual key with $1 and $0.05 spent sends a Claude Code request
(C{max_tokens} 32,000, streamed, tools, a long system prompt) to a priced
Anthropic model.  The proxy lowers C{max_tokens} to what is left (the
upstream receives it; a header and an audit line say so) and what settles
stays within the limit; a request without C{max_tokens} gets one, through
the translation bridges too; a request whose floor does not fit is refused
with what is left and what its prompt alone costs; 200 at once still settle
within the limit.  The fake provider (L{BillingModel}) bills every answer
to its C{max_tokens}, as the most expensive real answer would be.
"""

from __future__ import annotations

import json
import os

import attr
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from cllama_tx.testing import parse_sse
from cllama_tx.testing.billing import BillingModel
from tests.secret_scan import SCANNER
from tests.support import MASTER_KEY, ProxyHarness

PRICES = {
    "anthropic": {
        "claude-opus-4-1": {"input": 15.0, "output": 75.0, "max_output_tokens": 32_000},
        # $1 a million output tokens, input free: a request spends max_tokens / 1e6 dollars.
        "claude-spend": {"input": 0.0, "output": 1.0},
    },
    "openai": {
        "gpt-dear": {"input": 10.0, "output": 60.0, "max_output_tokens": 100_000},
    },
}
OUT = 75.0 / 1e6
MESSAGES = "/v1/messages"
CHAT = "/v1/chat/completions"
LOWERED = "x-cllama-max-tokens-lowered"

TOOLS = [
    {"name": name, "description": f"{name}: " + "Performs the operation described. " * 20, "input_schema": {
        "type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
        "required": ["path"]}}
    for name in ("Read", "Write", "Edit", "Bash", "Glob", "Grep", "LS", "WebFetch", "TodoWrite", "Task")
]


def claude_code(**extra):
    """A request shaped as Claude Code sends it (bare dated model, system blocks, tools, stream)."""
    doc = {
        "model": "claude-opus-4-1-20250805",
        "max_tokens": 32_000,
        "stream": True,
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
            {"type": "text", "text": "Follow the repository's conventions. " * 400},
        ],
        "tools": TOOLS,
        "metadata": {"user_id": "user_abc_account_def_session_ghi"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Fix the failing test in tests/test_x.py"}]}],
    }
    doc.update(extra)
    return doc


def header(response, name):
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


class LoweringCase(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        prices = os.path.abspath(self.mktemp())
        with open(prices, "w") as f:
            json.dump(PRICES, f)
        self.h = yield ProxyHarness(self, pricing_file=prices, fake_providers=("openai", "anthropic")).start()
        self.billing = BillingModel()

    @defer.inlineCallbacks
    def key(self, limit=1.0, spent=0.05):
        """A virtual key with C{limit} dollars, C{spent} of them already spent through the proxy."""
        response = yield self.h.post(
            "/key/generate", {"max_budget": limit}, token=None, headers={"Authorization": [f"Bearer {MASTER_KEY}"]}
        )
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        SCANNER.register(body["key"])
        self.token_hash = body["token"]
        self.h.fake.enqueue(self.billing.respond)
        spend = yield self.h.post(MESSAGES, {
            "model": "anthropic/claude-spend", "max_tokens": round(spent * 1e6),
            "messages": [{"role": "user", "content": "hi"}],
        }, token=body["key"])
        self.assertEqual(spend.code, 200, (yield spend.text()))
        yield spend.content()
        self.assertAlmostEqual((yield self.key_spend()), spent, places=12)
        return body["key"]

    @defer.inlineCallbacks
    def key_spend(self, status=200):
        yield self.h.committed()
        rows = yield self.h.ledger_rows()
        return sum(r["cost_usd"] for r in rows if r["key_id"] == self.token_hash)

    def intervention(self, response, name):
        request_id = header(response, "x-cllama-request-id")
        lines = [
            line for line in self.h.audit_lines()
            if line["type"] == "intervention" and line["intervention"] == name and line["request_id"] == request_id
        ]
        self.assertEqual(len(lines), 1, lines)
        return lines[0]


class LoweredTests(LoweringCase):
    @defer.inlineCallbacks
    def test_claude_code_on_a_small_key(self):
        """$1 key, $0.05 spent, max_tokens 32,000 of Opus: answered, lowered to what $0.95 pays for."""
        key = yield self.key()
        self.h.fake.enqueue(self.billing.respond)
        response = yield self.h.post(MESSAGES, claude_code(), token=key)
        body = yield response.content()
        self.assertEqual(response.code, 200, body)
        events = [json.loads(data)["type"] for _, data in parse_sse(body)]
        self.assertEqual((events[0], events[-1]), ("message_start", "message_stop"))
        sent = self.h.fake.received[-1].json
        lowered = sent["max_tokens"]
        self.assertEqual(header(response, LOWERED), str(lowered))
        self.assertTrue(1_000 < lowered < 32_000, lowered)
        self.assertEqual(sent["model"], "claude-opus-4-1-20250805")
        # Audited: from what was asked to what was sent, the room and what is held.
        line = self.intervention(response, "max_tokens_lowered")
        self.assertEqual((line["from_max_tokens"], line["to_max_tokens"]), (32_000, lowered))
        self.assertAlmostEqual(line["remaining_usd"], 0.95, places=9)
        self.assertLessEqual(line["reserved_usd"], 0.95)
        # Lowered no more than needed: one token more would not have fitted.
        self.assertGreater(line["reserved_usd"] + OUT, 0.95)
        # What settled is within what was left, the whole key within its limit.
        rows = [r for r in (yield self.h.ledger_rows()) if r["request_id"] == line["request_id"]]
        self.assertEqual(len(rows), 1)
        self.assertEqual(rows[0]["output_tokens"], lowered)
        self.assertLessEqual(rows[0]["cost_usd"], 0.95)
        self.assertLessEqual((yield self.key_spend()), 1.0)

    @defer.inlineCallbacks
    def test_thinking_budget_lowered_with_it(self):
        """Claude Code's thinking (budget 31,999 of 32,000): the answer keeps the floor, thinking gives way."""
        key = yield self.key()
        self.h.fake.enqueue(self.billing.respond)
        response = yield self.h.post(
            MESSAGES, claude_code(thinking={"type": "enabled", "budget_tokens": 31_999}), token=key
        )
        self.assertEqual(response.code, 200, (yield response.text()))
        sent = self.h.fake.received[-1].json
        self.assertEqual(sent["thinking"], {"type": "enabled", "budget_tokens": sent["max_tokens"] - 256})
        line = self.intervention(response, "max_tokens_lowered")
        self.assertEqual(
            (line["from_thinking_budget"], line["to_thinking_budget"], line["to_max_tokens"]),
            (31_999, sent["max_tokens"] - 256, sent["max_tokens"]),
        )

    @defer.inlineCallbacks
    def test_without_max_tokens(self):
        """No max_tokens: the model's limit does not fit, so the request gets the limit that does (OpenAI's field)."""
        key = yield self.key()
        self.h.fake.enqueue(self.billing.respond)
        response = yield self.h.post(
            CHAT, {"model": "openai/gpt-dear", "messages": [{"role": "user", "content": "Write a long essay"}]}, token=key
        )
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        sent = self.h.fake.received[-1].json
        self.assertNotIn("max_tokens", sent)
        lowered = sent["max_completion_tokens"]
        self.assertEqual(header(response, LOWERED), str(lowered))
        self.assertEqual(body["usage"]["completion_tokens"], lowered)
        line = self.intervention(response, "max_tokens_lowered")
        self.assertEqual((line["from_max_tokens"], line["to_max_tokens"]), (None, lowered))
        self.assertLessEqual(float(header(response, "x-cllama-cost-usd")), 0.95)
        self.assertLessEqual((yield self.key_spend()), 1.0)

    @defer.inlineCallbacks
    def test_through_the_bridge(self):
        """A Messages request served by an OpenAI-format model: the lowered limit in the translated body."""
        key = yield self.key()
        self.h.fake.enqueue(self.billing.respond)
        response = yield self.h.post(MESSAGES, {
            "model": "openai/gpt-dear", "max_tokens": 32_000, "messages": [{"role": "user", "content": "Essay"}],
        }, token=key)
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body["type"], "message")
        received = self.h.fake.received[-1]
        self.assertTrue(received.path.endswith("/chat/completions"), received.path)
        lowered = received.json["max_completion_tokens"]
        self.assertTrue(256 <= lowered < 32_000, lowered)
        self.assertEqual(header(response, LOWERED), str(lowered))
        self.assertEqual(body["usage"]["output_tokens"], lowered)
        self.assertLessEqual((yield self.key_spend()), 1.0)

    @defer.inlineCallbacks
    def test_fits_as_sent(self):
        """A request the budget pays in full goes as it was, with no header and no intervention."""
        key = yield self.key(limit=10.0)
        self.h.fake.enqueue(self.billing.respond)
        response = yield self.h.post(MESSAGES, claude_code(stream=False), token=key)
        self.assertEqual(response.code, 200, (yield response.text()))
        self.assertEqual(self.h.fake.received[-1].json["max_tokens"], 32_000)
        self.assertIsNone(header(response, LOWERED))
        self.assertEqual([line for line in self.h.audit_lines() if line.get("intervention") == "max_tokens_lowered"], [])


class RefusedTests(LoweringCase):
    @defer.inlineCallbacks
    def test_floor_does_not_fit(self):
        """$0.0001 left: not even 256 tokens of answer. 422 (a key's: LiteLLM's), what is left and what the prompt costs."""
        key = yield self.key(spent=0.9999)
        before = len(self.h.fake.received)
        doc = claude_code()
        response = yield self.h.post(MESSAGES, doc, token=key)
        body = yield response.json()
        self.assertEqual(response.code, 422, body)
        self.assertEqual(len(self.h.fake.received), before)
        budget = body["budget"]
        self.assertEqual(set(body), {"type", "error", "budget"})
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"]["type"], "budget_exceeded")
        self.assertRegex(
            body["error"]["message"],
            r"^Budget has been exceeded! Key=sk-\.\.\..{4} Current cost: 0\.9999, Max budget: 1 "
            rf"\(\$0\.0001 left, this request's input alone costs about \${budget['input_cost_usd']:.2f}\)$",
        )
        self.assertAlmostEqual(budget["remaining_usd"], 0.0001, places=9)
        # The prompt is held at its bytes and Opus's $15 a million: at least the body's size.
        self.assertGreaterEqual(budget["input_cost_usd"], len(json.dumps(doc)) * 15 / 1e6)
        self.assertAlmostEqual(budget["min_request_cost_usd"], budget["input_cost_usd"] + 256 * OUT, places=9)
        self.assertEqual((budget["behavior"], budget["limit_usd"]), ("hard_stop", 1.0))
        self.assertAlmostEqual(budget["reported_cost_usd"], 0.9999, places=9)
        self.assertIsNotNone(header(response, "retry-after"))
        errors = [line for line in self.h.audit_lines() if line["type"] == "error" and line["request_id"] == header(response, "x-cllama-request-id")]
        self.assertEqual([line["status_code"] for line in errors], [422])
        self.assertAlmostEqual((yield self.key_spend()), 0.9999, places=12)

    @defer.inlineCallbacks
    def test_openai_shape(self):
        key = yield self.key(spent=0.9999)
        response = yield self.h.post(CHAT, {"model": "openai/gpt-dear", "messages": [{"role": "user", "content": "hi"}]}, token=key)
        body = yield response.json()
        self.assertEqual(response.code, 422, body)
        self.assertEqual(set(body["error"]), {"message", "type", "param", "code"})
        self.assertEqual((body["error"]["type"], body["error"]["code"]), ("budget_exceeded", "422"))
        self.assertIn("($0.0001 left, this request's input alone costs about $0.00", body["error"]["message"])
        self.assertIn("remaining_usd", body["budget"])


class ConcurrentTests(LoweringCase):
    REQUESTS = 200

    @defer.inlineCallbacks
    def test_200_at_once_settle_within_the_limit(self):
        """200 requests at once, Claude Code's and small ones: what settles stays within $1."""
        key = yield self.key()
        gate = defer.Deferred()
        decided = defer.Deferred()
        counts = {"received": 0, "refused": 0}

        def check():
            if counts["received"] + counts["refused"] == self.REQUESTS and not decided.called:
                decided.callback(None)

        def answer(received):
            counts["received"] += 1
            check()
            return attr.evolve(self.billing.respond(received), hold_until=gate)

        def arrived(response):
            if response.code == 429:
                counts["refused"] += 1
                check()
            return response

        self.h.fake.enqueue(*([answer] * self.REQUESTS))
        small = {"model": "claude-opus-4-1", "max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]}
        before = len(self.h.fake.received)
        responses = [
            self.h.post(MESSAGES, claude_code(stream=False) if i % 2 else small, token=key).addCallback(arrived)
            for i in range(self.REQUESTS)
        ]
        yield decided
        gate.callback(None)
        done = yield defer.gatherResults(responses)
        lowered_headers = []
        for response in done:
            body = yield response.json()
            if response.code == 429:
                # A key's refusal while requests in flight hold the room: LiteLLM's retry.
                self.assertEqual(body["error"]["type"], "rate_limit_error")
                self.assertIn("held by requests in flight", body["error"]["message"], body)
            else:
                self.assertEqual(response.code, 200, body)
                if header(response, LOWERED) is not None:
                    lowered_headers.append(int(header(response, LOWERED)))
                    self.assertEqual(body["usage"]["output_tokens"], lowered_headers[-1])
        sent = [r.json for r in self.h.fake.received[before:]]
        self.assertEqual(len(sent), counts["received"])
        lowered_sent = sorted(d["max_tokens"] for d in sent if "tools" in d and d["max_tokens"] < 32_000)
        self.assertEqual(lowered_sent, sorted(lowered_headers))
        self.assertGreaterEqual(len(lowered_sent), 1)
        spend = yield self.key_spend()
        self.assertLessEqual(spend, 1.0 + 1e-9)
        self.assertGreater(spend, 0.5)
