"""
Usage extraction: what a provider says a response cost in tokens.

Pure logic, no I/O.  L{usage_from_json} reads a complete JSON body;
L{SseTap} sits in the streaming relay and sees every upstream chunk, so it
is written to be cheap: it scans each byte once, keeps only the current
partial event (never the stream), and parses each complete C{data:}
payload once with C{json.loads}.  The estimators give a rough token count
for responses that carry no usage, or only part of it (rows marked
C{estimated}).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from cllama_tx.accounting.sse_scan import ChunkScanner
from cllama_tx.store.records import Usage

__all__ = [
    "ANTHROPIC",
    "IMAGE_TOKENS",
    "OPENAI",
    "RESPONSES",
    "WIRE_FORMATS",
    "SseTap",
    "RAW_BYTES_PER_TOKEN",
    "estimate_output_tokens",
    "estimate_prompt_tokens",
    "estimate_tokens",
    "output_chars_from_json",
    "text_messages_chars",
    "usage_from_json",
]

OPENAI = "openai"
ANTHROPIC = "anthropic"
# The OpenAI Responses API: usage in the response object (JSON, and the
# stream's response.completed / .incomplete / .failed).
RESPONSES = "responses"
WIRE_FORMATS = frozenset({OPENAI, ANTHROPIC, RESPONSES})

#: Counts above this are treated as garbage, not usage (they would not fit
#: a ledger column and no response is that large).
_MAX_COUNT = 2**53

_EMPTY: Mapping[str, Any] = {}


def _check_format(wire_format: str) -> bool:
    """True for Anthropic; L{ValueError} for a format this module does not know."""
    if wire_format == ANTHROPIC:
        return True
    if wire_format in (OPENAI, RESPONSES):
        return False
    raise ValueError(f"unknown wire format {wire_format!r}")


def _count(value: Any) -> int | None:
    """A token count, or None when C{value} is not a sane one (bools, floats, negatives)."""
    if type(value) is int and 0 <= value <= _MAX_COUNT:
        return value
    return None


def _cost(value: Any) -> float | None:
    if type(value) in (int, float) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def _dict(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, dict) else _EMPTY


def _first_count(*values: Any) -> int | None:
    for value in values:
        count = _count(value)
        if count is not None:
            return count
    return None


# ---------------------------------------------------------------------------
# Usage objects
# ---------------------------------------------------------------------------


def _fill_openai(target: Usage, u: Mapping[str, Any]) -> None:
    """
    Replace C{target}'s numbers with an OpenAI-style C{usage} object.

    C{prompt_tokens} includes cache reads (C{prompt_tokens_details.cached_tokens};
    DeepSeek's C{prompt_cache_hit_tokens}; LiteLLM's C{cache_read_input_tokens})
    and, at OpenRouter, cache writes (C{prompt_tokens_details.cache_write_tokens};
    gateways relaying Anthropic also say C{cache_creation_input_tokens}).
    When the reported parts do not fit inside C{prompt_tokens} the provider
    evidently counted them outside it: the parts are kept as reported and
    only what does fit is subtracted, so no count goes negative and no
    reported token is lost.
    """
    details = _dict(u.get("prompt_tokens_details"))
    prompt = _count(u.get("prompt_tokens")) or 0
    read = _first_count(
        details.get("cached_tokens"),
        u.get("prompt_cache_hit_tokens"),
        u.get("cache_read_input_tokens"),
    ) or 0
    write = _first_count(
        details.get("cache_write_tokens"),
        details.get("cache_creation_input_tokens"),
        u.get("cache_creation_input_tokens"),
    ) or 0
    if read + write <= prompt:
        plain = prompt - read - write
    elif read <= prompt:
        plain = prompt - read
    else:
        plain = prompt
    target.input_tokens = plain
    target.cache_read_tokens = read
    target.cache_write_tokens = write
    target.output_tokens = _count(u.get("completion_tokens")) or 0
    target.reasoning_tokens = _count(_dict(u.get("completion_tokens_details")).get("reasoning_tokens")) or 0
    target.reported_cost_usd = _cost(u.get("cost"))
    target.seen = True


def _fill_responses(target: Usage, u: Mapping[str, Any]) -> None:
    """
    Replace C{target}'s numbers with a Responses C{usage} object:
    C{input_tokens} includes the cache reads
    (C{input_tokens_details.cached_tokens}) and writes
    (C{cache_write_tokens}), C{output_tokens} the reasoning
    (C{output_tokens_details.reasoning_tokens}); parts that do not fit are
    kept as reported, as on the chat format.
    """
    details = _dict(u.get("input_tokens_details"))
    _fill_openai(
        target,
        {
            "prompt_tokens": u.get("input_tokens"),
            "completion_tokens": u.get("output_tokens"),
            "prompt_tokens_details": {
                "cached_tokens": details.get("cached_tokens"),
                "cache_write_tokens": details.get("cache_write_tokens"),
            },
            "completion_tokens_details": {
                "reasoning_tokens": _dict(u.get("output_tokens_details")).get("reasoning_tokens")
            },
            "cost": u.get("cost"),
        },
    )


_ANTHROPIC_FIELDS = (
    ("input_tokens", "input_tokens"),
    ("cache_read_input_tokens", "cache_read_tokens"),
    ("cache_creation_input_tokens", "cache_write_tokens"),
)


def _fill_anthropic(target: Usage, u: Mapping[str, Any], delta: bool = False) -> None:
    """
    Take an Anthropic C{usage} object (a Message's, C{message_start}'s or
    C{message_delta}'s).  Absent or null fields leave the count alone.
    C{output_tokens} replaces (it is cumulative).  In a C{message_delta}
    (C{delta=True}) the input and cache fields are cumulative too, so they
    can only raise a count: a gateway that sends C{0} there cannot erase
    what C{message_start} said.
    """
    output = _count(u.get("output_tokens"))
    if output is not None:
        target.output_tokens = output
    for key, attr in _ANTHROPIC_FIELDS:
        value = _count(u.get(key))
        if value is not None:
            if delta:
                value = max(value, getattr(target, attr))
            setattr(target, attr, value)
    target.seen = True


def usage_from_json(doc: Any, wire_format: str) -> Usage:
    """
    The usage of a complete (non-stream) response body.  C{seen} is true
    only when the body had a C{usage} object; malformed values are ignored.
    """
    anthropic = _check_format(wire_format)
    usage = Usage()
    u = _dict(doc).get("usage")
    if isinstance(u, dict):
        if anthropic:
            _fill_anthropic(usage, u)
        elif wire_format == RESPONSES:
            _fill_responses(usage, u)
        else:
            _fill_openai(usage, u)
    return usage


# ---------------------------------------------------------------------------
# Generated-text length (for estimates when a response has no usage)
# ---------------------------------------------------------------------------

#: Anthropic C{content_block_delta} delta type -> the field holding its text.
_ANTHROPIC_DELTA_TEXT = {
    "text_delta": "text",
    "input_json_delta": "partial_json",
    "thinking_delta": "thinking",
}

#: The Messages stream's event types; another one is relayed unread.
_ANTHROPIC_KINDS = frozenset(
    {
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
        "ping",
        "error",
    }
)
#: Responses events whose C{delta} is generated text.
_RESPONSES_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.custom_tool_call_input.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
    }
)
#: The events a Responses stream ends with (they carry the usage).
_RESPONSES_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})

#: Events whose unparseable data is no generated text.
_ANTHROPIC_NO_CONTENT = frozenset({"message_stop", "ping", "error"})

#: SSE fields besides data and event, with or without a value.
_OTHER_FIELDS = (b"id", b"retry", b"event", b"data")


def _known_field(line: bytes) -> bool:
    """Is C{line} an SSE field (not C{data:}/C{event:} with a value), not junk?"""
    name = line.split(b":", 1)[0]
    return name in _OTHER_FIELDS


def _openai_message_chars(m: Mapping[str, Any]) -> int:
    """Characters of generated text in an OpenAI C{delta} or C{message}."""
    n = 0
    v = m.get("content")
    if type(v) is str:
        n += len(v)
    v = m.get("reasoning_content")
    if type(v) is not str:
        v = m.get("reasoning")  # OpenRouter and vLLM name; never both counted
    if type(v) is str:
        n += len(v)
    v = m.get("refusal")
    if type(v) is str:
        n += len(v)
    calls = m.get("tool_calls")
    if type(calls) is list:
        for call in calls:
            if type(call) is dict:
                v = _dict(call.get("function")).get("arguments")
                if type(v) is str:
                    n += len(v)
    call = m.get("function_call")  # the deprecated single-function form
    if type(call) is dict:
        v = call.get("arguments")
        if type(v) is str:
            n += len(v)
    return n


def output_chars_from_json(doc: Any, wire_format: str) -> int:
    """
    Characters of generated text in a complete response body: the same
    things L{SseTap.output_chars} counts in a stream (text, reasoning,
    tool-call arguments; Anthropic C{tool_use} input as compact JSON).
    """
    anthropic = _check_format(wire_format)
    if not isinstance(doc, dict):
        return 0
    n = 0
    if anthropic:
        blocks = doc.get("content")
        if type(blocks) is list:
            for block in blocks:
                if type(block) is not dict:
                    continue
                kind = block.get("type")
                if kind == "text":
                    v = block.get("text")
                elif kind == "thinking":
                    v = block.get("thinking")
                elif kind in ("tool_use", "server_tool_use"):
                    try:
                        v = json.dumps(block.get("input"), separators=(",", ":"), ensure_ascii=False)
                    except (TypeError, ValueError):
                        v = None
                else:
                    v = None
                if type(v) is str:
                    n += len(v)
        return n
    if wire_format == RESPONSES:
        return _responses_output_chars(doc.get("output"))
    choices = doc.get("choices")
    if type(choices) is list:
        for choice in choices:
            if type(choice) is dict:
                message = choice.get("message")
                if type(message) is dict:
                    n += _openai_message_chars(message)
    return n


#: Responses output items: the fields holding generated text, per content part.
_RESPONSES_PART_TEXT = {"output_text": "text", "refusal": "refusal", "summary_text": "text", "reasoning_text": "text"}


def _responses_output_chars(output: Any) -> int:
    """Generated text in a Response's C{output}: message text, refusals, call arguments, reasoning."""
    n = 0
    if type(output) is not list:
        return 0
    for item in output:
        if type(item) is not dict:
            continue
        v = item.get("arguments")
        if type(v) is str:
            n += len(v)
        for key in ("content", "summary"):
            parts = item.get(key)
            if type(parts) is list:
                for part in parts:
                    if type(part) is dict:
                        field = _RESPONSES_PART_TEXT.get(part.get("type"))  # type: ignore[arg-type]
                        v = part.get(field) if field else None
                        if type(v) is str:
                            n += len(v)
    return n


# ---------------------------------------------------------------------------
# The stream tap
# ---------------------------------------------------------------------------

_LF = 0x0A
_SP = 0x20
_COLON = 0x3A

# What happened to a complete event (and so to a CR-LF's LF split off it).
_FORWARD = 0
_HOLD = 1
_DROP = 2
_BUF = 3  # the LF belongs to the still-partial current event
_TERMINAL = 4

_DELTA_HEAD = len(b"event: content_block_delta\ndata: {")


class SseTap:
    """
    Meters one upstream SSE stream while it is relayed.

    Call L{feed} with each upstream chunk and write what it returns to the
    agent; at the end of the body call L{finish} and write what it returns;
    commit the ledger row; then write L{held} (the terminal event, C{data:
    [DONE]} or C{event: message_stop}, and anything after it).

    A Responses API stream (C{responses}) is read for its text deltas and
    its terminal event (C{response.completed}, C{.incomplete}, C{.failed}:
    the usage, withheld like any terminal event), and the response's id,
    model, time and last C{sequence_number}, so that the proxy can end a
    stream it cuts with events the agent can number (C{response_id},
    C{response_model}, C{created_at}, C{sequence_number}: the next one).

    Bytes are forwarded exactly as received, with two exceptions (OpenAI
    chat only): the C{include_usage} chunk (C{choices: []} plus C{usage}) is
    dropped when C{strip_usage_chunk}, or else re-serialised as one
    C{data: {json}\\n\\n} event with C{usage_chunk_extra(usage)} merged into
    its C{usage} (the callback gets the live L{Usage}; it must not raise;
    a falsy return leaves the event untouched).  A complete event is
    forwarded when its terminating blank line arrives, so only the current
    partial event is ever buffered; once that partial event grows beyond
    C{max_event_bytes} it is forwarded as it arrives and never parsed.

    Attributes: C{usage} (L{Usage}, updated in place), C{usage_final}
    (the provider's final count arrived: OpenAI's usage chunk, Anthropic's
    C{message_delta} usage; until then C{usage} may hold only the input, as
    after C{message_start}), C{output_chars} (generated text seen in
    deltas), C{unmetered_bytes} (bytes forwarded that could not be read as
    text: oversized events, payloads that are not JSON or not a known
    event, lines that are no SSE field; they are billed by size when no
    final usage arrives, see L{estimate_output_tokens}), C{events}
    (complete events with data, oversized ones included), C{saw_terminal},
    C{error_event} (the first mid-stream error the provider sent, as
    parsed), C{buffered_bytes}.
    """

    __slots__ = (
        "usage",
        "usage_final",
        "output_chars",
        "unmetered_bytes",
        "events",
        "saw_terminal",
        "error_event",
        "response_id",
        "answer_id",
        "response_model",
        "created_at",
        "sequence_number",
        "_anthropic",
        "_responses",
        "_strip",
        "_extra",
        "_max",
        "_buf",
        "_line",
        "_search",
        "_name",
        "_data",
        "_skip",
        "_junk",
        "_pending_lf",
        "_held",
        "_finished",
        "_scan",
    )

    def __init__(
        self,
        wire_format: str,
        strip_usage_chunk: bool = False,
        usage_chunk_extra: Callable[[Usage], dict] | None = None,
        max_event_bytes: int = 1 << 20,
    ) -> None:
        self._anthropic = _check_format(wire_format)
        self._responses = wire_format == RESPONSES
        self._strip = bool(strip_usage_chunk) and not self._anthropic and not self._responses
        self._extra = None if self._anthropic or self._responses else usage_chunk_extra
        self._max = max_event_bytes
        self.usage = Usage()
        self.usage_final = False
        self.output_chars = 0
        self.unmetered_bytes = 0
        self.events = 0
        self.saw_terminal = False
        self.error_event: dict | None = None
        # Responses streams: what a failure event the proxy writes must
        # carry (the response's id, model and time; the next sequence number).
        self.response_id: str | None = None
        # The answer's own id (a chat chunk's "id", message_start's message id): the ledger keeps it.
        self.answer_id: str | None = None
        self.response_model: str | None = None
        self.created_at = 0
        self.sequence_number = 0
        # The current partial event, from its first byte (empty while an
        # oversized event is passed through).
        self._buf = bytearray()
        # Offset in _buf where the current (unterminated) line starts.  While
        # passing through, -1 means "the current line already has bytes".
        self._line = 0
        # Offset in _buf from which no line terminator has been looked for.
        self._search = 0
        # Fields of the current event parsed so far.
        self._name: bytes | bytearray | None = None
        self._data: list = []
        self._skip = False
        # Bytes of lines in the current partial event that are no SSE field.
        self._junk = 0
        # A chunk ended on CR: where an LF opening the next chunk belongs.
        self._pending_lf: int | None = None
        self._held: list = []
        self._finished = False
        # Text deltas counted without a parse (sse_scan); Responses events are parsed.
        self._scan = ChunkScanner(ANTHROPIC if self._anthropic else OPENAI)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the current partial event kept back (not yet forwarded)."""
        return len(self._buf)

    def held(self) -> bytes:
        """
        The terminal event and everything after it, withheld by L{feed} and
        L{finish} so the caller can commit the ledger row first.  Cleared.
        """
        if not self._held:
            return b""
        held = b"".join(self._held)
        self._held = []
        return held

    def forward_whole(self, data: bytes, start: int, stop: int) -> bool:
        """
        L{feed}'s usual case, read in place: C{data[start:stop]} is one
        text delta framed as the stream's last one.  True when it is
        (counted, and to be sent the agent unchanged); False when the
        caller must L{feed} it.
        """
        if self._buf or self._pending_lf is not None or self.saw_terminal:
            return False
        chars = self._scan.event_chars_at(data, start, stop)
        if chars is None:
            return False
        self.events += 1
        self.output_chars += chars
        return True

    def feed(self, data: bytes) -> bytes:
        """Take one upstream chunk; return the bytes to send the agent now."""
        chars = self._scan.event_chars(data)
        if chars is not None and not self._buf and self._pending_lf is None and not self.saw_terminal:
            # The usual chunk: one text delta framed as the last one was.
            self.events += 1
            self.output_chars += chars
            return data
        if (
            not self._buf
            and self._pending_lf is None
            and not self.saw_terminal
            and data[-2:] == b"\n\n"
            and b"\r" not in data
        ):
            # One event in one chunk, its text read against the stream's
            # template (sse_scan): the usual chunk, forwarded as it came.
            if data.find(b"\n") == len(data) - 2 and data[:7] == b"data: {" and not self._anthropic:
                if not self._responses:
                    chars = self._scan.chars(data[6:-2], self.answer_id is None)
                    if chars is not None:
                        self.events += 1
                        self.output_chars += chars
                        return data
            elif data[:_DELTA_HEAD] == b"event: content_block_delta\ndata: {" and self._anthropic:
                if data.find(b"\n", _DELTA_HEAD) == len(data) - 2:
                    chars = self._scan.chars(data[_DELTA_HEAD - 1 : -2])
                    if chars is not None:
                        self.events += 1
                        self.output_chars += chars
                        return data
            whole = self._feed_whole(data)
            if whole is not None:
                return whole
        out: list = []
        pend = self._pending_lf
        if pend is not None and data:
            self._pending_lf = None
            if data[0] == _LF:
                # The LF of a CR-LF split across chunks: it goes wherever the
                # line (or event) it terminates went.
                if pend == _BUF:
                    self._buf.append(_LF)
                    self._line += 1
                    self._search += 1
                elif pend == _FORWARD:
                    out.append(b"\n")
                elif pend == _HOLD:
                    self._held.append(b"\n")
                data = data[1:]
        if not data:
            return b"".join(out)

        holding = self.saw_terminal
        target = self._held if holding else out
        skip = self._skip
        name = self._name
        datas = self._data
        junk = self._junk
        buf: Any = self._buf
        if buf:
            buf += data
            pos = self._search
        else:
            buf = data
            pos = 0
        line = self._line
        n = len(buf)
        has_cr = b"\r" in data
        ev = 0  # start of the current event in buf
        region = 0  # start of the bytes not yet routed to out/held
        last = _FORWARD  # disposition of the last completed event
        blank = False  # whether the last terminated line was blank
        lone_cr_at_end = False

        while True:
            nl = buf.find(b"\n", pos)
            if has_cr:
                cr = buf.find(b"\r", pos, nl if nl >= 0 else n)
                if cr >= 0:
                    eol = cr
                    nxt = cr + 1
                    if nxt < n:
                        if buf[nxt] == _LF:
                            nxt += 1
                    else:
                        lone_cr_at_end = True
                elif nl >= 0:
                    eol = nl
                    nxt = nl + 1
                else:
                    break
            elif nl >= 0:
                eol = nl
                nxt = nl + 1
            else:
                break

            if eol == line:
                # A blank line: the event is complete.
                blank = True
                if skip:
                    # The end of an oversized event: all of it went out
                    # unread (buf holds only this chunk while skipping).
                    skip = False
                    self.unmetered_bytes += nxt
                    self.events += 1
                    last = _HOLD if holding else _FORWARD
                else:
                    disp = self._dispatch(name, datas) if (datas or name is not None) else None
                    name = None
                    datas = []
                    if junk:
                        self.unmetered_bytes += junk
                        junk = 0
                    if disp is None:
                        last = _HOLD if holding else _FORWARD
                    elif disp == _TERMINAL:
                        if not holding:
                            if ev > region:
                                out.append(buf[region:ev])
                            region = ev
                            holding = True
                            self.saw_terminal = True
                            target = self._held
                        last = _HOLD
                    else:
                        if ev > region:
                            target.append(buf[region:ev])
                        if disp != _DROP:
                            target.append(disp)
                        region = nxt
                        last = _DROP
                ev = nxt
            else:
                blank = False
                if not skip:
                    # One field line.  The common ones first, without slicing.
                    if buf.startswith(b"data:", line):
                        v = line + 5
                        if v < eol and buf[v] == _SP:
                            v += 1
                        datas.append(buf[v:eol])
                    elif buf.startswith(b"event:", line):
                        v = line + 6
                        if v < eol and buf[v] == _SP:
                            v += 1
                        name = buf[v:eol] or None
                    elif buf[line] != _COLON:  # not a comment
                        field = buf[line:eol]
                        if field == b"data":
                            datas.append(b"")
                        elif not _known_field(field):
                            # Not SSE: relayed all the same, billed by size.
                            junk += eol - line
                        # id:, retry:, "event" alone: ignored
            line = pos = nxt

        if not skip and n - ev > self._max:
            # The partial event is too big to keep: send it as it comes,
            # counted by size (its junk lines are part of that size).
            skip = True
            name = None
            datas = []
            junk = 0
            self.unmetered_bytes += n - ev
        elif skip:
            # The middle of an oversized event that began before this chunk.
            self.unmetered_bytes += n
        if skip:
            if n > region:
                target.append(buf[region:n])
            self._buf = bytearray()
            self._line = 0 if line >= n else -1
            self._search = 0
        else:
            if ev > region:
                target.append(buf[region:ev])
            if buf is self._buf:
                if ev < n:
                    del buf[:ev]
                else:
                    self._buf = bytearray()
            elif ev < n:
                self._buf = bytearray(memoryview(buf)[ev:])
            self._line = line - ev
            self._search = n - ev
        if lone_cr_at_end:
            if blank:
                self._pending_lf = last
            elif skip:
                self._pending_lf = _HOLD if holding else _FORWARD
            else:
                self._pending_lf = _BUF
        self._skip = skip
        self._name = name
        self._data = datas
        self._junk = junk
        return b"".join(out)

    def _feed_whole(self, data: bytes) -> bytes | None:
        """
        The common chunk, read without the byte scanner: nothing is pending
        and C{data} is whole events, each one C{data:} line, or an
        C{event:} line and one C{data:} line, ending in LF.  Returns what
        L{feed} would, or None (having changed nothing) for any other shape.
        """
        parsed = []
        for piece in data.split(b"\n\n")[:-1]:
            if piece[:5] == b"data:":
                if b"\n" in piece:
                    return None
                name = None
                payload = piece[6:] if piece[5:6] == b" " else piece[5:]
            elif piece[:6] == b"event:":
                head, _, rest = piece.partition(b"\n")
                if rest[:5] != b"data:" or b"\n" in rest:
                    return None
                name = (head[7:] if head[6:7] == b" " else head[6:]) or None
                payload = rest[6:] if rest[5:6] == b" " else rest[5:]
            else:
                return None
            parsed.append((name, payload, len(piece) + 2))
        out: list | None = None  # a list once an event is not forwarded as it came
        holding = False
        pos = region = 0
        for name, payload, size in parsed:
            disp = self._dispatch(name, [payload])
            end = pos + size
            if disp is not None:
                if out is None:
                    out = []
                if disp == _TERMINAL:
                    if not holding:
                        if pos > region:
                            out.append(data[region:pos])
                        region = pos
                        holding = True
                        self.saw_terminal = True
                else:
                    target = self._held if holding else out
                    if pos > region:
                        target.append(data[region:pos])
                    if disp != _DROP:
                        target.append(disp)
                    region = end
            pos = end
        if out is None:
            return data
        if region < pos:
            (self._held if holding else out).append(data[region:pos])
        return b"".join(out)

    def finish(self) -> bytes:
        """
        The upstream body ended: return the unterminated tail, if any, to be
        forwarded as it is.  Usage in that tail is still metered; a terminal
        event there is withheld like any other (see L{held}).
        """
        if self._finished:
            return b""
        self._finished = True
        self._pending_lf = None
        buf = self._buf
        self._buf = bytearray()
        skip = self._skip
        self._skip = False
        if skip or not buf:
            return b""
        name, datas = self._name, self._data
        self._name, self._data = None, []
        junk, self._junk = self._junk, 0
        line = self._line
        if line < len(buf):
            if buf.startswith(b"data:", line):
                v = line + 5
                if v < len(buf) and buf[v] == _SP:
                    v += 1
                datas.append(buf[v:])
            elif buf.startswith(b"event:", line):
                v = line + 6
                if v < len(buf) and buf[v] == _SP:
                    v += 1
                name = buf[v:] or None
            elif buf[line] != _COLON and not _known_field(bytes(buf[line:])):
                junk += len(buf) - line
        raw = bytes(buf)
        self.unmetered_bytes += junk
        # Metered, but never rewritten: the tail goes out as it came.
        disp = self._dispatch(name, datas, rewrite=False) if (datas or name is not None) else None
        if disp == _TERMINAL:
            self.saw_terminal = True
        if self.saw_terminal:
            self._held.append(raw)
            return b""
        return raw

    def _dispatch(self, name: Any, datas: list, rewrite: bool = True) -> Any:
        """
        Meter one complete event.  Returns None (forward it unchanged),
        C{_TERMINAL}, C{_DROP}, or the bytes that replace it.
        """
        if not datas:
            if self._anthropic and name == b"message_stop":
                return _TERMINAL
            return None
        self.events += 1
        payload = datas[0] if len(datas) == 1 else b"\n".join(datas)
        if self._anthropic:
            return self._anthropic_event(name, payload)
        if self._responses:
            return self._responses_event(name, payload)
        return self._openai_event(name, payload, rewrite)

    def _responses_event(self, name: Any, payload: Any) -> Any:
        """
        One Responses event: text deltas counted, the response's id noted,
        the usage read from its end (C{response.completed}, C{.incomplete},
        C{.failed}), which is the terminal event.
        """
        if payload.strip() == b"[DONE]":
            return _TERMINAL
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            doc = None
        if type(doc) is not dict:
            self.unmetered_bytes += len(payload)
            return None
        kind = doc.get("type")
        if kind is None and name is not None:
            kind = bytes(name).decode("utf-8", "replace")
        number = doc.get("sequence_number")
        if type(number) is int and number >= self.sequence_number:
            self.sequence_number = number + 1
        delta = doc.get("delta")
        if type(delta) is str:
            if kind in _RESPONSES_TEXT_DELTAS:
                self.output_chars += len(delta)
            return None
        if kind == "error":
            if self.error_event is None:
                self.error_event = doc
            return None
        response = doc.get("response")
        if type(response) is not dict:
            return None
        if self.response_id is None and type(response.get("id")) is str:
            self.response_id = response["id"]
            self.response_model = response.get("model") if type(response.get("model")) is str else None
            created: Any = response.get("created_at")
            self.created_at = int(created) if type(created) in (int, float) and math.isfinite(created) else 0
        if kind in _RESPONSES_TERMINAL:
            usage = response.get("usage")
            if type(usage) is dict:
                _fill_responses(self.usage, usage)
                self.usage_final = True
            if kind == "response.failed" and self.error_event is None:
                self.error_event = doc
            return _TERMINAL
        return None

    def _openai_event(self, name: Any, payload: Any, rewrite: bool) -> Any:
        if payload[:1] != b"{":
            if payload.strip() == b"[DONE]":
                return _TERMINAL
        elif name is None:
            # A text delta and nothing else is counted without a parse (sse_scan).
            chars = self._scan.chars(bytes(payload), self.answer_id is None)
            if chars is not None:
                self.output_chars += chars
                return None
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            self.unmetered_bytes += len(payload)
            return None
        if type(doc) is not dict:
            self.unmetered_bytes += len(payload)
            return None
        if self.answer_id is None and type(doc.get("id")) is str:
            self.answer_id = doc["id"]
            # The model that answers (OpenRouter names the one of a fallback list it used).
            self.response_model = doc.get("model") if type(doc.get("model")) is str else None
        choices = doc.get("choices")
        if type(choices) is list:
            for choice in choices:
                if type(choice) is dict:
                    delta = choice.get("delta")
                    if type(delta) is dict:
                        self.output_chars += _openai_message_chars(delta)
        if self.error_event is None and (doc.get("error") or name == b"error"):
            self.error_event = doc
        usage = doc.get("usage")
        if type(usage) is not dict:
            if type(choices) is not list and not doc.get("error"):
                # A JSON object that is no chunk: relayed unread.
                self.unmetered_bytes += len(payload)
            return None
        _fill_openai(self.usage, usage)
        self.usage_final = True
        if choices != [] or not rewrite:
            return None
        if self._strip:
            return _DROP
        if self._extra is not None:
            extra = self._extra(self.usage)
            if extra:
                usage.update(extra)
                try:
                    body = json.dumps(doc, separators=(",", ":"), allow_nan=False)
                except ValueError:
                    return None
                return b"data: " + body.encode("utf-8") + b"\n\n"
        return None

    def _anthropic_event(self, name: Any, payload: Any) -> Any:
        if name == b"content_block_delta":
            # A text delta is counted without a parse (sse_scan).
            chars = self._scan.chars(bytes(payload))
            if chars is not None:
                self.output_chars += chars
                return None
        try:
            doc = json.loads(payload)
        except (ValueError, RecursionError):
            doc = None
        if type(doc) is not dict:
            doc = None
        if name is not None:
            kind: Any = bytes(name).decode("utf-8", "replace")
        else:
            kind = doc.get("type") if doc is not None else None
        if doc is None:
            if kind not in _ANTHROPIC_NO_CONTENT:
                self.unmetered_bytes += len(payload)
        elif kind not in _ANTHROPIC_KINDS:
            self.unmetered_bytes += len(payload)
        if kind == "content_block_delta":
            if doc is not None:
                delta = doc.get("delta")
                if type(delta) is dict:
                    key = _ANTHROPIC_DELTA_TEXT.get(delta.get("type"))  # type: ignore[arg-type]
                    if key is not None:
                        text = delta.get(key)
                        if type(text) is str:
                            self.output_chars += len(text)
        elif kind == "message_start":
            if doc is not None:
                message = _dict(doc.get("message"))
                if self.answer_id is None and type(message.get("id")) is str:
                    self.answer_id = message["id"]
                u = message.get("usage")
                if type(u) is dict:
                    _fill_anthropic(self.usage, u)
        elif kind == "message_delta":
            if doc is not None:
                u = doc.get("usage")
                if type(u) is dict:
                    _fill_anthropic(self.usage, u, delta=True)
                    self.usage_final = True
        elif kind == "message_stop":
            return _TERMINAL
        elif kind == "error":
            if self.error_event is None:
                if doc is None:
                    text = bytes(payload[:1000]).decode("utf-8", "replace")
                    doc = {"type": "error", "error": {"type": "unparsed", "message": text}}
                self.error_event = doc
        return None


# ---------------------------------------------------------------------------
# Estimates
# ---------------------------------------------------------------------------

#: Tokens counted for each image (and other binary attachment) in a prompt.
IMAGE_TOKENS = 1000

#: Tokens counted per message for role and framing.
_MESSAGE_OVERHEAD = 4

#: Content blocks counted as a fixed IMAGE_TOKENS, never by their (base64) text.
_ATTACHMENT_TYPES = frozenset(
    {"image", "image_url", "input_image", "document", "file", "input_file", "input_audio", "audio"}
)
#: Blocks whose payload is opaque (encrypted), not prompt text.
_OPAQUE_TYPES = frozenset({"redacted_thinking"})
#: Keys whose values are identifiers or markup, not text the model reads.
_SKIP_KEYS = frozenset(
    {"type", "id", "tool_use_id", "tool_call_id", "call_id", "signature", "encrypted_content", "cache_control", "role", "status"}
)
#: Keys whose values are JSON the model reads keys and all (tool inputs, schemas).
_JSON_KEYS = frozenset({"input", "parameters", "input_schema"})


def estimate_tokens(text_chars: int) -> int:
    """A rough token count for C{text_chars} characters: one token per four."""
    if text_chars <= 0:
        return 0
    return (text_chars + 3) // 4


#: Relayed bytes that could not be read as text (an oversized event, a
#: payload that is not JSON) are billed one token per this many bytes: the
#: ratio of text, applied to bytes that include the SSE and JSON framing
#: around the text, so the estimate errs high, never low.
RAW_BYTES_PER_TOKEN = 4


def estimate_output_tokens(text_chars: int, unmetered_bytes: int = 0) -> int:
    """
    Output tokens of an answer whose provider did not report them: the
    text read from its deltas at four characters a token, plus what was
    relayed unread at L{RAW_BYTES_PER_TOKEN} bytes a token.  Never 0 when
    anything was delivered.
    """
    raw = 0 if unmetered_bytes <= 0 else -(-unmetered_bytes // RAW_BYTES_PER_TOKEN)
    return estimate_tokens(text_chars) + raw


def _walk(root: Any, keys: bool) -> tuple[int, int]:
    """
    Characters of text and number of attachments under C{root}, walked with
    an explicit stack (a deep document cannot exhaust the recursion limit).
    With C{keys}, object keys count as text too (tool schemas, tool inputs).
    """
    chars = 0
    attachments = 0
    stack = [(root, keys)]
    pop = stack.pop
    push = stack.append
    while stack:
        obj, k = pop()
        t = type(obj)
        if t is str:
            chars += len(obj)
        elif t is list:
            for item in obj:
                push((item, k))
        elif t is dict:
            kind = obj.get("type")
            if not k:
                if kind in _ATTACHMENT_TYPES:
                    attachments += 1
                    continue
                if kind in _OPAQUE_TYPES:
                    continue
            for key, value in obj.items():
                if k:
                    chars += len(key)
                elif key in _SKIP_KEYS:
                    continue
                push((value, True if key in _JSON_KEYS else k))
        # numbers, bools and null: negligible
    return chars, attachments


#: Message values that hold no text of their own (counted as nothing by L{_walk}).
_SCALARS = (int, float, bool, type(None))


def text_messages_chars(messages: list) -> int | None:
    """
    The characters L{_walk} counts in C{messages} when every message is an
    object whose values are strings or scalars (the usual chat body: role
    and content), without its stack; None when any message holds more (a
    list of blocks, tool calls), is an attachment, or is not an object.
    Governance reads a body's shape and its estimate in one pass with it.
    """
    chars = 0
    skip = _SKIP_KEYS
    for message in messages:
        if type(message) is not dict:
            return None
        kind = message.get("type")
        if kind is not None and (type(kind) is not str or kind in _ATTACHMENT_TYPES or kind in _OPAQUE_TYPES):
            return None
        for key, value in message.items():
            if type(value) is str:
                if key not in skip:
                    chars += len(value)
            elif not isinstance(value, _SCALARS):
                return None
    return chars


def estimate_prompt_tokens(doc: Any, wire_format: str, message_chars: int | None = None) -> int:
    """
    A rough prompt size for a request body, for rows whose response carried
    no usage: the text of C{messages} (string contents and content blocks,
    tool calls and tool results; a Responses request's C{input} items and
    C{instructions}), C{system}, and C{tools} (names,
    descriptions and schemas) at four characters a token, plus a small
    per-message overhead.  Each image, and each other binary attachment
    (document, file, audio), counts a fixed L{IMAGE_TOKENS} (1,000) tokens;
    its base64 data is never counted as text.  The body is walked once,
    nothing is serialised.  C{message_chars}: L{text_messages_chars} of
    the body's messages, when the caller has it (they are not walked again).
    """
    _check_format(wire_format)
    if not isinstance(doc, dict):
        return 0
    chars = 0
    attachments = 0
    overhead = 0
    # The Responses API's conversation is its input items and instructions.
    messages = doc.get("input" if wire_format == RESPONSES else "messages")
    if type(messages) is str:
        messages = [messages]
    instructions = doc.get("instructions") if wire_format == RESPONSES else None
    if type(instructions) is str:
        chars += len(instructions)
    if type(messages) is list:
        overhead += _MESSAGE_OVERHEAD * len(messages)
        if message_chars is None:
            message_chars = text_messages_chars(messages)
        if message_chars is not None:
            chars += message_chars
        else:
            c, a = _walk(messages, False)
            chars += c
            attachments += a
    system = doc.get("system")
    if system is not None:
        c, a = _walk(system, False)
        chars += c
        attachments += a
    for key in ("tools", "functions"):
        tools = doc.get(key)
        if tools is not None:
            c, _ = _walk(tools, True)
            chars += c
    return estimate_tokens(chars) + attachments * IMAGE_TOKENS + overhead
