"""
A Responses API request (C{POST /v1/responses}) as an OpenAI Chat
Completions request, or as an Anthropic Messages request (through the chat
one, with Anthropic's own structured output and effort).

The rule of C{docs/TRANSLATION.md}: what has an equivalent is carried or
mapped; hints that change no answer are dropped and named in
L{Translated.dropped} (the proxy writes them on its C{surface_translated}
intervention line); everything else is refused by name
(L{UntranslatableRequest}).  Tools grouped in a C{namespace} become plain
functions named C{<namespace>__<name>} (L{ToolNames} maps them back).

C{previous_response_id} must have been expanded into C{input} first
(L{cllama_tx.surfaces.responses_state}).  Pure logic; the input document
is never modified.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

from cllama_tx.surfaces.model_traits import UNKNOWN_MODEL, ModelTraits
from cllama_tx.surfaces.translate_common import Notes, Refusals, UntranslatableRequest
from cllama_tx.surfaces.translate_request import chat_to_messages_request

__all__ = ["ToolNames", "Translated", "responses_to_chat_request", "responses_to_messages_request"]

CHAT = "OpenAI Chat Completions"
ANTHROPIC = "Anthropic Messages"

#: The separator of a namespaced tool's flat name (chat and Anthropic
#: names allow letters, digits, C{_} and C{-} only).
NAMESPACE_SEPARATOR = "__"
_FLAT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

_EMPTY_SCHEMA = {"type": "object", "properties": {}}


@attrs.frozen
class ToolNames:
    """The flat name of each namespaced tool -> its C{(namespace, name)}."""

    flat: dict = attrs.field(factory=dict)

    def split(self, name: str) -> tuple[str | None, str]:
        """C{(namespace, name)} of a tool the model called by its flat name."""
        found = self.flat.get(name)
        return found if found is not None else (None, name)

    def join(self, namespace: Any, name: str) -> str:
        """The flat name of C{name} in C{namespace} (C{name} itself outside any)."""
        if isinstance(namespace, str) and namespace:
            return f"{namespace}{NAMESPACE_SEPARATOR}{name}"
        return name


@attrs.frozen
class Translated:
    """A translated request, what was dropped from it, and its tools' names."""

    request: dict
    dropped: tuple[str, ...] = ()
    tools: ToolNames = attrs.field(factory=ToolNames)
    # Values changed on the way (clamped, lowered), for the intervention line.
    adjusted: tuple[str, ...] = ()


#: Parameters dropped (named on the intervention line): hints that change
#: no answer, or settings the proxy itself honours.
_DROPPED = frozenset(
    {
        "prompt_cache_key",  # OpenAI cache routing
        "prompt_cache_retention",
        "prompt_cache_options",
        "client_metadata",  # the client's own labels (Codex)
        "stream_options",  # include_obfuscation: padding
    }
)

#: Parameters the proxy keeps on its own Response (or in its state) and
#: does not send: not an intervention.
_KEPT = frozenset({"store", "metadata"})

#: Refused unless null or neutral, with why.
_NEUTRAL: dict[str, tuple[Any, str]] = {
    "background": (lambda v: v is False, "background responses are not translated"),
    "top_logprobs": (lambda v: v == 0 and type(v) is int, "log probabilities are not translated"),
}

_REFUSED: dict[str, str] = {
    "conversation": "Conversations live at OpenAI; use previous_response_id or send the input",
    "prompt": "reusable prompts live at OpenAI",
    "max_tool_calls": "the limit applies to OpenAI's hosted tools",
    "moderation": "OpenAI moderation has no equivalent",
    "context_management": "OpenAI context management has no equivalent",
    "image": "image settings have no equivalent",
    "access_programs": "OpenAI access programs have no equivalent",
    "background_options": "background responses are not translated",
    "previous_response_id": "unknown to this proxy",
}

_HANDLED = frozenset(
    {
        "model",
        "input",
        "instructions",
        "stream",
        "max_output_tokens",
        "temperature",
        "top_p",
        "user",
        "safety_identifier",
        "service_tier",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "text",
        "reasoning",
        "include",
        "truncation",
    }
)

