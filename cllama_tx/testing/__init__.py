"""
Verified fakes for tests: the demo's loopback provider (L{FakeProvider},
which answers with the demo model unless given a responder, on chat,
Messages and Responses paths), the wire-format builders it shares with the
demo (L{cllama_tx.demo.wire}, L{cllama_tx.demo.responses_wire}), hostile streams a
broken provider sends, and responders that judge requests as a real provider
would (key checks, header echoes).

The builders are pinned against the official C{openai} and C{anthropic}
SDKs' typed models in C{tests/test_testing.py}, so the fakes stay honest.
"""

from __future__ import annotations

from typing import Any

from cllama_tx.demo import server as _server
from cllama_tx.demo.model import DemoModel
from cllama_tx.demo.responses_wire import (
    responses_message_item,
    responses_response,
    responses_sse_events,
    responses_stream_events,
    responses_usage,
    sse_encode_responses,
)
from cllama_tx.demo.server import ReceivedRequest, Reply, Responder, Script, wire_format
from cllama_tx.demo.wire import (
    DEFAULT_CREATED,
    JSON_CONTENT_TYPE,
    SSE_CONTENT_TYPE,
    anthropic_error,
    anthropic_message,
    anthropic_sse_events,
    anthropic_stream_events,
    anthropic_usage,
    dumps,
    openai_completion,
    openai_error,
    openai_sse_events,
    openai_stream_chunks,
    openai_usage,
    parse_sse,
    sse_encode_anthropic,
    sse_encode_openai,
)
from cllama_tx.testing.strict import refusal

__all__ = [
    "DEFAULT_CREATED",
    "FakeProvider",
    "JSON_CONTENT_TYPE",
    "ReceivedRequest",
    "Reply",
    "Responder",
    "SSE_CONTENT_TYPE",
    "Script",
    "anthropic_error",
    "anthropic_message",
    "anthropic_sse_events",
    "anthropic_stream_events",
    "anthropic_usage",
    "dumps",
    "echo_headers_error",
    "garbage_sse_events",
    "huge_event_sse_events",
    "openai_completion",
    "openai_error",
    "openai_sse_events",
    "openai_stream_chunks",
    "openai_usage",
    "parse_sse",
    "presented_key",
    "responses_message_item",
    "responses_response",
    "responses_sse_events",
    "responses_stream_events",
    "responses_usage",
    "sse_encode_anthropic",
    "sse_encode_openai",
    "sse_encode_responses",
    "strict_provider",
    "wire_format",
]


class FakeProvider(_server.FakeProvider):
    """
    The demo's loopback provider; without a responder it answers as the
    demo model.  It is C{strict} unless told otherwise: a body the real API
    would refuse (an unknown parameter, a value out of range, a model's
    limit passed: L{cllama_tx.testing.strict}) gets the provider's own 400,
    whatever reply was scripted.
    """

    def __init__(self, reactor: Any, responder: Responder | None = None, port: int = 0, strict: bool = True) -> None:
        super().__init__(reactor, responder or _default_responder(), port)
        self.strict = strict

    def _next_reply(self, received: ReceivedRequest) -> Reply:
        if self.strict:
            refused = refusal(received)
            if refused is not None:
                return refused
        return super()._next_reply(received)


# ---------------------------------------------------------------------------
# Hostile streams: what a broken provider or gateway sends
# ---------------------------------------------------------------------------


def huge_event_sse_events(wire_format: str, model: str, size: int, input_tokens: int = 0) -> list[bytes]:
    """
    A stream whose whole answer is one event of about C{size} bytes of text,
    with no usage anywhere (OpenAI: no usage chunk; Anthropic: C{message_start}
    reports C{input_tokens}, C{message_delta} reports nothing).
    """
    text = ("huge " * (size // 5 + 1))[:size]
    if wire_format == "anthropic":
        events = anthropic_stream_events([text], model, input_tokens, 0)
        delta_name, delta = events[-2]
        events[-2] = (delta_name, {key: value for key, value in delta.items() if key != "usage"})
        events[0][1]["message"]["usage"]["output_tokens"] = 0
        return anthropic_sse_events(events)
    return openai_sse_events(openai_stream_chunks([text], model, include_usage=False))


def garbage_sse_events(count: int, size: int = 1000) -> list[bytes]:
    """
    C{count} events whose data is not JSON (C{size} bytes each), then the
    same number of lines that are no SSE field at all, then C{[DONE]}:
    what a broken gateway or a proxy's error page streams.
    """
    junk = ("garbage! " * (size // 9 + 1))[:size].encode("ascii")
    events = [b"data: " + junk + b"\n\n" for _ in range(count)]
    events += [junk + b"\n\n" for _ in range(count)]
    events.append(b"data: [DONE]\n\n")
    return events


# ---------------------------------------------------------------------------
# Responders that judge the request: key health and secret scrubbing
# ---------------------------------------------------------------------------


def presented_key(received: ReceivedRequest) -> str | None:
    """
    The key a request carries (C{Authorization: Bearer} or C{x-api-key}).
    """
    auth = received.header("authorization")
    if auth is not None and auth[:7].lower() == "bearer ":
        return auth[7:]
    return received.header("x-api-key")


def _default_responder() -> Responder:
    return DemoModel().respond


def strict_provider(
    valid_keys: Any,
    organization: str | None = None,
    fallback: Responder | None = None,
) -> Responder:
    """
    A responder that checks each request as OpenAI does, on every path (the
    model list included): a key not in C{valid_keys} (read at each request,
    so a test may revoke and restore keys) answers 401 C{invalid_api_key};
    an C{OpenAI-Organization} header other than C{organization} answers 401
    C{mismatched_organization}.  Anything else goes to C{fallback} (the demo
    model).  Anthropic paths answer Anthropic's C{authentication_error}.
    """
    answer = fallback or _default_responder()

    def respond(received: ReceivedRequest) -> Reply:
        anthropic = wire_format(received.path) == "anthropic" or received.header("anthropic-version") is not None
        if presented_key(received) not in valid_keys:
            if anthropic:
                return Reply(status=401, json=anthropic_error("authentication_error", "invalid x-api-key"))
            return Reply(
                status=401,
                json=openai_error("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
            )
        org = received.header("openai-organization")
        if org is not None and org != organization:
            return Reply(
                status=401,
                json=openai_error(
                    "OpenAI-Organization header should match organization for API key",
                    "invalid_request_error",
                    "mismatched_organization",
                ),
            )
        return answer(received)

    return respond


def echo_headers_error(status: int = 400, fallback: Responder | None = None) -> Responder:
    """
    A responder that answers every inference request C{status} with an error
    body quoting all the request's headers (as some gateways' debugging
    errors do), and the presented key again in an C{x-echo-key} response
    header; other paths (the model list) go to C{fallback}.
    """
    answer = fallback or _default_responder()

    def respond(received: ReceivedRequest) -> Reply:
        if received.path.endswith("/models"):
            return answer(received)
        quoted = "; ".join(f"{name}: {', '.join(values)}" for name, values in sorted(received.headers.items()))
        message = f"could not route the request (headers: {quoted})"
        if wire_format(received.path) == "anthropic":
            body = anthropic_error("invalid_request_error", message)
        else:
            body = openai_error(message, "invalid_request_error", "bad_request")
        return Reply(status=status, json=body, headers={"x-echo-key": presented_key(received) or ""})

    return respond
