"""
Tests for L{cllama_tx.governance.output_limit}: the output limit a budget
lowers a request to (the dearest candidate, C{n}, thinking budgets, the
floor), and the bodies it is written into, in the fields each wire format
reads; plus the budget book's pieces it relies on (L{affordable_max_tokens}
with candidates, L{worst_input_cost}, L{BudgetBook.headroom}, the refusal's
new fields).
"""

from __future__ import annotations

import copy
import json

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting.pricing import Price
from cllama_tx.governance.budgets import (
    BudgetBook,
    Headroom,
    Refusal,
    affordable_max_tokens,
    parse_budget,
    refusal_body,
    worst_case_cost,
    worst_input_cost,
)
from cllama_tx.governance.output_limit import (
    MIN_THINKING_TOKENS,
    OutputLimit,
    fit_output,
    least_output,
    limit_body,
    limit_field,
)
from cllama_tx.governance.request_cost import RequestShape, read_request, worst_input_tokens
from cllama_tx.surfaces.matrix import split_model_ref


class FakePricing:
    def __init__(self, table: dict) -> None:
        self.table = table

    def price(self, provider: str, model: str) -> Price | None:
        return self.table.get((provider, model))


PRICING = FakePricing(
    {
        ("anthropic", "claude-opus-test"): Price(input=15.0, output=75.0, max_output_tokens=32_000),
        ("anthropic", "claude-sonnet-test"): Price(input=3.0, output=15.0, max_output_tokens=64_000),
        ("openai", "gpt-test"): Price(input=2.0, output=8.0, max_output_tokens=16_000),
        ("openrouter", "cheap/model"): Price(input=0.1, output=0.4),
    }
)
OPUS = split_model_ref("anthropic/claude-opus-test")
SONNET = split_model_ref("anthropic/claude-sonnet-test")
GPT = split_model_ref("openai/gpt-test")
UNPRICED = split_model_ref("anthropic/no-price")


def worst(shape: RequestShape, refs) -> float:
    costs = [
        worst_case_cost(
            PRICING, r.provider, r.model, worst_input_tokens(shape, r.provider, r.model), shape.max_tokens,
            choices=shape.choices, min_output_tokens=shape.thinking_budget or 0,
            extra_output_tokens=shape.prediction_bytes,
        )
        for r in refs
    ]
    return max(c for c in costs if c is not None)


