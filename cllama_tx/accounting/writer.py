"""
How ledger rows reach the disk in record order, without the agent waiting
longer than one commit.

Two connections write to the database, never at the same time:

  - B{The reactor's connection} (C{sync="normal"} only) commits every row
    recorded during one reactor turn in one transaction at the end of that
    turn (C{callLater(0)}): in WAL mode with C{synchronous=NORMAL} a commit
    is a C{write()} into the WAL, tens of microseconds, cheaper and much
    steadier than handing the rows to a thread and the answer back (two
    wake-ups and two GIL hand-overs, which under load cost milliseconds).
    Its busy timeout is 0: if another connection (the virtual-key store's,
    an operator's shell) holds the write lock, the rows go to the thread,
    which may wait; the reactor never does.
  - B{The writer thread's connection} runs everything that may take long:
    operator writes, pruning, closing; every row while the thread owns the
    database; and every row when C{sync="full"} (an fsync per commit has
    no place on the reactor).

The reactor hands the database to the thread with each item it queues and
takes it back when the thread has answered them all; rows recorded in
between follow their predecessors to the thread.  So rows and calls are
committed in the order they were made, by one writer at a time.

The reactor's connection never checkpoints (C{wal_autocheckpoint=0}): a
checkpoint copies the WAL into the database file and fsyncs it.  After
L{CHECKPOINT_EVERY} of its commits, a PASSIVE checkpoint runs on a
connection of its own in the reactor's threadpool; PASSIVE never blocks a
writer and is never blocked by one.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from typing import Any, Callable

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..sqlite_tx import DatabaseBusy, transaction as _transaction
from .records import LedgerRow

MAX_BATCH = 5000
"""At most this many queued items are taken into one group commit on the thread."""

CHECKPOINT_EVERY = 200
"""Commits on the reactor's connection between two background checkpoints."""

_log = Logger(namespace="cllama_tx.ledger")

Result = tuple[defer.Deferred, "LedgerRow | None", "Failure | None"]


@attrs.define
class Row:
    row: LedgerRow
    params: tuple[Any, ...]
    deferred: defer.Deferred


@attrs.define
class Call:
    """Run C{function(connection)} on the writer thread, in order."""

    function: Callable[[sqlite3.Connection], Any]
    deferred: defer.Deferred


@attrs.define
class Stop:
    deferred: defer.Deferred


def open_inline(path: str) -> sqlite3.Connection:
    """
    The reactor's connection: C{synchronous=NORMAL} (no fsync at commit;
    the setting is per connection), never waits for a lock, never
    checkpoints.
    """
    conn = sqlite3.connect(path, timeout=0.0, isolation_level=None)
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA busy_timeout = 0")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    return conn


