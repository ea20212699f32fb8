"""
Tests for L{cllama_tx.governance.request_cost} and its data,
L{cllama_tx.governance.billing_rules}: each shape a provider bills beyond
the body's text (candidates, images, documents, tools, thinking, predicted
outputs), the per-model rules, and that the estimate is never below what a
provider billing the most it can (L{cllama_tx.testing.billing}) reports.
"""

from __future__ import annotations

import json
import random

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting.pricing import Price
from cllama_tx.governance import billing_rules
from cllama_tx.governance.billing_rules import (
    CLAUDE_HIGH_RES_IMAGE,
    CLAUDE_STANDARD_IMAGE,
    MAX_CONTEXT_TOKENS,
    MAX_IMAGE_TOKENS,
    PAGE_TEXT_TOKENS,
    TOOL_WRAPPER_TOKENS,
    UNKNOWN_BUILTIN_TOOL_TOKENS,
    rules_for,
)
from cllama_tx.governance.budgets import worst_case_cost
from cllama_tx.governance.request_cost import RequestShape, read_request, worst_input_tokens
from cllama_tx.testing.billing import BillingModel

B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC" * 50
GPT_4O_IMAGE = 85 + 8 * 170


def shape_of(doc: dict) -> tuple[RequestShape, int]:
    size = len(json.dumps(doc).encode())
    return read_request(doc, size), size


def user(*parts) -> dict:
    return {"role": "user", "content": list(parts)}


def chat(*messages, **extra) -> dict:
    return {"model": "openai/gpt-4o", "messages": list(messages) or [{"role": "user", "content": "hi"}], **extra}


def image_url(url: str = "https://example.com/cat.png", detail: str | None = None) -> dict:
    image = {"url": url}
    if detail is not None:
        image["detail"] = detail
    return {"type": "image_url", "image_url": image}


class TextTests(SynchronousTestCase):
    def test_plain_text_is_bounded_by_the_body_bytes(self) -> None:
        shape, size = shape_of(chat())
        self.assertEqual(shape, RequestShape(text_bytes=size))
        self.assertEqual(worst_input_tokens(shape, "openai", "gpt-4o"), size)

    def test_an_empty_body_still_counts_one_token(self) -> None:
        self.assertEqual(worst_input_tokens(read_request({}, 0), "openai", "gpt-4o"), 1)

    def test_audio_stays_counted_as_its_base64_bytes(self) -> None:
        shape, size = shape_of(chat(user({"type": "input_audio", "input_audio": {"data": B64, "format": "wav"}})))
        self.assertEqual(shape.text_bytes, size)
        self.assertEqual(shape.images, 0)

    def test_a_fake_image_inside_tool_input_is_text(self) -> None:
        # Only content blocks are media: base64 inside a tool call's input is
        # text the provider bills as text, so its bytes stay counted.
        fake = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64}}
        doc = {
            "model": "claude-sonnet-4-5",
            "messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": fake}]}],
        }
        shape, size = shape_of(doc)
        self.assertEqual((shape.text_bytes, shape.images), (size, 0))


class CandidateTests(SynchronousTestCase):
    def test_n(self) -> None:
        self.assertEqual(shape_of(chat(n=8))[0].choices, 8)
        self.assertEqual(shape_of(chat())[0].choices, 1)

    def test_every_spelling_of_candidates_counts_and_the_largest_wins(self) -> None:
        for extra, expected in [
            ({"best_of": 5, "n": 2}, 5),
            ({"candidate_count": 3}, 3),
            ({"candidateCount": 4}, 4),
            ({"generationConfig": {"candidateCount": 6}}, 6),
            ({"generation_config": {"candidate_count": 7}}, 7),
            ({"extra_body": {"google": {"candidate_count": 9}}}, 9),
            ({"extra_body": {"google": {"generation_config": {"candidate_count": 10}}}}, 10),
        ]:
            self.assertEqual(shape_of(chat(**extra))[0].choices, expected, extra)

    def test_lenient_numbers_count_and_nonsense_does_not(self) -> None:
        # A lenient OpenAI-compatible server reads "8" and 7.5 as numbers.
        self.assertEqual(shape_of(chat(n="8"))[0].choices, 8)
        self.assertEqual(shape_of(chat(n=7.5))[0].choices, 8)
        for nonsense in (True, 0, -3, "many", None, [8], float("inf")):
            self.assertEqual(read_request({"n": nonsense}, 10).choices, 1, nonsense)

    def test_output_side_multiplies(self) -> None:
        pricing = _Pricing(Price(input=2.0, output=10.0, max_output_tokens=16_000))
        # 100 in at 2, 8 x 1000 out at 10.
        self.assertAlmostEqual(
            worst_case_cost(pricing, "openai", "gpt-4o", 100, 1000, choices=8), (100 * 2 + 8000 * 10) / 1e6
        )
        # No max_tokens: 8 x the model's output limit.
        self.assertAlmostEqual(
            worst_case_cost(pricing, "openai", "gpt-4o", 100, None, choices=8), (100 * 2 + 8 * 16_000 * 10) / 1e6
        )


