"""
Numbers the operator can trust: C{/costs/api}, C{/api/spend} and the UI's
JSON twins against a direct SQL sum over the ledger file, after real traffic
through the proxy (loopback sockets, fake providers speaking both wire
formats with cache reads and writes, JSON and streams), a model name refused
before routing, a model the provider answers 404 for, and a free
C{count_tokens} call.
"""

from __future__ import annotations

import json
import os
import sqlite3

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from cllama_tx.testing import (
    Reply,
    anthropic_message,
    anthropic_sse_events,
    anthropic_stream_events,
    openai_completion,
    openai_error,
    openai_sse_events,
    openai_stream_chunks,
)
from tests.support import AGENT, SECRET, UI_TOKEN, ProxyHarness, chat_body, write_agent

SSE = {"content-type": "text/event-stream"}
AUTH = {"Authorization": f"Bearer {UI_TOKEN}"}

# USD per million tokens, chosen so that every cost below is exact.
PRICES = {
    "openai": {"gpt-test": {"input": 2.0, "output": 8.0, "cache_read": 0.5}},
    "anthropic": {"claude-test": {"input": 3.0, "output": 15.0, "cache_read": 0.3, "cache_write": 3.75}},
}


def messages_body(stream: bool = False) -> dict:
    doc = {"model": "anthropic/claude-test", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        doc["stream"] = True
    return doc


def sql(path: str, query: str, *args):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


class NumbersCase(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        pricing = os.path.abspath(self.mktemp())
        with open(pricing, "w") as f:
            json.dump(PRICES, f)
        self.h = yield ProxyHarness(self, pricing_file=pricing, fake_providers=("openai", "anthropic")).start()
        # A request budget, so the Budgets page counts requests.
        write_agent(
            self.h.context_root, AGENT, SECRET,
            budget={"max_requests": 100, "window": "24h", "behavior": "hard_stop"},
        )

    @defer.inlineCallbacks
    def get(self, path: str):
        response = yield self.h.ui_client.get("http://ui" + path, headers={**AUTH, "Accept": "application/json"})
        self.assertEqual(response.code, 200, path)
        return (yield response.json())

    @defer.inlineCallbacks
    def cached_pair(self):
        """
        The issue's figures: 1,200 OpenAI prompt tokens (32 read from the
        cache) and 1,638 Anthropic ones (1,606 plain, 20 read, 12 written):
        2,838 prompt tokens, which the views showed as 2,902.
        """
        self.h.fake.enqueue(
            Reply(json=openai_completion("one", "gpt-test", 1200, 50, cached_tokens=32)),
            Reply(json=anthropic_message("two", "claude-test", 1606, 20, cache_read_input_tokens=20,
                                         cache_creation_input_tokens=12)),
        )
        r1 = yield self.h.chat(chat_body(model="openai/gpt-test"))
        self.assertEqual((yield r1.json())["usage"]["prompt_tokens"], 1200)
        r2 = yield self.h.post("/v1/messages", messages_body())
        self.assertEqual((yield r2.json())["usage"]["input_tokens"], 1606)
        yield self.h.committed()


class IssueFiguresTests(NumbersCase):
    @defer.inlineCallbacks
    def test_cache_tokens_counted_once_in_every_view(self):
        yield self.cached_pair()
        rows = sql(
            self.h.ledger.path,
            "SELECT provider, input_tokens, cache_read_tokens, cache_write_tokens FROM requests ORDER BY id",
        )
        # Stored: plain input apart from the cache tokens.
        self.assertEqual(rows, [("openai", 1168, 32, 0), ("anthropic", 1606, 20, 12)])

        costs = yield self.get("/costs/api")
        models = costs["agents"][AGENT]["models"]
        self.assertEqual(
            {(m["provider"], m["model"]): m["input_tokens"] for m in models},
            {("anthropic", "claude-test"): 1638, ("openai", "gpt-test"): 1200},
        )
        self.assertEqual(sum(m["input_tokens"] for m in models), 2838)

        spend = yield self.get("/api/spend")
        for period in ("today", "month", "all_time"):
            p = spend[period]
            self.assertEqual(
                (p["prompt_tokens"], p["input_tokens"], p["cache_read_tokens"], p["cache_write_tokens"]),
                (2838, 2774, 52, 12),
                period,
            )
        self.assertIn("prompt_tokens", spend["counts"]["tokens"])

        overview = yield self.get("/")
        self.assertEqual(overview["spend"]["all_time"]["prompt_tokens"], 2838)
        self.assertEqual(overview["spend"]["today"]["tokens"], 2838 + 70)
        costs_page = yield self.get("/costs?period=all")
        self.assertEqual(costs_page["total"]["prompt_tokens"], 2838)
        self.assertEqual(sum(r["prompt_tokens"] for r in costs_page["rows"]), 2838)
        agents = yield self.get("/agents")
        self.assertEqual(agents["agents"][0]["all_time"]["prompt_tokens"], 2838)
        recent = yield self.get("/requests")
        self.assertEqual(sorted(r["input_tokens"] for r in recent["requests"]), [1200, 1638])

        # The audit's tokens_in is every prompt token, as the contract says.
        responses = [line for line in self.h.audit_lines() if line["type"] == "response"]
        self.assertEqual(
            [(line["tokens_in"], line["cached_tokens"], line["cache_write_tokens"]) for line in responses],
            [(1200, 32, 0), (1638, 20, 12)],
        )
        # Dollars were right before and stay right.
        expected = ((1168 * 2.0 + 32 * 0.5 + 50 * 8.0) + (1606 * 3.0 + 20 * 0.3 + 12 * 3.75 + 20 * 15.0)) / 1e6
        self.assertAlmostEqual(costs["total_cost_usd"], expected, places=12)

    @defer.inlineCallbacks
    def test_billing_export_counts_cache_once(self):
        yield self.cached_pair()
        rows, _ = yield self.h.ledger.rows_after(0, 10)
        from cllama_tx.sites.billing import spend_log

        logs = [spend_log(r) for r in rows]
        self.assertEqual([(line["prompt_tokens"], line["total_tokens"]) for line in logs], [(1200, 1250), (1638, 1658)])


class EveryViewAgreesWithTheLedgerTests(NumbersCase):
    @defer.inlineCallbacks
    def traffic(self):
        yield self.cached_pair()
        self.h.fake.enqueue(
            Reply(sse=openai_sse_events(openai_stream_chunks(["a", "b"], "gpt-test", 400, 10, cached_tokens=100)),
                  headers=SSE),
            Reply(sse=anthropic_sse_events(anthropic_stream_events(
                ["Hel", "lo"], "claude-test", 50, 30, cache_read_input_tokens=300, cache_creation_input_tokens=40)),
                headers=SSE),
            # A name the provider does not know: it reaches the provider, which answers 404.
            Reply(status=404, json=openai_error("The model `gpt-nope` does not exist", "invalid_request_error",
                                                "model_not_found")),
        )
        yield (yield self.h.chat(chat_body(model="openai/gpt-test", stream=True))).content()
        yield (yield self.h.post("/v1/messages", messages_body(stream=True))).content()
        missing = yield self.h.chat(chat_body(model="openai/gpt-nope"))
        self.assertEqual(missing.code, 404)
        yield missing.content()
        # Names refused before routing: no provider, no model.
        for name in ("nonexistent-model-xyz", "bogus/model"):
            refused = yield self.h.chat(chat_body(model=name))
            self.assertEqual(refused.code, 400)
            self.assertIn(name, (yield refused.json())["error"]["message"])
        # Free token counting: answered, audited, not a request anywhere.
        counted = yield self.h.post(
            "/v1/messages/count_tokens",
            {"model": "anthropic/claude-test", "messages": [{"role": "user", "content": "hi"}]},
        )
        self.assertEqual(counted.code, 200)
        self.assertIn("input_tokens", (yield counted.json()))
        yield self.h.committed()

    def ledger_sums(self, where: str = "1"):
        """(requests, errors, plain input, cache read, cache write, output, cost) over C{where}."""
        [row] = sql(
            self.h.ledger.path,
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN status < 200 OR status >= 400 THEN 1 ELSE 0 END), 0), "
            "COALESCE(SUM(input_tokens), 0), COALESCE(SUM(cache_read_tokens), 0), "
            "COALESCE(SUM(cache_write_tokens), 0), COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost_usd), 0) "
            f"FROM requests WHERE {where}",
        )
        return row

    def assertPeriodEqualsLedger(self, period: dict, where: str = "1", what: str = "") -> None:
        n, errors, plain, read, write, output, cost = self.ledger_sums(where)
        self.assertEqual(
            (period["total_requests"], period["errors"], period["input_tokens"], period["cache_read_tokens"],
             period["cache_write_tokens"], period["prompt_tokens"], period["output_tokens"]),
            (n, errors, plain, read, write, plain + read + write, output),
            what,
        )
        self.assertAlmostEqual(period["total_cost_usd"], cost, places=9, msg=what)

    def assertBriefEqualsLedger(self, brief: dict, what: str) -> None:
        n, errors, plain, read, write, output, cost = self.ledger_sums()
        self.assertEqual(
            (brief["requests"], brief["errors"], brief["prompt_tokens"], brief["output_tokens"],
             brief["tokens"], brief["cache_read_tokens"], brief["cache_write_tokens"]),
            (n, errors, plain + read + write, output, plain + read + write + output, read, write),
            what,
        )
        self.assertAlmostEqual(brief["cost_usd"], cost, places=9, msg=what)
        [(unrouted,)] = sql(self.h.ledger.path, "SELECT COUNT(*) FROM requests WHERE provider IS NULL")
        self.assertEqual(brief["unrouted_requests"], unrouted, what)

    @defer.inlineCallbacks
    def test_views_equal_sql_sums(self):
        yield self.traffic()
        path = self.h.ledger.path
        # The ledger holds every request but the free count: 4 served, one
        # 404 from the provider, two refused before routing.
        self.assertEqual(
            sql(path, "SELECT requested_model, provider, effective_model, status FROM requests ORDER BY id"),
            [
                ("openai/gpt-test", "openai", "gpt-test", 200),
                ("anthropic/claude-test", "anthropic", "claude-test", 200),
                ("openai/gpt-test", "openai", "gpt-test", 200),
                ("anthropic/claude-test", "anthropic", "claude-test", 200),
                ("openai/gpt-nope", "openai", "gpt-nope", 404),
                ("nonexistent-model-xyz", None, None, 400),
                ("bogus/model", None, None, 400),
            ],
        )
        self.assertEqual(
            self.ledger_sums("provider IS NOT NULL")[2:6],
            (1168 + 1606 + 300 + 50, 32 + 20 + 100 + 300, 12 + 40, 50 + 20 + 10 + 30),
        )

        # /costs/api: the contract's record of requests that reached a provider.
        costs = yield self.get("/costs/api")
        per_model = sql(
            path,
            "SELECT provider, effective_model, COUNT(*), SUM(priced), SUM(1 - priced), "
            "SUM(input_tokens + cache_read_tokens + cache_write_tokens), SUM(output_tokens), SUM(cost_usd) "
            "FROM requests WHERE agent IS NOT NULL AND provider IS NOT NULL AND effective_model IS NOT NULL "
            "GROUP BY 1, 2 ORDER BY 1, 2",
        )
        models = costs["agents"][AGENT]["models"]
        self.assertEqual(
            [(m["provider"], m["model"], m["requests"], m["priced_requests"], m["unpriced_requests"],
              m["input_tokens"], m["output_tokens"]) for m in models],
            [r[:7] for r in per_model],
        )
        for m, r in zip(models, per_model, strict=True):
            self.assertAlmostEqual(m["cost_usd"], r[7], places=9)
        metered = self.ledger_sums("provider IS NOT NULL AND effective_model IS NOT NULL")
        self.assertEqual(costs["total_requests"], metered[0])
        self.assertAlmostEqual(costs["total_cost_usd"], metered[6], places=9)

        # /api/spend: every request of the agent, refused ones included.
        spend = yield self.get("/api/spend")
        for period in ("today", "month", "all_time"):
            self.assertPeriodEqualsLedger(spend[period], what=f"/api/spend {period}")
            self.assertPeriodEqualsLedger(spend["agents"][AGENT][period], f"agent = '{AGENT}'", f"agent {period}")
        self.assertEqual(spend["all_time"]["unrouted_requests"], 2)
        unrouted = spend["all_time"]["models"][-1]
        self.assertEqual(
            (unrouted["provider"], unrouted["model"], unrouted["routed"], unrouted["requests"], unrouted["errors"],
             unrouted["unpriced_requests"], unrouted["pricing_status"]),
            ("(unrouted)", "(unrouted)", False, 2, 2, 0, "unrouted"),
        )
        self.assertEqual(set(spend["counts"]), {"requests", "tokens", "cost"})
        one = yield self.get(f"/api/spend/{AGENT}")
        self.assertPeriodEqualsLedger(one["all_time"], what="/api/spend/<agent>")

        # The UI's JSON twins.
        overview = yield self.get("/")
        for period in ("today", "month", "all_time"):
            self.assertBriefEqualsLedger(overview["spend"][period], f"overview {period}")
        [card] = overview["agent_spend"]
        self.assertBriefEqualsLedger(card["month"], "overview agent month")
        self.assertEqual(overview["ledger"]["unrouted_requests"], 2)
        self.assertEqual(overview["ledger"]["requests"], 7)
        self.assertNotIn("(unrouted)", [m["model"] for m in overview["top_models"]])
        self.assertIn("refused ones included", overview["counts"]["requests"])

        costs_page = yield self.get("/costs?period=all")
        self.assertBriefEqualsLedger(costs_page["total"], "costs total")
        self.assertBriefEqualsLedger(costs_page["agents"][0], "costs agent")
        self.assertEqual(sum(r["requests"] for r in costs_page["rows"]), 7)
        self.assertEqual(sum(r["prompt_tokens"] for r in costs_page["rows"]), costs_page["total"]["prompt_tokens"])
        csv_text = (yield (yield self.h.ui_client.get("http://ui/costs.csv?period=all", headers=AUTH)).text())
        self.assertIn("(unrouted),(unrouted),2,2,0,0,0,0,0,0,0,0,unrouted", csv_text)
        # The HTML page: the unrouted row says so, and does not ask for a price.
        page = yield self.h.ui_client.get("http://ui/costs?period=all", headers={**AUTH, "Accept": "text/html"})
        html = yield page.text()
        self.assertIn('title="2 requests refused before routing: no provider was asked">unrouted</span>', html)
        self.assertNotIn("of 2 requests had no price", html)

        agents = yield self.get("/agents")
        [card] = agents["agents"]
        self.assertBriefEqualsLedger(card["all_time"], "agent card")
        self.assertEqual(
            sum(m["requests"] for m in card["models"]) + card["all_time"]["unrouted_requests"],
            card["all_time"]["requests"],
        )

        recent = yield self.get("/requests")
        by_id = {r["request_id"]: r for r in recent["requests"]}
        for request_id, prompt, read, write in sql(
            path, "SELECT request_id, input_tokens + cache_read_tokens + cache_write_tokens, "
                  "cache_read_tokens, cache_write_tokens FROM requests"
        ):
            entry = by_id[request_id]
            self.assertEqual((entry["input_tokens"], entry["cache_read_tokens"], entry["cache_write_tokens"]),
                             (prompt, read, write))

    @defer.inlineCallbacks
    def test_count_tokens_is_no_request_on_the_budgets_page(self):
        yield self.traffic()
        budgets = yield self.get("/budgets")
        [state] = budgets["agents"]
        [(served,)] = sql(
            self.h.ledger.path, "SELECT COUNT(*) FROM requests WHERE status >= 200 AND status < 300"
        )
        self.assertEqual(served, 4)
        self.assertEqual(state["usage"]["requests"], served)
        self.assertEqual(state["usage"]["reserved_requests"], 0)
        self.assertIn("count_tokens", budgets["counts"]["requests"])
        # The call was answered and audited, and is no ledger row.
        [counted] = [line for line in self.h.audit_lines() if line["type"] == "request" and line["path"].endswith("/count_tokens")]
        answered = [line for line in self.h.audit_lines()
                    if line["type"] == "response" and line["request_id"] == counted["request_id"]]
        self.assertEqual([line["status_code"] for line in answered], [200])
        self.assertEqual(sql(self.h.ledger.path, "SELECT COUNT(*) FROM requests WHERE request_id = ?",
                             counted["request_id"]), [(0,)])
        self.assertEqual(sql(self.h.ledger.path, "SELECT COUNT(*) FROM requests"), [(7,)])

    @defer.inlineCallbacks
    def test_pricing_lists_only_models_that_were_served(self):
        yield self.traffic()
        pricing = yield self.get("/pricing")
        listed = [(e["provider"], e["model"]) for e in pricing["unpriced"] + pricing["priced"]]
        self.assertEqual(listed, [("anthropic", "claude-test"), ("openai", "gpt-test")])
        self.assertEqual(pricing["unpriced"], [])
        self.assertEqual(pricing["snippet"], {})
        self.assertEqual(pricing["unpriced_requests"], 0)
        self.assertIn("404", pricing["counts"]["models"])
        overview = yield self.get("/")
        self.assertFalse([a for a in overview["attention"] if "without a price" in a["text"]])
        # A model served without a price is still asked for.
        self.h.fake.enqueue(Reply(json=openai_completion("x", "gpt-unpriced", 10, 2)))
        yield (yield self.h.chat(chat_body(model="openai/gpt-unpriced"))).content()
        yield self.h.committed()
        pricing = yield self.get("/pricing")
        self.assertEqual([(e["provider"], e["model"], e["unpriced_requests"]) for e in pricing["unpriced"]],
                         [("openai", "gpt-unpriced", 1)])
        self.assertEqual(pricing["snippet"], {"openai": {"gpt-unpriced": {"input": 0.0, "output": 0.0}}})
