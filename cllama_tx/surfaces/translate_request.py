"""
Request translation between OpenAI Chat Completions and Anthropic Messages.

Both directions carry every parameter that has a faithful equivalent and
refuse (L{UntranslatableRequest}) every one that does not, instead of
silently dropping it.  The few fields dropped on purpose are hints with no
effect on the answer (caching hints, image C{detail}, participant C{name});
C{docs/TRANSLATION.md} lists every decision.

Pure logic: no I/O.  The input document is never modified.
"""

from __future__ import annotations

import json
from typing import Any

from cllama_tx.surfaces.translate_common import (
    Refusals,
    UntranslatableRequest,
    anthropic_tool_id,
    dumps,
)

__all__ = ["chat_to_messages_request", "messages_to_chat_request"]

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
    "store": (lambda v: v is False, "OpenAI stored completions do not exist at Anthropic"),
    "metadata": (lambda v: v == {}, "OpenAI completion metadata has no Anthropic equivalent (use user)"),
}

#: OpenAI parameters refused whenever they are present (not null).
_CHAT_REFUSED: dict[str, str] = {
    "audio": "Anthropic answers in text only",
    "seed": "Anthropic has no sampling seed",
    "prediction": "Anthropic has no predicted outputs",
    "reasoning_effort": "no faithful mapping to Anthropic thinking",
    "verbosity": "Anthropic has no verbosity control",
    "web_search_options": "OpenAI web search is a hosted tool with no translation",
    "functions": "deprecated function calling; use tools",
    "function_call": "deprecated function calling; use tool_choice",
    "moderation": "OpenAI moderation has no Anthropic equivalent",
}

#: OpenAI parameters dropped on purpose: hints that change no answer.
_CHAT_DROPPED = frozenset(
    {
        "stream_options",  # usage is always streamed by Anthropic; the translator honours include_usage
        "prompt_cache_key",  # OpenAI cache routing hint
        "prompt_cache_retention",  # OpenAI cache retention hint
        "prompt_cache_options",  # OpenAI cache breakpoint hint
    }
)

_CHAT_HANDLED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "max_completion_tokens",
        "stream",
        "temperature",
        "top_p",
        "stop",
        "user",
        "safety_identifier",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "response_format",
        "service_tier",
    }
)


