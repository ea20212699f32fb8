"""
The service tree of one daemon, built from a L{Config}.

Order matters: L{MultiService} starts children in order and stops them in
reverse, but stops them concurrently.  So the shared services are children
of a L{DrainService} (first in the tree), the listeners come last: on
shutdown the listeners stop accepting, the DrainService waits for the
in-flight requests (at most the drain grace), and only then stops its
children: the upstream pool, the ledger, the audit flush.
"""

from __future__ import annotations

import gc
import os
import signal
import tempfile
from collections.abc import Callable
from types import FrameType
from typing import Any, TextIO

from twisted.application import service
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cllama_tx.accounting.history import SessionHistory
from cllama_tx.accounting.openrouter_prices import PublishedPrices
from cllama_tx.accounting.pricing import Pricing
from cllama_tx.governance.engine import build_governance
from cllama_tx.governance.resolution import Router
from cllama_tx.identity.contexts import ContextRegistry
from cllama_tx.identity.directory import Directory
from cllama_tx.identity.operator import OperatorGuard
from cllama_tx.identity.operator_sessions import SessionRows
from cllama_tx.identity.throttle import FailureThrottle
from cllama_tx.identity.virtual_keys import VirtualKeyStore
from cllama_tx.interfaces import IProviderRegistry
from cllama_tx.pipeline.metering import Metering
from cllama_tx.pipeline.passthrough import Passthrough
from cllama_tx.pipeline.proxy import Proxy
from cllama_tx.providers.catalog import ProviderSpec
from cllama_tx.providers.keys import KeyPool
from cllama_tx.providers.model_table import ModelTableError, ModelTableFile
from cllama_tx.providers.probe import UpstreamProber
from cllama_tx.providers.registry import ProviderRegistry, ResolvedProvider, UnknownProvider
from cllama_tx.runtime import gate, twisted_private
from cllama_tx.runtime.audit import AuditLog, open_audit_output
from cllama_tx.runtime.bounded_output import BoundedOutput
from cllama_tx.runtime.config import Config, with_backlog
from cllama_tx.runtime.connection_metrics import register as register_connection_metrics
from cllama_tx.runtime.descriptors import fit_descriptors
from cllama_tx.runtime.drain import DrainService, InFlight
from cllama_tx.runtime.errors import ConfigError
from cllama_tx.runtime.fleet import Fleet
from cllama_tx.runtime.local_servers import build_discovery, own_ports
from cllama_tx.runtime.metrics import Metrics
from cllama_tx.runtime.policy import build_policy
from cllama_tx.runtime.resolver import install as install_resolver
from cllama_tx.runtime.routing import build_routing
from cllama_tx.runtime.tls import upstream_tls_policy
from cllama_tx.runtime.upstream import UpstreamClient
from cllama_tx.runtime.worker import adopt_listener
from cllama_tx.sites.api import build_api_site
from cllama_tx.sites.billing import BillingApi
from cllama_tx.sites.guard import ConnectionGuard, GuardLimits
from cllama_tx.sites.keys import KeyApi
from cllama_tx.sites.lazy import LazySite
from cllama_tx.sites.management import build_management
from cllama_tx.sites.operations import Operations
from cllama_tx.sites.ui import TokenFileError, ensure_ui_token
from cllama_tx.sites.ui.preflight import preflight as preflight_ui
from cllama_tx.store.backends import DatabaseConfigError, open_ledger
from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.store.ledger import SqliteLedger
from cllama_tx.store.ledger_sql import LedgerClosed
from cllama_tx.store.pg_ledger import PostgresLedger
from cllama_tx.store.postgres import PostgresDatabase
from cllama_tx.store.shared import new_instance_id
from cllama_tx.store.sqlite_database import SqliteDatabase

log = Logger()


class UpstreamService(service.Service):
    """Owns the upstream connection pool; closes it after the listeners."""

    def __init__(self, upstream: UpstreamClient) -> None:
        self.upstream = upstream

    def stopService(self):
        super().stopService()
        return self.upstream.close()


AUDIT_FLUSH_GRACE = 1.0
"""Seconds shutdown waits for a stdout reader that is behind; then the rest is lost."""


