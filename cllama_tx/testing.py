"""
Verified fakes for tests and the offline demo.

Two halves:

 - pure wire-format builders (L{openai_completion}, L{openai_stream_chunks},
   L{anthropic_message}, L{anthropic_stream_events}, the SSE encoders and the
   error bodies) that state what OpenAI Chat Completions and Anthropic
   Messages really send, so tests can say what they expect;
 - L{FakeProvider}, a real loopback HTTP server (plain C{twisted.web}) that
   speaks both formats, records what it received, answers scripted
   L{Reply}s in order and otherwise asks a responder (by default the demo
   model), and exposes Deferreds that fire on events (request received,
   client gone, producer paused) so tests never sleep to synchronise.

The builders are pinned against the official C{openai} and C{anthropic}
SDKs' typed models in C{tests/test_testing.py}, so the fakes stay honest.
"""

from __future__ import annotations

import json as _json
import socket
import struct
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import attr
from twisted.internet.defer import (
    Deferred,
    fail,
    gatherResults,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from cllama_tx.config import LISTEN_BACKLOG
from cllama_tx.interfaces import IFakeProvider

__all__ = [
    "DEFAULT_CREATED",
    "FakeProvider",
    "ReceivedRequest",
    "Reply",
    "anthropic_error",
    "anthropic_message",
    "anthropic_sse_events",
    "anthropic_stream_events",
    "anthropic_usage",
    "dumps",
    "echo_headers_error",
    "garbage_sse_events",
    "huge_event_sse_events",
    "openai_completion",
    "openai_error",
    "openai_sse_events",
    "openai_stream_chunks",
    "openai_usage",
    "parse_sse",
    "presented_key",
    "sse_encode_anthropic",
    "sse_encode_openai",
    "strict_provider",
]

_log = Logger()

#: The C{created} timestamp builders use unless told otherwise (fixed, so
#: expectations are deterministic).
DEFAULT_CREATED = 1700000000

SSE_CONTENT_TYPE = "text/event-stream; charset=utf-8"
JSON_CONTENT_TYPE = "application/json"


def dumps(obj: Any) -> bytes:
    """
    Serialise like the providers do: compact JSON, UTF-8.
    """
    return _json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _pieces(pieces: Union[str, Sequence[str], None]) -> list[str]:
    if pieces is None:
        return []
    if isinstance(pieces, str):
        return [pieces] if pieces else []
    return list(pieces)


# ---------------------------------------------------------------------------
# OpenAI Chat Completions
# ---------------------------------------------------------------------------


def openai_usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """
    The C{usage} object of a chat completion (or of the final stream chunk).
    """
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _openai_tool_call(tool_call: Mapping[str, Any]) -> dict:
    """
    Accept either the wire shape C{{"id", "type", "function": {...}}} or the
    short C{{"id", "name", "arguments"}} (arguments may be a dict).
    """
    if "function" in tool_call:
        return dict(tool_call)
    arguments = tool_call.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = _json.dumps(arguments)
    return {
        "id": tool_call["id"],
        "type": "function",
        "function": {"name": tool_call["name"], "arguments": arguments},
    }


def openai_completion(
    content: str | None,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    id: str = "chatcmpl-cllamatxfake",
    finish_reason: str = "stop",
    tool_calls: Sequence[Mapping[str, Any]] | None = None,
    created: int = DEFAULT_CREATED,
) -> dict:
    """
    A non-streaming C{chat.completion} object.
    """
    message: dict[str, Any] = {
        "role": "assistant",
        "content": content,
        "refusal": None,
        "annotations": [],
    }
    if tool_calls:
        message["tool_calls"] = [_openai_tool_call(tc) for tc in tool_calls]
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": openai_usage(prompt_tokens, completion_tokens, cached_tokens),
        "service_tier": "default",
        "system_fingerprint": None,
    }


