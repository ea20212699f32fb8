"""
LiteLLM's spend endpoints over the ledger: C{/spend/logs} (its filters,
its daily summary when both dates are given, the rows with
C{summarize=false}), C{/spend/logs/v2} (paginated), C{/global/spend},
C{/global/spend/report}, C{/global/spend/keys}, C{/global/spend/teams},
C{/global/spend/models}, C{/global/spend/end_users},
C{/user/daily/activity} and C{/team/daily/activity}; and this proxy's
cursor feed for billing workers, C{/api/spend/events}, which never misses
nor repeats a row.

A row's C{request_id} is the answer's C{id} (what a client saw, as
LiteLLM's) when the answer had one, else cllama_tx's request id (the
C{X-Cllama-Request-Id} header); C{?request_id=} finds a row by either.
C{api_key} is the key's token hash; C{?api_key=} takes the key or the
hash.  Dates are C{YYYY-MM-DD} (UTC; an end date counts its whole day) or
RFC 3339.  The reports read the ledger's rows (C{docs/LEDGER.md}: rows
older than its retention are folded into daily totals without keys or
customers, and leave these reports).
"""

from __future__ import annotations

import datetime
import time
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from cllama_tx.identity.key_model import token_hash_of
from cllama_tx.sites.admin_http import (
    KeyApiError,
    answers,
    arg,
    bool_arg,
    int_arg,
    json_answer,
    read_body,
)
from cllama_tx.store.spend_reports import logs_reader, totals_reader

__all__ = ["SpendApi", "spend_log"]

DAY = 86400.0
MAX_LOGS = 10000
#: The window LiteLLM's top-spenders views cover.
LAST_30_DAYS = 30 * DAY


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def parse_date(text: str | None, name: str, end: bool = False) -> float | None:
    """
    C{YYYY-MM-DD} (UTC midnight; as an end date, the midnight after it, so
    the day counts whole) or RFC 3339 / C{YYYY-MM-DD HH:MM:SS} -> epoch seconds.
    """
    if not text:
        return None
    try:
        if len(text) == 10:
            day = datetime.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc)
            return day.timestamp() + (DAY if end else 0.0)
        moment = datetime.datetime.fromisoformat(text.replace("Z", "+00:00").replace(" ", "T", 1))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.timezone.utc)
        return moment.timestamp()
    except ValueError:
        raise KeyApiError(400, f"'{name}' must be YYYY-MM-DD or RFC 3339", name) from None


def _prompt_tokens(row: Mapping[str, Any]) -> int:
    """Every prompt token of a ledger row: plain input, cache reads and writes."""
    return row["input_tokens"] + row["cache_read_tokens"] + row["cache_write_tokens"]


def spend_log(row: Mapping[str, Any], key: Any = None) -> dict[str, Any]:
    """
    One ledger row in LiteLLM's spend-log shape (never a key, only its
    hash).  C{key} is the row's virtual key, when known (its alias and
    tags are in the log, as LiteLLM's metadata has them).
    """
    key_metadata = getattr(key, "metadata", None) or {}
    tags = list(dict.fromkeys([*(getattr(key, "tags", ()) or ()),
                               *[t for t in key_metadata.get("tags") or () if isinstance(t, str)]]))
    metadata = {
        "user_api_key": row["key_id"],
        "user_api_key_alias": getattr(key, "key_alias", None),
        "user_api_key_team_id": row["team_id"],
        "user_api_key_org_id": row.get("organization_id"),
        "user_api_key_user_id": row["user_id"],
        "cllama_request_id": row["request_id"],
        "agent": row["agent"],
        "status": "success" if 200 <= row["status"] < 300 else "failure",
        # What the key's metadata asks to be carried on its spend logs (LiteLLM's spend_logs_metadata).
        "spend_logs_metadata": key_metadata.get("spend_logs_metadata"),
    }
    return {
        "request_id": row.get("response_id") or row["request_id"],
        "cllama_request_id": row["request_id"],
        "call_type": "acompletion",
        "api_key": row["key_id"] or "",
        "team_id": row["team_id"],
        "organization_id": row.get("organization_id"),
        "user": row["user_id"] or "",
        "end_user": row.get("end_user"),
        "agent": row["agent"],
        "model": row["effective_model"] or "",
        "model_group": row["requested_model"],
        "model_id": None,
        "api_base": "",
        "custom_llm_provider": row["provider"],
        "spend": row["cost_usd"],
        # The row keeps plain input apart from the cache tokens (docs/LEDGER.md).
        "prompt_tokens": _prompt_tokens(row),
        "completion_tokens": row["output_tokens"],
        "total_tokens": _prompt_tokens(row) + row["output_tokens"],
        "startTime": _iso(row["ts"]),
        "endTime": _iso(row["ts"] + row["latency_ms"] / 1000.0),
        "completionStartTime": _iso(row["ts"] + row["ttfb_ms"] / 1000.0) if row.get("ttfb_ms") is not None else None,
        "request_duration_ms": round(row["latency_ms"]),
        "status": "success" if 200 <= row["status"] < 300 else "failure",
        "status_code": row["status"],
        "cache_hit": "False",
        "cache_key": "",
        "request_tags": tags,
        "metadata": metadata,
        "messages": {},
        "response": {},
        "cache_read_tokens": row["cache_read_tokens"],
        "cache_write_tokens": row["cache_write_tokens"],
        "priced": row["priced"],
        "estimated": row["estimated"],
    }


