"""
OpenClaw (npm C{openclaw}), headless (C{openclaw agent exec}, its
documented entry point for CI), with a config file that declares the proxy
as a custom provider (C{models.providers.<id>.baseUrl}, C{apiKey}, C{api}).
It runs its C{exec} tool and finishes.

OpenClaw's engines need Node >= 24.16; the machine's Node is older, so the
install pins Node from the registry's C{node-linux-<arch>} package and runs
OpenClaw on it.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from . import install
from .harness import CREDENTIALS, Expect, Loop, LoopAssertions
from .provider import ScriptedProvider, ToolCall

FINAL = "OpenClaw finished the loop."
TASK = "Run this shell command with your exec tool: echo hello > out.txt && cat out.txt"


def exec_tool(tools):
    if "exec" not in tools:
        return None
    return ToolCall("exec", {"command": "echo hello > out.txt && cat out.txt"})


class OpenClawTests(LoopAssertions, TestCase):
    @defer.inlineCallbacks
    def loop(self, providers, provider_config, model):
        provider = ScriptedProvider(marker="out.txt", choose=exec_tool, final_text=FINAL)
        loop = yield Loop(self, provider, providers).start()
        config = os.path.join(loop.home, "openclaw.json")
        with open(config, "w") as f:
            json.dump({"models": {"providers": {"cllama": provider_config(loop.daemon.api)}}}, f)
        result = yield loop.run(install.OPENCLAW, ["agent", "exec", TASK, "--config", config, "--model", model, "--json"], {})
        rows = yield loop.finish()
        with open(os.path.join(loop.work, "out.txt")) as f:
            self.assertEqual(f.read(), "hello\n")
        if result.code == 0:
            envelope = json.loads(result.stdout)
            self.assertEqual((envelope["status"], envelope["final"]), ("ok", FINAL), result.stdout)
        return loop, result, rows

    @defer.inlineCallbacks
    def test_openai_completions_provider(self):
        def config(api):
            return {
                "baseUrl": api + "/v1", "apiKey": CREDENTIALS, "api": "openai-completions",
                "models": [{"id": "gpt-4o", "name": "GPT-4o", "input": ["text"], "contextWindow": 128000, "maxTokens": 4096}],
            }

        loop, result, rows = yield self.loop(("OPENAI",), config, "cllama/gpt-4o")
        self.check_loop(loop, result, rows, Expect(sent="gpt-4o", provider="openai", rule="bare_family", final_text=FINAL))
        [call] = loop.provider.of_kind("tool_call")
        self.assertEqual(call.path, "/v1/chat/completions")
        self.assertIn("exec", loop.provider.declared_tools[0])

    @defer.inlineCallbacks
    def test_anthropic_messages_provider(self):
        def config(api):
            return {
                "baseUrl": api, "apiKey": CREDENTIALS, "api": "anthropic-messages",
                "models": [{"id": "claude-sonnet-4-5", "name": "Claude Sonnet 4.5", "input": ["text"],
                            "contextWindow": 200000, "maxTokens": 4096}],
            }

        loop, result, rows = yield self.loop(("ANTHROPIC",), config, "cllama/claude-sonnet-4-5")
        self.check_loop(loop, result, rows, Expect(
            sent="claude-sonnet-4-5", provider="anthropic", rule="bare_family", final_text=FINAL,
        ))
        [call] = loop.provider.of_kind("tool_call")
        self.assertEqual(call.path, "/v1/messages")

    @defer.inlineCallbacks
    def test_openai_responses_provider(self):
        def config(api):
            return {
                "baseUrl": api + "/v1", "apiKey": CREDENTIALS, "api": "openai-responses",
                "models": [{"id": "gpt-4o", "name": "GPT-4o", "input": ["text"], "contextWindow": 128000, "maxTokens": 4096}],
            }

        loop, result, rows = yield self.loop(("OPENAI",), config, "cllama/gpt-4o")
        self.check_loop(loop, result, rows, Expect(sent="gpt-4o", provider="openai", rule="bare_family", final_text=FINAL))
        [call] = loop.provider.of_kind("tool_call")
        self.assertEqual(call.path, "/v1/responses")
        # OpenClaw sends the whole conversation (store: false), its call ids
        # composed around the provider's (call_<call id>_<item id>_<hash>).
        self.assertIs(call.body["store"], False)
