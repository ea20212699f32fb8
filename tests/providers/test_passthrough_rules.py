"""
L{cllama_tx.providers.passthrough_rules}: the passthrough's paths decoded
strictly (what hostile agents send is refused, not "cleaned"), the
allow-list's patterns and the operator's setting, the native base URLs.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.providers.passthrough_rules import (
    DEFAULT_PATHS,
    AllowListError,
    PathRefused,
    Target,
    native_base_url,
    native_key_header,
    parse_allow_list,
    parse_rule,
    parse_target,
    path_model,
    relative_segments,
    upstream_url,
)


class TargetTests(SynchronousTestCase):
    def test_plain_paths(self) -> None:
        self.assertEqual(parse_target(b"/_proxy/openai/embeddings"), Target("openai", ("embeddings",)))
        self.assertEqual(
            parse_target(b"/_proxy/OpenAI/audio/transcriptions?x=1&y=2"),
            Target("openai", ("audio", "transcriptions"), b"x=1&y=2"),
        )
        target = parse_target(b"/_proxy/google/v1beta/models/gemini-2.5-flash:generateContent?alt=sse")
        self.assertEqual(target.segments, ("v1beta", "models", "gemini-2.5-flash:generateContent"))
        self.assertEqual(target.display, "/_proxy/google/v1beta/models/gemini-2.5-flash:generateContent")
        # A deployment of the model table is a provider name too.
        self.assertEqual(parse_target(b"/_proxy/openai@fast/embeddings").provider, "openai@fast")

    def test_harmless_escapes_are_decoded(self) -> None:
        self.assertEqual(parse_target(b"/_proxy/openai/files/file%2Dabc/content").segments, ("files", "file-abc", "content"))

    def refused(self, raw: bytes) -> PathRefused:
        error = self.assertRaises(PathRefused, parse_target, raw)
        self.assertEqual((error.status, error.code), (400, "invalid_path"), raw)
        return error

    def test_traversal_and_smuggling_are_refused(self) -> None:
        for raw in (
            b"/_proxy/openai/../anthropic/v1/messages",
            b"/_proxy/openai/v1/../../admin",
            b"/_proxy/openai/./embeddings",
            b"/_proxy/openai/%2e%2e/secrets",
            b"/_proxy/openai/%2E%2E/secrets",
            b"/_proxy/openai/.%2e/secrets",
            b"/_proxy/openai/a%2fb",  # an encoded slash
            b"/_proxy/openai/a%2Fb",
            b"/_proxy/openai/a%5cb",  # an encoded backslash
            b"/_proxy/openai/a\\..\\b",
            b"/_proxy/openai/%252e%252e/x",  # double encoding
            b"/_proxy/openai/a%2",  # a broken escape
            b"/_proxy/openai/a%zz",
            b"/_proxy/openai//evil.example/x",  # an empty segment: an authority in disguise
            b"/_proxy/openai/http://evil.example/x",
            b"/_proxy/openai/embeddings/",
            b"/_proxy/openai/a%00b",
            b"/_proxy/openai/a%0d%0aHost:%20evil",
            b"/_proxy/openai/caf%C3%A9",
            b"/_proxy/openai/emb\xffeddings",
            b"/_proxy/openai/a#frag",
            b"/_proxy/openai",
            b"/_proxy//embeddings",
            b"/_proxy/open%61i/embeddings",  # the provider is a name, never decoded
            b"http://evil.example/_proxy/openai/embeddings",
            b"/_proxy/openai/" + b"a/" * 40 + b"b",
            b"/_proxy/openai/" + b"a" * 3000,
        ):
            self.refused(raw)

    def test_messages_say_what_is_wrong(self) -> None:
        self.assertIn("'..'", self.refused(b"/_proxy/openai/../x").message)
        self.assertIn("encodes", self.refused(b"/_proxy/openai/a%2fb").message)
        self.assertIn("empty segment", self.refused(b"/_proxy/openai//x").message)


class UrlTests(SynchronousTestCase):
    def test_native_base_urls(self) -> None:
        self.assertEqual(
            native_base_url("google", "https://generativelanguage.googleapis.com/v1beta/openai/"),
            "https://generativelanguage.googleapis.com/v1beta",
        )
        self.assertEqual(native_base_url("openai", "https://api.openai.com/v1"), "https://api.openai.com/v1")
        self.assertEqual(native_key_header("google"), b"x-goog-api-key")
        self.assertIsNone(native_key_header("openai"))

    def test_a_repeated_version_is_dropped(self) -> None:
        base = "https://api.openai.com/v1"
        self.assertEqual(relative_segments(("v1", "embeddings"), base), ("embeddings",))
        self.assertEqual(relative_segments(("embeddings",), base), ("embeddings",))
        self.assertEqual(relative_segments(("v1",), base), ("v1",))
        google = "https://generativelanguage.googleapis.com/v1beta"
        self.assertEqual(relative_segments(("v1beta", "models", "m:generateContent"), google), ("models", "m:generateContent"))

    def test_upstream_url_stays_below_the_base(self) -> None:
        self.assertEqual(
            upstream_url("http://127.0.0.1:9/v1/", ("audio", "speech"), b"a=1"), b"http://127.0.0.1:9/v1/audio/speech?a=1"
        )

    def test_model_in_the_path(self) -> None:
        self.assertEqual(path_model(("models", "gemini-2.5-flash:generateContent")), "gemini-2.5-flash")
        self.assertIsNone(path_model(("models", "claude-haiku-4-5")))
        self.assertIsNone(path_model(("embeddings",)))


class AllowListTests(SynchronousTestCase):
    def test_the_default_safe_set(self) -> None:
        allow = parse_allow_list(None)
        self.assertEqual(str(allow.match("openai", "POST", ("embeddings",))), "POST embeddings")
        self.assertEqual(str(allow.match("openai", "POST", ("audio", "speech"))), "POST audio/*")
        self.assertIsNotNone(allow.match("openai", "POST", ("audio", "transcriptions")))
        self.assertIsNotNone(allow.match("openai", "POST", ("images", "generations")))
        self.assertIsNotNone(allow.match("openai", "POST", ("moderations",)))
        self.assertIsNotNone(allow.match("anthropic", "POST", ("messages", "count_tokens")))
        self.assertIsNotNone(allow.match("anthropic", "GET", ("models",)))
        self.assertIsNotNone(allow.match("google", "POST", ("models", "gemini-2.5-flash:generateContent")))
        # Nothing else: other paths, other methods, other providers.
        for provider, method, segments in (
            ("openai", "GET", ("embeddings",)),
            ("openai", "POST", ("files",)),
            ("openai", "POST", ("batches",)),
            ("openai", "POST", ("chat", "completions")),
            ("openai", "POST", ("audio", "speech", "extra")),
            ("openai", "DELETE", ("audio", "speech")),
            ("anthropic", "POST", ("messages",)),
            ("google", "POST", ("models", "gemini-2.5-flash:embedContent")),
            ("xai", "POST", ("embeddings",)),
        ):
            self.assertIsNone(allow.match(provider, method, segments), (provider, method, segments))
        self.assertEqual(set(DEFAULT_PATHS), {"openai", "anthropic", "google"})

    def test_deployments_have_their_providers_list(self) -> None:
        allow = parse_allow_list(None)
        self.assertIsNotNone(allow.match("openai@fast", "POST", ("embeddings",)))

    def test_the_operator_replaces_a_providers_list(self) -> None:
        allow = parse_allow_list('{"OpenAI": ["POST embeddings", "GET files/*/content"], "ollama": ["api/embed"], "anthropic": []}')
        self.assertIsNotNone(allow.match("openai", "GET", ("files", "file-1", "content")))
        self.assertIsNone(allow.match("openai", "POST", ("moderations",)))
        self.assertIsNotNone(allow.match("ollama", "GET", ("api", "embed")))  # no method: any method
        self.assertIsNone(allow.match("anthropic", "POST", ("messages", "count_tokens")))
        self.assertIsNotNone(allow.match("google", "POST", ("models", "m:countTokens")))  # not named: the default

    def test_malformed_settings_are_refused_with_the_reason(self) -> None:
        for text, words in (
            ("not json", "not JSON"),
            ('["openai"]', "JSON object"),
            ('{"openai": "embeddings"}', "list of strings"),
            ('{"openai": ["FETCH embeddings"]}', "unknown method"),
            ('{"openai": ["POST ../x"]}', "'..'"),
            ('{"openai": ["POST a//b"]}', "empty"),
            ('{"openai": ["POST a b c"]}', "METHOD"),
            ('{"openai": [3]}', "string"),
            ('{"bad name!": []}', "not a provider name"),
            ('{"openai": ["POST a%2fb"]}', "characters"),
        ):
            error = self.assertRaises(AllowListError, parse_allow_list, text)
            self.assertIn(words, str(error), text)

    def test_star_stays_in_its_segment(self) -> None:
        rule = parse_rule("POST models/*:generateContent")
        self.assertTrue(rule.matches("POST", ("models", "gemini-2.5-pro:generateContent")))
        self.assertFalse(rule.matches("POST", ("models", "x", "y:generateContent")))
        self.assertFalse(rule.matches("POST", ("models", "gemini:streamGenerateContent")))
        self.assertFalse(parse_rule("audio/*").matches("POST", ("audio",)))
