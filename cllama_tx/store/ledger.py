"""
The durable ledger: one SQLite row per client request, written off the
reactor thread, plus the in-memory totals the UI and C{/costs/api} read.

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

import copy
import datetime
import functools
import json
import math
import os
import sqlite3
from collections.abc import Callable, Iterable
from typing import Any, TypeGuard

import attrs
from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cllama_tx.interfaces import ILedger
from cllama_tx.store.records import LedgerRow
from cllama_tx.store.spill import SpillError, read_spill, remove_spill, spill_path, write_spill
from cllama_tx.store.sqlite_tx import transaction as _transaction
from cllama_tx.store.writer import HELD, WAL_RESET_BYTES, Call, Row, Writer, open_inline

__all__ = [
    "HELD",
    "NOT_KEPT",
    "SPEND_COUNTS",
    "UNROUTED",
    "LedgerClosed",
    "LedgerSchemaError",
    "SqliteLedger",
    "Totals",
]

NOT_KEPT = "not_kept"
"""
What C{record()} fires with for a row it did not keep: the storage is
failing, the backlog is full, and the row is of a request that never reached
a provider (it costs nothing; its audit line is its record).
"""

DEFAULT_BACKLOG = 10000
"""Rows held in memory at most while the storage refuses them (about 1 KiB each)."""

SCHEMA_VERSION = 3
"""The version written to C{meta}; a newer one in the file refuses to start.

