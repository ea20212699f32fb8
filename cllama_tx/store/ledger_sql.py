"""
The ledger's SQL, written once for SQLite and PostgreSQL: the row's
columns and parameters, the aggregates that rebuild the totals, pruning
into rollups, the spend and timeline reads, the budget override rows.

Statements use C{?} and C{:name} placeholders (PostgreSQL's are converted
by L{cllama_tx.store.database.postgres_sql}).  Where the two dialects
differ (a day's number: SQLite's C{CAST} truncates, PostgreSQL's rounds;
SQLite's planner hints), the statement is built for a C{dialect}
(L{SQLITE} or L{POSTGRESQL}, as a transaction's C{dialect} says).

The readers take a connection-like C{conn} (C{conn.execute(sql, params)}
returns a cursor): a SQLite connection or a PostgreSQL transaction.  Pure
apart from that: no connection is opened here.
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import operator
from collections.abc import Callable, Iterable
from typing import Any

from cllama_tx.store.records import LedgerRow
from cllama_tx.store.shared import record_change
from cllama_tx.store.totals import (
    BUCKET_FIELDS,
    SECONDS_PER_DAY,
    Bucket,
    Totals,
    day_string,
    money,
    summarise,
    text_or_none,
)

__all__ = [
    "DEFAULT_BACKLOG",
    "MAX_READ_LIMIT",
    "NOT_KEPT",
    "POSTGRESQL",
    "PRUNE_INTERVAL",
    "ROW_FIELDS",
    "SQLITE",
    "TIMELINE_BUCKET",
    "LedgerClosed",
    "LedgerSchemaError",
    "TimelineEntry",
]

SQLITE = "sqlite"
POSTGRESQL = "postgresql"

NOT_KEPT = "not_kept"
"""
What C{record()} fires with for a row it did not keep: the storage is
failing, the backlog is full, and the row is of a request that never reached
a provider (it costs nothing; its audit line is its record).
"""

DEFAULT_BACKLOG = 10000
"""Rows held in memory at most while the storage refuses them (about 1 KiB each)."""

PRUNE_INTERVAL = 3600.0
"""Seconds between two retention prunes."""

MAX_READ_LIMIT = 10000
"""Upper bound of C{limit} in C{recent()}, C{rows_after()} and C{rows_between()}."""

TIMELINE_BUCKET = 60
"""Seconds per entry of C{spend_timeline()} (one minute)."""


class LedgerClosed(Exception):
    """The ledger is not running: it was never started, or is closing."""


class LedgerSchemaError(Exception):
    """The database was written by a newer cllama_tx, or is not a ledger."""


# --- rows -------------------------------------------------------------------

ROW_FIELDS = (
    "request_id",
    "ts",
    "agent",
    "provider",
    "requested_model",
    "effective_model",
    "status",
    "stream",
    "latency_ms",
    "ttfb_ms",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost_usd",
    "priced",
    "estimated",
    "key_id",
    "team_id",
    "user_id",
    "organization_id",
    "end_user",
    "response_id",
    "path",
    "request_bytes",
    "response_bytes",
)
TEXT_FIELDS = frozenset(
    {"agent", "provider", "requested_model", "effective_model", "key_id", "team_id", "user_id",
     "organization_id", "end_user", "response_id", "path"}
)
BOOL_FIELDS = frozenset({"stream", "priced", "estimated"})
_SELECT_ROW = f"id, {', '.join(ROW_FIELDS)}"

INSERT = "INSERT INTO requests ({}, instance) VALUES ({}, ?)".format(
    ", ".join(ROW_FIELDS), ", ".join("?" for _ in ROW_FIELDS)
)
# A held row may already be stored (a commit reported as failed can have
# reached the database): then it is taken as written, not counted twice.
INSERT_AGAIN = INSERT + " ON CONFLICT (request_id) DO NOTHING"


_ROW_VALUES = operator.attrgetter(*ROW_FIELDS)
_TEXT_AT = tuple(i for i, name in enumerate(ROW_FIELDS) if name in TEXT_FIELDS)
_BOOL_AT = tuple(i for i, name in enumerate(ROW_FIELDS) if name in BOOL_FIELDS)


def row_params(row: LedgerRow, instance: str | None) -> tuple[Any, ...]:
    """
    The parameters of L{INSERT}: the row's columns (empty text as NULL,
    booleans as 0 and 1), then the writing instance.  Read in one call
    and fixed by position: this runs once per request.
    """
    out = list(_ROW_VALUES(row))
    for i in _TEXT_AT:
        if not out[i]:
            out[i] = None
    for i in _BOOL_AT:
        out[i] = 1 if out[i] else 0
    out.append(instance)
    return tuple(out)


def row_dict(names: list[str], values: Iterable[Any]) -> dict[str, Any]:
    """A stored row as the reads return it: C{id} and the L{LedgerRow} fields, booleans as C{bool}."""
    row = dict(zip(names, values, strict=True))
    for name in BOOL_FIELDS:
        row[name] = bool(row[name])
    return row


def stored_row(values: dict[str, Any]) -> LedgerRow:
    """A L{row_dict} (or a row read with these columns) back as a L{LedgerRow}."""
    return LedgerRow(**{name: values[name] for name in ROW_FIELDS})


def _names(cursor: Any) -> list[str]:
    return [getattr(c, "name", None) or c[0] for c in cursor.description]


def _rows(cursor: Any) -> list[dict[str, Any]]:
    names = _names(cursor)
    return [row_dict(names, values) for values in cursor.fetchall()]


# --- dialects -----------------------------------------------------------------


def _whole(expression: str, dialect: str) -> str:
    """C{expression} truncated toward zero, as an integer (SQLite's CAST truncates; PostgreSQL's rounds)."""
    if dialect == POSTGRESQL:
        return f"CAST(TRUNC({expression}) AS BIGINT)"
    return f"CAST({expression} AS INTEGER)"


def day_number_sql(dialect: str) -> str:
    """A row's UTC day number, as L{cllama_tx.store.totals.day_number} computes it."""
    return _whole("ts / 86400.0", dialect)


