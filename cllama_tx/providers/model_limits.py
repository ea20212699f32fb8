"""
The catalog's model data that keeps a translated or swapped request valid:
each known model family's output limit, the reasoning controls it takes and
refuses, and the betas it accepts (as the providers document them).

Looked up by the longest key that is a prefix of the model id and ends at a
boundary (the next character is not a letter, a digit or a dot), as prices
are: C{claude-sonnet-4-5-20250929} finds C{claude-sonnet-4-5}, C{gpt-4o-mini}
never finds C{gpt-4o}.  Pure data.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from cllama_tx.surfaces.model_traits import ADAPTIVE, BUDGET, UNKNOWN_MODEL, ModelTraits

__all__ = ["MODEL_TRAITS", "traits_for"]

_O_SERIES = frozenset({"low", "medium", "high"})
_GPT5 = frozenset({"minimal", "low", "medium", "high"})
_GPT51 = frozenset({"none", "low", "medium", "high"})
_GPT52 = frozenset({"none", "low", "medium", "high", "xhigh"})


def _openai(max_output: int, efforts: frozenset[str] = frozenset()) -> ModelTraits:
    return ModelTraits(
        known=True, max_output_tokens=max_output, reasoning_efforts=efforts, fixed_sampling=bool(efforts)
    )


def _claude(max_output: int, thinking: str | None = BUDGET, effort: bool = False, long_context: bool = False) -> ModelTraits:
    return ModelTraits(
        known=True, max_output_tokens=max_output, thinking=thinking, effort=effort, long_context=long_context
    )


_OPENAI: dict[str, ModelTraits] = {
    "gpt-3.5-turbo": _openai(4096),
    "gpt-4": _openai(8192),
    "gpt-4-turbo": _openai(4096),
    "gpt-4o": _openai(16384),
    "gpt-4o-2024-05-13": _openai(4096),
    "gpt-4o-mini": _openai(16384),
    "chatgpt-4o-latest": _openai(16384),
    "gpt-4.1": _openai(32768),
    "gpt-4.1-mini": _openai(32768),
    "gpt-4.1-nano": _openai(32768),
    "o1": _openai(100000, _O_SERIES),
    "o1-pro": _openai(100000, _O_SERIES),
    "o3": _openai(100000, _O_SERIES),
    "o3-pro": _openai(100000, _O_SERIES),
    "o3-mini": _openai(100000, _O_SERIES),
    "o4-mini": _openai(100000, _O_SERIES),
    "gpt-5": _openai(128000, _GPT5),
    "gpt-5-mini": _openai(128000, _GPT5),
    "gpt-5-nano": _openai(128000, _GPT5),
    "gpt-5-codex": _openai(128000, _GPT5),
    "gpt-5.1": _openai(128000, _GPT51),
    "gpt-5.1-codex": _openai(128000, _GPT51),
    "gpt-5.2": _openai(128000, _GPT52),
    "gpt-5.4": _openai(128000, _GPT52),
    "gpt-5.5": _openai(128000, _GPT52),
    "gpt-6": _openai(128000, _GPT52),
}

_ANTHROPIC: dict[str, ModelTraits] = {
    "claude-3-haiku": _claude(4096, None),
    "claude-3-opus": _claude(4096, None),
    "claude-3-5-haiku": _claude(8192, None),
    "claude-3-5-sonnet": _claude(8192, None),
    "claude-3-7-sonnet": _claude(64000),
    "claude-sonnet-4-0": _claude(64000, long_context=True),
    "claude-sonnet-4-20250514": _claude(64000, long_context=True),
    "claude-sonnet-4-5": _claude(64000, long_context=True),
    "claude-sonnet-4-6": _claude(128000, ADAPTIVE, effort=True, long_context=True),
    "claude-haiku-4-5": _claude(64000),
    "claude-opus-4-0": _claude(32000),
    "claude-opus-4-20250514": _claude(32000),
    "claude-opus-4-1": _claude(32000),
    "claude-opus-4-5": _claude(64000, effort=True),
    "claude-opus-4-6": _claude(128000, ADAPTIVE, effort=True, long_context=True),
    "claude-opus-4-7": _claude(128000, ADAPTIVE, effort=True, long_context=True),
    "claude-opus-4-8": _claude(128000, ADAPTIVE, effort=True, long_context=True),
    "claude-opus-5": _claude(128000, ADAPTIVE, effort=True, long_context=True),
    "claude-sonnet-5": _claude(128000, ADAPTIVE, effort=True, long_context=True),
    "claude-haiku-5": _claude(128000, ADAPTIVE, effort=True),
}

#: The model data by provider (the catalog's names; a keyed provider such as
#: C{openai@team} reads its base provider's).
MODEL_TRAITS: Mapping[str, Mapping[str, ModelTraits]] = MappingProxyType(
    {
        "openai": MappingProxyType(_OPENAI),
        "anthropic": MappingProxyType(_ANTHROPIC),
        "google": MappingProxyType(
            {
                "gemini-2.5-pro": _openai(65536, _O_SERIES),
                "gemini-2.5-flash": _openai(65536, frozenset({"none", "low", "medium", "high"})),
                "gemini-2.5-flash-lite": _openai(65536, frozenset({"none", "low", "medium", "high"})),
            }
        ),
        "xai": MappingProxyType({"grok-3-mini": _openai(131072, frozenset({"low", "high"}))}),
    }
)


def _boundary(model: str, key: str) -> bool:
    if not model.startswith(key):
        return False
    rest = model[len(key) :]
    return not rest or not (rest[0].isalnum() or rest[0] == ".")


def traits_for(provider: str, model: str) -> ModelTraits:
    """What C{model} at C{provider} takes; L{UNKNOWN_MODEL} when the catalog does not know it."""
    table = MODEL_TRAITS.get(provider.partition("@")[0].lower())
    if table is None or not isinstance(model, str):
        return UNKNOWN_MODEL
    found = table.get(model)
    if found is not None:
        return found
    best = ""
    for key in table:
        if len(key) > len(best) and _boundary(model, key):
            best = key
    return table[best] if best else UNKNOWN_MODEL