#: Hosted tools an answer can do without: dropped, never refused.
_OPTIONAL_TOOLS = ("web_search",)

_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh"})


def responses_to_chat_request(doc: dict, *, max_tokens_field: str = "max_completion_tokens") -> Translated:
    """A Responses request as a chat request; raises L{UntranslatableRequest}."""
    translated, _, refusals = _to_chat(doc, max_tokens_field, CHAT)
    refusals.check()
    return translated


def responses_to_messages_request(
    doc: dict, default_max_tokens: int = 4096, *, traits: ModelTraits = UNKNOWN_MODEL
) -> Translated:
    """
    A Responses request as an Anthropic Messages request for a model with
    C{traits}: through the chat translation, so C{text.format} and
    C{reasoning.effort} follow the chat rules (structured output, thinking
    where the model thinks).
    """
    chat, _, refusals = _to_chat(doc, "max_completion_tokens", ANTHROPIC)
    notes = Notes()
    messages: dict = {}
    try:
        messages = chat_to_messages_request(chat.request, default_max_tokens, traits=traits, notes=notes)
    except UntranslatableRequest as e:
        for name, reason in e.reasons.items():
            refusals.add(name, reason)
    # Every refusal at once, the chat step's with the rest.
    refusals.check()
    dropped = (*chat.dropped, *(name for name in notes.dropped if name not in chat.dropped))
    return Translated(messages, dropped, chat.tools, tuple(notes.adjusted))


def _to_chat(doc: dict, max_tokens_field: str, target: str) -> tuple[Translated, dict, Refusals]:
    """The chat request, Anthropic's C{output_config}, and what was refused (not raised yet)."""
    refusals = Refusals(target)
    if not isinstance(doc, dict):
        raise UntranslatableRequest({"body": "not a JSON object"}, target)
    params = {k: v for k, v in doc.items() if v is not None}
    dropped: list[str] = []
    anthropic = target == ANTHROPIC
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name in _HANDLED or name in _KEPT:
            continue
        if name in _DROPPED:
            dropped.append(name)
        elif name in _NEUTRAL:
            neutral, reason = _NEUTRAL[name]
            if not neutral(value):
                refusals.add(name, reason)
        else:
            refusals.add(name, _REFUSED.get(name, "unknown parameter with no equivalent"))
    if "model" in params:
        out["model"] = params["model"]
    names = _tools(params, out, refusals, dropped)
    out["messages"] = _messages(params, names, refusals, dropped)
    if "max_output_tokens" in params:
        out[max_tokens_field] = params["max_output_tokens"]
    for name in ("temperature", "top_p", "user", "safety_identifier", "service_tier"):
        if name in params:
            out[name] = params[name]
    if params.get("stream") is True:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    elif "stream" in params:
        out["stream"] = params["stream"]
    extra = _settings(params, out, refusals, dropped, anthropic)
    return Translated(out, tuple(dropped), names), extra, refusals


def _settings(params: dict, out: dict, refusals: Refusals, dropped: list, anthropic: bool) -> dict:
    """C{text}, C{reasoning}, C{include}, C{truncation}: into C{out}, or Anthropic's C{output_config}."""
    config: dict[str, Any] = {}
    text = params.get("text")
    if text is not None:
        if not isinstance(text, dict):
            refusals.add("text", "must be an object")
            text = {}
        for key, value in text.items():
            if value is None:
                continue
            if key == "format":
                _format(value, out, config, refusals, anthropic)
            elif key == "verbosity":
                out["verbosity"] = value
            else:
                refusals.add(f"text.{key}", "no equivalent")
    reasoning = params.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            refusals.add("reasoning", "must be an object")
            reasoning = {}
        for key, value in reasoning.items():
            if value is None:
                continue
            if key == "effort":
                _effort(value, out, config, refusals, anthropic)
            elif key in ("summary", "generate_summary"):
                dropped.append(f"reasoning.{key}")  # no reasoning summaries to give
            else:
                refusals.add(f"reasoning.{key}", "no equivalent")
    include = params.get("include")
    if include is not None:
        for i, value in enumerate(include if isinstance(include, list) else [include]):
            if value == "reasoning.encrypted_content":
                dropped.append("include.reasoning.encrypted_content")  # no reasoning items are produced
            else:
                refusals.add(f"include[{i}]={value}", "no equivalent")
    truncation = params.get("truncation")
    if truncation == "auto":
        dropped.append("truncation")  # the proxy truncates nothing: the provider may refuse a long input
    elif truncation is not None and truncation != "disabled":
        refusals.add("truncation", f"{truncation!r} is not a truncation mode")
    return config


