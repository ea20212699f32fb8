"""
Virtual keys end to end: minted through the LiteLLM-compatible key API,
used by both official SDKs, expired, updated, deleted, scoped to models,
budgeted per key and per team, and billed through the export APIs.
"""

import json
import os

import anthropic
import openai
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cllama_tx.identity.virtual_keys import hash_key
from cllama_tx.testing import Reply, anthropic_message, openai_completion
from tests.secret_scan import SCANNER
from tests.support import MASTER_KEY, ProxyHarness, chat_body

PRICES = {"openai": {"gpt-test": {"input": 2.0, "output": 8.0}}, "anthropic": {"claude-test": {"input": 3.0, "output": 15.0}}}


class OffsetClock:
    """The real clock, plus a jump the test controls (expiry to the second)."""

    def __init__(self):
        self.offset = 0.0

    def seconds(self):
        return reactor.seconds() + self.offset

    def callLater(self, delay, f, *args, **kwargs):
        return reactor.callLater(delay, f, *args, **kwargs)


class KeysCase(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        prices = os.path.abspath(self.mktemp())
        with open(prices, "w") as f:
            json.dump(PRICES, f)
        self.clock = OffsetClock()
        self.h = yield ProxyHarness(
            self, pricing_file=prices, fake_providers=("openai", "anthropic"), key_clock=self.clock
        ).start()

    @defer.inlineCallbacks
    def admin(self, path, doc=None, master=MASTER_KEY, method="post"):
        headers = {"Authorization": [f"Bearer {master}"], "Content-Type": ["application/json"]}
        if method == "post":
            response = yield self.h.http.post(self.h.base_url + path, data=json.dumps(doc or {}).encode(), headers=headers)
        else:
            response = yield self.h.http.get(self.h.base_url + path, headers=headers)
        body = yield response.json()
        return response.code, body

    @defer.inlineCallbacks
    def mint(self, **fields):
        code, body = yield self.admin("/key/generate", fields)
        self.assertEqual(code, 200, body)
        SCANNER.register(body["key"])
        return body["key"]

    def chat(self, key, model="openai/gpt-test", **extra):
        return self.h.chat(chat_body(model=model, **extra), token=key)


class KeyLifecycleTests(KeysCase):
    @defer.inlineCallbacks
    def test_both_sdks_and_attribution(self):
        key = yield self.mint(user_id="alice", team_id="acme", key_alias="sandbox-1", duration="1h")
        self.assertTrue(key.startswith("sk-") and len(key) >= 35)
        self.h.fake.enqueue(
            Reply(json=openai_completion("hi from openai", "gpt-test", 10, 5)),
            Reply(json=anthropic_message("hi from claude", "claude-test", 10, 5)),
        )
        oa = openai.OpenAI(base_url=self.h.base_url + "/v1", api_key=key, max_retries=0)
        an = anthropic.Anthropic(base_url=self.h.base_url, api_key=key, max_retries=0)
        self.addCleanup(oa.close)
        self.addCleanup(an.close)
        completion = yield deferToThread(
            lambda: oa.chat.completions.create(model="openai/gpt-test", messages=[{"role": "user", "content": "hi"}])
        )
        self.assertEqual(completion.choices[0].message.content, "hi from openai")
        message = yield deferToThread(
            lambda: an.messages.create(model="anthropic/claude-test", max_tokens=20, messages=[{"role": "user", "content": "hi"}])
        )
        self.assertEqual(message.content[0].text, "hi from claude")
        for received in self.h.fake.received:
            self.assertNotIn(key, json.dumps(received.headers))
        yield self.h.committed()
        rows = yield self.h.ledger_rows()
        self.assertEqual({(r["key_id"], r["team_id"], r["user_id"], r["agent"]) for r in rows}, {(hash_key(key), "acme", "alice", "alice")})
        self.assertEqual({line["claw_id"] for line in self.h.audit_lines() if line["type"] == "response"}, {"alice"})
        costs = self.h.ledger.totals().costs_api()
        self.assertEqual(costs["agents"]["alice"]["total_requests"], 2)
        code, info = yield self.admin(f"/key/info?key={key}", method="get")
        self.assertEqual(code, 200)
        self.assertAlmostEqual(info["info"]["spend"], sum(r["cost_usd"] for r in rows), places=9)
        self.assertNotIn(key, json.dumps(info))

    @defer.inlineCallbacks
    def test_expiry_to_the_second(self):
        key = yield self.mint(duration="30s")
        self.h.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 1, 1)))
        self.clock.offset = 29.0
        ok = yield self.chat(key)
        self.assertEqual(ok.code, 200)
        yield ok.content()
        self.clock.offset = 30.5
        expired = yield self.chat(key)
        self.assertEqual(expired.code, 401)
        self.assertIn("expired", (yield expired.json())["error"]["message"])

    @defer.inlineCallbacks
    def test_update_then_delete(self):
        key = yield self.mint(models=["openai/gpt-test"])
        refused = yield self.chat(key, model="anthropic/claude-test")
        self.assertEqual(refused.code, 403)
        error = (yield refused.json())["error"]
        self.assertEqual((error["type"], error["param"], error["code"]), ("key_model_access_denied", "model", "403"))
        code, body = yield self.admin("/key/update", {"key": key, "models": ["anthropic/claude-test"]})
        self.assertEqual(code, 200, body)
        self.h.fake.enqueue(Reply(json=anthropic_message("ok", "claude-test", 1, 1)))
        allowed = yield self.chat(key, model="anthropic/claude-test")
        self.assertEqual(allowed.code, 200)
        yield allowed.content()
        code, body = yield self.admin("/key/delete", {"keys": [key]})
        self.assertEqual(code, 200, body)
        gone = yield self.chat(key, model="anthropic/claude-test")
        self.assertEqual(gone.code, 401)

    @defer.inlineCallbacks
    def test_master_key_is_required(self):
        code, body = yield self.admin("/key/generate", {}, master="sk-not-the-master-key-000000")
        self.assertEqual(code, 401)
        self.assertIn("error", body)
        unknown = yield self.chat("sk-" + "x" * 43)
        self.assertEqual(unknown.code, 401)

    @defer.inlineCallbacks
    def test_key_budget_and_rate_limit(self):
        key = yield self.mint(max_budget=0.00001, rpm_limit=100)
        refused = yield self.chat(key, max_tokens=1000)
        self.assertEqual(refused.code, 422)
        error = (yield refused.json())["error"]
        self.assertEqual((error["type"], error["code"]), ("budget_exceeded", "422"))
        self.assertTrue(error["message"].startswith("Budget has been exceeded! Key=sk-..."), error)
        limited = yield self.mint(rpm_limit=1)
        self.h.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 1, 1)))
        first = yield self.chat(limited)
        yield first.content()
        second = yield self.chat(limited)
        self.assertEqual((first.code, second.code), (200, 429))

    @defer.inlineCallbacks
    def test_health_endpoints(self):
        live = yield self.h.http.get(self.h.base_url + "/health/liveliness")
        self.assertEqual(live.code, 200)
        ready = yield self.h.http.get(self.h.base_url + "/health/readiness")
        self.assertEqual(ready.code, 200)
        self.assertEqual((yield ready.json())["status"], "healthy")


