"""
The most a request can make a provider bill, in tokens, before it is sent:
what budget reservations hold (C{docs/BUDGETS.md}, "Worst case").

L{read_request} walks an OpenAI chat or Anthropic messages body once and
keeps what a provider bills beyond the body's text: images, documents,
tools, and the multipliers of the output (C{n} and its cousins, thinking
budgets, predicted outputs).  L{worst_input_tokens} prices that shape for
one model with L{billing_rules}.  Pure logic: no I/O, and never a fetch of
a URL the request names (an image behind a URL counts as the largest image
the model takes).

Text is bounded by bytes: no tokenizer makes more tokens than UTF-8 bytes,
and the JSON around each message is longer than the tokens a chat template
adds per message.  Inline base64 images and documents are taken out of
those bytes and counted by the provider's rules instead; inline audio stays
counted as bytes (one token per base64 character is far above any
documented audio rate for any real bitrate).
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from cllama_tx.accounting.usage import RESPONSES, estimate_prompt_tokens, text_messages_chars
from cllama_tx.governance.billing_rules import (
    TOOL_WRAPPER_TOKENS,
    BillingRules,
    builtin_tool_tokens,
    rules_for,
)

__all__ = ["RequestShape", "read_request", "read_request_and_estimate", "worst_input_tokens"]

#: Fields that ask for several candidates, each billed in full.
_CHOICE_FIELDS = ("n", "best_of", "candidate_count", "candidateCount")
_MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "maxOutputTokens")
#: Nested objects of OpenAI-compatible providers that may carry the same
#: fields (Gemini's generation config, its "extra_body.google" block).
_NESTED = ("generationConfig", "generation_config")


@attrs.define
class RequestShape:
    """
    What a provider bills for one request, beyond what depends on the model.

    @ivar text_bytes: the body's size without the inline media counted below.
    @ivar images: image parts (of any detail).
    @ivar low_detail_images: of those, OpenAI C{detail: "low"} ones.
    @ivar documents: PDF documents behind a URL (page count unknown).
    @ivar inline_documents: the base64 length of each inline document.
    @ivar opaque_inputs: inputs of unknown kind and size (file ids, MCP
        servers, earlier audio answers): bounded by the context window.
    @ivar tools: tool definitions (functions, custom tools, builtin tools).
    @ivar builtin_tools: the provider-defined tools' types (C{bash_20250124}).
    @ivar tool_choice: C{auto}, C{none}, C{any}, C{tool}, or L{None} when
        not given in a known form.
    @ivar choices: candidates generated (C{n}, C{best_of}, candidate counts).
    @ivar max_tokens: the output limit per candidate, L{None} when absent.
    @ivar thinking_budget: a thinking budget, L{None} when absent.
    @ivar prediction_bytes: a predicted output's bytes (rejected prediction
        tokens are billed as output).
    """

    text_bytes: int
    images: int = 0
    low_detail_images: int = 0
    documents: int = 0
    inline_documents: tuple[int, ...] = ()
    opaque_inputs: int = 0
    tools: int = 0
    builtin_tools: tuple[str, ...] = ()
    tool_choice: str | None = None
    choices: int = 1
    max_tokens: int | None = None
    thinking_budget: int | None = None
    prediction_bytes: int = 0

    def output_tokens(self, model_max: int | None) -> int:
        """The output of one candidate: C{max_tokens} (else C{model_max}), at least the thinking budget."""
        limit = self.max_tokens if self.max_tokens is not None else (model_max or 0)
        return max(limit, self.thinking_budget or 0)


def _count(value: Any) -> int | None:
    """A positive whole number as a lenient provider would read it, else None."""
    if type(value) is int:
        return value if value > 0 else None
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
        return math.ceil(value)
    return None


def _largest(configs: list[dict], names: tuple[str, ...]) -> int | None:
    """The largest count among C{names} in any of C{configs}."""
    best = None
    for config in configs:
        for name in names:
            value = config.get(name)
            if value is not None:
                count = _count(value)
                if count is not None and (best is None or count > best):
                    best = count
    return best


def _nested_configs(doc: dict) -> list[dict]:
    configs: list[dict] = [doc]
    for name in _NESTED:
        if isinstance(doc.get(name), dict):
            configs.append(doc[name])
    extra = doc.get("extra_body")
    google = extra.get("google") if isinstance(extra, dict) else None
    if isinstance(google, dict):
        configs.append(google)
        for name in _NESTED:
            if isinstance(google.get(name), dict):
                configs.append(google[name])
    return configs


def _thinking_budget(doc: dict, configs: list[dict]) -> int | None:
    places = []
    thinking = doc.get("thinking")
    if isinstance(thinking, dict):
        places.append({"budget": thinking.get("budget_tokens")})
    reasoning = doc.get("reasoning")
    if isinstance(reasoning, dict):
        places.append({"budget": reasoning.get("max_tokens")})
    for config in configs:
        for name in ("thinking_config", "thinkingConfig"):
            inner = config.get(name)
            if isinstance(inner, dict):
                places.append({"budget": inner.get("thinking_budget")})
                places.append({"budget": inner.get("thinkingBudget")})
    return _largest(places, ("budget",)) if places else None


def _tool_choice(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else value
    return {
        "auto": "auto",
        "none": "none",
        "any": "any",
        "required": "any",
        "tool": "tool",
        "function": "tool",
    }.get(kind) if isinstance(kind, str) else None


def _prediction_bytes(prediction: Any) -> int:
    if not isinstance(prediction, dict):
        return 0
    content = prediction.get("content")
    if isinstance(content, str):
        return len(content.encode("utf-8", "surrogatepass"))
    total = 0
    if isinstance(content, list):
        for part in content:
            text = part.get("text") if isinstance(part, dict) else None
            if isinstance(text, str):
                total += len(text.encode("utf-8", "surrogatepass"))
    return total


class _Media:
    """Counts media parts while the content blocks are walked."""

    def __init__(self) -> None:
        self.inline = 0
        self.images = 0
        self.low = 0
        self.documents = 0
        self.inline_documents: list[int] = []
        self.opaque = 0

    def image_url(self, part: dict, key: str) -> None:
        image = part.get(key)
        url = image.get("url") if isinstance(image, dict) else image
        detail = image.get("detail") if isinstance(image, dict) else part.get("detail")
        if isinstance(url, str) and url[:5].lower() == "data:":
            self.inline += len(url)
        self.images += 1
        if detail == "low":
            self.low += 1

    def image(self, part: dict) -> None:
        source = part.get("source")
        if isinstance(source, dict) and source.get("type") == "base64" and isinstance(source.get("data"), str):
            self.inline += len(source["data"])
        self.images += 1

    def document(self, part: dict, pending: list) -> None:
        source = part.get("source")
        if not isinstance(source, dict):
            self.opaque += 1
            return
        kind = source.get("type")
        data = source.get("data")
        if kind == "text":
            return  # plain text: counted with the body's bytes
        if kind == "content":
            pending.append(source.get("content"))
            return
        if kind == "base64" and isinstance(data, str):
            self.inline += len(data)
            self.inline_documents.append(len(data))
        elif kind == "url":
            self.documents += 1
        else:
            self.opaque += 1  # a file id: a PDF, or a text file of any length

    def file(self, part: dict, key: str) -> None:
        file = part.get(key)
        if not isinstance(file, dict):
            file = part
        data = file.get("file_data")
        if isinstance(data, str):
            self.inline += len(data)
            self.inline_documents.append(len(data))
        elif isinstance(file.get("file_url"), str):
            self.documents += 1
        else:
            self.opaque += 1

    def walk(self, content: Any) -> None:
        """Every content block of a message, nested tool results included."""
        pending = [content]
        while pending:
            blocks = pending.pop()
            if not isinstance(blocks, list):
                continue
            for part in blocks:
                if not isinstance(part, dict):
                    continue
                kind = part.get("type")
                if kind == "image_url":
                    self.image_url(part, "image_url")
                elif kind == "input_image":
                    self.image_url(part, "image_url")
                elif kind == "image":
                    self.image(part)
                elif kind == "document":
                    self.document(part, pending)
                elif kind in ("file", "input_file"):
                    self.file(part, "file")
                elif kind in ("tool_result", "search_result"):
                    pending.append(part.get("content"))


def read_request(doc: dict, body_size: int) -> RequestShape:
    """The billable shape of a chat, messages or Responses body of C{body_size} bytes."""
    media = _Media()
    messages = doc.get("messages")
    if not isinstance(messages, list):
        messages = doc.get("input")  # a Responses API request's items
    if isinstance(messages, list):
        for message in messages:
            if not isinstance(message, dict):
                continue
            media.walk(message.get("content"))
            audio = message.get("audio")
            if isinstance(audio, dict) and "id" in audio:
                media.opaque += 1  # an earlier spoken answer, billed again as input
    return _shape(doc, body_size, media)


def read_request_and_estimate(doc: dict, body_size: int, wire_format: str) -> tuple[RequestShape, int]:
    """
    L{read_request} and C{estimate_prompt_tokens} of one body, which
    governance needs both of: a conversation of text-only messages (every
    value a string or a scalar: no media, no audio, no blocks) is walked
    once for both, anything else by each as before.
    """
    messages = doc.get("messages")
    if type(messages) is list and wire_format != RESPONSES:
        chars = text_messages_chars(messages)
        if chars is not None:
            return _shape(doc, body_size, _NO_MEDIA), estimate_prompt_tokens(doc, wire_format, chars)
    return read_request(doc, body_size), estimate_prompt_tokens(doc, wire_format)


#: What a conversation without media parts adds (never changed: L{_shape} only reads it).
_NO_MEDIA = _Media()


#: Every top-level field L{_shape} reads: a body with none of them (or only
#: an output limit) is its bytes and that limit.
_SHAPE_KEYS = frozenset({
    "mcp_servers", "tools", "functions", "tool_choice", "prediction", "thinking", "reasoning",
    "thinking_config", "thinkingConfig", "extra_body", *_NESTED, *_CHOICE_FIELDS, *_MAX_TOKENS_FIELDS,
})
_LIMIT_KEYS = frozenset(_MAX_TOKENS_FIELDS)


def _shape(doc: dict, body_size: int, media: _Media) -> RequestShape:
    """The shape of a body whose messages' media were counted into C{media}."""
    if media is _NO_MEDIA:
        present = _SHAPE_KEYS.intersection(doc)
        if not present:
            return RequestShape(text_bytes=max(0, body_size))
        if present <= _LIMIT_KEYS:
            return RequestShape(text_bytes=max(0, body_size), max_tokens=_largest([doc], _MAX_TOKENS_FIELDS))
    opaque = media.opaque
    mcp = doc.get("mcp_servers")
    if isinstance(mcp, list):
        opaque += len(mcp)  # their tools' definitions are fetched upstream
    tools = [t for key in ("tools", "functions") if isinstance(doc.get(key), list) for t in doc[key]]
    builtin = tuple(
        t["type"]
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("type"), str) and t["type"] not in ("function", "custom")
    ) if tools else ()
    configs = _nested_configs(doc)
    choices = _largest(configs, _CHOICE_FIELDS)
    max_tokens = _largest(configs, _MAX_TOKENS_FIELDS)
    return RequestShape(
        text_bytes=max(0, body_size - media.inline),
        images=media.images,
        low_detail_images=media.low,
        documents=media.documents,
        inline_documents=tuple(media.inline_documents),
        opaque_inputs=opaque,
        tools=len(tools),
        builtin_tools=builtin,
        tool_choice=_tool_choice(doc.get("tool_choice")),
        choices=choices or 1,
        max_tokens=max_tokens,
        thinking_budget=_thinking_budget(doc, configs),
        prediction_bytes=_prediction_bytes(doc.get("prediction")),
    )