def openai_stream_chunks(
    pieces: Union[str, Sequence[str]],
    model: str,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    cached_tokens: int = 0,
    id: str = "chatcmpl-cllamatxfake",
    finish_reason: str = "stop",
    include_usage: bool = True,
    tool_calls: Sequence[Mapping[str, Any]] | None = None,
    created: int = DEFAULT_CREATED,
) -> list[dict]:
    """
    The C{chat.completion.chunk} objects of a streamed completion, in order:
    a first chunk whose delta carries the role (and empty content), one chunk
    per content piece, tool-call deltas if any, a chunk with an empty delta
    and the C{finish_reason}, and, when C{include_usage}, a last chunk with
    C{choices: []} and the C{usage} (every other chunk then has
    C{"usage": null}, as documented for C{stream_options.include_usage}).
    """

    def chunk(choices: list) -> dict:
        c: dict[str, Any] = {
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": None,
            "choices": choices,
        }
        if include_usage:
            c["usage"] = None
        return c

    def choice(delta: dict, finish: str | None = None) -> list:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    chunks = [chunk(choice({"role": "assistant", "content": "", "refusal": None}))]
    for piece in _pieces(pieces):
        chunks.append(chunk(choice({"content": piece})))
    for index, tc in enumerate(tool_calls or ()):
        full = _openai_tool_call(tc)
        chunks.append(
            chunk(
                choice(
                    {
                        "tool_calls": [
                            {
                                "index": index,
                                "id": full["id"],
                                "type": "function",
                                "function": {"name": full["function"]["name"], "arguments": ""},
                            }
                        ]
                    }
                )
            )
        )
        arguments = full["function"]["arguments"]
        half = len(arguments) // 2
        for part in (arguments[:half], arguments[half:]):
            if part:
                chunks.append(
                    chunk(choice({"tool_calls": [{"index": index, "function": {"arguments": part}}]}))
                )
    chunks.append(chunk(choice({}, finish_reason)))
    if include_usage:
        last = chunk([])
        last["usage"] = openai_usage(prompt_tokens, completion_tokens, cached_tokens)
        chunks.append(last)
    return chunks


def openai_sse_events(chunks: Iterable[Mapping[str, Any]], done: bool = True) -> list[bytes]:
    """
    One SSE event (C{data: {...}\\n\\n}) per chunk, then C{data: [DONE]}:
    suitable for L{Reply.sse}, which writes them one by one.
    """
    events = [b"data: " + dumps(c) + b"\n\n" for c in chunks]
    if done:
        events.append(b"data: [DONE]\n\n")
    return events


def sse_encode_openai(chunks: Iterable[Mapping[str, Any]], done: bool = True) -> bytes:
    """
    The whole SSE body of a streamed chat completion.
    """
    return b"".join(openai_sse_events(chunks, done))


def openai_error(
    message: str,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> dict:
    """
    OpenAI's error body: C{{"error": {"message", "type", "param", "code"}}}.
    """
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ---------------------------------------------------------------------------
# Anthropic Messages
# ---------------------------------------------------------------------------


def anthropic_usage(
    input_tokens: int,
    output_tokens: int,
    cache_read_input_tokens: int = 0,
    cache_creation_input_tokens: int = 0,
) -> dict:
    """
    The C{usage} object of a Message.
    """
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": cache_creation_input_tokens,
        "cache_read_input_tokens": cache_read_input_tokens,
    }


def _anthropic_blocks(
    content: Union[str, Sequence[Mapping[str, Any]], None],
    tool_uses: Sequence[Mapping[str, Any]] | None,
) -> list[dict]:
    if content is None:
        blocks: list[dict] = []
    elif isinstance(content, str):
        blocks = [{"type": "text", "text": content}]
    else:
        blocks = [dict(b) for b in content]
    for tu in tool_uses or ():
        blocks.append(
            {"type": "tool_use", "id": tu["id"], "name": tu["name"], "input": dict(tu.get("input", {}))}
        )
    return blocks


def _stop_reason(stop_reason: str | None, tool_uses: Sequence[Any] | None) -> str:
    if stop_reason is not None:
        return stop_reason
    return "tool_use" if tool_uses else "end_turn"


def anthropic_message(
    content: Union[str, Sequence[Mapping[str, Any]], None],
    model: str,
    input_tokens: int,
    output_tokens: int,
    cache_read_input_tokens: int = 0,
    cache_creation_input_tokens: int = 0,
    id: str = "msg_cllamatxfake",
    stop_reason: str | None = None,
    tool_uses: Sequence[Mapping[str, Any]] | None = None,
) -> dict:
    """
    A non-streaming Message.  C{content} is the text (or a list of content
    blocks used verbatim); C{tool_uses} (C{{"id", "name", "input"}}) become
    C{tool_use} blocks.  C{stop_reason} defaults to C{tool_use} when there are
    tool uses, else C{end_turn}.
    """
    return {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": _anthropic_blocks(content, tool_uses),
        "stop_reason": _stop_reason(stop_reason, tool_uses),
        "stop_sequence": None,
        "usage": anthropic_usage(
            input_tokens, output_tokens, cache_read_input_tokens, cache_creation_input_tokens
        ),
    }


