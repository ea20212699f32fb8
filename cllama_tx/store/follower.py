"""
Fleet-wide totals: the rows other instances commit to a shared store,
read by this one every second (and on demand) and handed to the ledger,
which counts them in its totals and passes them on to its subscribers.

Each poll reads the rows after the cursor, and the holes behind it
(L{cllama_tx.store.id_cursor}): every row of the store is seen exactly
once, whichever order the ids became visible in.  Rows this instance wrote
are skipped (they were counted when recorded); the rest are foreign.

The totals only need the foreign rows summed per day, agent, provider and
model, so that is what a poll reads (L{follow_counts_reader}: their ids,
then their sums with the totals' own SQL aggregates, in one snapshot),
unless someone subscribed to the rows themselves (L{follow_reader}).  With
two workers each reads half the host's rows: building every one as a
L{LedgerRow} cost each worker about a tenth of its CPU at full load.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.store.id_cursor import IdCursor
from cllama_tx.store.ledger_sql import (
    AGGREGATES_SQL,
    BOOL_FIELDS,
    POSTGRESQL,
    ROW_FIELDS,
    LedgerClosed,
    bucket_from,
    day_sql,
)
from cllama_tx.store.records import LedgerRow
from cllama_tx.store.totals import Bucket, Key

__all__ = [
    "FOLLOW_BATCH",
    "FOLLOW_INTERVAL",
    "FollowedRow",
    "Follower",
    "ForeignSums",
    "follow_counts_reader",
    "follow_reader",
]

FOLLOW_INTERVAL = 1.0
"""Seconds between two reads of other instances' rows."""

FOLLOW_BATCH = 5000
"""Rows read at most per query (a longer backlog is read in several, at once)."""

_SQLITE_HOLES = 500  # SQLite's bound variables are few: the oldest holes first

_log = Logger(namespace="cllama_tx.ledger")


@attrs.frozen
class FollowedRow:
    """A row another instance committed: its id, the instance that wrote it, the row."""

    id: int
    instance: str | None
    row: LedgerRow


@attrs.frozen
class ForeignSums:
    """
    What a poll read without the rows: every id it saw (with the instance
    that wrote it, in id order) and the foreign rows among them summed per
    C{(day, (agent, provider, model))}.
    """

    ids: list[tuple[int, str | None]]
    sums: list[tuple[str, Key, Bucket]]


def _unread(dialect: str, high: int, holes: list[int]) -> tuple[str, list[Any]]:
    """The condition of rows a cursor has not seen: C{id > high}, or one of C{holes}."""
    where = "id > ?"
    args: list[Any] = [high]
    if holes and dialect == POSTGRESQL:
        where += " OR id = ANY(?)"
        args.append(list(holes))
    elif holes:
        chunk = holes[:_SQLITE_HOLES]
        where += f" OR id IN ({', '.join('?' for _ in chunk)})"
        args.extend(chunk)
    return where, args


def follow_counts_reader(
    dialect: str, high: int, holes: list[int], instance: str, limit: int = FOLLOW_BATCH
) -> Callable[[Any], ForeignSums]:
    """
    The read of the first C{limit} unread ids (see L{_unread}) and, for
    those another instance wrote, their sums.  Every id such a read returns
    is new to the cursor it came from, so the sums count no row twice.
    """
    where, args = _unread(dialect, high, holes)
    ids_sql = f"SELECT id, instance FROM requests WHERE {where} ORDER BY id LIMIT ?"
    sums_sql = (
        f"SELECT {day_sql(dialect)}, agent, provider, effective_model, {AGGREGATES_SQL} FROM requests "
        f"WHERE ({where}) AND id <= ? AND (instance IS NULL OR instance <> ?) GROUP BY 1, 2, 3, 4"
    )

    def read(conn: Any) -> ForeignSums:
        ids = [(int(row_id), who) for row_id, who in conn.execute(ids_sql, [*args, limit]).fetchall()]
        if not any(who != instance for _, who in ids):
            return ForeignSums(ids, [])
        sums = [
            (day, (agent, provider, model), bucket_from(counters))
            for day, agent, provider, model, *counters in conn.execute(sums_sql, [*args, ids[-1][0], instance])
        ]
        return ForeignSums(ids, sums)

    return read


def follow_reader(dialect: str, high: int, holes: list[int], limit: int = FOLLOW_BATCH) -> Callable[[Any], list]:
    """The read of rows with C{id > high}, or one of C{holes}, in id order."""
    where, args = _unread(dialect, high, holes)
    sql = f"SELECT id, instance, {', '.join(ROW_FIELDS)} FROM requests WHERE {where} ORDER BY id LIMIT ?"
    args.append(limit)

    def read(conn: Any) -> list[FollowedRow]:
        out = []
        for row_id, instance, *values in conn.execute(sql, args).fetchall():
            fields = dict(zip(ROW_FIELDS, values, strict=True))
            for name in BOOL_FIELDS:
                fields[name] = bool(fields[name])
            out.append(FollowedRow(int(row_id), instance, LedgerRow(**fields)))
        return out

    return read