def worst_input_tokens(shape: RequestShape, provider: str, model: str, rules: BillingRules | None = None) -> int:
    """
    The most prompt tokens C{provider}/C{model} can bill for C{shape}: the
    text's bytes, every image at the largest size the model keeps, every
    document at its most pages (an inline one at least at its base64
    length, should the provider read it as a text file; parts of unknown
    size at the whole context window), and the tokens tool use adds.
    """
    if not (shape.images or shape.documents or shape.inline_documents or shape.opaque_inputs
            or shape.tools or shape.builtin_tools):
        return max(1, shape.text_bytes)  # text alone: its bytes, whatever the model's rules
    rules = rules or rules_for(provider, model)
    high = shape.images - shape.low_detail_images
    document = min(rules.document_pages * rules.page_tokens(), rules.context_tokens)
    media = (
        high * rules.image_tokens
        + shape.low_detail_images * rules.low_detail_image_tokens
        + shape.documents * document
        + sum(max(size, document) for size in shape.inline_documents)
        + shape.opaque_inputs * rules.context_tokens
    )
    tools = 0
    if shape.tools or shape.builtin_tools:
        tools = (
            rules.tool_prompt(shape.tool_choice)
            + shape.tools * TOOL_WRAPPER_TOKENS
            + sum(builtin_tool_tokens(kind) for kind in shape.builtin_tools)
        )
    return max(1, shape.text_bytes) + min(media, rules.context_tokens) + tools
