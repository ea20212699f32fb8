"""
What a provider bills for the parts of a request that are not text: images,
documents, the system prompt it adds for tool use, and the most prompt
tokens one request can bill.  Data, with its sources, and one lookup.

Every number is an upper bound taken from the provider's documentation
(C{docs/BUDGETS.md} lists them with their sources).  A model this table does
not know gets the largest documented value of its family, and a model of
no known family the largest documented value of all, so that a reservation
is never below what the provider can bill.  Pure logic, no I/O.
"""

from __future__ import annotations

import functools
import math
import re

import attrs

__all__ = [
    "BillingRules",
    "PAGE_TEXT_TOKENS",
    "TOOL_WRAPPER_TOKENS",
    "builtin_tool_tokens",
    "rules_for",
]

#: Text tokens of one document page (Anthropic documents 1,500-3,000 text
#: tokens a page; the image of the page is counted on top).
PAGE_TEXT_TOKENS = 3_000

#: Tokens a provider may wrap around one tool definition when it renders the
#: definitions into its prompt (tags, separators).  The definitions
#: themselves are in the body and counted with its bytes.  Our margin.
TOOL_WRAPPER_TOKENS = 20

#: OpenAI high-detail images: scaled to fit 2048x2048, then the short side to
#: 768, then 512-pixel tiles: at most 2 x 4 = 8 tiles.
_MAX_TILES = 8
#: OpenAI patch-based models: 32-pixel patches, at most 1,536 of them.
_MAX_PATCHES = 1_536


def _tiles(base: int, tile: int) -> tuple[int, int]:
    """(high-detail worst case, low-detail cost) of a tile-based model."""
    return base + _MAX_TILES * tile, base


def _patches(multiplier: float) -> tuple[int, int]:
    worst = math.ceil(_MAX_PATCHES * multiplier)
    return worst, worst


@attrs.frozen
class BillingRules:
    """
    Upper bounds for one model.

    @ivar image_tokens: one image of unknown size (the largest the provider
        keeps after its own resizing).
    @ivar low_detail_image_tokens: one OpenAI C{detail: "low"} image.
    @ivar document_pages: the most pages of documents one request may hold.
    @ivar context_tokens: the most prompt tokens one request can bill (a
        longer prompt is refused unbilled); bounds parts of unknown size.
    @ivar tool_prompt_auto: the system prompt added when tools are present
        and C{tool_choice} is C{auto} or C{none}.
    @ivar tool_prompt_any: the same for C{any} or a named tool.
    """

    image_tokens: int
    low_detail_image_tokens: int
    document_pages: int
    context_tokens: int
    tool_prompt_auto: int
    tool_prompt_any: int

    def page_tokens(self) -> int:
        """One document page: its image and its text."""
        return self.image_tokens + PAGE_TEXT_TOKENS

    def tool_prompt(self, tool_choice: str | None) -> int:
        if tool_choice in ("auto", "none"):
            return self.tool_prompt_auto
        if tool_choice in ("any", "tool"):
            return self.tool_prompt_any
        return max(self.tool_prompt_auto, self.tool_prompt_any)


# --------------------------------------------------------------------------
# OpenAI (https://platform.openai.com/docs/guides/images-vision, "Calculating
# costs"; PDFs: https://platform.openai.com/docs/guides/pdf-files)

#: model prefix -> (high-detail worst case, low-detail cost)
OPENAI_IMAGES: dict[str, tuple[int, int]] = {
    "gpt-4o": _tiles(85, 170),
    "chatgpt-4o": _tiles(85, 170),
    "gpt-4-turbo": _tiles(85, 170),
    "gpt-4.1": _tiles(85, 170),
    "gpt-4.5": _tiles(85, 170),
    "gpt-4o-mini": _tiles(2_833, 5_667),
    "o1": _tiles(75, 150),
    "o1-pro": _tiles(75, 150),
    "o3": _tiles(75, 150),
    "gpt-5": _tiles(70, 140),
    "computer-use-preview": _tiles(65, 129),
    "gpt-4.1-mini": _patches(1.62),
    "gpt-4.1-nano": _patches(2.46),
    "gpt-5-mini": _patches(1.62),
    "gpt-5-nano": _patches(2.46),
    "o4-mini": _patches(1.72),
}

