"""
An estimate of a Messages request's input tokens, for token counting
(C{/v1/messages/count_tokens}) of a model whose provider has no counting
endpoint.  Runners ask before each turn to decide when to compact the
conversation: an honest estimate serves that, a refusal stops the runner.
The answer says it is an estimate (C{x-cllama-token-count: estimate}).

About four bytes of text a token, images at Anthropic's documented
ceiling (about 1,600 tokens each), documents by their bytes.  Pure logic.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["BYTES_PER_TOKEN", "IMAGE_TOKENS", "estimate_input_tokens"]

BYTES_PER_TOKEN = 4
IMAGE_TOKENS = 1600
#: The per-message framing a chat template adds.
MESSAGE_TOKENS = 4


def _walk(value: Any, counts: list[int]) -> None:
    """Adds C{[text bytes, images]} of C{value} to C{counts}."""
    if isinstance(value, str):
        counts[0] += len(value.encode("utf-8"))
    elif isinstance(value, list):
        for item in value:
            _walk(item, counts)
    elif isinstance(value, dict):
        if value.get("type") == "image":
            counts[1] += 1
            return
        source = value.get("source")
        if value.get("type") == "document" and isinstance(source, dict) and source.get("type") == "base64":
            data = source.get("data")
            # Base64 is 4/3 of the bytes; a PDF page is text and an image.
            counts[0] += len(data) * 3 // 4 if isinstance(data, str) else 0
            return
        for key, item in value.items():
            if key in ("cache_control", "type", "id", "tool_use_id", "signature"):
                continue
            _walk(item, counts)


def estimate_input_tokens(doc: dict) -> int:
    """The input tokens a Messages request C{doc} is estimated to count (at least 1)."""
    counts = [0, 0]
    _walk(doc.get("system"), counts)
    messages = doc.get("messages")
    _walk(messages, counts)
    tools = doc.get("tools")
    if tools:
        counts[0] += len(json.dumps(tools, separators=(",", ":")))
    framing = MESSAGE_TOKENS * (len(messages) if isinstance(messages, list) else 0)
    return max(1, -(-counts[0] // BYTES_PER_TOKEN) + counts[1] * IMAGE_TOKENS + framing)
