"""
The bridges between ingress surfaces and provider wire formats: what the
proxy needs to serve a request from a provider that speaks another format.
Three formats meet here: C{openai} (Chat Completions), C{anthropic}
(Messages) and C{responses} (the Responses API); every pair but one is a
bridge (a Responses upstream is reached only by the Responses surface, or
by the upstream adapter for models only the Responses API serves).

A bridge opens one L{Crossing} per request: the translated body and what
was dropped from it, and how the answer (JSON, stream, error) comes back.
The translation itself lives in the C{translate*} modules.  Pure logic.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from cllama_tx.surfaces import translate
from cllama_tx.surfaces.model_traits import UNKNOWN_MODEL, ModelTraits
from cllama_tx.surfaces.responses_shapes import echoed
from cllama_tx.surfaces.translate_common import Notes
from cllama_tx.surfaces.translate_responses_answer import (
    AnswerContext,
    ChatToResponsesStream,
    chat_completion_to_response,
)
from cllama_tx.surfaces.translate_responses_request import (
    Translated,
    responses_to_chat_request,
    responses_to_messages_request,
)
from cllama_tx.surfaces.translate_responses_upstream import (
    ResponsesToChatStream,
    chat_to_responses_request,
    response_to_chat_completion,
)

__all__ = ["Bridge", "Call", "Crossing", "bridge_for"]

OPENAI = "openai"
ANTHROPIC = "anthropic"
RESPONSES = "responses"

UPSTREAM_PATHS = {OPENAI: "/v1/chat/completions", ANTHROPIC: "/v1/messages", RESPONSES: "/v1/responses"}

UsageExtra = Callable[[], Mapping[str, Any]] | None


@attrs.frozen
class Call:
    """What a translation knows of its request besides the body."""

    created: int
    model: str | None
    # The id of the answer, for a Responses agent (the proxy makes it).
    response_id: str = ""
    # The agent's own request, whose settings a Responses answer echoes
    # (its previous_response_id included, which the expanded body lost).
    original: dict | None = None
    # What the target model takes (its output limit, its reasoning controls).
    traits: ModelTraits = UNKNOWN_MODEL
    # The agent's anthropic-beta features (they travel only to Anthropic).
    betas: tuple[str, ...] = ()


@attrs.define
class Crossing:
    """
    One request's translation: the body to send, what was dropped from it,
    and how the answer comes back (C{response(doc)}, C{error(status, body)},
    C{stream(include_usage, usage_extra)}).  C{answered()} is the Responses
    object given to a Responses agent, once complete (its conversation
    state), else None.
    """

    request: dict
    response: Callable[[dict], dict]
    error: Callable[[int, bytes], bytes]
    stream: Callable[[bool, UsageExtra], Any]
    dropped: tuple[str, ...] = ()
    # Values changed on the way (a clamped temperature, a lowered max_tokens).
    adjusted: tuple[str, ...] = ()
    _answer: Any = None

    def answered(self) -> dict | None:
        answer = self._answer
        if isinstance(answer, dict):
            return answer
        if answer is not None and getattr(answer, "complete", False):
            return answer.response
        return None


@attrs.frozen
class Bridge:
    """One direction of translation, as the proxy uses it."""

    name: str
    ingress_format: str
    upstream_format: str
    open: Callable[[dict, Call], Crossing]

    @property
    def upstream_path(self) -> str:
        return UPSTREAM_PATHS[self.upstream_format]


class Chain:
    """Two stream translators in a row (Anthropic -> chat -> Responses, and back)."""

    def __init__(self, first: Any, second: Any) -> None:
        self.first = first
        self.second = second

    def feed(self, data: bytes) -> bytes:
        middle = self.first.feed(data)
        return self.second.feed(middle) if middle else b""

    def finish(self) -> bytes:
        return self.second.feed(self.first.finish()) + self.second.finish()

    @property
    def buffered_bytes(self) -> int:
        return self.first.buffered_bytes + self.second.buffered_bytes

    @property
    def error_event(self) -> Any:
        return self.second.error_event

    @property
    def complete(self) -> bool:
        return self.second.complete

    def __getattr__(self, name: str) -> Any:  # response, sequence, fail: the last one's
        return getattr(self.second, name)


def _same(status: int, body: bytes) -> bytes:
    return body


# -- chat <-> Anthropic ---------------------------------------------------------


def _chat_to_anthropic(doc: dict, call: Call) -> Crossing:
    notes = Notes()
    request = translate.chat_to_messages_request(doc, traits=call.traits, notes=notes)
    return Crossing(
        request,
        response=lambda answer: translate.messages_response_to_chat(answer, created=call.created, model=call.model),
        error=translate.anthropic_error_to_openai,
        stream=lambda include_usage, extra: translate.AnthropicToChatStream(
            include_usage=include_usage, created=call.created, model=call.model, usage_extra=extra
        ),
        dropped=tuple(notes.dropped),
        adjusted=tuple(notes.adjusted),
    )


def shows_thinking(doc: dict) -> bool:
    """An Anthropic request that asked for thinking it wants to read (not C{display: omitted})."""
    thinking = doc.get("thinking")
    return (
        isinstance(thinking, dict)
        and thinking.get("type") in ("enabled", "adaptive")
        and thinking.get("display") != "omitted"
    )


def _messages_notes(call: Call) -> Notes:
    notes = Notes()
    if call.betas:
        notes.drop("anthropic-beta: " + ", ".join(call.betas))
    return notes


def _messages_to_chat(doc: dict, call: Call) -> Crossing:
    notes = _messages_notes(call)
    request = translate.messages_to_chat_request(doc, traits=call.traits, notes=notes)
    thinking = shows_thinking(doc)
    return Crossing(
        request,
        response=lambda answer: translate.chat_response_to_messages(answer, model=call.model, thinking=thinking),
        error=translate.openai_error_to_anthropic,
        # wait_for_done: message_stop waits for [DONE], which the usage tap
        # holds until the ledger row is committed.
        stream=lambda include_usage, extra: translate.ChatToAnthropicStream(
            model=call.model, wait_for_done=True, thinking=thinking
        ),
        dropped=tuple(notes.dropped),
        adjusted=tuple(notes.adjusted),
    )


# -- a Responses agent -------------------------------------------------------


def _context(doc: dict, call: Call, translated: Translated) -> AnswerContext:
    echo = echoed(call.original if call.original is not None else doc)
    return AnswerContext(call.response_id, call.created, call.model or "", echo, translated.tools)


def _responses_crossing(doc: dict, call: Call, translated: Translated, anthropic: bool) -> Crossing:
    ctx = _context(doc, call, translated)
    crossing = Crossing(translated.request, response=lambda a: a, error=_same, stream=lambda u, e: None,
                        dropped=translated.dropped, adjusted=translated.adjusted)

    def response(answer: dict) -> dict:
        chat = translate.messages_response_to_chat(answer, created=call.created, model=call.model) if anthropic else answer
        result = chat_completion_to_response(chat, ctx)
        crossing._answer = result
        return result

    def stream(include_usage: bool, extra: UsageExtra) -> Any:
        converter: Any = ChatToResponsesStream(ctx)
        if anthropic:
            converter = Chain(
                translate.AnthropicToChatStream(include_usage=True, created=call.created, model=call.model),
                converter,
            )
        crossing._answer = converter
        return converter

    crossing.response = response
    crossing.stream = stream
    crossing.error = translate.anthropic_error_to_openai if anthropic else _same
    return crossing


def _responses_to_chat(doc: dict, call: Call) -> Crossing:
    return _responses_crossing(doc, call, responses_to_chat_request(doc), anthropic=False)


def _responses_to_anthropic(doc: dict, call: Call) -> Crossing:
    return _responses_crossing(doc, call, responses_to_messages_request(doc, traits=call.traits), anthropic=True)


# -- the upstream adapter: a Responses upstream for chat and Messages agents ---


def _chat_to_responses(doc: dict, call: Call) -> Crossing:
    return Crossing(
        chat_to_responses_request(doc),
        response=lambda answer: response_to_chat_completion(answer, created=call.created, model=call.model),
        error=_same,
        stream=lambda include_usage, extra: ResponsesToChatStream(
            include_usage=include_usage, created=call.created, model=call.model, usage_extra=extra
        ),
    )


def _messages_to_responses(doc: dict, call: Call) -> Crossing:
    notes = _messages_notes(call)
    chat = translate.messages_to_chat_request(doc, traits=call.traits, notes=notes)
    return Crossing(
        chat_to_responses_request(chat),
        response=lambda answer: translate.chat_response_to_messages(
            response_to_chat_completion(answer, created=call.created, model=call.model), model=call.model
        ),
        error=translate.openai_error_to_anthropic,
        stream=lambda include_usage, extra: Chain(
            ResponsesToChatStream(include_usage=True, created=call.created, model=call.model),
            translate.ChatToAnthropicStream(model=call.model, wait_for_done=True),
        ),
        dropped=tuple(notes.dropped),
        adjusted=tuple(notes.adjusted),
    )


_BRIDGES = {
    (b.ingress_format, b.upstream_format): b
    for b in (
        Bridge("openai-chat-completions->anthropic", OPENAI, ANTHROPIC, _chat_to_anthropic),
        Bridge("anthropic-messages->openai", ANTHROPIC, OPENAI, _messages_to_chat),
        Bridge("openai-responses->openai", RESPONSES, OPENAI, _responses_to_chat),
        Bridge("openai-responses->anthropic", RESPONSES, ANTHROPIC, _responses_to_anthropic),
        Bridge("openai-chat-completions->responses", OPENAI, RESPONSES, _chat_to_responses),
        Bridge("anthropic-messages->responses", ANTHROPIC, RESPONSES, _messages_to_responses),
    )
}


def bridge_for(ingress_format: str, upstream_format: str) -> Bridge | None:
    """The bridge between two different formats, None when they are the same."""
    if ingress_format == upstream_format:
        return None
    return _BRIDGES[(ingress_format, upstream_format)]
