"""
The ledger's arithmetic, the same for every backend: what a row counts as
(error, metered, its UTC day), the counters of a group of rows (L{Bucket}),
the running totals the UI, C{/costs/api} and C{/metrics} read (L{Totals}),
and the spend-view shape (L{summarise}).

Pure: no I/O.  A row's day is computed here exactly as the SQL of
L{cllama_tx.store.ledger_sql} computes it, so the day a row is counted
under in memory is the day it is rolled up under.
"""

from __future__ import annotations

import datetime
import functools
from typing import Any, TypeGuard

import attrs

from cllama_tx.store.records import LedgerRow

__all__ = [
    "SECONDS_PER_DAY",
    "SPEND_COUNTS",
    "UNROUTED",
    "Bucket",
    "Key",
    "Totals",
    "bucket_dict",
    "day_number",
    "day_string",
    "is_error",
    "is_metered",
    "money",
    "pricing_status",
    "summarise",
    "text_or_none",
    "utc_day",
]

SECONDS_PER_DAY = 86400.0

# --- days ------------------------------------------------------------------
#
# A row's day is computed the same way in Python and in SQL, so that the day
# a row is counted under in memory is the day it is rolled up under:
# int(ts / 86400.0) is IEEE division then truncation, in Python as in the
# SQL of both backends (cllama_tx.store.ledger_sql.day_number_sql).

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


def is_error(status: int) -> bool:
    return status < 200 or status >= 400


def text_or_none(value: str | None) -> str | None:
    """Empty strings are stored and counted as L{None}."""
    return value if value else None


def pricing_status(priced_requests: int, unpriced_requests: int) -> str:
    """C{priced} when no request lacked a price, C{unpriced} when none had one."""
    if unpriced_requests == 0:
        return "priced"
    if priced_requests == 0:
        return "unpriced"
    return "partial"


def money(value: float) -> float:
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
        if is_error(row.status):
            self.errors += sign
        self.input_tokens += sign * row.input_tokens
        self.output_tokens += sign * row.output_tokens
        self.cache_read_tokens += sign * row.cache_read_tokens
        self.cache_write_tokens += sign * row.cache_write_tokens
        self.cost_usd += sign * row.cost_usd

    def add_bucket(self, other: Bucket) -> None:
        for field in BUCKET_FIELDS:
            setattr(self, field, getattr(self, field) + getattr(other, field))


BUCKET_FIELDS = tuple(f.name for f in attrs.fields(Bucket))

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
                **bucket_dict(bucket),
                "pricing_status": (
                    pricing_status(bucket.priced_requests, bucket.unpriced_requests) if routed else "unrouted"
                ),
            }
        )
    result = bucket_dict(total)
    result["total_cost_usd"] = result.pop("cost_usd")
    result["total_requests"] = result.pop("requests")
    result["unrouted_requests"] = unrouted
    result["pricing_status"] = pricing_status(total.priced_requests, total.unpriced_requests)
    result["models"] = out_models
    return result


def bucket_dict(bucket: Bucket) -> dict[str, Any]:
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
        "cost_usd": money(bucket.cost_usd),
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
        key = (text_or_none(row.agent), text_or_none(row.provider), text_or_none(row.effective_model))
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
        self._count(key, bucket_requests=sign, bucket_errors=sign if is_error(row.status) else 0)

    def add_aggregate(self, day: str, key: Key, bucket: Bucket) -> None:
        """Count a pre-aggregated group (used when rebuilding from SQL)."""
        self._all.setdefault(key, Bucket()).add_bucket(bucket)
        self._days.setdefault(day, {}).setdefault(key, Bucket()).add_bucket(bucket)
        self._count(key, bucket_requests=bucket.requests, bucket_errors=bucket.errors)

    def merge(self, other: Totals) -> None:
        """Count every group of C{other} too (totals rebuilt from SQL, added to rows counted meanwhile)."""
        for day, keys in other._days.items():
            for key, bucket in keys.items():
                self.add_aggregate(day, key, bucket)

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
            if bucket.requests > 0 and is_metered(key):
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
                        "cost_usd": money(b.cost_usd),
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
                "total_cost_usd": money(agent_cost),
                "total_requests": agent_requests,
                "unpriced_requests": agent_unpriced,
                "models": models,
            }
            total_cost += agent_cost
            total_requests += agent_requests
            total_unpriced += agent_unpriced
        return {
            "total_cost_usd": money(total_cost),
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
        shape of a ledger's C{spend()}, answered from memory: every row of
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


def is_metered(key: Key) -> TypeGuard[tuple[str, str, str]]:
    return key[0] is not None and key[1] is not None and key[2] is not None
