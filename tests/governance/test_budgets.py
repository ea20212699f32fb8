"""
Tests for L{cllama_tx.governance.budgets}: parsing and layering, worst
cases, and L{BudgetBook}: reservations under concurrency (the proof that a
limit holds), settle and release, each behaviour, unpriced models, retry
times, the refusal body, seeding and tiers.
"""

from __future__ import annotations

import datetime
import json
import random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting.pricing import LongContext, Price
from cllama_tx.governance.budgets import (
    BUDGET_EXCEEDED,
    RATE_LIMITED,
    UNPRICED_MODEL,
    Budget,
    BudgetBook,
    BudgetError,
    Refusal,
    Reservation,
    affordable_max_tokens,
    layer_budgets,
    parse_budget,
    refusal_body,
    worst_case_cost,
)
from cllama_tx.governance.tiers import BUDGET_TIER_DOWNGRADE, Tier, TierDecision

START = 1_718_445_600.0  # 2024-06-15T10:00:00Z, a Saturday
AGENT = "tiverton"


def ts(text: str) -> float:
    return datetime.datetime.fromisoformat(text).timestamp()


class FakePricing:
    """Just C{price()}, from a dict."""

    def __init__(self, table: dict[tuple[str, str], Price]) -> None:
        self.table = table

    def price(self, provider: str, model: str) -> Price | None:
        return self.table.get((provider, model))


PRICING = FakePricing(
    {
        ("openai", "gpt-test"): Price(input=2.0, output=8.0, cache_read=0.5, max_output_tokens=1000),
        ("anthropic", "claude-test"): Price(input=3.0, output=15.0, cache_read=0.3, cache_write=3.75),
        (
            "google",
            "gemini-test",
        ): Price(
            input=1.0,
            output=10.0,
            long_context=LongContext(200_000, 2.0, 1.5),
            max_output_tokens=100,
        ),
        ("free", "model"): Price(input=0.0, output=0.0, max_output_tokens=500),
    }
)


def make_book(unpriced: str = "refuse", start: float = START) -> tuple[Clock, BudgetBook]:
    clock = Clock()
    clock.advance(start)
    return clock, BudgetBook(clock, PRICING, unpriced=unpriced)


# ---------------------------------------------------------------------------
# Parsing and layering


class ParseBudgetTests(SynchronousTestCase):
    def test_contract_object(self) -> None:
        budget = parse_budget(
            {"limit_usd": 5, "max_requests": 100, "window": " 24h ", "behavior": "rate_limit"}
        )
        self.assertEqual(
            budget,
            Budget(
                behavior="rate_limit",
                limit_usd=5.0,
                max_requests=100,
                window="24h",
                window_seconds=86400.0,
            ),
        )
        self.assertEqual(budget.label, "24h")
        self.assertTrue(budget.rolling)

    def test_defaults_to_hard_stop(self) -> None:
        self.assertEqual(parse_budget({"limit_usd": 1, "window": "1h"}).behavior, "hard_stop")
        self.assertEqual(parse_budget({"limit_usd": 1, "window": "1h", "behavior": ""}).behavior, "hard_stop")

    def test_period(self) -> None:
        budget = parse_budget({"max_requests": 10, "period": "Weekly"})
        self.assertEqual((budget.period, budget.window, budget.label), ("weekly", None, "weekly"))
        self.assertFalse(budget.rolling)

    def test_no_budget(self) -> None:
        self.assertIsNone(parse_budget(None))
        self.assertIsNone(parse_budget({}))
        # Neither limit: no budget, as the reference proxy decides.
        self.assertIsNone(parse_budget({"window": "1h", "behavior": "hard_stop"}))

    def test_tiers_and_offset(self) -> None:
        budget = parse_budget(
            {
                "limit_usd": 10,
                "period": "monthly",
                "spent_offset_usd": 2.5,
                "tiers": [{"threshold": 0, "models": ["a/b"]}, {"threshold": 0.5, "models": ["c/d"]}],
            }
        )
        self.assertEqual(budget.spent_offset_usd, 2.5)
        self.assertEqual(budget.tiers, (Tier(0.5, ("c/d",)), Tier(0.0, ("a/b",))))

    def test_unknown_keys_are_warned_about(self) -> None:
        warnings: list[str] = []
        budget = parse_budget({"limit_usd": 1, "window": "1h", "limit": 3, "_comment": "x"}, warnings)
        self.assertEqual(budget.limit_usd, 1.0)
        self.assertEqual(warnings, ["unknown budget key 'limit' ignored"])

    def test_integral_float_requests(self) -> None:
        self.assertEqual(parse_budget({"max_requests": 10.0, "window": "1h"}).max_requests, 10)

    def test_invalid(self) -> None:
        bad_budgets = [
            [],
            "budget",
            {"limit_usd": 0, "window": "1h"},
            {"limit_usd": -1, "window": "1h"},
            {"limit_usd": "5", "window": "1h"},
            {"limit_usd": True, "window": "1h"},
            {"limit_usd": float("inf"), "window": "1h"},
            {"max_requests": 0, "window": "1h"},
            {"max_requests": 1.5, "window": "1h"},
            {"max_requests": "10", "window": "1h"},
            {"limit_usd": 1},
            {"limit_usd": 1, "window": "soon"},
            {"limit_usd": 1, "window": 3600},
            {"limit_usd": 1, "period": "yearly"},
            {"limit_usd": 1, "period": 1},
            {"limit_usd": 1, "window": "1h", "period": "daily"},
            {"limit_usd": 1, "window": "1h", "behavior": "explode"},
            {"limit_usd": 1, "window": "1h", "behavior": 3},
            {"limit_usd": 1, "window": "1h", "spent_offset_usd": -1},
            {"max_requests": 5, "window": "1h", "tiers": [{"threshold": 0, "models": ["a/b"]}]},
            {"max_requests": 5, "window": "1h", "spent_offset_usd": 1},
            {"window": "1h", "tiers": [{"threshold": 0, "models": ["a/b"]}]},
            {"limit_usd": 1, "window": "1h", "tiers": "cheap"},
        ]
        for bad in bad_budgets:
            with self.subTest(bad=bad):
                self.assertRaises(BudgetError, parse_budget, bad)


