"""
The Execwall OR gate's README flow, replayed against the real daemon
(`twistd -n cllama`) with the gate's own policy.yaml (tests/fixtures/execwall),
changed only as the README says (openrouter.base_url pointed at a mock), and
a fake OpenRouter on loopback that speaks OpenRouter's wire format.

The README's "Testing with Mock Server" has nine steps: start the mock,
start the gate with OPENROUTER_API_KEY, then seven curl commands.  With the
loopback opt-ins (CLLAMA_TRUST_X_AGENT_ID, CLLAMA_CONSOLE_ON_API_PORT) every
curl runs as written, on the one port; without them the same flow runs
authenticated: the agent with its token, the console on the UI port with the
operator token.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.testing import FakeProvider
from cllama_tx.testing.openrouter import OpenRouterModel
from tests.runtime.test_daemon import spawn_daemon
from tests.secret_scan import SCANNER
from tests.support import write_agent

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "execwall", "policy.yaml")
PRODUCTION = 'base_url: "https://openrouter.ai/api/v1"    # Production OpenRouter API'
OPENROUTER_KEY = "test-key-openrouter-never-logged-5d1"
UI_TOKEN = "ui-token-execwall-never-logged-3a9"
AGENT_SECRET = "0f" * 24
SCANNER.register(OPENROUTER_KEY, "execwall-openrouter-key")
SCANNER.register(UI_TOKEN, "execwall-ui-token")
SCANNER.register(AGENT_SECRET, "execwall-agent-secret")

PREMIUM = ["anthropic/claude-3.5-sonnet", "openai/gpt-4o"]
MID = ["anthropic/claude-3-haiku", "openai/gpt-4o-mini"]
ECONOMY = ["mistralai/mistral-7b-instruct"]
HELLO = {"messages": [{"role": "user", "content": "Hello"}]}
WHAT_TIER = {"messages": [{"role": "user", "content": "What tier?"}]}


def utc_midnight() -> str:
    return time.strftime("%Y-%m-%dT00:00:00Z", time.gmtime())


class _Flow:
    """The daemon, the fake OpenRouter and an HTTP client, for one test."""

    def __init__(self, testcase: TestCase) -> None:
        self.case = testcase

    @defer.inlineCallbacks
    def start(self, env_extra: dict, agent_with_token: bool = False):
        case = self.case
        # Terminal 1: python -m execwall-or-gate.mock_openrouter
        self.openrouter = OpenRouterModel()
        self.fake = FakeProvider(reactor, responder=self.openrouter.respond, strict=False)
        yield self.fake.start()
        case.addCleanup(self.fake.stop)
        base = os.path.abspath(case.mktemp())
        os.makedirs(os.path.join(base, "auth"))
        os.makedirs(os.path.join(base, "context"))
        self.base = base
        # Terminal 2: edit policy.yaml to use the mock ...
        with open(FIXTURE, encoding="utf-8") as f:
            text = f.read()
        case.assertIn(PRODUCTION, text)
        self.policy = os.path.join(base, "policy.yaml")
        with open(self.policy, "w", encoding="utf-8") as f:
            f.write(text.replace(PRODUCTION, f'base_url: "{self.fake.base_url}"    # Mock server'))
        if agent_with_token:
            write_agent(os.path.join(base, "context"), "agent-1", AGENT_SECRET)
        # ... then OPENROUTER_API_KEY="test-key" python -m execwall-or-gate.main
        env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": os.path.join(base, "context"),
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "CLLAMA_POLICY_FILE": self.policy,
            "CLLAMA_UI_TOKEN": UI_TOKEN,
            "OPENROUTER_API_KEY": OPENROUTER_KEY,
        }
        env.update(env_extra)
        self.env = env
        yield self.restart()
        pool = HTTPConnectionPool(reactor, persistent=False)
        case.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        return self

    @defer.inlineCallbacks
    def restart(self):
        """(Re)start the daemon on the same state."""
        self.process, _ = spawn_daemon(self.case, self.env)
        self.ports = yield self.process.ready
        self.api = f"http://127.0.0.1:{self.ports['API']}"
        self.ui = f"http://127.0.0.1:{self.ports['UI']}"

    @defer.inlineCallbacks
    def call(self, method: str, url: str, doc=None, headers=None):
        sent = {"Content-Type": ["application/json"]} if doc is not None else {}
        sent.update(headers or {})
        data = json.dumps(doc).encode() if doc is not None else None
        response = yield self.http.request(method, url, data=data, headers=sent)
        raw = yield response.content()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        return response, body

    def sent(self) -> dict:
        """What OpenRouter last received (the mock's openrouter_requests.log)."""
        return self.fake.received[-1].json

    def ledger_rows(self):
        db = sqlite3.connect(os.path.join(self.base, "state", "ledger.sqlite3"))
        try:
            return db.execute(
                "SELECT agent, provider, effective_model, status, cost_usd, priced FROM requests ORDER BY ts"
            ).fetchall()
        finally:
            db.close()


class ReadmeFlowWithOptInsTests(TestCase):
    """The README as written: one loopback port, X-Agent-ID, no credentials."""

    timeout = 90

    @defer.inlineCallbacks
    def test_every_step_works_as_written(self):
        flow = yield _Flow(self).start({"CLLAMA_TRUST_X_AGENT_ID": "1", "CLLAMA_CONSOLE_ON_API_PORT": "1"})
        api = flow.api
        yield flow.process.wait_for_stderr(b"CLLAMA_TRUST_X_AGENT_ID is on")
        self.assertIn(b"CLLAMA_CONSOLE_ON_API_PORT is on", flow.process.stderr)

        # curl -X POST .../v1/chat/completions -H "X-Agent-ID: agent-1" -d '{"messages": [...Hello]}'
        response, body = yield flow.call("POST", api + "/v1/chat/completions", HELLO, {"X-Agent-ID": ["agent-1"]})
        self.assertEqual(response.code, 200, body)
        sent = flow.sent()
        self.assertEqual((sent["model"], sent["models"], sent["route"]), (PREMIUM[0], PREMIUM, "fallback"))
        self.assertEqual(flow.fake.received[-1].header("authorization"), f"Bearer {OPENROUTER_KEY}")
        self.assertIsNone(flow.fake.received[-1].header("x-agent-id"))
        cost = body["usage"]["cost"]
        self.assertEqual(body["model"], PREMIUM[0])
        self.assertEqual(body["_execwall"], {
            "agent_id": "agent-1", "cost": round(cost, 6), "budget_remaining": round(50.0 - cost, 6),
            "models_allowed": PREMIUM, "original_model": "",
        })
        self.assertEqual(response.headers.getRawHeaders("x-cllama-agent-id"), ["agent-1"])
        self.assertEqual(float(response.headers.getRawHeaders("x-cllama-cost-usd")[0]), cost)
        self.assertAlmostEqual(float(response.headers.getRawHeaders("x-cllama-budget-remaining-usd")[0]), 50.0 - cost)
        self.assertEqual(response.headers.getRawHeaders("x-cllama-models-allowed"), [", ".join(PREMIUM)])

        # curl http://localhost:8080/api/spend/agent-1
        response, spend = yield flow.call("GET", api + "/api/spend/agent-1")
        self.assertEqual(response.code, 200, spend)
        self.assertEqual({k: spend[k] for k in (
            "agent_id", "budget_total", "budget_spent", "budget_remaining", "budget_source", "period",
            "period_reset", "hard_cap")}, {
            "agent_id": "agent-1", "budget_total": 50.0, "budget_spent": round(cost, 6),
            "budget_remaining": round(50.0 - cost, 6), "budget_source": "local", "period": "daily",
            "period_reset": utc_midnight(), "hard_cap": True,
        })
        self.assertEqual(spend["today"]["total_requests"], 1)  # ours, beside the gate's
        self.assertAlmostEqual(spend["today"]["total_cost_usd"], cost)

        # curl -X POST .../api/budget/agent-1 -d '{"budget_spent": 40.00}'
        response, updated = yield flow.call("POST", api + "/api/budget/agent-1", {"budget_spent": 40.00})
        self.assertEqual(response.code, 200, updated)
        self.assertEqual({k: updated[k] for k in ("status", "agent_id", "budget_total", "budget_spent")},
                         {"status": "updated", "agent_id": "agent-1", "budget_total": 50.0, "budget_spent": 40.0})

        # "Test with reduced budget (should use mid-tier models)": 20% is left,
        # below the 0.30 threshold, so the gate itself sends the economy tier.
        response, body = yield flow.call("POST", api + "/v1/chat/completions", WHAT_TIER, {"X-Agent-ID": ["agent-1"]})
        self.assertEqual(response.code, 200, body)
        self.assertEqual((flow.sent()["model"], flow.sent()["models"]), (ECONOMY[0], ECONOMY))
        self.assertEqual(body["_execwall"]["models_allowed"], ECONOMY)
        self.assertAlmostEqual(body["_execwall"]["budget_remaining"], 10.0 - body["usage"]["cost"], places=6)

        # The mid tier, and a threshold met exactly (the gate's >=): 80% left is premium.
        yield flow.call("POST", api + "/api/budget/agent-1", {"budget_spent": 30.00})
        response, body = yield flow.call("POST", api + "/v1/chat/completions", WHAT_TIER, {"X-Agent-ID": ["agent-1"]})
        self.assertEqual((response.code, flow.sent()["models"]), (200, MID))
        yield flow.call("POST", api + "/api/budget/agent-1", {"budget_spent": 10.00})
        response, body = yield flow.call("POST", api + "/v1/chat/completions", WHAT_TIER, {"X-Agent-ID": ["agent-1"]})
        self.assertEqual((response.code, flow.sent()["models"]), (200, PREMIUM))

        # curl -X POST .../api/budget/agent-1 -d '{"budget_spent": 50.00}'
        response, _ = yield flow.call("POST", api + "/api/budget/agent-1", {"budget_spent": 50.00})
        self.assertEqual(response.code, 200)
        # "Test exhausted budget (should return 402)"
        answered = len(flow.fake.received)
        response, refused = yield flow.call("POST", api + "/v1/chat/completions", HELLO, {"X-Agent-ID": ["agent-1"]})
        self.assertEqual(response.code, 402, refused)
        self.assertEqual(refused["detail"], {
            "error": "budget_exhausted", "agent_id": "agent-1", "budget_total": 50.0, "budget_spent": 50.0,
            "budget_remaining": 0.0, "budget_percentage": 0.0, "current_tier": 2, "models_allowed": ECONOMY,
            "hard_cap": True, "exhausted": True,
        })
        self.assertEqual(refused["error"]["code"], "budget_exceeded")
        self.assertEqual(len(flow.fake.received), answered)  # nothing went to OpenRouter

        # curl -X POST http://localhost:8080/api/reset/agent-1
        response, reset = yield flow.call("POST", api + "/api/reset/agent-1")
        self.assertEqual(response.code, 200, reset)
        self.assertEqual({k: reset[k] for k in ("status", "agent_id", "budget_spent")},
                         {"status": "reset", "agent_id": "agent-1", "budget_spent": 0.0})
        response, body = yield flow.call("POST", api + "/v1/chat/completions", HELLO, {"X-Agent-ID": ["agent-1"]})
        self.assertEqual((response.code, flow.sent()["models"]), (200, PREMIUM))

        # The default agent: no X-Agent-ID (as the gate), period none (lifetime), no hard cap.
        response, body = yield flow.call("POST", api + "/v1/chat/completions", HELLO)
        self.assertEqual(response.code, 200, body)
        self.assertEqual((body["_execwall"]["agent_id"], flow.sent()["models"]), ("default", ECONOMY))
        response, spend = yield flow.call("GET", api + "/api/spend/default")
        self.assertEqual((spend["period"], spend["hard_cap"], spend["budget_total"]), ("none", False, 10.0))

        # /api/health, /api/spend and /api/reload with the gate's fields.
        response, health = yield flow.call("GET", api + "/api/health")
        self.assertEqual(response.code, 200, health)
        self.assertEqual((health["status"], health["agents"], health["openrouter_url"]),
                         ("ok", ["agent-1", "default"], flow.fake.base_url))
        response, everyone = yield flow.call("GET", api + "/api/spend")
        self.assertEqual(everyone["agent-1"]["agent_id"], "agent-1")
        self.assertEqual(everyone["default"]["period"], "none")
        response, reloaded = yield flow.call("POST", api + "/api/reload")
        self.assertEqual((response.code, reloaded["status"], reloaded["agents"]), (200, "reloaded", ["agent-1", "default"]))

        # Every request is metered with what OpenRouter reported, in the ledger.
        yield flow.process.wait_for_audit(lambda lines: sum(1 for line in lines if line["type"] == "response") >= 6)
        rows = flow.ledger_rows()
        self.assertEqual([row[3] for row in rows].count(200), 6)
        self.assertTrue(all(row[1] == "openrouter" and row[5] == 1 for row in rows if row[3] == 200), rows)
        operator = [line for line in flow.process.audit_lines() if line["type"] == "operator"]
        self.assertIn("console@loopback", {line["actor"] for line in operator})

        # A restart keeps what counts: the lifetime budget's spend, the console's reset.
        response, before = yield flow.call("GET", api + "/api/spend")
        flow.process.transport.signalProcess("TERM")
        self.assertEqual((yield flow.process.ended), 0)
        yield flow.restart()
        response, after = yield flow.call("GET", flow.api + "/api/spend")
        for agent in ("agent-1", "default"):
            self.assertEqual(after[agent]["budget_spent"], before[agent]["budget_spent"])
        self.assertTrue(after["default"]["budget_spent"] > 0)


class ReadmeFlowAuthenticatedTests(TestCase):
    """The same flow without the opt-ins: the agent's token, the console on the UI port behind the operator token."""

    timeout = 90

    @defer.inlineCallbacks
    def test_same_flow_with_credentials(self):
        flow = yield _Flow(self).start({}, agent_with_token=True)
        api, ui = flow.api, flow.ui
        agent = {"Authorization": [f"Bearer agent-1:{AGENT_SECRET}"]}
        operator = {"Authorization": [f"Bearer {UI_TOKEN}"]}

        # As written: X-Agent-ID alone is no credential here, and nothing reaches OpenRouter.
        response, refused = yield flow.call("POST", api + "/v1/chat/completions", HELLO, {"X-Agent-ID": ["agent-1"]})
        self.assertEqual(response.code, 401, refused)
        self.assertEqual(refused["error"]["code"], "missing_credentials")
        self.assertEqual(flow.fake.received, [])
        # ... nor is the console on the API port.
        response, body = yield flow.call("GET", api + "/api/spend/agent-1")
        self.assertEqual(response.code, 404, body)
        self.assertNotIn("budget_total", json.dumps(body))

        # Adapted: the agent's token.
        response, body = yield flow.call("POST", api + "/v1/chat/completions", HELLO, agent)
        self.assertEqual(response.code, 200, body)
        self.assertEqual((flow.sent()["models"], flow.sent()["route"]), (PREMIUM, "fallback"))
        self.assertEqual(body["_execwall"]["models_allowed"], PREMIUM)
        cost = body["usage"]["cost"]

        # Adapted: the console on the UI port, with the operator token.
        response, body = yield flow.call("GET", ui + "/api/spend/agent-1")
        self.assertEqual(response.code, 401)
        response, spend = yield flow.call("GET", ui + "/api/spend/agent-1", headers=operator)
        self.assertEqual(response.code, 200, spend)
        self.assertEqual((spend["budget_spent"], spend["budget_total"], spend["budget_source"]),
                         (round(cost, 6), 50.0, "local"))
        response, updated = yield flow.call("POST", ui + "/api/budget/agent-1", {"budget_spent": 40.00}, operator)
        self.assertEqual((response.code, updated["status"], updated["budget_spent"]), (200, "updated", 40.0))
        response, body = yield flow.call("POST", api + "/v1/chat/completions", WHAT_TIER, agent)
        self.assertEqual((response.code, flow.sent()["models"]), (200, ECONOMY))

        # budget_total too: a limit the console sets, which a reset keeps (as the gate's).
        response, updated = yield flow.call("POST", ui + "/api/budget/agent-1", {"budget_total": 100.0}, operator)
        self.assertEqual((updated["budget_total"], updated["budget_spent"]), (100.0, round(40.0 + body["usage"]["cost"], 6)))
        response, spend = yield flow.call("GET", ui + "/api/spend/agent-1", headers=operator)
        self.assertEqual(spend["budget_source"], "console")

        response, _ = yield flow.call("POST", ui + "/api/budget/agent-1", {"budget_spent": 100.0}, operator)
        self.assertEqual(response.code, 200)
        response, refused = yield flow.call("POST", api + "/v1/chat/completions", HELLO, agent)
        self.assertEqual(response.code, 402, refused)
        self.assertEqual(refused["detail"]["error"], "budget_exhausted")
        self.assertEqual(refused["detail"]["budget_total"], 100.0)

        response, reset = yield flow.call("POST", ui + "/api/reset/agent-1", headers=operator)
        self.assertEqual((response.code, reset["status"], reset["budget_spent"]), (200, "reset", 0.0))
        response, spend = yield flow.call("GET", ui + "/api/spend/agent-1", headers=operator)
        self.assertEqual((spend["budget_total"], spend["budget_spent"]), (100.0, 0.0))
        response, body = yield flow.call("POST", api + "/v1/chat/completions", HELLO, agent)
        self.assertEqual((response.code, flow.sent()["models"]), (200, PREMIUM))

        # The gate's 404 detail for an agent its file does not name, and its 400 for an empty change.
        response, missing = yield flow.call("POST", ui + "/api/budget/nobody", {"budget_total": 5}, operator)
        self.assertEqual((response.code, missing["detail"]), (404, "agent not found"))
        response, missing = yield flow.call("GET", ui + "/api/spend/nobody", headers=operator)
        self.assertEqual((response.code, missing["detail"]), (404, {"error": "agent_not_found", "agent_id": "nobody"}))
        response, empty = yield flow.call("POST", ui + "/api/budget/agent-1", {}, operator)
        self.assertEqual((response.code, empty["detail"]), (400, "budget_total or budget_spent required"))
        response, health = yield flow.call("GET", ui + "/api/health", headers=operator)
        self.assertEqual((health["status"], health["agents"], health["agent_count"]), ("ok", ["agent-1", "default"], 1))
