"""
Admission across instances sharing one store (L{cllama_tx.store.coordination}),
on a real PostgreSQL and on a real SQLite file: several coordinators, each with
its own budget book, admit together what one book would admit alone.
"""

from __future__ import annotations

import os
import tempfile

from twisted.internet import defer, reactor
from twisted.trial import unittest

from cllama_tx.governance.budgets import BudgetBook, Refusal, parse_budget
from cllama_tx.governance.ratelimit import RateLimiter
from cllama_tx.store import coordination
from cllama_tx.store.coordination import Coordinator, Decision
from cllama_tx.store.database import parse_database_url
from cllama_tx.store.postgres import PostgresDatabase
from cllama_tx.store.shared import SQLITE_COORDINATION_SCHEMA
from cllama_tx.store.sqlite_database import SqliteDatabase
from cllama_tx.testing.postgres import shared_cluster

BUDGET = parse_budget({"limit_usd": 1.0, "period": "daily", "behavior": "hard_stop"})

_SQLITE_REQUESTS = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE, ts REAL NOT NULL,
    agent TEXT, status INTEGER NOT NULL, cost_usd REAL NOT NULL DEFAULT 0, priced INTEGER NOT NULL,
    key_id TEXT, team_id TEXT, instance TEXT
)
"""


class Refused(Exception):
    pass


class _Instance:
    """One instance: a coordinator and the book it decides with."""

    def __init__(self, database, name):
        self.coordinator = Coordinator(database, reactor, instance=name)
        self.book = BudgetBook(reactor)
        self.limiter = RateLimiter(reactor)
        self.held = []

    def admit(self, scope, worst, rpm=None):
        def decide(syncs, rate_syncs):
            for sync in syncs:
                self.book.load(sync.scope, sync.rows)
                self.book.set_foreign(sync.scope, sync.foreign_usd, sync.foreign_requests)
            for rate in rate_syncs:
                for at, tokens in rate.events:
                    self.limiter.absorb(rate.scope, at, tokens)
            events = []
            if rpm is not None:
                verdict = self.limiter.check(scope, rpm, None, 10)
                if not verdict.allowed:
                    raise Refused("rate")
                events.append((scope, verdict.at, 10))
            held = self.book.reserve(scope, BUDGET, worst)
            if isinstance(held, Refusal):
                raise Refused(held.code)
            self.held.append(held)
            return Decision(reservations=[(scope, worst)], rate_events=events, result=held)

        return self.coordinator.admit({scope: 0.0}, [scope] if rpm is not None else [], decide)


class CoordinationMixin:
    def make_database(self):
        raise NotImplementedError

    @defer.inlineCallbacks
    def setUp(self):
        self.database = yield self.make_database()
        self.a = _Instance(self.database, "host-a:1:aa")
        self.b = _Instance(self.database, "host-b:2:bb")
        for instance in (self.a, self.b):
            yield instance.coordinator.register()

    def insert_row(self, instance, agent, cost, status=200, ts=None):
        now = reactor.seconds() if ts is None else ts
        return self.database.run(lambda tx: tx.execute(
            "INSERT INTO requests (request_id, ts, agent, status, stream, latency_ms, cost_usd, priced, estimated, "
            "instance) VALUES (?, ?, ?, ?, 0, 1.0, ?, 1, 0, ?)"
            if self.full_schema else
            "INSERT INTO requests (request_id, ts, agent, status, cost_usd, priced, instance) VALUES (?, ?, ?, ?, ?, 1, ?)",
            (os.urandom(8).hex(), now, agent, status, cost, instance),
        ))

    @defer.inlineCallbacks
    def test_concurrent_admissions_never_overshoot(self):
        """Twenty admissions of $0.30 spread over two instances against $1: exactly three pass."""
        attempts = []
        for i in range(20):
            instance = self.a if i % 2 else self.b
            attempts.append(instance.admit("agent-1", 0.30))
        results = yield defer.DeferredList(attempts, consumeErrors=True)
        admitted = [r for ok, r in results if ok]
        refused = [r for ok, r in results if not ok]
        self.assertEqual(len(admitted), 3)
        self.assertTrue(all(f.check(Refused) for f in refused))
        held = yield self.database.run(lambda tx: tx.execute(
            "SELECT COUNT(*), SUM(amount_usd) FROM reservations WHERE scope = 'agent-1'").fetchone())
        self.assertEqual(held[0], 3)
        self.assertAlmostEqual(held[1], 0.90)

    @defer.inlineCallbacks
    def test_committed_rows_of_others_count(self):
        """Spend another instance committed is in this instance's book before it decides."""
        yield self.insert_row("host-b:2:bb", "agent-2", 0.80)
        yield self.assertFailure(self.a.admit("agent-2", 0.30), Refused)
        self.assertAlmostEqual(self.a.book.usage("agent-2", BUDGET).cost_usd, 0.80)
        # Counted once, however often it is synced.
        yield self.a.admit("agent-2", 0.10)
        self.assertAlmostEqual(self.a.book.usage("agent-2", BUDGET).cost_usd, 0.80)

    @defer.inlineCallbacks
    def test_own_rows_not_counted_twice(self):
        """Rows this instance wrote are already in its book (settled locally)."""
        yield self.insert_row("host-a:1:aa", "agent-3", 0.80)
        yield self.a.admit("agent-3", 0.50)
        self.assertAlmostEqual(self.a.book.usage("agent-3", BUDGET).cost_usd, 0.0)

    @defer.inlineCallbacks
    def test_release_frees_room_for_others(self):
        decision = yield self.a.admit("agent-4", 0.60)
        yield self.assertFailure(self.b.admit("agent-4", 0.60), Refused)
        yield self.a.coordinator.release(decision.reservation_ids)
        yield self.b.admit("agent-4", 0.60)

    @defer.inlineCallbacks
    def test_dead_instance_reservations_released(self):
        """An instance that stopped answering (kill -9) holds its money for DEAD_AFTER at most."""
        yield self.a.admit("agent-5", 0.90)
        yield self.assertFailure(self.b.admit("agent-5", 0.50), Refused)
        stale = reactor.seconds() - coordination.DEAD_AFTER - 1
        yield self.database.run(lambda tx: tx.execute(
            "UPDATE instances SET seen_at = ? WHERE instance = ?", (stale, "host-a:1:aa")))
        yield self.b.admit("agent-5", 0.50)
        # B's heartbeat reaps A's rows.
        yield self.b.coordinator._beat()
        left = yield self.database.run(lambda tx: tx.execute(
            "SELECT COUNT(*) FROM reservations WHERE instance = 'host-a:1:aa'").fetchone()[0])
        self.assertEqual(left, 0)

    @defer.inlineCallbacks
    def test_rate_limit_shared(self):
        """An rpm of 4 holds across both instances."""
        results = []
        for i in range(8):
            instance = self.a if i % 2 else self.b
            try:
                yield instance.admit("agent-6", 0.0, rpm=4)
                results.append(True)
            except Refused:
                results.append(False)
        self.assertEqual(results.count(True), 4)

    @defer.inlineCallbacks
    def test_leaving_releases(self):
        yield self.a.admit("agent-7", 0.90)
        yield self.a.coordinator.database.run(coordination._leave, "host-a:1:aa")
        yield self.b.admit("agent-7", 0.90)


class PostgresCoordinationTests(CoordinationMixin, unittest.TestCase):
    full_schema = True

    @defer.inlineCallbacks
    def make_database(self):
        url = parse_database_url(shared_cluster().database())
        database = PostgresDatabase(url, reactor, threads=4)
        self.addCleanup(database.close)
        yield database.connect_and_migrate()
        return database


class SqliteCoordinationTests(CoordinationMixin, unittest.TestCase):
    full_schema = False

    def make_database(self):
        path = os.path.join(tempfile.mkdtemp(), "state.sqlite3")

        def schema(conn):
            conn.execute(_SQLITE_REQUESTS)
            conn.executescript(SQLITE_COORDINATION_SCHEMA)

        database = SqliteDatabase(path, reactor, schema=schema)
        self.addCleanup(database.close)
        return defer.succeed(database)