class AuditFlushService(service.Service):
    """
    Flushes buffered audit lines last thing on shutdown, waiting at most
    L{AUDIT_FLUSH_GRACE} for a stdout reader that is behind: a stalled
    reader must not hold the stop past the supervisor's timeout.
    """

    def __init__(self, audit: AuditLog, output=None) -> None:
        self.audit = audit
        self.output = output

    def stopService(self):
        super().stopService()
        self.audit.flush()
        if self.output is None:
            return None

        def report(left: int) -> None:
            if left:
                log.warn("{lines} audit lines were not written: stdout was not read before shutdown", lines=left)

        return self.output.drain(AUDIT_FLUSH_GRACE).addCallback(report)


@implementer(IProviderRegistry)
class DemoProviders:
    """
    Demo mode's only provider: the offline C{demo} model, whose base URL is
    known once the demo server listens.  No real provider is reachable in
    demo mode, so the public demo credential can never spend money.
    """

    def __init__(self, demo, clock) -> None:
        self._demo = demo
        self._pool = KeyPool("demo", [], clock, keyless=True)

    def resolve(self, name):
        if name != "demo":
            raise UnknownProvider(name)
        return ResolvedProvider(ProviderSpec("demo", self._demo.base_url, "none", "openai"), self._pool)

    def names(self):
        return ["demo"]

    def snapshot(self):
        return []


class Listener(service.Service):
    """
    Listens on one endpoint string.  The port is bound in
    privilegedStartService and a failure (a busy port) raises there, so
    twistd stops at start-up with the error instead of running deaf.

    In a worker (C{--workers N}) C{inherited} is the descriptor of the socket
    the supervisor bound: it is adopted, never bound again; C{shared}: the
    other workers accept from it too (else it is this worker's own).
    """

    def __init__(
        self, reactor, description: str, factory, label: str, inherited: int | None = None, shared: bool = True
    ) -> None:
        self._reactor = reactor
        self.description = description
        self.factory = factory
        self.label = label
        self.inherited = inherited
        self.shared = shared
        self.port: IListeningPort | None = None

    def privilegedStartService(self):
        super().privilegedStartService()
        if self.inherited is not None:
            self.port = adopt_listener(self._reactor, self.inherited, self.description, self.factory, self.shared)
            log.info("{label} serving the supervisor's socket {address}", label=self.label, address=_address(self.port))
            return
        outcome: list[Any] = []
        endpoint = endpoints.serverFromString(self._reactor, with_backlog(self.description))
        endpoint.listen(self.factory).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError(f"{self.label}: endpoint {self.description!r} did not listen at once")
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0]
        log.info("{label} listening on {address}", label=self.label, address=_address(self.port))

    def startService(self):
        if self.port is None:
            self.privilegedStartService()
        super().startService()

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return defer.maybeDeferred(port.stopListening)


def _address(port) -> str:
    host = port.getHost()
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    return str(getattr(host, "name", host))


def build_alerts(reactor, config: Config):
    """The budget alert notifier, with an HTTP client of its own."""
    import treq
    from twisted.web.client import Agent, HTTPConnectionPool

    from cllama_tx.governance.alerts import AlertNotifier, WebhookError, parse_webhooks

    try:
        webhooks = parse_webhooks(config.alert_webhooks)
    except WebhookError as e:
        raise ConfigError(str(e)) from None
    pool = HTTPConnectionPool(reactor, persistent=True)
    client = treq.client.HTTPClient(Agent(reactor, pool=pool, connectTimeout=10))
    return AlertNotifier(reactor, client, webhooks, pod=config.pod)


