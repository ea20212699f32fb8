"""
The SQLite ledger: group commit on its own thread, Deferreds that fire only
after the commit, totals rebuilt from SQL, pruning into rollups, and a child
process killed with SIGKILL that loses nothing it reported as recorded.

Real files, the real reactor for the thread hand-offs; writers are held with
a gate on the writer thread where a test needs rows to be queued together,
never with sleeps.
"""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import stat
import sys
import threading

from twisted.internet import defer, error, protocol, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from cllama_tx.interfaces import ILedger
from cllama_tx.store.ledger import (
    PRUNE_INTERVAL,
    SCHEMA_VERSION,
    LedgerClosed,
    LedgerSchemaError,
    SqliteLedger,
    Totals,
    day_number,
    pricing_status,
    utc_day,
)
from cllama_tx.store.records import LedgerRow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DAY = 86400.0
# A fixed Tuesday noon, UTC: 2026-11-17T12:00:00Z.
NOON = 20409 * DAY + 43200.0

COSTS_KEYS = {"total_cost_usd", "total_requests", "unpriced_requests", "agents"}
AGENT_KEYS = {"total_cost_usd", "total_requests", "unpriced_requests", "models"}
MODEL_KEYS = {
    "provider",
    "model",
    "input_tokens",
    "output_tokens",
    "cost_usd",
    "requests",
    "priced_requests",
    "unpriced_requests",
    "pricing_status",
}


def row(request_id: str, **fields) -> LedgerRow:
    values = dict(
        ts=NOON,
        agent="tiverton",
        provider="openai",
        requested_model="openai/gpt-4o",
        effective_model="gpt-4o",
        status=200,
        stream=False,
        latency_ms=120.0,
        ttfb_ms=40.0,
        input_tokens=100,
        output_tokens=20,
        cost_usd=0.001,
        priced=True,
    )
    values.update(fields)
    return LedgerRow(request_id=request_id, **values)


def crash_row(i: int) -> LedgerRow:
    """The i-th row the crashing child records (the parent recomputes it)."""
    return LedgerRow(
        request_id=f"crash-{i}",
        ts=NOON + i,
        agent=f"agent-{i % 3}",
        provider="anthropic" if i % 5 == 0 else "openai",
        requested_model="m",
        effective_model=["gpt-4o", "gpt-4o-mini"][i % 2],
        status=200 if i % 11 else 502,
        stream=bool(i % 2),
        latency_ms=float(i % 300),
        input_tokens=i % 100,
        output_tokens=2 * (i % 50),
        cache_read_tokens=i % 7,
        cache_write_tokens=i % 5,
        cost_usd=(i % 10) * 0.001,
        priced=i % 4 != 0,
        estimated=i % 13 == 0,
    )


def rounded(value):
    """C{value} with every float rounded: sums in another order differ in ulps."""
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value


