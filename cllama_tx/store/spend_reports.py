"""
The reads behind LiteLLM's spend endpoints (C{/spend/logs},
C{/global/spend/*}, C{/user/daily/activity}, the C{spend} of C{/key/info},
C{/team/info}, ...): rows of C{requests} chosen by who they are billed
to and when, and their totals grouped by key, team, user, customer,
model or day.  Each function builds a reader for C{LedgerBase.report}
(run off the reactor on the ledger's read path), in the SQL both
databases speak.

Only C{requests} is read: rows the ledger folded into C{rollups} after its
retention period (C{docs/LEDGER.md}) are no longer per key, customer or
organisation, so these reports cover the retention period.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cllama_tx.store.ledger_sql import (
    COUNTED_SQL,
    COUNTED_UNPRICED_SQL,
    POSTGRESQL,
    ROW_FIELDS,
    bucket_sql,
    clamp,
    row_dict,
)
from cllama_tx.store.records import LedgerRow
from cllama_tx.store.shared import SCOPE_KINDS, scope_filter, scope_name
from cllama_tx.store.totals import money

__all__ = [
    "FILTER_COLUMNS",
    "GROUPS",
    "LEVEL_KINDS",
    "cost_reader",
    "level_of",
    "level_timeline_reader",
    "logs_reader",
    "totals_reader",
]

#: The levels above a key whose budgets are seeded from the ledger at start
#: (a key's and a team's are seeded by the ledger itself).
LEVEL_KINDS = ("user", "org", "customer", "member", "keymodel")

#: What a report may be narrowed to: name -> column.
FILTER_COLUMNS = {
    "key_id": "key_id",
    "team_id": "team_id",
    "user_id": "user_id",
    "organization_id": "organization_id",
    "end_user": "end_user",
    "model": "requested_model",
    "provider": "provider",
}

#: What totals may be grouped by: name -> SQL expression (C{day} is built per dialect).
GROUPS = {
    "key_id": "key_id",
    "team_id": "team_id",
    "user_id": "user_id",
    "organization_id": "organization_id",
    "end_user": "end_user",
    "model": "requested_model",
    "effective_model": "effective_model",
    "provider": "provider",
    "day": None,
}

_PROMPT = "input_tokens + cache_read_tokens + cache_write_tokens"
_SUCCESS = "CASE WHEN status >= 200 AND status < 300 THEN 1 ELSE 0 END"
_SELECT_ROW = f"id, {', '.join(ROW_FIELDS)}"


def _day(dialect: str) -> str:
    # The UTC day of a row as YYYY-MM-DD.
    if dialect == POSTGRESQL:
        return "TO_CHAR(TO_TIMESTAMP(ts) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    return "STRFTIME('%Y-%m-%d', ts, 'unixepoch')"


def _where(
    since: float | None, until: float | None, filters: Mapping[str, str | None], scope: str | None = None
) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if scope is not None:
        condition, values = scope_filter(scope)
        clauses.append(condition)
        args.extend(values)
    for name, value in filters.items():
        if value is None:
            continue
        if name == "request_id":
            # LiteLLM's request id is the answer's id; ours is in the header.
            clauses.append("(request_id = ? OR response_id = ?)")
            args.extend([value, value])
            continue
        clauses.append(f"{FILTER_COLUMNS[name]} = ?")
        args.append(value)
    if since is not None:
        clauses.append("ts >= ?")
        args.append(float(since))
    if until is not None:
        clauses.append("ts < ?")
        args.append(float(until))
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), args


def cost_reader(scope: str, since: float | None, until: float | None = None) -> Callable[[Any], float]:
    """The spend of a budget scope's rows (L{scope_filter}) in C{[since, until)}."""
    where, args = _where(since, until, {}, scope)
    sql = f"SELECT COALESCE(SUM(cost_usd), 0) FROM requests {where}"
    return lambda conn: float(conn.execute(sql, tuple(args)).fetchone()[0])


def logs_reader(
    since: float | None, until: float | None, filters: Mapping[str, str | None], limit: int, after: int = 0,
) -> Callable[[Any], list[dict[str, Any]]]:
    """Rows (dicts: C{id} and the row's fields), oldest first, at most C{limit}, with ids above C{after}."""
    where, args = _where(since, until, filters)
    if after:
        where = f"{where} AND id > ?" if where else "WHERE id > ?"
        args.append(int(after))
    sql = f"SELECT {_SELECT_ROW} FROM requests {where} ORDER BY id LIMIT ?"
    limit = clamp(limit)

    def read(conn: Any) -> list[dict[str, Any]]:
        cursor = conn.execute(sql, (*args, limit))
        names = [d[0] for d in cursor.description]
        return [row_dict(names, values) for values in cursor.fetchall()]

    return read


