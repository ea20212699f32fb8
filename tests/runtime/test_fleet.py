"""
Several real daemons on one store: three `twistd -n cllama` processes on one
real PostgreSQL (L{cllama_tx.testing.postgres}), and one daemon with
`--workers 2` on its SQLite file.  Budgets hold across them, keys minted on
one work on the others and revocations reach them all, `kill -9` of one loses
no completed request, and a database that goes away and comes back is a
state, not a hang.
"""

from __future__ import annotations

import json
import os
import re
import signal

import psycopg
import treq
from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.testing import FakeProvider, Reply, openai_completion
from cllama_tx.testing.postgres import PostgresCluster, shared_cluster
from tests.runtime.test_daemon import spawn_daemon
from tests.support import AGENT, PROVIDER_KEY, SECRET, chat_body, write_agent

MASTER = "sk-fleet-master-key-0123456789abcdef"
WORKER_READY = re.compile(rb"worker (\d+) \(pid (\d+)\) ready")
AUTH = {"Authorization": f"Bearer {AGENT}:{SECRET}"}


def _http(testcase, persistent=False):
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    testcase.addCleanup(pool.closeCachedConnections)
    return treq.client.HTTPClient(Agent(reactor, pool=pool))


class _Fleet:
    """The shared files of a fleet test: fake provider, prices, one agent with a budget."""

    def __init__(self, testcase, budget_fits=None):
        self.testcase = testcase
        self.base = os.path.abspath(testcase.mktemp())
        self.context = os.path.join(self.base, "context")
        self.prices = os.path.join(self.base, "prices.json")
        os.makedirs(self.base)
        with open(self.prices, "w") as f:
            json.dump({"openai": {"gpt-test": {"input": 2.0, "output": 8.0}}}, f)
        self.body = chat_body(model="openai/gpt-test", max_tokens=1000)
        self.worst = (len(json.dumps(self.body).encode()) * 2.0 + 1000 * 8.0) / 1e6
        budget = {}
        if budget_fits is not None:
            self.limit = self.worst * (budget_fits + 0.5)
            budget = {"budget": {"limit_usd": self.limit, "window": "1h"}}
        write_agent(self.context, AGENT, SECRET, **budget)

    def env(self, name, fake, **extra):
        auth = os.path.join(self.base, name, "auth")
        os.makedirs(auth, exist_ok=True)
        env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": self.context,
            "CLAW_AUTH_DIR": auth,
            "CLLAMA_STATE_DIR": os.path.join(self.base, name, "state"),
            "CLLAMA_PRICING_FILE": self.prices,
            "CLLAMA_MASTER_KEY": MASTER,
            "CLLAMA_UI_TOKEN": "fleet-ui-token-0123456789",
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": fake.base_url,
            # A request that does not fit is refused, not lowered to fit.
            "CLLAMA_BUDGET_MIN_OUTPUT_TOKENS": "0",
        }
        env.update(extra)
        return env


@defer.inlineCallbacks
def _start_fake(testcase):
    fake = FakeProvider(reactor)
    yield fake.start()
    testcase.addCleanup(fake.stop)
    return fake


@defer.inlineCallbacks
def _ready(testcase, url):
    """Until the daemon is ready (listening comes first; budgets are seeded right after)."""
    http = _http(testcase)

    @defer.inlineCallbacks
    def ready():
        response = yield http.get(url + "/health/readiness")
        yield response.content()
        return response.code == 200

    yield _eventually(ready, timeout=30.0)


@defer.inlineCallbacks
def _budget_proof(testcase, fake, fleet, urls):
    """200 concurrent requests spread over C{urls} against a budget that fits 10."""
    gate = defer.Deferred()
    for _ in range(200):
        fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 30, 900), hold_until=gate))
    http = _http(testcase)
    refused = []
    all_refused = defer.Deferred()

    def arrived(response):
        if response.code == 429:
            refused.append(response)
            if len(refused) == 190 and not all_refused.called:
                all_refused.callback(None)
        return response

    responses = [
        http.post(urls[i % len(urls)] + "/v1/chat/completions", json=fleet.body, headers=AUTH).addCallback(arrived)
        for i in range(200)
    ]
    yield all_refused
    yield fake.wait_for_request(10)
    testcase.assertEqual(len(fake.received), 10)
    gate.callback(None)
    done = yield defer.gatherResults(responses)
    for response in done:
        yield response.content()
    codes = sorted(r.code for r in done)
    testcase.assertEqual(codes.count(200), 10, codes)
    testcase.assertEqual(codes.count(429), 190, codes)
    return done


