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
|2b | an operator's model mapping    | C{my-llama} ->                | the mapping's target, which goes   | C{mapping}             |
|   | (C{PUT /_api/mappings/{name}}) | C{local-ollama-11434/llama3}  | on at rule 2 (one hop)             |                        |
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
| 8 | a mapping the LLM resolver     | C{llama-fast} ->              | the mapping's target, resolved by  | C{llm_mapping}         |
|   | made (or, when it is on, the   | C{local-ollama-11434/llama3}  | rules 2 and 4-7                    |                        |
|   | resolver's answer now: see     |                               |                                    |                        |
|   | L{Router})                     |                               |                                    |                        |
+---+--------------------------------+-------------------------------+------------------------------------+------------------------+
| 9 | anything else                  | C{my-model} on the chat       | 400 naming only what was sent      | (an C{error} line)     |
|   |                                | surface, C{mistralai/x}       | and saying what to write; a        |                        |
|   |                                | without OpenRouter            | catalog provider without a key: its|                        |
|   |                                |                               | C{provider_not_configured} 400     |                        |
+---+--------------------------------+-------------------------------+------------------------------------+------------------------+

Everything here is pure: the tables are built once per load (L{Families},
the model table's name index) and a request costs a few dict lookups.
L{Router} binds the tables in force to the live provider registry; it does
no I/O either, but it may wait for the LLM resolver's (rule 8, when on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from cllama_tx.governance.mappings import LLM, OPERATOR
from cllama_tx.governance.policy import PolicyRefusal, decide
from cllama_tx.surfaces.errors import ProxyError
from cllama_tx.surfaces.matrix import InvalidModelRef, ModelRef, split_model_ref

KEY_ALIAS = "key_alias"
TEAM_ALIAS = "team_alias"
MODEL_TABLE = "model_table"
BARE_FAMILY = "bare_family"
BARE_SURFACE = "bare_surface"
OPENROUTER_FALLBACK = "openrouter_fallback"
# A stored model mapping (cllama_tx.governance.mappings): an operator's
# (rule 2b, after the model table), or one the LLM resolver made (rule 8,
# where the order would otherwise refuse).
MAPPING = "mapping"
LLM_MAPPING = "llm_mapping"

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


class _Recording(ProviderView):
    """
    A L{ProviderView} that notes every question resolution asked and its
    answer, so a kept resolution can be checked against the registry as it
    is now (keys added, disabled or gone, a reload, a discovered server):
    C{asked} holds C{(bound method, name, answer)}; C{listed} is set when
    the whole list of names was read (never kept then).
    """

    def __init__(self, view: ProviderView) -> None:
        self._view = view
        self.asked: list[tuple[Callable[[str], bool], str, bool]] = []
        self.listed = False

    def configured(self, name: str) -> bool:
        ask = self._view.configured
        answer = ask(name)
        self.asked.append((ask, name, answer))
        return answer

    def known(self, name: str) -> bool:
        ask = self._view.known
        answer = ask(name)
        self.asked.append((ask, name, answer))
        return answer

    def names(self) -> list[str]:
        self.listed = True
        return self._view.names()

    def models(self) -> Mapping[str, tuple[str, ...]]:
        self.listed = True
        return self._view.models()


@attrs.frozen
class _Kept:
    """
    One kept resolution and everything it read: the policy object, the
    model table in force, the stored mappings' change count, and the
    registry's answers (L{_Recording}); with what the trace records of it.
    """

    policy: Any
    table: Any
    mappings_changes: int | None
    asked: tuple[tuple[Callable[[str], bool], str, bool], ...]
    found: Resolution
    rules: tuple[str, ...]
    result: str


#: Kept resolutions at most (an agent's few names; cleared whole when full).
KEPT_RESOLUTIONS = 4096


def _invalid(message: str) -> PolicyRefusal:
    return PolicyRefusal(status=400, code="invalid_model", message=message)


class _LlmMapped(Exception):
    """
    Where the order would refuse, the LLM resolver's mapping of the name
    (raised before any refusal message is written: this is a request's
    path, the refusal's is not).
    """

    def __init__(self, mapping: Any, name: str, steps: tuple[Step, ...], names: tuple[str, ...]) -> None:
        super().__init__(name)
        self.mapping = mapping
        self.name = name
        self.steps = steps
        self.names = names


def _llm_mapped(name: str, steps: list, names: list, mappings: Mapping[str, Any] | None) -> None:
    """Raise L{_LlmMapped} when the resolver mapped C{name} (never past an operator's mapping)."""
    mapping = mappings.get(name) if mappings else None
    if mapping is not None and mapping.source == LLM and not any(step.rule == MAPPING for step in steps):
        raise _LlmMapped(mapping, name, tuple(steps), tuple(names))


@attrs.define
class Unresolved(ProxyError):
    """
    Rule 9's refusal of a name no rule resolves (C{invalid_model} for a
    bare name, C{unknown_provider} for a prefix): the refusal the request
    gets, unless the LLM resolver maps C{name} (the name after the
    aliases) to an available model.  C{steps} and C{names}: the resolution
    so far.
    """

    name: str = ""
    steps: tuple[Step, ...] = ()
    names: tuple[str, ...] = ()


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
    mappings: Mapping[str, Any] | None = None,
) -> Resolution:
    """
    Resolve C{requested} by the order of the module docstring.

    @param policy: the agent's parsed model policy, or None.
    @param bare_provider: the provider a bare name means on the request's
        surface when no family claims it (C{anthropic} on Messages), or None.
    @param mappings: the stored model mappings by name (objects with
        C{target}, C{source} and C{confirmed}): an operator's applies after
        the model table (its target goes on at rule 2, one hop), one the
        LLM resolver made only where the order would refuse (rule 8).
    @raise Unresolved: no rule resolves the name (the LLM resolver may be
        asked about C{name}).
    @raise ProxyError: 400 C{invalid_model} / C{unknown_provider}, or the
        policy's refusals (403 in mode reject).
    """
    try:
        return _resolve(
            requested, policy=policy, bare_provider=bare_provider, key_aliases=key_aliases,
            team_aliases=team_aliases, table=table, families=families, providers=providers, mappings=mappings,
        )
    except _LlmMapped as hit:
        mapping, refused = hit.mapping, hit
    except Unresolved as unresolved:
        if any(step.rule == MAPPING for step in unresolved.steps):
            # An operator's mapping leads nowhere: said as it is, never guessed at.
            raise ProxyError(unresolved.status, unresolved.code, unresolved.message) from None
        raise
    try:
        # The LLM's target is a name the order knows: resolved without
        # aliases, mappings or policy (there is none on this path).
        inner = _resolve(mapping.target, bare_provider=bare_provider, table=table, families=families,
                         providers=providers)
    except ProxyError as e:
        raise ProxyError(
            e.status, e.code, f"model {_echo(refused.name)} is mapped (by the model resolver) to "
            f"{_echo(mapping.target)}, which cannot be served: {e.message}",
        ) from None
    step = Step(LLM_MAPPING, {"mapping": refused.name, "target": mapping.target, "source": LLM,
                              "confirmed": bool(mapping.confirmed), "chosen": str(inner.ref)})
    return Resolution(
        inner.ref, inner.candidates, (*refused.steps, step, *inner.steps),
        tuple(dict.fromkeys((*refused.names, *inner.names))),
    )