def totals_reader(
    dialect: str, groups: Sequence[str], since: float | None, until: float | None,
    filters: Mapping[str, str | None], limit: int = 10000,
) -> Callable[[Any], list[dict[str, Any]]]:
    """
    Totals per group (C{groups} from L{GROUPS}; none: one total), largest
    spend first: C{spend}, C{requests}, C{successful_requests},
    C{failed_requests}, C{prompt_tokens}, C{completion_tokens},
    C{total_tokens}, C{cache_read_tokens}, C{cache_write_tokens}.
    """
    expressions = []
    for name in groups:
        if name not in GROUPS:
            raise ValueError(f"cannot group by {name!r}")
        expressions.append(_day(dialect) if name == "day" else GROUPS[name])
    where, args = _where(since, until, filters)
    selected = ", ".join(f"{e} AS g{i}" for i, e in enumerate(expressions))
    sums = (
        "COALESCE(SUM(cost_usd), 0), COUNT(*), "
        f"COALESCE(SUM({_SUCCESS}), 0), COALESCE(SUM({_PROMPT}), 0), COALESCE(SUM(output_tokens), 0), "
        "COALESCE(SUM(cache_read_tokens), 0), COALESCE(SUM(cache_write_tokens), 0)"
    )
    group_by = f"GROUP BY {', '.join(f'g{i}' for i in range(len(expressions)))}" if expressions else ""
    sql = (
        f"SELECT {selected + ', ' if selected else ''}{sums} FROM requests {where} {group_by} "
        f"ORDER BY {len(expressions) + 1} DESC LIMIT ?"
    )
    limit = max(1, min(int(limit), 100000))

    def read(conn: Any) -> list[dict[str, Any]]:
        out = []
        for values in conn.execute(sql, (*args, limit)).fetchall():
            keys = dict(zip(groups, values[: len(groups)], strict=True))
            spend, requests, ok, prompt, completion, cache_read, cache_write = values[len(groups):]
            keys.update(
                spend=float(spend),
                requests=int(requests),
                successful_requests=int(ok),
                failed_requests=int(requests) - int(ok),
                prompt_tokens=int(prompt),
                completion_tokens=int(completion),
                total_tokens=int(prompt) + int(completion),
                cache_read_tokens=int(cache_read),
                cache_write_tokens=int(cache_write),
            )
            out.append(keys)
        return out

    return read


def level_of(kind: str, row: LedgerRow) -> str | None:
    """The budget scope of kind C{kind} a row counts against, if any (for rows not yet in SQL)."""
    values = tuple(getattr(row, column) for column in SCOPE_KINDS[kind])
    if not values or any(v is None or v == "" for v in values):
        return None
    return scope_name(kind, *values)


def level_timeline_reader(dialect: str, kind: str, since: float, bucket: int) -> Callable[[Any], list[tuple]]:
    """
    The spend of every scope of C{kind} (L{LEVEL_KINDS}) per bucket, as the
    budget book is seeded: C{(scope, bucket_ts, cost, counted, unpriced)}, sorted.
    """
    if kind not in LEVEL_KINDS:
        raise ValueError(f"no timeline of {kind!r}")
    columns = SCOPE_KINDS[kind]
    start = bucket_sql(dialect, bucket)
    present = " AND ".join(f"{c} IS NOT NULL" for c in columns)
    sql = (
        f"SELECT {', '.join(columns)}, {start}, SUM(cost_usd), SUM({COUNTED_SQL}), SUM({COUNTED_UNPRICED_SQL}) "
        f"FROM requests WHERE {present} AND ts >= ? GROUP BY {', '.join(columns)}, {start} "
        f"ORDER BY {', '.join(str(i + 1) for i in range(len(columns) + 1))}"
    )

    def read(conn: Any) -> list[tuple]:
        out = []
        for values in conn.execute(sql, (float(since),)).fetchall():
            names = values[: len(columns)]
            ts, cost, counted, unpriced = values[len(columns):]
            out.append((scope_name(kind, *names), float(ts), money(float(cost or 0.0)), int(counted or 0),
                        int(unpriced or 0)))
        out.sort(key=lambda entry: (entry[0], entry[1]))
        return out

    return read
