"""
Reservations count everything the provider bills, end to end over loopback:
200 concurrent requests of each shape the provider bills beyond the body's
text (C{n: 8}, three C{image_url} parts, Anthropic C{tools}) and of all of
them mixed, against a hard budget that fits five of the most expensive
ones, as an agent, a virtual key and a team.  The fake provider
(L{cllama_tx.testing.billing.BillingModel}) bills the most the real
provider would for each request; what settles stays within the limit.
"""

from __future__ import annotations

import json
import os

import attr
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from cllama_tx.testing.billing import BillingModel
from tests.secret_scan import SCANNER
from tests.support import MASTER_KEY, SECRET, ProxyHarness, write_agent

PRICES = {
    "openai": {"gpt-4o": {"input": 2.5, "output": 10.0, "max_output_tokens": 16_384}},
    "anthropic": {"claude-sonnet-4-5": {"input": 3.0, "output": 15.0, "max_output_tokens": 64_000}},
}
RATES = {"openai": PRICES["openai"]["gpt-4o"], "anthropic": PRICES["anthropic"]["claude-sonnet-4-5"]}

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
TOOLS = [
    {"name": "get_weather", "description": "The weather in a city", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"name": "get_time", "description": "The time in a city", "input_schema": {"type": "object"}},
]
SHAPES = {
    "n8": (CHAT, {"model": "openai/gpt-4o", "n": 8, "max_tokens": 1000,
                  "messages": [{"role": "user", "content": "Tell me a story"}]}),
    "images": (CHAT, {"model": "openai/gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Compare these"},
        *({"type": "image_url", "image_url": {"url": f"https://img.example/{i}.png"}} for i in range(3)),
    ]}]}),
    "tools": (MESSAGES, {"model": "anthropic/claude-sonnet-4-5", "max_tokens": 10, "tools": TOOLS,
                         "messages": [{"role": "user", "content": "Weather in Paris?"}]}),
}
REQUESTS = 200
FITS = 5


def billed_cost(path: str, body: dict) -> float:
    """What the fake provider bills for this request, in dollars."""
    wire = "anthropic" if path == MESSAGES else "openai"
    upstream = dict(body, model=body["model"].split("/", 1)[1])
    prompt, completion = BillingModel().usage(upstream, wire)
    rates = RATES[wire]
    return (prompt * rates["input"] + completion * rates["output"]) / 1e6


