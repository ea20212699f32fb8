"""
The real thing: `twistd -n cllama` in a child process, talked to over
loopback, and the `cllama-tx --healthcheck` probe against it.
"""

import json
import os
import re
import signal
import sys

import treq
from twisted.internet import defer, error, protocol, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.runtime.cli import health_url, healthcheck
from cllama_tx.testing import FakeProvider
from tests.secret_scan import SCANNER
from tests.support import AGENT, PROVIDER_KEY, SECRET, chat_body, write_agent

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
SCANNER.register("ui-token-never-logged-77", "crash-ui-token")
LISTENING = re.compile(r"(API|UI) listening on 127\.0\.0\.1:(\d+)")


class DaemonProcess(protocol.ProcessProtocol):
    """Collects a daemon's stdout (audit) and stderr (log); fires on events."""

    def __init__(self):
        self.stdout = b""
        self.stderr = b""
        self.ports = {}
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()
        self._stdout_waiters = []
        self._stderr_waiters = []

    def outReceived(self, data):
        self.stdout += data
        for predicate, d in list(self._stdout_waiters):
            if predicate(self.audit_lines()):
                self._stdout_waiters.remove((predicate, d))
                d.callback(None)

    def errReceived(self, data):
        self.stderr += data
        for kind, port in LISTENING.findall(self.stderr.decode(errors="replace")):
            self.ports[kind] = int(port)
        if len(self.ports) == 2 and not self.ready.called:
            self.ready.callback(self.ports)
        for needle, d in list(self._stderr_waiters):
            if needle in self.stderr:
                self._stderr_waiters.remove((needle, d))
                d.callback(None)

    def wait_for_stderr(self, needle):
        d = defer.Deferred()
        self._stderr_waiters.append((needle, d))
        self.errReceived(b"")
        return d

    def processEnded(self, reason):
        for line in (self.stdout + self.stderr).decode(errors="replace").splitlines():
            SCANNER.scan("daemon", line)
        if not self.ready.called:
            self.ready.errback(RuntimeError("daemon exited before listening:\n" + self.stderr.decode(errors="replace")))
        self.signal = reason.value.signal
        self.ended.callback(reason.value.exitCode)

    def audit_lines(self):
        complete = self.stdout[: self.stdout.rfind(b"\n") + 1]  # a line may be half-written
        return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]

    def wait_for_audit(self, predicate):
        d = defer.Deferred()
        if predicate(self.audit_lines()):
            d.callback(None)
        else:
            self._stdout_waiters.append((predicate, d))
        return d


def spawn_daemon(testcase, env, args=(), command=None, cwd=REPO):
    process = DaemonProcess()
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}
    full_env.update(env)
    transport = reactor.spawnProcess(
        process,
        (command or [TWISTD, "--pidfile=", "-n", "cllama"])[0],
        [*(command or [TWISTD, "--pidfile=", "-n", "cllama"]), *args],
        env=full_env,
        path=cwd,
    )

    def stop():
        if process.ended.called:
            return None
        try:
            transport.signalProcess("TERM")
        except error.ProcessExitedAlready:
            return None
        return process.ended

    testcase.addCleanup(stop)
    return process, transport


class DaemonTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = FakeProvider(reactor)
        yield self.fake.start()
        self.addCleanup(self.fake.stop)
        base = os.path.abspath(self.mktemp())
        self.context_root = os.path.join(base, "context")
        auth_dir = os.path.join(base, "auth")
        os.makedirs(auth_dir)
        write_agent(self.context_root, AGENT, SECRET)
        self.env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": self.context_root,
            "CLAW_AUTH_DIR": auth_dir,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.fake.base_url,
            "CLLAMA_UI_TOKEN": "ui-token-never-logged-77",
        }
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    @defer.inlineCallbacks
    def test_serves_both_sites_and_keeps_audit_on_stdout(self):
        process, transport = spawn_daemon(self, self.env)
        ports = yield process.ready
        api = f"http://127.0.0.1:{ports['API']}"
        health = yield self.http.get(api + "/health")
        self.assertEqual((yield health.json()), {"ok": True})
        ui_health = yield self.http.get(f"http://127.0.0.1:{ports['UI']}/health")
        self.assertEqual((yield ui_health.json()), {"ok": True})

        response = yield self.http.post(
            api + "/v1/chat/completions",
            json=chat_body(),
            headers={"Authorization": f"Bearer {AGENT}:{SECRET}"},
        )
        body = yield response.json()
        self.assertEqual(response.code, 200)
        self.assertEqual(body["object"], "chat.completion")
        self.assertEqual(self.fake.received[0].header("authorization"), f"Bearer {PROVIDER_KEY}")

        yield process.wait_for_audit(lambda lines: any(line["type"] == "response" for line in lines))
        transport.signalProcess("TERM")
        code = yield process.ended
        # A drained SIGTERM is a clean stop: exit 0, not death by the signal.
        self.assertEqual((code, process.signal), (0, None))
        self.assertIn(b"Server Shut Down", process.stderr)
        types = [line["type"] for line in process.audit_lines()]
        self.assertEqual(types, ["request", "response"])
        # Operational logs are on stderr, not mixed into the audit stream.
        self.assertIn(b"API listening on", process.stderr)
        self.assertNotIn(b"listening", process.stdout)
        for secret in (SECRET, PROVIDER_KEY, "ui-token-never-logged-77"):
            self.assertNotIn(secret.encode(), process.stdout + process.stderr)

    @defer.inlineCallbacks
    def test_healthcheck_command(self):
        process, _ = spawn_daemon(self, self.env)
        ports = yield process.ready
        url = health_url({"LISTEN_ADDR": f"127.0.0.1:{ports['API']}"})
        self.assertEqual(url, f"http://127.0.0.1:{ports['API']}/health")
        code = yield deferToThread(healthcheck, url)
        self.assertEqual(code, 0)
        # The console entry point, both flag spellings, as Docker runs it.
        for flag in ("--healthcheck", "-healthcheck"):
            out = yield _run_cli([flag], {"LISTEN_ADDR": f"127.0.0.1:{ports['API']}"})
            self.assertEqual(out, 0, flag)

    @defer.inlineCallbacks
    def test_cllama_tx_command_runs_the_daemon_without_a_pid_file(self):
        workdir = os.path.abspath(self.mktemp())
        os.makedirs(workdir)
        process, transport = spawn_daemon(
            self, self.env, ["--pod", "from-cli"], command=[sys.executable, "-m", "cllama_tx.runtime.cli"], cwd=workdir
        )
        ports = yield process.ready
        response = yield self.http.get(
            f"http://127.0.0.1:{ports['UI']}/api/status",
            headers={"Authorization": "Bearer ui-token-never-logged-77"},
        )
        self.assertEqual((yield response.json())["pod"], "from-cli")
        self.assertEqual(os.listdir(workdir), [])

    @defer.inlineCallbacks
    def test_healthcheck_fails_without_daemon(self):
        code = yield _run_cli(["--healthcheck"], {"LISTEN_ADDR": "127.0.0.1:1"})
        self.assertNotEqual(code, 0)

    @defer.inlineCallbacks
    def test_busy_port_fails_start_up_loudly(self):
        holder = reactor.listenTCP(0, protocol.Factory(), interface="127.0.0.1")
        self.addCleanup(holder.stopListening)
        env = dict(self.env, LISTEN_ADDR=f"127.0.0.1:{holder.getHost().port}")
        process, _ = spawn_daemon(self, env)
        yield self.assertFailure(process.ready, RuntimeError)
        code = yield process.ended
        self.assertNotEqual(code, 0)
        self.assertIn(b"Address already in use", process.stderr)

    @defer.inlineCallbacks
    def test_demo_mode(self):
        """
        --demo answers with the offline model, no provider keys needed; the
        public demo credential reaches no real provider even when keys exist.
        """
        process, _ = spawn_daemon(self, self.env, ["--demo"])
        ports = yield process.ready
        yield process.wait_for_stderr(b"curl ")
        self.assertIn(f"http://127.0.0.1:{ports['API']}/v1/chat/completions".encode(), process.stderr)
        self.assertIn(b"demo:cllama-demo", process.stderr)
        response = yield self.http.post(
            f"http://127.0.0.1:{ports['API']}/v1/chat/completions",
            json={"model": "demo/echo-1", "messages": [{"role": "user", "content": "ping"}]},
            headers={"Authorization": "Bearer demo:cllama-demo"},
        )
        self.assertEqual(response.code, 200)
        body = yield response.json()
        self.assertIn("ping", body["choices"][0]["message"]["content"])
        self.assertGreater(body["usage"]["prompt_tokens"], 0)
        refused = yield self.http.post(
            f"http://127.0.0.1:{ports['API']}/v1/chat/completions",
            json={"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "ping"}]},
            headers={"Authorization": "Bearer demo:cllama-demo"},
        )
        # The demo agent's policy (mode reject) allows only demo/echo-1.
        self.assertEqual(refused.code, 403)
        self.assertEqual((yield refused.json())["error"]["code"], "model_not_allowed")
        self.assertEqual(self.fake.received, [])


@defer.inlineCallbacks
def _run_cli(args, env):
    class Collect(protocol.ProcessProtocol):
        def __init__(self):
            self.ended = defer.Deferred()

        def processEnded(self, reason):
            self.ended.callback(reason.value.exitCode)

    proc = Collect()
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": REPO}
    full_env.update(env)
    reactor.spawnProcess(
        proc, sys.executable, [sys.executable, "-m", "cllama_tx.runtime.cli", *args], env=full_env, path=REPO
    )
    code = yield proc.ended
    return code





class CrashTests(TestCase):
    """kill -9 under load: every answer an agent received is in the ledger."""

    timeout = 120

    @defer.inlineCallbacks
    def test_kill_9_under_load_loses_no_completed_request(self):
        fake = FakeProvider(reactor)
        yield fake.start()
        self.addCleanup(fake.stop)
        base = os.path.abspath(self.mktemp())
        context_root = os.path.join(base, "context")
        write_agent(context_root, AGENT, SECRET)
        os.makedirs(os.path.join(base, "auth"))
        state = os.path.join(base, "state")
        env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": context_root,
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": state,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": fake.base_url,
            "CLLAMA_UI_TOKEN": "crash-ui-token",
        }
        process, transport = spawn_daemon(self, env)
        ports = yield process.ready
        api = f"http://127.0.0.1:{ports['API']}/v1/chat/completions"
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        completed = []
        enough = defer.Deferred()

        @defer.inlineCallbacks
        def worker(stream):
            while not enough.called:
                try:
                    response = yield http.post(
                        api,
                        json=chat_body(stream=stream),
                        headers={"Authorization": f"Bearer {AGENT}:{SECRET}"},
                    )
                    yield response.content()
                except Exception:
                    return  # the daemon is gone
                completed.append(response.headers.getRawHeaders("x-cllama-request-id")[0])
                if len(completed) >= 150 and not enough.called:
                    enough.callback(None)

        workers = [worker(stream=i % 2 == 0) for i in range(8)]
        yield enough
        transport.signalProcess("KILL")
        yield process.ended
        yield defer.DeferredList(workers)
        self.assertEqual(process.signal, signal.SIGKILL)

        import sqlite3

        db = sqlite3.connect(os.path.join(state, "ledger.sqlite3"))
        recorded = {row[0] for row in db.execute("SELECT request_id FROM requests")}
        db.close()
        missing = [rid for rid in completed if rid not in recorded]
        self.assertEqual(missing, [])
        self.assertGreaterEqual(len(recorded), len(completed))

        # A restart rebuilds the totals from the ledger.
        process2, _ = spawn_daemon(self, env)
        ports2 = yield process2.ready
        response = yield http.get(
            f"http://127.0.0.1:{ports2['UI']}/costs/api", headers={"Authorization": "Bearer crash-ui-token"}
        )
        costs = yield response.json()
        self.assertEqual(costs["total_requests"], len(recorded))


