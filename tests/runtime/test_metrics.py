"""
Prometheus metrics: real traffic through the in-process harness (a JSON
answer, a stream, an upstream 500, a budget refusal, a transport error),
then a scrape over HTTP with the operator's bearer token, parsed with
prometheus_client's own parser.
"""

import json
import os

import attrs
from klein import Klein
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.server import Site

from cllama_tx.pipeline.metering import Exchange
from cllama_tx.runtime.metrics import CONTENT_TYPE_LATEST, OTHER, Metrics, _Bounded, status_class
from cllama_tx.sites.api import CHAT
from cllama_tx.sites.ui import UiApp
from cllama_tx.sites.ui.auth import bearer_of, token_matches
from cllama_tx.testing import (
    Reply,
    openai_completion,
    openai_error,
    openai_sse_events,
    openai_stream_chunks,
)
from tests.support import SECRET, UI_TOKEN, ProxyHarness, chat_body, write_agent

PRICES = {"openai": {"gpt-test": {"input": 2.0, "output": 8.0, "cache_read": 0.5}}}
SSE = {"content-type": "text/event-stream"}

# With the proposed proxy patch, a refusal's error code reaches the metrics
# through the Exchange; without it, the code label is "unknown".
HAS_ERROR_CODE = "error_code" in attrs.fields_dict(Exchange)


def metrics_site(metrics, token):
    """
    The /metrics route as the operator UI serves it (bearer token required),
    for when the real UI route is not wired in.
    """
    app = Klein()

    @app.route("/metrics", methods=["GET"])
    def scrape(request):
        if not token_matches(bearer_of(request.getHeader(b"authorization")), token.encode()):
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm="cllama"')
            request.setHeader(b"content-type", b"application/json")
            return b'{"error":{"code":"operator_token_required"}}'
        return metrics.render(request)

    return Site(app.resource())


