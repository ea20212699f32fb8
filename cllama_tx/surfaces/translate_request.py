"""
Request translation between OpenAI Chat Completions and Anthropic Messages.

One rule for every field, both directions: carried as it is, mapped to the
target's equivalent, dropped when it is advice the target cannot take (named
in the caller's L{Notes}, so the proxy tells the agent), or refused
(L{UntranslatableRequest}) when dropping it would change what the caller
gets.  What a field becomes may depend on the target model (its output
limit, its reasoning controls: L{ModelTraits}).  C{CHAT_TO_MESSAGES} and
C{MESSAGES_TO_CHAT} are the tables of C{docs/TRANSLATION.md}.

Pure logic: no I/O.  The input document is never modified.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cllama_tx.surfaces.model_traits import UNKNOWN_MODEL, ModelTraits
from cllama_tx.surfaces.translate_common import (
    Notes,
    Refusals,
    UntranslatableRequest,
    anthropic_tool_id,
    dumps,
)
from cllama_tx.surfaces.translate_reasoning import (
    anthropic_schema,
    anthropic_thinking,
    effort_from_anthropic,
    nearest_effort,
)

__all__ = ["CHAT_TO_MESSAGES", "MESSAGES_TO_CHAT", "chat_to_messages_request", "messages_to_chat_request"]

ANTHROPIC = "Anthropic Messages"
OPENAI = "OpenAI Chat Completions"

#: Image types the Messages API accepts in a base64 source.
IMAGE_MEDIA_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})

_EMPTY_SCHEMA = {"type": "object", "properties": {}}


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


# ---------------------------------------------------------------------------
# OpenAI chat request -> Anthropic Messages request
# ---------------------------------------------------------------------------

#: Every top-level parameter of an OpenAI chat request and what becomes of
#: it at Anthropic: C{docs/TRANSLATION.md}'s table, which a test holds to
#: this one.  A parameter not named here is refused.
CHAT_TO_MESSAGES: dict[str, str] = {
    "model": "carried",
    "messages": "mapped",
    "max_completion_tokens": "mapped, clamped",
    "max_tokens": "mapped, clamped",
    "stop": "mapped",
    "temperature": "carried, clamped",
    "top_p": "carried",
    "stream": "carried",
    "stream_options": "dropped",
    "user": "mapped, refused",
    "safety_identifier": "mapped, refused",
    "tools": "mapped, refused",
    "tool_choice": "mapped, refused",
    "parallel_tool_calls": "mapped",
    "response_format": "carried, mapped, refused",
    "service_tier": "mapped, dropped",
    "reasoning_effort": "mapped, dropped",
    "n": "carried, refused",
    "logprobs": "carried, refused",
    "top_logprobs": "carried, refused",
    "presence_penalty": "carried, refused",
    "frequency_penalty": "carried, refused",
    "logit_bias": "carried, refused",
    "modalities": "carried, refused",
    "audio": "refused",
    "seed": "dropped",
    "prediction": "dropped",
    "store": "dropped",
    "metadata": "dropped",
    "verbosity": "dropped",
    "prompt_cache_key": "dropped",
    "prompt_cache_retention": "dropped",
    "prompt_cache_options": "dropped",
    "web_search_options": "refused",
    "functions": "refused",
    "function_call": "refused",
    "moderation": "refused",
}

#: OpenAI parameters refused unless they hold their neutral value, with why.
_CHAT_NEUTRAL: dict[str, tuple[Any, str]] = {
    # name: (predicate for "neutral, nothing to carry", reason)
    "n": (lambda v: v == 1 and type(v) is int, "Anthropic returns one candidate per request"),
    "logprobs": (lambda v: v is False, "Anthropic returns no log probabilities"),
    "top_logprobs": (lambda v: v == 0 and type(v) is int, "Anthropic returns no log probabilities"),
    "presence_penalty": (lambda v: _is_number(v) and v == 0, "Anthropic has no presence penalty"),
    "frequency_penalty": (lambda v: _is_number(v) and v == 0, "Anthropic has no frequency penalty"),
    "logit_bias": (lambda v: v == {}, "Anthropic has no logit bias"),
    "modalities": (lambda v: v == ["text"], "Anthropic answers in text only"),
}

#: OpenAI parameters refused whenever they are present (not null).
_CHAT_REFUSED: dict[str, str] = {
    "audio": "Anthropic answers in text only",
    "web_search_options": "OpenAI web search is a hosted tool with no translation",
    "functions": "deprecated function calling; use tools",
    "function_call": "deprecated function calling; use tool_choice",
    "moderation": "OpenAI moderation has no Anthropic equivalent",
}

#: The instruction that carries JSON mode (C{response_format: json_object}):
#: Anthropic constrains output only to a schema, and JSON mode has none.
JSON_MODE_INSTRUCTION = "Answer with one valid JSON object and nothing else."

#: Anthropic's highest temperature (OpenAI's is 2).
MAX_ANTHROPIC_TEMPERATURE = 1


def chat_to_messages_request(
    doc: dict,
    default_max_tokens: int = 4096,
    *,
    traits: ModelTraits = UNKNOWN_MODEL,
    notes: Notes | None = None,
) -> dict:
    """
    An OpenAI chat request (its C{model} already the upstream id) as an
    Anthropic Messages request, for a model with C{traits}.  What was
    dropped or changed on the way is written to C{notes}.  Raises
    L{UntranslatableRequest} naming every parameter that cannot be carried
    over without changing the answer.
    """
    refusals = Refusals(ANTHROPIC)
    notes = notes if notes is not None else Notes()
    if not isinstance(doc, dict):
        raise UntranslatableRequest({"body": "not a JSON object"}, ANTHROPIC)
    params = {k: v for k, v in doc.items() if v is not None}

    out: dict[str, Any] = {}
    if "model" in params:
        out["model"] = params["model"]
    max_tokens = params.get("max_completion_tokens", params.get("max_tokens"))
    if max_tokens is None:
        max_tokens = default_max_tokens
        if traits.max_output_tokens is not None:
            max_tokens = min(max_tokens, traits.max_output_tokens)
    elif traits.max_output_tokens is not None and type(max_tokens) is int and max_tokens > traits.max_output_tokens:
        name = "max_completion_tokens" if "max_completion_tokens" in params else "max_tokens"
        notes.adjust(name, f"{max_tokens} lowered to {traits.max_output_tokens}, the model's most")
        max_tokens = traits.max_output_tokens
    out["max_tokens"] = max_tokens

    system, messages = _chat_messages_to_anthropic(params.get("messages"), refusals, notes)
    if system is not None:
        out["system"] = system
    out["messages"] = messages

    for name, value in params.items():
        outcome = CHAT_TO_MESSAGES.get(name)
        if outcome is None:
            refusals.add(name, "unknown parameter with no Anthropic equivalent")
        elif outcome == "dropped":
            notes.drop(name)
        elif name in _CHAT_NEUTRAL:
            neutral, reason = _CHAT_NEUTRAL[name]
            if not neutral(value):
                refusals.add(name, reason)
        elif name in _CHAT_REFUSED:
            refusals.add(name, _CHAT_REFUSED[name])

    if "stop" in params:
        stop = params["stop"]
        out["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    if "stream" in params:
        out["stream"] = params["stream"]
    if "temperature" in params:
        temperature = params["temperature"]
        if _is_number(temperature) and temperature > MAX_ANTHROPIC_TEMPERATURE:
            notes.adjust("temperature", f"{temperature} clamped to {MAX_ANTHROPIC_TEMPERATURE}, Anthropic's most")
            temperature = MAX_ANTHROPIC_TEMPERATURE
        out["temperature"] = temperature
    if "top_p" in params:
        out["top_p"] = params["top_p"]

    _chat_user_to_metadata(params, out, refusals)
    _chat_response_format(params.get("response_format"), out, refusals)
    _chat_service_tier(params, out, notes)
    _chat_tools_to_anthropic(params, out, refusals)
    _chat_reasoning(params.get("reasoning_effort"), out, traits, notes)

    refusals.check()
    return out


def _chat_user_to_metadata(params: dict, out: dict, refusals: Refusals) -> None:
    user = params.get("user")
    safety = params.get("safety_identifier")
    if user is not None and safety is not None and user != safety:
        refusals.add("user", "differs from safety_identifier; Anthropic has one metadata.user_id")
        refusals.add("safety_identifier", "differs from user; Anthropic has one metadata.user_id")
    user_id = safety if safety is not None else user
    if user_id is not None:
        out["metadata"] = {"user_id": user_id}


def _chat_response_format(response_format: Any, out: dict, refusals: Refusals) -> None:
    """
    JSON schema -> Anthropic structured output (C{output_config.format});
    JSON mode, which has no schema, -> an instruction at the end of the
    system prompt.
    """
    if response_format is None:
        return
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            refusals.add("response_format.json_schema.schema", "a JSON schema object is required")
            return
        out["output_config"] = {"format": {"type": "json_schema", "schema": anthropic_schema(schema)}}
    elif kind == "json_object":
        system = out.get("system")
        block = {"type": "text", "text": JSON_MODE_INSTRUCTION}
        if system is None:
            out["system"] = JSON_MODE_INSTRUCTION
        elif isinstance(system, str):
            out["system"] = [{"type": "text", "text": system}, block]
        else:
            out["system"] = [*system, block]
    else:
        refusals.add("response_format", f"type {kind!r} has no Anthropic equivalent")


def _chat_service_tier(params: dict, out: dict, notes: Notes) -> None:
    tier = params.get("service_tier")
    if tier is None:
        return
    if tier == "auto":
        out["service_tier"] = "auto"
    elif tier == "default":
        out["service_tier"] = "standard_only"
    else:
        notes.drop("service_tier")  # flex, scale, priority: a price and latency tier, not an answer


def _chat_reasoning(effort: Any, out: dict, traits: ModelTraits, notes: Notes) -> None:
    """
    C{reasoning_effort} -> thinking, where the model thinks and nothing in
    the request forbids it (Anthropic refuses thinking with a forced tool
    choice and with a temperature other than 1); else dropped.
    """
    if effort is None:
        return
    choice = out.get("tool_choice")
    forced = isinstance(choice, dict) and choice.get("type") in ("any", "tool")
    sampled = out.get("temperature", 1) != 1 or out.get("top_p", 1) < 0.95
    if not isinstance(effort, str) or forced or sampled:
        notes.drop("reasoning_effort")
        return
    try:
        thinking, level = anthropic_thinking(effort, traits, out["max_tokens"])
    except ValueError:
        notes.drop("reasoning_effort")
        return
    if thinking is not None:
        out["thinking"] = thinking
    if level is not None:
        out["output_config"] = {**out.get("output_config", {}), "effort": level}


def _chat_tools_to_anthropic(params: dict, out: dict, refusals: Refusals) -> None:
    tools = params.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            refusals.add("tools", "must be a list")
            tools = []
        converted = []
        for i, tool in enumerate(tools):
            kind = tool.get("type") if isinstance(tool, dict) else None
            function = tool.get("function") if isinstance(tool, dict) else None
            if kind != "function" or not isinstance(function, dict):
                refusals.add(f"tools[{i}].type={kind}", "only function tools translate to Anthropic")
                continue
            entry: dict[str, Any] = {"name": function.get("name")}
            if function.get("description") is not None:
                entry["description"] = function["description"]
            parameters = function.get("parameters")
            entry["input_schema"] = parameters if parameters is not None else dict(_EMPTY_SCHEMA)
            if function.get("strict") is True:
                entry["strict"] = True
            converted.append(entry)
        out["tools"] = converted

    choice: dict[str, Any] | None = None
    tool_choice = params.get("tool_choice")
    if tool_choice is not None:
        if tool_choice == "auto":
            choice = {"type": "auto"}
        elif tool_choice == "none":
            choice = {"type": "none"}
        elif tool_choice == "required":
            choice = {"type": "any"}
        elif (
            isinstance(tool_choice, dict)
            and tool_choice.get("type") == "function"
            and isinstance(tool_choice.get("function"), dict)
        ):
            choice = {"type": "tool", "name": tool_choice["function"].get("name")}
        else:
            kind = tool_choice.get("type") if isinstance(tool_choice, dict) else tool_choice
            refusals.add("tool_choice", f"{kind!r} has no Anthropic equivalent")

    parallel = params.get("parallel_tool_calls")
    if parallel is False and tools:
        if choice is None:
            choice = {"type": "auto"}
        if choice["type"] != "none":
            choice["disable_parallel_tool_use"] = True
    if choice is not None:
        out["tool_choice"] = choice


def _text_parts(content: Any, where: str, refusals: Refusals, allow_refusal: bool = False) -> list[dict]:
    """String or array of text parts -> Anthropic text blocks."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        refusals.add(f"{where}.content", "must be a string or a list of parts")
        return []
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif allow_refusal and kind == "refusal" and isinstance(part.get("refusal"), str):
            blocks.append({"type": "text", "text": part["refusal"]})
        else:
            refusals.add(f"{where}.content[{j}].type={kind}", "only text parts are allowed here")
    return blocks