class LayerBudgetsTests(SynchronousTestCase):
    def test_key_by_key(self) -> None:
        merged = layer_budgets(
            {"limit_usd": 5, "window": "24h", "behavior": "hard_stop"},
            {"limit_usd": 2},
            {"behavior": "soft_alert", "max_requests": 50},
        )
        self.assertEqual(
            merged, {"limit_usd": 2, "window": "24h", "behavior": "soft_alert", "max_requests": 50}
        )

    def test_order_metadata_override_policy_governance(self) -> None:
        merged = layer_budgets(
            {"limit_usd": 1, "window": "1h"},
            {"limit_usd": 2},
            {"limit_usd": 4},
            policy_file_budget={"limit_usd": 3, "max_requests": 7},
        )
        self.assertEqual(merged, {"limit_usd": 4, "window": "1h", "max_requests": 7})

    def test_unset_values_do_not_override(self) -> None:
        merged = layer_budgets(
            {"limit_usd": 5, "window": "24h", "behavior": "rate_limit"},
            {"limit_usd": None, "window": "  ", "behavior": ""},
            None,
        )
        self.assertEqual(merged, {"limit_usd": 5, "window": "24h", "behavior": "rate_limit"})

    def test_period_replaces_window(self) -> None:
        merged = layer_budgets({"limit_usd": 5, "window": "24h"}, None, {"period": "daily"})
        self.assertEqual(merged, {"limit_usd": 5, "period": "daily"})
        self.assertEqual(parse_budget(merged).period, "daily")
        merged = layer_budgets({"limit_usd": 5, "period": "monthly"}, {"window": "1h"}, None)
        self.assertEqual(merged, {"limit_usd": 5, "window": "1h"})

    def test_lists_replaced_whole_and_copied(self) -> None:
        base_tiers = [{"threshold": 0.5, "models": ["a/b"]}, {"threshold": 0, "models": ["c/d"]}]
        top_tiers = [{"threshold": 0, "models": ["e/f"]}]
        merged = layer_budgets({"limit_usd": 1, "window": "1h", "tiers": base_tiers}, None, {"tiers": top_tiers})
        self.assertEqual(merged["tiers"], top_tiers)
        merged["tiers"][0]["models"].append("x/y")
        self.assertEqual(top_tiers, [{"threshold": 0, "models": ["e/f"]}])

    def test_none(self) -> None:
        self.assertIsNone(layer_budgets(None, None, None))
        self.assertEqual(layer_budgets({}, None, None), {})

    def test_not_objects(self) -> None:
        self.assertRaises(BudgetError, layer_budgets, [], None, None)
        self.assertRaises(BudgetError, layer_budgets, None, None, "x")


# ---------------------------------------------------------------------------
# Worst cases


