"""
Fleet-wide totals: the rows other instances commit to a shared store,
read by this one every second (and on demand) and handed to the ledger,
which counts them in its totals and passes them on to its subscribers.

Each poll reads the rows after the cursor, and the holes behind it
(L{cllama_tx.store.id_cursor}): every row of the store is seen exactly
once, whichever order the ids became visible in.  Rows this instance wrote
are skipped (they were counted when recorded); the rest are foreign.
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
from cllama_tx.store.ledger_sql import BOOL_FIELDS, POSTGRESQL, ROW_FIELDS, LedgerClosed
from cllama_tx.store.records import LedgerRow

__all__ = ["FOLLOW_BATCH", "FOLLOW_INTERVAL", "FollowedRow", "Follower", "follow_reader"]

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


def follow_reader(dialect: str, high: int, holes: list[int], limit: int = FOLLOW_BATCH) -> Callable[[Any], list]:
    """The read of rows with C{id > high}, or one of C{holes}, in id order."""
    where = "id > ?"
    args: list[Any] = [high]
    if holes and dialect == POSTGRESQL:
        where += " OR id = ANY(?)"
        args.append(list(holes))
    elif holes:
        chunk = holes[:_SQLITE_HOLES]
        where += f" OR id IN ({', '.join('?' for _ in chunk)})"
        args.extend(chunk)
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
    C{instance}, and calls C{deliver(rows)} on the reactor with the new
    ones, in id order.
    """

    def __init__(
        self,
        read: Callable[[Callable[[Any], Any]], defer.Deferred],
        dialect: str,
        instance: str,
        reactor: Any,
        deliver: Callable[[list[FollowedRow]], None],
        interval: float = FOLLOW_INTERVAL,
        batch: int = FOLLOW_BATCH,
    ) -> None:
        self._read = read
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
        reader = follow_reader(self._dialect, self.cursor.high, self.cursor.holes, self._batch)
        d = self._read(reader)

        def got(rows: list[FollowedRow]) -> None:
            self.polls += 1
            now = self._reactor.seconds()
            new = set(self.cursor.seen([r.id for r in rows], now))
            self.cursor.expire(now)
            foreign = [r for r in rows if r.id in new and r.instance != self._instance]
            if foreign:
                self.foreign_rows += len(foreign)
                try:
                    self._deliver(foreign)
                except Exception:
                    _log.failure("ledger: handing other instances' rows on failed")
            if len(rows) >= self._batch and self.running:
                self._read_more(counted + len(foreign), done)  # more waiting: read on at once
            else:
                self._finish(done, counted + len(foreign))

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
