"""
Whole tool-use conversations through the translators, driven by the
official SDKs as the agent: user -> assistant tool call -> tool result ->
final answer, for an OpenAI agent in front of an Anthropic upstream and an
Anthropic agent in front of an OpenAI upstream, JSON and streaming.

The SDK clients talk to an in-memory transport (no sockets, no reactor)
that plays the proxy's translation path: translate the agent's request,
check it against the upstream SDK's request type, record it, answer with a
scripted upstream reply (built with L{cllama_tx.testing}) translated back.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
from openai.lib.streaming.chat import ChatCompletionStreamState
from twisted.trial.unittest import SynchronousTestCase

try:  # the SDKs installed here use httpx2; older ones use httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

from cllama_tx.surfaces.translate import (
    AnthropicToChatStream,
    ChatToAnthropicStream,
    UntranslatableRequest,
    anthropic_error_to_openai,
    chat_response_to_messages,
    chat_to_messages_request,
    messages_response_to_chat,
    messages_to_chat_request,
    openai_error_to_anthropic,
)
from cllama_tx.testing import (
    anthropic_error,
    anthropic_message,
    anthropic_stream_events,
    openai_completion,
    openai_error,
    openai_stream_chunks,
    sse_encode_anthropic,
    sse_encode_openai,
)
from tests.surfaces.test_translate import validate_anthropic_request, validate_openai_request

CREATED = 1700001234
SSE = {"content-type": "text/event-stream"}

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
    "required": ["city"],
}


def pieces(body: bytes, size: int = 5) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


class Upstream:
    """A scripted upstream reply: JSON, SSE events (or a raw SSE body), or an error."""

    def __init__(self, json: Any = None, events: Any = None, status: int = 200, raw: bytes | None = None) -> None:
        self.json = json
        self.events = events
        self.status = status
        self.raw = raw


class TranslatingProxy:
    """The proxy's translation path, in memory."""

    def __init__(self, agent_format: str, replies: list[Upstream]) -> None:
        self.agent_format = agent_format
        self.replies = list(replies)
        self.upstream_requests: list[dict] = []

    def transport(self) -> Any:
        return httpx.MockTransport(self.handle)

    def handle(self, request: Any) -> Any:
        doc = json.loads(request.content)
        try:
            if self.agent_format == "openai":
                upstream = chat_to_messages_request(doc)
                validate_anthropic_request(upstream)
            else:
                upstream = messages_to_chat_request(doc)
                validate_openai_request(upstream)
        except UntranslatableRequest as e:
            if self.agent_format == "openai":
                body = {"error": {"message": str(e), "type": "invalid_request_error", "param": e.params[0], "code": "untranslatable"}}
            else:
                body = {"type": "error", "error": {"type": "invalid_request_error", "message": str(e)}}
            return httpx.Response(400, json=body)
        self.upstream_requests.append(upstream)
        reply = self.replies.pop(0)
        if reply.status != 200:
            raw = json.dumps(reply.json).encode()
            body = anthropic_error_to_openai(reply.status, raw) if self.agent_format == "openai" else openai_error_to_anthropic(reply.status, raw)
            return httpx.Response(reply.status, content=body, headers={"content-type": "application/json"})
        if self.agent_format == "openai":
            if upstream.get("stream"):
                include_usage = (doc.get("stream_options") or {}).get("include_usage") is True
                translator = AnthropicToChatStream(include_usage, CREATED)
                return self._stream(translator, reply.raw or sse_encode_anthropic(reply.events))
            return httpx.Response(200, json=messages_response_to_chat(reply.json, created=CREATED))
        if upstream.get("stream"):
            return self._stream(ChatToAnthropicStream(), reply.raw or sse_encode_openai(reply.events))
        return httpx.Response(200, json=chat_response_to_messages(reply.json))

    @staticmethod
    def _stream(translator: Any, body: bytes) -> Any:
        def chunks() -> Any:
            for piece in pieces(body):
                out = translator.feed(piece)
                if out:
                    yield out
            out = translator.finish()
            if out:
                yield out

        return httpx.Response(200, headers=SSE, content=chunks())


# ---------------------------------------------------------------------------
# OpenAI agent, Anthropic upstream
# ---------------------------------------------------------------------------


