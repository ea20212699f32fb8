"""
Usage extraction: complete bodies, the incremental SSE tap, estimates.

Streams are built with the wire-format builders in L{cllama_tx.testing}
(the same ones the fake providers serve), so the tap is tested against
what the fakes, and the SDK-pinned shapes behind them, really send.
"""

from __future__ import annotations

import json
import random

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting.usage import (
    IMAGE_TOKENS,
    RAW_BYTES_PER_TOKEN,
    SseTap,
    estimate_output_tokens,
    estimate_prompt_tokens,
    estimate_tokens,
    output_chars_from_json,
    usage_from_json,
)
from cllama_tx.store.records import Usage
from cllama_tx.testing import (
    anthropic_error,
    anthropic_message,
    anthropic_sse_events,
    anthropic_stream_events,
    dumps,
    openai_completion,
    openai_error,
    openai_sse_events,
    openai_stream_chunks,
    parse_sse,
)

DONE = b"data: [DONE]\n\n"
STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
TOOL = {"id": "call_1", "name": "lookup", "arguments": {"city": "Paris", "units": "metric"}}
TOOL_USE = {"id": "toolu_1", "name": "lookup", "input": {"city": "Paris"}}


def run(tap: SseTap, chunks) -> tuple[bytes, bytes]:
    """Feed C{chunks}, finish; return (sent before the commit, held)."""
    out = [tap.feed(chunk) for chunk in chunks]
    out.append(tap.finish())
    return b"".join(out), tap.held()


def crlf(body: bytes) -> bytes:
    return body.replace(b"\n", b"\r\n")


def cr(body: bytes) -> bytes:
    return body.replace(b"\n", b"\r")


def nospace(body: bytes) -> bytes:
    return body.replace(b"data: ", b"data:").replace(b"event: ", b"event:")


def usage_tuple(u: Usage) -> tuple:
    return (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens, u.reasoning_tokens)


def openai_events(pieces=("Hel", "lo"), prompt=10, completion=5, cached=0, include_usage=True, tool_calls=None):
    chunks = openai_stream_chunks(
        list(pieces),
        "gpt-4o",
        prompt,
        completion,
        cached,
        include_usage=include_usage,
        tool_calls=tool_calls,
    )
    return openai_sse_events(chunks, done=False)


def anthropic_events(pieces=("Hel", "lo"), inp=10, out=5, read=0, write=0, tool_uses=None):
    return anthropic_sse_events(
        anthropic_stream_events(list(pieces), "claude-x", inp, out, read, write, tool_uses=tool_uses)
    )


# ---------------------------------------------------------------------------
# Complete bodies
# ---------------------------------------------------------------------------


