"""
A real proxy on loopback sockets for end-to-end tests: the same objects the
daemon builds, listening on ephemeral ports, in front of fake providers.
"""

from __future__ import annotations

import io
import json
import os

import treq
from twisted.internet import defer, reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from cllama_tx.accounting.history import SessionHistory
from cllama_tx.accounting.pricing import Pricing
from cllama_tx.governance.alerts import AlertNotifier, parse_webhooks
from cllama_tx.governance.engine import build_governance
from cllama_tx.governance.resolution import Router
from cllama_tx.identity.contexts import ContextRegistry
from cllama_tx.identity.directory import Directory
from cllama_tx.identity.virtual_keys import VirtualKeyStore
from cllama_tx.pipeline.metering import Metering
from cllama_tx.pipeline.passthrough import Passthrough
from cllama_tx.pipeline.policy_hooks import PolicyHooks
from cllama_tx.pipeline.proxy import Proxy
from cllama_tx.providers.model_table import ModelTableFile
from cllama_tx.providers.probe import UpstreamProber
from cllama_tx.providers.registry import ProviderRegistry
from cllama_tx.runtime.audit import AuditLog
from cllama_tx.runtime.config import LISTEN_BACKLOG
from cllama_tx.runtime.twisted_private import pending_request_line
from cllama_tx.runtime.upstream import UpstreamClient
from cllama_tx.sites.api import ApiApp, build_api_site
from cllama_tx.sites.billing import BillingApi
from cllama_tx.sites.keys import KeyApi
from cllama_tx.sites.management import build_management
from cllama_tx.sites.operations import Operations
from cllama_tx.sites.ui import UiApp
from cllama_tx.store.ledger import SqliteLedger
from cllama_tx.testing import FakeProvider
from tests.secret_scan import SCANNER

AGENT = "tiverton"
SECRET = "9f1c" * 12  # 48 lowercase hex characters, as Clawdapus makes them
PROVIDER_KEY = "sk-upstream-real-key-0001"
UI_TOKEN = "operator-ui-token-3141"
MASTER_KEY = "sk-master-key-for-tests-0123456789"

SCANNER.register(SECRET, PROVIDER_KEY, UI_TOKEN, MASTER_KEY)


# The in-process harnesses' context registries, by root.  The daemon's
# watcher loads a context written while running within a second; here
# write_agent loads it at once, so a test can use it on its next line.
_REGISTRIES: dict[str, list] = {}


def write_agent(root: str, agent_id: str, secret: str, **metadata) -> str:
    directory = os.path.join(root, agent_id)
    os.makedirs(directory, exist_ok=True)
    doc = {"token": f"{agent_id}:{secret}", "pod": "test-pod", "service": agent_id}
    doc.update(metadata)
    with open(os.path.join(directory, "metadata.json"), "w") as f:
        json.dump(doc, f)
    for registry in _REGISTRIES.get(os.path.abspath(root), ()):
        registry.scan()
    return directory