def sql(path: str, query: str, *args):
    """Run C{query} on a connection of our own: what another process would see."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


class SqliteBackend:
    """
    The SQLite ledger behind the test mixins: each mixin's tests run on
    every backend (tests.store.test_pg_ledger runs them on PostgreSQL).
    """

    backend = "sqlite"
    integrity_error: type[Exception] = sqlite3.IntegrityError

    def open_ledger(self, path: str | None = None, **kwargs) -> SqliteLedger:
        if path is None:
            path = os.path.join(self.mktemp(), "ledger.db")
        ledger = SqliteLedger(path, reactor, **kwargs)
        ledger.startService()
        self.addCleanup(ledger.close)
        return ledger

    async def start_ledger(self, **kwargs) -> SqliteLedger:
        """A started ledger on a new store."""
        return self.open_ledger(**kwargs)

    async def reopen(self, ledger, **kwargs) -> SqliteLedger:
        """C{ledger} closed, and a new one started on the same store."""
        await ledger.close()
        return self.open_ledger(ledger.path, **kwargs)

    def unstarted_ledger(self) -> SqliteLedger:
        return SqliteLedger(os.path.join(self.mktemp(), "ledger.db"), reactor)

    def query(self, ledger, statement: str, *args) -> list[tuple]:
        """C{statement} (? placeholders) on a connection of our own: what another process sees."""
        return sql(ledger.path, statement, *args)

    async def timeline(self, ledger, since, bucket_seconds: int = 60) -> list:
        """The spend timeline, read both ways (the synchronous read at start, and the async one)."""
        found = ledger.spend_timeline(since, bucket_seconds)
        self.assertEqual(await ledger.spend_timeline_async(since, bucket_seconds), found)
        return found

    async def scope_timeline(self, ledger, column: str, since: float) -> list:
        found = ledger.scope_timeline(column, since)
        self.assertEqual(await ledger.scope_timeline_async(column, since), found)
        return found

    refusal_error: type[Exception] = sqlite3.IntegrityError

    def refuse_override_writes(self, ledger, message: str):
        """From now on, a write of a budget override fails with C{message} (a trigger)."""
        return ledger._on_writer(lambda conn: conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON budget_overrides "
            f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
        ))

    def allow_override_writes(self, ledger):
        return ledger._on_writer(lambda conn: conn.execute("DROP TRIGGER refuse"))

    async def hold(self, ledger):
        """
        The ledger's ordered write path blocked until the returned gate is
        set (see L{hold_writer}), on any backend: fires once it is.
        """
        gate = threading.Event()
        self.addCleanup(gate.set)
        entered: defer.Deferred = defer.Deferred()

        def hold(conn):
            reactor.callFromThread(entered.callback, None)
            return gate.wait(30)

        held = ledger._on_writer(hold)
        await entered
        return gate, held

    def hold_writer(self, ledger):
        """
        Block the writer thread until the returned gate is set, so that
        everything recorded meanwhile is queued at once.  Returns the gate
        and the Deferred of the blocking call.
        """
        gate = threading.Event()
        entered = threading.Event()
        self.addCleanup(gate.set)

        def hold(conn):
            entered.set()
            return gate.wait(30)

        held = ledger._on_writer(hold)
        # Wait until the writer is really inside: otherwise it could take
        # the hold and only part of what the test queues next in one batch.
        if not entered.wait(30):
            self.fail("the writer thread did not take the hold")
        return gate, held


class LedgerCase(SqliteBackend, TestCase):
    """A SQLite ledger test (the tests that are SQLite's by nature)."""


class ServiceTests(LedgerCase):
    """What only a file has: WAL, modes, the schema in it."""

    def test_bad_arguments(self) -> None:
        self.assertRaises(ValueError, SqliteLedger, "x.db", reactor, sync="off")
        self.assertRaises(ValueError, SqliteLedger, "x.db", reactor, retention_seconds=0)

    async def test_wal_and_synchronous(self) -> None:
        pragma = lambda ledger, name: ledger._on_writer(  # noqa: E731
            lambda conn: conn.execute(f"PRAGMA {name}").fetchone()[0]
        )
        normal = self.open_ledger()
        self.assertEqual(await pragma(normal, "journal_mode"), "wal")
        self.assertEqual(await pragma(normal, "synchronous"), 1)  # NORMAL
        full = self.open_ledger(sync="full")
        self.assertEqual(await pragma(full, "journal_mode"), "wal")
        self.assertEqual(await pragma(full, "synchronous"), 2)  # FULL

    async def test_modes(self) -> None:
        base = self.mktemp()
        os.makedirs(base)
        state = os.path.join(base, "state")
        path = os.path.join(state, "ledger.db")
        old = os.umask(0o022)
        try:
            ledger = self.open_ledger(path)
        finally:
            os.umask(old)
        await ledger.record(row("r1"))
        self.assertEqual(stat.S_IMODE(os.stat(state).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(path + "-wal").st_mode), 0o600)

    async def test_existing_directory_untouched(self) -> None:
        state = self.mktemp()
        os.makedirs(state)
        os.chmod(state, 0o750)
        self.open_ledger(os.path.join(state, "ledger.db"))
        self.assertEqual(stat.S_IMODE(os.stat(state).st_mode), 0o750)

    async def test_schema_tables_and_version(self) -> None:
        ledger = self.open_ledger()
        await ledger.close()
        tables = {name for (name,) in sql(ledger.path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.assertTrue({"requests", "rollups", "meta", "budget_overrides"} <= tables)
        self.assertEqual(
            sql(ledger.path, "SELECT value FROM meta WHERE key = 'schema_version'"), [(str(SCHEMA_VERSION),)]
        )
        self.assertEqual(SCHEMA_VERSION, 6)
        # The coordination tables of several processes on one file (workers).
        self.assertTrue({"instances", "reservations", "rate_events", "changes"} <= tables)
        columns = [c[1] for c in sql(ledger.path, "PRAGMA table_info(requests)")]
        self.assertEqual(columns[0], "id")
        self.assertEqual(set(columns[1:]), {f.name for f in LedgerRow.__attrs_attrs__} | {"instance"})
        indexed = {r[0] for r in sql(ledger.path, "SELECT sql FROM sqlite_master WHERE type = 'index'") if r[0]}
        self.assertIn("CREATE INDEX requests_ts ON requests (ts)", indexed)
        self.assertIn("CREATE INDEX requests_agent ON requests (agent)", indexed)
        # Reopening an existing ledger is fine.
        self.open_ledger(ledger.path)

    async def test_newer_schema_refused(self) -> None:
        ledger = self.open_ledger()
        await ledger.close()
        conn = sqlite3.connect(ledger.path)
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
        conn.commit()
        conn.close()
        again = SqliteLedger(ledger.path, reactor)
        exc = self.assertRaises(LedgerSchemaError, again.startService)
        self.assertIn("99", str(exc))
        self.assertFalse(again.running)
        self.assertIdentical(await again.close(), None)


class LifeCycleTestsMixin:
    async def test_interface(self) -> None:
        ledger = await self.start_ledger()
        self.assertTrue(verifyObject(ILedger, ledger))
        self.assertIsInstance(ledger.totals(), Totals)

    async def test_closed_ledger_refuses(self) -> None:
        ledger = self.unstarted_ledger()
        self.addCleanup(ledger.close)
        await self.assertFailure(ledger.record(row("early")), LedgerClosed)
        self.assertFalse(await ledger.ready())
        ledger.startService()
        await ledger.loaded()
        self.assertTrue(ledger.running)
        self.assertTrue(await ledger.ready())
        await ledger.stopService()
        self.assertFalse(ledger.running)
        self.assertFalse(await ledger.ready())
        await self.assertFailure(ledger.record(row("late")), LedgerClosed)
        await self.assertFailure(ledger.prune(NOON), LedgerClosed)
        await self.assertFailure(ledger.count(), LedgerClosed)
        await ledger.close()  # idempotent


class WriteTestsMixin:
    async def test_fires_only_after_commit(self) -> None:
        ledger = await self.start_ledger()
        gate, held = await self.hold(ledger)
        seen = []

        def committed(_, request_id):
            # Another connection already sees the row when the Deferred fires.
            seen.append(self.query(ledger, "SELECT request_id FROM requests WHERE request_id = ?", request_id))

        ds = [ledger.record(row(f"r{i}")).addCallback(committed, f"r{i}") for i in range(3)]
        self.assertFalse(any(d.called for d in ds))  # the writer is held: nothing committed
        self.assertEqual(self.query(ledger, "SELECT COUNT(*) FROM requests"), [(0,)])
        # ... but the totals count them already.
        self.assertEqual(ledger.totals().costs_api()["total_requests"], 3)
        gate.set()
        await held
        results = await defer.gatherResults(ds)
        self.assertEqual(results, [None, None, None])
        self.assertEqual(seen, [[("r0",)], [("r1",)], [("r2",)]])

    async def test_group_commit_in_order(self) -> None:
        ledger = await self.start_ledger()
        await ledger.record(row("first"))
        before = ledger.writer_stats()
        gate, held = await self.hold(ledger)
        fired = []
        ids = [f"r{i:03d}" for i in range(200)]
        ds = [ledger.record(row(i, ts=NOON - n)).addCallback(lambda _, i=i: fired.append(i))
              for n, i in enumerate(ids)]
        gate.set()
        await held
        await defer.gatherResults(ds)
        stats = ledger.writer_stats()
        self.assertEqual(stats["commits"] - before["commits"], 1)  # one transaction
        self.assertEqual(stats["largest_batch"], 200)
        self.assertEqual(stats["rows"], 201)
        self.assertEqual(fired, ids)  # Deferreds fire in record order
        stored = [r for (r,) in self.query(ledger, "SELECT request_id FROM requests ORDER BY id")]
        self.assertEqual(stored, ["first"] + ids)  # and commit order is record order

    async def test_failing_commit_spares_the_batch_and_the_writer(self) -> None:
        ledger = await self.start_ledger()
        await ledger.record(row("dup", cost_usd=1.0))
        # Alone in its batch.
        failure = await self.assertFailure(ledger.record(row("dup", cost_usd=5.0)), self.integrity_error)
        self.assertIn("UNIQUE", str(failure).upper())
        # In a batch with innocent rows.
        gate, held = await self.hold(ledger)
        ok1 = ledger.record(row("x1"))
        bad = ledger.record(row("dup", cost_usd=7.0))
        ok2 = ledger.record(row("x2"))
        gate.set()
        await held
        await ok1
        await self.assertFailure(bad, self.integrity_error)
        await ok2
        # The writer lives on.
        await ledger.record(row("x3"))
        self.assertEqual(await ledger.count(), 4)
        self.assertEqual(ledger.writer_stats()["failed_rows"], 2)
        # The failed rows were taken out of the totals again.
        costs = ledger.totals().costs_api()
        self.assertEqual(costs["total_requests"], 4)
        self.assertAlmostEqual(costs["total_cost_usd"], 1.003)
        self.assertEqual(ledger.totals().summary()["requests"], 4)

    async def test_failing_writer_call_does_not_kill_the_thread(self) -> None:
        ledger = await self.start_ledger()

        def broken(conn):
            raise RuntimeError("boom")

        await self.assertFailure(ledger._on_writer(broken), RuntimeError)
        await ledger.record(row("after"))
        self.assertEqual(await ledger.count(), 1)

    async def test_close_drains(self) -> None:
        ledger = await self.start_ledger()
        outcomes = []
        for i in range(300):
            ledger.record(row(f"r{i}")).addCallbacks(
                lambda _: outcomes.append("ok"), lambda f: outcomes.append(f)
            )
        closing = ledger.close()
        also = ledger.close()
        await closing
        await also
        self.assertEqual(outcomes, ["ok"] * 300)
        self.assertEqual(ledger.health()["state"], "closed")
        self.assertEqual(self.query(ledger, "SELECT COUNT(*) FROM requests"), [(300,)])
        await self.assertFailure(ledger.record(row("late")), LedgerClosed)

    async def test_stop_service_drains(self) -> None:
        ledger = await self.start_ledger()
        ds = [ledger.record(row(f"r{i}")) for i in range(50)]
        await ledger.stopService()
        self.assertTrue(all(d.called for d in ds))
        await defer.gatherResults(ds)
        reopened = await self.reopen(ledger)
        self.assertEqual(await reopened.count(), 50)

    async def test_cancelled_record_still_committed(self) -> None:
        ledger = await self.start_ledger()
        gate, held = await self.hold(ledger)
        d = ledger.record(row("cancelled"))
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        gate.set()
        await held
        await ledger.record(row("next"))
        self.assertEqual(await ledger.count(), 2)

    async def test_empty_strings_are_null(self) -> None:
        ledger = await self.start_ledger()
        await ledger.record(row("r", agent="", key_id=""))
        self.assertEqual(self.query(ledger, "SELECT agent, key_id FROM requests"), [(None, None)])
        self.assertEqual(ledger.totals().summary()["unidentified_requests"], 1)


def mixed_rows() -> list[LedgerRow]:
    """Several agents, models, days, statuses, priced or not, with cache tokens."""
    return [
        row("a1", agent="a", cache_read_tokens=50, cache_write_tokens=5, cost_usd=0.25, ts=NOON - 2 * DAY),
        row("a2", agent="a", cost_usd=0.5, estimated=True, ts=NOON - DAY),
        row("a3", agent="a", effective_model="gpt-x", priced=False, cost_usd=0.0, ts=NOON),
        row("a4", agent="a", provider="anthropic", effective_model="claude-x", priced=True, cost_usd=0.125),
        row("a5", agent="a", provider="anthropic", effective_model="claude-x", priced=False, cost_usd=0.0),
        row("a6", agent="a", status=502, input_tokens=0, output_tokens=0, cost_usd=0.0),
        row("b1", agent="b", provider="openrouter", effective_model="x/y", cost_usd=0.0625, ts=NOON + 3600),
        row("b2", agent="b", provider=None, effective_model=None, status=403, input_tokens=0,
            output_tokens=0, priced=False, cost_usd=0.0),
        row("anon", agent=None, provider=None, effective_model=None, status=401, input_tokens=0,
            output_tokens=0, priced=False, cost_usd=0.0),
        row("c1", agent="c", provider=None, effective_model=None, status=429, priced=False, cost_usd=0.0),
    ]


class TotalsTestsMixin:
    async def record_all(self, ledger, rows):
        await defer.gatherResults([ledger.record(r) for r in rows])

    async def test_costs_api_shape_and_values(self) -> None:
        ledger = await self.start_ledger()
        await self.record_all(ledger, mixed_rows())
        costs = ledger.totals().costs_api()
        self.assertEqual(set(costs), COSTS_KEYS)
        # Rows without an agent, and an agent's rows that never reached a
        # provider, are not in the contract's body ("c" had only those).
        self.assertEqual(set(costs["agents"]), {"a", "b"})
        for agent in costs["agents"].values():
            self.assertEqual(set(agent), AGENT_KEYS)
            for model in agent["models"]:
                self.assertEqual(set(model), MODEL_KEYS)
        a = costs["agents"]["a"]
        models = {(m["provider"], m["model"]): m for m in a["models"]}
        self.assertEqual(
            [(m["provider"], m["model"]) for m in a["models"]],
            [("anthropic", "claude-x"), ("openai", "gpt-4o"), ("openai", "gpt-x")],
        )
        gpt = models[("openai", "gpt-4o")]
        self.assertEqual(gpt["requests"], 3)
        self.assertEqual(gpt["priced_requests"], 3)
        self.assertEqual(gpt["unpriced_requests"], 0)
        self.assertEqual(gpt["pricing_status"], "priced")
        self.assertEqual(gpt["input_tokens"], 100 + 50 + 5 + 100 + 0)  # cache tokens included
        self.assertEqual(gpt["output_tokens"], 40)
        self.assertAlmostEqual(gpt["cost_usd"], 0.75)
        self.assertEqual(models[("openai", "gpt-x")]["pricing_status"], "unpriced")
        self.assertEqual(models[("anthropic", "claude-x")]["pricing_status"], "partial")
        self.assertEqual(a["total_requests"], 6)
        self.assertEqual(a["unpriced_requests"], 2)
        self.assertAlmostEqual(a["total_cost_usd"], 0.875)
        self.assertEqual(costs["total_requests"], 7)
        self.assertEqual(costs["unpriced_requests"], 2)
        self.assertAlmostEqual(costs["total_cost_usd"], 0.9375)
        self.assertEqual(
            ledger.totals().summary(),
            {"requests": 10, "errors": 4, "unidentified_requests": 1, "unrouted_requests": 2},
        )
        # Every agent with a request, "c" (refused before routing only) too.
        self.assertEqual(ledger.totals().agents(), ["a", "b", "c"])

    async def test_totals_equal_sql_after_restart(self) -> None:
        ledger = await self.start_ledger()
        rows = mixed_rows() + [crash_row(i) for i in range(500)]
        await self.record_all(ledger, rows)
        live = ledger.totals()
        before = (live.costs_api(), live.summary(), live.period(), live.period(utc_day(NOON), utc_day(NOON), "a"))
        await ledger.close()
        reopened = await self.reopen(ledger)
        rebuilt = reopened.totals()
        after = (rebuilt.costs_api(), rebuilt.summary(), rebuilt.period(),
                 rebuilt.period(utc_day(NOON), utc_day(NOON), "a"))
        self.assertEqual(rounded(after), rounded(before))
        # And both agree with plain SQL over the rows.
        per_model = self.query(
            ledger,
            "SELECT agent, provider, effective_model, COUNT(*), SUM(priced), "
            "SUM(input_tokens + cache_read_tokens + cache_write_tokens), SUM(output_tokens), SUM(cost_usd) "
            "FROM requests WHERE agent IS NOT NULL AND provider IS NOT NULL "
            "AND effective_model IS NOT NULL GROUP BY 1, 2, 3",
        )
        costs = rebuilt.costs_api()
        for agent, provider, model, n, priced, prompt, output, cost in per_model:
            entry = next(m for m in costs["agents"][agent]["models"]
                         if (m["provider"], m["model"]) == (provider, model))
            self.assertEqual((entry["requests"], entry["priced_requests"], entry["input_tokens"],
                              entry["output_tokens"]), (n, priced, prompt, output))
            self.assertAlmostEqual(entry["cost_usd"], cost, places=9)
        self.assertEqual(sum(r[3] for r in per_model), costs["total_requests"])

    async def test_period_by_day(self) -> None:
        ledger = await self.start_ledger()
        await self.record_all(ledger, mixed_rows())
        totals = ledger.totals()
        today = totals.period(utc_day(NOON), utc_day(NOON))
        # a3 a4 a5 a6 b1, and b2 c1 refused before routing (not "anon": no agent).
        self.assertEqual(today["total_requests"], 7)
        self.assertEqual(today["unrouted_requests"], 2)
        self.assertEqual(today["errors"], 3)
        unrouted = today["models"][-1]
        self.assertEqual(
            {k: unrouted[k] for k in ("provider", "model", "routed", "requests", "errors", "priced_requests",
                                      "unpriced_requests", "cost_usd", "pricing_status")},
            {"provider": "(unrouted)", "model": "(unrouted)", "routed": False, "requests": 2, "errors": 2,
             "priced_requests": 0, "unpriced_requests": 0, "cost_usd": 0.0, "pricing_status": "unrouted"},
        )
        self.assertTrue(all(m["routed"] for m in today["models"][:-1]))
        # Refusals carry no price: they do not make the period "partial".
        self.assertEqual(today["unpriced_requests"], 2)  # a3 a5
        self.assertEqual(totals.period(agent="c")["pricing_status"], "priced")
        yesterday_on = totals.period(utc_day(NOON - DAY), None, agent="a")
        self.assertEqual(yesterday_on["total_requests"], 5)
        self.assertAlmostEqual(yesterday_on["total_cost_usd"], 0.625)
        self.assertEqual(yesterday_on["pricing_status"], "partial")
        self.assertEqual(totals.period()["total_requests"], 9)
        self.assertEqual(totals.period("2000-01-01", "2000-01-02")["models"], [])

class PruneTestsMixin:
    async def test_prune_moves_rows_into_rollups(self) -> None:
        ledger = await self.start_ledger()
        rows = [
            row("old1", ts=NOON - 10 * DAY, cache_read_tokens=3, cost_usd=0.5),
            row("old2", ts=NOON - 10 * DAY + 60, priced=False, cost_usd=0.0, status=500),
            row("old3", ts=NOON - 9 * DAY, agent="b", key_id="k1", estimated=True),
            row("anon", ts=NOON - 9 * DAY, agent=None, provider=None, effective_model=None, status=401),
            row("edge", ts=NOON - 5 * DAY - 43200 + 1),  # 00:00:01 of the cutoff's day: kept
            row("new1", ts=NOON),
        ]
        await defer.gatherResults([ledger.record(r) for r in rows])
        totals_before = rounded((ledger.totals().costs_api(), ledger.totals().summary()))
        spend_before = await ledger.spend()
        # From 11:00 on the first old day: that day is only partly inside.
        old_period = dict(since=NOON - 10 * DAY - 3600, until=NOON - 8 * DAY)
        old_spend_before = await ledger.spend(**old_period)
        self.assertEqual(old_spend_before["total_requests"], 3)

        # A cutoff in the middle of a day keeps that whole day.
        moved = await ledger.prune(NOON - 5 * DAY + 3 * 3600)
        self.assertEqual(moved, 4)
        self.assertEqual(
            sorted(r for (r,) in self.query(ledger, "SELECT request_id FROM requests")), ["edge", "new1"]
        )
        rollups = self.query(
            ledger,
            "SELECT day, agent, provider, model, key_id, requests, priced_requests, unpriced_requests, "
            "estimated_requests, errors, input_tokens, cache_read_tokens, cost_usd FROM rollups ORDER BY 1, 2",
        )
        self.assertEqual(
            rollups,
            [
                (utc_day(NOON - 10 * DAY), "tiverton", "openai", "gpt-4o", "", 2, 1, 1, 0, 1, 200, 3, 0.5),
                (utc_day(NOON - 9 * DAY), "", "", "", "", 1, 1, 0, 0, 1, 100, 0, 0.001),
                (utc_day(NOON - 9 * DAY), "b", "openai", "gpt-4o", "k1", 1, 1, 0, 1, 0, 100, 0, 0.001),
            ],
        )
        # Totals do not move, now or after a restart; neither does spend.
        self.assertEqual(rounded((ledger.totals().costs_api(), ledger.totals().summary())), totals_before)
        self.assertEqual(rounded(await ledger.spend()), rounded(spend_before))
        old_spend = await ledger.spend(**old_period)
        self.assertFalse(old_spend.pop("exact"))  # rollup days only partly inside the period
        self.assertTrue(old_spend_before.pop("exact"))
        self.assertEqual(rounded(old_spend), rounded(old_spend_before))
        midnight = day_number(NOON - 10 * DAY) * DAY
        whole_days = await ledger.spend(since=midnight, until=midnight + 2 * DAY)
        self.assertTrue(whole_days["exact"])
        self.assertTrue((await ledger.spend(since=NOON - 11 * DAY, until=NOON - 8 * DAY))["exact"])
        self.assertEqual(whole_days["total_requests"], 3)
        await ledger.close()
        reopened = await self.reopen(ledger)
        self.assertEqual(rounded((reopened.totals().costs_api(), reopened.totals().summary())), totals_before)

        # A late row of an already rolled-up day is added to its rollup.
        await reopened.record(row("late", ts=NOON - 10 * DAY + 120, cost_usd=0.25))
        self.assertEqual(await reopened.prune(NOON - 5 * DAY), 1)
        self.assertEqual(
            self.query(ledger, "SELECT requests, cost_usd FROM rollups WHERE day = ? AND agent = 'tiverton'",
                utc_day(NOON - 10 * DAY)),
            [(3, 0.75)],
        )
        self.assertEqual(await reopened.prune(NOON - 5 * DAY), 0)

    async def test_cursor_survives_pruning_everything(self) -> None:
        ledger = await self.start_ledger()
        await ledger.record(row("a", ts=NOON - 10 * DAY))
        await ledger.record(row("b", ts=NOON - 10 * DAY))
        rows, cursor = await ledger.rows_after(0, 10)
        self.assertEqual(cursor, 2)
        self.assertEqual(await ledger.prune(NOON), 2)
        await ledger.record(row("c"))
        rows, cursor = await ledger.rows_after(cursor, 10)
        self.assertEqual([(r["id"], r["request_id"]) for r in rows], [(3, "c")])  # ids are never reused

    async def test_retention_loop(self) -> None:
        clock = Clock()
        now = 20409 * DAY + DAY - 1800  # 23:30 UTC
        clock.advance(now)
        plain = await self.start_ledger()
        await plain.record(row("ancient", ts=now - 30 * DAY))
        await plain.record(row("recent", ts=now - 3600))
        await plain.close()

        ledger = await self.reopen(plain, retention_seconds=7 * DAY, clock=clock)
        await ledger._on_writer(lambda conn: None)  # the prune at start is done
        self.assertEqual(
            [r for (r,) in self.query(ledger, "SELECT request_id FROM requests")], ["recent"]
        )
        self.assertEqual(self.query(ledger, "SELECT SUM(requests) FROM rollups"), [(1,)])

        # 01:00 of the cutoff's day: kept now, expired once the clock passes midnight.
        await ledger.record(row("aging", ts=(day_number(now) - 7) * DAY + 3600))
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(PRUNE_INTERVAL - 1)
        await ledger._on_writer(lambda conn: None)
        self.assertEqual(await ledger.count(), 2)
        clock.advance(1)
        await ledger._on_writer(lambda conn: None)
        self.assertEqual(await ledger.count(), 1)
        self.assertEqual(self.query(ledger, "SELECT SUM(requests) FROM rollups"), [(2,)])
        self.assertEqual(ledger.totals().costs_api()["total_requests"], 3)
        await ledger.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])


class ReadTestsMixin:
    async def test_spend(self) -> None:
        ledger = await self.start_ledger()
        await defer.gatherResults([ledger.record(r) for r in mixed_rows()])
        everything = await ledger.spend()
        # Every row of a known agent: b2 and c1, refused before routing, too.
        self.assertEqual(everything["total_requests"], 9)
        self.assertEqual(everything["unrouted_requests"], 2)
        self.assertAlmostEqual(everything["total_cost_usd"], 0.9375)
        self.assertEqual(everything["pricing_status"], "partial")
        self.assertTrue(everything["exact"])
        self.assertEqual(everything["errors"], 3)
        self.assertEqual(everything["input_tokens"], 700)
        self.assertEqual(everything["prompt_tokens"], 755)
        a_today = await ledger.spend("a", since=NOON - 1, until=NOON + 1)
        self.assertEqual(a_today["total_requests"], 4)
        self.assertEqual(
            {(m["provider"], m["model"]): m["requests"] for m in a_today["models"]},
            {("anthropic", "claude-x"): 2, ("openai", "gpt-4o"): 1, ("openai", "gpt-x"): 1},
        )
        self.assertEqual((a_today["agent"], a_today["since"], a_today["until"]), ("a", NOON - 1, NOON + 1))
        self.assertEqual((await ledger.spend("a", since=NOON + 1))["total_requests"], 0)
        self.assertEqual((await ledger.spend("nobody"))["models"], [])
        # The in-memory period over whole days agrees with SQL over the same days.
        midnight = day_number(NOON) * DAY
        self.assertEqual(
            rounded({k: v for k, v in (await ledger.spend(since=midnight, until=midnight + DAY)).items()
                     if k not in ("agent", "since", "until", "exact")}),
            rounded({k: v for k, v in ledger.totals().period(utc_day(NOON), utc_day(NOON)).items()
                     if k not in ("agent", "since_day", "until_day")}),
        )

    async def test_recent_rows_after_count_ready(self) -> None:
        ledger = await self.start_ledger()
        rows = [row(f"r{i}", agent="a" if i % 2 else "b", stream=bool(i % 3)) for i in range(25)]
        await defer.gatherResults([ledger.record(r) for r in rows])
        self.assertEqual(await ledger.count(), 25)
        self.assertTrue(await ledger.ready())
        latest = await ledger.recent(3)
        self.assertEqual([r["request_id"] for r in latest], ["r24", "r23", "r22"])
        self.assertEqual(set(latest[0]), {"id"} | {f.name for f in LedgerRow.__attrs_attrs__})
        self.assertIs(latest[0]["stream"], False)
        self.assertIs(latest[1]["stream"], True)
        self.assertEqual(LedgerRow(**{k: v for k, v in latest[0].items() if k != "id"}), rows[24])
        self.assertEqual([r["request_id"] for r in await ledger.recent(2, agent="a")], ["r23", "r21"])
        collected, cursor = [], 0
        while True:
            page, cursor = await ledger.rows_after(cursor, 10)
            if not page:
                break
            collected.extend(page)
        self.assertEqual([r["request_id"] for r in collected], [r.request_id for r in rows])
        self.assertEqual(cursor, collected[-1]["id"])
        self.assertEqual(await ledger.rows_after(cursor, 10), ([], cursor))


class LifeCycleTests(LifeCycleTestsMixin, LedgerCase):
    pass


class WriteTests(WriteTestsMixin, LedgerCase):
    pass


class TotalsTests(TotalsTestsMixin, LedgerCase):
    pass


class PruneTests(PruneTestsMixin, LedgerCase):
    pass


class ReadTests(ReadTestsMixin, LedgerCase):
    pass


CHILD = """
import itertools
import sys
from twisted.internet import defer, task
from cllama_tx.store.ledger import SqliteLedger
from tests.store.test_ledger import crash_row


async def main(reactor, path):
    ledger = SqliteLedger(path, reactor)
    ledger.startService()
    numbers = itertools.count()

    def committed(_, request_id):
        sys.stdout.write(request_id + "\\n")
        sys.stdout.flush()
        record_next()

    def record_next():
        row = crash_row(next(numbers))
        ledger.record(row).addCallback(committed, row.request_id)

    # Keep about 25 rows in flight until the parent kills us: the kill lands
    # with rows queued, rows being committed and rows committed but not yet
    # reported.
    for _ in range(25):
        record_next()
    await defer.Deferred()


task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1])))
"""


class _Child(protocol.ProcessProtocol):
    """Kills the child with SIGKILL once it reported C{kill_after} rows."""

    def __init__(self, kill_after: int) -> None:
        self.kill_after = kill_after
        self.out = b""
        self.err = b""
        self.killed = False
        self.ended = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if not self.killed and self.out.count(b"\n") >= self.kill_after:
            self.killed = True
            self.transport.signalProcess("KILL")

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)

    def reported(self) -> list[str]:
        return self.out.decode().split("\n")[:-1]  # a cut-off last line does not count


