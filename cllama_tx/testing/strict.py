"""
What the real providers refuse, for the fake ones: a request body checked
as OpenAI Chat Completions and Anthropic Messages check it (their API
references, as typed by the official SDKs; C{tests/test_testing.py} holds
the parameter lists to the SDKs' own), with the target model's limits from
the catalog.  A translation that drops or maps a field is then tested
against an upstream as strict as the real one, not a lenient one.

L{anthropic_problems} and L{openai_problems} return what is wrong (empty
when the body would be accepted); L{strict} wraps a responder so that a
refused body gets the provider's own 400.  Pure logic but for L{strict}.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from cllama_tx.demo.server import ReceivedRequest, Reply, wire_format
from cllama_tx.demo.wire import anthropic_error, openai_error
from cllama_tx.providers.model_limits import traits_for
from cllama_tx.surfaces.model_traits import ModelTraits

__all__ = ["ANTHROPIC_PARAMS", "OPENAI_PARAMS", "anthropic_problems", "openai_problems", "strict"]

#: Every body parameter of the Messages API (the SDK's, betas included).
ANTHROPIC_PARAMS = frozenset(
    {
        "model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature", "top_k", "top_p",
        "metadata", "tools", "tool_choice", "thinking", "service_tier", "output_config", "speed", "cache_control",
        "container", "diagnostics", "inference_geo", "user_profile_id", "workspace_id", "context_management",
        "mcp_servers", "compaction", "fallbacks", "fallback_credit_token", "billing_policy", "thread",
    }
)

#: Every body parameter of Chat Completions (the SDK's).
OPENAI_PARAMS = frozenset(
    {
        "model", "messages", "audio", "frequency_penalty", "function_call", "functions", "logit_bias", "logprobs",
        "max_completion_tokens", "max_tokens", "metadata", "modalities", "moderation", "n", "parallel_tool_calls",
        "prediction", "presence_penalty", "prompt_cache_key", "prompt_cache_options", "prompt_cache_retention",
        "reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier", "stop", "store",
        "stream", "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p", "user",
        "verbosity", "web_search_options",
    }
)

_ID = re.compile(r"^[a-zA-Z0-9_-]+$")
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
_OPENAI_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_USER_BLOCKS = frozenset({"text", "image", "document", "search_result", "tool_result", "container_upload"})
_ASSISTANT_BLOCKS = frozenset(
    {"text", "tool_use", "thinking", "redacted_thinking", "server_tool_use", "web_search_tool_result"}
)
_EFFORTS = frozenset({"low", "medium", "high", "max"})
_LONG_CONTEXT = "context-1m-"


def _number(value: Any, low: float, high: float) -> bool:
    return type(value) in (int, float) and low <= value <= high


def _closed(schema: Any, where: str, problems: list[str]) -> None:
    """Anthropic's structured output: every object schema closed."""
    if isinstance(schema, dict):
        kind = schema.get("type")
        if (kind == "object" or (isinstance(kind, list) and "object" in kind)) and schema.get("additionalProperties") is not False:
            problems.append(f"{where}: For 'object' type, 'additionalProperties' must be explicitly set to false")
        for key, value in schema.items():
            if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
                for name, inner in value.items():
                    _closed(inner, f"{where}.{key}.{name}", problems)
            elif key in ("items", "anyOf", "allOf"):
                for inner in value if isinstance(value, list) else [value]:
                    _closed(inner, f"{where}.{key}", problems)


# --------------------------------------------------------------------------
# Anthropic Messages