class WorstCaseTests(SynchronousTestCase):
    def test_max_tokens(self) -> None:
        # 1000 in at 2.0, 500 out at 8.0.
        self.assertAlmostEqual(worst_case_cost(PRICING, "openai", "gpt-test", 1000, 500), 0.006)

    def test_model_max_output(self) -> None:
        self.assertAlmostEqual(worst_case_cost(PRICING, "openai", "gpt-test", 1000, None), 0.010)
        self.assertAlmostEqual(worst_case_cost(PRICING, "openai", "gpt-test", 1000, 0), 0.010)

    def test_fallback_output_and_cache_write_rate(self) -> None:
        # No max_output_tokens in the table: 128k; input at the cache-write rate 3.75.
        expected = (1000 * 3.75 + 128_000 * 15.0) / 1e6
        self.assertAlmostEqual(worst_case_cost(PRICING, "anthropic", "claude-test", 1000, None), expected)
        self.assertAlmostEqual(
            worst_case_cost(PRICING, "anthropic", "claude-test", 1000, None, fallback_max_output=10),
            (1000 * 3.75 + 10 * 15.0) / 1e6,
        )

    def test_long_context(self) -> None:
        self.assertAlmostEqual(
            worst_case_cost(PRICING, "google", "gemini-test", 300_000, None), (300_000 * 2.0 + 100 * 15.0) / 1e6
        )

    def test_unpriced(self) -> None:
        self.assertIsNone(worst_case_cost(PRICING, "openai", "nope", 10, 10))
        self.assertIsNone(worst_case_cost(None, "openai", "gpt-test", 10, 10))
        _, book = make_book()
        self.assertIsNone(book.worst_case("openai", "nope", 10, 10))
        self.assertAlmostEqual(book.worst_case("openai", "gpt-test", 1000, 500), 0.006)

    def test_affordable_max_tokens(self) -> None:
        # $0.006 available, 1000 input tokens cost $0.002: 500 output tokens.
        self.assertEqual(affordable_max_tokens(PRICING, "openai", "gpt-test", 1000, 0.006), 500)
        self.assertEqual(affordable_max_tokens(PRICING, "openai", "gpt-test", 1000, 1.0), 1000)  # model cap
        self.assertEqual(affordable_max_tokens(PRICING, "openai", "gpt-test", 1000, 0.001), 0)
        self.assertEqual(affordable_max_tokens(PRICING, "free", "model", 1000, 0.0), 500)
        self.assertIsNone(affordable_max_tokens(PRICING, "openai", "nope", 1000, 1.0))
        tokens = affordable_max_tokens(PRICING, "anthropic", "claude-test", 777, 0.0123)
        self.assertLessEqual(worst_case_cost(PRICING, "anthropic", "claude-test", 777, tokens), 0.0123)
        self.assertGreater(worst_case_cost(PRICING, "anthropic", "claude-test", 777, tokens + 1), 0.0123)


# ---------------------------------------------------------------------------
# The book


class ReservationProofTests(SynchronousTestCase):
    """Budgets hold under concurrency."""

    def test_two_hundred_concurrent(self) -> None:
        clock, book = make_book()
        budget = parse_budget({"limit_usd": 1.0, "window": "1h"})
        results = [book.reserve(AGENT, budget, 0.1) for _ in range(200)]
        admitted = [r for r in results if isinstance(r, Reservation)]
        refused = [r for r in results if isinstance(r, Refusal)]
        self.assertEqual(len(admitted), 10)
        self.assertEqual(len(refused), 190)
        self.assertEqual({r.code for r in refused}, {BUDGET_EXCEEDED})
        # Only requests in flight are in the way: retry shortly.
        self.assertEqual({r.retry_after for r in refused}, {1.0})

        rng = random.Random(6)
        for reservation in admitted:
            clock.advance(rng.uniform(0, 5))
            self.assertTrue(book.settle(reservation, rng.uniform(0, 0.1)))
            usage = book.usage(AGENT, budget)
            self.assertLessEqual(usage.cost_usd + usage.reserved_usd, 1.0 + 1e-9)
        self.assertLessEqual(book.usage(AGENT, budget).cost_usd, 1.0)

    def test_lower_actual_cost_frees_room(self) -> None:
        _, book = make_book()
        budget = parse_budget({"limit_usd": 1.0, "window": "1h"})
        admitted = [book.reserve(AGENT, budget, 0.1) for _ in range(10)]
        self.assertIsInstance(book.reserve(AGENT, budget, 0.1), Refusal)
        for reservation in admitted:
            book.settle(reservation, 0.05)
        more = [book.reserve(AGENT, budget, 0.1) for _ in range(20)]
        self.assertEqual(sum(isinstance(r, Reservation) for r in more), 5)
        self.assertEqual(book.usage(AGENT, budget).cost_usd, 0.5)

    def test_random_interleaving_never_overshoots(self) -> None:
        clock, book = make_book()
        budget = parse_budget({"limit_usd": 2.0, "max_requests": 60, "window": "10m"})
        rng = random.Random(1)
        open_: list[Reservation] = []
        settled_total = 0.0
        for _ in range(5000):
            clock.advance(rng.uniform(0, 0.5))
            if open_ and rng.random() < 0.5:
                held = open_.pop(rng.randrange(len(open_)))
                if rng.random() < 0.2:
                    book.release(held)
                else:
                    cost = rng.uniform(0, held.worst_case_usd)
                    book.settle(held, cost)
                    settled_total += cost
            else:
                result = book.reserve(AGENT, budget, rng.uniform(0.01, 0.3))
                if isinstance(result, Reservation):
                    open_.append(result)
            usage = book.usage(AGENT, budget)
            self.assertLessEqual(usage.cost_usd + usage.reserved_usd, 2.0 + 1e-9)
            self.assertLessEqual(usage.requests + usage.reserved_requests, 60)
        self.assertGreater(settled_total, 4.0)  # the window rolled: more than twice the limit


class SettleReleaseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock, self.book = make_book()
        self.budget = parse_budget({"limit_usd": 1.0, "max_requests": 5, "window": "1h"})

    def test_settle_records_actual_cost(self) -> None:
        held = self.book.reserve(AGENT, self.budget, 0.4)
        self.assertEqual(self.book.usage(AGENT, self.budget).reserved_usd, 0.4)
        self.assertTrue(self.book.settle(held, 0.25))
        usage = self.book.usage(AGENT, self.budget)
        self.assertEqual((usage.cost_usd, usage.requests, usage.reserved_usd, usage.reserved_requests), (0.25, 1, 0, 0))
        self.assertEqual((held.state, held.actual_cost_usd), ("settled", 0.25))

    def test_settle_and_release_are_idempotent(self) -> None:
        held = self.book.reserve(AGENT, self.budget, 0.4)
        self.assertTrue(self.book.settle(held, 0.25))
        self.assertFalse(self.book.settle(held, 0.25))
        self.assertFalse(self.book.release(held))
        usage = self.book.usage(AGENT, self.budget)
        self.assertEqual((usage.cost_usd, usage.requests), (0.25, 1))
        other = self.book.reserve(AGENT, self.budget, 0.4)
        self.assertTrue(self.book.release(other))
        self.assertFalse(self.book.settle(other, 0.1))
        self.assertEqual(other.state, "released")

    def test_release_frees_without_counting(self) -> None:
        held = self.book.reserve(AGENT, self.budget, 0.9)
        self.assertIsInstance(self.book.reserve(AGENT, self.budget, 0.2), Refusal)
        self.book.release(held)
        usage = self.book.usage(AGENT, self.budget)
        self.assertEqual((usage.cost_usd, usage.requests, usage.reserved_usd), (0.0, 0, 0.0))
        self.assertIsInstance(self.book.reserve(AGENT, self.budget, 0.2), Reservation)

    def test_release_counted(self) -> None:
        self.book.release(self.book.reserve(AGENT, self.budget, 0.5), counted=True)
        self.assertEqual(self.book.usage(AGENT, self.budget).requests, 1)

    def test_settled_spend_leaves_the_window(self) -> None:
        self.book.settle(self.book.reserve(AGENT, self.budget, 0.5), 0.5)
        self.clock.advance(3599)
        self.assertEqual(self.book.usage(AGENT, self.budget).cost_usd, 0.5)
        self.clock.advance(1)
        self.assertEqual(self.book.usage(AGENT, self.budget).cost_usd, 0.0)

    def test_cost_above_worst_case_is_counted(self) -> None:
        # A provider-reported cost can exceed the estimate: it still counts.
        self.book.settle(self.book.reserve(AGENT, self.budget, 0.1), 1.5)
        self.assertEqual(self.book.usage(AGENT, self.budget).cost_usd, 1.5)

    def test_forgotten_agent(self) -> None:
        held = self.book.reserve(AGENT, self.budget, 0.1)
        self.book.forget(AGENT)
        fresh = self.book.reserve(AGENT, self.budget, 0.5)
        self.assertTrue(self.book.settle(held, 0.1))
        usage = self.book.usage(AGENT, self.budget)
        # The old reservation touches nothing of the agent's new state.
        self.assertEqual((usage.cost_usd, usage.reserved_usd, usage.reserved_requests), (0.0, 0.5, 1))
        self.assertTrue(self.book.release(fresh))

    def test_timezone_only_matters_for_periods(self) -> None:
        self.assertIsInstance(self.book.reserve(AGENT, self.budget, 0.1, "Not/AZone"), Reservation)
        daily = parse_budget({"limit_usd": 1.0, "period": "daily"})
        self.assertRaises(BudgetError, self.book.reserve, AGENT, daily, 0.1, "Not/AZone")

    def test_agents_are_separate(self) -> None:
        self.book.settle(self.book.reserve(AGENT, self.budget, 0.9), 0.9)
        self.assertIsInstance(self.book.reserve("other", self.budget, 0.9), Reservation)

    def test_bad_worst_case(self) -> None:
        self.assertRaises(ValueError, self.book.reserve, AGENT, self.budget, -1.0)
        self.assertRaises(ValueError, self.book.reserve, AGENT, self.budget, float("nan"))
        self.assertRaises(ValueError, BudgetBook, self.clock, PRICING, "maybe")


