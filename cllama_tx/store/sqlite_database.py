"""
The state file as a L{cllama_tx.store.postgres.PostgresDatabase}-shaped
store: C{run(function)} executes C{function(transaction)} in one write
transaction (C{BEGIN IMMEDIATE}) on a thread of its own, so the code that
shares state between processes (several workers on one host) is written
once for both databases.

C{BEGIN IMMEDIATE} takes the file's write lock for the whole transaction:
every transaction of every process is serialised, which is what the
advisory locks of PostgreSQL give per scope (L{Transaction.advisory_locks}
is therefore a no-op here).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application import service
from twisted.internet import defer, threads
from twisted.python.threadpool import ThreadPool

from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.store.sqlite_tx import DatabaseBusy, is_storage_error, transaction

__all__ = ["SqliteDatabase", "SqliteTransaction"]

BUSY_TIMEOUT_MS = 10000
FILE_MODE = 0o600


class SqliteTransaction:
    """One write transaction's statements (already in SQLite's dialect)."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, statement: str, params: Any = ()) -> sqlite3.Cursor:
        return self._conn.execute(statement, params)

    def executemany(self, statement: str, rows: Iterable[Any]) -> sqlite3.Cursor:
        return self._conn.executemany(statement, rows)

    def advisory_locks(self, names: Iterable[str]) -> None:
        """Nothing to take: the transaction holds the file's write lock."""


class SqliteDatabase(service.Service):
    """One connection to the state file, used from one thread of its own."""

    def __init__(self, path: str, reactor, schema: Callable[[sqlite3.Connection], None] | None = None) -> None:
        self.path = path
        self._reactor = reactor
        self._schema = schema
        self._pool: ThreadPool | None = None
        self._conn: sqlite3.Connection | None = None
        self.available = True
        self.last_error: str | None = None

    def startService(self) -> None:
        super().startService()
        self._start()

    def _start(self) -> None:
        if self._pool is None:
            self._pool = ThreadPool(1, 1, name="cllama-sqlite-shared")
            self._pool.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.close()

    def close(self) -> defer.Deferred:
        pool, self._pool = self._pool, None
        if pool is None:
            return defer.succeed(None)

        def shut() -> None:
            pool.stop()
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        return threads.deferToThread(shut)

    def run(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        """C{function(transaction, *args)} in one write transaction, off the reactor."""
        self._start()
        assert self._pool is not None
        d = threads.deferToThreadPool(self._reactor, self._pool, self._work, function, args)
        d.addCallbacks(self._succeeded, self._failed)
        return d

    def _succeeded(self, result: Any) -> Any:
        self.available, self.last_error = True, None
        return result

    def _failed(self, failure):
        if failure.check(DatabaseUnavailable):
            self.available, self.last_error = False, failure.getErrorMessage()
        return failure

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            if not os.path.exists(self.path):
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE))
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if self._schema is not None:
                self._schema(conn)
            self._conn = conn
        return self._conn

    def _work(self, function: Callable[..., Any], args: tuple) -> Any:
        try:
            conn = self._connection()
            return transaction(conn, lambda c: function(SqliteTransaction(c), *args))
        except DatabaseBusy as e:
            raise DatabaseUnavailable(f"{self.path}: {e}") from None
        except sqlite3.Error as e:
            if is_storage_error(e):
                raise DatabaseUnavailable(f"{self.path}: {e}") from None
            raise
