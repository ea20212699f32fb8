"""
The providers' wire formats as builders: what OpenAI Chat Completions and
Anthropic Messages really send (whole answers, stream chunks and events, the
SSE encoders, error bodies) and a small SSE reader.  Pure functions.

The demo provider answers with them, and tests state their expectations with
them; C{tests/test_testing.py} pins them against the official C{openai} and
C{anthropic} SDKs' typed models, so they stay honest.
"""

from __future__ import annotations

import json as _json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_CREATED",
    "anthropic_error",
    "anthropic_message",
    "anthropic_sse_events",
    "anthropic_stream_events",
    "anthropic_usage",
    "dumps",
    "openai_completion",
    "openai_error",
    "openai_sse_events",
    "openai_stream_chunks",
    "openai_usage",
    "parse_sse",
    "sse_encode_anthropic",
    "sse_encode_openai",
]

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


def _pieces(pieces: str | Sequence[str] | None) -> list[str]:
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
    pieces: str | Sequence[str],
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
    content: str | Sequence[Mapping[str, Any]] | None,
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
    content: str | Sequence[Mapping[str, Any]] | None,
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
    pieces: str | Sequence[str],
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
