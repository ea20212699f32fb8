"""
Tests for the admission of L{cllama_tx.governance.engine.Governance} when a
budget cannot pay for a request as sent: its output is lowered to what the
tightest budget pays for (audited), or it is refused with what is left and
what its prompt alone costs; in-flight requests, C{rate_limit} and
C{soft_alert} budgets keep their behaviour; what is held never exceeds the
limit, however many requests come.
"""

from __future__ import annotations

import json

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting.pricing import Price
from cllama_tx.governance.budgets import BudgetBook
from cllama_tx.governance.engine import Governance
from cllama_tx.governance.ratelimit import RateLimiter
from cllama_tx.governance.request_cost import read_request
from cllama_tx.surfaces.errors import ProxyError
from cllama_tx.surfaces.matrix import ANTHROPIC_MESSAGES, OPENAI_CHAT

OPUS_IN, OPUS_OUT = 15.0, 75.0


class FakePricing:
    table = {
        ("anthropic", "claude-opus-test"): Price(input=OPUS_IN, output=OPUS_OUT, max_output_tokens=32_000),
        ("anthropic", "claude-sonnet-test"): Price(input=3.0, output=15.0, max_output_tokens=64_000),
        ("openai", "gpt-test"): Price(input=2.0, output=8.0, max_output_tokens=16_000),
    }

    def price(self, provider, model):
        return self.table.get((provider, model))


@attrs.frozen
class Surface:
    name: str
    api_format: str
    billable: bool = True


@attrs.define
class Ex:
    surface: Surface
    body_size: int
    request_id: str = "r1"


@attrs.frozen
class Agent:
    agent_id: str
    budget: dict | None
    model_policy: dict | None = None
    timezone: str | None = None
    metadata: dict = attrs.Factory(dict)


@attrs.frozen
class Key:
    """A principal with two budget scopes, as a virtual key and its team."""

    agent_id: str
    scopes: tuple
    model_policy = None
    timezone = None
    budget = None
    metadata: dict = attrs.Factory(dict)
    spending_denied = False

    def allows_model(self, ref):
        return True

    def budget_scopes(self):
        return list(self.scopes)


MESSAGES = Surface(ANTHROPIC_MESSAGES, "anthropic")
CHAT = Surface(OPENAI_CHAT, "openai")
PROMPT = "x" * 2_000


def claude_code(max_tokens=32_000, **extra):
    doc = {"model": "anthropic/claude-opus-test", "messages": [{"role": "user", "content": PROMPT}], **extra}
    if max_tokens is not None:
        doc["max_tokens"] = max_tokens
    return doc


def hard(limit, **extra):
    return {"limit_usd": limit, "window": "1h", "behavior": "hard_stop", **extra}


class LoweringTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.book = BudgetBook(self.clock, FakePricing())
        self.interventions = []
        self.governance = self.make()

    def make(self, **kwargs):
        return Governance(
            clock=self.clock, book=self.book, limiter=RateLimiter(self.clock),
            intervention=lambda ex, name, **details: self.interventions.append((name, details)), **kwargs,
        )

    def admit(self, context, doc, surface=MESSAGES, governance=None):
        size = len(json.dumps(doc))
        return (governance or self.governance).admit(Ex(surface, size), context, doc)

    def spent(self, scope, usd):
        self.book.load(scope, [(self.clock.seconds(), usd, True)])

    def worst_at(self, doc, max_tokens):
        size = len(json.dumps(doc))
        shape = read_request(doc, size)
        return (shape.text_bytes * OPUS_IN + max_tokens * OPUS_OUT) / 1e6, shape

    def test_lowered_to_what_is_left(self) -> None:
        """The issue's key: $1, $0.05 spent, 32,000 tokens of Opus: lowered, not refused."""
        agent = Agent("cc", hard(1.0))
        self.spent("cc", 0.05)
        doc = claude_code()
        admission = self.admit(agent, doc)
        limit = admission.output_limit
        size = len(json.dumps(doc))
        expected = int((0.95 * 1e6 - size * OPUS_IN) // OPUS_OUT)
        self.assertEqual((limit.from_max_tokens, limit.max_tokens), (32_000, expected))
        held = admission.reservation.worst_case_usd
        self.assertLessEqual(held, 0.95)
        self.assertAlmostEqual(held, (size * OPUS_IN + expected * OPUS_OUT) / 1e6)
        self.assertEqual(
            self.interventions,
            [("max_tokens_lowered", {"from_max_tokens": 32_000, "to_max_tokens": expected,
                                     "remaining_usd": 0.95, "reserved_usd": round(held, 10)})],
        )

    def test_fits_as_sent(self) -> None:
        agent = Agent("cc", hard(100.0))
        admission = self.admit(agent, claude_code())
        self.assertIsNone(admission.output_limit)
        self.assertEqual(self.interventions, [])

    def test_no_max_tokens(self) -> None:
        """Without max_tokens the model's limit is reserved; lowered by the same rule."""
        agent = Agent("cc", hard(1.0))
        self.spent("cc", 0.05)
        admission = self.admit(agent, claude_code(max_tokens=None))
        self.assertEqual(admission.output_limit.from_max_tokens, None)
        self.assertLess(admission.output_limit.max_tokens, 32_000)
        self.assertLessEqual(admission.reservation.worst_case_usd, 0.95)
        self.assertEqual(self.interventions[0][1]["from_max_tokens"], None)

    def test_refused_when_even_the_floor_does_not_fit(self) -> None:
        agent = Agent("cc", hard(1.0))
        self.spent("cc", 0.99)
        doc = claude_code()
        with self.assertRaises(ProxyError) as caught:
            self.admit(agent, doc)
        error = caught.exception
        size = len(json.dumps(doc))
        self.assertEqual((error.status, error.code), (429, "budget_exceeded"))
        self.assertEqual(
            error.message, f"budget exceeded: $0.01 left, this request's input alone costs about ${size * 15 / 1e6:.2f}"
        )
        budget = error.extra["budget"]
        self.assertAlmostEqual(budget["remaining_usd"], 0.01)
        self.assertAlmostEqual(budget["input_cost_usd"], size * OPUS_IN / 1e6)
        # The least it could be admitted at: its output at the floor.
        self.assertAlmostEqual(budget["min_request_cost_usd"], (size * OPUS_IN + 256 * OPUS_OUT) / 1e6)
        self.assertEqual((budget["limit_usd"], budget["reported_cost_usd"]), (1.0, 0.99))
        self.assertEqual(error.retry_after, 3600)  # when the $0.99 leaves the window
        # Nothing lowered: the refusal's own line only, as the reference names it.
        self.assertEqual(self.interventions, [("budget_exceeded", {
            "status_code": 429, "retry_after": 3600, "behavior": "hard_stop", "window": "1h", "limit_usd": 1.0})])
        self.assertEqual(self.book.usage("cc", self.governance.budget(agent)).reserved_usd, 0.0)

    def test_retry_after_is_for_the_floor(self) -> None:
        """Refused at the floor: Retry-After is when the floor fits, not the whole request."""
        agent = Agent("cc", hard(1.0))
        self.spent("cc", 0.6)
        self.clock.advance(600)
        self.spent("cc", 0.39)
        with self.assertRaises(ProxyError) as caught:
            self.admit(agent, claude_code())
        # The first $0.60 leaves at 3,000 s from now; the floor fits then.
        self.assertEqual(caught.exception.retry_after, 3_000)

    def test_small_request_not_lowered(self) -> None:
        """max_tokens at or under the floor: refused as it is, with the reasons."""
        agent = Agent("cc", hard(1.0))
        self.spent("cc", 0.995)
        with self.assertRaises(ProxyError) as caught:
            self.admit(agent, claude_code(max_tokens=200))
        self.assertIn("budget exceeded: $0.0050 left", caught.exception.message)

    def test_switched_off(self) -> None:
        agent = Agent("cc", hard(1.0))
        self.spent("cc", 0.05)
        with self.assertRaises(ProxyError) as caught:
            self.admit(agent, claude_code(), governance=self.make(min_output_tokens=0))
        self.assertTrue(caught.exception.message.startswith("budget exceeded: $0.95 left"))

    def test_configured_floor(self) -> None:
        agent = Agent("cc", hard(1.0))
        self.spent("cc", 0.05)
        doc = claude_code()
        fits, _ = self.worst_at(doc, 5_000)
        self.spent("cc", 0.95 - fits)  # exactly 5,000 tokens left
        self.assertEqual(self.admit(agent, doc, governance=self.make(min_output_tokens=5_000)).output_limit.max_tokens, 5_000)
        self.spent("cc", 0.0001)
        with self.assertRaises(ProxyError):
            self.admit(agent, doc, governance=self.make(min_output_tokens=5_000))

    def test_in_flight_requests_in_the_way(self) -> None:
        """When the request fits once requests in flight finish, it waits a second for its whole answer."""
        agent = Agent("cc", hard(1.0))
        doc = claude_code(max_tokens=8_000)
        first = self.admit(agent, doc)
        self.assertIsNone(first.output_limit)
        with self.assertRaises(ProxyError) as caught:
            self.admit(agent, doc)
        self.assertEqual((caught.exception.code, caught.exception.retry_after), ("budget_exceeded", 1))
        self.assertEqual([name for name, _details in self.interventions], ["budget_exceeded"])  # nothing lowered

    def test_lowered_below_what_is_in_flight(self) -> None:
        """A request the budget cannot pay in full is lowered to what is left now, requests in flight counted."""
        agent = Agent("cc", hard(1.0))
        small = self.admit(agent, claude_code(max_tokens=4_000))
        admission = self.admit(agent, claude_code())
        held = small.reservation.worst_case_usd + admission.reservation.worst_case_usd
        self.assertLessEqual(held, 1.0)
        self.assertGreater(held, 0.999)

    def test_tightest_scope(self) -> None:
        """A key and its team: lowered to what the tighter of the two pays for."""
        key = Key("k", (("key:k", hard(5.0)), ("team:t", hard(0.6))))
        admission = self.admit(key, claude_code())
        self.assertEqual(admission.output_limit.available_usd, 0.6)
        for held in admission.reservations:
            self.assertLessEqual(held.worst_case_usd, 0.6)
        key = Key("k2", (("key:k2", hard(0.4)), ("team:t2", hard(5.0))))
        self.assertEqual(self.admit(key, claude_code()).output_limit.available_usd, 0.4)

    def test_dearest_candidate(self) -> None:
        """With a failover chain the limit fits the dearest candidate."""
        agent = Agent("cc", hard(0.5), model_policy={"allowed": [
            {"slot": "primary", "ref": "anthropic/claude-sonnet-test"},
            {"slot": "fallback", "ref": "anthropic/claude-opus-test"},
        ]})
        doc = claude_code(model="anthropic/claude-sonnet-test")
        admission = self.admit(agent, doc)
        self.assertEqual([str(r) for r in admission.candidates],
                         ["anthropic/claude-sonnet-test", "anthropic/claude-opus-test"])
        expected = int((0.5 * 1e6 - len(json.dumps(doc)) * OPUS_IN) // OPUS_OUT)
        self.assertEqual(admission.output_limit.max_tokens, expected)

    def test_n_candidates(self) -> None:
        agent = Agent("chat", hard(0.05))
        doc = {"model": "openai/gpt-test", "n": 4, "max_tokens": 16_000, "messages": [{"role": "user", "content": "hi"}]}
        admission = self.admit(agent, doc, surface=CHAT)
        size = len(json.dumps(doc))
        self.assertEqual(admission.output_limit.max_tokens, int((0.05 * 1e6 - size * 2) // (4 * 8)))
        self.assertLessEqual(admission.reservation.worst_case_usd, 0.05)

    def test_thinking(self) -> None:
        agent = Agent("cc", hard(1.0))
        self.spent("cc", 0.05)
        admission = self.admit(agent, claude_code(thinking={"type": "enabled", "budget_tokens": 31_000}))
        limit = admission.output_limit
        self.assertEqual(limit.thinking_budget, limit.max_tokens - 256)
        self.assertEqual(self.interventions[0][1]["from_thinking_budget"], 31_000)
        self.assertEqual(self.interventions[0][1]["to_thinking_budget"], limit.max_tokens - 256)

    def test_rate_limit_unchanged(self) -> None:
        """rate_limit budgets pace: refused until the whole request fits, never lowered."""
        agent = Agent("cc", {"limit_usd": 1.0, "window": "1h", "behavior": "rate_limit"})
        self.spent("cc", 0.05)
        with self.assertRaises(ProxyError) as caught:
            self.admit(agent, claude_code())
        self.assertEqual((caught.exception.code, caught.exception.message), ("rate_limited", "request rate limit exceeded"))

    def test_soft_alert_unchanged(self) -> None:
        agent = Agent("cc", {"limit_usd": 1.0, "window": "1h", "behavior": "soft_alert"})
        self.spent("cc", 0.05)
        admission = self.admit(agent, claude_code())
        self.assertIsNone(admission.output_limit)
        self.assertGreater(admission.reservation.worst_case_usd, 1.0)

    def test_many_requests_never_hold_more_than_the_limit(self) -> None:
        """200 requests, none finished: what is held stays within what is left."""
        agent = Agent("cc", hard(1.0))
        self.spent("cc", 0.05)
        admitted = []
        for i in range(200):
            try:
                admitted.append(self.admit(agent, claude_code(max_tokens=(i % 5 + 1) * 8_000)))
            except ProxyError as e:
                self.assertEqual(e.code, "budget_exceeded")
        held = sum(a.reservation.worst_case_usd for a in admitted)
        self.assertLessEqual(held, 0.95 + 1e-9)
        self.assertGreater(held, 0.9)
        self.assertTrue(any(a.output_limit is not None for a in admitted))
