"""
The PostgreSQL store against a real server (L{cllama_tx.testing.postgres}):
migrations, transactions off the reactor, and unavailability as a state.
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial import unittest

from cllama_tx.store.database import DatabaseUnavailable, parse_database_url
from cllama_tx.store.pg_schema import SCHEMA_VERSION
from cllama_tx.store.postgres import PostgresDatabase, SchemaTooNew
from cllama_tx.testing.postgres import shared_cluster


class PostgresDatabaseTests(unittest.TestCase):
    def setUp(self):
        self.cluster = shared_cluster()
        self.url = parse_database_url(self.cluster.database())
        self.db = PostgresDatabase(self.url, reactor, threads=2, heartbeat=0.1)
        self.db.startService()
        self.addCleanup(self.db.stopService)

    @defer.inlineCallbacks
    def test_migrates_once(self):
        """Two instances migrating together leave one row per version."""
        other = PostgresDatabase(self.url, reactor, threads=1)
        self.addCleanup(other.close)
        versions = yield defer.gatherResults([self.db.connect_and_migrate(), other.connect_and_migrate()])
        self.assertEqual(versions, [SCHEMA_VERSION, SCHEMA_VERSION])
        rows = yield self.db.run(lambda tx: tx.execute("SELECT version FROM schema_migrations").fetchall())
        self.assertEqual([r[0] for r in rows], list(range(1, SCHEMA_VERSION + 1)))
        tables = yield self.db.run(
            lambda tx: {r[0] for r in tx.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'").fetchall()}
        )
        self.assertTrue({"requests", "rollups", "virtual_keys", "reservations", "changes"} <= tables)

    @defer.inlineCallbacks
    def test_newer_schema_refused(self):
        yield self.db.connect_and_migrate()
        yield self.db.run(lambda tx: tx.execute(
            "INSERT INTO schema_migrations (version, description) VALUES (?, 'future')", (SCHEMA_VERSION + 1,)))
        failure = yield self.assertFailure(self.db.connect_and_migrate(), SchemaTooNew)
        self.assertIn(str(SCHEMA_VERSION + 1), str(failure))

    @defer.inlineCallbacks
    def test_rollback_on_error(self):
        """An exception in the work rolls its statements back and passes through."""
        yield self.db.connect_and_migrate()

        def work(tx):
            tx.execute("INSERT INTO changes (instance, kind, at) VALUES (?, ?, ?)", ("a", "x", 1.0))
            raise ValueError("no")

        yield self.assertFailure(self.db.run(work), ValueError)
        count = yield self.db.run(lambda tx: tx.execute("SELECT count(*) FROM changes").fetchone()[0])
        self.assertEqual(count, 0)
        self.assertTrue(self.db.available)

    @defer.inlineCallbacks
    def test_unreachable_is_unavailable_without_password(self):
        """A database that does not answer fails fast, and the error never shows the password."""
        url = parse_database_url(f"postgresql://cllama:hunter2@127.0.0.1:{_closed_port()}/x")
        db = PostgresDatabase(url, reactor, threads=1, connect_timeout=1)
        self.addCleanup(db.close)
        seen = []
        db.on_availability.append(seen.append)
        db.available = True
        failure = yield self.assertFailure(db.run(lambda tx: tx.execute("SELECT 1")), DatabaseUnavailable)
        self.assertNotIn("hunter2", str(failure))
        self.assertIn("***", str(failure))
        self.assertFalse(db.available)
        self.assertEqual(seen, [False])


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OutageTests(unittest.TestCase):
    """A server that goes away and comes back, with a cluster of the test's own."""

    timeout = 120

    @defer.inlineCallbacks
    def test_first_transaction_after_recovery_succeeds(self):
        """Connections opened before an outage are re-opened, not found broken by the next caller."""
        from cllama_tx.testing.postgres import PostgresCluster

        cluster = PostgresCluster()
        cluster.start()
        self.addCleanup(cluster.destroy)
        db = PostgresDatabase(parse_database_url(cluster.database()), reactor, threads=2, heartbeat=3600)
        self.addCleanup(db.close)
        yield db.connect_and_migrate()

        def slow(tx):
            return tx.execute("SELECT pg_sleep(0.3), 42").fetchone()[1]

        # Both threads hold a connection.
        yield defer.gatherResults([db.run(slow), db.run(slow)])
        self.assertEqual(len(db._connections), 2)
        cluster.stop()
        yield self.assertFailure(db.run(lambda tx: tx.execute("SELECT 1").fetchone()), DatabaseUnavailable)
        self.assertFalse(db.available)
        cluster.start()
        answers = yield defer.gatherResults([db.run(slow), db.run(slow)])
        self.assertEqual(answers, [42, 42])
        self.assertTrue(db.available)