class FitOutputTests(SynchronousTestCase):
    def test_lowered_to_what_is_left(self) -> None:
        """A Claude Code request (max_tokens 32,000) with $0.95 left: lowered until it fits."""
        shape = RequestShape(text_bytes=20_000, max_tokens=32_000)
        self.assertGreater(worst(shape, [OPUS]), 0.95)
        limit = fit_output(PRICING, [OPUS], shape, 0.95, 256)
        # (0.95 - 20,000 * $15/M) / $75/M
        self.assertEqual(limit, OutputLimit(max_tokens=8666, from_max_tokens=32_000, available_usd=0.95))
        lowered = limit.shape(shape)
        self.assertLessEqual(worst(lowered, [OPUS]), 0.95)
        self.assertGreater(worst(attrs.evolve(lowered, max_tokens=8667), [OPUS]), 0.95)

    def test_nothing_to_lower_when_it_fits(self) -> None:
        shape = RequestShape(text_bytes=20_000, max_tokens=32_000)
        self.assertIsNone(fit_output(PRICING, [SONNET], shape, 0.95, 256))

    def test_dearest_candidate_decides(self) -> None:
        shape = RequestShape(text_bytes=1_000, max_tokens=32_000)
        both = fit_output(PRICING, [SONNET, OPUS], shape, 0.5, 256)
        opus = fit_output(PRICING, [OPUS], shape, 0.5, 256)
        self.assertEqual(both.max_tokens, opus.max_tokens)
        self.assertLessEqual(worst(both.shape(shape), [SONNET, OPUS]), 0.5)

    def test_unpriced_candidates_are_not_held(self) -> None:
        shape = RequestShape(text_bytes=1_000, max_tokens=32_000)
        self.assertEqual(
            fit_output(PRICING, [UNPRICED, OPUS], shape, 0.5, 256), fit_output(PRICING, [OPUS], shape, 0.5, 256)
        )
        self.assertIsNone(fit_output(PRICING, [UNPRICED], shape, 0.5, 256))

    def test_n_divides_the_output(self) -> None:
        """Four candidates share what is left: each gets a quarter."""
        one = fit_output(PRICING, [GPT], RequestShape(text_bytes=1_000, max_tokens=16_000), 0.05, 256)
        four = fit_output(PRICING, [GPT], RequestShape(text_bytes=1_000, max_tokens=16_000, choices=4), 0.05, 256)
        self.assertEqual(one.max_tokens, (0.05 * 1e6 - 2_000) // 8)
        self.assertEqual(four.max_tokens, (0.05 * 1e6 - 2_000) // 32)
        shape = RequestShape(text_bytes=1_000, max_tokens=16_000, choices=4)
        self.assertLessEqual(worst(four.shape(shape), [GPT]), 0.05)

    def test_predicted_output_is_paid_first(self) -> None:
        shape = RequestShape(text_bytes=1_000, max_tokens=16_000, prediction_bytes=1_000)
        limit = fit_output(PRICING, [GPT], shape, 0.05, 256)
        self.assertEqual(limit.max_tokens, (0.05 * 1e6 - 2_000 - 8_000) // 8)
        self.assertLessEqual(worst(limit.shape(shape), [GPT]), 0.05)

    def test_no_max_tokens(self) -> None:
        """A request without max_tokens reserves by the same rule: it gets one."""
        shape = RequestShape(text_bytes=1_000)
        limit = fit_output(PRICING, [OPUS], shape, 0.5, 256)
        self.assertEqual((limit.from_max_tokens, limit.max_tokens), (None, (0.5 * 1e6 - 15_000) // 75))

    def test_floor(self) -> None:
        """When not even the floor fits, the floor: for the budget to refuse with its reasons."""
        shape = RequestShape(text_bytes=1_000, max_tokens=32_000)
        limit = fit_output(PRICING, [OPUS], shape, 0.001, 256)
        self.assertEqual(limit.max_tokens, 256)
        self.assertGreater(worst(limit.shape(shape), [OPUS]), 0.001)

    def test_floor_is_at_most_what_was_asked(self) -> None:
        """A request asking for no more than the floor is never lowered."""
        self.assertEqual(least_output(RequestShape(text_bytes=1, max_tokens=300), 256), 256)
        self.assertIsNone(least_output(RequestShape(text_bytes=1, max_tokens=256), 256))
        self.assertIsNone(least_output(RequestShape(text_bytes=1, max_tokens=100), 256))
        self.assertIsNone(fit_output(PRICING, [OPUS], RequestShape(text_bytes=1, max_tokens=200), 0.001, 256))
        self.assertEqual(least_output(RequestShape(text_bytes=1), 256), 256)

    def test_switched_off(self) -> None:
        self.assertIsNone(least_output(RequestShape(text_bytes=1, max_tokens=32_000), 0))
        self.assertIsNone(fit_output(PRICING, [OPUS], RequestShape(text_bytes=1, max_tokens=32_000), 0.5, 0))

    def test_thinking_budget_lowered_with_it(self) -> None:
        """The answer keeps at least the floor: the thinking budget gives way."""
        shape = RequestShape(text_bytes=1_000, max_tokens=32_000, thinking_budget=30_000)
        limit = fit_output(PRICING, [OPUS], shape, 0.5, 256)
        tokens = (0.5 * 1e6 - 15_000) // 75
        self.assertEqual(
            (limit.max_tokens, limit.thinking_budget, limit.from_thinking_budget), (tokens, tokens - 256, 30_000)
        )
        self.assertEqual(limit.shape(shape).output_tokens(None), tokens)
        self.assertLessEqual(worst(limit.shape(shape), [OPUS]), 0.5)

    def test_small_thinking_budget_kept(self) -> None:
        shape = RequestShape(text_bytes=1_000, max_tokens=32_000, thinking_budget=2_000)
        limit = fit_output(PRICING, [OPUS], shape, 0.5, 256)
        self.assertIsNone(limit.thinking_budget)
        self.assertEqual(limit.shape(shape).thinking_budget, 2_000)

    def test_thinking_floor(self) -> None:
        """Thinking is never lowered below Anthropic's 1,024: the floor is that plus the answer's."""
        shape = RequestShape(text_bytes=1_000, max_tokens=32_000, thinking_budget=10_000)
        self.assertEqual(least_output(shape, 256), 256 + MIN_THINKING_TOKENS)
        limit = fit_output(PRICING, [OPUS], shape, 0.01, 256)
        self.assertEqual((limit.max_tokens, limit.thinking_budget), (256 + MIN_THINKING_TOKENS, MIN_THINKING_TOKENS))
        self.assertIsNone(least_output(RequestShape(text_bytes=1, max_tokens=1_200, thinking_budget=1_024), 256))


LIMIT = OutputLimit(max_tokens=1_000, from_max_tokens=32_000)


class LimitBodyTests(SynchronousTestCase):
    def test_anthropic(self) -> None:
        doc = {"model": "claude", "max_tokens": 32_000, "messages": []}
        original = copy.deepcopy(doc)
        self.assertEqual(limit_body(doc, "anthropic", "anthropic", LIMIT)["max_tokens"], 1_000)
        self.assertEqual(doc, original)

    def test_field_when_absent(self) -> None:
        """OpenAI itself gets max_completion_tokens (its reasoning models refuse max_tokens); others max_tokens."""
        doc = {"model": "m", "messages": []}
        self.assertEqual(limit_body(doc, "openai", "openai", LIMIT)["max_completion_tokens"], 1_000)
        self.assertNotIn("max_tokens", limit_body(doc, "openai", "openai", LIMIT))
        self.assertEqual(limit_body(doc, "openai", "openai@azure-east", LIMIT)["max_completion_tokens"], 1_000)
        for provider in ("openrouter", "google", "xai", "ollama"):
            out = limit_body(doc, "openai", provider, LIMIT)
            self.assertEqual((out["max_tokens"], "max_completion_tokens" in out), (1_000, False), provider)
        self.assertEqual(limit_body(doc, "anthropic", "anthropic", LIMIT)["max_tokens"], 1_000)
        self.assertEqual(doc, {"model": "m", "messages": []})
        self.assertEqual(limit_field("anthropic", "openai"), "max_tokens")

    def test_field_the_agent_used_is_kept(self) -> None:
        """The agent's own field is lowered; no second field is added beside it."""
        out = limit_body({"max_tokens": 5_000}, "openai", "openai", LIMIT)
        self.assertEqual(out, {"max_tokens": 1_000})
        out = limit_body({"max_completion_tokens": 5_000, "max_tokens": 2_000}, "openai", "openrouter", LIMIT)
        self.assertEqual(out, {"max_completion_tokens": 1_000, "max_tokens": 1_000})

    def test_smaller_values_and_strings(self) -> None:
        out = limit_body({"max_tokens": 500, "max_completion_tokens": "32000"}, "openai", "openai", LIMIT)
        self.assertEqual(out, {"max_tokens": 500, "max_completion_tokens": 1_000})

    def test_gemini_nested(self) -> None:
        doc = {
            "generationConfig": {"maxOutputTokens": 8_000, "temperature": 1},
            "extra_body": {"google": {"generation_config": {"max_output_tokens": 9_000}, "x": 1}},
        }
        original = copy.deepcopy(doc)
        out = limit_body(doc, "openai", "google", LIMIT)
        self.assertEqual(out["generationConfig"], {"maxOutputTokens": 1_000, "temperature": 1})
        self.assertEqual(out["extra_body"]["google"], {"generation_config": {"max_output_tokens": 1_000}, "x": 1})
        self.assertEqual(out["max_tokens"], 1_000)
        self.assertEqual(doc, original)

    def test_thinking_budgets(self) -> None:
        limit = OutputLimit(max_tokens=2_000, from_max_tokens=32_000, thinking_budget=1_744, from_thinking_budget=30_000)
        doc = {"max_tokens": 32_000, "thinking": {"type": "enabled", "budget_tokens": 30_000}}
        out = limit_body(doc, "anthropic", "anthropic", limit)
        self.assertEqual(out, {"max_tokens": 2_000, "thinking": {"type": "enabled", "budget_tokens": 1_744}})
        self.assertEqual(doc["thinking"]["budget_tokens"], 30_000)
        out = limit_body({"reasoning": {"max_tokens": 30_000}}, "openai", "openrouter", limit)
        self.assertEqual(out, {"reasoning": {"max_tokens": 1_744}, "max_tokens": 2_000})
        out = limit_body({"generationConfig": {"thinkingConfig": {"thinkingBudget": 9_000}}}, "openai", "google", limit)
        self.assertEqual(out["generationConfig"], {"thinkingConfig": {"thinkingBudget": 1_744}})
        # Unchanged when the limit keeps the thinking budget.
        out = limit_body({"thinking": {"type": "enabled", "budget_tokens": 1_500}}, "anthropic", "anthropic", LIMIT)
        self.assertEqual(out["thinking"]["budget_tokens"], 1_500)

    def test_what_is_sent_is_what_was_held(self) -> None:
        """Whatever the reader counts as output, the writer has lowered: read back, the limit is the limit."""
        limit = OutputLimit(max_tokens=700, from_max_tokens=None, thinking_budget=400, from_thinking_budget=5_000)
        docs = [
            {"messages": []},
            {"max_tokens": 9_000},
            {"max_completion_tokens": 9_000, "max_tokens": "8000.5"},
            {"max_output_tokens": 9_000},
            {"generationConfig": {"maxOutputTokens": 9_000}, "generation_config": {"max_output_tokens": 9_000}},
            {"extra_body": {"google": {"generationConfig": {"maxOutputTokens": 9_000}, "maxOutputTokens": 9_000}}},
            {"max_tokens": 9_000, "thinking": {"type": "enabled", "budget_tokens": 5_000}},
            {"reasoning": {"max_tokens": 5_000}, "extra_body": {"google": {"thinking_config": {"thinking_budget": 5_000}}}},
        ]
        for doc in docs:
            for wire, provider in (("openai", "openai"), ("openai", "openrouter"), ("anthropic", "anthropic")):
                out = limit_body(doc, wire, provider, limit)
                shape = read_request(out, len(json.dumps(out)))
                self.assertEqual(shape.max_tokens, 700, (doc, provider))
                self.assertLessEqual(shape.thinking_budget or 0, 400, doc)


class BookPiecesTests(SynchronousTestCase):
    def test_affordable_with_candidates_and_prediction(self) -> None:
        self.assertEqual(affordable_max_tokens(PRICING, "openai", "gpt-test", 1_000, 0.05, choices=4), 1_500)
        self.assertEqual(
            affordable_max_tokens(PRICING, "openai", "gpt-test", 1_000, 0.05, extra_output_tokens=1_000), 5_000
        )
        self.assertEqual(affordable_max_tokens(PRICING, "openai", "gpt-test", 1_000, 0.001, choices=4), 0)
        tokens = affordable_max_tokens(PRICING, "openai", "gpt-test", 777, 0.0123, choices=3, extra_output_tokens=11)
        fits = worst_case_cost(PRICING, "openai", "gpt-test", 777, tokens, choices=3, extra_output_tokens=11)
        over = worst_case_cost(PRICING, "openai", "gpt-test", 777, tokens + 1, choices=3, extra_output_tokens=11)
        self.assertLessEqual(fits, 0.0123)
        self.assertGreater(over, 0.0123)

    def test_worst_input_cost(self) -> None:
        self.assertAlmostEqual(worst_input_cost(PRICING, "anthropic", "claude-opus-test", 20_000), 0.3)
        self.assertIsNone(worst_input_cost(PRICING, "anthropic", "no-price", 20_000))

    def test_headroom(self) -> None:
        clock = Clock()
        clock.advance(1_000_000)
        book = BudgetBook(clock, PRICING)
        budget = parse_budget({"limit_usd": 1.0, "window": "1h"})
        book.load("k", [(clock.seconds(), 0.05, True)])
        self.assertEqual(book.headroom("k", budget), Headroom(settled=0.95, now=0.95))
        held = book.reserve("k", budget, 0.5)
        room = book.headroom("k", budget)
        self.assertAlmostEqual(room.settled, 0.95)
        self.assertAlmostEqual(room.now, 0.45)
        book.settle(held, 0.95)
        self.assertEqual(book.headroom("k", budget), Headroom(settled=0.0, now=0.0))
        self.assertIsNone(book.headroom("k", parse_budget({"max_requests": 3, "window": "1h"})))

    def test_headroom_of_a_stopped_budget(self) -> None:
        """A stopped hard_stop budget has nothing left until it resets, even as old spend leaves."""
        clock = Clock()
        clock.advance(1_000_000)
        book = BudgetBook(clock, PRICING)
        budget = parse_budget({"limit_usd": 1.0, "window": "1h"})
        book.load("k", [(clock.seconds(), 0.6, True)])
        clock.advance(600)
        book.load("k", [(clock.seconds(), 0.4, True)])
        self.assertIsInstance(book.reserve("k", budget, 0.01), Refusal)  # exhausted: stopped
        clock.advance(3_000 + 1)  # the first 0.6 has left the window, the trip has not ended
        self.assertEqual(book.headroom("k", budget), Headroom(settled=0.0, now=0.0))

    def test_refusal_body_fields(self) -> None:
        budget = parse_budget({"limit_usd": 1.0, "window": "24h"})
        refusal = Refusal(429, "budget_exceeded", "budget exceeded: $0.01 left", budget, None, 2, 0.99, 0,
                          remaining_usd=0.01, input_cost_usd=0.03, min_request_cost_usd=0.05)
        body = refusal_body(refusal)
        self.assertEqual(body["error"]["message"], "budget exceeded: $0.01 left")
        self.assertEqual(
            body["budget"],
            {"behavior": "hard_stop", "window": "24h", "requests": 2, "reported_cost_usd": 0.99,
             "unknown_cost_requests": 0, "limit_usd": 1.0, "remaining_usd": 0.01, "input_cost_usd": 0.03,
             "min_request_cost_usd": 0.05},
        )
        plain = refusal_body(Refusal(429, "budget_exceeded", "budget exceeded", budget, None, 2, 0.99, 0))
        self.assertNotIn("remaining_usd", plain["budget"])
