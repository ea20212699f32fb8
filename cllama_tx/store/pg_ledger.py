"""
The durable ledger on PostgreSQL, shared by every instance of a fleet:
the same rows, totals, reads and budget overrides as the SQLite ledger
(L{cllama_tx.store.ledger_base}), written through the database's pool of
threads (L{cllama_tx.store.postgres.PostgresDatabase}) so the reactor never
waits on the network.

Why it is shaped like this:

  - B{Group commit, in record order.}  Rows recorded in one reactor turn
    are committed together in one transaction; while it runs, the rows
    recorded meanwhile gather for the next.  One transaction of this
    ledger runs at a time (rows, then operator writes and pruning in the
    order they were asked for), so rows commit in record order and their
    C{record()} Deferreds fire in that order, each after its commit.
  - B{Locks.}  Each batch first takes the shared side of the C{ledger:rows}
    lock, then the advisory locks of its rows' budget scopes
    (L{cllama_tx.store.shared.lock_names}): per scope, rows of the whole
    fleet commit in the order of their ids, which the budget coordinator
    relies on; and an instance that starts can wait, with the exclusive
    side, until every id handed out so far is committed or gone, so the
    totals it rebuilds and the rows it follows afterwards meet exactly.
  - B{Unavailable is a state.}  A batch the database cannot take
    (L{DatabaseUnavailable}) is B{held} in memory, in order, and its
    Deferreds fire with L{HELD}; rows recorded meanwhile join it; it is
    retried on a backoff timer and as soon as the database answers again,
    with C{ON CONFLICT (request_id) DO NOTHING} so a commit reported as
    failed that reached the database is not written twice.  At most about
    C{backlog} rows are held (L{admission_refusal}); on close, held rows
    get a last try and then go to a spill file, imported at the next start.
  - B{Start without blocking.}  L{startService} returns at once; the
    schema is migrated, the totals rebuilt and the overrides loaded off the
    reactor, retried while the database is unavailable.  Until then
    admission is refused and readiness is false (L{loaded}).
  - B{Fleet-wide totals.}  The rows other instances commit are read every
    second (L{cllama_tx.store.follower}) and counted too.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cllama_tx.interfaces import ILedger
from cllama_tx.store import ledger_sql as sql
from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.store.ledger_base import LedgerBase
from cllama_tx.store.ledger_sql import (
    DEFAULT_BACKLOG,
    NOT_KEPT,
    POSTGRESQL,
    PRUNE_INTERVAL,
    TIMELINE_BUCKET,
    LedgerClosed,
)
from cllama_tx.store.pg_schema import SCHEMA_VERSION
from cllama_tx.store.postgres import PostgresDatabase, migrate
from cllama_tx.store.records import LedgerRow
from cllama_tx.store.shared import lock_names, new_instance_id, row_scopes
from cllama_tx.store.spill import SpillError, read_spill, remove_spill, spill_path, write_spill
from cllama_tx.store.totals import Totals, is_metered, text_or_none, utc_day
from cllama_tx.store.writer import HELD, MAX_BATCH, RETRY_FIRST, RETRY_MAX, Call, Row

__all__ = ["ROWS_LOCK", "PostgresLedger", "SynchronousRead"]

ROWS_LOCK = "ledger:rows"
"""Shared by every batch of rows, taken whole by an instance starting (see the module's docstring)."""

PRUNE_LOCK = "ledger:prune"
"""Two instances never fold the same rows into rollups at once."""

IDLE_IN_TRANSACTION = "30s"
"""
A batch's session is ended by the server if it idles this long inside its
transaction (a frozen process): with the statement timeout, this bounds how
long a taken id can stay invisible (L{cllama_tx.store.id_cursor.HOLE_PATIENCE}).
"""

LOAD_RETRY_MAX = 5.0
"""Seconds between two tries to load the ledger while the database is unavailable, at most."""

_log = Logger(namespace="cllama_tx.ledger")


class SynchronousRead(Exception):
    """A read that would block the reactor on the network: use its C{_async} twin."""


def _insert_rows(tx: Any, params: list[tuple], locks: list[str], again: bool) -> None:
    """One batch: the rows lock (shared), the rows' scope locks, the rows."""
    tx.execute(
        "SELECT set_config('idle_in_transaction_session_timeout', ?, true), "
        "pg_advisory_xact_lock_shared(hashtextextended(?, 0))",
        (IDLE_IN_TRANSACTION, ROWS_LOCK),
    )
    tx.advisory_locks(locks)
    tx.executemany(sql.INSERT_AGAIN if again else sql.INSERT, params)


def _wait_for_writers(tx: Any) -> int:
    """
    At start: wait until no batch holds the rows lock (every id handed out
    so far is committed or rolled back), and return the highest id handed
    out.  Batches that start meanwhile wait behind this lock, for the one
    statement it takes.
    """
    tx.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (ROWS_LOCK,))
    last, called = tx.execute("SELECT last_value, is_called FROM requests_id_seq").fetchone()
    return int(last) if called else 0


