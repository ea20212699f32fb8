"""
A request sent to another model than the one it was written for (a policy
clamp, a budget tier, a failover) keeps only what that model takes: the
same rule as translation.  An output limit above the model's most is
lowered; a reasoning control it does not take is mapped to the nearest it
does, or dropped (advice on how hard to think); a beta it does not take
(the 1M context window) is dropped.  Every change is named.

Only a model the catalog knows is fitted: for an unknown one the request
goes as written, and the provider judges it.  Pure logic.
"""

from __future__ import annotations

from typing import Any

import attrs

from cllama_tx.surfaces.model_traits import ADAPTIVE, BUDGET, ModelTraits
from cllama_tx.surfaces.translate_common import Notes
from cllama_tx.surfaces.translate_reasoning import (
    MIN_THINKING_BUDGET,
    anthropic_thinking,
    effort_from_anthropic,
    nearest_effort,
)

__all__ = ["Fitted", "fit_request"]

_OPENAI_LIMITS = ("max_completion_tokens", "max_tokens")
LONG_CONTEXT_BETA = "context-1m-"


@attrs.frozen
class Fitted:
    """The body to send, what was dropped and changed, and the betas to send."""

    request: dict
    dropped: tuple[str, ...] = ()
    adjusted: tuple[str, ...] = ()
    betas: tuple[str, ...] | None = None  # None: the agent's, unchanged


def fit_request(doc: dict, api_format: str, traits: ModelTraits, betas: tuple[str, ...] = ()) -> Fitted:
    """C{doc} (in C{api_format}) fitted to a model with C{traits}; C{doc} itself is not changed."""
    if not traits.known:
        return Fitted(doc)
    out = dict(doc)
    notes = Notes()
    kept_betas: tuple[str, ...] | None = None
    if api_format == "anthropic":
        _fit_anthropic(out, traits, notes)
        if not traits.long_context and any(b.startswith(LONG_CONTEXT_BETA) for b in betas):
            kept_betas = tuple(b for b in betas if not b.startswith(LONG_CONTEXT_BETA))
            for beta in betas:
                if beta.startswith(LONG_CONTEXT_BETA):
                    notes.drop(f"anthropic-beta: {beta}")
    elif api_format == "openai":
        _fit_openai(out, traits, notes)
    if not notes.dropped and not notes.adjusted:
        return Fitted(doc)
    return Fitted(out, tuple(notes.dropped), tuple(notes.adjusted), kept_betas)


def _lower(out: dict, names: tuple[str, ...], most: int | None, notes: Notes) -> None:
    for name in names:
        value = out.get(name)
        if most is not None and type(value) is int and value > most:
            notes.adjust(name, f"{value} lowered to {most}, the model's most")
            out[name] = most


def _fit_openai(out: dict, traits: ModelTraits, notes: Notes) -> None:
    _lower(out, _OPENAI_LIMITS, traits.max_output_tokens, notes)
    effort = out.get("reasoning_effort")
    if isinstance(effort, str):
        chosen = nearest_effort(effort, traits.reasoning_efforts)
        if chosen is None:
            del out["reasoning_effort"]
            notes.drop("reasoning_effort")
        elif chosen != effort:
            out["reasoning_effort"] = chosen
            notes.adjust("reasoning_effort", f"{effort} -> {chosen}, the nearest the model takes")
    if traits.fixed_sampling:
        for name in ("temperature", "top_p"):
            if out.get(name) is not None and out[name] != 1:
                del out[name]
                notes.drop(name)


def _fit_anthropic(out: dict, traits: ModelTraits, notes: Notes) -> None:
    _lower(out, ("max_tokens",), traits.max_output_tokens, notes)
    thinking = out.get("thinking")
    config = out.get("output_config")
    config = dict(config) if isinstance(config, dict) else None
    effort = config.get("effort") if config is not None else None
    if config is not None and effort is not None and not traits.effort:
        del config["effort"]
        notes.drop("output_config.effort")
    kind = thinking.get("type") if isinstance(thinking, dict) else None
    if isinstance(thinking, dict) and kind in ("enabled", "adaptive"):
        limit = out.get("max_tokens")
        max_tokens: int = limit if type(limit) is int else 0
        if traits.thinking is None:
            del out["thinking"]
            notes.drop("thinking")
            _drop_thinking_edits(out, notes)
        elif kind == "adaptive" and traits.thinking == BUDGET:
            wanted = effort_from_anthropic(thinking, effort) or "medium"
            try:
                mapped, _ = anthropic_thinking(wanted, traits, max_tokens)
            except ValueError:
                mapped = None
            if mapped is None:
                del out["thinking"]
                notes.drop("thinking")
                _drop_thinking_edits(out, notes)
            else:
                out["thinking"] = mapped
                notes.adjust("thinking", f"adaptive -> a budget of {mapped['budget_tokens']} tokens")
        elif kind == "enabled" and traits.thinking in (BUDGET, ADAPTIVE):
            budget = thinking.get("budget_tokens")
            if type(budget) is int and budget >= max_tokens:
                if max_tokens - 1 < MIN_THINKING_BUDGET:
                    del out["thinking"]
                    notes.drop("thinking")
                    _drop_thinking_edits(out, notes)
                else:
                    out["thinking"] = {**thinking, "budget_tokens": max_tokens - 1}
                    notes.adjust("thinking.budget_tokens", f"{budget} lowered to {max_tokens - 1}, below max_tokens")
    if config is not None:
        if config:
            out["output_config"] = config
        else:
            del out["output_config"]


def _drop_thinking_edits(out: dict, notes: Notes) -> None:
    """Context edits that clear thinking need thinking: without it they go too."""
    management: Any = out.get("context_management")
    edits = management.get("edits") if isinstance(management, dict) else None
    if not isinstance(edits, list):
        return
    kept = [e for e in edits if not (isinstance(e, dict) and str(e.get("type", "")).startswith("clear_thinking"))]
    if len(kept) == len(edits):
        return
    notes.drop("context_management.edits[].type=clear_thinking")
    if kept:
        out["context_management"] = {**management, "edits": kept}
    else:
        del out["context_management"]
