"""
Codex CLI (npm C{@openai/codex}), headless (C{codex exec}), configured only
by its C{config.toml}: a model provider whose C{base_url} is the proxy and
whose C{env_key} names the variable holding the agent's credential, with
C{wire_api = "responses"} (the only API Codex speaks).  It streams
C{/v1/responses} with function tools, runs its shell tool and finishes:
to OpenAI natively (passed through) and to Anthropic (translated both ways).
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from . import install
from .harness import CREDENTIALS, Expect, Loop, LoopAssertions
from .provider import ScriptedProvider, ToolCall

FINAL = "Codex finished the loop."
COMMAND = "echo hello > out.txt && cat out.txt"
TASK = f"Run this shell command with your shell tool, then say you are done: {COMMAND}"


def shell(tools):
    """Codex's shell tool: C{exec_command} (unified exec), or the older C{shell}."""
    if "exec_command" in tools:
        return ToolCall("exec_command", {"cmd": COMMAND})
    if "shell" in tools:
        return ToolCall("shell", {"command": ["bash", "-lc", COMMAND]})
    return None


def config(api: str, model: str) -> str:
    return "\n".join([
        f'model = "{model}"',
        'model_provider = "cllama"',
        "",
        "[model_providers.cllama]",
        'name = "cllama"',
        f'base_url = "{api}/v1"',
        'env_key = "CLLAMA_API_KEY"',
        'wire_api = "responses"',
        "request_max_retries = 0",
        "stream_max_retries = 0",
        "",
    ])


class CodexTests(LoopAssertions, TestCase):
    @defer.inlineCallbacks
    def loop(self, providers, model):
        provider = ScriptedProvider(marker="out.txt", choose=shell, final_text=FINAL)
        loop = yield Loop(self, provider, providers).start()
        os.makedirs(os.path.join(loop.home, ".codex"))
        with open(os.path.join(loop.home, ".codex", "config.toml"), "w") as f:
            f.write(config(loop.daemon.api, model))
        argv = ["exec", "--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox", TASK]
        result = yield loop.run(install.CODEX, argv, {"CLLAMA_API_KEY": CREDENTIALS})
        rows = yield loop.finish()
        with open(os.path.join(loop.work, "out.txt")) as f:
            self.assertEqual(f.read(), "hello\n")
        return loop, result, rows

    @defer.inlineCallbacks
    def test_openai_natively(self):
        loop, result, rows = yield self.loop(("OPENAI",), "gpt-5.4")
        self.check_loop(loop, result, rows, Expect(sent="gpt-5.4", provider="openai", rule="bare_family", final_text=FINAL))
        [call] = loop.provider.of_kind("tool_call")
        self.assertEqual(call.path, "/v1/responses")
        self.assertTrue(call.body["stream"])
        # Passed through: Codex's own body, the model's name as the proxy resolved it.
        self.assertEqual(call.body["model"], "gpt-5.4")
        self.assertIn("exec_command", loop.provider.declared_tools[0])
        [final] = loop.provider.of_kind("final")
        self.assertEqual(final.path, "/v1/responses")
        self.assertEqual(
            [i.get("type") for i in final.body["input"] if i.get("type") in ("function_call", "function_call_output")],
            ["function_call", "function_call_output"],
        )
        audit = loop.daemon.audit_lines()
        self.assertEqual([line for line in audit if line.get("intervention") == "surface_translated"], [])

    @defer.inlineCallbacks
    def test_anthropic_translated(self):
        loop, result, rows = yield self.loop(("ANTHROPIC",), "anthropic/claude-sonnet-4-5")
        turns = self.check_loop(loop, result, rows, Expect(
            sent="anthropic/claude-sonnet-4-5", provider="anthropic", effective="claude-sonnet-4-5",
            rule="surface_translated", final_text=FINAL,
        ))
        [call] = loop.provider.of_kind("tool_call")
        self.assertEqual(call.path, "/v1/messages")
        self.assertTrue(call.body["stream"])
        self.assertIn("exec_command", [t["name"] for t in call.body["tools"]])
        [final] = loop.provider.of_kind("final")
        tool_use = [b for m in final.body["messages"] if isinstance(m["content"], list) for b in m["content"] if b.get("type") == "tool_use"]
        self.assertEqual([(b["id"], b["name"]) for b in tool_use], [("toolu_runner_loop_0001", "exec_command")])
        audit = loop.daemon.audit_lines()
        translated = [line for line in audit if line.get("intervention") == "surface_translated"]
        self.assertEqual(len(translated), len(rows))
        for line in translated:
            self.assertEqual((line["from_surface"], line["to_format"]), ("openai-responses", "anthropic"))
            # Codex's hints the Anthropic answer does without, each named.
            self.assertIn("prompt_cache_key", line["dropped"], json.dumps(line))
        self.assertTrue(all(r["output_tokens"] > 0 for r in turns))

    @defer.inlineCallbacks
    def test_chat_completions_provider_translated(self):
        loop, result, rows = yield self.loop(("XAI",), "xai/grok-4")
        self.check_loop(loop, result, rows, Expect(
            sent="xai/grok-4", provider="xai", effective="grok-4", rule="surface_translated", final_text=FINAL,
        ))
        [call] = loop.provider.of_kind("tool_call")
        self.assertEqual(call.path, "/v1/chat/completions")
        self.assertEqual(call.body["stream_options"], {"include_usage": True})
        [final] = loop.provider.of_kind("final")
        [tool] = [m for m in final.body["messages"] if m["role"] == "tool"]
        self.assertEqual(tool["tool_call_id"], "toolu_runner_loop_0001")