def day_sql(dialect: str) -> str:
    """A row's UTC day as C{'YYYY-MM-DD'}."""
    if dialect == POSTGRESQL:
        return "to_char(DATE '1970-01-01' + CAST(TRUNC(ts / 86400.0) AS INTEGER), 'YYYY-MM-DD')"
    return f"date({day_number_sql(dialect)} * 86400, 'unixepoch')"


def bucket_sql(dialect: str, seconds: int) -> str:
    """The start of a row's bucket of C{seconds} (a float of epoch seconds)."""
    return f"{_whole(f'ts / {int(seconds)}', dialect)} * {int(seconds)}.0"


# --- aggregates -----------------------------------------------------------------

ERROR_SQL = "CASE WHEN status < 200 OR status >= 400 THEN 1 ELSE 0 END"
# A row that counts against a request budget: a successful (2xx) turn.
COUNTED_SQL = "CASE WHEN status >= 200 AND status < 300 THEN 1 ELSE 0 END"
COUNTED_UNPRICED_SQL = "CASE WHEN status >= 200 AND status < 300 AND priced = 0 THEN 1 ELSE 0 END"

# The per-group counters of `requests`, in the order of the rollups columns.
ROLLUP_COUNTERS = (
    "requests",
    "priced_requests",
    "unpriced_requests",
    "estimated_requests",
    "errors",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_usd",
)
_AGGREGATE_EXPRESSIONS = (
    "COUNT(*)",
    "SUM(priced)",
    "SUM(1 - priced)",
    "SUM(estimated)",
    f"SUM({ERROR_SQL})",
    "SUM(input_tokens)",
    "SUM(output_tokens)",
    "SUM(cache_read_tokens)",
    "SUM(cache_write_tokens)",
    "SUM(cost_usd)",
)
AGGREGATES_SQL = ", ".join(_AGGREGATE_EXPRESSIONS)
_AGGREGATES_AS_SQL = ", ".join(
    f"{expression} AS {name}" for expression, name in zip(_AGGREGATE_EXPRESSIONS, ROLLUP_COUNTERS, strict=True)
)
ROLLUP_SUMS_SQL = ", ".join(f"SUM({c})" for c in ROLLUP_COUNTERS)