def _resolve(
    requested: Any,
    *,
    policy=None,
    bare_provider: str | None = None,
    key_aliases: Mapping[str, str] | None = None,
    team_aliases: Mapping[str, str] | None = None,
    table: Mapping[str, TableEntry] | None = None,
    families: Families = DEFAULT,
    providers: ProviderView = EVERY_PROVIDER,
    mappings: Mapping[str, Any] | None = None,
) -> Resolution:
    """
    L{resolve} without the LLM's mappings: where the order would refuse,
    L{_LlmMapped} when the resolver mapped the name, else L{Unresolved}.
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
    mapping = mappings.get(name) if entry is None and mappings and name else None
    if mapping is not None and mapping.source == OPERATOR:
        steps.append(Step(MAPPING, {"mapping": name, "target": mapping.target, "source": OPERATOR}))
        name = mapping.target
        names.append(name)
        entry = table.get(name) if table else None
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
        return _elsewhere(ref, sent, steps, names, providers, mappings)
    family = families.match(name)
    if family is not None:
        provider, pattern = family
        steps.append(Step(BARE_FAMILY, {"family": pattern, "provider": provider}))
    elif bare_provider is not None:
        provider = bare_provider
        steps.append(Step(BARE_SURFACE, {"provider": provider}))
    else:
        _llm_mapped(name, steps, names, mappings)
        configured = ", ".join(providers.names()) or "none"
        raise Unresolved(
            400, "invalid_model",
            f"model {_echo(sent)} names no provider: send '<provider>/<model>' with a configured "
            f"provider ({configured}), or a name from the operator's model table",
            name=name, steps=tuple(steps), names=tuple(names),
        )
    ref = ModelRef(provider, name)
    if providers.configured(provider):
        return Resolution(ref, (ref,), tuple(steps), tuple(names))
    return _elsewhere(ref, sent, steps, names, providers, mappings)


def _unroutable(sent: str, name: str, reason: str) -> str:
    if sent == name:
        return reason
    return f"model {_echo(sent)} leads to an unroutable name: {reason}"


def _elsewhere(ref: ModelRef, sent: str, steps: list, names: list, providers: ProviderView,
               mappings: Mapping[str, Any] | None = None) -> Resolution:
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
    _llm_mapped(names[-1] if names else str(ref), steps, names, mappings)
    configured = ", ".join(providers.names()) or "none"
    raise Unresolved(
        400,
        "unknown_provider",
        f"model {_echo(sent)}: {ref.provider!r} is not a provider configured here, and OpenRouter "
        f"(which would carry it) is not configured either; send '<provider>/<model>' with a "
        f"configured provider ({configured}) or configure {ref.provider!r} or OPENROUTER_API_KEY",
        name=names[-1] if names else str(ref), steps=tuple(steps), names=tuple(names),
    )


def _noted(found: Resolution, **details: Any) -> Resolution:
    """C{found} with C{details} added to its LLM mapping's step (its intervention line)."""
    steps = tuple(
        Step(step.rule, {**step.details, **details}) if step.rule == LLM_MAPPING else step for step in found.steps
    )
    return attrs.evolve(found, steps=steps)


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


