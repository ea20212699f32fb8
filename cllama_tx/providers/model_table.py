"""
The operator model table (C{CLLAMA_MODEL_TABLE}): public model names and
where they go, in LiteLLM's C{model_list} shape so that a LiteLLM config
file can be pointed at unchanged.

    model_list:
      - model_name: gpt-4                      # the public name clients send
        litellm_params:
          model: openai/gpt-4o                 # <provider>/<model>
      - model_name: fake-openai-endpoint
        litellm_params:
          model: openai/fake
          api_base: https://fake.example/v1    # its own upstream
          api_key: os.environ/FAKE_API_KEY     # its own key (or a literal)
          input_cost_per_token: 0.0000025      # its own price (LiteLLM's units)
          output_cost_per_token: 0.00001
    router_settings:
      model_group_alias: {gpt-3.5-turbo: gpt-4}   # more names for an entry
    model_families:                               # ours: bare names -> provider
      mistral-*: mistral
      deepseek-*: deepseek

How an entry composes with the provider registry: an entry that only names
a model (C{openai/gpt-4o}) is served by that registry provider, its keys
and prices.  An entry with its own C{api_base}, C{api_key} or price is its
own I{deployment}: a provider named C{<provider>@<model_name>} (the k-th
deployment of the same name gets C{-k}) that takes the wire format, auth
mode and header rules of C{<provider>}, its base URL from C{api_base} (else
the provider's), its key from C{api_key} (else the provider's key pool), and
its price from the entry (else C{<provider>}'s price for the model).  The
ledger and the audit name that deployment as the provider.  Several entries
with one C{model_name} are tried in file order (failover).

Entries the proxy cannot serve (a provider it has no wire format for, such
as C{bedrock/} or C{azure/}; an C{os.environ/} variable that is unset) are
kept with their problem: the UI shows it, a request for them gets a 400
saying it, and the rest of the file works.  A malformed file (not a list,
a missing C{model_name}, a bad price) is refused whole: at start the daemon
stops, on a reload the previous table stays.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.logger import Logger

from cllama_tx.accounting.pricing import Price, Table
from cllama_tx.governance.resolution import (
    DEFAULT_FAMILIES,
    Families,
    FamilyError,
    TableEntry,
    compile_families,
)
from cllama_tx.providers.catalog import (
    ANTHROPIC_FORMAT,
    BEARER,
    CATALOG,
    NO_AUTH,
    OPENAI_FORMAT,
    ProviderSpec,
)
from cllama_tx.providers.forwarding import policy_for
from cllama_tx.providers.keys import KeyPool
from cllama_tx.providers.registry import (
    ProviderNotConfigured,
    ResolvedProvider,
    UnknownProvider,
    valid_base_url,
)
from cllama_tx.providers.store import READY, KeyRecord
from cllama_tx.store.jsonfile import UnreadableFile, read_text_file
from cllama_tx.surfaces.matrix import ModelRef, canonical_provider

MODEL_TABLE_ENV = "CLLAMA_MODEL_TABLE"
MAX_FILE_BYTES = 1024 * 1024
MAX_ENTRIES = 10000

# LiteLLM's provider names that are ours under another name.
LITELLM_PROVIDERS = {"gemini": "google", "ollama_chat": "ollama", "x-ai": "xai"}
# LiteLLM's names for "an OpenAI-compatible server at api_base".
OPENAI_COMPATIBLE = frozenset(
    {"hosted_vllm", "vllm", "openai_compatible", "custom_openai", "lm_studio", "llamafile", "text-completion-openai"}
)
# LiteLLM providers with a wire format of their own, which cllama_tx does not speak.
UNSUPPORTED = frozenset(
    {"azure", "azure_ai", "bedrock", "bedrock_converse", "sagemaker", "vertex_ai", "vertex_ai_beta",
     "cohere", "cohere_chat", "huggingface", "replicate", "watsonx", "predibase", "palm", "cloudflare"}
)
ENV_REFERENCE = "os.environ/"
_SLUG = re.compile(r"[^a-z0-9._-]+")
_PER_MILLION = 1_000_000
_PRICE_FIELDS = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cache_read",
    "cache_creation_input_token_cost": "cache_write",
}

_log = Logger(namespace="cllama_tx.model_table")


class ModelTableError(ValueError):
    """The file cannot be used; the message says where (never a secret)."""


@attrs.frozen
class Deployment:
    """
    One entry of C{model_list}.  C{provider} is the registry provider whose
    format, auth and (unless its own) base URL and keys it uses, or None for
    an OpenAI-compatible server known only by its C{api_base}.
    """

    public_name: str
    ref: ModelRef
    provider: str | None
    api_base: str | None = None
    key_source: str | None = None  # "env:NAME", "inline", or None (the provider's keys)
    secret: str | None = attrs.field(default=None, repr=False)
    price: Price | None = None
    problem: str | None = None

    @property
    def own_route(self) -> bool:
        """Whether this deployment is a provider of its own (C{<provider>@<name>})."""
        return "@" in self.ref.provider


@attrs.frozen
class ModelTable:
    """A parsed table: names -> entries, the deployments, families, prices."""

    entries: Mapping[str, TableEntry]
    deployments: tuple[Deployment, ...] = ()
    aliases: Mapping[str, str] = attrs.Factory(dict)
    families: Families = attrs.Factory(lambda: compile_families(DEFAULT_FAMILIES))
    prices: Table = attrs.Factory(dict)
    source: str | None = None

    def deployment(self, provider: str) -> Deployment | None:
        for deployment in self.deployments:
            if deployment.ref.provider == provider:
                return deployment
        return None


EMPTY = ModelTable(entries={})


# --------------------------------------------------------------------------
# Parsing (pure)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ModelTableError(f"{where} must be a non-empty string")
    return value.strip()


def _env_value(value: str, env: Mapping[str, str], field: str) -> tuple[str | None, str | None]:
    """C{(value, problem)} of a literal or an C{os.environ/NAME} reference."""
    if not value.startswith(ENV_REFERENCE):
        return value, None
    name = value[len(ENV_REFERENCE):].strip()
    found = (env.get(name) or "").strip()
    if not found:
        return None, f"the environment variable {name} ({field}) is not set"
    return found, None


def _price(params: Mapping[str, Any], info: Mapping[str, Any], where: str) -> Price | None:
    rates: dict[str, float] = {}
    for source in (info, params):  # litellm_params wins over model_info
        for field, name in _PRICE_FIELDS.items():
            value = source.get(field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or value != value:
                raise ModelTableError(f"{where}: {field} must be a non-negative number (USD per token)")
            rates[name] = float(value) * _PER_MILLION
    if not rates:
        return None
    if "input" not in rates or "output" not in rates:
        raise ModelTableError(f"{where}: a price needs both input_cost_per_token and output_cost_per_token")
    return Price(
        input=rates["input"], output=rates["output"], cache_read=rates.get("cache_read"),
        cache_write=rates.get("cache_write"),
    )


def _slug(name: str) -> str:
    return _SLUG.sub("-", name.lower()).strip("-") or "model"


def _provider_of(litellm_model: str, families: Families) -> tuple[str | None, str, str | None]:
    """C{(provider or None, model, problem)} of LiteLLM's C{model} string."""
    prefix, sep, model = litellm_model.partition("/")
    if not sep:
        found = families.match(litellm_model)
        if found is None:
            return None, litellm_model, (
                f"{litellm_model!r} names no provider: write it as '<provider>/<model>'"
            )
        return found[0], litellm_model, None
    lowered = prefix.strip().lower()
    if lowered in UNSUPPORTED:
        return lowered, model, f"provider {lowered!r} (LiteLLM's) speaks a wire format cllama_tx does not"
    if lowered in OPENAI_COMPATIBLE:
        return None, model, None
    return canonical_provider(LITELLM_PROVIDERS.get(lowered, lowered)), model, None


