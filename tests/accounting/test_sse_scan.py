"""
The usage tap's fast paths give what its parser gives.

The scanners of L{cllama_tx.accounting.sse_scan} count an event's text
without parsing it, or decline; the tap's whole-events path reads a chunk
of complete events without its byte scanner.  Each is held here to the
slow way on the same input: the scanners to a C{json.loads} count, the
tap fed whole to the tap fed in small pieces with the scanners switched
off (every event parsed, as before they existed).
"""

from __future__ import annotations

import json
import random

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting.sse_scan import (
    ChunkScanner,
    anthropic_delta_chars,
    openai_chunk_chars,
    string_chars,
)
from cllama_tx.accounting.usage import SseTap, _openai_message_chars
from cllama_tx.testing import (
    anthropic_sse_events,
    anthropic_stream_events,
    openai_sse_events,
    openai_stream_chunks,
    responses_sse_events,
    responses_stream_events,
)

TEXTS = ["Hello", " wörld", 'say "hi"', "back\\slash", "tab\there", "line\nbreak", "emoji 🦙", "é" * 3, "", "\u2028"]


def parsed_chars(payload: bytes) -> int:
    """What the tap's parser counts in an OpenAI chunk."""
    doc = json.loads(payload)
    n = 0
    for choice in doc.get("choices") or []:
        if isinstance(choice, dict) and isinstance(choice.get("delta"), dict):
            n += _openai_message_chars(choice["delta"])
    return n


