"""
The durable ledger on SQLite: one row per client request in the state
file, written off the reactor thread, plus the in-memory totals the UI and
C{/costs/api} read.  (PostgreSQL: L{cllama_tx.store.pg_ledger}; what both
share: L{cllama_tx.store.ledger_base}, L{cllama_tx.store.ledger_sql},
L{cllama_tx.store.totals}.)

Why it is shaped like this:

  - B{One writer at a time, in record order.}  Rows finished in one
    reactor turn are committed together at the end of that turn, on the
    reactor (group commit: a burst of N finished requests costs one
    commit of tens of microseconds); long writes (operator changes,
    pruning) and C{sync="full"} commits run on the writer thread, and rows
    recorded while it works follow them there.  See L{writer}.
  - B{record() fires after the commit.}  The proxy waits for it before it
    sends the agent the response's last byte: a request the agent saw
    finish is on disk.  WAL with C{synchronous=NORMAL} survives a crash or
    C{kill -9} of the process; C{sync="full"} also survives power loss, at
    one fsync per batch.  See C{docs/LEDGER.md}.
  - B{Totals live in memory} and are updated on the reactor thread the
    moment a row is recorded, so reads are instant.  They are rebuilt at
    start with aggregate SQL over C{requests} and C{rollups}.
  - B{Several workers on one file} (C{shared}): commits as above, the
    reactor's never waiting for another process's lock (the thread does),
    and the rows the other workers commit are read every second and counted
    too (L{cllama_tx.store.follower}), so every worker's totals are the
    host's.
  - B{Reads} (spend views, exports) run in the reactor's threadpool on a
    fresh read-only connection each: WAL lets them run while the writer
    commits, and one read transaction gives each answer a single snapshot.
  - B{Pruning} folds old rows into per-day C{rollups} in one transaction on
    the writer thread, so totals never change because of retention.
  - B{Budgets} (CONTRACT 6): C{spend_timeline} aggregates committed spend
    per agent and minute (rolled-up days as one entry each) to seed the
    budget book at start; operator overrides and resets live in memory and
    in C{budget_overrides}, written through the same writer thread.

Row semantics (also in C{docs/LEDGER.md}):

  - an B{error} is a row whose status is not 2xx/3xx (C{status < 200 or
    status >= 400}, so a status of 0 for "no response" is an error);
  - a row is B{metered} when its agent, provider and effective model are
    all known: only metered rows appear in C{costs_api()} (the contract's
    record of requests that reached a provider).  C{period()} and
    C{spend()} count every row of a known agent, those that never reached
    a provider as L{UNROUTED}.  Rows refused before identification (agent
    L{None}) are counted in L{Totals.requests}, L{Totals.errors} and
    L{Totals.unidentified_requests} only;
  - the token columns are disjoint: C{input_tokens} is plain input, the
    cache reads and writes are apart, C{prompt_tokens} is the three summed;
  - empty strings in the text columns are stored as NULL (SQL C{NULL}).
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any

from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cllama_tx.interfaces import ILedger
from cllama_tx.store import ledger_sql as sql
from cllama_tx.store import spend_reports
from cllama_tx.store.ledger_base import LedgerBase, SeedData
from cllama_tx.store.ledger_sql import (
    DEFAULT_BACKLOG,
    MAX_READ_LIMIT,
    NOT_KEPT,
    PRUNE_INTERVAL,
    SQLITE,
    TIMELINE_BUCKET,
    LedgerClosed,
    LedgerSchemaError,
    TimelineEntry,
)
from cllama_tx.store.records import LedgerRow
from cllama_tx.store.row_journal import RowJournal, journal_path, read_journal
from cllama_tx.store.shared import SQLITE_COORDINATION_SCHEMA, new_instance_id
from cllama_tx.store.spill import SpillError, read_spill, remove_spill, spill_path, write_spill
from cllama_tx.store.sqlite_tx import transaction as _transaction
from cllama_tx.store.totals import (
    SPEND_COUNTS,
    UNROUTED,
    Bucket,
    Totals,
    day_number,
    day_string,
    is_metered,
    pricing_status,
    summarise,
    text_or_none,
    utc_day,
)
from cllama_tx.store.writer import HELD, WAL_RESET_BYTES, Call, Row, Writer, open_inline

__all__ = [
    "DEFAULT_BACKLOG",
    "HELD",
    "MAX_READ_LIMIT",
    "NOT_KEPT",
    "PRUNE_INTERVAL",
    "SCHEMA_VERSION",
    "SPEND_COUNTS",
    "TIMELINE_BUCKET",
    "UNROUTED",
    "Bucket",
    "LedgerClosed",
    "LedgerSchemaError",
    "SqliteLedger",
    "Totals",
    "day_number",
    "day_string",
    "pricing_status",
    "summarise",
    "utc_day",
]

SCHEMA_VERSION = 6
"""The version written to C{meta}; a newer one in the file refuses to start.

