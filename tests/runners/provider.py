"""
A scripted provider that drives one tool-calling loop, as a real model
would: it speaks the exact wire formats the proxy relays (Anthropic
Messages, OpenAI Chat Completions and the OpenAI Responses API, JSON and
SSE), answers the turn
that carries the task with a call to a tool the runner really declared,
answers the turn that carries that tool's result with a final text, and
answers everything else a runner sends on the side (titles, summaries,
token counts, model lists) the way the real API would.  It is as strict as
the real API (L{cllama_tx.testing.strict}): a body the provider would
refuse gets its 400, and the exchange is marked C{refused}.

The wire shapes come from L{cllama_tx.testing}'s verified builders; the
decisions (which tool, which turn) are this module's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Site

from cllama_tx.testing import (
    anthropic_message,
    anthropic_stream_events,
    openai_completion,
    openai_stream_chunks,
    responses_response,
    responses_stream_events,
    sse_encode_anthropic,
    sse_encode_openai,
    sse_encode_responses,
)
from cllama_tx.testing.strict import anthropic_problems, openai_problems

TOOL_CALL_ID = "toolu_runner_loop_0001"


@dataclass
class ToolCall:
    """The call the fake makes: a tool the runner declared, and its arguments."""

    name: str
    arguments: dict


# Picks the call from the tools a request declares (name -> JSON schema), or
# None when none of them fits (the fake then answers with text).
ToolChooser = Callable[[dict[str, dict]], "ToolCall | None"]


@dataclass
class Exchange:
    """One request the provider received and what it answered (C{kind})."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    kind: str = ""

    @property
    def model(self) -> str | None:
        return self.body.get("model") if isinstance(self.body, dict) else None


@dataclass
class ScriptedProvider:
    """
    The provider side of one task.  C{marker} is a word of the task prompt:
    only a turn whose user messages contain it gets the tool call (side
    calls that merely quote the prompt, e.g. a title generator, have no
    tools or get text).  C{tool_results} collects what the runner sent back
    for the call, as text.
    """

    marker: str
    choose: ToolChooser
    final_text: str
    side_text: str = "Runner loop"
    # For runners whose loop is an edit in the answer's text (aider): the
    # answer to the task turn when it declares no tools.
    edit_text: str | None = None
    max_calls: int = 3
    exchanges: list[Exchange] = field(default_factory=list)
    tool_results: list[str] = field(default_factory=list)
    declared_tools: list[list[str]] = field(default_factory=list)
    calls_made: list[ToolCall] = field(default_factory=list)
    refusals: list[list[str]] = field(default_factory=list)
    _port: Any = None

    def start(self, reactor) -> str:
        """Listen on loopback; return the base URL (with C{/v1}, as the catalog's)."""
        self._port = reactor.listenTCP(0, Site(_Root(self)), interface="127.0.0.1")
        return self.base_url

    def stop(self):
        return self._port.stopListening()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._port.getHost().port}/v1"

    def of_kind(self, *kinds: str) -> list[Exchange]:
        return [e for e in self.exchanges if e.kind in kinds]

    # Deciding a turn

    def answer(self, exchange: Exchange) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request."""
        path = exchange.path.rstrip("/")
        body = exchange.body if isinstance(exchange.body, dict) else {}
        if exchange.method in ("GET", "HEAD") and path.endswith("/models"):
            exchange.kind = "models"
            return 200, "application/json", _models(self._seen_models())
        if exchange.method != "POST":
            exchange.kind = "other"
            return 404, "application/json", json.dumps({"error": {"message": "not found"}}).encode()
        if path.endswith("/messages/count_tokens"):
            exchange.kind = "count_tokens"
            return 200, "application/json", json.dumps({"input_tokens": _estimate(body)}).encode()
        if path.endswith("/messages"):
            return self._turn(exchange, body, _ANTHROPIC)
        if path.endswith("/chat/completions"):
            return self._turn(exchange, body, _OPENAI)
        if path.endswith("/responses"):
            return self._turn(exchange, body, _RESPONSES)
        exchange.kind = "other"
        return 404, "application/json", json.dumps({"error": {"message": f"no route {path}"}}).encode()

    def _turn(self, exchange: Exchange, body: dict, wire: _Wire) -> tuple[int, str, bytes]:
        problems = wire.problems(exchange)
        if problems:
            exchange.kind = "refused"
            self.refusals.append(problems)
            return 400, "application/json", json.dumps(wire.error("; ".join(problems))).encode()
        model = body.get("model") or "unknown"
        tools = wire.tools(body)
        if tools:
            self.declared_tools.append(sorted(tools))
        result = wire.tool_result(body, TOOL_CALL_ID)
        call = None
        if result is not None:
            exchange.kind = "final"
            self.tool_results.append(result)
            text = self.final_text
        elif tools and self.marker in wire.user_text(body) and len(self.calls_made) >= self.max_calls:
            # The runner never sent the result back (or not as the wire format
            # says): end its loop, the test then fails on what was received.
            exchange.kind = "runaway"
            text = "Giving up: no tool result arrived."
        elif tools and self.marker in wire.user_text(body):
            call = self.choose(tools)
            if call is not None:
                exchange.kind = "tool_call"
                self.calls_made.append(call)
                text = ""
            else:
                exchange.kind = "no_tool"
                text = f"none of the tools fits: {sorted(tools)}"
        elif wire.output_schema(body) is not None:
            # Structured output: an answer that fits the schema, as the real model's must.
            exchange.kind = "structured"
            text = json.dumps(instance_of(wire.output_schema(body)))
        elif self.edit_text is not None and not tools and self.marker in wire.user_text(body):
            exchange.kind = "edit"
            text = self.edit_text
        else:
            exchange.kind = "side"
            text = self.side_text
        return wire.reply(body, model, text, call, _estimate(body))

    def _seen_models(self) -> list[str]:
        return sorted({e.model for e in self.exchanges if e.model})


def instance_of(schema: Any, defs: dict | None = None) -> Any:
    """A small value that fits a JSON schema (what a model under structured output answers)."""
    if not isinstance(schema, dict):
        return None
    defs = defs if defs is not None else {**schema.get("$defs", {}), **schema.get("definitions", {})}
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return instance_of(defs.get(ref.rpartition("/")[2], {}), defs)
    if schema.get("enum"):
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return instance_of(schema[key][0], defs)
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "object":
        return {name: instance_of(sub, defs) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [instance_of(schema.get("items"), defs)]
    return {"string": "hello", "integer": 3, "number": 1.5, "boolean": True, "null": None}.get(kind, "hello")


def _estimate(body: Any) -> int:
    """A plausible input token count: four bytes a token of the request."""
    return max(1, len(json.dumps(body)) // 4)


def _same_id(sent: Any, ours: str) -> bool:
    """
    Whether a tool result answers our call.  Some runners keep only the
    letters and digits of a call id (OpenClaw sends C{toolurunnerloop0001}
    back for C{toolu_runner_loop_0001}); on the Responses API OpenClaw
    composes its own id around ours and the item's
    (C{call_toolu_runner_loop_0001_fc_..._<hash>}); that is still our call.
    """
    if not isinstance(sent, str):
        return False
    plain = "".join(c for c in ours if c.isalnum())
    return sent == ours or plain in "".join(c for c in sent if c.isalnum())


def _text_of(content: Any) -> str:
    """The text of a message content (a string or a list of blocks/parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict):
                if isinstance(block.get("text"), str):
                    parts.append(block["text"])
                elif "content" in block:
                    parts.append(_text_of(block["content"]))
            elif isinstance(block, str):
                parts.append(block)
        return "\n".join(parts)
    return ""