def chunk(delta, **extra) -> dict:
    doc = {"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 1, "model": "m",
           "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    doc.update(extra)
    return doc


def encodings(doc) -> list[bytes]:
    """A document as providers write it: compact, spaced, ASCII-escaped."""
    return [
        json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode(),
        json.dumps(doc).encode(),
        json.dumps(doc, separators=(",", ":")).encode(),
    ]


class StringCharsTests(SynchronousTestCase):
    def test_as_json_decodes(self):
        for text in TEXTS:
            for raw in (json.dumps(text)[1:-1].encode(), json.dumps(text, ensure_ascii=False)[1:-1].encode()):
                self.assertEqual(string_chars(raw), len(text), raw)

    def test_invalid(self):
        self.assertIsNone(string_chars(b"\xff\xfe"))
        self.assertIsNone(string_chars(b"bad \\q escape"))


class OpenAIScanTests(SynchronousTestCase):
    def test_text_deltas_are_counted_as_parsed(self):
        deltas = [{"content": t} for t in TEXTS] + [
            {"role": "assistant", "content": ""},
            {"reasoning_content": "think"},
            {"reasoning": "think more", "content": None},
            {"refusal": "no"},
            {"tool_calls": [{"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": "b"}'}}]},
            {"function_call": {"arguments": "{}"}},
            {"content": "x", "tool_calls": [{"index": 0, "function": {"arguments": "12"}}, {"index": 1, "function": {"arguments": "3"}}]},
            {},
        ]
        for delta in deltas:
            for doc in (chunk(delta), chunk(delta, usage=None), chunk(delta, system_fingerprint="fp"),
                        {"choices": [{"index": 0, "delta": delta, "logprobs": {"content": [{"token": "a"}]}}]}):
                for payload in encodings(doc):
                    self.assertEqual(openai_chunk_chars(payload, want_id=False), parsed_chars(payload), payload)

    def test_what_is_left_to_the_parser(self):
        """Anything that may carry more than text, or is not plainly a chunk, declines."""
        declined = [
            chunk({}, usage={"prompt_tokens": 1, "completion_tokens": 2}),
            {"choices": [], "usage": {"prompt_tokens": 1}},
            {"error": {"message": "boom"}},
            chunk({"content": "a"}, error=None),
            {"choices": [{"index": 0, "message": {"content": "whole"}}]},
            chunk({"reasoning_content": "a", "reasoning": "b"}),
            {"choices": None},
            {"foo": "bar"},
            [1, 2],
        ]
        for doc in declined:
            for payload in encodings(doc):
                self.assertIsNone(openai_chunk_chars(payload, want_id=False), payload)
        for payload in (b'{"choices":[{"delta":{"content":"a"}}]', b'"choices"', b"not json", b"{broken",
                        b'{"choices":[{"delta":{"content":"\xff"}}]}', b'{"choices":[{"delta":{"content":"a\tb"}}]}'):
            self.assertIsNone(openai_chunk_chars(payload, want_id=False), payload)

    def test_a_template_reads_the_stream_as_the_parser_does(self):
        """Chunks that differ from the last text delta only in their text (and padding) match its template."""
        def padded(text, pad):
            return json.dumps(chunk({"content": text}, obfuscation=pad), separators=(",", ":"),
                              ensure_ascii=False).encode()

        scanner = ChunkScanner("openai")
        stream = [padded(t, "x" * (i % 5)) for i, t in enumerate(TEXTS * 2)]
        stream += [json.dumps(chunk({"content": "plain"})).encode(),
                   json.dumps(chunk({"content": "two"}, model="other")).encode()]
        for payload in stream:
            self.assertEqual(scanner.chars(payload), parsed_chars(payload), payload)
        # A whole event framed as the template is: its text, without the SSE reader.
        event = b"data: " + padded("xyz", "") + b"\n\n"
        self.assertIsNone(scanner.event_chars(event))  # padded: no event template
        plain = ChunkScanner("openai")
        for text in ("first", "sécond", ""):
            payload = json.dumps(chunk({"content": text}), separators=(",", ":"), ensure_ascii=False).encode()
            self.assertEqual(plain.chars(payload), len(text))
        for text in ("abc", "ünï", ""):
            payload = json.dumps(chunk({"content": text}), separators=(",", ":"), ensure_ascii=False).encode()
            self.assertEqual(plain.event_chars(b"data: " + payload + b"\n\n"), len(text))
        for bad in (b"data: " + payload + b"\n", b"data:" + payload + b"\n\n",
                    b"data: " + payload.replace(b'"content":""', b'"content":"a\nb"') + b"\n\n",
                    b"data: " + payload + b"\n\ndata: " + payload + b"\n\n"):
            self.assertIsNone(plain.event_chars(bad), bad)
        # Not JSON once the text holds a raw control character or a stray quote: the parser decides.
        self.assertEqual(scanner.chars(padded("abc", "")), 3)
        for bad in (padded("abc", "").replace(b"abc", b"a\tc"), padded("abc", "").replace(b"abc", b"a\x01c"),
                    padded("abc", "").replace(b"abc", b'a"c'), padded("abc", "").replace(b"abc", b"a\xffc")):
            self.assertIsNone(scanner.chars(bad), bad)

    def test_an_id_still_wanted_is_parsed(self):
        payload = json.dumps(chunk({"content": "a"})).encode()
        self.assertIsNone(openai_chunk_chars(payload, want_id=True))
        self.assertEqual(openai_chunk_chars(payload, want_id=False), 1)

    def test_quoted_keys_in_text_are_text(self):
        """A key name inside a string is escaped: never taken for a key."""
        tricky = 'a "usage": {"x": 1}, "error": "e", "content": "zz", "message": 1'
        payload = json.dumps(chunk({"content": tricky})).encode()
        self.assertEqual(openai_chunk_chars(payload, want_id=False), len(tricky))


class AnthropicScanTests(SynchronousTestCase):
    def test_deltas(self):
        for kind, key in (("text_delta", "text"), ("thinking_delta", "thinking"), ("input_json_delta", "partial_json")):
            for text in TEXTS:
                doc = {"type": "content_block_delta", "index": 0, "delta": {"type": kind, key: text}}
                for payload in encodings(doc):
                    self.assertEqual(anthropic_delta_chars(payload), len(text), payload)

    def test_declined(self):
        for doc in (
            {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "zz"}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "citations_delta", "citation": {}}},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 3}},
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "a"}, "extra": {"text": "b"}},
        ):
            self.assertIsNone(anthropic_delta_chars(json.dumps(doc).encode()), doc)
        self.assertIsNone(anthropic_delta_chars(b'{"type":"content_block_delta","delta":{"type":"text_delta","text":"a"}'))