1: C{requests}, C{rollups}.  2: C{rollups.counted_requests} and
C{rollups.counted_unpriced_requests} (budget seeding), C{budget_overrides}.
3: C{input_tokens} is plain input, without the cache tokens (versions 1
and 2 stored every prompt token there, so the views counted the cache
twice); older rows and rollups are converted.  4: C{requests.instance}
(which process wrote the row), key and team indexes, and the coordination
tables of several processes on one file.  5: C{requests.organization_id},
C{end_user} (LiteLLM's customer, the request's C{user}) and C{response_id}
(the answer's C{id}), for the budgets and spend logs of the key API.  6:
C{requests.path}, C{request_bytes} and C{response_bytes}, the passthrough's
requests (C{/_proxy/<provider>/<path>}, docs/LEDGER.md)."""

DIR_MODE = 0o700
FILE_MODE = 0o600

_SYNC_MODES = {"normal": "NORMAL", "full": "FULL"}

_log = Logger(namespace="cllama_tx.ledger")


# --- schema -----------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    ts REAL NOT NULL,
    agent TEXT,
    provider TEXT,
    requested_model TEXT,
    effective_model TEXT,
    status INTEGER NOT NULL,
    stream INTEGER NOT NULL,
    latency_ms REAL NOT NULL,
    ttfb_ms REAL,
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    priced INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    key_id TEXT,
    team_id TEXT,
    user_id TEXT,
    instance TEXT,
    organization_id TEXT,
    end_user TEXT,
    response_id TEXT,
    path TEXT,
    request_bytes INTEGER,
    response_bytes INTEGER
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
CREATE INDEX IF NOT EXISTS requests_user ON requests (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_organization ON requests (organization_id) WHERE organization_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_end_user ON requests (end_user) WHERE end_user IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_response ON requests (response_id) WHERE response_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_agent ON requests (agent);
CREATE INDEX IF NOT EXISTS requests_key ON requests (key_id) WHERE key_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_team ON requests (team_id) WHERE team_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS rollups (
    day TEXT NOT NULL,
    agent TEXT NOT NULL DEFAULT '',
    provider TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    key_id TEXT NOT NULL DEFAULT '',
    team_id TEXT NOT NULL DEFAULT '',
    user_id TEXT NOT NULL DEFAULT '',
    requests INTEGER NOT NULL,
    priced_requests INTEGER NOT NULL,
    unpriced_requests INTEGER NOT NULL,
    estimated_requests INTEGER NOT NULL,
    errors INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cache_read_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    counted_requests INTEGER NOT NULL DEFAULT 0,
    counted_unpriced_requests INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (day, agent, provider, model, key_id, team_id, user_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS budget_overrides (
    agent TEXT PRIMARY KEY,
    budget_json TEXT,
    spent_offset_usd REAL,
    reset_at REAL,
    updated_at REAL NOT NULL,
    updated_by TEXT
);
""" + SQLITE_COORDINATION_SCHEMA

# Migrations from version N to N+1, run in the same transaction as the
# version bump (so a failed step leaves the file at version N).
_MIGRATIONS: dict[int, str] = {
    # 1 -> 2: budget seeding and runtime budget overrides.  Rollups written
    # by version 1 did not count 2xx rows apart: every non-error row (2xx or
    # 3xx; the proxy answers no 3xx) is taken as counted, and its unpriced
    # part is bounded by the unpriced rows of the group (docs/LEDGER.md).
    1: """
ALTER TABLE rollups ADD COLUMN counted_requests INTEGER NOT NULL DEFAULT 0;
ALTER TABLE rollups ADD COLUMN counted_unpriced_requests INTEGER NOT NULL DEFAULT 0;
UPDATE rollups SET
    counted_requests = requests - errors,
    counted_unpriced_requests = MIN(unpriced_requests, requests - errors);
CREATE TABLE IF NOT EXISTS budget_overrides (
    agent TEXT PRIMARY KEY,
    budget_json TEXT,
    spent_offset_usd REAL,
    reset_at REAL,
    updated_at REAL NOT NULL,
    updated_by TEXT
);
""",
    # 2 -> 3: versions 1 and 2 stored every prompt token in input_tokens
    # (plain input plus cache reads and writes) while every reader took it
    # for plain input; the cache part is taken out, so the four token
    # columns are disjoint.  Every such row has input_tokens >= the cache
    # tokens; a row that has not was not written that way and is left as it is.
    2: """
UPDATE requests SET input_tokens = input_tokens - cache_read_tokens - cache_write_tokens
WHERE input_tokens >= cache_read_tokens + cache_write_tokens
  AND cache_read_tokens + cache_write_tokens > 0;
UPDATE rollups SET input_tokens = input_tokens - cache_read_tokens - cache_write_tokens
WHERE input_tokens >= cache_read_tokens + cache_write_tokens
  AND cache_read_tokens + cache_write_tokens > 0;
""",
    # 3 -> 4: several processes on one file (workers): which instance wrote
    # a row (rows of earlier versions have none), indexes for the budget
    # coordinator's per-key and per-team reads, and the coordination tables.
    3: """
ALTER TABLE requests ADD COLUMN instance TEXT;
CREATE INDEX IF NOT EXISTS requests_key ON requests (key_id) WHERE key_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_team ON requests (team_id) WHERE team_id IS NOT NULL;
""" + SQLITE_COORDINATION_SCHEMA,
    # 4 -> 5: who else a row is billed to, as LiteLLM's spend logs say it
    # (organisation, customer), and the answer's id, to find a row by it.
    4: """
ALTER TABLE requests ADD COLUMN organization_id TEXT;
ALTER TABLE requests ADD COLUMN end_user TEXT;
ALTER TABLE requests ADD COLUMN response_id TEXT;
CREATE INDEX IF NOT EXISTS requests_user ON requests (user_id) WHERE user_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_organization ON requests (organization_id) WHERE organization_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_end_user ON requests (end_user) WHERE end_user IS NOT NULL;
CREATE INDEX IF NOT EXISTS requests_response ON requests (response_id) WHERE response_id IS NOT NULL;
""",
    # 5 -> 6: the passthrough's requests, which no surface shapes: the
    # provider-native path and the bytes that went each way.
    5: """
ALTER TABLE requests ADD COLUMN path TEXT;
ALTER TABLE requests ADD COLUMN request_bytes INTEGER;
ALTER TABLE requests ADD COLUMN response_bytes INTEGER;
""",
}



def _open_database(path: str, sync: str) -> sqlite3.Connection:
    """
    The writer's connection: state directory 0700 and file 0600 when we
    create them, WAL, the chosen C{synchronous}, schema created or checked.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
        os.chmod(directory, DIR_MODE)  # makedirs' mode is filtered by the umask
    if not os.path.exists(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        os.close(fd)
        os.chmod(path, FILE_MODE)
    # -wal and -shm are created by SQLite with the main file's permissions.
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise LedgerSchemaError(f"{path}: cannot use WAL mode (journal_mode is {mode})")
        conn.execute(f"PRAGMA synchronous = {_SYNC_MODES[sync]}")
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_RESET_BYTES}")
        _migrate(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection, path: str) -> int:
    """Create or upgrade the schema in one transaction; returns the version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        found = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if found is None:
            _execute_script(conn, _SCHEMA)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )
        else:
            try:
                version = int(found[0])
            except ValueError:
                raise LedgerSchemaError(f"{path}: unreadable schema version {found[0]!r}") from None
            if version > SCHEMA_VERSION:
                raise LedgerSchemaError(
                    f"{path}: ledger schema version {version} is newer than this "
                    f"cllama_tx understands ({SCHEMA_VERSION}); refusing to touch it"
                )
            for step in range(version, SCHEMA_VERSION):
                _execute_script(conn, _MIGRATIONS[step])
            if version != SCHEMA_VERSION:
                conn.execute(
                    "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
                )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return SCHEMA_VERSION