class _Wire:
    """What differs between the two wire formats."""

    def problems(self, exchange: Exchange) -> list[str]:
        """What the real API would refuse in this request (empty: nothing)."""
        return []

    def error(self, message: str) -> dict:
        return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None}}

    def output_schema(self, body: dict) -> dict | None:
        """The JSON schema the answer must fit, when the request asks for structured output."""
        return None

    def tools(self, body: dict) -> dict[str, dict]:
        raise NotImplementedError

    def tool_result(self, body: dict, call_id: str) -> str | None:
        raise NotImplementedError

    def user_text(self, body: dict) -> str:
        """Every user message's text (runners add context as later user messages)."""
        raise NotImplementedError

    def reply(self, body: dict, model: str, text: str, call: ToolCall | None, input_tokens: int):
        raise NotImplementedError


class _AnthropicWire(_Wire):
    def problems(self, exchange):
        betas = tuple(b.strip() for b in exchange.headers.get("anthropic-beta", "").split(",") if b.strip())
        return anthropic_problems(exchange.body, betas)

    def error(self, message):
        return {"type": "error", "error": {"type": "invalid_request_error", "message": message}}

    def output_schema(self, body):
        fmt = (body.get("output_config") or {}).get("format") or {}
        return fmt.get("schema") if fmt.get("type") == "json_schema" else None

    def tools(self, body):
        return {t["name"]: t.get("input_schema") or {} for t in body.get("tools") or () if t.get("name")}

    def tool_result(self, body, call_id):
        for message in body.get("messages") or ():
            content = message.get("content")
            if message.get("role") != "user" or not isinstance(content, list):
                continue
            for block in content:
                if isinstance(block, dict) and block.get("type") == "tool_result" and _same_id(block.get("tool_use_id"), call_id):
                    return _text_of(block.get("content"))
        return None

    def user_text(self, body):
        return "\n".join(_text_of(m.get("content")) for m in body.get("messages") or () if m.get("role") == "user")

    def reply(self, body, model, text, call, input_tokens):
        uses = [{"id": TOOL_CALL_ID, "name": call.name, "input": call.arguments}] if call else None
        output_tokens = max(1, len(text) // 4) + (20 if call else 0)
        if body.get("stream"):
            events = anthropic_stream_events([text] if text else [], model, input_tokens, output_tokens, tool_uses=uses)
            return 200, "text/event-stream", sse_encode_anthropic(events)
        doc = anthropic_message(text or None, model, input_tokens, output_tokens, tool_uses=uses)
        return 200, "application/json", json.dumps(doc).encode()


class _OpenAIWire(_Wire):
    def problems(self, exchange):
        return openai_problems(exchange.body)

    def tools(self, body):
        found = {}
        for tool in body.get("tools") or ():
            function = tool.get("function") or {}
            if function.get("name"):
                found[function["name"]] = function.get("parameters") or {}
        return found

    def tool_result(self, body, call_id):
        for message in body.get("messages") or ():
            if message.get("role") == "tool" and _same_id(message.get("tool_call_id"), call_id):
                return _text_of(message.get("content"))
        return None

    def user_text(self, body):
        return "\n".join(_text_of(m.get("content")) for m in body.get("messages") or () if m.get("role") == "user")

    def reply(self, body, model, text, call, input_tokens):
        calls = [{"id": TOOL_CALL_ID, "name": call.name, "arguments": call.arguments}] if call else None
        output_tokens = max(1, len(text) // 4) + (20 if call else 0)
        finish = "tool_calls" if call else "stop"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunks = openai_stream_chunks(
                [text] if text else [], model, input_tokens, output_tokens,
                finish_reason=finish, include_usage=include_usage, tool_calls=calls,
            )
            return 200, "text/event-stream", sse_encode_openai(chunks)
        doc = openai_completion(text or None, model, input_tokens, output_tokens, finish_reason=finish, tool_calls=calls)
        return 200, "application/json", json.dumps(doc).encode()


class _ResponsesWire(_Wire):
    """The Responses API: tools at the top (functions, and functions in namespaces), items as input."""

    def tools(self, body):
        found = {}
        for tool in body.get("tools") or ():
            if tool.get("type") == "function" and tool.get("name"):
                found[tool["name"]] = tool.get("parameters") or {}
        return found

    def _items(self, body):
        given = body.get("input")
        return [{"role": "user", "content": given}] if isinstance(given, str) else list(given or ())

    def tool_result(self, body, call_id):
        for item in self._items(body):
            if item.get("type") == "function_call_output" and _same_id(item.get("call_id"), call_id):
                output = item.get("output")
                return output if isinstance(output, str) else _text_of(output)
        return None

    def user_text(self, body):
        return "\n".join(_text_of(i.get("content")) for i in self._items(body) if i.get("role") == "user")

    def reply(self, body, model, text, call, input_tokens):
        calls = [{"id": TOOL_CALL_ID, "name": call.name, "arguments": call.arguments}] if call else None
        output_tokens = max(1, len(text) // 4) + (20 if call else 0)
        if body.get("stream"):
            events = responses_stream_events([text] if text else [], model, input_tokens, output_tokens, tool_calls=calls)
            return 200, "text/event-stream", sse_encode_responses(events)
        doc = responses_response(text or None, model, input_tokens, output_tokens, tool_calls=calls)
        return 200, "application/json", json.dumps(doc).encode()


_ANTHROPIC = _AnthropicWire()
_OPENAI = _OpenAIWire()
_RESPONSES = _ResponsesWire()


def _models(names: list[str]) -> bytes:
    return json.dumps({
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 0, "owned_by": "fake"} for n in names],
    }).encode()


class _Root(Resource):
    isLeaf = True

    def __init__(self, provider: ScriptedProvider) -> None:
        super().__init__()
        self._provider = provider

    def render(self, request):
        raw = request.content.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        path, _, query = request.uri.decode("latin-1").partition("?")
        exchange = Exchange(
            method=request.method.decode("ascii"),
            path=path,
            query=query,
            headers={k.decode("latin-1").lower(): v[0].decode("latin-1") for k, v in request.requestHeaders.getAllRawHeaders()},
            body=body,
        )
        self._provider.exchanges.append(exchange)
        status, content_type, payload = self._provider.answer(exchange)
        request.setResponseCode(status)
        request.setHeader(b"content-type", content_type.encode("ascii"))
        if content_type == "text/event-stream":
            request.setHeader(b"cache-control", b"no-cache")
        return payload
