"""
Admission across instances that share one store: budgets and rate limits
decided as one process would decide them, whatever instance a request
lands on.

Why it is shaped like this:

  - B{The decision stays pure and in memory.}  Each instance keeps its
    budget book and rate windows (L{cllama_tx.governance}); before a
    budgeted or rate-limited request is decided, L{Coordinator.admit} takes
    the locks of its scopes in the store, brings that instance's view of
    those scopes up to date (the rows other instances committed since it
    last looked, the reservations they hold, the requests they admitted in
    the last minute), lets the reactor decide with the current view, writes
    the decision's reservations and rate events, and commits.  One scope's
    admissions are thus serialised across the fleet: N instances admit
    what one would.
  - B{Locks}: PostgreSQL's transaction-scoped advisory locks, one per scope
    (L{cllama_tx.store.shared.lock_names}); the ledger's writers take the
    same locks, so per scope, rows become visible in the order of their
    ids and an id cursor never skips one.  SQLite: the file's write lock
    (C{BEGIN IMMEDIATE}) serialises everything.
  - B{The reactor decides} (L{threads.blockingCallFromThread}): the pool
    thread holding the transaction waits one reactor turn; the reactor
    never waits on the database.
  - B{Reservations end after the row is committed}: a request's reservation
    is deleted once its ledger row is in the store, so in between another
    instance counts both (errs on the safe side), never neither.
  - B{Dead instances}: each instance stamps C{instances.seen_at} every
    second; reservations of an instance not seen for L{DEAD_AFTER} seconds
    are not counted and are deleted (a C{kill -9} holds its in-flight
    requests' money for that long at most).  Clocks of hosts must agree
    within a few seconds (NTP).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger

from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.store.shared import lock_names, new_instance_id, scope_filter

__all__ = ["Coordinator", "Decision", "RateSync", "ScopeSync"]

log = Logger(namespace="cllama_tx.coordination")

HEARTBEAT = 1.0
DEAD_AFTER = 15.0
RATE_WINDOW = 61.0
#: How long the change feed keeps a row (instances read it within a second).
KEEP_CHANGES = 3600.0
#: Old rate events and changes are deleted every this many heartbeats.
PRUNE_EVERY = 30
#: Most rows read for one scope in one admission (a larger backlog is read over several).
MAX_SYNC_ROWS = 50000


@attrs.frozen
class ScopeSync:
    """What other instances did to one budget scope since this one last looked."""

    scope: str
    # (ts, cost_usd, counted, priced) of rows other instances committed
    # (as read: with the row id first; the coordinator strips it).
    rows: tuple
    cursor: int
    foreign_usd: float
    foreign_requests: int


@attrs.frozen
class RateSync:
    """Requests other instances admitted for one rate scope in the last minute, new since the cursor."""

    scope: str
    events: tuple  # (at, tokens); as read, with the event id first
    cursor: int


@attrs.define
class Decision:
    """What the reactor decided: reservations to publish, rate events to add."""

    reservations: list[tuple[str, float]] = attrs.Factory(list)  # (scope, amount_usd)
    rate_events: list[tuple[str, float, int]] = attrs.Factory(list)  # (scope, at, tokens)
    result: Any = None
    # Filled in by the coordinator once written.
    reservation_ids: list[int] = attrs.Factory(list)
    rate_event_ids: list[int] = attrs.Factory(list)


def _scope_filter(scope: str) -> tuple[str, tuple[str, ...]]:
    """The SQL condition and parameters of a budget scope's ledger rows (L{scope_filter})."""
    return scope_filter(scope)