class Follower:
    """
    Polls C{read(function)} (a Deferred of C{function(connection)} in one
    read transaction) for rows written by other instances than
    C{instance}, and calls C{deliver(rows, sums)} on the reactor with the
    new ones: C{rows} in id order when C{want_rows()} says someone wants
    them (C{sums} None), else C{sums} (C{rows} None, see L{ForeignSums}).
    """

    def __init__(
        self,
        read: Callable[[Callable[[Any], Any]], defer.Deferred],
        dialect: str,
        instance: str,
        reactor: Any,
        deliver: Callable[[list[FollowedRow] | None, list[tuple[str, Key, Bucket]] | None], None],
        interval: float = FOLLOW_INTERVAL,
        batch: int = FOLLOW_BATCH,
        want_rows: Callable[[], bool] = lambda: True,
    ) -> None:
        self._read = read
        self._want_rows = want_rows
        self._dialect = dialect
        self._instance = instance
        self._reactor = reactor
        self._deliver = deliver
        self._interval = interval
        self._batch = batch
        self.cursor = IdCursor()
        self._loop: task.LoopingCall | None = None
        self._polling: defer.Deferred | None = None
        self._waiting: list[defer.Deferred] = []  # for the read after the current one
        self.polls = 0
        self.foreign_rows = 0

    def start(self, high: int, seen: Iterable[int] = ()) -> None:
        """
        Follow from C{high} (every id up to it is counted already), with
        the ids above it already counted too (read in the same snapshot as
        the totals).
        """
        self.cursor = IdCursor(high, self.cursor.patience, self.cursor.limit)
        self.cursor.seen(list(seen), self._reactor.seconds())
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=False)

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    @property
    def running(self) -> bool:
        return self._loop is not None

    def _tick(self) -> None:
        if self._polling is None:
            self.poll().addErrback(lambda _: None)  # said in the log already, or closing

    def poll(self) -> defer.Deferred:
        """
        Read now: fires with the number of foreign rows counted, once a
        read that started after this call is done (rows committed before
        the call are then counted); fails as the read did (for example
        with L{DatabaseUnavailable}).
        """
        if not self.running:
            return defer.succeed(0)
        if self._polling is None:
            return self._start_poll()
        # A read is on its way: it may have started before the caller's
        # rows were committed, so another one follows it.
        waiter: defer.Deferred = defer.Deferred()
        self._waiting.append(waiter)
        return waiter

    def _start_poll(self) -> defer.Deferred:
        done: defer.Deferred = defer.Deferred()
        self._polling = done
        self._read_more(0, done)
        return done

    def _read_more(self, counted: int, done: defer.Deferred) -> None:
        if self._want_rows():
            d = self._read(follow_reader(self._dialect, self.cursor.high, self.cursor.holes, self._batch))
        else:
            d = self._read(
                follow_counts_reader(self._dialect, self.cursor.high, self.cursor.holes, self._instance, self._batch)
            )

        def got(result: list[FollowedRow] | ForeignSums) -> None:
            self.polls += 1
            now = self._reactor.seconds()
            if isinstance(result, ForeignSums):
                read = len(result.ids)
                new = set(self.cursor.seen([row_id for row_id, _ in result.ids], now))
                foreign = sum(1 for row_id, who in result.ids if who != self._instance)
                if len(new) != read:  # cannot happen (see follow_counts_reader); said, not double-counted
                    _log.error("ledger: a read of other instances' rows returned rows already counted; skipped")
                    foreign = 0
                rows, sums = None, result.sums if foreign else None
            else:
                read = len(result)
                new = set(self.cursor.seen([r.id for r in result], now))
                rows = [r for r in result if r.id in new and r.instance != self._instance]
                foreign, sums = len(rows), None
            self.cursor.expire(now)
            if foreign:
                self.foreign_rows += foreign
                try:
                    self._deliver(rows, sums)
                except Exception:
                    _log.failure("ledger: handing other instances' rows on failed")
            if read >= self._batch and self.running:
                self._read_more(counted + foreign, done)  # more waiting: read on at once
            else:
                self._finish(done, counted + foreign)

        def failed(failure: Failure) -> None:
            if not failure.check(DatabaseUnavailable, LedgerClosed):
                _log.failure("ledger: reading other instances' rows failed", failure)
            self._finish(done, failure)

        d.addCallbacks(got, failed)

    def _finish(self, done: defer.Deferred, result: Any) -> None:
        self._polling = None
        waiting, self._waiting = self._waiting, []
        if isinstance(result, Failure):
            done.errback(result)
        else:
            done.callback(result)
        if not waiting:
            return
        if not self.running:
            for waiter in waiting:
                waiter.callback(0)
            return

        def fan_out(outcome: Any) -> None:
            for waiter in waiting:
                if isinstance(outcome, Failure):
                    waiter.errback(outcome)
                else:
                    waiter.callback(outcome)

        self._start_poll().addBoth(fan_out)