class BehaviourTests(SynchronousTestCase):
    def test_hard_stop_dollars(self) -> None:
        _, book = make_book()
        budget = parse_budget({"limit_usd": 1.0, "window": "1h"})
        book.settle(book.reserve(AGENT, budget, 0.8), 0.8)
        refusal = book.reserve(AGENT, budget, 0.3)
        self.assertEqual((refusal.status, refusal.code, refusal.message), (429, BUDGET_EXCEEDED, "budget exceeded"))
        self.assertIsInstance(book.reserve(AGENT, budget, 0.2), Reservation)

    def test_hard_stop_requests_answer_rate_limited(self) -> None:
        # As the reference proxy: the request-count limit answers rate_limited.
        _, book = make_book()
        budget = parse_budget({"max_requests": 1, "window": "1h"})
        book.settle(book.reserve(AGENT, budget, 0.1), 0.1)
        refusal = book.reserve(AGENT, budget, 0.1)
        self.assertEqual((refusal.code, refusal.message), (RATE_LIMITED, "request rate limit exceeded"))

    def test_rate_limit_dollars_answer_rate_limited(self) -> None:
        _, book = make_book()
        budget = parse_budget({"limit_usd": 1.0, "window": "1h", "behavior": "rate_limit"})
        book.settle(book.reserve(AGENT, budget, 0.8), 0.8)
        refusal = book.reserve(AGENT, budget, 0.3)
        self.assertEqual((refusal.status, refusal.code), (429, RATE_LIMITED))

    def test_rate_limit_paces_hard_stop_stops(self) -> None:
        # Three requests allowed per hour, made at +0, +10 s and +20 s.
        for behavior, first_retry in (("rate_limit", 3570.0), ("hard_stop", 3590.0)):
            with self.subTest(behavior=behavior):
                clock, book = make_book()
                budget = parse_budget({"max_requests": 3, "window": "1h", "behavior": behavior})
                for _ in range(3):
                    book.settle(book.reserve(AGENT, budget, 0.0), 0.0)
                    clock.advance(10)
                refusal = book.reserve(AGENT, budget, 0.0)
                self.assertEqual(refusal.retry_after, first_retry)
                # When the first request leaves the window (+3600 s) ...
                clock.advance(3570)
                result = book.reserve(AGENT, budget, 0.0)
                if behavior == "rate_limit":
                    # ... one request fits again.
                    self.assertIsInstance(result, Reservation)
                else:
                    # ... a tripped hard stop still refuses until the
                    # window holds none of the spend that exhausted it.
                    self.assertIsInstance(result, Refusal)
                    self.assertEqual(result.retry_after, 20.0)
                    clock.advance(20)
                    self.assertIsInstance(book.reserve(AGENT, budget, 0.0), Reservation)

    def test_hard_stop_trip_cleared_by_a_new_budget(self) -> None:
        _, book = make_book()
        budget = parse_budget({"max_requests": 1, "window": "1h"})
        book.settle(book.reserve(AGENT, budget, 0.0), 0.0)
        self.assertIsInstance(book.reserve(AGENT, budget, 0.0), Refusal)
        raised = parse_budget({"max_requests": 2, "window": "1h"})
        self.assertIsInstance(book.reserve(AGENT, raised, 0.0), Reservation)

    def test_hard_stop_calendar_stops_until_the_boundary(self) -> None:
        clock, book = make_book(start=ts("2024-06-15T20:00:00-07:00"))
        budget = parse_budget({"limit_usd": 1.0, "period": "daily"})
        tz = "America/Los_Angeles"
        book.settle(book.reserve(AGENT, budget, 1.0, tz), 1.0)
        refusal = book.reserve(AGENT, budget, 0.01, tz)
        self.assertEqual((refusal.code, refusal.retry_after), (BUDGET_EXCEEDED, 4 * 3600))
        clock.advance(4 * 3600 - 1)
        self.assertEqual(book.reserve(AGENT, budget, 0.01, tz).retry_after, 1.0)
        clock.advance(1)
        self.assertIsInstance(book.reserve(AGENT, budget, 0.01, tz), Reservation)
        self.assertEqual(book.usage(AGENT, budget, tz).cost_usd, 0.0)

    def test_soft_alert_never_refuses(self) -> None:
        _, book = make_book()
        budget = parse_budget({"limit_usd": 1.0, "max_requests": 100, "window": "1h", "behavior": "soft_alert"})
        first = book.reserve(AGENT, budget, 0.9)
        self.assertEqual((first.alert, first.alert_reason), (False, None))
        # Not exhausted yet: reservations alone do not alert.
        second = book.reserve(AGENT, budget, 0.9)
        self.assertFalse(second.alert)
        book.settle(first, 0.9)
        book.settle(second, 0.9)
        third = book.reserve(AGENT, budget, 5.0)
        self.assertIsInstance(third, Reservation)
        self.assertEqual((third.alert, third.alert_reason), (True, BUDGET_EXCEEDED))

    def test_soft_alert_requests(self) -> None:
        _, book = make_book()
        budget = parse_budget({"max_requests": 1, "window": "1h", "behavior": "soft_alert"})
        book.settle(book.reserve(AGENT, budget, 0.0), 0.0)
        held = book.reserve(AGENT, budget, 0.0)
        self.assertEqual((held.alert, held.alert_reason), (True, RATE_LIMITED))


