"""
Budget tiers: cheaper models as a dollar budget runs down.

C{"tiers": [{"threshold": 0.8, "models": [...]}, {"threshold": 0.3,
"models": [...]}, {"threshold": 0.0, "models": [...]}]} in a budget with a
C{limit_usd}.  The remaining fraction is C{1 - (committed + reserved) /
limit_usd}, clamped to C{[0, 1]}.

 - The B{current tier} is the tier with the highest threshold that the
   remaining fraction is B{strictly above}: with the tiers above, 0.81 is in
   the 0.8 tier, exactly 0.8 is in the 0.3 tier, exactly 0.0 is in none.
 - When no tier applies (the remaining fraction is at or below every
   threshold: with a lowest threshold of 0.0 that means nothing is left),
   C{hard_stop} and C{rate_limit} budgets refuse the request and
   C{soft_alert} budgets keep using the lowest tier.
 - A request is B{allowed as is} when its ref is in the current tier or in a
   tier below it (a cheaper model is never moved up).  Any other ref is
   moved to the current tier's first model, intervention
   C{budget_tier_downgrade}.
 - With C{"tiers_rule": "at_least"} (the Execwall OR gate's rule, set for
   the agents of its policy file) a tier applies when the remaining
   fraction is B{at or above} its threshold, and below every threshold the
   lowest tier still applies: only an exhausted budget refuses (its
   C{hard_stop} trip), never a tier.
 - When the chosen ref's provider is C{openrouter}, C{openrouter_models}
   lists the OpenRouter model ids (the ref without C{openrouter/}) to send
   as C{models} with C{route: "fallback"}: the chosen one first, then the
   current tier's other OpenRouter models in order.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from cllama_tx.governance.periods import BudgetError

BUDGET_TIER_DOWNGRADE = "budget_tier_downgrade"
OPENROUTER = "openrouter"

#: How a tier's threshold is compared with the remaining fraction.
ABOVE = "above"  # strictly above; below every threshold no tier applies
AT_LEAST = "at_least"  # at or above; below every threshold the lowest tier (the OR gate)
TIERS_RULES = (ABOVE, AT_LEAST)

_TIER_KEYS = frozenset({"threshold", "models", "name"})


@attrs.frozen
class Tier:
    """Models allowed while the remaining fraction is above C{threshold}."""

    threshold: float
    models: tuple[str, ...]
    name: str | None = None


@attrs.frozen
class TierDecision:
    """
    Which ref to send.  C{ref} is L{None} when C{refused}.
    C{intervention} is C{"budget_tier_downgrade"} when the ref was changed.
    C{openrouter_models} is set when C{ref}'s provider is OpenRouter and a
    tier applies.  C{tier} is the tier in force (L{None} without tiers).
    """

    ref: str | None
    intervention: str | None = None
    openrouter_models: list[str] | None = None
    refused: bool = False
    tier: Tier | None = None
    remaining_fraction: float | None = None


def _fraction(value: Any, where: str) -> float:
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
        except ValueError:
            raise BudgetError(f"{where}: 'threshold' {value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BudgetError(f"{where}: 'threshold' must be a number between 0 and 1")
    if not 0 <= value <= 1:
        raise BudgetError(f"{where}: 'threshold' must be between 0 and 1 (a fraction), not {value}")
    return float(value)


def parse_tiers(raw: Any) -> tuple[Tier, ...]:
    """
    Validate a C{tiers} list; the result is sorted by threshold, highest
    first.  Thresholds are fractions (C{"80%"} is accepted for 0.8).

    @raise BudgetError: not a list of C{{"threshold", "models", "name"?}}
        objects with distinct thresholds and non-empty model lists.
    """
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise BudgetError("'tiers' must be a list of {\"threshold\", \"models\"} objects")
    tiers = []
    seen: set[float] = set()
    for index, item in enumerate(raw):
        where = f"tiers[{index}]"
        if not isinstance(item, dict):
            raise BudgetError(f"{where} must be an object with 'threshold' and 'models'")
        unknown = sorted(str(k) for k in item if k not in _TIER_KEYS and not str(k).startswith("_"))
        if unknown:
            raise BudgetError(f"{where}: unknown key(s): {', '.join(unknown)}")
        if "threshold" not in item:
            raise BudgetError(f"{where}: 'threshold' is missing")
        threshold = _fraction(item["threshold"], where)
        if threshold in seen:
            raise BudgetError(f"{where}: threshold {threshold} appears twice")
        seen.add(threshold)
        models = item.get("models")
        if not isinstance(models, list) or not models:
            raise BudgetError(f"{where}: 'models' must be a non-empty list of model refs")
        refs = []
        for ref in models:
            if not isinstance(ref, str) or not ref.strip():
                raise BudgetError(f"{where}: model refs must be non-empty strings")
            ref = ref.strip()
            if ref not in refs:
                refs.append(ref)
        name = item.get("name")
        if name is not None and not isinstance(name, str):
            raise BudgetError(f"{where}: 'name' must be a string")
        tiers.append(Tier(threshold, tuple(refs), name))
    tiers.sort(key=lambda t: t.threshold, reverse=True)
    return tuple(tiers)


def current_tier_index(tiers: tuple[Tier, ...], remaining_fraction: float, rule: str = ABOVE) -> int | None:
    """
    Index of the first tier whose threshold C{remaining_fraction} is above
    (C{rule} L{AT_LEAST}: at or above).
    """
    inclusive = rule == AT_LEAST
    for index, tier in enumerate(tiers):
        if remaining_fraction > tier.threshold or (inclusive and remaining_fraction >= tier.threshold):
            return index
    return None


def split_ref(ref: str) -> tuple[str, str]:
    """C{("openrouter", "anthropic/claude-sonnet-4.5")} of a ref; provider lower-cased."""
    provider, _, model = ref.partition("/")
    return provider.strip().lower(), model


def tier_decision(budget: Any, remaining_fraction: float | None, requested_ref: str) -> TierDecision:
    """
    The ref to use for a request of C{requested_ref} under C{budget}'s tiers
    when C{remaining_fraction} of its dollar limit is left (see the module
    docstring).  Without tiers or without a fraction (no C{limit_usd}) the
    request is unchanged.
    """
    tiers = getattr(budget, "tiers", ())
    if not tiers or remaining_fraction is None:
        return TierDecision(requested_ref, remaining_fraction=remaining_fraction)
    rule = getattr(budget, "tiers_rule", ABOVE)
    index = current_tier_index(tiers, remaining_fraction, rule)
    if index is None:
        if budget.behavior != "soft_alert" and rule != AT_LEAST:
            return TierDecision(None, refused=True, remaining_fraction=remaining_fraction)
        index = len(tiers) - 1
    tier = tiers[index]
    allowed = {ref for lower in tiers[index:] for ref in lower.models}
    if requested_ref in allowed:
        ref, intervention = requested_ref, None
    else:
        ref, intervention = tier.models[0], BUDGET_TIER_DOWNGRADE
    openrouter_models = None
    provider, model = split_ref(ref)
    if provider == OPENROUTER:
        openrouter_models = [model]
        for other in tier.models:
            other_provider, other_model = split_ref(other)
            if other_provider == OPENROUTER and other_model not in openrouter_models:
                openrouter_models.append(other_model)
    return TierDecision(
        ref,
        intervention=intervention,
        openrouter_models=openrouter_models,
        tier=tier,
        remaining_fraction=remaining_fraction,
    )
