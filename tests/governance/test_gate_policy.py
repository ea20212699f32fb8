"""
Tests for L{cllama_tx.governance.gate_policy}: the Execwall OR gate's own
policy.yaml read as the gate reads it, and what its console reports.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.governance.budgets import parse_budget
from cllama_tx.governance.gate_policy import (
    gate_budget,
    is_gate_document,
    openrouter_id,
    openrouter_ref,
    policy_document,
    read_policy,
    remaining_fraction,
    routing_info,
    spend_fields,
)
from cllama_tx.governance.periods import LIFETIME
from cllama_tx.governance.policy_file import PolicyFileError, load_policy_file
from cllama_tx.governance.tiers import AT_LEAST

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "execwall", "policy.yaml")


class GateFileTests(SynchronousTestCase):
    def test_the_gates_own_file_loads_as_it_is(self) -> None:
        warnings: list[str] = []
        read = read_policy(FIXTURE, {"OPENROUTER_API_KEY": "k"}, warnings)
        self.assertEqual(warnings, [])
        self.assertEqual(sorted(read.budgets), ["agent-1", "default"])
        agent = parse_budget(read.budgets["agent-1"])
        assert agent is not None
        self.assertEqual((agent.limit_usd, agent.behavior, agent.period, agent.tiers_rule),
                         (50.0, "hard_stop", "daily", AT_LEAST))
        self.assertEqual([t.models for t in agent.tiers], [
            ("openrouter/anthropic/claude-3.5-sonnet", "openrouter/openai/gpt-4o"),
            ("openrouter/anthropic/claude-3-haiku", "openrouter/openai/gpt-4o-mini"),
            ("openrouter/mistralai/mistral-7b-instruct",),
        ])
        default = parse_budget(read.budgets["default"])
        assert default is not None
        self.assertEqual((default.limit_usd, default.behavior, default.period), (10.0, "soft_alert", LIFETIME))
        gate = read.gate
        assert gate is not None
        self.assertEqual(gate.agent_ids, ["agent-1", "default"])
        self.assertEqual(gate.agents["agent-1"].period_reset, "2025-02-23T00:00:00Z")
        self.assertEqual((gate.agents["default"].period, gate.agents["default"].hard_cap), ("none", False))
        self.assertEqual((gate.upstream.base_url, gate.upstream.api_key, gate.upstream.timeout_seconds),
                         ("https://openrouter.ai/api/v1", "k", 120.0))

    def test_unset_variables_are_empty_in_the_openrouter_section(self) -> None:
        gate = read_policy(FIXTURE, {}).gate
        assert gate is not None
        self.assertIsNone(gate.upstream.api_key)  # ${OPENROUTER_API_KEY} unset: empty, as the gate reads it

    def test_our_own_reader_takes_period_none_too(self) -> None:
        budgets = load_policy_file(FIXTURE, {})
        self.assertEqual(budgets["default"]["period"], LIFETIME)
        self.assertNotIn("tiers_rule", budgets["agent-1"])  # our dialect, without the gate's section

    def test_detection(self) -> None:
        self.assertTrue(is_gate_document({"cost_routing": {"openrouter": {}, "agents": {}}}))
        for doc in (None, [], {"cost_routing": {"agents": {}}}, {"cost_routing": {"openrouter": "x"}}):
            with self.subTest(doc=doc):
                self.assertFalse(is_gate_document(doc))
        ours = policy_document({"cost_routing": {"agents": {"a": {"budget_total": 1}}}})
        self.assertIsNone(ours.gate)
        self.assertEqual(ours.budgets["a"]["period"], "monthly")

    def test_the_gates_defaults(self) -> None:
        budget = gate_budget({"budget_total": 5, "tiers": [{"threshold": 0, "models": ["x/y"]}]}, "a")
        self.assertEqual(budget, {
            "limit_usd": 5.0, "behavior": "hard_stop", "period": LIFETIME,
            "tiers": [{"threshold": 0.0, "models": ["openrouter/x/y"]}], "tiers_rule": AT_LEAST,
        })

    def test_problems_say_where(self) -> None:
        for entry in ({}, {"budget_total": "lots"}, {"budget_total": 1, "period": "yearly"},
                      {"budget_total": 1, "tiers": [{"threshold": 2, "models": ["x"]}]}):
            with self.subTest(entry=entry):
                doc = {"cost_routing": {"openrouter": {}, "agents": {"a": entry}}}
                error = self.assertRaises(PolicyFileError, policy_document, doc, "p.yaml")
                self.assertIn("p.yaml: cost_routing.agents.a", str(error))

    def test_refs(self) -> None:
        self.assertEqual(openrouter_ref("anthropic/claude-3.5-sonnet"), "openrouter/anthropic/claude-3.5-sonnet")
        self.assertEqual(openrouter_ref("openrouter/auto"), "openrouter/auto")
        self.assertEqual(openrouter_id("openrouter/openai/gpt-4o"), "openai/gpt-4o")
        self.assertEqual(openrouter_id("openai/gpt-4o"), "openai/gpt-4o")


class ReportTests(SynchronousTestCase):
    def budget(self, **extra):
        read = read_policy(FIXTURE, {})
        return parse_budget({**read.budgets["agent-1"], **extra})

    def test_routing_info_as_the_gate_computes_it(self) -> None:
        budget = self.budget()
        info = routing_info("agent-1", budget, 10.0, True)  # exactly 80% left: the premium tier (>=)
        self.assertEqual((info["current_tier"], info["models_allowed"], info["budget_percentage"], info["exhausted"]),
                         (0, ["anthropic/claude-3.5-sonnet", "openai/gpt-4o"], 80.0, False))
        info = routing_info("agent-1", budget, 40.0, True)
        self.assertEqual((info["current_tier"], info["models_allowed"]), (2, ["mistralai/mistral-7b-instruct"]))
        info = routing_info("agent-1", budget, 50.0, True)
        self.assertEqual(info, {
            "error": "budget_exhausted", "agent_id": "agent-1", "budget_total": 50.0, "budget_spent": 50.0,
            "budget_remaining": 0.0, "budget_percentage": 0.0, "current_tier": 2,
            "models_allowed": ["mistralai/mistral-7b-instruct"], "hard_cap": True, "exhausted": True,
        })

    def test_remaining_fraction(self) -> None:
        self.assertEqual(remaining_fraction(50.0, 10.0), 0.8)
        self.assertEqual(remaining_fraction(50.0, 60.0), 0.0)
        self.assertEqual(remaining_fraction(0.0, 0.0), 0.0)

    def test_spend_fields(self) -> None:
        gate = read_policy(FIXTURE, {}).gate
        assert gate is not None
        fields = spend_fields(gate.agents["agent-1"], self.budget(), 12.3456789, console=False,
                              period_reset="2026-01-01T00:00:00Z")
        self.assertEqual(fields, {
            "agent_id": "agent-1", "budget_total": 50.0, "budget_spent": 12.345679, "budget_remaining": 37.654321,
            "budget_source": "local", "period": "daily", "period_reset": "2026-01-01T00:00:00Z", "hard_cap": True,
        })
        default = parse_budget(read_policy(FIXTURE, {}).budgets["default"])
        fields = spend_fields(gate.agents["default"], default, 0.0, console=True, period_reset=None)
        self.assertEqual((fields["period"], fields["hard_cap"], fields["budget_source"]), ("none", False, "console"))
