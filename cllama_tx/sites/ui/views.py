"""
What each page shows, as plain JSON-able dicts.

One function per page gathers the numbers from the services (ledger
totals, the budget book, the provider registry, the pricing table, the
virtual key store); the HTML pages (L{cllama_tx.sites.ui.pages}) render exactly
these dicts, and the same dicts are each page's JSON twin.  No secret ever
enters a view: provider keys arrive masked from the registry, virtual keys
are reduced to their display fields.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet import defer

from cllama_tx import __version__
from cllama_tx.surfaces.errors import ProxyError

DAY = 86400.0

# What each page's totals count, stated in its JSON twin (docs/UI.md,
# "What the numbers count").  The ledger is the record: every figure
# below is a sum over its rows.
COUNTS = {
    "requests": (
        "every request of an agent or virtual key the proxy answered, refused ones included "
        "(those refused before routing, such as unknown model names, are listed as \"(unrouted)\" "
        "and counted in unrouted_requests); count_tokens calls are free and not requests"
    ),
    "errors": "requests answered with a status below 200 or of 400 and above, refusals included",
    "prompt_tokens": "every prompt token: plain input, cache reads and cache writes, each counted once",
    "tokens": "prompt_tokens plus output_tokens",
    "cost_usd": "what the requests that reached a provider cost, as priced from the ledger's rows",
    "unpriced_requests": "requests that reached a provider whose model had no price: their cost is not in cost_usd",
}
BUDGET_COUNTS = {
    "requests": (
        "successful (2xx) inference requests in the budget's window; refusals, failures and "
        "count_tokens calls do not count against max_requests"
    ),
    "cost_usd": "what the requests in the window cost, refused and failed ones included when they cost anything",
}
PRICING_COUNTS = {
    "models": (
        "models a provider served at least once (a 2xx answer); names that were refused, or "
        "that the provider answered with an error only (a 404 for a model that does not exist), "
        "are not listed"
    ),
}

@attrs.define
class Services:
    """Everything the pages read or change, handed over by the daemon."""

    pod: str | None
    contexts: Any
    providers: Any
    clock: Any
    ledger: Any = None
    operations: Any = None
    governance: Any = None
    pricing: Any = None
    keys: Any = None
    audit: Any = None
    model_table: Any = None
    # The key API's users, teams, organisations and customers, and their spend.
    directory: Any = None
    budgets: Any = None


# --- days and periods ---------------------------------------------------------------


def utc_day(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def shift_day(day: str, days: int) -> str:
    return (datetime.date.fromisoformat(day) + datetime.timedelta(days=days)).isoformat()


PERIODS = (
    ("today", "Today"),
    ("yesterday", "Yesterday"),
    ("7d", "Last 7 days"),
    ("30d", "Last 30 days"),
    ("month", "This month"),
    ("last_month", "Last month"),
    ("all", "All time"),
)


def period_bounds(period: str | None, now: float, since: str | None = None, until: str | None = None):
    """
    C{(key, label, since_day, until_day)} of a period name (UTC days, both
    inclusive, None for open), or of explicit C{since}/C{until} days.

    @raise ValueError: an unknown period or a malformed day.
    """
    today = utc_day(now)
    if since or until:
        for day in (since, until):
            if day:
                datetime.date.fromisoformat(day)
        if since and until and since > until:
            raise ValueError("the first day is after the last day")
        label = f"{since or 'the beginning'} to {until or 'today'}"
        return "custom", label, since or None, until or None
    period = period or "month"
    if period == "today":
        return period, "Today", today, today
    if period == "yesterday":
        day = shift_day(today, -1)
        return period, "Yesterday", day, day
    if period == "7d":
        return period, "Last 7 days", shift_day(today, -6), today
    if period == "30d":
        return period, "Last 30 days", shift_day(today, -29), today
    if period == "month":
        return period, "This month", today[:8] + "01", today
    if period == "last_month":
        last = shift_day(today[:8] + "01", -1)
        return period, "Last month", last[:8] + "01", last
    if period == "all":
        return period, "All time", None, None
    raise ValueError(f"unknown period {period!r}")


# --- shared pieces ----------------------------------------------------------------------


def _totals(services: Services):
    return services.ledger.totals() if services.ledger is not None else None


def _empty_period() -> dict:
    return {
        "total_cost_usd": 0.0,
        "total_requests": 0,
        "errors": 0,
        "priced_requests": 0,
        "unpriced_requests": 0,
        "estimated_requests": 0,
        "prompt_tokens": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "cache_read_tokens": 0,
        "cache_write_tokens": 0,
        "unrouted_requests": 0,
        "pricing_status": "priced",
        "models": [],
    }


def _period(totals, since: str | None, until: str | None, agent: str | None = None) -> dict:
    if totals is None:
        return _empty_period()
    return totals.period(since, until, agent)


def _brief(period: dict) -> dict:
    requests = period["total_requests"]
    return {
        "cost_usd": period["total_cost_usd"],
        "requests": requests,
        "errors": period["errors"],
        "error_rate": (period["errors"] / requests) if requests else None,
        "tokens": period["prompt_tokens"] + period["output_tokens"],
        "prompt_tokens": period["prompt_tokens"],
        "output_tokens": period["output_tokens"],
        "cache_read_tokens": period["cache_read_tokens"],
        "cache_write_tokens": period["cache_write_tokens"],
        "unpriced_requests": period["unpriced_requests"],
        "unrouted_requests": period["unrouted_requests"],
    }


def agent_ids(services: Services) -> list[str]:
    """Agents with a context, and agents that only the ledger remembers."""
    ids = set(services.contexts.agent_ids())
    totals = _totals(services)
    if totals is not None:
        ids.update(totals.agents())
    return sorted(ids)


def identity_kinds(services: Services) -> dict[str, str]:
    """
    What each id of L{agent_ids} is: C{agent} (it has a context), C{key} (a
    virtual key's user or alias: the ledger bills key requests to them), or
    C{retired} (only the ledger remembers it).
    """
    with_context = set(services.contexts.agent_ids())
    key_names: set[str] = set()
    store = services.keys
    if store is not None:
        for vk in store.list(page=1, size=max(1, len(store))).keys:
            key_names.add(vk.claw_id)
    kinds = {}
    for agent in agent_ids(services):
        if agent in with_context:
            kinds[agent] = "agent"
        elif agent in key_names:
            kinds[agent] = "key"
        else:
            kinds[agent] = "retired"
    return kinds


def _budget_dict(budget) -> dict:
    return {
        "behavior": budget.behavior,
        "limit_usd": budget.limit_usd,
        "max_requests": budget.max_requests,
        "window": budget.window,
        "period": budget.period,
        "tiers": [{"threshold": t.threshold, "models": list(t.models), "name": t.name} for t in budget.tiers],
        "spent_offset_usd": budget.spent_offset_usd,
    }


def budget_state(services: Services, agent: str) -> dict:
    """
    An agent's budget as it is enforced now: the effective (layered)
    budget, what counts against it, the tier in force, and a status
    (C{none}, C{ok}, C{warning} at 80 %, C{exhausted}, C{invalid}).
    """
    context = services.contexts.get(agent)
    override = services.ledger.budget_override(agent) if services.ledger is not None else None
    state: dict[str, Any] = {
        "status": "none",
        "effective": None,
        "files": context.budget if context is not None else None,
        "runtime": override,
        "usage": None,
        "used_fraction": None,
        "tier": None,
        "problem": None,
    }
    governance = services.governance
    if governance is None or context is None:
        return state
    try:
        budget = governance.budget(context)
    except ProxyError:
        state.update(status="invalid", problem="the layered budget of this agent is invalid (see the daemon's log)")
        return state
    if budget is None:
        return state
    state["effective"] = _budget_dict(budget)
    try:
        usage = governance.book.usage(agent, budget, context.timezone)
    except Exception as e:  # an unknown timezone: the request path answers 503 too
        state.update(status="invalid", problem=str(e))
        return state
    fractions = []
    if budget.limit_usd:
        fractions.append((usage.cost_usd + usage.reserved_usd) / budget.limit_usd)
    if budget.max_requests:
        fractions.append((usage.requests + usage.reserved_requests) / budget.max_requests)
    used = max(fractions) if fractions else None
    state["usage"] = {
        "cost_usd": usage.cost_usd,
        "requests": usage.requests,
        "unknown_cost_requests": usage.unknown_cost_requests,
        "reserved_usd": usage.reserved_usd,
        "reserved_requests": usage.reserved_requests,
        "remaining_fraction": usage.remaining_fraction,
        "window_start": usage.start,
        "window_end": usage.end,
        "resets_at": usage.end if budget.period is not None else None,
    }
    state["used_fraction"] = used
    if budget.tiers and usage.remaining_fraction is not None:
        from cllama_tx.governance.tiers import current_tier_index

        index = current_tier_index(budget.tiers, usage.remaining_fraction)
        if index is None and budget.behavior == "soft_alert":
            index = len(budget.tiers) - 1
        if index is not None:
            tier = budget.tiers[index]
            state["tier"] = {
                "index": index,
                "count": len(budget.tiers),
                "name": tier.name or f"tier {index + 1}",
                "threshold": tier.threshold,
                "models": list(tier.models),
            }
        else:
            state["tier"] = {"index": None, "count": len(budget.tiers), "name": "none left", "threshold": None, "models": []}
    if used is None:
        state["status"] = "ok"
    elif used >= 1 - 1e-9:
        state["status"] = "exhausted"
    elif used >= 0.8:
        state["status"] = "warning"
    else:
        state["status"] = "ok"
    return state


# --- overview ---------------------------------------------------------------------------------


def overview(services: Services, *, days: int = 30) -> dict:
    now = services.clock.seconds()
    today = utc_day(now)
    month_start = today[:8] + "01"
    totals = _totals(services)
    spend = {
        "today": _brief(_period(totals, today, today)),
        "month": _brief(_period(totals, month_start, today)),
        "all_time": _brief(_period(totals, None, None)),
    }
    daily = _daily(totals, today, days)
    agents = []
    kinds = identity_kinds(services)
    for agent in agent_ids(services):
        month = _brief(_period(totals, month_start, today, agent))
        budget = budget_state(services, agent)
        agents.append(
            {
                "agent": agent,
                "kind": kinds.get(agent, "agent"),
                "month": month,
                "today": _brief(_period(totals, today, today, agent)),
                "budget_status": budget["status"],
                "used_fraction": budget["used_fraction"],
                "limit_usd": (budget["effective"] or {}).get("limit_usd"),
                "tier": (budget["tier"] or {}).get("name"),
            }
        )
    agents.sort(key=lambda a: (-a["month"]["cost_usd"], -a["month"]["requests"], a["agent"]))
    month_models = [m for m in _period(totals, month_start, today)["models"] if m["routed"]]
    top_models = sorted(month_models, key=lambda m: (-m["cost_usd"], -m["requests"]))[:6]
    providers = services.providers.snapshot()
    summary = totals.summary() if totals is not None else {}
    return {
        "pod": services.pod,
        "version": __version__,
        "now": now,
        "today": today,
        "counts": COUNTS,
        # What GET / answered before the pages existed (kept for scripts).
        "agents": services.contexts.agent_ids(),
        "providers": providers,
        "spend": spend,
        "daily": daily,
        "agent_spend": agents,
        "top_models": [
            {
                "provider": m["provider"],
                "model": m["model"],
                "cost_usd": m["cost_usd"],
                "requests": m["requests"],
                "tokens": m["prompt_tokens"] + m["output_tokens"],
                "pricing_status": m["pricing_status"],
            }
            for m in top_models
        ],
        "ledger": {
            "requests": summary.get("requests", 0),
            "errors": summary.get("errors", 0),
            "unidentified_requests": summary.get("unidentified_requests", 0),
            "unrouted_requests": summary.get("unrouted_requests", 0),
        },
        "attention": attention(services, agents, providers, totals, spend),
    }


def attention(services: Services, agents: list[dict], providers: list[dict], totals, spend: dict) -> list[dict]:
    """What an operator should look at now, most severe first."""
    items = []
    for p in providers:
        keys = p.get("keys") or []
        if not keys or p.get("keyless"):
            continue
        usable = [k for k in keys if k["state"] in ("ready", "cooldown", "suspect")]
        if not usable:
            items.append(
                {"level": "critical", "text": f"Provider {p['name']}: no usable key (every key is dead or disabled)", "href": "/providers"}
            )
        for k in keys:
            if k["state"] == "dead":
                why = k.get("last_error_reason") or k.get("last_error_code") or "refused by the provider"
                again = "; re-probed now" if k.get("probing") else (
                    f"; next re-probe {k['next_probe_at']}" if k.get("next_probe_at") else ""
                )
                items.append({"level": "critical", "text": f"Provider {p['name']}: key {k['masked_secret'] or k['id']} is dead ({why}{again})", "href": "/providers"})
            elif k["state"] == "suspect":
                items.append({"level": "warning", "text": f"Provider {p['name']}: key {k['masked_secret'] or k['id']} answered 401 and is being re-checked", "href": "/providers"})
            elif k["state"] == "cooldown":
                items.append({"level": "warning", "text": f"Provider {p['name']}: key {k['masked_secret'] or k['id']} is cooling down", "href": "/providers"})
    for a in agents:
        if a["budget_status"] == "exhausted":
            items.append({"level": "critical", "text": f"Agent {a['agent']}: budget exhausted", "href": "/budgets#agent-" + a["agent"]})
        elif a["budget_status"] == "invalid":
            items.append({"level": "critical", "text": f"Agent {a['agent']}: budget is invalid, its requests are refused", "href": "/budgets#agent-" + a["agent"]})
        elif a["budget_status"] == "warning":
            items.append(
                {"level": "warning", "text": f"Agent {a['agent']}: {round((a['used_fraction'] or 0) * 100)}% of its budget used", "href": "/budgets#agent-" + a["agent"]}
            )
    if totals is not None:
        unpriced = {(e["provider"], e["model"]) for e in _served_models(totals).values() if e["unpriced_requests"]}
        if unpriced:
            items.append({"level": "warning", "text": f"{len(unpriced)} model(s) in use without a price: their spend is not counted", "href": "/pricing"})
    today = spend["today"]
    if today["requests"] >= 20 and (today["error_rate"] or 0) >= 0.05:
        items.append({"level": "warning", "text": f"{round(today['error_rate'] * 100)}% of today's requests failed", "href": "/requests?errors=1"})
    order = {"critical": 0, "warning": 1}
    items.sort(key=lambda i: order[i["level"]])
    return items


# --- agents ---------------------------------------------------------------------------------------


@defer.inlineCallbacks
def agents(services: Services, only: str | None = None, recent: int = 5):
    now = services.clock.seconds()
    today = utc_day(now)
    month_start = today[:8] + "01"
    totals = _totals(services)
    kinds = identity_kinds(services)
    order = {"agent": 0, "key": 1, "retired": 2}
    ids = [only] if only is not None else sorted(agent_ids(services), key=lambda a: (order[kinds.get(a, "retired")], a))
    cards = []
    recents = yield defer.gatherResults(
        [
            services.ledger.recent(recent, agent) if services.ledger is not None else defer.succeed([])
            for agent in ids
        ],
        consumeErrors=True,
    )
    for agent, rows in zip(ids, recents, strict=True):
        context = services.contexts.get(agent)
        all_time = _period(totals, None, None, agent)
        month = _period(totals, month_start, today, agent)
        # The models it used; its requests refused before routing are in
        # the briefs' unrouted_requests.
        models = sorted((m for m in all_time["models"] if m["routed"]), key=lambda m: (-m["cost_usd"], -m["requests"]))
        cards.append(
            {
                "agent": agent,
                "kind": kinds.get(agent, "retired"),
                "has_context": context is not None,
                "pod": getattr(context, "pod", None),
                "service": getattr(context, "service", None),
                "type": getattr(context, "type", None),
                "timezone": getattr(context, "timezone", None),
                "model_policy": _policy_summary(getattr(context, "model_policy", None)),
                "today": _brief(_period(totals, today, today, agent)),
                "month": _brief(month),
                "all_time": _brief(all_time),
                "budget": budget_state(services, agent),
                "models": [
                    {
                        "provider": m["provider"],
                        "model": m["model"],
                        "requests": m["requests"],
                        "cost_usd": m["cost_usd"],
                        "tokens": m["prompt_tokens"] + m["output_tokens"],
                        "pricing_status": m["pricing_status"],
                    }
                    for m in models
                ],
                "recent": [_request_row(r) for r in rows],
                "last_request_at": rows[0]["ts"] if rows else None,
            }
        )
        if only is not None:
            cards[-1]["daily"] = _daily(totals, today, 30, agent)
    return {"now": now, "counts": COUNTS, "agents": cards}


def _daily(totals, today: str, days: int, agent: str | None = None) -> list[dict]:
    out = []
    for offset in range(days - 1, -1, -1):
        day = shift_day(today, -offset)
        p = _period(totals, day, day, agent)
        out.append({"day": day, "cost_usd": p["total_cost_usd"], "requests": p["total_requests"]})
    return out


def _policy_summary(policy) -> dict | None:
    if not isinstance(policy, dict):
        return None
    allowed = policy.get("allowed")
    refs = [a.get("ref") for a in allowed if isinstance(a, dict)] if isinstance(allowed, list) else []
    return {"mode": policy.get("mode") or "clamp", "refs": [r for r in refs if isinstance(r, str)]}


def _request_row(row: dict) -> dict:
    status = row["status"]
    return {
        "id": row.get("id"),
        "request_id": row["request_id"],
        "ts": row["ts"],
        "agent": row["agent"],
        "provider": row["provider"],
        "requested_model": row["requested_model"],
        "model": row["effective_model"],
        "status": status,
        "ok": 200 <= status < 400,
        "stream": row["stream"],
        "latency_ms": row["latency_ms"],
        "ttfb_ms": row["ttfb_ms"],
        # Every prompt token (the row keeps plain input apart from the cache).
        "input_tokens": row["input_tokens"] + row["cache_read_tokens"] + row["cache_write_tokens"],
        "cache_read_tokens": row["cache_read_tokens"],
        "cache_write_tokens": row["cache_write_tokens"],
        "output_tokens": row["output_tokens"],
        "cost_usd": row["cost_usd"],
        "priced": row["priced"],
        "estimated": row["estimated"],
        "key_id": row.get("key_id"),
    }


# --- requests -----------------------------------------------------------------------------------


@defer.inlineCallbacks
def requests(services: Services, agent: str | None = None, errors_only: bool = False, limit: int = 100):
    rows = []
    if services.ledger is not None:
        fetched = yield services.ledger.recent(limit * 5 if errors_only else limit, agent)
        rows = [_request_row(r) for r in fetched]
        if errors_only:
            rows = [r for r in rows if not r["ok"]][:limit]
    return {
        "now": services.clock.seconds(),
        "counts": {"input_tokens": COUNTS["prompt_tokens"]},
        "agent": agent,
        "errors_only": errors_only,
        "limit": limit,
        "agents": agent_ids(services),
        "requests": rows,
    }


# --- costs ------------------------------------------------------------------------------------------


def costs(services: Services, period: str | None = None, since: str | None = None, until: str | None = None) -> dict:
    now = services.clock.seconds()
    key, label, since_day, until_day = period_bounds(period, now, since, until)
    totals = _totals(services)
    rows = []
    agents_out = []
    for agent in agent_ids(services):
        p = _period(totals, since_day, until_day, agent)
        if not p["total_requests"]:
            continue
        agents_out.append({"agent": agent, **_brief(p), "pricing_status": p["pricing_status"]})
        for m in p["models"]:
            rows.append(
                {
                    "agent": agent,
                    "provider": m["provider"],
                    "model": m["model"],
                    "routed": m["routed"],
                    "requests": m["requests"],
                    "errors": m["errors"],
                    "prompt_tokens": m["prompt_tokens"],
                    "output_tokens": m["output_tokens"],
                    "cache_read_tokens": m["cache_read_tokens"],
                    "cache_write_tokens": m["cache_write_tokens"],
                    "cost_usd": m["cost_usd"],
                    "priced_requests": m["priced_requests"],
                    "unpriced_requests": m["unpriced_requests"],
                    "estimated_requests": m["estimated_requests"],
                    "pricing_status": m["pricing_status"],
                }
            )
    rows.sort(key=lambda r: (-r["cost_usd"], r["agent"], r["provider"], r["model"]))
    agents_out.sort(key=lambda a: (-a["cost_usd"], a["agent"]))
    total = _period(totals, since_day, until_day)
    return {
        "now": now,
        "period": key,
        "label": label,
        "since_day": since_day,
        "until_day": until_day,
        "periods": [{"key": k, "label": text} for k, text in PERIODS],
        "counts": COUNTS,
        "total": {**_brief(total), "pricing_status": total["pricing_status"]},
        "agents": agents_out,
        "rows": rows,
    }


CSV_COLUMNS = (
    "agent",
    "provider",
    "model",
    "requests",
    "errors",
    "prompt_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_usd",
    "priced_requests",
    "unpriced_requests",
    "estimated_requests",
    "pricing_status",
)


def costs_csv(view: dict) -> bytes:
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(("since_day", "until_day") + CSV_COLUMNS)
    for row in view["rows"]:
        writer.writerow([view["since_day"] or "", view["until_day"] or ""] + [_csv_cell(row[c]) for c in CSV_COLUMNS])
    return out.getvalue().encode("utf-8")


def _csv_cell(value: Any) -> Any:
    # Spreadsheets run cells that start with these as formulas: a model name
    # is whatever an upstream said, so it is defused.
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    if isinstance(value, float):
        return f"{value:.10f}".rstrip("0").rstrip(".") or "0"
    return value


# --- providers --------------------------------------------------------------------------------------


def providers(services: Services) -> dict:
    from cllama_tx.providers.catalog import API_FORMATS, AUTH_MODES

    snapshot = services.providers.snapshot()
    for p in snapshot:
        states = [k["state"] for k in p["keys"]]
        p["pool"] = {state: states.count(state) for state in ("ready", "cooldown", "suspect", "dead", "disabled")}
        # The registry's retry_after is 1 whenever a key is ready: only a
        # pool with nothing ready is waiting for anything.
        p["waiting_s"] = p["retry_after"] if not p["pool"]["ready"] and p["pool"]["cooldown"] else None
    snapshot.sort(key=lambda p: (not p["keys"], p["name"]))
    in_use = [p for p in snapshot if p["configured"] or p["keys"] or p["source"] != "catalog"]
    others = [p for p in snapshot if p not in in_use]
    return {
        "now": services.clock.seconds(),
        "manageable": hasattr(services.providers, "add_key"),
        "path": getattr(services.providers, "path", None),
        "providers": in_use,
        "unconfigured": others,
        "auth_modes": sorted(AUTH_MODES),
        "api_formats": sorted(API_FORMATS),
    }


# --- budgets ------------------------------------------------------------------------------------------


def budgets(services: Services) -> dict:
    from cllama_tx.governance.budgets import BEHAVIORS
    from cllama_tx.governance.periods import PERIODS as CALENDAR
    from cllama_tx.sites.operations import BUDGET_KEYS

    out = []
    for agent in agent_ids(services):
        state = budget_state(services, agent)
        has_context = services.contexts.get(agent) is not None
        if not has_context and state["runtime"] is None:
            continue  # a virtual key's user, or a retired agent: nothing to govern here
        out.append({"agent": agent, "has_context": has_context, **state})
    return {
        "now": services.clock.seconds(),
        "editable": services.operations is not None,
        "counts": BUDGET_COUNTS,
        "fields": list(BUDGET_KEYS) + ["spent"],
        "behaviors": list(BEHAVIORS),
        "periods": list(CALENDAR),
        "agents": out,
    }


# --- virtual keys ----------------------------------------------------------------------------------------


VKEY_LIST_LIMIT = 500


def vkey_record(vk: Any, now: float) -> dict:
    """
    The display fields of a virtual key (L{cllama_tx.identity.virtual_keys.VirtualKey}):
    its id is the token hash; the key itself is never stored, so never here.
    """
    expires = getattr(vk, "expires", None)
    blocked = bool(getattr(vk, "blocked", False))
    if blocked:
        state = "blocked"
    elif expires is not None and now >= expires:
        state = "expired"
    else:
        state = "active"
    return {
        "id": vk.token_hash,
        "key_name": getattr(vk, "key_name", None),
        "key_alias": getattr(vk, "key_alias", None),
        "team_id": getattr(vk, "team_id", None),
        "user_id": getattr(vk, "user_id", None),
        "models": list(getattr(vk, "models", ()) or ()),
        "max_budget": getattr(vk, "max_budget", None),
        "budget_duration": getattr(vk, "budget_duration", None),
        "rpm_limit": getattr(vk, "rpm_limit", None),
        "tpm_limit": getattr(vk, "tpm_limit", None),
        "created_at": getattr(vk, "created_at", None),
        "expires": expires,
        "blocked": blocked,
        "state": state,
    }


VKEY_SPEND_LIMIT = 100
"""Spend is looked up (one ledger read each) for at most this many keys per page."""


@defer.inlineCallbacks
def virtual_keys(services: Services):
    store = services.keys
    now = services.clock.seconds()
    if store is None:
        return {"enabled": False, "keys": [], "total": 0, "shown": 0}
    page = store.list(page=1, size=VKEY_LIST_LIMIT)
    keys = [vkey_record(vk, now) for vk in page.keys]
    cost_of = getattr(services.ledger, "cost_of", None)
    if cost_of is not None and keys:
        shown = keys[:VKEY_SPEND_LIMIT]
        spent = yield defer.DeferredList([cost_of(key_id=k["id"]) for k in shown], consumeErrors=True)
        for k, (ok, value) in zip(shown, spent, strict=True):
            k["spend_usd"] = value if ok else None
    return {"enabled": True, "keys": keys, "total": page.total_count, "shown": len(keys), "now": now}


# --- pricing --------------------------------------------------------------------------------------------------


def _served_models(totals) -> dict[tuple[str, str], dict]:
    """
    The models a provider served at least once (a 2xx or 3xx answer), with
    their counts over every agent.  A name every request of which failed
    (a 404 for a model that does not exist) is no model to price.
    """
    models: dict[tuple[str, str], dict] = {}
    for (agent, provider, model), bucket in totals.buckets().items():
        if not (agent and provider and model):
            continue
        entry = models.setdefault(
            (provider, model),
            {"provider": provider, "model": model, "requests": 0, "served_requests": 0, "priced_requests": 0,
             "unpriced_requests": 0, "cost_usd": 0.0, "agents": set()},
        )
        entry["requests"] += bucket.requests
        entry["served_requests"] += bucket.requests - bucket.errors
        entry["priced_requests"] += bucket.priced_requests
        entry["unpriced_requests"] += bucket.unpriced_requests
        entry["cost_usd"] += bucket.cost_usd
        entry["agents"].add(agent)
    return {key: entry for key, entry in models.items() if entry["served_requests"] > 0}


def pricing(services: Services) -> dict:
    totals = _totals(services)
    models = _served_models(totals) if totals is not None else {}
    unpriced, priced = [], []
    table = services.pricing
    for (provider, model), entry in sorted(models.items()):
        entry["agents"] = sorted(entry["agents"])
        entry["cost_usd"] = round(entry["cost_usd"], 10)
        price = table.price(provider, model) if table is not None else None
        entry["price"] = (
            {
                "input": price.input,
                "output": price.output,
                "cache_read": price.cache_read,
                "cache_write": price.cache_write,
            }
            if price is not None
            else None
        )
        if entry["unpriced_requests"]:
            entry["hint"] = table.unpriced_hint(provider, model) if table is not None else None
            unpriced.append(entry)
        else:
            priced.append(entry)
    unpriced.sort(key=lambda e: -e["unpriced_requests"])
    snippet: dict[str, dict] = {}
    for entry in unpriced:
        if entry["price"] is None:
            snippet.setdefault(entry["provider"], {})[entry["model"]] = {"input": 0.0, "output": 0.0}
    return {
        "counts": PRICING_COUNTS,
        "override_file": getattr(table, "_override_path", None) if table is not None else None,
        "table_updated": getattr(table, "updated", None) if table is not None else None,
        "unpriced": unpriced,
        "priced": priced,
        "snippet": snippet,
        "unpriced_requests": sum(e["unpriced_requests"] for e in unpriced),
    }


# --- the operator model table -------------------------------------------------------------------


def model_table(services: Services) -> dict:
    """The model table in force (never a key: only where each comes from)."""
    table = services.model_table
    if table is None:
        return {"file": None, "loaded_at": None, "entries": [], "aliases": {}, "families": []}
    return table.snapshot()


def status(services: Services) -> dict:
    """GET /api/status (kept as it was)."""
    return {
        "pod": services.pod,
        "version": __version__,
        "agents": services.contexts.agent_ids(),
        "providers": services.providers.snapshot(),
    }


def sum_rows(rows: Iterable[dict], field: str) -> float:
    return sum(r[field] for r in rows)