class RetryAfterTests(SynchronousTestCase):
    def test_rolling_window_exact(self) -> None:
        clock, book = make_book(start=100.0)
        budget = parse_budget({"limit_usd": 1.0, "window": "1h"})
        book.settle(book.reserve(AGENT, budget, 0.6), 0.6)  # at 100
        clock.advance(100)
        book.settle(book.reserve(AGENT, budget, 0.3), 0.3)  # at 200
        clock.advance(100)  # now 300
        refusal = book.reserve(AGENT, budget, 0.5)
        # 0.9 + 0.5 > 1: 0.4 must leave; the 0.6 at 100 leaves at 3700.
        self.assertEqual(refusal.retry_after, 3400.0)
        self.assertEqual(refusal.retry_after_header, "3400")
        clock.advance(3399.5)
        self.assertIsInstance(book.reserve(AGENT, budget, 0.5), Refusal)
        clock.advance(0.5)
        self.assertIsInstance(book.reserve(AGENT, budget, 0.5), Reservation)

    def test_rolling_window_needs_two_entries(self) -> None:
        clock, book = make_book(start=100.0)
        budget = parse_budget({"limit_usd": 1.0, "window": "1h", "behavior": "rate_limit"})
        for cost in (0.3, 0.3, 0.3):
            book.settle(book.reserve(AGENT, budget, cost), cost)
            clock.advance(60)
        # now 280: 0.9 committed; 0.7 needs 0.6 to leave: the second entry at 160.
        self.assertEqual(book.reserve(AGENT, budget, 0.7).retry_after, 160 + 3600 - 280)

    def test_never_fits(self) -> None:
        _, book = make_book()
        budget = parse_budget({"limit_usd": 1.0, "window": "1h"})
        refusal = book.reserve(AGENT, budget, 1.5)
        self.assertEqual(refusal.code, BUDGET_EXCEEDED)
        self.assertIsNone(refusal.retry_after)
        self.assertIsNone(refusal.retry_after_header)

    def test_inflight_only(self) -> None:
        _, book = make_book()
        book.inflight_retry_after = 2.5
        budget = parse_budget({"limit_usd": 1.0, "max_requests": 2, "window": "1h"})
        book.reserve(AGENT, budget, 0.6)
        refusal = book.reserve(AGENT, budget, 0.6)
        self.assertEqual((refusal.retry_after, refusal.retry_after_header), (2.5, "3"))

    def test_calendar_period(self) -> None:
        _, book = make_book(start=ts("2024-06-15T18:00:00+00:00"))
        budget = parse_budget({"limit_usd": 1.0, "period": "weekly", "behavior": "rate_limit"})
        book.settle(book.reserve(AGENT, budget, 0.9), 0.9)
        refusal = book.reserve(AGENT, budget, 0.5)
        # Saturday 18:00 UTC to Monday 00:00 UTC.
        self.assertEqual(refusal.retry_after, 30 * 3600)

    def test_header_rounds_up(self) -> None:
        refusal = Refusal(429, RATE_LIMITED, "m", parse_budget({"max_requests": 1, "window": "1h"}), 0.2, 0, 0.0, 0)
        self.assertEqual(refusal.retry_after_header, "1")
        self.assertEqual(attrs_evolve(refusal, retry_after=10.0).retry_after_header, "10")
        self.assertEqual(attrs_evolve(refusal, retry_after=10.3).retry_after_header, "11")


def attrs_evolve(instance, **changes):
    import attrs

    return attrs.evolve(instance, **changes)


