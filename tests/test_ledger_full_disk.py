"""
The real daemon (`twistd -n cllama`) with its state directory on a small
tmpfs filled to the last byte: requests are still answered while the ledger
holds their rows, readiness and /api/health say the ledger is failing,
budgeted callers and (once the backlog is full) everyone get 503
`ledger_unavailable` in their surface's shape, and when space returns every
row is committed; a stop with rows still held saves them for the next start.
Needs root for the mount (CI runs as root); it fails and says so otherwise.
"""

from __future__ import annotations

import json
import os
import sqlite3

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.testing import FakeProvider
from tests.runtime.test_daemon import spawn_daemon
from tests.store.small_fs import fill, free, mount_tmpfs
from tests.support import AGENT, PROVIDER_KEY, SECRET, chat_body, write_agent

BUDGETED = "budgeted"
BUDGETED_SECRET = "b7" * 24
UI = "ledger-disk-ui-token-5"
RECOVERED = b"again; every held row is committed"


class FullDiskDaemonTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = FakeProvider(reactor)
        yield self.fake.start()
        self.addCleanup(self.fake.stop)
        base = os.path.abspath(self.mktemp())
        context = os.path.join(base, "context")
        write_agent(context, AGENT, SECRET)
        write_agent(context, BUDGETED, BUDGETED_SECRET, budget={"limit_usd": 100, "window": "24h"})
        os.makedirs(os.path.join(base, "auth"))
        prices = os.path.join(base, "prices.json")
        with open(prices, "w") as f:
            json.dump({"openai": {"gpt-test": {"input": 2.0, "output": 8.0}},
                       "anthropic": {"claude-test": {"input": 3.0, "output": 15.0}}}, f)
        self.state = mount_tmpfs(self, 2048)  # unmounted after the daemons (cleanups run last-added first)
        self.spill = os.path.join(base, "spill")
        self.env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": context,
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": self.state,
            "CLLAMA_PRICING_FILE": prices,
            "CLLAMA_UI_TOKEN": UI,
            "CLLAMA_LEDGER_BACKLOG": "6",
            "CLLAMA_LEDGER_SPILL_DIR": self.spill,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.fake.base_url,
            "ANTHROPIC_API_KEY": PROVIDER_KEY,
            "ANTHROPIC_BASE_URL": self.fake.base_url,
        }
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    # -- helpers

    @defer.inlineCallbacks
    def chat(self, agent=AGENT, secret=SECRET):
        response = yield self.http.post(
            f"http://127.0.0.1:{self.ports['API']}/v1/chat/completions",
            json=chat_body(model="openai/gpt-test"),
            headers={"Authorization": f"Bearer {agent}:{secret}"},
        )
        body = yield response.json()
        return response, body

    @defer.inlineCallbacks
    def get(self, site, path, token=None):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = yield self.http.get(f"http://127.0.0.1:{self.ports[site]}{path}", headers=headers)
        body = yield response.content()
        return response.code, body

    @defer.inlineCallbacks
    def served(self, count):
        """C{count} answered requests of the plain agent: their request ids."""
        ids = []
        for _ in range(count):
            response, body = yield self.chat()
            self.assertEqual(response.code, 200, body)
            self.assertTrue(body["choices"][0]["message"]["content"])
            ids.append(response.headers.getRawHeaders("x-cllama-request-id")[0])
        return ids

    def stored(self):
        db = sqlite3.connect(f"file:{os.path.join(self.state, 'ledger.sqlite3')}?mode=ro", uri=True)
        try:
            return [r for (r,) in db.execute("SELECT request_id FROM requests ORDER BY id")]
        finally:
            db.close()

    @defer.inlineCallbacks
    def start(self):
        process, transport = spawn_daemon(self, self.env)
        self.ports = yield process.ready
        return process, transport

    # -- tests

    @defer.inlineCallbacks
    def test_rows_are_held_reported_and_committed_when_space_returns(self):
        process, transport = yield self.start()
        warm = yield self.served(1)
        filler = fill(self.state)
        held = yield self.served(2)

        code, body = yield self.get("API", "/health/readiness")
        self.assertEqual(code, 503)
        doc = json.loads(body)
        self.assertEqual((doc["status"], doc["db"]), ("unhealthy", "failing"))
        self.assertEqual(doc["ledger"], {"state": "failing", "pending_rows": 2})
        # Liveness stays up: restarting would throw the held rows away.
        self.assertEqual((yield self.get("API", "/health")), (200, b'{"ok": true}'))
        code, body = yield self.get("UI", "/api/health", UI)
        self.assertEqual(code, 503)
        doc = json.loads(body)
        self.assertFalse(doc["ok"])
        self.assertEqual(doc["ledger"], "failing")
        self.assertEqual(doc["ledger_storage"]["pending_rows"], 2)
        self.assertEqual(doc["ledger_storage"]["error"], "database or disk is full")

        # A budgeted agent's spend could only be counted in memory: refused at once.
        upstream = len(self.fake.received)
        response, body = yield self.chat(BUDGETED, BUDGETED_SECRET)
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["5"])
        self.assertEqual(set(body), {"error"})
        self.assertEqual((body["error"]["code"], body["error"]["type"]), ("ledger_unavailable", "api_error"))
        self.assertIn("budget", body["error"]["message"])
        response = yield self.http.post(
            f"http://127.0.0.1:{self.ports['API']}/v1/messages",
            json={"model": "anthropic/claude-test", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-api-key": f"{BUDGETED}:{BUDGETED_SECRET}"},
        )
        self.assertEqual(response.code, 503)
        body = yield response.json()
        self.assertEqual(body["type"], "error")
        self.assertEqual(set(body["error"]), {"type", "message"})
        self.assertIn("budget", body["error"]["message"])
        self.assertEqual(len(self.fake.received), upstream)  # nothing went upstream

        # The two refusals' rows are held too: 4 of 6.  Two more fill the backlog...
        held += yield self.served(2)
        # ... and then every metered request is refused.
        response, body = yield self.chat()
        self.assertEqual(response.code, 503)
        self.assertEqual(body["error"]["code"], "ledger_unavailable")
        self.assertIn("holds as many", body["error"]["message"])
        code, body = yield self.get("UI", "/metrics", UI)
        self.assertIn(b"\ncllama_ledger_pending_rows 6.0\n", body)
        self.assertIn(b"\ncllama_ledger_unkept_rows_total 1.0\n", body)
        self.assertEqual(self.stored(), warm)

        recovered = process.wait_for_stderr(RECOVERED)
        free(filler)
        yield recovered
        stored = self.stored()
        self.assertEqual([rid for rid in stored if rid in held], held)  # all of them, in order
        self.assertEqual(len(stored), 1 + 4 + 2)  # and the two refusals of the budgeted agent
        code, body = yield self.get("API", "/health/readiness")
        self.assertEqual((code, json.loads(body)["ledger"]), (200, {"state": "ok", "pending_rows": 0}))
        response, _ = yield self.chat(BUDGETED, BUDGETED_SECRET)
        self.assertEqual(response.code, 200)
        refusals = [line for line in process.audit_lines() if line["type"] == "error" and line["status_code"] == 503]
        self.assertEqual(len(refusals), 3)  # audited, all three

        transport.signalProcess("TERM")
        self.assertEqual((yield process.ended), 0)
        yield self.start()
        code, body = yield self.get("UI", "/costs/api", UI)
        costs = json.loads(body)
        self.assertEqual(costs["agents"][AGENT]["total_requests"], 5)
        self.assertEqual(costs["agents"][BUDGETED]["total_requests"], 1)

    @defer.inlineCallbacks
    def test_stop_with_held_rows_saves_them_for_the_next_start(self):
        process, transport = yield self.start()
        warm = yield self.served(1)
        filler = fill(self.state)
        held = yield self.served(3)
        transport.signalProcess("TERM")
        self.assertEqual((yield process.ended), 0)
        self.assertIn(b"3 rows could not be written", process.stderr)
        [name] = os.listdir(self.spill)
        with open(os.path.join(self.spill, name)) as f:
            self.assertEqual([json.loads(line)["request_id"] for line in f], held)
        self.assertEqual(self.stored(), warm)

        free(filler)
        process, _ = yield self.start()
        yield process.wait_for_stderr(b"imported 3 rows")
        self.assertEqual(self.stored(), warm + held)
        self.assertEqual(os.listdir(self.spill), [])
        code, body = yield self.get("UI", "/costs/api", UI)
        self.assertEqual(json.loads(body)["total_requests"], 4)