def parse_model_table(doc: Any, env: Mapping[str, str], source: str = "the model table") -> ModelTable:
    """
    Parse a LiteLLM-style config document (see the module docstring).
    Unknown top-level keys (C{litellm_settings}, C{general_settings}, ...)
    are ignored, so a LiteLLM config can be used as it is.

    @raise ModelTableError: the document is malformed.
    """
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ModelTableError(f"{source}: the file must be a mapping with a 'model_list'")
    try:
        families = compile_families(list(DEFAULT_FAMILIES) + _family_pairs(doc.get("model_families"), source))
    except FamilyError as e:
        raise ModelTableError(f"{source}: model_families: {e}") from None
    raw = doc.get("model_list")
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise ModelTableError(f"{source}: 'model_list' must be a list")
    if len(raw) > MAX_ENTRIES:
        raise ModelTableError(f"{source}: 'model_list' has more than {MAX_ENTRIES} entries")
    deployments: list[Deployment] = []
    counts: dict[str, int] = {}
    for index, item in enumerate(raw):
        where = f"{source}: model_list[{index}]"
        deployments.append(_deployment(item, where, env, families, counts))
    entries: dict[str, TableEntry] = {}
    for deployment in deployments:
        name = deployment.public_name
        previous = entries.get(name)
        refs = (previous.refs if previous else ()) + ((deployment.ref,) if deployment.problem is None else ())
        problem = None if refs else deployment.problem
        entries[name] = TableEntry(name=name, refs=refs, problem=problem)
    aliases = _aliases(doc.get("router_settings"), source)
    for alias, target in aliases.items():
        entry = entries.get(target)
        if entry is None:
            raise ModelTableError(f"{source}: model_group_alias {alias!r} names {target!r}, which is not a model_name")
        if alias not in entries:
            entries[alias] = TableEntry(name=alias, refs=entry.refs, alias_of=target, problem=entry.problem)
    prices: Table = {}
    for deployment in deployments:
        if deployment.price is not None and deployment.problem is None:
            prices.setdefault(deployment.ref.provider, {})[deployment.ref.model] = deployment.price
    return ModelTable(
        entries=entries, deployments=tuple(deployments), aliases=aliases, families=families, prices=prices,
        source=source,
    )


