"""
Tests for L{cllama_tx.governance.tiers}: validation, the tier boundaries,
downgrades and the OpenRouter models list.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.governance.budgets import BudgetError, parse_budget
from cllama_tx.governance.tiers import (
    BUDGET_TIER_DOWNGRADE,
    Tier,
    TierDecision,
    current_tier_index,
    parse_tiers,
    split_ref,
    tier_decision,
)

OPUS = "anthropic/claude-opus-4-5"
SONNET = "anthropic/claude-sonnet-4-5"
HAIKU = "anthropic/claude-haiku-4-5"
TIERS = [
    {"threshold": 0.3, "models": [SONNET, HAIKU]},
    {"threshold": 0.8, "models": [OPUS, SONNET]},
    {"threshold": 0.0, "models": [HAIKU]},
]


def budget(behavior: str = "hard_stop", tiers=TIERS):
    return parse_budget({"limit_usd": 10, "window": "24h", "behavior": behavior, "tiers": tiers})


class ParseTiersTests(SynchronousTestCase):
    def test_sorted_highest_first(self) -> None:
        tiers = parse_tiers(TIERS)
        self.assertEqual([t.threshold for t in tiers], [0.8, 0.3, 0.0])
        self.assertEqual(tiers[0], Tier(0.8, (OPUS, SONNET)))

    def test_percent_and_name(self) -> None:
        tiers = parse_tiers([{"threshold": "50%", "models": [" a/b ", "a/b"], "name": "mid"}])
        self.assertEqual(tiers, (Tier(0.5, ("a/b",), "mid"),))

    def test_none_and_empty(self) -> None:
        self.assertEqual(parse_tiers(None), ())
        self.assertEqual(parse_tiers([]), ())

    def test_invalid(self) -> None:
        bad_lists = [
            {"threshold": 0.5, "models": ["a/b"]},
            ["x"],
            [{"models": ["a/b"]}],
            [{"threshold": 1.5, "models": ["a/b"]}],
            [{"threshold": -0.1, "models": ["a/b"]}],
            [{"threshold": True, "models": ["a/b"]}],
            [{"threshold": "lots", "models": ["a/b"]}],
            [{"threshold": float("nan"), "models": ["a/b"]}],
            [{"threshold": 0.5, "models": []}],
            [{"threshold": 0.5, "models": "a/b"}],
            [{"threshold": 0.5, "models": [""]}],
            [{"threshold": 0.5, "models": [3]}],
            [{"threshold": 0.5, "models": ["a/b"], "colour": "red"}],
            [{"threshold": 0.5, "models": ["a/b"], "name": 3}],
            [{"threshold": 0.5, "models": ["a/b"]}, {"threshold": 0.5, "models": ["c/d"]}],
        ]
        for bad in bad_lists:
            with self.subTest(bad=bad):
                self.assertRaises(BudgetError, parse_tiers, bad)


class BoundaryTests(SynchronousTestCase):
    def test_strictly_above(self) -> None:
        tiers = parse_tiers(TIERS)
        cases = [
            (1.0, 0),
            (0.81, 0),
            (0.8, 1),  # exactly at a threshold: the tier below
            (0.5, 1),
            (0.30000001, 1),
            (0.3, 2),
            (0.0001, 2),
            (0.0, None),  # nothing left: no tier
        ]
        for remaining, expected in cases:
            with self.subTest(remaining=remaining):
                self.assertEqual(current_tier_index(tiers, remaining), expected)

    def test_split_ref(self) -> None:
        self.assertEqual(split_ref("OpenRouter/anthropic/claude"), ("openrouter", "anthropic/claude"))
        self.assertEqual(split_ref("openai/gpt-4o"), ("openai", "gpt-4o"))


class DecisionTests(SynchronousTestCase):
    def test_no_tiers_or_no_fraction(self) -> None:
        plain = parse_budget({"limit_usd": 10, "window": "24h"})
        self.assertEqual(tier_decision(plain, 0.5, OPUS), TierDecision(OPUS, remaining_fraction=0.5))
        self.assertEqual(tier_decision(budget(), None, OPUS), TierDecision(OPUS))

    def test_in_tier_is_kept(self) -> None:
        decision = tier_decision(budget(), 0.9, OPUS)
        self.assertEqual((decision.ref, decision.intervention, decision.refused), (OPUS, None, False))
        self.assertEqual(decision.tier.threshold, 0.8)
        self.assertIsNone(decision.openrouter_models)

    def test_downgrade_to_first_model(self) -> None:
        decision = tier_decision(budget(), 0.5, OPUS)
        self.assertEqual((decision.ref, decision.intervention), (SONNET, BUDGET_TIER_DOWNGRADE))
        decision = tier_decision(budget(), 0.3, OPUS)
        self.assertEqual((decision.ref, decision.intervention), (HAIKU, BUDGET_TIER_DOWNGRADE))
        decision = tier_decision(budget(), 0.3, SONNET)
        self.assertEqual((decision.ref, decision.intervention), (HAIKU, BUDGET_TIER_DOWNGRADE))

    def test_unknown_model_goes_to_the_tier(self) -> None:
        decision = tier_decision(budget(), 0.95, "openai/gpt-4o")
        self.assertEqual((decision.ref, decision.intervention), (OPUS, BUDGET_TIER_DOWNGRADE))

    def test_cheaper_model_is_never_moved_up(self) -> None:
        decision = tier_decision(budget(), 0.95, HAIKU)
        self.assertEqual((decision.ref, decision.intervention), (HAIKU, None))

    def test_exhausted_hard_cap_refuses(self) -> None:
        for behavior in ("hard_stop", "rate_limit"):
            with self.subTest(behavior=behavior):
                decision = tier_decision(budget(behavior), 0.0, OPUS)
                self.assertTrue(decision.refused)
                self.assertIsNone(decision.ref)

    def test_exhausted_soft_alert_keeps_lowest_tier(self) -> None:
        decision = tier_decision(budget("soft_alert"), 0.0, OPUS)
        self.assertFalse(decision.refused)
        self.assertEqual((decision.ref, decision.intervention), (HAIKU, BUDGET_TIER_DOWNGRADE))

    def test_below_lowest_positive_threshold_refuses(self) -> None:
        tiers = [{"threshold": 0.5, "models": [OPUS]}, {"threshold": 0.2, "models": [HAIKU]}]
        self.assertEqual(tier_decision(budget(tiers=tiers), 0.21, OPUS).ref, HAIKU)
        self.assertTrue(tier_decision(budget(tiers=tiers), 0.2, OPUS).refused)


class OpenRouterTests(SynchronousTestCase):
    TIERS = [
        {
            "threshold": 0.5,
            "models": ["openrouter/anthropic/claude-opus-4.5", "openai/gpt-5", "openrouter/openai/gpt-5"],
        },
        {
            "threshold": 0.0,
            "models": ["openrouter/google/gemini-3-flash", "openrouter/anthropic/claude-haiku-4.5"],
        },
    ]

    def test_tier_list_for_openrouter(self) -> None:
        decision = tier_decision(budget(tiers=self.TIERS), 0.9, "openrouter/openai/gpt-5")
        self.assertEqual(decision.ref, "openrouter/openai/gpt-5")
        self.assertIsNone(decision.intervention)
        self.assertEqual(decision.openrouter_models, ["openai/gpt-5", "anthropic/claude-opus-4.5"])

    def test_downgrade_lists_the_tier(self) -> None:
        decision = tier_decision(budget(tiers=self.TIERS), 0.4, "openrouter/anthropic/claude-opus-4.5")
        self.assertEqual(decision.ref, "openrouter/google/gemini-3-flash")
        self.assertEqual(decision.intervention, BUDGET_TIER_DOWNGRADE)
        self.assertEqual(
            decision.openrouter_models, ["google/gemini-3-flash", "anthropic/claude-haiku-4.5"]
        )

    def test_lower_tier_model_first(self) -> None:
        decision = tier_decision(budget(tiers=self.TIERS), 0.9, "openrouter/anthropic/claude-haiku-4.5")
        self.assertIsNone(decision.intervention)
        self.assertEqual(
            decision.openrouter_models,
            ["anthropic/claude-haiku-4.5", "anthropic/claude-opus-4.5", "openai/gpt-5"],
        )

    def test_not_openrouter(self) -> None:
        decision = tier_decision(budget(tiers=self.TIERS), 0.9, "openai/gpt-5")
        self.assertIsNone(decision.openrouter_models)
