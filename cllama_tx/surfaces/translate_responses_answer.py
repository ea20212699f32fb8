"""
A chat completion (JSON, or a stream of chunks) as a Responses API answer:
the C{response} object, or the documented event sequence
(C{response.created}, C{response.in_progress}, per output item
C{response.output_item.added}, its content part, C{response.output_text.delta}s
or C{response.function_call_arguments.delta}s, their C{.done} events,
C{response.output_item.done}, then C{response.completed} with the usage).

An Anthropic answer reaches a Responses agent through the chat one (the
bridges compose L{cllama_tx.surfaces.translate_stream.AnthropicToChatStream}
with L{ChatToResponsesStream}).  Reasoning deltas some chat servers add are
dropped, as on the chat -> Anthropic path.  Pure logic: the caller passes
the ids and the time (L{AnswerContext}).
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from cllama_tx.surfaces.responses_shapes import (
    chat_usage_to_responses,
    failure_events,
    response_object,
    sse_event,
)
from cllama_tx.surfaces.translate_common import mapping
from cllama_tx.surfaces.translate_responses_request import ToolNames
from cllama_tx.surfaces.translate_stream import DEFAULT_MAX_EVENT_BYTES, SseReader

__all__ = ["AnswerContext", "ChatToResponsesStream", "chat_completion_to_response"]

_TOO_LARGE = "upstream event too large to translate"
_CUT = "the provider's stream ended before the answer was complete"

#: finish_reason -> why the Response is incomplete (None: it is complete).
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}


@attrs.frozen
class AnswerContext:
    """What the answer says about itself: its id, time, model, echoed settings, tool names."""

    response_id: str
    created_at: int
    model: str
    echo: dict
    tools: ToolNames = attrs.field(factory=ToolNames)

    def item_id(self, prefix: str, n: int) -> str:
        """Item ids derived from the response's: stable, unique within it."""
        return f"{prefix}_{self.response_id.removeprefix('resp_')}_{n}"

    def response(self, status: str, output: list, usage: dict | None = None, incomplete: str | None = None) -> dict:
        return response_object(
            self.echo,
            response_id=self.response_id,
            created_at=self.created_at,
            model=self.model,
            status=status,
            output=output,
            usage=usage,
            incomplete_reason=incomplete,
        )

    def call_item(self, n: int, call_id: Any, name: Any, arguments: str, status: str) -> dict:
        namespace, plain = self.tools.split(name if isinstance(name, str) else "")
        item: dict[str, Any] = {
            "type": "function_call",
            "id": self.item_id("fc", n),
            "call_id": call_id if isinstance(call_id, str) and call_id else self.item_id("call", n),
            "name": plain,
            "arguments": arguments,
            "status": status,
        }
        if namespace is not None:
            item["namespace"] = namespace
        return item


def _message_item(item_id: str, parts: list, status: str) -> dict:
    return {"type": "message", "id": item_id, "role": "assistant", "status": status, "content": parts}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def chat_completion_to_response(doc: dict, ctx: AnswerContext) -> dict:
    """A C{chat.completion} as a C{response} object (choice 0)."""
    choices = doc.get("choices")
    choice = mapping(choices[0]) if isinstance(choices, list) and choices else {}
    message = mapping(choice.get("message"))
    output: list[dict] = []
    parts: list[dict] = []
    content = message.get("content")
    if isinstance(content, str) and content:
        parts.append(_text_part(content))
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        parts.append({"type": "refusal", "refusal": refusal})
    n = 0
    if parts:
        output.append(_message_item(ctx.item_id("msg", n), parts, "completed"))
        n += 1
    for call in message.get("tool_calls") or ():
        function = mapping(mapping(call).get("function"))
        arguments = function.get("arguments")
        output.append(
            ctx.call_item(n, mapping(call).get("id"), function.get("name"), arguments if isinstance(arguments, str) else "", "completed")
        )
        n += 1
    incomplete = _INCOMPLETE.get(choice.get("finish_reason"))  # type: ignore[arg-type]
    return ctx.response(
        "incomplete" if incomplete else "completed", output, chat_usage_to_responses(doc.get("usage")), incomplete
    )