class Coordinator(service.Service):
    """
    The shared admission of one instance.  C{database} is a
    L{cllama_tx.store.postgres.PostgresDatabase} or
    L{cllama_tx.store.sqlite_database.SqliteDatabase}.
    """

    name = "coordinator"

    def __init__(self, database, reactor, instance: str | None = None) -> None:
        self.database = database
        self._reactor = reactor
        self.instance = instance or new_instance_id()
        # scope -> the highest ledger row id already counted (None: from `since`).
        self.cursors: dict[str, int] = {}
        self.rate_cursors: dict[str, int] = {}
        # The ledger's highest id when this instance's book was seeded.
        self.start_cursor = 0
        self._heartbeat: task.LoopingCall | None = None
        self._beats = 0
        self._pending_release: list[int] = []

    # -- life cycle

    def startService(self) -> None:
        super().startService()
        self._heartbeat = task.LoopingCall(self._beat)
        self._heartbeat.clock = self._reactor
        self._heartbeat.start(HEARTBEAT, now=False)

    def stopService(self) -> defer.Deferred:
        super().stopService()
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        d = self.database.run(_leave, self.instance)
        d.addErrback(lambda f: log.warn("could not sign off from the store: {e}", e=f.getErrorMessage()))
        return d

    def register(self) -> defer.Deferred:
        """
        Announce this instance and read the ledger's highest row id: the
        book is seeded after this, so rows up to it are in the seed and
        rows after it are synced (a row in both is counted twice, on the
        safe side; none is missed).
        """
        now = self._reactor.seconds()

        def done(cursor: int) -> int:
            self.start_cursor = cursor
            return cursor

        d = self.database.run(_register, self.instance, socket.gethostname()[:64], now)
        return d.addCallback(done)

    def _beat(self) -> defer.Deferred:
        now = self._reactor.seconds()
        pending, self._pending_release = self._pending_release, []
        self._beats += 1
        prune = self._beats % PRUNE_EVERY == 1
        d = self.database.run(_heartbeat, self.instance, now, pending, prune)

        def failed(failure):
            self._pending_release.extend(pending)
            if not failure.check(DatabaseUnavailable):
                log.failure("store heartbeat failed", failure)

        return d.addErrback(failed)

    # -- admission

    def admit(
        self,
        budget_scopes: dict[str, float],
        rate_scopes: Iterable[str],
        decide: Callable[[list[ScopeSync], list[RateSync]], Decision],
    ) -> defer.Deferred:
        """
        Lock C{budget_scopes} (scope -> the time before which its spend no
        longer counts, e.g. a reset; 0 for none) and C{rate_scopes}, sync
        them, call C{decide(syncs, rate_syncs)} on the reactor thread (it
        applies the syncs to the book and decides, raising to refuse), then
        write what it held.  Fires with the L{Decision}; fails with what
        C{decide} raised (nothing written) or L{DatabaseUnavailable}.
        """
        scopes = {s: (since, self.cursors.get(s, self.start_cursor)) for s, since in budget_scopes.items()}
        rates = {s: self.rate_cursors.get(s, 0) for s in rate_scopes}
        now = self._reactor.seconds()

        def on_reactor(syncs: list[ScopeSync], rate_syncs: list[RateSync]) -> Decision:
            # Another admission of this instance may have absorbed some of
            # these rows meanwhile (it read with the same cursor): keep only
            # what is newer than the cursor now, then move it.
            fresh = []
            for sync in syncs:
                seen = self.cursors.get(sync.scope, self.start_cursor)
                rows = tuple(r[1:] for r in sync.rows if r[0] > seen)
                self.cursors[sync.scope] = max(seen, sync.cursor)
                fresh.append(attrs.evolve(sync, rows=rows))
            fresh_rates = []
            for rate in rate_syncs:
                seen = self.rate_cursors.get(rate.scope, 0)
                events = tuple(e[1:] for e in rate.events if e[0] > seen)
                self.rate_cursors[rate.scope] = max(seen, rate.cursor)
                fresh_rates.append(attrs.evolve(rate, events=events))
            return decide(fresh, fresh_rates)

        def work(tx):
            return _admit(tx, self._reactor, self.instance, now, scopes, rates, on_reactor)

        return self.database.run(work)

    def forget_scope(self, scope: str) -> None:
        """After a reset: read the scope again from its reset time at the next admission."""
        self.cursors[scope] = 0

    def release(self, reservation_ids: list[int], rate_updates: Iterable[tuple[int, int]] = ()) -> defer.Deferred:
        """
        Delete reservations whose rows are committed (and set admitted
        requests' real token counts).  Failures are retried with the next
        heartbeat, so a reservation never outlives its instance's
        C{DEAD_AFTER} by much.
        """
        if not reservation_ids and not rate_updates:
            return defer.succeed(None)
        d = self.database.run(_release, list(reservation_ids), list(rate_updates))

        def failed(failure):
            self._pending_release.extend(reservation_ids)
            if not failure.check(DatabaseUnavailable):
                log.failure("releasing shared reservations failed", failure)

        return d.addErrback(failed)


# -- transactions (on a pool thread)


def _register(tx, instance: str, host: str, now: float) -> int:
    import os

    tx.execute(
        "INSERT INTO instances (instance, host, pid, started_at, seen_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (instance) DO UPDATE SET seen_at = excluded.seen_at",
        (instance, host, os.getpid(), now, now),
    )
    return int(tx.execute("SELECT COALESCE(MAX(id), 0) FROM requests").fetchone()[0])


