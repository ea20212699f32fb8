"""
Metering ground truth: for each wire format, stream or not, with or without
include_usage, with cache tokens, the ledger records exactly what the fake
provider reported, priced to the cent by a known table; failures and
disconnects are billed too.
"""

import json
import os

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from cllama_tx.accounting.usage import estimate_prompt_tokens
from cllama_tx.testing import (
    Reply,
    anthropic_message,
    anthropic_sse_events,
    anthropic_stream_events,
    openai_completion,
    openai_error,
    openai_sse_events,
    openai_stream_chunks,
    parse_sse,
)
from tests.support import AGENT, PROVIDER_KEY, SECRET, UI_TOKEN, ProxyHarness, chat_body
from tests.test_relay import _request_bytes, _StreamingClient

SSE = {"content-type": "text/event-stream"}

# USD per million tokens, chosen so that every cost below is exact.
PRICES = {
    "openai": {"gpt-test": {"input": 2.0, "output": 8.0, "cache_read": 0.5}},
    "anthropic": {"claude-test": {"input": 3.0, "output": 15.0, "cache_read": 0.3, "cache_write": 3.75}},
}


def openai_cost(prompt, completion, cached=0):
    return ((prompt - cached) * 2.0 + cached * 0.5 + completion * 8.0) / 1e6


def anthropic_cost(inp, out, read=0, write=0):
    return (inp * 3.0 + out * 15.0 + read * 0.3 + write * 3.75) / 1e6


class MeteringCase(TestCase):
    fake_providers = ("openai", "anthropic", "openrouter")

    @defer.inlineCallbacks
    def setUp(self):
        pricing = os.path.abspath(self.mktemp())
        with open(pricing, "w") as f:
            json.dump(PRICES, f)
        self.history_dir = os.path.abspath(self.mktemp())
        self.h = yield ProxyHarness(
            self, pricing_file=pricing, fake_providers=self.fake_providers, history_dir=self.history_dir
        ).start()

    @defer.inlineCallbacks
    def only_row(self):
        yield self.h.committed()
        rows = yield self.h.ledger_rows()
        self.assertEqual(len(rows), 1, rows)
        return rows[0]

    def assertCost(self, actual, expected):
        self.assertAlmostEqual(actual, expected, places=12)