class OutputLimitTests(SynchronousTestCase):
    def test_max_tokens_spellings(self) -> None:
        self.assertEqual(shape_of(chat(max_tokens=100))[0].max_tokens, 100)
        self.assertEqual(shape_of(chat(max_completion_tokens=200))[0].max_tokens, 200)
        self.assertEqual(shape_of(chat(max_tokens=100, max_completion_tokens=300))[0].max_tokens, 300)
        self.assertEqual(shape_of(chat(generationConfig={"maxOutputTokens": 50}))[0].max_tokens, 50)
        self.assertIsNone(shape_of(chat())[0].max_tokens)

    def test_thinking_budget_above_max_tokens(self) -> None:
        doc = {"model": "claude-sonnet-4-5", "max_tokens": 1000, "thinking": {"type": "enabled", "budget_tokens": 4000}}
        shape = read_request(doc, 100)
        self.assertEqual((shape.max_tokens, shape.thinking_budget), (1000, 4000))
        self.assertEqual(shape.output_tokens(64_000), 4000)
        pricing = _Pricing(Price(input=3.0, output=15.0))
        self.assertAlmostEqual(
            worst_case_cost(pricing, "anthropic", "m", 100, 1000, min_output_tokens=4000), (300 + 4000 * 15) / 1e6
        )
        # Without max_tokens: the model's limit, or the budget if larger.
        self.assertEqual(read_request({"thinking": {"budget_tokens": 10}}, 1).output_tokens(64_000), 64_000)

    def test_other_thinking_spellings(self) -> None:
        self.assertEqual(read_request({"reasoning": {"max_tokens": 700}}, 1).thinking_budget, 700)
        doc = {"extra_body": {"google": {"thinking_config": {"thinking_budget": 800}}}}
        self.assertEqual(read_request(doc, 1).thinking_budget, 800)
        doc = {"generationConfig": {"thinkingConfig": {"thinkingBudget": 900}}}
        self.assertEqual(read_request(doc, 1).thinking_budget, 900)

    def test_prediction_is_billed_as_output(self) -> None:
        doc = chat(prediction={"type": "content", "content": "héllo"})
        self.assertEqual(shape_of(doc)[0].prediction_bytes, 6)
        doc = chat(prediction={"type": "content", "content": [{"type": "text", "text": "abc"}]})
        self.assertEqual(shape_of(doc)[0].prediction_bytes, 3)
        pricing = _Pricing(Price(input=1.0, output=10.0))
        self.assertAlmostEqual(
            worst_case_cost(pricing, "openai", "m", 0, 10, choices=2, extra_output_tokens=6), 26 * 10 / 1e6
        )


