"""
L{cllama_tx.accounting.passthrough_usage}: what a passthrough answer cost,
from the provider-native shapes (embeddings, images, Gemini), with the
packaged prices; free endpoints; unmetered answers; answers too large to
keep.
"""

from __future__ import annotations

import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting.passthrough_usage import (
    ERROR,
    FREE,
    IMAGES,
    TOKENS,
    UNMETERED,
    AnswerCopy,
    free_endpoint,
    meter_answer,
    requested_images,
    usage_in_tail,
)
from cllama_tx.accounting.pricing import Pricing, PricingError, parse_table


def copy_of(doc, limit=None) -> AnswerCopy:
    copy = AnswerCopy() if limit is None else AnswerCopy(limit=limit, tail=4096)
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    for i in range(0, len(body), 1000):
        copy.feed(body[i:i + 1000])
    return copy


EMBEDDINGS = {
    "object": "list",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
    "model": "text-embedding-3-small",
    "usage": {"prompt_tokens": 1200, "total_tokens": 1200},
}


class MeterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pricing = Pricing(Clock())

    def meter(self, doc, path="embeddings", model="text-embedding-3-small", provider="openai", status=200, **kw):
        return meter_answer(self.pricing, provider, path, model, status, doc if isinstance(doc, AnswerCopy) else copy_of(doc), **kw)

    def test_embeddings_are_priced_by_their_usage(self) -> None:
        metered = self.meter(EMBEDDINGS)
        self.assertEqual(metered.kind, TOKENS)
        self.assertTrue(metered.priced)
        self.assertEqual(metered.usage.input_tokens, 1200)
        self.assertEqual(metered.usage.output_tokens, 0)
        # text-embedding-3-small: USD 0.02 per million tokens.
        self.assertAlmostEqual(metered.cost_usd, 1200 * 0.02 / 1_000_000, places=12)
        large = self.meter({**EMBEDDINGS, "model": "text-embedding-3-large"}, model="text-embedding-3-large")
        self.assertAlmostEqual(large.cost_usd, 1200 * 0.13 / 1_000_000, places=12)

    def test_a_huge_embeddings_answer_is_priced_from_its_tail(self) -> None:
        doc = {**EMBEDDINGS, "data": [{"object": "embedding", "index": i, "embedding": [0.5] * 300} for i in range(100)]}
        copy = copy_of(doc, limit=10_000)
        self.assertIsNone(copy.whole)
        self.assertGreater(copy.size, 10_000)
        metered = self.meter(copy)
        self.assertEqual((metered.kind, metered.usage.input_tokens), (TOKENS, 1200))

    def test_images_are_priced_per_image(self) -> None:
        doc = {"created": 1, "data": [{"url": "https://x/1.png"}, {"url": "https://x/2.png"}]}
        metered = self.meter(doc, path="images/generations", model="dall-e-3")
        self.assertEqual((metered.kind, metered.images, metered.priced), (IMAGES, 2, True))
        self.assertAlmostEqual(metered.cost_usd, 0.08)

    def test_images_too_large_to_keep_count_as_asked(self) -> None:
        doc = {"created": 1, "data": [{"b64_json": "A" * 5000} for _ in range(3)]}
        metered = self.meter(copy_of(doc, limit=1000), path="images/generations", model="dall-e-2", images_asked=3)
        self.assertEqual((metered.kind, metered.images), (IMAGES, 3))
        self.assertAlmostEqual(metered.cost_usd, 0.06)

    def test_token_metered_images_use_their_usage(self) -> None:
        doc = {"created": 1, "data": [{"b64_json": "AAAA"}],
               "usage": {"input_tokens": 50, "output_tokens": 4000, "total_tokens": 4050}}
        override = self.mktemp()
        with open(override, "w") as f:  # a model priced by tokens (gpt-image style)
            json.dump({"openai": {"img-model": {"input": 5.0, "output": 40.0}}}, f)
        pricing = Pricing(Clock(), override_path=override)
        metered = meter_answer(pricing, "openai", "images/generations", "img-model", 200, copy_of(doc))
        self.assertEqual((metered.kind, metered.usage.input_tokens, metered.usage.output_tokens), (TOKENS, 50, 4000))
        self.assertAlmostEqual(metered.cost_usd, (50 * 5 + 4000 * 40) / 1_000_000)

    def test_gemini_usage_metadata(self) -> None:
        doc = {"candidates": [{"content": {"parts": [{"text": "hi"}]}}],
               "usageMetadata": {"promptTokenCount": 100, "candidatesTokenCount": 20, "thoughtsTokenCount": 5,
                                 "cachedContentTokenCount": 40, "totalTokenCount": 125}}
        metered = self.meter(doc, provider="google", path="models/gemini-2.5-flash:generateContent", model="gemini-2.5-flash")
        usage = metered.usage
        self.assertEqual((usage.input_tokens, usage.cache_read_tokens, usage.output_tokens, usage.reasoning_tokens),
                         (60, 40, 25, 5))
        self.assertEqual(metered.kind, TOKENS)
        self.assertGreater(metered.cost_usd, 0)

    def test_a_gemini_stream_is_priced_by_its_last_event(self) -> None:
        events = b"".join(
            b"data: " + json.dumps({"usageMetadata": {"promptTokenCount": 10, "candidatesTokenCount": n}}).encode() + b"\r\n\r\n"
            for n in (1, 2, 7)
        )
        metered = self.meter(events, provider="google", path="models/gemini-2.5-flash:streamGenerateContent",
                             model="gemini-2.5-flash")
        self.assertEqual((metered.usage.input_tokens, metered.usage.output_tokens), (10, 7))

    def test_free_endpoints(self) -> None:
        self.assertTrue(free_endpoint("openai", "moderations"))
        self.assertTrue(free_endpoint("anthropic", "messages/count_tokens"))
        self.assertTrue(free_endpoint("anthropic", "models/claude-haiku-4-5"))
        self.assertTrue(free_endpoint("google", "models/gemini-2.5-flash:countTokens"))
        self.assertFalse(free_endpoint("google", "models/gemini-2.5-flash:generateContent"))
        self.assertFalse(free_endpoint("openai", "embeddings"))
        metered = self.meter({"id": "modr-1", "results": []}, path="moderations", model="omni-moderation-latest")
        self.assertEqual((metered.kind, metered.cost_usd, metered.priced), (FREE, 0.0, True))

    def test_unmetered_answers(self) -> None:
        # Audio: bytes, no usage.
        audio = self.meter(b"ID3\x00\x01binary-mp3", path="audio/speech", model="tts-1")
        self.assertEqual((audio.kind, audio.priced, audio.cost_usd), (UNMETERED, False, 0.0))
        # A transcription of a model nobody named (a multipart body): its tokens kept, unpriced.
        text = self.meter({"text": "hi", "usage": {"type": "tokens", "input_tokens": 9, "output_tokens": 2}},
                          path="audio/transcriptions", model=None)
        self.assertEqual((text.kind, text.priced, text.usage.input_tokens), (UNMETERED, False, 9))
        # An unpriced model's embeddings.
        unpriced = self.meter({**EMBEDDINGS, "model": "my-embedder"}, model="my-embedder")
        self.assertEqual((unpriced.kind, unpriced.priced, unpriced.usage.input_tokens), (UNMETERED, False, 1200))

    def test_failures_cost_nothing(self) -> None:
        metered = self.meter({"error": {"message": "no"}}, status=400)
        self.assertEqual((metered.kind, metered.cost_usd, metered.priced), (ERROR, 0.0, True))

    def test_usage_in_tail_takes_the_last_object(self) -> None:
        tail = b'...,"usage":{"prompt_tokens":1},"x":{"usage":{"prompt_tokens":2}}}'
        self.assertEqual(usage_in_tail(tail), {"usage": {"prompt_tokens": 2}})
        self.assertIsNone(usage_in_tail(b'{"text": "the word \\"usage\\" alone"}'))
        self.assertIsNone(usage_in_tail(b'"usage": {"prompt_tok'))

    def test_requested_images(self) -> None:
        self.assertEqual(requested_images({"n": 4}), 4)
        self.assertEqual(requested_images({"n": "4"}), 1)
        self.assertEqual(requested_images({"n": 1000}), 1)
        self.assertEqual(requested_images(None), 1)


class PerImagePriceTests(SynchronousTestCase):
    def test_per_image_is_parsed_and_checked(self) -> None:
        table = parse_table({"openai": {"img": {"input": 0, "output": 0, "per_image": 0.05}}}, "t")
        self.assertEqual(table["openai"]["img"].per_image, 0.05)
        error = self.assertRaises(
            PricingError, parse_table, {"openai": {"img": {"input": 0, "output": 0, "per_image": -1}}}, "t"
        )
        self.assertIn("USD per image", str(error))

    def test_the_packaged_table_prices_embeddings_and_images(self) -> None:
        pricing = Pricing(Clock())
        for model in ("text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"):
            price = pricing.price("openai", model)
            self.assertGreater(price.input, 0, model)
            self.assertEqual(price.output, 0, model)
        self.assertEqual(pricing.price("openai", "dall-e-3").per_image, 0.04)
        self.assertEqual(pricing.price("openai", "dall-e-2").per_image, 0.02)
