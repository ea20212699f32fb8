"""
Tests for L{cllama_tx.providers.forwarding}: the per-provider allow-list of
forwarded headers.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from cllama_tx.providers.catalog import CATALOG, ProviderSpec
from cllama_tx.providers.forwarding import (
    ALLOWED_BY_FORMAT,
    ALLOWED_BY_PROVIDER,
    NEVER_FORWARD,
    HeaderPolicy,
    forward,
    policy_for,
    valid_header_value,
)

# What a busy agent's SDK sends, plus everything a hostile agent might try.
AGENT_HEADERS = {
    b"Authorization": [b"Bearer tiverton:secret"],
    b"x-api-key": [b"tiverton:secret"],
    b"Content-Type": [b"application/json; charset=utf-8"],
    b"Content-Length": [b"123"],
    b"Accept": [b"application/json"],
    b"Accept-Encoding": [b"gzip"],
    b"User-Agent": [b"OpenAI/Python 1.99.0"],
    b"OpenAI-Organization": [b"org-bogus"],
    b"OpenAI-Project": [b"proj_bogus"],
    b"OpenAI-Beta": [b"assistants=v2"],
    b"Cookie": [b"session=abc"],
    b"X-Forwarded-For": [b"10.0.0.7"],
    b"Forwarded": [b"for=10.0.0.7"],
    b"X-Real-IP": [b"10.0.0.7"],
    b"X-Agent-ID": [b"another-agent"],
    b"X-Stainless-OS": [b"Linux"],
    b"X-Stainless-Retry-Count": [b"0"],
    b"Idempotency-Key": [b"stainless-retry-1"],
    b"anthropic-version": [b"2024-01-01"],
    b"anthropic-beta": [b"prompt-caching-2024-07-31"],
    b"HTTP-Referer": [b"https://agents.example"],
    b"X-Title": [b"tiverton"],
    b"X-Claw-Consumer-Session-Epoch": [b"7"],
    b"Host": [b"cllama:8080"],
    b"Connection": [b"keep-alive"],
    b"Transfer-Encoding": [b"chunked"],
}


def _incoming(extra=None) -> Headers:
    headers = Headers()
    for name, values in {**AGENT_HEADERS, **(extra or {})}.items():
        headers.setRawHeaders(name, values)
    return headers


def _as_dict(headers: Headers) -> dict[bytes, list[bytes]]:
    return {name.lower(): values for name, values in headers.getAllRawHeaders()}


class AllowListTests(SynchronousTestCase):
    def test_openai_format_forwards_accept_and_user_agent_only(self):
        out = _as_dict(forward(_incoming(), policy_for(CATALOG["openai"])))
        self.assertEqual(
            out,
            {
                b"accept": [b"application/json"],
                b"user-agent": [b"OpenAI/Python 1.99.0"],
                b"content-type": [b"application/json"],
            },
        )

    def test_anthropic_format_adds_version_and_beta(self):
        out = _as_dict(forward(_incoming(), policy_for(CATALOG["anthropic"])))
        self.assertEqual(
            out,
            {
                b"accept": [b"application/json"],
                b"user-agent": [b"OpenAI/Python 1.99.0"],
                b"anthropic-version": [b"2024-01-01"],
                b"anthropic-beta": [b"prompt-caching-2024-07-31"],
                b"content-type": [b"application/json"],
            },
        )

    def test_anthropic_version_defaults(self):
        incoming = Headers({b"accept": [b"text/event-stream"]})
        out = _as_dict(forward(incoming, policy_for(CATALOG["synthetic"])))
        self.assertEqual(out[b"anthropic-version"], [b"2023-06-01"])
        self.assertNotIn(b"anthropic-beta", out)

    def test_openai_format_never_gets_anthropic_headers(self):
        out = _as_dict(forward(_incoming(), policy_for(CATALOG["xai"])))
        self.assertNotIn(b"anthropic-version", out)
        self.assertNotIn(b"anthropic-beta", out)

    def test_openrouter_attribution(self):
        out = _as_dict(forward(_incoming(), policy_for(CATALOG["openrouter"])))
        self.assertEqual(out[b"http-referer"], [b"https://agents.example"])
        self.assertEqual(out[b"x-title"], [b"tiverton"])
        self.assertNotIn(b"http-referer", _as_dict(forward(_incoming(), policy_for(CATALOG["openai"]))))

    def test_headers_named_in_connection_are_dropped(self):
        out = _as_dict(
            forward(_incoming({b"Connection": [b"close, User-Agent"]}), policy_for(CATALOG["openai"]))
        )
        self.assertNotIn(b"user-agent", out)
        self.assertIn(b"accept", out)

    def test_operator_organization_and_project_replace_the_agents(self):
        spec = ProviderSpec(
            "openai", "https://api.openai.com/v1", "bearer", "openai",
            organization="org-operator0000", project="proj_operator0000",
        )
        out = _as_dict(forward(_incoming(), policy_for(spec)))
        self.assertEqual(out[b"openai-organization"], [b"org-operator0000"])
        self.assertEqual(out[b"openai-project"], [b"proj_operator0000"])

    def test_organization_is_not_sent_to_anthropic_format(self):
        spec = ProviderSpec(
            "lab", "https://lab.example/v1", "x-api-key", "anthropic", organization="org-operator0000"
        )
        self.assertEqual(policy_for(spec).fixed, ())

    def test_policy_repr_hides_operator_headers(self):
        spec = ProviderSpec("openai", "https://api.openai.com/v1", "bearer", "openai", organization="org-operator0000")
        self.assertNotIn("org-operator0000", repr(policy_for(spec)))
        self.assertNotIn("org-operator0000", repr(spec))


class NeverForwardTests(SynchronousTestCase):
    def test_no_list_names_a_forbidden_header(self):
        for name, allowed in {**ALLOWED_BY_FORMAT, **ALLOWED_BY_PROVIDER}.items():
            self.assertEqual(allowed & NEVER_FORWARD, frozenset(), name)

    def test_no_catalog_provider_forwards_a_forbidden_header(self):
        for name, spec in CATALOG.items():
            policy = policy_for(spec)
            self.assertIsInstance(policy, HeaderPolicy)
            self.assertEqual(policy.allowed & NEVER_FORWARD, frozenset(), name)
            out = _as_dict(forward(_incoming(), policy))
            for forbidden in NEVER_FORWARD:
                self.assertNotIn(forbidden, out, (name, forbidden))
            # Nothing the lists do not name (content-type is the proxy's own).
            self.assertLessEqual(set(out) - {b"content-type"}, set(policy.allowed) | {n for n, _ in policy.defaults})

    def test_the_issue_headers_are_forbidden(self):
        for name in (b"openai-organization", b"openai-project", b"cookie", b"x-forwarded-for", b"x-agent-id"):
            self.assertIn(name, NEVER_FORWARD)


class HeaderValueTests(SynchronousTestCase):
    def test_valid(self):
        self.assertTrue(valid_header_value("org-AbC123_x"))
        for bad in ("", "org 1", "org\r\nX-Evil: 1", "org-é", "org\x7f"):
            self.assertFalse(valid_header_value(bad), bad)