class OpenAIAgentAnthropicUpstreamTests(SynchronousTestCase):
    TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER_SCHEMA}}]

    def client(self, proxy: TranslatingProxy) -> openai.OpenAI:
        client = openai.OpenAI(
            api_key="agent:secret",
            base_url="http://proxy.test/v1",
            http_client=httpx.Client(transport=proxy.transport()),
            max_retries=0,
        )
        self.addCleanup(client.close)
        return client

    def ask(self, client: openai.OpenAI, messages: list, stream: bool) -> Any:
        kwargs: dict[str, Any] = {"model": "claude-sonnet-4", "messages": messages, "tools": self.TOOLS, "temperature": 0.2}
        if not stream:
            return client.chat.completions.create(**kwargs)
        state = ChatCompletionStreamState()
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
        for chunk in chunks:
            state.handle_chunk(chunk)
        self.assertEqual(chunks[-1].choices, [])
        self.assertIsNotNone(chunks[-1].usage)
        return state.get_final_completion()

    def conversation(self, stream: bool) -> None:
        tool_use = {"id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris", "unit": "C"}}
        if stream:
            replies = [
                Upstream(events=anthropic_stream_events(["Let me check."], "claude-sonnet-4", 40, 25, tool_uses=[tool_use], id="msg_turn1")),
                Upstream(events=anthropic_stream_events(["It is 18°C ", "and sunny."], "claude-sonnet-4", 90, 12, cache_read_input_tokens=30, id="msg_turn2")),
            ]
        else:
            replies = [
                Upstream(json=anthropic_message("Let me check.", "claude-sonnet-4", 40, 25, tool_uses=[tool_use], id="msg_turn1")),
                Upstream(json=anthropic_message("It is 18°C and sunny.", "claude-sonnet-4", 90, 12, cache_read_input_tokens=30, id="msg_turn2")),
            ]
        proxy = TranslatingProxy("openai", replies)
        client = self.client(proxy)
        messages: list[dict] = [
            {"role": "system", "content": "You are a weather bot."},
            {"role": "user", "content": "Weather in Paris?"},
        ]

        first = self.ask(client, messages, stream)
        choice = first.choices[0]
        self.assertEqual(first.id, "chatcmpl-turn1")
        self.assertEqual(choice.finish_reason, "tool_calls")
        self.assertEqual(choice.message.content, "Let me check.")
        (call,) = choice.message.tool_calls
        self.assertEqual((call.id, call.function.name), ("toolu_01A", "get_weather"))
        self.assertEqual(json.loads(call.function.arguments), {"city": "Paris", "unit": "C"})
        self.assertEqual((first.usage.prompt_tokens, first.usage.completion_tokens), (40, 25))

        up1 = proxy.upstream_requests[0]
        self.assertEqual(up1["system"], "You are a weather bot.")
        self.assertEqual(up1["messages"], [{"role": "user", "content": "Weather in Paris?"}])
        self.assertEqual(up1["tools"], [{"name": "get_weather", "description": "Current weather", "input_schema": WEATHER_SCHEMA}])
        self.assertEqual(up1["max_tokens"], 4096)
        self.assertEqual(up1["temperature"], 0.2)
        self.assertEqual(up1.get("stream"), True if stream else None)

        messages.append(
            {
                "role": "assistant",
                "content": choice.message.content,
                "tool_calls": [tc.model_dump(exclude_none=True) for tc in choice.message.tool_calls],
            }
        )
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "18°C, sunny"})

        second = self.ask(client, messages, stream)
        self.assertEqual(second.choices[0].message.content, "It is 18°C and sunny.")
        self.assertEqual(second.choices[0].finish_reason, "stop")
        self.assertIsNone(second.choices[0].message.tool_calls)
        self.assertEqual((second.usage.prompt_tokens, second.usage.prompt_tokens_details.cached_tokens), (120, 30))

        up2 = proxy.upstream_requests[1]
        self.assertEqual(
            up2["messages"],
            [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Let me check."},
                        {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Paris", "unit": "C"}},
                    ],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01A", "content": "18°C, sunny"}]},
            ],
        )

    def test_json(self) -> None:
        self.conversation(stream=False)

    def test_stream(self) -> None:
        self.conversation(stream=True)

    def test_upstream_error(self) -> None:
        proxy = TranslatingProxy("openai", [Upstream(json=anthropic_error("invalid_request_error", "messages: roles must alternate"), status=400)])
        e = self.assertRaises(openai.BadRequestError, self.ask, self.client(proxy), [{"role": "user", "content": "x"}], False)
        self.assertIn("roles must alternate", str(e))
        self.assertEqual(e.code, "invalid_request_error")

    def test_mid_stream_error(self) -> None:
        events = anthropic_stream_events(["partial"], "c")[:4] + [("error", anthropic_error("overloaded_error", "Overloaded"))]
        proxy = TranslatingProxy("openai", [Upstream(events=events)])
        e = self.assertRaises(openai.APIError, self.ask, self.client(proxy), [{"role": "user", "content": "x"}], True)
        self.assertIn("Overloaded", str(e))

    def test_refused_parameter_is_named(self) -> None:
        proxy = TranslatingProxy("openai", [])
        client = self.client(proxy)
        e = self.assertRaises(
            openai.BadRequestError,
            client.chat.completions.create,
            model="claude-sonnet-4",
            messages=[{"role": "user", "content": "x"}],
            logprobs=True,
            top_logprobs=2,
        )
        self.assertIn("logprobs", str(e))
        self.assertIn("top_logprobs", str(e))
        self.assertEqual(proxy.upstream_requests, [])


# ---------------------------------------------------------------------------
# Anthropic agent, OpenAI upstream
# ---------------------------------------------------------------------------