class UsageFromJsonTests(SynchronousTestCase):
    def test_openai_plain(self):
        u = usage_from_json(openai_completion("hi", "gpt-4o", 100, 20), "openai")
        self.assertEqual(usage_tuple(u), (100, 20, 0, 0, 0))
        self.assertTrue(u.seen)
        self.assertIsNone(u.reported_cost_usd)
        self.assertEqual(u.prompt_tokens, 100)

    def test_openai_cached(self):
        """Cached prompt tokens are inside prompt_tokens: input excludes them."""
        u = usage_from_json(openai_completion("hi", "gpt-4o", 100, 20, cached_tokens=64), "openai")
        self.assertEqual(usage_tuple(u), (36, 20, 64, 0, 0))
        self.assertEqual(u.prompt_tokens, 100)

    def test_openai_absent(self):
        doc = openai_completion("hi", "gpt-4o", 1, 1)
        del doc["usage"]
        u = usage_from_json(doc, "openai")
        self.assertEqual(u, Usage())
        self.assertFalse(u.seen)
        self.assertFalse(usage_from_json({"usage": None}, "openai").seen)

    def test_openrouter(self):
        """OpenRouter: cost, cache writes inside prompt_tokens, reasoning tokens."""
        doc = openai_completion("hi", "anthropic/claude", 194, 30, cached_tokens=50)
        doc["usage"]["prompt_tokens_details"]["cache_write_tokens"] = 100
        doc["usage"]["completion_tokens_details"]["reasoning_tokens"] = 12
        doc["usage"]["cost"] = 0.0042
        u = usage_from_json(doc, "openai")
        self.assertEqual(usage_tuple(u), (44, 30, 50, 100, 12))
        self.assertEqual(u.reported_cost_usd, 0.0042)
        self.assertEqual(u.prompt_tokens, 194)
        doc["usage"]["cost"] = 0
        self.assertEqual(usage_from_json(doc, "openai").reported_cost_usd, 0.0)

    def test_deepseek_cache_hit(self):
        doc = {"usage": {"prompt_tokens": 90, "completion_tokens": 9, "prompt_cache_hit_tokens": 60, "prompt_cache_miss_tokens": 30}}
        self.assertEqual(usage_tuple(usage_from_json(doc, "openai")), (30, 9, 60, 0, 0))

    def test_cache_details_win_over_provider_fields(self):
        doc = {
            "usage": {
                "prompt_tokens": 90,
                "completion_tokens": 9,
                "prompt_tokens_details": {"cached_tokens": 10},
                "prompt_cache_hit_tokens": 60,
            }
        }
        self.assertEqual(usage_tuple(usage_from_json(doc, "openai")), (80, 9, 10, 0, 0))

    def test_gateway_cache_creation(self):
        """A gateway relaying Anthropic: cache_creation_input_tokens, top level or in details."""
        doc = {"usage": {"prompt_tokens": 500, "completion_tokens": 7, "cache_creation_input_tokens": 300, "cache_read_input_tokens": 100}}
        self.assertEqual(usage_tuple(usage_from_json(doc, "openai")), (100, 7, 100, 300, 0))
        doc = {"usage": {"prompt_tokens": 500, "completion_tokens": 7, "prompt_tokens_details": {"cached_tokens": 0, "cache_creation_input_tokens": 300}}}
        self.assertEqual(usage_tuple(usage_from_json(doc, "openai")), (200, 7, 0, 300, 0))

    def test_parts_outside_prompt_tokens(self):
        """Cache counts that cannot be inside prompt_tokens are kept, never made negative."""
        doc = {"usage": {"prompt_tokens": 50, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 40, "cache_write_tokens": 30}}}
        self.assertEqual(usage_tuple(usage_from_json(doc, "openai")), (10, 1, 40, 30, 0))
        doc = {"usage": {"prompt_tokens": 50, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 70}}}
        self.assertEqual(usage_tuple(usage_from_json(doc, "openai")), (50, 1, 70, 0, 0))

    def test_openai_garbage_ignored(self):
        for bad in (True, -1, 1.5, "12", None, [], {}, 2**80):
            doc = {
                "usage": {
                    "prompt_tokens": bad,
                    "completion_tokens": bad,
                    "prompt_tokens_details": {"cached_tokens": bad, "cache_write_tokens": bad},
                    "completion_tokens_details": {"reasoning_tokens": bad},
                    "cost": bad,
                }
            }
            u = usage_from_json(doc, "openai")
            self.assertEqual(usage_tuple(u), (0, 0, 0, 0, 0), bad)
            self.assertTrue(u.seen)
        for bad_cost in (float("nan"), float("inf"), -0.5, "0.1", False):
            self.assertIsNone(usage_from_json({"usage": {"cost": bad_cost}}, "openai").reported_cost_usd)
        self.assertEqual(
            usage_tuple(usage_from_json({"usage": {"prompt_tokens": 5, "prompt_tokens_details": "x"}}, "openai")),
            (5, 0, 0, 0, 0),
        )
        for doc in (None, [], "x", {"usage": "x"}, {"usage": [1]}):
            self.assertFalse(usage_from_json(doc, "openai").seen)

    def test_anthropic_plain(self):
        u = usage_from_json(anthropic_message("hi", "claude-x", 100, 20), "anthropic")
        self.assertEqual(usage_tuple(u), (100, 20, 0, 0, 0))
        self.assertTrue(u.seen)

    def test_anthropic_cached(self):
        """Anthropic's input_tokens already exclude cache reads and writes."""
        doc = anthropic_message("hi", "claude-x", 100, 20, cache_read_input_tokens=1000, cache_creation_input_tokens=300)
        u = usage_from_json(doc, "anthropic")
        self.assertEqual(usage_tuple(u), (100, 20, 1000, 300, 0))
        self.assertEqual(u.prompt_tokens, 1400)

    def test_anthropic_absent_and_nulls(self):
        doc = anthropic_message("hi", "claude-x", 1, 1)
        del doc["usage"]
        self.assertFalse(usage_from_json(doc, "anthropic").seen)
        doc = {"usage": {"input_tokens": 12, "output_tokens": 3, "cache_read_input_tokens": None, "cache_creation_input_tokens": None}}
        u = usage_from_json(doc, "anthropic")
        self.assertEqual(usage_tuple(u), (12, 3, 0, 0, 0))
        u = usage_from_json({"usage": {"input_tokens": True, "output_tokens": -3, "cache_read_input_tokens": "9"}}, "anthropic")
        self.assertEqual(usage_tuple(u), (0, 0, 0, 0, 0))
        self.assertTrue(u.seen)

    def test_unknown_wire_format(self):
        self.assertRaises(ValueError, usage_from_json, {}, "gemini")
        self.assertRaises(ValueError, SseTap, "gemini")
        self.assertRaises(ValueError, estimate_prompt_tokens, {}, "gemini")

    def test_output_chars_from_json(self):
        doc = openai_completion("hello", "gpt-4o", 1, 1, tool_calls=[TOOL])
        args = json.dumps(TOOL["arguments"])
        self.assertEqual(output_chars_from_json(doc, "openai"), 5 + len(args))
        doc = anthropic_message(
            [{"type": "thinking", "thinking": "hmm", "signature": "sig"}, {"type": "text", "text": "hello"}],
            "claude-x",
            1,
            1,
            tool_uses=[TOOL_USE],
        )
        self.assertEqual(output_chars_from_json(doc, "anthropic"), 3 + 5 + len('{"city":"Paris"}'))
        self.assertEqual(output_chars_from_json(None, "openai"), 0)