# Budget counters of a rollup group (not part of Bucket: only the timeline reads them).
_BUDGET_COUNTERS = ("counted_requests", "counted_unpriced_requests")
_BUDGET_AGGREGATES_SQL = f"SUM({COUNTED_SQL}), SUM({COUNTED_UNPRICED_SQL})"


def bucket_from(values: Iterable[Any]) -> Bucket:
    """A L{Bucket} from the ten rollup counters (PostgreSQL sums come back as decimals)."""
    v = [x or 0 for x in values]
    fields: dict[str, Any] = dict(zip(BUCKET_FIELDS, [*(int(x) for x in v[:9]), float(v[9])], strict=True))
    return Bucket(**fields)


# --- pruning -----------------------------------------------------------------------


def prune_statements(dialect: str) -> tuple[str, str]:
    """
    Fold the rows of whole UTC days before C{:day} into C{rollups}, then
    delete them (C{:bound} lets the C{ts} index narrow the scan).  Both run
    in one transaction.
    """
    counters = ROLLUP_COUNTERS + _BUDGET_COUNTERS
    rollup = f"""
INSERT INTO rollups (day, agent, provider, model, key_id, team_id, user_id, {", ".join(counters)})
SELECT {day_sql(dialect)}, COALESCE(agent, ''), COALESCE(provider, ''), COALESCE(effective_model, ''),
       COALESCE(key_id, ''), COALESCE(team_id, ''), COALESCE(user_id, ''), {AGGREGATES_SQL},
       {_BUDGET_AGGREGATES_SQL}
FROM requests
WHERE ts < :bound AND {day_number_sql(dialect)} < :day
GROUP BY 1, 2, 3, 4, 5, 6, 7
ON CONFLICT (day, agent, provider, model, key_id, team_id, user_id) DO UPDATE SET
    {", ".join(f"{c} = rollups.{c} + excluded.{c}" for c in counters)}
"""
    delete = f"DELETE FROM requests WHERE ts < :bound AND {day_number_sql(dialect)} < :day"
    return rollup, delete


def prune_params(older_than_epoch: float) -> dict[str, Any]:
    """The cutoff rounded down to midnight UTC, so no day is split between C{requests} and C{rollups}."""
    day = math.floor(older_than_epoch / SECONDS_PER_DAY)
    return {"day": day, "bound": day * SECONDS_PER_DAY + 1.0}


def prune(conn: Any, dialect: str, params: dict[str, Any]) -> int:
    """Run both pruning statements in the caller's transaction; the number of rows moved."""
    rollup, delete = prune_statements(dialect)
    conn.execute(rollup, params)
    return int(conn.execute(delete, params).rowcount)


# --- totals -------------------------------------------------------------------------


def rebuild_sql(dialect: str) -> str:
    """Per (day, agent, provider, model): the counters of C{requests} and C{rollups} together."""
    return f"""
SELECT day, agent, provider, model, {ROLLUP_SUMS_SQL} FROM (
    SELECT {day_sql(dialect)} AS day, agent, provider, effective_model AS model,
           {_AGGREGATES_AS_SQL}
    FROM requests GROUP BY 1, 2, 3, 4
    UNION ALL
    SELECT day, NULLIF(agent, ''), NULLIF(provider, ''), NULLIF(model, ''),
           {", ".join(ROLLUP_COUNTERS)}
    FROM rollups
) AS everything GROUP BY day, agent, provider, model
"""


def rebuild_totals(conn: Any, dialect: str) -> Totals:
    """The totals of everything stored, with aggregate SQL (not row by row)."""
    totals = Totals()
    for day, agent, provider, model, *counters in conn.execute(rebuild_sql(dialect)).fetchall():
        totals.add_aggregate(day, (agent, provider, model), bucket_from(counters))
    return totals


