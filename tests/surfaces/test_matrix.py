"""The ingress matrix is a contract: these tests pin it."""

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.surfaces import matrix
from cllama_tx.surfaces.matrix import InvalidModelRef, ModelRef, split_model_ref, surface_for


class MatrixTests(SynchronousTestCase):
    def test_anthropic_messages_providers_pinned(self):
        self.assertEqual(
            matrix.ANTHROPIC_MESSAGES_PROVIDERS,
            {"anthropic", "synthetic", "minimax-portal", "kimi-coding", "cloudflare-ai-gateway", "xiaomi"},
        )
        for name in matrix.ANTHROPIC_MESSAGES_PROVIDERS:
            self.assertEqual(surface_for(name), matrix.ANTHROPIC_MESSAGES)

    def test_chat_providers_pinned(self):
        self.assertEqual(
            matrix.OPENAI_CHAT_PROVIDERS,
            {"openai", "openrouter", "google", "xai", "ollama", "vercel", "zai", "volcengine", "qwen-portal", "opencode"},
        )
        for name in matrix.OPENAI_CHAT_PROVIDERS:
            self.assertEqual(surface_for(name), matrix.OPENAI_CHAT)

    def test_no_provider_on_both_surfaces(self):
        self.assertFalse(matrix.ANTHROPIC_MESSAGES_PROVIDERS & matrix.OPENAI_CHAT_PROVIDERS)

    def test_unknown_providers_use_the_default_surface(self):
        self.assertEqual(surface_for("brand-new"), matrix.OPENAI_CHAT)

    def test_aliases(self):
        self.assertEqual(
            matrix.ALIASES,
            {
                "z.ai": "zai",
                "z-ai": "zai",
                "opencode-zen": "opencode",
                "qwen": "qwen-portal",
                "kimi-code": "kimi-coding",
                "bytedance": "volcengine",
                "doubao": "volcengine",
            },
        )
        self.assertEqual(surface_for("kimi-code"), matrix.ANTHROPIC_MESSAGES)
        self.assertEqual(surface_for("Doubao"), matrix.OPENAI_CHAT)

    def test_split(self):
        self.assertEqual(
            split_model_ref("openrouter/anthropic/claude-sonnet-4"),
            ModelRef("openrouter", "anthropic/claude-sonnet-4"),
        )
        self.assertEqual(split_model_ref("OpenAI/gpt-4o"), ModelRef("openai", "gpt-4o"))
        self.assertEqual(split_model_ref("z.ai/glm-4.6"), ModelRef("zai", "glm-4.6"))

    def test_split_refusals(self):
        for ref in ("gpt-4o", "/gpt-4o", "openai/", "cllama/google/gemini-2.5-flash", "CLLAMA/x"):
            self.assertRaises(InvalidModelRef, split_model_ref, ref)
        with self.assertRaises(InvalidModelRef) as caught:
            split_model_ref("cllama/google/gemini-2.5-flash")
        self.assertIn("synthetic", str(caught.exception))

    def test_describe(self):
        doc = matrix.describe()
        self.assertEqual(doc["providers"]["anthropic"], "anthropic-messages")
        self.assertEqual(doc["providers"]["openrouter"], "openai-chat-completions")
        self.assertEqual(doc["aliases"]["qwen"], "qwen-portal")
        self.assertEqual(
            {s["name"]: s["path"] for s in doc["surfaces"]},
            {
                "openai-chat-completions": "/v1/chat/completions",
                "anthropic-messages": "/v1/messages",
                "openai-responses": "/v1/responses",
            },
        )
        self.assertTrue(all(s["reaches"] for s in doc["surfaces"]))
        self.assertEqual(doc["default_surface"], "openai-chat-completions")
