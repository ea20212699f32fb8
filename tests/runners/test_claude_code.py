"""
Claude Code (npm C{@anthropic-ai/claude-code}), headless (C{claude -p}),
with only C{ANTHROPIC_BASE_URL} and C{ANTHROPIC_AUTH_TOKEN} or
C{ANTHROPIC_API_KEY} pointed at the proxy: it runs its Bash tool and
finishes, through C{/v1/messages?beta=true} with its beta headers.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from . import install
from .harness import CREDENTIALS, Expect, Loop, LoopAssertions
from .provider import ScriptedProvider, ToolCall

FINAL = "Claude Code finished the loop."
TASK = "Run this shell command with your Bash tool: echo hello > out.txt && cat out.txt"


def bash(tools):
    if "Bash" not in tools:
        return None
    return ToolCall("Bash", {"command": "echo hello > out.txt && cat out.txt", "description": "Write out.txt"})


class ClaudeCodeTests(LoopAssertions, TestCase):
    @defer.inlineCallbacks
    def loop(self, env, args=(), metadata=None):
        provider = ScriptedProvider(marker="out.txt", choose=bash, final_text=FINAL)
        loop = yield Loop(self, provider, ("ANTHROPIC",), metadata=metadata).start()
        # Only the documented settings; --allowedTools lets -p run Bash unasked.
        env = {"ANTHROPIC_BASE_URL": loop.daemon.api, **env}
        result = yield loop.run(install.CLAUDE_CODE, ["-p", TASK, "--allowedTools", "Bash", *args], env)
        rows = yield loop.finish()
        return loop, result, rows

    @defer.inlineCallbacks
    def test_auth_token_and_its_default_model(self):
        loop, result, rows = yield self.loop({"ANTHROPIC_AUTH_TOKEN": CREDENTIALS})
        turns = self.check_loop(loop, result, rows, Expect(
            sent=lambda name: name.startswith("claude-"), provider="anthropic", rule="bare_family", final_text=FINAL,
        ))
        with open(os.path.join(loop.work, "out.txt")) as f:
            self.assertEqual(f.read(), "hello\n")
        [call] = loop.provider.of_kind("tool_call")
        # Claude Code's beta query and headers reach the provider as sent.
        self.assertEqual((call.path, call.query), ("/v1/messages", "beta=true"))
        self.assertIn("claude-code-", call.headers.get("anthropic-beta", ""))
        self.assertEqual(call.headers["x-api-key"], "sk-runner-upstream-key-7788")
        self.assertNotIn("authorization", call.headers)
        self.assertIn("Bash", loop.provider.declared_tools[0])
        self.assertTrue(all(row["requested_model"] == turns[0]["requested_model"] for row in turns))

    @defer.inlineCallbacks
    def test_api_key_and_a_dated_model(self):
        loop, result, rows = yield self.loop(
            {"ANTHROPIC_API_KEY": CREDENTIALS}, ["--model", "claude-sonnet-4-5-20250929"]
        )
        self.check_loop(loop, result, rows, Expect(
            sent="claude-sonnet-4-5-20250929", provider="anthropic", rule="bare_family", final_text=FINAL,
        ))
        with open(os.path.join(loop.work, "out.txt")) as f:
            self.assertEqual(f.read(), "hello\n")

    @defer.inlineCallbacks
    def test_under_a_model_policy(self):
        # A pod's agent allowed only Sonnet 4.5: Claude Code's dated id is the
        # allowed ref, sent upstream as the policy declares it.
        policy = {"model_policy": {"mode": "clamp", "allowed": [{"slot": "primary", "ref": "anthropic/claude-sonnet-4-5"}]}}
        loop, result, rows = yield self.loop(
            {"ANTHROPIC_AUTH_TOKEN": CREDENTIALS}, ["--model", "claude-sonnet-4-5-20250929"], metadata=policy
        )
        self.check_loop(loop, result, rows, Expect(
            sent="claude-sonnet-4-5-20250929", provider="anthropic", effective="claude-sonnet-4-5",
            rule="dated_model_normalized", final_text=FINAL,
        ))
        self.assertEqual({e.model for e in loop.provider.exchanges}, {"claude-sonnet-4-5"})

    @defer.inlineCallbacks
    def openai_loop(self, model):
        provider = ScriptedProvider(marker="out.txt", choose=bash, final_text=FINAL)
        loop = yield Loop(self, provider, ("OPENAI",)).start()
        env = {"ANTHROPIC_BASE_URL": loop.daemon.api, "ANTHROPIC_AUTH_TOKEN": CREDENTIALS}
        result = yield loop.run(
            install.CLAUDE_CODE, ["-p", TASK, "--allowedTools", "Bash", "--model", f"openai/{model}"], env
        )
        rows = yield loop.finish()
        self.check_loop(loop, result, rows, Expect(
            sent=f"openai/{model}", provider="openai", effective=model, rule="surface_translated", final_text=FINAL,
        ))
        with open(os.path.join(loop.work, "out.txt")) as f:
            self.assertEqual(f.read(), "hello\n")
        calls = loop.provider.of_kind("tool_call", "final")
        self.assertEqual({(c.path, c.query) for c in calls}, {("/v1/chat/completions", "")})
        for call in calls:
            self.assertNotIn("anthropic-beta", call.headers)
        self.assertIn("Bash", loop.provider.declared_tools[0])
        translated = [
            line for line in loop.daemon.audit_lines()
            if line["type"] == "intervention" and line["intervention"] == "surface_translated"
        ]
        self.assertEqual(len(translated), len(calls))
        return calls, translated

    @defer.inlineCallbacks
    def test_an_openai_model(self):
        """
        Claude Code on openai/gpt-4o: its Messages requests (thinking, effort,
        context management, cache hints, deferred tools, betas) translated
        for a provider as strict as OpenAI, the tool loop completed, and what
        was dropped or lowered named on the intervention line.
        """
        calls, translated = yield self.openai_loop("gpt-4o")
        for call in calls:
            # gpt-4o takes no reasoning_effort and at most 16384 output tokens.
            self.assertNotIn("reasoning_effort", call.body)
            self.assertLessEqual(call.body["max_completion_tokens"], 16384)
        dropped = set(translated[0]["dropped"])
        self.assertTrue({"thinking", "context_management", "cache_control"} <= dropped, dropped)
        self.assertTrue(any(name.startswith("anthropic-beta: ") for name in dropped), dropped)
        self.assertTrue(any(a.startswith("max_tokens: ") for a in translated[0]["adjusted"]), translated[0])

    @defer.inlineCallbacks
    def test_an_openai_reasoning_model(self):
        """On openai/o3 Claude Code's thinking and effort become reasoning_effort."""
        calls, translated = yield self.openai_loop("o3")
        for call in calls:
            self.assertIn(call.body["reasoning_effort"], ("low", "medium", "high"))
            self.assertNotIn("max_tokens", call.body)
        self.assertNotIn("thinking", translated[0].get("dropped", []))

    @defer.inlineCallbacks
    def test_a_wrong_secret_is_told_in_anthropic_terms(self):
        loop, result, rows = yield self.loop({"ANTHROPIC_AUTH_TOKEN": CREDENTIALS[:-4] + "0000"})
        self.assertEqual(result.code, 1, result.describe())
        # Claude Code shows the proxy's Anthropic-shaped error as it is.
        self.assertIn("403", result.stdout + result.stderr, result.describe())
        self.assertIn("unknown agent or wrong secret", result.stdout + result.stderr, result.describe())
        self.assertEqual(loop.provider.exchanges, [])
        self.assertEqual(rows, [])
        refused = [line for line in loop.daemon.audit_lines() if line["type"] == "error"]
        self.assertTrue(refused, loop.daemon.audit_lines())
        self.assertEqual({(line["status_code"], line["claw_id"]) for line in refused}, {(403, None)})
        self.assertFalse(os.path.exists(os.path.join(loop.work, "out.txt")))
