"""
The two bridges between ingress surfaces and provider wire formats: what the
proxy needs to serve a chat-surface request from an anthropic-format
provider, or a messages-surface request from an openai-format one.  The
translation itself lives in L{cllama_tx.surfaces.translate}.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from cllama_tx.surfaces import translate


@attrs.frozen
class Bridge:
    """One direction of translation, as the proxy uses it."""

    name: str
    ingress_format: str
    upstream_format: str
    upstream_path: str
    request: Callable[[dict], dict]
    # (doc, created, model) -> the answer in the ingress format
    response: Callable[[dict, int, str | None], dict]
    error: Callable[[int, bytes], bytes]
    stream: Callable[..., object]


CHAT_TO_ANTHROPIC = Bridge(
    name="openai-chat-completions->anthropic",
    ingress_format="openai",
    upstream_format="anthropic",
    upstream_path="/v1/messages",
    request=translate.chat_to_messages_request,
    response=lambda doc, created, model: translate.messages_response_to_chat(doc, created=created, model=model),
    error=translate.anthropic_error_to_openai,
    stream=lambda include_usage, created, model, usage_extra: translate.AnthropicToChatStream(
        include_usage=include_usage, created=created, model=model, usage_extra=usage_extra
    ),
)

MESSAGES_TO_OPENAI = Bridge(
    name="anthropic-messages->openai",
    ingress_format="anthropic",
    upstream_format="openai",
    upstream_path="/v1/chat/completions",
    request=translate.messages_to_chat_request,
    response=lambda doc, created, model: translate.chat_response_to_messages(doc, model=model),
    error=translate.openai_error_to_anthropic,
    # wait_for_done: message_stop waits for [DONE], which the usage tap holds
    # until the ledger row is committed.
    stream=lambda include_usage, created, model, usage_extra: translate.ChatToAnthropicStream(
        model=model, wait_for_done=True
    ),
)

_BRIDGES = {(b.ingress_format, b.upstream_format): b for b in (CHAT_TO_ANTHROPIC, MESSAGES_TO_OPENAI)}


def bridge_for(ingress_format: str, upstream_format: str) -> Bridge | None:
    """The bridge between two different formats, None when they are the same."""
    if ingress_format == upstream_format:
        return None
    return _BRIDGES[(ingress_format, upstream_format)]