class ImageTests(SynchronousTestCase):
    def test_three_image_urls_on_gpt_4o(self) -> None:
        shape, size = shape_of(chat(user(image_url(), image_url(), image_url())))
        self.assertEqual((shape.images, shape.low_detail_images, shape.text_bytes), (3, 0, size))
        self.assertEqual(worst_input_tokens(shape, "openai", "gpt-4o"), size + 3 * GPT_4O_IMAGE)

    def test_inline_data_is_counted_as_an_image_not_as_text(self) -> None:
        url = "data:image/png;base64," + B64
        shape, size = shape_of(chat(user(image_url(url), {"type": "text", "text": "what is it?"})))
        self.assertEqual(shape.text_bytes, size - len(url))
        self.assertEqual(worst_input_tokens(shape, "openai", "gpt-4o"), size - len(url) + GPT_4O_IMAGE)

    def test_low_detail(self) -> None:
        shape, size = shape_of(chat(user(image_url(detail="low"), image_url(detail="high"))))
        self.assertEqual((shape.images, shape.low_detail_images), (2, 1))
        self.assertEqual(worst_input_tokens(shape, "openai", "gpt-4o"), size + 85 + GPT_4O_IMAGE)
        # gpt-4o-mini's documented multiplier: 2,833 low, 2,833 + 8 x 5,667 high.
        self.assertEqual(worst_input_tokens(shape, "openai", "gpt-4o-mini"), size + 2833 + 2833 + 8 * 5667)

    def test_unknown_models_take_the_largest_documented_image(self) -> None:
        shape, size = shape_of(chat(user(image_url())))
        self.assertEqual(MAX_IMAGE_TOKENS, 2833 + 8 * 5667)
        for provider, model in [("openai", "gpt-9"), ("google", "gemini-2.5-pro"), ("ollama", "llava")]:
            self.assertEqual(worst_input_tokens(shape, provider, model), size + MAX_IMAGE_TOKENS, model)

    def test_anthropic_images(self) -> None:
        doc = {
            "model": "claude-sonnet-4-5",
            "messages": [
                user(
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": B64}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                    {"type": "image", "source": {"type": "file", "file_id": "file_1"}},
                ),
                user({"type": "tool_result", "tool_use_id": "t", "content": [
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/b.png"}},
                ]}),
            ],
        }
        shape, size = shape_of(doc)
        self.assertEqual((shape.images, shape.text_bytes), (4, size - len(B64)))
        self.assertEqual(worst_input_tokens(shape, "anthropic", "claude-sonnet-4-5"), size - len(B64) + 4 * 1650)
        # High-resolution models: 2576 px, 3.75 MP.
        self.assertEqual(
            worst_input_tokens(shape, "anthropic", "claude-opus-4-7"), size - len(B64) + 4 * CLAUDE_HIGH_RES_IMAGE
        )

    def test_media_never_exceed_the_context_window(self) -> None:
        shape = read_request(chat(user(*[image_url() for _ in range(200)])), 10)
        self.assertEqual(worst_input_tokens(shape, "openai", "gpt-4o-mini"), 10 + 128_000)


