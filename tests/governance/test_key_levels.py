"""
A virtual key's request under every level above it (its team, its user
within the team, its user, its organisation, the customer it names), as
L{cllama_tx.governance.engine.Governance} admits it: every budget checked
and held together (nothing held when one refuses), parallel and per-model
limits, blocked teams and customers, model lists of each level, soft
budgets, budget schedules, and LiteLLM's words for each refusal.  Pure:
an injected clock, the directory's records built in memory.
"""

from __future__ import annotations

import calendar

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting.pricing import Price
from cllama_tx.governance.budgets import BudgetBook
from cllama_tx.governance.engine import Governance
from cllama_tx.governance.ratelimit import RateLimiter
from cllama_tx.identity.entities import Entity
from cllama_tx.identity.key_model import VirtualKey
from cllama_tx.identity.principals import KeyPrincipal, MasterPrincipal
from cllama_tx.identity.teams import member_entry, membership
from cllama_tx.store.records import LedgerRow
from cllama_tx.store.shared import scope_name
from cllama_tx.surfaces.errors import ProxyError
from cllama_tx.surfaces.matrix import OPENAI_CHAT

NOW = float(calendar.timegm((2026, 11, 17, 12, 0, 0)))
HASH = "a" * 64


class FakePricing:
    def price(self, provider, model):
        if (provider, model) in (("openai", "gpt-test"), ("openai", "gpt-mini")):
            return Price(input=2.0, output=8.0, max_output_tokens=16_000)
        return None


@attrs.frozen
class Surface:
    name: str = OPENAI_CHAT
    api_format: str = "openai"
    billable: bool = True


@attrs.define
class Ex:
    body_size: int = 200
    surface: Surface = Surface()
    request_id: str = "r1"
    end_user: str | None = None
    organization_id: str | None = None
    admission: object = None
    shared_release: object = None


class Directory:
    """The directory's reads, over records made here."""

    def __init__(self, *records: Entity) -> None:
        self.records = {(r.kind, r.id): r for r in records}

    def team(self, team_id):
        return self.records.get(("team", team_id))

    def user(self, user_id):
        return self.records.get(("user", user_id))

    def organization(self, org_id):
        return self.records.get(("org", org_id))

    def customer(self, user_id):
        return self.records.get(("customer", user_id))

    def member(self, team_id, user_id):
        team = self.team(team_id)
        return None if team is None else membership(team, user_id)


def chat(model="openai/gpt-test", max_tokens=1000, **extra):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, **extra}


def worst(max_tokens=1000, size=200):
    # The fake pricing's rates: $2 in and $8 out per million; text by its bytes.
    return (size * 2.0 + max_tokens * 8.0) / 1e6


def row(cost, status=200):
    return LedgerRow(request_id="r", ts=NOW, agent="a", provider="openai", requested_model="openai/gpt-test",
                     effective_model="gpt-test", status=status, stream=False, latency_ms=1.0, input_tokens=10,
                     output_tokens=10, cost_usd=cost, priced=True)