class ShapesCase(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        prices = os.path.abspath(self.mktemp())
        with open(prices, "w") as f:
            json.dump(PRICES, f)
        self.h = yield ProxyHarness(self, pricing_file=prices, fake_providers=("openai", "anthropic")).start()

    @defer.inlineCallbacks
    def admin(self, path, doc):
        response = yield self.h.post(path, doc, token=None, headers={"Authorization": [f"Bearer {MASTER_KEY}"]})
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        return body

    @defer.inlineCallbacks
    def burst(self, token, shapes):
        """
        C{REQUESTS} requests at once, cycling through C{shapes}; every reply
        is held until each request was either refused or reached the
        provider, so all of them compete for the budget at the same time.
        Fires with (admitted, refusal bodies).
        """
        gate = defer.Deferred()
        decided = defer.Deferred()
        counts = {"received": 0, "refused": 0}
        billing = BillingModel()

        def check():
            if counts["received"] + counts["refused"] == REQUESTS and not decided.called:
                decided.callback(None)

        def answer(received):
            counts["received"] += 1
            check()
            return attr.evolve(billing.respond(received), hold_until=gate)

        def arrived(response):
            if response.code == 429:
                counts["refused"] += 1
                check()
            return response

        self.h.fake.enqueue(*([answer] * REQUESTS))
        responses = []
        for i in range(REQUESTS):
            path, body = SHAPES[shapes[i % len(shapes)]]
            responses.append(self.h.post(path, body, token=token).addCallback(arrived))
        yield decided
        gate.callback(None)
        done = yield defer.gatherResults(responses)
        bodies = []
        for response in done:
            doc = yield response.json()
            if response.code == 429:
                bodies.append(doc)
            else:
                self.assertEqual(response.code, 200, doc)
        self.assertEqual(counts["received"], REQUESTS - len(bodies))
        return counts["received"], bodies

    @defer.inlineCallbacks
    def spent(self, column, value):
        yield self.h.committed()
        rows = yield self.h.ledger_rows()
        mine = [r for r in rows if r[column] == value and r["status"] == 200]
        return sum(r["cost_usd"] for r in mine), mine

    @defer.inlineCallbacks
    def assertHolds(self, shapes, principal):
        worst = max(billed_cost(*SHAPES[s]) for s in shapes)
        limit = worst * FITS
        token, column, value = yield principal(limit)
        admitted, refusals = yield self.burst(token, shapes)
        spend, rows = yield self.spent(column, value)
        self.assertEqual(len(rows), admitted)
        # Every admitted request was billed the most its shape can cost ...
        costs = {round(billed_cost(*SHAPES[s]), 12) for s in shapes}
        for row in rows:
            self.assertIn(round(row["cost_usd"], 12), costs)
        # ... and what settled stays within the limit, the budget well used.
        self.assertLessEqual(spend, limit * (1 + 1e-9))
        cheapest = min(billed_cost(*SHAPES[s]) for s in shapes)
        self.assertTrue(1 <= admitted <= limit // cheapest, admitted)
        self.assertGreater(spend, limit / 2)
        # A key's refusals are LiteLLM's: while requests in flight hold the room, a 429 to retry.
        expected = "budget_exceeded" if principal == self.agent else "rate_limit_error"
        for body in refusals:
            self.assertEqual(body["error"]["type"], expected)
            self.assertEqual(body["budget"]["behavior"], "hard_stop")
        return admitted, spend / limit

    # principals

    def agent(self, limit):
        name = "shapes"
        write_agent(self.h.context_root, name, SECRET, budget={"limit_usd": limit, "window": "1h", "behavior": "hard_stop"})
        return defer.succeed((f"{name}:{SECRET}", "agent", name))

    @defer.inlineCallbacks
    def key(self, limit):
        body = yield self.admin("/key/generate", {"max_budget": limit})
        SCANNER.register(body["key"])
        return body["key"], "key_id", body["token"]

    @defer.inlineCallbacks
    def team(self, limit):
        yield self.admin("/team/new", {"team_id": "org-shapes", "max_budget": limit})
        body = yield self.admin("/key/generate", {"team_id": "org-shapes", "max_budget": limit * 100})
        SCANNER.register(body["key"])
        return body["key"], "team_id", "org-shapes"


class AgentShapeTests(ShapesCase):
    def test_n_8(self):
        return self.assertHolds(["n8"], self.agent)

    def test_three_image_urls(self):
        return self.assertHolds(["images"], self.agent)

    def test_anthropic_tools(self):
        return self.assertHolds(["tools"], self.agent)

    def test_mixed(self):
        return self.assertHolds(["n8", "images", "tools"], self.agent)


class KeyShapeTests(ShapesCase):
    def test_mixed_on_a_virtual_key(self):
        return self.assertHolds(["n8", "images", "tools"], self.key)

    def test_mixed_on_a_team(self):
        return self.assertHolds(["n8", "images", "tools"], self.team)


class BillingModelTests(TestCase):
    """The fake bills as documented: the numbers the shapes above rely on."""

    def test_usage(self):
        model = BillingModel()
        prompt, completion = model.usage({"n": 8, "max_tokens": 1000, "messages": [
            {"role": "user", "content": "Tell me a story"}]}, "openai")
        self.assertEqual((prompt, completion), (len("Tell me a story") + 4, 8000))
        _, body = SHAPES["images"]
        prompt, completion = model.usage(body, "openai")
        self.assertEqual((prompt, completion), (len("Compare these") + 4 + 3 * (85 + 8 * 170), 100))
        _, body = SHAPES["tools"]
        prompt, completion = model.usage(body, "anthropic")
        tools = len(json.dumps(TOOLS, separators=(",", ":")))
        self.assertEqual((prompt, completion), (len("Weather in Paris?") + 4 + tools + 346, 10))
        prompt, _ = model.usage(dict(body, tool_choice={"type": "any"}), "anthropic")
        self.assertEqual(prompt, len("Weather in Paris?") + 4 + tools + 313)


class RateLimitShapeTests(ShapesCase):
    """The tokens-per-minute estimate counts every candidate's output, as the budget does."""

    @defer.inlineCallbacks
    def test_n_counts_against_tpm(self):
        write_agent(self.h.context_root, "tpm", SECRET, rate_limits={"tpm": 5000})
        body = {"model": "openai/gpt-4o", "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]}
        self.h.fake.enqueue(BillingModel().respond)
        one = yield self.h.chat(body, token=f"tpm:{SECRET}")
        self.assertEqual(one.code, 200, (yield one.json()))
        eight = yield self.h.chat(dict(body, n=8), token=f"tpm:{SECRET}")
        self.assertEqual(eight.code, 429)
        error = (yield eight.json())["error"]
        self.assertEqual(error["code"], "rate_limited")
        self.assertIn("too large", error["message"])
        self.assertEqual(len(self.h.fake.received), 1)
