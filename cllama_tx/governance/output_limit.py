"""
Lowering a request's output limit to what its budget still pays for,
instead of refusing it (C{docs/BUDGETS.md}, "Lowering max_tokens").

L{fit_output} decides the limit from prices and the request's shape (read
once by L{cllama_tx.governance.request_cost}); L{limit_body} writes it into
an upstream body in the fields its wire format reads.  Pure logic: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import attrs

from cllama_tx.governance.budgets import affordable_max_tokens
from cllama_tx.governance.request_cost import RequestShape, worst_input_tokens

__all__ = [
    "DEFAULT_MIN_OUTPUT_TOKENS",
    "MIN_THINKING_TOKENS",
    "OutputLimit",
    "fit_output",
    "least_output",
    "limit_body",
    "limit_field",
]

#: The shortest answer worth sending, in output tokens (a few paragraphs, or
#: one tool call): below it a request is refused rather than cut.
DEFAULT_MIN_OUTPUT_TOKENS = 256
#: A thinking budget is never lowered below this (Anthropic's minimum
#: C{budget_tokens}); a request that cannot pay for it is refused.
MIN_THINKING_TOKENS = 1024

_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "maxOutputTokens")
_NESTED = ("generationConfig", "generation_config")
_THINKING_CONFIGS = ("thinking_config", "thinkingConfig")


@attrs.frozen
class OutputLimit:
    """
    The output limits a lowered request is sent with.

    @ivar max_tokens: the output limit of each candidate answer.
    @ivar from_max_tokens: what the request asked for (L{None}: nothing).
    @ivar thinking_budget: the lowered thinking budget, L{None} when it
        stays as sent.
    @ivar from_thinking_budget: the thinking budget as sent.
    @ivar available_usd: what the tightest budget had left for it.
    """

    max_tokens: int
    from_max_tokens: int | None
    thinking_budget: int | None = None
    from_thinking_budget: int | None = None
    available_usd: float = 0.0

    def shape(self, shape: RequestShape) -> RequestShape:
        """C{shape} as it is sent with these limits."""
        thinking = self.thinking_budget if self.thinking_budget is not None else shape.thinking_budget
        return attrs.evolve(shape, max_tokens=self.max_tokens, thinking_budget=thinking)


def _answer_floor(shape: RequestShape, min_output_tokens: int) -> int:
    if shape.max_tokens is None:
        return min_output_tokens
    return min(min_output_tokens, shape.max_tokens)


def least_output(shape: RequestShape, min_output_tokens: int) -> int | None:
    """
    The smallest C{max_tokens} C{shape} may be lowered to: the answer floor
    (C{min_output_tokens}, at most what was asked) plus the least thinking
    budget.  L{None} when it cannot be lowered: lowering is off
    (C{min_output_tokens} 0) or it asks for no more than that already.
    """
    if min_output_tokens <= 0:
        return None
    least = _answer_floor(shape, min_output_tokens)
    if shape.thinking_budget:
        least += min(shape.thinking_budget, MIN_THINKING_TOKENS)
    if shape.max_tokens is not None and least >= shape.max_tokens:
        return None
    return least


def fit_output(
    pricing: Any, candidates: Iterable[Any], shape: RequestShape, available_usd: float, min_output_tokens: int
) -> OutputLimit | None:
    """
    The output limit that makes C{shape}'s worst case fit C{available_usd}
    for every priced candidate (the dearest decides), never below
    L{least_output}: when even that does not fit, the limit at that floor,
    for the budget to refuse with its reasons.  A thinking budget that would
    leave less than the answer floor is lowered with it.  L{None} when the
    request cannot be lowered or no candidate is priced.
    """
    least = least_output(shape, min_output_tokens)
    if least is None:
        return None
    tokens = None
    for ref in candidates:
        fits = affordable_max_tokens(
            pricing,
            ref.provider,
            ref.model,
            worst_input_tokens(shape, ref.provider, ref.model),
            available_usd,
            choices=shape.choices,
            extra_output_tokens=shape.prediction_bytes,
        )
        if fits is not None:
            tokens = fits if tokens is None else min(tokens, fits)
    if tokens is None:
        return None
    tokens = max(tokens, least)
    if shape.max_tokens is not None and tokens >= shape.max_tokens:
        return None
    thinking = None
    if shape.thinking_budget:
        cap = tokens - _answer_floor(shape, min_output_tokens)
        if shape.thinking_budget > cap:
            thinking = cap
    return OutputLimit(
        max_tokens=tokens,
        from_max_tokens=shape.max_tokens,
        thinking_budget=thinking,
        from_thinking_budget=shape.thinking_budget if thinking is not None else None,
        available_usd=available_usd,
    )


# --------------------------------------------------------------------------
# Writing the limit into a body


def _count(value: Any) -> int | None:
    """A limit as a lenient provider reads it (as request_cost counts it), else None."""
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


def _cap(config: dict, names: tuple[str, ...], cap: int) -> bool:
    """Lower each of C{names} above C{cap} to it, in place; True when one is set."""
    present = False
    for name in names:
        count = _count(config.get(name))
        if count is None:
            continue
        present = True
        if count > cap:
            config[name] = cap
    return present


def _copy(parent: dict, name: str) -> dict | None:
    """A copy of the object C{parent[name]} put in its place, so the original body stays as it was."""
    child = parent.get(name)
    if not isinstance(child, dict):
        return None
    child = dict(child)
    parent[name] = child
    return child


def limit_field(api_format: str, provider: str) -> str:
    """
    The field a request without any output limit gets: C{max_tokens} for
    Anthropic and OpenAI-compatible servers, C{max_completion_tokens} for
    OpenAI itself (its reasoning models refuse C{max_tokens}), the Responses
    API's C{max_output_tokens}.
    """
    if api_format == "responses":
        return "max_output_tokens"
    if api_format == "openai" and provider.partition("@")[0].lower() == "openai":
        return "max_completion_tokens"
    return "max_tokens"


def limit_body(doc: dict, api_format: str, provider: str, limit: OutputLimit) -> dict:
    """
    C{doc} with every output limit it carries (C{max_tokens},
    C{max_completion_tokens}, C{max_output_tokens}, Gemini's
    C{maxOutputTokens}, also in C{generationConfig} and C{extra_body.google})
    at most C{limit.max_tokens}, L{limit_field} set when it has none at the
    top, and its thinking budgets at most C{limit.thinking_budget}.  C{doc}
    itself is not changed.
    """
    out = dict(doc)
    configs = [out]
    for name in _NESTED:
        nested = _copy(out, name)
        if nested is not None:
            configs.append(nested)
    extra = _copy(out, "extra_body")
    google = _copy(extra, "google") if extra is not None else None
    if google is not None:
        configs.append(google)
        for name in _NESTED:
            nested = _copy(google, name)
            if nested is not None:
                configs.append(nested)
    if not _cap(out, _LIMIT_FIELDS, limit.max_tokens):
        out[limit_field(api_format, provider)] = limit.max_tokens
    for config in configs[1:]:
        _cap(config, _LIMIT_FIELDS, limit.max_tokens)
    budget = limit.thinking_budget
    if budget is not None:
        thinking = _copy(out, "thinking")
        if thinking is not None:
            _cap(thinking, ("budget_tokens",), budget)
        reasoning = _copy(out, "reasoning")
        if reasoning is not None:
            _cap(reasoning, ("max_tokens",), budget)
        for config in configs:
            for name in _THINKING_CONFIGS:
                inner = _copy(config, name)
                if inner is not None:
                    _cap(inner, ("thinking_budget", "thinkingBudget"), budget)
    return out
