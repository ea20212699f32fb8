"""
Tests for the second round of governance's request-path work (issue 21):
what is computed once or kept answers exactly as what it replaces, and a
change to anything a kept answer read applies to the next request.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting.usage import estimate_prompt_tokens, text_messages_chars
from cllama_tx.governance.request_cost import read_request, read_request_and_estimate

BASE = {
    "model": "openai/gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say hello."},
    ],
    "temperature": 0,
}

#: Bodies on both sides of the one-walk short cut: text only, output
#: limits, every field the shape reads, media, odd messages.
BODIES = [
    BASE,
    {**BASE, "max_tokens": 100},
    {**BASE, "max_completion_tokens": 7, "max_tokens": 9},
    {**BASE, "max_tokens": "12"},
    {**BASE, "max_tokens": 0},
    {**BASE, "n": 3},
    {**BASE, "tools": [{"type": "function", "function": {"name": "x", "parameters": {"type": "object"}}}],
     "tool_choice": "required"},
    {**BASE, "functions": [{"name": "f"}]},
    {**BASE, "thinking": {"budget_tokens": 99}, "max_tokens": 5},
    {**BASE, "reasoning": {"max_tokens": 40}},
    {**BASE, "generationConfig": {"maxOutputTokens": 50, "candidateCount": 2}},
    {**BASE, "extra_body": {"google": {"thinking_config": {"thinking_budget": 300}}}},
    {**BASE, "prediction": {"content": "abc"}},
    {**BASE, "system": "you are", "mcp_servers": [{}, {}]},
    {**BASE, "system": [{"type": "text", "text": "blocks"}]},
    {**BASE, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:xx"}}]}]},
    {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": "a block"}]}]},
    {**BASE, "messages": [{"role": "user", "content": "x", "name": "bob", "weight": 1.5, "flag": True, "x": None}]},
    {**BASE, "messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]},
    {**BASE, "messages": [{"role": "assistant", "content": None,
                           "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}]}]},
    {**BASE, "messages": [{"type": "image", "content": "x"}]},
    {**BASE, "messages": [{"type": "redacted_thinking", "data": "zz"}]},
    {**BASE, "messages": ["hi", {"role": "user", "content": "x"}]},
    {**BASE, "messages": [{"role": "tool", "tool_call_id": "call_1", "content": "ünïcode ✓"}]},
    {**BASE, "messages": []},
    {"model": "m", "input": "hi", "instructions": "be brief"},
    {"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:x"}]}]},
]


class OneWalkTests(SynchronousTestCase):
    """L{read_request_and_estimate} is L{read_request} and L{estimate_prompt_tokens}, whatever the body."""

    def test_same_as_both_walks(self) -> None:
        for doc in BODIES:
            size = len(json.dumps(doc))
            for wire_format in ("openai", "anthropic", "responses"):
                with self.subTest(doc=doc, wire_format=wire_format):
                    self.assertEqual(
                        read_request_and_estimate(doc, size, wire_format),
                        (read_request(doc, size), estimate_prompt_tokens(doc, wire_format)),
                    )

    def test_reference_body(self) -> None:
        """The bench's body: its bytes, no output limit, the text at four characters a token plus framing."""
        size = len(json.dumps(BASE))
        shape, estimate = read_request_and_estimate(BASE, size, "openai")
        self.assertEqual(shape.text_bytes, size)
        self.assertIsNone(shape.max_tokens)
        self.assertEqual((shape.choices, shape.images, shape.tools, shape.opaque_inputs), (1, 0, 0, 0))
        chars = len("You are a helpful assistant.") + len("Say hello.")
        self.assertEqual(estimate, (chars + 3) // 4 + 2 * 4)

    def test_text_messages_chars(self) -> None:
        """Strings count except identifiers and roles; anything nested declines (None)."""
        self.assertEqual(text_messages_chars([{"role": "user", "content": "abc", "name": "de", "id": "zzz"}]), 5)
        self.assertIsNone(text_messages_chars([{"role": "user", "content": [{"type": "text", "text": "a"}]}]))
        self.assertIsNone(text_messages_chars(["text"]))
        self.assertIsNone(text_messages_chars([{"type": "image_url", "content": "x"}]))
        self.assertIsNone(text_messages_chars([{"type": ["odd"], "content": "x"}]))
        self.assertEqual(text_messages_chars([]), 0)

    def test_mcp_servers_do_not_leak(self) -> None:
        """The shared empty media of the short cut is never counted into (MCP servers are per body)."""
        with_mcp = {**BASE, "mcp_servers": [{}, {}, {}]}
        size = len(json.dumps(with_mcp))
        self.assertEqual(read_request_and_estimate(with_mcp, size, "openai")[0].opaque_inputs, 3)
        self.assertEqual(read_request_and_estimate(BASE, size, "openai")[0].opaque_inputs, 0)
        self.assertEqual(read_request_and_estimate(with_mcp, size, "openai")[0].opaque_inputs, 3)
