"""
How ledger rows reach the disk in record order, without the agent waiting
longer than one commit, and without losing one when the disk cannot take it.

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
    operator writes, pruning, closing, resetting the WAL; every row while
    the thread owns the database; every held row being retried; and every
    row when C{sync="full"} (an fsync per commit has no place on the
    reactor).

The reactor hands the database to the thread with each item it queues and
takes it back when the thread has answered them all; rows recorded in
between follow their predecessors to the thread.  So rows and calls are
committed in the order they were made, by one writer at a time.

B{Checkpoints.}  The reactor's connection never checkpoints
(C{wal_autocheckpoint=0}): a checkpoint copies the WAL into the database
file and fsyncs it.  After L{CHECKPOINT_EVERY} of its commits, a PASSIVE
checkpoint runs on a connection of its own in the reactor's threadpool;
PASSIVE never blocks a writer and is never blocked by one, but under
steady writes it never catches up with the end of the WAL, and SQLite only
starts the WAL over once a checkpoint did: the file grew without limit.
So when the WAL has passed L{WAL_RESET_BYTES} after a PASSIVE checkpoint,
a TRUNCATE checkpoint runs on the writer thread, which owns the database
while it runs: it copies the few frames written since the PASSIVE one and
empties the WAL.  Rows recorded meanwhile do not wait for it: each turn's
rows are appended to the ledger's row journal (L{row_journal}, one
C{write()}, as durable as a commit here) and answered, and they are
committed right after the reset, ahead of the rows recorded after them.

B{Several processes on one file} (C{shared}: workers on one host).  Rows
are committed on the reactor as with one process: the other workers hold
the write lock only for their own commits of tens of microseconds, so the
lock is nearly always free, and when it is not (busy timeout 0) the rows
go to the thread, which waits for it (the reactor never does).  Handing
every row to the thread instead, as this did first, cost each worker two
thread hand-overs a request and kept two workers at 1.3 times the
requests of one.  The thread's commits are counted for the background
checkpoints too, the thread's connection leaves checkpoints to them
(C{wal_autocheckpoint=0}), and the WAL reset is tried once without waiting
(C{busy_timeout=0}): another process's reader or writer makes it a PASSIVE
checkpoint, never a stall of this writer or theirs; the next check tries
again.

B{Storage failures.}  A commit that fails because of the storage (a full
disk, an I/O error: L{is_storage_error}), not because of the row, loses
nothing: its rows are B{held} in memory, in order, and their Deferreds fire
with L{HELD} so the agents get their answers.  Rows recorded while any are
held join them (never overtaking them), and the thread retries the oldest
L{MAX_BATCH} on a backoff timer (L{RETRY_FIRST} doubling to L{RETRY_MAX}
seconds) until the storage takes them.  L{Writer.held} and
L{Writer.capacity} tell the ledger when to refuse new work.  On close, held
rows get one last try, then go to the C{spill} callable (a file elsewhere).
"""

from __future__ import annotations

import collections
import functools
import itertools
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from cllama_tx.store.records import LedgerRow
from cllama_tx.store.row_journal import RowJournal
from cllama_tx.store.sqlite_tx import DatabaseBusy, is_storage_error
from cllama_tx.store.sqlite_tx import transaction as _transaction

MAX_BATCH = 5000
"""At most this many queued items (or held rows) are taken into one commit on the thread."""

CHECKPOINT_EVERY = 200
"""Commits on the reactor's connection between two background checkpoints."""

WAL_RESET_BYTES = 16 * 1024 * 1024
"""
A WAL this large after a PASSIVE checkpoint is emptied by a TRUNCATE one on
the writer thread.  Also each connection's C{journal_size_limit}.  The WAL
then stays below this plus what is written between two checkpoints (200
commits): about 30 MiB at 1,300 requests/s (docs/LEDGER.md).
"""

RESET_PATIENCE = 2.0
RESET_READER_WAIT_MS = 100
"""How long a WAL reset waits for a running checkpoint (seconds), and for readers (ms)."""