def _image_block(part: dict, where: str, refusals: Refusals) -> dict | None:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        refusals.add(f"{where}.image_url", "missing url")
        return None
    if url.startswith("data:"):
        header, comma, data = url[5:].partition(",")
        media_type, _, encoding = header.partition(";")
        media_type = media_type.strip().lower()
        if not comma or encoding.strip().lower() != "base64":
            refusals.add(f"{where}.image_url", "data URLs must be base64")
            return None
        if media_type not in IMAGE_MEDIA_TYPES:
            refusals.add(f"{where}.image_url", f"media type {media_type!r} is not accepted by Anthropic")
            return None
        return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    refusals.add(f"{where}.image_url", "only data: and http(s) image URLs translate")
    return None


def _user_content(content: Any, where: str, refusals: Refusals) -> Any:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        refusals.add(f"{where}.content", "must be a string or a list of parts")
        return ""
    blocks = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            blocks.append({"type": "text", "text": part["text"]})
        elif kind == "image_url":
            block = _image_block(part, f"{where}.content[{j}]", refusals)
            if block is not None:
                blocks.append(block)
        elif kind == "file":
            block = _document_block(part, f"{where}.content[{j}]", refusals)
            if block is not None:
                blocks.append(block)
        else:
            refusals.add(f"{where}.content[{j}].type={kind}", "no Anthropic equivalent")
    return blocks


