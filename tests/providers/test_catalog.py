"""
Tests for L{cllama_tx.providers.catalog}.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.providers.catalog import (
    CATALOG,
    ENV_NAMES,
    ProviderSpec,
    auth_headers,
    seed_key_id,
    upstream_url,
)

# name: (base_url, auth, api_format)
EXPECTED_CATALOG = {
    # CONTRACT 3.2, exactly.
    "openai": ("https://api.openai.com/v1", "bearer", "openai"),
    "anthropic": ("https://api.anthropic.com/v1", "x-api-key", "anthropic"),
    "openrouter": ("https://openrouter.ai/api/v1", "bearer", "openai"),
    "google": (
        "https://generativelanguage.googleapis.com/v1beta/openai",
        "bearer",
        "openai",
    ),
    "xai": ("https://api.x.ai/v1", "bearer", "openai"),
    "vercel": ("https://ai-gateway.vercel.sh/v1", "bearer", "openai"),
    "ollama": ("http://ollama:11434/v1", "none", "openai"),
    # The other providers of CONTRACT 3.1.
    "synthetic": ("https://api.synthetic.new/anthropic/v1", "x-api-key", "anthropic"),
    "minimax-portal": ("https://api.minimax.io/anthropic/v1", "x-api-key", "anthropic"),
    "kimi-coding": ("https://api.kimi.com/coding/v1", "x-api-key", "anthropic"),
    "cloudflare-ai-gateway": (None, "x-api-key", "anthropic"),
    "xiaomi": ("https://api.xiaomimimo.com/anthropic/v1", "x-api-key", "anthropic"),
    "zai": ("https://api.z.ai/api/paas/v4", "bearer", "openai"),
    "volcengine": ("https://ark.cn-beijing.volces.com/api/v3", "bearer", "openai"),
    "qwen-portal": ("https://portal.qwen.ai/v1", "bearer", "openai"),
    "opencode": ("https://opencode.ai/zen/v1", "bearer", "openai"),
}


class CatalogTests(SynchronousTestCase):
    def test_table_pinned(self):
        """The catalog is exactly the contract's table plus the 3.1 providers."""
        actual = {
            name: (spec.base_url, spec.auth, spec.api_format) for name, spec in CATALOG.items()
        }
        self.assertEqual(actual, EXPECTED_CATALOG)

    def test_names_match_keys(self):
        for name, spec in CATALOG.items():
            self.assertEqual(spec.name, name)

    def test_read_only(self):
        with self.assertRaises(TypeError):
            CATALOG["evil"] = CATALOG["openai"]  # type: ignore[index]

    def test_surface_formats_agree_with_matrix(self):
        """Every provider on the Anthropic Messages surface speaks anthropic."""
        from cllama_tx.surfaces.matrix import ANTHROPIC_MESSAGES_PROVIDERS

        anthropic = {n for n, s in CATALOG.items() if s.api_format == "anthropic"}
        self.assertEqual(anthropic, set(ANTHROPIC_MESSAGES_PROVIDERS))

    def test_spec_validates(self):
        with self.assertRaises(ValueError):
            ProviderSpec(name="x", base_url=None, auth="basic", api_format="openai")
        with self.assertRaises(ValueError):
            ProviderSpec(name="x", base_url=None, auth="bearer", api_format="gemini")


class EnvNamesTests(SynchronousTestCase):
    def test_prefixes(self):
        actual = {n: (e.key_prefixes, e.base_url) for n, e in ENV_NAMES.items()}
        self.assertEqual(
            actual,
            {
                "openai": (("OPENAI",), "OPENAI_BASE_URL"),
                "anthropic": (("ANTHROPIC",), "ANTHROPIC_BASE_URL"),
                "openrouter": (("OPENROUTER",), "OPENROUTER_BASE_URL"),
                "xai": (("XAI",), "XAI_BASE_URL"),
                "google": (("GEMINI", "GOOGLE"), "GOOGLE_BASE_URL"),
                "vercel": (("AI_GATEWAY",), "AI_GATEWAY_BASE_URL"),
                "ollama": ((), "OLLAMA_BASE_URL"),
            },
        )

    def test_key_var_order(self):
        """GEMINI's three variables come before the GOOGLE alias's."""
        self.assertEqual(
            ENV_NAMES["google"].key_vars(),
            (
                "GEMINI_API_KEY",
                "GEMINI_API_KEY_1",
                "GEMINI_API_KEY_2",
                "GOOGLE_API_KEY",
                "GOOGLE_API_KEY_1",
                "GOOGLE_API_KEY_2",
            ),
        )
        self.assertEqual(ENV_NAMES["ollama"].key_vars(), ())

    def test_seed_key_id(self):
        self.assertEqual(seed_key_id("OPENAI_API_KEY_1"), "seed:OPENAI_API_KEY_1")


class UpstreamURLTests(SynchronousTestCase):
    def test_contract_example(self):
        self.assertEqual(
            upstream_url("https://openrouter.ai/api/v1", "/v1/chat/completions"),
            "https://openrouter.ai/api/v1/chat/completions",
        )

    def test_trailing_slash(self):
        self.assertEqual(
            upstream_url("https://openrouter.ai/api/v1/", "/v1/chat/completions"),
            "https://openrouter.ai/api/v1/chat/completions",
        )

    def test_messages(self):
        self.assertEqual(
            upstream_url("https://api.anthropic.com/v1", "/v1/messages"),
            "https://api.anthropic.com/v1/messages",
        )

    def test_google(self):
        self.assertEqual(
            upstream_url(
                "https://generativelanguage.googleapis.com/v1beta/openai",
                "/v1/chat/completions",
            ),
            "https://generativelanguage.googleapis.com/v1beta/openai/chat/completions",
        )

    def test_only_a_whole_v1_segment_is_removed(self):
        self.assertEqual(upstream_url("http://h/x", "/v1beta/models"), "http://h/x/v1beta/models")
        self.assertEqual(upstream_url("http://h/x", "/v1"), "http://h/x")
        self.assertEqual(upstream_url("http://h/x", "/models"), "http://h/x/models")


class AuthHeadersTests(SynchronousTestCase):
    def test_bearer(self):
        self.assertEqual(
            auth_headers("bearer", "sk-123"), [(b"Authorization", b"Bearer sk-123")]
        )

    def test_x_api_key(self):
        self.assertEqual(auth_headers("x-api-key", "sk-123"), [(b"x-api-key", b"sk-123")])

    def test_none(self):
        self.assertEqual(auth_headers("none", None), [])
        self.assertEqual(auth_headers("none", "sk-123"), [])

    def test_missing_secret(self):
        with self.assertRaises(ValueError):
            auth_headers("bearer", None)
        with self.assertRaises(ValueError):
            auth_headers("x-api-key", "")

    def test_unknown_mode(self):
        with self.assertRaises(ValueError):
            auth_headers("basic", "sk-123")

    def test_header_injection_refused_without_echo(self):
        secret = "sk-secret\r\nX-Evil: 1"
        with self.assertRaises(ValueError) as caught:
            auth_headers("bearer", secret)
        self.assertNotIn("sk-secret", str(caught.exception))
        with self.assertRaises(ValueError):
            auth_headers("x-api-key", "sk-ünicode")