def checkpoint(path: str) -> tuple[int, int, int]:
    """One PASSIVE checkpoint on a connection of its own (off the reactor)."""
    conn = sqlite3.connect(path, timeout=0.0, isolation_level=None)
    try:
        return tuple(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
    finally:
        conn.close()


class Writer:
    """
    The ledger's writes in order: C{conn} is the writer thread's connection
    (with C{synchronous} set), C{inline} the reactor's (or L{None}: every
    write goes through the thread).  C{deliver} gets each batch's results on
    the reactor thread: a list of C{(deferred, row, failure)}.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        reactor: Any,
        deliver: Callable[[list[Result]], None],
        insert: str,
        inline: sqlite3.Connection | None = None,
        path: str | None = None,
    ) -> None:
        self._conn = conn
        self._inline = inline
        self._reactor = reactor
        self._deliver = deliver
        self._insert = insert
        self._path = path
        self.queue: "queue.SimpleQueue[Row | Call | Stop]" = queue.SimpleQueue()
        self._handed = 0  # items queued to the thread, not yet answered
        self._pending: list[Row] = []
        self._flush_call: Any = None
        self._since_checkpoint = 0
        self.checkpointing: defer.Deferred | None = None
        self.last_checkpoint: tuple[int, int, int] | None = None
        self.commits = 0
        self.rows = 0
        self.failed_rows = 0
        self.largest_batch = 0
        self.inline_commits = 0
        self.handed_rows = 0
        self.checkpoints = 0
        self.thread = threading.Thread(target=self._run, name="cllama-ledger-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def queued(self) -> int:
        """Rows and calls waiting for their commit."""
        return len(self._pending) + self._handed

    # -- the reactor side

    def record(self, item: Row) -> None:
        """Commit C{item} at the end of this reactor turn, or after the thread's work."""
        if self._inline is None or self._handed:
            self.handed_rows += 1
            self._hand(item)
            return
        self._pending.append(item)
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self.flush)

    def call(self, item: Call | Stop) -> None:
        """Run C{item} on the thread, after every row recorded before it."""
        self.flush()
        self._hand(item)

    def flush(self) -> None:
        """Commit the rows of this turn on the reactor's connection now."""
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        rows, self._pending = self._pending, []
        if not rows:
            return
        assert self._inline is not None and not self._handed
        try:
            results = self._commit(self._inline, rows)
        except DatabaseBusy as busy:
            # Someone else writes: the thread waits for the lock instead.
            left = rows[len(busy.done):]
            self.handed_rows += len(left)
            for row in left:
                self._hand(row)
            if busy.done:
                self._deliver(busy.done)
            return
        self.inline_commits += 1
        self._since_checkpoint += 1
        if self._since_checkpoint >= CHECKPOINT_EVERY and self.checkpointing is None:
            self._start_checkpoint()
        self._deliver(results)

    def close_inline(self) -> None:
        """After the thread's last answer: close the reactor's connection."""
        if self._inline is not None:
            self._inline.close()
            self._inline = None

    def _hand(self, item: Row | Call | Stop) -> None:
        self._handed += 1
        self.queue.put(item)

    def _answered(self, count: int, fire: Callable[..., Any], *args: Any) -> None:
        """On the reactor: the thread is done with C{count} items."""
        self._handed -= count
        fire(*args)

    def _start_checkpoint(self) -> None:
        if self._path is None:
            return
        self._since_checkpoint = 0
        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), checkpoint, self._path)

        def done(result: Any) -> None:
            self.checkpointing = None
            if isinstance(result, Failure):
                _log.warn("ledger: background checkpoint failed: {error}", error=result.getErrorMessage())
            else:
                self.checkpoints += 1
                self.last_checkpoint = result

        self.checkpointing = d.addBoth(done)

    # -- both sides (never at the same time)

    def _commit(self, conn: sqlite3.Connection, rows: list[Row]) -> list[Result]:
        """
        Commit C{rows} in one transaction.  One bad row (a duplicate
        request_id, say) must not fail the innocent rows it was batched
        with: then each is retried alone.  Raises L{DatabaseBusy} when the
        write lock could not be taken, having committed nothing.
        """
        try:
            _transaction(conn, lambda c: c.executemany(self._insert, [r.params for r in rows]))
            self.commits += 1
            results: list[Result] = [(r.deferred, r.row, None) for r in rows]
        except DatabaseBusy:
            raise
        except Exception:
            if len(rows) == 1:
                results = [(rows[0].deferred, rows[0].row, Failure())]
            else:
                results = []
                for r in rows:
                    try:
                        _transaction(conn, lambda c, p=r.params: c.execute(self._insert, p))
                        self.commits += 1
                        results.append((r.deferred, r.row, None))
                    except DatabaseBusy as busy:
                        self._count(results)
                        raise DatabaseBusy(str(busy), results) from None
                    except Exception:
                        results.append((r.deferred, r.row, Failure()))
        self._count(results)
        return results

    def _count(self, results: list[Result]) -> None:
        failed = sum(1 for result in results if result[2] is not None)
        self.rows += len(results) - failed
        self.failed_rows += failed
        self.largest_batch = max(self.largest_batch, len(results))

    # -- the thread

    def _run(self) -> None:
        while True:
            items = [self.queue.get()]
            while len(items) < MAX_BATCH:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                if self._process(items):
                    return
            except BaseException:  # pragma: no cover - a bug; keep the thread alive
                failure = Failure()
                self._reactor.callFromThread(
                    _log.failure, "ledger writer: unexpected error", failure=failure
                )

    def _process(self, items: list) -> bool:
        """Handle C{items} in order; return True after a stop."""
        rows: list[Row] = []
        for item in items:
            if isinstance(item, Row):
                rows.append(item)
                continue
            if rows:
                self._commit_on_thread(rows)
                rows = []
            if isinstance(item, Call):
                self._call(item)
            else:
                self._stop(item)
                return True
        if rows:
            self._commit_on_thread(rows)
        return False

    def _commit_on_thread(self, rows: list[Row]) -> None:
        try:
            results = self._commit(self._conn, rows)
        except DatabaseBusy as busy:  # busy for the whole busy timeout: the rest fail
            failure = Failure()
            left = [(r.deferred, r.row, failure) for r in rows[len(busy.done):]]
            self._count(left)
            results = busy.done + left
        self._reactor.callFromThread(self._answered, len(rows), self._deliver, results)

    def _call(self, item: Call) -> None:
        try:
            result = item.function(self._conn)
        except Exception:
            self._reactor.callFromThread(self._answered, 1, self._deliver, [(item.deferred, None, Failure())])
        else:
            self._reactor.callFromThread(self._answered, 1, item.deferred.callback, result)

    def _stop(self, item: Stop) -> None:
        failure = None
        try:
            self._conn.close()
        except Exception:
            failure = Failure()
        self._reactor.callFromThread(self._answered, 1, self._deliver, [(item.deferred, None, failure)])

