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
