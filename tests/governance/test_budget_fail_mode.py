"""
The budget's audit lines as the reference writes them and
C{CLLAMA_BUDGET_FAIL_MODE}, in L{cllama_tx.governance.engine.Governance}
and L{cllama_tx.governance.budget_audit}: refusals audited as
C{budget_exceeded} / C{rate_limited}, a C{soft_alert} over its limit named
the same, a budget that cannot be evaluated audited as
C{budget_check_unavailable} and refused (closed, the default) or passed
over (open); the setting read as the reference reads it.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.governance.budget_audit import (
    DEFAULT_FAIL_MODE,
    parse_fail_mode,
    refusal_intervention,
)
from cllama_tx.governance.budgets import BudgetBook
from cllama_tx.governance.engine import Governance
from cllama_tx.governance.ratelimit import RateLimiter
from cllama_tx.runtime.config import Config
from cllama_tx.runtime.errors import ConfigError
from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.surfaces.errors import ProxyError
from tests.governance.test_engine_lowering import CHAT, Agent, Ex, FakePricing

BROKEN = {"limit_usd": 1.0, "window": "forever", "behavior": "hard_stop"}


def chat(max_tokens=100):
    return {"model": "openai/gpt-test", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]}


class LedgerHoldingRows:
    """A ledger that cannot write: it refuses budgeted callers only (docs/LEDGER.md)."""

    def admission_refusal(self, budgeted):
        return "the ledger cannot write its records, so spend against this budget cannot be counted" if budgeted else None


class GovernanceCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.book = BudgetBook(self.clock, FakePricing())
        self.lines: list[tuple[str, dict]] = []

    def governance(self, **kwargs) -> Governance:
        return Governance(
            clock=self.clock, book=self.book, limiter=RateLimiter(self.clock),
            intervention=lambda ex, name, **details: self.lines.append((name, details)), **kwargs,
        )

    def admit(self, governance, agent, doc=None):
        doc = doc or chat()
        return governance.admit(Ex(CHAT, len(json.dumps(doc))), agent, doc)

    def spent(self, scope, usd, requests=True):
        self.book.load(scope, [(self.clock.seconds(), usd, requests)])


class RefusalInterventionTests(GovernanceCase):
    def test_hard_stop_refusal_is_audited_as_budget_exceeded(self) -> None:
        agent = Agent("capped", {"limit_usd": 0.5, "window": "1h", "behavior": "hard_stop"})
        self.spent("capped", 0.5)
        with self.assertRaises(ProxyError) as caught:
            self.admit(self.governance(), agent)
        self.assertEqual((caught.exception.status, caught.exception.code), (429, "budget_exceeded"))
        self.assertEqual(self.lines, [("budget_exceeded", {
            "status_code": 429, "retry_after": 3600, "behavior": "hard_stop", "window": "1h", "limit_usd": 0.5,
        })])

    def test_max_requests_refusal_is_audited_as_rate_limited(self) -> None:
        agent = Agent("nano", {"max_requests": 1, "window": "1h", "behavior": "rate_limit"})
        self.spent("nano", 0.01)
        with self.assertRaises(ProxyError) as caught:
            self.admit(self.governance(), agent)
        self.assertEqual(caught.exception.code, "rate_limited")
        self.assertEqual(self.lines, [("rate_limited", {
            "status_code": 429, "retry_after": 3600, "behavior": "rate_limit", "window": "1h", "max_requests": 1,
        })])

    def test_rpm_refusal_is_audited_as_rate_limited(self) -> None:
        agent = Agent("fast", None, metadata={"rate_limits": {"rpm": 1}})
        governance = self.governance()
        self.admit(governance, agent)
        with self.assertRaises(ProxyError):
            self.admit(governance, agent)
        [(name, details)] = self.lines
        self.assertEqual((name, details["status_code"]), ("rate_limited", 429))
        self.assertNotIn("behavior", details)  # no budget: nothing to say of one

    def test_soft_alert_over_its_limit_is_named_as_the_reference_names_it(self) -> None:
        agent = Agent("soft", {"limit_usd": 0.5, "window": "24h", "behavior": "soft_alert"})
        self.spent("soft", 0.6)
        admission = self.admit(self.governance(), agent)
        self.assertTrue(admission.reservation.alert)
        self.assertEqual(self.lines, [("budget_exceeded", {"behavior": "soft_alert", "window": "24h", "scope": "soft"})])

    def test_an_admitted_request_writes_no_refusal_line(self) -> None:
        agent = Agent("fine", {"limit_usd": 5.0, "window": "1h", "behavior": "hard_stop"})
        self.admit(self.governance(), agent)
        self.assertEqual(self.lines, [])

    def test_other_refusals_are_not_budget_interventions(self) -> None:
        self.assertIsNone(refusal_intervention(ProxyError(403, "model_not_allowed", "no")))
        self.assertIsNone(refusal_intervention(ProxyError(503, "budget_unavailable", "no")))
        self.assertEqual(refusal_intervention(ProxyError(429, "budget_held", "wait", retry_after=1)),
                         ("budget_held", {"status_code": 429, "retry_after": 1}))


class FailModeTests(GovernanceCase):
    def test_closed_by_default_refuses_a_budget_that_cannot_be_evaluated(self) -> None:
        with self.assertRaises(ProxyError) as caught:
            self.admit(self.governance(), Agent("broken", BROKEN))
        error = caught.exception
        self.assertEqual((error.status, error.code), (503, "budget_unavailable"))
        self.assertIn("budget enforcement unavailable", error.message)  # the reference's words
        self.assertEqual(self.lines, [("budget_check_unavailable", {
            "reason": error.message, "fail_mode": "closed", "scope": "broken",
        })])

    def test_open_lets_it_go_on_audited(self) -> None:
        admission = self.admit(self.governance(budget_fail_open=True), Agent("broken", BROKEN))
        self.assertEqual(admission.reservations, [])
        [(name, details)] = self.lines
        self.assertEqual((name, details["fail_mode"], details["scope"]), ("budget_check_unavailable", "open", "broken"))

    def test_an_unknown_timezone_of_a_calendar_budget(self) -> None:
        agent = Agent("tz", {"limit_usd": 1.0, "period": "daily", "behavior": "hard_stop"}, timezone="Mars/Olympus")
        with self.assertRaises(ProxyError) as caught:
            self.admit(self.governance(), agent)
        self.assertEqual(caught.exception.code, "budget_unavailable")
        self.assertEqual([name for name, _ in self.lines], ["budget_check_unavailable"])
        self.lines.clear()
        admission = self.admit(self.governance(budget_fail_open=True), agent)
        self.assertEqual(admission.reservations, [])
        self.assertEqual([name for name, _ in self.lines], ["budget_check_unavailable"])

    def test_a_ledger_that_cannot_count_the_spend(self) -> None:
        agent = Agent("held", {"limit_usd": 1.0, "window": "1h", "behavior": "hard_stop"})
        with self.assertRaises(ProxyError) as caught:
            self.admit(self.governance(ledger=LedgerHoldingRows()), agent)
        self.assertEqual((caught.exception.status, caught.exception.code), (503, "ledger_unavailable"))
        self.assertEqual([name for name, _ in self.lines], ["budget_check_unavailable"])
        self.lines.clear()
        admission = self.admit(self.governance(ledger=LedgerHoldingRows(), budget_fail_open=True), agent)
        # Open: admitted, and still held against the budget in memory.
        self.assertEqual(len(admission.reservations), 1)
        self.assertEqual([name for name, _ in self.lines], ["budget_check_unavailable"])

    def test_an_agent_without_a_budget_is_not_affected(self) -> None:
        self.admit(self.governance(ledger=LedgerHoldingRows()), Agent("free", None))
        self.assertEqual(self.lines, [])


class SettingTests(SynchronousTestCase):
    def test_read_as_the_reference_reads_it(self) -> None:
        self.assertEqual(DEFAULT_FAIL_MODE, "closed")
        for text, mode in ((None, "closed"), ("", "closed"), ("  ", "closed"), ("open", "open"), (" OPEN ", "open"),
                           ("Closed", "closed"), ("closed\n", "closed")):
            self.assertEqual(parse_fail_mode(text), mode, text)

    def test_a_typo_stops_the_start(self) -> None:
        with self.assertRaises(ValueError):
            parse_fail_mode("opne")
        with self.assertRaises(ConfigError) as caught:
            Config.from_env({"CLLAMA_BUDGET_FAIL_MODE": "fail-open"})
        self.assertIn("CLLAMA_BUDGET_FAIL_MODE must be open or closed", str(caught.exception))

    def test_config(self) -> None:
        self.assertEqual(Config.from_env({}).budget_fail_mode, "closed")
        self.assertEqual(Config.from_env({"CLLAMA_BUDGET_FAIL_MODE": "Open"}).budget_fail_mode, "open")


class FailoverReachTests(GovernanceCase):
    """Reference: TestHandlerWarnsWhenDeclaredModelsCannotFailOver and its two negatives."""

    def policy(self, *slots):
        return {"mode": "clamp", "allowed": [{"slot": slot, "ref": ref} for slot, ref in slots]}

    def test_declared_models_that_cannot_fail_over_are_said(self) -> None:
        agent = Agent("weston", None, model_policy=self.policy(("primary", "openai/gpt-test"),
                                                               ("secondary", "openai/gpt-other")))
        admission = self.admit(self.governance(), agent)
        self.assertEqual([str(ref) for ref in admission.candidates], ["openai/gpt-test"])
        self.assertEqual(self.lines, [("policy_failover_unreachable", {
            "chosen": "openai/gpt-test", "declared": ["openai/gpt-test", "openai/gpt-other"]})])

    def test_not_when_failover_is_reachable_or_one_model_is_declared(self) -> None:
        for slots in ((("primary", "openai/gpt-test"), ("fallback", "anthropic/claude-test")),
                      (("primary", "openai/gpt-test"),)):
            self.admit(self.governance(), Agent("weston", None, model_policy=self.policy(*slots)))
        self.assertEqual(self.lines, [])


class StoreDown:
    """A shared store (several instances) that cannot be reached."""

    def admit(self, budget_scopes, rate_scopes, decide):
        return defer.fail(DatabaseUnavailable("connection refused"))

    def release(self, reservations, rate_updates):
        pass


class SharedStoreTests(GovernanceCase):
    def test_closed_refuses_with_retry_after(self) -> None:
        agent = Agent("shared", {"limit_usd": 1.0, "window": "1h", "behavior": "hard_stop"})
        failure = self.failureResultOf(self.admit(self.governance(coordinator=StoreDown()), agent), ProxyError)
        self.assertEqual((failure.value.status, failure.value.code, failure.value.retry_after), (503, "store_unavailable", 5))
        self.assertEqual([(name, details["fail_mode"]) for name, details in self.lines],
                         [("budget_check_unavailable", "closed")])

    def test_open_decides_here_on_what_this_instance_knows(self) -> None:
        agent = Agent("shared", {"limit_usd": 1.0, "window": "1h", "behavior": "hard_stop"})
        governance = self.governance(coordinator=StoreDown(), budget_fail_open=True)
        admission = self.successResultOf(self.admit(governance, agent))
        self.assertEqual(len(admission.reservations), 1)  # held in this instance's book
        self.assertEqual(admission.shared_reservations, [])
        self.assertEqual([(name, details["fail_mode"]) for name, details in self.lines],
                         [("budget_check_unavailable", "open")])
        # What this instance knows still refuses: its own spend over the limit.
        self.lines.clear()
        self.spent("shared", 1.0)
        failure = self.failureResultOf(self.admit(governance, agent), ProxyError)
        self.assertEqual(failure.value.code, "budget_exceeded")
        self.assertEqual([name for name, _ in self.lines], ["budget_check_unavailable", "budget_exceeded"])