class LevelTestCase(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.book = BudgetBook(self.clock, FakePricing())
        self.interventions: list = []
        self.directory = Directory()
        self.governance = Governance(
            clock=self.clock, book=self.book, limiter=RateLimiter(self.clock), directory=self.directory,
            intervention=lambda ex, name, **details: self.interventions.append((name, details)),
        )

    def key(self, **fields) -> KeyPrincipal:
        fields.setdefault("token_hash", HASH)
        fields.setdefault("key_name", "sk-...abcd")
        fields.setdefault("created_at", NOW)
        return KeyPrincipal(VirtualKey(**fields))

    def records(self, *records: Entity) -> None:
        self.directory.records.update({(r.kind, r.id): r for r in records})

    def admit(self, principal, doc=None, ex=None):
        return self.governance.admit(ex or Ex(), principal, doc or chat())

    def refused(self, principal, doc=None, ex=None) -> ProxyError:
        with self.assertRaises(ProxyError) as caught:
            self.admit(principal, doc, ex)
        return caught.exception

    def held(self, scope):
        return self.book._states[scope].own_usd if scope in self.book._states else 0.0


class BudgetLevelTests(LevelTestCase):
    def full_house(self, **team):
        self.records(
            Entity("team", "t1", max_budget=10.0, org="o1",
                   members={"u1": member_entry("user", None, {"max_budget": 9.0}, NOW)}, **team),
            Entity("user", "u1", max_budget=8.0),
            Entity("org", "o1", max_budget=7.0),
            Entity("customer", "c1", max_budget=6.0),
        )
        return self.key(team_id="t1", user_id="u1", max_budget=11.0)

    def test_every_level_is_held_together(self) -> None:
        principal = self.full_house()
        ex = Ex()
        admission = self.admit(principal, chat(user="c1"), ex)
        scopes = [held.agent for held in admission.reservations]
        self.assertEqual(scopes, [
            scope_name("key", HASH), scope_name("team", "t1"), scope_name("member", "t1", "u1"),
            scope_name("user", "u1"), scope_name("org", "o1"), scope_name("customer", "c1"),
        ])
        self.assertEqual({held.worst_case_usd for held in admission.reservations}, {worst(size=ex.body_size)})
        # What the row is billed to, besides the key.
        self.assertEqual((ex.end_user, ex.organization_id), ("c1", "o1"))

    def test_one_level_out_of_room_holds_nothing_anywhere(self) -> None:
        principal = self.full_house()
        self.book.load(scope_name("org", "o1"), [(NOW, 7.0, True)])
        error = self.refused(principal, chat(user="c1"))
        self.assertEqual((error.status, error.error_type, error.wire_code), (422, "budget_exceeded", "422"))
        self.assertTrue(error.message.startswith("Budget has been exceeded! Organization=o1 Current cost: "), error)
        self.assertIn("Max budget: 7", error.message)
        for scope in (scope_name("key", HASH), scope_name("team", "t1"), scope_name("user", "u1")):
            self.assertEqual(self.held(scope), 0.0, scope)

    def test_a_spent_budget_says_so_in_litellm_words(self) -> None:
        principal = self.key(max_budget=1.0)
        self.book.load(scope_name("key", HASH), [(NOW, 1.0, True)])
        error = self.refused(principal)
        self.assertEqual(error.message, "Budget has been exceeded! Key=sk-...abcd Current cost: 1, Max budget: 1")
        self.assertEqual(error.extra["budget"]["limit_usd"], 1.0)

    def test_requests_in_flight_holding_the_room_are_a_retry(self) -> None:
        principal = self.key(max_budget=worst() * 1.5)
        first = self.admit(principal)
        error = self.refused(principal)
        self.assertEqual((error.status, error.code, error.error_type), (429, "budget_held", "rate_limit_error"))
        self.assertEqual(error.retry_after, 1)
        ex = Ex()
        ex.admission = first
        self.governance.finish(ex, row(worst() / 2))
        self.admit(principal)

    def test_a_budget_of_zero_refuses_everything(self) -> None:
        self.records(Entity("team", "t0", max_budget=0.0))
        error = self.refused(self.key(team_id="t0"))
        self.assertEqual((error.status, error.error_type), (422, "budget_exceeded"))
        self.assertIn("Team=t0", error.message)

    def test_member_budget_defaults_to_the_team_s(self) -> None:
        self.records(Entity("team", "t1", members={"u1": member_entry("user", None, {}, NOW)},
                            extra={"team_member_budget": 3.0, "team_member_budget_duration": "1d"}))
        principal = self.key(team_id="t1", user_id="u1")
        levels = {level.scope: level for level in principal.limits(self.directory)}
        member = levels[scope_name("member", "t1", "u1")]
        self.assertEqual(member.budget["limit_usd"], 3.0)
        self.assertEqual(member.budget["period"], "daily")
        self.assertEqual(member.entity, "User=u1 in Team=t1")

    def test_a_budget_schedule_counts_its_period_only(self) -> None:
        principal = self.key(max_budget=1.0, budget_duration="1d")
        # Spent yesterday: today's budget is whole.
        self.book.load(scope_name("key", HASH), [(NOW - 86400, 1.0, True)])
        self.admit(principal)
        self.book.load(scope_name("key", HASH), [(NOW, 1.0, True)])
        error = self.refused(principal)
        # Refused until the next UTC midnight, as LiteLLM resets a 1d budget.
        self.assertEqual(error.retry_after, 12 * 3600)

    def test_soft_budget_alerts_once_when_crossed(self) -> None:
        principal = self.key(soft_budget=0.5)
        for cost in (0.3, 0.3, 0.3):
            ex = Ex()
            ex.admission = self.admit(principal)
            self.governance.finish(ex, row(cost))
        alerts = [d for name, d in self.interventions if name == "budget_alert"]
        self.assertEqual(len(alerts), 1)
        self.assertEqual(alerts[0]["scope"], scope_name("key", HASH))

    def test_soft_budget_with_a_hard_one(self) -> None:
        principal = self.key(soft_budget=0.5, max_budget=5.0)
        for cost in (0.4, 0.4):
            ex = Ex()
            ex.admission = self.admit(principal)
            self.governance.finish(ex, row(cost))
        alerts = [d for name, d in self.interventions if name == "budget_alert"]
        self.assertEqual([(a["reason"], a["soft_budget_usd"]) for a in alerts], [("soft_budget", 0.5)])


class LimitTests(LevelTestCase):
    def test_parallel_requests(self) -> None:
        principal = self.key(max_parallel_requests=1)
        first = self.admit(principal)
        error = self.refused(principal)
        self.assertEqual((error.status, error.code, error.wire_code), (429, "parallel_limited", "429"))
        ex = Ex()
        ex.admission = first
        self.governance.finish(ex, row(0.0))
        self.admit(principal)

    def test_parallel_zero_blocks_every_request(self) -> None:
        error = self.refused(self.key(max_parallel_requests=0))
        self.assertIn("max_parallel_requests is 0", error.message)

    def test_a_team_parallel_limit_across_its_keys(self) -> None:
        self.records(Entity("team", "t1", max_parallel_requests=1))
        self.admit(self.key(team_id="t1"))
        error = self.refused(self.key(token_hash="b" * 64, team_id="t1"))
        self.assertIn("Team=t1", error.message)

    def test_per_model_rate_limit(self) -> None:
        principal = self.key(model_rpm_limit={"openai/gpt-test": 1})
        self.admit(principal)
        error = self.refused(principal)
        self.assertEqual((error.status, error.error_type), (429, "rate_limit_error"))
        self.assertIn("model=openai/gpt-test", error.message)
        self.admit(principal, chat(model="openai/gpt-mini"))

    def test_per_model_budget(self) -> None:
        principal = self.key(model_max_budget={"openai/gpt-test": {"max_budget": 1.0, "budget_duration": None}})
        self.book.load(scope_name("keymodel", HASH, "openai/gpt-test"), [(NOW, 1.0, True)])
        error = self.refused(principal)
        self.assertIn("model=openai/gpt-test", error.message)
        self.admit(principal, chat(model="openai/gpt-mini"))

    def test_user_rate_limit_over_all_their_keys(self) -> None:
        self.records(Entity("user", "u1", rpm_limit=1))
        self.admit(self.key(user_id="u1"))
        error = self.refused(self.key(token_hash="c" * 64, user_id="u1"))
        self.assertIn("User=u1", error.message)


class AccessTests(LevelTestCase):
    def test_each_level_s_model_list(self) -> None:
        self.records(Entity("team", "t1", models=("openai/gpt-mini",)))
        principal = self.key(team_id="t1")
        self.admit(principal, chat(model="openai/gpt-mini"))
        error = self.refused(principal)
        self.assertEqual((error.status, error.error_type, error.param, error.wire_code),
                         (403, "team_model_access_denied", "model", "403"))
        error = self.refused(self.key(models=("openai/gpt-mini",)))
        self.assertEqual(error.error_type, "key_model_access_denied")

    def test_a_customer_s_model_list(self) -> None:
        self.records(Entity("customer", "c1", models=("openai/gpt-mini",)))
        error = self.refused(self.key(), chat(user="c1"))
        self.assertEqual(error.error_type, "customer_model_access_denied")

    def test_blocked_team_and_customer(self) -> None:
        self.records(Entity("team", "t1", blocked=True), Entity("customer", "c1", blocked=True))
        error = self.refused(self.key(team_id="t1"))
        self.assertEqual((error.status, error.error_type), (401, "auth_error"))
        self.assertIn("Team=t1 is blocked", error.message)
        error = self.refused(self.key(), chat(user="c1"))
        self.assertIn("End User=c1 is blocked", error.message)

    def test_the_master_key_under_a_customer_s_budget(self) -> None:
        self.records(Entity("customer", "c1", max_budget=1.0))
        self.book.load(scope_name("customer", "c1"), [(NOW, 1.0, True)])
        error = self.refused(MasterPrincipal(), chat(user="c1"))
        self.assertIn("End User=c1", error.message)
        self.admit(MasterPrincipal(), chat(user="someone-else"))
