"""
The Vercel AI SDK (npm C{ai} with C{@ai-sdk/openai} and C{@ai-sdk/anthropic})
and LangChain (PyPI C{langchain-openai}, C{langchain-anthropic}), each
driving a tool-calling loop with a tool that really writes a file
(tests/runners/scripts/), configured only by their documented settings:
the AI SDK by C{OPENAI_BASE_URL}/C{OPENAI_API_KEY} or
C{ANTHROPIC_BASE_URL}/C{ANTHROPIC_API_KEY}, LangChain by the chat model's
C{base_url} and C{api_key}.
"""

from __future__ import annotations

import json
import os
import shutil

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from . import install
from .harness import CREDENTIALS, Expect, Loop, LoopAssertions
from .provider import ScriptedProvider, ToolCall

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts")
FINAL = "The SDK finished the loop."
TASK = "Write hello into out.txt with the write_file tool."


def write_file(tools):
    if "write_file" not in tools:
        return None
    return ToolCall("write_file", {"path": "out.txt", "text": "hello"})


class SdkLoops(LoopAssertions):
    @defer.inlineCallbacks
    def loop(self, providers):
        provider = ScriptedProvider(marker="out.txt", choose=write_file, final_text=FINAL)
        loop = yield Loop(self, provider, providers).start()
        return loop

    @defer.inlineCallbacks
    def finish(self, loop, result, expect: Expect, path: str):
        rows = yield loop.finish()
        self.check_loop(loop, result, rows, expect)
        with open(os.path.join(loop.work, "out.txt")) as f:
            self.assertEqual(f.read(), "hello")
        self.assertEqual([e.path for e in loop.provider.of_kind("tool_call", "final")], [path, path])


class AiSdkTests(SdkLoops, TestCase):
    @defer.inlineCallbacks
    def run_script(self, loop, env, which, model):
        yield loop.install(install.AI_SDK)
        # Node resolves the script's imports next to it: it runs from the install.
        script = shutil.copy(os.path.join(SCRIPTS, "ai_sdk_loop.mjs"), install.AI_SDK.directory)
        result = yield loop.run(install.AI_SDK, [script, which, model, TASK], env)
        return result

    @defer.inlineCallbacks
    def test_openai_chat_model(self):
        loop = yield self.loop(("OPENAI",))
        env = {"OPENAI_BASE_URL": loop.daemon.api + "/v1", "OPENAI_API_KEY": CREDENTIALS}
        result = yield self.run_script(loop, env, "openai", "gpt-4o-mini")
        yield self.finish(loop, result, Expect(
            sent="gpt-4o-mini", provider="openai", rule="bare_family", final_text=FINAL,
        ), "/v1/chat/completions")

    @defer.inlineCallbacks
    def test_openai_responses_model(self):
        """C{openai(id)} is the Responses API: passed through to OpenAI."""
        loop = yield self.loop(("OPENAI",))
        env = {"OPENAI_BASE_URL": loop.daemon.api + "/v1", "OPENAI_API_KEY": CREDENTIALS}
        result = yield self.run_script(loop, env, "openai-responses", "gpt-4o-mini")
        yield self.finish(loop, result, Expect(
            sent="gpt-4o-mini", provider="openai", rule="bare_family", final_text=FINAL,
        ), "/v1/responses")

    @defer.inlineCallbacks
    def test_openai_responses_model_reaching_anthropic(self):
        """The same SDK call for a Claude model: translated to Messages and back."""
        loop = yield self.loop(("ANTHROPIC",))
        env = {"OPENAI_BASE_URL": loop.daemon.api + "/v1", "OPENAI_API_KEY": CREDENTIALS}
        result = yield self.run_script(loop, env, "openai-responses", "anthropic/claude-haiku-4-5")
        yield self.finish(loop, result, Expect(
            sent="anthropic/claude-haiku-4-5", provider="anthropic", effective="claude-haiku-4-5",
            rule="surface_translated", final_text=FINAL,
        ), "/v1/messages")

    @defer.inlineCallbacks
    def test_anthropic_model(self):
        loop = yield self.loop(("ANTHROPIC",))
        env = {"ANTHROPIC_BASE_URL": loop.daemon.api + "/v1", "ANTHROPIC_API_KEY": CREDENTIALS}
        result = yield self.run_script(loop, env, "anthropic", "claude-haiku-4-5")
        yield self.finish(loop, result, Expect(
            sent="claude-haiku-4-5", provider="anthropic", rule="bare_family", final_text=FINAL,
        ), "/v1/messages")


