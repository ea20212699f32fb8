"""
Streaming translation between OpenAI C{chat.completion.chunk} SSE and
Anthropic Messages SSE events.

Each translator takes the upstream body incrementally (L{feed} with each
chunk as it arrives, events may be split anywhere, even inside a UTF-8
character or a CR-LF) and returns the SSE bytes to send the agent; L{finish}
at the end of the upstream body flushes.  Memory is bounded: only the
current partial event is buffered (at most C{max_event_bytes}; a larger
event ends the translation with an error event), never the stream.

Pure logic: no I/O, no clock (the caller passes C{created}).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from cllama_tx.surfaces.translate_common import (
    anthropic_tool_id,
    anthropic_usage_to_openai,
    chat_id_from_message_id,
    count,
    dumps,
    finish_reason_from_stop_reason,
    mapping,
    message_id_from_chat_id,
    openai_usage_parts,
    stop_reason_from_finish_reason,
)
from cllama_tx.surfaces.translate_response import (
    anthropic_error_doc_to_openai,
    openai_error_doc_to_anthropic,
    reasoning_text,
)

__all__ = ["AnthropicToChatStream", "ChatToAnthropicStream", "SseReader"]

DEFAULT_MAX_EVENT_BYTES = 1 << 20

_BOM = b"\xef\xbb\xbf"

# Stands for the dropped rest of a line of an oversized event, so that the
# line's terminator is not taken for the blank line that ends the event.
_PLACEHOLDER = b":"

_TOO_LARGE = "upstream event too large to translate"

# One Anthropic text delta as Anthropic writes it, read without a parse by
# AnthropicToChatStream's fast path: this head, the block's index, this
# middle, the text (a JSON string's body), this tail.
_TEXT_DELTA_HEAD = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
_TEXT_DELTA_MIDDLE = b',"delta":{"type":"text_delta","text":"'
_TEXT_DELTA_TAIL = b'"}}\n\n'
# What a text needs escaped (or is not valid JSON with): then it is parsed.
_NOT_PLAIN = re.compile(rb'[\x00-\x1f"\\]')


class SseReader:
    """
    Splits an SSE byte stream into C{(event name or None, data)} pairs as
    they complete.  Lines end in LF, CR-LF or CR; C{data:} with or without
    the space; comments, C{id} and C{retry} ignored; multi-line data joined
    with LF (the SSE specification).  Keeps only the current partial event;
    one larger than C{max_event_bytes} is skipped and L{overflowed} set.
    """

    __slots__ = ("_line", "_name", "_data", "_size", "_skip_lf", "_skipping", "_first", "_max", "overflowed")

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._max = max_event_bytes
        self._line = bytearray()  # the current unterminated line
        self._name: str | None = None
        self._data: list[str] = []
        self._size = 0  # bytes of the current event's data lines so far
        self._skip_lf = False  # the last chunk ended on CR: an LF opening the next is its pair
        self._skipping = False  # inside an oversized event: drop it to its end
        self._first = True  # a BOM may open the stream
        self.overflowed = False

    @property
    def buffered_bytes(self) -> int:
        """Bytes held for the current partial event."""
        return len(self._line) + self._size

    @property
    def idle(self) -> bool:
        """Between events: nothing held, nothing skipped, the stream's start (a BOM) behind."""
        return not (self._line or self._data or self._name is not None or self._skip_lf or self._skipping or self._first)

    def feed(self, data: bytes) -> list[tuple[str | None, str]]:
        events: list[tuple[str | None, str]] = []
        if not data:
            return events
        data = bytes(data)
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
                if not data:
                    return events
        if b"\n" not in data and b"\r" not in data:
            if not self._skipping:
                self._line += data
                self._check()
            else:
                self._line = bytearray(_PLACEHOLDER)
            return events
        if self._line:
            buf = bytes(self._line) + data
            self._line = bytearray()
        else:
            buf = data
        lines = buf.splitlines(keepends=True)
        tail = b""
        last = lines[-1]
        if last.endswith(b"\r"):
            self._skip_lf = True
        elif not last.endswith(b"\n"):
            tail = lines.pop()
        for raw in lines:
            self._process(raw.rstrip(b"\r\n"), events)
        if tail:
            if self._skipping:
                self._line = bytearray(_PLACEHOLDER)
            else:
                self._line += tail
                self._check()
        return events

    def finish(self) -> list[tuple[str | None, str]]:
        """The end of the body: a last unterminated line and event still count."""
        events: list[tuple[str | None, str]] = []
        if self._line:
            line = bytes(self._line)
            self._line = bytearray()
            self._process(line, events)
        self._process(b"", events)
        return events

    def _check(self) -> None:
        if not self._skipping and len(self._line) + self._size > self._max:
            self.overflowed = True
            self._skipping = True
            self._line = bytearray(_PLACEHOLDER if self._line else b"")
            self._data = []
            self._size = 0
            self._name = None

    def _process(self, line: bytes, events: list) -> None:
        if self._first:
            self._first = False
            if line.startswith(_BOM):
                line = line[len(_BOM) :]
        if not line:
            if self._skipping:
                self._skipping = False
            elif self._data:
                events.append((self._name, "\n".join(self._data)))
            self._name = None
            self._data = []
            self._size = 0
            return
        if self._skipping or line[:1] == b":":
            return
        field, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._data.append(value.decode("utf-8", "replace"))
            self._size += len(value) + 1
            self._check()
        elif field == b"event":
            self._name = value.decode("utf-8", "replace")