def samples(text):
    """{(name, frozenset(labels.items())): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(found, name, **labels):
    return found.get((name, frozenset(labels.items())))


class MetricsEndToEnd(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        pricing = os.path.abspath(self.mktemp())
        with open(pricing, "w") as f:
            json.dump(PRICES, f)
        self.h = yield ProxyHarness(self, pricing_file=pricing).start()
        self.metrics = Metrics(ledger=self.h.ledger)
        # What the gauge read while each exchange was being settled.
        self.inflight_at_settle = []
        self.h.metering.on_settled.append(
            lambda ex, row: self.inflight_at_settle.append(self.metrics.inflight_streams._value.get())
        )
        self.h.metering.on_settled.append(self.metrics.observe_settled)
        if hasattr(self.h.proxy, "_metrics"):
            # The proxy patch is applied: the gauge is kept by the proxy.
            self.h.proxy._metrics = self.metrics
        else:
            # What the proposed proxy patch does: the gauge around each stream relay.
            relay_stream = self.h.proxy._relay_stream

            async def counted(*args, **kwargs):
                with self.metrics.streaming():
                    return await relay_stream(*args, **kwargs)

            self.h.proxy._relay_stream = counted
        if hasattr(UiApp, "metrics_exposition"):
            # The UI patch is applied: scrape the real operator UI.
            self.h.ui.metrics = self.metrics
            self.get = lambda headers=None: self.h.ui_client.get("http://ui/metrics", headers=headers)
        else:
            port = reactor.listenTCP(0, metrics_site(self.metrics, UI_TOKEN), interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            url = f"http://127.0.0.1:{port.getHost().port}/metrics"
            self.get = lambda headers=None: self.h.http.get(url, headers=headers)

    @defer.inlineCallbacks
    def scrape(self):
        response = yield self.get(headers={"Authorization": [f"Bearer {UI_TOKEN}"]})
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), [CONTENT_TYPE_LATEST])
        text = yield response.text()
        return samples(text)

    @defer.inlineCallbacks
    def test_traffic_then_scrape(self):
        h = self.h
        # 1. A JSON answer: 10 prompt tokens (4 of them cached), 5 completion.
        h.fake.enqueue(Reply(json=openai_completion("hi", "gpt-test", 10, 5, cached_tokens=4)))
        response = yield h.chat(chat_body(model="openai/gpt-test"))
        self.assertEqual(response.code, 200)
        yield response.content()
        # 2. A stream: 7 prompt, 3 completion.
        chunks = openai_stream_chunks(["a", "b", "c"], "gpt-test", prompt_tokens=7, completion_tokens=3)
        h.fake.enqueue(Reply(headers=SSE, sse=openai_sse_events(chunks)))
        response = yield h.chat(chat_body(model="openai/gpt-test", stream=True))
        self.assertEqual(response.code, 200)
        yield response.content()
        # 3. The provider answers 500.
        h.fake.enqueue(Reply(status=500, json=openai_error("boom", "server_error")))
        response = yield h.chat(chat_body(model="openai/gpt-test"))
        self.assertEqual(response.code, 500)
        yield response.content()
        # 4. A transport error (the only candidate: no failover).
        h.fake.enqueue(Reply(abort_before_headers=True))
        response = yield h.chat(chat_body(model="openai/gpt-test"))
        self.assertEqual(response.code, 502)
        yield response.content()
        # 5. A budget refusal: nothing is sent upstream.
        write_agent(h.context_root, "capped", SECRET, budget={"limit_usd": 0.0001, "period": "daily", "behavior": "hard_stop"})
        response = yield h.chat(chat_body(model="openai/gpt-test", max_tokens=1000), token=f"capped:{SECRET}")
        self.assertEqual(response.code, 429)
        self.assertEqual((yield response.json())["error"]["code"], "budget_exceeded")
        self.assertEqual(len(h.fake.received), 4)
        yield h.committed()
        rows = yield h.ledger_rows()
        self.assertEqual(len(rows), 5)

        found = yield self.scrape()
        chat = CHAT.name
        surfaces = {name for (metric, labels) in found for key, name in labels if key == "surface"}
        self.assertEqual(surfaces, {chat})
        self.assertEqual(value(found, "cllama_requests_total", surface=chat, provider="openai", status_class="2xx"), 2)
        self.assertEqual(value(found, "cllama_requests_total", surface=chat, provider="openai", status_class="5xx"), 2)
        self.assertEqual(value(found, "cllama_requests_total", surface=chat, provider="none", status_class="4xx"), 1)
        self.assertEqual(sum(v for (n, _), v in found.items() if n == "cllama_requests_total"), 5)
        # Tokens, exactly as the ledger has them: the kinds are disjoint,
        # "input" is plain input (10 - 4 cached, and 7).
        for kind, expected in (("input", 13), ("output", 8), ("cache_read", 4)):
            self.assertEqual(value(found, "cllama_tokens_total", provider="openai", model="gpt-test", kind=kind), expected)
        self.assertIsNone(value(found, "cllama_tokens_total", provider="openai", model="gpt-test", kind="cache_write"))
        self.assertEqual(sum(r["input_tokens"] for r in rows), 13)
        expected_cost = ((10 - 4) * 2.0 + 4 * 0.5 + 5 * 8.0 + 7 * 2.0 + 3 * 8.0) / 1e6
        cost = value(found, "cllama_cost_usd_total", provider="openai", model="gpt-test")
        self.assertAlmostEqual(cost, expected_cost, places=12)
        self.assertAlmostEqual(cost, sum(r["cost_usd"] for r in rows), places=12)
        # Upstream failures.
        self.assertEqual(value(found, "cllama_upstream_errors_total", provider="openai", status="500"), 1)
        transport = "transport" if HAS_ERROR_CODE else "502"
        self.assertEqual(value(found, "cllama_upstream_errors_total", provider="openai", status=transport), 1)
        # The refusal.
        code = "budget_exceeded" if HAS_ERROR_CODE else "unknown"
        self.assertEqual(value(found, "cllama_budget_refusals_total", code=code), 1)
        # Latency: every request; time to first byte: the three that got an answer.
        self.assertEqual(value(found, "cllama_request_latency_seconds_count", surface=chat), 5)
        self.assertAlmostEqual(
            value(found, "cllama_request_latency_seconds_sum", surface=chat),
            sum(r["latency_ms"] for r in rows) / 1000.0,
            places=6,
        )
        self.assertEqual(value(found, "cllama_time_to_first_byte_seconds_count", surface=chat, stream="false"), 2)
        self.assertEqual(value(found, "cllama_time_to_first_byte_seconds_count", surface=chat, stream="true"), 1)
        self.assertEqual(
            value(found, "cllama_request_latency_seconds_bucket", surface=chat, le="+Inf"), 5
        )
        # The stream was counted while it was relayed, and not after.
        self.assertEqual(sorted(self.inflight_at_settle), [0, 0, 0, 0, 1])
        self.assertEqual(value(found, "cllama_inflight_streams"), 0)
        self.assertEqual(value(found, "cllama_ledger_writer_queue_depth"), 0)

    @defer.inlineCallbacks
    def test_scrape_needs_the_operator_token(self):
        response = yield self.get()
        self.assertEqual(response.code, 401)
        self.assertNotIn(b"cllama_", (yield response.content()))
        response = yield self.get(headers={"Authorization": ["Bearer wrong-token"]})
        self.assertEqual(response.code, 401)
        yield response.content()


class _Row:
    def __init__(self, **kw):
        base = dict(
            provider="openai", effective_model="m", status=200, stream=False, latency_ms=10.0, ttfb_ms=5.0,
            input_tokens=1, output_tokens=1, cache_read_tokens=0, cache_write_tokens=0, cost_usd=0.0,
        )
        base.update(kw)
        self.__dict__.update(base)


class _Ex:
    def __init__(self, upstream_called=True, error_code=None):
        self.surface = type("S", (), {"name": "openai_chat"})()
        self.upstream_called = upstream_called
        self.error_code = error_code


class MetricsUnit(TestCase):
    def test_models_are_capped(self):
        metrics = Metrics(max_models=2)
        for model in ("a", "b", "c", "d", "a"):
            metrics.observe_settled(_Ex(), _Row(effective_model=model))
        found = samples(metrics.render().decode())
        models = {dict(labels)["model"] for (name, labels) in found if name == "cllama_tokens_total"}
        self.assertEqual(models, {"a", "b", OTHER})
        self.assertEqual(value(found, "cllama_tokens_total", provider="openai", model=OTHER, kind="input"), 2)
        self.assertEqual(value(found, "cllama_tokens_total", provider="openai", model="a", kind="input"), 2)

    def test_agent_written_names_before_upstream_are_not_labels(self):
        metrics = Metrics()
        metrics.observe_settled(_Ex(upstream_called=False), _Row(provider="x" * 5000, effective_model="y", status=400))
        found = samples(metrics.render().decode())
        self.assertEqual(value(found, "cllama_requests_total", surface="openai_chat", provider="none", status_class="4xx"), 1)
        self.assertFalse([n for (n, _) in found if n == "cllama_tokens_total"])

    def test_error_codes(self):
        metrics = Metrics()
        metrics.observe_settled(_Ex(error_code="upstream_timeout"), _Row(status=504))
        metrics.observe_settled(_Ex(error_code="internal_error"), _Row(status=500))
        metrics.observe_settled(_Ex(upstream_called=False, error_code="rate_limited"), _Row(status=429))
        metrics.observe_settled(_Ex(error_code="provider_keys_exhausted"), _Row(status=429))
        found = samples(metrics.render().decode())
        self.assertEqual(value(found, "cllama_upstream_errors_total", provider="openai", status="timeout"), 1)
        self.assertEqual(sum(v for (n, _), v in found.items() if n == "cllama_upstream_errors_total"), 1)
        self.assertEqual(value(found, "cllama_budget_refusals_total", code="rate_limited"), 1)
        self.assertEqual(sum(v for (n, _), v in found.items() if n == "cllama_budget_refusals_total"), 1)

    def test_status_class_and_bounded(self):
        self.assertEqual([status_class(s) for s in (200, 404, 499, 503, 0)], ["2xx", "4xx", "client_closed", "5xx", "other"])
        bounded = _Bounded(1)
        self.assertEqual([bounded(v) for v in ("a", None, "b", "a", "")], ["a", "none", OTHER, "a", "none"])

    def test_registries_are_private(self):
        one, two = Metrics(), Metrics()
        one.stream_started()
        self.assertIn(b"cllama_inflight_streams 1.0", one.render())
        self.assertIn(b"cllama_inflight_streams 0.0", two.render())
