"""
Everything the Responses surface writes has the shape the openai SDK's
types require: the fake provider's builders (the documented event
sequence), the proxy's own answers translated from chat and Anthropic
(JSON and streams, whatever the chunking), its failure events, and the
upstream adapter's chat answers.  Streams are also re-read with the SDK's
own accumulator.
"""

from __future__ import annotations

import json

import httpx
import openai
import pydantic
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.demo.model import DemoModel
from cllama_tx.demo.server import ReceivedRequest
from cllama_tx.surfaces import bridges
from cllama_tx.surfaces.responses_shapes import echoed, failure_events, minimal_response
from cllama_tx.surfaces.translate_responses_answer import (
    AnswerContext,
    ChatToResponsesStream,
    chat_completion_to_response,
)
from cllama_tx.surfaces.translate_responses_request import ToolNames
from cllama_tx.surfaces.translate_responses_upstream import (
    ResponsesToChatStream,
    response_to_chat_completion,
)
from cllama_tx.testing import (
    anthropic_sse_events,
    anthropic_stream_events,
    openai_completion,
    openai_sse_events,
    openai_stream_chunks,
    parse_sse,
    responses_response,
    responses_sse_events,
    responses_stream_events,
)

EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
CALL = {"id": "call_7", "name": "get_weather", "arguments": {"city": "Paris"}}
REQUEST = {"model": "x", "input": "hi", "instructions": "Be brief.", "tools": [
    {"type": "function", "name": "get_weather", "parameters": {"type": "object", "properties": {}}, "strict": False}
], "metadata": {"k": "v"}, "store": True}


def events_of(body: bytes) -> list[dict]:
    """Every event of a Responses SSE body, checked: the name is the type, the numbers count from 0."""
    docs = []
    for name, data in parse_sse(body):
        doc = json.loads(data)
        assert doc["type"] == name, (name, doc)
        docs.append(doc)
    assert [d["sequence_number"] for d in docs] == list(range(len(docs))), [d["sequence_number"] for d in docs]
    return docs


def validated(docs: list[dict]) -> list:
    return [EVENT.validate_python(d) for d in docs]


def sdk_final(body: bytes) -> Response:
    """The SDK's own stream reader and accumulator over C{body}."""
    client = openai.OpenAI(
        api_key="k", base_url="http://sdk.invalid/v1", max_retries=0,
        http_client=httpx.Client(transport=httpx.MockTransport(
            lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body)
        )),
    )
    with client.responses.stream(model="x", input="hi") as stream:
        for _ in stream:
            pass
        return stream.get_final_response()


def context(**changes) -> AnswerContext:
    fields = {"response_id": "resp_abc", "created_at": 1700000000, "model": "grok-4", "echo": echoed(REQUEST)}
    fields.update(changes)
    return AnswerContext(**fields)


class FakeProviderShapes(SynchronousTestCase):
    """The fake Responses provider speaks the documented sequence, as the SDK types it."""

    def test_response_object(self):
        doc = responses_response("Hi.", "gpt-4.1", 10, 3, cached_tokens=4, reasoning_tokens=1, tool_calls=[CALL])
        response = Response.model_validate(doc)
        self.assertEqual(response.output_text, "Hi.")
        self.assertEqual([item.type for item in response.output], ["message", "function_call"])
        self.assertEqual(json.loads(response.output[1].arguments), {"city": "Paris"})
        self.assertEqual(response.usage.input_tokens_details.cached_tokens, 4)

    def test_stream_sequence(self):
        events = responses_stream_events(["Hel", "lo"], "gpt-4.1", 10, 3, tool_calls=[CALL])
        body = b"".join(responses_sse_events(events))
        docs = events_of(body)
        validated(docs)
        self.assertEqual(
            [d["type"] for d in docs],
            ["response.created", "response.in_progress",
             "response.output_item.added", "response.content_part.added",
             "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
             "response.content_part.done", "response.output_item.done",
             "response.output_item.added", "response.function_call_arguments.delta",
             "response.function_call_arguments.delta", "response.function_call_arguments.done",
             "response.output_item.done", "response.completed"],
        )
        final = sdk_final(body)
        self.assertEqual(final.output_text, "Hello")
        self.assertEqual(final.usage.output_tokens, 3)

    def test_demo_model_answers_responses(self):
        model = DemoModel()
        body = {"model": "echo-1", "input": [{"role": "user", "content": [{"type": "input_text", "text": "ping"}]}]}
        reply = model.respond(ReceivedRequest("POST", "/v1/responses", {}, b"", body))
        response = Response.model_validate(reply.json)
        self.assertIn("You said: ping", response.output_text)
        streamed = model.respond(ReceivedRequest("POST", "/v1/responses", {}, b"", dict(body, stream=True)))
        self.assertEqual(sdk_final(b"".join(streamed.sse)).output_text, response.output_text)


