"""
The OpenAI Responses API's objects as the proxy builds them: the
C{response} object (with the request's settings echoed, as OpenAI does), its
output items, its C{usage}, the SSE events of a stream and the two events a
failed stream ends with (C{error}, then C{response.failed}).

The translators that answer a Responses agent from another wire format, and
the proxy when a stream breaks, write their answers with these, so every
answer has the shape the C{openai} SDK's types require.  Pure logic.
"""

from __future__ import annotations

from typing import Any

from cllama_tx.surfaces.translate_common import count, dumps, mapping

__all__ = [
    "ECHOED",
    "failure_events",
    "response_error",
    "response_object",
    "responses_usage",
    "sse_event",
]

#: The request settings a Response echoes back, with OpenAI's defaults.
ECHOED: dict[str, Any] = {
    "instructions": None,
    "max_output_tokens": None,
    "max_tool_calls": None,
    "metadata": {},
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "prompt_cache_key": None,
    "reasoning": None,
    "safety_identifier": None,
    "service_tier": None,
    "store": True,
    "temperature": None,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_logprobs": None,
    "top_p": None,
    "truncation": "disabled",
    "user": None,
}


def sse_event(name: str, doc: dict) -> bytes:
    """One Responses SSE event: the event name and its JSON, as OpenAI writes them."""
    return b"event: " + name.encode("ascii") + b"\ndata: " + dumps(doc).encode("utf-8") + b"\n\n"


def responses_usage(input_tokens: int, output_tokens: int, cached: int = 0, cache_write: int = 0, reasoning: int = 0) -> dict:
    """
    A Responses C{usage}: C{input_tokens} counts every input token (cache
    reads and writes included, as C{prompt_tokens} does on the chat
    surface), C{output_tokens} every output token (reasoning included).
    """
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": cache_write},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output_tokens,
    }


def chat_usage_to_responses(usage: Any) -> dict:
    """A chat C{usage} object as a Responses one (same totals)."""
    usage = mapping(usage)
    details = mapping(usage.get("prompt_tokens_details"))
    output_details = mapping(usage.get("completion_tokens_details"))
    return responses_usage(
        count(usage.get("prompt_tokens")),
        count(usage.get("completion_tokens")),
        count(details.get("cached_tokens")),
        count(details.get("cache_write_tokens")),
        count(output_details.get("reasoning_tokens")),
    )


def echoed(request: dict) -> dict:
    """The settings of C{request} a Response echoes (absent or null: OpenAI's default)."""
    out = dict(ECHOED)
    for name, value in request.items():  # a request has few keys: read those
        if value is not None and name in out:
            out[name] = value
    return out


def response_object(
    echo: dict,
    *,
    response_id: str,
    created_at: int,
    model: str,
    status: str,
    output: list,
    usage: dict | None = None,
    error: dict | None = None,
    incomplete_reason: str | None = None,
) -> dict:
    """
    A whole C{response} object: C{echo} (from L{echoed}) and what happened.
    C{status} is C{in_progress}, C{completed}, C{incomplete} or C{failed}.
    """
    doc: dict[str, Any] = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": error,
        "incomplete_details": {"reason": incomplete_reason} if incomplete_reason else None,
        "model": model,
        "output": output,
    }
    doc.update(echo)
    doc["usage"] = usage
    return doc


#: Error codes a Response's C{error} may carry (the SDK's literal set,
#: the ones the proxy can mean).
_RATE_LIMITED = "rate_limit_exceeded"
_SERVER = "server_error"


def response_error(message: str, rate_limited: bool = False) -> dict:
    """A failed Response's C{error}: rate limits as such, everything else a server error."""
    return {"code": _RATE_LIMITED if rate_limited else _SERVER, "message": message}


def failure_events(
    sequence_number: int,
    response: dict,
    *,
    code: str | None,
    message: str,
    rate_limited: bool = False,
) -> bytes:
    """
    How a Responses stream ends when the answer fails midway: an C{error}
    event (C{code}, C{message}), then C{response.failed} with C{response}
    marked failed.  C{sequence_number} is the first number still unused.
    """
    failed = dict(response)
    failed["status"] = "failed"
    failed["error"] = response_error(message, rate_limited)
    error = {"type": "error", "code": code, "message": message, "param": None, "sequence_number": sequence_number}
    done = {"type": "response.failed", "sequence_number": sequence_number + 1, "response": failed}
    return sse_event("error", error) + sse_event("response.failed", done)


def minimal_response(response_id: str | None, created_at: int, model: str | None) -> dict:
    """
    The C{response} of a stream the proxy ends on its own (an upstream
    that broke off): what it knows of it, every required field present.
    """
    return response_object(
        echoed({}),
        response_id=response_id or "resp_unknown",
        created_at=created_at,
        model=model or "",
        status="in_progress",
        output=[],
    )