def _family_pairs(raw: Any, source: str) -> list[tuple[str, str]]:
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise ModelTableError(f"{source}: 'model_families' must map patterns (e.g. 'mistral-*') to providers")
    return [(str(k), v) for k, v in raw.items()]


def _aliases(router_settings: Any, source: str) -> dict[str, str]:
    if router_settings is None:
        return {}
    if not isinstance(router_settings, dict):
        raise ModelTableError(f"{source}: 'router_settings' must be a mapping")
    raw = router_settings.get("model_group_alias") or {}
    if not isinstance(raw, dict):
        raise ModelTableError(f"{source}: router_settings.model_group_alias must be a mapping")
    out: dict[str, str] = {}
    for alias, target in raw.items():
        if isinstance(target, dict):  # LiteLLM's {"model": ..., "hidden": ...}
            target = target.get("model")
        out[_text(alias, f"{source}: a model_group_alias name")] = _text(
            target, f"{source}: model_group_alias {alias!r}"
        )
    return out


def _deployment(item: Any, where: str, env: Mapping[str, str], families: Families, counts: dict) -> Deployment:
    if not isinstance(item, dict):
        raise ModelTableError(f"{where} must be a mapping with 'model_name' and 'litellm_params'")
    public = _text(item.get("model_name"), f"{where}.model_name")
    params = item.get("litellm_params") or {}
    info = item.get("model_info") or {}
    if not isinstance(params, dict) or not isinstance(info, dict):
        raise ModelTableError(f"{where}: litellm_params and model_info must be mappings")
    litellm_model = _text(params.get("model"), f"{where}.litellm_params.model")
    price = _price(params, info, where)
    provider, model, problem = _provider_of(litellm_model, families)
    api_base, key_source, secret = None, None, None
    raw_base = params.get("api_base")
    if raw_base is not None:
        api_base, base_problem = _env_value(_text(raw_base, f"{where}.litellm_params.api_base"), env, "api_base")
        problem = problem or base_problem
    raw_key = params.get("api_key")
    if raw_key is not None:
        key_text = _text(raw_key, f"{where}.litellm_params.api_key")
        secret, key_problem = _env_value(key_text, env, "api_key")
        key_source = f"env:{key_text[len(ENV_REFERENCE):].strip()}" if key_text.startswith(ENV_REFERENCE) else "inline"
        problem = problem or key_problem
    if provider is None and problem is None and api_base is None:
        problem = f"{litellm_model!r} is an OpenAI-compatible server: give its api_base"
    if api_base is not None and problem is None:
        api_base = _normalised_base(api_base, provider)
        if not valid_base_url(api_base):
            problem = "api_base must be an absolute http:// or https:// URL without credentials, query or fragment"
    if secret is not None and problem is None and not all(0x21 <= ord(c) <= 0x7E for c in secret):
        problem = "api_key contains spaces, control or non-ASCII characters"
    base_name = provider or "openai-compatible"
    if raw_base is not None or raw_key is not None or price is not None or provider is None:
        n = counts.get(public, 0) + 1
        counts[public] = n
        route = f"{base_name}@{_slug(public)}" + (f"-{n}" if n > 1 else "")
    else:
        route = base_name
    return Deployment(
        public_name=public,
        ref=ModelRef(route, model),
        provider=provider,
        api_base=api_base,
        key_source=key_source,
        secret=secret,
        price=price,
        problem=problem,
    )


