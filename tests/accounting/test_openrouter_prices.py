"""
Tests for L{cllama_tx.accounting.openrouter_prices}: OpenRouter's model list
as a price table of ours, the C{cllama-tx openrouter-prices} command against
a real HTTP server speaking OpenRouter's format, and the daemon picking the
written file up without a restart.
"""

from __future__ import annotations

import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting import openrouter_prices as prices
from cllama_tx.accounting.pricing import Price, Pricing
from cllama_tx.runtime.cli import openrouter_prices as command
from cllama_tx.testing.openrouter import OpenRouterModel

QWEN = "qwen/qwen-2.5-coder-32b-instruct"


class _Models(BaseHTTPRequestHandler):
    """OpenRouter's GET /api/v1/models, from the fake's list."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        if self.path != "/api/v1/models":
            self.send_error(404)
            return
        body = json.dumps(OpenRouterModel().model_list()).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class ConversionTests(SynchronousTestCase):
    def test_models_become_prices_per_million(self) -> None:
        found = prices.prices_from_models(OpenRouterModel().model_list())
        self.assertEqual(found["anthropic/claude-3.5-sonnet"], {"input": 3.0, "output": 15.0, "max_output_tokens": 8192})
        self.assertEqual(found["mistralai/mistral-7b-instruct"]["output"], 0.054)
        self.assertNotIn("openrouter/auto", found)  # -1: not a fixed price

    def test_cache_rates_and_odd_entries(self) -> None:
        doc = {"data": [
            {"id": "a/b", "pricing": {"prompt": "0.000003", "completion": "0.000015", "input_cache_read": "0.0000003",
                                      "input_cache_write": "0.00000375"}, "top_provider": {"max_completion_tokens": 0}},
            {"id": "a/free", "pricing": {"prompt": "0", "completion": "0"}},
            {"id": "a/broken", "pricing": {"prompt": "x", "completion": "0.1"}},
            {"id": " a/spaced", "pricing": {"prompt": "0", "completion": "0"}},
            {"id": "a/noprice"},
            "junk",
        ]}
        found = prices.prices_from_models(doc)
        self.assertEqual(found, {
            "a/b": {"input": 3.0, "output": 15.0, "cache_read": 0.3, "cache_write": 3.75},
            "a/free": {"input": 0.0, "output": 0.0},
        })

    def test_nothing_usable_is_an_error(self) -> None:
        for doc in ({}, {"data": "x"}, {"data": []}, {"data": [{"id": "openrouter/auto", "pricing": {"prompt": "-1"}}]}):
            with self.subTest(doc=doc):
                self.assertRaises(prices.RefreshError, prices.prices_from_models, doc)

    def test_where(self) -> None:
        self.assertEqual(prices.models_url({}), "https://openrouter.ai/api/v1/models")
        self.assertEqual(prices.models_url({"OPENROUTER_BASE_URL": "http://h:9/v1/"}), "http://h:9/v1/models")
        self.assertEqual(prices.default_path({}, "/state"), "/state/openrouter-prices.json")
        self.assertEqual(prices.default_path({"CLLAMA_OPENROUTER_PRICES_FILE": "/x.json"}, "/state"), "/x.json")


class CommandTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.server = HTTPServer(("127.0.0.1", 0), _Models)
        thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(self.server.server_close)
        self.addCleanup(self.server.shutdown)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}/api/v1"
        self.state = os.path.abspath(self.mktemp())

    def test_refresh_writes_a_table_the_daemon_reads(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        code = command([], env={"OPENROUTER_BASE_URL": self.base, "CLLAMA_STATE_DIR": self.state}, out=out, err=err)
        self.assertEqual(code, 0, err.getvalue())
        path = os.path.join(self.state, "openrouter-prices.json")
        self.assertIn(f"{path}: 6 OpenRouter model prices from {self.base}/models", out.getvalue())
        with open(path) as f:
            doc = json.load(f)
        self.assertEqual(doc["sources"], {"openrouter": f"{self.base}/models"})
        self.assertEqual(doc["openrouter"][QWEN], {"input": 0.07, "output": 0.16, "max_output_tokens": 8192})
        self.assertEqual([n for n in os.listdir(self.state) if n.startswith(".")], [])  # no temporary file left

        clock = Clock()
        pricing = Pricing(clock)
        self.assertIsNone(pricing.price("openrouter", QWEN))
        published = prices.PublishedPrices(pricing, path, clock)
        self.assertEqual(published.models, 6)
        self.assertEqual(pricing.price("openrouter", QWEN), Price(input=0.07, output=0.16, max_output_tokens=8192))
        # A refreshed price is laid over the packaged one (mistral: the packaged ceiling, then OpenRouter's).
        self.assertEqual(pricing.price("openrouter", "mistralai/mistral-7b-instruct").output, 0.054)  # type: ignore[union-attr]
        self.assertEqual(pricing.price("openai", "gpt-4o"), Pricing(Clock()).price("openai", "gpt-4o"))

    def test_a_new_file_is_picked_up_and_the_override_still_wins(self) -> None:
        os.makedirs(self.state)
        override = os.path.join(self.state, "override.json")
        with open(override, "w") as f:
            json.dump({"openrouter": {QWEN: {"input": 9.0, "output": 9.0}}}, f)
        path = os.path.join(self.state, "openrouter-prices.json")
        clock = Clock()
        pricing = Pricing(clock, override_path=override)
        published = prices.PublishedPrices(pricing, path, clock)
        published.startService()
        self.addCleanup(published.stopService)
        self.assertEqual(published.models, 0)
        self.assertEqual(pricing.price("openrouter", QWEN).input, 9.0)  # type: ignore[union-attr]
        self.assertEqual(command(["--output", path, "--url", self.base + "/models"], env={}, out=io.StringIO(),
                                 err=io.StringIO()), 0)
        clock.advance(prices.RECHECK_INTERVAL)
        self.assertEqual(published.models, 6)
        self.assertEqual(pricing.price("openrouter", QWEN).input, 9.0)  # type: ignore[union-attr]
        self.assertEqual(pricing.price("openrouter", "anthropic/claude-3-haiku").output, 1.25)  # type: ignore[union-attr]

    def test_a_broken_file_keeps_what_was_in_force(self) -> None:
        os.makedirs(self.state)
        path = os.path.join(self.state, "openrouter-prices.json")
        with open(path, "w") as f:
            json.dump({"openrouter": {QWEN: {"input": 1.0, "output": 2.0}}}, f)
        clock = Clock()
        pricing = Pricing(clock)
        published = prices.PublishedPrices(pricing, path, clock)
        with open(path, "w") as f:
            f.write("{not json")
        published.check()
        self.assertEqual(pricing.price("openrouter", QWEN), Price(input=1.0, output=2.0))
        self.assertEqual(len(self.flushLoggedErrors()), 0)

    def test_failures(self) -> None:
        err = io.StringIO()
        self.assertEqual(command(["--url"], env={}, out=io.StringIO(), err=err), 2)
        self.assertIn("usage: cllama-tx openrouter-prices", err.getvalue())
        err = io.StringIO()
        self.assertEqual(command(["--url", self.base + "/nothing", "--output", os.path.join(self.state, "p.json")],
                                 env={}, out=io.StringIO(), err=err), 1)
        self.assertIn("could not fetch", err.getvalue())
        self.assertFalse(os.path.exists(os.path.join(self.state, "p.json")))
        err = io.StringIO()
        self.assertEqual(command(["--url", "ftp://x/models"], env={"CLLAMA_STATE_DIR": self.state},
                                 out=io.StringIO(), err=err), 1)
        self.assertIn("is not an http(s) URL", err.getvalue())
