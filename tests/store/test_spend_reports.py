"""
The reads behind LiteLLM's spend endpoints and the seeding of the levels
above a key (L{cllama_tx.store.spend_reports}), on a real SQLite ledger
and a real PostgreSQL one: rows found by who they are billed to, by
either request id, by time; totals grouped by key, customer, model and
day; a budget scope's spend (L{cllama_tx.store.shared.scope_filter});
every level's timeline seeded at start, restarts included.
"""

from __future__ import annotations

import datetime

from twisted.trial.unittest import SynchronousTestCase, TestCase

from cllama_tx.store.shared import row_scopes, scope_filter, scope_name
from cllama_tx.store.spend_reports import cost_reader, logs_reader, totals_reader
from tests.store.test_ledger import DAY, NOON, SqliteBackend, row
from tests.store.test_pg_ledger import PostgresBackend


class ScopeNameTests(SynchronousTestCase):
    def test_names_and_their_rows(self) -> None:
        for kind, values, condition in [
            ("key", ("k" * 64,), "key_id = ?"),
            ("team", ("t:1",), "team_id = ?"),
            ("user", ("u@x",), "user_id = ?"),
            ("org", ("o",), "organization_id = ?"),
            ("customer", ("c",), "end_user = ?"),
            ("member", ("a:b", "c:d"), "team_id = ? AND user_id = ?"),
            ("keymodel", ("k" * 64, "ollama/llama3:8b"), "key_id = ? AND requested_model = ?"),
        ]:
            self.assertEqual(scope_filter(scope_name(kind, *values)), (condition, values), kind)
        self.assertEqual(scope_filter("tiverton"), ("agent = ?", ("tiverton",)))
        self.assertEqual(scope_filter(scope_name("parallel", "key:x")), ("1 = 0", ()))

    def test_a_row_s_locks(self) -> None:
        self.assertEqual(
            row_scopes("a", "k", "t", "u", "o", "c"),
            ["a", "key:k", "team:t", "user:u", "org:o", "customer:c"],
        )


K1, K2 = "1" * 64, "2" * 64


def day(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%d")


def rows():
    return [
        row("r1", key_id=K1, team_id="t1", user_id="u1", organization_id="o1", end_user="c1",
            response_id="chatcmpl-1", cost_usd=0.5),
        row("r2", key_id=K1, team_id="t1", user_id="u1", organization_id="o1", end_user="c2",
            requested_model="openai/gpt-mini", cost_usd=0.25),
        row("r3", key_id=K2, team_id="t2", user_id="u2", ts=NOON + DAY, cost_usd=1.0, status=500),
    ]


class ReportsMixin:
    async def test_reads(self):
        ledger = await self.start_ledger()
        for r in rows():
            await ledger.record(r)

        def report(build):
            return ledger.report(lambda dialect: build(dialect))

        found = await report(lambda _d: logs_reader(None, None, {"request_id": "chatcmpl-1"}, 10))
        self.assertEqual([r["request_id"] for r in found], ["r1"])
        found = await report(lambda _d: logs_reader(None, None, {"request_id": "r2"}, 10))
        self.assertEqual([r["response_id"] for r in found], [None])
        found = await report(lambda _d: logs_reader(NOON, NOON + DAY, {"key_id": K1, "end_user": "c2"}, 10))
        self.assertEqual([r["request_id"] for r in found], ["r2"])
        self.assertEqual(await report(lambda _d: cost_reader(scope_name("member", "t1", "u1"), None)), 0.75)
        self.assertEqual(await report(lambda _d: cost_reader(scope_name("org", "o1"), NOON + 1)), 0.0)
        self.assertEqual(
            await report(lambda _d: cost_reader(scope_name("keymodel", K1, "openai/gpt-mini"), None)), 0.25
        )
        totals = await report(lambda d: totals_reader(d, ["day", "key_id"], None, None, {}))
        self.assertEqual(
            [(t["day"], t["key_id"], t["spend"], t["requests"], t["failed_requests"]) for t in totals],
            [(day(NOON + DAY), K2, 1.0, 1, 1), (day(NOON), K1, 0.75, 2, 0)],
        )
        self.assertEqual(totals[1]["prompt_tokens"], 200)
        by_customer = await report(lambda d: totals_reader(d, ["end_user"], None, None, {"team_id": "t1"}))
        self.assertEqual({t["end_user"]: t["spend"] for t in by_customer}, {"c1": 0.5, "c2": 0.25})

    async def test_every_level_is_seeded_across_a_restart(self):
        ledger = await self.start_ledger()
        for r in rows():
            await ledger.record(r)
        ledger = await self.reopen(ledger)
        seeded = await ledger.seed_data(NOON - DAY)
        levels = {(scope, cost) for scope, _ts, cost, _counted, _unpriced in seeded.levels}
        self.assertEqual(levels, {
            (scope_name("user", "u1"), 0.75), (scope_name("user", "u2"), 1.0),
            (scope_name("org", "o1"), 0.75), (scope_name("customer", "c1"), 0.5), (scope_name("customer", "c2"), 0.25),
            (scope_name("member", "t1", "u1"), 0.75), (scope_name("member", "t2", "u2"), 1.0),
            (scope_name("keymodel", K1, "openai/gpt-4o"), 0.5), (scope_name("keymodel", K1, "openai/gpt-mini"), 0.25),
            (scope_name("keymodel", K2, "openai/gpt-4o"), 1.0),
        })


class SqliteReportsTests(ReportsMixin, SqliteBackend, TestCase):
    pass


class PostgresReportsTests(ReportsMixin, PostgresBackend, TestCase):
    pass
