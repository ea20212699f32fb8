"""
Tests for what the request path keeps between requests in governance
(issue 21): what is kept answers exactly as what it replaces, and a new
context or policy applies at once.
"""

from __future__ import annotations

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting.pricing import Price
from cllama_tx.governance.billing_rules import rules_for
from cllama_tx.governance.budgets import BudgetBook, parse_budget
from cllama_tx.governance.engine import Governance, RateLimits
from cllama_tx.governance.policy import decide, parse_policy
from cllama_tx.governance.ratelimit import RateLimiter
from cllama_tx.governance.request_cost import RequestShape, read_request, worst_input_tokens
from cllama_tx.surfaces.errors import ProxyError
from cllama_tx.surfaces.matrix import OPENAI_CHAT, ModelRef


class FakePricing:
    def price(self, provider, model):
        return Price(input=2.0, output=8.0, max_output_tokens=1000) if model == "gpt-test" else None


@attrs.frozen
class Surface:
    name: str = OPENAI_CHAT
    api_format: str = "openai"
    billable: bool = True


@attrs.define
class Ex:
    surface: Surface = Surface()
    body_size: int = 100
    request_id: str = "r1"


@attrs.frozen
class Agent:
    agent_id: str
    metadata: dict
    budget: dict | None = None
    model_policy: dict | None = None
    timezone: str | None = None


DOC = {"model": "openai/gpt-test", "messages": [{"role": "user", "content": "hi"}]}


class CommittedTests(SynchronousTestCase):
    def test_committed_usd_is_usage_cost(self) -> None:
        """What the budget headers are told is left is computed from the same spend as a usage report."""
        clock = Clock()
        clock.advance(1_000_000)
        book = BudgetBook(clock, FakePricing())
        budget = parse_budget({"limit_usd": 10, "window": "1h", "spent_offset_usd": 0.25})
        self.assertEqual(book.committed_usd("a", budget), book.usage("a", budget).cost_usd)
        held = book.reserve("a", budget, 0.5)
        book.settle(held, 0.123456789012)
        clock.advance(30)
        book.settle(book.reserve("a", budget, 0.5), 1 / 3)
        self.assertEqual(book.committed_usd("a", budget), book.usage("a", budget).cost_usd)
        self.assertAlmostEqual(book.committed_usd("a", budget), 0.25 + 0.123456789012 + 1 / 3, places=9)
        clock.advance(3600)  # the window has passed: nothing counts
        self.assertEqual(book.committed_usd("a", budget), 0.0)
        self.assertEqual(book.usage("a", budget).cost_usd, 0.0)

    def test_a_changed_budget_changes_the_bucket_size(self) -> None:
        """The timeline's bucket size is worked out again when the budget object changes."""
        clock = Clock()
        book = BudgetBook(clock, FakePricing())
        short = parse_budget({"limit_usd": 10, "window": "1m"})
        long = parse_budget({"limit_usd": 10, "window": "30d"})
        book.settle(book.reserve("a", short, 0.1), 0.1)
        fine = book._states["a"].timeline.quantum
        book.settle(book.reserve("a", long, 0.1), 0.1)
        self.assertGreater(book._states["a"].timeline.quantum, fine)
        self.assertAlmostEqual(book.committed_usd("a", long), 0.2)


class WorstInputTests(SynchronousTestCase):
    def test_text_only_is_its_bytes_for_every_model(self) -> None:
        """The shortcut for a text-only request gives what the model's rules give."""
        shape = read_request(DOC, 1234)
        for provider, model in (("openai", "gpt-4o"), ("anthropic", "claude-opus-4"), ("google", "gemini-2.5-pro"),
                                ("openrouter", "anthropic/claude-sonnet-4.5"), ("ollama", "llama3")):
            self.assertEqual(worst_input_tokens(shape, provider, model), 1234)
            self.assertEqual(worst_input_tokens(shape, provider, model, rules_for(provider, model)), 1234)
        self.assertEqual(worst_input_tokens(RequestShape(text_bytes=0), "openai", "gpt-4o"), 1)

    def test_media_or_tools_still_go_by_the_rules(self) -> None:
        text = RequestShape(text_bytes=500)
        for shape in (RequestShape(text_bytes=500, images=1), RequestShape(text_bytes=500, tools=2),
                      RequestShape(text_bytes=500, opaque_inputs=1), RequestShape(text_bytes=500, documents=1),
                      RequestShape(text_bytes=500, builtin_tools=("web_search",))):
            self.assertGreater(worst_input_tokens(shape, "anthropic", "claude-opus-4"),
                               worst_input_tokens(text, "anthropic", "claude-opus-4"), shape)