class ChatAnswersAsResponses(SynchronousTestCase):
    def test_json_with_text_and_tool_call(self):
        doc = openai_completion("Let me look.", "grok-4", 20, 7, cached_tokens=5, finish_reason="tool_calls", tool_calls=[CALL])
        answer = chat_completion_to_response(doc, context())
        response = Response.model_validate(answer)
        self.assertEqual(response.id, "resp_abc")
        self.assertEqual(response.status, "completed")
        self.assertEqual(response.output_text, "Let me look.")
        self.assertEqual(response.output[1].call_id, "call_7")
        self.assertEqual((response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens), (20, 7, 27))
        self.assertEqual(response.usage.input_tokens_details.cached_tokens, 5)
        # The request's settings, echoed as OpenAI does.
        self.assertEqual((response.instructions, response.metadata, response.store), ("Be brief.", {"k": "v"}, True))

    def test_length_is_incomplete(self):
        doc = openai_completion("Cut", "grok-4", 5, 5, finish_reason="length")
        answer = Response.model_validate(chat_completion_to_response(doc, context()))
        self.assertEqual((answer.status, answer.incomplete_details.reason), ("incomplete", "max_output_tokens"))

    def test_namespaced_call_comes_back_with_its_namespace(self):
        names = ToolNames({"tools_v1__close": ("tools_v1", "close")})
        doc = openai_completion(None, "grok-4", 5, 5, finish_reason="tool_calls",
                                tool_calls=[{"id": "c1", "name": "tools_v1__close", "arguments": {}}])
        answer = Response.model_validate(chat_completion_to_response(doc, context(tools=names)))
        self.assertEqual((answer.output[0].namespace, answer.output[0].name), ("tools_v1", "close"))

    def stream_body(self, chunks_bytes: list[bytes], split: int | None = None) -> bytes:
        converter = ChatToResponsesStream(context())
        data = b"".join(chunks_bytes)
        out = []
        pieces = [data[i:i + split] for i in range(0, len(data), split)] if split else chunks_bytes
        for piece in pieces:
            out.append(converter.feed(piece))
        out.append(converter.finish())
        self.assertTrue(converter.complete)
        return b"".join(out)

    def test_stream_text_and_tool_call(self):
        chunks = openai_sse_events(openai_stream_chunks(["Let ", "me"], "grok-4", 30, 9, cached_tokens=3, finish_reason="tool_calls", tool_calls=[CALL]))
        body = self.stream_body(chunks)
        docs = events_of(body)
        validated(docs)
        self.assertEqual(
            [d["type"] for d in docs],
            ["response.created", "response.in_progress",
             "response.output_item.added", "response.content_part.added",
             "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
             "response.content_part.done", "response.output_item.done",
             "response.output_item.added", "response.function_call_arguments.delta",
             "response.function_call_arguments.delta", "response.function_call_arguments.done",
             "response.output_item.done", "response.completed"],
        )
        final = sdk_final(body)
        self.assertEqual(final.output_text, "Let me")
        self.assertEqual(json.loads(final.output[1].arguments), {"city": "Paris"})
        self.assertEqual((final.usage.input_tokens, final.usage.input_tokens_details.cached_tokens), (30, 3))
        # Byte for byte the same however the upstream was cut into chunks.
        for split in (1, 7, 100):
            self.assertEqual(self.stream_body(chunks, split), body)

    def test_completed_waits_for_done(self):
        chunks = openai_sse_events(openai_stream_chunks(["Hi"], "grok-4", 3, 1))
        converter = ChatToResponsesStream(context())
        before = b"".join(converter.feed(c) for c in chunks[:-1])  # all but [DONE]
        self.assertNotIn(b"response.completed", before)
        self.assertIn(b"response.completed", converter.feed(chunks[-1]))

    def test_refusal(self):
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                 "choices": [{"index": 0, "delta": {"refusal": "No."}, "finish_reason": None}]}
        end = dict(chunk, choices=[{"index": 0, "delta": {}, "finish_reason": "stop"}])
        body = self.stream_body(openai_sse_events([chunk, end]))
        validated(events_of(body))
        final = sdk_final(body)
        self.assertEqual(final.output[0].content[0].refusal, "No.")

    def test_upstream_error_and_cut_end_in_failed(self):
        chunks = openai_sse_events(openai_stream_chunks(["Hi"], "grok-4", 3, 1), done=False)
        error = b'data: {"error": {"message": "overloaded", "type": "server_error", "code": "server_error"}}\n\n'
        converter = ChatToResponsesStream(context())
        body = converter.feed(chunks[0] + chunks[1] + error) + converter.finish()
        docs = events_of(body)
        validated(docs)
        self.assertEqual([d["type"] for d in docs[-2:]], ["error", "response.failed"])
        self.assertEqual(docs[-1]["response"]["error"]["message"], "overloaded")
        self.assertEqual(docs[-1]["response"]["output"][0]["content"][0]["text"], "Hi")
        converter = ChatToResponsesStream(context())
        body = converter.feed(chunks[0] + chunks[1]) + converter.finish()
        self.assertEqual(events_of(body)[-1]["type"], "response.failed")

    def test_proxy_failure_events(self):
        body = minimal_response("resp_x", 1700000000, "gpt-4.1")
        docs = events_of(b"".join(responses_sse_events(responses_stream_events(["a"], "m")))[:0] + failure_events(0, body, code="upstream_timeout", message="slow"))
        validated(docs)
        self.assertEqual(docs[1]["response"]["error"], {"code": "server_error", "message": "slow"})

    def test_anthropic_stream_through_the_bridge(self):
        crossing = bridges.bridge_for("responses", "anthropic").open(
            dict(REQUEST, model="claude"), bridges.Call(1700000000, "claude", "resp_abc")
        )
        events = anthropic_stream_events(["Bon", "jour"], "claude", 11, 4, cache_read_input_tokens=2,
                                          tool_uses=[{"id": "toolu_1", "name": "get_weather", "input": {"city": "Lyon"}}])
        converter = crossing.stream(False, None)
        body = b"".join(converter.feed(e) for e in anthropic_sse_events(events)) + converter.finish()
        validated(events_of(body))
        final = sdk_final(body)
        self.assertEqual(final.output_text, "Bonjour")
        self.assertEqual(final.output[1].call_id, "toolu_1")
        self.assertEqual((final.usage.input_tokens, final.usage.input_tokens_details.cached_tokens), (13, 2))
        self.assertEqual(crossing.answered()["id"], "resp_abc")


