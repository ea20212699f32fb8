"""
The lifetime period (the OR gate's C{period: none}) and the gate's tier
rule (C{tiers_rule: at_least}) in the budget book.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.governance.budgets import BudgetBook, BudgetError, Refusal, parse_budget
from cllama_tx.governance.periods import LIFETIME, period_bounds, retry_after
from cllama_tx.governance.tiers import ABOVE, AT_LEAST, Tier, current_tier_index, tier_decision

TIERS = [
    {"threshold": 0.8, "models": ["openrouter/anthropic/claude-3.5-sonnet", "openrouter/openai/gpt-4o"]},
    {"threshold": 0.3, "models": ["openrouter/anthropic/claude-3-haiku"]},
    {"threshold": 0.0, "models": ["openrouter/mistralai/mistral-7b-instruct"]},
]
YEAR = 365 * 86400


def book(start: float = 1_800_000_000.0) -> tuple[BudgetBook, Clock]:
    clock = Clock()
    clock.advance(start)
    return BudgetBook(clock), clock


class LifetimeTests(SynchronousTestCase):
    def test_bounds_and_no_retry(self) -> None:
        self.assertEqual(period_bounds(LIFETIME, 123.0), (0.0, float("inf")))
        budget = parse_budget({"limit_usd": 1, "period": "lifetime"})
        assert budget is not None
        self.assertIsNone(retry_after(budget, [(1.0, 0.5, 1)], 2.0, free_usd=0.1))

    def test_spend_never_leaves_and_a_spent_budget_says_no_retry(self) -> None:
        budget = parse_budget({"limit_usd": 1.0, "period": "lifetime"})
        assert budget is not None
        books, clock = book()
        held = books.reserve("a", budget, 0.6)
        assert not isinstance(held, Refusal)
        books.settle(held, 0.6)
        clock.advance(3 * YEAR)
        usage = books.usage("a", budget)
        self.assertEqual((usage.cost_usd, usage.start, usage.end), (0.6, 0.0, None))
        held = books.reserve("a", budget, 0.4)
        assert not isinstance(held, Refusal)
        books.settle(held, 0.4)
        refused = books.reserve("a", budget, 0.01)
        assert isinstance(refused, Refusal)
        self.assertEqual((refused.code, refused.retry_after, refused.retry_after_header), ("budget_exceeded", None, None))
        clock.advance(10 * YEAR)
        self.assertIsInstance(books.reserve("a", budget, 0.01), Refusal)  # never resets by itself

    def test_a_spent_offset_counts_for_ever(self) -> None:
        budget = parse_budget({"limit_usd": 1.0, "period": "lifetime", "spent_offset_usd": 0.25})
        assert budget is not None
        books, clock = book()
        self.assertEqual(books.usage("a", budget).cost_usd, 0.25)
        clock.advance(5 * YEAR)
        self.assertEqual(books.usage("a", budget).cost_usd, 0.25)

    def test_seeded_rows_of_any_age_count(self) -> None:
        budget = parse_budget({"limit_usd": 1.0, "period": "lifetime"})
        assert budget is not None
        books, clock = book()
        books.load("a", [(1_000_000.0, 0.3, True), (1_700_000_000.0, 0.2, True)])
        self.assertAlmostEqual(books.usage("a", budget).cost_usd, 0.5)
        self.assertEqual(books.usage("a", budget).requests, 2)


class TiersRuleTests(SynchronousTestCase):
    def budget(self, rule: str, behavior: str = "hard_stop"):
        budget = parse_budget({"limit_usd": 50.0, "period": "daily", "behavior": behavior, "tiers": TIERS,
                               "tiers_rule": rule})
        assert budget is not None
        return budget

    def test_parse(self) -> None:
        self.assertEqual(self.budget(AT_LEAST).tiers_rule, AT_LEAST)
        self.assertEqual(parse_budget({"limit_usd": 1, "window": "1h"}).tiers_rule, ABOVE)  # type: ignore[union-attr]
        self.assertRaises(BudgetError, parse_budget, {"limit_usd": 1, "window": "1h", "tiers_rule": "sometimes"})

    def test_a_threshold_met_exactly(self) -> None:
        tiers = (Tier(0.8, ("a",)), Tier(0.3, ("b",)), Tier(0.0, ("c",)))
        self.assertEqual(current_tier_index(tiers, 0.8, AT_LEAST), 0)
        self.assertEqual(current_tier_index(tiers, 0.8, ABOVE), 1)
        self.assertEqual(current_tier_index(tiers, 0.0, AT_LEAST), 2)
        self.assertIsNone(current_tier_index(tiers, 0.0, ABOVE))

    def test_below_every_threshold_the_lowest_tier_not_a_refusal(self) -> None:
        budget = parse_budget({"limit_usd": 50.0, "period": "daily", "tiers_rule": AT_LEAST,
                               "tiers": [{"threshold": 0.5, "models": ["openrouter/x/dear"]},
                                         {"threshold": 0.1, "models": ["openrouter/x/cheap"]}]})
        decision = tier_decision(budget, 0.05, "openrouter/x/dear")
        self.assertEqual((decision.refused, decision.ref, decision.openrouter_models),
                         (False, "openrouter/x/cheap", ["x/cheap"]))
        ours = parse_budget({"limit_usd": 50.0, "period": "daily",
                             "tiers": [{"threshold": 0.5, "models": ["openrouter/x/dear"]},
                                       {"threshold": 0.1, "models": ["openrouter/x/cheap"]}]})
        self.assertTrue(tier_decision(ours, 0.05, "openrouter/x/dear").refused)

    def test_in_the_book_at_80_percent_exactly(self) -> None:
        books, _ = book()
        budget = self.budget(AT_LEAST)
        books.load("a", [(1_800_000_000.0 - 10, 10.0, True)])
        decision = books.choose_model("a", budget, "")
        self.assertEqual(decision.ref, "openrouter/anthropic/claude-3.5-sonnet")  # type: ignore[union-attr]
        ours = self.budget(ABOVE)
        decision = books.choose_model("a", ours, "")
        self.assertEqual(decision.ref, "openrouter/anthropic/claude-3-haiku")  # type: ignore[union-attr]

    def test_only_a_spent_budget_refuses(self) -> None:
        books, _ = book()
        budget = self.budget(AT_LEAST)
        books.load("a", [(1_800_000_000.0 - 10, 50.0, True)])
        refused = books.choose_model("a", budget, "")
        self.assertIsInstance(refused, Refusal)
        self.assertEqual(refused.code, "budget_exceeded")  # type: ignore[union-attr]
        soft = self.budget(AT_LEAST, behavior="soft_alert")
        decision = books.choose_model("a", soft, "")
        self.assertEqual(decision.ref, "openrouter/mistralai/mistral-7b-instruct")  # type: ignore[union-attr]
