"""
The Anthropic -> chat stream translator's text-delta fast path writes
what its parser writes: a stream fed one event a chunk (the fast path
takes the plain text deltas) gives the same bytes as the same stream fed
in small pieces (every event parsed).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.surfaces.translate_stream import AnthropicToChatStream
from cllama_tx.testing import anthropic_sse_events, anthropic_stream_events

TEXTS = ["Hello", " wörld", 'say "hi"', "back\\slash", "tab\there", "emoji 🦙", "", "{[braces]}", "\u2028"]


def translated(chunks, include_usage: bool) -> tuple[bytes, AnthropicToChatStream]:
    stream = AnthropicToChatStream(include_usage, 1700000000, None, usage_extra=lambda: {"cost": 0.25})
    return b"".join(stream.feed(c) for c in chunks) + stream.finish(), stream


class TextDeltaFastPathTests(SynchronousTestCase):
    def check(self, events: list[bytes]) -> None:
        body = b"".join(events)
        for include_usage in (True, False):
            fast, stream = translated(events, include_usage)
            for step in (1, 5, 64):
                slow, _ = translated([body[i : i + step] for i in range(0, len(body), step)], include_usage)
                self.assertEqual(fast, slow, step)
            self.assertTrue(stream.complete)

    def test_text_tool_and_thinking_streams(self):
        pairs = anthropic_stream_events(TEXTS, "claude-x", 30, 7, 3, 1,
                                        tool_uses=[{"id": "toolu_1", "name": "f", "input": {"a": "b"}}])
        self.check(anthropic_sse_events(pairs))

    def test_the_frame_follows_the_message(self):
        """A second message_start (a new id and model) changes the chunks' frame."""
        first = anthropic_stream_events(["one", "two"], "claude-a", 1, 1, id="msg_first")
        second = anthropic_stream_events(["three"], "claude-b", 1, 1, id="msg_second")
        self.check(anthropic_sse_events(first[:-1] + second))

    def test_what_the_fast_path_leaves_to_the_parser(self):
        pairs = anthropic_stream_events(["ok"], "claude-x", 1, 1)
        events = anthropic_sse_events(pairs)
        delta = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"%s"}}\n\n'
        odd = [delta % b"raw\ttab", delta % b"bad\xffutf8", delta % b"split\\u00e9", delta % b"",
               b'event: content_block_delta\ndata: {"type":"content_block_delta","index":x,"delta":{"type":"text_delta","text":"i"}}\n\n',
               b'event: content_block_delta\r\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"crlf"}}\r\n\r\n']
        at = next(i for i, e in enumerate(events) if b"content_block_delta" in e)
        self.check(events[:at] + odd + events[at:])