class ResponsesAnswersAsChat(SynchronousTestCase):
    """The upstream adapter's way back."""

    def test_json(self):
        doc = responses_response("Yes.", "o3-pro", 12, 30, reasoning_tokens=20, tool_calls=[CALL])
        completion = ChatCompletion.model_validate(response_to_chat_completion(doc, created=5))
        self.assertEqual(completion.choices[0].message.content, "Yes.")
        self.assertEqual(completion.choices[0].message.tool_calls[0].id, "call_7")
        self.assertEqual(completion.choices[0].finish_reason, "tool_calls")
        self.assertEqual(completion.usage.completion_tokens_details.reasoning_tokens, 20)

    def test_stream(self):
        events = responses_sse_events(responses_stream_events(["A", "B"], "o3-pro", 12, 3, tool_calls=[CALL]))
        converter = ResponsesToChatStream(include_usage=True, created=5, usage_extra=lambda: {"cost": 0.5})
        body = b"".join(converter.feed(e) for e in events) + converter.finish()
        parsed = [data for _, data in parse_sse(body)]
        self.assertEqual(parsed[-1], "[DONE]")
        chunks = [ChatCompletionChunk.model_validate(json.loads(d)) for d in parsed[:-1]]
        self.assertEqual("".join(c.choices[0].delta.content or "" for c in chunks if c.choices), "AB")
        self.assertEqual(chunks[-2].choices[0].finish_reason, "tool_calls")
        self.assertEqual((chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens), (12, 3))
        self.assertEqual(chunks[-1].usage.model_extra["cost"], 0.5)

    def test_failed_upstream_is_a_chat_error(self):
        events = responses_stream_events(["A"], "o3-pro", 1, 1)
        failed = ("response.failed", {"type": "response.failed", "sequence_number": 99, "response": dict(
            events[-1][1]["response"], status="failed", error={"code": "server_error", "message": "boom"})})
        converter = ResponsesToChatStream(include_usage=False, created=5)
        body = b"".join(converter.feed(e) for e in responses_sse_events(events[:4] + [failed]))
        self.assertEqual(json.loads(parse_sse(body)[-1][1])["error"]["message"], "boom")
        self.assertIsNotNone(converter.error_event)
