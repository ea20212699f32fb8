"""
The LLM resolver's call over real loopback sockets, through the proxy's
own provider registry, key pools and metering: an Anthropic-format
resolver model, a key the provider says is out of quota (marked dead, the
next key used), a resolver that does not answer in time, a provider error,
an answer that is not JSON, a resolver provider that is not configured;
and its settings.
"""

from __future__ import annotations

import json
import os

from twisted.application.service import MultiService
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cllama_tx.pipeline.model_resolver import RESOLVER_PRINCIPAL
from cllama_tx.runtime.errors import ConfigError
from cllama_tx.runtime.routing import build_routing, resolver_settings
from cllama_tx.testing import (
    FakeProvider,
    Reply,
    anthropic_message,
    openai_completion,
    openai_error,
)
from tests.secret_scan import SCANNER
from tests.support import ProxyHarness

KEYS = ("sk-judge-key-one-000001", "sk-judge-key-two-000002")
SCANNER.register(*KEYS)


def question_of(received) -> str:
    return received.json["messages"][-1]["content"]


class ResolverCallTests(TestCase):
    @defer.inlineCallbacks
    def start(self, resolver_model, env=None, fake_reply=None, fake_providers=("openai",)):
        self.judge = FakeProvider(reactor, fake_reply)
        yield self.judge.start()
        self.addCleanup(self.judge.stop)
        providers_json = {"version": 2, "providers": {"judgeco": {
            "base_url": self.judge.base_url, "auth": "bearer", "api_format": "openai",
            "keys": [{"id": f"k{i}", "secret": secret, "source": "runtime", "state": "ready"}
                     for i, secret in enumerate(KEYS, 1)],
        }}}
        prices = os.path.abspath(self.mktemp())
        with open(prices, "w") as f:
            json.dump({"judgeco": {"judge-1": {"input": 1.0, "output": 2.0}}}, f)
        self.h = yield ProxyHarness(self, providers_json=providers_json, pricing_file=prices,
                                    fake_providers=fake_providers).start()
        services = MultiService()
        self.routing = build_routing(
            env={"CLLAMA_RESOLVER_MODEL": resolver_model, **(env or {})}, clock=reactor,
            database=self.h.keys.database, ledger=self.h.ledger, instance="test", router=self.h.router,
            providers=self.h.providers, upstream=self.h.upstream, metering=self.h.metering, parent=services,
        )
        services.startService()
        self.addCleanup(services.stopService)
        yield self.routing.mappings.when_loaded()
        self.resolver = self.routing.resolver

    def ask(self, name="house-fast", **kwargs):
        return self.resolver.ask(name, surface="openai-chat-completions", caller="tiverton", prompt=None, **kwargs)

    @defer.inlineCallbacks
    def resolver_rows(self):
        yield self.h.committed()
        rows = yield self.h.ledger_rows()
        return [row for row in rows if row["agent"] == RESOLVER_PRINCIPAL]

    @defer.inlineCallbacks
    def test_an_anthropic_format_resolver(self):
        yield self.start("anthropic/claude-haiku-4-5", fake_providers=("openai", "anthropic"))
        self.h.fake.enqueue(Reply(json=anthropic_message('{"model": "openai/gpt-4o-mini"}', "claude-haiku-4-5", 90, 9)))
        outcome = yield self.ask()
        self.assertEqual((outcome.reason, outcome.target), ("mapped", "openai/gpt-4o-mini"))
        received = self.h.fake.received[-1]
        self.assertEqual(received.path, "/v1/messages")
        self.assertEqual(received.json["system"].split(".")[0], "You route requests in an LLM proxy")
        self.assertEqual(received.header("anthropic-version"), "2023-06-01")
        self.assertIn("- openai/gpt-4o-mini", received.json["messages"][0]["content"])
        [row] = yield self.resolver_rows()
        self.assertEqual((row["provider"], row["effective_model"], row["input_tokens"]), ("anthropic", "claude-haiku-4-5", 90))
        self.assertEqual(self.routing.mappings.get("house-fast").detail["resolver_model"], "anthropic/claude-haiku-4-5")

    @defer.inlineCallbacks
    def test_a_key_out_of_quota_is_marked_and_the_next_one_used(self):
        def reply(received):
            if received.header("authorization") == f"Bearer {KEYS[0]}":
                return Reply(status=429, json=openai_error("You exceeded your current quota", "insufficient_quota",
                                                           "insufficient_quota"))
            return Reply(json=openai_completion('{"model": "openai/gpt-4o"}', "judge-1", 100, 10))

        yield self.start("judgeco/judge-1", fake_reply=reply)
        self.addCleanup(self.h.providers.flush)  # the dead key's state is saved
        outcome = yield self.ask()
        self.assertEqual((outcome.reason, outcome.target), ("mapped", "openai/gpt-4o"))
        self.assertEqual([r.header("authorization") for r in self.judge.received],
                         [f"Bearer {KEYS[0]}", f"Bearer {KEYS[1]}"])
        [dead] = [line for line in self.h.audit_lines() if line["type"] == "provider_pool"]
        self.assertEqual((dead["provider"], dead["key_id"], dead["action"]), ("judgeco", "k1", "dead"))
        [row] = yield self.resolver_rows()
        self.assertAlmostEqual(row["cost_usd"], (100 * 1.0 + 10 * 2.0) / 1e6, places=12)

    @defer.inlineCallbacks
    def test_a_resolver_that_does_not_answer_in_time(self):
        yield self.start("judgeco/judge-1", env={"CLLAMA_RESOLVER_TIMEOUT": "0.3"},
                         fake_reply=lambda received: Reply(hold_until=defer.Deferred()))
        outcome = yield self.ask()
        self.assertEqual(outcome.reason, "failed")
        self.assertEqual(outcome.why, "the resolver model did not answer within 0.3 s")
        yield self.judge.wait_for_disconnect(1)
        [row] = yield self.resolver_rows()
        self.assertEqual(row["status"], 504)
        [error] = [line for line in self.h.audit_lines() if line["type"] == "error" and line["claw_id"] == RESOLVER_PRINCIPAL]
        self.assertEqual(error["error"], outcome.why)
        # Remembered a while: asking again costs no second call.
        again = yield self.ask()
        self.assertEqual((again.reason, again.why), ("remembered", "failed"))
        self.assertEqual(len(self.judge.received), 1)

    @defer.inlineCallbacks
    def test_provider_errors_and_answers_that_are_not_json(self):
        yield self.start("judgeco/judge-1")
        self.judge.enqueue(Reply(status=500, json=openai_error("boom", "server_error")),
                           Reply(raw=b"<html>gateway</html>", headers={"content-type": "text/html"}))
        first = yield self.ask("one")
        self.assertEqual((first.reason, first.why), ("failed", "the resolver model's provider answered 500"))
        second = yield self.ask("two")
        self.assertEqual((second.reason, second.why), ("failed", "the resolver model's answer is not JSON"))
        rows = yield self.resolver_rows()
        self.assertEqual(sorted(row["status"] for row in rows), [200, 500])
        self.assertEqual(self.routing.mappings.all(), [])

    @defer.inlineCallbacks
    def test_a_resolver_provider_that_is_not_configured(self):
        yield self.start("xai/grok-4")
        outcome = yield self.ask()
        self.assertEqual(outcome.reason, "failed")
        self.assertIn("the resolver's provider cannot be used", outcome.why)
        self.assertIn("XAI_API_KEY", outcome.why)
        rows = yield self.resolver_rows()
        self.assertEqual(rows, [])