class CrashTests(LedgerCase):
    timeout = 120

    async def test_sigkill_loses_nothing_reported(self) -> None:
        # Absolute: the child runs in REPO, not in trial's temporary directory.
        path = os.path.join(os.path.abspath(self.mktemp()), "ledger.db")
        child = _Child(kill_after=400)
        env = dict(os.environ, PYTHONPATH=REPO)
        transport = reactor.spawnProcess(
            child, sys.executable, [sys.executable, "-c", CHILD, path], env=env, path=REPO
        )

        def kill_if_alive():
            if not child.ended.called:
                try:
                    transport.signalProcess("KILL")
                except error.ProcessExitedAlready:
                    pass
                return child.ended

        self.addCleanup(kill_if_alive)
        ended = await child.ended
        self.assertTrue(child.killed, child.err.decode(errors="replace"))
        self.assertIsInstance(ended, error.ProcessTerminated)
        self.assertEqual(ended.signal, signal.SIGKILL)

        reported = child.reported()
        self.assertGreaterEqual(len(reported), 400)
        self.assertEqual(sql(path, "PRAGMA integrity_check"), [("ok",)])
        stored = [r for (r,) in sql(path, "SELECT request_id FROM requests ORDER BY id")]
        # Every row the child saw committed is there ...
        self.assertEqual(set(reported) - set(stored), set())
        # ... and what is there is a prefix of what it recorded, in order.
        self.assertEqual(stored, [f"crash-{i}" for i in range(len(stored))])
        self.assertEqual(reported, stored[: len(reported)])

        ledger = self.open_ledger(path)
        expected = Totals()
        for i in range(len(stored)):
            expected.add(crash_row(i))
        totals = ledger.totals()
        self.assertEqual(rounded(totals.costs_api()), rounded(expected.costs_api()))
        self.assertEqual(totals.summary(), expected.summary())
        self.assertEqual(totals.costs_api()["total_requests"], len(stored))
        self.assertAlmostEqual(
            totals.costs_api()["total_cost_usd"],
            math.fsum(crash_row(i).cost_usd for i in range(len(stored))),
            places=9,
        )
        self.assertEqual(
            sum(m["input_tokens"] for a in totals.costs_api()["agents"].values() for m in a["models"]),
            sum(crash_row(i).input_tokens + crash_row(i).cache_read_tokens + crash_row(i).cache_write_tokens
                for i in range(len(stored))),
        )
        # The ledger carries on after the crash.
        await ledger.record(crash_row(len(stored)))
        self.assertEqual(await ledger.count(), len(stored) + 1)


