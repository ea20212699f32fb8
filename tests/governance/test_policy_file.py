"""
Tests for L{cllama_tx.governance.policy_file}: the C{cost_routing} mapping
to budget objects, C{${ENV}} interpolation, and reading the file (JSON
without PyYAML, YAML with it, a clear error without it).
"""

from __future__ import annotations

import json
import os
import sys
import types

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.governance.budgets import BudgetError, parse_budget
from cllama_tx.governance.policy_file import (
    PolicyFileError,
    interpolate,
    load_policy_file,
    policy_budgets,
)
from cllama_tx.governance.tiers import Tier

try:
    import yaml  # type: ignore[import-untyped]
except ImportError:
    yaml = None

YAML_TEXT = """\
# shared with a gateway: other sections are ignored
gateway:
  listen: ":4000"
cost_routing:
  enabled: true
  agents:
    tiverton:
      budget_total: ${TIVERTON_BUDGET:-50}
      budget_spent: 12.5
      period: monthly
      hard_cap: true
      tiers:
        - threshold: 0.5
          models: [anthropic/claude-sonnet-4-5]
        - threshold: 0
          models: [anthropic/claude-haiku-4-5]
    allen:
      budget_total: 5
      period: 24h
"""


class MappingTests(SynchronousTestCase):
    def test_full_entry(self) -> None:
        doc = {
            "cost_routing": {
                "agents": {
                    "tiverton": {
                        "budget_total": 50,
                        "budget_spent": 12.5,
                        "period": "Monthly",
                        "hard_cap": True,
                        "max_requests": 1000,
                        "tiers": [
                            {"threshold": 0.5, "models": ["anthropic/claude-sonnet-4-5"]},
                            {"threshold": "0", "models": ["anthropic/claude-haiku-4-5"]},
                        ],
                    }
                }
            }
        }
        raw = policy_budgets(doc)["tiverton"]
        self.assertEqual(
            raw,
            {
                "limit_usd": 50.0,
                "behavior": "hard_stop",
                "spent_offset_usd": 12.5,
                "period": "monthly",
                "max_requests": 1000,
                "tiers": [
                    {"threshold": 0.5, "models": ["anthropic/claude-sonnet-4-5"]},
                    {"threshold": 0.0, "models": ["anthropic/claude-haiku-4-5"]},
                ],
            },
        )
        budget = parse_budget(raw)
        self.assertEqual(budget.tiers[0], Tier(0.5, ("anthropic/claude-sonnet-4-5",)))

    def test_defaults(self) -> None:
        raw = policy_budgets({"cost_routing": {"agents": {"allen": {"budget_total": 5}}}})["allen"]
        # No hard_cap: soft_alert; no period: monthly; no spend: no offset.
        self.assertEqual(raw, {"limit_usd": 5.0, "behavior": "soft_alert", "period": "monthly"})

    def test_hard_cap_false_and_rolling_period(self) -> None:
        raw = policy_budgets(
            {"cost_routing": {"agents": {"a": {"budget_total": "5", "hard_cap": "false", "period": "24h", "budget_spent": 0}}}}
        )["a"]
        self.assertEqual(raw, {"limit_usd": 5.0, "behavior": "soft_alert", "window": "24h"})
        self.assertEqual(parse_budget(raw).window_seconds, 86400.0)

    def test_percent_threshold(self) -> None:
        raw = policy_budgets(
            {"cost_routing": {"agents": {"a": {"budget_total": 5, "tiers": [{"threshold": "80%", "models": ["a/b"]}]}}}}
        )["a"]
        self.assertEqual(parse_budget(raw).tiers, (Tier(0.8, ("a/b",)),))

    def test_numeric_agent_id(self) -> None:
        self.assertEqual(list(policy_budgets({"cost_routing": {"agents": {42: {"budget_total": 1}}}})), ["42"])

    def test_empty_documents(self) -> None:
        self.assertEqual(policy_budgets(None), {})
        self.assertEqual(policy_budgets({"other": 1}), {})
        self.assertEqual(policy_budgets({"cost_routing": {}}), {})
        self.assertEqual(policy_budgets({"cost_routing": {"agents": None}}), {})

    def test_unknown_keys_warned(self) -> None:
        warnings: list[str] = []
        policy_budgets({"cost_routing": {"agents": {"a": {"budget_total": 1, "colour": "red"}}}}, "p.yaml", warnings)
        self.assertEqual(warnings, ["p.yaml: cost_routing.agents.a: unknown key 'colour' ignored"])

    def test_invalid(self) -> None:
        bad_docs = [
            [],
            {"cost_routing": []},
            {"cost_routing": {"agents": []}},
            {"cost_routing": {"agents": {"../x": {"budget_total": 1}}}},
            {"cost_routing": {"agents": {True: {"budget_total": 1}}}},
            {"cost_routing": {"agents": {"a": None}}},
            {"cost_routing": {"agents": {"a": {}}}},
            {"cost_routing": {"agents": {"a": {"budget_total": 0}}}},
            {"cost_routing": {"agents": {"a": {"budget_total": "lots"}}}},
            {"cost_routing": {"agents": {"a": {"budget_total": 1, "budget_spent": -1}}}},
            {"cost_routing": {"agents": {"a": {"budget_total": 1, "hard_cap": "maybe"}}}},
            {"cost_routing": {"agents": {"a": {"budget_total": 1, "period": "yearly"}}}},
            {"cost_routing": {"agents": {"a": {"budget_total": 1, "period": 7}}}},
            {"cost_routing": {"agents": {"a": {"budget_total": 1, "max_requests": 1.5}}}},
            {"cost_routing": {"agents": {"a": {"budget_total": 1, "tiers": {"x": 1}}}}},
            {"cost_routing": {"agents": {"a": {"budget_total": 1, "tiers": [{"threshold": 2, "models": ["a/b"]}]}}}},
        ]
        for bad in bad_docs:
            with self.subTest(bad=bad):
                error = self.assertRaises(PolicyFileError, policy_budgets, bad, "p.yaml")
                self.assertTrue(str(error).startswith("p.yaml"), str(error))
                self.assertIsInstance(error, BudgetError)