class GovernanceSeed(service.Service):
    """
    Budgets resume where they were: committed spend of the last weeks and
    the operator's runtime budget changes, read from the ledger at start
    (C{seed_data}).  The read never blocks the reactor: on PostgreSQL it
    waits for the ledger to load and is retried while the database is
    unavailable; until the book is seeded the ledger refuses metered
    requests and readiness is false (C{hold_admission}).  One SQLite
    process reads at once, before anything is served, as it always did.
    """

    LOOKBACK = 35 * 86400  # longer than any calendar period (a month)
    RETRY = 1.0  # seconds between two tries while the database is unavailable

    def __init__(self, ledger, governance, clock, fleet=None) -> None:
        self.ledger = ledger
        self.governance = governance
        self.clock = clock
        # Several instances: announced (and the ledger's cursor read) before the seed.
        self.fleet = fleet
        self._release: Callable[[], None] | None = None
        self._retry: Any = None
        self.seeded = False
        self.done: defer.Deferred = defer.Deferred()  # fires once the book is seeded

    def startService(self):
        super().startService()
        self._release = self.ledger.hold_admission("budgets are being loaded from the ledger; try again shortly")
        self._seed()

    def stopService(self):
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _seed(self) -> None:
        self._retry = None
        d = self.ledger.loaded()
        if self.fleet is not None:
            d.addCallback(lambda _: self.fleet.register())
        d.addCallback(lambda _: self.ledger.seed_data(self._since()))
        d.addCallbacks(self._apply, self._failed)

    # The agent contexts, when the daemon has them: their metadata may set a lifetime budget.
    contexts: Any = None

    def _since(self) -> float:
        """
        Where the agents' spend is read from: the last L{LOOKBACK} seconds,
        or all of it when a budget counts everything ever spent (a lifetime
        period: the OR gate's C{period: none}).
        """
        raw = [entry.get("budget") for entry in self.ledger.budget_overrides().values()]
        if self.contexts is not None:
            raw.extend(getattr(self.contexts.get(agent), "budget", None) for agent in self.contexts.agent_ids())
        if self.governance.has_lifetime_budgets(raw):
            return 0.0
        return self.clock.seconds() - self.LOOKBACK

    def _apply(self, data) -> None:
        if not self.running:
            return
        for agent, entry in data.overrides.items():
            self.governance.set_runtime(agent, entry)
        self.governance.seed(data.timeline)
        # Virtual key and team budgets may last a key's life: all their rows.
        for entries, prefix in ((data.keys, "key:"), (data.teams, "team:")):
            self.governance.seed(
                (prefix + value, ts, cost, counted, unpriced) for value, ts, cost, counted, unpriced in entries
            )
        # The levels above a key (users, organisations, customers, members), named already.
        self.governance.seed(data.levels)
        self.seeded = True
        if self._release is not None:
            self._release()
            self._release = None
        self.done.callback(None)

    def _failed(self, failure: Failure) -> None:
        if not self.running or failure.check(LedgerClosed):
            return
        if failure.check(DatabaseUnavailable):
            self._retry = self.clock.callLater(self.RETRY, self._seed)  # the ledger says why in the log
            return
        log.failure("budgets could not be seeded from the ledger; metered requests stay refused", failure)


class ReloadOnHangup(service.Service):
    """SIGHUP re-reads configuration, like POST /api/reload."""

    def __init__(self, reactor, operations) -> None:
        self.reactor = reactor
        self.operations = operations
        self._installed = False
        self._previous: Callable[[int, FrameType | None], Any] | int | None = None

    def privilegedStartService(self):
        # Before the listeners bind: a SIGHUP that arrives once they are up
        # must never meet the default action (which ends the process).
        super().privilegedStartService()
        self._install()

    def startService(self):
        super().startService()
        self._install()

    def _install(self) -> None:
        if self._installed:
            return

        def hangup(signum, frame):
            # A signal is for this host (a supervisor sends it to each of its
            # workers): not announced to the fleet, unlike a reload asked
            # through the operator API.
            self.reactor.callFromThread(self.operations.reload, "SIGHUP", False)

        try:
            self._previous = signal.signal(signal.SIGHUP, hangup)
            self._installed = True
        except ValueError:  # not the main thread
            pass

    def stopService(self):
        super().stopService()
        if self._installed:
            signal.signal(signal.SIGHUP, self._previous or signal.SIG_DFL)
            self._installed = False


class BannerService(service.Service):
    """Prints how to talk to the demo once the API listens."""

    def __init__(self, api: Listener, make_text) -> None:
        self.api = api
        self.make_text = make_text

    def startService(self):
        super().startService()
        port = self.api.port
        if port is None:  # the API did not listen: twistd is stopping
            return
        host = port.getHost()
        address = f"127.0.0.1:{host.port}" if hasattr(host, "port") else str(host)
        log.info("{banner}", banner=self.make_text(f"http://{address}"))