def chat_to_messages_request(doc: dict, default_max_tokens: int = 4096) -> dict:
    """
    An OpenAI chat request (its C{model} already the upstream id) as an
    Anthropic Messages request.  Raises L{UntranslatableRequest} naming every
    parameter that cannot be carried over.
    """
    refusals = Refusals(ANTHROPIC)
    if not isinstance(doc, dict):
        raise UntranslatableRequest({"body": "not a JSON object"}, ANTHROPIC)
    params = {k: v for k, v in doc.items() if v is not None}

    out: dict[str, Any] = {}
    if "model" in params:
        out["model"] = params["model"]
    max_tokens = params.get("max_completion_tokens", params.get("max_tokens"))
    out["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens

    system, messages = _chat_messages_to_anthropic(params.get("messages"), refusals)
    if system is not None:
        out["system"] = system
    out["messages"] = messages

    for name, value in params.items():
        if name in _CHAT_HANDLED or name in _CHAT_DROPPED:
            continue
        if name in _CHAT_NEUTRAL:
            neutral, reason = _CHAT_NEUTRAL[name]
            if not neutral(value):
                refusals.add(name, reason)
        elif name in _CHAT_REFUSED:
            refusals.add(name, _CHAT_REFUSED[name])
        else:
            refusals.add(name, "unknown parameter with no Anthropic equivalent")

    if "stop" in params:
        stop = params["stop"]
        out["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    if "stream" in params:
        out["stream"] = params["stream"]
    if "temperature" in params:
        temperature = params["temperature"]
        if _is_number(temperature) and temperature > 1:
            refusals.add(
                "temperature",
                f"{temperature} is above Anthropic's maximum of 1; refused rather than clamped",
            )
        else:
            out["temperature"] = temperature
    if "top_p" in params:
        out["top_p"] = params["top_p"]

    _chat_user_to_metadata(params, out, refusals)
    _chat_response_format(params.get("response_format"), refusals)
    _chat_service_tier(params, out, refusals)
    _chat_tools_to_anthropic(params, out, refusals)

    refusals.check()
    return out


def _chat_user_to_metadata(params: dict, out: dict, refusals: Refusals) -> None:
    user = params.get("user")
    safety = params.get("safety_identifier")
    if user is not None and safety is not None and user != safety:
        refusals.add("user", "differs from safety_identifier; Anthropic has one metadata.user_id")
    user_id = safety if safety is not None else user
    if user_id is not None:
        out["metadata"] = {"user_id": user_id}


def _chat_response_format(response_format: Any, refusals: Refusals) -> None:
    if response_format is None:
        return
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return
    if kind in ("json_schema", "json_object"):
        refusals.add(
            "response_format",
            f"type {kind}: JSON mode / structured output is not translated to Anthropic",
        )
    else:
        refusals.add("response_format", f"type {kind!r} has no Anthropic equivalent")


def _chat_service_tier(params: dict, out: dict, refusals: Refusals) -> None:
    tier = params.get("service_tier")
    if tier is None:
        return
    if tier == "auto":
        out["service_tier"] = "auto"
    elif tier == "default":
        out["service_tier"] = "standard_only"
    else:
        refusals.add("service_tier", f"{tier!r} has no Anthropic equivalent")


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
        else:
            refusals.add(f"{where}.content[{j}].type={kind}", "no Anthropic equivalent")
    return blocks


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


def _chat_messages_to_anthropic(messages: Any, refusals: Refusals) -> tuple[Any, list[dict]]:
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

_MESSAGES_REFUSED: dict[str, str] = {
    "top_k": "OpenAI has no top_k sampling",
    "container": "Anthropic code-execution containers have no OpenAI equivalent",
    "diagnostics": "Anthropic request diagnostics have no OpenAI equivalent",
    "inference_geo": "no OpenAI equivalent",
    "user_profile_id": "no OpenAI equivalent",
    "workspace_id": "no OpenAI equivalent",
    "mcp_servers": "Anthropic MCP connector has no OpenAI equivalent",
    "context_management": "Anthropic context management has no OpenAI equivalent",
}

_MESSAGES_DROPPED = frozenset({"cache_control"})  # prompt-caching hint

_MESSAGES_HANDLED = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "temperature",
        "top_p",
        "metadata",
        "stream",
        "tools",
        "tool_choice",
        "thinking",
        "service_tier",
        "output_config",
        "speed",
    }
)

#: Tool fields dropped on purpose (hints) and refused when set.
_TOOL_DROPPED = frozenset({"cache_control", "eager_input_streaming", "type"})
_TOOL_HANDLED = frozenset({"name", "description", "input_schema", "strict"})


def messages_to_chat_request(doc: dict, *, max_tokens_field: str = "max_completion_tokens") -> dict:
    """
    An Anthropic Messages request as an OpenAI chat request.  C{max_tokens}
    goes to C{max_tokens_field} (OpenAI's current C{max_completion_tokens} by
    default; pass C{"max_tokens"} for OpenAI-compatible servers that only
    know the older name).  A streaming request asks for
    C{stream_options.include_usage}.  Raises L{UntranslatableRequest}.
    """
    refusals = Refusals(OPENAI)
    if not isinstance(doc, dict):
        raise UntranslatableRequest({"body": "not a JSON object"}, OPENAI)
    params = {k: v for k, v in doc.items() if v is not None}

    out: dict[str, Any] = {}
    if "model" in params:
        out["model"] = params["model"]
    out["messages"] = _anthropic_messages_to_chat(params.get("system"), params.get("messages"), refusals)
    if "max_tokens" in params:
        out[max_tokens_field] = params["max_tokens"]

    for name in params:
        if name in _MESSAGES_HANDLED or name in _MESSAGES_DROPPED:
            continue
        refusals.add(name, _MESSAGES_REFUSED.get(name, "unknown parameter with no OpenAI equivalent"))

    if "stop_sequences" in params:
        out["stop"] = params["stop_sequences"]
    for name in ("temperature", "top_p"):
        if name in params:
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
                        out["user"] = value
                else:
                    refusals.add(f"metadata.{key}", "no OpenAI equivalent")

    thinking = params.get("thinking")
    if thinking is not None and not (isinstance(thinking, dict) and thinking.get("type") == "disabled"):
        refusals.add("thinking", "extended thinking has no OpenAI chat equivalent")

    tier = params.get("service_tier")
    if tier == "auto":
        out["service_tier"] = "auto"
    elif tier == "standard_only":
        out["service_tier"] = "default"
    elif tier is not None:
        refusals.add("service_tier", f"{tier!r} has no OpenAI equivalent")

    output_config = params.get("output_config")
    if isinstance(output_config, dict):
        for key, value in output_config.items():
            if value is not None:
                refusals.add(f"output_config.{key}", "not translated to OpenAI")
    elif output_config is not None:
        refusals.add("output_config", "must be an object")

    speed = params.get("speed")
    if speed is not None and speed != "standard":
        refusals.add("speed", f"{speed!r} has no OpenAI equivalent")

    _anthropic_tools_to_chat(params, out, refusals)

    refusals.check()
    return out