def _snapshot(tx: Any, high: int, where: str) -> tuple:
    """In one snapshot: the totals, the ids above C{high} already in them, the overrides."""
    tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    totals = sql.rebuild_totals(tx, POSTGRESQL)
    seen = [int(r[0]) for r in tx.execute("SELECT id FROM requests WHERE id > ?", (high,)).fetchall()]
    overrides = sql.load_overrides(tx, where)
    return totals, seen, overrides


def _read_only(tx: Any, function: Callable[[Any], Any]) -> Any:
    tx.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    return function(tx)


def _locks(rows: Iterable[LedgerRow]) -> list[str]:
    return lock_names(
        s for row in rows
        for s in row_scopes(row.agent, row.key_id, row.team_id, row.user_id, row.organization_id, row.end_user)
    )


@implementer(ILedger)
class PostgresLedger(LedgerBase, service.Service):
    """
    The ledger in the PostgreSQL database of C{database} (a
    L{PostgresDatabase}; started and stopped with the ledger when
    C{own_database}).  C{retention_seconds}, C{clock}, C{backlog} and
    C{spill_dir} as for L{cllama_tx.store.ledger.SqliteLedger};
    C{instance} names this process in the rows it writes; C{spill_name}
    tells this process's spill file from others' on the host.
    """

    dialect = POSTGRESQL
    schema_version = SCHEMA_VERSION

    def __init__(
        self,
        database: PostgresDatabase,
        reactor: Any,
        retention_seconds: float | None = None,
        clock: Any = None,
        backlog: int = DEFAULT_BACKLOG,
        spill_dir: str | None = None,
        instance: str | None = None,
        spill_name: str | None = None,
        own_database: bool = True,
    ) -> None:
        if retention_seconds is not None and not retention_seconds > 0:
            raise ValueError("retention_seconds must be positive")
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
            raise ValueError(f"backlog must be a whole number of rows >= 1, not {backlog!r}")
        self._init_base(reactor, clock, instance or new_instance_id())
        self.database = database
        self.url = database.url
        self.path = None  # no file: see `database`
        self.shared = True
        self.retention_seconds = retention_seconds
        self.backlog = backlog
        self._own_database = own_database
        name = spill_name or f"/{self.url.redacted}"
        self.spill_file = None if spill_dir is None else spill_path(spill_dir, name)
        self._state = "stopped"  # loading, running, failed, closing, closed
        self._load_failure: Failure | None = None
        self._loading: defer.Deferred | None = None
        self._load_waiters: list[defer.Deferred] = []
        self._load_call: Any = None
        self._load_delay = RETRY_FIRST
        self._queue: collections.deque[Row | Call] = collections.deque()
        self._busy = 0  # rows (or 1 for a call) in the transaction under way
        self._pump_call: Any = None
        self._held: collections.deque[Row] = collections.deque()
        self._retry_call: Any = None
        self._retry_delay = RETRY_FIRST
        self._retry_due = False
        self.last_error: str | None = None
        self.failing_since: float | None = None
        self._close_waiters: list[defer.Deferred] = []
        self._retention: task.LoopingCall | None = None
        self._unkept = 0
        self._unkept_now = 0
        self.commits = 0
        self.rows = 0
        self.failed_rows = 0
        self.largest_batch = 0
        self.held_rows = 0
        self.recovered_rows = 0
        self.retries = 0
        #: Called on the reactor once every held row is written.
        self.on_recovered: list[Callable[[], None]] = []

    # -- life cycle

    def startService(self) -> None:
        """Start loading (off the reactor); returns at once.  See L{loaded}."""
        if self._state not in ("stopped", "closed"):
            raise RuntimeError("ledger already started, or still closing")
        service.Service.startService(self)
        if self._own_database and not self.database.running:
            self.database.startService()
        self.database.on_availability.append(self._availability)
        self._state = "loading"
        self._load_failure = None
        self._totals = Totals()  # a ledger started again counts from what is stored
        self._load()

    def loaded(self) -> defer.Deferred:
        """
        Fires once the schema is migrated, the totals rebuilt and the
        overrides loaded (retried while the database is unavailable); fails
        if the ledger cannot load (a newer schema) or is closed first.
        """
        if self._state == "running":
            return defer.succeed(None)
        if self._state == "failed" and self._load_failure is not None:
            return defer.fail(self._load_failure)
        if self._state != "loading":
            return defer.fail(LedgerClosed("the ledger is not running"))
        waiter: defer.Deferred = defer.Deferred()
        self._load_waiters.append(waiter)
        return waiter

    def _load(self) -> None:
        self._load_call = None
        if self._state != "loading" or self._loading is not None:
            return
        d = self.database.run(migrate)
        d.addCallback(lambda _: self._import_spill())
        d.addCallback(lambda _: self.database.run(_wait_for_writers))
        d.addCallback(lambda high: self.database.run(_snapshot, high, self._where()).addCallback(
            lambda found: (high, *found)))
        self._loading = d
        d.addCallbacks(self._loaded_from, self._load_failed)

    def _loaded_from(self, found: tuple) -> None:
        self._loading = None
        if self._state != "loading":
            self._maybe_finish_close()
            return
        high, totals, seen, overrides = found
        # Rows recorded while loading are not in the database yet: both count.
        self._totals.merge(totals)
        self._loaded_overrides(overrides)
        self._state = "running"
        self._load_delay = RETRY_FIRST
        _log.info("ledger: using {url} (schema {version})", url=str(self.url), version=SCHEMA_VERSION)
        self._start_following(high, seen)
        if self.retention_seconds is not None:
            self._retention = task.LoopingCall(self._prune_expired)
            self._retention.clock = self._clock
            self._retention.start(PRUNE_INTERVAL, now=True)
        waiters, self._load_waiters = self._load_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        if self._held:
            self._schedule_retry(0)
        self._schedule_pump()

    def _load_failed(self, failure: Failure) -> None:
        self._loading = None
        if self._state != "loading":
            self._maybe_finish_close()
            return
        if failure.check(DatabaseUnavailable):
            if self.failing_since is None:
                _log.error(
                    "ledger: cannot load from {url}: {error}; trying again, and holding rows in memory "
                    "meanwhile (readiness and admission wait for it)",
                    url=str(self.url), error=failure.getErrorMessage(),
                )
            self._load_call = self._reactor.callLater(self._load_delay, self._load)
            self._load_delay = min(self._load_delay * 2, LOAD_RETRY_MAX)
            self.last_error = failure.getErrorMessage()
            if self.failing_since is None:
                self.failing_since = self._reactor.seconds()
            # Rows recorded meanwhile wait for nothing: held, in order (last:
            # their callers may do anything, close the ledger too).
            waiting = [item for item in self._queue if isinstance(item, Row)]
            self._queue = collections.deque(item for item in self._queue if not isinstance(item, Row))
            self._hold(waiting, failure.getErrorMessage())
            return
        _log.failure("ledger: cannot use {url}; it stays unavailable (admission refused)", failure,
                     url=str(self.url))
        self._state = "failed"
        self._load_failure = failure
        waiters, self._load_waiters = self._load_waiters, []
        for waiter in waiters:
            waiter.errback(failure)

    def _availability(self, up: bool) -> None:
        """The database answers again (or not): load or retry now rather than at the next timer."""
        if not up:
            return
        if self._state == "loading" and self._loading is None:
            if self._load_call is not None and self._load_call.active():
                self._load_call.cancel()
            self._load()
        elif self._state == "running" and self._held:
            self._retry_delay = RETRY_FIRST
            self._schedule_retry(0)

    def _import_spill(self) -> defer.Deferred | None:
        """At start: the rows a previous run could not write (its spill file), written first."""
        spill_file = self.spill_file
        if spill_file is None:
            return None
        try:
            rows = read_spill(spill_file)
        except (SpillError, OSError) as e:
            _log.error("ledger: not importing the spill file: {error}; it is left for the operator", error=str(e))
            self.spill_file = None
            return None
        if not rows:
            return None
        params = [sql.row_params(r, self.instance) for r in rows]
        d = self.database.run(_insert_rows, params, _locks(rows), True)

        def imported(_: Any) -> None:
            remove_spill(spill_file)
            _log.info("ledger: imported {count} rows saved in {spill} by the last run", count=len(rows),
                      spill=spill_file)

        return d.addCallback(imported)

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        return self.close()

    def close(self) -> defer.Deferred:
        """
        Stop taking rows, commit every row already queued, give held rows a
        last try (then the spill file), and stop the database if the ledger
        owns it.  Idempotent: every call's Deferred fires when the one
        close is done.
        """
        waiter: defer.Deferred = defer.Deferred()
        if self._state in ("stopped", "closed"):
            waiter.callback(None)
            return waiter
        self._close_waiters.append(waiter)
        if self._state == "closing":
            return waiter
        was_running = self._state == "running"
        self._state = "closing"
        for call in (self._load_call, self._retry_call):
            if call is not None and call.active():
                call.cancel()
        self._load_call = self._retry_call = None
        if self._retention is not None and self._retention.running:
            self._retention.stop()
        self._retention = None
        self._stop_following()
        if self._availability in self.database.on_availability:
            self.database.on_availability.remove(self._availability)
        if not was_running:
            # Never loaded: nothing can be written; what was recorded is spilled.
            waiting = [item for item in self._queue if isinstance(item, Row)]
            self._held.extend(waiting)
            for row in waiting:
                _fire(row.deferred, HELD)
            for queued in self._queue:
                if isinstance(queued, Call):
                    _fire(queued.deferred, Failure(LedgerClosed("the ledger closed before it loaded")))
            self._queue.clear()
            waiters, self._load_waiters = self._load_waiters, []
            for w in waiters:
                w.errback(LedgerClosed("the ledger closed before it loaded"))
        self._maybe_finish_close(was_running)
        return waiter

    def _maybe_finish_close(self, may_write: bool = True) -> None:
        """Once nothing is queued or under way: the last try for held rows, then the end."""
        if self._state != "closing" or self._busy or self._queue or self._loading is not None:
            return
        self._busy = 1  # nothing else starts
        held = list(self._held)
        if held and may_write and self._load_failure is None:
            params = [item.params for item in held]
            d = self.database.run(_insert_rows, params, _locks(item.row for item in held), True)
            d.addCallbacks(lambda _: self._closed(held, []), lambda f: self._closed([], held, f))
        else:
            self._closed([], held, None)

    def _closed(self, written: list[Row], unwritten: list[Row], failure: Failure | None = None) -> None:
        self._held.clear()
        if written:
            self.recovered_rows += len(written)
            _log.info("ledger: {count} held rows written before stopping", count=len(written))
        if unwritten:
            error = failure.getErrorMessage() if failure is not None else "the database was never reached"
            self._spill([item.row for item in unwritten], error)
        d = defer.succeed(None)
        if self._own_database:
            d = defer.maybeDeferred(self.database.stopService)

        def done(_: Any) -> None:
            self._busy = 0
            self._state = "closed"
            waiters, self._close_waiters = self._close_waiters, []
            for w in waiters:
                w.callback(None)

        d.addBoth(done)

    def _spill(self, rows: list[LedgerRow], error: str) -> None:
        spill_file = self.spill_file
        if spill_file is not None:
            try:
                where = write_spill(spill_file, rows)
            except Exception as e:
                error = f"{error}; spilling failed too: {e}"
            else:
                _log.error(
                    "ledger: {count} rows could not be written to {url} before stopping ({error}); they were "
                    "saved to {spill} and are imported at the next start",
                    count=len(rows), url=str(self.url), error=error, spill=where,
                )
                return
        else:
            error = f"{error}; no spill directory is set"
        _log.critical(
            "ledger: {count} rows could not be written to {url} before stopping and could not be saved "
            "elsewhere ({error}); they are LOST. Each follows as a JSON line",
            count=len(rows), url=str(self.url), error=error,
        )
        for row in rows:
            _log.critical("ledger: lost row {row}", row=attrs.asdict(row))

    def _accepting(self) -> bool:
        return self._state == "running"

    def _where(self) -> str:
        return str(self.url)

    # -- writes

    def record(self, row: LedgerRow) -> defer.Deferred:
        """
        Count C{row} in the totals now and commit it with the other rows of
        this reactor turn.  Fires with L{None} once committed, with L{HELD}
        when the database is unavailable (the row waits in memory), with
        L{NOT_KEPT} for a row of a request that reached no provider while
        the backlog is full; fails (the row un-counted) if its insert
        failed, or with L{LedgerClosed} if the ledger is not running.
        """
        if self._state not in ("loading", "running", "failed"):
            return defer.fail(LedgerClosed("the ledger is not running"))
        if len(self._held) >= self.backlog and not is_metered(
            (text_or_none(row.agent), text_or_none(row.provider), text_or_none(row.effective_model))
        ):
            self._unkept += 1
            self._unkept_now += 1
            if self._unkept_now == 1:
                _log.warn(
                    "ledger: the backlog is full ({held} rows); rows of requests that never reached a "
                    "provider are not kept until the ledger writes again (their audit lines remain)",
                    held=len(self._held),
                )
            return defer.succeed(NOT_KEPT)
        d: defer.Deferred = defer.Deferred()
        self._totals.add(row)
        item = Row(row, sql.row_params(row, self.instance), d)
        if self._held or self._state == "failed":
            self._hold([item], None)  # never ahead of the rows already held
        else:
            self._queue.append(item)
            self._schedule_pump()
        return d

    def _ordered(self, function: Callable[[Any], Any]) -> defer.Deferred:
        """C{function(transaction)} in a transaction of its own, after every row recorded before it."""
        if self._state != "running":
            return defer.fail(LedgerClosed("the ledger is not running"))
        d: defer.Deferred = defer.Deferred()
        self._queue.append(Call(function, d))
        self._schedule_pump()
        return d

    _on_writer = _ordered  # the SQLite ledger's name, for tools and tests

    def prune(self, older_than_epoch: float) -> defer.Deferred:
        """
        Fold the rows of the UTC days before C{older_than_epoch}'s into
        C{rollups} (as the SQLite ledger does), under a lock that keeps two
        instances from folding the same rows; fires with the rows moved.
        """
        params = sql.prune_params(older_than_epoch)

        def work(tx: Any) -> int:
            tx.advisory_locks([PRUNE_LOCK])
            return sql.prune(tx, POSTGRESQL, params)

        return self._ordered(work)

    def _prune_expired(self) -> defer.Deferred:
        assert self.retention_seconds is not None
        cutoff = self._clock.seconds() - self.retention_seconds
        d = self.prune(cutoff)

        def pruned(moved: int) -> None:
            if moved:
                _log.info("ledger: folded {moved} rows older than {day} into rollups", moved=moved,
                          day=utc_day(cutoff))

        def failed(failure: Failure) -> None:
            if not failure.check(LedgerClosed, DatabaseUnavailable):
                _log.failure("ledger: retention prune failed", failure=failure)

        return d.addCallbacks(pruned, failed)

    # -- the one transaction under way

    def _schedule_pump(self) -> None:
        if self._pump_call is None:
            self._pump_call = self._reactor.callLater(0, self._pump)

    def _pump(self) -> None:
        """Start the next transaction: held rows due for a retry, else what is queued."""
        self._pump_call = None
        if self._busy or self._state not in ("running", "closing"):
            return
        if self._retry_due and self._held and self._state == "running":
            self._retry_due = False
            self._retry()
            return
        # Rows never overtake held ones: they join them.
        waiting = []
        while self._queue and isinstance(self._queue[0], Row) and self._held:
            waiting.append(self._queue.popleft())
        if waiting:
            self._hold(waiting, None)  # type: ignore[arg-type]
        if not self._queue:
            self._maybe_finish_close()
            return
        if isinstance(self._queue[0], Call):
            call = self._queue.popleft()
            assert isinstance(call, Call)
            self._busy = 1
            self.database.run(call.function).addBoth(self._call_done, call)
            return
        rows: list[Row] = []
        while self._queue and isinstance(self._queue[0], Row) and len(rows) < MAX_BATCH:
            rows.append(self._queue.popleft())  # type: ignore[arg-type]
        self._busy = len(rows)
        d = self.database.run(_insert_rows, [r.params for r in rows], _locks(r.row for r in rows), False)
        d.addCallbacks(self._batch_done, self._batch_failed, callbackArgs=(rows,), errbackArgs=(rows,))

    def _call_done(self, result: Any, call: Call) -> None:
        self._busy = 0
        _fire(call.deferred, result)
        self._next()

    def _next(self) -> None:
        if self._state == "closing":
            self._pump()
        elif self._queue or (self._retry_due and self._held):
            self._schedule_pump()

    def _batch_done(self, _: Any, rows: list[Row]) -> None:
        self._busy = 0
        self._count(len(rows), 0)
        self.commits += 1
        for item in rows:
            _fire(item.deferred, None)
        self._next()

    def _count(self, written: int, failed: int) -> None:
        self.rows += written
        self.failed_rows += failed
        self.largest_batch = max(self.largest_batch, written + failed)

    def _batch_failed(self, failure: Failure, rows: list[Row]) -> None:
        if failure.check(DatabaseUnavailable):
            self._busy = 0
            self._hold(rows, failure.getErrorMessage())
            self._next()
            return
        # The batch's fault, not the database's (a duplicate request_id):
        # each row alone, so one bad row does not fail the rest.
        if len(rows) == 1:
            self._busy = 0
            self._count(0, 1)
            self._failed_row(rows[0], failure)
            self._next()
            return
        defer.ensureDeferred(self._one_by_one(rows)).addErrback(
            lambda f: _log.failure("ledger: committing rows one by one failed", f))

    async def _one_by_one(self, rows: list[Row]) -> None:
        for index, item in enumerate(rows):
            try:
                await self.database.run(_insert_rows, [item.params], _locks([item.row]), False)
            except DatabaseUnavailable as e:
                self._busy = 0
                self._hold(rows[index:], str(e))
                self._next()
                return
            except Exception:
                self._count(0, 1)
                self._failed_row(item, Failure())
            else:
                self.commits += 1
                self._count(1, 0)
                _fire(item.deferred, None)
        self._busy = 0
        self._next()

    def _failed_row(self, item: Row, failure: Failure) -> None:
        self._totals.remove(item.row)
        _log.error("ledger: could not commit request {request_id}: {error}", request_id=item.row.request_id,
                   error=failure.getErrorMessage())
        _fire(item.deferred, failure)

    # -- held rows

    def _hold(self, rows: list[Row], error: str | None) -> None:
        """Keep C{rows} in memory, in order, and tell their callers so."""
        if not rows:
            return
        if error is not None:
            self.last_error = error
        if self.failing_since is None:
            self.failing_since = self._reactor.seconds()
            _log.error(
                "ledger: cannot write to {url}: {error}. Keeping rows in memory (up to {capacity}) and "
                "retrying; readiness and /api/health report the ledger as failing until it writes again",
                url=str(self.url), error=self.last_error, capacity=self.backlog,
            )
        self._held.extend(rows)
        self.held_rows += len(rows)
        for item in rows:
            _fire(item.deferred, HELD)
        self._schedule_retry()

    def _schedule_retry(self, delay: float | None = None) -> None:
        if self._state != "running" or not self._held:
            return
        if delay == 0:
            if self._retry_call is not None and self._retry_call.active():
                self._retry_call.cancel()
            self._retry_call = None
        elif self._retry_call is not None or self._retry_due:
            return
        self._retry_call = self._reactor.callLater(self._retry_delay if delay is None else delay, self._retry_now)

    def _retry_now(self) -> None:
        self._retry_call = None
        self._retry_due = True
        self._schedule_pump()

    def _retry(self) -> None:
        """The oldest held rows, again (a row already stored is taken as written)."""
        batch = list(itertools.islice(self._held, MAX_BATCH))
        self._busy = len(batch)
        self.retries += 1
        d = self.database.run(_insert_rows, [r.params for r in batch], _locks(r.row for r in batch), True)
        d.addCallbacks(self._retried, self._retry_failed, callbackArgs=(batch,))

    def _retried(self, _: Any, batch: list[Row]) -> None:
        self._busy = 0
        self.commits += 1
        self._count(len(batch), 0)
        for _item in batch:
            self._held.popleft()
        self.recovered_rows += len(batch)
        self._retry_delay = RETRY_FIRST
        if self._held:
            self._schedule_retry(0)
        else:
            self._recovered()
        self._next()

    def _retry_failed(self, failure: Failure) -> None:
        self._busy = 0
        if failure.check(DatabaseUnavailable):
            self.last_error = failure.getErrorMessage()
        else:
            _log.failure("ledger: retrying held rows failed", failure)
        self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
        self._schedule_retry()
        self._next()

    def _recovered(self) -> None:
        since = self.failing_since
        self.failing_since = None
        self.last_error = None
        _log.info("ledger: writing to {url} again; every held row is committed ({seconds:.1f} s after the "
                  "first failure)", url=str(self.url),
                  seconds=self._reactor.seconds() - (since if since is not None else self._reactor.seconds()))
        if self._unkept_now:
            _log.warn("ledger: {count} rows of refused requests were not kept while the backlog was full "
                      "(their audit lines remain)", count=self._unkept_now)
            self._unkept_now = 0
        for callback in list(self.on_recovered):
            callback()

    def _held_rows(self) -> Iterable[LedgerRow]:
        return [item.row for item in self._held]

    # -- health and admission

    def health(self) -> dict[str, Any]:
        """
        As the SQLite ledger's, with C{state} C{"loading"} until the ledger
        is loaded, C{"failing"} while rows are held or the database does
        not answer, plus C{database} (the URL without its password) and
        C{available}.
        """
        state = self._state
        failing = bool(self._held) or not self.database.available
        if state in ("stopped", "closed", "closing"):
            shown = "closed"
        elif state == "running":
            shown = "failing" if failing else "ok"
        elif state == "failed":
            shown = "failing"
        else:
            shown = "loading"
        error = self.last_error if failing or state != "running" else None
        if state == "failed" and self._load_failure is not None:
            error = self._load_failure.getErrorMessage()
        return {
            "state": shown,
            "pending_rows": len(self._held),
            "capacity": self.backlog,
            "error": error,
            "failing_since": self.failing_since,
            "unkept_rows": self._unkept,
            "database": str(self.url),
            "available": bool(self.database.available),
        }

    def admission_refusal(self, budgeted: bool) -> str | None:
        """
        Why a request that will be metered must be refused now, or L{None}:
        every caller while the ledger is loading or budgets are seeded, and
        once the backlog is full; a caller with a budget as soon as a row is
        held or the database does not answer (its spend could be counted
        only in memory).
        """
        held_for = self._hold_reason()
        if held_for is not None:
            return held_for
        if self._state != "running":
            return "the ledger is not connected to its database yet; try again shortly"
        if len(self._held) >= self.backlog:
            return "the ledger cannot write its records and holds as many unwritten ones as it may; try again later"
        if budgeted and (self._held or not self.database.available):
            return "the ledger cannot write its records, so spend against this budget cannot be counted; try again later"
        return None

    def ready(self) -> defer.Deferred:
        """Fires with True when loaded, seeded, nothing held and the database answers; else False."""
        if self._state != "running" or self._held or self._hold_reason() is not None:
            return defer.succeed(False)
        d = self.database.run(lambda tx: tx.execute("SELECT 1").fetchone() is not None)
        return d.addErrback(lambda _: False)

    def writer_stats(self) -> dict[str, int]:
        """The SQLite writer's counters (C{wal_bytes} and C{wal_resets} are 0 here)."""
        return {
            "commits": self.commits,
            "rows": self.rows,
            "failed_rows": self.failed_rows,
            "largest_batch": self.largest_batch,
            "queued": len(self._queue) + self._busy,
            "held": len(self._held),
            "recovered": self.recovered_rows,
            "unkept": self._unkept,
            "wal_bytes": 0,
            "wal_resets": 0,
        }

    # -- reads

    def _read(self, function: Callable[[Any], Any]) -> defer.Deferred:
        if self._state in ("stopped", "closing", "closed"):
            return defer.fail(LedgerClosed("the ledger is not running"))
        if self._state != "running":
            return defer.fail(DatabaseUnavailable(f"{self.url}: the ledger is not loaded yet"))
        return self.database.run(_read_only, function)

    def spend_timeline(self, since: float, bucket_seconds: int = TIMELINE_BUCKET) -> list:
        """Not on this backend: it would block the reactor.  Use L{spend_timeline_async}."""
        raise SynchronousRead("spend_timeline reads PostgreSQL: use spend_timeline_async")

    def scope_timeline(self, column: str, since: float, bucket_seconds: int = TIMELINE_BUCKET) -> list:
        """Not on this backend: it would block the reactor.  Use L{scope_timeline_async}."""
        raise SynchronousRead("scope_timeline reads PostgreSQL: use scope_timeline_async")


def _fire(deferred: defer.Deferred, result: Any) -> None:
    """Fire C{deferred} unless its caller cancelled it (then there is no one to tell)."""
    try:
        if isinstance(result, Failure):
            deferred.errback(result)
        else:
            deferred.callback(result)
    except defer.AlreadyCalledError:
        pass