def ensure_private_dir(path: str) -> None:
    """Create C{path} (0700) if missing; the ledger holds billing data."""
    os.makedirs(path, mode=0o700, exist_ok=True)


GC_THRESHOLDS = (50_000, 20, 100)
"""
Python's defaults (700, 10, 10) run a young collection every 700 net
allocations, and with a thousand streams open each one walks tens of
thousands of live objects (in A/B runs these thresholds took the first
event of 1,000 streams from 760 to about 300 ms, and 32 clients from about
1,650 to 2,150 requests/s).  The request path makes little cyclic
garbage, so collecting less often costs a few MiB at most.
"""


def tune_gc(reactor) -> None:
    """Fewer collections, and none over what start-up built (frozen once running)."""
    gc.set_threshold(*GC_THRESHOLDS)
    reactor.callWhenRunning(gc.freeze)


def build_guards(config: Config, reactor) -> tuple[ConnectionGuard, ConnectionGuard]:
    """
    The API's and the UI's connection guards, with caps that fit in the
    process's descriptors (the soft limit is raised for them if it can be).
    """
    fit = fit_descriptors(config.max_connections, config.ui_max_connections)

    def limits(cap: int) -> GuardLimits:
        return GuardLimits(
            max_connections=cap,
            header_timeout=config.header_timeout,
            body_timeout=config.body_timeout,
            keepalive_timeout=config.keepalive_timeout,
        )

    return (
        ConnectionGuard(reactor, limits(fit.api_cap), "API"),
        ConnectionGuard(reactor, limits(fit.ui_cap), "UI"),
    )


class Daemon(service.MultiService):
    """The service tree of one daemon, with handles on its parts for tests and tooling."""

    audit: AuditLog
    audit_output: BoundedOutput | None
    proxy: Proxy
    providers: ProviderRegistry | DemoProviders
    contexts: ContextRegistry
    ledger: SqliteLedger | PostgresLedger
    inflight: InFlight
    metrics: Metrics
    discovery: Any  # cllama_tx.discovery.service.Discovery when discovery is on, else None


def build_passthrough(
    config: Config, reactor, proxy, providers, upstream, metering, governance, pricing, inflight
) -> Passthrough | None:
    """The passthrough (C{/_proxy/<provider>/<path>}), unless C{CLLAMA_PASSTHROUGH} turned it off."""
    if config.passthrough is None:
        return None
    return Passthrough(
        clock=reactor, proxy=proxy, providers=providers, upstream=upstream, metering=metering,
        governance=governance, pricing=pricing, settings=config.passthrough, max_json_bytes=config.max_body_bytes,
        first_byte_timeout=config.first_byte_timeout, idle_timeout=config.idle_timeout,
        agent_stall_timeout=config.agent_stall_timeout, inflight=inflight,
    )


def _api_app(**parts):
    """The API's Klein app (Klein, werkzeug, its routes imported now: on its first request)."""
    from cllama_tx.sites.api_app import ApiApp

    return ApiApp(**parts)