def _format(value: Any, out: dict, config: dict, refusals: Refusals, anthropic: bool) -> None:
    """C{text.format} as the chat request's C{response_format} (which the chat translation maps on)."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return
    if kind == "json_schema" and isinstance(value.get("schema"), dict):
        schema = {k: value[k] for k in ("name", "description", "schema", "strict") if value.get(k) is not None}
        out["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif kind == "json_object":
        out["response_format"] = {"type": "json_object"}
    else:
        refusals.add(f"text.format.type={kind}", "no equivalent")


def _effort(value: Any, out: dict, config: dict, refusals: Refusals, anthropic: bool) -> None:
    """C{reasoning.effort} as the chat request's C{reasoning_effort} (mapped on for the target model)."""
    if value not in _EFFORTS:
        refusals.add("reasoning.effort", f"{value!r} is not an effort")
    else:
        out["reasoning_effort"] = value


# ---------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------


def _function(tool: dict, flat: str, where: str, refusals: Refusals) -> dict:
    for key in ("defer_loading", "output_schema", "allowed_callers"):
        if tool.get(key) not in (None, False):
            refusals.add(f"{where}.{key}", "no equivalent")
    function: dict[str, Any] = {"name": flat}
    if tool.get("description") is not None:
        function["description"] = tool["description"]
    parameters = tool.get("parameters")
    function["parameters"] = parameters if parameters is not None else dict(_EMPTY_SCHEMA)
    if tool.get("strict") is True:
        function["strict"] = True
    return {"type": "function", "function": function}