#: Discovered servers in these states offer no candidates to the resolver.
_DOWN_STATES = frozenset({"down", "gone", "lost", "error", "unreachable", "failed", "stale"})


#: Seconds a request waits at start for the stored model mappings to be in memory.
MAPPINGS_WAIT = 5.0


class Router:
    """
    Resolution with the tables in force: the operator model table (an
    object whose C{current} is the parsed table, reloaded elsewhere), the
    provider registry, the pricing table (for listing) and the team
    aliases of the virtual key store; once L{attach}ed, the stored model
    mappings, the LLM resolver and the resolution trace.

    A request costs L{resolve}'s dict lookups.  Only a name no rule knows,
    when the LLM resolver is on, waits for I/O: L{resolve} then returns a
    Deferred firing once the resolver answered (concurrent requests for one
    name share its call; see L{cllama_tx.pipeline.model_resolver}).
    """

    def __init__(self, providers=None, table=None, team_aliases=None, pricing=None) -> None:
        self._view = RegistryView(providers) if providers is not None else ProviderView()
        self._table = table
        self._team_aliases = team_aliases
        self._pricing = pricing
        self._mappings: Any = None
        self.resolver: Any = None
        self.trace: Any = None
        self.discovery: Any = None
        self._intervention: Callable[..., None] = lambda *a, **k: None
        # Resolutions of principals without a key (agents), by (requested,
        # bare provider, id of the policy): L{_kept}.
        self._kept: dict[tuple, _Kept] = {}
        # Bumped by the mapping store on every change (None: a store that
        # says nothing of its changes; then nothing is kept).
        self._mapping_changes: int | None = 0

    def attach(self, *, mappings=None, resolver=None, trace=None, discovery=None,
               intervention: Callable[..., None] | None = None) -> None:
        """
        The stored model mappings (L{cllama_tx.governance.mapping_store}),
        the LLM resolver (None: off), the resolution trace
        (L{cllama_tx.governance.resolution_trace}), the local model
        discovery (anything with C{snapshot()}, for the resolver's
        candidates), and where the resolver's outcome for a request is
        audited (C{intervention(ex, name, **details)}).
        """
        self._mappings = mappings
        self._kept = {}
        if mappings is None:
            self._mapping_changes = 0
        elif isinstance(getattr(mappings, "on_change", None), list):
            self._mapping_changes = 0
            mappings.on_change.append(self._mappings_changed)
        else:
            self._mapping_changes = None
        self.resolver = resolver
        self.trace = trace
        self.discovery = discovery
        if intervention is not None:
            self._intervention = intervention

    @property
    def mappings(self) -> Any:
        return self._mappings

    def _aliases(self, principal) -> tuple[Mapping[str, str] | None, Mapping[str, str] | None]:
        key = getattr(principal, "key", None)
        if key is None:
            return None, None
        team = None
        if key.team_id and self._team_aliases is not None:
            team = self._team_aliases(key.team_id) or None
        return getattr(key, "aliases", None) or None, team

    def _mappings_changed(self, _name: str) -> None:
        if self._mapping_changes is not None:
            self._mapping_changes += 1

    def _now(self, principal, requested: Any, policy, bare_provider: str | None) -> Resolution:
        return self._now_kept(principal, requested, policy, bare_provider).found

    def _now_kept(self, principal, requested: Any, policy, bare_provider: str | None) -> _Kept:
        """
        L{resolve} with the tables in force.  A principal without a key (an
        agent) gets the resolution kept from an earlier request of the same
        name, surface and policy object while nothing it read changed: the
        model table (replaced whole on reload), the stored mappings (their
        change count), and each answer the registry gave (asked again:
        a dict lookup each).  A refusal is never kept.
        """
        current = self._table.current if self._table is not None else None
        changes = self._mapping_changes
        keep = (
            changes is not None
            and getattr(principal, "key", None) is None
            and (requested is None or type(requested) is str)
        )
        if keep:
            slot = (requested, bare_provider, id(policy))
            kept = self._kept.get(slot)
            if kept is not None and kept.policy is policy and kept.table is current and kept.mappings_changes == changes:
                for ask, name, answer in kept.asked:
                    if ask(name) != answer:
                        break
                else:
                    return kept
        key_aliases, team_aliases = self._aliases(principal)
        recording = _Recording(self._view) if keep else None
        found = resolve(
            requested,
            policy=policy,
            bare_provider=bare_provider,
            key_aliases=key_aliases,
            team_aliases=team_aliases,
            table=current.entries if current is not None else None,
            families=current.families if current is not None else DEFAULT,
            providers=recording if recording is not None else self._view,
            mappings=self._mappings.current if self._mappings is not None else None,
        )
        asked = tuple(recording.asked) if recording is not None else ()
        made = _Kept(policy, current, changes, asked, found, tuple([step.rule for step in found.steps]), str(found.ref))
        if recording is not None and not recording.listed:
            if len(self._kept) >= KEPT_RESOLUTIONS:
                self._kept.clear()
            self._kept[slot] = made
        return made

    def resolve(self, principal, requested: Any, policy, bare_provider: str | None, ex=None,
                waited: bool = False) -> Any:
        """
        The L{Resolution} of C{requested} for C{principal}, or (when the
        LLM resolver is asked, or the stored mappings are still loading at
        start) a Deferred firing with it.  C{ex}: the request's exchange
        (its id for the trace, its surface and its C{resolve_hints}:
        C{?force}, C{?prompt=}).

        @raise ProxyError: the name cannot be served (also as the
            Deferred's failure).
        """
        mappings = self._mappings
        if mappings is not None and not mappings.loaded and not waited:
            # Just started: a stored mapping must not be missed (or paid
            # for again) because it is not in memory yet.  Waited for a
            # while; a database that stays away leaves the other rules.
            return mappings.loaded_within(MAPPINGS_WAIT).addCallback(
                lambda _: self.resolve(principal, requested, policy, bare_provider, ex, waited=True))
        hints = getattr(ex, "resolve_hints", None)
        try:
            now = self._now_kept(principal, requested, policy, bare_provider)
        except Unresolved as unresolved:
            resolver = self.resolver
            if resolver is None or ex is None:
                self._record(ex, principal, requested, unresolved.steps, None, unresolved.code)
                raise ProxyError(unresolved.status, unresolved.code, unresolved.message) from None
            # A force re-asks about a name the resolver found nothing for (once per interval).
            force = hints is not None and hints.force and resolver.force_refusal(unresolved.name) is None
            return self._ask(ex, principal, requested, policy, bare_provider, unresolved.name, hints,
                             refused=unresolved, force=force)
        except ProxyError as refused:
            self._record(ex, principal, requested, (), None, refused.code)
            raise
        found = now.found
        if hints is None and self.trace is not None:
            # The usual request: its trace line from what was kept with the resolution.
            self.trace.record(getattr(ex, "request_id", None), getattr(principal, "agent_id", None), requested,
                              now.rules, now.result, None, None)
            return found
        if hints is not None and hints.force and self.resolver is not None:
            step = next((s for s in found.steps if s.rule == LLM_MAPPING), None)
            if step is not None:
                name = step.details["mapping"]
                why = self.resolver.force_refusal(name)
                if why is None:
                    return self._ask(ex, principal, requested, policy, bare_provider, name, hints, kept=found,
                                     force=True)
                found = _noted(found, force_ignored=why)
        self._record(ex, principal, requested, found.steps, str(found.ref), None)
        return found

    def _ask(self, ex, principal, requested: Any, policy, bare_provider: str | None, name: str, hints,
             refused: Unresolved | None = None, kept: Resolution | None = None, force: bool = False) -> Any:
        """
        Ask the resolver what C{name} means, then resolve again.  C{kept}:
        a forced re-resolution of an LLM mapping, which stays in force when
        the resolver finds nothing better.
        """
        prompt = hints.prompt if hints is not None else None
        caller = getattr(principal, "agent_id", None)
        asking = self.resolver.ask(name, surface=ex.surface.name, caller=caller, prompt=prompt, force=force)

        def answered(outcome) -> Resolution:
            if outcome.target is None:
                self._intervention(ex, "llm_resolver", requested_model=requested, mapping=name,
                                   **outcome.audit_fields())
                if kept is not None:
                    self._record(ex, principal, requested, kept.steps, str(kept.ref), None,
                                 f"forced re-resolution: {outcome.reason}, the mapping is kept")
                    return _noted(kept, force_outcome=outcome.reason)
                assert refused is not None
                self._record(ex, principal, requested, refused.steps, None, refused.code,
                             f"resolver: {outcome.reason}")
                raise ProxyError(refused.status, refused.code, f"{refused.message} ({outcome.note})")
            try:
                found = self._now(principal, requested, policy, bare_provider)
            except ProxyError as e:
                self._record(ex, principal, requested, (), None, e.code, f"resolver: {outcome.reason}")
                raise ProxyError(e.status, e.code, e.message) from None
            found = _noted(found, fresh=True, **outcome.mapped_fields())
            self._record(ex, principal, requested, found.steps, str(found.ref), None, "resolver: mapped now")
            return found

        return asking.addCallback(answered)

    def _record(self, ex, principal, requested: Any, steps, result: str | None, error: str | None,
                note: str | None = None) -> None:
        if self.trace is not None:
            self.trace.record(getattr(ex, "request_id", None), getattr(principal, "agent_id", None), requested,
                              tuple(step.rule for step in steps), result, error, note)

    def table_names(self) -> dict[str, tuple[str, str]]:
        """
        The model table's names a mapping may not take (the table decides
        them first): name -> (what it routes to, C{model_name} or
        C{model_group_alias}).
        """
        current = self._table.current if self._table is not None else None
        if current is None:
            return {}
        return {
            name: (entry.alias_of, "model_group_alias") if entry.alias_of is not None
            else (str(entry.refs[0]) if entry.refs else "", "model_name")
            for name, entry in current.entries.items()
        }

    def table_loaded_at(self) -> float | None:
        return getattr(self._table, "loaded_at", None)

    def target_problem(self, target: str) -> str | None:
        """
        Why C{target} cannot be a mapping's target (None: it can): a
        mapping leads to a name of the model table or to
        C{<provider>/<model>} of a configured provider.
        """
        current = self._table.current if self._table is not None else None
        entry = current.entries.get(target) if current is not None else None
        if entry is not None:
            return None if entry.problem is None else f"model table name {_echo(target)} cannot serve: {entry.problem}"
        if "/" not in target:
            return (f"{_echo(target)} is neither a name of the model table nor '<provider>/<model>' "
                    "with a configured provider")
        try:
            ref = split_model_ref(target)
        except InvalidModelRef as e:
            return str(e)
        if not self._view.configured(ref.provider):
            configured = ", ".join(self._view.names()) or "none"
            return f"{ref.provider!r} is not a provider configured here (configured: {configured})"
        return None

    def candidates(self) -> list[str]:
        """
        What the LLM resolver may choose from: the model table's names,
        the models of discovered local servers that resolve now, then the
        priced models of every configured provider (C{<provider>/<model>}).
        """
        current = self._table.current if self._table is not None else None
        names = [n for n, e in current.entries.items() if e.problem is None] if current is not None else []
        snapshot = getattr(self.discovery, "snapshot", None)
        for server in (snapshot() if snapshot is not None else None) or ():
            provider = server.get("name") if isinstance(server, dict) else None
            if not isinstance(provider, str) or str(server.get("state") or "").lower() in _DOWN_STATES:
                continue
            if not self._view.configured(provider):
                continue
            for model in server.get("models") or ():
                if isinstance(model, dict):
                    model = model.get("id") or model.get("name") or model.get("model")
                if isinstance(model, str) and model:
                    names.append(f"{provider}/{model}")
        if self._pricing is not None:
            prices = self._pricing.table
            names.extend(f"{name}/{model}" for name in self._view.names() for model in sorted(prices.get(name, {})))
        return list(dict.fromkeys(names))

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
