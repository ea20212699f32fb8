"""
Reading a stream event's generated text without parsing its JSON.

The usage tap sees every event of every stream; almost all of them are
text deltas that carry no usage, no error and nothing else the books need
but the length of their text.  Parsing each one with C{json.loads} was the
largest share of the tap's cost (about 5 us of a 9 us event on the bench
machine), so the tap asks these scanners first: each says how many
characters of generated text an event holds, or None when the event may
carry more than that (usage, an error, an id still to learn, a shape it
does not know) or is not plainly valid, and the tap then parses it as
before.  The figures are the same as the parse gives (the tests hold both
to the same events).

Most deltas of one stream differ only in their text: the same id, model,
time and framing around it.  A L{ChunkScanner} keeps the framing of the
last text delta it read (its I{template}: the bytes before the text and
after it) and reads the next one that matches it with a few comparisons,
about 1 us; the rest go through the scanners below (a few microseconds,
regular expressions), and what they decline to the parser.

A key followed by C{:} and a quote can only be a key with a string value:
inside a JSON string every quote is escaped.  So a match of C{"content":"}
is the string field C{content} of some object of the event; the scanners
accept an event only when the keys they count can appear in no other
object of it than the delta.

Pure logic, no I/O.
"""

from __future__ import annotations

import json
import re

__all__ = ["ChunkScanner", "anthropic_delta_chars", "openai_chunk_chars", "string_chars"]

# A JSON string's body: characters other than quote and backslash, or an escape.
_STRING = rb'"((?:[^"\\]|\\.)*)"'

# Bytes a JSON string's body holds only escaped (a control character is not valid JSON).
_NOT_PLAIN = re.compile(rb'[\x00-\x1f"\\]')
# And what is not ASCII: a text without any of these is as long as its bytes.
_NOT_PLAIN_ASCII = re.compile(rb'[\x00-\x1f"\\\x80-\xff]')
_CONTROL = re.compile(rb"[\x00-\x1f]")

#: The string fields of an OpenAI chunk's delta whose text is counted.
_OPENAI_TEXT = re.compile(rb'"(?:content|reasoning_content|reasoning|refusal|arguments)"\s*:\s*' + _STRING)

#: A top-level C{"usage": null} (OpenAI sends it on every chunk with include_usage).
_NULL_USAGE = re.compile(rb'"usage"\s*:\s*null')

#: The chunk's C{choices} list (the tap counts no text of another shape).
_CHOICES = re.compile(rb'"choices"\s*:\s*\[')

#: Keys that send an OpenAI chunk to the parser: its usage, an error, a
#: whole message (a shape whose content the tap does not count), or both
#: reasoning names (the tap counts only one of them).
_OPENAI_PARSE = (b'"error"', b'"message"')

#: The text field of each Anthropic delta type counted (the tap's table).
_ANTHROPIC_TEXT = {
    b'"text_delta"': re.compile(rb'"text"\s*:\s*' + _STRING),
    b'"input_json_delta"': re.compile(rb'"partial_json"\s*:\s*' + _STRING),
    b'"thinking_delta"': re.compile(rb'"thinking"\s*:\s*' + _STRING),
}