def _metrics(total: Mapping[str, Any]) -> dict[str, Any]:
    """LiteLLM's daily-activity metrics of one total."""
    return {
        "spend": round(total["spend"], 10),
        "prompt_tokens": total["prompt_tokens"],
        "completion_tokens": total["completion_tokens"],
        "cache_read_input_tokens": total["cache_read_tokens"],
        "cache_creation_input_tokens": total["cache_write_tokens"],
        "total_tokens": total["total_tokens"],
        "successful_requests": total["successful_requests"],
        "failed_requests": total["failed_requests"],
        "api_requests": total["requests"],
    }


class SpendApi:
    """
    @param auth: the management API's L{cllama_tx.sites.admin_http.AdminAuth}.
    @param ledger: the ledger (C{report}, C{rows_after}).
    @param keys: the virtual key store (aliases and tags of the keys in the logs).
    @param directory: the directory (team aliases in the reports), or None.
    """

    def __init__(self, auth: Any, ledger: Any, keys: Any, clock: Any, directory: Any = None) -> None:
        self.auth = auth
        self._ledger = ledger
        self._keys = keys
        self._clock = clock
        self._directory = directory

    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    def _key(self, token_hash: str | None) -> Any:
        return None if token_hash is None or self._keys is None else self._keys.get(token_hash)

    def _log(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return spend_log(row, self._key(row["key_id"]))

    @staticmethod
    def _key_filter(request: Any, name: str = "api_key") -> str | None:
        raw = arg(request, name)
        if raw is None:
            return None
        token_hash = token_hash_of(raw)
        if token_hash is None:
            raise KeyApiError(400, f"'{name}' must be a key (sk-...) or its token hash", name)
        return token_hash

    def _filters(self, request: Any) -> dict[str, str | None]:
        return {
            "key_id": self._key_filter(request),
            "user_id": arg(request, "user_id"),
            "team_id": arg(request, "team_id"),
            "organization_id": arg(request, "organization_id"),
            "end_user": arg(request, "end_user") or arg(request, "customer_id"),
            "request_id": arg(request, "request_id"),
        }

    async def _totals(self, groups: list[str], since: float | None, until: float | None,
                      filters: Mapping[str, str | None], limit: int = 10000) -> list[dict[str, Any]]:
        return await self._ledger.report(lambda dialect: totals_reader(dialect, groups, since, until, filters, limit))

    # -- rows

    @answers
    async def logs(self, request: Any) -> bytes:
        """
        C{GET /spend/logs?api_key=&user_id=&team_id=&end_user=&request_id=&start_date=&end_date=&summarize=}:
        the rows, newest first (at most 10,000), or with both dates and
        without C{summarize=false}, LiteLLM's daily summary.
        """
        self.auth.require_master(request, "billing")
        start = parse_date(arg(request, "start_date"), "start_date")
        end = parse_date(arg(request, "end_date"), "end_date", end=True)
        filters = self._filters(request)
        summarize = arg(request, "summarize") is None or bool_arg(request, "summarize")
        if start is not None and end is not None and summarize:
            return json_answer(request, 200, await self._daily_summary(start, end, filters), no_store=True)
        limit = int_arg(request, "limit", MAX_LOGS, 1, MAX_LOGS)
        rows = await self._ledger.report(lambda _d: logs_reader(start, end, filters, MAX_LOGS))
        rows = rows[-limit:]
        return json_answer(request, 200, [self._log(r) for r in reversed(rows)], no_store=True)

    async def _daily_summary(self, start: float, end: float, filters: Mapping[str, str | None]) -> list[dict]:
        totals = await self._totals(["day", "user_id", "model"], start, end, filters)
        days: dict[str, dict[str, Any]] = {}
        for total in totals:
            day = days.setdefault(total["day"], {"startTime": total["day"], "spend": 0.0, "users": {}, "models": {}})
            day["spend"] += total["spend"]
            user = total["user_id"] or ""
            model = total["model"] or ""
            day["users"][user] = day["users"].get(user, 0.0) + total["spend"]
            day["models"][model] = day["models"].get(model, 0.0) + total["spend"]
        out = []
        moment = start
        while moment < end:
            name = datetime.datetime.fromtimestamp(moment, datetime.timezone.utc).strftime("%Y-%m-%d")
            out.append(days.get(name, {"startTime": name, "spend": 0, "users": {}, "models": {}}))
            moment += DAY
        return out

    @answers
    async def logs_v2(self, request: Any) -> bytes:
        """C{GET /spend/logs/v2?page=&page_size=&start_date=&end_date=&...}: one page, newest first."""
        self.auth.require_master(request, "billing")
        start = parse_date(arg(request, "start_date"), "start_date")
        end = parse_date(arg(request, "end_date"), "end_date", end=True)
        page = int_arg(request, "page", 1, 1, None)
        size = int_arg(request, "page_size", 50, 1, 100)
        filters = self._filters(request)
        rows = await self._ledger.report(lambda _d: logs_reader(start, end, filters, MAX_LOGS))
        rows.reverse()
        total = len(rows)
        chosen = rows[(page - 1) * size: page * size]
        return json_answer(request, 200, {
            "data": [self._log(r) for r in chosen],
            "total": total,
            "page": page,
            "page_size": size,
            "total_pages": -(-total // size),
        }, no_store=True)

    @answers
    async def events(self, request: Any) -> bytes:
        """
        C{GET /api/spend/events?after=<cursor>&limit=}: rows committed after
        the cursor, oldest first, and the cursor to pass next time.  Cursors
        are the ledger's row ids, which only grow in commit order, so a
        worker that keeps the last cursor never misses nor repeats a row.
        """
        self.auth.require_master(request, "billing")
        after = int_arg(request, "after", 0, 0, None)
        limit = int_arg(request, "limit", 500, 1, None)
        rows, cursor = await self._ledger.rows_after(after, min(limit, 5000))
        return json_answer(request, 200, {
            "events": [dict(self._log(r), cursor=r["id"]) for r in rows],
            "next_cursor": cursor,
        }, no_store=True)

    # -- totals

    @answers
    async def global_spend(self, request: Any) -> bytes:
        """C{GET /global/spend}: the spend of the last 30 days, as LiteLLM's C{{"spend", "max_budget"}}."""
        self.auth.require_master(request, "billing")
        totals = await self._totals([], self._now() - LAST_30_DAYS, None, {})
        return json_answer(request, 200, {"spend": totals[0]["spend"] if totals else 0.0, "max_budget": None})

    @answers
    async def keys(self, request: Any) -> bytes:
        """C{GET /global/spend/keys?limit=}: the keys that spent most in the last 30 days."""
        self.auth.require_master(request, "billing")
        limit = int_arg(request, "limit", 10000, 1, 10000)
        totals = await self._totals(["key_id"], self._now() - LAST_30_DAYS, None, {}, 10000)
        out = []
        for total in totals:
            if total["key_id"] is None:
                continue
            key = self._key(total["key_id"])
            out.append({"api_key": total["key_id"], "total_spend": total["spend"],
                        "key_alias": getattr(key, "key_alias", None), "key_name": getattr(key, "key_name", None)})
        return json_answer(request, 200, out[:limit])

    @answers
    async def models(self, request: Any) -> bytes:
        """C{GET /global/spend/models?limit=}: the models that cost most in the last 30 days."""
        self.auth.require_master(request, "billing")
        limit = int_arg(request, "limit", 10, 1, 10000)
        totals = await self._totals(["model"], self._now() - LAST_30_DAYS, None, {}, limit)
        return json_answer(request, 200, [{"model": t["model"], "total_spend": t["spend"]} for t in totals])

    def _team_name(self, team_id: str | None) -> str:
        team = self._directory.team(team_id) if self._directory is not None and team_id else None
        if team is not None and team.alias:
            return team.alias
        return team_id or "Unassigned"

    @answers
    async def teams(self, request: Any) -> bytes:
        """C{GET /global/spend/teams}: daily spend per team over the last 30 days (LiteLLM's shape)."""
        self.auth.require_master(request, "billing")
        totals = await self._totals(["day", "team_id"], self._now() - LAST_30_DAYS, None, {})
        by_day: dict[str, dict[str, float]] = defaultdict(dict)
        per_team: dict[str, float] = defaultdict(float)
        for total in totals:
            name = self._team_name(total["team_id"])
            by_day[total["day"]][name] = round(by_day[total["day"]].get(name, 0.0) + total["spend"], 10)
            per_team[name] += total["spend"]
        ranked = sorted(per_team.items(), key=lambda item: item[1], reverse=True)
        return json_answer(request, 200, {
            "daily_spend": [{"date": day, **by_day[day]} for day in sorted(by_day)],
            "teams": sorted(per_team),
            "total_spend_per_team": [{"team_id": t, "total_spend": s} for t, s in ranked[:10]],
        })

    @answers
    async def end_users(self, request: Any) -> bytes:
        """
        C{POST /global/spend/end_users} C{{"api_key", "startTime", "endTime"}}:
        the 100 customers that spent most (the last 30 days by default).
        """
        self.auth.require_master(request, "billing")
        doc = read_body(request, allow_empty=True)
        now = self._now()
        start = parse_date(doc.get("startTime"), "startTime") if doc.get("startTime") else now - LAST_30_DAYS
        end = parse_date(doc.get("endTime"), "endTime") if doc.get("endTime") else None
        key = doc.get("api_key")
        filters = {"key_id": token_hash_of(key) if isinstance(key, str) else None}
        totals = await self._totals(["end_user"], start, end, filters, 100)
        return json_answer(request, 200, [
            {"end_user": t["end_user"], "total_spend": t["spend"], "total_count": t["requests"]} for t in totals
        ])

    @answers
    async def report(self, request: Any) -> bytes:
        """
        C{GET /global/spend/report?start_date=&end_date=&group_by=team|customer|api_key}
        (and C{api_key}, C{internal_user_id}, C{team_id}, C{customer_id}):
        spend per day and team (or customer), by model; per key and model
        for C{group_by=api_key} or C{api_key}.
        """
        self.auth.require_master(request, "billing")
        start = parse_date(arg(request, "start_date"), "start_date")
        end = parse_date(arg(request, "end_date"), "end_date", end=True)
        if start is None or end is None:
            raise KeyApiError(400, "Please provide start_date and end_date", "start_date")
        group_by = arg(request, "group_by") or "team"
        if group_by not in ("team", "customer", "api_key"):
            raise KeyApiError(400, "'group_by' must be team, customer or api_key", "group_by")
        filters = {
            "key_id": self._key_filter(request),
            "user_id": arg(request, "internal_user_id"),
            "team_id": arg(request, "team_id"),
            "end_user": arg(request, "customer_id"),
        }
        if group_by == "api_key" or filters["key_id"] is not None:
            totals = await self._totals(["key_id", "model"], start, end, filters)
            keys: dict[str | None, dict[str, Any]] = {}
            for t in totals:
                entry = keys.setdefault(t["key_id"], {"api_key": t["key_id"], "total_cost": 0.0, "total_input_tokens": 0,
                                                      "total_output_tokens": 0, "model_details": []})
                entry["total_cost"] += t["spend"]
                entry["total_input_tokens"] += t["prompt_tokens"]
                entry["total_output_tokens"] += t["completion_tokens"]
                entry["model_details"].append({"model": t["model"], "total_cost": t["spend"],
                                               "prompt_tokens": t["prompt_tokens"],
                                               "completion_tokens": t["completion_tokens"]})
            return json_answer(request, 200, list(keys.values()))
        column, label, member = ("team_id", "team_name", "teams") if group_by == "team" else \
            ("end_user", "customer", "customers")
        totals = await self._totals(["day", column, "model"], start, end, filters)
        days: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
        for t in totals:
            name = self._team_name(t[column]) if group_by == "team" else (t[column] or "Unassigned")
            entry = days[t["day"]].setdefault(name, {label: name, "total_spend": 0.0, "metadata": []})
            entry["total_spend"] += t["spend"]
            entry["metadata"].append({"model": t["model"], "spend": t["spend"], "total_tokens": t["total_tokens"]})
        return json_answer(request, 200, [
            {"group_by_day": day, member: sorted(days[day].values(), key=lambda e: -e["total_spend"])}
            for day in sorted(days)
        ])

    @answers
    async def daily_activity(self, request: Any, scope: str = "user") -> bytes:
        """
        C{GET /user/daily/activity} (and C{/team/daily/activity}) with
        C{start_date}, C{end_date}, C{model}, C{api_key}, C{user_id}
        (C{team_ids}), C{page}, C{page_size}: per day, the totals and their
        breakdown by model, provider and key (LiteLLM's shape).
        """
        self.auth.require_master(request, "billing")
        start = parse_date(arg(request, "start_date"), "start_date")
        end = parse_date(arg(request, "end_date"), "end_date", end=True)
        page = int_arg(request, "page", 1, 1, None)
        size = int_arg(request, "page_size", 50, 1, 1000)
        filters: dict[str, str | None] = {
            "key_id": self._key_filter(request),
            "model": arg(request, "model"),
            "user_id": arg(request, "user_id"),
        }
        team_ids = (arg(request, "team_ids") or "").split(",") if scope == "team" else [""]
        rows: list[dict[str, Any]] = []
        for team_id in team_ids:
            narrowed = dict(filters, team_id=team_id or None)
            rows.extend(await self._totals(["day", "model", "provider", "key_id"], start, end, narrowed))
        days: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            days[row["day"]].append(row)
        names = sorted(days)
        results = []
        for day in names[(page - 1) * size: page * size]:
            results.append(self._day(day, days[day]))
        grand = _sum([r for day in names for r in days[day]])
        metadata = {
            "total_spend": grand["spend"],
            "total_prompt_tokens": grand["prompt_tokens"],
            "total_completion_tokens": grand["completion_tokens"],
            "total_tokens": grand["total_tokens"],
            "total_api_requests": grand["requests"],
            "total_successful_requests": grand["successful_requests"],
            "total_failed_requests": grand["failed_requests"],
            "total_cache_read_input_tokens": grand["cache_read_tokens"],
            "total_cache_creation_input_tokens": grand["cache_write_tokens"],
            "page": page,
            "total_pages": max(1, -(-len(names) // size)),
            "has_more": page * size < len(names),
        }
        return json_answer(request, 200, {"results": results, "metadata": metadata})

    def _day(self, day: str, rows: list[dict]) -> dict[str, Any]:
        breakdown: dict[str, dict[str, Any]] = {"models": {}, "providers": {}, "api_keys": {}}
        for group, column in (("models", "model"), ("providers", "provider"), ("api_keys", "key_id")):
            by: dict[str, list[dict]] = defaultdict(list)
            for row in rows:
                by[row[column] or ""].append(row)
            for name, members in by.items():
                entry: dict[str, Any] = {"metrics": _metrics(_sum(members))}
                if group == "api_keys":
                    key = self._key(name or None)
                    entry["metadata"] = {"key_alias": getattr(key, "key_alias", None)}
                breakdown[group][name] = entry
        return {"date": day, "metrics": _metrics(_sum(rows)), "breakdown": breakdown}


def _sum(rows: list[dict]) -> dict[str, Any]:
    names = ("spend", "requests", "successful_requests", "failed_requests", "prompt_tokens", "completion_tokens",
             "total_tokens", "cache_read_tokens", "cache_write_tokens")
    return {name: sum(r[name] for r in rows) for name in names}