class OpenAIMeteringTests(MeteringCase):
    @defer.inlineCallbacks
    def test_json_with_cache_tokens(self):
        self.h.fake.enqueue(Reply(json=openai_completion("hi", "gpt-test", 1200, 300, cached_tokens=1000)))
        response = yield self.h.chat(chat_body(model="openai/gpt-test"))
        body = yield response.json()
        self.assertEqual(body["usage"]["prompt_tokens"], 1200)  # body untouched
        row = yield self.only_row()
        # The row keeps plain input apart from the cache reads (1200 - 1000).
        self.assertEqual(
            (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"]), (200, 300, 1000)
        )
        expected = openai_cost(1200, 300, 1000)
        self.assertCost(row["cost_usd"], expected)
        self.assertTrue(row["priced"])
        self.assertFalse(row["estimated"])
        self.assertEqual(row["agent"], AGENT)
        self.assertEqual((row["provider"], row["requested_model"], row["effective_model"]), ("openai", "openai/gpt-test", "gpt-test"))
        self.assertEqual(row["status"], 200)
        self.assertFalse(row["stream"])
        self.assertIsNotNone(row["ttfb_ms"])
        self.assertCost(float(response.headers.getRawHeaders("x-cllama-cost-usd")[0]), expected)
        self.assertEqual(response.headers.getRawHeaders("x-cllama-request-id")[0], row["request_id"])
        response_line = [line for line in self.h.audit_lines() if line["type"] == "response"][0]
        self.assertEqual(
            {k: response_line[k] for k in ("tokens_in", "tokens_out", "cached_tokens", "cache_write_tokens", "estimated")},
            {"tokens_in": 1200, "tokens_out": 300, "cached_tokens": 1000, "cache_write_tokens": 0, "estimated": False},
        )
        self.assertCost(response_line["cost_usd"], expected)

    @defer.inlineCallbacks
    def test_stream_without_include_usage(self):
        """Usage is asked for upstream, metered, and hidden from the agent."""
        chunks = openai_stream_chunks(["a", "b"], "gpt-test", 40, 10, cached_tokens=20)
        events = openai_sse_events(chunks)
        self.h.fake.enqueue(Reply(sse=events, headers=SSE))
        response = yield self.h.chat(chat_body(model="openai/gpt-test", stream=True))
        body = yield response.content()
        self.assertEqual(body, b"".join(events[:-2]) + events[-1])
        self.assertEqual(self.h.fake.received[0].json["stream_options"], {"include_usage": True})
        row = yield self.only_row()
        self.assertEqual((row["input_tokens"], row["output_tokens"], row["cache_read_tokens"]), (20, 10, 20))
        self.assertCost(row["cost_usd"], openai_cost(40, 10, 20))
        self.assertTrue(row["stream"])

    @defer.inlineCallbacks
    def test_stream_with_include_usage_gets_the_cost(self):
        chunks = openai_stream_chunks(["a", "b"], "gpt-test", 40, 10)
        self.h.fake.enqueue(Reply(sse=openai_sse_events(chunks), headers=SSE))
        response = yield self.h.chat(
            chat_body(model="openai/gpt-test", stream=True, stream_options={"include_usage": True})
        )
        events = parse_sse((yield response.content()))
        usage_chunk = json.loads(events[-2][1])
        self.assertEqual(usage_chunk["choices"], [])
        self.assertCost(usage_chunk["usage"]["cost"], openai_cost(40, 10))
        self.assertEqual(usage_chunk["usage"]["prompt_tokens"], 40)
        self.assertEqual(self.h.fake.received[0].json["stream_options"], {"include_usage": True})
        row = yield self.only_row()
        self.assertCost(row["cost_usd"], openai_cost(40, 10))

    @defer.inlineCallbacks
    def test_openrouter_reported_cost_is_trusted(self):
        completion = openai_completion("hi", "x", 10, 5)
        completion["usage"]["cost"] = 0.01234
        self.h.fake.enqueue(Reply(json=completion))
        response = yield self.h.chat(chat_body(model="openrouter/some/unpriced-model"))
        yield response.content()
        row = yield self.only_row()
        self.assertCost(row["cost_usd"], 0.01234)
        self.assertTrue(row["priced"])

    @defer.inlineCallbacks
    def test_unknown_model_is_counted_unpriced(self):
        self.h.fake.enqueue(Reply(json=openai_completion("hi", "x", 10, 5)))
        yield (yield self.h.chat(chat_body(model="openai/never-heard-of-it"))).content()
        row = yield self.only_row()
        self.assertEqual((row["cost_usd"], row["priced"], row["input_tokens"]), (0.0, False, 10))
        costs = self.h.ledger.totals().costs_api()
        self.assertEqual(costs["unpriced_requests"], 1)
        self.assertEqual(costs["agents"][AGENT]["models"][0]["pricing_status"], "unpriced")

    @defer.inlineCallbacks
    def test_upstream_error_recorded_at_zero(self):
        self.h.fake.enqueue(Reply(status=400, json=openai_error("bad", "invalid_request_error", "bad")))
        response = yield self.h.chat(chat_body(model="openai/gpt-test"))
        yield response.content()
        self.assertEqual(response.headers.getRawHeaders("x-cllama-cost-usd"), ["0"])
        row = yield self.only_row()
        self.assertEqual((row["status"], row["cost_usd"], row["estimated"]), (400, 0.0, False))

    @defer.inlineCallbacks
    def test_cut_stream_bills_what_was_relayed(self):
        """No usage arrived before the cut: the relayed output is estimated."""
        chunks = openai_stream_chunks(["abcd", "efgh", "ijkl"], "gpt-test", 40, 10)
        self.h.fake.enqueue(Reply(sse=openai_sse_events(chunks), headers=SSE, cut_after_chunks=3))
        yield (yield self.h.chat(chat_body(model="openai/gpt-test", stream=True))).content()
        row = yield self.only_row()
        self.assertEqual(row["status"], 502)
        prompt = estimate_prompt_tokens(chat_body(), "openai")
        self.assertEqual((row["input_tokens"], row["output_tokens"], row["estimated"]), (prompt, 2, True))
        self.assertCost(row["cost_usd"], openai_cost(prompt, 2))

    @defer.inlineCallbacks
    def test_cut_after_the_usage_chunk_bills_the_usage(self):
        """The provider's count arrived before the cut: it is the bill."""
        chunks = openai_stream_chunks(["abcd", "efgh"], "gpt-test", 40, 10)
        events = openai_sse_events(chunks)
        self.h.fake.enqueue(Reply(sse=events, headers=SSE, cut_after_chunks=len(events) - 1))
        yield (yield self.h.chat(chat_body(model="openai/gpt-test", stream=True))).content()
        row = yield self.only_row()
        self.assertEqual((row["status"], row["input_tokens"], row["output_tokens"], row["estimated"]), (502, 40, 10, False))
        self.assertCost(row["cost_usd"], openai_cost(40, 10))

    @defer.inlineCallbacks
    def test_disconnect_mid_stream_is_estimated(self):
        self.h.fake.enqueue(
            Reply(sse=openai_sse_events(openai_stream_chunks(["word "] * 40, "gpt-test", 9, 9)), headers=SSE, delay_between_chunks=0.05)
        )
        client = _StreamingClient(_request_bytes(stream=True, model="openai/gpt-test"))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.h.port.getHost().port), client)
        yield client.first_data
        yield self.h.fake.wait_for_request(1)
        client.transport.abortConnection()
        yield self.h.fake.wait_for_disconnect()
        yield self.h.wait_for_audit(lambda line: line.get("status_code") == 499)
        row = yield self.only_row()
        self.assertEqual(row["status"], 499)
        self.assertTrue(row["estimated"])
        self.assertGreater(row["input_tokens"], 0)
        self.assertGreater(row["cost_usd"], 0)

    @defer.inlineCallbacks
    def test_provider_without_stream_options_is_estimated(self):
        yield self.h.ledger.stopService()
        pricing = os.path.abspath(self.mktemp())
        with open(pricing, "w") as f:
            json.dump(PRICES, f)
        h = yield ProxyHarness(self, pricing_file=pricing, no_stream_options=frozenset({"openai"})).start()
        chunks = openai_stream_chunks(["four ", "words ", "of ", "text"], "gpt-test", include_usage=False)
        h.fake.enqueue(Reply(sse=openai_sse_events(chunks), headers=SSE))
        yield (yield h.chat(chat_body(model="openai/gpt-test", stream=True))).content()
        self.assertNotIn("stream_options", h.fake.received[0].json)
        yield h.committed()
        [row] = yield h.ledger_rows()
        self.assertTrue(row["estimated"])
        self.assertEqual(row["output_tokens"], 5)  # 18 characters / 4, rounded up
        self.assertGreater(row["input_tokens"], 0)

    @defer.inlineCallbacks
    def test_row_is_committed_before_the_final_byte(self):
        """The agent's stream does not end until the ledger row is durable."""
        gate = defer.Deferred()
        commit_seen = defer.Deferred()
        real_record = self.h.ledger.record

        def gated(row):
            def committed(_):
                commit_seen.callback(row)
                return gate

            return real_record(row).addCallback(committed)

        self.patch(self.h.ledger, "record", gated)
        chunks = openai_stream_chunks(["a"], "gpt-test", 4, 1)
        self.h.fake.enqueue(Reply(sse=openai_sse_events(chunks), headers=SSE))
        client = _StreamingClient(_request_bytes(stream=True, model="openai/gpt-test"))
        client.chunks = []
        client.dataReceived = lambda data, c=client: c.chunks.append(data) or (c.first_data.called or c.first_data.callback(None))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.h.port.getHost().port), client)
        self.addCleanup(lambda: client.transport.abortConnection())
        row = yield commit_seen
        self.assertEqual(row.status, 200)
        yield client.first_data
        self.assertNotIn(b"[DONE]", b"".join(client.chunks))
        rows = yield self.h.ledger.recent(10)
        self.assertEqual(len(rows), 1)  # committed while the agent still waits
        done = defer.Deferred()
        client.dataReceived = lambda data, c=client: (c.chunks.append(data), b"[DONE]" in b"".join(c.chunks) and not done.called and done.callback(None))
        gate.callback(None)
        yield done

    @defer.inlineCallbacks
    def test_session_history_entry(self):
        self.h.fake.enqueue(Reply(json=openai_completion("Paris", "gpt-test", 12, 2)))
        yield (yield self.h.chat(chat_body(model="openai/gpt-test"))).content()
        yield self.h.history._when_idle()
        with open(os.path.join(self.history_dir, AGENT, "history.jsonl")) as f:
            [entry] = [json.loads(line) for line in f]
        self.assertEqual(entry["claw_id"], AGENT)
        self.assertEqual(entry["requested_model"], "openai/gpt-test")
        self.assertEqual(entry["request_original"]["model"], "openai/gpt-test")
        self.assertEqual(entry["request_effective"]["model"], "gpt-test")
        self.assertEqual(entry["response"]["format"], "json")
        self.assertEqual(entry["response"]["json"]["choices"][0]["message"]["content"], "Paris")
        self.assertEqual(entry["usage"]["prompt_tokens"], 12)
        self.assertEqual(entry["usage"]["completion_tokens"], 2)
        self.assertIsNone(entry["usage"]["reported_cost_usd"])