def highest_id(conn: Any) -> int:
    """The largest row id stored (0 for none)."""
    return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM requests").fetchone()[0])


# --- reads ----------------------------------------------------------------------------


def clamp(limit: int) -> int:
    return max(1, min(int(limit), MAX_READ_LIMIT))


def read_count(conn: Any) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0])


def recent_reader(limit: int, agent: str | None) -> Callable[[Any], list[dict[str, Any]]]:
    limit = clamp(limit)
    sql = f"SELECT {_SELECT_ROW} FROM requests"
    args: tuple[Any, ...] = ()
    if agent is not None:
        sql += " WHERE agent = ?"
        args = (agent,)
    sql += " ORDER BY id DESC LIMIT ?"
    return lambda conn: _rows(conn.execute(sql, args + (limit,)))


def rows_after_reader(cursor: int, limit: int) -> Callable[[Any], tuple[list[dict[str, Any]], int]]:
    limit = clamp(limit)
    sql = f"SELECT {_SELECT_ROW} FROM requests WHERE id > ? ORDER BY id LIMIT ?"

    def read(conn: Any) -> tuple[list[dict[str, Any]], int]:
        rows = _rows(conn.execute(sql, (int(cursor), limit)))
        return rows, (rows[-1]["id"] if rows else int(cursor))

    return read


def cost_reader(key_id: str | None, team_id: str | None) -> Callable[[Any], float]:
    column, value = ("key_id", key_id) if key_id is not None else ("team_id", team_id)
    sql = f"SELECT COALESCE(SUM(cost_usd), 0) FROM requests WHERE {column} = ?"
    return lambda conn: float(conn.execute(sql, (value,)).fetchone()[0])


def rows_between_reader(
    since: float | None, until: float | None, limit: int, team_id: str | None, user_id: str | None,
    key_id: str | None,
) -> Callable[[Any], list[dict[str, Any]]]:
    limit = clamp(limit)
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("team_id", team_id), ("user_id", user_id), ("key_id", key_id)):
        if value is not None:
            where.append(f"{column} = ?")
            args.append(value)
    if since is not None:
        where.append("ts >= ?")
        args.append(float(since))
    if until is not None:
        where.append("ts < ?")
        args.append(float(until))
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    sql = f"SELECT {_SELECT_ROW} FROM requests {clause} ORDER BY id LIMIT ?"
    return lambda conn: _rows(conn.execute(sql, (*args, limit)))


def spend_reader(agent: str | None, since: float | None, until: float | None) -> Callable[[Any], dict[str, Any]]:
    """The read behind C{spend()}; see the ledger's docstring for what it counts."""
    where = ["agent IS NOT NULL"]
    args: list[Any] = []
    rwhere = ["agent != ''"]
    rargs: list[Any] = []
    partial_days: list[str] = []
    if agent is not None:
        where.append("agent = ?")
        args.append(agent)
        rwhere.append("agent = ?")
        rargs.append(agent)
    if since is not None:
        where.append("ts >= ?")
        args.append(since)
        first = math.floor(since / SECONDS_PER_DAY)
        rwhere.append("day >= ?")
        rargs.append(day_string(first))
        if first * SECONDS_PER_DAY < since:
            partial_days.append(day_string(first))
    if until is not None:
        where.append("ts < ?")
        args.append(until)
        last = math.ceil(until / SECONDS_PER_DAY) - 1
        rwhere.append("day <= ?")
        rargs.append(day_string(last))
        if (last + 1) * SECONDS_PER_DAY > until:
            partial_days.append(day_string(last))
    requests_sql = (
        f"SELECT provider, effective_model, {AGGREGATES_SQL} FROM requests "
        f"WHERE {' AND '.join(where)} GROUP BY provider, effective_model"
    )
    rollups_sql = (
        f"SELECT NULLIF(provider, ''), NULLIF(model, ''), {ROLLUP_SUMS_SQL} FROM rollups "
        f"WHERE {' AND '.join(rwhere)} GROUP BY provider, model"
    )
    partial_sql = (
        f"SELECT COUNT(*) FROM rollups WHERE {' AND '.join(rwhere)} "
        f"AND day IN ({', '.join('?' for _ in partial_days)})"
    )

    def read(conn: Any) -> dict[str, Any]:
        models: dict[tuple[str | None, str | None], Bucket] = {}
        for sql, sql_args in ((requests_sql, args), (rollups_sql, rargs)):
            for provider, model, *counters in conn.execute(sql, sql_args).fetchall():
                models.setdefault((provider, model), Bucket()).add_bucket(bucket_from(counters))
        exact = True
        if partial_days:
            exact = conn.execute(partial_sql, rargs + partial_days).fetchone()[0] == 0
        result = summarise(models)
        result.update(agent=agent, since=since, until=until, exact=exact)
        return result

    return read


