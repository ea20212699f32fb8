"""
The change feed: what other instances changed, delivered to this one within
L{POLL_INTERVAL} seconds.

A writer of shared state adds a C{changes} row in the same transaction as
its change (L{cllama_tx.store.shared.record_change}, or L{ChangeFeed.publish}
for changes that live outside the store, such as a reload).  Every instance
polls the rows after its cursor written by others and calls the handlers
subscribed to their kind with their subject, which re-read what they name.

PostgreSQL hands out serial ids at insert time, so a row with a smaller id
can become visible after a larger one: the ids skipped over are kept as
holes and asked for again (L{cllama_tx.store.id_cursor}), and each change
is delivered once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.store.id_cursor import IdCursor
from cllama_tx.store.shared import CHANGE_KINDS, record_change

__all__ = ["ChangeFeed"]

log = Logger(namespace="cllama_tx.changes")

POLL_INTERVAL = 0.5
# A writer's transaction commits within seconds of taking its id.
HOLE_PATIENCE = 30.0


class ChangeFeed(service.Service):
    """Polls the C{changes} table and calls the subscribed handlers."""

    name = "changes"

    def __init__(self, database, reactor, instance: str, interval: float = POLL_INTERVAL) -> None:
        self.database = database
        self._reactor = reactor
        self.instance = instance
        self._interval = interval
        self._handlers: dict[str, list[Callable[[str | None], Any]]] = {}
        self._cursor: IdCursor | None = None
        self._loop: task.LoopingCall | None = None
        self._polling: defer.Deferred | None = None

    def subscribe(self, kind: str, handler: Callable[[str | None], Any]) -> None:
        """C{handler(subject)} for every change of C{kind} made by another instance."""
        if kind not in CHANGE_KINDS:
            raise ValueError(f"unknown change kind {kind!r}")
        self._handlers.setdefault(kind, []).append(handler)

    def publish(self, kind: str, subject: str | None = None) -> defer.Deferred:
        """Tell the other instances about a change that is not itself in the store."""
        now = self._reactor.seconds()
        return self.database.run(record_change, self.instance, kind, subject, now)

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self.poll)
        self._loop.clock = self._reactor
        self._loop.start(self._interval, now=True)

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        return self._polling

    def poll(self) -> defer.Deferred:
        """Read and dispatch what is new; fires when the handlers were called."""
        if self._polling is not None:
            return self._polling
        now = self._reactor.seconds()
        cursor = self._cursor
        if cursor is None:
            d = self._polling = self.database.run(_read, None, [])
        else:
            cursor.expire(now)
            d = self._polling = self.database.run(_read, cursor.high, cursor.holes)

        def read(result):
            self._polling = None
            high, rows = result
            if self._cursor is None:
                # The first read only finds where the feed is.
                self._cursor = IdCursor(high, patience=HOLE_PATIENCE)
                return None
            new = set(self._cursor.seen([r[0] for r in rows], now))
            for row_id, writer, kind, subject in sorted(rows):
                if writer == self.instance or row_id not in new:
                    continue
                new.discard(row_id)
                for handler in self._handlers.get(kind, ()):
                    try:
                        result = handler(subject)
                    except Exception:
                        log.failure("applying a change ({kind}) failed", kind=kind)
                        continue
                    if isinstance(result, defer.Deferred):
                        result.addErrback(_log_failure, kind)
            return None

        def failed(failure):
            self._polling = None
            if not failure.check(DatabaseUnavailable):
                log.failure("reading the change feed failed", failure)

        return d.addCallbacks(read, failed)


def _log_failure(failure, kind: str) -> None:
    log.failure("applying a change ({kind}) failed", failure, kind=kind)


def _read(tx, cursor: int | None, holes: list[int]):
    if cursor is None:
        return int(tx.execute("SELECT COALESCE(MAX(id), 0) FROM changes").fetchone()[0]), []
    rows = tx.execute(
        "SELECT id, instance, kind, subject FROM changes WHERE id > ? ORDER BY id LIMIT 5000", (cursor,)
    ).fetchall()
    if holes:
        marks = ", ".join("?" for _ in holes[:500])
        rows = list(rows) + list(tx.execute(
            f"SELECT id, instance, kind, subject FROM changes WHERE id IN ({marks})", tuple(holes[:500])
        ).fetchall())
    return cursor, [tuple(r) for r in rows]