class ProxyHarness:
    """
    A fake OpenAI provider plus a proxy in front of it.  C{audit_lines()}
    parses what the proxy wrote to its audit stream.
    """

    def __init__(self, testcase, env=None, max_body_bytes=1024 * 1024,
                 first_byte_timeout=10.0, idle_timeout=10.0, providers_json=None,
                 history_dir=None, pricing_file=None, no_stream_options=frozenset(),
                 fake_providers=("openai",), governance_dir=None, policy_file=None, unpriced="refuse",
                 default_rpm=None, default_tpm=None, alert_webhooks=None, key_clock=None, tls_policy=None,
                 agent_stall_timeout=None, provider_clock=None, model_table=None, keys=None, policy=None,
                 passthrough=None, lean=True):
        self.testcase = testcase
        # The inference paths on the lean channel and client (the daemon's
        # default), or twisted.web's (CLLAMA_LEAN_HTTP=0).
        self.lean = lean
        # The passthrough's settings (/_proxy/...), or None: not served.
        self.passthrough_settings = passthrough
        # A started virtual key store of the test's own (one of several on a
        # shared database), instead of one on the harness's ledger file.
        self.keys = keys
        # A model table file (CLLAMA_MODEL_TABLE), or None.
        self.model_table_path = model_table
        self.env_extra = env or {}
        self.max_body_bytes = max_body_bytes
        self.first_byte_timeout = first_byte_timeout
        self.idle_timeout = idle_timeout
        self.providers_json = providers_json
        self.history_dir = history_dir
        self.pricing_file = pricing_file
        self.no_stream_options = no_stream_options
        self.fake_providers = fake_providers
        self.governance_dir = governance_dir
        self.policy_file = policy_file
        self.unpriced = unpriced
        self.default_rpm = default_rpm
        self.default_tpm = default_tpm
        self.alert_webhooks = alert_webhooks
        self.key_clock = key_clock
        self.tls_policy = tls_policy
        self.agent_stall_timeout = agent_stall_timeout
        # The key pools' clock (cooldowns, re-probe backoff): a task.Clock
        # lets a test move key health on without waiting.
        self.provider_clock = provider_clock or reactor
        self.audit_stream = _WatchedStream()
        # A PolicyPlane (ADR-025): the proxy consults its evaluator.
        self.policy = policy

    @defer.inlineCallbacks
    def start(self):
        case = self.testcase
        self.fake = FakeProvider(reactor)
        yield self.fake.start()
        case.addCleanup(self.fake.stop)
        base = case.mktemp()
        self.context_root = os.path.join(base, "context")
        self.auth_dir = os.path.join(base, "auth")
        os.makedirs(self.auth_dir)
        write_agent(self.context_root, AGENT, SECRET)
        if self.providers_json is not None:
            with open(os.path.join(self.auth_dir, "providers.json"), "w") as f:
                json.dump(self.providers_json, f)
        env = {}
        for name in self.fake_providers:
            env[f"{name.upper()}_API_KEY"] = PROVIDER_KEY
            env[f"{name.upper()}_BASE_URL"] = self.fake.base_url
        env.update(self.env_extra)
        self.audit = AuditLog(self.audit_stream, reactor)
        self.contexts = ContextRegistry(self.context_root, reactor)
        watched = _REGISTRIES.setdefault(os.path.abspath(self.context_root), [])
        watched.append(self.contexts)
        case.addCleanup(watched.remove, self.contexts)
        self.providers = ProviderRegistry(
            env, self.auth_dir, self.provider_clock,
            on_pool_event=lambda event: self.audit.emit(
                "provider_pool", None, event.get("model"), **{k: v for k, v in event.items() if k != "model"}
            ),
        )
        self.upstream = UpstreamClient(reactor, connect_timeout=5.0, tls_policy=self.tls_policy, lean=self.lean)
        self.providers.attach_prober(UpstreamProber(self.upstream, reactor))
        case.addCleanup(self.providers.stop_probes)
        case.addCleanup(self.upstream.close)
        self.ledger = SqliteLedger(os.path.join(base, "state", "ledger.sqlite3"), reactor)
        os.makedirs(os.path.join(base, "state"), mode=0o700)
        self.ledger.startService()
        case.addCleanup(self.ledger.stopService)
        self._commits = []
        record = self.ledger.record

        def tracked_record(row):
            d = record(row)
            self._commits.append(d)
            return d

        self.ledger.record = tracked_record
        self.history = None
        if self.history_dir is not None:
            self.history = SessionHistory(self.history_dir, reactor)
            self.history.startService()
            case.addCleanup(self.history.stopService)
        self.pricing = Pricing(reactor, override_path=self.pricing_file)
        self.metering = Metering(
            clock=reactor, pricing=self.pricing, ledger=self.ledger, audit=self.audit, history=self.history
        )
        self.alerts = None
        if self.alert_webhooks:
            alert_pool = HTTPConnectionPool(reactor, persistent=False)
            case.addCleanup(alert_pool.closeCachedConnections)
            self.alerts = AlertNotifier(
                reactor, treq.client.HTTPClient(Agent(reactor, pool=alert_pool)),
                parse_webhooks(self.alert_webhooks), pod="test-pod",
            )
            self.alerts.startService()
            case.addCleanup(self.alerts.stopService)
        if self.keys is None:
            self.keys = VirtualKeyStore(self.ledger.path, self.key_clock or reactor, reactor)
            self.keys.startService()
            case.addCleanup(self.keys.stopService)
        # LiteLLM's users, teams, organisations, customers, added models.
        self.directory = Directory(self.keys.database, self.key_clock or reactor, reactor=reactor)
        self.directory.startService()
        case.addCleanup(self.directory.stopService)
        yield self.directory.when_loaded()
        self.model_table = ModelTableFile(
            self.model_table_path, env, reactor, registry=self.providers, pricing=self.pricing
        )
        self.router = Router(
            providers=self.providers, table=self.model_table, team_aliases=self.keys.team_aliases, pricing=self.pricing
        )
        self.governance = build_governance(
            router=self.router,
            clock=reactor,
            pricing=self.pricing,
            metering=self.metering,
            governance_dir=self.governance_dir,
            policy_file=self.policy_file,
            unpriced=self.unpriced,
            default_rpm=self.default_rpm,
            default_tpm=self.default_tpm,
            alerts=self.alerts,
            ledger=self.ledger,
            directory=self.directory,
        )
        self.proxy = Proxy(
            clock=reactor,
            contexts=self.contexts,
            providers=self.providers,
            upstream=self.upstream,
            metering=self.metering,
            governance=self.governance,
            keys=self.keys,
            first_byte_timeout=self.first_byte_timeout,
            idle_timeout=self.idle_timeout,
            agent_stall_timeout=self.agent_stall_timeout,
            no_stream_options=self.no_stream_options,
            policy=None if self.policy is None else PolicyHooks(
                self.policy, clock=reactor, metering=self.metering, audit=self.audit
            ),
        )
        self.keys_api = KeyApi(
            self.keys, MASTER_KEY, ledger=self.ledger, clock=reactor, governance=self.governance, audit=self.audit,
        )
        self.keys_api.health.providers = self.providers
        self.proxy.accept_master_key(self.keys_api)
        self.billing = BillingApi(keys_api=self.keys_api, ledger=self.ledger, governance=self.governance,
                                  audit=self.audit, directory=self.directory)
        self.management = build_management(
            self.keys_api, self.billing, directory=self.directory, model_table=self.model_table,
            pricing=self.pricing, clock=reactor, audit=self.audit,
        )
        self.passthrough = None
        if self.passthrough_settings is not None:
            self.passthrough = Passthrough(
                clock=reactor, proxy=self.proxy, providers=self.providers, upstream=self.upstream,
                metering=self.metering, governance=self.governance, pricing=self.pricing,
                settings=self.passthrough_settings, max_json_bytes=self.max_body_bytes,
                first_byte_timeout=self.first_byte_timeout, idle_timeout=self.idle_timeout,
                agent_stall_timeout=self.agent_stall_timeout,
            )
        site = build_api_site(
            self.proxy,
            self.max_body_bytes,
            self.audit,
            ApiApp(
                contexts=self.contexts,
                history=self.history,
                ui_token=UI_TOKEN,
                providers=self.providers,
                pricing=self.pricing,
                keys_api=self.keys_api,
                billing=self.billing,
                management=self.management,
            ),
            request_line=pending_request_line,
            lean=self.lean,
            passthrough=self.passthrough,
        )
        self.operations = Operations(
            clock=reactor, audit=self.audit, ledger=self.ledger, governance=self.governance,
            pricing=self.pricing, providers=self.providers, contexts=self.contexts,
            model_table=self.model_table,
        )
        self.ui = UiApp(
            token=UI_TOKEN, pod="test-pod", contexts=self.contexts, providers=self.providers,
            ledger=self.ledger, clock=reactor, operations=self.operations, model_table=self.model_table,
        )
        ui_site = Site(self.ui.app.resource())
        self.ui_port = reactor.listenTCP(0, ui_site, interface="127.0.0.1", backlog=LISTEN_BACKLOG)
        case.addCleanup(self.ui_port.stopListening)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1", backlog=LISTEN_BACKLOG)
        case.addCleanup(self.port.stopListening)
        self.base_url = f"http://127.0.0.1:{self.port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        case.addCleanup(self.pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=self.pool))
        self.ui_client = _UiClient(self.http, f"http://127.0.0.1:{self.ui_port.getHost().port}")
        return self

    def post(self, path, doc=None, token=f"{AGENT}:{SECRET}", headers=None, data=None):
        all_headers = {"Content-Type": ["application/json"]}
        if token is not None:
            all_headers["Authorization"] = [f"Bearer {token}"]
        all_headers.update(headers or {})
        body = data if data is not None else json.dumps(doc).encode()
        return self.http.post(self.base_url + path, data=body, headers=all_headers)

    def chat(self, doc, **kwargs):
        return self.post("/v1/chat/completions", doc, **kwargs)

    def audit_lines(self):
        self.audit.flush()
        return [json.loads(line) for line in self.audit_stream.getvalue().splitlines()]

    def wait_for_audit(self, predicate):
        """A Deferred that fires with the first audit line matching C{predicate}."""
        for line in self.audit_lines():
            if predicate(line):
                return defer.succeed(line)
        d = defer.Deferred()
        self.audit_stream.watchers.append((predicate, d))
        return d

    def committed(self):
        """Fires once every ledger row recorded so far is committed."""
        return defer.DeferredList(list(self._commits), consumeErrors=True)

    def ledger_rows(self):
        """Every committed ledger row, oldest first (a Deferred)."""
        return self.ledger.recent(1000).addCallback(lambda rows: list(reversed(rows)))

    def audit_text(self):
        self.audit.flush()
        return self.audit_stream.getvalue()


class _UiClient:
    """treq against the UI site, with test URLs written as http://ui/..."""

    def __init__(self, http, base):
        self._http = http
        self._base = base

    def __getattr__(self, method):
        call = getattr(self._http, method)
        return lambda url, **kwargs: call(url.replace("http://ui", self._base, 1), **kwargs)


class _WatchedStream(io.StringIO):
    """The audit stream of a test: fires watchers as matching lines arrive."""

    def __init__(self):
        super().__init__()
        self.watchers = []

    def write(self, text):
        result = super().write(text)
        for line in text.splitlines():
            SCANNER.scan("audit", line)
            doc = json.loads(line)
            for watcher in list(self.watchers):
                predicate, d = watcher
                if predicate(doc):
                    self.watchers.remove(watcher)
                    d.callback(doc)
        return result


def chat_body(model="openai/gpt-4o-mini", stream=False, **extra):
    doc = {"model": model, "messages": [{"role": "user", "content": "Say hello"}]}
    if stream:
        doc["stream"] = True
    doc.update(extra)
    return doc