#: model prefix -> context window (https://platform.openai.com/docs/models)
OPENAI_CONTEXT: dict[str, int] = {
    "gpt-4o": 128_000,
    "chatgpt-4o": 128_000,
    "gpt-4-turbo": 128_000,
    "gpt-4.1": 1_047_576,
    "gpt-4.5": 128_000,
    "o1": 200_000,
    "o3": 200_000,
    "o4-mini": 200_000,
    "gpt-5": 400_000,
    "computer-use-preview": 8_192,
}

#: OpenAI takes up to 100 pages (and 32 MB) of PDF in one request.
OPENAI_DOCUMENT_PAGES = 100

#: OpenAI documents no tool-use system prompt; it renders function
#: definitions into a namespace header.  Our margin for that header.
OPENAI_TOOL_PROMPT = 64

# --------------------------------------------------------------------------
# Anthropic (https://platform.claude.com/docs/en/build-with-claude/vision,
# .../pdf-support, .../agents-and-tools/tool-use/overview "Pricing")

#: Images up to 1568 px on the long edge and ~1,600 tokens (1.15 MP at
#: w*h/750); +50 for the block and the padding to 28-pixel patches.
CLAUDE_STANDARD_IMAGE = 1_650
#: Claude Opus 4.7 and later: up to 2576 px and 3.75 MP, 3.75 MP / 750.
CLAUDE_HIGH_RES_IMAGE = 5_000
#: "600 pages (100 when the request's context window is under 1M tokens)".
CLAUDE_DOCUMENT_PAGES = 600
CLAUDE_CONTEXT = 1_000_000
CLAUDE_3_CONTEXT = 200_000

#: (family word, major, minor or None) -> (auto/none, any/tool) tokens of the
#: tool-use system prompt, from Anthropic's table.
CLAUDE_TOOL_PROMPTS: dict[tuple[str, int, int | None], tuple[int, int]] = {
    ("opus", 3, None): (530, 281),
    ("sonnet", 3, None): (159, 235),
    ("haiku", 3, None): (264, 340),
    ("haiku", 3, 5): (264, 340),
    ("sonnet", 3, 5): (346, 313),  # the later of the two 3.5 Sonnets; the first was 294 / 261
    ("sonnet", 3, 7): (346, 313),
    ("opus", 4, None): (346, 313),
    ("opus", 4, 0): (346, 313),
    ("opus", 4, 1): (346, 313),
    ("opus", 4, 5): (346, 313),
    ("sonnet", 4, None): (346, 313),
    ("sonnet", 4, 0): (346, 313),
    ("sonnet", 4, 5): (346, 313),
    ("haiku", 4, 5): (346, 313),
}
_CLAUDE_TOOL_PROMPT_MAX = (
    max(a for a, _ in CLAUDE_TOOL_PROMPTS.values()),
    max(b for _, b in CLAUDE_TOOL_PROMPTS.values()),
)

#: Anthropic-defined client tools: tokens of their definitions, by the
#: prefix of their versioned type (bash_20250124, text_editor_20250728,
#: computer_20250124: 735 for the definition and up to 499 of system prompt).
ANTHROPIC_BUILTIN_TOOLS: dict[str, int] = {
    "bash_": 245,
    "text_editor_": 700,
    "computer_": 735 + 499,
}
#: Any other provider-defined tool type (server tools, memory, tool search):
#: no documented size; our bound.
UNKNOWN_BUILTIN_TOOL_TOKENS = 2_000

# --------------------------------------------------------------------------
# Everything else

#: The largest documented cost of one image of any model we know
#: (gpt-4o-mini, high detail, worst size).
MAX_IMAGE_TOKENS = max(high for high, _ in OPENAI_IMAGES.values())
#: Gemini takes up to 1,000 pages of documents in one request.
MAX_DOCUMENT_PAGES = 1_000
#: The largest context window offered (Llama 4 Scout, 10M tokens).
MAX_CONTEXT_TOKENS = 10_000_000

