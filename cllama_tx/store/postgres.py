"""
PostgreSQL as the shared store: a small pool of threads, each with its own
connection, that run the store's transactions so the reactor never waits on
the network or on a lock.

Why it is shaped like this:

  - B{Blocking driver, our threads.}  psycopg's blocking API in a
    L{ThreadPool} of C{threads} threads (one connection each, opened on
    first use and re-opened after a failure) keeps every statement off the
    reactor with no second event loop.
  - B{Unavailable is a state, not a hang.}  Connections time out
    (C{connect_timeout}, C{statement_timeout}, TCP keepalives); a lost
    connection raises L{DatabaseUnavailable} and marks the store down, and
    a heartbeat every second marks it up again once a C{SELECT 1} answers.
    Readiness and admission read L{PostgresDatabase.available}.
  - B{Portable SQL.}  Callers write C{?} placeholders
    (L{cllama_tx.store.database.postgres_sql} converts them), so the same
    statements serve SQLite and PostgreSQL.
  - B{Migrations at start} under an advisory lock (L{migrate}), also run by
    C{cllama-tx migrate}.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from cllama_tx.store.database import DatabaseUnavailable, DatabaseUrl, postgres_sql
from cllama_tx.store.pg_schema import MIGRATIONS

__all__ = ["PostgresDatabase", "SchemaTooNew", "Transaction", "migrate"]

log = Logger(namespace="cllama_tx.database")

CONNECT_TIMEOUT = 3
STATEMENT_TIMEOUT_MS = 15000
LOCK_TIMEOUT_MS = 10000
HEARTBEAT_INTERVAL = 1.0
# An arbitrary constant: the advisory lock that serialises migrations.
_MIGRATION_LOCK = 0x636C6C616D61  # "cllama"


class SchemaTooNew(Exception):
    """The database was migrated by a newer cllama_tx than this one."""


def _psycopg():
    import psycopg

    return psycopg


class Transaction:
    """
    One transaction's statements, in portable SQL.  C{execute} returns the
    driver's cursor (C{fetchone}, C{fetchall}, C{rowcount}).
    """

    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor
        self.dialect = "postgresql"

    def execute(self, statement: str, params: Any = ()) -> Any:
        self._cursor.execute(postgres_sql(statement), params or None)
        return self._cursor

    def executemany(self, statement: str, rows: Iterable[Any]) -> Any:
        self._cursor.executemany(postgres_sql(statement), list(rows))
        return self._cursor

    def advisory_locks(self, names: Iterable[str]) -> None:
        """Hold the transaction-scoped advisory locks of C{names}, in one order everywhere."""
        keys = sorted({str(n) for n in names})
        if keys:
            self._cursor.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM unnest(%s::text[]) AS k ORDER BY k",
                (keys,),
            )


def _is_unavailable(error: BaseException) -> bool:
    psycopg = _psycopg()
    if isinstance(error, psycopg.OperationalError):
        return True
    # Shut down by the administrator, a cancelled statement (timeout), a
    # lock not granted in time: the database's condition, not the work's.
    sqlstate = getattr(getattr(error, "diag", None), "sqlstate", None) or ""
    return sqlstate.startswith(("08", "57", "53")) or sqlstate in ("55P03",)


class PostgresDatabase(service.Service):
    """The pool of connections to one PostgreSQL database."""

    name = "database"

    def __init__(
        self,
        url: DatabaseUrl,
        reactor,
        threads: int = 4,
        connect_timeout: int = CONNECT_TIMEOUT,
        statement_timeout_ms: int = STATEMENT_TIMEOUT_MS,
        heartbeat: float = HEARTBEAT_INTERVAL,
    ) -> None:
        self.url = url
        self._reactor = reactor
        self._threads = threads
        self._connect_timeout = connect_timeout
        self._statement_timeout_ms = statement_timeout_ms
        self._heartbeat_interval = heartbeat
        self._pool: ThreadPool | None = None
        self._local = threading.local()
        self._connections: list[Any] = []
        self._connections_lock = threading.Lock()
        self._heartbeat: task.LoopingCall | None = None
        self.available = False
        self.last_error: str | None = None
        # Bumped when the database is found unavailable: every connection
        # opened before is then presumed dead and re-opened before its next use.
        self._generation = 0
        # Called on the reactor thread with the new state when it changes.
        self.on_availability: list[Callable[[bool], None]] = []

    # -- life cycle

    def startService(self) -> None:
        super().startService()
        self._start_pool()
        self._heartbeat = task.LoopingCall(self._beat)
        self._heartbeat.clock = self._reactor
        self._heartbeat.start(self._heartbeat_interval, now=False)

    def _start_pool(self) -> None:
        if self._pool is None:
            self._pool = ThreadPool(self._threads, self._threads, name="cllama-postgres")
            self._pool.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        return self.close()

    def close(self) -> defer.Deferred:
        pool, self._pool = self._pool, None
        if pool is None:
            return defer.succeed(None)

        def shut() -> None:
            pool.stop()
            with self._connections_lock:
                conns, self._connections = self._connections, []
            for conn in conns:
                try:
                    conn.close()
                except Exception:
                    pass

        # pool.stop() joins the threads: never on the reactor thread.
        return threads.deferToThread(shut)

    def connect_and_migrate(self) -> defer.Deferred:
        """Connect and bring the schema up to date; fires with the version."""
        return self.run(migrate)

    # -- work

    def run(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        """
        C{function(transaction, *args)} in one transaction on a pool thread.
        Fails with L{DatabaseUnavailable} when the database could not do it
        for a reason of its own; any other error is the work's and passes
        through (rolled back).
        """
        self._start_pool()
        assert self._pool is not None
        d = threads.deferToThreadPool(self._reactor, self._pool, self._in_transaction, function, args)
        d.addCallbacks(self._succeeded, self._failed)
        return d

    def _succeeded(self, result: Any) -> Any:
        if not self.available:
            self._set_available(True, None)
        return result

    def _failed(self, failure):
        if failure.check(DatabaseUnavailable):
            self._set_available(False, failure.getErrorMessage())
        return failure

    def _set_available(self, up: bool, error: str | None) -> None:
        changed = up != self.available
        if not up:
            self._generation += 1
        self.available = up
        self.last_error = error
        if not changed:
            return
        if up:
            log.info("database {url} is available", url=str(self.url))
        else:
            log.error("database {url} is unavailable: {error}", url=str(self.url), error=error)
        for observer in list(self.on_availability):
            observer(up)

    def _beat(self) -> defer.Deferred:
        d = self.run(lambda tx: tx.execute("SELECT 1").fetchone())
        d.addErrback(lambda f: None if f.check(DatabaseUnavailable) else log.failure("database heartbeat", f))
        return d

    # -- on a pool thread

    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed and getattr(self._local, "generation", None) == self._generation:
            return conn
        if conn is not None:
            self._drop(conn)
        psycopg = _psycopg()
        try:
            conn = psycopg.connect(
                self.url.conninfo,
                connect_timeout=self._connect_timeout,
                application_name="cllama_tx",
                options=f"-c statement_timeout={self._statement_timeout_ms} -c lock_timeout={LOCK_TIMEOUT_MS}",
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
            )
        except psycopg.Error as e:
            raise DatabaseUnavailable(self._describe(e)) from None
        self._local.conn = conn
        self._local.generation = self._generation
        with self._connections_lock:
            self._connections.append(conn)
        return conn

    def _describe(self, error: BaseException) -> str:
        # libpq's messages name host and port, never the password; keep the first line.
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"{self.url}: {text}"[:500]

    def _drop(self, conn: Any) -> None:
        self._local.conn = None
        with self._connections_lock:
            if conn in self._connections:
                self._connections.remove(conn)
        try:
            conn.close()
        except Exception:
            pass

    def _in_transaction(self, function: Callable[..., Any], args: tuple) -> Any:
        conn = self._connection()
        try:
            with conn.transaction(), conn.cursor() as cursor:
                return function(Transaction(cursor), *args)
        except BaseException as e:
            if conn.closed or conn.broken:
                self._drop(conn)
            if _is_unavailable(e):
                raise DatabaseUnavailable(self._describe(e)) from None
            raise


def migrate(tx: Transaction) -> int:
    """Apply the migrations this database lacks; return its version."""
    tx.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
    tx.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
    )
    current = tx.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations").fetchone()[0]
    newest = MIGRATIONS[-1][0]
    if current > newest:
        raise SchemaTooNew(
            f"the database is at schema version {current}, newer than this cllama_tx knows ({newest}); "
            "upgrade cllama_tx or point it at another database"
        )
    for version, description, script in MIGRATIONS:
        if version <= current:
            continue
        for statement in (s.strip() for s in script.split(";")):
            if statement:
                tx.execute(statement)
        tx.execute("INSERT INTO schema_migrations (version, description) VALUES (?, ?)", (version, description))
        log.info("database migrated to schema version {version}: {description}", version=version,
                 description=description)
    return newest
