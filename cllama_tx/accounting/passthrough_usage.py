"""
What a passthrough answer cost: the provider-native endpoints carry their
usage in their own shapes, or none at all.

  - embeddings (OpenAI's C{usage.prompt_tokens}), token-metered images and
    transcriptions (C{usage.input_tokens}/C{output_tokens}), Gemini's
    C{usageMetadata}: tokens, priced from the price table;
  - images (C{data}, one entry per image): C{per_image} from the table;
  - endpoints that cost nothing (moderation, token counting, model lists):
    priced at $0;
  - anything else: I{unmetered}, recorded with its status and bytes and
    counted as unpriced.

Answers are relayed as they come; L{AnswerCopy} keeps what metering needs
of one without holding a large one: the body while it is small, and always
its last bytes (where every shape above puts its usage).  Pure logic, no I/O.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs

from cllama_tx.accounting.usage import OPENAI, RESPONSES, usage_from_json
from cllama_tx.store.records import Usage

__all__ = [
    "ERROR",
    "FREE",
    "IMAGES",
    "TOKENS",
    "UNMETERED",
    "AnswerCopy",
    "Metered",
    "free_endpoint",
    "meter_answer",
    "requested_images",
]

TOKENS = "tokens"
IMAGES = "images"
FREE = "free"
UNMETERED = "unmetered"
ERROR = "error"

#: A whole answer is kept for metering up to this size; past it only its tail.
MAX_COPY = 16 * 1024 * 1024
#: The tail kept of every answer: usage objects close it.
TAIL = 64 * 1024

# Endpoints that cost nothing, by provider (the path below the provider's
# native base URL; "*" is one segment or part of one).
_FREE = {
    "openai": (re.compile(r"moderations"), re.compile(r"models(/[^/]+)?")),
    "anthropic": (re.compile(r"messages/count_tokens"), re.compile(r"models(/[^/]+)?")),
    "google": (re.compile(r"models/[^/]+:countTokens"), re.compile(r"models(/[^/:]+)?")),
}
_USAGE_KEYS = (b'"usageMetadata"', b'"usage"')
_COUNT_MAX = 2**53


def free_endpoint(provider: str, path: str) -> bool:
    """Whether C{path} (below C{provider}'s base URL) is one its provider does not bill."""
    return any(p.fullmatch(path) for p in _FREE.get(provider.partition("@")[0], ()))


def requested_images(doc: Any) -> int:
    """How many images an image request asks for (C{n}, default 1, at most 128)."""
    if not isinstance(doc, dict):
        return 1
    n = doc.get("n")
    if type(n) is int and 1 <= n <= 128:
        return n
    return 1


@attrs.frozen
class Metered:
    """
    How one passthrough answer is billed: its C{usage} (tokens, when the
    answer said), the cost and whether it is priced, what it was billed by
    (L{TOKENS}, L{IMAGES}, L{FREE}, L{UNMETERED}, L{ERROR}) and the images
    counted.
    """

    usage: Usage
    cost_usd: float
    priced: bool
    kind: str
    images: int = 0


class AnswerCopy:
    """
    What metering keeps of an answer while it is relayed: the body while it
    is at most L{MAX_COPY} bytes, and always its last L{TAIL} bytes.
    """

    def __init__(self, limit: int = MAX_COPY, tail: int = TAIL) -> None:
        self._limit = limit
        self._tail_size = tail
        self._parts: list[bytes] | None = []
        self._tail = b""
        self.size = 0

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        if self._parts is not None:
            if self.size <= self._limit:
                self._parts.append(data)
            else:
                self._parts = None
        tail = self._tail + data
        self._tail = tail[-self._tail_size:]

    @property
    def whole(self) -> bytes | None:
        """The whole answer, or None when it was larger than the limit."""
        return b"".join(self._parts) if self._parts is not None else None

    @property
    def tail(self) -> bytes:
        return self._tail


def _count(value: Any) -> int:
    return value if type(value) is int and 0 <= value <= _COUNT_MAX else 0


def usage_in_tail(tail: bytes) -> dict | None:
    """
    The last C{usage} or C{usageMetadata} object in C{tail} (the end of a
    JSON answer, or of a stream whose last event carries the totals), as
    C{{"usage": ...}} or C{{"usageMetadata": ...}}; None when there is none.
    """
    decoder = json.JSONDecoder()
    text = tail.decode("utf-8", "replace")
    best: tuple[int, str, dict] | None = None
    for key in _USAGE_KEYS:
        name = key.decode()
        at = text.rfind(name)
        while at >= 0:
            rest = text[at + len(name):]
            stripped = rest.lstrip()
            if stripped.startswith(":"):
                value_text = stripped[1:].lstrip()
                try:
                    value, _ = decoder.raw_decode(value_text)
                except ValueError:
                    value = None
                if isinstance(value, dict):
                    if best is None or at > best[0]:
                        best = (at, name.strip('"'), value)
                    break
            at = text.rfind(name, 0, at)
    if best is None:
        return None
    return {best[1]: best[2]}


def _gemini_usage(meta: dict) -> Usage:
    prompt = _count(meta.get("promptTokenCount"))
    cached = min(_count(meta.get("cachedContentTokenCount")), prompt)
    thoughts = _count(meta.get("thoughtsTokenCount"))
    output = _count(meta.get("candidatesTokenCount")) + thoughts
    return Usage(
        input_tokens=prompt - cached, cache_read_tokens=cached, output_tokens=output,
        reasoning_tokens=thoughts, seen=True,
    )


def _usage_of(doc: dict) -> Usage | None:
    """The token usage an answer reports, in any of the passthrough's shapes, or None."""
    meta = doc.get("usageMetadata")
    if isinstance(meta, dict):
        return _gemini_usage(meta)
    u = doc.get("usage")
    if not isinstance(u, dict):
        return None
    if "prompt_tokens" in u:  # embeddings (and chat-style) usage
        usage = usage_from_json(doc, OPENAI)
    elif "input_tokens" in u:  # images and transcriptions: the Responses words
        usage = usage_from_json(doc, RESPONSES)
    else:
        return None
    return usage if usage.seen and (usage.prompt_tokens or usage.output_tokens) else None


def _images(doc: dict) -> int | None:
    data = doc.get("data")
    if isinstance(data, list) and all(isinstance(item, dict) for item in data):
        return len(data)
    return None


def meter_answer(
    pricing: Any,
    provider: str,
    path: str,
    model: str | None,
    status: int,
    copy: AnswerCopy,
    images_asked: int = 1,
) -> Metered:
    """
    Bill one passthrough answer (the rules of the module docstring).  An
    answer that is not a success costs nothing; one whose cost cannot be
    read, or whose model is unknown or unpriced, is unmetered (its tokens,
    when it reported some, are still recorded).  An image answer too large
    to keep whole is counted as the images it asked for.
    """
    if not 200 <= status < 300:
        return Metered(Usage(), 0.0, True, ERROR)
    if free_endpoint(provider, path):
        return Metered(Usage(), 0.0, True, FREE)
    whole = copy.whole
    doc: Any = None
    if whole is not None:
        try:
            doc = json.loads(whole)
        except (ValueError, RecursionError):
            doc = None
        if isinstance(doc, list) and doc and isinstance(doc[-1], dict):
            doc = doc[-1]  # a Gemini stream without alt=sse: a JSON array of answers
    if not isinstance(doc, dict):
        doc = usage_in_tail(copy.tail) or {}
    usage = _usage_of(doc)
    if usage is not None:
        if model is None:
            return Metered(usage, 0.0, False, UNMETERED)
        cost, priced = pricing.cost(provider, model, usage)
        return Metered(usage, cost, priced, TOKENS if priced else UNMETERED)
    images = _images(doc)
    if images is None and whole is None and path.startswith("images/"):
        images = images_asked
    if images is not None and model is not None:
        price = pricing.price(provider, model)
        per_image = getattr(price, "per_image", None)
        if per_image is not None:
            return Metered(Usage(), round(images * per_image, 10), True, IMAGES, images)
    return Metered(Usage(), 0.0, False, UNMETERED, images or 0)