def _loads(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def _sse_data(doc: Any) -> bytes:
    return b"data: " + dumps(doc).encode("utf-8") + b"\n\n"


def _sse_event(name: str, doc: Any) -> bytes:
    return b"event: " + name.encode("ascii") + b"\ndata: " + dumps(doc).encode("utf-8") + b"\n\n"


# ---------------------------------------------------------------------------
# Anthropic upstream -> OpenAI chunks for the agent
# ---------------------------------------------------------------------------


class _StreamTranslator:
    """
    What both stream translators share: an L{SseReader} over the upstream
    body (C{self._reader}), a C{_translate(events)} of their own, and
    silence after an error (C{self._dead}).
    """

    _reader: SseReader
    _dead: bool

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the current partial upstream event held back."""
        return self._reader.buffered_bytes

    def feed(self, data: bytes) -> bytes:
        """One upstream chunk in; the SSE bytes to send the agent now."""
        if self._dead:
            return b""
        return self._translate(self._reader.feed(data))

    def _translate(self, events) -> bytes:
        raise NotImplementedError


class AnthropicToChatStream(_StreamTranslator):
    """
    Upstream Anthropic Messages SSE in, OpenAI C{chat.completion.chunk} SSE
    out.

    C{message_start} becomes the role chunk, text deltas content deltas,
    each C{tool_use} block a C{tool_calls} entry (indexes from 0) whose
    C{input_json_delta} fragments become C{arguments} fragments, the stop
    reason the final chunk's C{finish_reason}; with C{include_usage} a last
    C{choices: []} chunk carries the usage (and every other chunk
    C{"usage": null}).  C{data: [DONE]} is written by L{finish} once
    C{message_stop} was seen.  Thinking, redacted thinking, citations and
    server-tool blocks are dropped; C{ping} is ignored.

    C{usage_extra}, when given, is called (no arguments, must not raise) as
    the usage chunk is built and what it returns is merged into that chunk's
    C{usage} (the proxy adds the OpenRouter-style C{cost} there).

    C{error_event} is the OpenAI error object sent to the agent when the
    upstream sent C{event: error} (C{upstream_error_event} is what it sent);
    nothing is translated after it.  C{complete} says C{message_stop} came.
    """

    def __init__(
        self,
        include_usage: bool,
        created: int,
        model: str | None = None,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        usage_extra: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self.include_usage = include_usage
        self._usage_extra = usage_extra
        self.created = created
        self.model = model
        self.id = chat_id_from_message_id(None)
        self.error_event: dict | None = None
        self.upstream_error_event: dict | None = None
        self.complete = False
        self._reader = SseReader(max_event_bytes)
        self._model_name = model if model is not None else ""
        self._tools: dict[Any, int] = {}  # Anthropic block index (as sent) -> OpenAI tool index
        self._finished = False  # finish_reason chunk written
        self._dead = False  # after an error: translate nothing more
        self._input = self._cache_read = self._cache_creation = self._output = 0
        # The bytes of a content chunk around its text, for the current id and model.
        self._text_frame: tuple[bytes, bytes] | None = None

    def feed(self, data: bytes) -> bytes:
        """One upstream chunk in; the SSE bytes to send the agent now."""
        if data[: len(_TEXT_DELTA_HEAD)] == _TEXT_DELTA_HEAD and not self._dead and self._reader.idle:
            fast = self._text_delta(data)
            if fast is not None:
                return fast
        return super().feed(data)

    def _text_delta(self, data: bytes) -> bytes | None:
        """
        A chunk that is exactly one plain text delta, its text without
        escapes: the content chunk is the text between the frame's bytes,
        as C{_block_delta} would write it (C{dumps} leaves such a text as it
        is); None for anything else (then parsed as usual).
        """
        middle = data.find(_TEXT_DELTA_MIDDLE, len(_TEXT_DELTA_HEAD))
        if middle < 0 or not data[len(_TEXT_DELTA_HEAD) : middle].isdigit() or not data.endswith(_TEXT_DELTA_TAIL):
            return None
        text = data[middle + len(_TEXT_DELTA_MIDDLE) : len(data) - len(_TEXT_DELTA_TAIL)]
        if _NOT_PLAIN.search(text) is not None:
            return None
        if not text:
            return b""
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            return None
        frame = self._text_frame
        if frame is None:
            chunk = self._chunk({"content": ""})
            at = chunk.index(b'"delta":{"content":""') + len(b'"delta":{"content":"')
            frame = self._text_frame = (chunk[:at], chunk[at:])
        return frame[0] + text + frame[1]

    def finish(self) -> bytes:
        """End of the upstream body: flush, then C{data: [DONE]} if the message completed."""
        if self._dead:
            return b""
        out = self._translate(self._reader.finish())
        if self.complete and not self._dead:
            out += b"data: [DONE]\n\n"
        return out

    # -- internals ---------------------------------------------------------

    def _translate(self, events: list) -> bytes:
        out: list[bytes] = []
        for name, data in events:
            if self._dead:
                break
            doc = _loads(data)
            if not isinstance(doc, dict):
                continue
            kind = doc.get("type", name)
            handler = self._handlers.get(kind)
            if handler is not None:
                handler(self, doc, out)
        if self._reader.overflowed and not self._dead:
            self._fail(
                {"type": "error", "error": {"type": "api_error", "message": _TOO_LARGE}},
                out,
            )
        return b"".join(out)

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self._model_name,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return _sse_data(chunk)

    def _set_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        if usage.get("input_tokens") is not None:
            self._input = count(usage.get("input_tokens"))
        if usage.get("cache_read_input_tokens") is not None:
            self._cache_read = count(usage.get("cache_read_input_tokens"))
        if usage.get("cache_creation_input_tokens") is not None:
            self._cache_creation = count(usage.get("cache_creation_input_tokens"))
        if usage.get("output_tokens") is not None:
            self._output = count(usage.get("output_tokens"))

    def _message_start(self, doc: dict, out: list) -> None:
        message = mapping(doc.get("message"))
        self._text_frame = None  # the id and the model change
        self.id = chat_id_from_message_id(message.get("id"))
        if self.model is None and isinstance(message.get("model"), str):
            self._model_name = message["model"]
        self._set_usage(message.get("usage"))
        out.append(self._chunk({"role": "assistant", "content": ""}))

    def _block_start(self, doc: dict, out: list) -> None:
        block = doc.get("content_block")
        if not isinstance(block, dict):
            return
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if isinstance(text, str) and text:
                out.append(self._chunk({"content": text}))
        elif kind == "tool_use":
            n = len(self._tools)
            self._tools[doc.get("index")] = n
            out.append(
                self._chunk(
                    {
                        "tool_calls": [
                            {
                                "index": n,
                                "id": block.get("id"),
                                "type": "function",
                                "function": {"name": block.get("name"), "arguments": ""},
                            }
                        ]
                    }
                )
            )
            initial = block.get("input")
            if isinstance(initial, dict) and initial:
                fragment = {"index": n, "function": {"arguments": dumps(initial)}}
                out.append(self._chunk({"tool_calls": [fragment]}))

    def _block_delta(self, doc: dict, out: list) -> None:
        delta = doc.get("delta")
        if not isinstance(delta, dict):
            return
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            if isinstance(text, str) and text:
                out.append(self._chunk({"content": text}))
        elif kind == "input_json_delta":
            n = self._tools.get(doc.get("index"))
            fragment = delta.get("partial_json")
            if n is not None and isinstance(fragment, str) and fragment:
                out.append(self._chunk({"tool_calls": [{"index": n, "function": {"arguments": fragment}}]}))
        # thinking_delta, signature_delta, citations_delta: dropped

    def _message_delta(self, doc: dict, out: list) -> None:
        self._set_usage(doc.get("usage"))
        delta = mapping(doc.get("delta"))
        stop_reason = delta.get("stop_reason")
        if stop_reason is not None and not self._finished:
            self._finished = True
            out.append(self._chunk({}, finish_reason_from_stop_reason(stop_reason)))

    def _message_stop(self, doc: dict, out: list) -> None:
        if self.complete:
            return
        self.complete = True
        if not self._finished:
            self._finished = True
            out.append(self._chunk({}, "stop"))
        if self.include_usage:
            usage = anthropic_usage_to_openai(
                self._input, self._output, self._cache_read, self._cache_creation
            )
            if self._usage_extra is not None:
                usage.update(self._usage_extra() or {})
            out.append(
                _sse_data(
                    {
                        "id": self.id,
                        "object": "chat.completion.chunk",
                        "created": self.created,
                        "model": self._model_name,
                        "choices": [],
                        "usage": usage,
                    }
                )
            )

    def _error(self, doc: dict, out: list) -> None:
        self._fail(doc, out)

    def _fail(self, upstream: dict, out: list) -> None:
        self.upstream_error_event = upstream
        self.error_event = anthropic_error_doc_to_openai(None, upstream)
        self._dead = True
        out.append(_sse_data(self.error_event))

    _handlers = {
        "message_start": _message_start,
        "content_block_start": _block_start,
        "content_block_delta": _block_delta,
        "message_delta": _message_delta,
        "message_stop": _message_stop,
        "error": _error,
    }


# ---------------------------------------------------------------------------
# OpenAI upstream -> Anthropic events for the agent
# ---------------------------------------------------------------------------


class ChatToAnthropicStream(_StreamTranslator):
    """
    Upstream OpenAI C{chat.completion.chunk} SSE in, Anthropic Messages SSE
    out.

    The first chunk opens with C{message_start} (usage 0: OpenAI reports
    usage only at the end); content deltas open a text block once and become
    C{text_delta}s; each new tool call closes the open block and starts a
    C{tool_use} block whose C{arguments} fragments become
    C{input_json_delta}s; the C{finish_reason} closes the open block.  The
    C{message_delta} (stop reason and the real, cumulative usage: output,
    input, cache reads and writes) and C{message_stop} are held until the
    usage chunk (C{choices: []}) or C{data: [DONE]} arrives, or the body
    ends.  Only choice 0 is translated (the Anthropic surface cannot ask for
    more).  The reasoning deltas some servers add (C{reasoning_content},
    C{reasoning}) become a C{thinking} block with C{thinking}, else they are
    dropped.

    With C{wait_for_done}, C{message_delta} and C{message_stop} wait for
    C{data: [DONE]} (or the end of the body) even after the usage chunk: a
    relay that withholds the upstream's terminal C{[DONE]} until it has
    committed the ledger row then also withholds the agent's
    C{message_stop}.

    C{error_event} is the Anthropic error object sent to the agent as
    C{event: error} when the upstream sent C{data: {"error": ...}}
    (C{upstream_error_event} is what it sent); nothing is translated after
    it.  C{complete} says C{message_stop} was written.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        wait_for_done: bool = False,
        thinking: bool = False,
    ) -> None:
        self.model = model
        self._wait_for_done = wait_for_done
        self._thinking = thinking
        self.id = message_id_from_chat_id(None)
        self.error_event: dict | None = None
        self.upstream_error_event: dict | None = None
        self.complete = False
        self._reader = SseReader(max_event_bytes)
        self._started = False
        self._block: int | None = None  # index of the open block
        self._block_is_text = False
        self._block_is_thinking = False
        self._next_block = 0
        self._tools: dict[Any, int] = {}  # OpenAI tool index -> Anthropic block index
        self._stop_reason: str | None = None
        self._refusal = False
        self._usage: dict | None = None
        self._dead = False

    def finish(self) -> bytes:
        """End of the upstream body: flush; close the message if it finished."""
        if self._dead:
            return b""
        out_bytes = self._translate(self._reader.finish())
        out: list[bytes] = [out_bytes]
        if not self._dead and not self.complete and self._stop_reason is not None:
            self._final(out)
        return b"".join(out)

    # -- internals ---------------------------------------------------------

    def _translate(self, events: list) -> bytes:
        out: list[bytes] = []
        for _name, data in events:
            if self._dead or self.complete:
                break
            if data.strip() == "[DONE]":
                self._done(out)
                continue
            doc = _loads(data)
            if isinstance(doc, dict):
                self._on_chunk(doc, out)
        if self._reader.overflowed and not self._dead:
            self._fail({"error": {"message": _TOO_LARGE, "type": "server_error"}}, out)
        return b"".join(out)

    def _start(self, doc: dict, out: list) -> None:
        self._started = True
        self.id = message_id_from_chat_id(doc.get("id"))
        model = self.model if self.model is not None else doc.get("model")
        out.append(
            _sse_event(
                "message_start",
                {
                    "type": "message_start",
                    "message": {
                        "id": self.id,
                        "type": "message",
                        "role": "assistant",
                        "model": model if isinstance(model, str) else "",
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {
                            "input_tokens": 0,
                            "output_tokens": 0,
                            "cache_creation_input_tokens": 0,
                            "cache_read_input_tokens": 0,
                        },
                    },
                },
            )
        )

    def _on_chunk(self, doc: dict, out: list) -> None:
        choices = doc.get("choices")
        if doc.get("error") is not None and not choices:
            self._fail(doc, out)
            return
        if not self._started:
            self._start(doc, out)
        usage = doc.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        if not isinstance(choices, list) or not choices:
            if isinstance(usage, dict) and self._stop_reason is not None and not self._wait_for_done:
                self._final(out)  # the include_usage chunk: the message is complete
            return
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._on_delta(delta, out)
            finish_reason = choice.get("finish_reason")
            if finish_reason is not None and self._stop_reason is None:
                self._stop_reason = stop_reason_from_finish_reason(finish_reason)
                self._close(out)

    def _on_delta(self, delta: dict, out: list) -> None:
        if self._thinking:
            reasoning = reasoning_text(delta)
            if reasoning:
                self._reason(reasoning, out)
        content = delta.get("content")
        if isinstance(content, str) and content:
            self._text(content, out)
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            self._refusal = True
            self._text(refusal, out)
        tool_calls = delta.get("tool_calls")
        if isinstance(tool_calls, list):
            for call in tool_calls:
                if isinstance(call, dict):
                    self._tool(call, out)

    def _open(self, block: dict, out: list) -> int:
        self._close(out)
        index = self._next_block
        self._next_block += 1
        self._block = index
        self._block_is_text = block.get("type") == "text"
        self._block_is_thinking = block.get("type") == "thinking"
        out.append(
            _sse_event(
                "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
            )
        )
        return index

    def _close(self, out: list) -> None:
        if self._block is not None:
            out.append(_sse_event("content_block_stop", {"type": "content_block_stop", "index": self._block}))
            self._block = None
            self._block_is_text = False
            self._block_is_thinking = False

    def _text(self, text: str, out: list) -> None:
        if self._block is None or not self._block_is_text:
            self._open({"type": "text", "text": ""}, out)
        out.append(
            _sse_event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": self._block,
                    "delta": {"type": "text_delta", "text": text},
                },
            )
        )

    def _reason(self, text: str, out: list) -> None:
        if self._block is None or not self._block_is_thinking:
            self._open({"type": "thinking", "thinking": "", "signature": ""}, out)
        out.append(
            _sse_event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": self._block,
                    "delta": {"type": "thinking_delta", "thinking": text},
                },
            )
        )

    def _tool(self, call: dict, out: list) -> None:
        key = call.get("index", 0)
        function = mapping(call.get("function"))
        if key not in self._tools:
            name = function.get("name")
            self._tools[key] = self._open(
                {
                    "type": "tool_use",
                    "id": anthropic_tool_id(call.get("id"), f"toolu_{self.id[4:]}_{key}"),
                    "name": name if isinstance(name, str) else "",
                    "input": {},
                },
                out,
            )
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            out.append(
                _sse_event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": self._tools[key],
                        "delta": {"type": "input_json_delta", "partial_json": arguments},
                    },
                )
            )

    def _done(self, out: list) -> None:
        if not self._started:
            return
        if self._stop_reason is None:
            self._stop_reason = "end_turn"
        self._final(out)

    def _final(self, out: list) -> None:
        self._close(out)
        stop_reason = self._stop_reason or "end_turn"
        if self._refusal and stop_reason == "end_turn":
            stop_reason = "refusal"
        if self._usage is not None:
            plain, output, read, write = openai_usage_parts(self._usage)
            usage = {
                "input_tokens": plain,
                "output_tokens": output,
                "cache_creation_input_tokens": write,
                "cache_read_input_tokens": read,
            }
        else:
            usage = {"output_tokens": 0}
        out.append(
            _sse_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": usage,
                },
            )
        )
        out.append(_sse_event("message_stop", {"type": "message_stop"}))
        self.complete = True

    def _fail(self, upstream: dict, out: list) -> None:
        self.upstream_error_event = upstream
        self.error_event = openai_error_doc_to_anthropic(None, upstream)
        self._dead = True
        out.append(_sse_event("error", self.error_event))
