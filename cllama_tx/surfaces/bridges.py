"""
The two bridges between ingress surfaces and provider wire formats: what the
proxy needs to serve a chat-surface request from an anthropic-format
provider, or a messages-surface request from an openai-format one.  The
translation itself lives in L{cllama_tx.surfaces.translate}.
"""

from __future__ import annotations

from typing import Callable

import attrs

from . import translate


@attrs.frozen
class Bridge:
    """One direction of translation, as the proxy uses it."""

    name: str
    ingress_format: str
    upstream_format: str
    upstream_path: str
    request: Callable[[dict], dict]
    response: Callable[[dict], dict]
    error: Callable[[int, bytes], bytes]
    stream: Callable[..., object]


CHAT_TO_ANTHROPIC = Bridge(
    name="openai-chat-completions->anthropic",
    ingress_format="openai",
    upstream_format="anthropic",
    upstream_path="/v1/messages",
    request=translate.chat_to_messages_request,
    response=translate.messages_response_to_chat,
    error=translate.anthropic_error_to_openai,
    stream=lambda include_usage, created, model: translate.AnthropicToChatStream(
        include_usage=include_usage, created=created, model=model
    ),
)

MESSAGES_TO_OPENAI = Bridge(
    name="anthropic-messages->openai",
    ingress_format="anthropic",
    upstream_format="openai",
    upstream_path="/v1/chat/completions",
    request=translate.messages_to_chat_request,
    response=translate.chat_response_to_messages,
    error=translate.openai_error_to_anthropic,
    stream=lambda include_usage, created, model: translate.ChatToAnthropicStream(model=model),
)

_BRIDGES = {(b.ingress_format, b.upstream_format): b for b in (CHAT_TO_ANTHROPIC, MESSAGES_TO_OPENAI)}


def bridge_for(ingress_format: str, upstream_format: str) -> Bridge | None:
    """The bridge between two different formats, None when they are the same."""
    if ingress_format == upstream_format:
        return None
    return _BRIDGES[(ingress_format, upstream_format)]
