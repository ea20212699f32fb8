"""
Errors a client can cause or meet, and their bodies in each surface's shape.

Raising L{ProxyError} anywhere below the web layer is how a request is
refused; the surface that received the request decides the body's shape
(CONTRACT section 9).
"""

from __future__ import annotations

import json

import attrs

OPENAI = "openai"
ANTHROPIC = "anthropic"
# The Responses surface: OpenAI's error body (with "param"), and its own
# mid-stream events (error, then response.failed).
RESPONSES = "responses"

#: The codes of budget refusals (CONTRACT 6): their body says the code in
#: every shape, the Anthropic one included.
BUDGET_REFUSALS = frozenset({"budget_exceeded", "rate_limited"})

# HTTP status -> the error type each surface uses for it.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


@attrs.define
class ProxyError(Exception):
    """
    A refusal with a precise status, a stable machine-readable C{code} and a
    message for humans.  Messages must never contain a secret.
    """

    status: int
    code: str
    message: str
    retry_after: int | None = None
    # Extra top-level members of the body (a budget refusal's "budget").
    extra: dict | None = None
    # The error type, when it is not the status's usual one.
    error_type: str | None = None
    # The request parameter at fault (the Responses surface says which;
    # the OpenAI shape too when it is set).
    param: str | None = None
    # The body's "code" when it is not C{code} (LiteLLM's dialect: the status).
    wire_code: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def error_type(status: int, shape: str) -> str:
    """The surface's error type for C{status}."""
    if shape == ANTHROPIC:
        return _ANTHROPIC_TYPES.get(status, "api_error")
    return _OPENAI_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(error: ProxyError, shape: str) -> bytes:
    """The JSON body for C{error} in the surface's shape."""
    kind = error.error_type or error_type(error.status, shape)
    if shape == ANTHROPIC:
        inner = {"type": kind, "message": error.message}
        if error.code in BUDGET_REFUSALS:
            # As on the chat surface (and the reference, which answers
            # budget refusals in one shape): tooling reads error.code.
            inner["code"] = error.wire_code or error.code
        doc: dict = {"type": "error", "error": inner}
    elif shape == RESPONSES:
        doc = {"error": {"message": error.message, "type": kind, "param": error.param,
                         "code": error.wire_code or error.code}}
    elif error.param is not None or error.wire_code is not None:
        doc = {"error": {"message": error.message, "type": kind, "param": error.param,
                         "code": error.wire_code or error.code}}
    else:
        doc = {"error": {"message": error.message, "type": kind, "code": error.code}}
    if error.extra:
        doc.update(error.extra)
    return json.dumps(doc).encode("utf-8")


def sse_error_event(error: ProxyError, shape: str) -> bytes:
    """
    A mid-stream error as one SSE C{event: error} carrying the error body
    in the surface's shape: Anthropic's, or on the chat surface the
    reference proxy's (C{{"error": {"message", ...}}}), which the official
    OpenAI SDKs raise as C{APIError} (docs/REFERENCE_PARITY.md).  (The
    Responses surface ends a stream with two events that need the
    stream's state: L{cllama_tx.surfaces.responses_shapes.failure_events}.)
    """
    return b"event: error\ndata: " + error_body(error, shape) + b"\n\n"