BUSY_RETRY_SECONDS = 0.0005
BUSY_RETRIES = 8
"""
Another connection holding the write lock (another worker's commit: tens
of microseconds) makes the reactor try again this soon, these rows first,
this many times, before the rows go to the thread.  The thread's wait is
SQLite's busy handler, which sleeps 1 ms and more between tries, and every
row recorded meanwhile must follow the handed ones there: with two workers
on one file a tenth of the rows took that way (docs/LEDGER.md).
"""

RETRY_FIRST = 0.25
RETRY_MAX = 5.0
"""Seconds before held rows are retried: doubling from the first to the max."""

HELD = "held"
"""What a row's Deferred fires with when the row is held in memory, not committed."""

_log = Logger(namespace="cllama_tx.ledger")

# (deferred or None, row or None, failure or None): one answer of a commit.
Result = tuple["defer.Deferred | None", "LedgerRow | None", "Failure | None"]


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
class Retry:
    """Commit these held rows (the oldest) on the thread."""

    rows: list[Row]


@attrs.define
class Stop:
    """Last try for the held rows in C{leftover}, then close the thread's connection."""

    deferred: defer.Deferred
    leftover: list[Row] = attrs.Factory(list)


class StorageFailed(Exception):
    """
    The storage refused a commit (L{is_storage_error}).  C{done} holds the
    results of the rows committed (or failed on their own) before it.
    """

    def __init__(self, error: BaseException, done: list[Result]) -> None:
        super().__init__(str(error))
        self.done = done


@attrs.define
class Stopped:
    """What the thread did with the held rows on close (see L{Stop})."""

    committed: list[Result]
    unwritten: list[Row]
    spilled_to: str | None = None
    spill_error: str | None = None


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
    conn.execute(f"PRAGMA journal_size_limit = {WAL_RESET_BYTES}")
    return conn


def wal_size(path: str) -> int:
    """Bytes in C{path}'s WAL file (0 when there is none)."""
    try:
        return os.stat(path + "-wal").st_size
    except FileNotFoundError:
        return 0


def checkpoint(path: str) -> tuple[tuple[int, int, int], int]:
    """
    One PASSIVE checkpoint on a connection of its own (off the reactor):
    its C{(busy, wal_frames, copied)} and the WAL's size after it.
    """
    conn = sqlite3.connect(path, timeout=0.0, isolation_level=None)
    try:
        result = tuple(conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone())
    finally:
        conn.close()
    return result, wal_size(path)


def truncate_wal(conn: sqlite3.Connection, patient: bool = True) -> tuple[int, int, int]:
    """
    On the writer thread, which owns the database: copy the rest of the WAL
    and empty it.  A PASSIVE checkpoint still running makes it fail at once
    (SQLite does not wait for another checkpointer): it is tried again for
    up to L{RESET_PATIENCE} seconds.  A reader on an old snapshot is waited
    for L{RESET_READER_WAIT_MS} only, not the connection's 30 s: rows queue
    behind the reset.  Not C{patient} (other processes share the file): one
    try that waits for nothing.  C{(busy, wal_frames, copied)}; busy 1
    means not reset.
    """
    previous = conn.execute("PRAGMA busy_timeout").fetchone()[0]
    conn.execute(f"PRAGMA busy_timeout = {RESET_READER_WAIT_MS if patient else 0}")
    try:
        deadline = time.monotonic() + (RESET_PATIENCE if patient else 0.0)
        while True:
            try:
                result = tuple(conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
            except sqlite3.OperationalError as e:
                if patient or "locked" not in str(e):
                    raise
                result = (1, -1, -1)  # another process holds the file: not now
            if not result[0] or time.monotonic() >= deadline:
                return result
            time.sleep(0.001)
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(previous)}")


def _execute_many(statement: str, params: list[tuple[Any, ...]], conn: sqlite3.Connection) -> Any:
    return conn.executemany(statement, params)


def _statement(statement: str, params: Any) -> Callable[[sqlite3.Connection], Any]:
    """One statement with its parameters, as the body of a transaction."""
    return lambda conn: conn.execute(statement, params)