# ---------------------------------------------------------------------------
# The tap, OpenAI
# ---------------------------------------------------------------------------


class SplitMixin:
    def check_every_split(self, body: bytes, expected_out: bytes, expected_held: bytes, make, check=None):
        """Every two-piece split, and byte by byte, gives the same result."""
        splits = [[body[:i], body[i:]] for i in range(len(body) + 1)]
        splits.append([body[i : i + 1] for i in range(len(body))])
        for chunks in splits:
            tap = make()
            out, held = run(tap, chunks)
            self.assertEqual(out, expected_out, [len(c) for c in chunks][:3])
            self.assertEqual(held, expected_held)
            self.assertEqual(tap.buffered_bytes, 0)
            if check is not None:
                check(tap)


class OpenAITapTests(SplitMixin, SynchronousTestCase):
    def test_usage_cached_every_split_every_line_ending(self):
        events = openai_events(prompt=100, completion=7, cached=60)
        body = b"".join(events) + DONE

        def check(tap):
            self.assertEqual(usage_tuple(tap.usage), (40, 7, 60, 0, 0))
            self.assertTrue(tap.usage.seen)
            self.assertTrue(tap.saw_terminal)
            self.assertEqual(tap.output_chars, 5)
            self.assertEqual(tap.events, len(events) + 1)
            self.assertIsNone(tap.error_event)

        for transform in (lambda b: b, crlf, cr, nospace, lambda b: crlf(nospace(b))):
            stream = transform(body)
            self.check_every_split(
                stream, transform(b"".join(events)), transform(DONE), lambda: SseTap("openai"), check
            )

    def test_usage_absent(self):
        events = openai_events(include_usage=False)
        body = b"".join(events) + DONE
        for transform in (lambda b: b, crlf):
            tap = SseTap("openai", strip_usage_chunk=True)
            out, held = run(tap, [transform(body)])
            self.assertEqual(out, transform(b"".join(events)))
            self.assertEqual(held, transform(DONE))
            self.assertFalse(tap.usage.seen)
            self.assertEqual(tap.usage, Usage())
            self.assertEqual(tap.output_chars, 5)

    def test_usage_without_cache(self):
        tap = SseTap("openai")
        run(tap, [b"".join(openai_events(prompt=33, completion=4)) + DONE])
        self.assertEqual(usage_tuple(tap.usage), (33, 4, 0, 0, 0))

    def test_comments_event_lines_multiline_data(self):
        """Comments, event: lines, id:, retry: and multi-line data pass through and parse."""
        chunk = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}
        text = json.dumps(chunk, indent=1).encode()  # several lines
        multiline = b"".join(b"data: " + line + b"\n" for line in text.split(b"\n")) + b"\n"
        body = (
            b": OPENROUTER PROCESSING\n\n"
            + b": keepalive\nid: 7\nretry: 100\nevent: message\n"
            + b"data: " + dumps({"choices": [{"index": 0, "delta": {"content": "abc"}}]}) + b"\n\n"
            + multiline
            + b":ping\n\n"
            + DONE
        )
        for transform in (lambda b: b, crlf, cr):
            stream = transform(body)
            self.check_every_split(
                stream,
                stream[: -len(transform(DONE))],
                transform(DONE),
                lambda: SseTap("openai"),
                lambda tap: (
                    self.assertEqual(usage_tuple(tap.usage), (9, 2, 0, 0, 0)),
                    self.assertEqual(tap.output_chars, 3),
                    self.assertEqual(tap.events, 3),
                ),
            )

    def test_strip_usage_chunk(self):
        """Exactly the include_usage event goes; everything else is byte-identical."""
        events = openai_events(prompt=100, completion=7, cached=60)
        self.assertEqual(json.loads(events[-1][6:])["choices"], [])
        body = b": hi\n\n" + b"".join(events) + DONE
        expected = b": hi\n\n" + b"".join(events[:-1])
        for transform in (lambda b: b, crlf, cr, nospace):
            self.check_every_split(
                transform(body),
                transform(expected),
                transform(DONE),
                lambda: SseTap("openai", strip_usage_chunk=True),
                lambda tap: self.assertEqual(usage_tuple(tap.usage), (40, 7, 60, 0, 0)),
            )

    def test_usage_on_content_chunk_not_stripped(self):
        """Usage on a chunk with choices is metered, never removed; the last usage wins."""
        first = {"choices": [{"index": 0, "delta": {"content": "ab"}}], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
        last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "cost": 0.5}}
        body = b"".join(openai_sse_events([first, last], done=True))
        tap = SseTap("openai", strip_usage_chunk=True)
        out, held = run(tap, [body])
        self.assertEqual(out + held, body)
        self.assertEqual(usage_tuple(tap.usage), (5, 2, 0, 0, 0))
        self.assertEqual(tap.usage.reported_cost_usd, 0.5)

    def test_usage_chunk_extra(self):
        events = openai_events(prompt=100, completion=7, cached=60)
        body = b"".join(events) + DONE
        seen = []

        def extra(usage):
            seen.append(usage_tuple(usage))
            return {"cost": 0.0012}

        for transform in (lambda b: b, crlf):
            stream = transform(body)
            for chunks in ([stream], [stream[i : i + 3] for i in range(0, len(stream), 3)]):
                tap = SseTap("openai", usage_chunk_extra=extra)
                out, held = run(tap, chunks)
                prefix = transform(b"".join(events[:-1]))
                self.assertTrue(out.startswith(prefix))
                replaced = out[len(prefix) :]
                self.assertTrue(replaced.startswith(b"data: "))
                self.assertTrue(replaced.endswith(b"\n\n"))
                self.assertEqual(replaced.count(b"\n"), 2)
                doc = json.loads(replaced[6:])
                expected = json.loads(events[-1][6:])
                expected["usage"]["cost"] = 0.0012
                self.assertEqual(doc, expected)
                self.assertEqual(held, transform(DONE))
                self.assertEqual(parse_sse(out + held)[-2], (None, replaced[6:-2].decode()))
        self.assertEqual(set(seen), {(40, 7, 60, 0, 0)})
        for transform in (crlf, cr):
            stream = transform(body)
            whole = run(SseTap("openai", usage_chunk_extra=extra), [stream])
            self.check_every_split(stream, whole[0], whole[1], lambda: SseTap("openai", usage_chunk_extra=extra))

    def test_usage_chunk_extra_falsy_and_strip_wins(self):
        events = openai_events()
        body = b"".join(events) + DONE
        out, held = run(SseTap("openai", usage_chunk_extra=lambda u: {}), [body])
        self.assertEqual(out + held, body)
        out, held = run(SseTap("openai", strip_usage_chunk=True, usage_chunk_extra=lambda u: {"cost": 1}), [body])
        self.assertEqual(out, b"".join(events[:-1]))
        out, held = run(SseTap("openai", usage_chunk_extra=lambda u: {"cost": float("nan")}), [body])
        self.assertEqual(out + held, body)

    def test_held_terminal_and_after(self):
        events = openai_events()
        tap = SseTap("openai")
        self.assertEqual(tap.feed(b"".join(events)), b"".join(events))
        self.assertEqual(tap.feed(b"data: [DO"), b"")
        self.assertFalse(tap.saw_terminal)
        self.assertEqual(tap.feed(b"NE]\n\n: after\n\nda"), b"")
        self.assertTrue(tap.saw_terminal)
        self.assertEqual(tap.held(), b"data: [DONE]\n\n: after\n\n")
        self.assertEqual(tap.held(), b"")
        self.assertEqual(tap.feed(b"ta: x"), b"")
        self.assertEqual(tap.finish(), b"")
        self.assertEqual(tap.held(), b"data: x")
        self.assertEqual(tap.finish(), b"")

    def test_unterminated_tail(self):
        """A stream cut before its blank line: the tail is forwarded as is, and still metered."""
        events = openai_events(prompt=8, completion=3)
        body = b"".join(events)[:-2]
        tap = SseTap("openai", strip_usage_chunk=True)
        out, held = run(tap, [body])
        self.assertEqual(out, body)
        self.assertEqual(held, b"")
        self.assertEqual(usage_tuple(tap.usage), (8, 3, 0, 0, 0))
        tap = SseTap("openai")
        out, held = run(tap, [b"".join(events), b"data: [DONE]"])
        self.assertEqual((out, held), (b"".join(events), b"data: [DONE]"))
        self.assertTrue(tap.saw_terminal)
        tap = SseTap("openai")
        out, held = run(tap, [b"data: {\"usage\": {\"prompt_tok"])
        self.assertEqual(out, b"data: {\"usage\": {\"prompt_tok")
        self.assertFalse(tap.usage.seen)

    def test_error_event(self):
        events = openai_events(include_usage=False)
        error = openai_error("upstream overloaded", "server_error")
        body = b"".join(events[:2]) + b"data: " + dumps(error) + b"\n\n"
        tap = SseTap("openai")
        out, held = run(tap, [body])
        self.assertEqual(out, body)
        self.assertEqual(tap.error_event, error)
        self.assertFalse(tap.saw_terminal)
        # OpenRouter's mid-stream error: a chunk with an error and finish_reason "error".
        chunk = {"object": "chat.completion.chunk", "error": {"code": 502, "message": "x"}, "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}]}
        tap = SseTap("openai")
        run(tap, [b"data: " + dumps(chunk) + b"\n\n"])
        self.assertEqual(tap.error_event, chunk)
        tap = SseTap("openai")
        run(tap, [b"".join(openai_events())])
        self.assertIsNone(tap.error_event)

    def test_output_chars(self):
        """Content, reasoning and tool-call argument deltas count."""
        events = openai_events(pieces=("Hello", " wörld"), tool_calls=[TOOL])
        args = json.dumps(TOOL["arguments"])
        reasoning = [
            {"choices": [{"index": 0, "delta": {"reasoning_content": "think"}}]},
            {"choices": [{"index": 0, "delta": {"reasoning": "more", "reasoning_details": [{"text": "more"}]}}]},
            {"choices": [{"index": 0, "delta": {"content": None, "refusal": None}}]},
        ]
        body = b"".join(openai_sse_events(reasoning, done=False)) + b"".join(events) + DONE
        tap = SseTap("openai")
        run(tap, [body[i : i + 5] for i in range(0, len(body), 5)])
        self.assertEqual(tap.output_chars, 5 + 6 + len(args) + 5 + 4)

    def test_oversized_event_passthrough(self):
        """An event beyond max_event_bytes is forwarded as it comes, unparsed; the rest still meters."""
        big = "x" * 5000
        events = openai_events(pieces=("ab", big, "cd"), prompt=12, completion=3)
        body = b"".join(events) + DONE
        sizes = [len(e) for e in events]
        self.assertGreater(max(sizes), 1000)
        for transform in (lambda b: b, crlf, cr):
            stream = transform(body)
            for step in (1, 7, 333, 4096):
                tap = SseTap("openai", strip_usage_chunk=True, max_event_bytes=1000)
                outs = []
                for i in range(0, len(stream), step):
                    outs.append(tap.feed(stream[i : i + step]))
                    self.assertLessEqual(tap.buffered_bytes, 1000)
                outs.append(tap.finish())
                self.assertEqual(b"".join(outs), transform(b"".join(events[:-1])))
                self.assertEqual(tap.held(), transform(DONE))
                self.assertEqual(usage_tuple(tap.usage), (12, 3, 0, 0, 0))
                self.assertEqual(tap.output_chars, 4)
                self.assertEqual(tap.events, len(events) + 1)

    def test_garbage_data_does_not_crash(self):
        body = (
            b"data: not json\n\n"
            b"data: [1, 2]\n\n"
            b"data: " + b"[" * 100000 + b"\n\n"
            b"data: {\"choices\": \"x\", \"usage\": 3}\n\n"
            b"data: {\"choices\": [1, {\"delta\": 5}, {\"delta\": {\"tool_calls\": [null, {\"function\": 3}]}}]}\n\n"
            b"data: \xff\xfe\n\n"
            b"data\n\n"
            b"\n\n\n"
        )
        tap = SseTap("openai", strip_usage_chunk=True)
        out, held = run(tap, [body])
        self.assertEqual(out, body)
        self.assertFalse(tap.usage.seen)

    def test_random_chunks_five_megabytes(self):
        """
        5 MB fed in random 1 B..4 KiB chunks: the output is the input minus the
        usage chunk, and only the current partial event is ever buffered.
        """
        rng = random.Random(20240601)
        alphabet = "abcdefghij klmnop\u00e9\u4e2d\U0001f600\"\\\n"
        pieces = []
        total = 0
        while total < 5_000_000:
            piece = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400)))
            pieces.append(piece)
            total += len(piece.encode("utf-8")) + 220
        events = openai_events(pieces=pieces, prompt=1234, completion=len(pieces), cached=1000)
        events.insert(len(events) // 2, b": keepalive\n\n")
        body = b"".join(events) + DONE
        self.assertGreater(len(body), 5_000_000)
        largest = max(len(e) for e in events)
        tap = SseTap("openai", strip_usage_chunk=True)
        out = []
        pos = 0
        while pos < len(body):
            size = rng.randint(1, 4096)
            out.append(tap.feed(body[pos : pos + size]))
            pos += size
            self.assertLessEqual(tap.buffered_bytes, largest)
        out.append(tap.finish())
        self.assertEqual(b"".join(out), b"".join(events[:-1]))
        self.assertEqual(tap.held(), DONE)
        self.assertEqual(usage_tuple(tap.usage), (234, len(pieces), 1000, 0, 0))
        self.assertEqual(tap.output_chars, sum(len(p) for p in pieces))


# ---------------------------------------------------------------------------
# The tap, Anthropic
# ---------------------------------------------------------------------------


class AnthropicTapTests(SplitMixin, SynchronousTestCase):
    def test_usage_cached_every_split_every_line_ending(self):
        events = anthropic_events(inp=100, out=42, read=1000, write=300)
        body = b"".join(events)
        self.assertEqual(events[-1], STOP)

        def check(tap):
            self.assertEqual(usage_tuple(tap.usage), (100, 42, 1000, 300, 0))
            self.assertTrue(tap.saw_terminal)
            self.assertEqual(tap.output_chars, 5)
            self.assertEqual(tap.events, len(events))

        for transform in (lambda b: b, crlf, cr, nospace, lambda b: cr(nospace(b))):
            self.check_every_split(
                transform(body),
                transform(b"".join(events[:-1])),
                transform(STOP),
                lambda: SseTap("anthropic"),
                check,
            )

    def test_usage_without_cache(self):
        tap = SseTap("anthropic")
        run(tap, [b"".join(anthropic_events(inp=20, out=3))])
        self.assertEqual(usage_tuple(tap.usage), (20, 3, 0, 0, 0))

    def test_usage_absent(self):
        body = (
            b"event: content_block_delta\n"
            b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}\n\n'
            + STOP
        )
        tap = SseTap("anthropic")
        out, held = run(tap, [body])
        self.assertEqual((out, held), (body[: -len(STOP)], STOP))
        self.assertFalse(tap.usage.seen)
        self.assertEqual(tap.output_chars, 2)

    def test_message_delta_is_cumulative(self):
        """Each message_delta replaces output_tokens; newer input/cache fields are taken, never lowered."""
        pairs = anthropic_stream_events(["a"], "claude-x", 50, 10, 7, 3)
        delta = [p for p in pairs if p[0] == "message_delta"][0]
        extra = ("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 25}})
        newer = (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {},
                "usage": {"output_tokens": 30, "input_tokens": 55, "cache_read_input_tokens": 0, "cache_creation_input_tokens": None},
            },
        )
        index = pairs.index(delta)
        tap = SseTap("anthropic")
        run(tap, [b"".join(anthropic_sse_events(pairs[:index] + [delta, extra]))])
        self.assertEqual(usage_tuple(tap.usage), (50, 25, 7, 3, 0))
        tap = SseTap("anthropic")
        run(tap, [b"".join(anthropic_sse_events(pairs[:index] + [delta, newer]))])
        self.assertEqual(usage_tuple(tap.usage), (55, 30, 7, 3, 0))
        tap = SseTap("anthropic")
        run(tap, [b"".join(anthropic_sse_events(pairs[:index]))])
        self.assertEqual(tap.usage.output_tokens, 1)  # message_start's placeholder

    def test_output_chars(self):
        pairs = anthropic_stream_events(["Hello", " wörld"], "claude-x", 1, 1, tool_uses=[TOOL_USE])
        thinking = (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "hmm"}},
        )
        signature = (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "zzzz"}},
        )
        body = b"".join(anthropic_sse_events([pairs[0], thinking, signature] + pairs[1:]))
        tap = SseTap("anthropic")
        run(tap, [body[i : i + 11] for i in range(0, len(body), 11)])
        self.assertEqual(tap.output_chars, 3 + 5 + 6 + len(json.dumps(TOOL_USE["input"])))

    def test_error_event(self):
        pairs = anthropic_stream_events(["a"], "claude-x", 5, 1)
        error = anthropic_error("overloaded_error", "Overloaded")
        body = b"".join(anthropic_sse_events(pairs[:3] + [("error", error)]))
        tap = SseTap("anthropic")
        out, held = run(tap, [body])
        self.assertEqual((out, held), (body, b""))
        self.assertEqual(tap.error_event, error)
        self.assertFalse(tap.saw_terminal)

    def test_type_without_event_line(self):
        """A relay that drops event: lines still meters by the data's type."""
        pairs = anthropic_stream_events(["abc"], "claude-x", 9, 4, 2, 1)
        body = b"".join(b"data: " + dumps(data) + b"\n\n" for _, data in pairs)
        tap = SseTap("anthropic")
        out, held = run(tap, [body])
        self.assertEqual(usage_tuple(tap.usage), (9, 4, 2, 1, 0))
        self.assertEqual(tap.output_chars, 3)
        self.assertEqual(held, b'data: {"type":"message_stop"}\n\n')

    def test_strip_options_ignored(self):
        body = b"".join(anthropic_events())
        out, held = run(SseTap("anthropic", strip_usage_chunk=True, usage_chunk_extra=lambda u: {"cost": 1}), [body])
        self.assertEqual(out + held, body)