def migrate_file(path: str) -> int:
    """Create or upgrade the ledger file at C{path} (C{cllama-tx migrate}); returns its version."""
    conn = _open_database(path, "normal")
    conn.close()
    return SCHEMA_VERSION


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it COMMITs the open transaction first.
    for statement in script.split(";"):
        if not statement.strip():
            continue
        try:
            conn.execute(statement)
        except sqlite3.OperationalError as e:
            # A column a step adds that is there already (a file whose
            # version was set back by hand): the step is done.
            if "ADD COLUMN" not in statement.upper() or "duplicate column name" not in str(e):
                raise


def _run_read(path: str, function: Callable[[sqlite3.Connection], Any]) -> Any:
    """
    Run C{function(connection)} on a fresh read-only connection, in the
    calling thread, inside one read transaction (one snapshot).
    """
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.execute("BEGIN")  # one snapshot for every SELECT below
        try:
            return function(conn)
        finally:
            conn.execute("COMMIT")
    finally:
        conn.close()


def _load_state(conn: sqlite3.Connection, path: str) -> tuple[Totals, int, dict[str, dict[str, Any]]]:
    """At start, in one read snapshot: the totals, the highest row id (the follower's start), the overrides."""
    conn.execute("BEGIN")
    try:
        totals = sql.rebuild_totals(conn, SQLITE)
        high = sql.highest_id(conn)
        overrides = sql.load_overrides(conn, path)
    finally:
        conn.execute("COMMIT")
    return totals, high, overrides