class DocumentTests(SynchronousTestCase):
    def test_anthropic_documents(self) -> None:
        pdf = {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": B64}}
        url = {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}}
        text = {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "plain words"}}
        nested = {"type": "document", "source": {"type": "content", "content": [
            {"type": "text", "text": "x"},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/c.png"}},
        ]}}
        shape, size = shape_of({"model": "claude-3-haiku", "messages": [user(pdf, url, text, nested)]})
        self.assertEqual((shape.documents, shape.inline_documents, shape.images), (1, (len(B64),), 1))
        self.assertEqual((shape.opaque_inputs, shape.text_bytes), (0, size - len(B64)))
        # claude-3: 600 pages of (1,650 + 3,000) exceed its 200k window: two
        # documents and an image fill at most the window.
        self.assertEqual(worst_input_tokens(shape, "anthropic", "claude-3-haiku"), size - len(B64) + 200_000)
        small = read_request({"messages": [user(url)]}, 10)
        rules = rules_for("anthropic", "claude-3-haiku")
        self.assertEqual(rules.page_tokens(), CLAUDE_STANDARD_IMAGE + PAGE_TEXT_TOKENS)
        self.assertEqual(worst_input_tokens(small, "anthropic", "claude-3-haiku"), 10 + 200_000)

    def test_an_inline_document_counts_at_least_its_base64_length(self) -> None:
        # A provider reading it as a text file bills about 3/4 of a token per
        # base64 character; a PDF's pages are bounded by the page rule.
        big = "QUJD" * 200_000  # 800,000 characters
        doc = {"messages": [user({"type": "document", "source": {
            "type": "base64", "media_type": "application/pdf", "data": big}})]}
        shape, size = shape_of(doc)
        self.assertEqual(shape.text_bytes, size - len(big))
        # gpt-4.1: 100 pages of 4,445 = 444,500 < 800,000.
        self.assertEqual(worst_input_tokens(shape, "openai", "gpt-4.1"), size - len(big) + 800_000)
        small, size = shape_of({"messages": [user({"type": "document", "source": {
            "type": "base64", "media_type": "application/pdf", "data": B64}})]})
        self.assertEqual(worst_input_tokens(small, "openai", "gpt-4.1"), size - len(B64) + 444_500)

    def test_file_ids_are_bounded_by_the_context_window(self) -> None:
        doc = {"messages": [user({"type": "document", "source": {"type": "file", "file_id": "file_1"}})]}
        shape = read_request(doc, 10)
        self.assertEqual(shape.opaque_inputs, 1)
        self.assertEqual(worst_input_tokens(shape, "anthropic", "claude-sonnet-4-5"), 10 + 1_000_000)
        self.assertEqual(worst_input_tokens(shape, "x", "unknown-model"), 10 + MAX_CONTEXT_TOKENS)

    def test_chat_files(self) -> None:
        inline = {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64," + B64}}
        by_id = {"type": "file", "file": {"file_id": "file-abc"}}
        shape, size = shape_of(chat(user(inline, by_id)))
        data = inline["file"]["file_data"]
        self.assertEqual((shape.documents, shape.inline_documents, shape.opaque_inputs), (0, (len(data),), 1))
        self.assertEqual(shape.text_bytes, size - len(data))
        # gpt-4o: 100 pages of (1,445 + 3,000) exceed its 128k window, which
        # bounds the document and the file together.
        self.assertEqual(worst_input_tokens(shape, "openai", "gpt-4o"), shape.text_bytes + 128_000)
        # gpt-4.1 (a 1M window): 100 pages.
        one, _ = shape_of(chat(user(inline)))
        self.assertEqual(
            worst_input_tokens(one, "openai", "gpt-4.1"), one.text_bytes + 100 * (GPT_4O_IMAGE + PAGE_TEXT_TOKENS)
        )

    def test_earlier_audio_answers_and_mcp_servers_are_opaque(self) -> None:
        doc = {
            "messages": [{"role": "assistant", "audio": {"id": "audio_1"}}],
            "mcp_servers": [{"type": "url", "url": "https://mcp.example.com", "name": "x"}],
        }
        self.assertEqual(read_request(doc, 10).opaque_inputs, 2)


class ToolTests(SynchronousTestCase):
    TOOLS = [
        {"name": "get_weather", "description": "Weather", "input_schema": {"type": "object"}},
        {"name": "get_time", "description": "Time", "input_schema": {"type": "object"}},
    ]

    def messages(self, **extra) -> dict:
        return {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}],
                "tools": self.TOOLS, **extra}

    def test_anthropic_tool_prompt_by_tool_choice(self) -> None:
        wrappers = 2 * TOOL_WRAPPER_TOKENS
        for choice, prompt in [(None, 346), ({"type": "auto"}, 346), ({"type": "none"}, 346),
                               ({"type": "any"}, 313), ({"type": "tool", "name": "get_time"}, 313)]:
            doc = self.messages() if choice is None else self.messages(tool_choice=choice)
            shape, size = shape_of(doc)
            self.assertEqual(shape.tools, 2)
            self.assertEqual(
                worst_input_tokens(shape, "anthropic", "claude-sonnet-4-5"),
                size + prompt + wrappers if choice is not None else size + max(346, 313) + wrappers,
                choice,
            )

    def test_tool_prompt_per_model(self) -> None:
        shape, size = shape_of(self.messages(tool_choice={"type": "auto"}))
        for model, prompt in [("claude-3-opus-20240229", 530), ("claude-3-sonnet", 159), ("claude-3-haiku", 264),
                              ("claude-3-5-haiku-latest", 264), ("claude-3-7-sonnet-latest", 346),
                              ("claude-opus-4-1", 346), ("anthropic/claude-sonnet-4.5", 346),
                              ("claude-mythos-5", 530)]:
            self.assertEqual(worst_input_tokens(shape, "anthropic", model), size + prompt + 40, model)

    def test_no_tools_no_prompt(self) -> None:
        shape, size = shape_of(self.messages(tools=[], tool_choice={"type": "auto"}))
        self.assertEqual(worst_input_tokens(shape, "anthropic", "claude-sonnet-4-5"), size)

    def test_provider_defined_tools(self) -> None:
        tools = [{"type": "bash_20250124", "name": "bash"}, {"type": "text_editor_20250728", "name": "e"},
                 {"type": "computer_20250124", "name": "computer", "display_width_px": 1024},
                 {"type": "web_search_20250305", "name": "web_search"}]
        shape, size = shape_of(self.messages(tools=tools, tool_choice={"type": "auto"}))
        self.assertEqual(len(shape.builtin_tools), 4)
        expected = size + 346 + 4 * TOOL_WRAPPER_TOKENS + 245 + 700 + 735 + 499 + UNKNOWN_BUILTIN_TOOL_TOKENS
        self.assertEqual(worst_input_tokens(shape, "anthropic", "claude-sonnet-4-5"), expected)

    def test_openai_tools(self) -> None:
        doc = chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}], tool_choice="required")
        shape, size = shape_of(doc)
        self.assertEqual((shape.tools, shape.builtin_tools, shape.tool_choice), (1, (), "any"))
        self.assertEqual(worst_input_tokens(shape, "openai", "gpt-4o"), size + 64 + TOOL_WRAPPER_TOKENS)
        self.assertEqual(shape_of(chat(tools=[], functions=[{"name": "f"}]))[0].tools, 1)