class BudgetProofTests(TestCase):
    """The concurrency proof against the real daemon: 200 at once, room for 10."""

    timeout = 120

    @defer.inlineCallbacks
    def test_200_concurrent_requests_admit_what_fits(self):
        import json as _json
        import sqlite3

        from cllama_tx.testing import Reply, openai_completion

        fake = FakeProvider(reactor)
        yield fake.start()
        self.addCleanup(fake.stop)
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "auth"))
        prices = os.path.join(base, "prices.json")
        with open(prices, "w") as f:
            _json.dump({"openai": {"gpt-test": {"input": 2.0, "output": 8.0}}}, f)
        body = chat_body(model="openai/gpt-test", max_tokens=1000)
        worst = (len(_json.dumps(body).encode()) * 2.0 + 1000 * 8.0) / 1e6
        limit = worst * 10.5
        write_agent(os.path.join(base, "context"), AGENT, SECRET, budget={"limit_usd": limit, "window": "1h"})
        env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": os.path.join(base, "context"),
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "CLLAMA_PRICING_FILE": prices,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": fake.base_url,
        }
        gate = defer.Deferred()
        for _ in range(200):
            fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 30, 900), hold_until=gate))
        process, _ = spawn_daemon(self, env)
        ports = yield process.ready
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        url = f"http://127.0.0.1:{ports['API']}/v1/chat/completions"
        refused = []
        all_refused = defer.Deferred()

        def arrived(response):
            if response.code == 429:
                refused.append(response)
                if len(refused) == 190:
                    all_refused.callback(None)
            return response

        responses = [
            http.post(url, json=body, headers={"Authorization": f"Bearer {AGENT}:{SECRET}"}).addCallback(arrived)
            for _ in range(200)
        ]
        yield all_refused
        yield fake.wait_for_request(10)
        self.assertEqual(len(fake.received), 10)
        gate.callback(None)
        done = yield defer.gatherResults(responses)
        for response in done:
            yield response.content()
        self.assertEqual(sorted(r.code for r in done).count(200), 10)
        yield process.wait_for_audit(lambda lines: len([line for line in lines if line["type"] == "response"]) == 10)
        db = sqlite3.connect(os.path.join(base, "state", "ledger.sqlite3"))
        spend, count = db.execute("SELECT SUM(cost_usd), COUNT(*) FROM requests WHERE status = 200").fetchone()
        db.close()
        self.assertEqual(count, 10)
        self.assertLessEqual(spend, limit)