def anthropic_problems(body: Any, betas: tuple[str, ...] = ()) -> list[str]:
    """What the Messages API would refuse in C{body} (empty: accepted)."""
    if not isinstance(body, dict):
        return ["the request body must be a JSON object"]
    problems = [f"{name}: Extra inputs are not permitted" for name in body if name not in ANTHROPIC_PARAMS]
    for name in ("model", "messages", "max_tokens"):
        if body.get(name) is None:
            problems.append(f"{name}: Field required")
    model = body.get("model")
    traits = traits_for("anthropic", model) if isinstance(model, str) else ModelTraits()
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        problems.append("max_tokens: Input should be a positive integer")
    elif traits.max_output_tokens is not None and type(max_tokens) is int and max_tokens > traits.max_output_tokens:
        problems.append(
            f"max_tokens: {max_tokens} > {traits.max_output_tokens}, which is the maximum allowed number of "
            f"output tokens for {model}"
        )
    if body.get("temperature") is not None and not _number(body["temperature"], 0, 1):
        problems.append("temperature: Input should be less than or equal to 1")
    if body.get("top_p") is not None and not _number(body["top_p"], 0, 1):
        problems.append("top_p: Input should be less than or equal to 1")
    metadata = body.get("metadata")
    if metadata is not None:
        extra = [k for k in metadata if k != "user_id"] if isinstance(metadata, dict) else ["(not an object)"]
        problems += [f"metadata.{k}: Extra inputs are not permitted" for k in extra]
        user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
        if user_id is not None and (not isinstance(user_id, str) or len(user_id) > 256):
            problems.append("metadata.user_id: String should have at most 256 characters")
    _anthropic_messages(body.get("messages"), problems)
    _anthropic_system(body.get("system"), problems)
    _anthropic_tools(body, problems)
    _anthropic_thinking(body, traits, problems)
    _anthropic_output_config(body.get("output_config"), traits, problems)
    if traits.known and not traits.long_context and any(b.startswith(_LONG_CONTEXT) for b in betas):
        problems.append(f"the long context beta is not supported for {model}")
    return problems


def _anthropic_text(block: dict, where: str, problems: list[str]) -> None:
    if not isinstance(block.get("text"), str) or not block["text"]:
        problems.append(f"{where}: text content blocks must be non-empty")


def _anthropic_system(system: Any, problems: list[str]) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        problems.append("system: Input should be a valid string or list")
        return
    for j, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text":
            problems.append(f"system.{j}: Input tag does not match 'text'")
        else:
            _anthropic_text(block, f"system.{j}", problems)


def _anthropic_messages(messages: Any, problems: list[str]) -> None:
    if not isinstance(messages, list):
        return
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant", "system"):
            problems.append(f"{where}.role: Input should be 'user' or 'assistant'")
            continue
        content = message.get("content")
        if isinstance(content, str):
            if not content and not (role == "assistant" and i == len(messages) - 1):
                problems.append(f"{where}: all messages must have non-empty content")
            continue
        if not isinstance(content, list) or not content:
            problems.append(f"{where}: all messages must have non-empty content")
            continue
        allowed = _ASSISTANT_BLOCKS if role == "assistant" else ({"text"} if role == "system" else _USER_BLOCKS)
        for j, block in enumerate(content):
            at = f"{where}.content.{j}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind not in allowed:
                problems.append(f"{at}: block type {kind!r} is not allowed in a {role} message")
            elif kind == "text":
                _anthropic_text(block, at, problems)
            elif kind == "tool_use" and not (isinstance(block.get("id"), str) and _ID.match(block["id"])):
                problems.append(f"{at}.id: String should match pattern '^[a-zA-Z0-9_-]+$'")
            elif kind == "tool_result" and not (isinstance(block.get("tool_use_id"), str) and _ID.match(block["tool_use_id"])):
                problems.append(f"{at}.tool_use_id: String should match pattern '^[a-zA-Z0-9_-]+$'")


def _anthropic_tools(body: dict, problems: list[str]) -> None:
    tools = body.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        if not isinstance(tool, dict):
            problems.append(f"tools.{i}: Input should be an object")
            continue
        if tool.get("type") in (None, "custom"):
            if not (isinstance(tool.get("name"), str) and _TOOL_NAME.match(tool["name"])):
                problems.append(f"tools.{i}.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'")
            if not isinstance(tool.get("input_schema"), dict):
                problems.append(f"tools.{i}.input_schema: Field required")
    choice = body.get("tool_choice")
    if choice is not None:
        if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
            problems.append("tool_choice: Input tag does not match any of 'auto', 'any', 'tool', 'none'")
        elif choice.get("type") == "tool" and not isinstance(choice.get("name"), str):
            problems.append("tool_choice.name: Field required")