# --- the service --------------------------------------------------------------


@implementer(ILedger)
class SqliteLedger(LedgerBase, service.Service):
    """
    The ledger in a SQLite file at C{path} (WAL).  C{sync} is C{"normal"}
    (survives a process crash) or C{"full"} (also survives power loss, one
    fsync per group commit).  With C{retention_seconds}, rows older than
    that are folded into daily rollups at start and every hour, timed by
    C{clock} (default: C{reactor}).

    Rows the storage refuses (a full disk, I/O errors) are held in memory,
    up to about C{backlog} of them, and committed when it takes them again
    (see L{writer}); rows still held when the ledger closes are saved in
    C{spill_dir} (L{spill}; L{None}: nowhere) and imported at the next start.

    C{shared}: other processes (workers on this host) write the same file:
    a commit that meets their lock goes to the thread, and their rows are
    counted in the totals too.  C{instance} names this process in the rows it writes (a new one
    by default); C{spill_name} tells its spill file from its siblings'.
    """

    dialect = SQLITE

    def __init__(
        self,
        path: str,
        reactor: Any,
        sync: str = "normal",
        retention_seconds: float | None = None,
        clock: Any = None,
        backlog: int = DEFAULT_BACKLOG,
        spill_dir: str | None = None,
        shared: bool = False,
        instance: str | None = None,
        spill_name: str | None = None,
    ) -> None:
        if sync not in _SYNC_MODES:
            raise ValueError(f"sync must be one of {sorted(_SYNC_MODES)}, not {sync!r}")
        if retention_seconds is not None and not retention_seconds > 0:
            raise ValueError("retention_seconds must be positive")
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
            raise ValueError(f"backlog must be a whole number of rows >= 1, not {backlog!r}")
        self._init_base(reactor, clock, instance or new_instance_id())
        self.path = path
        self.sync = sync
        self.shared = shared
        self.retention_seconds = retention_seconds
        self.backlog = backlog
        self.spill_file = None if spill_dir is None else spill_path(spill_dir, spill_name or path)
        self._unkept = 0  # rows not kept since start (see NOT_KEPT)
        self._unkept_now = 0  # ... during the current failure
        self._writer: Writer | None = None
        self._closing: defer.Deferred | None = None
        self._close_waiters: list[defer.Deferred] = []
        self._retention: task.LoopingCall | None = None

    # -- lifecycle

    def startService(self) -> None:
        """
        Open the database, create or check the schema and rebuild the totals,
        synchronously: twistd starts services before it serves anything, and
        a ledger that cannot open must stop the daemon loudly.
        """
        if self._writer is not None or self._closing is not None:
            raise RuntimeError("ledger already started, or still closing")
        conn = _open_database(self.path, self.sync)
        try:
            still_held = self._import_spill(conn)
            still_journaled = self._import_journal(conn)
            if still_journaled is not None:
                rows, error = still_held or ([], still_journaled[1])
                still_held = rows + still_journaled[0], error
            totals, high, overrides = _load_state(conn, self.path)
        except BaseException:
            conn.close()
            raise
        self._totals = totals
        self._loaded_overrides(overrides)
        inline = open_inline(self.path) if self.sync == "normal" else None
        # One process on its file: rows recorded during a WAL reset go to the journal.
        journal = RowJournal(journal_path(self.path)) if inline is not None and not self.shared else None
        spill_file = self.spill_file
        self._writer = writer = Writer(
            conn, self._reactor, self._deliver, sql.INSERT, inline=inline, path=self.path,
            insert_again=sql.INSERT_AGAIN, capacity=self.backlog,
            spill=None if spill_file is None else functools.partial(write_spill, spill_file),
            shared=self.shared, journal=journal,
        )
        writer.on_recovered.append(self._recovered)
        writer.start()
        if still_held:
            # The disk is still full: the saved rows are held again, counted, and retried.
            rows, error = still_held
            for row in rows:
                self._totals.add(row)
            writer._hold([Row(row, sql.row_params(row, self.instance), defer.Deferred()) for row in rows], error)
        service.Service.startService(self)
        if self.shared:
            self._start_following(high, [])
        if self.retention_seconds is not None:
            self._retention = task.LoopingCall(self._prune_expired)
            self._retention.clock = self._clock
            self._retention.start(PRUNE_INTERVAL, now=True)

    def loaded(self) -> defer.Deferred:
        """Fires once the totals and overrides are loaded: at once, after L{startService}."""
        if self._writer is None:
            return defer.fail(LedgerClosed("the ledger is not running"))
        return defer.succeed(None)

    def stopService(self) -> defer.Deferred:
        service.Service.stopService(self)
        return self.close()

    def close(self) -> defer.Deferred:
        """
        Stop taking rows, commit every row already queued, close the
        database and join the writer thread.  Idempotent: every call's
        Deferred fires when the one close is done.
        """
        waiter: defer.Deferred = defer.Deferred()
        if self._writer is None and self._closing is None:
            waiter.callback(None)  # never started, or already closed
            return waiter
        self._close_waiters.append(waiter)
        if self._closing is not None:
            return waiter  # a close is under way
        if self._retention is not None:
            if self._retention.running:
                self._retention.stop()
            self._retention = None
        self._stop_following()
        writer = self._writer
        assert writer is not None
        self._writer = None  # record(), prune() and reads refuse from now on
        closing: defer.Deferred[None] = defer.Deferred()
        self._closing = closing
        writer.stop(closing)

        def done(result: Any) -> None:
            # The thread has delivered its last result and is returning.
            writer.thread.join()
            writer.close_inline()
            self._closing = None
            waiters, self._close_waiters = self._close_waiters, []
            for w in waiters:
                if isinstance(result, Failure):
                    w.errback(result)
                else:
                    w.callback(None)

        closing.addBoth(done)
        return waiter

    def _accepting(self) -> bool:
        return self._writer is not None

    def _where(self) -> str:
        return self.path

    # -- writes

    def record(self, row: LedgerRow) -> defer.Deferred:
        """
        Queue C{row} for the writer and count it in the totals now.  The
        Deferred fires with L{None} once the row is committed, or fails (the
        row is then un-counted) if its commit failed, e.g. a duplicate
        C{request_id}; with L{LedgerClosed} if the ledger is not running.
        Cancelling the Deferred does not un-record the row.

        When the storage refuses the row it fires with L{HELD}: the row is
        counted and kept in memory until it can be written.  With the
        backlog full, a row of a request that never reached a provider is
        not kept (L{NOT_KEPT}, not counted): see L{admission_refusal}.
        """
        writer = self._writer
        if writer is None:
            return defer.fail(LedgerClosed("the ledger is not running"))
        if writer.full and not is_metered(
            (text_or_none(row.agent), text_or_none(row.provider), text_or_none(row.effective_model))
        ):
            self._unkept += 1
            self._unkept_now += 1
            if self._unkept_now == 1:
                _log.warn(
                    "ledger: the backlog is full ({held} rows); rows of requests that never reached a "
                    "provider are not kept until the ledger writes again (their audit lines remain)",
                    held=writer.held,
                )
            return defer.succeed(NOT_KEPT)
        d: defer.Deferred = defer.Deferred()
        self._totals.add(row)
        writer.record(Row(row, sql.row_params(row, self.instance), d))
        return d

    def prune(self, older_than_epoch: float) -> defer.Deferred:
        """
        Fold every row of the UTC days that end at or before
        C{older_than_epoch} (the cutoff is rounded down to midnight UTC, so
        no day is ever split between C{requests} and C{rollups}) into
        C{rollups}, and delete those rows, in one transaction, after every
        row recorded before this call is committed.  Fires with the number
        of rows moved.  The totals do not change.
        """
        params = sql.prune_params(older_than_epoch)
        return self._ordered(lambda conn: sql.prune(conn, SQLITE, params))

    def _prune_expired(self) -> defer.Deferred:
        assert self.retention_seconds is not None
        cutoff = self._clock.seconds() - self.retention_seconds
        d = self.prune(cutoff)

        def pruned(moved: int) -> None:
            if moved:
                _log.info("ledger: folded {moved} rows older than {day} into rollups",
                          moved=moved, day=utc_day(cutoff))

        def failed(failure: Failure) -> None:
            # Swallowed so the LoopingCall keeps running: the next hour retries.
            if not failure.check(LedgerClosed):
                _log.failure("ledger: retention prune failed", failure=failure)

        return d.addCallbacks(pruned, failed)

    def _import_spill(self, conn: sqlite3.Connection) -> tuple[list[LedgerRow], str] | None:
        """
        At start: commit the rows a previous run could not write (its spill
        file), then forget the file.  If the storage still refuses them,
        returns them and the error, to be held again.
        """
        spill_file = self.spill_file
        if spill_file is None:
            return None
        try:
            rows = read_spill(spill_file)
        except (SpillError, OSError) as e:
            _log.error("ledger: not importing the spill file: {error}; it is left for the operator", error=str(e))
            self.spill_file = None  # neither overwritten nor removed by this run
            return None
        if not rows:
            return None
        params = [sql.row_params(r, self.instance) for r in rows]
        try:
            _transaction(conn, lambda c: c.executemany(sql.INSERT_AGAIN, params))
        except sqlite3.Error as e:
            _log.error(
                "ledger: {count} rows saved in {spill} by the last run cannot be written yet: {error}",
                count=len(rows), spill=spill_file, error=str(e),
            )
            return rows, str(e)
        remove_spill(spill_file)
        _log.info("ledger: imported {count} rows saved in {spill} by the last run", count=len(rows), spill=spill_file)
        return None

    def _import_journal(self, conn: sqlite3.Connection) -> tuple[list[LedgerRow], str] | None:
        """
        At start: commit the rows a previous run left in its row journal
        (it stopped while a WAL reset owned the database); those already
        stored are skipped.  If the storage refuses them, returns them and
        the error, to be held (the journal keeps them until they are written).
        """
        path = journal_path(self.path)
        rows, bad = read_journal(path)
        if bad:
            _log.warn("ledger: {bad} lines of {journal} are not rows; skipped", bad=bad, journal=path)
        if rows:
            params = [sql.row_params(r, self.instance) for r in rows]
            try:
                _transaction(conn, lambda c: c.executemany(sql.INSERT_AGAIN, params))
            except sqlite3.Error as e:
                _log.error("ledger: {count} rows of the row journal cannot be written yet: {error}",
                           count=len(rows), error=str(e))
                return rows, str(e)
            _log.info("ledger: committed {count} rows from the row journal", count=len(rows))
        if os.path.exists(path):
            os.truncate(path, 0)
        return None

    def _recovered(self) -> None:
        """Every held row is written: no spill file is needed any more."""
        if self._unkept_now:
            _log.warn(
                "ledger: {count} rows of refused requests were not kept while the backlog was full "
                "(their audit lines remain)",
                count=self._unkept_now,
            )
            self._unkept_now = 0
        if self.spill_file is not None:
            try:
                remove_spill(self.spill_file)
            except OSError as e:
                _log.warn("ledger: could not remove the spill file: {error}", error=str(e))

    # -- storage health and admission

    def health(self) -> dict[str, Any]:
        """
        How the ledger stands: C{state} C{"ok"}, C{"failing"} (rows are
        held: the storage refuses writes) or C{"closed"}; C{pending_rows}
        held now, C{capacity}, the storage's C{error}, C{failing_since}
        (epoch seconds) and C{unkept_rows} since start.
        """
        writer = self._writer
        held = writer.held if writer is not None else 0
        return {
            "state": "closed" if writer is None else ("failing" if held else "ok"),
            "pending_rows": held,
            "capacity": self.backlog,
            "error": writer.last_error if writer is not None and held else None,
            "failing_since": writer.failing_since if writer is not None else None,
            "unkept_rows": self._unkept,
        }

    def admission_refusal(self, budgeted: bool) -> str | None:
        """
        Why a request that will be metered must be refused now, or L{None}.
        While budgets are being seeded (L{hold_admission}), every caller
        is.  While any row is held, a caller with a budget is refused: its
        spend would be counted only in memory.  Once the backlog is full,
        every caller is: nothing more can be held.
        """
        held_for = self._hold_reason()
        if held_for is not None:
            return held_for
        writer = self._writer
        if writer is None or not writer.held:
            return None
        if writer.full:
            return "the ledger cannot write its records and holds as many unwritten ones as it may; try again later"
        if budgeted:
            return "the ledger cannot write its records, so spend against this budget cannot be counted; try again later"
        return None

    def _on_writer(self, function: Callable[[sqlite3.Connection], Any]) -> defer.Deferred:
        """Run C{function(connection)} on the writer thread, after queued rows."""
        writer = self._writer
        if writer is None:
            return defer.fail(LedgerClosed("the ledger is not running"))
        d: defer.Deferred = defer.Deferred()
        writer.call(Call(function, d))
        return d

    def _ordered(self, function: Callable[[Any], Any]) -> defer.Deferred:
        """C{function(connection)} in a write transaction of its own on the writer thread, after queued rows."""
        return self._on_writer(lambda conn: _transaction(conn, function))

    def writer_stats(self) -> dict[str, int]:
        """
        Counters of the writer (for metrics): commits, rows, failed_rows,
        largest_batch, queued; held (rows waiting for the storage),
        recovered (held, then written), unkept (see L{NOT_KEPT}), wal_bytes
        (after the last checkpoint) and wal_resets.
        """
        writer = self._writer
        if writer is None:
            return {
                "commits": 0, "rows": 0, "failed_rows": 0, "largest_batch": 0, "queued": 0,
                "held": 0, "recovered": 0, "unkept": self._unkept, "wal_bytes": 0, "wal_resets": 0,
            }
        return {
            "commits": writer.commits,
            "rows": writer.rows,
            "failed_rows": writer.failed_rows,
            "largest_batch": writer.largest_batch,
            "queued": writer.queued,
            "held": writer.held,
            "recovered": writer.recovered_rows,
            "unkept": self._unkept,
            "wal_bytes": writer.wal_bytes,
            "wal_resets": writer.wal_resets,
        }

    def _deliver(self, results: list) -> None:
        """On the reactor thread: fire the Deferreds of one batch, in order."""
        for deferred, row, failure in results:
            try:
                if failure is None:
                    deferred.callback(None)
                    continue
                if row is not None:
                    self._totals.remove(row)
                    _log.error(
                        "ledger: could not commit request {request_id}: {error}",
                        request_id=row.request_id,
                        error=failure.getErrorMessage(),
                    )
                deferred.errback(failure)
            except defer.AlreadyCalledError:
                pass  # cancelled by its caller; nothing to tell it

    def _held_rows(self) -> Iterable[LedgerRow]:
        writer = self._writer
        if writer is None or not writer.held:
            return ()
        return [item.row for item in writer.backlog]

    # -- reads (threadpool, own connection each)

    def _read(self, function: Callable[[sqlite3.Connection], Any]) -> defer.Deferred:
        if self._writer is None:
            return defer.fail(LedgerClosed("the ledger is not running"))
        return threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), _run_read, self.path, function
        )

    def ready(self) -> defer.Deferred:
        """
        Fires with True when the database answers a trivial query, no row
        is held (the storage takes writes) and admission is not held
        (budgets are seeded), else False.
        """
        if self._writer is None or self._writer.held or self._hold_reason() is not None:
            return defer.succeed(False)
        d = self._read(lambda conn: conn.execute("SELECT COUNT(*) FROM meta").fetchone() is not None)
        return d.addErrback(lambda _: False)

    # -- budgets: seeding (CONTRACT 6)

    def spend_timeline(self, since: float, bucket_seconds: int = TIMELINE_BUCKET) -> list[TimelineEntry]:
        """
        SYNCHRONOUS.  The committed spend of every identified agent from
        C{since} (epoch seconds) on, to seed the budget book at start:
        C{(agent, bucket_start_ts, cost_usd, counted_requests,
        unpriced_requests)} per agent and minute (C{bucket_seconds}),
        aggregated in SQL, sorted by agent then time.

          - C{cost_usd} sums every row of the bucket, whatever its status
            (a stream cut off after usage was billed still cost money);
          - C{counted_requests} are the rows that count against
            C{max_requests}: status 2xx, successful turns;
          - C{unpriced_requests} are the counted rows without a price (the
            book's unknown-cost requests);
          - a bucket with neither cost nor counted requests is left out;
          - rows before the agent's C{reset_at} (L{reset_budget}) are left
            out, as they no longer count against its budget;
          - pruned history comes from C{rollups} as one entry per UTC day,
            at the day's start; a rolled-up day that starts before
            C{since} or before the agent's reset is left out whole.

        Every returned C{ts} is C{>= since} and C{>=} the agent's reset.
        It blocks the calling thread: it is meant to run once, on the
        reactor thread, after L{startService} and before anything is
        served, when nothing else waits for the reactor (a month of 2
        million rows takes about 2 s).  Use L{spend_timeline_async} at any
        other time.

        @raise LedgerClosed: the ledger is not running.
        @raise ValueError: C{since} is not finite, or C{bucket_seconds} is
            not a whole number from 1 to 86400.
        """
        if self._writer is None:
            raise LedgerClosed("the ledger is not running")
        since, bucket = sql.timeline_arguments(since, bucket_seconds)
        resets = self._reset_times()
        entries = _run_read(self.path, sql.timeline_reader(SQLITE, since, resets, bucket))
        return self._with_held(entries, lambda row: row.agent, since, resets, bucket)

    def scope_timeline(self, column: str, since: float, bucket_seconds: int = TIMELINE_BUCKET) -> list[tuple]:
        """
        SYNCHRONOUS, at start (like L{spend_timeline}): the committed spend
        per virtual key (C{column="key_id"}) or team (C{"team_id"}) and
        minute, as C{(scope_value, bucket_ts, cost_usd, counted_requests,
        unpriced_requests)}, to seed key and team budgets.  Rows already
        folded into rollups are not included (rollups keep no key or team).
        """
        reader = sql.scope_timeline_reader(SQLITE, column, float(since), int(bucket_seconds))
        if self._writer is None:
            raise LedgerClosed("the ledger is not running")
        entries = _run_read(self.path, reader)
        return self._with_held(entries, lambda row: getattr(row, column), float(since), {}, int(bucket_seconds))

    def seed_data(self, since: float, bucket_seconds: int = TIMELINE_BUCKET) -> defer.Deferred:
        """
        What the budget book is seeded with (L{LedgerBase.seed_data}).  One
        process on its file: read at once, on the calling thread (at start,
        before anything is served; see L{spend_timeline}), so the Deferred
        has fired on return.  Shared with other processes: off the reactor.
        """
        if self.shared:
            return LedgerBase.seed_data(self, since, bucket_seconds)
        try:
            since, bucket = sql.timeline_arguments(since, bucket_seconds)
            return defer.succeed(SeedData(
                overrides=self.budget_overrides(),
                timeline=self.spend_timeline(since, bucket),
                keys=self.scope_timeline("key_id", 0.0, bucket),
                teams=self.scope_timeline("team_id", 0.0, bucket),
                levels=self._seeded_levels([
                    _run_read(self.path, spend_reports.level_timeline_reader(SQLITE, kind, 0.0, bucket))
                    for kind in spend_reports.LEVEL_KINDS
                ], bucket),
            ))
        except Exception:
            return defer.fail()