# --- budget seeding -----------------------------------------------------------------

TimelineEntry = tuple[str, float, float, int, int]
"""C{(agent, bucket_start_ts, cost_usd, counted_requests, unpriced_requests)}."""

_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()
_LAST_DAY = datetime.date.max.toordinal() - _EPOCH_ORDINAL


def _day_start(day: str) -> float:
    """Epoch seconds of midnight UTC starting C{'YYYY-MM-DD'}."""
    return (datetime.date.fromisoformat(day).toordinal() - _EPOCH_ORDINAL) * SECONDS_PER_DAY


def _entry(values: Iterable[Any]) -> TimelineEntry:
    scope, ts, cost, counted, unpriced = values
    return (scope, float(ts), money(float(cost or 0.0)), int(counted or 0), int(unpriced or 0))


def timeline_arguments(since: float, bucket_seconds: int) -> tuple[float, int]:
    """C{since} and C{bucket_seconds} checked (C{ValueError} says what is wrong)."""
    if isinstance(since, bool) or not isinstance(since, (int, float)) or not math.isfinite(since):
        raise ValueError(f"since must be a finite number of epoch seconds, not {since!r}")
    bucket = bucket_seconds
    if isinstance(bucket, bool) or not isinstance(bucket, int) or not 1 <= bucket <= 86400:
        raise ValueError(f"bucket_seconds must be a whole number from 1 to 86400, not {bucket_seconds!r}")
    return float(since), bucket_seconds


def timeline_reader(
    dialect: str, since: float, resets: dict[str, float], bucket: int
) -> Callable[[Any], list[TimelineEntry]]:
    """
    The read behind C{spend_timeline()}: every entry it returns has
    C{ts >= since} and C{ts >= resets[agent]}.
    """
    sqlite = dialect == SQLITE
    # SQLite: "+agent" keeps the planner off the agent index (which would
    # read every row whatever `since`); PostgreSQL has no such hint.
    agent = "+agent" if sqlite else "agent"
    # Only the resets that cut into the range filter anything.  A CASE, not
    # a chain of ANDs or a join: flat (no expression depth limit) and the
    # cheapest of the three on a month of rows.
    cuts = sorted((name, at) for name, at in resets.items() if at > since)
    where = ["ts >= ?", f"{agent} IS NOT NULL"]
    args: list[Any] = [since]
    if cuts:
        where.append(f"ts >= CASE {agent} {' '.join('WHEN ? THEN ?' for _ in cuts)} ELSE ? END")
        for name, at in cuts:
            args.extend((name, at))
        args.append(since)
    # Grouped by bucket first, then agent (the same groups as "agent,
    # bucket"): on SQLite the rows come from the ts index in ts order, which
    # keeps the GROUP BY's temporary b-tree cheap.
    start = bucket_sql(dialect, bucket)
    cost = "ROUND(SUM(cost_usd), 10)" if sqlite else "SUM(cost_usd)"
    requests_sql = (
        f"SELECT agent, {start}, {cost}, SUM({COUNTED_SQL}), SUM({COUNTED_UNPRICED_SQL}) "
        f"FROM requests WHERE {' AND '.join(where)} "
        f"GROUP BY {_whole(f'ts / {bucket}', dialect)}, {agent} "
        f"HAVING SUM(cost_usd) != 0 OR SUM({COUNTED_SQL}) > 0"
    )
    first_day = day_string(min(max(math.ceil(since / SECONDS_PER_DAY), 0), _LAST_DAY))
    rollups_sql = (
        "SELECT agent, day, SUM(cost_usd), SUM(counted_requests), SUM(counted_unpriced_requests) "
        "FROM rollups WHERE agent != '' AND day >= ? GROUP BY agent, day"
    )

    def read(conn: Any) -> list[TimelineEntry]:
        found = conn.execute(requests_sql, args).fetchall()
        # SQLite's rows are the right types already (a month is 900,000 entries).
        entries: list[TimelineEntry] = found if sqlite else [_entry(values) for values in found]
        days = []
        for name, day, day_cost, counted, unpriced in conn.execute(rollups_sql, (first_day,)).fetchall():
            day_start = _day_start(day)
            # A rolled-up day cannot be split: one that began before the cut is left out.
            if (day_cost or counted) and day_start >= since and day_start >= resets.get(name, day_start):
                days.append(_entry((name, day_start, day_cost, counted, unpriced)))
        entries.extend(days)
        entries.sort()  # by agent, then time (about 0.2 s for 900 000 entries)
        if not days:
            return entries
        # A late row of a rolled-up day may share the day's first bucket: one entry each.
        merged: list[TimelineEntry] = []
        for entry in entries:
            if merged and merged[-1][:2] == entry[:2]:
                last = merged[-1]
                merged[-1] = (
                    last[0], last[1], money(last[2] + entry[2]), last[3] + entry[3], last[4] + entry[4]
                )
            else:
                merged.append(entry)
        return merged

    return read


