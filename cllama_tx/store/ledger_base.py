"""
What the two ledgers (L{cllama_tx.store.ledger.SqliteLedger} and
L{cllama_tx.store.pg_ledger.PostgresLedger}) share above their storage:
the totals, the reads, the budget overrides kept in memory and written
through the ledger's ordered write path, the admission holds of start-up,
and the rows of other instances counted into the totals.

A ledger supplies four things: C{_read(function)} (C{function(conn)} in one
read snapshot, off the reactor), C{_ordered(function)} (C{function(conn)}
in a write transaction, after every row recorded before it),
C{_held_rows()} (rows recorded but not yet stored) and C{_accepting()}.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from cllama_tx.store import ledger_sql as sql
from cllama_tx.store import spend_reports
from cllama_tx.store.follower import FollowedRow, Follower
from cllama_tx.store.ledger_sql import TIMELINE_BUCKET, LedgerClosed, TimelineEntry
from cllama_tx.store.records import LedgerRow
from cllama_tx.store.totals import Bucket, Key, Totals

__all__ = ["LedgerBase", "SeedData"]

_log = Logger(namespace="cllama_tx.ledger")


@attrs.frozen
class SeedData:
    """What the budget book is seeded with at start (C{seed_data()})."""

    overrides: dict[str, dict[str, Any]]
    timeline: list[TimelineEntry]  # per agent
    keys: list[tuple]  # per virtual key (key_id, ts, cost, counted, unpriced)
    teams: list[tuple]  # per team
    # The levels above a key (users, organisations, customers, members,
    # a key's models): (scope name, ts, cost, counted, unpriced).
    levels: list[tuple] = attrs.Factory(list)


class LedgerBase:
    """The backend-independent half of a ledger (a mixin of the service)."""

    dialect: str
    instance: str
    _reactor: Any
    _clock: Any

    def _init_base(self, reactor: Any, clock: Any, instance: str) -> None:
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self.instance = instance
        self._totals = Totals()
        self._overrides: dict[str, dict[str, Any]] = {}
        # The entries last known to be stored: what memory falls back to
        # when a write fails.
        self._durable: dict[str, dict[str, Any]] = {}
        self._override_writes: dict[str, int] = {}
        self._holds: dict[int, str] = {}
        self._next_hold = 0
        self._follower: Follower | None = None
        #: Called on the reactor with each list of rows other instances
        #: committed (L{FollowedRow}, in id order), after they are counted.
        self.on_foreign_rows: list[Callable[[list[FollowedRow]], None]] = []

    # -- what a backend supplies

    def _read(self, function: Callable[[Any], Any]) -> defer.Deferred:
        raise NotImplementedError

    def _ordered(self, function: Callable[[Any], Any]) -> defer.Deferred:
        raise NotImplementedError

    def _held_rows(self) -> Iterable[LedgerRow]:
        raise NotImplementedError

    def _accepting(self) -> bool:
        raise NotImplementedError

    def _where(self) -> str:
        """The database, as error messages name it (never with a password)."""
        raise NotImplementedError

    # -- totals

    def totals(self) -> Totals:
        """The running totals (kept in memory, rebuilt at start; other instances' rows included)."""
        return self._totals

    # -- admission while starting

    def hold_admission(self, reason: str) -> Callable[[], None]:
        """
        Refuse every metered request with C{reason} (and answer not ready)
        until the returned callable is called: the daemon holds admission
        while budgets are seeded from the ledger.
        """
        self._next_hold += 1
        token = self._next_hold
        self._holds[token] = reason

        def release() -> None:
            self._holds.pop(token, None)

        return release

    def _hold_reason(self) -> str | None:
        return next(iter(self._holds.values()), None)

    # -- other instances' rows

    def follow(self) -> defer.Deferred:
        """
        Read the rows other instances committed now, rather than at the
        next second: fires with how many were counted (0 when the store is
        not shared).
        """
        if self._follower is None:
            return defer.succeed(0)
        return self._follower.poll()

    def _start_following(self, high: int, seen: list[int]) -> None:
        follower = Follower(
            self._read, self.dialect, self.instance, self._reactor, self._count_foreign,
            want_rows=lambda: bool(self.on_foreign_rows),
        )
        self._follower = follower
        follower.start(high, seen)

    def _stop_following(self) -> None:
        if self._follower is not None:
            self._follower.stop()

    def _count_foreign(self, rows: list[FollowedRow] | None, sums: list[tuple[str, Key, Bucket]] | None) -> None:
        """Other instances' rows: whole (when subscribed to), or summed per day and group."""
        for day, key, bucket in sums or ():
            self._totals.add_aggregate(day, key, bucket)
        if rows is None:
            return
        for followed in rows:
            self._totals.add(followed.row)
        for subscriber in list(self.on_foreign_rows):
            try:
                subscriber(rows)
            except Exception:
                _log.failure("ledger: a subscriber of other instances' rows failed")

    def follower_stats(self) -> dict[str, int]:
        """Counters of the follower: C{polls}, C{foreign_rows}, C{holes}, C{given_up}, C{cursor}."""
        follower = self._follower
        if follower is None:
            return {"polls": 0, "foreign_rows": 0, "holes": 0, "given_up": 0, "cursor": 0}
        return {
            "polls": follower.polls,
            "foreign_rows": follower.foreign_rows,
            "holes": len(follower.cursor),
            "given_up": follower.cursor.given_up,
            "cursor": follower.cursor.high,
        }

    # -- reads

    def count(self) -> defer.Deferred:
        """Fires with the number of rows in C{requests} (pruned rows are not counted)."""
        return self._read(sql.read_count)

    def recent(self, limit: int = 50, agent: str | None = None) -> defer.Deferred:
        """
        Fires with the latest C{limit} rows (newest first), optionally of one
        agent, as dicts: C{id} plus every L{LedgerRow} field.
        """
        return self._read(sql.recent_reader(limit, agent))

    def rows_after(self, cursor: int, limit: int = 1000) -> defer.Deferred:
        """
        Fires with C{(rows, next_cursor)}: up to C{limit} rows whose C{id}
        is greater than C{cursor}, oldest first.  Start with cursor 0; pass
        C{next_cursor} back to continue.  Rows pruned before they were read
        are not returned.  (On PostgreSQL an id can become visible after a
        larger one: an export that must not miss a row reads again from a
        cursor a little behind; see C{docs/LEDGER.md}.)
        """
        return self._read(sql.rows_after_reader(cursor, limit))

    def report(self, build: Callable[[str], Callable[[Any], Any]]) -> defer.Deferred:
        """
        Run a read of L{cllama_tx.store.spend_reports} off the reactor:
        C{build(dialect)} makes the reader; fires with what it returns.
        """
        try:
            reader = build(self.dialect)
        except ValueError:
            return defer.fail()
        return self._read(reader)

    def cost_of(self, key_id: str | None = None, team_id: str | None = None) -> defer.Deferred:
        """Fires with the total cost recorded for one virtual key or one team."""
        return self._read(sql.cost_reader(key_id, team_id))

    def rows_between(
        self,
        since: float | None,
        until: float | None,
        limit: int = 1000,
        team_id: str | None = None,
        user_id: str | None = None,
        key_id: str | None = None,
    ) -> defer.Deferred:
        """
        Fires with up to C{limit} rows with C{since <= ts < until} (open
        ends when None), optionally for one team, user or key, oldest first:
        the per-request rows of a billing export (C{GET /spend/logs}).
        """
        return self._read(sql.rows_between_reader(since, until, limit, team_id, user_id, key_id))

    def spend(
        self, agent: str | None = None, since: float | None = None, until: float | None = None
    ) -> defer.Deferred:
        """
        Fires with the spend in C{[since, until)} (epoch seconds, L{None}
        for an open end), of one agent or all, in the shape of
        L{cllama_tx.store.totals.summarise} plus C{agent}, C{since},
        C{until} and C{exact}: every row of a known agent, as
        L{Totals.period} counts them.

        Rows still in C{requests} are counted to the second; pruned history
        comes from C{rollups}, which know only whole UTC days: a rollup day
        that overlaps the period is counted whole, and C{exact} is false
        when such a day lies only partly inside the period.
        """
        return self._read(sql.spend_reader(agent, since, until))

    def spend_timeline_async(self, since: float, bucket_seconds: int = TIMELINE_BUCKET) -> defer.Deferred:
        """
        The committed spend of every identified agent from C{since} on,
        per agent and bucket, off the reactor: fires with the list that
        C{spend_timeline} describes (the held rows' spend included).
        """
        try:
            since, bucket = sql.timeline_arguments(since, bucket_seconds)
        except ValueError:
            return defer.fail()
        resets = self._reset_times()
        d = self._read(sql.timeline_reader(self.dialect, since, resets, bucket))
        return d.addCallback(lambda entries: self._with_held(entries, lambda row: row.agent, since, resets, bucket))

    def scope_timeline_async(
        self, column: str, since: float, bucket_seconds: int = TIMELINE_BUCKET
    ) -> defer.Deferred:
        """C{scope_timeline} off the reactor: fires with the same list."""
        try:
            reader = sql.scope_timeline_reader(self.dialect, column, float(since), int(bucket_seconds))
        except ValueError:
            return defer.fail()
        d = self._read(reader)
        return d.addCallback(
            lambda entries: self._with_held(
                entries, lambda row: getattr(row, column), float(since), {}, int(bucket_seconds)
            )
        )

    def seed_data(self, since: float, bucket_seconds: int = TIMELINE_BUCKET) -> defer.Deferred:
        """
        Everything the budget book is seeded with at start, read in one
        snapshot off the reactor: fires with a L{SeedData} (the overrides
        from memory, the agents' timeline from C{since}, the virtual keys'
        and teams' from the beginning).
        """
        try:
            since, bucket = sql.timeline_arguments(since, bucket_seconds)
        except ValueError:
            return defer.fail()
        resets = self._reset_times()
        agents = sql.timeline_reader(self.dialect, since, resets, bucket)
        keys = sql.scope_timeline_reader(self.dialect, "key_id", 0.0, bucket)
        teams = sql.scope_timeline_reader(self.dialect, "team_id", 0.0, bucket)
        levels = [spend_reports.level_timeline_reader(self.dialect, kind, 0.0, bucket)
                  for kind in spend_reports.LEVEL_KINDS]
        d = self._read(lambda conn: (agents(conn), keys(conn), teams(conn), [read(conn) for read in levels]))
        return d.addCallback(lambda found: self._seed_from(found, since, resets, bucket))

    def _seed_from(self, found: tuple, since: float, resets: dict[str, float], bucket: int) -> SeedData:
        timeline, keys, teams, levels = found
        return SeedData(
            overrides=self.budget_overrides(),
            timeline=self._with_held(timeline, lambda row: row.agent, since, resets, bucket),
            keys=self._with_held(keys, lambda row: row.key_id, 0.0, {}, bucket),
            teams=self._with_held(teams, lambda row: row.team_id, 0.0, {}, bucket),
            levels=self._seeded_levels(levels, bucket),
        )

    def _seeded_levels(self, found: list[list[tuple]], bucket: int) -> list[tuple]:
        """The timelines of L{spend_reports.LEVEL_KINDS} (in that order), with the held rows' share."""
        seeded: list[tuple] = []
        for kind, entries in zip(spend_reports.LEVEL_KINDS, found, strict=True):
            seeded.extend(self._with_held(entries, functools.partial(spend_reports.level_of, kind), 0.0, {}, bucket))
        return seeded

    def _with_held(
        self, entries: list, scope: Callable[[LedgerRow], str | None], since: float, resets: dict[str, float],
        bucket: int,
    ) -> list:
        """The held rows' share of a timeline: spend the database has not got yet is still spend."""
        return sql.merge_timeline(entries, sql.held_buckets(self._held_rows(), scope, since, resets, bucket))

    def _reset_times(self) -> dict[str, float]:
        """Each agent's C{reset_at}, from memory (so a reset not yet committed counts)."""
        return {
            agent: entry["reset_at"]
            for agent, entry in self._overrides.items()
            if entry["reset_at"] is not None
        }

    # -- budgets: runtime overrides (POST /api/budget/<agent>, /api/reset/<agent>)

    def budget_overrides(self) -> dict[str, dict[str, Any]]:
        """
        Every agent's runtime override, from memory (loaded at start, updated
        the moment a change is asked for): copies of C{{"budget": dict |
        None, "spent_offset_usd": float | None, "reset_at": float | None,
        "updated_at": float, "updated_by": str | None}}.
        """
        return {agent: sql.copy_entry(entry) for agent, entry in self._overrides.items()}

    def budget_override(self, agent: str) -> dict[str, Any] | None:
        """One agent's entry of L{budget_overrides}, or L{None}."""
        entry = self._overrides.get(agent)
        return None if entry is None else sql.copy_entry(entry)

    def _loaded_overrides(self, overrides: dict[str, dict[str, Any]]) -> None:
        """At start: the overrides as stored."""
        self._overrides = overrides
        self._durable = {agent: sql.copy_entry(entry) for agent, entry in overrides.items()}
        self._override_writes = {}

    def set_budget_override(
        self, agent: str, budget: dict | None, spent_offset_usd: float | None, actor: str
    ) -> defer.Deferred:
        """
        Set C{agent}'s override budget (a JSON object, stored as given: the
        caller validates it) and/or spent offset; L{None} keeps the previous
        value.  C{reset_at} is kept.  Memory changes now; the Deferred fires
        with a copy of the new entry once it is committed (after every row
        recorded before this call), or fails (memory then goes back to what
        is stored), with L{LedgerClosed} if the ledger is not running.  The
        same transaction adds a change row, so other instances re-read it.

        @raise ValueError: C{agent} is empty, C{spent_offset_usd} is negative
            or not finite, or C{budget} is not a JSON-serialisable object.
        """
        sql.check_agent(agent)
        budget = sql.check_budget(budget)
        offset = sql.check_offset(spent_offset_usd)
        previous = self._overrides.get(agent)
        if previous is not None:
            budget = previous["budget"] if budget is None else budget
            offset = previous["spent_offset_usd"] if offset is None else offset
        reset_at = None if previous is None else previous["reset_at"]
        entry = sql.override_entry(budget, offset, reset_at, self._clock.seconds(), actor)
        return self._write_override(agent, entry)

    def reset_budget(self, agent: str, actor: str) -> defer.Deferred:
        """
        Forget C{agent}'s spend so far: C{reset_at} becomes now, and the
        override's budget and offset are cleared (the policy layers' budget
        applies again).  Rows before C{reset_at} stay in the ledger (costs,
        totals, exports) but no longer count against a budget: the
        timelines skip them, across restarts.  Fires like
        L{set_budget_override}.
        """
        sql.check_agent(agent)
        now = self._clock.seconds()
        return self._write_override(agent, sql.override_entry(None, None, now, now, actor))

    def clear_budget_override(
        self, agent: str, actor: str | None = None, *, forget_reset: bool = False
    ) -> defer.Deferred:
        """
        Drop C{agent}'s override budget and offset.  Its C{reset_at} is kept
        (clearing an override must not bring back spend that was reset),
        unless C{forget_reset}: then the whole entry goes.  Fires with
        L{None} once committed; nothing to clear fires at once.
        """
        sql.check_agent(agent)
        if not self._accepting():
            return defer.fail(LedgerClosed("the ledger is not running"))
        previous = self._overrides.get(agent)
        if previous is None:
            return defer.succeed(None)
        if forget_reset or previous["reset_at"] is None:
            d = self._write_override(agent, None)
        else:
            entry = sql.override_entry(None, None, previous["reset_at"], self._clock.seconds(), actor)
            d = self._write_override(agent, entry)
        return d.addCallback(lambda _: None)

    def _write_override(self, agent: str, entry: dict[str, Any] | None) -> defer.Deferred:
        """
        Put C{entry} (L{None}: delete) in memory now and in the database
        through the ordered write path.  The whole row is written, so the
        last call wins in the database as in memory.
        """
        if not self._accepting():
            return defer.fail(LedgerClosed("the ledger is not running"))
        if entry is None:
            self._overrides.pop(agent, None)
        else:
            self._overrides[agent] = entry
        generation = self._override_writes.get(agent, 0) + 1
        self._override_writes[agent] = generation
        work = functools.partial(
            sql.write_override, agent=agent, entry=entry, instance=self.instance, at=self._clock.seconds()
        )
        d = self._ordered(work)

        def written(_: Any) -> dict[str, Any] | None:
            if entry is None:
                self._durable.pop(agent, None)
                return None
            self._durable[agent] = sql.copy_entry(entry)
            return sql.copy_entry(entry)

        def failed(failure: Failure) -> Failure:
            _log.error(
                "ledger: could not store the budget override of {agent}: {error}",
                agent=agent,
                error=failure.getErrorMessage(),
            )
            if self._override_writes.get(agent) == generation:
                # Nothing later was asked for: memory is what is stored ...
                durable = self._durable.get(agent)
                if durable is None:
                    self._overrides.pop(agent, None)
                else:
                    self._overrides[agent] = sql.copy_entry(durable)
                # ... as far as this instance knows: ask the database too.
                self.reload_override(agent).addErrback(self._reload_failed, agent)
            return failure

        return d.addCallbacks(written, failed)

    def reload_override(self, agent: str) -> defer.Deferred:
        """
        Read C{agent}'s override from the database again (another instance
        changed it: the change feed calls this) and put it in memory,
        unless a change of this instance's own is still on its way there.
        Fires with a copy of the entry in memory afterwards, or L{None}.
        """
        generation = self._override_writes.get(agent, 0)
        where = self._where()

        def reloaded(found: tuple[Any, ...] | None) -> dict[str, Any] | None:
            if self._override_writes.get(agent, 0) == generation:
                if found is None:
                    self._overrides.pop(agent, None)
                    self._durable.pop(agent, None)
                else:
                    entry = sql.override_from_row(where, found)[1]
                    self._overrides[agent] = entry
                    self._durable[agent] = sql.copy_entry(entry)
            return self.budget_override(agent)

        return self._ordered(sql.override_reader(agent)).addCallback(reloaded)

    def _reload_failed(self, failure: Failure, agent: str) -> None:
        if not failure.check(LedgerClosed):
            _log.warn("ledger: could not re-read the budget override of {agent}: {error}", agent=agent,
                      error=failure.getErrorMessage())