def _anthropic_thinking(body: dict, traits: ModelTraits, problems: list[str]) -> None:
    thinking = body.get("thinking")
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if thinking is None or kind == "disabled":
        return
    if kind not in ("enabled", "adaptive"):
        problems.append("thinking: Input tag does not match any of 'enabled', 'disabled', 'adaptive'")
        return
    if traits.known and traits.thinking is None:
        problems.append(f"thinking: extended thinking is not supported for {body.get('model')}")
    if kind == "adaptive" and traits.known and traits.thinking != "adaptive":
        problems.append(f"thinking.type: 'adaptive' is not supported for {body.get('model')}")
    if kind == "enabled":
        budget = thinking.get("budget_tokens")
        max_tokens = body.get("max_tokens")
        if type(budget) is not int or budget < 1024:
            problems.append("thinking.enabled.budget_tokens: Input should be greater than or equal to 1024")
        elif type(max_tokens) is int and budget >= max_tokens:
            problems.append("`max_tokens` must be greater than `thinking.budget_tokens`")
    if body.get("temperature") not in (None, 1):
        problems.append("`temperature` may only be set to 1 when thinking is enabled")
    if body.get("top_k") is not None:
        problems.append("`top_k` must be unset when thinking is enabled")
    if body.get("top_p") is not None and not _number(body["top_p"], 0.95, 1):
        problems.append("`top_p` must be greater than or equal to 0.95 when thinking is enabled")
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") in ("any", "tool"):
        problems.append("Thinking may not be enabled when tool_choice forces tool use.")


def _anthropic_output_config(config: Any, traits: ModelTraits, problems: list[str]) -> None:
    if config is None:
        return
    if not isinstance(config, dict):
        problems.append("output_config: Input should be an object")
        return
    for key in config:
        if key not in ("effort", "format"):
            problems.append(f"output_config.{key}: Extra inputs are not permitted")
    effort = config.get("effort")
    if effort is not None and effort not in _EFFORTS:
        problems.append("output_config.effort: Input should be 'low', 'medium', 'high' or 'max'")
    elif effort is not None and traits.known and not traits.effort:
        problems.append("output_config.effort: effort is not supported by this model")
    fmt = config.get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
            problems.append("output_config.format: Input tag does not match 'json_schema'")
        else:
            _closed(fmt["schema"], "output_config.format.schema", problems)


# --------------------------------------------------------------------------
# OpenAI Chat Completions

_CONTENT_BY_ROLE = {
    "system": frozenset({"text"}),
    "developer": frozenset({"text"}),
    "user": frozenset({"text", "image_url", "input_audio", "file"}),
    "assistant": frozenset({"text", "refusal"}),
    "tool": frozenset({"text"}),
}


def openai_problems(body: Any, provider: str = "openai") -> list[str]:
    """What Chat Completions (at C{provider}) would refuse in C{body} (empty: accepted)."""
    if not isinstance(body, dict):
        return ["the request body must be a JSON object"]
    problems = [f"Unrecognized request argument supplied: {name}" for name in body if name not in OPENAI_PARAMS]
    for name in ("model", "messages"):
        if body.get(name) is None:
            problems.append(f"Missing required parameter: '{name}'.")
    model = body.get("model")
    traits = traits_for(provider, model) if isinstance(model, str) else ModelTraits()
    for name, low, high in (("temperature", 0, 2), ("top_p", 0, 1), ("presence_penalty", -2, 2), ("frequency_penalty", -2, 2)):
        value = body.get(name)
        if value is not None and not _number(value, low, high):
            problems.append(f"Invalid '{name}': number out of range [{low}, {high}].")
        elif value is not None and traits.fixed_sampling and name in ("temperature", "top_p") and value != 1:
            problems.append(
                f"Unsupported value: '{name}' does not support {value} with this model. Only the default (1) value is supported."
            )
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if type(value) is not int or value < 1:
            problems.append(f"Invalid '{name}': integer below minimum value.")
        elif traits.max_output_tokens is not None and value > traits.max_output_tokens:
            problems.append(
                f"{name} is too large: {value}. This model supports at most {traits.max_output_tokens} completion tokens"
            )
        if name == "max_tokens" and traits.reasoning_efforts:
            problems.append("Unsupported parameter: 'max_tokens' is not supported with this model. Use 'max_completion_tokens' instead.")
    effort = body.get("reasoning_effort")
    if effort is not None and traits.known:
        if not traits.reasoning_efforts:
            problems.append("Unsupported parameter: 'reasoning_effort' is not supported with this model.")
        elif effort not in traits.reasoning_efforts:
            problems.append(f"Unsupported value: 'reasoning_effort' does not support {effort!r} with this model.")
    if body.get("stream_options") is not None and body.get("stream") is not True:
        problems.append("The 'stream_options' parameter is only allowed when 'stream' is enabled.")
    tools = body.get("tools")
    if not tools:
        for name in ("parallel_tool_calls", "tool_choice"):
            if body.get(name) is not None:
                problems.append(f"Invalid value for '{name}': '{name}' is only allowed when 'tools' are specified.")
    for i, tool in enumerate(tools if isinstance(tools, list) else ()):
        function = tool.get("function") if isinstance(tool, dict) else None
        tool_name = function.get("name") if isinstance(function, dict) else None
        if tool.get("type") != "function" or not (isinstance(tool_name, str) and _OPENAI_NAME.match(tool_name)):
            problems.append(f"Invalid 'tools[{i}].function.name': string does not match pattern '^[a-zA-Z0-9_-]+$'.")
    n = body.get("n")
    if n is not None and (type(n) is not int or not 1 <= n <= 128):
        problems.append("Invalid 'n': integer out of range.")
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not _OPENAI_NAME.match(spec["name"]):
            problems.append("Missing required parameter: 'response_format.json_schema.name'.")
    _openai_messages(body.get("messages"), problems)
    return problems