def _heartbeat(tx, instance: str, now: float, pending: list[int], prune: bool = True) -> None:
    tx.execute("UPDATE instances SET seen_at = ? WHERE instance = ?", (now, instance))
    if pending:
        _delete_ids(tx, pending)
    # Reap instances gone quiet, their reservations, and old rate events.
    dead = [r[0] for r in tx.execute("SELECT instance FROM instances WHERE seen_at < ?", (now - DEAD_AFTER,))]
    for name in dead:
        tx.execute("DELETE FROM reservations WHERE instance = ?", (name,))
        tx.execute("DELETE FROM instances WHERE instance = ?", (name,))
        log.info("instance {name} stopped answering: its reservations are released", name=name)
    if prune:
        tx.execute("DELETE FROM rate_events WHERE at < ?", (now - 2 * RATE_WINDOW,))
        tx.execute("DELETE FROM changes WHERE at < ?", (now - KEEP_CHANGES,))


def _leave(tx, instance: str) -> None:
    tx.execute("DELETE FROM reservations WHERE instance = ?", (instance,))
    tx.execute("DELETE FROM instances WHERE instance = ?", (instance,))


def _delete_ids(tx, ids: list[int]) -> None:
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        tx.execute(f"DELETE FROM reservations WHERE id IN ({', '.join('?' for _ in chunk)})", tuple(chunk))


def _release(tx, ids: list[int], rate_updates: list[tuple[int, int]]) -> None:
    _delete_ids(tx, ids)
    for event_id, tokens in rate_updates:
        tx.execute("UPDATE rate_events SET tokens = ? WHERE id = ?", (tokens, event_id))


def _admit(tx, reactor, instance: str, now: float, scopes: dict, rates: dict, decide) -> Decision:
    tx.advisory_locks(lock_names(list(scopes) + [f"rate:{s}" for s in rates]))
    alive_since = now - DEAD_AFTER
    syncs = []
    for scope, (since, cursor) in sorted(scopes.items()):
        condition, values = _scope_filter(scope)
        rows = tx.execute(
            f"SELECT id, ts, cost_usd, status, priced, instance FROM requests WHERE {condition} AND id > ? "
            "AND ts >= ? ORDER BY id LIMIT ?",
            (*values, cursor, since, MAX_SYNC_ROWS),
        ).fetchall()
        counted = tuple(
            (row_id, ts, cost, 200 <= status < 300, bool(priced))
            for row_id, ts, cost, status, priced, writer in rows
            if writer != instance
        )
        new_cursor = rows[-1][0] if rows else cursor
        usd, count = tx.execute(
            "SELECT COALESCE(SUM(r.amount_usd), 0), COUNT(*) FROM reservations r "
            "JOIN instances i ON i.instance = r.instance "
            "WHERE r.scope = ? AND r.instance <> ? AND i.seen_at >= ?",
            (scope, instance, alive_since),
        ).fetchone()
        syncs.append(ScopeSync(scope, counted, new_cursor, float(usd), int(count)))
    rate_syncs = []
    for scope, cursor in sorted(rates.items()):
        events = tx.execute(
            "SELECT id, at, tokens, instance FROM rate_events WHERE scope = ? AND id > ? AND at >= ? ORDER BY id",
            (scope, cursor, now - RATE_WINDOW),
        ).fetchall()
        foreign = tuple((event_id, at, tokens) for event_id, at, tokens, writer in events if writer != instance)
        rate_syncs.append(RateSync(scope, foreign, events[-1][0] if events else cursor))
    decision = threads.blockingCallFromThread(reactor, decide, syncs, rate_syncs)
    for scope, amount in decision.reservations:
        decision.reservation_ids.append(_insert_id(
            tx, "INSERT INTO reservations (instance, scope, amount_usd, created_at) VALUES (?, ?, ?, ?)",
            (instance, scope, amount, now),
        ))
    for scope, at, tokens in decision.rate_events:
        decision.rate_event_ids.append(_insert_id(
            tx, "INSERT INTO rate_events (instance, scope, at, tokens) VALUES (?, ?, ?, ?)",
            (instance, scope, at, tokens),
        ))
    return decision


def _insert_id(tx, statement: str, params: tuple) -> int:
    if tx.dialect == "sqlite":
        return int(tx.execute(statement, params).lastrowid)
    return int(tx.execute(statement + " RETURNING id", params).fetchone()[0])
