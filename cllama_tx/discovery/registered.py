"""
The provider registry's layer of discovered servers
(C{ProviderRegistry.discovered}): each server that answers is a keyless
provider of the OpenAI wire format at its C{/v1} base, with its models.

The registry asks this layer only for names it does not configure itself,
so a provider of the catalog or of providers.json always wins over a
discovered server of the same name.  A server that stopped answering is
*disabled*, not forgotten: its name stays known, its models leave the
lists, and a request naming it is a 400 C{provider_not_configured} saying
since when it is gone (never sent to another provider, OpenRouter
included); it is served again as soon as a round finds it.  The scheduler
forgets it after a day.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

from cllama_tx.providers.catalog import NO_AUTH, OPENAI_FORMAT, PER_KEY, ProviderSpec
from cllama_tx.providers.forwarding import policy_for
from cllama_tx.providers.keys import KeyPool
from cllama_tx.providers.registry import ProviderNotConfigured, ResolvedProvider


@attrs.frozen
class Served:
    """A discovered server as the registry serves it."""

    name: str
    base_url: str
    models: tuple[str, ...]


class DiscoveredProviders:
    """See the module docstring.  Lookups are dict reads: it is on the request path."""

    def __init__(self, clock) -> None:
        self._clock = clock
        self._up: dict[str, ResolvedProvider] = {}
        self._models: dict[str, tuple[str, ...]] = {}
        self._gone: dict[str, str] = {}
        self._pools: dict[str, KeyPool] = {}

    def update(self, up: Iterable[Served], gone: Mapping[str, str]) -> None:
        """
        Serve C{up} from now on; C{gone} maps each disabled server's name to
        what a request naming it is told.
        """
        resolved: dict[str, ResolvedProvider] = {}
        models: dict[str, tuple[str, ...]] = {}
        for server in up:
            spec = ProviderSpec(
                name=server.name,
                base_url=server.base_url,
                auth=NO_AUTH,
                api_format=OPENAI_FORMAT,
                rate_limit_scope=PER_KEY,
                probe_path=None,
            )
            previous = self._up.get(server.name)
            if previous is not None and previous.spec == spec:
                resolved[server.name] = previous
            else:
                pool = self._pools.get(server.name) or KeyPool(server.name, (), self._clock, keyless=True)
                self._pools[server.name] = pool
                resolved[server.name] = ResolvedProvider(spec=spec, pool=pool, headers=policy_for(spec))
            models[server.name] = server.models
        self._up = resolved
        self._models = models
        self._gone = {name: message for name, message in gone.items() if name not in resolved}
        for name in set(self._pools) - set(resolved) - set(self._gone):
            del self._pools[name]

    def resolve(self, name: str) -> ResolvedProvider | None:
        """The server's provider, None for a name never discovered; raises for a gone one."""
        found = self._up.get(name)
        if found is not None:
            return found
        message = self._gone.get(name)
        if message is not None:
            raise ProviderNotConfigured(message, name)
        return None

    def configured(self, name: str) -> bool:
        """
        Whether C{name} is a discovered server, answering or gone: resolution
        keeps a gone server's requests to itself (the registry's refusal
        explains), rather than routing them elsewhere.
        """
        return name in self._up or name in self._gone

    def known(self, name: str) -> bool:
        return name in self._up or name in self._gone

    def spec_of(self, name: str) -> ProviderSpec | None:
        found = self._up.get(name)
        return found.spec if found is not None else None

    def names(self) -> list[str]:
        """The servers that answer now, sorted."""
        return sorted(self._up)

    def models(self) -> dict[str, tuple[str, ...]]:
        """Each answering server's models (the ids it serves, as it lists them)."""
        return dict(self._models)
