"""
Response and error translation between OpenAI Chat Completions and
Anthropic Messages (complete JSON bodies; streams are in
L{cllama_tx.surfaces.translate_stream}).

Pure logic: no I/O, no clock (the caller passes C{created}).
"""

from __future__ import annotations

import json
from typing import Any

from cllama_tx.surfaces.errors import error_type as _surface_error_type
from cllama_tx.surfaces.translate_common import (
    anthropic_tool_id,
    anthropic_usage_to_openai,
    chat_id_from_message_id,
    count,
    dumps,
    finish_reason_from_stop_reason,
    mapping,
    message_id_from_chat_id,
    openai_usage_to_anthropic,
    stop_reason_from_finish_reason,
)

__all__ = [
    "anthropic_error_to_openai",
    "chat_response_to_messages",
    "messages_response_to_chat",
    "openai_error_to_anthropic",
]


# ---------------------------------------------------------------------------
# Complete responses
# ---------------------------------------------------------------------------


def messages_response_to_chat(doc: dict, *, created: int = 0, model: str | None = None) -> dict:
    """
    An Anthropic Message as a C{chat.completion}.  C{created} is the
    timestamp to report (the caller's clock; Anthropic sends none); C{model}
    overrides the model name reported.  Thinking blocks are dropped (an
    OpenAI chat message has no place for them).  Raises L{ValueError} when
    C{doc} is not a Message.
    """
    if not isinstance(doc, dict) or doc.get("type") != "message":
        raise ValueError("not an Anthropic Message")
    texts: list[str] = []
    calls: list[dict] = []
    content = doc.get("content")
    for block in content if isinstance(content, list) else ():
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": dumps(block.get("input", {}))},
                }
            )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
        "refusal": None,
        "annotations": [],
    }
    if calls:
        message["tool_calls"] = calls
    usage = mapping(doc.get("usage"))
    return {
        "id": chat_id_from_message_id(doc.get("id")),
        "object": "chat.completion",
        "created": created,
        "model": model if model is not None else doc.get("model"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": finish_reason_from_stop_reason(doc.get("stop_reason")),
            }
        ],
        "usage": anthropic_usage_to_openai(
            count(usage.get("input_tokens")),
            count(usage.get("output_tokens")),
            count(usage.get("cache_read_input_tokens")),
            count(usage.get("cache_creation_input_tokens")),
        ),
    }


def tool_input_from_arguments(arguments: Any) -> dict:
    """
    An OpenAI C{arguments} string as an Anthropic C{input} object.  Arguments
    that are not a JSON object (a model can emit broken JSON) are kept, not
    lost: C{{"_raw_arguments": <the string>}}.
    """
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments)
    except (TypeError, ValueError):
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    return {"_raw_arguments": arguments if isinstance(arguments, str) else dumps(arguments)}


def _first_choice(doc: dict) -> dict:
    choices = doc.get("choices")
    if not isinstance(choices, list):
        return {}
    for choice in choices:
        if isinstance(choice, dict) and choice.get("index", 0) == 0:
            return choice
    return {}


def reasoning_text(message: dict) -> str:
    """
    The reasoning an OpenAI-format provider returned beside the answer:
    C{reasoning_content} (DeepSeek, vLLM, Qwen) or C{reasoning} (OpenRouter,
    Groq, Ollama); empty when there is none.
    """
    for name in ("reasoning_content", "reasoning"):
        value = message.get(name)
        if isinstance(value, str) and value:
            return value
    return ""