class Writer:
    """
    The ledger's writes in order: C{conn} is the writer thread's connection
    (with C{synchronous} set), C{inline} the reactor's (or L{None}: every
    write goes through the thread).  C{deliver} gets each batch's results on
    the reactor thread: a list of C{(deferred, row, failure)}.  C{insert}
    adds a row; C{insert_again} adds a held row unless it is already there
    (a commit reported as failed may have reached the disk).  At most about
    C{capacity} rows are held (the ledger refuses work beyond it); C{spill}
    saves the rows still held on close and returns where.  C{shared}:
    other processes write the same file (see the module's docstring).
    C{journal} takes the rows recorded while a WAL reset owns the database
    (L{None}: they wait for it).
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        reactor: Any,
        deliver: Callable[[list[Result]], None],
        insert: str,
        inline: sqlite3.Connection | None = None,
        path: str | None = None,
        insert_again: str | None = None,
        capacity: int = 10000,
        spill: Callable[[list[LedgerRow]], str] | None = None,
        shared: bool = False,
        journal: RowJournal | None = None,
    ) -> None:
        if shared:
            conn.execute("PRAGMA wal_autocheckpoint = 0")  # the background checkpoints do it
        self.shared = shared
        self._conn = conn
        self._inline = inline
        self._reactor = reactor
        self._deliver = deliver
        self._insert = insert
        self._insert_again = insert_again or insert
        self._path = path
        self._spill = spill
        self.capacity = capacity
        self.queue: queue.SimpleQueue[Row | Call | Retry | Stop] = queue.SimpleQueue()
        self._handed = 0  # items queued to the thread, not yet answered
        self._pending: list[Row] = []
        self._flush_call: Any = None
        self._since_checkpoint = 0
        self.checkpointing: defer.Deferred | None = None
        self._resetting: defer.Deferred | None = None
        self.last_checkpoint: tuple[int, int, int] | None = None
        self.wal_bytes = 0  # the WAL's size after the last checkpoint
        self.commits = 0
        self.rows = 0
        self.failed_rows = 0
        self.largest_batch = 0
        self.inline_commits = 0
        self.busy_retries = 0  # commits tried again on the reactor because the lock was taken
        self._busy_tries = 0  # of the rows waiting now
        self.handed_rows = 0
        self.checkpoints = 0
        self.wal_resets = 0
        # Held rows (reactor side), oldest first, and what the retries do.
        self.backlog: collections.deque[Row] = collections.deque()
        self.last_error: str | None = None
        self.failing_since: float | None = None
        self.held_rows = 0  # ever held
        self.recovered_rows = 0  # held, then committed
        self.retries = 0
        self._retry_call: Any = None
        self._retry_delay = RETRY_FIRST
        self._retrying = False
        self._stopping = False
        self._stop_after_retry: defer.Deferred | None = None
        self.on_recovered: list[Callable[[], None]] = []
        self._storage_failing = False  # thread side: hold rows without trying
        # While a WAL reset is the thread's only work: rows go to the journal
        # (answered at once) and wait in _journaled for their commit.
        self.journal = journal
        self._journaling = False
        self._journaled: list[Row] = []
        self._journal_dirty = journal is not None and journal.size > 0  # rows the database may lack
        self.journaled_rows = 0
        self.thread = threading.Thread(target=self._run, name="cllama-ledger-writer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    @property
    def queued(self) -> int:
        """Rows and calls waiting for their commit (held rows not included)."""
        return len(self._pending) + self._handed

    @property
    def held(self) -> int:
        """Rows the storage refused, kept in memory until it takes them."""
        return len(self.backlog)

    @property
    def full(self) -> bool:
        """As many rows are held as the ledger may hold."""
        return len(self.backlog) >= self.capacity

    # -- the reactor side

    def record(self, item: Row) -> None:
        """Commit C{item} at the end of this reactor turn, or after the thread's work, or hold it."""
        if self.backlog:
            self._hold([item], None)  # never ahead of the rows already held
            return
        if self._journaling:
            self._pending.append(item)  # to the journal at the end of this turn
            if self._flush_call is None:
                self._flush_call = self._reactor.callLater(0, self.flush)
            return
        if self._inline is None or self._handed:
            self.handed_rows += 1
            self._hand(item)
            return
        self._pending.append(item)
        if self._flush_call is None:
            self._flush_call = self._reactor.callLater(0, self.flush)

    def call(self, item: Call) -> None:
        """Run C{item} on the thread, after every row recorded before it."""
        self.flush(retry=False)
        self._journal_to_thread()
        self._hand(item)

    def stop(self, deferred: defer.Deferred) -> None:
        """
        Commit what is queued, give the held rows a last try (then spill
        them), close the thread's connection; C{deferred} fires after.
        """
        self.flush(retry=False)
        self._journal_to_thread()
        self._stopping = True
        if self._retry_call is not None and self._retry_call.active():
            self._retry_call.cancel()
        self._retry_call = None
        if self._retrying:
            self._stop_after_retry = deferred  # its rows must not be tried twice at once
            return
        self._hand(Stop(deferred, list(self.backlog)))

    def flush(self, retry: bool = True) -> None:
        """
        Commit the rows of this turn on the reactor's connection now.
        C{retry}: when the lock is taken, try again shortly on the reactor;
        else (an item is handed to the thread next) they go to the thread.
        """
        if self._flush_call is not None:
            if self._flush_call.active():
                self._flush_call.cancel()
            self._flush_call = None
        rows, self._pending = self._pending, []
        if not rows:
            return
        if self.backlog:
            self._hold(rows, None)
            return
        if self._journaling:
            self._to_journal(rows)
            return
        if self._inline is None or self._handed:
            # Recorded by a callback of the flush that ran just before an item
            # was handed to the thread (call(), stop()): they follow that item.
            self.handed_rows += len(rows)
            for row in rows:
                self._hand(row)
            return
        self._commit_inline(rows, retry)

    def _commit_inline(self, rows: list[Row], retry: bool = False) -> None:
        """
        Commit C{rows} on the reactor's connection; busy: again shortly
        (C{retry}, L{BUSY_RETRIES} times), then to the thread; refused: held.
        """
        assert self._inline is not None
        try:
            results = self._commit(self._inline, rows, self._insert)
        except DatabaseBusy as busy:
            left = rows[len(busy.done):]
            if retry and self._busy_tries < BUSY_RETRIES:
                # Someone else commits: again shortly, these rows ahead of any recorded meanwhile.
                self._busy_tries += 1
                self.busy_retries += 1
                self._pending[:0] = left
                if self._flush_call is not None and self._flush_call.active():
                    self._flush_call.cancel()
                self._flush_call = self._reactor.callLater(BUSY_RETRY_SECONDS, self.flush)
                if busy.done:
                    self._deliver(busy.done)
                return
            # Still taken (a long write): the thread waits for the lock instead.
            self._busy_tries = 0
            self.handed_rows += len(left)
            for row in left:
                self._hand(row)
            if busy.done:
                self._deliver(busy.done)
            return
        except StorageFailed as failed:
            if failed.done:
                self._deliver(failed.done)
            self._hold(rows[len(failed.done):], str(failed))
            return
        self.inline_commits += 1
        self._busy_tries = 0
        self._committed()
        self._deliver(results)
        self._settled()

    def close_inline(self) -> None:
        """After the thread's last answer: close the reactor's connection (and the journal)."""
        if self._inline is not None:
            self._inline.close()
            self._inline = None
        if self.journal is not None:
            self.journal.close(remove=not self._journal_dirty)
            self.journal = None

    # -- the row journal (while a WAL reset owns the database)

    def _to_journal(self, rows: list[Row]) -> None:
        """Append this turn's rows to the journal and answer them; if it cannot take them, they wait."""
        assert self.journal is not None
        try:
            self.journal.append(r.row for r in rows)
        except OSError as e:
            _log.warn("ledger: the row journal cannot be written ({error}); rows wait for the WAL reset",
                      error=str(e))
            self._journal_to_thread()
            self.handed_rows += len(rows)
            for row in rows:
                self._hand(row)
            return
        self._journal_dirty = True
        self.journaled_rows += len(rows)
        # Answered now; committed after the reset with Deferreds of their own.
        self._journaled.extend(attrs.evolve(r, deferred=defer.Deferred()) for r in rows)
        self._deliver([(r.deferred, r.row, None) for r in rows])

    def _journal_to_thread(self) -> None:
        """Something else is handed to the thread: the journaled rows go first, and journaling ends."""
        self._journaling = False
        rows, self._journaled = self._journaled, []
        self.handed_rows += len(rows)
        for row in rows:
            self._hand(row)

    def _end_journal(self) -> None:
        """The reset is done: commit the journaled rows, ahead of everything recorded after them."""
        if not self._journaling:
            return
        self._journaling = False
        rows, self._journaled = self._journaled, []
        if not rows:
            return
        if self._inline is None or self._handed or self.backlog:
            self._journaled = rows
            self._journal_to_thread()
            return
        self._commit_inline(rows)

    def _settled(self) -> None:
        """Nothing is queued or held: every journaled row is in the database, so the journal is emptied."""
        if self._journal_dirty and not self._journaling and not self._handed and not self.backlog:
            assert self.journal is not None
            try:
                self.journal.clear()
            except OSError as e:  # its rows are in the database; at the next start they are skipped
                _log.warn("ledger: the row journal could not be emptied: {error}", error=str(e))
                return
            self._journal_dirty = False

    def _hand(self, item: Row | Call | Retry | Stop) -> None:
        self._handed += 1
        self.queue.put(item)

    def _answered(self, count: int, fire: Callable[..., Any], *args: Any) -> None:
        """On the reactor: the thread is done with C{count} items."""
        self._handed -= count
        fire(*args)

    def _answered_rows(self, count: int, results: list[Result], held: list[Row], error: str | None) -> None:
        self._handed -= count
        if self.shared and results and not held:
            self._committed()  # every commit is the thread's: checkpoints count them
        if results:
            self._deliver(results)
        self._hold(held, error)
        self._settled()

    # -- held rows (reactor side)

    def _hold(self, rows: list[Row], error: str | None) -> None:
        """Keep C{rows} in memory, in order, and tell their callers so."""
        if not rows:
            return
        if error is not None:
            self.last_error = error
        if self.failing_since is None:
            self.failing_since = self._reactor.seconds()
            _log.error(
                "ledger: cannot write to {path}: {error}. Keeping rows in memory (up to {capacity}) and "
                "retrying; readiness and /api/health report the ledger as failing until it writes again",
                path=self._path,
                error=self.last_error,
                capacity=self.capacity,
            )
        self.backlog.extend(rows)  # all in place before any caller runs
        self.held_rows += len(rows)
        for item in rows:
            try:
                item.deferred.callback(HELD)
            except defer.AlreadyCalledError:
                pass  # cancelled by its caller
        self._schedule_retry()

    def _schedule_retry(self, delay: float | None = None) -> None:
        if self._stopping or self._retrying or self._retry_call is not None or not self.backlog:
            return
        self._retry_call = self._reactor.callLater(self._retry_delay if delay is None else delay, self._retry)

    def _retry(self) -> None:
        self._retry_call = None
        if self._stopping or self._retrying or not self.backlog:
            return
        self.flush(retry=False)
        self._retrying = True
        self.retries += 1
        self._hand(Retry(list(itertools.islice(self.backlog, MAX_BATCH))))

    def _retried(self, results: list[Result], error: str | None) -> None:
        """On the reactor: the oldest C{len(results)} held rows are settled."""
        self._handed -= 1
        self._retrying = False
        for _ in results:
            self.backlog.popleft()
        self.recovered_rows += sum(1 for result in results if result[2] is None)
        if results:
            self._deliver(results)
        if error is not None:
            self.last_error = error
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
        else:
            self._retry_delay = RETRY_FIRST
        if self._stop_after_retry is not None:
            deferred, self._stop_after_retry = self._stop_after_retry, None
            self._hand(Stop(deferred, list(self.backlog)))
            return
        if not self.backlog:
            self._recovered()
            self._settled()
        elif error is None:
            self._schedule_retry(0)  # the storage takes rows again: the next batch now
        else:
            self._schedule_retry()

    def _recovered(self) -> None:
        since = self.failing_since
        self.failing_since = None
        self.last_error = None
        _log.info(
            "ledger: writing to {path} again; every held row is committed ({seconds:.1f} s after the first failure)",
            path=self._path,
            seconds=self._reactor.seconds() - (since if since is not None else self._reactor.seconds()),
        )
        for callback in list(self.on_recovered):
            callback()

    # -- checkpoints

    def _committed(self) -> None:
        """
        After a commit of rows on the reactor (or, shared, on the thread):
        every L{CHECKPOINT_EVERY} of them, a checkpoint, or a reset if the
        last one falls behind.
        """
        self._since_checkpoint += 1
        if self._since_checkpoint < CHECKPOINT_EVERY or self._path is None:
            return
        self._since_checkpoint = 0
        if self.checkpointing is None:
            self._start_checkpoint()
        elif self._resetting is None and wal_size(self._path) >= 2 * WAL_RESET_BYTES:
            # The PASSIVE checkpoint takes long (a slow fsync) while rows keep
            # coming: reset now.  From here rows queue behind the reset
            # instead of growing the WAL; it waits for the PASSIVE one.
            self._reset_wal()

    def _start_checkpoint(self) -> None:
        assert self._path is not None
        d = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(), checkpoint, self._path)

        def passive(result: tuple[tuple[int, int, int], int]) -> Any:
            self.checkpoints += 1
            self.last_checkpoint, self.wal_bytes = result
            if self.wal_bytes < WAL_RESET_BYTES:
                return None
            return self._resetting if self._resetting is not None else self._reset_wal()

        def done(result: Any) -> None:
            self.checkpointing = None
            if isinstance(result, Failure):
                _log.warn("ledger: background checkpoint failed: {error}", error=result.getErrorMessage())

        self.checkpointing = d.addCallback(passive).addBoth(done)

    def _reset_wal(self) -> defer.Deferred | None:
        """A TRUNCATE checkpoint on the writer thread; fires when done (never fails)."""
        path = self._path
        if path is None or self.backlog or self._stopping:
            return None  # a failing disk is left alone; a closing writer too
        reset: defer.Deferred = defer.Deferred()
        self._resetting = reset
        self.call(Call(functools.partial(truncate_wal, patient=not self.shared), reset))
        # The reset is the thread's only work: rows recorded until it is done go to the journal.
        self._journaling = self.journal is not None and self._inline is not None and self._handed == 1

        def truncated(result: Any) -> None:
            self._resetting = None
            self._end_journal()
            self.wal_bytes = wal_size(path)
            if isinstance(result, Failure):
                _log.warn("ledger: the WAL could not be reset: {error}", error=result.getErrorMessage())
            elif result[0] and self.shared:
                # Other processes read and write the file all the time: expected, said quietly.
                _log.debug("ledger: the WAL could not be reset (another process used it); tried again later")
            elif result[0]:
                _log.warn("ledger: the WAL could not be reset (a reader held it); the next checkpoint tries again")
            else:
                self.wal_resets += 1

        return reset.addBoth(truncated)

    # -- both sides (never at the same time)

    def _commit(self, conn: sqlite3.Connection, rows: list[Row], statement: str) -> list[Result]:
        """
        Commit C{rows} in one transaction.  One bad row (a duplicate
        request_id, say) must not fail the innocent rows it was batched
        with: then each is retried alone.  Raises L{DatabaseBusy} when the
        write lock could not be taken, and L{StorageFailed} when the
        storage refused the write; both having committed only C{done}.
        """
        if len(rows) == 1:
            body = _statement(statement, rows[0].params)  # one row a turn, the usual case: no executemany
        else:
            body = functools.partial(_execute_many, statement, [r.params for r in rows])
        try:
            _transaction(conn, body)
            self.commits += 1
            results: list[Result] = [(r.deferred, r.row, None) for r in rows]
        except DatabaseBusy:
            raise
        except Exception as e:
            if is_storage_error(e):
                raise StorageFailed(e, []) from None
            if len(rows) == 1:
                results = [(rows[0].deferred, rows[0].row, Failure())]
            else:
                results = []
                for r in rows:
                    try:
                        _transaction(conn, _statement(statement, r.params))
                        self.commits += 1
                        results.append((r.deferred, r.row, None))
                    except DatabaseBusy as busy:
                        self._count(results)
                        raise DatabaseBusy(str(busy), results) from None
                    except Exception as e2:
                        if is_storage_error(e2):
                            self._count(results)
                            raise StorageFailed(e2, results) from None
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
            elif isinstance(item, Retry):
                self._retry_on_thread(item)
            else:
                self._stop(item)
                return True
        if rows:
            self._commit_on_thread(rows)
        return False

    def _commit_on_thread(self, rows: list[Row]) -> None:
        results: list[Result] = []
        held: list[Row] = []
        error = None
        if self._storage_failing:
            held = rows  # behind rows already held: never ahead of them
        else:
            try:
                results = self._commit(self._conn, rows, self._insert)
            except (DatabaseBusy, StorageFailed) as failed:  # busy for the whole busy timeout, or no room
                self._storage_failing = True
                results, held, error = failed.done, rows[len(failed.done):], str(failed)
        self._reactor.callFromThread(self._answered_rows, len(rows), results, held, error)

    def _retry_on_thread(self, item: Retry) -> None:
        error = None
        try:
            results = self._commit(self._conn, item.rows, self._insert_again)
            self._storage_failing = False
        except (DatabaseBusy, StorageFailed) as failed:
            results, error = failed.done, str(failed)
        self._reactor.callFromThread(self._retried, results, error)

    def _call(self, item: Call) -> None:
        try:
            result = item.function(self._conn)
        except Exception:
            self._reactor.callFromThread(self._answered, 1, self._deliver, [(item.deferred, None, Failure())])
        else:
            self._reactor.callFromThread(self._answered, 1, item.deferred.callback, result)

    def _stop(self, item: Stop) -> None:
        stopped = Stopped([], [])
        if item.leftover:
            try:
                stopped.committed = self._commit(self._conn, item.leftover, self._insert_again)
            except (DatabaseBusy, StorageFailed) as failed:
                stopped.committed = failed.done
                stopped.unwritten = item.leftover[len(failed.done):]
                stopped.spill_error = str(failed)
        if stopped.unwritten:
            if self._spill is None:
                stopped.spill_error = f"{stopped.spill_error}; no spill directory is set"
            else:
                try:
                    stopped.spilled_to = self._spill([r.row for r in stopped.unwritten])
                except Exception as e:
                    stopped.spill_error = f"{stopped.spill_error}; spilling failed too: {e}"
        failure = None
        try:
            self._conn.close()
        except Exception:
            failure = Failure()
        self._reactor.callFromThread(self._stopped, item.deferred, failure, stopped)

    def _stopped(self, deferred: defer.Deferred, failure: Failure | None, stopped: Stopped) -> None:
        """On the reactor: the thread is gone; say loudly what became of the held rows."""
        self._handed -= 1
        held = len(self.backlog)
        self.backlog.clear()
        self.recovered_rows += sum(1 for result in stopped.committed if result[2] is None)
        if stopped.committed:
            self._deliver(stopped.committed)
        lost = len(stopped.unwritten)
        if not lost:
            self._settled()  # the journal's rows are all in the database
        if held and not lost:
            self._recovered()
        elif lost and stopped.spilled_to is not None:
            _log.error(
                "ledger: {count} rows could not be written to {path} before stopping ({error}); they were "
                "saved to {spill} and are imported at the next start",
                count=lost, path=self._path, error=stopped.spill_error, spill=stopped.spilled_to,
            )
        elif lost:
            _log.critical(
                "ledger: {count} rows could not be written to {path} before stopping and could not be "
                "saved elsewhere ({error}); they are LOST. Each follows as a JSON line",
                count=lost, path=self._path, error=stopped.spill_error,
            )
            for r in stopped.unwritten:
                _log.critical("ledger: lost row {row}", row=attrs.asdict(r.row))
        self._deliver([(deferred, None, failure)])