SCOPE_COLUMNS = ("key_id", "team_id")


def scope_timeline_reader(dialect: str, column: str, since: float, bucket: int) -> Callable[[Any], list[tuple]]:
    """The read behind C{scope_timeline()}: spend per virtual key or team and bucket, sorted."""
    if column not in SCOPE_COLUMNS:
        raise ValueError(f"no timeline by {column!r}")
    start = bucket_sql(dialect, bucket)
    sql = (
        f"SELECT {column}, {start}, SUM(cost_usd), SUM({COUNTED_SQL}), SUM({COUNTED_UNPRICED_SQL}) "
        f"FROM requests WHERE {column} IS NOT NULL AND ts >= ? "
        f"GROUP BY {column}, {_whole(f'ts / {bucket}', dialect)} ORDER BY 1, 2"
    )
    return lambda conn: [_entry(values) for values in conn.execute(sql, (float(since),)).fetchall()]


def held_buckets(
    rows: Iterable[LedgerRow], scope: Callable[[LedgerRow], str | None], since: float,
    resets: dict[str, float], bucket: int,
) -> dict[tuple[str, float], list]:
    """Held rows (not in SQL yet) per C{(scope, bucket_ts)}, counted as the timeline SQL counts."""
    out: dict[tuple[str, float], list] = {}
    for row in rows:
        value = text_or_none(scope(row))
        if value is None or row.ts < since or row.ts < resets.get(value, since):
            continue
        counted = 200 <= row.status < 300
        acc = out.setdefault((value, float(int(row.ts / bucket) * bucket)), [0.0, 0, 0])
        acc[0] += row.cost_usd
        acc[1] += 1 if counted else 0
        acc[2] += 1 if counted and not row.priced else 0
    return out


def merge_timeline(entries: list[tuple], held: dict[tuple[str, float], list]) -> list[tuple]:
    """C{entries} with the held rows' buckets added: one entry per scope and time, sorted."""
    if not held:
        return entries
    combined = {(e[0], e[1]): [e[2], e[3], e[4]] for e in entries}
    for key, (cost, counted, unpriced) in held.items():
        acc = combined.setdefault(key, [0.0, 0, 0])
        acc[0] += cost
        acc[1] += counted
        acc[2] += unpriced
    return sorted(
        (key[0], key[1], money(v[0]), v[1], v[2]) for key, v in combined.items() if v[0] != 0 or v[1] > 0
    )