class UnreadOutputTests(SynchronousTestCase):
    """
    What the tap forwards but cannot read as text is counted by size, so an
    answer that delivered anything is never estimated at 0 output tokens.
    """

    def test_oversized_event_counted_whole_at_every_split(self):
        big = "x" * 5000
        events = openai_events(pieces=("ab", big, "cd"), include_usage=False)
        [oversized] = [e for e in events if len(e) > 1000]
        body = b"".join(events) + DONE
        for transform in (lambda b: b, crlf, cr):
            stream = transform(body)
            size = len(transform(oversized))
            for step in list(range(1, 40)) + [333, 4096]:
                tap = SseTap("openai", max_event_bytes=1000)
                for i in range(0, len(stream), step):
                    tap.feed(stream[i : i + step])
                    self.assertLessEqual(tap.buffered_bytes, 1000)
                tap.finish()
                self.assertEqual(tap.output_chars, 4, step)
                # Whole, framing included; a line end split across chunks
                # may be missed (at most the blank line's two bytes).
                self.assertTrue(size - 2 <= tap.unmetered_bytes <= size, (step, tap.unmetered_bytes, size))
                self.assertFalse(tap.usage_final)

    def test_an_oversized_event_complete_in_one_chunk_is_read(self):
        """Nothing forces a pass-through when the whole event is there: it is metered as text."""
        events = openai_events(pieces=("x" * 5000,), include_usage=False)
        tap = SseTap("openai", max_event_bytes=1000)
        run(tap, [b"".join(events) + DONE])
        self.assertEqual((tap.output_chars, tap.unmetered_bytes), (5000, 0))

    def test_ten_megabytes_in_one_event_keep_the_memory_bounded(self):
        head = b'data: {"choices":[{"delta":{"content":"'
        tap = SseTap("openai")
        sent = len(tap.feed(head))
        piece = b"y" * 65536
        for _ in range(160):
            sent += len(tap.feed(piece))
            self.assertLessEqual(tap.buffered_bytes, 1 << 20)
        sent += len(tap.feed(b'"}}]}\n\n' + DONE))
        tap.finish()
        total = len(head) + 160 * 65536 + len(b'"}}]}\n\n')
        self.assertEqual(tap.unmetered_bytes, total)
        self.assertEqual(sent, total)  # all forwarded; [DONE] held
        self.assertEqual(estimate_output_tokens(tap.output_chars, tap.unmetered_bytes), -(-total // 4))

    def test_payloads_that_are_not_chunks(self):
        body = (
            b"data: not json\n\n"  # 8
            b"data: [1, 2]\n\n"  # 6
            b'data: {"foo": "bar"}\n\n'  # 14: JSON, but no chunk
            b'data: {"choices": [{"delta": {"content": "abc"}}]}\n\n'  # read: 3 characters
            b'data: {"choices": []}\n\n'  # a chunk, empty
            b'data: {"error": {"message": "boom"}}\n\n'  # an error, not output
            b"this line is no field\n\n"  # 21
            b"id: 7\nretry: 10\n: a comment\n\n"  # fields and comments: nothing
            + DONE
        )
        tap = SseTap("openai")
        run(tap, [body])
        self.assertEqual((tap.output_chars, tap.unmetered_bytes), (3, 8 + 6 + 14 + 21))
        for step in (1, 2, 5):
            split = SseTap("openai")
            run(split, [body[i : i + step] for i in range(0, len(body), step)])
            self.assertEqual((split.output_chars, split.unmetered_bytes), (3, 49), step)

    def test_junk_in_an_unterminated_tail(self):
        tap = SseTap("openai")
        out, _ = run(tap, [b'data: {"choices": [{"delta": {"content": "ab"}}]}\n\nnot sse at all'])
        self.assertTrue(out.endswith(b"not sse at all"))
        self.assertEqual((tap.output_chars, tap.unmetered_bytes), (2, 14))

    def test_anthropic_unknown_and_unreadable_events(self):
        body = b"".join(anthropic_events(pieces=("abcd",)))
        broken, novel = b"{broken", b'{"type": "brand_new", "text": "zz"}'
        extra = (
            b"event: content_block_delta\ndata: " + broken + b"\n\n"
            b"event: brand_new\ndata: " + novel + b"\n\n"
            b"event: ping\ndata: nope\n\n"  # no content
        )
        tap = SseTap("anthropic")
        run(tap, [extra + body])
        self.assertEqual((tap.output_chars, tap.unmetered_bytes), (4, len(broken) + len(novel)))

    def test_usage_final_openai(self):
        events = openai_events(pieces=("ab",), prompt=3, completion=1)
        tap = SseTap("openai")
        run(tap, events[:-1])
        self.assertFalse(tap.usage_final)
        tap.feed(events[-1])
        self.assertTrue(tap.usage_final)

    def test_usage_final_anthropic(self):
        """message_start's usage is a part (input, output 1); message_delta's is the whole."""
        events = anthropic_events(pieces=("ab",), inp=30, out=7)
        tap = SseTap("anthropic")
        tap.feed(events[0])
        self.assertEqual((tap.usage.seen, tap.usage_final, tap.usage.input_tokens, tap.usage.output_tokens), (True, False, 30, 1))
        for event in events[1:-2]:
            tap.feed(event)
        self.assertFalse(tap.usage_final)
        tap.feed(events[-2])  # message_delta
        self.assertEqual((tap.usage_final, tap.usage.output_tokens), (True, 7))


# ---------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------


class EstimateTests(SynchronousTestCase):
    def test_estimate_tokens(self):
        self.assertEqual([estimate_tokens(n) for n in (-3, 0, 1, 3, 4, 5, 8, 9)], [0, 0, 1, 1, 1, 2, 2, 3])

    def test_estimate_output_tokens(self):
        self.assertEqual(RAW_BYTES_PER_TOKEN, 4)
        self.assertEqual(estimate_output_tokens(0, 0), 0)
        self.assertEqual(estimate_output_tokens(8, 0), 2)
        self.assertEqual(estimate_output_tokens(0, 1), 1)  # anything delivered is at least a token
        self.assertEqual(estimate_output_tokens(8, 9), 2 + 3)
        self.assertEqual(estimate_output_tokens(0, 10 * 1024 * 1024), 10 * 1024 * 1024 // 4)

    def test_openai_prompt(self):
        doc = {
            "model": "gpt-4o",
            "stream": True,
            "messages": [
                {"role": "system", "content": "s" * 40},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "t" * 20},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100000}},
                    ],
                },
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"a":1}'}}],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "r" * 13},
            ],
            "tools": [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}],
        }
        # text 40 + 20 + 3 + 7 + 13 = 83; tools: type function function name get parameters type object = 49
        chars = 83 + len("type" "function" "function" "name" "get" "parameters" "type" "object")
        self.assertEqual(estimate_prompt_tokens(doc, "openai"), estimate_tokens(chars) + IMAGE_TOKENS + 4 * 4)
        self.assertEqual(estimate_prompt_tokens(doc, "openai"), 33 + 1000 + 16)

    def test_anthropic_prompt(self):
        doc = {
            "model": "claude-x",
            "system": [{"type": "text", "text": "s" * 10, "cache_control": {"type": "ephemeral"}}],
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "A" * 50000}},
                        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                        {"type": "text", "text": "u" * 6},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "h" * 8, "signature": "S" * 500},
                        {"type": "redacted_thinking", "data": "R" * 500},
                        {"type": "tool_use", "id": "toolu_1", "name": "get", "input": {"city": "Paris"}},
                    ],
                },
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "r" * 5}]},
            ],
            "tools": [{"name": "get", "input_schema": {"type": "object"}}],
        }
        # 10 + 6 + 8 + "get" 3 + "city" 4 + "Paris" 5 + 5 = 41; tools: name get input_schema type object = 29
        self.assertEqual(estimate_prompt_tokens(doc, "anthropic"), estimate_tokens(41 + 29) + 2 * IMAGE_TOKENS + 3 * 4)
        self.assertEqual(estimate_prompt_tokens("x", "anthropic"), 0)
        self.assertEqual(estimate_prompt_tokens({"system": "abcd"}, "anthropic"), 1)

    def test_deep_document(self):
        """The walk is iterative: a deeply nested body does not hit the recursion limit."""
        deep: object = "abcd"
        for _ in range(50000):
            deep = [deep]
        self.assertEqual(estimate_prompt_tokens({"messages": [{"role": "user", "content": deep}]}, "openai"), 1 + 4)