def _normalised_base(url: str, provider: str | None) -> str:
    """LiteLLM's Anthropic api_base has no /v1; ours (like the catalog's) does."""
    url = url.rstrip("/")
    fmt = CATALOG[provider].api_format if provider is not None and provider in CATALOG else OPENAI_FORMAT
    if fmt == ANTHROPIC_FORMAT and not url.endswith("/v1"):
        url += "/v1"
    return url


def read_model_table(path: str, env: Mapping[str, str]) -> ModelTable:
    """
    Read and parse the file at C{path} (YAML, or JSON).  A missing file is
    an error: the operator named it.

    @raise ModelTableError: unreadable, not YAML, or malformed.
    """
    return parse_model_table(read_model_doc(path), env, path)


def read_model_doc(path: str) -> Any:
    """The document of the file at C{path}, unparsed.  @raise ModelTableError: unreadable or not YAML."""
    try:
        _signature, text = read_text_file(path, MAX_FILE_BYTES)
    except UnreadableFile as e:
        raise ModelTableError(f"{path}: {e}") from None
    if text is None:
        raise ModelTableError(f"{path}: no such file")
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ModelTableError(f"{path}: not valid YAML{at}") from None
    return doc


def with_entries(doc: Any, entries: list[dict]) -> Any:
    """A table document with C{entries} (the models added through the key API) after its own."""
    if not entries:
        return doc
    merged = dict(doc) if isinstance(doc, dict) else {}
    own = merged.get("model_list") or []
    merged["model_list"] = (list(own) if isinstance(own, list) else own) + list(entries)
    return merged


# --------------------------------------------------------------------------
# The table in force, and its deployments as providers