class LangChainTests(SdkLoops, TestCase):
    def run_script(self, loop, which, model, base_url):
        script = os.path.join(SCRIPTS, "langchain_loop.py")
        return loop.run(install.LANGCHAIN, [script, which, model, base_url, TASK], {"CLLAMA_RUNNER_KEY": CREDENTIALS})

    @defer.inlineCallbacks
    def test_chat_openai(self):
        loop = yield self.loop(("OPENAI",))
        result = yield self.run_script(loop, "openai", "gpt-4o", loop.daemon.api + "/v1")
        yield self.finish(loop, result, Expect(
            sent="gpt-4o", provider="openai", rule="bare_family", final_text=FINAL,
        ), "/v1/chat/completions")

    @defer.inlineCallbacks
    def test_chat_openai_with_the_responses_api(self):
        loop = yield self.loop(("OPENAI",))
        result = yield self.run_script(loop, "openai-responses", "gpt-4o", loop.daemon.api + "/v1")
        yield self.finish(loop, result, Expect(
            sent="gpt-4o", provider="openai", rule="bare_family", final_text=FINAL,
        ), "/v1/responses")

    @defer.inlineCallbacks
    def test_chat_anthropic(self):
        loop = yield self.loop(("ANTHROPIC",))
        # ChatAnthropic's base_url is the API root, without /v1.
        result = yield self.run_script(loop, "anthropic", "claude-sonnet-4-5-20250929", loop.daemon.api)
        yield self.finish(loop, result, Expect(
            sent="claude-sonnet-4-5-20250929", provider="anthropic", rule="bare_family", final_text=FINAL,
        ), "/v1/messages")


class StructuredOutputTests(TestCase):
    """
    C{chat.completions.parse} (OpenAI SDK) and LangChain's
    C{with_structured_output()} on an Anthropic model: their C{response_format}
    JSON schema reaches Anthropic as structured output (C{output_config.format},
    every object closed, as Anthropic requires) and the answer parses.
    """

    timeout = LoopAssertions.timeout

    @defer.inlineCallbacks
    def test_parse_and_with_structured_output_on_anthropic(self):
        provider = ScriptedProvider(marker="never", choose=lambda tools: None, final_text="")
        loop = yield Loop(self, provider, ("ANTHROPIC",)).start()
        script = os.path.join(SCRIPTS, "structured_output.py")
        result = yield loop.run(
            install.LANGCHAIN, [script, "anthropic/claude-sonnet-4-5", loop.daemon.api + "/v1"],
            {"CLLAMA_RUNNER_KEY": CREDENTIALS},
        )
        rows = yield loop.finish()
        context = result.describe() + f"\nrefusals: {provider.refusals}"
        self.assertEqual(result.code, 0, context)
        answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        self.assertEqual([a["via"] for a in answers], ["openai-parse", "langchain"], context)
        for answer in answers:
            self.assertEqual(answer["city"], {"name": "hello", "population": 3, "coastal": True})
        self.assertEqual(provider.refusals, [])
        self.assertEqual([e.kind for e in provider.exchanges], ["structured", "structured"], context)
        for exchange in provider.exchanges:
            self.assertEqual(exchange.path, "/v1/messages")
            schema = exchange.body["output_config"]["format"]["schema"]
            self.assertEqual(schema["additionalProperties"], False)
            self.assertEqual(set(schema["properties"]), {"name", "population", "coastal"})
            self.assertNotIn("response_format", exchange.body)
        self.assertEqual([(r["provider"], r["status"]) for r in rows], [("anthropic", 200)] * 2)
        errors = [line for line in loop.daemon.audit_lines() if line["type"] == "error"]
        self.assertEqual(errors, [])
