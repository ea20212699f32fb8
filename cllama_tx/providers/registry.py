"""
The provider registry: the catalog, C{providers.json} and the environment
merged into one table of providers, each with its key pool.

Merge order (later wins):

  1. the catalog (L{cllama_tx.providers.catalog.CATALOG});
  2. C{CLAW_AUTH_DIR/providers.json}: may add providers and override
     C{base_url}, C{auth}, C{api_format}; adds its keys;
  3. the environment: C{<P>_BASE_URL} overrides the base URL;
     C{<P>_API_KEY}, C{_1}, C{_2} keys (ids C{seed:<VAR>}) come first in the
     pool and replace file keys with the same id or the same secret.  When
     the environment gives a provider keys, the active key is the first
     environment key (unless the file's C{active_key_id} names another
     environment key): environment keys override the file.

Environment keys are never written to the file.  Runtime changes (key state
changes, operator operations) are written back as v2: pool state changes
after a short delay (coalesced), operator operations at once.

Each provider also gets the operator's organization and project (file, or
C{OPENAI_ORG_ID} / C{OPENAI_PROJECT_ID}), its forwarded-header policy
(L{cllama_tx.providers.forwarding}) and, once L{attach_prober} is called,
a re-checker for its keys (L{cllama_tx.providers.health}).  Every secret
configured here is known to L{ProviderRegistry.scrubber}.

L{ProviderRegistry.resolve} is on the per-request path: it does two dict
lookups and one integer test, never any I/O.  A name it does not know that
contains C{@} is a deployment of the operator model table (L{routes}),
resolved there.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Mapping
from functools import partial
from urllib.parse import urlsplit

import attrs
from twisted.application.service import Service
from twisted.logger import Logger
from zope.interface import implementer

from cllama_tx.interfaces import IProviderRegistry
from cllama_tx.providers import store
from cllama_tx.providers.catalog import (
    API_FORMATS,
    AUTH_MODES,
    BEARER,
    CATALOG,
    DEFAULT_PROBE_PATH,
    ENV_NAMES,
    NO_AUTH,
    OPENAI_FORMAT,
    PER_KEY,
    PER_MODEL,
    ProviderSpec,
    seed_key_id,
)
from cllama_tx.providers.forwarding import HeaderPolicy, policy_for, valid_header_value
from cllama_tx.providers.health import KeyHealth
from cllama_tx.providers.keys import REPROBE_FIRST, REPROBE_MAX, KeyPool, mask_secret
from cllama_tx.providers.scrub import SecretScrubber
from cllama_tx.providers.store import (
    DISABLED,
    READY,
    SEED_PREFIX,
    KeyRecord,
    ProviderEntry,
    ProvidersFileError,
)
from cllama_tx.surfaces.matrix import canonical_provider

DEFAULT_SAVE_DELAY = 1.0

_PROVIDER_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class UnknownProvider(Exception):
    """No provider of that name: not in the catalog nor in providers.json."""

    def __init__(self, name: str) -> None:
        super().__init__(f"unknown provider {name!r}")
        self.name = name


class ProviderNotConfigured(Exception):
    """
    A known provider that cannot be used yet; the message says what the
    operator must set.  It never contains a secret.
    """

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.name = name


@attrs.frozen
class ResolvedProvider:
    """Where to send a request (C{spec}, with the effective base URL), the
    keys to send it with (C{pool}), which headers go along (C{headers}) and
    what to scrub from what comes back (C{scrubber}, or L{None})."""

    spec: ProviderSpec
    pool: KeyPool
    headers: HeaderPolicy = attrs.field(
        default=attrs.Factory(lambda self: policy_for(self.spec), takes_self=True)
    )
    scrubber: SecretScrubber | None = None


def valid_secret(secret: str) -> bool:
    """A key that can travel in an HTTP header: printable ASCII, no spaces."""
    return bool(secret) and all(0x21 <= ord(c) <= 0x7E for c in secret)


def valid_base_url(url: str) -> bool:
    """An absolute http(s) URL without credentials, query or fragment."""
    if not url or any(c.isspace() for c in url):
        return False
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and port_ok
        and "@" not in parts.netloc
        and not parts.query
        and not parts.fragment
    )


@implementer(IProviderRegistry)
class ProviderRegistry(Service):
    """
    See the module docstring.  A service so that stopping the application
    writes any pending key state; put it before the listening services.

    C{on_pool_event(event)} receives every key pool event (the contract's
    C{provider_pool} audit fields, never a secret).
    """

    def __init__(
        self,
        env: Mapping[str, str],
        auth_dir: str | None,
        clock,
        on_pool_event: Callable[[dict], None] | None = None,
        log: Logger | None = None,
        save_delay: float = DEFAULT_SAVE_DELAY,
        reprobe_first: float = REPROBE_FIRST,
        reprobe_max: float = REPROBE_MAX,
    ) -> None:
        self._env = env
        self._path = store.providers_path(auth_dir) if auth_dir else None
        self._clock = clock
        self.on_pool_event = on_pool_event
        self._log = log if log is not None else Logger(namespace="cllama_tx.providers")
        self._save_delay = save_delay
        self._pending_save = None
        self._dirty = False
        self._fingerprint: tuple[int, int, int] | None = None
        # Called with the file's path after an operator's change is saved.
        self.on_operator_change: list[Callable[[str], None]] = []
        # The file layer, including operator changes; what save() writes.
        self._file_entries: dict[str, ProviderEntry] = {}
        self._specs: dict[str, ProviderSpec] = {}
        self._pools: dict[str, KeyPool] = {}
        self._resolved: dict[str, ResolvedProvider] = {}
        self._problems: dict[str, str] = {}
        self._reprobe_first = reprobe_first
        self._reprobe_max = reprobe_max
        self._prober = None
        self.scrubber = SecretScrubber()
        """Every secret configured here (keys, organization, project), ever."""
        self.routes = None
        """The operator model table's deployments (L{cllama_tx.providers.model_table}), or None."""
        self.discovered = None
        """
        Local model servers found by discovery (L{cllama_tx.discovery.registered}),
        or None: asked only about names not configured here, so the catalog
        and providers.json always win.
        """
        self._build(self._load_file())

    @property
    def path(self) -> str | None:
        """The providers.json path, or L{None} without an auth directory."""
        return self._path

    # --- the request path --------------------------------------------------

    def resolve(self, name: str) -> ResolvedProvider:
        resolved = self._resolved.get(name)
        if resolved is None:
            problem = self._problems.get(name)
            if problem is None:
                if self.routes is not None and "@" in name:
                    # A deployment of the operator model table (<provider>@<name>).
                    return self.routes.resolve(name)
                if self.discovered is not None:
                    found = self.discovered.resolve(name)  # raises for a server that is gone
                    if found is not None:
                        return found
                raise UnknownProvider(name)
            raise ProviderNotConfigured(problem, name)
        pool = resolved.pool
        if not pool.keyless and not pool.enabled_count:
            raise ProviderNotConfigured(self._no_key_message(name, pool), name)
        return resolved

    def configured(self, name: str) -> bool:
        """Whether C{name} resolves now (known, complete, with a usable key or keyless)."""
        resolved = self._resolved.get(name)
        if resolved is None:
            return name not in self._specs and self.discovered is not None and self.discovered.configured(name)
        pool = resolved.pool
        return pool.keyless or bool(pool.enabled_count)

    def known(self, name: str) -> bool:
        """Whether C{name} is a provider at all (the catalog, providers.json, discovery)."""
        return name in self._specs or (self.discovered is not None and self.discovered.known(name))

    def spec_of(self, name: str) -> ProviderSpec | None:
        """C{name}'s spec as configured (effective base URL), or None."""
        spec = self._specs.get(name)
        if spec is None and self.discovered is not None:
            return self.discovered.spec_of(name)
        return spec

    def names(self) -> list[str]:
        """The sorted names of the providers that resolve now (discovered servers included)."""
        names = [name for name in self._specs if self._problem(name) is None]
        if self.discovered is not None:
            names.extend(n for n in self.discovered.names() if n not in self._specs)
        return sorted(names)

    def discovered_models(self) -> dict[str, tuple[str, ...]]:
        """The models of each discovered server that answers now (not shadowed by a configured provider)."""
        if self.discovered is None:
            return {}
        return {name: models for name, models in self.discovered.models().items() if name not in self._specs}

    def known_names(self) -> list[str]:
        """Every provider name, configured or not."""
        return sorted(self._specs)

    # --- building ---------------------------------------------------------

    def _load_file(self) -> dict[str, ProviderEntry]:
        if self._path is None:
            return {}
        raw = store.load(self._path)
        self._fingerprint = store.fingerprint(self._path)
        entries: dict[str, ProviderEntry] = {}
        original: dict[str, str] = {}
        for name, entry in raw.items():
            canonical = canonical_provider(name)
            if canonical in entries:
                raise ProvidersFileError(
                    self._path,
                    f"providers {original[canonical]!r} and {name!r} are the same "
                    f"provider ({canonical!r}); keep one",
                )
            original[canonical] = name
            entry.name = canonical
            entries[canonical] = entry
        return entries

    def _build(self, entries: dict[str, ProviderEntry]) -> None:
        names = set(CATALOG) | set(entries)
        self._file_entries = entries
        for gone in set(self._specs) - names:
            self._specs.pop(gone, None)
            self._pools.pop(gone, None)
            self._resolved.pop(gone, None)
            self._problems.pop(gone, None)
        for name in sorted(names):
            keys, active = self._merge_keys(name, entries.get(name))
            self._compose(name, keys, active)
        self._learn_secrets()

    def _learn_secrets(self) -> None:
        secrets_now = [k.secret for pool in self._pools.values() for k in pool.keys]
        for spec in self._specs.values():
            secrets_now.extend(v for v in (spec.organization, spec.project) if v)
        self.scrubber.add(secrets_now)

    def _env_value(self, var: str) -> str:
        return (self._env.get(var) or "").strip()

    def _env_keys(self, name: str) -> list[KeyRecord]:
        env_names = ENV_NAMES.get(name)
        if env_names is None:
            return []
        old_pool = self._pools.get(name)
        now = self._clock.seconds()
        keys: list[KeyRecord] = []
        for var in env_names.key_vars():
            secret = self._env_value(var)
            if not secret or any(k.secret == secret for k in keys):
                continue
            if not valid_secret(secret):
                self._log.warn(
                    "Ignoring {var}: it contains spaces, control or non-ASCII characters",
                    var=var,
                )
                continue
            key_id = seed_key_id(var)
            previous = None
            if old_pool is not None:
                try:
                    previous = old_pool.get(key_id)
                except LookupError:
                    previous = None
            if previous is not None and previous.secret == secret:
                # Same key as before a reload: keep its pool state.
                keys.append(previous)
            else:
                keys.append(
                    KeyRecord(
                        id=key_id,
                        label=var,
                        secret=secret,
                        source="seed",
                        state=READY,
                        added_at=now,
                    )
                )
        return keys

    def _merge_keys(
        self, name: str, entry: ProviderEntry | None
    ) -> tuple[list[KeyRecord], str | None]:
        env_keys = self._env_keys(name)
        env_ids = {k.id for k in env_keys}
        env_secrets = {k.secret for k in env_keys}
        file_active = entry.active_key_id if entry is not None else None
        active: str | None
        used_ids = set(env_ids)
        file_keys: list[KeyRecord] = []
        for key in entry.keys if entry is not None else ():
            if key.id in env_ids or key.secret in env_secrets:
                # The environment overrides the file.
                continue
            if not valid_secret(key.secret) and key.state != DISABLED:
                # Kept (so that it is not lost from the file) but never sent.
                self._log.warn(
                    "Disabling key {key_id} of provider {provider} in providers.json: "
                    "it contains spaces, control or non-ASCII characters",
                    key_id=key.id,
                    provider=name,
                )
                key.state = DISABLED
                key.cooldown_until = None
                key.last_error_reason = "unusable secret (spaces or control characters)"
                self._mark_dirty_later(name)
            if key.id.startswith(SEED_PREFIX):
                # A copy of an environment key frozen into the file (the
                # reference proxy writes these, also for v1 keys).  It is
                # not in the environment now, so it is the file's key: give
                # it a file id so that it survives the next save.
                new_id = "file:" + key.id[len(SEED_PREFIX):]
                while new_id in used_ids:
                    new_id = f"{new_id}-{secrets.token_hex(2)}"
                if file_active == key.id:
                    file_active = new_id
                self._log.info(
                    "providers.json key {old_id} of provider {provider} is kept as {new_id}",
                    old_id=key.id,
                    new_id=new_id,
                    provider=name,
                )
                key = attrs.evolve(key, id=new_id)
                self._mark_dirty_later(name)
            if key.id in used_ids:
                continue
            used_ids.add(key.id)
            file_keys.append(key)
        if env_keys:
            active = file_active if file_active in env_ids else env_keys[0].id
        else:
            file_ids = {k.id for k in file_keys}
            active = file_active if file_active in file_ids else None
        return env_keys + file_keys, active

    def _compose_spec(self, name: str) -> tuple[ProviderSpec, str | None]:
        catalog = CATALOG.get(name)
        entry = self._file_entries.get(name)
        base_url = catalog.base_url if catalog else None
        base_from = "the catalog"
        auth = catalog.auth if catalog else BEARER
        api_format = catalog.api_format if catalog else OPENAI_FORMAT
        scope = catalog.rate_limit_scope if catalog else PER_KEY
        probe_path = catalog.probe_path if catalog else DEFAULT_PROBE_PATH
        ids: dict[str, tuple[str | None, str]] = {"organization": (None, ""), "project": (None, "")}
        if entry is not None:
            if entry.base_url:
                base_url = entry.base_url
                base_from = "providers.json"
            auth = entry.auth or auth
            api_format = entry.api_format or api_format
            scope = entry.rate_limit_scope or scope
            for field in ids:
                if getattr(entry, field):
                    ids[field] = (getattr(entry, field), "providers.json")
        env_names = ENV_NAMES.get(name)
        if env_names is not None and env_names.base_url:
            override = self._env_value(env_names.base_url)
            if override:
                base_url = override
                base_from = env_names.base_url
        if env_names is not None:
            for field in ids:
                var = getattr(env_names, field)
                if var and self._env_value(var):
                    ids[field] = (self._env_value(var), var)
        organization, organization_from = ids["organization"]
        project, project_from = ids["project"]
        spec = ProviderSpec(
            name=name,
            base_url=base_url,
            auth=auth,
            api_format=api_format,
            rate_limit_scope=scope,
            probe_path=probe_path,
            organization=organization if api_format == OPENAI_FORMAT else None,
            project=project if api_format == OPENAI_FORMAT else None,
        )
        where = self._path or "CLAW_AUTH_DIR/providers.json"
        for field, (value, source) in ids.items():
            if value is None:
                continue
            if not valid_header_value(value):
                return spec, (
                    f"provider {name!r} has an invalid {field} (from {source}): it must be "
                    "printable ASCII without spaces"
                )
            if api_format != OPENAI_FORMAT:
                self._log.warn(
                    "Ignoring the {field} of provider {provider} (from {source}): it "
                    "applies to openai-format providers only",
                    field=field,
                    provider=name,
                    source=source,
                )
        if base_url is None:
            return spec, (
                f"provider {name!r} has no base URL: set \"base_url\" for it in "
                f"{where} or add it in the operator UI"
            )
        if not valid_base_url(base_url):
            return spec, (
                f"provider {name!r} has an invalid base URL (from {base_from}): it must "
                "be an absolute http:// or https:// URL without credentials, query or "
                "fragment"
            )
        return spec, None

    def _compose(self, name: str, keys=None, active: str | None = None) -> None:
        """
        (Re)build C{name}'s spec and resolution.  With C{keys}, the pool's
        keys are replaced; without, the pool keeps its keys.
        """
        spec, problem = self._compose_spec(name)
        keyless = spec.auth == NO_AUTH
        pool = self._pools.get(name)
        if pool is None:
            pool = KeyPool(
                name,
                keys or (),
                self._clock,
                active_key_id=active,
                keyless=keyless,
                on_change=self._pool_event,
                on_dirty=partial(self._mark_dirty, name),
                reprobe_first=self._reprobe_first,
                reprobe_max=self._reprobe_max,
            )
            self._pools[name] = pool
            self._attach_health(name, pool)
        else:
            pool.keyless = keyless
            if keys is not None:
                pool.reset(keys, active)
        pool.per_model = spec.rate_limit_scope == PER_MODEL
        self._specs[name] = spec
        if problem is None:
            self._resolved[name] = ResolvedProvider(
                spec=spec, pool=pool, headers=policy_for(spec), scrubber=self.scrubber
            )
            self._problems.pop(name, None)
        else:
            self._resolved.pop(name, None)
            self._problems[name] = problem

    # --- key health -------------------------------------------------------

    def attach_prober(self, prober) -> None:
        """
        Re-check suspect keys and re-probe dead ones with C{prober} (a
        L{cllama_tx.providers.probe.UpstreamProber}); dead keys get their
        first re-probe scheduled now.  Until this is called a 401 kills a
        key at once (nothing could re-check it).
        """
        self._prober = prober
        for name, pool in self._pools.items():
            self._attach_health(name, pool)

    def _attach_health(self, name: str, pool: KeyPool) -> None:
        if self._prober is None or pool.health is not None:
            return
        pool.health = KeyHealth(
            pool, lambda key, name=name: self._prober.probe(self._specs[name], key), self._clock, self._log
        )
        pool.arm_reprobes()

    def stop_probes(self) -> None:
        """Cancel every scheduled re-probe (shutdown, tests)."""
        for pool in self._pools.values():
            if pool.health is not None:
                pool.health.stop()

    def _problem(self, name: str) -> str | None:
        problem = self._problems.get(name)
        if problem is not None:
            return problem
        pool = self._pools[name]
        if not pool.keyless and not pool.enabled_count:
            return self._no_key_message(name, pool)
        return None

    def _no_key_message(self, name: str, pool: KeyPool) -> str:
        if pool.keys:
            return (
                f"every API key of provider {name!r} is disabled: activate one or add "
                "a key in the operator UI"
            )
        env_names = ENV_NAMES.get(name)
        if env_names is not None and env_names.key_prefixes:
            first = f"{env_names.key_prefixes[0]}_API_KEY"
            aliases = [f"{p}_API_KEY" for p in env_names.key_prefixes[1:]]
            hint = f"set {first}" + (f" (or {', '.join(aliases)})" if aliases else "")
            return f"no API key for provider {name!r}: {hint} or add a key in the UI"
        return f"no API key for provider {name!r}: add a key in the UI or in providers.json"

    # --- events and persistence -------------------------------------------

    def _pool_event(self, event: dict) -> None:
        if self.on_pool_event is None:
            return
        try:
            self.on_pool_event(event)
        except Exception:
            self._log.failure("Provider pool event observer failed")

    def _mark_dirty(self, name: str) -> None:
        if self._path is None or name not in self._file_entries:
            return
        self._dirty = True
        if self._pending_save is None:
            call_later = getattr(self._clock, "callLater", None)
            if call_later is None:
                self._flush_pending()
            else:
                self._pending_save = call_later(self._save_delay, self._flush_pending)

    def _mark_dirty_later(self, name: str) -> None:
        # During a build, only note it: the file entry may not be installed
        # yet; the next save writes it.
        if self._path is not None:
            self._dirty = True

    def _flush_pending(self) -> None:
        self._pending_save = None
        try:
            self.flush()
        except ProvidersFileError as e:
            self._log.error(
                "Could not save provider key state: {problem}", problem=str(e)
            )

    def _cancel_pending(self) -> None:
        if self._pending_save is not None:
            if self._pending_save.active():
                self._pending_save.cancel()
            self._pending_save = None

    def flush(self) -> None:
        """
        Write unsaved changes now.

        @raise ProvidersFileError: the file could not be written (the
            changes stay pending).
        """
        self._cancel_pending()
        if not self._dirty or self._path is None:
            return
        store.save(self._path, self._entries_for_save())
        self._dirty = False
        self._fingerprint = store.fingerprint(self._path)

    def _save_now(self) -> None:
        if self._path is None:
            self._log.warn(
                "No auth directory: provider changes are kept in memory only"
            )
            return
        self._dirty = True
        self.flush()
        # An operator's change, saved: instances sharing a store copy it.
        for observer in list(self.on_operator_change):
            observer(self._path)

    def _entries_for_save(self) -> dict[str, ProviderEntry]:
        entries = {}
        for name, entry in self._file_entries.items():
            pool = self._pools.get(name)
            if pool is None:
                keys, active = list(entry.keys), entry.active_key_id
            else:
                keys, active = list(pool.keys), pool.active_key_id
            if active is not None and active.startswith(SEED_PREFIX):
                # Environment keys are the environment's business: which of
                # them is active is decided afresh at every start.
                active = None
            entries[name] = ProviderEntry(
                name=name,
                base_url=entry.base_url,
                auth=entry.auth,
                api_format=entry.api_format,
                active_key_id=active,
                source=entry.source,
                keys=[k for k in keys if not k.from_environment],
                organization=entry.organization,
                project=entry.project,
                rate_limit_scope=entry.rate_limit_scope,
            )
        return entries

    def reload(self, env: Mapping[str, str] | None = None) -> None:
        """
        Re-read providers.json and the environment (C{env}, or the mapping
        given at construction), e.g. on SIGHUP.  Unsaved runtime state is
        written first unless the file was changed on disk since it was last
        read or written, in which case the file wins.  Environment keys
        that did not change keep their state.

        @raise ProvidersFileError: the file is broken; nothing changed.
        """
        if env is not None:
            self._env = env
        if self._path is not None and self._dirty:
            if store.fingerprint(self._path) == self._fingerprint:
                try:
                    self.flush()
                except ProvidersFileError as e:
                    self._log.error(
                        "Could not save provider key state before reloading: {problem}",
                        problem=str(e),
                    )
            else:
                self._log.warn(
                    "providers.json changed on disk: its contents replace unsaved "
                    "runtime key state"
                )
        self._cancel_pending()
        self._dirty = False
        self._build(self._load_file())

    def stopService(self):
        self.stop_probes()
        try:
            self.flush()
        except ProvidersFileError as e:
            self._log.error("Could not save provider key state: {problem}", problem=str(e))
        return Service.stopService(self)

    # --- management (operator UI) -----------------------------------------

    def _known(self, provider: str) -> str:
        name = canonical_provider(provider)
        if name not in self._specs:
            raise UnknownProvider(name)
        return name

    def _ensure_entry(self, name: str) -> ProviderEntry:
        entry = self._file_entries.get(name)
        if entry is None:
            entry = ProviderEntry(name=name, source="seed" if name in CATALOG else "runtime")
            self._file_entries[name] = entry
        return entry

    def add_provider(
        self,
        name: str,
        base_url: str | None = None,
        auth: str | None = None,
        api_format: str | None = None,
    ) -> str:
        """
        Add a provider, or change a known one's base URL, auth or format
        (L{None} leaves a setting as it is; a new provider defaults to
        C{bearer} and C{openai}).  Returns the canonical name.

        @raise ValueError: a bad name, base URL, auth mode or format.
        """
        canonical = canonical_provider(name)
        if not _PROVIDER_NAME.match(canonical):
            raise ValueError(
                "provider names are 1-64 characters of a-z, 0-9, '.', '_' and '-', "
                "starting with a letter or digit"
            )
        if base_url is not None:
            base_url = base_url.strip()
            if not valid_base_url(base_url):
                raise ValueError(
                    "the base URL must be an absolute http:// or https:// URL without "
                    "credentials, query or fragment"
                )
        if auth is not None:
            auth = auth.strip().lower()
            if auth not in AUTH_MODES:
                raise ValueError(f"auth must be one of {sorted(AUTH_MODES)}")
        if api_format is not None:
            api_format = api_format.strip().lower()
            if api_format not in API_FORMATS:
                raise ValueError(f"api_format must be one of {sorted(API_FORMATS)}")
        is_new = canonical not in self._specs
        entry = self._ensure_entry(canonical)
        if base_url is not None:
            entry.base_url = base_url
        if auth is not None:
            entry.auth = auth
        elif is_new and entry.auth is None:
            entry.auth = BEARER
        if api_format is not None:
            entry.api_format = api_format
        elif is_new and entry.api_format is None:
            entry.api_format = OPENAI_FORMAT
        self._compose(canonical)
        self._save_now()
        return canonical

    def add_key(self, provider: str, secret: str, label: str | None = None) -> str:
        """
        Add an operator key to C{provider}'s pool; returns its id.

        @raise UnknownProvider: no such provider.
        @raise ValueError: an unusable secret, a key already in the pool, or
            a provider without authentication.
        """
        name = self._known(provider)
        secret = (secret or "").strip()
        if not valid_secret(secret):
            raise ValueError(
                "the key must be non-empty printable ASCII without spaces"
            )
        if self._specs[name].auth == NO_AUTH:
            raise ValueError(
                f"provider {name!r} uses no authentication (auth \"none\"): change its "
                "auth before adding a key"
            )
        pool = self._pools[name]
        key_id = f"runtime:{secrets.token_hex(6)}"
        while any(k.id == key_id for k in pool.keys):
            key_id = f"runtime:{secrets.token_hex(6)}"
        self._ensure_entry(name)
        pool.add(
            KeyRecord(
                id=key_id,
                label=(label or "").strip() or None,
                secret=secret,
                source="runtime",
                state=READY,
                added_at=self._clock.seconds(),
            )
        )
        self.scrubber.add([secret])
        self._save_now()
        return key_id

    def activate_key(self, provider: str, key_id: str) -> None:
        """Make C{key_id} active and ready.  @raise UnknownProvider, UnknownKey."""
        name = self._known(provider)
        self._pools[name].activate(key_id)
        if not key_id.startswith(SEED_PREFIX):
            self._ensure_entry(name)
        self._save_now()

    def disable_key(self, provider: str, key_id: str) -> None:
        """
        Take C{key_id} out of rotation.  An environment key's state is not
        saved: it is back after a restart.  @raise UnknownProvider, UnknownKey.
        """
        name = self._known(provider)
        self._pools[name].disable(key_id)
        self._save_now()

    def delete_key(self, provider: str, key_id: str) -> None:
        """
        Remove C{key_id}.  An environment key comes back on reload or
        restart while its variable is set.  @raise UnknownProvider, UnknownKey.
        """
        name = self._known(provider)
        self._pools[name].delete(key_id)
        self._save_now()

    def snapshot(self) -> list[dict]:
        """Every provider, its configuration state and its keys (masked)."""
        out = []
        for name in sorted(self._specs):
            spec = self._specs[name]
            pool = self._pools[name]
            problem = self._problem(name)
            entry = self._file_entries.get(name)
            if entry is None:
                source = "catalog"
            elif name in CATALOG or entry.source == "seed":
                source = "file"
            else:
                source = "runtime"
            pool_view = pool.snapshot()
            out.append(
                {
                    "name": name,
                    # An invalid URL is not shown: it might hold credentials.
                    "base_url": spec.base_url
                    if spec.base_url and valid_base_url(spec.base_url)
                    else None,
                    "auth": spec.auth,
                    "api_format": spec.api_format,
                    "rate_limit_scope": spec.rate_limit_scope,
                    "organization": mask_secret(spec.organization) or None,
                    "project": mask_secret(spec.project) or None,
                    "source": source,
                    "configured": problem is None,
                    "problem": problem,
                    "keyless": pool.keyless,
                    "active_key_id": pool_view["active_key_id"],
                    "retry_after": pool_view["retry_after"],
                    "keys": pool_view["keys"],
                }
            )
        return out
