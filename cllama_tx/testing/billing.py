"""
A fake model that bills the most the real provider would, for budget tests
and C{bench/probe_budget.py}.

L{BillingModel} answers OpenAI chat and Anthropic messages requests (as a
L{cllama_tx.testing.FakeProvider} responder) and reports the usage the
provider would report for the most expensive request of that shape:

 - text at one token per UTF-8 byte (no tokenizer makes more), plus the
   tokens a chat template adds per message;
 - every image as the largest image the model keeps after resizing (the
   fake never sees the pixels behind a URL, and an agent can always send
   the largest);
 - the system prompt the provider adds for tool use;
 - every candidate answer (C{n}) running to its C{max_tokens}.

Its numbers come from the providers' documentation, independently of
C{cllama_tx.governance.billing_rules}, so a test that holds against it
shows the reservations hold against a real bill.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from cllama_tx.testing import (
    ReceivedRequest,
    Reply,
    anthropic_error,
    anthropic_message,
    anthropic_sse_events,
    anthropic_stream_events,
    openai_completion,
    openai_error,
    openai_sse_events,
    openai_stream_chunks,
)

__all__ = ["ANTHROPIC_CLAUDE_SONNET_4_5", "BillingModel", "OPENAI_GPT_4O", "ProviderBilling"]

#: Tokens a chat template adds around one message (OpenAI documents 3-4).
MESSAGE_TOKENS = 4


@attrs.frozen
class ProviderBilling:
    """How one provider bills the parts that are not text."""

    image_tokens: int
    tool_prompt_auto: int = 0
    tool_prompt_any: int = 0
    default_max_tokens: int = 4096


#: gpt-4o: a high-detail image of 768x2048 after scaling is 8 tiles of 512,
#: 85 + 8 * 170 tokens; no documented tool prompt.
OPENAI_GPT_4O = ProviderBilling(image_tokens=85 + 8 * 170)
#: Claude Sonnet 4.5: images resized to ~1,600 tokens at most; a tool-use
#: system prompt of 346 tokens (auto, none) or 313 (any, tool).
ANTHROPIC_CLAUDE_SONNET_4_5 = ProviderBilling(image_tokens=1600, tool_prompt_auto=346, tool_prompt_any=313)


def _utf8(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _compact(value: Any) -> int:
    return _utf8(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


def _content(content: Any) -> tuple[int, int]:
    """(text tokens, images) of a message's content."""
    if isinstance(content, str):
        return _utf8(content), 0
    text = images = 0
    for part in content if isinstance(content, list) else ():
        if not isinstance(part, Mapping):
            continue
        kind = part.get("type")
        if kind in ("image_url", "image"):
            images += 1
        elif kind == "text" and isinstance(part.get("text"), str):
            text += _utf8(part["text"])
        elif kind == "tool_result":
            t, i = _content(part.get("content"))
            text, images = text + t, images + i
        elif kind == "tool_use":
            text += _compact(part.get("input"))
    return text, images


class BillingModel:
    """A responder whose usage is the most the real provider would bill."""

    def __init__(
        self, openai: ProviderBilling = OPENAI_GPT_4O, anthropic: ProviderBilling = ANTHROPIC_CLAUDE_SONNET_4_5
    ) -> None:
        self.billing = {"openai": openai, "anthropic": anthropic}

    def usage(self, body: Mapping[str, Any], wire_format: str) -> tuple[int, int]:
        """C{(prompt tokens, completion tokens)} of one request."""
        billing = self.billing[wire_format]
        text, images = _content(body.get("system"))
        messages = body.get("messages")
        for message in messages if isinstance(messages, list) else ():
            if isinstance(message, Mapping):
                t, i = _content(message.get("content"))
                text, images = text + t + MESSAGE_TOKENS, images + i
        prompt = text + images * billing.image_tokens
        tools = body.get("tools")
        if tools:
            choice = body.get("tool_choice")
            kind = choice.get("type") if isinstance(choice, Mapping) else choice
            prompt += _compact(tools)
            prompt += billing.tool_prompt_any if kind in ("any", "tool", "required") else billing.tool_prompt_auto
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens") or billing.default_max_tokens
        candidates = body.get("n") if wire_format == "openai" else 1
        return prompt, int(max_tokens) * int(candidates or 1)

    def respond(self, request: ReceivedRequest) -> Reply:
        anthropic = "/messages" in request.path
        body = request.json
        if not isinstance(body, dict):
            message = "the request body must be a JSON object"
            if anthropic:
                return Reply(status=400, json=anthropic_error("invalid_request_error", message))
            return Reply(status=400, json=openai_error(message, "invalid_request_error"))
        model = str(body.get("model") or "billed-1")
        prompt, completion = self.usage(body, "anthropic" if anthropic else "openai")
        if anthropic:
            if body.get("stream"):
                return Reply(sse=anthropic_sse_events(anthropic_stream_events(["ok"], model, prompt, completion)))
            return Reply(json=anthropic_message("ok", model, prompt, completion))
        if body.get("stream"):
            return Reply(sse=openai_sse_events(openai_stream_chunks(["ok"], model, prompt, completion)))
        answer = openai_completion("ok", model, prompt, completion)
        choice = answer["choices"][0]
        answer["choices"] = [dict(choice, index=i) for i in range(int(body.get("n") or 1))]
        return Reply(json=answer)