1: C{requests}, C{rollups}.  2: C{rollups.counted_requests} and
C{rollups.counted_unpriced_requests} (budget seeding), C{budget_overrides}.
3: C{input_tokens} is plain input, without the cache tokens (versions 1
and 2 stored every prompt token there, so the views counted the cache
twice); older rows and rollups are converted."""

PRUNE_INTERVAL = 3600.0
"""Seconds between two retention prunes."""

MAX_READ_LIMIT = 10000
"""Upper bound of C{limit} in L{SqliteLedger.recent} and L{SqliteLedger.rows_after}."""

TIMELINE_BUCKET = 60
"""Seconds per entry of L{SqliteLedger.spend_timeline} (one minute)."""

DIR_MODE = 0o700
FILE_MODE = 0o600
SECONDS_PER_DAY = 86400.0

_SYNC_MODES = {"normal": "NORMAL", "full": "FULL"}

_log = Logger(namespace="cllama_tx.ledger")


class LedgerClosed(Exception):
    """The ledger is not running: it was never started, or is closing."""


class LedgerSchemaError(Exception):
    """The database was written by a newer cllama_tx, or is not a ledger."""


# --- days ------------------------------------------------------------------
#
# A row's day is computed the same way in Python and in SQL, so that the day
# a row is counted under in memory is the day it is rolled up under:
# int(ts / 86400.0) is IEEE division then truncation in both languages.

_DAY_NUMBER_SQL = "CAST(ts / 86400.0 AS INTEGER)"
_DAY_SQL = f"date({_DAY_NUMBER_SQL} * 86400, 'unixepoch')"
_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()


def day_number(ts: float) -> int:
    """The UTC day number (days since 1970-01-01) of epoch seconds C{ts}."""
    return int(ts / SECONDS_PER_DAY)


@functools.lru_cache(maxsize=64)
def day_string(number: int) -> str:
    """C{'YYYY-MM-DD'} of a UTC day number."""
    return datetime.date.fromordinal(_EPOCH_ORDINAL + number).isoformat()


def utc_day(ts: float) -> str:
    """C{'YYYY-MM-DD'}, UTC, of epoch seconds C{ts} (as the SQL computes it)."""
    return day_string(day_number(ts))


def _is_error(status: int) -> bool:
    return status < 200 or status >= 400


def _text(value: str | None) -> str | None:
    """Empty strings are stored and counted as L{None}."""
    return value if value else None


def pricing_status(priced_requests: int, unpriced_requests: int) -> str:
    """C{priced} when no request lacked a price, C{unpriced} when none had one."""
    if unpriced_requests == 0:
        return "priced"
    if priced_requests == 0:
        return "unpriced"
    return "partial"


def _money(value: float) -> float:
    # Hides float noise (0.30000000000000004) and the ulp differences
    # between summing in record order and SQL's order after a restart.
    return round(value, 10)


# --- totals -----------------------------------------------------------------


@attrs.define
class Bucket:
    """Counters of one group of requests (the columns of C{rollups})."""

    requests: int = 0
    priced_requests: int = 0
    unpriced_requests: int = 0
    estimated_requests: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_usd: float = 0.0

    @property
    def prompt_tokens(self) -> int:
        """Every prompt token: plain input plus cache reads and writes."""
        return self.input_tokens + self.cache_read_tokens + self.cache_write_tokens

    def add_row(self, row: LedgerRow, sign: int = 1) -> None:
        self.requests += sign
        if row.priced:
            self.priced_requests += sign
        else:
            self.unpriced_requests += sign
        if row.estimated:
            self.estimated_requests += sign
        if _is_error(row.status):
            self.errors += sign
        self.input_tokens += sign * row.input_tokens
        self.output_tokens += sign * row.output_tokens
        self.cache_read_tokens += sign * row.cache_read_tokens
        self.cache_write_tokens += sign * row.cache_write_tokens
        self.cost_usd += sign * row.cost_usd

    def add_bucket(self, other: Bucket) -> None:
        for field in _BUCKET_FIELDS:
            setattr(self, field, getattr(self, field) + getattr(other, field))


_BUCKET_FIELDS = tuple(f.name for f in attrs.fields(Bucket))

# (agent, provider, effective model); any of them may be None.
Key = tuple["str | None", "str | None", "str | None"]


UNROUTED = "(unrouted)"
"""The provider and model shown for requests refused before routing."""

SPEND_COUNTS = {
    "requests": (
        "every request of an agent or virtual key, refused ones included; those refused "
        "before routing (no provider or model) are listed under \"(unrouted)\" and counted "
        "in unrouted_requests; count_tokens calls are free and not requests"
    ),
    "tokens": (
        "input_tokens is plain input; cache_read_tokens and cache_write_tokens are the "
        "cached prompt tokens; prompt_tokens is the sum of the three (every prompt token)"
    ),
    "cost": (
        "cost_usd is what the requests that reached a provider cost; priced_requests and "
        "unpriced_requests count those requests only"
    ),
}
"""What the totals of the spend shape (L{summarise}) count, stated in the answers."""


def _model_order(item: tuple[tuple[str | None, str | None], Bucket]) -> tuple[bool, str, str]:
    (provider, model), _ = item
    return (provider is None or model is None, provider or "", model or "")


def summarise(models: dict[tuple[str | None, str | None], Bucket]) -> dict[str, Any]:
    """
    The spend-view shape of buckets keyed by C{(provider, model)}.  Token
    fields mirror the ledger rows (C{input_tokens} is plain input) and
    C{prompt_tokens} is their sum with the cache tokens.

    A key with no provider or model holds requests refused before routing:
    listed last, as L{UNROUTED}, with C{routed} false.  They count as
    requests (and errors), but as neither priced nor unpriced: no price
    applies to a request that reached no provider, and it cost nothing.
    """
    total = Bucket()
    unrouted = 0
    out_models = []
    for (provider, model), bucket in sorted(models.items(), key=_model_order):
        if bucket.requests <= 0:
            continue
        routed = provider is not None and model is not None
        if not routed:
            bucket = attrs.evolve(bucket, priced_requests=0, unpriced_requests=0)
            unrouted += bucket.requests
        total.add_bucket(bucket)
        out_models.append(
            {
                "provider": provider or UNROUTED,
                "model": model or UNROUTED,
                "routed": routed,
                **_bucket_dict(bucket),
                "pricing_status": (
                    pricing_status(bucket.priced_requests, bucket.unpriced_requests) if routed else "unrouted"
                ),
            }
        )
    result = _bucket_dict(total)
    result["total_cost_usd"] = result.pop("cost_usd")
    result["total_requests"] = result.pop("requests")
    result["unrouted_requests"] = unrouted
    result["pricing_status"] = pricing_status(total.priced_requests, total.unpriced_requests)
    result["models"] = out_models
    return result


def _bucket_dict(bucket: Bucket) -> dict[str, Any]:
    return {
        "requests": bucket.requests,
        "priced_requests": bucket.priced_requests,
        "unpriced_requests": bucket.unpriced_requests,
        "estimated_requests": bucket.estimated_requests,
        "errors": bucket.errors,
        "input_tokens": bucket.input_tokens,
        "cache_read_tokens": bucket.cache_read_tokens,
        "cache_write_tokens": bucket.cache_write_tokens,
        "prompt_tokens": bucket.prompt_tokens,
        "output_tokens": bucket.output_tokens,
        "cost_usd": _money(bucket.cost_usd),
    }


class Totals:
    """
    Running aggregates of every committed (or about to be committed) row:
    all-time per C{(agent, provider, effective model)}, and per UTC day for
    quick period answers.  Used on the reactor thread only.

    C{requests}, C{errors}, C{unidentified_requests} (agent L{None}) and
    C{unrouted_requests} (agent known, provider or model not) count every
    row; C{costs_api()} counts metered rows only (the contract's record of
    requests that reached a provider); C{period()} counts every row of a
    known agent, the unrouted ones under L{UNROUTED}.
    """

    def __init__(self) -> None:
        self._all: dict[Key, Bucket] = {}
        self._days: dict[str, dict[Key, Bucket]] = {}
        self.requests = 0
        self.errors = 0
        self.unidentified_requests = 0
        self.unrouted_requests = 0

    # -- updates

    def add(self, row: LedgerRow) -> None:
        """Count C{row}."""
        self._apply(row, 1)

    def remove(self, row: LedgerRow) -> None:
        """Un-count C{row} (its commit failed)."""
        self._apply(row, -1)

    def _apply(self, row: LedgerRow, sign: int) -> None:
        key = (_text(row.agent), _text(row.provider), _text(row.effective_model))
        bucket = self._all.get(key)
        if bucket is None:
            bucket = self._all[key] = Bucket()
        bucket.add_row(row, sign)
        day_key = utc_day(row.ts)
        day = self._days.get(day_key)
        if day is None:
            day = self._days[day_key] = {}
        bucket = day.get(key)
        if bucket is None:
            bucket = day[key] = Bucket()
        bucket.add_row(row, sign)
        self._count(key, bucket_requests=sign, bucket_errors=sign if _is_error(row.status) else 0)

    def add_aggregate(self, day: str, key: Key, bucket: Bucket) -> None:
        """Count a pre-aggregated group (used when rebuilding from SQL)."""
        self._all.setdefault(key, Bucket()).add_bucket(bucket)
        self._days.setdefault(day, {}).setdefault(key, Bucket()).add_bucket(bucket)
        self._count(key, bucket_requests=bucket.requests, bucket_errors=bucket.errors)

    def _count(self, key: Key, bucket_requests: int, bucket_errors: int) -> None:
        agent, provider, model = key
        self.requests += bucket_requests
        self.errors += bucket_errors
        if agent is None:
            self.unidentified_requests += bucket_requests
        elif provider is None or model is None:
            self.unrouted_requests += bucket_requests

    # -- reads

    def buckets(self, agent: str | None = None) -> dict[Key, Bucket]:
        """All-time buckets (copies), optionally of one agent only."""
        return {
            key: attrs.evolve(bucket)
            for key, bucket in self._all.items()
            if bucket.requests and (agent is None or key[0] == agent)
        }

    def agents(self) -> list[str]:
        """Sorted ids of the agents with at least one request (refused ones included)."""
        return sorted({k[0] for k, b in self._all.items() if k[0] is not None and b.requests})

    def costs_api(self) -> dict[str, Any]:
        """
        Exactly the contract's C{GET /costs/api} body (CONTRACT 5).
        C{input_tokens} there are all prompt tokens, cache reads and writes
        included, as the reference proxy reports them.
        """
        per_agent: dict[str, dict[tuple[str, str], Bucket]] = {}
        for key, bucket in self._all.items():
            if bucket.requests > 0 and _metered(key):
                agent, provider, model = key
                per_agent.setdefault(agent, {})[(provider, model)] = bucket
        agents: dict[str, Any] = {}
        total_cost = 0.0
        total_requests = 0
        total_unpriced = 0
        for agent in sorted(per_agent):
            models = []
            agent_cost = 0.0
            agent_requests = 0
            agent_unpriced = 0
            for (provider, model), b in sorted(per_agent[agent].items()):
                models.append(
                    {
                        "provider": provider,
                        "model": model,
                        "input_tokens": b.prompt_tokens,
                        "output_tokens": b.output_tokens,
                        "cost_usd": _money(b.cost_usd),
                        "requests": b.requests,
                        "priced_requests": b.priced_requests,
                        "unpriced_requests": b.unpriced_requests,
                        "pricing_status": pricing_status(b.priced_requests, b.unpriced_requests),
                    }
                )
                agent_cost += b.cost_usd
                agent_requests += b.requests
                agent_unpriced += b.unpriced_requests
            agents[agent] = {
                "total_cost_usd": _money(agent_cost),
                "total_requests": agent_requests,
                "unpriced_requests": agent_unpriced,
                "models": models,
            }
            total_cost += agent_cost
            total_requests += agent_requests
            total_unpriced += agent_unpriced
        return {
            "total_cost_usd": _money(total_cost),
            "total_requests": total_requests,
            "unpriced_requests": total_unpriced,
            "agents": agents,
        }

    def period(
        self, since_day: str | None = None, until_day: str | None = None, agent: str | None = None
    ) -> dict[str, Any]:
        """
        Spend over whole UTC days C{since_day} to C{until_day}
        (C{'YYYY-MM-DD'}, both inclusive, L{None} for open ends), in the
        shape of L{SqliteLedger.spend}, answered from memory: every row of
        a known agent, metered or refused before routing (L{summarise}).
        """
        models: dict[tuple[str | None, str | None], Bucket] = {}
        for day, keys in self._days.items():
            if (since_day is not None and day < since_day) or (until_day is not None and day > until_day):
                continue
            for key, bucket in keys.items():
                if key[0] is not None and (agent is None or key[0] == agent):
                    models.setdefault((key[1], key[2]), Bucket()).add_bucket(bucket)
        result = summarise(models)
        result.update(agent=agent, since_day=since_day, until_day=until_day)
        return result

    def summary(self) -> dict[str, Any]:
        """Counters over every row, metered or not."""
        return {
            "requests": self.requests,
            "errors": self.errors,
            "unidentified_requests": self.unidentified_requests,
            "unrouted_requests": self.unrouted_requests,
        }


def _metered(key: Key) -> TypeGuard[tuple[str, str, str]]:
    return key[0] is not None and key[1] is not None and key[2] is not None


# --- schema -----------------------------------------------------------------

_ROW_FIELDS = (
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
)
_TEXT_FIELDS = frozenset(
    {"agent", "provider", "requested_model", "effective_model", "key_id", "team_id", "user_id"}
)
_BOOL_FIELDS = frozenset({"stream", "priced", "estimated"})

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
    user_id TEXT
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
CREATE INDEX IF NOT EXISTS requests_agent ON requests (agent);
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
"""

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
}