def string_chars(raw: bytes) -> int | None:
    """
    The length in characters of the JSON string whose body is C{raw}
    (without its quotes), as C{json.loads} would decode it; None when it
    is not valid (bad UTF-8, a bad escape).
    """
    if b"\\" in raw:
        try:
            return len(json.loads(b'"' + raw + b'"'))
        except ValueError:
            return None
    if _CONTROL.search(raw) is not None:
        return None
    if raw.isascii():
        return len(raw)
    try:
        return len(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None


def _framed(payload: bytes) -> bool:
    """
    Does C{payload} look like one whole JSON object: braces around it,
    braces and brackets balanced, an even number of unescaped quotes (a
    cut event is not; a brace in a string, or a string ending in a
    backslash, may make a whole one fail, which then goes to the parser).
    An event that passes and is still not JSON (a missing comma, say)
    has its text counted where the parser would bill its size.
    """
    return (
        payload[:1] == b"{"
        and payload[-1:] == b"}"
        and payload.count(b"{") == payload.count(b"}")
        and payload.count(b"[") == payload.count(b"]")
        and (payload.count(b'"') - payload.count(b'\\"')) % 2 == 0
    )


def openai_chunk_chars(payload: bytes, want_id: bool) -> int | None:
    """
    The generated text in one OpenAI C{chat.completion.chunk} (content,
    reasoning, refusal, tool-call arguments), or None when the tap must
    parse it: it may carry usage (a C{usage} that is not C{null}), an error,
    an id the tap still wants (C{want_id}), a C{message}, both reasoning
    names, or it does not look like a chunk (no C{choices}, not an object).
    """
    if not _framed(payload) or payload.count(b'"choices"') != 1:
        return None
    if b'"choices":[' not in payload and _CHOICES.search(payload) is None:
        return None
    if want_id and b'"id"' in payload:
        return None
    for key in _OPENAI_PARSE:
        if key in payload:
            return None
    usages = payload.count(b'"usage"')
    if usages and (usages > 1 or _NULL_USAGE.search(payload) is None):
        return None
    if b'"reasoning_content"' in payload and b'"reasoning"' in payload:
        return None
    n = 0
    for raw in _OPENAI_TEXT.findall(payload):
        chars = string_chars(raw)
        if chars is None:
            return None
        n += chars
    return n


def anthropic_delta_chars(payload: bytes) -> int | None:
    """
    The generated text in one Anthropic C{content_block_delta} event's data
    (text, thinking, tool input JSON), or None when the tap must parse it:
    not a plain delta of exactly one of those types.
    """
    if not _framed(payload) or b'"content_block_delta"' not in payload:
        return None
    found = None
    for kind, pattern in _ANTHROPIC_TEXT.items():
        if kind in payload:
            if found is not None:
                return None
            found = pattern
    if found is None:
        # Another delta type (signature, citations): no text, but let the parser say so.
        return None
    matches = found.findall(payload)
    if len(matches) != 1:
        return None
    return string_chars(matches[0])


#: A variable string field some providers add to every chunk (OpenAI's
#: stream obfuscation: random padding), allowed to differ from the template.
_PADDING = b'"obfuscation":"'


class ChunkScanner:
    """
    The text of one stream's deltas, read against the framing of the last
    plain text delta (see the module's docstring).  C{kind} is C{"openai"}
    (chat chunks: the C{content} string) or C{"anthropic"}
    (C{content_block_delta} events: the C{text}, C{thinking} or
    C{partial_json} string).  L{chars} returns the text's length, or None
    for the parser.
    """

    __slots__ = ("_openai", "_prefix", "_suffix", "_pad_head", "_pad_tail", "_event_head", "_event_tail")

    def __init__(self, kind: str) -> None:
        self._openai = kind == "openai"
        self._prefix = b""  # empty: no template yet
        self._suffix = b""
        self._pad_head = b""  # the suffix up to a padding string's value, when it has one
        self._pad_tail = b""  # and after that value
        # The whole SSE event around the text (C{data: }... or the Anthropic
        # event line and C{data: }..., to the blank line), without padding.
        self._event_head = b""
        self._event_tail = b""

    def event_chars(self, event: bytes) -> int | None:
        """
        The text of C{event}, one whole SSE event as the stream's template
        frames it (nothing else in it but its text): its length, else None.
        """
        head, tail = self._event_head, self._event_tail
        if not head or not event.startswith(head) or not event.endswith(tail):
            return None
        end = len(event) - len(tail)
        if end < len(head) or _NOT_PLAIN.search(event, len(head), end) is not None:
            return None
        raw = event[len(head) : end]
        return len(raw) if raw.isascii() else string_chars(raw)

    def event_chars_at(self, data: bytes, start: int, stop: int) -> int | None:
        """
        L{event_chars} of C{data[start:stop]}, read in place (the event
        inside an upstream chunk's framing): no copy when its text is
        plain ASCII.
        """
        head, tail = self._event_head, self._event_tail
        if not head or not data.startswith(head, start, stop) or not data.endswith(tail, start, stop):
            return None
        text, end = start + len(head), stop - len(tail)
        if end < text:
            return None
        if _NOT_PLAIN_ASCII.search(data, text, end) is None:
            return end - text
        if _NOT_PLAIN.search(data, text, end) is not None:
            return None
        return string_chars(data[text:end])

    def chars(self, payload: bytes, want_id: bool = False) -> int | None:
        prefix = self._prefix
        if prefix and not want_id and payload.startswith(prefix):
            start = len(prefix)
            end = payload.find(b'"', start)
            raw = payload[start:end]
            # Without a backslash in the text its first quote closes it.
            if end >= 0 and _NOT_PLAIN.search(raw) is None and self._frames(payload[end:]):
                return len(raw) if raw.isascii() else string_chars(raw)
        if self._openai:
            n = openai_chunk_chars(payload, want_id)
            pattern = _CONTENT
        else:
            n = anthropic_delta_chars(payload)
            pattern = _ANTHROPIC_ANY
        if n is not None:
            self._learn(payload, pattern)
        return n

    def _frames(self, rest: bytes) -> bool:
        """Is C{rest} (from the text's closing quote on) the template's, its padding aside?"""
        if rest == self._suffix:
            return True
        head, tail = self._pad_head, self._pad_tail
        if not head or len(rest) < len(head) + len(tail) or not (rest.startswith(head) and rest.endswith(tail)):
            return False
        return _NOT_PLAIN.search(rest, len(head), len(rest) - len(tail)) is None

    def _learn(self, payload: bytes, pattern: re.Pattern) -> None:
        """Keep C{payload}'s framing when it has exactly one text string (and no other text field)."""
        found = list(_OPENAI_TEXT.finditer(payload)) if self._openai else list(pattern.finditer(payload))
        if len(found) != 1 or (self._openai and pattern.match(payload, found[0].start()) is None):
            return
        start, end = found[0].span(1)
        self._prefix = payload[:start]
        suffix = self._suffix = payload[end:]
        at = suffix.find(_PADDING)
        if at >= 0:
            value = at + len(_PADDING)
            close = suffix.find(b'"', value)
            self._pad_head = suffix[:value]
            self._pad_tail = suffix[close:]
            self._event_head = self._event_tail = b""
        else:
            self._pad_head = self._pad_tail = b""
            self._event_head = (b"data: " if self._openai else b"event: content_block_delta\ndata: ") + self._prefix
            self._event_tail = suffix + b"\n\n"


#: The one text string of an OpenAI chunk a template may hold; an Anthropic delta's.
_CONTENT = re.compile(rb'"content"\s*:\s*"')
_ANTHROPIC_ANY = re.compile(rb'"(?:text|thinking|partial_json)"\s*:\s*' + _STRING)
