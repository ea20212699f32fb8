"""
Model resolution: which provider and model a requested name means.

Clients send names as they know them: Claude Code and LangChain send bare
Anthropic ids, LiteLLM, aider and the OpenAI Agents SDK strip their own
C{openai/} and send bare C{gpt-4o}, LiteLLM users send their operator's
aliases.  Every name goes through one order; the first rule that applies
decides, and every rule but an exact ref is audited as an C{intervention}
line naming it:

+---+--------------------------------+-------------------------------+------------------------------------+------------------------+
| # | rule                           | example (request -> route)    | result                             | intervention           |
+===+================================+===============================+====================================+========================+
| 1 | the key's C{aliases}, else its | C{gpt-4} -> C{gpt-4o}         | the alias target, which continues  | C{key_alias},          |
|   | team's C{model_aliases}        |                               | at rule 2 (aliases do not chain)   | C{team_alias}          |
+---+--------------------------------+-------------------------------+------------------------------------+------------------------+
| 2 | the operator model table (a    | C{fake-openai-endpoint} ->    | the entry's ref(s), every          | C{model_table}         |
|   | public name or a               | C{openai@fake-openai-         | deployment of the name in order    |                        |
|   | C{model_group_alias})          | endpoint/fake}                | (failover); then rule 3 if the     |                        |
|   |                                |                               | caller has a model policy          |                        |
+---+--------------------------------+-------------------------------+------------------------------------+------------------------+
| 3 | the agent's model policy       | C{claude-haiku-4-5-20251001}  | the policy table (CONTRACT 4),     | the policy's           |
|   | (CONTRACT 4, dated ids match   | -> C{anthropic/claude-haiku-  | final: clamps or refuses           |                        |
|   | their undated allowed ref)     | 4-5}                          |                                    |                        |
+---+--------------------------------+-------------------------------+------------------------------------+------------------------+
| 4 | C{<provider>/<model>} of a     | C{openai/gpt-4o}              | as asked                           | none                   |
|   | configured provider            |                               |                                    |                        |
+---+--------------------------------+-------------------------------+------------------------------------+------------------------+
| 5 | a bare name of a known family  | C{gpt-4o} -> C{openai/gpt-4o} | the family's provider              | C{bare_family}         |
|   | (L{DEFAULT_FAMILIES}, extended |                               |                                    |                        |
|   | by the model table file)       |                               |                                    |                        |
+---+--------------------------------+-------------------------------+------------------------------------+------------------------+
| 6 | any other bare name on the     | C{my-model} on C{/v1/messages}| C{anthropic/<name>}                | C{bare_surface}        |
|   | Messages surface               | -> C{anthropic/my-model}      |                                    |                        |
+---+--------------------------------+-------------------------------+------------------------------------+------------------------+
| 7 | rules 4-6 named a provider     | C{mistralai/mistral-large} -> | C{openrouter/<vendor>/<model>}     | C{openrouter_fallback} |
|   | that is not configured, and    | C{openrouter/mistralai/       |                                    |                        |
|   | OpenRouter is                  | mistral-large}                |                                    |                        |
+---+--------------------------------+-------------------------------+------------------------------------+------------------------+
| 8 | anything else                  | C{my-model} on the chat       | 400 naming only what was sent      | (an C{error} line)     |
|   |                                | surface, C{mistralai/x}       | and saying what to write; a        |                        |
|   |                                | without OpenRouter            | catalog provider without a key: its|                        |
|   |                                |                               | C{provider_not_configured} 400     |                        |
+---+--------------------------------+-------------------------------+------------------------------------+------------------------+

Everything here is pure: the tables are built once per load (L{Families},
the model table's name index) and a request costs a few dict lookups.
L{Router} binds the tables in force to the live provider registry; it does
no I/O either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from cllama_tx.governance.policy import PolicyRefusal, decide
from cllama_tx.surfaces.errors import ProxyError
from cllama_tx.surfaces.matrix import InvalidModelRef, ModelRef, split_model_ref

KEY_ALIAS = "key_alias"
TEAM_ALIAS = "team_alias"
MODEL_TABLE = "model_table"
BARE_FAMILY = "bare_family"
BARE_SURFACE = "bare_surface"
OPENROUTER_FALLBACK = "openrouter_fallback"

OPENROUTER = "openrouter"

# Bare names of well-known model families, as the issue and the clients'
# own defaults have them: a pattern is an exact name or a prefix ending in *.
DEFAULT_FAMILIES: tuple[tuple[str, str], ...] = (
    ("gpt-*", "openai"),
    ("chatgpt-*", "openai"),
    ("o1", "openai"),
    ("o1-*", "openai"),
    ("o3", "openai"),
    ("o3-*", "openai"),
    ("o4*", "openai"),
    ("claude-*", "anthropic"),
    ("gemini-*", "google"),
    ("grok-*", "xai"),
)

# Where OpenRouter spells a vendor differently from our provider names.
OPENROUTER_VENDORS = {"xai": "x-ai"}

# Requested names are echoed in refusals; never echo an unbounded string.
_ECHO_LIMIT = 200


def _echo(name: str) -> str:
    text = repr(name)
    return text if len(text) <= _ECHO_LIMIT else text[: _ECHO_LIMIT - 3] + "..."


class FamilyError(ValueError):
    """A family pattern or provider is malformed; the message says which."""


@attrs.frozen
class Families:
    """Bare-name families, compiled: exact names, then the longest prefix."""

    exact: Mapping[str, str]
    prefixes: tuple[tuple[str, str], ...]  # (prefix, provider), longest first
    patterns: tuple[tuple[str, str], ...]  # as declared, for the UI

    def match(self, name: str) -> tuple[str, str] | None:
        """C{(provider, pattern)} of the family C{name} belongs to, or None."""
        provider = self.exact.get(name)
        if provider is not None:
            return provider, name
        for prefix, provider in self.prefixes:
            if name.startswith(prefix):
                return provider, prefix + "*"
        return None


def compile_families(pairs: Iterable[tuple[str, str]]) -> Families:
    """
    Compile C{(pattern, provider)} pairs; a later pair for the same pattern
    replaces an earlier one (so an operator's table overrides the defaults).

    @raise FamilyError: an empty pattern, a bare C{*}, a C{/} or C{*}
        elsewhere than at the end, or an empty provider.
    """
    declared: dict[str, str] = {}
    for pattern, provider in pairs:
        if not isinstance(pattern, str) or not isinstance(provider, str):
            raise FamilyError("family patterns and providers must be strings")
        pattern, provider = pattern.strip(), provider.strip().lower()
        stem = pattern[:-1] if pattern.endswith("*") else pattern
        if not stem or "*" in stem or "/" in pattern:
            raise FamilyError(
                f"family pattern {_echo(pattern)} must be a bare name or a prefix ending in '*' (e.g. 'gpt-*')"
            )
        if not provider or "/" in provider:
            raise FamilyError(f"family {_echo(pattern)} needs a provider name")
        declared[pattern] = provider
    exact = {p: v for p, v in declared.items() if not p.endswith("*")}
    prefixes = sorted(((p[:-1], v) for p, v in declared.items() if p.endswith("*")), key=lambda pv: -len(pv[0]))
    return Families(exact=exact, prefixes=tuple(prefixes), patterns=tuple(declared.items()))


DEFAULT = compile_families(DEFAULT_FAMILIES)


@attrs.frozen
class TableEntry:
    """What one public name of the operator model table routes to."""

    name: str
    refs: tuple[ModelRef, ...]  # deployments, in order: the failover chain
    alias_of: str | None = None  # a model_group_alias: the entry it names
    problem: str | None = None  # why the entry cannot serve (unsupported provider, missing key)


@attrs.frozen
class Step:
    """One audited resolution rule: its intervention name and details."""

    rule: str
    details: Mapping[str, Any]


@attrs.frozen
class Resolution:
    """
    Where a request goes: C{ref} first, then the other C{candidates};
    C{steps} the rules applied (each an intervention line); C{names} every
    name the request was known by on the way (as sent, alias targets, the
    table name), for a virtual key's model list.
    """

    ref: ModelRef
    candidates: tuple[ModelRef, ...]
    steps: tuple[Step, ...] = ()
    names: tuple[str, ...] = ()


class ProviderView:
    """
    What resolution asks of the provider registry: which providers are
    configured (usable now) and which exist at all.  The default view
    treats every provider as configured (no registry: pure tests, tools).
    """

    def configured(self, name: str) -> bool:
        return True

    def known(self, name: str) -> bool:
        return True

    def names(self) -> list[str]:
        return []

    def models(self) -> Mapping[str, tuple[str, ...]]:
        """Each discovered local server's models, by provider (none here)."""
        return {}


EVERY_PROVIDER = ProviderView()
"""The default view: no registry, every provider configured."""


class RegistryView(ProviderView):
    """A L{ProviderView} of a provider registry (or anything with C{resolve})."""

    def __init__(self, registry) -> None:
        self._registry = registry
        # Bound once: resolution asks on every request.
        configured = getattr(registry, "configured", None)
        if configured is not None:
            self.configured = configured  # type: ignore[method-assign]
        known = getattr(registry, "known", None)
        if known is not None:
            self.known = known  # type: ignore[method-assign]

    def configured(self, name: str) -> bool:
        try:
            self._registry.resolve(name)
        except Exception:
            return False
        return True

    def known(self, name: str) -> bool:
        return self.configured(name)

    def names(self) -> list[str]:
        return list(self._registry.names())

    def models(self) -> Mapping[str, tuple[str, ...]]:
        listed = getattr(self._registry, "discovered_models", None)
        return listed() if listed is not None else {}


def _invalid(message: str) -> PolicyRefusal:
    return PolicyRefusal(status=400, code="invalid_model", message=message)


def resolve(
    requested: Any,
    *,
    policy=None,
    bare_provider: str | None = None,
    key_aliases: Mapping[str, str] | None = None,
    team_aliases: Mapping[str, str] | None = None,
    table: Mapping[str, TableEntry] | None = None,
    families: Families = DEFAULT,
    providers: ProviderView = EVERY_PROVIDER,
) -> Resolution:
    """
    Resolve C{requested} by the order of the module docstring.

    @param policy: the agent's parsed model policy, or None.
    @param bare_provider: the provider a bare name means on the request's
        surface when no family claims it (C{anthropic} on Messages), or None.
    @raise ProxyError: 400 C{invalid_model} / C{unknown_provider}, or the
        policy's refusals (403 in mode reject).
    """
    if requested is not None and not isinstance(requested, str):
        raise _invalid("the 'model' field must be a string")
    sent = (requested or "").strip()
    name = sent
    steps: list[Step] = []
    names = [sent] if sent else []
    for rule, aliases in ((KEY_ALIAS, key_aliases), (TEAM_ALIAS, team_aliases)):
        target = aliases.get(name) if aliases and name else None
        if target is not None:
            steps.append(Step(rule, {"alias": name, "target": target}))
            name = target
            names.append(name)
            break
    entry = table.get(name) if table and name else None
    if entry is not None:
        if entry.problem is not None:
            raise ProxyError(
                400, "model_unavailable", f"model {_echo(sent)} cannot be served: {entry.problem}"
            )
        details = {"entry": entry.name, "chosen": str(entry.refs[0])}
        if entry.alias_of is not None:
            details["alias_of"] = entry.alias_of
        steps.append(Step(MODEL_TABLE, details))
        if policy is None:
            return Resolution(entry.refs[0], entry.refs, tuple(steps), tuple(names))
        name = str(entry.refs[0])
    if policy is not None:
        decision = decide(policy, name if name else requested)
        if decision.intervention is not None:
            steps.append(Step(decision.intervention, {"chosen": str(decision.ref)}))
        return Resolution(decision.ref, decision.candidates, tuple(steps), tuple(names))
    if not name:
        raise _invalid("the request names no model: send 'model' as '<provider>/<model>' or a model name")
    if "/" in name:
        try:
            ref = split_model_ref(name)
        except InvalidModelRef as e:
            raise _invalid(_unroutable(sent, name, str(e))) from None
        if providers.configured(ref.provider):
            return Resolution(ref, (ref,), tuple(steps), tuple(names))
        return _elsewhere(ref, sent, steps, names, providers)
    family = families.match(name)
    if family is not None:
        provider, pattern = family
        steps.append(Step(BARE_FAMILY, {"family": pattern, "provider": provider}))
    elif bare_provider is not None:
        provider = bare_provider
        steps.append(Step(BARE_SURFACE, {"provider": provider}))
    else:
        configured = ", ".join(providers.names()) or "none"
        raise _invalid(
            f"model {_echo(sent)} names no provider: send '<provider>/<model>' with a configured "
            f"provider ({configured}), or a name from the operator's model table"
        )
    ref = ModelRef(provider, name)
    if providers.configured(provider):
        return Resolution(ref, (ref,), tuple(steps), tuple(names))
    return _elsewhere(ref, sent, steps, names, providers)


def _unroutable(sent: str, name: str, reason: str) -> str:
    if sent == name:
        return reason
    return f"model {_echo(sent)} leads to an unroutable name: {reason}"


def _elsewhere(ref: ModelRef, sent: str, steps: list, names: list, providers: ProviderView) -> Resolution:
    """A ref whose provider is not configured: through OpenRouter, else explained."""
    if ref.provider != OPENROUTER and providers.configured(OPENROUTER):
        vendor = OPENROUTER_VENDORS.get(ref.provider, ref.provider)
        routed = ModelRef(OPENROUTER, f"{vendor}/{ref.model}")
        steps.append(Step(OPENROUTER_FALLBACK, {"provider": ref.provider, "chosen": str(routed)}))
        return Resolution(routed, (routed,), tuple(steps), tuple(names))
    if providers.known(ref.provider):
        # A catalog provider without a key: the registry's refusal says
        # which variable to set.
        return Resolution(ref, (ref,), tuple(steps), tuple(names))
    configured = ", ".join(providers.names()) or "none"
    raise ProxyError(
        400,
        "unknown_provider",
        f"model {_echo(sent)}: {ref.provider!r} is not a provider configured here, and OpenRouter "
        f"(which would carry it) is not configured either; send '<provider>/<model>' with a "
        f"configured provider ({configured}) or configure {ref.provider!r} or OPENROUTER_API_KEY",
    )


def key_allows(allows: Callable[[str], bool], resolution: Resolution) -> bool:
    """
    Whether a virtual key's model list lets this request through: any name
    the request was known by (as sent, an alias target, a table name) or
    the ref it resolved to.
    """
    return any(allows(n) for n in resolution.names) or allows(str(resolution.ref))


def visible_models(
    *,
    policy=None,
    key_models: Iterable[str] | None = None,
    allows: Callable[[str], bool] | None = None,
    aliases: Mapping[str, str] | None = None,
    table_names: Iterable[str] = (),
    catalog: Iterable[str] = (),
) -> list[str]:
    """
    What C{GET /v1/models} lists for a caller, under the names it may use:

     - an agent with a model policy: its allowed refs as declared;
     - a virtual key: its aliases (key's, then team's), then its model list
       (wildcards expanded over the table names and the catalog), or
       everything when the list is empty;
     - the master key, an agent without policy: the table's public names,
       then every priced model of every configured provider.
    """
    if policy is not None:
        return list(dict.fromkeys(a.declared for a in policy.allowed))
    everything = list(dict.fromkeys([*table_names, *catalog]))
    alias_names = list((aliases or {}).items())
    if allows is None or not key_models:
        return list(dict.fromkeys([a for a, _ in alias_names] + everything))
    listed = [a for a, target in alias_names if allows(a) or allows(target)]
    listed += [m for m in key_models if "*" not in m]
    listed += [n for n in everything if allows(n)]
    return list(dict.fromkeys(listed))


class Router:
    """
    Resolution with the tables in force: the operator model table (an
    object whose C{current} is the parsed table, reloaded elsewhere), the
    provider registry, the pricing table (for listing) and the team
    aliases of the virtual key store.  No I/O: a request costs
    L{resolve}'s dict lookups.
    """

    def __init__(self, providers=None, table=None, team_aliases=None, pricing=None) -> None:
        self._view = RegistryView(providers) if providers is not None else ProviderView()
        self._table = table
        self._team_aliases = team_aliases
        self._pricing = pricing

    def _aliases(self, principal) -> tuple[Mapping[str, str] | None, Mapping[str, str] | None]:
        key = getattr(principal, "key", None)
        if key is None:
            return None, None
        team = None
        if key.team_id and self._team_aliases is not None:
            team = self._team_aliases(key.team_id) or None
        return getattr(key, "aliases", None) or None, team

    def resolve(self, principal, requested: Any, policy, bare_provider: str | None) -> Resolution:
        current = self._table.current if self._table is not None else None
        key_aliases, team_aliases = self._aliases(principal)
        return resolve(
            requested,
            policy=policy,
            bare_provider=bare_provider,
            key_aliases=key_aliases,
            team_aliases=team_aliases,
            table=current.entries if current is not None else None,
            families=current.families if current is not None else DEFAULT,
            providers=self._view,
        )

    def models_for(self, principal, policy) -> list[str]:
        """L{visible_models} for C{principal} (an agent context, a key, the master)."""
        current = self._table.current if self._table is not None else None
        table_names = [n for n, e in current.entries.items() if e.problem is None] if current is not None else []
        catalog: list[str] = []
        if self._pricing is not None:
            prices = self._pricing.table
            catalog = [f"{name}/{model}" for name in self._view.names() for model in sorted(prices.get(name, {}))]
        # Discovered local servers' models, as each lists them (unpriced unless the operator prices them).
        catalog += [f"{name}/{model}" for name, models in sorted(self._view.models().items()) for model in models]
        key = getattr(principal, "key", None)
        key_aliases, team_aliases = self._aliases(principal)
        aliases = dict(key_aliases or {})
        for name, target in (team_aliases or {}).items():
            aliases.setdefault(name, target)  # the key's own win
        return visible_models(
            policy=policy,
            key_models=key.models if key is not None else None,
            allows=getattr(principal, "allows_model", None),
            aliases=aliases,
            table_names=table_names,
            catalog=catalog,
        )