UNKNOWN = BillingRules(
    image_tokens=MAX_IMAGE_TOKENS,
    low_detail_image_tokens=MAX_IMAGE_TOKENS,
    document_pages=MAX_DOCUMENT_PAGES,
    context_tokens=MAX_CONTEXT_TOKENS,
    tool_prompt_auto=_CLAUDE_TOOL_PROMPT_MAX[0],
    tool_prompt_any=_CLAUDE_TOOL_PROMPT_MAX[1],
)

_BOUNDARY = re.compile(r"[a-z0-9.]")
_CLAUDE_VERSION = re.compile(r"claude-(?:(\d+)(?:-(\d))?-([a-z]+)|([a-z]+)-(\d+)(?:-(\d{1,2}))?)(?![0-9])")
_OPENAI_NAME = re.compile(r"(gpt-|chatgpt-|o\d|computer-use-|codex-)")


def _longest_prefix(table: dict, name: str):
    """The entry of the longest key that is a prefix of C{name} at a boundary."""
    best = None
    for key in table:
        if name.startswith(key) and (len(name) == len(key) or not _BOUNDARY.match(name[len(key)])):
            if best is None or len(key) > len(best):
                best = key
    return table[best] if best is not None else None


def _base_name(model: str) -> str:
    """C{openai/gpt-4o} -> C{gpt-4o}; C{anthropic/claude-sonnet-4.5} -> C{claude-sonnet-4-5}."""
    name = model.lower().rsplit("/", 1)[-1]
    if "claude" in name:
        name = name[name.index("claude"):]
        name = re.sub(r"(?<=\d)\.(?=\d)", "-", name)
    return name


def _claude(name: str) -> BillingRules:
    match = _CLAUDE_VERSION.match(name)
    word, major, minor = None, None, None
    if match is not None:
        if match.group(3):
            word, major = match.group(3), int(match.group(1))
            minor = int(match.group(2)) if match.group(2) else None
        else:
            word, major = match.group(4), int(match.group(5))
            minor = int(match.group(6)) if match.group(6) else None
    standard_images = major == 3 or (
        major == 4 and word in ("opus", "sonnet", "haiku") and (minor or 0) <= (5 if word == "haiku" else 6)
    )
    auto, any_ = CLAUDE_TOOL_PROMPTS.get((word or "", major or 0, minor), _CLAUDE_TOOL_PROMPT_MAX)
    image = CLAUDE_STANDARD_IMAGE if standard_images else CLAUDE_HIGH_RES_IMAGE
    return BillingRules(
        image_tokens=image,
        low_detail_image_tokens=image,
        document_pages=CLAUDE_DOCUMENT_PAGES,
        context_tokens=CLAUDE_3_CONTEXT if major == 3 else CLAUDE_CONTEXT,
        tool_prompt_auto=auto,
        tool_prompt_any=any_,
    )


def _openai(name: str) -> BillingRules:
    images = _longest_prefix(OPENAI_IMAGES, name)
    context = _longest_prefix(OPENAI_CONTEXT, name)
    high, low = images if images is not None else (MAX_IMAGE_TOKENS, MAX_IMAGE_TOKENS)
    return BillingRules(
        image_tokens=high,
        low_detail_image_tokens=low,
        document_pages=OPENAI_DOCUMENT_PAGES,
        context_tokens=context if context is not None and images is not None else MAX_CONTEXT_TOKENS,
        tool_prompt_auto=OPENAI_TOOL_PROMPT,
        tool_prompt_any=OPENAI_TOOL_PROMPT,
    )


@functools.lru_cache(maxsize=4096)  # bounded: made-up model names cannot grow memory
def rules_for(provider: str, model: str) -> BillingRules:
    """
    The rules of the model behind C{provider}/C{model}, recognised by its
    name (so C{openrouter/anthropic/claude-sonnet-4.5} bills as Claude does).
    """
    name = _base_name(model)
    if name.startswith("claude"):
        return _claude(name)
    if _OPENAI_NAME.match(name):
        return _openai(name)
    return UNKNOWN


def builtin_tool_tokens(tool_type: str) -> int:
    """Tokens of one provider-defined tool (a versioned C{type})."""
    for prefix, tokens in ANTHROPIC_BUILTIN_TOOLS.items():
        if tool_type.startswith(prefix):
            return tokens
    return UNKNOWN_BUILTIN_TOOL_TOKENS