def anthropic_stream_events(
    pieces: Union[str, Sequence[str]],
    model: str,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cache_read_input_tokens: int = 0,
    cache_creation_input_tokens: int = 0,
    id: str = "msg_cllamatxfake",
    stop_reason: str | None = None,
    tool_uses: Sequence[Mapping[str, Any]] | None = None,
    ping: bool = True,
) -> list[tuple[str, dict]]:
    """
    The C{(event name, data)} pairs of a streamed Message, in the documented
    order: C{message_start} (input usage), per block C{content_block_start},
    C{content_block_delta}s (C{text_delta}, or C{input_json_delta} for
    C{tool_use} blocks) and C{content_block_stop}, with one C{ping} after the
    first block start, then C{message_delta} (stop reason and cumulative
    C{output_tokens}) and C{message_stop}.
    """
    events: list[tuple[str, dict]] = [
        (
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": id,
                    "type": "message",
                    "role": "assistant",
                    "model": model,
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": anthropic_usage(
                        input_tokens,
                        min(1, output_tokens),
                        cache_read_input_tokens,
                        cache_creation_input_tokens,
                    ),
                },
            },
        )
    ]
    texts = _pieces(pieces)
    index = 0
    pinged = not ping

    def after_start() -> None:
        nonlocal pinged
        if not pinged:
            events.append(("ping", {"type": "ping"}))
            pinged = True

    if texts or not tool_uses:
        events.append(
            (
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
            )
        )
        after_start()
        for text in texts:
            events.append(
                (
                    "content_block_delta",
                    {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}},
                )
            )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1
    for tu in tool_uses or ():
        events.append(
            (
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": index,
                    "content_block": {"type": "tool_use", "id": tu["id"], "name": tu["name"], "input": {}},
                },
            )
        )
        after_start()
        partial = _json.dumps(dict(tu.get("input", {})))
        half = len(partial) // 2
        for part in (partial[:half], partial[half:]):
            if part:
                events.append(
                    (
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": part},
                        },
                    )
                )
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": _stop_reason(stop_reason, tool_uses), "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def anthropic_sse_events(events: Iterable[tuple[str, Mapping[str, Any]]]) -> list[bytes]:
    """
    One SSE event (C{event: X\\ndata: {...}\\n\\n}) per pair: suitable for
    L{Reply.sse}.
    """
    return [b"event: " + name.encode("utf-8") + b"\ndata: " + dumps(data) + b"\n\n" for name, data in events]


def sse_encode_anthropic(events: Iterable[tuple[str, Mapping[str, Any]]]) -> bytes:
    """
    The whole SSE body of a streamed Message.
    """
    return b"".join(anthropic_sse_events(events))


