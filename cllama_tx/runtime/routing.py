"""
The model routing parts of the daemon: the stored model mappings, the
resolution trace, and the LLM resolver when the operator turned it on;
attached to the router, shared with the UI (the mappings API, C{/_debug}),
and followed across a fleet through the change feed.

The settings (all optional; the resolver is off without a model):

  - C{CLLAMA_RESOLVER_MODEL}: the resolver model, C{<provider>/<model>} of a
    configured provider (its calls are billed to C{cllama-resolver}).
  - C{CLLAMA_RESOLVER_TIMEOUT}: seconds one call may take (default 20).
  - C{CLLAMA_RESOLVER_CALLS_PER_MINUTE}: calls in any minute, over every
    name (default 20).
  - C{CLLAMA_RESOLVER_NEGATIVE_TTL}: seconds a name the resolver found
    nothing for is not asked about again (default 300).
  - C{CLLAMA_RESOLVER_FORCE_INTERVAL}: seconds between two forced
    re-resolutions of one name (default 60).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cllama_tx.governance.mapping_store import MappingStore
from cllama_tx.governance.resolution_trace import ResolutionTrace
from cllama_tx.pipeline.model_resolver import LlmResolver, ResolverSettings, parse_settings
from cllama_tx.runtime.errors import ConfigError
from cllama_tx.sites.ui.routing_api import Routing

__all__ = ["build_routing", "resolver_settings"]

_NUMBERS = {
    "timeout": ("CLLAMA_RESOLVER_TIMEOUT", float),
    "calls_per_minute": ("CLLAMA_RESOLVER_CALLS_PER_MINUTE", int),
    "negative_ttl": ("CLLAMA_RESOLVER_NEGATIVE_TTL", float),
    "force_interval": ("CLLAMA_RESOLVER_FORCE_INTERVAL", float),
}


def resolver_settings(env: Mapping[str, str]) -> ResolverSettings:
    """The resolver's settings from the environment; @raise ConfigError: a bad value, named."""
    model = (env.get("CLLAMA_RESOLVER_MODEL") or "").strip() or None
    numbers: dict[str, Any] = {}
    for field, (variable, kind) in _NUMBERS.items():
        raw = (env.get(variable) or "").strip()
        if not raw:
            continue
        try:
            numbers[field] = kind(raw)
        except ValueError:
            raise ConfigError(f"{variable} must be a {'whole ' if kind is int else ''}number, not {raw!r}") from None
        if numbers[field] <= 0:
            raise ConfigError(f"{variable} must be positive")
    try:
        return parse_settings(model, **numbers)
    except ValueError as e:
        raise ConfigError(f"CLLAMA_RESOLVER_MODEL: {e}") from None


def build_routing(
    *, env: Mapping[str, str], clock: Any, database: Any, ledger: Any, instance: str, router: Any, providers: Any,
    upstream: Any, metering: Any, parent: Any, fleet: Any = None, discovery: Any = None,
) -> Routing:
    """
    Build and attach the routing parts; the mapping store becomes a child
    of C{parent} (loaded once the ledger is: PostgreSQL is migrated then).
    """
    settings = resolver_settings(env)
    mappings = MappingStore(database, clock, instance=instance, after=ledger.loaded)
    mappings.setServiceParent(parent)
    trace = ResolutionTrace(clock)
    resolver = None
    if settings.enabled:
        resolver = LlmResolver(
            settings, clock=clock, providers=providers, upstream=upstream, metering=metering, mappings=mappings,
            candidates=router.candidates,
        )
    router.attach(mappings=mappings, resolver=resolver, trace=trace, discovery=discovery,
                  intervention=metering.intervention)
    if fleet is not None:
        # A mapping set, confirmed or deleted on another instance is read here within a second.
        fleet.changes.subscribe("model_mapping", mappings.reload)
    return Routing(router=router, mappings=mappings, clock=clock, resolver=resolver, trace=trace,
                   providers=providers, discovery=discovery)
