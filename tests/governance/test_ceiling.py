"""
Tests for L{cllama_tx.governance.ceiling}: what an OpenRouter model the
price table does not know is held at, and counted at without a reported cost.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting.pricing import Price, Pricing
from cllama_tx.governance.budgets import BudgetBook, Refusal, parse_budget
from cllama_tx.governance.ceiling import (
    AUTO,
    OFF,
    CeilingError,
    CeilingPricing,
    ceiling_cost,
    dearest,
    parse_ceiling,
)
from cllama_tx.store.records import LedgerRow

UNKNOWN = "qwen/qwen-2.5-coder-32b-instruct"


def row(**fields) -> LedgerRow:
    base = dict(request_id="r", ts=1.0, agent="a", provider="openrouter", requested_model=UNKNOWN,
                effective_model=UNKNOWN, status=200, stream=False, latency_ms=1.0, ttfb_ms=1.0,
                input_tokens=1000, output_tokens=500, cost_usd=0.0, priced=False)
    base.update(fields)
    return LedgerRow(**base)


class ParseTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(parse_ceiling(None), AUTO)
        self.assertEqual(parse_ceiling(" Auto "), AUTO)
        self.assertEqual(parse_ceiling("off"), OFF)
        self.assertEqual(parse_ceiling("5/20"), Price(input=5.0, output=20.0))
        for bad in ("5", "a/b", "0/1", "-1/2", "1/2/3", "inf/1"):
            with self.subTest(bad=bad):
                self.assertRaises(CeilingError, parse_ceiling, bad)


class CeilingPricingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pricing = Pricing(Clock())

    def test_auto_is_the_dearest_known_openrouter_rate(self) -> None:
        ceiling = CeilingPricing(self.pricing)
        found = dearest(self.pricing.table["openrouter"])
        self.assertEqual(ceiling.price("openrouter", UNKNOWN), found)
        assert found is not None
        for price in self.pricing.table["openrouter"].values():
            self.assertLessEqual(price.output, found.output)
            self.assertLessEqual(price.input, found.input)
        # Known models, and other providers, are the table's.
        self.assertEqual(ceiling.price("openrouter", "openai/gpt-4o"), self.pricing.price("openrouter", "openai/gpt-4o"))
        self.assertIsNone(ceiling.price("openai", "made-up-model"))
        self.assertTrue(ceiling.held_at_ceiling("openrouter", UNKNOWN))
        self.assertFalse(ceiling.held_at_ceiling("openrouter", "openai/gpt-4o"))

    def test_auto_follows_the_table(self) -> None:
        ceiling = CeilingPricing(self.pricing)
        before = ceiling.ceiling
        self.pricing.set_published({"openrouter": {"openai/o1-pro": Price(input=150.0, output=600.0)}})
        self.assertEqual(ceiling.ceiling, Price(input=150.0, output=600.0))
        self.assertNotEqual(before, ceiling.ceiling)

    def test_set_and_off(self) -> None:
        self.assertEqual(CeilingPricing(self.pricing, Price(input=1.0, output=2.0)).price("openrouter", UNKNOWN),
                         Price(input=1.0, output=2.0))
        off = CeilingPricing(self.pricing, OFF)
        self.assertIsNone(off.price("openrouter", UNKNOWN))
        self.assertFalse(off.held_at_ceiling("openrouter", UNKNOWN))

    def test_the_book_holds_instead_of_refusing(self) -> None:
        budget = parse_budget({"limit_usd": 5.0, "window": "1h"})
        assert budget is not None
        clock = Clock()
        held_book = BudgetBook(clock, CeilingPricing(self.pricing, Price(input=1.0, output=2.0)))
        worst = held_book.worst_case("openrouter", UNKNOWN, 1000, 1000)
        self.assertAlmostEqual(worst, (1000 * 1.0 + 1000 * 2.0) / 1e6)  # type: ignore[arg-type]
        self.assertNotIsInstance(held_book.reserve("a", budget, worst), Refusal)
        refusing = BudgetBook(clock, CeilingPricing(self.pricing, OFF))
        self.assertIsNone(refusing.worst_case("openrouter", UNKNOWN, 1000, 1000))
        refused = refusing.reserve("a", budget, None)
        self.assertIsInstance(refused, Refusal)
        self.assertEqual(refused.code, "unpriced_model")  # type: ignore[union-attr]

    def test_counted_at_the_ceiling_without_a_reported_cost(self) -> None:
        ceiling = CeilingPricing(self.pricing, Price(input=1.0, output=2.0))
        self.assertAlmostEqual(ceiling_cost(ceiling, row()), (1000 * 1.0 + 500 * 2.0) / 1e6)  # type: ignore[arg-type]
        self.assertIsNone(ceiling_cost(ceiling, row(priced=True, cost_usd=0.1)))
        self.assertIsNone(ceiling_cost(ceiling, row(effective_model="openai/gpt-4o")))
        self.assertIsNone(ceiling_cost(ceiling, row(provider="openai")))
        self.assertIsNone(ceiling_cost(self.pricing, row()))  # not a ceiling table: nothing to count at
