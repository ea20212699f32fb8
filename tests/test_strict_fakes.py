"""
The fake providers are as strict as the real ones: their parameter lists are
the official SDKs' (the typed request parameters of C{openai} and
C{anthropic}), and they refuse what the API references say is refused, in
the provider's own error shape, over a real socket.
"""

from __future__ import annotations

import treq
from anthropic.types import message_create_params as anthropic_params
from anthropic.types.beta import message_create_params as anthropic_beta_params
from openai.types.chat import completion_create_params as openai_params
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from cllama_tx.testing import FakeProvider
from cllama_tx.testing.strict import (
    ANTHROPIC_PARAMS,
    OPENAI_PARAMS,
    anthropic_problems,
    openai_problems,
)

USER = [{"role": "user", "content": "Hi"}]


def _fields(cls) -> set[str]:
    fields: set[str] = set()
    for klass in cls.__mro__:
        fields |= set(getattr(klass, "__annotations__", {}))
    return fields


class ParameterListTests(SynchronousTestCase):
    def test_openai_parameters_are_the_sdks(self):
        sdk = _fields(openai_params.CompletionCreateParamsStreaming) | _fields(openai_params.CompletionCreateParamsNonStreaming)
        self.assertEqual(OPENAI_PARAMS, sdk)

    def test_anthropic_parameters_are_the_sdks(self):
        sdk = (
            _fields(anthropic_params.MessageCreateParamsStreaming)
            | _fields(anthropic_params.MessageCreateParamsNonStreaming)
            | _fields(anthropic_beta_params.MessageCreateParamsNonStreaming)
        )
        # "betas" is the SDK's way to send the anthropic-beta header, not a body
        # field; the sampling parameters are in the API reference, though this
        # SDK's typed parameters no longer list them.
        self.assertEqual(ANTHROPIC_PARAMS, (sdk - {"betas"}) | {"temperature", "top_k", "top_p"})


class AnthropicRefusalTests(SynchronousTestCase):
    def ok(self, **body):
        doc = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": USER, **body}
        self.assertEqual(anthropic_problems(doc), [])

    def refused(self, needle, betas=(), **body):
        doc = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": USER, **body}
        problems = anthropic_problems(doc, betas)
        self.assertTrue(any(needle in p for p in problems), problems)

    def test_accepted(self):
        self.ok()
        self.ok(temperature=1, thinking={"type": "enabled", "budget_tokens": 1024}, max_tokens=2000)
        self.ok(output_config={"format": {"type": "json_schema", "schema": {"type": "object", "properties": {}, "additionalProperties": False}}})

    def test_refused(self):
        self.refused("reasoning_effort: Extra inputs are not permitted", reasoning_effort="low")
        self.refused("temperature", temperature=1.5)
        self.refused("max_tokens: Field required", max_tokens=None)
        self.refused("maximum allowed number of output tokens", max_tokens=128000)
        self.refused("metadata.team", metadata={"team": "x"})
        self.refused("non-empty", messages=[{"role": "user", "content": [{"type": "text", "text": ""}]}])
        self.refused("'user' or 'assistant'", messages=[{"role": "tool", "content": "x"}])
        self.refused("budget_tokens", thinking={"type": "enabled", "budget_tokens": 100})
        self.refused("greater than `thinking.budget_tokens`", thinking={"type": "enabled", "budget_tokens": 2000}, max_tokens=1500)
        self.refused("may only be set to 1", thinking={"type": "enabled", "budget_tokens": 1024}, max_tokens=2000, temperature=0.5)
        self.refused("forces tool use", thinking={"type": "enabled", "budget_tokens": 1024}, max_tokens=2000,
                     tool_choice={"type": "any"})
        self.refused("additionalProperties", output_config={"format": {"type": "json_schema", "schema": {"type": "object"}}})
        self.refused("long context", betas=("context-1m-2025-08-07",), model="claude-haiku-4-5")

    def test_model_limits(self):
        problems = anthropic_problems({"model": "claude-3-5-haiku-20241022", "max_tokens": 100, "messages": USER,
                                       "thinking": {"type": "enabled", "budget_tokens": 1024}})
        self.assertTrue(any("not supported" in p for p in problems), problems)


class OpenAIRefusalTests(SynchronousTestCase):
    def refused(self, needle, **body):
        doc = {"model": "gpt-4o", "messages": USER, **body}
        problems = openai_problems(doc)
        self.assertTrue(any(needle in p for p in problems), problems)

    def test_accepted(self):
        self.assertEqual(openai_problems({"model": "gpt-4o", "messages": USER, "max_completion_tokens": 16384}), [])
        self.assertEqual(openai_problems({"model": "o3", "messages": USER, "reasoning_effort": "high"}), [])

    def test_refused(self):
        self.refused("Unrecognized request argument supplied: thinking", thinking={"type": "enabled"})
        self.refused("'reasoning_effort' is not supported", reasoning_effort="low")
        self.refused("too large", max_completion_tokens=32000)
        self.refused("out of range", temperature=2.5)
        self.refused("only allowed when 'stream' is enabled", stream_options={"include_usage": True})
        self.refused("only allowed when 'tools' are specified", parallel_tool_calls=False)
        self.refused("'tool_calls'", messages=[*USER, {"role": "tool", "tool_call_id": "x", "content": "r"}])
        self.refused("did not have response messages", messages=[
            *USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "user", "content": "next"},
        ])
        self.refused("Supported values", messages=[{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])

    def test_reasoning_models(self):
        problems = openai_problems({"model": "o3", "messages": USER, "temperature": 0.2, "max_tokens": 10, "reasoning_effort": "xhigh"})
        self.assertEqual(len(problems), 3, problems)


class OverTheWireTests(TestCase):
    async def test_refusal_in_the_providers_shape(self):
        fake = FakeProvider(reactor)
        await fake.start()
        self.addCleanup(fake.stop)
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        response = await treq.post(fake.base_url + "/messages", json={"model": "claude-sonnet-4-5", "messages": USER}, pool=pool)
        self.assertEqual(response.code, 400)
        body = await response.json()
        self.assertEqual(body["type"], "error")
        self.assertIn("max_tokens: Field required", body["error"]["message"])
        response = await treq.post(fake.base_url + "/chat/completions", json={"model": "gpt-4o", "messages": USER, "top_k": 3}, pool=pool)
        self.assertEqual(response.code, 400)
        body = await response.json()
        self.assertIn("Unrecognized request argument supplied: top_k", body["error"]["message"])
        # A body the provider takes is answered.
        response = await treq.post(fake.base_url + "/chat/completions", json={"model": "gpt-4o", "messages": USER}, pool=pool)
        self.assertEqual(response.code, 200)
        await response.json()
