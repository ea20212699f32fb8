"""
Billing for platforms that mint virtual keys: the per-request spend logs
(LiteLLM's C{GET /spend/logs}), a cursor API a billing worker polls every
few seconds (C{GET /api/spend/events}) that never misses nor repeats a
row, and team budgets.  All behind the master key, on the API port.
"""

from __future__ import annotations

import datetime
import json

from cllama_tx.governance.budgets import BudgetError, parse_budget
from cllama_tx.identity.principals import LIFETIME_WINDOW
from cllama_tx.identity.virtual_keys import InvalidField
from cllama_tx.sites.keys import KeyApiError
from cllama_tx.surfaces.errors import ProxyError


def _json(request, status: int, doc) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(doc).encode("utf-8")


def _error(request, error: ProxyError) -> bytes:
    if error.retry_after is not None:
        request.setHeader(b"retry-after", str(error.retry_after).encode("ascii"))
    return _json(
        request,
        error.status,
        {"error": {"message": error.message, "type": "invalid_request_error", "param": None, "code": str(error.status)}},
    )


def _arg(request, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[0].decode("utf-8", "replace") if values else None


def _date(text: str | None, name: str) -> float | None:
    """YYYY-MM-DD (UTC midnight) or RFC 3339 -> epoch seconds."""
    if not text:
        return None
    try:
        if len(text) == 10:
            day = datetime.datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=datetime.timezone.utc)
            return day.timestamp()
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise ProxyError(400, "invalid_parameter", f"{name} must be YYYY-MM-DD or RFC 3339") from None


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _prompt_tokens(row: dict) -> int:
    """Every prompt token of a ledger row: plain input, cache reads and writes."""
    return row["input_tokens"] + row["cache_read_tokens"] + row["cache_write_tokens"]


def spend_log(row: dict) -> dict:
    """One ledger row in LiteLLM's spend-log shape (never a key, only its hash)."""
    return {
        "request_id": row["request_id"],
        "api_key": row["key_id"],
        "team_id": row["team_id"],
        "user": row["user_id"],
        "end_user": row["agent"],
        "model": row["effective_model"],
        "model_group": row["requested_model"],
        "custom_llm_provider": row["provider"],
        "spend": row["cost_usd"],
        # The row keeps plain input apart from the cache tokens (docs/LEDGER.md).
        "prompt_tokens": _prompt_tokens(row),
        "completion_tokens": row["output_tokens"],
        "total_tokens": _prompt_tokens(row) + row["output_tokens"],
        "startTime": _iso(row["ts"]),
        "endTime": _iso(row["ts"] + row["latency_ms"] / 1000.0),
        "status": "success" if 200 <= row["status"] < 300 else "failure",
        "status_code": row["status"],
        "cache_read_tokens": row["cache_read_tokens"],
        "cache_write_tokens": row["cache_write_tokens"],
        "priced": row["priced"],
        "estimated": row["estimated"],
    }


class BillingApi:
    def __init__(self, *, keys_api, ledger, governance, audit) -> None:
        self._keys_api = keys_api
        self._ledger = ledger
        self._governance = governance
        self._audit = audit

    def _master(self, request) -> None:
        """The master key, through the key API's check (throttled like every operator credential)."""
        try:
            self._keys_api.require_master(request, surface="billing")
        except KeyApiError as e:
            code = {403: "admin_off", 429: "too_many_attempts"}.get(e.status, "invalid_master_key")
            raise ProxyError(e.status, code, e.message, retry_after=e.retry_after) from None

    async def spend_logs(self, request) -> bytes:
        """GET /spend/logs?start_date=&end_date=&team_id=&user_id=&api_key=&limit="""
        try:
            self._master(request)
            limit = int(_arg(request, "limit") or 1000)
            rows = await self._ledger.rows_between(
                _date(_arg(request, "start_date"), "start_date"),
                _date(_arg(request, "end_date"), "end_date"),
                limit=max(1, min(limit, 10000)),
                team_id=_arg(request, "team_id"),
                user_id=_arg(request, "user_id"),
                key_id=_arg(request, "api_key"),
            )
        except ValueError:
            return _error(request, ProxyError(400, "invalid_parameter", "limit must be a whole number"))
        except ProxyError as e:
            return _error(request, e)
        return _json(request, 200, [spend_log(row) for row in rows])

    async def events(self, request) -> bytes:
        """
        GET /api/spend/events?after=<cursor>&limit=: rows committed after the
        cursor, oldest first, and the cursor to pass next time.  Cursors are
        the ledger's row ids, which only grow in commit order, so a worker
        that keeps the last cursor never misses nor repeats a row.
        """
        try:
            self._master(request)
            after = int(_arg(request, "after") or 0)
            limit = int(_arg(request, "limit") or 500)
            if after < 0 or limit < 1:
                raise ValueError
        except ValueError:
            return _error(request, ProxyError(400, "invalid_parameter", "after and limit must be whole numbers"))
        except ProxyError as e:
            return _error(request, e)
        rows, cursor = await self._ledger.rows_after(after, min(limit, 5000))
        return _json(request, 200, {"events": [dict(spend_log(r), cursor=r["id"]) for r in rows], "next_cursor": cursor})

    async def team_budget(self, request) -> bytes:
        """
        POST /team/new or /team/update: {"team_id", "max_budget",
        "budget_duration", "model_aliases"}: a budget shared by every key of
        the team, and/or names its keys may use for models (LiteLLM's
        C{model_aliases}; C{null} or C{{}} removes them).  A field left out
        is left as it is.
        """
        try:
            self._master(request)
            doc = json.loads(request.content.read() or b"{}")
            team = doc.get("team_id") if isinstance(doc, dict) else None
            if not isinstance(team, str) or not team or len(team) > 256:
                raise ProxyError(400, "invalid_parameter", "team_id must be a non-empty string")
            max_budget = doc.get("max_budget")
            has_aliases = "model_aliases" in doc
            if max_budget is None and not has_aliases:
                raise ProxyError(400, "invalid_parameter", "send max_budget (a positive number of dollars) and/or model_aliases")
            budget = duration = None
            if max_budget is not None:
                if not isinstance(max_budget, (int, float)) or isinstance(max_budget, bool) or max_budget <= 0:
                    raise ProxyError(400, "invalid_parameter", "max_budget must be a positive number of dollars")
                budget = {"limit_usd": float(max_budget), "behavior": "hard_stop"}
                duration = doc.get("budget_duration")
                budget["window"] = duration if isinstance(duration, str) and duration else LIFETIME_WINDOW
                parse_budget(budget)
            aliases = None
            if has_aliases:
                aliases = await self._keys_api.store.set_team_aliases(team, doc["model_aliases"])
        except InvalidField as e:
            return _error(request, ProxyError(400, "invalid_parameter", str(e)))
        except (ValueError, BudgetError) as e:
            return _error(request, ProxyError(400, "invalid_parameter", str(e)))
        except ProxyError as e:
            return _error(request, e)
        answer: dict = {"team_id": team}
        if budget is not None:
            scope = f"team:{team}"
            entry = await self._ledger.set_budget_override(scope, budget, None, "master-key")
            self._governance.set_runtime(scope, entry)
            self._audit.emit("operator", None, None, action="team_budget_set", actor="master-key", team_id=team)
            answer.update(max_budget=budget["limit_usd"], budget_duration=duration)
        if aliases is not None:
            self._audit.emit(
                "operator", None, None, action="team_aliases_set", actor="master-key", team_id=team,
                aliases=sorted(aliases),
            )
            answer["model_aliases"] = aliases
        return _json(request, 200, answer)