def chat_response_to_messages(doc: dict, *, model: str | None = None, thinking: bool = False) -> dict:
    """
    A C{chat.completion} as an Anthropic Message (its first choice: the
    Anthropic surface cannot ask for more).  C{model} overrides the model
    name reported.  With C{thinking} (the request asked for thinking it may
    see), the provider's reasoning text opens the message as a C{thinking}
    block.  Raises L{ValueError} when C{doc} is not a completion.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("choices"), list):
        raise ValueError("not an OpenAI chat completion")
    message_id = message_id_from_chat_id(doc.get("id"))
    choice = _first_choice(doc)
    message = mapping(choice.get("message"))
    blocks: list[dict] = []
    reasoning = reasoning_text(message) if thinking else ""
    if reasoning:
        # No signature: a later turn's thinking goes to no Anthropic model.
        blocks.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    content = message.get("content")
    if isinstance(content, list):  # some OpenAI-compatible servers answer with parts
        content = "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    if isinstance(content, str) and content:
        blocks.append({"type": "text", "text": content})
    refused = False
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        blocks.append({"type": "text", "text": refusal})
        refused = True
    calls = message.get("tool_calls")
    for k, call in enumerate(calls if isinstance(calls, list) else ()):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        blocks.append(
            {
                "type": "tool_use",
                "id": anthropic_tool_id(call.get("id"), f"toolu_{message_id[4:]}_{k}"),
                "name": function.get("name") or "",
                "input": tool_input_from_arguments(function.get("arguments")),
            }
        )
    stop_reason = stop_reason_from_finish_reason(choice.get("finish_reason"))
    if refused and stop_reason == "end_turn":
        stop_reason = "refusal"
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model if model is not None else doc.get("model"),
        "content": blocks,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": openai_usage_to_anthropic(doc.get("usage")),
    }


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

# Anthropic documents one error type per status (docs: API errors).
_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_STATUS_BY_ANTHROPIC_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
# OpenAI error types and codes seen in bodies (mid-stream errors carry no status).
_STATUS_BY_OPENAI_KIND = {
    "invalid_request_error": 400,
    "invalid_api_key": 401,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "model_not_found": 404,
    "rate_limit_exceeded": 429,
    "rate_limit_error": 429,
    "insufficient_quota": 429,
    "requests": 429,
    "tokens": 429,
    "server_error": 500,
    "api_error": 500,
    "service_unavailable": 503,
    "overloaded": 503,
}

_MAX_MESSAGE = 2000


def anthropic_error_type(status: int | None, openai_kinds: tuple = ()) -> str:
    """The Anthropic error type for an HTTP status (or, mid-stream, for OpenAI's type/code)."""
    if status is None:
        for kind in openai_kinds:
            if kind in _STATUS_BY_OPENAI_KIND:
                status = _STATUS_BY_OPENAI_KIND[kind]
                break
        else:
            status = 500
    if status in _ANTHROPIC_TYPE_BY_STATUS:
        return _ANTHROPIC_TYPE_BY_STATUS[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def openai_error_type(status: int | None, anthropic_kind: Any = None) -> str:
    """The OpenAI error type for an HTTP status (or, mid-stream, for Anthropic's type)."""
    if status is None:
        status = _STATUS_BY_ANTHROPIC_TYPE.get(anthropic_kind, 500)
    return _surface_error_type(status, "openai")


def _loads(body: Any) -> Any:
    if isinstance(body, (dict, list)):
        return body
    try:
        return json.loads(body)
    except (TypeError, ValueError):
        return None


def _fallback_message(body: Any, status: int | None) -> str:
    if isinstance(body, (bytes, bytearray)):
        text = bytes(body[: _MAX_MESSAGE * 4]).decode("utf-8", "replace").strip()
    elif isinstance(body, str):
        text = body.strip()
    else:
        text = ""
    text = text[:_MAX_MESSAGE]
    if text:
        return text
    return f"upstream error (HTTP {status})" if status is not None else "upstream error"


def anthropic_error_doc_to_openai(status: int | None, body: Any) -> dict:
    """An Anthropic error (body bytes or parsed) as OpenAI's error object; never raises."""
    doc = _loads(body)
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict) and doc.get("type") != "error" and "message" in error:
        return doc  # already OpenAI-shaped
    kind = error.get("type") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str) or not message:
        message = _fallback_message(body, status)
    return {
        "error": {
            "message": message,
            "type": openai_error_type(status, kind),
            "param": None,
            "code": kind if isinstance(kind, str) else None,
        }
    }


def openai_error_doc_to_anthropic(status: int | None, body: Any) -> dict:
    """An OpenAI error (body bytes or parsed) as Anthropic's error object; never raises."""
    doc = _loads(body)
    if isinstance(doc, dict) and doc.get("type") == "error" and isinstance(doc.get("error"), dict):
        return doc  # already Anthropic-shaped
    error = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(error, dict):
        message = error.get("message")
        kinds = tuple(k for k in (error.get("code"), error.get("type")) if isinstance(k, str))
    else:
        message = error if isinstance(error, str) else None
        kinds = ()
    if not isinstance(message, str) or not message:
        message = _fallback_message(body, status)
    return {"type": "error", "error": {"type": anthropic_error_type(status, kinds), "message": message}}


def anthropic_error_to_openai(status: int, body: bytes) -> bytes:
    """
    An upstream Anthropic error body in OpenAI's shape
    (C{{"error": {"message", "type", "param", "code"}}}; C{code} keeps
    Anthropic's error type).  Best effort: a body that is not JSON becomes
    the message.  Never raises.
    """
    try:
        return dumps(anthropic_error_doc_to_openai(status, body)).encode("utf-8")
    except Exception:  # noqa: BLE001 - an error translator must not fail
        fallback = {"error": {"message": "upstream error", "type": "api_error", "param": None, "code": None}}
        return dumps(fallback).encode("utf-8")


def openai_error_to_anthropic(status: int, body: bytes) -> bytes:
    """
    An upstream OpenAI error body in Anthropic's shape
    (C{{"type": "error", "error": {"type", "message"}}}, the type from the
    status as Anthropic documents it).  Never raises.
    """
    try:
        return dumps(openai_error_doc_to_anthropic(status, body)).encode("utf-8")
    except Exception:  # noqa: BLE001 - an error translator must not fail
        fallback = {"type": "error", "error": {"type": "api_error", "message": "upstream error"}}
        return dumps(fallback).encode("utf-8")