class UnpricedTests(SynchronousTestCase):
    def test_refuse(self) -> None:
        _, book = make_book(unpriced="refuse")
        budget = parse_budget({"limit_usd": 1.0, "window": "1h"})
        refusal = book.reserve(AGENT, budget, None)
        self.assertEqual((refusal.status, refusal.code, refusal.retry_after), (403, UNPRICED_MODEL, None))
        self.assertEqual(
            refusal_body(refusal)["error"],
            {"message": refusal.message, "type": "unpriced_model", "code": "unpriced_model"},
        )

    def test_allow_counts_requests_only(self) -> None:
        _, book = make_book(unpriced="allow")
        budget = parse_budget({"limit_usd": 1.0, "max_requests": 2, "window": "1h"})
        held = book.reserve(AGENT, budget, None)
        self.assertTrue(held.unpriced)
        self.assertEqual(held.worst_case_usd, 0.0)
        book.settle(held, None)
        usage = book.usage(AGENT, budget)
        self.assertEqual((usage.cost_usd, usage.requests, usage.unknown_cost_requests), (0.0, 1, 1))
        book.settle(book.reserve(AGENT, budget, None), None)
        refusal = book.reserve(AGENT, budget, None)
        self.assertEqual((refusal.code, refusal.unknown_cost_requests), (RATE_LIMITED, 2))

    def test_allow_with_reported_cost(self) -> None:
        _, book = make_book(unpriced="allow")
        budget = parse_budget({"limit_usd": 1.0, "window": "1h"})
        book.settle(book.reserve(AGENT, budget, None), 0.25)  # e.g. OpenRouter's usage.cost
        usage = book.usage(AGENT, budget)
        self.assertEqual((usage.cost_usd, usage.unknown_cost_requests), (0.25, 0))

    def test_request_only_budget_ignores_prices(self) -> None:
        _, book = make_book(unpriced="refuse")
        budget = parse_budget({"max_requests": 5, "window": "1h"})
        self.assertIsInstance(book.reserve(AGENT, budget, None), Reservation)

    def test_soft_alert_never_refuses_unpriced(self) -> None:
        _, book = make_book(unpriced="refuse")
        budget = parse_budget({"limit_usd": 1.0, "window": "1h", "behavior": "soft_alert"})
        held = book.reserve(AGENT, budget, None)
        self.assertTrue(held.unpriced)


class RefusalBodyTests(SynchronousTestCase):
    def test_exact_shape(self) -> None:
        _, book = make_book(unpriced="allow")
        budget = parse_budget({"limit_usd": 1.0, "max_requests": 10, "window": "24h"})
        book.settle(book.reserve(AGENT, budget, 0.7), 0.7)
        book.settle(book.reserve(AGENT, budget, None), None)
        refusal = book.reserve(AGENT, budget, 0.5)
        body = refusal_body(refusal)
        self.assertEqual(
            body,
            {
                "error": {"message": "budget exceeded", "type": "budget_exceeded", "code": "budget_exceeded"},
                "budget": {
                    "behavior": "hard_stop",
                    "window": "24h",
                    "requests": 2,
                    "reported_cost_usd": 0.7,
                    "unknown_cost_requests": 1,
                    "limit_usd": 1.0,
                    "max_requests": 10,
                },
            },
        )
        self.assertEqual(list(body), ["error", "budget"])
        json.dumps(body)

    def test_optional_limits_absent(self) -> None:
        _, book = make_book()
        budget = parse_budget({"max_requests": 1, "period": "daily", "behavior": "rate_limit"})
        book.settle(book.reserve(AGENT, budget, 0.0), 0.0)
        body = refusal_body(book.reserve(AGENT, budget, 0.0))
        self.assertEqual(
            body,
            {
                "error": {
                    "message": "request rate limit exceeded",
                    "type": "rate_limited",
                    "code": "rate_limited",
                },
                "budget": {
                    "behavior": "rate_limit",
                    "window": "daily",
                    "requests": 1,
                    "reported_cost_usd": 0.0,
                    "unknown_cost_requests": 0,
                    "max_requests": 1,
                },
            },
        )


class SeedAndOffsetTests(SynchronousTestCase):
    def test_load_from_ledger_rows(self) -> None:
        clock, book = make_book()
        budget = parse_budget({"limit_usd": 1.0, "window": "1h"})
        book.load(
            AGENT,
            [
                (START - 7200, 5.0, True),  # outside the window
                (START - 600, 0.25, True, True),
                (START - 300, 0.0, True, False),  # unpriced
                (START - 60, 0.5, False),  # not a request (e.g. refused)
                (float("nan"), 1.0, True),
            ],
        )
        usage = book.usage(AGENT, budget)
        self.assertEqual((usage.cost_usd, usage.requests, usage.unknown_cost_requests), (0.75, 2, 1))
        refusal = book.reserve(AGENT, budget, 0.5)
        # 0.25 must leave: the row at START - 600 leaves at START + 3000.
        self.assertEqual(refusal.retry_after, 3000.0)

    def test_load_replace(self) -> None:
        _, book = make_book()
        budget = parse_budget({"limit_usd": 1.0, "window": "1h"})
        book.load(AGENT, [(START - 10, 0.5, True)])
        held = book.reserve(AGENT, budget, 0.1)
        book.load(AGENT, [(START - 5, 0.2, True)], replace=True)
        usage = book.usage(AGENT, budget)
        self.assertEqual((usage.cost_usd, usage.reserved_usd), (0.2, 0.1))
        book.settle(held, 0.1)

    def test_spent_offset_counts_in_the_current_period_only(self) -> None:
        clock, book = make_book(start=ts("2024-06-15T22:00:00+00:00"))
        budget = parse_budget({"limit_usd": 1.0, "period": "daily", "spent_offset_usd": 0.6})
        refusal = book.reserve(AGENT, budget, 0.5)
        self.assertEqual((refusal.reported_cost_usd, refusal.retry_after), (0.6, 7200.0))
        self.assertIsInstance(book.reserve(AGENT, budget, 0.4), Reservation)
        clock.advance(7200)
        self.assertEqual(book.usage(AGENT, budget).cost_usd, 0.0)
        self.assertIsInstance(book.reserve(AGENT, budget, 0.5), Reservation)

    def test_changed_offset_is_anchored_again(self) -> None:
        clock, book = make_book(start=ts("2024-06-15T22:00:00+00:00"))
        budget = parse_budget({"limit_usd": 1.0, "period": "daily", "spent_offset_usd": 0.6})
        book.usage(AGENT, budget)
        clock.advance(7200)
        self.assertEqual(book.usage(AGENT, budget).cost_usd, 0.0)
        updated = parse_budget({"limit_usd": 1.0, "period": "daily", "spent_offset_usd": 0.3})
        self.assertEqual(book.usage(AGENT, updated).cost_usd, 0.3)

    def test_offset_in_rolling_window_retry(self) -> None:
        clock, book = make_book()
        budget = parse_budget({"limit_usd": 1.0, "window": "1h", "spent_offset_usd": 0.8})
        book.usage(AGENT, budget)
        clock.advance(100)
        self.assertEqual(book.reserve(AGENT, budget, 0.5).retry_after, 3500.0)


