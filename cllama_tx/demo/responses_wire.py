"""
The OpenAI Responses API's wire format as builders: a whole C{response}
object and the documented event sequence of a streamed one
(C{response.created}, C{response.in_progress}, per output item
C{response.output_item.added}, for a message C{response.content_part.added},
C{response.output_text.delta}s, C{response.output_text.done},
C{response.content_part.done}, for a function call
C{response.function_call_arguments.delta}s and C{.done}, then
C{response.output_item.done}, and C{response.completed} with the usage).

Written from the API reference, independently of the proxy's translators,
so that tests which compare the two compare two readings of the reference;
C{tests/test_testing.py} pins these against the C{openai} SDK's types.
Pure functions.
"""

from __future__ import annotations

import json as _json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "responses_message_item",
    "responses_response",
    "responses_sse_events",
    "responses_stream_events",
    "responses_usage",
    "sse_encode_responses",
]

DEFAULT_CREATED_AT = 1700000000


def _dumps(obj: Any) -> bytes:
    return _json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def responses_usage(input_tokens: int, output_tokens: int, cached_tokens: int = 0, reasoning_tokens: int = 0) -> dict:
    """The C{usage} of a Response: input includes the cached, output the reasoning tokens."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": input_tokens + output_tokens,
    }


def responses_message_item(text: str, id: str, status: str = "completed") -> dict:
    """An assistant message output item with one C{output_text} part."""
    return {
        "type": "message",
        "id": id,
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def _call_item(call: Mapping[str, Any], id: str, status: str, arguments: str | None = None) -> dict:
    args = call.get("arguments", {})
    if arguments is None:
        arguments = args if isinstance(args, str) else _json.dumps(args)
    return {
        "type": "function_call",
        "id": id,
        "call_id": call["id"],
        "name": call["name"],
        "arguments": arguments,
        "status": status,
    }


def _response(id: str, model: str, created_at: int, status: str, output: list, usage: dict | None) -> dict:
    return {
        "id": id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": True,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


def responses_response(
    content: str | None,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int = 0,
    reasoning_tokens: int = 0,
    id: str = "resp_cllamatxfake",
    tool_calls: Sequence[Mapping[str, Any]] | None = None,
    created_at: int = DEFAULT_CREATED_AT,
) -> dict:
    """
    A completed C{response} object: a message item with C{content} (none
    when C{None}), then one C{function_call} item per C{tool_calls} entry
    (C{{"id" (the call_id), "name", "arguments"}}).
    """
    output = []
    if content is not None:
        output.append(responses_message_item(content, "msg_" + id.removeprefix("resp_")))
    for n, call in enumerate(tool_calls or ()):
        output.append(_call_item(call, f"fc_{id.removeprefix('resp_')}_{n}", "completed"))
    usage = responses_usage(input_tokens, output_tokens, cached_tokens, reasoning_tokens)
    return _response(id, model, created_at, "completed", output, usage)


def responses_stream_events(
    pieces: str | Sequence[str],
    model: str,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cached_tokens: int = 0,
    reasoning_tokens: int = 0,
    id: str = "resp_cllamatxfake",
    tool_calls: Sequence[Mapping[str, Any]] | None = None,
    created_at: int = DEFAULT_CREATED_AT,
) -> list[tuple[str, dict]]:
    """
    The C{(event name, data)} pairs of a streamed Response, in the
    documented order, numbered by C{sequence_number} from 0: a message item
    when there are C{pieces} (or no tool calls), its text one delta per
    piece; then each function call, its arguments in two deltas.
    """
    texts = [pieces] if isinstance(pieces, str) else list(pieces)
    events: list[tuple[str, dict]] = []

    def add(event: str, **fields: Any) -> None:
        events.append((event, {"type": event, "sequence_number": len(events), **fields}))

    add("response.created", response=_response(id, model, created_at, "in_progress", [], None))
    add("response.in_progress", response=_response(id, model, created_at, "in_progress", [], None))
    output: list[dict] = []
    if texts or not tool_calls:
        item_id = "msg_" + id.removeprefix("resp_")
        text = "".join(texts)
        add("response.output_item.added", output_index=0, item=dict(responses_message_item("", item_id, "in_progress"), content=[]))
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        add("response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=empty)
        for piece in texts:
            add("response.output_text.delta", item_id=item_id, output_index=0, content_index=0, delta=piece, logprobs=[])
        add("response.output_text.done", item_id=item_id, output_index=0, content_index=0, text=text, logprobs=[])
        full = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        add("response.content_part.done", item_id=item_id, output_index=0, content_index=0, part=full)
        item = responses_message_item(text, item_id)
        add("response.output_item.done", output_index=0, item=item)
        output.append(item)
    for n, call in enumerate(tool_calls or ()):
        index = len(output)
        item_id = f"fc_{id.removeprefix('resp_')}_{n}"
        done = _call_item(call, item_id, "completed")
        add("response.output_item.added", output_index=index, item=_call_item(call, item_id, "in_progress", ""))
        half = len(done["arguments"]) // 2
        for part in (done["arguments"][:half], done["arguments"][half:]):
            if part:
                add("response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=part)
        add("response.function_call_arguments.done", item_id=item_id, output_index=index, arguments=done["arguments"], name=done["name"])
        add("response.output_item.done", output_index=index, item=done)
        output.append(done)
    usage = responses_usage(input_tokens, output_tokens, cached_tokens, reasoning_tokens)
    add("response.completed", response=_response(id, model, created_at, "completed", output, usage))
    return events


def responses_sse_events(events: Iterable[tuple[str, Mapping[str, Any]]]) -> list[bytes]:
    """One SSE event (C{event: X\\ndata: {...}\\n\\n}) per pair: suitable for C{Reply.sse}."""
    return [b"event: " + name.encode("utf-8") + b"\ndata: " + _dumps(data) + b"\n\n" for name, data in events]


def sse_encode_responses(events: Iterable[tuple[str, Mapping[str, Any]]]) -> bytes:
    """The whole SSE body of a streamed Response."""
    return b"".join(responses_sse_events(events))
