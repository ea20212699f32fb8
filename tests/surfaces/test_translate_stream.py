"""
Tests for the streaming translators of L{cllama_tx.surfaces.translate}:
exact event sequences, independence from how the upstream body is chunked
(down to one byte at a time, CR-LF, C{data:} without its space), SDK
validation of every chunk and event, re-parsing with the SDKs' own stream
accumulators, mid-stream errors, and bounded memory.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

from anthropic.lib.streaming._messages import accumulate_event
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.surfaces.translate import AnthropicToChatStream, ChatToAnthropicStream, SseReader
from cllama_tx.testing import (
    anthropic_error,
    anthropic_stream_events,
    openai_error,
    openai_stream_chunks,
    parse_sse,
    sse_encode_anthropic,
    sse_encode_openai,
)
from tests.surfaces.test_translate import (
    _ANTHROPIC_EVENT,
    validate_anthropic_event,
    validate_openai_data,
)

CREATED = 1712345678


def chunkings(body: bytes) -> dict[str, list[bytes]]:
    """The same body cut in many ways."""
    rng = random.Random(len(body))
    cuts: list[bytes] = []
    i = 0
    while i < len(body):
        n = rng.randint(1, 64)
        cuts.append(body[i : i + n])
        i += n
    events = [e + b"\n\n" for e in body.split(b"\n\n") if e]
    return {
        "whole": [body],
        "one byte": [body[i : i + 1] for i in range(len(body))],
        "seven bytes": [body[i : i + 7] for i in range(0, len(body), 7)],
        "per event": events,
        "random": cuts,
        "with empty chunks": [b""] + [body[: len(body) // 2], b"", body[len(body) // 2 :], b""],
    }


def largest_event(body: bytes) -> int:
    return max(len(e) for e in body.split(b"\n\n"))


def crlf_no_space(body: bytes) -> bytes:
    """The same SSE body with CR-LF line ends and C{data:}/C{event:} without the space."""
    return body.replace(b"data: ", b"data:").replace(b"event: ", b"event:").replace(b"\n", b"\r\n")


def cr_only(body: bytes) -> bytes:
    return body.replace(b"\n", b"\r")


def run(factory: Callable[[], Any], pieces: list[bytes]) -> tuple[Any, bytes]:
    translator = factory()
    out = b"".join(translator.feed(piece) for piece in pieces) + translator.finish()
    return translator, out


def chat_chunks(out: bytes) -> tuple[list[dict], bool]:
    """Parsed chunks (every one validated) and whether [DONE] ended the stream."""
    events = parse_sse(out)
    done = bool(events) and events[-1] == (None, "[DONE]")
    docs = []
    for name, data in events[:-1] if done else events:
        assert name is None
        assert data != "[DONE]"
        validate_openai_data(data)
        docs.append(json.loads(data))
    return docs, done


def anthropic_events(out: bytes) -> list[tuple[str, dict]]:
    """Parsed events, every one validated."""
    result = []
    for name, data in parse_sse(out):
        validate_anthropic_event(name, data)
        result.append((name, json.loads(data)))
    return result


def accumulate_chat(docs: list[dict]) -> Any:
    state = ChatCompletionStreamState()
    for doc in docs:
        state.handle_chunk(ChatCompletionChunk.model_validate(doc))
    return state.get_final_completion()


def accumulate_anthropic(events: list[tuple[str, dict]]) -> Any:
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for name, doc in events:
        if name == "error":
            continue
        event = _ANTHROPIC_EVENT.validate_python(doc)
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    return snapshot


# ---------------------------------------------------------------------------
# The SSE reader
# ---------------------------------------------------------------------------


class SseReaderTests(SynchronousTestCase):
    def read(self, pieces: list[bytes], **kw: Any) -> list:
        reader = SseReader(**kw)
        events = []
        for piece in pieces:
            events.extend(reader.feed(piece))
        events.extend(reader.finish())
        return events

    def test_line_endings_and_fields(self) -> None:
        body = (
            b"\xef\xbb\xbf: a comment\n"
            b"event: one\ndata: a\ndata:b\nid: 7\nretry: 10\n\n"
            b"event:two\r\ndata:{\"x\":1}\r\n\r\n"
            b"data\rdata: c\r\r"
            b"event: no-data\n\n"
            b"data: last"
        )
        expected = [("one", "a\nb"), ("two", '{"x":1}'), (None, "\nc"), (None, "last")]
        for name, pieces in chunkings(body).items():
            self.assertEqual(self.read(pieces), expected, name)

    def test_crlf_split_across_chunks(self) -> None:
        self.assertEqual(self.read([b"data: a\r", b"\n\r", b"\n"]), [(None, "a")])
        self.assertEqual(self.read([b"data: a\r", b"\r"]), [(None, "a")])

    def test_utf8_split_inside_a_character(self) -> None:
        body = "data: héllo ✓\n\n".encode()
        for name, pieces in chunkings(body).items():
            self.assertEqual(self.read(pieces), [(None, "héllo ✓")], name)

    def test_oversized_event_is_skipped(self) -> None:
        body = b"data: " + b"x" * 500 + b"\ndata: more\n\ndata: ok\n\n"
        for name, pieces in chunkings(body).items():
            reader = SseReader(max_event_bytes=100)
            events = []
            peak = 0
            for piece in pieces:
                events.extend(reader.feed(piece))
                peak = max(peak, reader.buffered_bytes)
            events.extend(reader.finish())
            self.assertTrue(reader.overflowed, name)
            self.assertEqual(events, [(None, "ok")], name)
            self.assertLessEqual(peak, 100 + 64, name)


# ---------------------------------------------------------------------------
# Anthropic upstream -> OpenAI chunks
# ---------------------------------------------------------------------------


def anthropic_body(*args: Any, **kw: Any) -> bytes:
    return sse_encode_anthropic(anthropic_stream_events(*args, **kw))


class AnthropicToChatStreamTests(SynchronousTestCase):
    def translate(self, body: bytes, include_usage: bool = True, **kw: Any) -> tuple[AnthropicToChatStream, bytes]:
        """Translate C{body} in every chunking; all must give the same bytes."""
        factory = lambda: AnthropicToChatStream(include_usage, CREATED, **kw)  # noqa: E731
        first, reference = run(factory, [body])
        for name, pieces in chunkings(body).items():
            translator, out = run(factory, pieces)
            self.assertEqual(out, reference, name)
            self.assertEqual(translator.error_event, first.error_event, name)
        for variant in (crlf_no_space(body), cr_only(body)):
            self.assertEqual(run(factory, [variant])[1], reference)
            self.assertEqual(run(factory, chunkings(variant)["one byte"])[1], reference)
        return first, reference

    def test_text_exact(self) -> None:
        body = anthropic_body(["Hel", "lo"], "claude-sonnet-4", input_tokens=10, output_tokens=5, id="msg_01X")
        translator, out = self.translate(body)
        docs, done = chat_chunks(out)
        self.assertTrue(done)
        self.assertTrue(translator.complete)
        base = {"id": "chatcmpl-01X", "object": "chat.completion.chunk", "created": CREATED, "model": "claude-sonnet-4"}

        def chunk(delta: dict, finish: str | None = None) -> dict:
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], "usage": None}

        self.assertEqual(
            docs,
            [
                chunk({"role": "assistant", "content": ""}),
                chunk({"content": "Hel"}),
                chunk({"content": "lo"}),
                chunk({}, "stop"),
                {
                    **base,
                    "choices": [],
                    "usage": {
                        "prompt_tokens": 10,
                        "completion_tokens": 5,
                        "total_tokens": 15,
                        "prompt_tokens_details": {"cached_tokens": 0},
                    },
                },
            ],
        )

    def test_without_include_usage(self) -> None:
        body = anthropic_body("Hi", "c", input_tokens=3, output_tokens=1)
        _, out = self.translate(body, include_usage=False)
        docs, done = chat_chunks(out)
        self.assertTrue(done)
        self.assertTrue(all(doc["choices"] for doc in docs))
        self.assertTrue(all("usage" not in doc for doc in docs))
        self.assertEqual(docs[-1]["choices"][0]["finish_reason"], "stop")

    def test_usage_extra(self) -> None:
        body = anthropic_body("Hi", "c", input_tokens=3, output_tokens=1)
        _, out = self.translate(body, usage_extra=lambda: {"cost": 0.25})
        docs, _ = chat_chunks(out)
        self.assertEqual(docs[-1]["usage"]["cost"], 0.25)
        self.assertEqual(docs[-1]["usage"]["prompt_tokens"], 3)

    def test_usage_with_cache(self) -> None:
        body = anthropic_body(
            "Hi", "c", input_tokens=100, output_tokens=42, cache_read_input_tokens=30, cache_creation_input_tokens=20
        )
        _, out = self.translate(body)
        docs, _ = chat_chunks(out)
        self.assertEqual(
            docs[-1]["usage"],
            {
                "prompt_tokens": 150,
                "completion_tokens": 42,
                "total_tokens": 192,
                "prompt_tokens_details": {"cached_tokens": 30, "cache_write_tokens": 20},
            },
        )

    def test_cumulative_usage_in_message_delta_wins(self) -> None:
        events = anthropic_stream_events("Hi", "c", input_tokens=100, output_tokens=4)
        events[-2][1]["usage"] = {"output_tokens": 9, "input_tokens": 120, "cache_read_input_tokens": 5}
        _, out = self.translate(sse_encode_anthropic(events))
        docs, _ = chat_chunks(out)
        self.assertEqual(
            (docs[-1]["usage"]["prompt_tokens"], docs[-1]["usage"]["completion_tokens"]), (125, 9)
        )

    def test_tool_use_reparses_to_the_same_calls(self) -> None:
        pieces = ["Let me ", "check ", "the weather."]
        tools = [
            {"id": "toolu_01", "name": "get_weather", "input": {"city": "Paris", "units": "metric"}},
            {"id": "toolu_02", "name": "get_time", "input": {"tz": "Europe/Paris", "nested": {"a": [1, 2, {"b": None}]}}},
        ]
        body = anthropic_body(pieces, "c", input_tokens=50, output_tokens=30, tool_uses=tools)
        _, out = self.translate(body)
        docs, done = chat_chunks(out)
        self.assertTrue(done)
        starts = [d["choices"][0]["delta"]["tool_calls"][0] for d in docs if d["choices"] and "id" in d["choices"][0]["delta"].get("tool_calls", [{}])[0]]
        self.assertEqual(
            starts,
            [
                {"index": 0, "id": "toolu_01", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
                {"index": 1, "id": "toolu_02", "type": "function", "function": {"name": "get_time", "arguments": ""}},
            ],
        )
        completion = accumulate_chat(docs)
        message = completion.choices[0].message
        self.assertEqual(message.content, "".join(pieces))
        self.assertEqual([c.id for c in message.tool_calls], ["toolu_01", "toolu_02"])
        self.assertEqual([c.function.name for c in message.tool_calls], ["get_weather", "get_time"])
        self.assertEqual([json.loads(c.function.arguments) for c in message.tool_calls], [t["input"] for t in tools])
        self.assertEqual(completion.choices[0].finish_reason, "tool_calls")
        self.assertEqual(completion.usage.prompt_tokens, 50)
        self.assertEqual(completion.usage.completion_tokens, 30)

    def test_stop_reasons(self) -> None:
        for stop, finish in [("max_tokens", "length"), ("stop_sequence", "stop"), ("refusal", "content_filter"), ("tool_use", "tool_calls")]:
            _, out = self.translate(anthropic_body("x", "c", stop_reason=stop))
            docs, _ = chat_chunks(out)
            self.assertEqual(docs[-2]["choices"][0]["finish_reason"], finish, stop)

    def test_thinking_dropped_ping_ignored_tool_indexes_from_zero(self) -> None:
        start = anthropic_stream_events("", "c", tool_uses=None)[0]
        events = [
            start,
            ("ping", {"type": "ping"}),
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "secret plan"}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "sig"}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {"type": "redacted_thinking", "data": "xx"}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 1}),
            ("content_block_start", {"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_9", "name": "f", "input": {}}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": ""}}),
            ("content_block_delta", {"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": '{"k": "v"}'}}),
            ("content_block_stop", {"type": "content_block_stop", "index": 2}),
            ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None}, "usage": {"output_tokens": 7}}),
            ("ping", {"type": "ping"}),
            ("future_event", {"type": "future_event", "x": 1}),
            ("message_stop", {"type": "message_stop"}),
        ]
        _, out = self.translate(sse_encode_anthropic(events))
        self.assertNotIn(b"secret plan", out)
        self.assertNotIn(b"sig", out)
        docs, done = chat_chunks(out)
        self.assertTrue(done)
        completion = accumulate_chat(docs)
        self.assertFalse(completion.choices[0].message.content)  # "" from the role chunk, as OpenAI sends
        (call,) = completion.choices[0].message.tool_calls
        self.assertEqual((call.id, call.function.name, call.function.arguments), ("toolu_9", "f", '{"k": "v"}'))
        indexes = [tc["index"] for d in docs if d["choices"] for tc in d["choices"][0]["delta"].get("tool_calls", [])]
        self.assertEqual(set(indexes), {0})

    def test_created_and_model_override(self) -> None:
        body = anthropic_body("x", "claude-sonnet-4-20250514")
        _, out = self.translate(body, model="anthropic/claude-sonnet-4")
        docs, _ = chat_chunks(out)
        self.assertEqual({d["model"] for d in docs}, {"anthropic/claude-sonnet-4"})
        self.assertEqual({d["created"] for d in docs}, {CREATED})

    def test_mid_stream_error(self) -> None:
        events = anthropic_stream_events(["partial"], "c")[:4]
        events.append(("error", anthropic_error("overloaded_error", "Overloaded")))
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "ignored"}}))
        translator, out = self.translate(sse_encode_anthropic(events))
        docs, done = chat_chunks(out)
        self.assertFalse(done)
        self.assertFalse(translator.complete)
        self.assertNotIn(b"ignored", out)
        self.assertEqual(docs[-1], {"error": {"message": "Overloaded", "type": "api_error", "param": None, "code": "overloaded_error"}})
        self.assertEqual(translator.error_event, docs[-1])
        self.assertEqual(translator.upstream_error_event, anthropic_error("overloaded_error", "Overloaded"))
        self.assertEqual(translator.feed(b"event: message_stop\ndata: {}\n\n"), b"")
        self.assertEqual(translator.finish(), b"")
        for kind, expected in [("invalid_request_error", "invalid_request_error"), ("rate_limit_error", "rate_limit_error")]:
            t = AnthropicToChatStream(True, CREATED)
            out = t.feed(sse_encode_anthropic([("error", anthropic_error(kind, "m"))]))
            self.assertEqual(json.loads(parse_sse(out)[0][1])["error"]["type"], expected)

    def test_truncated_stream_has_no_done(self) -> None:
        body = anthropic_body("Hello", "c")
        cut = body[: body.index(b"event: message_delta")]
        translator, out = run(lambda: AnthropicToChatStream(True, CREATED), [cut])
        docs, done = chat_chunks(out)
        self.assertFalse(done)
        self.assertFalse(translator.complete)
        self.assertEqual(docs[-1]["choices"][0]["delta"], {"content": "Hello"})

    def test_oversized_event_ends_with_an_error(self) -> None:
        body = anthropic_body(["a", "b" * 5000, "c"], "c")
        translator, out = run(lambda: AnthropicToChatStream(True, CREATED, max_event_bytes=1000), chunkings(body)["random"])
        docs, done = chat_chunks(out)
        self.assertFalse(done)
        self.assertIn("too large", translator.error_event["error"]["message"])
        self.assertEqual(docs[-1], translator.error_event)

    def test_bounded_memory(self) -> None:
        body = anthropic_body(["word "] * 3000, "c", output_tokens=3000)
        translator = AnthropicToChatStream(True, CREATED)
        peak = 0
        total = 0
        for piece in chunkings(body)["random"]:
            total += len(translator.feed(piece))
            peak = max(peak, translator.buffered_bytes)
        total += len(translator.finish())
        self.assertGreater(len(body), 200_000)
        self.assertLessEqual(peak, largest_event(body) + 64)
        self.assertGreater(total, len(body))


# ---------------------------------------------------------------------------
# OpenAI upstream -> Anthropic events
# ---------------------------------------------------------------------------


def openai_body(*args: Any, done: bool = True, **kw: Any) -> bytes:
    return sse_encode_openai(openai_stream_chunks(*args, **kw), done=done)


class ChatToAnthropicStreamTests(SynchronousTestCase):
    def translate(self, body: bytes, **kw: Any) -> tuple[ChatToAnthropicStream, bytes]:
        factory = lambda: ChatToAnthropicStream(**kw)  # noqa: E731
        first, reference = run(factory, [body])
        for name, pieces in chunkings(body).items():
            translator, out = run(factory, pieces)
            self.assertEqual(out, reference, name)
            self.assertEqual(translator.error_event, first.error_event, name)
        for variant in (crlf_no_space(body), cr_only(body)):
            self.assertEqual(run(factory, [variant])[1], reference)
            self.assertEqual(run(factory, chunkings(variant)["one byte"])[1], reference)
        return first, reference

    def test_text_exact(self) -> None:
        body = openai_body(["Hel", "lo"], "gpt-4o", prompt_tokens=10, completion_tokens=5, id="chatcmpl-Ab1")
        translator, out = self.translate(body)
        self.assertTrue(translator.complete)
        self.assertEqual(
            anthropic_events(out),
            [
                (
                    "message_start",
                    {
                        "type": "message_start",
                        "message": {
                            "id": "msg_Ab1",
                            "type": "message",
                            "role": "assistant",
                            "model": "gpt-4o",
                            "content": [],
                            "stop_reason": None,
                            "stop_sequence": None,
                            "usage": {"input_tokens": 0, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
                        },
                    },
                ),
                ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
                ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}),
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                (
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                        "usage": {"input_tokens": 10, "output_tokens": 5, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0},
                    },
                ),
                ("message_stop", {"type": "message_stop"}),
            ],
        )

    def test_message_delta_held_until_usage_chunk(self) -> None:
        chunks = openai_stream_chunks("Hi", "g", prompt_tokens=9, completion_tokens=2, cached_tokens=4)
        translator = ChatToAnthropicStream()
        before = b"".join(translator.feed(e) for e in [b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks[:-1]])
        names = [n for n, _ in parse_sse(before)]
        self.assertEqual(names[-1], "content_block_stop")
        self.assertNotIn("message_delta", names)
        after = translator.feed(b"data: " + json.dumps(chunks[-1]).encode() + b"\n\n")
        events = anthropic_events(after)
        self.assertEqual([n for n, _ in events], ["message_delta", "message_stop"])
        self.assertEqual(
            events[0][1]["usage"],
            {"input_tokens": 5, "output_tokens": 2, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4},
        )
        self.assertEqual(translator.feed(b"data: [DONE]\n\n"), b"")
        self.assertEqual(translator.finish(), b"")

    def test_wait_for_done(self) -> None:
        chunks = openai_stream_chunks("Hi", "g", prompt_tokens=9, completion_tokens=2)
        translator = ChatToAnthropicStream(wait_for_done=True)
        out = translator.feed(sse_encode_openai(chunks, done=False))
        self.assertNotIn(b"message_delta", out)
        self.assertFalse(translator.complete)
        out = translator.feed(b"data: [DONE]\n\n")
        events = anthropic_events(out)
        self.assertEqual([n for n, _ in events], ["message_delta", "message_stop"])
        self.assertEqual(events[0][1]["usage"]["input_tokens"], 9)
        self.assertTrue(translator.complete)
        self.assertEqual(translator.finish(), b"")
        # without [DONE], the end of the body closes the message
        translator = ChatToAnthropicStream(wait_for_done=True)
        translator.feed(sse_encode_openai(chunks, done=False))
        self.assertEqual([n for n, _ in anthropic_events(translator.finish())], ["message_delta", "message_stop"])

    def test_usage_reaches_the_sdk_accumulator(self) -> None:
        body = openai_body("Hi", "g", prompt_tokens=100, completion_tokens=12, cached_tokens=60)
        _, out = self.translate(body)
        message = accumulate_anthropic(anthropic_events(out))
        self.assertEqual(
            (message.usage.input_tokens, message.usage.output_tokens, message.usage.cache_read_input_tokens),
            (40, 12, 60),
        )

    def test_without_usage_chunk_done_closes(self) -> None:
        body = openai_body("Hi", "g", include_usage=False)
        translator, out = self.translate(body)
        events = anthropic_events(out)
        self.assertEqual([n for n, _ in events][-2:], ["message_delta", "message_stop"])
        self.assertEqual(events[-2][1]["usage"], {"output_tokens": 0})
        self.assertTrue(translator.complete)

    def test_without_done_finish_closes(self) -> None:
        body = openai_body("Hi", "g", prompt_tokens=3, completion_tokens=1, include_usage=False, done=False)
        translator = ChatToAnthropicStream()
        out = translator.feed(body)
        self.assertNotIn(b"message_stop", out)
        out += translator.finish()
        self.assertEqual([n for n, _ in anthropic_events(out)][-2:], ["message_delta", "message_stop"])

    def test_usage_on_the_finish_chunk(self) -> None:
        chunks = openai_stream_chunks("Hi", "g", include_usage=False)
        chunks[-1]["usage"] = {"prompt_tokens": 7, "completion_tokens": 1, "total_tokens": 8}
        _, out = self.translate(sse_encode_openai(chunks))
        events = anthropic_events(out)
        self.assertEqual(events[-2][1]["usage"]["input_tokens"], 7)

    def test_tool_calls_reparse_to_the_same_inputs(self) -> None:
        tools = [
            {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris", "units": "metric"}},
            {"id": "call_2", "name": "get_time", "arguments": {"tz": "Europe/Paris", "nested": {"a": [1, {"b": None}]}}},
        ]
        pieces = ["Checking ", "both."]
        body = openai_body(pieces, "g", prompt_tokens=20, completion_tokens=10, finish_reason="tool_calls", tool_calls=tools)
        _, out = self.translate(body)
        events = anthropic_events(out)
        starts = [doc["content_block"] for name, doc in events if name == "content_block_start"]
        self.assertEqual(
            starts,
            [
                {"type": "text", "text": ""},
                {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}},
                {"type": "tool_use", "id": "call_2", "name": "get_time", "input": {}},
            ],
        )
        # every block is closed before the next opens, in order
        order = [(name, doc.get("index")) for name, doc in events if name.startswith("content_block_") and name != "content_block_delta"]
        self.assertEqual(
            order,
            [("content_block_start", 0), ("content_block_stop", 0), ("content_block_start", 1), ("content_block_stop", 1), ("content_block_start", 2), ("content_block_stop", 2)],
        )
        message = accumulate_anthropic(events)
        self.assertEqual(message.content[0].text, "".join(pieces))
        self.assertEqual([(b.id, b.name, b.input) for b in message.content[1:]], [(t["id"], t["name"], t["arguments"]) for t in tools])
        self.assertEqual(message.stop_reason, "tool_use")

    def test_whole_tool_calls_in_one_chunk(self) -> None:
        """Some OpenAI-compatible servers send complete, parallel tool calls in one delta."""
        chunk = openai_stream_chunks([], "g", include_usage=False)[0]
        calls = {
            "tool_calls": [
                {"index": 0, "id": "c0", "type": "function", "function": {"name": "a", "arguments": '{"x":1}'}},
                {"index": 1, "id": "c1", "type": "function", "function": {"name": "b", "arguments": '{"y":2}'}},
            ]
        }
        doc = dict(chunk, choices=[{"index": 0, "delta": calls, "logprobs": None, "finish_reason": "tool_calls"}])
        _, out = self.translate(sse_encode_openai([chunk, doc]))
        message = accumulate_anthropic(anthropic_events(out))
        self.assertEqual([(b.id, b.name, b.input) for b in message.content], [("c0", "a", {"x": 1}), ("c1", "b", {"y": 2})])

    def test_interleaved_tool_fragments_reach_their_block(self) -> None:
        first = openai_stream_chunks([], "g", include_usage=False)[0]

        def delta(calls: list, finish: str | None = None) -> dict:
            return dict(first, choices=[{"index": 0, "delta": {"tool_calls": calls}, "logprobs": None, "finish_reason": finish}])

        chunks = [
            first,
            delta([{"index": 0, "id": "c0", "type": "function", "function": {"name": "a", "arguments": '{"x":'}}]),
            delta([{"index": 1, "id": "c1", "type": "function", "function": {"name": "b", "arguments": '{"y":'}}]),
            delta([{"index": 0, "function": {"arguments": "1}"}}]),
            delta([{"index": 1, "function": {"arguments": "2}"}}]),
            dict(first, choices=[{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]),
        ]
        _, out = self.translate(sse_encode_openai(chunks))
        message = accumulate_anthropic(anthropic_events(out))
        self.assertEqual([(b.id, b.name, b.input) for b in message.content], [("c0", "a", {"x": 1}), ("c1", "b", {"y": 2})])

    def test_finish_reasons(self) -> None:
        for finish, stop in [("length", "max_tokens"), ("content_filter", "refusal"), ("tool_calls", "tool_use"), ("stop", "end_turn")]:
            _, out = self.translate(openai_body("x", "g", finish_reason=finish))
            events = anthropic_events(out)
            self.assertEqual(events[-2][1]["delta"]["stop_reason"], stop, finish)

    def test_refusal_delta(self) -> None:
        chunks = openai_stream_chunks([], "g", include_usage=False)
        chunks.insert(1, dict(chunks[0], choices=[{"index": 0, "delta": {"refusal": "I can't."}, "logprobs": None, "finish_reason": None}]))
        _, out = self.translate(sse_encode_openai(chunks))
        message = accumulate_anthropic(anthropic_events(out))
        self.assertEqual(message.content[0].text, "I can't.")
        self.assertEqual(message.stop_reason, "refusal")

    def test_other_choices_and_reasoning_dropped(self) -> None:
        chunks = openai_stream_chunks(["A"], "g", include_usage=False)
        extra = dict(chunks[1], choices=[{"index": 1, "delta": {"content": "other"}, "logprobs": None, "finish_reason": None}])
        reasoning = dict(chunks[1], choices=[{"index": 0, "delta": {"reasoning_content": "hmm"}, "logprobs": None, "finish_reason": None}])
        chunks[2:2] = [extra, reasoning]
        _, out = self.translate(sse_encode_openai(chunks))
        self.assertNotIn(b"other", out)
        self.assertNotIn(b"hmm", out)
        self.assertEqual(accumulate_anthropic(anthropic_events(out)).content[0].text, "A")

    def test_model_override(self) -> None:
        _, out = self.translate(openai_body("x", "gpt-4o-2024"), model="openai/gpt-4o")
        self.assertEqual(anthropic_events(out)[0][1]["message"]["model"], "openai/gpt-4o")

    def test_mid_stream_error(self) -> None:
        chunks = openai_stream_chunks(["partial"], "g")[:2]
        body = sse_encode_openai(chunks, done=False) + b"data: " + json.dumps(openai_error("The server had an error", type="server_error")).encode() + b"\n\n"
        body += sse_encode_openai(openai_stream_chunks(["ignored"], "g"))
        translator, out = self.translate(body)
        events = anthropic_events(out)
        self.assertNotIn(b"ignored", out)
        self.assertEqual(events[-1], ("error", {"type": "error", "error": {"type": "api_error", "message": "The server had an error"}}))
        self.assertEqual(translator.error_event, events[-1][1])
        self.assertFalse(translator.complete)
        self.assertEqual(translator.upstream_error_event["error"]["type"], "server_error")
        self.assertNotIn("message_stop", [n for n, _ in events])
        for kind, code, expected in [
            ("invalid_request_error", None, "invalid_request_error"),
            ("requests", "rate_limit_exceeded", "rate_limit_error"),
            ("insufficient_quota", "insufficient_quota", "rate_limit_error"),
        ]:
            t = ChatToAnthropicStream()
            out = t.feed(b"data: " + json.dumps(openai_error("m", type=kind, code=code)).encode() + b"\n\n")
            self.assertEqual(anthropic_events(out)[-1][1]["error"]["type"], expected, kind)

    def test_oversized_event_ends_with_an_error(self) -> None:
        body = openai_body(["a", "b" * 5000, "c"], "g")
        translator, out = run(lambda: ChatToAnthropicStream(max_event_bytes=1000), chunkings(body)["random"])
        events = anthropic_events(out)
        self.assertEqual(events[-1][0], "error")
        self.assertIn("too large", translator.error_event["error"]["message"])

    def test_bounded_memory(self) -> None:
        body = openai_body(["word "] * 3000, "g")
        translator = ChatToAnthropicStream()
        peak = 0
        for piece in chunkings(body)["random"]:
            translator.feed(piece)
            peak = max(peak, translator.buffered_bytes)
        translator.finish()
        self.assertGreater(len(body), 200_000)
        self.assertLessEqual(peak, largest_event(body) + 64)
        self.assertTrue(translator.complete)


class StreamRoundTripTests(SynchronousTestCase):
    """Anthropic -> chat -> Anthropic (and the reverse) keeps text, tool calls and usage."""

    def test_anthropic_round_trip(self) -> None:
        tools = [{"id": "toolu_1", "name": "f", "input": {"q": "ü ✓", "n": [1, 2.5, True]}}]
        source = anthropic_stream_events(["Ü", "ber ", "alles"], "c", input_tokens=10, output_tokens=7, cache_read_input_tokens=4, tool_uses=tools)
        _, chat_out = run(lambda: AnthropicToChatStream(True, CREATED), chunkings(sse_encode_anthropic(source))["one byte"])
        _, back = run(ChatToAnthropicStream, chunkings(chat_out)["seven bytes"])
        original = accumulate_anthropic([(n, d) for n, d in source if n != "ping"])
        final = accumulate_anthropic(anthropic_events(back))
        self.assertEqual(final.content[0].text, original.content[0].text)
        self.assertEqual([(b.id, b.name, b.input) for b in final.content[1:]], [(b.id, b.name, b.input) for b in original.content[1:]])
        self.assertEqual(final.stop_reason, "tool_use")
        self.assertEqual(final.id, "msg_cllamatxfake")
        self.assertEqual(
            (final.usage.input_tokens, final.usage.output_tokens, final.usage.cache_read_input_tokens),
            (10, 7, 4),
        )

    def test_chat_round_trip(self) -> None:
        tools = [{"id": "call_1", "name": "f", "arguments": {"q": "ü ✓"}}]
        source = openai_stream_chunks(["Ü", "ber"], "g", prompt_tokens=10, completion_tokens=7, cached_tokens=4, tool_calls=tools, finish_reason="tool_calls")
        _, anth = run(ChatToAnthropicStream, chunkings(sse_encode_openai(source))["one byte"])
        _, back = run(lambda: AnthropicToChatStream(True, CREATED), chunkings(anth)["seven bytes"])
        docs, done = chat_chunks(back)
        self.assertTrue(done)
        original = accumulate_chat(source)
        final = accumulate_chat(docs)
        self.assertEqual(final.choices[0].message.content, original.choices[0].message.content)
        self.assertEqual(
            [(c.id, c.function.name, json.loads(c.function.arguments)) for c in final.choices[0].message.tool_calls],
            [(c.id, c.function.name, json.loads(c.function.arguments)) for c in original.choices[0].message.tool_calls],
        )
        self.assertEqual(final.choices[0].finish_reason, "tool_calls")
        self.assertEqual(final.id, "chatcmpl-cllamatxfake")
        self.assertEqual(
            (final.usage.prompt_tokens, final.usage.completion_tokens, final.usage.prompt_tokens_details.cached_tokens),
            (10, 7, 4),
        )
