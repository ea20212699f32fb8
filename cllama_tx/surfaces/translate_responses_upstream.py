"""
The upstream adapter: a chat request for a model only the Responses API
serves goes upstream as a Responses request, and its answer (JSON or
events) comes back as a chat completion.  A Messages request takes the same
road through its chat translation (the bridges compose them).

What has an equivalent is carried; what has none is refused by name
(L{UntranslatableRequest}), as on every other translation.  Pure logic.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from cllama_tx.surfaces.translate_common import (
    Refusals,
    UntranslatableRequest,
    count,
    dumps,
    mapping,
)
from cllama_tx.surfaces.translate_stream import DEFAULT_MAX_EVENT_BYTES, SseReader

__all__ = ["ResponsesToChatStream", "chat_to_responses_request", "response_to_chat_completion"]

RESPONSES = "OpenAI Responses"

_NEUTRAL: dict[str, tuple[Any, str]] = {
    "n": (lambda v: v == 1 and type(v) is int, "the Responses API returns one answer per request"),
    "logprobs": (lambda v: v is False, "log probabilities are not translated"),
    "top_logprobs": (lambda v: v == 0 and type(v) is int, "log probabilities are not translated"),
    "presence_penalty": (lambda v: type(v) in (int, float) and v == 0, "the Responses API has no presence penalty"),
    "frequency_penalty": (lambda v: type(v) in (int, float) and v == 0, "the Responses API has no frequency penalty"),
    "logit_bias": (lambda v: v == {}, "the Responses API has no logit bias"),
    "modalities": (lambda v: v == ["text"], "the Responses API answers in text here"),
}

_COPIED = ("temperature", "top_p", "user", "safety_identifier", "service_tier", "metadata", "prompt_cache_key", "prompt_cache_retention")

_HANDLED = frozenset(
    {"model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options", "tools", "tool_choice",
     "parallel_tool_calls", "response_format", "reasoning_effort", "verbosity", "store", *_COPIED}
)


def chat_to_responses_request(doc: dict) -> dict:
    """A chat request (its C{model} the upstream id) as a Responses request."""
    refusals = Refusals(RESPONSES)
    if not isinstance(doc, dict):
        raise UntranslatableRequest({"body": "not a JSON object"}, RESPONSES)
    params = {k: v for k, v in doc.items() if v is not None}
    for name, value in params.items():
        if name in _HANDLED:
            continue
        if name in _NEUTRAL:
            neutral, reason = _NEUTRAL[name]
            if not neutral(value):
                refusals.add(name, reason)
        else:
            refusals.add(name, "no Responses API equivalent")
    out: dict[str, Any] = {}
    if "model" in params:
        out["model"] = params["model"]
    out["input"] = _input(params.get("messages"), refusals)
    limit = params.get("max_completion_tokens", params.get("max_tokens"))
    if limit is not None:
        out["max_output_tokens"] = limit
    for name in _COPIED:
        if name in params:
            out[name] = params[name]
    # The chat caller never continues a stored response: store only when asked.
    out["store"] = params.get("store") is True
    if "stream" in params:
        out["stream"] = params["stream"]
    _tools(params, out, refusals)
    text: dict[str, Any] = {}
    response_format = params.get("response_format")
    if response_format is not None:
        kind = mapping(response_format).get("type")
        schema = mapping(mapping(response_format).get("json_schema"))
        if kind == "json_schema" and isinstance(schema.get("schema"), dict):
            text["format"] = {"type": "json_schema", **{k: v for k, v in schema.items() if v is not None}}
            text["format"].setdefault("name", "response")
        elif kind == "json_object":
            text["format"] = {"type": "json_object"}
        elif kind != "text":
            refusals.add("response_format", f"type {kind!r} has no Responses equivalent")
    if "verbosity" in params:
        text["verbosity"] = params["verbosity"]
    if text:
        out["text"] = text
    if "reasoning_effort" in params:
        out["reasoning"] = {"effort": params["reasoning_effort"]}
    refusals.check()
    return out


def _tools(params: dict, out: dict, refusals: Refusals) -> None:
    tools = params.get("tools")
    if tools is not None:
        converted = []
        for i, tool in enumerate(tools if isinstance(tools, list) else ()):
            function = mapping(mapping(tool).get("function"))
            if mapping(tool).get("type") != "function" or not isinstance(function.get("name"), str):
                refusals.add(f"tools[{i}].type={mapping(tool).get('type')}", "only function tools translate")
                continue
            entry: dict[str, Any] = {"type": "function", "name": function["name"]}
            if function.get("description") is not None:
                entry["description"] = function["description"]
            entry["parameters"] = function.get("parameters") or {"type": "object", "properties": {}}
            # Responses makes functions strict when it can; chat's are not unless asked.
            entry["strict"] = function.get("strict") is True
            converted.append(entry)
        out["tools"] = converted
    choice = params.get("tool_choice")
    if choice in ("auto", "none", "required"):
        out["tool_choice"] = choice
    elif isinstance(choice, dict) and choice.get("type") == "function":
        out["tool_choice"] = {"type": "function", "name": mapping(choice.get("function")).get("name")}
    elif choice is not None:
        refusals.add("tool_choice", "no Responses equivalent")
    if "parallel_tool_calls" in params and tools:
        out["parallel_tool_calls"] = params["parallel_tool_calls"]


def _input(messages: Any, refusals: Refusals) -> list[dict]:
    if not isinstance(messages, list):
        refusals.add("messages", "must be a list")
        return []
    items: list[dict] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        message = mapping(message)
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer", "user"):
            items.append({"type": "message", "role": role, "content": _parts(content, where, refusals)})
        elif role == "assistant":
            text = _assistant_text(message, where, refusals)
            if text:
                items.append({"type": "message", "role": "assistant", "content": text})
            for call in message.get("tool_calls") or ():
                function = mapping(mapping(call).get("function"))
                items.append({
                    "type": "function_call",
                    "call_id": mapping(call).get("id"),
                    "name": function.get("name"),
                    "arguments": function.get("arguments") or "",
                })
        elif role == "tool":
            output = content if isinstance(content, str) else "".join(
                p.get("text", "") for p in content or () if isinstance(p, dict)
            )
            items.append({"type": "function_call_output", "call_id": message.get("tool_call_id"), "output": output})
        else:
            refusals.add(f"{where}.role", f"{role!r} has no Responses equivalent")
    return items


def _parts(content: Any, where: str, refusals: Refusals) -> Any:
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content if isinstance(content, list) else ()):
        kind = mapping(part).get("type")
        if kind == "text":
            parts.append({"type": "input_text", "text": part.get("text", "")})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            detail = image.get("detail") if isinstance(image, dict) else None
            parts.append({"type": "input_image", "image_url": url, "detail": detail or "auto"})
        else:
            refusals.add(f"{where}.content[{j}].type={kind}", "no Responses equivalent")
    return parts


def _assistant_text(message: dict, where: str, refusals: Refusals) -> str:
    content = message.get("content")
    texts = [content] if isinstance(content, str) else [
        p.get("text") or p.get("refusal") or "" for p in content or () if isinstance(p, dict)
    ]
    if isinstance(message.get("refusal"), str):
        texts.append(message["refusal"])
    for name in ("audio", "function_call"):
        if message.get(name) is not None:
            refusals.add(f"{where}.{name}", "no Responses equivalent")
    return "".join(texts)


# ---------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------


def _chat_id(response_id: Any) -> str:
    text = response_id if isinstance(response_id, str) else ""
    return "chatcmpl-" + text.removeprefix("resp_")


def _chat_usage(usage: Any) -> dict:
    usage = mapping(usage)
    prompt, completion = count(usage.get("input_tokens")), count(usage.get("output_tokens"))
    details = mapping(usage.get("input_tokens_details"))
    prompt_details = {"cached_tokens": count(details.get("cached_tokens"))}
    if count(details.get("cache_write_tokens")):
        prompt_details["cache_write_tokens"] = count(details.get("cache_write_tokens"))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": prompt_details,
        "completion_tokens_details": {
            "reasoning_tokens": count(mapping(usage.get("output_tokens_details")).get("reasoning_tokens"))
        },
    }


def _finish_reason(doc: dict, calls: bool) -> str:
    reason = mapping(doc.get("incomplete_details")).get("reason")
    if reason == "max_output_tokens":
        return "length"
    if reason == "content_filter":
        return "content_filter"
    return "tool_calls" if calls else "stop"


def response_to_chat_completion(doc: dict, *, created: int = 0, model: str | None = None) -> dict:
    """A C{response} object as a C{chat.completion}."""
    texts: list[str] = []
    refusals: list[str] = []
    calls: list[dict] = []
    for item in doc.get("output") or ():
        item = mapping(item)
        if item.get("type") == "message":
            for part in item.get("content") or ():
                part = mapping(part)
                if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                    refusals.append(part["refusal"])
        elif item.get("type") == "function_call":
            calls.append({
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""},
            })
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": "".join(refusals) or None,
    }
    if calls:
        message["tool_calls"] = calls
    name = model if model is not None else doc.get("model")
    return {
        "id": _chat_id(doc.get("id")),
        "object": "chat.completion",
        "created": count(doc.get("created_at")) or created,
        "model": name if isinstance(name, str) else "",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish_reason(doc, bool(calls))}],
        "usage": _chat_usage(doc.get("usage")),
    }


def _sse_data(doc: Any) -> bytes:
    return b"data: " + dumps(doc).encode("utf-8") + b"\n\n"


class ResponsesToChatStream:
    """
    Upstream Responses events in, C{chat.completion.chunk} SSE out.

    C{response.created} gives the role chunk; C{output_text} and refusal
    deltas content and refusal deltas; each C{function_call} item a
    C{tool_calls} entry (indexes from 0) whose argument deltas follow;
    C{response.completed} (or C{.incomplete}) the final chunk, with
    C{include_usage} the usage chunk (with C{usage_extra()} merged), and
    C{data: [DONE]}.  C{response.failed} and C{error} become a chat error
    (C{error_event}); reasoning and other events are dropped.
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
        self.created = created
        self.model = model
        self.id = _chat_id(None)
        self.error_event: dict | None = None
        self.complete = False
        self._usage_extra = usage_extra
        self._reader = SseReader(max_event_bytes)
        self._calls: dict[Any, int] = {}  # item id (or output index) -> tool index
        self._started = False
        self._dead = False

    @property
    def buffered_bytes(self) -> int:
        return self._reader.buffered_bytes

    def feed(self, data: bytes) -> bytes:
        if self._dead or self.complete:
            return b""
        return self._translate(self._reader.feed(data))

    def finish(self) -> bytes:
        if self._dead or self.complete:
            return b""
        return self._translate(self._reader.finish())

    def _translate(self, events: list) -> bytes:
        out: list[bytes] = []
        for name, data in events:
            if self._dead or self.complete:
                break
            try:
                doc = json.loads(data)
            except ValueError:
                continue
            if isinstance(doc, dict):
                self._on_event(doc.get("type", name), doc, out)
        if self._reader.overflowed and not self._dead:
            self._fail({"message": "upstream event too large to translate", "type": "server_error"}, out)
        return b"".join(out)

    def _chunk(self, delta: dict, finish_reason: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model or "",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return _sse_data(chunk)

    def _on_event(self, kind: Any, doc: dict, out: list) -> None:
        if kind in ("error", "response.failed"):
            error = mapping(mapping(doc.get("response")).get("error")) or doc
            self._fail({"message": error.get("message") or "upstream error", "type": "server_error", "code": error.get("code")}, out)
            return
        if not self._started:
            self._started = True
            response = mapping(doc.get("response"))
            self.id = _chat_id(response.get("id"))
            if self.model is None and isinstance(response.get("model"), str):
                self.model = response["model"]
            out.append(self._chunk({"role": "assistant", "content": ""}))
        if kind == "response.output_text.delta" and isinstance(doc.get("delta"), str):
            out.append(self._chunk({"content": doc["delta"]}))
        elif kind == "response.refusal.delta" and isinstance(doc.get("delta"), str):
            out.append(self._chunk({"refusal": doc["delta"]}))
        elif kind == "response.output_item.added" and mapping(doc.get("item")).get("type") == "function_call":
            item = doc["item"]
            index = self._calls.setdefault(item.get("id", doc.get("output_index")), len(self._calls))
            call = {"index": index, "id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": ""}}
            out.append(self._chunk({"tool_calls": [call]}))
        elif kind == "response.function_call_arguments.delta" and isinstance(doc.get("delta"), str):
            known = self._calls.get(doc.get("item_id"))
            if known is not None:
                out.append(self._chunk({"tool_calls": [{"index": known, "function": {"arguments": doc["delta"]}}]}))
        elif kind in ("response.completed", "response.incomplete"):
            response = mapping(doc.get("response"))
            out.append(self._chunk({}, _finish_reason(response, bool(self._calls))))
            if self.include_usage:
                usage = _chat_usage(response.get("usage"))
                if self._usage_extra is not None:
                    usage.update(self._usage_extra())
                out.append(_sse_data({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                                      "model": self.model or "", "choices": [], "usage": usage}))
            out.append(b"data: [DONE]\n\n")
            self.complete = True

    def _fail(self, error: dict, out: list) -> None:
        self._dead = True
        self.error_event = {"error": {"message": error.get("message"), "type": error.get("type"), "param": None, "code": error.get("code")}}
        out.append(_sse_data(self.error_event))