class TotalsUnitTests(SynchronousTestCase):
    def test_pricing_status(self) -> None:
        self.assertEqual(pricing_status(3, 0), "priced")
        self.assertEqual(pricing_status(0, 3), "unpriced")
        self.assertEqual(pricing_status(1, 2), "partial")

    def test_day_matches_sql(self) -> None:
        conn = sqlite3.connect(":memory:")
        self.addCleanup(conn.close)
        for ts in (0.0, NOON, 20409 * DAY, 20409 * DAY - 1e-7, 20410 * DAY - 0.0004, 1.7e9 + 0.5):
            (expected,) = conn.execute(
                "SELECT date(CAST(? / 86400.0 AS INTEGER) * 86400, 'unixepoch')", (ts,)
            ).fetchone()
            self.assertEqual(utc_day(ts), expected, ts)
        self.assertEqual(utc_day(NOON), "2025-11-17")
        self.assertEqual(day_number(NOON), 20409)

    def test_add_and_remove(self) -> None:
        totals = Totals()
        first = row("r1", cache_write_tokens=7)
        totals.add(first)
        totals.add(row("r2", agent=None, provider=None, effective_model=None, status=401))
        snapshot = rounded(totals.costs_api())
        bad = row("r3", cost_usd=9.0, priced=False, status=500)
        totals.add(bad)
        self.assertEqual(totals.costs_api()["agents"]["tiverton"]["models"][0]["pricing_status"], "partial")
        totals.remove(bad)
        self.assertEqual(rounded(totals.costs_api()), snapshot)
        self.assertEqual(
            totals.summary(), {"requests": 2, "errors": 1, "unidentified_requests": 1, "unrouted_requests": 0}
        )
        self.assertEqual(totals.costs_api()["agents"]["tiverton"]["models"][0]["input_tokens"], 107)

    def test_empty(self) -> None:
        self.assertEqual(
            Totals().costs_api(),
            {"total_cost_usd": 0.0, "total_requests": 0, "unpriced_requests": 0, "agents": {}},
        )
