"""
The ledger suite on PostgreSQL: every backend-independent test of the SQLite
ledger (the mixins of tests.store.test_ledger and test_ledger_governance)
run against L{PostgresLedger} on a real server (L{shared_cluster}), one
fresh database per ledger.  PostgreSQL's own cases are in
tests.store.test_pg_ledger_failures.
"""

from __future__ import annotations

import psycopg
from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from cllama_tx.store.database import parse_database_url, postgres_sql
from cllama_tx.store.pg_ledger import PostgresLedger, SynchronousRead
from cllama_tx.store.postgres import PostgresDatabase
from cllama_tx.testing.postgres import shared_cluster
from tests.store.test_ledger import (
    NOON,
    LifeCycleTestsMixin,
    PruneTestsMixin,
    ReadTestsMixin,
    SqliteBackend,
    TotalsTestsMixin,
    WriteTestsMixin,
    row,
)
from tests.store.test_ledger_governance import OverrideTestsMixin, TimelineTestsMixin
from tests.store.test_ledger_shared import SharedStoreTestsMixin


class PostgresBackend:
    """The PostgreSQL ledger behind the test mixins (see tests.store.test_ledger.SqliteBackend)."""

    backend = "postgresql"
    integrity_error: type[Exception] = psycopg.errors.UniqueViolation
    refusal_error: type[Exception] = psycopg.errors.RaiseException

    def new_database(self) -> str:
        return shared_cluster().database()

    heartbeat = 0.2  # seconds between the database's checks that it answers
    pool_threads = 4

    def make_ledger(self, url: str | None = None, **kwargs) -> PostgresLedger:
        database = PostgresDatabase(parse_database_url(url or self.new_database()), reactor,
                                    threads=self.pool_threads, heartbeat=self.heartbeat)
        ledger = PostgresLedger(database, reactor, **kwargs)
        self.addCleanup(ledger.close)
        return ledger

    async def start_ledger(self, url: str | None = None, **kwargs) -> PostgresLedger:
        ledger = self.make_ledger(url, **kwargs)
        ledger.startService()
        await ledger.loaded()
        return ledger

    async def reopen(self, ledger, **kwargs) -> PostgresLedger:
        await ledger.close()
        return await self.start_ledger(ledger.url.conninfo, **kwargs)

    def unstarted_ledger(self) -> PostgresLedger:
        return self.make_ledger()

    def query(self, ledger, statement: str, *args) -> list[tuple]:
        """C{statement} (? placeholders) on a connection of our own."""
        with psycopg.connect(ledger.url.conninfo, autocommit=True) as conn:
            cursor = conn.execute(postgres_sql(statement), args or None)
            return cursor.fetchall() if cursor.description else []

    async def timeline(self, ledger, since, bucket_seconds: int = 60) -> list:
        return await ledger.spend_timeline_async(since, bucket_seconds)

    async def scope_timeline(self, ledger, column: str, since: float) -> list:
        return await ledger.scope_timeline_async(column, since)

    def refuse_override_writes(self, ledger, message: str):
        def create(tx):
            tx.execute(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                f"$$ BEGIN RAISE EXCEPTION '{message}'; END $$"
            )
            tx.execute("CREATE TRIGGER refuse BEFORE INSERT ON budget_overrides FOR EACH ROW EXECUTE FUNCTION refuse()")

        return ledger._on_writer(create)

    def allow_override_writes(self, ledger):
        return ledger._on_writer(lambda tx: tx.execute("DROP TRIGGER refuse ON budget_overrides"))

    hold = SqliteBackend.hold


class PostgresLifeCycleTests(PostgresBackend, LifeCycleTestsMixin, TestCase):
    async def test_synchronous_reads_refused(self) -> None:
        """A read that would wait on the network on the reactor is refused, naming its async twin."""
        ledger = await self.start_ledger()
        error = self.assertRaises(SynchronousRead, ledger.spend_timeline, 0)
        self.assertIn("spend_timeline_async", str(error))
        self.assertRaises(SynchronousRead, ledger.scope_timeline, "key_id", 0)

    async def test_started_again_counts_once(self) -> None:
        ledger = await self.start_ledger()
        await ledger.record(row("r1"))
        await ledger.close()
        ledger.startService()  # the same object, its pool started again
        await ledger.loaded()
        self.assertEqual(ledger.totals().requests, 1)
        await ledger.record(row("r2"))
        self.assertEqual(await ledger.count(), 2)

    async def test_rows_carry_the_instance(self) -> None:
        ledger = await self.start_ledger(instance="host-a:1:aa")
        await ledger.record(row("r1"))
        self.assertEqual(self.query(ledger, "SELECT request_id, instance FROM requests"), [("r1", "host-a:1:aa")])

    async def test_day_matches_python(self) -> None:
        """PostgreSQL truncates a row's day as Python does (its CAST would round)."""
        from cllama_tx.store.ledger_sql import POSTGRESQL, day_sql
        from cllama_tx.store.totals import utc_day

        ledger = await self.start_ledger()
        for ts in (0.0, NOON, 20409 * 86400.0, 20409 * 86400.0 - 1e-7, 20410 * 86400.0 - 0.0004, 1.7e9 + 0.5):
            [(found,)] = self.query(ledger, f"SELECT {day_sql(POSTGRESQL).replace('ts', 'CAST(? AS DOUBLE PRECISION)')}",
                                    ts)
            self.assertEqual(found, utc_day(ts), ts)


class PostgresWriteTests(PostgresBackend, WriteTestsMixin, TestCase):
    pass


class PostgresTotalsTests(PostgresBackend, TotalsTestsMixin, TestCase):
    pass


class PostgresPruneTests(PostgresBackend, PruneTestsMixin, TestCase):
    pass


class PostgresReadTests(PostgresBackend, ReadTestsMixin, TestCase):
    pass


class PostgresTimelineTests(PostgresBackend, TimelineTestsMixin, TestCase):
    pass


class PostgresOverrideTests(PostgresBackend, OverrideTestsMixin, TestCase):
    pass


class PostgresSharedTests(PostgresBackend, SharedStoreTestsMixin, TestCase):
    """Two hosts on one database."""

    async def start_pair(self):
        url = self.new_database()
        a = await self.start_ledger(url, instance="host-a:1:aa")
        b = await self.start_ledger(url, instance="host-b:2:bb")
        return a, b

    async def reopen(self, ledger, **kwargs):
        return await self.start_ledger(ledger.url.conninfo, **kwargs)

    async def test_ids_seen_out_of_order_are_counted_once(self) -> None:
        """A row whose id is smaller than one already followed is counted when it appears (a hole)."""
        a, b = await self.start_pair()
        with psycopg.connect(a.url.conninfo) as slow:
            slow.execute("INSERT INTO requests (request_id, ts, agent, provider, effective_model, status, stream, "
                         "latency_ms, cost_usd, priced, estimated, instance) "
                         "VALUES ('slow', 0, 'x', 'openai', 'gpt-4o', 200, 0, 1, 0.25, 1, 0, 'c')")
            await b.record(row("fast"))  # the next id, committed first
            self.assertEqual(await a.follow(), 1)
            self.assertEqual(a.follower_stats()["holes"], 1)
            slow.commit()
        self.assertEqual(await a.follow(), 1)
        self.assertEqual(a.follower_stats()["holes"], 0)
        self.assertEqual(await a.follow(), 0)
        self.assertEqual(a.totals().requests, 2)
        self.assertAlmostEqual(a.totals().costs_api()["total_cost_usd"], 0.001 + 0.25)