class InterpolationTests(SynchronousTestCase):
    ENV = {"BUDGET": "25", "EMPTY": "", "NAME": "bot"}

    def test_forms(self) -> None:
        cases = {
            "${BUDGET}": "25",
            "${BUDGET:-10}": "25",
            "${MISSING:-10}": "10",
            "${EMPTY:-10}": "10",
            "${EMPTY-10}": "",
            "${MISSING-10}": "10",
            "${MISSING:-}": "",
            "agent-${NAME}-x": "agent-bot-x",
            "$$BUDGET": "$BUDGET",
            "$BUDGET": "$BUDGET",
            "costs $5": "costs $5",
            "${BUDGET}${NAME}": "25bot",
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(interpolate(text, self.ENV), expected)

    def test_nested_values_not_keys(self) -> None:
        value = {"${NAME}": ["${BUDGET}", 3, True, {"x": "${NAME}"}]}
        self.assertEqual(interpolate(value, self.ENV), {"${NAME}": ["25", 3, True, {"x": "bot"}]})

    def test_unset_is_an_error(self) -> None:
        error = self.assertRaises(PolicyFileError, interpolate, {"a": "${NOPE}"}, {})
        self.assertIn("NOPE", str(error))
        self.assertIn("a", str(error))

    def test_values_become_numbers(self) -> None:
        doc = {
            "cost_routing": {
                "agents": {
                    "a": {
                        "budget_total": "${BUDGET}",
                        "hard_cap": "${CAP:-true}",
                        "tiers": [{"threshold": "${T:-0.25}", "models": ["${M:-a/b}"]}],
                    }
                }
            }
        }
        raw = policy_budgets(doc, env=self.ENV)["a"]
        self.assertEqual(raw["limit_usd"], 25.0)
        self.assertEqual(raw["behavior"], "hard_stop")
        self.assertEqual(parse_budget(raw).tiers, (Tier(0.25, ("a/b",)),))

    def test_only_the_agents_are_interpolated(self) -> None:
        doc = {"gateway": {"key": "${GATEWAY_KEY}"}, "cost_routing": {"agents": {"a": {"budget_total": 1}}}}
        self.assertEqual(list(policy_budgets(doc, env={})), ["a"])


class LoadTests(SynchronousTestCase):
    def set_yaml_module(self, module) -> None:
        """Make C{import yaml} give C{module} (L{None}: fail) for this test."""
        missing = object()
        original = sys.modules.get("yaml", missing)
        sys.modules["yaml"] = module

        def restore() -> None:
            if original is missing:
                sys.modules.pop("yaml", None)
            else:
                sys.modules["yaml"] = original

        self.addCleanup(restore)

    def write(self, text: str | bytes, name: str = "policy.yaml") -> str:
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
        return path

    def test_json_without_pyyaml(self) -> None:
        self.set_yaml_module(None)  # importing yaml now fails
        doc = {"cost_routing": {"agents": {"a": {"budget_total": "${A_BUDGET:-7}", "hard_cap": True}}}}
        path = self.write(json.dumps(doc), "policy.json")
        self.assertEqual(
            load_policy_file(path, {}), {"a": {"limit_usd": 7.0, "behavior": "hard_stop", "period": "monthly"}}
        )
        self.assertEqual(load_policy_file(path, {"A_BUDGET": "9"})["a"]["limit_usd"], 9.0)

    def test_yaml_without_pyyaml_is_a_clear_error(self) -> None:
        self.set_yaml_module(None)
        path = self.write(YAML_TEXT)
        error = self.assertRaises(PolicyFileError, load_policy_file, path, {})
        self.assertIn("PyYAML", str(error))
        self.assertIn("CLLAMA_POLICY_FILE", str(error))

    def test_yaml_with_a_yaml_module(self) -> None:
        # A stand-in for PyYAML (not installed here), to exercise the path.
        fake = types.ModuleType("yaml")

        class YAMLError(Exception):
            pass

        def safe_load(text: str):
            if "broken" in text:
                raise YAMLError("mapping values are not allowed here")
            return {"cost_routing": {"agents": {"a": {"budget_total": "${B:-3}"}}}}

        fake.YAMLError = YAMLError  # type: ignore[attr-defined]
        fake.safe_load = safe_load  # type: ignore[attr-defined]
        self.set_yaml_module(fake)
        self.assertEqual(load_policy_file(self.write("cost_routing: ..."), {})["a"]["limit_usd"], 3.0)
        error = self.assertRaises(PolicyFileError, load_policy_file, self.write("broken: : :"), {})
        self.assertIn("not valid YAML", str(error))

    def test_real_yaml(self) -> None:
        if yaml is None:
            raise self.skipTest("PyYAML is not installed")
        budgets = load_policy_file(self.write(YAML_TEXT), {"TIVERTON_BUDGET": "80"})
        self.assertEqual(budgets["tiverton"]["limit_usd"], 80.0)
        self.assertEqual(budgets["tiverton"]["spent_offset_usd"], 12.5)
        self.assertEqual(budgets["allen"], {"limit_usd": 5.0, "behavior": "soft_alert", "window": "24h"})

    def test_file_problems(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        missing = os.path.join(directory, "missing.yaml")
        self.assertIn("does not exist", str(self.assertRaises(PolicyFileError, load_policy_file, missing, {})))
        self.assertIn("regular file", str(self.assertRaises(PolicyFileError, load_policy_file, directory, {})))
        not_utf8 = self.write(b"\xff\xfe{", "bad.json")
        self.assertIn("UTF-8", str(self.assertRaises(PolicyFileError, load_policy_file, not_utf8, {})))
        bad_json = self.write("{nope", "bad2.json")
        self.assertIn("JSON", str(self.assertRaises(PolicyFileError, load_policy_file, bad_json, {})))
        unset = self.write(json.dumps({"cost_routing": {"agents": {"a": {"budget_total": "${NOPE}"}}}}), "u.json")
        error = self.assertRaises(PolicyFileError, load_policy_file, unset, {})
        self.assertIn("NOPE", str(error))
        self.assertIn(unset, str(error))

    def test_too_large(self) -> None:
        from cllama_tx.governance import policy_file

        self.patch(policy_file, "MAX_POLICY_FILE_BYTES", 10)
        path = self.write(json.dumps({"cost_routing": {}}), "big.json")
        self.assertIn("larger", str(self.assertRaises(PolicyFileError, load_policy_file, path, {})))