def _document_block(part: dict, where: str, refusals: Refusals) -> dict | None:
    """An OpenAI C{file} part with inline PDF data -> an Anthropic C{document} block."""
    file = part.get("file")
    data = file.get("file_data") if isinstance(file, dict) else None
    if not isinstance(data, str) or not data.startswith("data:"):
        refusals.add(f"{where}.file", "only inline file_data translates (a file_id lives at OpenAI)")
        return None
    header, comma, payload = data[5:].partition(",")
    media_type, _, encoding = header.partition(";")
    if not comma or encoding.strip().lower() != "base64" or media_type.strip().lower() != "application/pdf":
        refusals.add(f"{where}.file", "only base64 PDF data translates to an Anthropic document")
        return None
    return {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": payload}}


def _assistant_blocks(message: dict, where: str, refusals: Refusals) -> list[dict]:
    blocks: list[dict] = []
    content = message.get("content")
    if content is not None:
        blocks.extend(_text_parts(content, where, refusals, allow_refusal=True))
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        blocks.append({"type": "text", "text": refusal})
    # Anthropic rejects empty text blocks; an empty string carries nothing.
    blocks = [b for b in blocks if b["text"]]
    for name in ("audio", "function_call"):
        if message.get(name) is not None:
            refusals.add(f"{where}.{name}", "no Anthropic equivalent")
    tool_calls = message.get("tool_calls")
    if tool_calls is None:
        return blocks
    if not isinstance(tool_calls, list):
        refusals.add(f"{where}.tool_calls", "must be a list")
        return blocks
    for k, call in enumerate(tool_calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or call.get("type", "function") != "function":
            kind = call.get("type") if isinstance(call, dict) else None
            refusals.add(f"{where}.tool_calls[{k}].type={kind}", "only function tool calls translate")
            continue
        arguments = function.get("arguments")
        if arguments is None or arguments == "":
            parsed: Any = {}
        else:
            try:
                parsed = json.loads(arguments) if isinstance(arguments, str) else None
            except ValueError:
                parsed = None
        if not isinstance(parsed, dict):
            refusals.add(
                f"{where}.tool_calls[{k}].function.arguments",
                "not a JSON object; Anthropic tool_use input must be an object",
            )
            continue
        blocks.append(
            {
                "type": "tool_use",
                "id": anthropic_tool_id(call.get("id"), f"toolu_missing_{where}_{k}"),
                "name": function.get("name"),
                "input": parsed,
            }
        )
    return blocks


def _tool_result(message: dict, where: str, refusals: Refusals) -> dict:
    content = message.get("content")
    result: dict[str, Any] = {
        "type": "tool_result",
        "tool_use_id": anthropic_tool_id(message.get("tool_call_id"), ""),
    }
    if not result["tool_use_id"]:
        refusals.add(f"{where}.tool_call_id", "missing")
    if isinstance(content, str):
        result["content"] = content
    elif content is not None:
        result["content"] = _text_parts(content, where, refusals)
    return result


def _as_blocks(content: Any) -> list:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    return list(content)


def _chat_messages_to_anthropic(messages: Any, refusals: Refusals, notes: Notes) -> tuple[Any, list[dict]]:
    """
    OpenAI messages -> (Anthropic C{system}, Anthropic C{messages}).

    System and developer messages become the top-level system prompt (in
    order, wherever they stood: Anthropic has no system role inside the
    conversation).  Tool messages become C{tool_result} blocks of a user
    turn, and consecutive turns of one role are merged, since Anthropic
    wants user and assistant turns to alternate.
    """
    if not isinstance(messages, list):
        refusals.add("messages", "must be a list")
        return None, []
    system_blocks: list[dict] = []
    system_strings: list[str] = []
    turns: list[list] = []  # [role, content] with content str or list of blocks

    def append(role: str, content: Any) -> None:
        if turns and turns[-1][0] == role:
            turns[-1][1] = _as_blocks(turns[-1][1]) + _as_blocks(content)
        else:
            turns.append([role, content])

    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            refusals.add(where, "not an object")
            continue
        role = message.get("role")
        if message.get("name") is not None:
            notes.drop("messages[].name")  # a participant label: Anthropic has none
        if role in ("system", "developer"):
            content = message.get("content")
            if isinstance(content, str):
                system_strings.append(content)
            system_blocks.extend(_text_parts(content, where, refusals))
        elif role == "user":
            append("user", _user_content(message.get("content"), where, refusals))
        elif role == "assistant":
            blocks = _assistant_blocks(message, where, refusals)
            if blocks:
                append("assistant", blocks)
        elif role == "tool":
            append("user", [_tool_result(message, where, refusals)])
        else:
            refusals.add(f"{where}.role={role}", "no Anthropic equivalent")

    conversation = [
        (i, m)
        for i, m in enumerate(messages)
        if isinstance(m, dict) and m.get("role") not in ("system", "developer")
    ]
    if conversation and conversation[-1][1].get("role") == "assistant":
        refusals.add(
            f"messages[{conversation[-1][0]}].role=assistant",
            "a final assistant message would become an Anthropic prefill (a continuation)",
        )

    system: Any = None
    if len(system_strings) == 1 and len(system_blocks) == 1:
        system = system_strings[0]
    elif system_blocks:
        system = system_blocks
    # A lone assistant turn made only of text stays a list of blocks; user
    # turns that were a plain string stay a plain string.
    return system, [{"role": role, "content": content} for role, content in turns]


# ---------------------------------------------------------------------------
# Anthropic Messages request -> OpenAI chat request
# ---------------------------------------------------------------------------

#: Every top-level parameter of an Anthropic Messages request and what
#: becomes of it at an OpenAI-format provider (C{docs/TRANSLATION.md}).
MESSAGES_TO_CHAT: dict[str, str] = {
    "model": "carried",
    "messages": "mapped",
    "max_tokens": "mapped, clamped",
    "system": "mapped",
    "stop_sequences": "mapped",
    "temperature": "carried, dropped",
    "top_p": "carried, dropped",
    "top_k": "refused",
    "metadata": "mapped, refused",
    "stream": "carried",
    "tools": "mapped, refused",
    "tool_choice": "mapped",
    "thinking": "mapped, dropped",
    "output_config": "mapped, dropped",
    "service_tier": "mapped",
    "speed": "carried, dropped",
    "cache_control": "dropped",
    "context_management": "dropped",
    "container": "refused",
    "mcp_servers": "refused",
    "inference_geo": "refused",
    "diagnostics": "refused",
    "user_profile_id": "refused",
    "workspace_id": "refused",
}

_MESSAGES_REFUSED: dict[str, str] = {
    "top_k": "OpenAI has no top_k sampling",
    "container": "Anthropic code-execution containers have no OpenAI equivalent",
    "diagnostics": "Anthropic request diagnostics have no OpenAI equivalent",
    "inference_geo": "where inference runs cannot be chosen at an OpenAI-format provider",
    "user_profile_id": "no OpenAI equivalent",
    "workspace_id": "no OpenAI equivalent",
    "mcp_servers": "Anthropic MCP connector has no OpenAI equivalent",
}

#: Tool fields dropped on purpose (hints) and refused when set.
_TOOL_DROPPED = frozenset({"cache_control", "eager_input_streaming", "type"})
_TOOL_HANDLED = frozenset({"name", "description", "input_schema", "strict"})

#: OpenAI's C{user} and C{safety_identifier} are short identifiers; a longer
#: C{metadata.user_id} (Claude Code sends a JSON object) is sent as its digest.
MAX_OPENAI_USER = 64


def messages_to_chat_request(
    doc: dict,
    *,
    max_tokens_field: str = "max_completion_tokens",
    traits: ModelTraits = UNKNOWN_MODEL,
    notes: Notes | None = None,
) -> dict:
    """
    An Anthropic Messages request as an OpenAI chat request, for a model
    with C{traits}.  C{max_tokens} goes to C{max_tokens_field} (OpenAI's
    current C{max_completion_tokens} by default; pass C{"max_tokens"} for
    OpenAI-compatible servers that only know the older name).  A streaming
    request asks for C{stream_options.include_usage}.  What was dropped or
    changed is written to C{notes}.  Raises L{UntranslatableRequest}.
    """
    refusals = Refusals(OPENAI)
    notes = notes if notes is not None else Notes()
    if not isinstance(doc, dict):
        raise UntranslatableRequest({"body": "not a JSON object"}, OPENAI)
    params = {k: v for k, v in doc.items() if v is not None}

    out: dict[str, Any] = {}
    if "model" in params:
        out["model"] = params["model"]
    out["messages"] = _anthropic_messages_to_chat(params.get("system"), params.get("messages"), refusals, notes)
    if "max_tokens" in params:
        max_tokens = params["max_tokens"]
        most = traits.max_output_tokens
        if most is not None and type(max_tokens) is int and max_tokens > most:
            notes.adjust("max_tokens", f"{max_tokens} lowered to {most}, the model's most")
            max_tokens = most
        out[max_tokens_field] = max_tokens

    for name in params:
        outcome = MESSAGES_TO_CHAT.get(name)
        if outcome is None:
            refusals.add(name, "unknown parameter with no OpenAI equivalent")
        elif outcome == "dropped":
            notes.drop(name)
        elif outcome == "refused":
            refusals.add(name, _MESSAGES_REFUSED.get(name, "no OpenAI equivalent"))

    if "stop_sequences" in params:
        out["stop"] = params["stop_sequences"]
    for name in ("temperature", "top_p"):
        if name in params:
            if traits.fixed_sampling:
                notes.drop(name)  # a reasoning model samples as it must, and refuses the field
            else:
                out[name] = params[name]
    if "stream" in params:
        out["stream"] = params["stream"]
        if params["stream"] is True:
            out["stream_options"] = {"include_usage": True}

    metadata = params.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            refusals.add("metadata", "must be an object")
        else:
            for key, value in metadata.items():
                if key == "user_id":
                    if value is not None:
                        out["user"] = _openai_user(value)
                else:
                    refusals.add(f"metadata.{key}", "no OpenAI equivalent")

    tier = params.get("service_tier")
    if tier == "auto":
        out["service_tier"] = "auto"
    elif tier == "standard_only":
        out["service_tier"] = "default"
    elif tier is not None:
        refusals.add("service_tier", f"{tier!r} has no OpenAI equivalent")

    output_config = params.get("output_config")
    if output_config is not None and not isinstance(output_config, dict):
        refusals.add("output_config", "must be an object")
        output_config = None
    output_config = output_config or {}
    for key, value in output_config.items():
        if value is not None and key not in ("effort", "format"):
            refusals.add(f"output_config.{key}", "no OpenAI equivalent")
    _output_format(output_config.get("format"), out, refusals)
    _anthropic_reasoning(params.get("thinking"), output_config.get("effort"), out, traits, notes)

    speed = params.get("speed")
    if speed is not None and speed != "standard":
        notes.drop("speed")  # a faster tier: the same answer, sooner

    _anthropic_tools_to_chat(params, out, refusals, notes)

    refusals.check()
    return out


def _openai_user(user_id: Any) -> Any:
    """C{metadata.user_id} as OpenAI's C{user}: as it is when short, else a stable digest of it."""
    if not isinstance(user_id, str) or len(user_id) <= MAX_OPENAI_USER:
        return user_id
    return "sha256-" + hashlib.sha256(user_id.encode("utf-8")).hexdigest()[:48]


def _output_format(fmt: Any, out: dict, refusals: Refusals) -> None:
    """Anthropic structured output -> OpenAI C{response_format: json_schema}."""
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        refusals.add("output_config.format", "only a json_schema format translates")
        return
    out["response_format"] = {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": fmt["schema"], "strict": False},
    }


def _anthropic_reasoning(thinking: Any, effort: Any, out: dict, traits: ModelTraits, notes: Notes) -> None:
    """
    C{thinking} and C{output_config.effort} -> C{reasoning_effort}, the
    nearest value the model takes; dropped for a model that takes none.
    """
    wanted = effort_from_anthropic(thinking, effort)
    if wanted is None:
        if thinking is not None:
            notes.drop("thinking")
        return
    chosen = nearest_effort(wanted, traits.reasoning_efforts)
    if chosen is None:
        if thinking is not None:
            notes.drop("thinking")
        if effort is not None:
            notes.drop("output_config.effort")
        return
    out["reasoning_effort"] = chosen


def _anthropic_tools_to_chat(params: dict, out: dict, refusals: Refusals, notes: Notes) -> None:
    tools = params.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            refusals.add("tools", "must be a list")
            tools = []
        converted = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                refusals.add(f"tools[{i}]", "not an object")
                continue
            kind = tool.get("type")
            if kind not in (None, "custom") or "input_schema" not in tool:
                refusals.add(f"tools[{i}].type={kind}", "Anthropic server tool; no OpenAI equivalent")
                continue
            for key, value in tool.items():
                if key in _TOOL_DROPPED and key != "type" and value is not None:
                    notes.drop(key)  # caching and streaming hints
                if key in _TOOL_HANDLED or key in _TOOL_DROPPED:
                    continue
                if key == "defer_loading":
                    if value is True:
                        notes.drop("tools[].defer_loading")  # the tool is declared up front instead of on demand
                    continue
                if value is None or value == []:
                    continue
                refusals.add(f"tools[{i}].{key}", "no OpenAI equivalent")
            function: dict[str, Any] = {"name": tool.get("name")}
            if tool.get("description") is not None:
                function["description"] = tool["description"]
            function["parameters"] = tool.get("input_schema")
            if tool.get("strict") is True:
                function["strict"] = True
            converted.append({"type": "function", "function": function})
        out["tools"] = converted

    choice = params.get("tool_choice")
    if choice is None:
        return
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
    else:
        refusals.add("tool_choice", f"type {kind!r} has no OpenAI equivalent")
        return
    if choice.get("disable_parallel_tool_use") is True and tools:
        out["parallel_tool_calls"] = False


def _block_hints(block: dict, notes: Notes) -> None:
    """Hints on a block that change no answer: named, not carried."""
    if block.get("cache_control") is not None:
        notes.drop("cache_control")
    if block.get("citations"):
        notes.drop("citations")  # the text is carried; its citation marks have no place in OpenAI messages


def _system_to_chat(system: Any, where: str, refusals: Refusals, notes: Notes) -> dict | None:
    """A system prompt (top level, or a C{system} turn inside the conversation) -> a C{system} message."""
    if system is None:
        return None
    if isinstance(system, str):
        return {"role": "system", "content": system}
    if not isinstance(system, list):
        refusals.add(where, "must be a string or a list of text blocks")
        return None
    parts = []
    for j, block in enumerate(system):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            _block_hints(block, notes)
            parts.append({"type": "text", "text": block["text"]})
        else:
            refusals.add(f"{where}[{j}].type={kind}", "only text blocks are allowed in system")
    if not parts:
        return None
    if len(parts) == 1:
        return {"role": "system", "content": parts[0]["text"]}
    return {"role": "system", "content": parts}


def _image_part(block: dict, where: str, refusals: Refusals) -> dict | None:
    source = block.get("source")
    if not isinstance(source, dict):
        source = {}
    kind = source.get("type")
    if kind == "base64":
        return {
            "type": "image_url",
            "image_url": {"url": f"data:{source.get('media_type')};base64,{source.get('data')}"},
        }
    if kind == "url":
        return {"type": "image_url", "image_url": {"url": source.get("url")}}
    refusals.add(f"{where}.source.type={kind}", "only base64 and url images translate")
    return None


def _document_parts(block: dict, where: str, refusals: Refusals, notes: Notes) -> list[dict]:
    """
    A C{document} block -> OpenAI parts: a base64 PDF as a C{file} part,
    plain text and content documents as their text (and images).
    """
    source = block.get("source")
    source = source if isinstance(source, dict) else {}
    kind = source.get("type")
    if block.get("title") is not None or block.get("context") is not None:
        notes.drop("document.title")  # labels for citations, which do not come back
    _block_hints(block, notes)
    if kind == "base64" and source.get("media_type") == "application/pdf" and isinstance(source.get("data"), str):
        return [
            {
                "type": "file",
                "file": {"filename": "document.pdf", "file_data": f"data:application/pdf;base64,{source['data']}"},
            }
        ]
    if kind == "text" and isinstance(source.get("data"), str):
        return [{"type": "text", "text": source["data"]}]
    if kind == "content":
        content = source.get("content")
        if isinstance(content, str):
            return [{"type": "text", "text": content}]
        parts: list[dict] = []
        for j, item in enumerate(content if isinstance(content, list) else ()):
            item_kind = item.get("type") if isinstance(item, dict) else None
            if item_kind == "text" and isinstance(item.get("text"), str):
                parts.append({"type": "text", "text": item["text"]})
            elif item_kind == "image":
                part = _image_part(item, f"{where}.source.content[{j}]", refusals)
                if part is not None:
                    parts.append(part)
            else:
                refusals.add(f"{where}.source.content[{j}].type={item_kind}", "no OpenAI equivalent")
        return parts
    refusals.add(f"{where}.source.type={kind}", "only base64 PDF, text and content documents translate")
    return []


def _tool_message(block: dict, where: str, refusals: Refusals, notes: Notes) -> tuple[dict, list[dict]]:
    """
    A C{tool_result} -> a C{tool} message with its text, and the images it
    holds as parts for a user message right after (OpenAI tool messages
    carry text only).
    """
    content = block.get("content")
    images: list[dict] = []
    if block.get("is_error") is True:
        notes.drop("tool_result.is_error")  # the error's text is carried
    _block_hints(block, notes)
    if content is None:
        text: Any = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for j, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                _block_hints(item, notes)
                parts.append({"type": "text", "text": item["text"]})
            elif kind == "image":
                part = _image_part(item, f"{where}.content[{j}]", refusals)
                if part is not None:
                    images.append(part)
            elif kind == "document":
                images.extend(_document_parts(item, f"{where}.content[{j}]", refusals, notes))
            else:
                refusals.add(f"{where}.content[{j}].type={kind}", "no OpenAI equivalent in a tool result")
        if images and not parts:
            parts = [{"type": "text", "text": "(the result follows in the next message)"}]
        text = parts[0]["text"] if len(parts) == 1 else parts
    else:
        refusals.add(f"{where}.content", "must be a string or a list of blocks")
        text = ""
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}, images


def _user_to_chat(content: Any, where: str, refusals: Refusals, notes: Notes) -> list[dict]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        refusals.add(f"{where}.content", "must be a string or a list of blocks")
        return []
    tool_messages: list[dict] = []
    from_tools: list[dict] = []
    parts: list[dict] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            _block_hints(block, notes)
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            _block_hints(block, notes)
            part = _image_part(block, at, refusals)
            if part is not None:
                parts.append(part)
        elif kind == "document":
            parts.extend(_document_parts(block, at, refusals, notes))
        elif kind == "tool_result":
            message, images = _tool_message(block, at, refusals, notes)
            tool_messages.append(message)
            from_tools.extend(images)
        else:
            refusals.add(f"{at}.type={kind}", "no OpenAI equivalent")
    # OpenAI wants tool messages right after the assistant's tool calls.
    result = tool_messages
    parts = from_tools + parts
    if parts:
        if len(parts) == 1 and parts[0]["type"] == "text":
            result.append({"role": "user", "content": parts[0]["text"]})
        else:
            result.append({"role": "user", "content": parts})
    return result


def _assistant_to_chat(content: Any, where: str, refusals: Refusals, notes: Notes) -> dict:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        refusals.add(f"{where}.content", "must be a string or a list of blocks")
        return {"role": "assistant", "content": ""}
    texts: list[str] = []
    calls: list[dict] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            _block_hints(block, notes)
            texts.append(block["text"])
        elif kind == "tool_use":
            _block_hints(block, notes)
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": dumps(block.get("input", {}))},
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            notes.drop("messages[].content.type=thinking")  # earlier turns' thinking: no other model reads it
        else:
            refusals.add(f"{at}.type={kind}", "no OpenAI equivalent")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _anthropic_messages_to_chat(system: Any, messages: Any, refusals: Refusals, notes: Notes) -> list[dict]:
    """
    The system prompt and the turns as OpenAI messages; a C{system} turn
    inside the conversation stays where it is, as a C{system} message.
    """
    out: list[dict] = []
    system_message = _system_to_chat(system, "system", refusals, notes)
    if system_message is not None:
        out.append(system_message)
    if not isinstance(messages, list):
        refusals.add("messages", "must be a list")
        return out
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user":
            out.extend(_user_to_chat(message.get("content"), where, refusals, notes))
        elif role == "assistant":
            out.append(_assistant_to_chat(message.get("content"), where, refusals, notes))
        elif role == "system":
            inside = _system_to_chat(message.get("content"), f"{where}.content", refusals, notes)
            if inside is not None:
                out.append(inside)
        else:
            refusals.add(f"{where}.role={role}", "no OpenAI equivalent")
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        refusals.add(
            f"messages[{len(messages) - 1}].role=assistant",
            "a final assistant message is an Anthropic prefill; OpenAI has no continuation",
        )
    return out