class ChooseModelTests(SynchronousTestCase):
    TIERS = [
        {"threshold": 0.5, "models": ["anthropic/claude-opus-4-5"]},
        {"threshold": 0.0, "models": ["anthropic/claude-haiku-4-5"]},
    ]

    def test_without_tiers(self) -> None:
        _, book = make_book()
        budget = parse_budget({"limit_usd": 1.0, "window": "1h"})
        self.assertEqual(book.choose_model(AGENT, budget, "a/b"), TierDecision("a/b"))

    def test_downgrade_as_budget_runs_down(self) -> None:
        _, book = make_book()
        budget = parse_budget({"limit_usd": 1.0, "window": "1h", "tiers": self.TIERS})
        first = book.choose_model(AGENT, budget, "anthropic/claude-opus-4-5")
        self.assertEqual((first.ref, first.intervention, first.remaining_fraction), ("anthropic/claude-opus-4-5", None, 1.0))
        # Reservations count: 0.5 held leaves exactly 0.5, which is not above 0.5.
        held = book.reserve(AGENT, budget, 0.5)
        second = book.choose_model(AGENT, budget, "anthropic/claude-opus-4-5")
        self.assertEqual((second.ref, second.intervention), ("anthropic/claude-haiku-4-5", BUDGET_TIER_DOWNGRADE))
        self.assertEqual(book.remaining_fraction(AGENT, budget), 0.5)
        book.release(held)
        self.assertEqual(book.choose_model(AGENT, budget, "anthropic/claude-opus-4-5").intervention, None)

    def test_exhausted_is_refused(self) -> None:
        clock, book = make_book()
        budget = parse_budget({"limit_usd": 1.0, "window": "1h", "behavior": "rate_limit", "tiers": self.TIERS})
        book.settle(book.reserve(AGENT, budget, 1.0), 1.0)
        refusal = book.choose_model(AGENT, budget, "anthropic/claude-opus-4-5")
        self.assertIsInstance(refusal, Refusal)
        self.assertEqual((refusal.code, refusal.retry_after), (RATE_LIMITED, 3600.0))
        clock.advance(3600)
        self.assertEqual(
            book.choose_model(AGENT, budget, "anthropic/claude-opus-4-5").ref, "anthropic/claude-opus-4-5"
        )

    def test_exhausted_by_inflight(self) -> None:
        _, book = make_book()
        budget = parse_budget({"limit_usd": 1.0, "window": "1h", "tiers": self.TIERS})
        book.reserve(AGENT, budget, 1.0)
        refusal = book.choose_model(AGENT, budget, "anthropic/claude-opus-4-5")
        self.assertEqual((refusal.code, refusal.retry_after), (BUDGET_EXCEEDED, 1.0))

    def test_soft_alert_keeps_lowest_tier(self) -> None:
        _, book = make_book()
        budget = parse_budget({"limit_usd": 1.0, "window": "1h", "behavior": "soft_alert", "tiers": self.TIERS})
        book.settle(book.reserve(AGENT, budget, 2.0), 2.0)
        decision = book.choose_model(AGENT, budget, "anthropic/claude-opus-4-5")
        self.assertEqual(decision.ref, "anthropic/claude-haiku-4-5")
        self.assertEqual(decision.remaining_fraction, 0.0)