class TeamAndBillingTests(KeysCase):
    @defer.inlineCallbacks
    def test_team_budget_across_keys_under_concurrency(self):
        body = chat_body(model="openai/gpt-test", max_tokens=1000)
        worst = (len(json.dumps(body).encode()) * 2.0 + 1000 * 8.0) / 1e6
        code, team = yield self.admin("/team/new", {"team_id": "acme", "max_budget": worst * 5.5})
        self.assertEqual(code, 200, team)
        keys = []
        for i in range(3):
            keys.append((yield self.mint(team_id="acme", user_id=f"user{i}")))
        gate = defer.Deferred()
        for _ in range(30):
            self.h.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 30, 900), hold_until=gate))
        refused = [0]

        def count(line):
            if line["type"] == "error" and line["status_code"] == 429:
                refused[0] += 1
            return refused[0] == 25

        all_refused = self.h.wait_for_audit(count)
        responses = [self.h.chat(body, token=keys[i % 3]) for i in range(30)]
        yield all_refused
        yield self.h.fake.wait_for_request(5)
        self.assertEqual(len(self.h.fake.received), 5)
        gate.callback(None)
        done = yield defer.gatherResults(responses)
        for r in done:
            yield r.content()
        self.assertEqual(sorted(r.code for r in done).count(200), 5)
        yield self.h.committed()
        rows = yield self.h.ledger_rows()
        self.assertLessEqual(sum(r["cost_usd"] for r in rows), worst * 5.5)

    @defer.inlineCallbacks
    def test_billing_consumer_sees_every_row_exactly_once(self):
        key = yield self.mint(team_id="acme", user_id="bob")
        seen, cursor = [], 0
        for i in range(20):
            self.h.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 10, 10)))
            response = yield self.chat(key)
            yield response.content()
            if i % 3 == 0:  # the worker polls while traffic runs
                code, page = yield self.admin(f"/api/spend/events?after={cursor}&limit=4", method="get")
                self.assertEqual(code, 200)
                seen.extend(page["events"])
                cursor = page["next_cursor"]
        yield self.h.committed()
        while True:
            code, page = yield self.admin(f"/api/spend/events?after={cursor}&limit=4", method="get")
            if not page["events"]:
                break
            seen.extend(page["events"])
            cursor = page["next_cursor"]
        rows = yield self.h.ledger_rows()
        self.assertEqual([e["cllama_request_id"] for e in seen], [r["request_id"] for r in rows])
        # LiteLLM's request_id is the answer's id, as the client saw it.
        self.assertEqual([e["request_id"] for e in seen], [r["response_id"] for r in rows])
        self.assertTrue(all(r["response_id"] for r in rows))
        self.assertEqual(len(seen), 20)
        self.assertTrue(all(e["api_key"] == hash_key(key) and e["team_id"] == "acme" for e in seen))
        code, logs = yield self.admin("/spend/logs?team_id=acme&start_date=2000-01-01", method="get")
        self.assertEqual((code, len(logs)), (200, 20))
        self.assertAlmostEqual(sum(line["spend"] for line in logs), sum(r["cost_usd"] for r in rows), places=9)
        code, none = yield self.admin("/spend/logs?end_date=2000-01-01", method="get")
        self.assertEqual(none, [])