class PolicyDecisionTests(SynchronousTestCase):
    RAW = {"mode": "clamp", "allowed": [
        {"slot": "primary", "ref": "openai/gpt-4o-mini"}, {"slot": "fallback", "ref": "openai/gpt-4o"}]}

    def test_kept_decisions_are_those_made(self) -> None:
        policy = parse_policy(self.RAW)
        first = decide(policy, "openai/gpt-4o")
        self.assertIs(decide(policy, "openai/gpt-4o"), first)
        self.assertEqual(first.candidates, (ModelRef("openai", "gpt-4o"), ModelRef("openai", "gpt-4o-mini")))
        self.assertIsNone(first.intervention)
        clamped = decide(policy, "openai/gpt-5")
        self.assertEqual((clamped.ref, clamped.intervention), (ModelRef("openai", "gpt-4o-mini"), "disallowed_clamped"))
        self.assertEqual(decide(policy, "gpt-4o").intervention, "bare_model_normalized")

    def test_a_new_policy_decides_anew(self) -> None:
        """Policies equal by value still decide for themselves (kept per policy object)."""
        one = parse_policy(self.RAW)
        reordered = parse_policy({"mode": "clamp", "allowed": [
            {"slot": "primary", "ref": "openai/gpt-4o"}, {"slot": "fallback", "ref": "openai/gpt-4o-mini"}]})
        self.assertEqual(decide(one, "openai/gpt-4o").candidates[1:], (ModelRef("openai", "gpt-4o-mini"),))
        self.assertEqual(decide(reordered, "openai/gpt-5").ref, ModelRef("openai", "gpt-4o"))
        self.assertEqual(parse_policy(self.RAW), one)  # the kept decisions are not part of its value


class GovernanceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.governance = Governance(clock=self.clock, book=BudgetBook(self.clock, FakePricing()),
                                     limiter=RateLimiter(self.clock))

    def test_a_reloaded_context_rate_limits_apply_at_once(self) -> None:
        agent = Agent("a", {"rate_limits": {"rpm": 1}})
        self.governance.admit(Ex(), agent, DOC)
        error = self.assertRaises(ProxyError, self.governance.admit, Ex(), agent, DOC)
        self.assertEqual((error.status, error.code), (429, "rate_limited"))
        reloaded = Agent("a", {"rate_limits": {"rpm": 5}})
        self.assertEqual(self.governance.limits(reloaded), RateLimits(5, None))
        admission = self.governance.admit(Ex(), reloaded, DOC)
        self.assertEqual([scope for scope, _ in admission.rate_holds], ["a"])
        self.assertGreater(admission.token_estimate, 0)

    def test_an_agent_without_limits_holds_nothing(self) -> None:
        admission = self.governance.admit(Ex(), Agent("free", {}), DOC)
        self.assertEqual((admission.reservations, admission.rate_holds, admission.parallel_holds), ([], [], []))
        self.assertEqual(admission.candidates, (ModelRef("openai", "gpt-test"),))
        self.assertIsNone(admission.remaining_usd)
        # A budget added by a reload is held for at once, with the body's worst case.
        budgeted = Agent("free", {}, budget={"limit_usd": 5, "window": "1h"})
        held = self.governance.admit(Ex(body_size=100), budgeted, DOC)
        self.assertEqual(len(held.reservations), 1)
        self.assertAlmostEqual(held.reservations[0].worst_case_usd, (100 * 2.0 + 1000 * 8.0) / 1e6)
        self.assertEqual(held.remaining_usd, 5.0)