@defer.inlineCallbacks
def _eventually(predicate, timeout=5.0, step=0.05):
    """Poll C{predicate} (a Deferred-returning callable) until it is true."""
    waited = 0.0
    while True:
        if (yield predicate()):
            return waited
        if waited >= timeout:
            raise AssertionError(f"not true after {timeout} s")
        yield task.deferLater(reactor, step, lambda: None)
        waited += step


@defer.inlineCallbacks
def _key_roundtrip(testcase, mint_url, use_urls):
    """A key minted at C{mint_url} works at once on every other; its deletion reaches them within a second."""
    http = _http(testcase)
    master = {"Authorization": f"Bearer {MASTER}"}
    minted = yield http.post(mint_url + "/key/generate", json={"models": ["openai/gpt-test"]}, headers=master)
    doc = yield minted.json()
    testcase.assertEqual(minted.code, 200, doc)
    key = doc["key"]
    for url in use_urls:
        response = yield http.post(url + "/v1/chat/completions", json=chat_body(model="openai/gpt-test"),
                                   headers={"Authorization": f"Bearer {key}"})
        body = yield response.json()
        testcase.assertEqual(response.code, 200, body)
    deleted = yield http.post(mint_url + "/key/delete", json={"keys": [key]}, headers=master)
    yield deleted.content()
    testcase.assertEqual(deleted.code, 200)
    waits = []
    for url in use_urls:
        @defer.inlineCallbacks
        def refused(url=url):
            response = yield http.post(url + "/v1/chat/completions", json=chat_body(model="openai/gpt-test"),
                                       headers={"Authorization": f"Bearer {key}"})
            yield response.content()
            return response.code == 401

        waited = yield _eventually(refused, timeout=3.0)
        waits.append(waited)
    testcase.assertLessEqual(max(waits), 1.0)


