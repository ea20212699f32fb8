"""
OpenCode (npm C{opencode-ai}), headless (C{opencode run}), configured only
by an C{opencode.json} in the project that declares the proxy as a
provider: an OpenAI-compatible one (C{/v1/chat/completions}) or the
built-in C{anthropic} provider with its C{baseURL} moved
(C{/v1/messages}).  It runs its bash tool and finishes; its title
generator's side call goes through the proxy too.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from . import install
from .harness import CREDENTIALS, Expect, Loop, LoopAssertions
from .provider import ScriptedProvider, ToolCall

FINAL = "OpenCode finished the loop."
TASK = "Run this shell command with your bash tool: echo hello > out.txt && cat out.txt"


def bash(tools):
    if "bash" not in tools:
        return None
    return ToolCall("bash", {"command": "echo hello > out.txt && cat out.txt", "description": "Write out.txt"})


class OpenCodeTests(LoopAssertions, TestCase):
    @defer.inlineCallbacks
    def loop(self, providers, config, model):
        provider = ScriptedProvider(marker="out.txt", choose=bash, final_text=FINAL)
        loop = yield Loop(self, provider, providers).start()
        with open(os.path.join(loop.work, "opencode.json"), "w") as f:
            json.dump({"$schema": "https://opencode.ai/config.json", "provider": config(loop.daemon.api)}, f)
        result = yield loop.run(install.OPENCODE, ["run", "-m", model, TASK], {})
        rows = yield loop.finish()
        with open(os.path.join(loop.work, "out.txt")) as f:
            self.assertEqual(f.read(), "hello\n")
        return loop, result, rows

    @defer.inlineCallbacks
    def test_openai_compatible_provider(self):
        def config(api):
            return {"cllama": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "cllama",
                "options": {"baseURL": api + "/v1", "apiKey": CREDENTIALS},
                # A custom provider's model has no catalog entry: its user
                # states GPT-4o's limits (OpenCode would otherwise ask for
                # 32,000 output tokens, which OpenAI refuses for GPT-4o).
                "models": {"gpt-4o": {"name": "GPT-4o", "limit": {"context": 128000, "output": 16384}}},
            }}

        loop, result, rows = yield self.loop(("OPENAI",), config, "cllama/gpt-4o")
        self.check_loop(loop, result, rows, Expect(sent="gpt-4o", provider="openai", rule="bare_family", final_text=FINAL))
        [call] = loop.provider.of_kind("tool_call")
        self.assertEqual(call.path, "/v1/chat/completions")
        self.assertIn("bash", loop.provider.declared_tools[0])
        # The title generator, a side call without tools, is metered as the agent's too.
        self.assertEqual(len(loop.provider.of_kind("side")), 1)

    @defer.inlineCallbacks
    def test_openai_provider_with_its_base_url_moved(self):
        """The built-in openai provider speaks the Responses API: passed through to OpenAI."""

        def config(api):
            return {"openai": {"options": {"baseURL": api + "/v1", "apiKey": CREDENTIALS}}}

        loop, result, rows = yield self.loop(("OPENAI",), config, "openai/gpt-4o")
        self.check_loop(loop, result, rows, Expect(sent="gpt-4o", provider="openai", rule="bare_family", final_text=FINAL))
        [call] = loop.provider.of_kind("tool_call")
        self.assertEqual(call.path, "/v1/responses")
        self.assertIn("bash", loop.provider.declared_tools[0])

    @defer.inlineCallbacks
    def test_anthropic_provider_with_its_base_url_moved(self):
        def config(api):
            return {"anthropic": {"options": {"baseURL": api + "/v1", "apiKey": CREDENTIALS}}}

        loop, result, rows = yield self.loop(("ANTHROPIC",), config, "anthropic/claude-sonnet-4-5")
        self.check_loop(loop, result, rows, Expect(
            sent="claude-sonnet-4-5", provider="anthropic", rule="bare_family", final_text=FINAL,
        ))
        [call] = loop.provider.of_kind("tool_call")
        self.assertEqual(call.path, "/v1/messages")
        # Its small model does the title, by a dated id the proxy sends as it is.
        [side] = loop.provider.of_kind("side")
        self.assertTrue(side.model.startswith("claude-haiku-"), side.model)
        self.assertIn(side.model, [r["requested_model"] for r in rows])