class ModelTableFile:
    """
    The model table in force (L{current}), re-read by L{reload} (SIGHUP,
    C{/api/reload}).  Its deployments with a route of their own are
    providers the registry resolves through L{resolve}; their prices are
    laid over the pricing table.
    """

    def __init__(self, path: str | None, env: Mapping[str, str], clock, registry=None, pricing=None) -> None:
        self.path = path
        self._env = env
        self._clock = clock
        self._registry = registry
        self._pricing = pricing
        self.current: ModelTable = EMPTY
        self.loaded_at: float | None = None
        self._routes: dict[str, tuple] = {}
        self._pools: dict[str, KeyPool] = {}
        self._generic: dict[str, ProviderSpec] = {}
        #: Entries added through the key API's /model/new (kept in the store), after the file's.
        self.stored: list[dict] = []
        if registry is not None:
            registry.routes = self
        if path:
            self._install(read_model_table(path, env))

    def reload(self) -> int:
        """Re-read the file; raises L{ModelTableError} and keeps the table when it is broken."""
        if self.path or self.stored:
            self._install(self.compose(self.stored))
        return len(self.current.entries)

    def compose(self, stored: list[dict]) -> ModelTable:
        """The file's table with C{stored} entries after its own.  @raise ModelTableError: either is broken."""
        doc = read_model_doc(self.path) if self.path else {}
        return parse_model_table(with_entries(doc, stored), self._env, self.path or "the stored models")

    def set_stored(self, stored: list[dict]) -> None:
        """Serve C{stored} entries too (C{/model/new}); raises L{ModelTableError} and keeps the table when broken."""
        table = self.compose(stored)
        self.stored = list(stored)
        self._install(table)

    def _install(self, table: ModelTable) -> None:
        self.current = table
        self.loaded_at = self._clock.seconds()
        self._routes, self._pools, self._generic = {}, {}, {}
        if self._pricing is not None and hasattr(self._pricing, "set_extra"):
            self._pricing.set_extra(table.prices)
        if self._registry is not None:
            secrets = [d.secret for d in table.deployments if d.secret]
            if secrets:
                self._registry.scrubber.add(secrets)
        for deployment in table.deployments:
            if deployment.problem is not None:
                _log.warn(
                    "model table entry {name} cannot be served: {problem}",
                    name=deployment.public_name, problem=deployment.problem,
                )

    # -- the registry's resolution of a deployment's provider

    def resolve(self, name: str) -> ResolvedProvider:
        """
        The L{ResolvedProvider} of deployment provider C{name}: its own key
        or its provider's key pool (then that provider must be configured).

        @raise UnknownProvider: no such deployment.
        @raise ProviderNotConfigured: the entry has a problem, or it borrows
            the keys of a provider that has none.
        """
        deployment = self.current.deployment(name)
        if deployment is None or not deployment.own_route:
            raise UnknownProvider(name)
        if deployment.problem is not None:
            raise ProviderNotConfigured(f"model table entry {deployment.public_name!r}: {deployment.problem}", name)
        if deployment.secret is None and deployment.provider is not None and self._registry is not None:
            pool = self._registry.resolve(deployment.provider).pool  # raises when not configured
        else:
            pool = self._pools.get(name)
            if pool is None:
                keys = []
                if deployment.secret is not None:
                    keys = [KeyRecord(id=f"table:{name}", label=deployment.key_source, secret=deployment.secret,
                                      source="seed", state=READY)]
                pool = self._pools[name] = KeyPool(name, keys, self._clock, keyless=not keys)
        base = self._base_spec(deployment)
        cached = self._routes.get(name)
        if cached is not None and cached[0] is pool and cached[1] is base:
            return cached[2]
        changes: dict[str, Any] = {"name": name, "probe_path": None}
        if deployment.api_base is not None:
            # Another server: the operator's OpenAI organization is not for it.
            changes.update(base_url=deployment.api_base, organization=None, project=None)
        spec = attrs.evolve(base, **changes)
        resolved = ResolvedProvider(
            spec=spec, pool=pool, headers=policy_for(attrs.evolve(spec, name=base.name)),
            scrubber=getattr(self._registry, "scrubber", None),
        )
        self._routes[name] = (pool, base, resolved)
        return resolved

    def _base_spec(self, deployment: Deployment) -> ProviderSpec:
        """The spec a deployment takes its format, auth and base URL from."""
        spec = None
        if deployment.provider is not None:
            spec_of = getattr(self._registry, "spec_of", None)
            spec = spec_of(deployment.provider) if spec_of is not None else CATALOG.get(deployment.provider)
        if spec is None:
            spec = self._generic.get(deployment.ref.provider)
            if spec is None:
                spec = self._generic[deployment.ref.provider] = ProviderSpec(
                    name=deployment.provider or "openai-compatible", base_url=None,
                    auth=BEARER if deployment.secret else NO_AUTH, api_format=OPENAI_FORMAT,
                )
        return spec

    # -- what the UI shows (never a secret)

    def snapshot(self) -> dict:
        table = self.current
        return {
            "file": self.path,
            "loaded_at": self.loaded_at,
            "entries": [
                {
                    "model_name": d.public_name,
                    "route": str(d.ref),
                    "provider": d.provider,
                    "api_base": d.api_base,
                    "key": d.key_source or "the provider's keys",
                    "price": None if d.price is None else {"input": d.price.input, "output": d.price.output},
                    "problem": d.problem,
                }
                for d in table.deployments
            ],
            "aliases": dict(table.aliases),
            "families": [{"pattern": p, "provider": v} for p, v in table.families.patterns],
        }
