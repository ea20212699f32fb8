"""
The translation rule at the proxy, over real sockets against a strict fake
provider: what was dropped is named in C{x-cllama-dropped} and on the
intervention line; a model swap (a policy clamp) keeps the request valid
for the new model; C{max_tokens} is required on C{/v1/messages} for every
provider; token counting answers for an OpenAI-format model with a flagged
estimate; a provider's reasoning comes back as thinking blocks.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from cllama_tx.testing import (
    Reply,
    anthropic_message,
    openai_completion,
    openai_sse_events,
    openai_stream_chunks,
    parse_sse,
)
from tests.support import SECRET, ProxyHarness, write_agent

USER = [{"role": "user", "content": "Hi"}]
CLAUDE_CODE_FIELDS = {
    "thinking": {"type": "adaptive"},
    "output_config": {"effort": "medium"},
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "metadata": {"user_id": json.dumps({"device_id": "d" * 64, "session_id": "s"})},
}


class RulesAtTheProxy(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield ProxyHarness(self, fake_providers=("anthropic", "openai")).start()

    def lines(self, kind):
        return [line for line in self.h.audit_lines() if line["type"] == kind]

    @defer.inlineCallbacks
    def test_dropped_fields_are_named_in_a_header(self):
        doc = {"model": "openai/gpt-4o", "max_tokens": 32000, "messages": USER, **CLAUDE_CODE_FIELDS}
        response = yield self.h.post("/v1/messages", doc, headers={"anthropic-beta": ["context-management-2025-06-27"]})
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        dropped = response.headers.getRawHeaders(b"x-cllama-dropped")[0].decode()
        for name in ("thinking", "output_config.effort", "context_management", "anthropic-beta: context-management-2025-06-27"):
            self.assertIn(name, dropped)
        sent = self.h.fake.received[-1].json
        self.assertEqual(sent["max_completion_tokens"], 16384)
        self.assertTrue(sent["user"].startswith("sha256-"))
        [line] = [x for x in self.lines("intervention") if x["intervention"] == "surface_translated"]
        self.assertEqual(line["adjusted"], ["max_tokens: 32000 lowered to 16384, the model's most"])

    @defer.inlineCallbacks
    def test_a_clamped_model_gets_a_request_it_takes(self):
        """A policy clamps claude-opus-4-6 to claude-3-5-haiku: thinking, effort and the 1M beta go, max_tokens is lowered."""
        policy = {"mode": "clamp", "allowed": [{"slot": "primary", "ref": "anthropic/claude-3-5-haiku-20241022"}]}
        write_agent(self.h.context_root, "clamped", SECRET, model_policy=policy)
        self.h.fake.enqueue(Reply(json=anthropic_message("ok", "claude-3-5-haiku-20241022", 5, 1)))
        doc = {"model": "claude-opus-4-6", "max_tokens": 64000, "messages": USER, **CLAUDE_CODE_FIELDS}
        doc["metadata"] = {"user_id": "u1"}
        response = yield self.h.post(
            "/v1/messages", doc, token=f"clamped:{SECRET}", headers={"anthropic-beta": ["context-1m-2025-08-07"]}
        )
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        received = self.h.fake.received[-1]
        sent = received.json
        self.assertEqual(sent["max_tokens"], 8192)
        for name in ("thinking", "output_config", "context_management"):
            self.assertNotIn(name, sent)
        self.assertIsNone(received.header("anthropic-beta"))
        [line] = [x for x in self.lines("intervention") if x["intervention"] == "model_fitted"]
        self.assertIn("anthropic-beta: context-1m-2025-08-07", line["dropped"])
        self.assertIn("thinking", response.headers.getRawHeaders(b"x-cllama-dropped")[0].decode())

    @defer.inlineCallbacks
    def test_max_tokens_is_required_for_every_provider(self):
        for model in ("openai/gpt-4o", "anthropic/claude-sonnet-4-5"):
            response = yield self.h.post("/v1/messages", {"model": model, "messages": USER})
            body = yield response.json()
            self.assertEqual(response.code, 400, model)
            self.assertEqual(body["type"], "error")
            self.assertIn("'max_tokens' is required", body["error"]["message"])
        self.assertEqual(self.h.fake.received, [])

    @defer.inlineCallbacks
    def test_token_count_for_an_openai_model_is_an_estimate(self):
        doc = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "x" * 400}]}
        response = yield self.h.post("/v1/messages/count_tokens", doc)
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        self.assertEqual(response.headers.getRawHeaders(b"x-cllama-token-count"), [b"estimate"])
        self.assertEqual(body, {"input_tokens": 105})  # 401 bytes of text, one message
        self.assertEqual(self.h.fake.received, [])
        # An Anthropic model's count is the provider's own, not flagged.
        response = yield self.h.post("/v1/messages/count_tokens", dict(doc, model="anthropic/claude-sonnet-4-5"))
        yield response.json()
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.headers.getRawHeaders(b"x-cllama-token-count"))

    @defer.inlineCallbacks
    def test_reasoning_comes_back_as_thinking(self):
        completion = openai_completion("The answer.", "o3", 10, 5)
        completion["choices"][0]["message"]["reasoning_content"] = "Thinking it over."
        self.h.fake.enqueue(Reply(json=completion))
        doc = {"model": "openai/o3", "max_tokens": 4000, "messages": USER, "thinking": {"type": "enabled", "budget_tokens": 2000}}
        response = yield self.h.post("/v1/messages", doc)
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body["content"][0], {"type": "thinking", "thinking": "Thinking it over.", "signature": ""})
        self.assertEqual(body["content"][1]["text"], "The answer.")
        self.assertEqual(self.h.fake.received[-1].json["reasoning_effort"], "low")
        # Streamed, with display omitted: no thinking block.
        chunks = openai_stream_chunks(["The ", "answer."], "o3", 10, 5)
        chunks.insert(1, dict(chunks[1], choices=[{"index": 0, "delta": {"reasoning_content": "Hmm."}, "logprobs": None, "finish_reason": None}]))
        for display, expected in ((None, ["thinking", "text"]), ("omitted", ["text"])):
            self.h.fake.enqueue(Reply(sse=openai_sse_events(chunks)))
            thinking = {"type": "enabled", "budget_tokens": 2000, **({"display": display} if display else {})}
            response = yield self.h.post("/v1/messages", dict(doc, stream=True, thinking=thinking))
            text = yield response.content()
            starts = [json.loads(data)["content_block"]["type"] for name, data in parse_sse(text) if name == "content_block_start"]
            self.assertEqual(starts, expected, text)