# --- budget overrides ----------------------------------------------------------------

_OVERRIDE_COLUMNS = ("agent", "budget_json", "spent_offset_usd", "reset_at", "updated_at", "updated_by")
UPSERT_OVERRIDE = (
    f"INSERT INTO budget_overrides ({', '.join(_OVERRIDE_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (agent) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _OVERRIDE_COLUMNS[1:])
)
DELETE_OVERRIDE = "DELETE FROM budget_overrides WHERE agent = ?"
SELECT_OVERRIDES = f"SELECT {', '.join(_OVERRIDE_COLUMNS)} FROM budget_overrides"


def override_entry(
    budget: dict | None,
    spent_offset_usd: float | None,
    reset_at: float | None,
    updated_at: float,
    updated_by: str | None,
) -> dict[str, Any]:
    return {
        "budget": budget,
        "spent_offset_usd": spent_offset_usd,
        "reset_at": reset_at,
        "updated_at": updated_at,
        "updated_by": updated_by,
    }


def copy_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return dict(entry, budget=copy.deepcopy(entry["budget"]))


def encode_budget(budget: dict) -> str:
    return json.dumps(budget, sort_keys=True, separators=(",", ":"), allow_nan=False)


def override_row(agent: str, entry: dict[str, Any]) -> tuple[Any, ...]:
    budget = entry["budget"]
    return (
        agent,
        None if budget is None else encode_budget(budget),
        entry["spent_offset_usd"],
        entry["reset_at"],
        entry["updated_at"],
        entry["updated_by"],
    )


def override_from_row(where: str, row: Iterable[Any]) -> tuple[str, dict[str, Any]]:
    """An override row read back; C{where} names the database in the error."""
    agent, budget_json, offset, reset_at, updated_at, updated_by = row
    budget = None
    if budget_json is not None:
        try:
            budget = json.loads(budget_json)
        except ValueError:
            budget = None
        if not isinstance(budget, dict):
            # Fail closed: an operator's budget that cannot be read must not
            # silently become "no budget".
            raise LedgerSchemaError(f"{where}: the budget override of {agent!r} is not a JSON object")
    return agent, override_entry(
        budget,
        None if offset is None else float(offset),
        None if reset_at is None else float(reset_at),
        float(updated_at),
        updated_by,
    )


def load_overrides(conn: Any, where: str) -> dict[str, dict[str, Any]]:
    return dict(override_from_row(where, row) for row in conn.execute(SELECT_OVERRIDES).fetchall())


def override_reader(agent: str) -> Callable[[Any], tuple[Any, ...] | None]:
    return lambda conn: conn.execute(f"{SELECT_OVERRIDES} WHERE agent = ?", (agent,)).fetchone()


def write_override(conn: Any, agent: str, entry: dict[str, Any] | None, instance: str | None, at: float) -> None:
    """
    In the caller's transaction: the whole override row (L{None}: deleted),
    and a change row so that other instances re-read it.
    """
    if entry is None:
        conn.execute(DELETE_OVERRIDE, (agent,))
    else:
        conn.execute(UPSERT_OVERRIDE, override_row(agent, entry))
    record_change(conn, instance or "", "budget_override", agent, at)


def check_agent(agent: str) -> str:
    if not isinstance(agent, str) or not agent:
        raise ValueError(f"agent must be a non-empty string, not {agent!r}")
    return agent


def check_offset(value: float | None) -> float | None:
    if value is None:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0:
        raise ValueError(f"spent_offset_usd must be a non-negative number, not {value!r}")
    return float(value)


def check_budget(budget: dict | None) -> dict | None:
    """A private copy of C{budget}, JSON types only (C{ValueError} otherwise)."""
    if budget is None:
        return None
    if not isinstance(budget, dict):
        raise ValueError("the budget must be a JSON object (a dict)")
    try:
        return json.loads(encode_budget(budget))
    except (TypeError, ValueError) as e:
        raise ValueError(f"the budget is not JSON-serialisable: {e}") from None