class OperationsTests(TestCase):
    """SIGHUP reloads; budgets resume after a restart."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        import json as _json

        self.fake = FakeProvider(reactor)
        yield self.fake.start()
        self.addCleanup(self.fake.stop)
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "auth"))
        self.prices = os.path.join(base, "prices.json")
        with open(self.prices, "w") as f:
            _json.dump({"openai": {"gpt-test": {"input": 2.0, "output": 8.0}}}, f)
        write_agent(
            os.path.join(base, "context"), AGENT, SECRET,
            budget={"limit_usd": 0.01, "window": "1h", "behavior": "hard_stop"},
        )
        self.env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": os.path.join(base, "context"),
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "CLLAMA_PRICING_FILE": self.prices,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.fake.base_url,
        }
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    def chat(self, ports, max_tokens):
        return self.http.post(
            f"http://127.0.0.1:{ports['API']}/v1/chat/completions",
            json=chat_body(model="openai/gpt-test", max_tokens=max_tokens),
            headers={"Authorization": f"Bearer {AGENT}:{SECRET}"},
        )

    @defer.inlineCallbacks
    def test_sighup_reloads(self):
        process, transport = spawn_daemon(self, self.env)
        yield process.ready
        transport.signalProcess("HUP")
        yield process.wait_for_audit(
            lambda lines: any(line["type"] == "operator" and line["action"] == "reload" for line in lines)
        )
        [line] = [entry for entry in process.audit_lines() if entry["type"] == "operator"]
        self.assertEqual(line["actor"], "SIGHUP")
        self.assertEqual(line["failed"], [])

    @defer.inlineCallbacks
    def test_budget_spend_survives_a_restart(self):
        from cllama_tx.testing import Reply, openai_completion

        process, transport = spawn_daemon(self, self.env)
        ports = yield process.ready
        # $0.0080 of $0.01 spent.
        self.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 10, 998)))
        response = yield self.chat(ports, 1000)
        self.assertEqual(response.code, 200)
        yield response.content()
        yield process.wait_for_audit(lambda lines: any(line["type"] == "response" for line in lines))
        transport.signalProcess("TERM")
        yield process.ended
        process2, _ = spawn_daemon(self, self.env)
        ports2 = yield process2.ready
        refused = yield self.chat(ports2, 500)  # worst case $0.004: no longer fits
        self.assertEqual(refused.code, 429)
        body = yield refused.json()
        self.assertEqual(body["budget"]["requests"], 1)
        self.assertAlmostEqual(body["budget"]["reported_cost_usd"], (10 * 2.0 + 998 * 8.0) / 1e6, places=9)


class VirtualKeyRestartTests(TestCase):
    """A key's budget remembers its spend across a restart of the real daemon."""

    timeout = 60

    @defer.inlineCallbacks
    def test_key_budget_survives_a_restart(self):
        import json as _json

        from cllama_tx.testing import Reply, openai_completion

        fake = FakeProvider(reactor)
        yield fake.start()
        self.addCleanup(fake.stop)
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "auth"))
        os.makedirs(os.path.join(base, "context"))
        prices = os.path.join(base, "prices.json")
        with open(prices, "w") as f:
            _json.dump({"openai": {"gpt-test": {"input": 2.0, "output": 8.0}}}, f)
        master = "sk-restart-master-key-000000000"
        SCANNER.register(master)
        env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": os.path.join(base, "context"),
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "CLLAMA_PRICING_FILE": prices,
            "CLLAMA_MASTER_KEY": master,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": fake.base_url,
        }
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        process, transport = spawn_daemon(self, env)
        ports = yield process.ready
        api = f"http://127.0.0.1:{ports['API']}"
        minted = yield http.post(api + "/key/generate", json={"max_budget": 0.01}, headers={"Authorization": f"Bearer {master}"})
        key = (yield minted.json())["key"]
        SCANNER.register(key)
        fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 10, 998)))  # $0.008 of $0.01
        response = yield http.post(
            api + "/v1/chat/completions", json=chat_body(model="openai/gpt-test", max_tokens=1000),
            headers={"Authorization": f"Bearer {key}"},
        )
        self.assertEqual(response.code, 200)
        yield response.content()
        yield process.wait_for_audit(lambda lines: any(line["type"] == "response" for line in lines))
        transport.signalProcess("TERM")
        yield process.ended
        process2, _ = spawn_daemon(self, env)
        ports2 = yield process2.ready
        refused = yield http.post(
            f"http://127.0.0.1:{ports2['API']}/v1/chat/completions",
            json=chat_body(model="openai/gpt-test", max_tokens=500),
            headers={"Authorization": f"Bearer {key}"},
        )
        # LiteLLM's status for a key whose budget ran out.
        self.assertEqual(refused.code, 422)
        self.assertEqual((yield refused.json())["budget"]["requests"], 1)


class GarbageCollectionTests(TestCase):
    def test_the_daemon_collects_less_often_and_freezes_start_up(self) -> None:
        import gc

        from twisted.internet.task import Clock

        from cllama_tx.runtime.daemon import GC_THRESHOLDS, tune_gc

        before = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *before)
        self.addCleanup(gc.unfreeze)
        started = []

        class NotYetRunning(Clock):
            def callWhenRunning(self, f, *args):
                started.append((f, args))

        tune_gc(NotYetRunning())
        self.assertEqual(gc.get_threshold(), GC_THRESHOLDS)
        self.assertEqual(GC_THRESHOLDS[0], 50_000)
        [(freeze, args)] = started  # frozen once running, over what start-up built
        self.assertIs(freeze, gc.freeze)
        gc.unfreeze()
        freeze(*args)
        self.assertGreater(gc.get_freeze_count(), 0)