_INSERT = "INSERT INTO requests ({}) VALUES ({})".format(
    ", ".join(_ROW_FIELDS), ", ".join("?" for _ in _ROW_FIELDS)
)
# A held row may already be on disk (a commit reported as failed can have
# reached it): then it is taken as written, not counted twice.
_INSERT_AGAIN = _INSERT + " ON CONFLICT (request_id) DO NOTHING"

_ERROR_SQL = "CASE WHEN status < 200 OR status >= 400 THEN 1 ELSE 0 END"
# A row that counts against a request budget: a successful (2xx) turn.
_COUNTED_SQL = "CASE WHEN status >= 200 AND status < 300 THEN 1 ELSE 0 END"
_COUNTED_UNPRICED_SQL = "CASE WHEN status >= 200 AND status < 300 AND priced = 0 THEN 1 ELSE 0 END"

# The per-group counters of `requests`, in the order of the rollups columns.
_ROLLUP_COUNTERS = (
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
    f"SUM({_ERROR_SQL})",
    "SUM(input_tokens)",
    "SUM(output_tokens)",
    "SUM(cache_read_tokens)",
    "SUM(cache_write_tokens)",
    "SUM(cost_usd)",
)
_AGGREGATES_SQL = ", ".join(_AGGREGATE_EXPRESSIONS)
_AGGREGATES_AS_SQL = ", ".join(
    f"{expression} AS {name}" for expression, name in zip(_AGGREGATE_EXPRESSIONS, _ROLLUP_COUNTERS, strict=True)
)
_ROLLUP_SUMS_SQL = ", ".join(f"SUM({c})" for c in _ROLLUP_COUNTERS)