class AnthropicMeteringTests(MeteringCase):
    def messages_body(self, stream=False):
        doc = {"model": "anthropic/claude-test", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
        if stream:
            doc["stream"] = True
        return doc

    @defer.inlineCallbacks
    def test_json_with_cache_tokens(self):
        message = anthropic_message("hi", "claude-test", 100, 50, cache_read_input_tokens=2000, cache_creation_input_tokens=300)
        self.h.fake.enqueue(Reply(json=message))
        response = yield self.h.post("/v1/messages", self.messages_body())
        self.assertEqual((yield response.json()), message)
        received = self.h.fake.received[0]
        self.assertEqual(received.header("x-api-key"), PROVIDER_KEY)
        self.assertIsNone(received.header("authorization"))
        self.assertEqual(received.header("anthropic-version"), "2023-06-01")
        row = yield self.only_row()
        self.assertEqual(
            (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"], row["cache_write_tokens"]),
            (100, 50, 2000, 300),
        )
        self.assertCost(row["cost_usd"], anthropic_cost(100, 50, 2000, 300))
        # The audit line's tokens_in is every prompt token (CONTRACT 7).
        response_line = [line for line in self.h.audit_lines() if line["type"] == "response"][0]
        self.assertEqual(
            {k: response_line[k] for k in ("tokens_in", "cached_tokens", "cache_write_tokens")},
            {"tokens_in": 2400, "cached_tokens": 2000, "cache_write_tokens": 300},
        )

    @defer.inlineCallbacks
    def test_stream_with_cache_tokens(self):
        events = anthropic_sse_events(
            anthropic_stream_events(["Hel", "lo"], "claude-test", 100, 50, cache_read_input_tokens=2000, cache_creation_input_tokens=300)
        )
        self.h.fake.enqueue(Reply(sse=events, headers=SSE))
        response = yield self.h.post(
            "/v1/messages", self.messages_body(stream=True), headers={"anthropic-version": ["2023-06-01"]}
        )
        body = yield response.content()
        self.assertEqual(body, b"".join(events))  # Anthropic streams pass unchanged
        self.assertNotIn("stream_options", self.h.fake.received[0].json)
        row = yield self.only_row()
        self.assertEqual((row["output_tokens"], row["cache_read_tokens"], row["cache_write_tokens"]), (50, 2000, 300))
        self.assertCost(row["cost_usd"], anthropic_cost(100, 50, 2000, 300))

    @defer.inlineCallbacks
    def test_errors_in_anthropic_shape(self):
        response = yield self.h.post("/v1/messages", {"model": "anthropic/claude-test"}, token=f"{AGENT}:nope")
        self.assertEqual(response.code, 403)
        body = yield response.json()
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"]["type"], "permission_error")

    @defer.inlineCallbacks
    def test_totals_and_costs_api(self):
        self.h.fake.enqueue(
            Reply(json=anthropic_message("a", "claude-test", 10, 10)),
            Reply(json=anthropic_message("b", "claude-test", 20, 20)),
        )
        for _ in range(2):
            yield (yield self.h.post("/v1/messages", self.messages_body())).content()
        costs = self.h.ledger.totals().costs_api()
        self.assertEqual(costs["total_requests"], 2)
        self.assertCost(costs["total_cost_usd"], anthropic_cost(30, 30))
        [model] = costs["agents"][AGENT]["models"]
        self.assertEqual((model["provider"], model["model"], model["requests"]), ("anthropic", "claude-test", 2))
        self.assertEqual(model["pricing_status"], "priced")


class SpendAndHistoryViewTests(MeteringCase):
    @defer.inlineCallbacks
    def traffic(self):
        self.h.fake.enqueue(
            Reply(json=openai_completion("one", "gpt-test", 100, 10)),
            Reply(json=openai_completion("two", "gpt-test", 200, 20)),
        )
        for _ in range(2):
            yield (yield self.h.chat(chat_body(model="openai/gpt-test"))).content()
        yield self.h.committed()
        yield self.h.history._when_idle()

    @defer.inlineCallbacks
    def test_costs_api_exact_shape(self):
        yield self.traffic()
        response = yield self.h.ui_client.get("http://ui/costs/api", headers={"Authorization": f"Bearer {UI_TOKEN}"})
        self.assertEqual(response.code, 200)
        doc = yield response.json()
        self.assertEqual(set(doc), {"total_cost_usd", "total_requests", "unpriced_requests", "agents"})
        self.assertEqual(set(doc["agents"][AGENT]), {"total_cost_usd", "total_requests", "unpriced_requests", "models"})
        [model] = doc["agents"][AGENT]["models"]
        self.assertEqual(
            set(model),
            {"provider", "model", "input_tokens", "output_tokens", "cost_usd", "requests", "priced_requests", "unpriced_requests", "pricing_status"},
        )
        self.assertEqual((model["input_tokens"], model["output_tokens"], model["requests"]), (300, 30, 2))
        self.assertCost(doc["total_cost_usd"], openai_cost(300, 30))
        refused = yield self.h.ui_client.get("http://ui/costs/api")
        self.assertEqual(refused.code, 401)

    @defer.inlineCallbacks
    def test_spend_periods(self):
        yield self.traffic()
        auth = {"Authorization": f"Bearer {UI_TOKEN}"}
        doc = yield (yield self.h.ui_client.get("http://ui/api/spend", headers=auth)).json()
        for period in ("today", "month", "all_time"):
            self.assertEqual(doc[period]["total_requests"], 2, period)
            self.assertCost(doc[period]["total_cost_usd"], openai_cost(300, 30))
        self.assertEqual(doc["agents"][AGENT]["today"]["models"][0]["model"], "gpt-test")
        one = yield (yield self.h.ui_client.get(f"http://ui/api/spend/{AGENT}", headers=auth)).json()
        self.assertEqual(one["agent"], AGENT)
        self.assertEqual(one["all_time"]["total_requests"], 2)
        missing = yield self.h.ui_client.get("http://ui/api/spend/nobody", headers=auth)
        self.assertEqual(missing.code, 404)

    @defer.inlineCallbacks
    def test_own_history(self):
        yield self.traffic()
        response = yield self.h.http.get(
            self.h.base_url + "/history?limit=1", headers={"Authorization": f"Bearer {AGENT}:{SECRET}"}
        )
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/x-ndjson"])
        lines = (yield response.content()).splitlines()
        self.assertEqual(len(lines), 1)
        first = json.loads(lines[0])
        self.assertEqual(first["response"]["json"]["choices"][0]["message"]["content"], "one")
        after = first["ts"]
        response = yield self.h.http.get(
            self.h.base_url + f"/history?after={after}", headers={"Authorization": f"Bearer {AGENT}:{SECRET}"}
        )
        rest = [json.loads(line) for line in (yield response.content()).splitlines()]
        self.assertTrue(all(e["ts"] > after for e in rest))
        bad = yield self.h.http.get(self.h.base_url + "/history?limit=x", headers={"Authorization": f"Bearer {AGENT}:{SECRET}"})
        self.assertEqual(bad.code, 400)
        unauth = yield self.h.http.get(self.h.base_url + "/history")
        self.assertEqual(unauth.code, 401)

    @defer.inlineCallbacks
    def test_operator_history(self):
        yield self.traffic()
        url = self.h.base_url + f"/history/{AGENT}"
        # As the reference allows: the agent's own credentials read it too.
        own = yield self.h.http.get(url, headers={"Authorization": f"Bearer {AGENT}:{SECRET}"})
        self.assertEqual((own.code, len((yield own.content()).splitlines())), (200, 2))
        refused = yield self.h.http.get(url, headers={"Authorization": f"Bearer {AGENT}:wrong"})
        self.assertEqual(refused.code, 403)
        self.assertEqual((yield refused.json())["error"]["code"], "invalid_credentials")
        response = yield self.h.http.get(url, headers={"Authorization": f"Bearer {UI_TOKEN}"})
        self.assertEqual(len((yield response.content()).splitlines()), 2)