def huge_event_sse_events(wire_format: str, model: str, size: int, input_tokens: int = 0) -> list[bytes]:
    """
    A stream whose whole answer is one event of about C{size} bytes of text,
    with no usage anywhere (OpenAI: no usage chunk; Anthropic: C{message_start}
    reports C{input_tokens}, C{message_delta} reports nothing).
    """
    text = ("huge " * (size // 5 + 1))[:size]
    if wire_format == "anthropic":
        events = anthropic_stream_events([text], model, input_tokens, 0)
        delta_name, delta = events[-2]
        events[-2] = (delta_name, {key: value for key, value in delta.items() if key != "usage"})
        events[0][1]["message"]["usage"]["output_tokens"] = 0
        return anthropic_sse_events(events)
    return openai_sse_events(openai_stream_chunks([text], model, include_usage=False))


def garbage_sse_events(count: int, size: int = 1000) -> list[bytes]:
    """
    C{count} events whose data is not JSON (C{size} bytes each), then the
    same number of lines that are no SSE field at all, then C{[DONE]}:
    what a broken gateway or a proxy's error page streams.
    """
    junk = ("garbage! " * (size // 9 + 1))[:size].encode("ascii")
    events = [b"data: " + junk + b"\n\n" for _ in range(count)]
    events += [junk + b"\n\n" for _ in range(count)]
    events.append(b"data: [DONE]\n\n")
    return events


def anthropic_error(type: str, message: str) -> dict:
    """
    Anthropic's error body (also the data of a mid-stream C{event: error}).
    """
    return {"type": "error", "error": {"type": type, "message": message}}


def parse_sse(body: bytes) -> list[tuple[str | None, str]]:
    """
    Split an SSE body into C{(event name or None, data)} pairs (multi-line
    data joined with newlines; comments and empty events skipped).  For
    tests: a small, strict-enough reader of what the builders write.
    """
    result: list[tuple[str | None, str]] = []
    text = body.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    for block in text.split("\n\n"):
        name: str | None = None
        data: list[str] = []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            if value.startswith(" "):
                value = value[1:]
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        if data:
            result.append((name, "\n".join(data)))
    return result


# ---------------------------------------------------------------------------
# The fake server
# ---------------------------------------------------------------------------


@attr.s(auto_attribs=True, frozen=True)
class ReceivedRequest:
    """
    One request as the fake provider saw it.

    @ivar headers: lower-cased header name -> list of values (C{str}).
    @ivar json: the parsed body, or L{None} when it is not JSON.
    @ivar query: the query string (without C{?}), usually empty.
    """

    method: str
    path: str
    headers: dict[str, list[str]]
    body: bytes
    json: Any = None
    query: str = ""

    def header(self, name: str) -> str | None:
        """
        The first value of header C{name} (any case), or L{None}.
        """
        values = self.headers.get(name.lower())
        return values[0] if values else None


@attr.s(auto_attribs=True, frozen=True, eq=False)
class Reply:
    """
    One scripted answer.  At most one of C{json}, C{sse}, C{raw} and
    C{firehose_bytes} should be set (none: an empty body).

    @ivar status: the HTTP status.
    @ivar headers: extra response headers (C{str} or list of C{str} values);
        they override the default C{Content-Type}.
    @ivar json: a body, serialised compactly with a C{Content-Length}.
    @ivar sse: a list of byte chunks (e.g. L{openai_sse_events}), written
        one by one with chunked transfer encoding.
    @ivar raw: a body sent verbatim with a C{Content-Length}.
    @ivar delay_before_headers: seconds to wait before the status line.
    @ivar delay_between_chunks: seconds between two SSE chunks.
    @ivar cut_after_chunks: after the headers and that many body chunks (a
        C{json}/C{raw} body is one chunk), close the TCP connection without
        finishing the response (what was written is flushed first), so the
        client sees a truncated body.  C{0} means headers only.
    @ivar reset_after_chunks: like C{cut_after_chunks}, but the connection is
        reset (RST, C{SO_LINGER} 0) once those chunks were flushed.
    @ivar stall_after_chunks: after the headers and that many body chunks,
        send nothing more and keep the connection open (a provider that
        hangs mid-answer); the client must give up.
    @ivar abort_before_headers: abort the connection instead of answering
        (after C{hold_until} and C{delay_before_headers}): a transport error.
    @ivar firehose_bytes: stream at least that many bytes of valid SSE (in the
        request's wire format) as fast as the transport accepts, as a
        streaming push producer registered on the request, so TCP
        backpressure pauses it (see L{FakeProvider.paused}).
    @ivar hold_until: a Deferred that must fire before the headers are sent
        (lets a test keep a request in flight for as long as it wants).
    """

    status: int = 200
    headers: Mapping[str, Union[str, Sequence[str]]] = attr.ib(factory=dict)
    json: Any = None
    sse: Sequence[bytes] | None = None
    raw: bytes | None = None
    delay_before_headers: float = 0.0
    delay_between_chunks: float = 0.0
    cut_after_chunks: int | None = None
    reset_after_chunks: int | None = None
    stall_after_chunks: int | None = None
    abort_before_headers: bool = False
    firehose_bytes: int | None = None
    hold_until: Deferred | None = None


Responder = Callable[[ReceivedRequest], Reply]
Script = Union[Reply, Responder]


def _wire_format(path: str) -> str:
    return "anthropic" if "/messages" in path else "openai"


def _firehose_events(received: ReceivedRequest, minimum: int) -> Iterator[bytes]:
    """
    Lazily generate a valid SSE stream of at least C{minimum} bytes in the
    request's wire format (never held in memory as a whole).
    """
    body = received.json if isinstance(received.json, dict) else {}
    model = str(body.get("model") or "firehose-1")
    piece = ("firehose " * 112)[:1000]
    if _wire_format(received.path) == "anthropic":
        # message_start, content_block_start, ping, one delta, ... : keep the
        # first three, repeat the delta, then close with a real tail.
        template = anthropic_sse_events(anthropic_stream_events([piece], model, 1, 1))
        head, middle = template[:3], template[3]
    else:
        options = body.get("stream_options")
        include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
        template = openai_sse_events(openai_stream_chunks([piece], model, include_usage=include_usage))
        head, middle = template[:1], template[1]
    sent = 0
    count = 0
    for chunk in head:
        sent += len(chunk)
        yield chunk
    while sent < minimum:
        sent += len(middle)
        count += 1
        yield middle
    tokens = (count * len(piece.encode("utf-8")) + 3) // 4
    if _wire_format(received.path) == "anthropic":
        yield from anthropic_sse_events(anthropic_stream_events([], model, 1, tokens, ping=False))[-3:]
    else:
        tail = openai_stream_chunks([], model, 1, tokens, include_usage=include_usage)
        yield from openai_sse_events(tail[1:])


class _Exchange:
    """
    The fake's side of one request: the scheduled writes and what became of
    the connection.
    """

    def __init__(self, fake: "FakeProvider", request: Any, received: ReceivedRequest) -> None:
        self.fake = fake
        self.request = request
        self.received = received
        self.state = "active"  # then "finished" or "lost"
        self.calls: list[Any] = []
        self.lost_waiters: list[Deferred] = []
        self.producer: _Firehose | None = None
        request.notifyFinish().addCallbacks(self._finished, self._lost)

    # bookkeeping

    @property
    def active(self) -> bool:
        return self.state == "active"

    def call_later(self, delay: float, f: Callable[..., Any], *args: Any) -> None:
        self.calls = [c for c in self.calls if c.active()]
        self.calls.append(self.fake._reactor.callLater(delay, f, *args))

    def cancel_calls(self) -> None:
        for call in self.calls:
            if call.active():
                call.cancel()
        self.calls = []
        if self.producer is not None:
            self.producer.stopProducing()

    def _finished(self, _: Any) -> None:
        self.state = "finished"
        self.cancel_calls()
        waiters, self.lost_waiters = self.lost_waiters, []
        for d in waiters:
            d.errback(AssertionError("the request finished normally, its connection was not lost"))

    def _lost(self, reason: Any) -> None:
        self.state = "lost"
        self.cancel_calls()
        waiters, self.lost_waiters = self.lost_waiters, []
        for d in waiters:
            d.callback(None)

    def wait_lost(self) -> Deferred:
        if self.state == "lost":
            return succeed(None)
        if self.state == "finished":
            return fail(AssertionError("the request finished normally, its connection was not lost"))
        d: Deferred = Deferred()
        self.lost_waiters.append(d)
        return d

    # answering

    def play(self, reply: Reply) -> None:
        if reply.hold_until is None:
            self._after_hold(reply)
            return

        def released(result: Any) -> Any:
            self._after_hold(reply)
            return result

        reply.hold_until.addBoth(released)

    def _after_hold(self, reply: Reply) -> None:
        if not self.active:
            return
        if reply.delay_before_headers > 0:
            self.call_later(reply.delay_before_headers, self._headers, reply)
        else:
            self._headers(reply)

    def _transport(self) -> Any:
        return self.request.channel.transport if self.request.channel is not None else None

    def _headers(self, reply: Reply) -> None:
        if not self.active:
            return
        transport = self._transport()
        if reply.abort_before_headers:
            if transport is not None:
                transport.abortConnection()
            return
        request = self.request
        request.setResponseCode(reply.status)
        chunks: list[bytes]
        if reply.firehose_bytes is not None:
            content_type: str | None = SSE_CONTENT_TYPE
            chunks = []
        elif reply.sse is not None:
            content_type = SSE_CONTENT_TYPE
            chunks = [bytes(c) for c in reply.sse]
        elif reply.json is not None:
            content_type = JSON_CONTENT_TYPE
            chunks = [dumps(reply.json)]
        elif reply.raw is not None:
            content_type = "application/octet-stream"
            chunks = [bytes(reply.raw)]
        else:
            content_type = None
            chunks = []
        if content_type is not None:
            request.setHeader(b"content-type", content_type.encode("latin-1"))
        if reply.sse is not None or reply.firehose_bytes is not None:
            # no Content-Length: chunked transfer encoding, like the providers
            request.setHeader(b"cache-control", b"no-cache")
        else:
            request.setHeader(b"content-length", b"%d" % sum(len(c) for c in chunks))
        for name, value in reply.headers.items():
            values = [value] if isinstance(value, str) else list(value)
            request.responseHeaders.setRawHeaders(name, values)
        request.write(b"")  # the status line and headers go out now
        if reply.cut_after_chunks == 0:
            self._cut()
            return
        if reply.firehose_bytes is not None:
            self.producer = _Firehose(self, _firehose_events(self.received, reply.firehose_bytes))
            self.producer.start()
            return
        self._write(reply, chunks, 0)

    def _write(self, reply: Reply, chunks: list[bytes], index: int) -> None:
        if not self.active:
            return
        if index >= len(chunks):
            self.finish()
            return
        self.request.write(chunks[index])
        if reply.cut_after_chunks is not None and index + 1 >= reply.cut_after_chunks:
            self._cut()
            return
        if reply.reset_after_chunks is not None and index + 1 >= reply.reset_after_chunks:
            self._cut(reset=True)
            return
        if reply.stall_after_chunks is not None and index + 1 >= reply.stall_after_chunks:
            return  # silence, until the client hangs up
        if index + 1 < len(chunks) and reply.delay_between_chunks > 0:
            self.call_later(reply.delay_between_chunks, self._write, reply, chunks, index + 1)
        else:
            self._write(reply, chunks, index + 1)

    def _cut(self, reset: bool = False) -> None:
        # loseConnection flushes what was written first, then closes: the
        # client gets exactly the chunks so far and then an unexpected EOF
        # (or, with a zero linger time, a reset).
        # The HTTP channel is the transport's producer: once a large write
        # paused it, loseConnection would wait for it to go away.
        transport = self._transport()
        if transport is not None:
            if reset:
                transport.getHandle().setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            transport.unregisterProducer()
            transport.loseConnection()

    def finish(self) -> None:
        if self.active:
            self.request.finish()


@implementer(IPushProducer)
class _Firehose:
    """
    Writes SSE as fast as the transport accepts, paused by TCP backpressure.
    """

    #: Bytes written per reactor turn; small enough that a reader keeping
    #: up never fills the transport's 64 KiB buffer.
    batch = 16 * 1024

    def __init__(self, exchange: _Exchange, events: Iterator[bytes]) -> None:
        self.exchange = exchange
        self.events = events
        self.paused = False
        self.stopped = False
        self.call: Any = None

    def start(self) -> None:
        self.exchange.request.registerProducer(self, True)
        self._schedule()

    def _schedule(self) -> None:
        if self.call is None and not self.paused and not self.stopped:
            self.call = self.exchange.fake._reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        self.call = None
        written = 0
        while not self.paused and not self.stopped and written < self.batch:
            try:
                chunk = next(self.events)
            except StopIteration:
                self.stopped = True
                self.exchange.request.unregisterProducer()
                self.exchange.finish()
                return
            self.exchange.request.write(chunk)
            written += len(chunk)
        self._schedule()

    def _cancel(self) -> None:
        if self.call is not None:
            if self.call.active():
                self.call.cancel()
            self.call = None

    def pauseProducing(self) -> None:
        if self.stopped or self.paused:
            return
        self.paused = True
        self._cancel()
        self.exchange.fake._producer_paused()

    def resumeProducing(self) -> None:
        if self.stopped:
            return
        self.paused = False
        self.exchange.fake.resume_count += 1
        self._schedule()

    def stopProducing(self) -> None:
        self.stopped = True
        self._cancel()


class _Router(Resource):
    isLeaf = True

    routes = {
        "/v1/chat/completions": b"POST",
        "/v1/messages": b"POST",
        "/v1/messages/count_tokens": b"POST",
        "/v1/models": b"GET",
    }

    def __init__(self, fake: "FakeProvider") -> None:
        super().__init__()
        self._fake = fake

    def render(self, request: Any) -> Any:
        return self._fake._handle(request)


class _TrackingFactory(WrappingFactory):
    """
    Knows every open connection, so L{FakeProvider.stop} can drop them and
    wait until they are gone (no dirty reactor).
    """

    noisy = False

    def __init__(self, wrapped: Site) -> None:
        super().__init__(wrapped)
        self._gone: dict[Any, list[Deferred]] = {}
        self.connections_made = 0

    def registerProtocol(self, p: Any) -> None:
        super().registerProtocol(p)
        self.connections_made += 1

    def when_gone(self, protocol: Any) -> Deferred:
        d: Deferred = Deferred()
        self._gone.setdefault(protocol, []).append(d)
        return d

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        for d in self._gone.pop(p, []):
            d.callback(None)


@implementer(IFakeProvider)
class FakeProvider:
    """
    A loopback provider speaking OpenAI Chat Completions and Anthropic
    Messages.  See the module docstring.

    @ivar received: every L{ReceivedRequest}, in arrival order.
    @ivar pause_count: how often a firehose was paused by backpressure.
    @ivar resume_count: how often a firehose was resumed.
    """

    def __init__(self, reactor: Any, responder: Responder | None = None, port: int = 0) -> None:
        self._reactor = reactor
        if responder is None:
            from cllama_tx.demo import DemoModel

            responder = DemoModel().respond
        self._responder = responder
        self._wanted_port = port
        self._script: deque[Script] = deque()
        self._port: Any = None
        self._factory: _TrackingFactory | None = None
        self._connections_made = 0
        self._exchanges: list[_Exchange] = []
        self._request_waiters: list[tuple[int, Deferred]] = []
        self._disconnect_waiters: list[tuple[int, Deferred]] = []
        self._pause_waiters: list[Deferred] = []
        self.received: list[ReceivedRequest] = []
        self.pause_count = 0
        self.resume_count = 0

    # IFakeProvider

    @property
    def base_url(self) -> str | None:
        """
        C{http://127.0.0.1:<port>/v1} while listening, else L{None}.
        """
        if self._port is None:
            return None
        return "http://127.0.0.1:%d/v1" % (self._port.getHost().port,)

    @property
    def port(self) -> int:
        """
        The TCP port it listens on.
        """
        if self._port is None:
            raise RuntimeError("the fake provider is not listening; call start() first")
        return self._port.getHost().port

    def start(self) -> Deferred:
        """
        Listen on 127.0.0.1 (synchronously: C{base_url} works as soon as this
        returns) and return a Deferred firing with C{self}.
        """
        if self._port is None:
            site = Site(_Router(self), reactor=self._reactor)
            site.displayTracebacks = False
            site.log = lambda request: None  # no access log lines from a fake
            site.noisy = False
            self._factory = _TrackingFactory(site)
            # A deep accept queue, as the daemon's listeners have: a burst of
            # concurrent requests must not overflow it.
            self._port = self._reactor.listenTCP(
                self._wanted_port, self._factory, interface="127.0.0.1", backlog=LISTEN_BACKLOG
            )
        return succeed(self)

    def stop(self) -> Deferred:
        """
        Stop listening, cancel every scheduled write, abort every open
        connection and fire once they are all gone.
        """
        if self._port is None:
            return succeed(None)
        port, self._port = self._port, None
        factory, self._factory = self._factory, None
        assert factory is not None
        self._connections_made = factory.connections_made
        for exchange in self._exchanges:
            exchange.cancel_calls()
        waits = [maybeDeferred(port.stopListening)]
        for protocol in list(factory.protocols):
            waits.append(factory.when_gone(protocol))
            protocol.transport.abortConnection()
        return gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    # scripting

    def enqueue(self, *replies: Script) -> None:
        """
        Script the next answers, consumed in arrival order by every routed
        request.  Each item is a L{Reply} or a callable taking the
        L{ReceivedRequest} and returning one.  When the script is empty the
        responder answers.
        """
        self._script.extend(replies)

    @property
    def connections_made(self) -> int:
        """
        How many TCP connections it accepted since C{start()} (to check that
        a client reuses persistent connections).
        """
        return self._factory.connections_made if self._factory is not None else self._connections_made

    @property
    def open_connections(self) -> int:
        """
        How many TCP connections are open right now.
        """
        return len(self._factory.protocols) if self._factory is not None else 0

    @property
    def pending(self) -> int:
        """
        How many scripted replies are still unused.
        """
        return len(self._script)

    # observation

    def wait_for_request(self, n: int = 1) -> Deferred:
        """
        A Deferred firing with the L{ReceivedRequest} number C{n} (1-based)
        once C{n} requests were received.
        """
        if len(self.received) >= n:
            return succeed(self.received[n - 1])
        d: Deferred = Deferred()
        self._request_waiters.append((n, d))
        return d

    def wait_for_disconnect(self, n: int | None = None) -> Deferred:
        """
        A Deferred firing when the connection of a request is lost before
        its response finished (the client went away, or a C{cut_after_chunks}
        / C{abort_before_headers} reply closed it); at once if that already
        happened.  Fails with L{AssertionError} if that request's response
        finishes normally instead.

        @param n: which request (1-based); by default the most recent one,
            or, when none was received yet, the next one.
        """
        if n is None:
            if not self._exchanges:
                n = 1
            else:
                return self._exchanges[-1].wait_lost()
        if len(self._exchanges) >= n:
            return self._exchanges[n - 1].wait_lost()
        d: Deferred = Deferred()
        self._disconnect_waiters.append((n, d))
        return d

    @property
    def paused(self) -> Deferred:
        """
        A (new) Deferred firing with the pause count once a firehose was paused
        by TCP backpressure (at once if that already happened).
        """
        if self.pause_count:
            return succeed(self.pause_count)
        d: Deferred = Deferred()
        self._pause_waiters.append(d)
        return d

    def _producer_paused(self) -> None:
        self.pause_count += 1
        waiters, self._pause_waiters = self._pause_waiters, []
        for d in waiters:
            d.callback(self.pause_count)

    # serving

    def _handle(self, request: Any) -> Any:
        path = request.path.decode("latin-1")
        _, _, query = request.uri.decode("latin-1").partition("?")
        headers: dict[str, list[str]] = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            headers.setdefault(name.decode("latin-1").lower(), []).extend(v.decode("latin-1") for v in values)
        body = request.content.read() if request.content is not None else b""
        try:
            parsed = _json.loads(body) if body else None
        except ValueError:
            parsed = None
        received = ReceivedRequest(
            method=request.method.decode("latin-1"),
            path=path,
            headers=headers,
            body=body,
            json=parsed,
            query=query,
        )
        self.received.append(received)
        exchange = _Exchange(self, request, received)
        self._exchanges.append(exchange)
        number = len(self._exchanges)
        for n, d in [(n, d) for (n, d) in self._disconnect_waiters if n == number]:
            exchange.wait_lost().chainDeferred(d)
        self._disconnect_waiters = [(n, d) for (n, d) in self._disconnect_waiters if n != number]
        ready = [(n, d) for (n, d) in self._request_waiters if len(self.received) >= n]
        self._request_waiters = [(n, d) for (n, d) in self._request_waiters if len(self.received) < n]
        for n, d in ready:
            d.callback(self.received[n - 1])

        expected = _Router.routes.get(path)
        if expected is None:
            reply = self._not_found(received, 404, "no route for %s" % (path,))
        elif request.method != expected:
            reply = self._not_found(received, 405, "method not allowed")
        else:
            try:
                reply = self._next_reply(received)
            except Exception:
                _log.failure("fake provider responder failed")
                reply = self._not_found(received, 500, "the fake provider's responder failed")
        exchange.play(reply)
        return NOT_DONE_YET

    def _next_reply(self, received: ReceivedRequest) -> Reply:
        script: Script = self._script.popleft() if self._script else self._responder
        if isinstance(script, Reply):
            return script
        return script(received)

    @staticmethod
    def _not_found(received: ReceivedRequest, status: int, message: str) -> Reply:
        if _wire_format(received.path) == "anthropic":
            kind = {404: "not_found_error", 405: "invalid_request_error"}.get(status, "api_error")
            return Reply(status=status, json=anthropic_error(kind, message))
        kind = {404: "invalid_request_error", 405: "invalid_request_error"}.get(status, "server_error")
        return Reply(status=status, json=openai_error(message, kind))


# ---------------------------------------------------------------------------
# Responders that judge the request: key health and secret scrubbing
# ---------------------------------------------------------------------------


def presented_key(received: ReceivedRequest) -> str | None:
    """
    The key a request carries (C{Authorization: Bearer} or C{x-api-key}).
    """
    auth = received.header("authorization")
    if auth is not None and auth[:7].lower() == "bearer ":
        return auth[7:]
    return received.header("x-api-key")


def _default_responder() -> Responder:
    from cllama_tx.demo import DemoModel

    return DemoModel().respond


def strict_provider(
    valid_keys: Any,
    organization: str | None = None,
    fallback: Responder | None = None,
) -> Responder:
    """
    A responder that checks each request as OpenAI does, on every path (the
    model list included): a key not in C{valid_keys} (read at each request,
    so a test may revoke and restore keys) answers 401 C{invalid_api_key};
    an C{OpenAI-Organization} header other than C{organization} answers 401
    C{mismatched_organization}.  Anything else goes to C{fallback} (the demo
    model).  Anthropic paths answer Anthropic's C{authentication_error}.
    """
    answer = fallback or _default_responder()

    def respond(received: ReceivedRequest) -> Reply:
        anthropic = _wire_format(received.path) == "anthropic" or received.header("anthropic-version") is not None
        if presented_key(received) not in valid_keys:
            if anthropic:
                return Reply(status=401, json=anthropic_error("authentication_error", "invalid x-api-key"))
            return Reply(
                status=401,
                json=openai_error("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
            )
        org = received.header("openai-organization")
        if org is not None and org != organization:
            return Reply(
                status=401,
                json=openai_error(
                    "OpenAI-Organization header should match organization for API key",
                    "invalid_request_error",
                    "mismatched_organization",
                ),
            )
        return answer(received)

    return respond


def echo_headers_error(status: int = 400, fallback: Responder | None = None) -> Responder:
    """
    A responder that answers every inference request C{status} with an error
    body quoting all the request's headers (as some gateways' debugging
    errors do), and the presented key again in an C{x-echo-key} response
    header; other paths (the model list) go to C{fallback}.
    """
    answer = fallback or _default_responder()

    def respond(received: ReceivedRequest) -> Reply:
        if received.path.endswith("/models"):
            return answer(received)
        quoted = "; ".join(f"{name}: {', '.join(values)}" for name, values in sorted(received.headers.items()))
        message = f"could not route the request (headers: {quoted})"
        if _wire_format(received.path) == "anthropic":
            body = anthropic_error("invalid_request_error", message)
        else:
            body = openai_error(message, "invalid_request_error", "bad_request")
        return Reply(status=status, json=body, headers={"x-echo-key": presented_key(received) or ""})

    return respond