def build_daemon(config: Config, reactor, audit_stream: TextIO) -> Daemon:
    # Say so at start-up when this Twisted lacks a private name we use (each has a fallback).
    twisted_private.report(log)
    tune_gc(reactor)
    top = Daemon()
    inflight = InFlight()
    # Parent of every shared service; stopped only once the drain is over.
    shared = DrainService(reactor, inflight, config.drain_grace)
    shared.setServiceParent(top)
    # stdout without ever blocking the reactor (None for an in-memory stream).
    audit_output = open_audit_output(audit_stream, reactor, config.audit_buffer_bytes)
    audit = AuditLog(
        audit_output or audit_stream, reactor, schedule=lambda flush: reactor.callLater(0, flush)
    )
    AuditFlushService(audit, audit_output).setServiceParent(shared)

    def pool_event(event: dict) -> None:
        # A per-model cooldown names its model in the line's own model field.
        event = dict(event)
        audit.emit("provider_pool", None, event.pop("model", None), **event)

    context_root = config.context_root
    banner = None
    providers: ProviderRegistry | DemoProviders
    if config.demo:
        from cllama_tx.demo.model import DemoService, write_demo_context
        from cllama_tx.demo.model import banner as demo_banner

        context_root = tempfile.mkdtemp(prefix="cllama-demo-")
        write_demo_context(context_root)
        demo = DemoService(reactor)
        demo.setServiceParent(shared)
        providers = DemoProviders(demo, reactor)
        banner = demo_banner
    else:
        # The OR gate's policy.yaml may say where OpenRouter is (runtime/gate.py).
        providers = ProviderRegistry(
            gate.provider_env(config.env, config.policy_file), config.auth_dir, reactor, on_pool_event=pool_event
        )
        # A service: it saves pending key state when stopped, after the listeners.
        providers.setServiceParent(shared)

    state_dir = tempfile.mkdtemp(prefix="cllama-demo-state-") if config.demo else config.state_dir
    ensure_private_dir(state_dir)
    ui_token = config.ui_token
    if config.ui_no_auth:
        ui_token = None  # UiApp logs it loudly and says so on every page
    elif ui_token is None:
        try:
            ui_token, token_path = ensure_ui_token(state_dir)
        except (OSError, TokenFileError) as e:
            raise ConfigError(f"cannot keep the operator UI token in {state_dir}: {e}") from None
        log.info(
            "Operator UI token (no CLLAMA_UI_TOKEN set): sign in with the contents of {path} (mode 0600)",
            path=token_path,
        )
    # PostgreSQL when CLLAMA_DATABASE_URL (or DATABASE_URL) names one, else
    # the state file (shared by the workers of one host); the demo keeps its own.
    try:
        # This process's name in a shared store (rows, reservations, changes).
        instance = new_instance_id()
        backend = open_ledger(
            {} if config.demo else config.env,
            reactor,
            state_dir=state_dir,
            sync=config.ledger_sync,
            retention_seconds=config.ledger_retention,
            backlog=config.ledger_backlog,
            spill_dir=config.ledger_spill_dir,
            instance=instance,
        )
    except DatabaseConfigError as e:
        raise ConfigError(str(e)) from None
    ledger = backend.ledger
    # Before the listeners: it is stopped after them, so in-flight rows land.
    ledger.setServiceParent(shared)
    # Virtual keys (and, for several instances, the operator UI's sessions)
    # in the shared store: PostgreSQL's pool, or the state file that the
    # workers of one host share.
    shared_store = backend.url.shared or backend.workers > 1
    state_database: PostgresDatabase | SqliteDatabase
    if backend.database is not None:
        state_database = backend.database
    else:
        state_database = SqliteDatabase(backend.state_file, reactor)
        state_database.setServiceParent(shared)  # stopped after the key store
    fleet = None
    if shared_store:
        # Budgets, rate limits and operator changes decided across instances.
        fleet = Fleet(state_database, reactor, instance)
        fleet.setServiceParent(shared)
    # Loaded once the ledger is (PostgreSQL's schema is migrated then).
    keys = VirtualKeyStore(
        state_database, reactor, reactor, shared=shared_store, instance=instance, after=ledger.loaded
    )
    keys.setServiceParent(shared)
    # LiteLLM's users, teams, organisations, customers and added models.
    directory = Directory(state_database, reactor, instance=instance, after=ledger.loaded)
    directory.setServiceParent(shared)
    session_rows = SessionRows(state_database, keys.instance) if keys.shared else None
    history = None
    if config.session_history_dir:
        history = SessionHistory(config.session_history_dir, reactor)
        history.setServiceParent(shared)
    pricing = Pricing(reactor, override_path=config.pricing_file)
    gate_settings = config.gate or gate.GateSettings()
    # OpenRouter's published prices, refreshed by `cllama-tx openrouter-prices`.
    PublishedPrices(pricing, gate.prices_path(gate_settings, state_dir), reactor).setServiceParent(shared)
    metering = Metering(clock=reactor, pricing=pricing, ledger=ledger, audit=audit, history=history)
    metrics = Metrics(ledger=ledger)
    if audit_output is not None:
        metrics.watch_audit_output(audit_output)
    metering.on_settled.append(metrics.observe_settled)
    alerts = None
    if config.alert_webhooks:
        alerts = build_alerts(reactor, config)
        alerts.setServiceParent(shared)
    try:
        model_table = ModelTableFile(
            config.model_table, config.env, reactor,
            registry=providers if isinstance(providers, ProviderRegistry) else None, pricing=pricing,
        )
    except ModelTableError as e:
        raise ConfigError(f"CLLAMA_MODEL_TABLE: {e}") from None
    router = Router(providers=providers, table=model_table, team_aliases=keys.team_aliases, pricing=pricing)
    # Local model servers as keyless providers (off unless CLLAMA_DISCOVERY is on).
    listeners: list[Listener] = []
    discovery = None
    if isinstance(providers, ProviderRegistry):
        discovery = build_discovery(config, reactor, providers, lambda: own_ports(config, listeners))
    if discovery is not None:
        discovery.setServiceParent(shared)
    governance = build_governance(
        router=router,
        clock=reactor,
        pricing=pricing,
        metering=metering,
        governance_dir=config.governance_dir,
        policy_file=config.policy_file,
        unpriced=config.unpriced_budget,
        default_rpm=config.default_rpm,
        default_tpm=config.default_tpm,
        min_output_tokens=config.budget_min_output_tokens,
        budget_fail_mode=config.budget_fail_mode,
        openrouter_ceiling=gate_settings.openrouter_ceiling,
        runtime_overrides=None,
        alerts=alerts,
        ledger=ledger,
        coordinator=fleet.coordinator if fleet is not None else None,
        directory=directory,
    )

    contexts = ContextRegistry(context_root, reactor)  # every context loaded here
    contexts.watcher().setServiceParent(shared)
    # Upstream hosts resolved once in a while, not in a thread per connection.
    install_resolver(reactor)
    if config.lean_dispatch:
        # Each socket event's handler called without Twisted's log context (a tenth of a stream event's cost).
        twisted_private.lean_dispatch(reactor, log)
    upstream = UpstreamClient(
        reactor, config.connect_timeout, tls_policy=upstream_tls_policy(config.upstream_ca_file),
        lean=config.lean_http, direct=config.write_through,
        # Every agent connection may hold one upstream connection: as many stay
        # open for the next requests (1,000 streams reopened theirs otherwise).
        max_per_host=config.max_connections,
    )
    UpstreamService(upstream).setServiceParent(shared)
    if isinstance(providers, ProviderRegistry):
        # Suspect keys are re-checked, dead ones re-probed, through the same client.
        providers.attach_prober(UpstreamProber(upstream, reactor))
    proxy = Proxy(
        clock=reactor,
        contexts=contexts,
        providers=providers,
        upstream=upstream,
        metering=metering,
        governance=governance,
        first_byte_timeout=config.first_byte_timeout,
        idle_timeout=config.idle_timeout,
        agent_stall_timeout=config.agent_stall_timeout,
        no_stream_options=config.no_stream_options,
        keys=keys,
        metrics=metrics,
        inflight=inflight,
        conversations=fleet.conversations() if fleet is not None else None,
        # The policy sidecar or plugin (ADR-025), if the operator set one.
        policy=build_policy(config, reactor, shared, metering=metering, audit=audit),
    )
    # Model mappings, the resolution trace, the LLM resolver (off unless CLLAMA_RESOLVER_MODEL).
    routing = build_routing(
        env={} if config.demo else config.env, clock=reactor, database=state_database, ledger=ledger,
        instance=instance, router=router, providers=providers, upstream=upstream, metering=metering,
        parent=shared, fleet=fleet, discovery=discovery,
    )
    # One throttle of wrong operator credentials (UI token, master key) for
    # every place that compares one: guessing on one slows all of them.
    operator_guard = OperatorGuard(FailureThrottle(reactor), audit=audit)
    keys_api = KeyApi(
        keys,
        config.master_key,
        ledger=ledger,
        clock=reactor,
        guard=operator_guard,
        governance=governance,
        audit=audit,
    )
    keys_api.health.providers = providers
    proxy.accept_master_key(keys_api)
    billing = BillingApi(keys_api=keys_api, ledger=ledger, governance=governance, audit=audit, directory=directory)
    management = build_management(
        keys_api, billing, directory=directory, model_table=model_table, pricing=pricing, clock=reactor, audit=audit,
    )
    api_site = build_api_site(
        proxy,
        config.max_body_bytes,
        audit,
        request_line=twisted_private.pending_request_line,
        lean=config.lean_http,
        direct=config.write_through,
        passthrough=build_passthrough(config, reactor, proxy, providers, upstream, metering, governance, pricing, inflight),
        # Every path but the inference ones: a Klein app built on its first request.
        make_app=lambda: _api_app(
            contexts=contexts, history=history, ui_token=ui_token, providers=providers, pricing=pricing,
            keys_api=keys_api, billing=billing, guard=operator_guard, management=management,
        ),
        health_keys=keys_api,
    )
    operations = Operations(
        clock=reactor,
        audit=audit,
        ledger=ledger,
        governance=governance,
        pricing=pricing,
        providers=providers,
        contexts=contexts,
        model_table=model_table,
        changes=fleet.changes if fleet is not None else None,
    )
    seed = GovernanceSeed(ledger, governance, reactor, fleet=fleet)
    seed.contexts = contexts
    seed.setServiceParent(shared)
    if fleet is not None:
        fleet.follow_overrides(ledger, governance)
        fleet.follow_keys(keys)
        fleet.follow_directory(directory)
        fleet.follow_reloads(operations)
        if isinstance(providers, ProviderRegistry):
            fleet.share_providers(providers)
    ReloadOnHangup(reactor, operations).setServiceParent(shared)
    # Built on the UI port's first connection (most daemons never see one);
    # what building it would refuse or shout is done now.
    preflight_ui(auth_disabled=config.ui_no_auth)

    def build_ui():
        from cllama_tx.sites.ui.app import UiApp, build_ui_site

        site = build_ui_site(UiApp(
            announced=True,
            token=ui_token,
            auth_disabled=config.ui_no_auth,
            allowed_hosts=config.ui_allowed_hosts,
            guard=operator_guard,
            pod=config.pod,
            contexts=contexts,
            providers=providers,
            ledger=ledger,
            clock=reactor,
            operations=operations,
            governance=governance,
            pricing=pricing,
            audit=audit,
            keys=keys,
            metrics=metrics,
            model_table=model_table,
            session_rows=session_rows,
            directory=directory,
            budgets=keys_api.budgets,
            discovery=discovery,
            routing=routing,
        ))
        site.set_guard(ui_guard)
        return site

    ui_site = LazySite(build_ui, "UI")
    if fleet is not None:
        # A session signed out on another instance is dropped here at once
        # (a UI not built yet reads its sessions from the store when it is).
        def session_changed(*args) -> None:
            if ui_site.built is not None:
                ui_site.built.ui.sessions.reload(*args)

        fleet.changes.subscribe("ui_session", session_changed)
    gate.wire(
        gate_settings, governance=governance, contexts=contexts, operations=operations, ledger=ledger,
        providers=providers, proxy=proxy, api_site=api_site, clock=reactor,
    )
    api_guard, ui_guard = build_guards(config, reactor)
    api_site.set_guard(api_guard)
    register_connection_metrics(metrics.registry, {"API": api_guard, "UI": ui_guard})
    role = config.worker  # a worker adopts the sockets its supervisor bound
    api_listener = Listener(
        reactor, config.api_endpoint, api_site, "API", role.api_fd if role else None,
        shared=not (role is not None and role.own_api),
    )
    api_listener.setServiceParent(top)
    ui_listener = Listener(reactor, config.ui_endpoint, ui_site, "UI", role.ui_fd if role else None)
    ui_listener.setServiceParent(top)
    listeners.extend((api_listener, ui_listener))
    if banner is not None:
        BannerService(api_listener, banner).setServiceParent(top)
    # Handles for tests and tooling; not used by the services themselves.
    top.audit = audit
    top.audit_output = audit_output
    top.proxy = proxy
    top.providers = providers
    top.contexts = contexts
    top.ledger = ledger
    top.inflight = inflight
    top.metrics = metrics
    top.discovery = discovery
    return top