def observed(tap: SseTap, out: bytes, held: bytes) -> tuple:
    return (out, held, tap.usage, tap.usage_final, tap.output_chars, tap.unmetered_bytes, tap.events,
            tap.saw_terminal, tap.error_event, tap.answer_id, tap.response_id, tap.sequence_number)


def run_whole(tap: SseTap, chunks) -> tuple:
    out = b"".join(tap.feed(c) for c in chunks) + tap.finish()
    return observed(tap, out, tap.held())


def run_parsed(make, body: bytes, step: int, test: SynchronousTestCase) -> tuple:
    """The tap as it was: fed in pieces of C{step} bytes, every event parsed."""
    chars, event_chars = ChunkScanner.chars, ChunkScanner.event_chars
    ChunkScanner.chars = lambda self, payload, want_id=False: None  # type: ignore[method-assign]
    ChunkScanner.event_chars = lambda self, event: None  # type: ignore[method-assign]
    try:
        tap = make()
        out = b"".join(tap.feed(body[i : i + step]) for i in range(0, len(body), step)) + tap.finish()
        return observed(tap, out, tap.held())
    finally:
        ChunkScanner.chars, ChunkScanner.event_chars = chars, event_chars  # type: ignore[method-assign]


class TapFastPathTests(SynchronousTestCase):
    """Fed whole, with the scanners, the tap sees what it saw fed in pieces and parsing everything."""

    def check(self, make, events: list[bytes]) -> None:
        rng = random.Random(7)
        groupings = [[b"".join(events)], events]
        for _ in range(3):  # events grouped into chunks at random
            chunks, current = [], b""
            for e in events:
                current += e
                if rng.random() < 0.4:
                    chunks.append(current)
                    current = b""
            chunks.append(current)
            groupings.append([c for c in chunks if c])
        for chunks in groupings:
            whole = run_whole(make(), chunks)
            body = b"".join(chunks)
            for step in (1, 7, len(body)):
                self.assertEqual(whole, run_parsed(make, body, step, self), (chunks, step))

    def test_openai(self):
        tool = [{"id": "call_1", "name": "lookup", "arguments": {"city": "Paris"}}]
        for include_usage in (True, False):
            chunks = openai_stream_chunks(TEXTS, "gpt-4o", 10, 5, 2, include_usage=include_usage, tool_calls=tool)
            events = openai_sse_events(chunks)
            odd = [b'data: {"foo": "bar"}\n\n', b"data: not json\n\n", b'data: {"error": {"message": "x"}}\n\n',
                   b'data: {"choices":[{"index":0,"message":{"content":"m"}}]}\n\n', b"data:\n\n",
                   b'event: error\ndata: {"choices":[{"delta":{"content":"e"}}]}\n\n']
            self.check(lambda: SseTap("openai"), events)
            self.check(lambda: SseTap("openai"), events[:2] + odd + events[2:])
            self.check(lambda: SseTap("openai", strip_usage_chunk=True), events)
            self.check(lambda: SseTap("openai", usage_chunk_extra=lambda u: {"cost": 0.5}), events)

    def test_anthropic(self):
        pairs = anthropic_stream_events(TEXTS, "claude-x", 30, 7, 3, 1,
                                        tool_uses=[{"id": "toolu_1", "name": "f", "input": {"a": "b"}}])
        thinking = ("content_block_delta",
                    {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hm"}})
        signature = ("content_block_delta",
                     {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "s"}})
        events = anthropic_sse_events([pairs[0], thinking, signature] + pairs[1:])
        self.check(lambda: SseTap("anthropic"), events)
        self.check(lambda: SseTap("anthropic"), [b"event: content_block_delta\ndata: {broken\n\n"] + events)

    def test_responses(self):
        events = responses_sse_events(responses_stream_events(TEXTS, "gpt-4.1", 12, 6, 2, 1))
        self.check(lambda: SseTap("responses"), events)