def _tools(params: dict, out: dict, refusals: Refusals, dropped: list) -> ToolNames:
    names = ToolNames()
    tools = params.get("tools")
    converted: list[dict] = []
    if tools is not None:
        if not isinstance(tools, list):
            refusals.add("tools", "must be a list")
            tools = []
        for i, tool in enumerate(tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind == "function" and isinstance(tool.get("name"), str):
                converted.append(_function(tool, tool["name"], f"tools[{i}]", refusals))
            elif kind == "namespace" and isinstance(tool.get("name"), str):
                _namespace(tool, i, names, converted, refusals)
            elif isinstance(kind, str) and kind.startswith(_OPTIONAL_TOOLS):
                dropped.append(f"tools[{i}].type={kind}")  # a hosted search: the model answers without it
            else:
                refusals.add(f"tools[{i}].type={kind}", "only function tools translate")
        seen: set[str] = set()
        for tool in converted:
            name = tool["function"]["name"]
            if name in seen:
                refusals.add(f"tools.{name}", "two tools have this name once namespaces are flattened")
            seen.add(name)
        if converted:
            out["tools"] = converted
    choice = params.get("tool_choice")
    if choice is not None:
        if choice in ("auto", "none", "required"):
            out["tool_choice"] = choice
        elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
            out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
        else:
            kind = choice.get("type") if isinstance(choice, dict) else choice
            refusals.add("tool_choice", f"{kind!r} has no equivalent")
    if "parallel_tool_calls" in params and converted:
        out["parallel_tool_calls"] = params["parallel_tool_calls"]
    return names


def _namespace(tool: dict, i: int, names: ToolNames, converted: list, refusals: Refusals) -> None:
    namespace = tool["name"]
    for j, inner in enumerate(tool.get("tools") or ()):
        where = f"tools[{i}].tools[{j}]"
        kind = inner.get("type") if isinstance(inner, dict) else None
        if kind != "function" or not isinstance(inner.get("name"), str):
            refusals.add(f"{where}.type={kind}", "only function tools translate")
            continue
        flat = names.join(namespace, inner["name"])
        if not _FLAT_NAME.match(flat):
            refusals.add(f"{where}.name", f"{flat!r} is not a valid tool name once flattened")
            continue
        names.flat[flat] = (namespace, inner["name"])
        converted.append(_function(inner, flat, where, refusals))


# ---------------------------------------------------------------------------
# Input items -> chat messages
# ---------------------------------------------------------------------------


def _messages(params: dict, names: ToolNames, refusals: Refusals, dropped: list) -> list[dict]:
    messages: list[dict] = []
    instructions = params.get("instructions")
    if isinstance(instructions, str):
        messages.append({"role": "system", "content": instructions})
    elif instructions is not None:
        refusals.add("instructions", "must be a string")
    items = params.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
        return messages
    if not isinstance(items, list):
        refusals.add("input", "must be a string or a list of items")
        return messages
    reasoning_dropped = False
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            refusals.add(where, "must be an object")
            continue
        kind = item.get("type", "message")
        if kind == "message":
            _message(item, where, messages, refusals)
        elif kind == "function_call":
            _call(item, where, names, messages, refusals)
        elif kind == "function_call_output":
            messages.append(_call_output(item, where, refusals))
        elif kind == "reasoning":
            reasoning_dropped = True  # an earlier turn's thinking: no other model can read it
        else:
            refusals.add(f"{where}.type={kind}", "no equivalent")
    if reasoning_dropped:
        dropped.append("input.type=reasoning")
    return messages


def _message(item: dict, where: str, messages: list, refusals: Refusals) -> None:
    role = item.get("role")
    content = item.get("content")
    if role in ("system", "developer"):
        messages.append({"role": "system", "content": _text(content, where, refusals)})
    elif role == "user":
        messages.append({"role": "user", "content": _user_content(content, where, refusals)})
    elif role == "assistant":
        text = _text(content, where, refusals, output=True)
        messages.append({"role": "assistant", "content": text})
    else:
        refusals.add(f"{where}.role", f"{role!r} is not a message role")


def _text(content: Any, where: str, refusals: Refusals, output: bool = False) -> str:
    """The text of a content that may only hold text (system prompts, assistant turns)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        refusals.add(f"{where}.content", "must be a string or a list of parts")
        return ""
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif output and kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            refusals.add(f"{where}.content[{j}].type={kind}", "only text is allowed here")
    return "".join(texts)


def _user_content(content: Any, where: str, refusals: Refusals) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        refusals.add(f"{where}.content", "must be a string or a list of parts")
        return ""
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and isinstance(part.get("image_url"), str):
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail") in ("low", "high", "auto"):
                image["detail"] = part["detail"]
            parts.append({"type": "image_url", "image_url": image})
        else:
            refusals.add(f"{where}.content[{j}].type={kind}", "no equivalent (images by URL only)")
    return parts


def _call(item: dict, where: str, names: ToolNames, messages: list, refusals: Refusals) -> None:
    call_id, name, arguments = item.get("call_id"), item.get("name"), item.get("arguments", "")
    if not isinstance(call_id, str) or not isinstance(name, str) or not isinstance(arguments, str):
        refusals.add(where, "a function_call needs call_id, name and arguments strings")
        return
    entry = {
        "id": call_id,
        "type": "function",
        "function": {"name": names.join(item.get("namespace"), name), "arguments": arguments},
    }
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(entry)
        if last.get("content") == "":
            last["content"] = None
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [entry]})


def _call_output(item: dict, where: str, refusals: Refusals) -> dict:
    call_id = item.get("call_id")
    output = item.get("output")
    if not isinstance(call_id, str):
        refusals.add(f"{where}.call_id", "must be a string")
    if isinstance(output, str):
        content: Any = output
    elif isinstance(output, list):
        content = []
        for j, part in enumerate(output):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
                content.append({"type": "text", "text": part["text"]})
            else:
                refusals.add(f"{where}.output[{j}].type={kind}", "tool results carry text only")
    else:
        content = json.dumps(output) if output is not None else ""
    return {"role": "tool", "tool_call_id": call_id, "content": content}