class RulesTests(SynchronousTestCase):
    def test_openai_names(self) -> None:
        self.assertEqual(rules_for("openai", "gpt-4o-2024-08-06").image_tokens, GPT_4O_IMAGE)
        self.assertEqual(rules_for("openrouter", "openai/gpt-4o").image_tokens, GPT_4O_IMAGE)
        self.assertEqual(rules_for("openai", "gpt-4o-mini-2024-07-18").image_tokens, 2833 + 8 * 5667)
        self.assertEqual(rules_for("openai", "gpt-4.1-nano").image_tokens, 3779)  # 1,536 patches x 2.46
        self.assertEqual(rules_for("openai", "o1").image_tokens, 75 + 8 * 150)
        self.assertEqual(rules_for("openai", "gpt-5").image_tokens, 70 + 8 * 140)
        # gpt-5.1 is not gpt-5: unknown, the largest.
        self.assertEqual(rules_for("openai", "gpt-5.1").image_tokens, MAX_IMAGE_TOKENS)
        self.assertEqual(rules_for("openai", "gpt-5.1").context_tokens, MAX_CONTEXT_TOKENS)

    def test_claude_names(self) -> None:
        standard = ["claude-3-5-sonnet-20241022", "claude-opus-4-20250514", "claude-sonnet-4-5-20250929",
                    "anthropic/claude-haiku-4.5", "claude-opus-4-6", "us.anthropic.claude-3-haiku-20240307-v1:0"]
        for model in standard:
            self.assertEqual(rules_for("anthropic", model).image_tokens, CLAUDE_STANDARD_IMAGE, model)
        for model in ["claude-opus-4-7", "claude-sonnet-5", "claude-fable-5-1", "claude-test"]:
            self.assertEqual(rules_for("anthropic", model).image_tokens, CLAUDE_HIGH_RES_IMAGE, model)
        self.assertEqual(rules_for("anthropic", "claude-3-opus").context_tokens, 200_000)
        self.assertEqual(rules_for("anthropic", "claude-sonnet-4-5").context_tokens, 1_000_000)

    def test_unknown_family_takes_every_maximum(self) -> None:
        rules = rules_for("xai", "grok-4")
        self.assertEqual(rules, billing_rules.UNKNOWN)
        self.assertEqual((rules.tool_prompt_auto, rules.tool_prompt_any), (530, 340))


class _Pricing:
    def __init__(self, price: Price) -> None:
        self._price = price

    def price(self, provider: str, model: str) -> Price:
        return self._price


class NeverBelowTheBillTests(SynchronousTestCase):
    """Random mixes of shapes: the estimate is never below the fake provider's most expensive bill."""

    def random_body(self, rng: random.Random, anthropic: bool) -> dict:
        parts: list = [{"type": "text", "text": "é" * rng.randrange(0, 300)}]
        for _ in range(rng.randrange(0, 5)):
            if anthropic:
                source = rng.choice([{"type": "url", "url": "https://e.com/x.png"},
                                     {"type": "base64", "media_type": "image/png", "data": B64}])
                parts.append({"type": "image", "source": source})
            else:
                url = rng.choice(["https://e.com/x.png", "data:image/png;base64," + B64])
                parts.append(image_url(url, rng.choice([None, "high", "auto"])))
        body: dict = {"model": "m", "messages": [{"role": "user", "content": parts}] * rng.randrange(1, 4)}
        body["max_tokens"] = rng.randrange(1, 2000)
        if rng.random() < 0.5:
            tools = [{"name": f"t{i}", "description": "d" * i, "input_schema": {"type": "object"}}
                     for i in range(rng.randrange(1, 4))]
            body["tools"] = tools if anthropic else [{"type": "function", "function": t} for t in tools]
            if rng.random() < 0.5:
                body["tool_choice"] = {"type": "any"} if anthropic else "required"
        if not anthropic and rng.random() < 0.5:
            body["n"] = rng.randrange(1, 9)
        return body

    def test_random_shapes(self) -> None:
        rng = random.Random(12)
        model = BillingModel()
        pricing = _Pricing(Price(input=1.0, output=1.0))
        for _ in range(300):
            anthropic = rng.random() < 0.5
            body = self.random_body(rng, anthropic)
            size = len(json.dumps(body, separators=(",", ":")).encode())
            shape = read_request(body, size)
            provider, name = ("anthropic", "claude-sonnet-4-5") if anthropic else ("openai", "gpt-4o")
            prompt, completion = model.usage(body, "anthropic" if anthropic else "openai")
            estimate = worst_input_tokens(shape, provider, name)
            self.assertGreaterEqual(estimate, prompt, body)
            worst = worst_case_cost(pricing, provider, name, estimate, shape.max_tokens, choices=shape.choices)
            self.assertGreaterEqual(worst * 1e6, prompt + completion - 1e-6)