# Budget counters of a rollup group (not part of L{Bucket}: only
# spend_timeline reads them).
_BUDGET_COUNTERS = ("counted_requests", "counted_unpriced_requests")
_BUDGET_AGGREGATES_SQL = f"SUM({_COUNTED_SQL}), SUM({_COUNTED_UNPRICED_SQL})"

_PRUNE_ROLLUP = f"""
INSERT INTO rollups (day, agent, provider, model, key_id, team_id, user_id,
                     {", ".join(_ROLLUP_COUNTERS + _BUDGET_COUNTERS)})
SELECT {_DAY_SQL}, COALESCE(agent, ''), COALESCE(provider, ''), COALESCE(effective_model, ''),
       COALESCE(key_id, ''), COALESCE(team_id, ''), COALESCE(user_id, ''), {_AGGREGATES_SQL},
       {_BUDGET_AGGREGATES_SQL}
FROM requests
WHERE ts < :bound AND {_DAY_NUMBER_SQL} < :day
GROUP BY 1, 2, 3, 4, 5, 6, 7
ON CONFLICT (day, agent, provider, model, key_id, team_id, user_id) DO UPDATE SET
    {", ".join(f"{c} = {c} + excluded.{c}" for c in _ROLLUP_COUNTERS + _BUDGET_COUNTERS)}
"""
_PRUNE_DELETE = f"DELETE FROM requests WHERE ts < :bound AND {_DAY_NUMBER_SQL} < :day"

_REBUILD = f"""
SELECT day, agent, provider, model, {_ROLLUP_SUMS_SQL} FROM (
    SELECT {_DAY_SQL} AS day, agent, provider, effective_model AS model,
           {_AGGREGATES_AS_SQL}
    FROM requests GROUP BY 1, 2, 3, 4
    UNION ALL
    SELECT day, NULLIF(agent, ''), NULLIF(provider, ''), NULLIF(model, ''),
           {", ".join(_ROLLUP_COUNTERS)}
    FROM rollups
) GROUP BY day, agent, provider, model
"""


def _bucket_from(values: Iterable[Any]) -> Bucket:
    v = [x or 0 for x in values]
    # The rollup columns in Bucket's field order: nine counts, then the cost.
    fields: dict[str, Any] = dict(zip(_BUCKET_FIELDS, [*(int(x) for x in v[:9]), float(v[9])], strict=True))
    return Bucket(**fields)


def _row_params(row: LedgerRow) -> tuple[Any, ...]:
    out = []
    for name in _ROW_FIELDS:
        value = getattr(row, name)
        if name in _TEXT_FIELDS:
            value = _text(value)
        elif name in _BOOL_FIELDS:
            value = 1 if value else 0
        out.append(value)
    return tuple(out)


def _row_dict(names: list[str], values: tuple[Any, ...]) -> dict[str, Any]:
    row = dict(zip(names, values, strict=True))
    for name in _BOOL_FIELDS:
        row[name] = bool(row[name])
    return row


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


def _migrate(conn: sqlite3.Connection, path: str) -> None:
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


def _execute_script(conn: sqlite3.Connection, script: str) -> None:
    # Not executescript(): it COMMITs the open transaction first.
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _rebuild_totals(conn: sqlite3.Connection) -> Totals:
    totals = Totals()
    for day, agent, provider, model, *counters in conn.execute(_REBUILD):
        totals.add_aggregate(day, (agent, provider, model), _bucket_from(counters))
    return totals


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


