"""
Any runner reaches any provider: the official SDKs on one surface, a fake
provider speaking the other wire format, the proxy translating both ways.
"""

import json

import anthropic
import openai
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cllama_tx.testing import (
    Reply,
    anthropic_message,
    anthropic_sse_events,
    anthropic_stream_events,
    openai_completion,
    openai_sse_events,
    openai_stream_chunks,
)
from tests.support import AGENT, SECRET, ProxyHarness

SSE = {"content-type": "text/event-stream"}
WEATHER_ANTHROPIC = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
WEATHER_OPENAI = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": WEATHER_ANTHROPIC["input_schema"],
    },
}


class Harnessed(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield ProxyHarness(self, fake_providers=("anthropic", "openai")).start()
        self.anthropic = anthropic.Anthropic(
            base_url=self.h.base_url, api_key=f"{AGENT}:{SECRET}", max_retries=0, timeout=20
        )
        self.openai = openai.OpenAI(
            base_url=self.h.base_url + "/v1", api_key=f"{AGENT}:{SECRET}", max_retries=0, timeout=20
        )
        self.addCleanup(self.anthropic.close)
        self.addCleanup(self.openai.close)

    def translated_lines(self):
        return [line for line in self.h.audit_lines() if line["type"] == "intervention"]


class AnthropicSdkToOpenAIProvider(Harnessed):
    @defer.inlineCallbacks
    def test_non_stream(self):
        self.h.fake.enqueue(Reply(json=openai_completion("Hola!", "gpt-test", 21, 3, cached_tokens=5)))

        def call():
            return self.anthropic.messages.create(
                model="openai/gpt-test",
                max_tokens=50,
                system="Answer in Spanish.",
                messages=[{"role": "user", "content": "Hello"}],
            )

        message = yield deferToThread(call)
        self.assertEqual(message.content[0].text, "Hola!")
        self.assertEqual(message.stop_reason, "end_turn")
        self.assertEqual(message.usage.output_tokens, 3)
        self.assertEqual(message.usage.cache_read_input_tokens, 5)
        received = self.h.fake.received[0]
        self.assertEqual(received.path, "/v1/chat/completions")
        self.assertEqual(received.json["messages"][0], {"role": "system", "content": "Answer in Spanish."})
        self.assertEqual(received.json["max_tokens"] if "max_tokens" in received.json else received.json["max_completion_tokens"], 50)
        [line] = self.translated_lines()
        self.assertEqual(line["intervention"], "surface_translated")
        yield self.h.committed()
        [row] = yield self.h.ledger_rows()
        # The row keeps plain input (21 - 5 cached) apart from the cache reads.
        self.assertEqual((row["input_tokens"], row["output_tokens"], row["cache_read_tokens"]), (16, 3, 5))

    @defer.inlineCallbacks
    def test_stream(self):
        chunks = openai_stream_chunks(["Ho", "la", "!"], "gpt-test", 21, 3)
        self.h.fake.enqueue(Reply(sse=openai_sse_events(chunks), headers=SSE))

        def call():
            with self.anthropic.messages.stream(
                model="openai/gpt-test", max_tokens=50, messages=[{"role": "user", "content": "Hello"}]
            ) as stream:
                return "".join(stream.text_stream), stream.get_final_message()

        text, final = yield deferToThread(call)
        self.assertEqual(text, "Hola!")
        self.assertEqual(final.usage.output_tokens, 3)
        self.assertEqual(final.stop_reason, "end_turn")
        self.assertTrue(self.h.fake.received[0].json["stream_options"]["include_usage"])

    @defer.inlineCallbacks
    def test_tool_use_round_trip(self):
        call_ = {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}
        self.h.fake.enqueue(
            Reply(json=openai_completion(None, "gpt-test", 30, 12, finish_reason="tool_calls", tool_calls=[call_])),
            Reply(json=openai_completion("Sunny in Paris.", "gpt-test", 60, 5)),
        )

        def call():
            messages = [{"role": "user", "content": "Weather in Paris?"}]
            first = self.anthropic.messages.create(
                model="openai/gpt-test", max_tokens=64, tools=[WEATHER_ANTHROPIC], messages=messages
            )
            use = [b for b in first.content if b.type == "tool_use"][0]
            messages += [
                {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
            ]
            second = self.anthropic.messages.create(
                model="openai/gpt-test", max_tokens=64, tools=[WEATHER_ANTHROPIC], messages=messages
            )
            return first, use, second

        first, use, second = yield deferToThread(call)
        self.assertEqual(first.stop_reason, "tool_use")
        self.assertEqual((use.name, use.input), ("get_weather", {"city": "Paris"}))
        self.assertEqual(second.content[0].text, "Sunny in Paris.")
        sent = self.h.fake.received[1].json
        self.assertEqual(sent["tools"][0]["function"]["name"], "get_weather")
        tool_message = [m for m in sent["messages"] if m["role"] == "tool"][0]
        self.assertEqual(tool_message["tool_call_id"], use.id)
        assistant = [m for m in sent["messages"] if m["role"] == "assistant"][0]
        self.assertEqual(json.loads(assistant["tool_calls"][0]["function"]["arguments"]), {"city": "Paris"})

    @defer.inlineCallbacks
    def test_untranslatable_parameter_is_refused_by_name(self):
        response = yield self.h.post(
            "/v1/messages",
            {"model": "openai/gpt-test", "max_tokens": 5, "top_k": 3, "messages": [{"role": "user", "content": "hi"}]},
        )
        self.assertEqual(response.code, 400)
        body = yield response.json()
        self.assertEqual(body["type"], "error")
        self.assertIn("top_k", body["error"]["message"])
        self.assertEqual(self.h.fake.received, [])


class OpenAISdkToAnthropicProvider(Harnessed):
    @defer.inlineCallbacks
    def test_non_stream(self):
        self.h.fake.enqueue(Reply(json=anthropic_message("Bonjour!", "claude-test", 12, 4, cache_read_input_tokens=8)))

        def call():
            return self.openai.chat.completions.create(
                model="anthropic/claude-test",
                messages=[{"role": "system", "content": "French only."}, {"role": "user", "content": "Hello"}],
            )

        completion = yield deferToThread(call)
        self.assertEqual(completion.choices[0].message.content, "Bonjour!")
        self.assertEqual(completion.choices[0].finish_reason, "stop")
        self.assertEqual(completion.usage.prompt_tokens, 20)
        self.assertEqual(completion.usage.prompt_tokens_details.cached_tokens, 8)
        received = self.h.fake.received[0]
        self.assertEqual(received.path, "/v1/messages")
        self.assertEqual(received.json["system"] if isinstance(received.json["system"], str) else received.json["system"][0]["text"], "French only.")
        self.assertIn("max_tokens", received.json)
        self.assertEqual(received.header("anthropic-version"), "2023-06-01")

    @defer.inlineCallbacks
    def test_stream(self):
        events = anthropic_stream_events(["Bon", "jour"], "claude-test", 12, 4)
        self.h.fake.enqueue(Reply(sse=anthropic_sse_events(events), headers=SSE))

        def call():
            stream = self.openai.chat.completions.create(
                model="anthropic/claude-test",
                messages=[{"role": "user", "content": "Hello"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            return list(stream)

        chunks = yield deferToThread(call)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, "Bonjour")
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        self.assertEqual(finishes, ["stop"])
        self.assertEqual(chunks[-1].usage.completion_tokens, 4)

    @defer.inlineCallbacks
    def test_streaming_tool_calls(self):
        tool_use = {"id": "toolu_9", "name": "get_weather", "input": {"city": "Oslo"}}
        events = anthropic_stream_events([], "claude-test", 40, 15, tool_uses=[tool_use])
        self.h.fake.enqueue(Reply(sse=anthropic_sse_events(events), headers=SSE))

        def call():
            stream = self.openai.chat.completions.create(
                model="anthropic/claude-test",
                messages=[{"role": "user", "content": "Weather in Oslo?"}],
                tools=[WEATHER_OPENAI],
                stream=True,
            )
            return list(stream)

        chunks = yield deferToThread(call)
        calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
        self.assertEqual(calls[0].id, "toolu_9")
        self.assertEqual(calls[0].function.name, "get_weather")
        arguments = "".join(tc.function.arguments or "" for tc in calls)
        self.assertEqual(json.loads(arguments), {"city": "Oslo"})
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        self.assertEqual(finishes, ["tool_calls"])
        sent = self.h.fake.received[0].json
        self.assertEqual(sent["tools"][0]["name"], "get_weather")
        self.assertEqual(sent["tools"][0]["input_schema"], WEATHER_ANTHROPIC["input_schema"])

    @defer.inlineCallbacks
    def test_upstream_error_in_openai_shape(self):
        self.h.fake.enqueue(
            Reply(status=400, json={"type": "error", "error": {"type": "invalid_request_error", "message": "messages: bad"}})
        )

        def call():
            return self.openai.chat.completions.create(
                model="anthropic/claude-test", messages=[{"role": "user", "content": "hi"}]
            )

        error = yield self.assertFailure(deferToThread(call), openai.BadRequestError)
        self.assertIn("messages: bad", error.message)
