"""
A price to hold OpenRouter models the table does not price.

OpenRouter serves hundreds of models and reports what each answer cost
(C{usage.cost}), so an OpenRouter model missing from the price table need
not be refused under a dollar budget: its reservation is held at a
B{ceiling} price and settled with the cost OpenRouter reports.  The ceiling
is the operator's (C{CLLAMA_OPENROUTER_CEILING="<input>/<output>"}, USD per
million tokens) or, by default, the dearest input-side and output rates of
the OpenRouter models the table does price, so a new model is held at least
as high as any model known.  An answer that carries no cost is settled at
the ceiling for its tokens, never at nothing.

L{CeilingPricing} is the price table the budget book reserves with; the
ledger keeps pricing with the table itself (an unpriced model stays
unpriced there, with OpenRouter's reported cost when it sent one).
"""

from __future__ import annotations

import math
from typing import Any

from cllama_tx.accounting.pricing import Price, compute_cost
from cllama_tx.store.records import Usage

OPENROUTER = "openrouter"
AUTO = "auto"
OFF = "off"


class CeilingError(ValueError):
    """C{CLLAMA_OPENROUTER_CEILING} cannot be read; the message says why."""


def parse_ceiling(text: str | None) -> Price | str:
    """
    C{CLLAMA_OPENROUTER_CEILING}: C{auto} (the default), C{off} (unpriced
    OpenRouter models are refused as any unpriced model), or
    C{"<input>/<output>"} in USD per million tokens.

    @raise CeilingError: anything else.
    """
    value = (text or "").strip().lower()
    if not value or value == AUTO:
        return AUTO
    if value == OFF:
        return OFF
    parts = value.split("/")
    try:
        rates = [float(p) for p in parts]
    except ValueError:
        rates = []
    if len(rates) != 2 or not all(math.isfinite(r) and r > 0 for r in rates):
        raise CeilingError(
            f"CLLAMA_OPENROUTER_CEILING must be auto, off or \"<input>/<output>\" (USD per million tokens, "
            f"both above 0), not {text!r}"
        )
    return Price(input=rates[0], output=rates[1])


def dearest(models: Any) -> Price | None:
    """The dearest input-side (input, cache read, cache write) and output rates of a provider's prices."""
    inputs: list[float] = []
    outputs: list[float] = []
    for price in (models or {}).values():
        inputs.extend(r for r in (price.input, price.cache_read, price.cache_write) if r is not None)
        outputs.append(price.output)
    if not inputs or not outputs:
        return None
    return Price(input=max(inputs), output=max(outputs))


class CeilingPricing:
    """
    The price table as the budget book sees it: the table's price when it
    has one, the ceiling for an OpenRouter model it has none for.
    Everything else is the table's (read through).
    """

    def __init__(self, pricing: Any, ceiling: Price | str = AUTO) -> None:
        self._pricing = pricing
        self._ceiling = ceiling
        self._auto: tuple[Any, Price | None] = (None, None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pricing, name)

    @property
    def ceiling(self) -> Price | None:
        """The price held for an unpriced OpenRouter model (None: off, or nothing to take it from)."""
        if self._ceiling == OFF:
            return None
        if isinstance(self._ceiling, Price):
            return self._ceiling
        table = getattr(self._pricing, "table", None) or {}
        known, found = self._auto
        if known is not table:
            found = dearest(table.get(OPENROUTER))
            self._auto = (table, found)
        return found

    def price(self, provider: str, model: str) -> Price | None:
        found = self._pricing.price(provider, model) if self._pricing is not None else None
        if found is None and isinstance(provider, str) and provider.strip().lower() == OPENROUTER:
            return self.ceiling
        return found

    def held_at_ceiling(self, provider: str, model: str) -> bool:
        """Whether C{model} is held at the ceiling (the table does not price it)."""
        return (
            isinstance(provider, str) and provider.strip().lower() == OPENROUTER
            and self._pricing.price(provider, model) is None and self.ceiling is not None
        )


def ceiling_cost(pricing: Any, row: Any) -> float | None:
    """
    What an answer of an OpenRouter model without a price and without a
    reported cost is counted at in its budget: its tokens at the ceiling.
    None when the row is not such an answer.
    """
    if not isinstance(pricing, CeilingPricing) or row.priced or row.provider is None or row.effective_model is None:
        return None
    if not pricing.held_at_ceiling(row.provider, row.effective_model):
        return None
    usage = Usage(
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        cache_read_tokens=row.cache_read_tokens,
        cache_write_tokens=row.cache_write_tokens,
    )
    cost, _ = compute_cost(pricing.ceiling, usage)
    return cost