def _write_transaction(conn: sqlite3.Connection, statement: str, params: tuple[Any, ...]) -> None:
    """On the writer thread: C{statement} in a transaction of its own."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(statement, params)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


# --- budget seeding -----------------------------------------------------------

TimelineEntry = tuple[str, float, float, int, int]
"""C{(agent, bucket_start_ts, cost_usd, counted_requests, unpriced_requests)}."""


_LAST_DAY = datetime.date.max.toordinal() - _EPOCH_ORDINAL


def _day_start(day: str) -> float:
    """Epoch seconds of midnight UTC starting C{'YYYY-MM-DD'}."""
    return (datetime.date.fromisoformat(day).toordinal() - _EPOCH_ORDINAL) * SECONDS_PER_DAY


def _timeline_reader(
    since: float, resets: dict[str, float], bucket: int
) -> Callable[[sqlite3.Connection], list[TimelineEntry]]:
    """
    The read behind L{SqliteLedger.spend_timeline}: every entry it returns
    has C{ts >= since} and C{ts >= resets[agent]}.
    """
    # Only the resets that cut into the range filter anything.  A CASE, not
    # a chain of ANDs or a join: flat (no expression depth limit) and the
    # cheapest of the three on a month of rows.
    cuts = sorted((agent, at) for agent, at in resets.items() if at > since)
    where = ["ts >= ?", "+agent IS NOT NULL"]
    args: list[Any] = [since]
    if cuts:
        where.append(f"ts >= CASE +agent {' '.join('WHEN ? THEN ?' for _ in cuts)} ELSE ? END")
        for agent, at in cuts:
            args.extend((agent, at))
        args.append(since)
    # Grouped by bucket first, then agent (the same groups as "agent,
    # bucket"): the rows come from the ts index in ts order, which keeps the
    # GROUP BY's temporary b-tree cheap; "+agent" keeps the planner off the
    # agent index, which would read every row whatever C{since}.
    requests_sql = (
        f"SELECT agent, CAST(ts / {bucket} AS INTEGER) * {bucket}.0, ROUND(SUM(cost_usd), 10), "
        f"SUM({_COUNTED_SQL}) AS counted, SUM({_COUNTED_UNPRICED_SQL}) "
        f"FROM requests WHERE {' AND '.join(where)} "
        f"GROUP BY CAST(ts / {bucket} AS INTEGER), +agent HAVING SUM(cost_usd) != 0 OR counted > 0"
    )
    first_day = day_string(min(max(math.ceil(since / SECONDS_PER_DAY), 0), _LAST_DAY))
    rollups_sql = (
        "SELECT agent, day, SUM(cost_usd), SUM(counted_requests), SUM(counted_unpriced_requests) "
        "FROM rollups WHERE agent != '' AND day >= ? GROUP BY agent, day"
    )

    def read(conn: sqlite3.Connection) -> list[TimelineEntry]:
        entries: list[TimelineEntry] = conn.execute(requests_sql, args).fetchall()
        days = []
        for agent, day, cost, counted, unpriced in conn.execute(rollups_sql, (first_day,)):
            start = _day_start(day)
            # A rolled-up day cannot be split: one that began before the cut is left out.
            if (cost or counted) and start >= since and start >= resets.get(agent, start):
                days.append((agent, start, _money(cost or 0.0), int(counted or 0), int(unpriced or 0)))
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
                    last[0], last[1], _money(last[2] + entry[2]), last[3] + entry[3], last[4] + entry[4]
                )
            else:
                merged.append(entry)
        return merged

    return read


def _timeline_arguments(since: float, bucket_seconds: int) -> tuple[float, int]:
    if isinstance(since, bool) or not isinstance(since, (int, float)) or not math.isfinite(since):
        raise ValueError(f"since must be a finite number of epoch seconds, not {since!r}")
    bucket = bucket_seconds
    if isinstance(bucket, bool) or not isinstance(bucket, int) or not 1 <= bucket <= 86400:
        raise ValueError(f"bucket_seconds must be a whole number from 1 to 86400, not {bucket_seconds!r}")
    return float(since), bucket_seconds


def _held_buckets(
    rows: Iterable[LedgerRow], scope: Callable[[LedgerRow], str | None], since: float,
    resets: dict[str, float], bucket: int,
) -> dict[tuple[str, float], list]:
    """Held rows (not in SQL yet) per C{(scope, bucket_ts)}, counted as the timeline SQL counts."""
    out: dict[tuple[str, float], list] = {}
    for row in rows:
        value = _text(scope(row))
        if value is None or row.ts < since or row.ts < resets.get(value, since):
            continue
        counted = 200 <= row.status < 300
        acc = out.setdefault((value, float(int(row.ts / bucket) * bucket)), [0.0, 0, 0])
        acc[0] += row.cost_usd
        acc[1] += 1 if counted else 0
        acc[2] += 1 if counted and not row.priced else 0
    return out


def _merge_timeline(entries: list[tuple], held: dict[tuple[str, float], list]) -> list[tuple]:
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
        (key[0], key[1], _money(v[0]), v[1], v[2]) for key, v in combined.items() if v[0] != 0 or v[1] > 0
    )


# --- budget overrides ---------------------------------------------------------

_OVERRIDE_COLUMNS = ("agent", "budget_json", "spent_offset_usd", "reset_at", "updated_at", "updated_by")
_UPSERT_OVERRIDE = (
    f"INSERT INTO budget_overrides ({', '.join(_OVERRIDE_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (agent) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _OVERRIDE_COLUMNS[1:])
)
_DELETE_OVERRIDE = "DELETE FROM budget_overrides WHERE agent = ?"
_SELECT_OVERRIDES = f"SELECT {', '.join(_OVERRIDE_COLUMNS)} FROM budget_overrides"


def _override_entry(
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


def _copy_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return dict(entry, budget=copy.deepcopy(entry["budget"]))


def _encode_budget(budget: dict) -> str:
    return json.dumps(budget, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _override_row(agent: str, entry: dict[str, Any]) -> tuple[Any, ...]:
    budget = entry["budget"]
    return (
        agent,
        None if budget is None else _encode_budget(budget),
        entry["spent_offset_usd"],
        entry["reset_at"],
        entry["updated_at"],
        entry["updated_by"],
    )


def _override_from_row(path: str, row: tuple[Any, ...]) -> tuple[str, dict[str, Any]]:
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
            raise LedgerSchemaError(f"{path}: the budget override of {agent!r} is not a JSON object")
    return agent, _override_entry(
        budget,
        None if offset is None else float(offset),
        None if reset_at is None else float(reset_at),
        float(updated_at),
        updated_by,
    )


def _load_overrides(conn: sqlite3.Connection, path: str) -> dict[str, dict[str, Any]]:
    return dict(_override_from_row(path, row) for row in conn.execute(_SELECT_OVERRIDES))


def _check_agent(agent: str) -> str:
    if not isinstance(agent, str) or not agent:
        raise ValueError(f"agent must be a non-empty string, not {agent!r}")
    return agent


def _check_offset(value: float | None) -> float | None:
    if value is None:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0:
        raise ValueError(f"spent_offset_usd must be a non-negative number, not {value!r}")
    return float(value)


# --- the service --------------------------------------------------------------


@implementer(ILedger)
class SqliteLedger(service.Service):
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
    """

    def __init__(
        self,
        path: str,
        reactor: Any,
        sync: str = "normal",
        retention_seconds: float | None = None,
        clock: Any = None,
        backlog: int = DEFAULT_BACKLOG,
        spill_dir: str | None = None,
    ) -> None:
        if sync not in _SYNC_MODES:
            raise ValueError(f"sync must be one of {sorted(_SYNC_MODES)}, not {sync!r}")
        if retention_seconds is not None and not retention_seconds > 0:
            raise ValueError("retention_seconds must be positive")
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
            raise ValueError(f"backlog must be a whole number of rows >= 1, not {backlog!r}")
        self.path = path
        self.sync = sync
        self.retention_seconds = retention_seconds
        self.backlog = backlog
        self.spill_file = None if spill_dir is None else spill_path(spill_dir, path)
        self._unkept = 0  # rows not kept since start (see NOT_KEPT)
        self._unkept_now = 0  # ... during the current failure
        self._reactor = reactor
        self._clock = clock if clock is not None else reactor
        self._totals = Totals()
        self._writer: Writer | None = None
        self._closing: defer.Deferred | None = None
        self._close_waiters: list[defer.Deferred] = []
        self._retention: task.LoopingCall | None = None
        self._overrides: dict[str, dict[str, Any]] = {}
        self._override_writes: dict[str, int] = {}

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
            totals = _rebuild_totals(conn)
            overrides = _load_overrides(conn, self.path)
        except BaseException:
            conn.close()
            raise
        self._totals = totals
        self._overrides = overrides
        self._override_writes = {}
        inline = open_inline(self.path) if self.sync == "normal" else None
        spill_file = self.spill_file
        self._writer = writer = Writer(
            conn, self._reactor, self._deliver, _INSERT, inline=inline, path=self.path,
            insert_again=_INSERT_AGAIN, capacity=self.backlog,
            spill=None if spill_file is None else functools.partial(write_spill, spill_file),
        )
        writer.on_recovered.append(self._recovered)
        writer.start()
        if still_held:
            # The disk is still full: the saved rows are held again, counted, and retried.
            rows, error = still_held
            for row in rows:
                self._totals.add(row)
            writer._hold([Row(row, _row_params(row), defer.Deferred()) for row in rows], error)
        service.Service.startService(self)
        if self.retention_seconds is not None:
            self._retention = task.LoopingCall(self._prune_expired)
            self._retention.clock = self._clock
            self._retention.start(PRUNE_INTERVAL, now=True)

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
        if writer.full and not _metered((_text(row.agent), _text(row.provider), _text(row.effective_model))):
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
        writer.record(Row(row, _row_params(row), d))
        return d

    def totals(self) -> Totals:
        """The running totals (kept in memory, rebuilt at start)."""
        return self._totals

    def prune(self, older_than_epoch: float) -> defer.Deferred:
        """
        Fold every row of the UTC days that end at or before
        C{older_than_epoch} (the cutoff is rounded down to midnight UTC, so
        no day is ever split between C{requests} and C{rollups}) into
        C{rollups}, and delete those rows, in one transaction, after every
        row recorded before this call is committed.  Fires with the number
        of rows moved.  The totals do not change.
        """
        day = math.floor(older_than_epoch / SECONDS_PER_DAY)
        params = {"day": day, "bound": day * SECONDS_PER_DAY + 1.0}

        def prune(conn: sqlite3.Connection) -> int:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(_PRUNE_ROLLUP, params)
                moved = conn.execute(_PRUNE_DELETE, params).rowcount
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return moved

        return self._on_writer(prune)

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
        try:
            _transaction(conn, lambda c: c.executemany(_INSERT_AGAIN, [_row_params(r) for r in rows]))
        except sqlite3.Error as e:
            _log.error(
                "ledger: {count} rows saved in {spill} by the last run cannot be written yet: {error}",
                count=len(rows), spill=spill_file, error=str(e),
            )
            return rows, str(e)
        remove_spill(spill_file)
        _log.info("ledger: imported {count} rows saved in {spill} by the last run", count=len(rows), spill=spill_file)
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
        While any row is held, a caller with a budget is refused: its spend
        would be counted only in memory.  Once the backlog is full, every
        caller is: nothing more can be held.
        """
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

    # -- reads (threadpool, own connection each)

    def _read(self, function: Callable[[sqlite3.Connection], Any]) -> defer.Deferred:
        if self._writer is None:
            return defer.fail(LedgerClosed("the ledger is not running"))
        return threads.deferToThreadPool(
            self._reactor, self._reactor.getThreadPool(), _run_read, self.path, function
        )

    def ready(self) -> defer.Deferred:
        """
        Fires with True when the database answers a trivial query and no
        row is held (the storage takes writes), else False.
        """
        if self._writer is None or self._writer.held:
            return defer.succeed(False)
        d = self._read(lambda conn: conn.execute("SELECT COUNT(*) FROM meta").fetchone() is not None)
        return d.addErrback(lambda _: False)

    def count(self) -> defer.Deferred:
        """Fires with the number of rows in C{requests} (pruned rows are not counted)."""
        return self._read(lambda conn: conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0])

    def recent(self, limit: int = 50, agent: str | None = None) -> defer.Deferred:
        """
        Fires with the latest C{limit} rows (newest first), optionally of one
        agent, as dicts: C{id} plus every L{LedgerRow} field.
        """
        limit = _clamp(limit)
        sql = f"SELECT id, {', '.join(_ROW_FIELDS)} FROM requests"
        args: tuple[Any, ...] = ()
        if agent is not None:
            sql += " WHERE agent = ?"
            args = (agent,)
        sql += " ORDER BY id DESC LIMIT ?"

        def query(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            cursor = conn.execute(sql, args + (limit,))
            names = [c[0] for c in cursor.description]
            return [_row_dict(names, values) for values in cursor]

        return self._read(query)

    def rows_after(self, cursor: int, limit: int = 1000) -> defer.Deferred:
        """
        Fires with C{(rows, next_cursor)}: up to C{limit} rows whose C{id}
        (the rowid; never reused, and increasing in commit order because
        there is one writer) is greater than C{cursor}, oldest first.
        Start with cursor 0; pass C{next_cursor} back to continue.  Rows
        pruned before they were read are not returned.
        """
        limit = _clamp(limit)
        sql = f"SELECT id, {', '.join(_ROW_FIELDS)} FROM requests WHERE id > ? ORDER BY id LIMIT ?"

        def query(conn: sqlite3.Connection) -> tuple[list[dict[str, Any]], int]:
            result = conn.execute(sql, (int(cursor), limit))
            names = [c[0] for c in result.description]
            rows = [_row_dict(names, values) for values in result]
            return rows, (rows[-1]["id"] if rows else int(cursor))

        return self._read(query)

    def cost_of(self, key_id: str | None = None, team_id: str | None = None) -> defer.Deferred:
        """Fires with the total cost recorded for one virtual key or one team."""
        column, value = ("key_id", key_id) if key_id is not None else ("team_id", team_id)
        sql = f"SELECT COALESCE(SUM(cost_usd), 0) FROM requests WHERE {column} = ?"

        def query(conn: sqlite3.Connection) -> float:
            return float(conn.execute(sql, (value,)).fetchone()[0])

        return self._read(query)

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
        limit = _clamp(limit)
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
        sql = f"SELECT id, {', '.join(_ROW_FIELDS)} FROM requests {clause} ORDER BY id LIMIT ?"

        def query(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            result = conn.execute(sql, (*args, limit))
            names = [c[0] for c in result.description]
            return [_row_dict(names, values) for values in result]

        return self._read(query)

    def spend(
        self, agent: str | None = None, since: float | None = None, until: float | None = None
    ) -> defer.Deferred:
        """
        Fires with the spend in C{[since, until)} (epoch seconds, L{None}
        for an open end), of one agent or all, in the shape of
        L{summarise} plus C{agent}, C{since}, C{until} and C{exact}: every
        row of a known agent, as L{Totals.period} counts them.

        Rows still in C{requests} are counted to the second; pruned history
        comes from C{rollups}, which know only whole UTC days: a rollup day
        that overlaps the period is counted whole, and C{exact} is false
        when such a day lies only partly inside the period.
        """
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
            f"SELECT provider, effective_model, {_AGGREGATES_SQL} FROM requests "
            f"WHERE {' AND '.join(where)} GROUP BY provider, effective_model"
        )
        rollups_sql = (
            f"SELECT NULLIF(provider, ''), NULLIF(model, ''), {_ROLLUP_SUMS_SQL} FROM rollups "
            f"WHERE {' AND '.join(rwhere)} GROUP BY provider, model"
        )
        partial_sql = (
            f"SELECT COUNT(*) FROM rollups WHERE {' AND '.join(rwhere)} "
            f"AND day IN ({', '.join('?' for _ in partial_days)})"
        )

        def query(conn: sqlite3.Connection) -> dict[str, Any]:
            models: dict[tuple[str | None, str | None], Bucket] = {}
            for sql, sql_args in ((requests_sql, args), (rollups_sql, rargs)):
                for provider, model, *counters in conn.execute(sql, sql_args):
                    models.setdefault((provider, model), Bucket()).add_bucket(_bucket_from(counters))
            exact = True
            if partial_days:
                exact = conn.execute(partial_sql, rargs + partial_days).fetchone()[0] == 0
            result = summarise(models)
            result.update(agent=agent, since=since, until=until, exact=exact)
            return result

        return self._read(query)

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
        since, bucket = _timeline_arguments(since, bucket_seconds)
        resets = self._reset_times()
        entries = _run_read(self.path, _timeline_reader(since, resets, bucket))
        return _merge_timeline(entries, self._held_buckets(lambda row: row.agent, since, resets, bucket))

    def scope_timeline(self, column: str, since: float, bucket_seconds: int = TIMELINE_BUCKET) -> list[tuple]:
        """
        SYNCHRONOUS, at start (like L{spend_timeline}): the committed spend
        per virtual key (C{column="key_id"}) or team (C{"team_id"}) and
        minute, as C{(scope_value, bucket_ts, cost_usd, counted_requests,
        unpriced_requests)}, to seed key and team budgets.  Rows already
        folded into rollups are not included (rollups keep no key or team).
        """
        if column not in ("key_id", "team_id"):
            raise ValueError(f"no timeline by {column!r}")
        if self._writer is None:
            raise LedgerClosed("the ledger is not running")
        bucket = int(bucket_seconds)
        sql = (
            f"SELECT {column}, CAST(ts / {bucket} AS INTEGER) * {bucket} AS bucket, SUM(cost_usd), "
            "SUM(CASE WHEN status >= 200 AND status < 300 THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN status >= 200 AND status < 300 AND priced = 0 THEN 1 ELSE 0 END) "
            f"FROM requests WHERE {column} IS NOT NULL AND ts >= ? GROUP BY {column}, bucket ORDER BY {column}, bucket"
        )
        entries = _run_read(self.path, lambda conn: [tuple(row) for row in conn.execute(sql, (float(since),))])
        return _merge_timeline(
            entries, self._held_buckets(lambda row: getattr(row, column), float(since), {}, bucket)
        )

    def _held_buckets(
        self, scope: Callable[[LedgerRow], str | None], since: float, resets: dict[str, float], bucket: int
    ) -> dict[tuple[str, float], list]:
        """The held rows' share of a timeline: spend the database has not got yet is still spend."""
        writer = self._writer
        if writer is None or not writer.held:
            return {}
        return _held_buckets((item.row for item in writer.backlog), scope, since, resets, bucket)

    def spend_timeline_async(self, since: float, bucket_seconds: int = TIMELINE_BUCKET) -> defer.Deferred:
        """L{spend_timeline} in the read threadpool: fires with the same list."""
        try:
            since, bucket = _timeline_arguments(since, bucket_seconds)
        except ValueError:
            return defer.fail()
        resets = self._reset_times()
        d = self._read(_timeline_reader(since, resets, bucket))
        return d.addCallback(
            lambda entries: _merge_timeline(entries, self._held_buckets(lambda row: row.agent, since, resets, bucket))
        )

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
        return {agent: _copy_entry(entry) for agent, entry in self._overrides.items()}

    def budget_override(self, agent: str) -> dict[str, Any] | None:
        """One agent's entry of L{budget_overrides}, or L{None}."""
        entry = self._overrides.get(agent)
        return None if entry is None else _copy_entry(entry)

    def set_budget_override(
        self, agent: str, budget: dict | None, spent_offset_usd: float | None, actor: str
    ) -> defer.Deferred:
        """
        Set C{agent}'s override budget (a JSON object, stored as given: the
        caller validates it) and/or spent offset; L{None} keeps the previous
        value.  C{reset_at} is kept.  Memory changes now; the Deferred fires
        with a copy of the new entry once it is committed (after every row
        recorded before this call), or fails (memory is then reloaded from
        the database), with L{LedgerClosed} if the ledger is not running.

        @raise ValueError: C{agent} is empty, C{spent_offset_usd} is negative
            or not finite, or C{budget} is not a JSON-serialisable object.
        """
        _check_agent(agent)
        if budget is not None:
            if not isinstance(budget, dict):
                raise ValueError("the budget must be a JSON object (a dict)")
            try:
                budget = json.loads(_encode_budget(budget))  # a private copy, JSON types only
            except (TypeError, ValueError) as e:
                raise ValueError(f"the budget is not JSON-serialisable: {e}") from None
        offset = _check_offset(spent_offset_usd)
        previous = self._overrides.get(agent)
        if previous is not None:
            budget = previous["budget"] if budget is None else budget
            offset = previous["spent_offset_usd"] if offset is None else offset
        reset_at = None if previous is None else previous["reset_at"]
        entry = _override_entry(budget, offset, reset_at, self._clock.seconds(), actor)
        return self._write_override(agent, entry)

    def reset_budget(self, agent: str, actor: str) -> defer.Deferred:
        """
        Forget C{agent}'s spend so far: C{reset_at} becomes now, and the
        override's budget and offset are cleared (the policy layers' budget
        applies again).  Rows before C{reset_at} stay in the ledger (costs,
        totals, exports) but no longer count against a budget:
        L{spend_timeline} skips them, across restarts.  Fires like
        L{set_budget_override}.
        """
        _check_agent(agent)
        now = self._clock.seconds()
        return self._write_override(agent, _override_entry(None, None, now, now, actor))

    def clear_budget_override(
        self, agent: str, actor: str | None = None, *, forget_reset: bool = False
    ) -> defer.Deferred:
        """
        Drop C{agent}'s override budget and offset.  Its C{reset_at} is kept
        (clearing an override must not bring back spend that was reset),
        unless C{forget_reset}: then the whole entry goes.  Fires with
        L{None} once committed; nothing to clear fires at once.
        """
        _check_agent(agent)
        if self._writer is None:
            return defer.fail(LedgerClosed("the ledger is not running"))
        previous = self._overrides.get(agent)
        if previous is None:
            return defer.succeed(None)
        if forget_reset or previous["reset_at"] is None:
            d = self._write_override(agent, None)
        else:
            entry = _override_entry(None, None, previous["reset_at"], self._clock.seconds(), actor)
            d = self._write_override(agent, entry)
        return d.addCallback(lambda _: None)

    def _write_override(self, agent: str, entry: dict[str, Any] | None) -> defer.Deferred:
        """
        Put C{entry} (L{None}: delete) in memory now and on disk through the
        writer, in queue order.  The whole row is written, so the last call
        wins on disk as in memory.
        """
        if self._writer is None:
            return defer.fail(LedgerClosed("the ledger is not running"))
        if entry is None:
            self._overrides.pop(agent, None)
            statement, params = _DELETE_OVERRIDE, (agent,)
        else:
            self._overrides[agent] = entry
            statement, params = _UPSERT_OVERRIDE, _override_row(agent, entry)
        d = self._on_writer(functools.partial(_write_transaction, statement=statement, params=params))
        self._override_writes[agent] = self._override_writes.get(agent, 0) + 1

        def failed(failure: Failure) -> Failure:
            _log.error(
                "ledger: could not store the budget override of {agent}: {error}",
                agent=agent,
                error=failure.getErrorMessage(),
            )
            self._reload_override(agent)
            return failure

        return d.addCallbacks(lambda _: None if entry is None else _copy_entry(entry), failed)

    def _reload_override(self, agent: str) -> None:
        """After a failed write: make memory what the database holds, unless a later write came."""
        generation = self._override_writes.get(agent, 0)
        path = self.path

        def read(conn: sqlite3.Connection) -> tuple[Any, ...] | None:
            return conn.execute(f"{_SELECT_OVERRIDES} WHERE agent = ?", (agent,)).fetchone()

        def reloaded(found: tuple[Any, ...] | None) -> None:
            if self._override_writes.get(agent, 0) != generation:
                return  # a later write decides; its own failure reloads again
            if found is None:
                self._overrides.pop(agent, None)
            else:
                self._overrides[agent] = _override_from_row(path, found)[1]

        def lost(failure: Failure) -> None:
            if not failure.check(LedgerClosed):
                _log.failure("ledger: could not reload the budget override of {agent}", failure, agent=agent)

        self._on_writer(read).addCallbacks(reloaded, lost)


def _clamp(limit: int) -> int:
    return max(1, min(int(limit), MAX_READ_LIMIT))