def _openai_messages(messages: Any, problems: list[str]) -> None:
    if not isinstance(messages, list):
        return
    open_calls: list[str] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in _CONTENT_BY_ROLE:
            problems.append(f"Invalid value: '{role}'. Supported values are: 'system', 'assistant', 'user', 'tool', 'developer'.")
            continue
        if role == "tool":
            call_id = message.get("tool_call_id")
            if call_id not in open_calls:
                problems.append(
                    f"Invalid parameter: messages with role 'tool' must be a response to a preceeding message with 'tool_calls'. (messages[{i}])"
                )
            else:
                open_calls.remove(call_id)
            continue
        if open_calls:
            problems.append(
                "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
                f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(open_calls)}"
            )
            open_calls = []
        content = message.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in _CONTENT_BY_ROLE[role]:
                    problems.append(f"Invalid value: '{kind}'. Supported values are: {sorted(_CONTENT_BY_ROLE[role])} (messages[{i}].content[{j}])")
        elif content is None and not (role == "assistant" and message.get("tool_calls")):
            problems.append(f"Invalid value for 'content': expected a string, got null. (messages[{i}].content)")
        if role == "assistant":
            for call in message.get("tool_calls") or ():
                if isinstance(call, dict) and isinstance(call.get("id"), str):
                    open_calls.append(call["id"])
    if open_calls:
        problems.append(
            "An assistant message with 'tool_calls' must be followed by tool messages responding to each "
            f"'tool_call_id'. The following tool_call_ids did not have response messages: {', '.join(open_calls)}"
        )


# --------------------------------------------------------------------------
# The wrapper


def refusal(received: ReceivedRequest, provider: str = "openai") -> Reply | None:
    """The provider's 400 for a request it would refuse, else None."""
    if received.method != "POST" or received.path.endswith("/count_tokens"):
        return None
    kind = wire_format(received.path)
    path = received.path.rstrip("/")
    if kind == "anthropic" and path.endswith("/messages"):
        betas = tuple(b.strip() for b in (received.header("anthropic-beta") or "").split(",") if b.strip())
        problems = anthropic_problems(received.json, betas)
        if problems:
            return Reply(status=400, json=anthropic_error("invalid_request_error", "; ".join(problems)))
    elif path.endswith("/chat/completions"):
        problems = openai_problems(received.json, provider)
        if problems:
            return Reply(status=400, json=openai_error("; ".join(problems), "invalid_request_error"))
    return None


def strict(responder: Callable[[ReceivedRequest], Reply], provider: str = "openai") -> Callable[[ReceivedRequest], Reply]:
    """C{responder} behind the provider's checks: a body it would refuse gets its 400."""

    def respond(received: ReceivedRequest) -> Reply:
        refused = refusal(received, provider)
        return refused if refused is not None else responder(received)

    return respond