class PostgresFleetTests(TestCase):
    """Three daemons on one PostgreSQL."""

    timeout = 240

    @defer.inlineCallbacks
    def start_fleet(self, count=3, budget_fits=None, cluster=None, extra=None):
        self.cluster = cluster or shared_cluster()
        self.url = self.cluster.database()
        self.fake = yield _start_fake(self)
        self.fake_base = self.fake.base_url
        self.fleet = _Fleet(self, budget_fits)
        self.daemons = []
        for i in range(count):
            env = self.fleet.env(f"d{i}", self.fake, CLLAMA_DATABASE_URL=self.url)
            env.update({k: (self.fake.base_url if v is None else v) for k, v in (extra or {}).items()})
            process, transport = spawn_daemon(self, env)
            ports = yield process.ready
            yield _ready(self, f"http://127.0.0.1:{ports['API']}")
            self.daemons.append((process, transport, f"http://127.0.0.1:{ports['API']}", ports))
        return [d[2] for d in self.daemons]

    def query(self, sql, params=()):
        with psycopg.connect(self.url) as conn:
            return conn.execute(sql, params).fetchall()

    @defer.inlineCallbacks
    def test_budget_holds_across_three_daemons(self):
        urls = yield self.start_fleet(budget_fits=10)
        yield _budget_proof(self, self.fake, self.fleet, urls)
        yield _eventually(lambda: defer.succeed(
            self.query("SELECT COUNT(*) FROM requests WHERE status = 200")[0][0] == 10))
        (spend,), = self.query("SELECT SUM(cost_usd) FROM requests WHERE status = 200")
        self.assertLessEqual(spend, self.fleet.limit)
        # Nothing is held once the requests are settled.
        yield _eventually(lambda: defer.succeed(self.query("SELECT COUNT(*) FROM reservations")[0][0] == 0))

    @defer.inlineCallbacks
    def test_key_minted_on_one_works_on_others_and_revocation_reaches_all(self):
        urls = yield self.start_fleet()
        yield _key_roundtrip(self, urls[0], urls[1:])

    @defer.inlineCallbacks
    def test_budget_reset_on_one_applies_everywhere(self):
        """An operator's reset on one daemon lets the agent spend again on the others."""
        urls = yield self.start_fleet(count=2, budget_fits=1)
        for _ in range(3):
            self.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 30, 900)))
        http = _http(self)
        first = yield http.post(urls[0] + "/v1/chat/completions", json=self.fleet.body, headers=AUTH)
        yield first.content()
        self.assertEqual(first.code, 200)
        refused = yield http.post(urls[1] + "/v1/chat/completions", json=self.fleet.body, headers=AUTH)
        yield refused.content()
        self.assertEqual(refused.code, 429)
        ui = f"http://127.0.0.1:{self.daemons[0][3]['UI']}"
        reset = yield http.post(f"{ui}/api/reset/{AGENT}", headers={"Authorization": "Bearer fleet-ui-token-0123456789"})
        yield reset.content()
        self.assertEqual(reset.code, 200)

        @defer.inlineCallbacks
        def admitted():
            response = yield http.post(urls[1] + "/v1/chat/completions", json=self.fleet.body, headers=AUTH)
            yield response.content()
            return response.code == 200

        yield _eventually(admitted, timeout=3.0)

    @defer.inlineCallbacks
    def test_provider_key_and_reload_reach_every_daemon(self):
        """A provider key an operator adds on one daemon lands in the other's providers.json; a reload reloads both."""
        yield self.start_fleet(count=2)
        http = _http(self)
        ui = f"http://127.0.0.1:{self.daemons[0][3]['UI']}"
        operator = {"Authorization": "Bearer fleet-ui-token-0123456789", "Accept": "application/json"}
        added = yield http.post(ui + "/providers/keys", data={"provider": "openai", "secret": "sk-added-on-d0-123456",
                                                              "label": "second"}, headers=operator)
        doc = yield added.json()
        self.assertEqual(added.code, 200, doc)
        other = os.path.join(self.fleet.base, "d1", "auth", "providers.json")

        def copied():
            try:
                with open(other) as f:
                    return defer.succeed(doc["key_id"] in f.read())
            except OSError:
                return defer.succeed(False)

        yield _eventually(copied, timeout=3.0)
        self.assertEqual(os.stat(other).st_mode & 0o777, 0o600)
        reloaded = yield http.post(ui + "/api/reload", headers=operator)
        yield reloaded.content()
        self.assertEqual(reloaded.code, 200)
        yield self.daemons[1][0].wait_for_audit(lambda lines: any(
            line.get("type") == "operator" and line.get("action") == "reload" and line.get("actor") == "another instance"
            for line in lines))

    @defer.inlineCallbacks
    def test_responses_conversation_continues_on_another_daemon(self):
        """A translated Responses answer made on one daemon is the previous_response_id of a turn on the other."""
        yield self.start_fleet(count=2, extra={"ANTHROPIC_API_KEY": PROVIDER_KEY, "ANTHROPIC_BASE_URL": None})
        http = _http(self)
        first = yield http.post(self.daemons[0][2] + "/v1/responses", headers=AUTH, json={
            "model": "anthropic/claude-fleet", "input": "remember the word marmalade", "max_output_tokens": 64})
        answer = yield first.json()
        self.assertEqual(first.code, 200, answer)
        second = yield http.post(self.daemons[1][2] + "/v1/responses", headers=AUTH, json={
            "model": "anthropic/claude-fleet", "input": "which word?", "max_output_tokens": 64,
            "previous_response_id": answer["id"]})
        follow = yield second.json()
        self.assertEqual(second.code, 200, follow)
        sent = self.fake.received[-1].json["messages"]
        self.assertIn("marmalade", json.dumps(sent))
        self.assertIn("which word?", json.dumps(sent))

    @defer.inlineCallbacks
    def test_kill_9_of_one_daemon_loses_no_completed_request(self):
        urls = yield self.start_fleet()
        completed = yield _load_then(self, urls, lambda: self.daemons[0][1].signalProcess("KILL"))
        yield self.daemons[0][0].ended
        recorded = {r[0] for r in self.query("SELECT request_id FROM requests")}
        missing = [rid for rid in completed if rid not in recorded]
        self.assertEqual(missing, [])
        self.assertGreater(len(completed), 100)

    @defer.inlineCallbacks
    def test_database_stopped_and_restarted_mid_load(self):
        """Down: readiness fails and budgeted requests get 503 at once; back: served again, nothing lost."""
        cluster = PostgresCluster()
        cluster.start()
        self.addCleanup(cluster.destroy)
        urls = yield self.start_fleet(count=2, budget_fits=1000, cluster=cluster)
        http = _http(self)
        completed = yield _load_then(self, urls, cluster.stop)

        @defer.inlineCallbacks
        def refusing():
            response = yield http.post(urls[0] + "/v1/chat/completions", json=self.fleet.body, headers=AUTH)
            body = yield response.json()
            return response.code == 503 and body["error"]["code"] in ("store_unavailable", "ledger_unavailable")

        yield _eventually(refusing, timeout=10.0)
        started = reactor.seconds()
        response = yield http.post(urls[1] + "/v1/chat/completions", json=self.fleet.body, headers=AUTH)
        yield response.content()
        self.assertEqual(response.code, 503)
        self.assertLess(reactor.seconds() - started, 5.0)  # refused, not hung
        ready = yield http.get(urls[0] + "/health/readiness")
        yield ready.content()
        self.assertNotEqual(ready.code, 200)

        cluster.start()

        @defer.inlineCallbacks
        def serving():
            response = yield http.post(urls[0] + "/v1/chat/completions", json=self.fleet.body, headers=AUTH)
            yield response.content()
            return response.code == 200

        yield _eventually(serving, timeout=20.0)
        yield _eventually(lambda: defer.succeed(
            not set(completed) - {r[0] for r in self.query("SELECT request_id FROM requests")}), timeout=20.0)