class SettingsTests(SynchronousTestCase):
    def test_off_by_default(self):
        settings = resolver_settings({})
        self.assertFalse(settings.enabled)
        self.assertEqual((settings.timeout, settings.calls_per_minute, settings.negative_ttl, settings.force_interval),
                         (20.0, 20, 300.0, 60.0))

    def test_values(self):
        settings = resolver_settings({
            "CLLAMA_RESOLVER_MODEL": " openai/gpt-4o-mini ", "CLLAMA_RESOLVER_TIMEOUT": "5",
            "CLLAMA_RESOLVER_CALLS_PER_MINUTE": "3", "CLLAMA_RESOLVER_NEGATIVE_TTL": "60",
            "CLLAMA_RESOLVER_FORCE_INTERVAL": "10",
        })
        self.assertEqual((settings.model, settings.timeout, settings.calls_per_minute, settings.negative_ttl,
                          settings.force_interval), ("openai/gpt-4o-mini", 5.0, 3, 60.0, 10.0))

    def test_bad_values_stop_the_start(self):
        for env, message in (
            ({"CLLAMA_RESOLVER_MODEL": "gpt-4o-mini"}, "CLLAMA_RESOLVER_MODEL: not a '<provider>/<model>' ref"),
            ({"CLLAMA_RESOLVER_MODEL": "cllama/x"}, "synthetic prefix"),
            ({"CLLAMA_RESOLVER_TIMEOUT": "soon"}, "CLLAMA_RESOLVER_TIMEOUT must be a number"),
            ({"CLLAMA_RESOLVER_CALLS_PER_MINUTE": "2.5"}, "CLLAMA_RESOLVER_CALLS_PER_MINUTE must be a whole number"),
            ({"CLLAMA_RESOLVER_NEGATIVE_TTL": "0"}, "CLLAMA_RESOLVER_NEGATIVE_TTL must be positive"),
        ):
            with self.assertRaises(ConfigError) as caught:
                resolver_settings(env)
            self.assertIn(message, str(caught.exception))