def _anthropic_tools_to_chat(params: dict, out: dict, refusals: Refusals) -> None:
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
                if key in _TOOL_HANDLED or key in _TOOL_DROPPED:
                    continue
                if key == "defer_loading" and value is False:
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


def _refuse_citations(block: dict, where: str, refusals: Refusals) -> None:
    if block.get("citations"):
        refusals.add(f"{where}.citations", "OpenAI messages carry no citations")


def _system_to_chat(system: Any, refusals: Refusals) -> dict | None:
    if system is None:
        return None
    if isinstance(system, str):
        return {"role": "system", "content": system}
    if not isinstance(system, list):
        refusals.add("system", "must be a string or a list of text blocks")
        return None
    parts = []
    for j, block in enumerate(system):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            _refuse_citations(block, f"system[{j}]", refusals)
            parts.append({"type": "text", "text": block["text"]})
        else:
            refusals.add(f"system[{j}].type={kind}", "only text blocks are allowed in system")
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


def _tool_message(block: dict, where: str, refusals: Refusals) -> dict:
    content = block.get("content")
    if content is None:
        text: Any = ""
    elif isinstance(content, str):
        text = content
    elif isinstance(content, list):
        parts = []
        for j, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                _refuse_citations(item, f"{where}.content[{j}]", refusals)
                parts.append({"type": "text", "text": item["text"]})
            else:
                refusals.add(
                    f"{where}.content[{j}].type={kind}", "OpenAI tool messages carry text only"
                )
        text = parts[0]["text"] if len(parts) == 1 else parts
    else:
        refusals.add(f"{where}.content", "must be a string or a list of blocks")
        text = ""
    return {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}


def _user_to_chat(content: Any, where: str, refusals: Refusals) -> list[dict]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        refusals.add(f"{where}.content", "must be a string or a list of blocks")
        return []
    tool_messages: list[dict] = []
    parts: list[dict] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            _refuse_citations(block, at, refusals)
            parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            part = _image_part(block, at, refusals)
            if part is not None:
                parts.append(part)
        elif kind == "tool_result":
            tool_messages.append(_tool_message(block, at, refusals))
        else:
            refusals.add(f"{at}.type={kind}", "no OpenAI equivalent")
    # OpenAI wants tool messages right after the assistant's tool calls.
    result = tool_messages
    if parts:
        if len(parts) == 1 and parts[0]["type"] == "text":
            result.append({"role": "user", "content": parts[0]["text"]})
        else:
            result.append({"role": "user", "content": parts})
    return result


def _assistant_to_chat(content: Any, where: str, refusals: Refusals) -> dict:
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
            _refuse_citations(block, at, refusals)
            texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": dumps(block.get("input", {}))},
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # earlier turns' thinking: not context for an OpenAI model
        else:
            refusals.add(f"{at}.type={kind}", "no OpenAI equivalent")
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _anthropic_messages_to_chat(system: Any, messages: Any, refusals: Refusals) -> list[dict]:
    out: list[dict] = []
    system_message = _system_to_chat(system, refusals)
    if system_message is not None:
        out.append(system_message)
    if not isinstance(messages, list):
        refusals.add("messages", "must be a list")
        return out
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role == "user":
            out.extend(_user_to_chat(message.get("content"), where, refusals))
        elif role == "assistant":
            out.append(_assistant_to_chat(message.get("content"), where, refusals))
        else:
            refusals.add(f"{where}.role={role}", "no OpenAI equivalent")
    if messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant":
        refusals.add(
            f"messages[{len(messages) - 1}].role=assistant",
            "a final assistant message is an Anthropic prefill; OpenAI has no continuation",
        )
    return out