@defer.inlineCallbacks
def _load_then(testcase, urls, action, before=120):
    """Eight clients on every daemon; after C{before} completed requests, C{action()}; returns completed ids."""
    http = _http(testcase, persistent=True)
    completed = []
    enough = defer.Deferred()
    stop = []

    @defer.inlineCallbacks
    def client(url, stream):
        while not stop:
            try:
                response = yield http.post(url + "/v1/chat/completions", json=chat_body(stream=stream), headers=AUTH)
                yield response.content()
            except Exception:
                continue
            if response.code == 200:
                completed.append(response.headers.getRawHeaders("x-cllama-request-id")[0])
            if len(completed) >= before and not enough.called:
                enough.callback(None)

    clients = [client(url, i % 2 == 0) for url in urls for i in range(4)]
    yield enough
    action()
    yield task.deferLater(reactor, 1.0, lambda: None)
    stop.append(True)
    yield defer.DeferredList(clients)
    return completed


class SqliteWorkersTests(TestCase):
    """One daemon, two worker processes, one SQLite file."""

    timeout = 240

    @defer.inlineCallbacks
    def start(self, budget_fits=None):
        self.fake = yield _start_fake(self)
        self.fleet = _Fleet(self, budget_fits)
        env = self.fleet.env("w", self.fake)
        self.process, self.transport = spawn_daemon(self, env, args=("--workers", "2"))
        ports = yield self.process.ready
        yield _ready(self, f"http://127.0.0.1:{ports['API']}")
        self.state = env["CLLAMA_STATE_DIR"]
        return f"http://127.0.0.1:{ports['API']}"

    @defer.inlineCallbacks
    def test_budget_holds_across_two_workers(self):
        url = yield self.start(budget_fits=10)
        done = yield _budget_proof(self, self.fake, self.fleet, [url])
        del done
        import sqlite3

        db = sqlite3.connect(os.path.join(self.state, "ledger.sqlite3"))
        self.addCleanup(db.close)

        def settled():
            count, spend = db.execute("SELECT COUNT(*), SUM(cost_usd) FROM requests WHERE status = 200").fetchone()
            return defer.succeed(count == 10)

        yield _eventually(settled)
        spend = db.execute("SELECT SUM(cost_usd) FROM requests WHERE status = 200").fetchone()[0]
        self.assertLessEqual(spend, self.fleet.limit)

    @defer.inlineCallbacks
    def test_key_minted_on_one_worker_works_on_the_other(self):
        url = yield self.start()
        # Many new connections: the kernel spreads them over both workers.
        yield _key_roundtrip(self, url, [url] * 8)

    @defer.inlineCallbacks
    def test_kill_9_of_one_worker_loses_no_completed_request(self):
        """One worker killed under load: every answer either worker gave is in the state file."""
        url = yield self.start()
        # Readiness is answered by the first worker up; wait for the other.
        yield _eventually(lambda: defer.succeed(len(set(WORKER_READY.findall(self.process.stderr))) == 2),
                          timeout=30.0)
        pids = {int(i): int(p) for i, p in WORKER_READY.findall(self.process.stderr)}
        self.assertEqual(len(pids), 2)
        completed = yield _load_then(self, [url], lambda: os.kill(pids[0], signal.SIGKILL))
        import sqlite3

        db = sqlite3.connect(os.path.join(self.state, "ledger.sqlite3"))
        self.addCleanup(db.close)
        recorded = {row[0] for row in db.execute("SELECT request_id FROM requests")}
        self.assertEqual([rid for rid in completed if rid not in recorded], [])
        self.assertGreater(len(completed), 100)
        # The supervisor started a new worker 0, and both serve.
        def restarted():
            starts = [int(p) for i, p in WORKER_READY.findall(self.process.stderr) if int(i) == 0]
            return defer.succeed(len(starts) == 2 and starts[1] != pids[0])

        yield _eventually(restarted, timeout=30.0)
