"""
The two databases instances share, for tests that run on both: a SQLite
state file, and a fresh database on the test run's real PostgreSQL
(L{cllama_tx.testing.postgres}).  Each can be made unavailable for real: the
SQLite file locked by another connection (a writer that never lets go), the
PostgreSQL database closed to connections and its sessions ended.
"""

from __future__ import annotations

import os
import sqlite3

from twisted.internet import reactor

from cllama_tx.store.database import parse_database_url
from cllama_tx.store.postgres import PostgresDatabase
from cllama_tx.store.sqlite_database import SqliteDatabase
from cllama_tx.testing.postgres import shared_cluster


class SqliteBackend:
    """Mixin: C{make_database} is a SQLite state file."""

    backend = "sqlite"

    async def make_database(self):
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory, mode=0o700)
        self.database_path = os.path.join(directory, "state.sqlite3")
        database = SqliteDatabase(self.database_path, reactor)
        self.addCleanup(database.close)
        return database

    async def make_unavailable(self, database):
        """Another process holds the write lock: every transaction gives up after 50 ms."""
        await database.run(lambda tx: tx.execute("PRAGMA busy_timeout = 50"))
        holder = sqlite3.connect(self.database_path, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")

        def release():
            holder.execute("ROLLBACK")
            holder.close()

        self._release = release
        self.addCleanup(self.make_available, database)

    async def make_available(self, database):
        release, self._release = getattr(self, "_release", None), None
        if release is not None:
            release()


class PostgresBackend:
    """Mixin: C{make_database} is a fresh PostgreSQL database, migrated."""

    backend = "postgresql"

    async def make_database(self):
        self.cluster = shared_cluster()
        url = self.cluster.database()
        self.database_name = url.rsplit("/", 1)[1]
        database = PostgresDatabase(parse_database_url(url), reactor, threads=4)
        self.addCleanup(database.close)
        await database.connect_and_migrate()
        return database

    def _admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.cluster.url(), autocommit=True) as conn:
            conn.execute(statement)

    async def make_unavailable(self, database):
        """The database refuses connections and its sessions are ended (as in a failover)."""
        name = self.database_name
        self._admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        self._admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
        self.addCleanup(self.make_available, database)

    async def make_available(self, database):
        self._admin(f'ALTER DATABASE "{self.database_name}" ALLOW_CONNECTIONS true')
