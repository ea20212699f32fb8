"""
Shared pieces of the OpenAI Chat Completions <-> Anthropic Messages
translation: the refusal exception, id derivation, stop-reason and usage
mappings, and compact JSON.

Pure logic: no I/O, no clock.  See C{docs/TRANSLATION.md}.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

__all__ = [
    "Notes",
    "UntranslatableRequest",
    "anthropic_usage_to_openai",
    "chat_id_from_message_id",
    "dumps",
    "finish_reason_from_stop_reason",
    "message_id_from_chat_id",
    "openai_usage_to_anthropic",
    "stop_reason_from_finish_reason",
]


class UntranslatableRequest(ValueError):
    """
    A request carries parameters that cannot be carried over to the other
    wire format.  We refuse rather than drop them silently.

    C{params} is the sorted list of the offending parameter names (dotted
    paths such as C{messages[2].content[0].type=document} are used when the
    parameter lives inside a message); C{reasons} maps each name to a short
    explanation; C{target} names the format we were translating to.  The
    message names every parameter, so the proxy can use it verbatim as the
    body of its 400.
    """

    def __init__(self, reasons: Mapping[str, str], target: str) -> None:
        self.reasons = dict(reasons)
        self.params = sorted(self.reasons)
        self.target = target
        details = "; ".join(
            f"{name} ({self.reasons[name]})" if self.reasons[name] else name for name in self.params
        )
        super().__init__(f"cannot translate to the {target} format: {details}")


class Notes:
    """
    What a translation did besides carrying a field: the fields it dropped
    (advisory, named on the intervention line and in the answer's
    C{x-cllama-dropped} header) and the values it changed (clamped or
    lowered, named on the intervention line).
    """

    __slots__ = ("adjusted", "dropped")

    def __init__(self) -> None:
        self.dropped: list[str] = []
        self.adjusted: list[str] = []

    def drop(self, name: str) -> None:
        if name not in self.dropped:
            self.dropped.append(name)

    def adjust(self, name: str, change: str) -> None:
        self.adjusted.append(f"{name}: {change}")


class Refusals:
    """Collects every untranslatable parameter of one request, then raises once."""

    __slots__ = ("reasons", "target")

    def __init__(self, target: str) -> None:
        self.target = target
        self.reasons: dict[str, str] = {}

    def add(self, name: str, reason: str = "") -> None:
        self.reasons.setdefault(name, reason)

    def check(self) -> None:
        if self.reasons:
            raise UntranslatableRequest(self.reasons, self.target)


def dumps(obj: Any) -> str:
    """Compact JSON text, as the providers write it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


# ---------------------------------------------------------------------------
# Ids
# ---------------------------------------------------------------------------

_CHAT_PREFIX = "chatcmpl-"
_MESSAGE_PREFIX = "msg_"


def chat_id_from_message_id(message_id: Any) -> str:
    """C{msg_X} -> C{chatcmpl-X} (any other id is kept whole behind the prefix)."""
    text = message_id if isinstance(message_id, str) else ""
    if text.startswith(_MESSAGE_PREFIX):
        text = text[len(_MESSAGE_PREFIX) :]
    return _CHAT_PREFIX + text


def message_id_from_chat_id(chat_id: Any) -> str:
    """C{chatcmpl-X} -> C{msg_X}: the inverse of L{chat_id_from_message_id}."""
    text = chat_id if isinstance(chat_id, str) else ""
    if text.startswith(_CHAT_PREFIX):
        text = text[len(_CHAT_PREFIX) :]
    return _MESSAGE_PREFIX + text


_TOOL_ID_BAD = re.compile(r"[^A-Za-z0-9_-]")


def anthropic_tool_id(tool_id: Any, fallback: str) -> str:
    """
    A tool-call id Anthropic accepts (C{^[a-zA-Z0-9_-]+$}).  OpenAI-style ids
    (C{call_...}) pass unchanged; any other character becomes C{_}, the same
    way on the C{tool_use} and on its C{tool_result}, so the pair still
    matches.
    """
    if not isinstance(tool_id, str) or not tool_id:
        tool_id = fallback
    return _TOOL_ID_BAD.sub("_", tool_id)


# ---------------------------------------------------------------------------
# Stop reasons
# ---------------------------------------------------------------------------

_FINISH_FROM_STOP = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

_STOP_FROM_FINISH = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def finish_reason_from_stop_reason(stop_reason: Any) -> str:
    """Anthropic C{stop_reason} -> OpenAI C{finish_reason} (unknown -> C{stop})."""
    return _FINISH_FROM_STOP.get(stop_reason, "stop")


def stop_reason_from_finish_reason(finish_reason: Any) -> str:
    """OpenAI C{finish_reason} -> Anthropic C{stop_reason} (unknown -> C{end_turn})."""
    return _STOP_FROM_FINISH.get(finish_reason, "end_turn")


# ---------------------------------------------------------------------------
# Usage
# ---------------------------------------------------------------------------


def mapping(value: Any) -> dict:
    """C{value} when it is a JSON object, else an empty one: fields of a
    provider's document are read without trusting their shape."""
    return value if isinstance(value, dict) else {}


def count(value: Any) -> int:
    """A token count, or 0 for anything that is not a non-negative int."""
    return value if type(value) is int and value >= 0 else 0


def anthropic_usage_to_openai(
    input_tokens: int, output_tokens: int, cache_read: int = 0, cache_creation: int = 0
) -> dict:
    """
    OpenAI's C{usage}: C{prompt_tokens} counts every input token (plain,
    cache reads and cache writes), C{cached_tokens} the cache reads, and
    C{cache_write_tokens} (as OpenRouter reports it) the cache writes.
    """
    prompt = input_tokens + cache_read + cache_creation
    details: dict[str, int] = {"cached_tokens": cache_read}
    if cache_creation:
        details["cache_write_tokens"] = cache_creation
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output_tokens,
        "total_tokens": prompt + output_tokens,
        "prompt_tokens_details": details,
    }


def openai_usage_parts(usage: Any) -> tuple[int, int, int, int]:
    """
    C{(input, output, cache_read, cache_creation)} from an OpenAI C{usage}
    object: the inverse of L{anthropic_usage_to_openai}.  Parts that do not
    fit inside C{prompt_tokens} are trimmed so no count goes negative.
    """
    if not isinstance(usage, dict):
        return 0, 0, 0, 0
    details = usage.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    prompt = count(usage.get("prompt_tokens"))
    read = min(count(details.get("cached_tokens")), prompt)
    write = min(count(details.get("cache_write_tokens")), prompt - read)
    return prompt - read - write, count(usage.get("completion_tokens")), read, write


def openai_usage_to_anthropic(usage: Any) -> dict:
    """Anthropic's C{usage} object from an OpenAI one."""
    plain, output, read, write = openai_usage_parts(usage)
    return {
        "input_tokens": plain,
        "output_tokens": output,
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
    }
