"""
USD prices per million tokens, by provider and model, and the cost of one
response (CONTRACT section 5).

The table is data: C{cllama_tx/data/pricing.json} ships with the package and
an operator file (C{CLLAMA_PRICING_FILE}, same shape) is merged over it per
model.  Everything here except L{Pricing} is pure logic without I/O.

Lookup rule: the exact model id, else the longest priced key that is a
prefix of the id and ends at a boundary: the next character of the id is
not a letter, a digit or a dot.  So C{gpt-4o-2024-08-06} and
C{claude-sonnet-4-5-20250929} find C{gpt-4o} and C{claude-sonnet-4-5}, but
C{gpt-4o-mini} never falls back to C{gpt-4o}, nor C{gpt-5.5} to C{gpt-5},
nor C{anthropic/claude-sonnet-4.5} to C{anthropic/claude-sonnet-4}: a model
that is not priced is counted as unpriced rather than billed at a sibling's
rate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from importlib import resources
from typing import Any, TypeGuard

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from cllama_tx.interfaces import IPricing
from cllama_tx.store.jsonfile import Signature, UnreadableFile, file_signature, read_json_file
from cllama_tx.store.records import Usage

#: The environment variable naming the operator's override file.  Read by
#: the configuration, not here.
PRICING_FILE_ENV = "CLLAMA_PRICING_FILE"

#: Top-level keys of a table document that are not providers.
RESERVED_KEYS = frozenset({"updated", "sources"})

#: An override file larger than this is refused: it is read on the reactor
#: thread.
MAX_OVERRIDE_FILE_BYTES = 4 * 1024 * 1024

#: Distinct (provider, model) lookups remembered; past this the cache is
#: dropped and refilled, so made-up model names cannot grow memory.
MAX_CACHED_LOOKUPS = 4096

_PRICE_KEYS = frozenset(
    {"input", "output", "cache_read", "cache_write", "long_context", "max_output_tokens", "per_image", "note"}
)
_LONG_CONTEXT_KEYS = frozenset(
    {"threshold_input_tokens", "input_multiplier", "output_multiplier"}
)

# (st_mtime_ns, st_size, st_ino); None when the file does not exist.

Table = dict[str, dict[str, "Price"]]


class PricingError(ValueError):
    """
    A pricing table is not usable.  The message names the source, and the
    provider and model when the problem is in one entry.
    """


@attrs.frozen
class LongContext:
    """
    A long-context rule: when a request's prompt (all prompt tokens, cached
    or not) exceeds C{threshold_input_tokens}, every input-side rate is
    multiplied by C{input_multiplier} and the output rate by
    C{output_multiplier}, for the whole request.
    """

    threshold_input_tokens: int
    input_multiplier: float
    output_multiplier: float


@attrs.frozen
class Price:
    """
    USD per million tokens.  C{cache_read} and C{cache_write} default to the
    input rate when absent; C{max_output_tokens} is the model's output limit
    (for budget reservations), when known.  C{per_image} is USD per image an
    image model makes (per image, not per million), for the passthrough's
    image endpoints (C{docs/PRICING.md}).
    """

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None
    long_context: LongContext | None = None
    max_output_tokens: int | None = None
    per_image: float | None = None


# --------------------------------------------------------------------------
# Parsing


def _is_number(value: Any) -> TypeGuard[int | float]:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _rate(value: Any, where: str, key: str, optional: bool, unit: str = "USD per 1M tokens") -> float | None:
    if value is None and optional:
        return None
    if not _is_number(value) or value < 0:
        raise PricingError(f"{where}: '{key}' must be a non-negative number ({unit})")
    return float(value)


def _parse_long_context(value: Any, where: str) -> LongContext | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise PricingError(f"{where}: 'long_context' must be an object")
    unknown = sorted(set(value) - _LONG_CONTEXT_KEYS)
    if unknown:
        raise PricingError(f"{where}: unknown key(s) in 'long_context': {', '.join(unknown)}")
    threshold = value.get("threshold_input_tokens")
    if not _is_int(threshold) or threshold < 0:
        raise PricingError(
            f"{where}: 'long_context.threshold_input_tokens' must be a non-negative integer"
        )
    multipliers = []
    for key in ("input_multiplier", "output_multiplier"):
        m = value.get(key)
        if not _is_number(m) or m <= 0:
            raise PricingError(f"{where}: 'long_context.{key}' must be a positive number")
        multipliers.append(float(m))
    return LongContext(threshold, multipliers[0], multipliers[1])


def _parse_price(value: Any, where: str) -> Price:
    if not isinstance(value, dict):
        raise PricingError(f"{where}: the price must be an object")
    unknown = sorted(k for k in set(value) - _PRICE_KEYS if not str(k).startswith("_"))
    if unknown:
        raise PricingError(f"{where}: unknown key(s): {', '.join(map(str, unknown))}")
    for required in ("input", "output"):
        if required not in value:
            raise PricingError(f"{where}: '{required}' is missing")
    max_output = value.get("max_output_tokens")
    if max_output is not None and (not _is_int(max_output) or max_output <= 0):
        raise PricingError(f"{where}: 'max_output_tokens' must be a positive integer")
    note = value.get("note")
    if note is not None and not isinstance(note, str):
        raise PricingError(f"{where}: 'note' must be a string")
    return Price(
        input=_rate(value["input"], where, "input", optional=False),  # type: ignore[arg-type]
        output=_rate(value["output"], where, "output", optional=False),  # type: ignore[arg-type]
        cache_read=_rate(value.get("cache_read"), where, "cache_read", optional=True),
        cache_write=_rate(value.get("cache_write"), where, "cache_write", optional=True),
        long_context=_parse_long_context(value.get("long_context"), where),
        max_output_tokens=max_output,
        per_image=_rate(value.get("per_image"), where, "per_image", optional=True, unit="USD per image"),
    )


def parse_table(doc: Any, source: str) -> Table:
    """
    Validate a pricing document and return C{{provider: {model: Price}}},
    providers lower-cased, model ids as written.

    @param doc: the parsed JSON: C{{"updated": ..., "sources": {...},
        "<provider>": {"<model>": {"input": ..., "output": ..., ...}}}}.
        Top-level keys starting with C{_} are comments.
    @param source: where C{doc} came from, for error messages.
    @raise PricingError: the document, or one of its entries, is not valid.
    """
    if not isinstance(doc, dict):
        raise PricingError(f"{source}: the pricing table must be a JSON object")
    updated = doc.get("updated")
    if updated is not None and not isinstance(updated, str):
        raise PricingError(f"{source}: 'updated' must be a string (a date)")
    sources = doc.get("sources")
    if sources is not None and (
        not isinstance(sources, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in sources.items())
    ):
        raise PricingError(f"{source}: 'sources' must map provider names to strings")
    table: Table = {}
    for raw_provider, models in doc.items():
        if not isinstance(raw_provider, str):
            raise PricingError(f"{source}: provider names must be strings")
        if raw_provider in RESERVED_KEYS or raw_provider.startswith("_"):
            continue
        provider = raw_provider.strip().lower()
        if not provider:
            raise PricingError(f"{source}: empty provider name")
        if provider in table:
            raise PricingError(
                f"{source}: provider {provider!r} appears twice (names are case-insensitive)"
            )
        if not isinstance(models, dict):
            raise PricingError(f"{source}: provider {provider!r} must map model ids to prices")
        parsed: dict[str, Price] = {}
        for model, value in models.items():
            if not isinstance(model, str):
                raise PricingError(f"{source}: {provider}: model ids must be strings")
            where = f"{source}: {provider}/{model}"
            if not model or model != model.strip():
                raise PricingError(f"{where}: the model id is empty or has surrounding spaces")
            parsed[model] = _parse_price(value, where)
        table[provider] = parsed
    return table


def merge_tables(base: Table, override: Table) -> Table:
    """
    C{base} with C{override} laid over it per model: providers and models
    are added, a model present in both takes the override's price as a
    whole.  Neither argument is changed.
    """
    merged = {provider: dict(models) for provider, models in base.items()}
    for provider, models in override.items():
        merged.setdefault(provider, {}).update(models)
    return merged


# --------------------------------------------------------------------------
# Lookup and cost


def _at_boundary(model: str, key: str) -> bool:
    """
    Whether the prefix C{key} of C{model} ends where a suffix starts: a
    date (C{-2024-08-06}), a snapshot tag (C{@20250929}), a variant
    (C{:free}), not in the middle of a name (C{gpt-4o} in C{gpt-4o-mini} is
    at a boundary, so the table must price C{gpt-4o-mini} itself; C{gpt-4}
    in C{gpt-4o} is not).
    """
    if len(model) == len(key):
        return True
    if not key[-1].isalnum():
        return True
    following = model[len(key)]
    return not (following.isalnum() or following == ".")


def lookup(table: Mapping[str, Mapping[str, Price]], provider: Any, model: Any) -> Price | None:
    """
    The price of C{model} at C{provider} (lower-cased): the exact id, else
    the longest key that is a prefix of the id at a boundary, else L{None}.
    Model ids are case-sensitive.
    """
    if not isinstance(provider, str) or not isinstance(model, str) or not model:
        return None
    models = table.get(provider.strip().lower())
    if not models:
        return None
    exact = models.get(model)
    if exact is not None:
        return exact
    best: str | None = None
    for key in models:
        if (
            len(key) < len(model)
            and (best is None or len(key) > len(best))
            and model.startswith(key)
            and _at_boundary(model, key)
        ):
            best = key
    return models[best] if best is not None else None


def _reported_cost(usage: Usage) -> float | None:
    value = usage.reported_cost_usd
    if not _is_number(value) or value < 0:
        return None
    return float(value)


def compute_cost(price: Price | None, usage: Usage) -> tuple[float, bool]:
    """
    C{(cost_usd, priced)} of one response.

    A provider-reported cost (OpenRouter's C{usage.cost}) wins and counts as
    priced.  Otherwise: input, cache reads, cache writes and output tokens
    at their rates (cache rates default to the input rate), all per million
    tokens, with the long-context multipliers when the prompt is over the
    threshold.  No price: C{(0.0, False)}, the request is counted as
    unpriced.  Rounded to 10 decimal places so float noise does not show up
    in totals.
    """
    reported = _reported_cost(usage)
    if reported is not None:
        return round(reported, 10), True
    if price is None:
        return 0.0, False
    input_rate = price.input
    cache_read_rate = price.cache_read if price.cache_read is not None else price.input
    cache_write_rate = price.cache_write if price.cache_write is not None else price.input
    output_rate = price.output
    rule = price.long_context
    if rule is not None and usage.prompt_tokens > rule.threshold_input_tokens:
        input_rate *= rule.input_multiplier
        cache_read_rate *= rule.input_multiplier
        cache_write_rate *= rule.input_multiplier
        output_rate *= rule.output_multiplier
    total = (
        usage.input_tokens * input_rate
        + usage.cache_read_tokens * cache_read_rate
        + usage.cache_write_tokens * cache_write_rate
        + usage.output_tokens * output_rate
    ) / 1_000_000
    return round(total, 10), True


# --------------------------------------------------------------------------
# Loading


def packaged_document() -> dict:
    """The raw packaged table, C{cllama_tx/data/pricing.json}."""
    data = resources.files("cllama_tx").joinpath("data/pricing.json").read_text(encoding="utf-8")
    return json.loads(data)


def packaged_table() -> Table:
    """
    The packaged table, parsed.  A broken packaged table is a bug in the
    release, so it raises instead of degrading.
    """
    return parse_table(packaged_document(), "packaged pricing.json")


def _read_json_file(path: str) -> tuple[Signature, Any]:
    """The override file's signature and value; PricingError when unusable."""
    try:
        return read_json_file(path, MAX_OVERRIDE_FILE_BYTES)
    except UnreadableFile as e:
        raise PricingError(f"{path}: {e}") from None


@implementer(IPricing)
class Pricing:
    """
    The packaged table with the operator's override file merged over it.

    Lookups are cached per (provider, model).  At most once per
    C{recheck_interval} seconds of C{clock}, a lookup C{stat}s the override
    file; it is read again only when its (mtime, size, inode) changed.  A
    broken override is logged once and the previous table stays in force;
    an override that disappears leaves the packaged table.
    """

    def __init__(
        self,
        clock: IReactorTime,
        override_path: str | None = None,
        recheck_interval: float = 5.0,
        log: Logger | None = None,
    ) -> None:
        self._clock = clock
        self._override_path = override_path or None
        self._recheck_interval = recheck_interval
        self._log = log if log is not None else Logger()
        doc = packaged_document()
        self._packaged = parse_table(doc, "packaged pricing.json")
        self.updated: str | None = doc.get("updated")
        self.sources: dict[str, str] = dict(doc.get("sources") or {})
        self._table: Table = self._packaged
        # The packaged table with the override file merged (what _install got).
        self._base: Table = self._packaged
        # Prices a provider publishes, refreshed by the operator
        # (openrouter_prices.py): over the packaged ones, under the override.
        self._floor: Table = self._packaged
        self._override: Table = {}
        # Prices of the operator model table's deployments, laid over both.
        self._extra: Table = {}
        self._cache: dict[tuple[Any, Any], Price | None] = {}
        self._signature: Signature = None
        self._checked_at = clock.seconds()
        if self._override_path is not None:
            self._reload(initial=True)

    # -- IPricing

    def price(self, provider: str, model: str) -> Price | None:
        """
        The price of C{model} at C{provider} (exact id, else the longest
        priced prefix), or L{None}.
        """
        self._maybe_recheck()
        key = (provider, model)
        try:
            return self._cache[key]
        except KeyError:
            pass
        except TypeError:  # unhashable junk
            return None
        found = lookup(self._table, provider, model)
        if found is None and isinstance(provider, str) and "@" in provider:
            # A model table deployment (<provider>@<name>) without a price
            # of its own costs what its provider charges for the model.
            found = lookup(self._table, provider.partition("@")[0], model)
        if len(self._cache) >= MAX_CACHED_LOOKUPS:
            self._cache.clear()
        self._cache[key] = found
        return found

    def cost(self, provider: str, model: str, usage: Usage) -> tuple[float, bool]:
        """
        C{(cost_usd, priced)} for C{usage}; see L{compute_cost}.
        """
        if usage.reported_cost_usd is not None and _reported_cost(usage) is not None:
            return compute_cost(None, usage)
        return compute_cost(self.price(provider, model), usage)

    # -- extras

    def max_output_tokens(self, provider: str, model: str) -> int | None:
        """The model's output limit from the table, when known."""
        found = self.price(provider, model)
        return found.max_output_tokens if found is not None else None

    def unpriced_hint(self, provider: str, model: str) -> str:
        """
        What an operator adds to the override file to price C{model}.
        """
        provider_name = str(provider).strip().lower()[:100] if provider else "<provider>"
        model_name = str(model)[:200] if model else "<model>"
        snippet = json.dumps(
            {provider_name: {model_name: {"input": 0.0, "output": 0.0, "cache_read": 0.0}}}
        )
        where = (
            f"the override file {self._override_path}"
            if self._override_path
            else f"an override file named by {PRICING_FILE_ENV}"
        )
        return (
            f"No price for {provider_name}/{model_name}: add {snippet} to {where}, "
            f"with USD per million tokens in place of the zeros (cache_read is "
            f"optional); it is picked up without a restart."
        )

    @property
    def table(self) -> Mapping[str, Mapping[str, Price]]:
        """The table in force (read-only by convention)."""
        return self._table

    # -- reloading

    def reload(self) -> None:
        """Re-read the override file now (an operator's reload)."""
        if self._override_path is not None:
            self._checked_at = self._clock.seconds()
            self._reload(initial=False)

    def _maybe_recheck(self) -> None:
        if self._override_path is None:
            return
        now = self._clock.seconds()
        if now - self._checked_at < self._recheck_interval:
            return
        self._checked_at = now
        if file_signature(self._override_path) != self._signature:
            self._reload(initial=False)

    def _reload(self, initial: bool) -> None:
        path = self._override_path
        assert path is not None
        try:
            signature, doc = _read_json_file(path)
            if signature is None:
                self._signature = None
                if initial:
                    self._log.warn(
                        "Pricing override {path} does not exist (yet): using the packaged table",
                        path=path,
                    )
                elif self._override:
                    self._log.info(
                        "Pricing override {path} is gone: using the packaged table", path=path
                    )
                self._override = {}
                self._install(self._floor)
                return
            override = parse_table(doc, path)
        except PricingError as e:
            # Remember the signature so the same broken file is reported
            # once, not at every recheck.
            self._signature = file_signature(path)
            self._log.error(
                "Pricing override ignored, the previous table stays in force: {problem}",
                problem=str(e),
            )
            return
        self._signature = signature
        self._override = override
        self._install(merge_tables(self._floor, override))
        self._log.info(
            "Pricing override {path} loaded: {models} model price(s) for {providers}",
            path=path,
            models=sum(len(models) for models in override.values()),
            providers=", ".join(sorted(override)) or "no provider",
        )

    def set_published(self, table: Table) -> None:
        """
        Lay C{table} (prices a provider publishes, refreshed by the
        operator) over the packaged prices and under the override file;
        replaces the previous published layer.
        """
        self._floor = merge_tables(self._packaged, table) if table else self._packaged
        self._install(merge_tables(self._floor, self._override) if self._override else self._floor)

    def set_extra(self, table: Table) -> None:
        """
        Lay C{table} (the model table's per-deployment prices) over the
        packaged and override prices; replaces the previous extra layer.
        """
        self._extra = table
        self._install(self._base)

    def _install(self, table: Table) -> None:
        self._base = table
        self._table = merge_tables(table, self._extra) if self._extra else table
        self._cache.clear()
