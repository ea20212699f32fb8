"""
Native translation between the OpenAI Chat Completions wire format and the
Anthropic Messages wire format: requests, JSON responses, streams and
errors, both directions.  No third-party bridge.

This module is the public face; the work is split by job:

 - L{cllama_tx.surfaces.translate_request}: requests (and the refusals);
 - L{cllama_tx.surfaces.translate_response}: JSON responses and errors;
 - L{cllama_tx.surfaces.translate_stream}: incremental SSE translators.

Everything here is pure logic (no I/O, no reactor, no clock) so the proxy
calls it inline and the tests need no reactor.  C{docs/TRANSLATION.md} is
the table of what carries over, what is refused and what is dropped.
"""

from __future__ import annotations

from cllama_tx.surfaces.translate_common import (
    UntranslatableRequest,
    chat_id_from_message_id,
    finish_reason_from_stop_reason,
    message_id_from_chat_id,
    stop_reason_from_finish_reason,
)
from cllama_tx.surfaces.translate_request import (
    chat_to_messages_request,
    messages_to_chat_request,
)
from cllama_tx.surfaces.translate_response import (
    anthropic_error_to_openai,
    chat_response_to_messages,
    messages_response_to_chat,
    openai_error_to_anthropic,
)
from cllama_tx.surfaces.translate_stream import (
    AnthropicToChatStream,
    ChatToAnthropicStream,
    SseReader,
)

__all__ = [
    "AnthropicToChatStream",
    "ChatToAnthropicStream",
    "SseReader",
    "UntranslatableRequest",
    "anthropic_error_to_openai",
    "chat_id_from_message_id",
    "chat_response_to_messages",
    "chat_to_messages_request",
    "finish_reason_from_stop_reason",
    "message_id_from_chat_id",
    "messages_response_to_chat",
    "messages_to_chat_request",
    "openai_error_to_anthropic",
    "stop_reason_from_finish_reason",
]