class AnthropicAgentOpenAIUpstreamTests(SynchronousTestCase):
    TOOLS = [{"name": "get_weather", "description": "Current weather", "input_schema": WEATHER_SCHEMA}]

    def client(self, proxy: TranslatingProxy) -> anthropic.Anthropic:
        client = anthropic.Anthropic(
            api_key="agent:secret",
            base_url="http://proxy.test",
            http_client=httpx.Client(transport=proxy.transport()),
            max_retries=0,
        )
        self.addCleanup(client.close)
        return client

    def ask(self, client: anthropic.Anthropic, messages: list, stream: bool) -> Any:
        kwargs: dict[str, Any] = {
            "model": "gpt-4o",
            "max_tokens": 300,
            "system": "You are a weather bot.",
            "messages": messages,
            "tools": self.TOOLS,
        }
        if not stream:
            return client.messages.create(**kwargs)
        with client.messages.stream(**kwargs) as s:
            return s.get_final_message()

    def conversation(self, stream: bool) -> None:
        call = {"id": "call_W1", "name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}
        if stream:
            replies = [
                Upstream(events=openai_stream_chunks(["Let me ", "check."], "gpt-4o", 40, 25, tool_calls=[call], finish_reason="tool_calls", id="chatcmpl-turn1")),
                Upstream(events=openai_stream_chunks(["It is 18°C ", "and sunny."], "gpt-4o", 90, 12, cached_tokens=30, id="chatcmpl-turn2")),
            ]
        else:
            replies = [
                Upstream(json=openai_completion("Let me check.", "gpt-4o", 40, 25, tool_calls=[call], finish_reason="tool_calls", id="chatcmpl-turn1")),
                Upstream(json=openai_completion("It is 18°C and sunny.", "gpt-4o", 90, 12, cached_tokens=30, id="chatcmpl-turn2")),
            ]
        proxy = TranslatingProxy("anthropic", replies)
        client = self.client(proxy)
        messages: list[dict] = [{"role": "user", "content": "Weather in Paris?"}]

        first = self.ask(client, messages, stream)
        self.assertEqual(first.id, "msg_turn1")
        self.assertEqual(first.stop_reason, "tool_use")
        text, tool = first.content
        self.assertEqual(text.text, "Let me check.")
        self.assertEqual((tool.type, tool.id, tool.name, tool.input), ("tool_use", "call_W1", "get_weather", {"city": "Paris", "unit": "C"}))
        self.assertEqual((first.usage.input_tokens, first.usage.output_tokens), (40, 25))

        up1 = proxy.upstream_requests[0]
        self.assertEqual(
            up1["messages"],
            [{"role": "system", "content": "You are a weather bot."}, {"role": "user", "content": "Weather in Paris?"}],
        )
        self.assertEqual(up1["tools"], [{"type": "function", "function": {"name": "get_weather", "description": "Current weather", "parameters": WEATHER_SCHEMA}}])
        self.assertEqual(up1["max_completion_tokens"], 300)
        if stream:
            self.assertEqual(up1["stream_options"], {"include_usage": True})

        messages.append({"role": "assistant", "content": [block.model_dump() for block in first.content]})
        messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool.id, "content": "18°C, sunny"}]})

        second = self.ask(client, messages, stream)
        self.assertEqual([b.text for b in second.content], ["It is 18°C and sunny."])
        self.assertEqual(second.stop_reason, "end_turn")
        self.assertEqual(
            (second.usage.input_tokens, second.usage.cache_read_input_tokens, second.usage.output_tokens), (60, 30, 12)
        )

        up2 = proxy.upstream_requests[1]
        self.assertEqual(
            up2["messages"][1:],
            [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": "Let me check.",
                    "tool_calls": [{"id": "call_W1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris","unit":"C"}'}}],
                },
                {"role": "tool", "tool_call_id": "call_W1", "content": "18°C, sunny"},
            ],
        )

    def test_json(self) -> None:
        self.conversation(stream=False)

    def test_stream(self) -> None:
        self.conversation(stream=True)

    def test_upstream_error(self) -> None:
        proxy = TranslatingProxy("anthropic", [Upstream(json=openai_error("Rate limit reached", type="requests", code="rate_limit_exceeded"), status=429)])
        e = self.assertRaises(anthropic.RateLimitError, self.ask, self.client(proxy), [{"role": "user", "content": "x"}], False)
        self.assertIn("Rate limit reached", str(e))
        self.assertEqual(e.body["error"]["type"], "rate_limit_error")

    def test_mid_stream_error(self) -> None:
        raw = sse_encode_openai(openai_stream_chunks(["partial"], "g")[:2], done=False)
        raw += b"data: " + json.dumps(openai_error("boom", type="server_error")).encode() + b"\n\n"
        proxy = TranslatingProxy("anthropic", [Upstream(raw=raw)])
        e = self.assertRaises(anthropic.APIError, self.ask, self.client(proxy), [{"role": "user", "content": "x"}], True)
        self.assertIn("boom", str(e))

    def test_refused_parameter_is_named(self) -> None:
        proxy = TranslatingProxy("anthropic", [])
        client = self.client(proxy)
        e = self.assertRaises(
            anthropic.BadRequestError,
            client.messages.create,
            model="gpt-4o",
            max_tokens=10,
            messages=[{"role": "user", "content": "x"}],
            extra_body={"top_k": 5},
        )
        self.assertIn("top_k", str(e))
        self.assertEqual(proxy.upstream_requests, [])
