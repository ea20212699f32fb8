"""
Tests for L{cllama_tx.runtime.gate}: the opt-ins only on a loopback-only API
listener, the ceiling setting, and the gate's OpenRouter section as provider
settings the environment may override.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting.pricing import Price
from cllama_tx.runtime.config import Config, listen_endpoint
from cllama_tx.runtime.errors import ConfigError
from cllama_tx.runtime.gate import (
    GateSettings,
    gate_settings,
    loopback_only,
    prices_path,
    provider_env,
)

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "execwall", "policy.yaml")


class LoopbackOnlyTests(SynchronousTestCase):
    def test_endpoints(self) -> None:
        yes = ["127.0.0.1:8080", "localhost:8080", "[::1]:8080", "127.0.0.2:1", "unix:/run/cllama.sock",
               "ssl:8443:interface=127.0.0.1:privateKey=k.pem"]
        no = [":8080", "0.0.0.0:8080", "10.0.0.1:8080", "[::]:8080", "8080", "systemd:domain=INET:index=0",
              "tcp:8080", "tcp:8080:interface=192.168.0.1"]
        for addr in yes:
            with self.subTest(addr=addr):
                self.assertTrue(loopback_only(listen_endpoint(addr)))
        for addr in no:
            with self.subTest(addr=addr):
                self.assertFalse(loopback_only(listen_endpoint(addr)))


class SettingsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        self.assertEqual(gate_settings({}, "tcp:8080"), GateSettings())
        self.assertEqual(Config.from_env({}).gate, GateSettings())

    def test_opt_ins_need_loopback(self) -> None:
        for name in ("CLLAMA_TRUST_X_AGENT_ID", "CLLAMA_CONSOLE_ON_API_PORT"):
            with self.subTest(name=name):
                error = self.assertRaises(ConfigError, Config.from_env, {name: "1"})
                self.assertIn("loopback", str(error))
                config = Config.from_env({name: "on", "LISTEN_ADDR": "127.0.0.1:8080"})
                self.assertTrue(config.gate.trust_agent_header or config.gate.console_on_api_port)
        self.assertRaises(ConfigError, gate_settings, {"CLLAMA_TRUST_X_AGENT_ID": "maybe"}, "tcp:8080:interface=127.0.0.1")

    def test_ceiling_and_prices_file(self) -> None:
        settings = gate_settings({"CLLAMA_OPENROUTER_CEILING": "4/16", "CLLAMA_OPENROUTER_PRICES_FILE": "/p.json"}, "tcp:1")
        self.assertEqual((settings.openrouter_ceiling, prices_path(settings, "/state")),
                         (Price(input=4.0, output=16.0), "/p.json"))
        self.assertEqual(prices_path(GateSettings(), "/state"), "/state/openrouter-prices.json")
        self.assertRaises(ConfigError, gate_settings, {"CLLAMA_OPENROUTER_CEILING": "cheap"}, "tcp:1")


class ProviderEnvTests(SynchronousTestCase):
    def test_the_gates_openrouter_section(self) -> None:
        env = {"OPENROUTER_API_KEY": "from-env"}
        found = provider_env(env, FIXTURE)
        self.assertEqual(found["OPENROUTER_BASE_URL"], "https://openrouter.ai/api/v1")
        self.assertEqual(found["OPENROUTER_API_KEY"], "from-env")
        ours = provider_env({"OPENROUTER_BASE_URL": "http://mine/v1"}, FIXTURE)
        self.assertEqual(ours["OPENROUTER_BASE_URL"], "http://mine/v1")  # the environment wins
        self.assertNotIn("OPENROUTER_API_KEY", ours)  # ${OPENROUTER_API_KEY} unset: no key

    def test_a_literal_key_in_the_file(self) -> None:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write('cost_routing:\n  openrouter:\n    api_key: "sk-or-in-the-file"\n  agents: {}\n')
        self.assertEqual(provider_env({}, path)["OPENROUTER_API_KEY"], "sk-or-in-the-file")

    def test_nothing_to_take(self) -> None:
        env = {"A": "b"}
        self.assertIs(provider_env(env, None), env)
        missing = os.path.abspath(self.mktemp())
        self.assertIs(provider_env(env, missing), env)  # the budgets' loading reports the problem
        ours = os.path.abspath(self.mktemp())
        with open(ours, "w") as f:
            f.write("cost_routing:\n  agents: {}\n")
        self.assertIs(provider_env(env, ours), env)


class _Ledger:
    def __init__(self, overrides) -> None:
        self.overrides = overrides

    def budget_overrides(self):
        return self.overrides


class _Contexts:
    def __init__(self, budgets) -> None:
        self.budgets = budgets

    def agent_ids(self):
        return sorted(self.budgets)

    def get(self, agent):
        return type("Context", (), {"budget": self.budgets[agent]})()


class SeedLookbackTests(SynchronousTestCase):
    """A lifetime budget anywhere makes the seed read every agent's spend, not the last 35 days."""

    def seed(self, policy_period=None, overrides=None, contexts=None):
        from twisted.internet.task import Clock

        from cllama_tx.governance.engine import Governance
        from cllama_tx.runtime.daemon import GovernanceSeed

        clock = Clock()
        clock.advance(2_000_000_000)
        governance = Governance.__new__(Governance)
        governance._policy_budgets = {"a": {"limit_usd": 1, "period": policy_period}} if policy_period else {}
        seed = GovernanceSeed(_Ledger(overrides or {}), governance, clock)
        seed.contexts = contexts
        return seed._since()

    def test_lookback(self) -> None:
        from cllama_tx.runtime.daemon import GovernanceSeed

        self.assertEqual(self.seed(), 2_000_000_000 - GovernanceSeed.LOOKBACK)
        self.assertEqual(self.seed(policy_period="monthly"), 2_000_000_000 - GovernanceSeed.LOOKBACK)
        self.assertEqual(self.seed(policy_period="lifetime"), 0.0)
        self.assertEqual(self.seed(overrides={"b": {"budget": {"period": "Lifetime"}}}), 0.0)
        self.assertEqual(self.seed(contexts=_Contexts({"c": {"limit_usd": 1, "period": "lifetime"}, "d": None})), 0.0)
