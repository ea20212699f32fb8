"""Which wire format a request speaks upstream: the catalog's Responses data, as the proxy reads it."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.providers.catalog import (
    RESPONSES_ONLY_MODELS,
    RESPONSES_PROVIDERS,
    needs_responses,
    responses_only,
    serves_responses,
)

HINT = b'{"error": {"message": "This model is only supported in v1/responses and not in v1/chat/completions."}}'


class Catalog(SynchronousTestCase):
    def test_who_serves_the_responses_api(self):
        self.assertEqual(RESPONSES_PROVIDERS, frozenset({"openai"}))
        self.assertTrue(serves_responses("openai", "openai"))
        self.assertTrue(serves_responses("openai@fast", "openai"))  # a model table deployment
        self.assertFalse(serves_responses("openai", "anthropic"))
        self.assertFalse(serves_responses("openrouter", "openai"))

    def test_responses_only_models(self):
        self.assertTrue(all(RESPONSES_ONLY_MODELS.values()))
        self.assertTrue(responses_only("openai", "o3-pro"))
        self.assertTrue(responses_only("openai", "o3-pro-2025-06-10"))
        self.assertTrue(responses_only("openai@x", "gpt-5-codex"))
        self.assertFalse(responses_only("openai", "o3"))
        self.assertFalse(responses_only("openai", "gpt-5"))
        self.assertFalse(responses_only("openrouter", "o3-pro"))

    def test_the_providers_hint(self):
        self.assertTrue(needs_responses(404, HINT))
        self.assertTrue(needs_responses(400, HINT))
        self.assertFalse(needs_responses(500, HINT))
        self.assertFalse(needs_responses(404, b'{"error": {"message": "The model o9 does not exist"}}'))
        self.assertFalse(needs_responses(400, b""))


class RequestShape(SynchronousTestCase):
    def test_images_in_input_items_are_images_not_text(self):
        from cllama_tx.governance.request_cost import read_request

        data = "data:image/png;base64," + "A" * 40000
        doc = {"model": "m", "max_output_tokens": 300, "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                         {"type": "input_image", "image_url": data}]}]}
        shape = read_request(doc, 40200)
        self.assertEqual((shape.images, shape.max_tokens), (1, 300))
        self.assertLess(shape.text_bytes, 1000)