class ChatToResponsesStream:
    """
    Upstream C{chat.completion.chunk} SSE in, Responses events out.

    The first chunk opens the response; text opens a message item (and its
    C{output_text} part; a refusal its C{refusal} part); each new tool call
    (by C{index}) closes the message and adds a C{function_call} item whose
    argument fragments follow.  The items close and C{response.completed}
    (or C{response.incomplete} for C{length} and C{content_filter}) is
    written on C{data: [DONE]} or at the end of the body, never earlier:
    the relay withholds the upstream's C{[DONE]} until the ledger row is
    committed, and so the agent's last event.  The usage chunk, when it
    comes, gives the usage.

    An upstream C{data: {"error": ...}}, an event too large, or a body that
    ends before its C{finish_reason} ends the stream with C{error} and
    C{response.failed}.  C{.response} is the last response object written
    (the completed one, for the proxy's conversation state); C{.sequence}
    the next sequence number; C{.error_event} the upstream's error.
    """

    def __init__(self, ctx: AnswerContext, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.ctx = ctx
        self.sequence = 0
        self.response: dict | None = None
        self.complete = False
        self.error_event: dict | None = None
        self._reader = SseReader(max_event_bytes)
        self._started = False
        self._dead = False
        self._output: list[dict] = []  # items in output order
        self._message: int | None = None  # output index of the open message item
        self._part_kind: str | None = None  # "output_text" or "refusal": the open part
        self._calls: dict[Any, int] = {}  # chat tool index -> output index (open calls)
        self._finish: str | None = None
        self._usage: dict | None = None

    @property
    def buffered_bytes(self) -> int:
        return self._reader.buffered_bytes

    def feed(self, data: bytes) -> bytes:
        if self._dead or self.complete:
            return b""
        return self._translate(self._reader.feed(data))

    def finish(self) -> bytes:
        """End of the upstream body: complete the response, or fail it if it was cut."""
        if self._dead or self.complete:
            return b""
        out = [self._translate(self._reader.finish())]
        if not self._dead and not self.complete:
            if self._finish is not None:
                self._complete(out)
            elif self._started:
                self._fail(None, _CUT, out)
        return b"".join(out)

    def fail(self, code: str | None, message: str, rate_limited: bool = False) -> bytes:
        """The events that end this stream on the proxy's own error."""
        out: list[bytes] = []
        if not self._dead and not self.complete:
            self._fail(code, message, out, rate_limited)
        return b"".join(out)

    # -- internals ---------------------------------------------------------

    def _event(self, name: str, doc: dict, out: list) -> None:
        doc["type"] = name
        doc["sequence_number"] = self.sequence
        self.sequence += 1
        out.append(sse_event(name, doc))

    def _translate(self, events: list) -> bytes:
        out: list[bytes] = []
        for _name, data in events:
            if self._dead or self.complete:
                break
            if data.strip() == "[DONE]":
                if self._started:
                    self._complete(out)
                continue
            try:
                doc = json.loads(data)
            except ValueError:
                continue
            if isinstance(doc, dict):
                self._on_chunk(doc, out)
        if self._reader.overflowed and not self._dead:
            self._fail(None, _TOO_LARGE, out)
        return b"".join(out)

    def _start(self, out: list) -> None:
        self._started = True
        self.response = self.ctx.response("in_progress", [])
        self._event("response.created", {"response": self.response}, out)
        self._event("response.in_progress", {"response": self.response}, out)

    def _on_chunk(self, doc: dict, out: list) -> None:
        choices = doc.get("choices")
        error = doc.get("error")
        if error is not None and not choices:
            self.error_event = doc
            details = mapping(error)
            code = details.get("code") if isinstance(details.get("code"), str) else details.get("type")
            text = details.get("message")
            message = text if isinstance(text, str) else "upstream error"
            self._fail(code if isinstance(code, str) else None, message, out, "rate" in str(code))
            return
        if not self._started:
            self._start(out)
        if isinstance(doc.get("usage"), dict):
            self._usage = doc["usage"]
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = mapping(choice.get("delta"))
            content = delta.get("content")
            if isinstance(content, str) and content:
                self._text("output_text", content, out)
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                self._text("refusal", refusal, out)
            for call in delta.get("tool_calls") or ():
                if isinstance(call, dict):
                    self._call(call, out)
            if choice.get("finish_reason") is not None and self._finish is None:
                self._finish = choice["finish_reason"]

    def _text(self, kind: str, text: str, out: list) -> None:
        if self._message is None:
            index = len(self._output)
            item = _message_item(self.ctx.item_id("msg", index), [], "in_progress")
            self._output.append(item)
            self._message = index
            self._event("response.output_item.added", {"output_index": index, "item": dict(item, content=[])}, out)
        item = self._output[self._message]
        parts = item["content"]
        if self._part_kind != kind:
            self._close_part(out)
            part = _text_part("") if kind == "output_text" else {"type": "refusal", "refusal": ""}
            parts.append(part)
            self._part_kind = kind
            self._event("response.content_part.added", self._part_ref(dict(part)), out)
        part = parts[-1]
        if kind == "output_text":
            part["text"] += text
            self._event("response.output_text.delta", dict(self._part_ref(None), delta=text, logprobs=[]), out)
        else:
            part["refusal"] += text
            self._event("response.refusal.delta", dict(self._part_ref(None), delta=text), out)

    def _part_ref(self, part: dict | None) -> dict:
        index = self._message
        assert index is not None
        ref: dict[str, Any] = {
            "item_id": self._output[index]["id"],
            "output_index": index,
            "content_index": len(self._output[index]["content"]) - 1,
        }
        if part is not None:
            ref["part"] = part
        return ref

    def _close_part(self, out: list) -> None:
        if self._part_kind is None:
            return
        part = self._output[self._message]["content"][-1]  # type: ignore[index]
        if self._part_kind == "output_text":
            self._event("response.output_text.done", dict(self._part_ref(None), text=part["text"], logprobs=[]), out)
        else:
            self._event("response.refusal.done", dict(self._part_ref(None), refusal=part["refusal"]), out)
        self._event("response.content_part.done", self._part_ref(dict(part)), out)
        self._part_kind = None

    def _close_message(self, out: list) -> None:
        if self._message is None:
            return
        self._close_part(out)
        item = self._output[self._message]
        item["status"] = "completed"
        self._event("response.output_item.done", {"output_index": self._message, "item": item}, out)
        self._message = None

    def _call(self, call: dict, out: list) -> None:
        key = call.get("index", 0)
        function = mapping(call.get("function"))
        if key not in self._calls:
            self._close_message(out)
            index = len(self._output)
            item = self.ctx.call_item(index, call.get("id"), function.get("name"), "", "in_progress")
            self._output.append(item)
            self._calls[key] = index
            self._event("response.output_item.added", {"output_index": index, "item": dict(item)}, out)
        index = self._calls[key]
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item = self._output[index]
            item["arguments"] += arguments
            self._event(
                "response.function_call_arguments.delta",
                {"item_id": item["id"], "output_index": index, "delta": arguments},
                out,
            )

    def _complete(self, out: list) -> None:
        self._close_message(out)
        for index in sorted(self._calls.values()):
            item = self._output[index]
            item["status"] = "completed"
            self._event(
                "response.function_call_arguments.done",
                {"item_id": item["id"], "output_index": index, "arguments": item["arguments"], "name": item["name"]},
                out,
            )
            self._event("response.output_item.done", {"output_index": index, "item": item}, out)
        self._calls = {}
        incomplete = _INCOMPLETE.get(self._finish or "stop")
        status = "incomplete" if incomplete else "completed"
        self.response = self.ctx.response(status, self._output, chat_usage_to_responses(self._usage), incomplete)
        self._event(f"response.{status}", {"response": self.response}, out)
        self.complete = True

    def _fail(self, code: str | None, message: str, out: list, rate_limited: bool = False) -> None:
        self._dead = True
        response = self.response or self.ctx.response("in_progress", [])
        out.append(failure_events(self.sequence, dict(response, output=self._output), code=code, message=message, rate_limited=rate_limited))
        self.sequence += 2
