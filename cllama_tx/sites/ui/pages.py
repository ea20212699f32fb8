"""
The HTML pages: each renders one view dict (L{cllama_tx.sites.ui.views}) into
the templates of C{web/templates}.  Sections marked C{data-live} are
swapped in place by C{ui.js} when the server says something changed, so
they never hold a form an operator may be typing into.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from cllama_tx.sites.ui.render import (
    Html,
    Templates,
    ago,
    bar_chart,
    compact,
    count,
    duration,
    el,
    gauge,
    hbar,
    millis,
    money,
    money_short,
    percent,
    plural,
    utc,
)

NAV = (
    ("overview", "/", "Overview"),
    ("agents", "/agents", "Agents"),
    ("costs", "/costs", "Costs"),
    ("requests", "/requests", "Requests"),
    ("budgets", "/budgets", "Budgets"),
    ("providers", "/providers", "Providers & keys"),
    ("keys", "/keys", "Virtual keys"),
    ("pricing", "/pricing", "Pricing coverage"),
    ("models", "/models", "Model table"),
)

TONE = {"ok": "ok", "warning": "warn", "exhausted": "crit", "invalid": "crit", "none": "muted"}
KEY_TONE = {"ready": "ok", "cooldown": "warn", "suspect": "warn", "dead": "crit", "disabled": "muted"}


@attrs.define
class PageContext:
    """Per-request things every page needs."""

    templates: Templates
    static: Any
    csrf: str | None
    now: float
    pod: str | None
    version: str
    actor_name: str | None = None
    auth_disabled: bool = False
    flash: list = attrs.Factory(list)
    live: bool = True


def csrf_field(ctx: PageContext) -> Html:
    if not ctx.csrf:
        return Html("")
    return el("input", {"type": "hidden", "name": "csrf", "value": ctx.csrf})


def post_form(ctx: PageContext, action: str, fields: dict, label: str, *, tone: str = "", confirm: str | None = None, title: str | None = None) -> Html:
    """A one-button form (an action on a row)."""
    return el(
        "form",
        {"method": "post", "action": action, "class": "inline", "data-confirm": confirm},
        csrf_field(ctx),
        [el("input", {"type": "hidden", "name": k, "value": v}) for k, v in fields.items()],
        el("button", {"type": "submit", "class": f"btn btn-small {tone}".strip(), "title": title}, label),
    )


def badge(text: str, tone: str = "muted", title: str | None = None) -> Html:
    return el("span", {"class": f"badge badge-{tone}", "title": title}, text)


def layout(ctx: PageContext, *, page: str, title: str, subtitle: Any = "", content: Html, tools: Any = "") -> Html:
    nav = el(
        "ul",
        None,
        [
            el("li", None, el("a", {"href": href, "class": "active" if key == page else None, "aria-current": "page" if key == page else None}, label))
            for key, href, label in NAV
        ],
    )
    if ctx.auth_disabled:
        banner = el(
            "div",
            {"class": "banner banner-crit", "role": "alert"},
            el("strong", None, "Authentication is OFF."),
            " Anyone who can reach this port can manage keys and budgets. Set CLLAMA_UI_TOKEN and restart without the no-auth option.",
        )
        account = el("p", {"class": "who"}, "no sign-in (auth off)")
    else:
        banner = Html("")
        account = Html.join(
            [
                el("p", {"class": "who"}, "Signed in", f" as {ctx.actor_name}" if ctx.actor_name else ""),
                el(
                    "form",
                    {"method": "post", "action": "/signout"},
                    csrf_field(ctx),
                    el("button", {"type": "submit", "class": "btn btn-ghost btn-small", "id": "signout"}, "Sign out"),
                )
                if ctx.csrf
                else "",
            ]
        )
    flash = Html.join(
        el("div", {"class": f"flash flash-{level}", "role": "status"}, text) for level, text in ctx.flash
    )
    return ctx.templates.render(
        "layout",
        title=title,
        css=ctx.static.url("ui.css"),
        js=ctx.static.url("ui.js"),
        icon=ctx.static.url("favicon.svg"),
        page=page,
        live="on" if ctx.live else "off",
        pod=ctx.pod or "no pod name",
        version=ctx.version,
        nav=nav,
        account=account,
        banner=banner,
        heading=title,
        subtitle=subtitle,
        tools=tools,
        flash=flash,
        content=content,
    )


def simple_page(ctx: PageContext, *, title: str, message: Any, status_line: str = "") -> Html:
    """Errors and notices outside the signed-in shell."""
    return ctx.templates.render(
        "message",
        title=title,
        css=ctx.static.url("ui.css"),
        icon=ctx.static.url("favicon.svg"),
        status_line=status_line,
        message=message,
    )


def signin_page(ctx: PageContext, *, csrf: str, next_url: str, error: str | None, locked: bool, retry_after: int | None) -> Html:
    if locked:
        notice = el(
            "div",
            {"class": "flash flash-error", "role": "alert"},
            "The operator UI is locked: no operator token is configured. Set CLLAMA_UI_TOKEN "
            "(or let the daemon generate one in its state directory) and restart.",
        )
    elif retry_after is not None:
        notice = el(
            "div",
            {"class": "flash flash-error", "role": "alert", "id": "signin-error"},
            f"Too many failed sign-ins from your address. Try again in {duration(retry_after)}.",
        )
    elif error:
        notice = el("div", {"class": "flash flash-error", "role": "alert", "id": "signin-error"}, error)
    else:
        notice = Html("")
    return ctx.templates.render(
        "signin",
        css=ctx.static.url("ui.css"),
        icon=ctx.static.url("favicon.svg"),
        pod=ctx.pod or "cllama",
        notice=notice,
        csrf=csrf,
        next=next_url,
        disabled="disabled" if locked else "",
    )


# --- overview ----------------------------------------------------------------------------------------


def kpi(label: str, value: str, sub: Any = "", tone: str = "", ident: str | None = None, exact: str | None = None) -> Html:
    return el(
        "div",
        {"class": f"kpi {tone}".strip(), "id": ident},
        el("div", {"class": "kpi-label"}, label),
        el("div", {"class": "kpi-value", "title": exact}, value),
        el("div", {"class": "kpi-sub"}, sub),
    )


def money_kpi(label: str, amount: float, sub: Any = "", ident: str | None = None) -> Html:
    return kpi(label, money_short(amount), sub, ident=ident, exact=money(amount))


def overview_page(ctx: PageContext, view: dict) -> Html:
    spend = view["spend"]
    today, month, all_time = spend["today"], spend["month"], spend["all_time"]
    rate = today["error_rate"]
    kpis = el(
        "section",
        {"class": "kpis", "id": "kpis", "data-live": True, "aria-label": "Key figures"},
        money_kpi("Spend today", today["cost_usd"], plural(today["requests"], "request"), ident="kpi-spend-today"),
        money_kpi("Spend this month", month["cost_usd"], plural(month["requests"], "request"), ident="kpi-spend-month"),
        money_kpi("Spend all time", all_time["cost_usd"], plural(all_time["requests"], "request"), ident="kpi-spend-all"),
        kpi("Requests today", count(today["requests"]), f"{count(today['errors'])} failed", ident="kpi-requests"),
        kpi(
            "Tokens today",
            compact(today["tokens"]),
            f"{compact(today['prompt_tokens'])} in · {compact(today['output_tokens'])} out",
            ident="kpi-tokens",
        ),
        kpi(
            "Error rate today",
            percent(rate, 1) if rate is not None else "–",
            "of metered requests" if rate is not None else "no requests yet",
            tone="tone-crit" if (rate or 0) >= 0.05 and today["requests"] >= 20 else "",
            ident="kpi-errors",
        ),
    )
    attention = attention_panel(view["attention"], view)
    chart = daily_chart(view["daily"], "spend-chart")
    agent_rows = view["agent_spend"]
    peak = max((a["month"]["cost_usd"] for a in agent_rows), default=0.0) or 1.0
    bars = []
    for a in agent_rows[:12]:
        tone = {"exhausted": "crit", "warning": "warn", "invalid": "crit"}.get(a["budget_status"], "accent")
        used = a["used_fraction"]
        if used is not None:
            budget_text = f"{percent(used)} of budget"
        else:
            budget_text = {"key": "virtual key", "retired": "no context"}.get(a.get("kind"), "no budget")
        bars.append(
            el(
                "li",
                {"class": "agent-bar"},
                el("a", {"class": "agent-bar-name", "href": f"/agents#agent-{a['agent']}"}, a["agent"]),
                el("span", {"class": "agent-bar-track"}, hbar(a["month"]["cost_usd"] / peak, tone=tone)),
                el("span", {"class": "agent-bar-value num"}, money(a["month"]["cost_usd"])),
                el("span", {"class": f"agent-bar-budget {('text-' + tone) if used is not None and tone != 'accent' else 'muted'}"}, budget_text),
            )
        )
    if not bars:
        bars_html: Html = el("p", {"class": "empty"}, "No agents yet: add a context directory under CLAW_CONTEXT_ROOT.")
    else:
        bars_html = el("ul", {"class": "agent-bars"}, bars)
        if len(agent_rows) > 12:
            bars_html = Html(bars_html + el("p", {"class": "hint"}, el("a", {"href": "/agents"}, f"and {len(agent_rows) - 12} more agents →")))
    by_agent = el(
        "section",
        {"class": "card", "id": "agent-spend", "data-live": True},
        el("div", {"class": "card-head"}, el("h2", None, "Spend by agent"), el("span", {"class": "hint"}, "this month")),
        bars_html,
    )
    top_agents = el(
        "section",
        {"class": "card", "id": "top-agents", "data-live": True},
        el("div", {"class": "card-head"}, el("h2", None, "Top agents"), el("a", {"class": "hint", "href": "/agents"}, "all agents →")),
        table(
            ["Agent", "Today", "This month", "Requests", "Errors", "Tier"],
            [
                [
                    el("a", {"href": f"/agents#agent-{a['agent']}"}, a["agent"]),
                    money(a["today"]["cost_usd"]),
                    money(a["month"]["cost_usd"]),
                    count(a["month"]["requests"]),
                    count(a["month"]["errors"]),
                    a["tier"] or "–",
                ]
                for a in agent_rows[:8]
            ],
            numeric=(1, 2, 3, 4),
            empty="No agent has made a request this month.",
        ),
    )
    top_models = el(
        "section",
        {"class": "card", "id": "top-models", "data-live": True},
        el("div", {"class": "card-head"}, el("h2", None, "Top models"), el("a", {"class": "hint", "href": "/costs"}, "costs →")),
        table(
            ["Model", "Requests", "Tokens", "Cost"],
            [
                [
                    Html(el("span", {"class": "model"}, m["model"]) + el("span", {"class": "provider"}, m["provider"])
                         + (badge("unpriced", "warn") if m["pricing_status"] != "priced" else "")),
                    count(m["requests"]),
                    compact(m["tokens"]),
                    money(m["cost_usd"]),
                ]
                for m in view["top_models"]
            ],
            numeric=(1, 2, 3),
            empty="No model has been used this month.",
        ),
    )
    content = Html.join(
        [
            attention,
            kpis,
            el("div", {"class": "grid grid-wide"}, chart, by_agent),
            el("div", {"class": "grid"}, top_agents, top_models),
        ]
    )
    subtitle = f"{plural(len(view['agents']), 'agent')} · {plural(sum(1 for p in view['providers'] if p['configured']), 'provider')} configured"
    return layout(ctx, page="overview", title="Overview", subtitle=subtitle, content=content)


def attention_panel(items: list[dict], view: dict) -> Html:
    if not items:
        body = el(
            "div",
            {"class": "allclear"},
            el("span", {"class": "dot dot-ok", "aria-hidden": "true"}),
            el("strong", None, "All clear."),
            " Keys, budgets and pricing need nothing from you right now.",
        )
        return el("section", {"class": "attention attention-ok", "id": "attention", "data-live": True, "aria-label": "Needs attention"}, body)
    critical = sum(1 for i in items if i["level"] == "critical")
    head = f"{len(items)} thing{'s' if len(items) != 1 else ''} need{'s' if len(items) == 1 else ''} attention"
    return el(
        "section",
        {"class": f"attention {'attention-crit' if critical else 'attention-warn'}", "id": "attention", "data-live": True, "aria-label": "Needs attention"},
        el("h2", None, head),
        el(
            "ul",
            None,
            [
                el(
                    "li",
                    {"class": f"level-{i['level']}"},
                    el("span", {"class": f"dot dot-{'crit' if i['level'] == 'critical' else 'warn'}", "aria-hidden": "true"}),
                    el("a", {"href": i["href"]}, i["text"]),
                )
                for i in items[:8]
            ],
        ),
        el("p", {"class": "hint"}, f"and {len(items) - 8} more") if len(items) > 8 else "",
    )


def table(headers: list[str], rows: list[list[Any]], *, numeric: tuple = (), empty: str = "Nothing yet.", ident: str | None = None, row_ids: list | None = None, css: str = "") -> Html:
    if not rows:
        return el("p", {"class": "empty", "id": ident}, empty)
    head = el("thead", None, el("tr", None, [el("th", {"class": "num" if i in numeric else None, "scope": "col"}, h) for i, h in enumerate(headers)]))
    body = el(
        "tbody",
        None,
        [
            el(
                "tr",
                {"id": row_ids[n] if row_ids else None},
                [el("td", {"class": "num" if i in numeric else None}, cell) for i, cell in enumerate(row)],
            )
            for n, row in enumerate(rows)
        ],
    )
    return el("div", {"class": "table-wrap"}, el("table", {"class": f"table {css}".strip(), "id": ident}, head, body))


# --- agents ----------------------------------------------------------------------------------------------


def budget_summary(budget: dict | None) -> str:
    if not budget:
        return "no budget"
    parts = []
    if budget.get("limit_usd") is not None:
        parts.append(money(budget["limit_usd"]))
    if budget.get("max_requests") is not None:
        parts.append(f"{count(budget['max_requests'])} requests")
    span = budget.get("period") or (f"per {budget['window']}" if budget.get("window") else "")
    text = " and ".join(parts) + (f" {span}" if span else "")
    return f"{text} · {budget.get('behavior', 'hard_stop').replace('_', ' ')}"


def budget_gauge(state: dict) -> Html:
    status = state["status"]
    used = state["used_fraction"]
    tone = {"ok": "ok", "warning": "warn", "exhausted": "crit", "invalid": "crit"}.get(status, "muted")
    eff = state["effective"] or {}
    usage = state["usage"] or {}
    if status == "none":
        text, caption = "–", "no budget"
    elif status == "invalid":
        text, caption = "!", "invalid: requests refused"
    else:
        text = percent(used)
        if eff.get("limit_usd"):
            caption = f"{money(usage.get('cost_usd'))} of {money(eff['limit_usd'])}"
        else:
            caption = f"{count(usage.get('requests'))} of {count(eff.get('max_requests'))} requests"
    return el(
        "div",
        {"class": "gauge-box"},
        gauge(used if status not in ("none", "invalid") else None, tone, f"Budget used: {percent(used)}", text),
        el("div", {"class": f"gauge-caption{' text-crit' if status == 'invalid' else ''}"}, caption),
    )


def agent_card(ctx: PageContext, a: dict, *, recent_limit: int = 5) -> Html:
    state = a["budget"]
    badges = []
    if state["tier"]:
        t = state["tier"]
        badges.append(badge(f"tier: {t['name']}", "accent", title=", ".join(t["models"]) or None))
    if a["has_context"] or state["status"] != "none":
        badges.append(badge({"none": "no budget", "ok": "within budget", "warning": "budget 80%+", "exhausted": "budget exhausted", "invalid": "budget invalid"}[state["status"]], TONE[state["status"]]))
    if a.get("kind") == "key":
        badges.append(el("a", {"href": "/keys"}, badge("virtual key", "accent", title="Requests made with a virtual key are billed to its user (or alias)")))
    elif not a["has_context"]:
        badges.append(badge("no context", "muted", title="Known from the ledger only: its context directory is gone"))
    meta = [x for x in (a.get("pod"), a.get("service"), a.get("type")) if isinstance(x, str) and x]
    stats = el(
        "dl",
        {"class": "stats"},
        [
            el("div", None, el("dt", None, label), el("dd", None, value))
            for label, value in (
                ("Today", money(a["today"]["cost_usd"])),
                ("This month", money(a["month"]["cost_usd"])),
                ("All time", money(a["all_time"]["cost_usd"])),
                ("Requests", count(a["all_time"]["requests"])),
                ("Error rate", percent(a["all_time"]["error_rate"], 1) if a["all_time"]["error_rate"] is not None else "–"),
                ("Last request", ago(a["last_request_at"], ctx.now)),
            )
        ],
    )
    models = table(
        ["Model", "Requests", "Tokens", "Cost"],
        [
            [
                Html(el("span", {"class": "model"}, m["model"]) + el("span", {"class": "provider"}, m["provider"])
                     + (badge("unpriced", "warn") if m["pricing_status"] != "priced" else "")),
                count(m["requests"]),
                compact(m["tokens"]),
                money(m["cost_usd"]),
            ]
            for m in a["models"][:5]
        ],
        numeric=(1, 2, 3),
        empty="No requests yet.",
        css="table-compact",
    )
    recent = el(
        "ol",
        {"class": "recent"},
        [
            el(
                "li",
                None,
                status_pill(r["status"]),
                el("span", {"class": "model"}, r["model"] or r["requested_model"] or "–"),
                el("span", {"class": "muted num"}, millis(r["latency_ms"])),
                el("span", {"class": "num"}, money(r["cost_usd"])),
                el("time", {"class": "muted", "datetime": utc(r["ts"]), "title": utc(r["ts"])}, ago(r["ts"], ctx.now)),
            )
            for r in a["recent"][:recent_limit]
        ],
    ) if a["recent"] else el("p", {"class": "empty"}, "No requests yet.")
    return el(
        "article",
        {"class": "card agent-card", "id": f"agent-{a['agent']}"},
        el(
            "header",
            {"class": "agent-head"},
            el("div", None, el("h2", None, el("a", {"href": f"/agents/{a['agent']}"}, a["agent"])), el("p", {"class": "muted"}, " · ".join(meta) if meta else "")),
            el("div", {"class": "badges"}, badges),
        ),
        el(
            "div",
            {"class": "agent-body"},
            el(
                "div",
                {"class": "agent-budget"},
                budget_gauge(state),
                el("p", {"class": "muted small"}, budget_summary(state["effective"])) if state["effective"] else "",
            ),
            stats,
        ),
        el("h3", None, "Models"),
        models,
        el("h3", None, "Recent requests ", el("a", {"class": "hint", "href": f"/requests?agent={a['agent']}"}, "all →")),
        recent,
    )


def status_pill(status: int) -> Html:
    tone = "ok" if 200 <= status < 400 else "warn" if status in (429, 499) else "crit"
    return el("span", {"class": f"pill pill-{tone}", "title": f"HTTP {status}"}, str(status) if status else "—")


def agents_page(ctx: PageContext, view: dict) -> Html:
    cards = [agent_card(ctx, a) for a in view["agents"]]
    content = el("div", {"class": "cards", "id": "agent-cards", "data-live": True}, cards) if cards else el(
        "p", {"class": "empty"}, "No agents yet. Each directory under CLAW_CONTEXT_ROOT with a metadata.json is an agent."
    )
    return layout(ctx, page="agents", title="Agents", subtitle=f"{plural(len(cards), 'agent')}, from the context root and the ledger", content=content)


def daily_chart(daily: list[dict], ident: str, title: str = "Daily spend") -> Html:
    points = [
        (d["day"][5:].replace("-", "/"), d["cost_usd"], f"{d['day']}: {money(d['cost_usd'])}, {count(d['requests'])} requests")
        for d in daily
    ]
    return el(
        "section",
        {"class": "card", "id": ident, "data-live": True},
        el("div", {"class": "card-head"}, el("h2", None, title), el("span", {"class": "hint"}, f"last {len(points)} days, UTC; today highlighted")),
        bar_chart(points, label=f"{title} over the last {len(points)} days"),
    )


def agent_page(ctx: PageContext, view: dict) -> Html:
    [a] = view["agents"]
    content = Html.join(
        [
            daily_chart(a["daily"], "agent-chart", f"Daily spend of {a['agent']}"),
            el("div", {"id": "agent-detail", "data-live": True}, agent_card(ctx, a, recent_limit=25)),
        ]
    )
    return layout(ctx, page="agents", title=f"Agent {a['agent']}", subtitle=el("a", {"href": "/agents"}, "← all agents"), content=content)


# --- costs ---------------------------------------------------------------------------------------------------


def costs_page(ctx: PageContext, view: dict) -> Html:
    options = [el("option", {"value": p["key"], "selected": p["key"] == view["period"]}, p["label"]) for p in view["periods"]]
    options.append(el("option", {"value": "custom", "selected": view["period"] == "custom"}, "Custom dates"))
    query = f"period={view['period']}" if view["period"] != "custom" else f"since={view['since_day'] or ''}&until={view['until_day'] or ''}"
    filters = ctx.templates.render(
        "costs_filter",
        options=Html.join(options),
        since=view["since_day"] or "",
        until=view["until_day"] or "",
        csv_href=f"/costs.csv?{query}",
    )
    total = view["total"]
    kpis = el(
        "section",
        {"class": "kpis kpis-4", "id": "cost-kpis", "data-live": True},
        money_kpi("Spend", total["cost_usd"], view["label"], ident="kpi-cost"),
        kpi("Requests", count(total["requests"]), f"{count(total['errors'])} failed"),
        kpi("Tokens", compact(total["tokens"]), f"{compact(total['prompt_tokens'])} in · {compact(total['output_tokens'])} out"),
        kpi(
            "Unpriced requests",
            count(total["unpriced_requests"]),
            el("a", {"href": "/pricing"}, "price them →") if total["unpriced_requests"] else "every request priced",
            tone="tone-warn" if total["unpriced_requests"] else "",
        ),
    )
    agents = table(
        ["Agent", "Requests", "Errors", "Tokens", "Cost", "Share"],
        [
            [
                el("a", {"href": f"/agents#agent-{a['agent']}"}, a["agent"]),
                count(a["requests"]),
                count(a["errors"]),
                compact(a["tokens"]),
                money(a["cost_usd"]),
                Html(el("span", {"class": "share"}, hbar(a["cost_usd"] / total["cost_usd"] if total["cost_usd"] else 0.0)) + el("span", {"class": "num"}, percent(a["cost_usd"] / total["cost_usd"] if total["cost_usd"] else None))),
            ]
            for a in view["agents"]
        ],
        numeric=(1, 2, 3, 4),
        empty="No spend in this period.",
    )
    rows = table(
        ["Agent", "Provider", "Model", "Requests", "Input tokens", "Output tokens", "Cost", "Pricing"],
        [
            [
                r["agent"],
                r["provider"],
                el("span", {"class": "model"}, r["model"]),
                count(r["requests"]),
                count(r["prompt_tokens"]),
                count(r["output_tokens"]),
                money(r["cost_usd"]),
                pricing_badge(r),
            ]
            for r in view["rows"]
        ],
        numeric=(3, 4, 5, 6),
        empty="No requests in this period.",
        ident="cost-rows",
    )
    content = Html.join(
        [
            filters,
            kpis,
            el("section", {"class": "card", "id": "cost-agents", "data-live": True}, el("div", {"class": "card-head"}, el("h2", None, "By agent")), agents),
            el("section", {"class": "card", "id": "cost-models", "data-live": True}, el("div", {"class": "card-head"}, el("h2", None, "By agent and model")), rows),
        ]
    )
    return layout(ctx, page="costs", title="Costs", subtitle=f"{view['label']} · UTC days", content=content)


def pricing_badge(row: dict) -> Html:
    status = row["pricing_status"]
    if status == "priced":
        return badge("priced", "ok")
    title = f"{row['unpriced_requests']} of {row['requests']} requests had no price"
    return el("a", {"href": "/pricing"}, badge(status, "warn", title=title))


# --- requests ----------------------------------------------------------------------------------------------------


def requests_page(ctx: PageContext, view: dict) -> Html:
    options = [el("option", {"value": "", "selected": not view["agent"]}, "All agents")] + [
        el("option", {"value": a, "selected": a == view["agent"]}, a) for a in view["agents"]
    ]
    filters = ctx.templates.render(
        "requests_filter",
        options=Html.join(options),
        errors_checked="checked" if view["errors_only"] else "",
    )
    rows = table(
        ["When", "Agent", "Model", "Status", "Latency", "First byte", "Tokens in", "Tokens out", "Cost", "Request"],
        [
            [
                el("time", {"datetime": utc(r["ts"]), "title": utc(r["ts"])}, ago(r["ts"], ctx.now)),
                el("a", {"href": f"/requests?agent={r['agent']}"}, r["agent"]) if r["agent"] else el("span", {"class": "muted"}, "unidentified"),
                Html(el("span", {"class": "model"}, r["model"] or r["requested_model"] or "–") + (el("span", {"class": "provider"}, r["provider"]) if r["provider"] else "")),
                Html(status_pill(r["status"]) + (badge("stream", "muted") if r["stream"] else "") + (badge("estimated", "warn", "tokens estimated: the provider reported no usage") if r["estimated"] else "")),
                millis(r["latency_ms"]),
                millis(r["ttfb_ms"]),
                count(r["input_tokens"]),
                count(r["output_tokens"]),
                Html(money(r["cost_usd"]) + ("" if r["priced"] or not r["model"] else " ") + (badge("unpriced", "warn") if not r["priced"] and r["model"] and r["ok"] else "")),
                el("code", {"class": "rid", "title": r["request_id"]}, r["request_id"][-10:]),
            ]
            for r in view["requests"]
        ],
        numeric=(4, 5, 6, 7, 8),
        empty="No requests match." if view["agent"] or view["errors_only"] else "No requests yet.",
        ident="request-rows",
    )
    content = Html.join([filters, el("section", {"class": "card", "id": "requests", "data-live": True}, rows)])
    subtitle = f"the latest {view['limit']}" + (f" of {view['agent']}" if view["agent"] else "") + (", failures only" if view["errors_only"] else "")
    return layout(ctx, page="requests", title="Requests", subtitle=subtitle, content=content)


# --- providers -------------------------------------------------------------------------------------------------------


def providers_page(ctx: PageContext, view: dict) -> Html:
    auth_options = Html.join(el("option", {"value": m, "selected": m == "bearer"}, m) for m in view["auth_modes"])
    format_options = Html.join(el("option", {"value": f, "selected": f == "openai"}, f) for f in view["api_formats"])
    add_provider = ctx.templates.render("provider_add", csrf=csrf_field(ctx), auth_options=auth_options, format_options=format_options) if view["manageable"] else Html("")
    cards = [provider_card(ctx, p, view["manageable"]) for p in view["providers"]]
    others = view["unconfigured"]
    rest = el(
        "details",
        {"class": "card more", "id": "unconfigured"},
        el("summary", None, f"{len(others)} catalog providers without a key"),
        el(
            "ul",
            {"class": "plain-list"},
            [
                el(
                    "li",
                    {"id": f"provider-{p['name']}"},
                    el("strong", None, p["name"]),
                    el("span", {"class": "muted"}, f" {p['base_url'] or 'no base URL'} · {p['auth']} · {p['api_format']}"),
                    provider_key_form(ctx, p) if view["manageable"] and not p["keyless"] else "",
                )
                for p in others
            ],
        ),
    ) if others else Html("")
    reload = el(
        "form",
        {"method": "post", "action": "/reload", "class": "inline"},
        csrf_field(ctx),
        el("button", {"type": "submit", "class": "btn btn-ghost", "title": "Re-read providers.json, pricing, policy file and contexts"}, "Reload configuration"),
    ) if view.get("reload", True) else ""
    content = Html.join(
        [
            add_provider,
            el("div", {"class": "cards cards-1", "id": "provider-cards", "data-live": True}, cards)
            if cards
            else el("p", {"class": "empty"}, "No provider has a key yet: add one below or set e.g. OPENAI_API_KEY."),
            rest,
        ]
    )
    where = view["path"] or "memory only (no CLAW_AUTH_DIR)"
    return layout(ctx, page="providers", title="Providers & keys", subtitle=f"keys saved to {where}", content=content, tools=reload)


def provider_key_form(ctx: PageContext, p: dict) -> Html:
    return ctx.templates.render("key_add", csrf=csrf_field(ctx), provider=p["name"])


def provider_card(ctx: PageContext, p: dict, manageable: bool) -> Html:
    if p["keyless"]:
        state = badge("no key needed", "ok")
    elif p["configured"]:
        state = badge("ready", "ok")
    else:
        state = badge("not usable", "crit", title=p["problem"])
    pool = p.get("pool") or {}
    summary = " · ".join(f"{n} {state}" for state, n in pool.items() if n) or "no keys"
    keys = table(
        ["Key", "Secret", "Source", "State", "Last error", "Added", ""],
        [
            [
                Html(el("strong", None, k["label"] or k["id"]) + (badge("active", "accent") if k["active"] else "") + el("div", {"class": "muted small"}, k["id"])),
                el("code", {"class": "masked"}, k["masked_secret"] or "–"),
                "environment" if k["from_environment"] else k["source"],
                Html(badge(k["state"], KEY_TONE.get(k["state"], "muted")) + key_health(ctx, k)),
                Html(
                    el("span", None, " ".join(str(x) for x in (k.get("last_error_code"), k.get("last_error_reason")) if x))
                    + (el("div", {"class": "muted small"}, _stamp(k.get("last_error_at"), ctx.now)) if k.get("last_error_at") else "")
                ) if k.get("last_error_code") or k.get("last_error_reason") else el("span", {"class": "muted"}, "none"),
                _stamp(k.get("added_at"), ctx.now),
                key_actions(ctx, p, k) if manageable else "",
            ]
            for k in p["keys"]
        ],
        empty="No keys.",
        row_ids=[f"key-{p['name']}-{k['id']}".replace(":", "-") for k in p["keys"]],
        css="keys",
    ) if not p["keyless"] else el("p", {"class": "muted"}, "This provider uses no authentication.")
    return el(
        "article",
        {"class": "card provider-card", "id": f"provider-{p['name']}"},
        el(
            "header",
            {"class": "agent-head"},
            el(
                "div",
                None,
                el("h2", None, p["name"]),
                el("p", {"class": "muted small"}, f"{p['base_url'] or 'no base URL'} · auth {p['auth']} · {p['api_format']} format · from {p['source']}"
                   + (" · rate limits per model" if p.get("rate_limit_scope") == "model" else "")
                   + (f" · organization {p['organization']}" if p.get("organization") else "")
                   + (f" · project {p['project']}" if p.get("project") else "")),
            ),
            el(
                "div",
                {"class": "badges"},
                el("span", {"class": "muted small"}, f"pool: {summary}") if not p["keyless"] else "",
                state,
                badge(f"all cooling down, {p['waiting_s']} s", "warn") if p.get("waiting_s") else "",
            ),
        ),
        el("p", {"class": "problem"}, p["problem"]) if p.get("problem") else "",
        keys,
        provider_key_form(ctx, p) if manageable and not p["keyless"] else "",
    )


def key_health(ctx: PageContext, k: dict) -> Html:
    """Under a key's state: until when it cools down (for every model, or
    which ones), when a dead key is re-probed, whether a re-check runs."""
    lines = []
    if k.get("cooldown_until"):
        lines.append(el("div", {"class": "muted small"}, "until ", _stamp(k["cooldown_until"], ctx.now)))
    for c in k.get("model_cooldowns") or ():
        lines.append(el("div", {"class": "muted small key-model-cooldown"}, f"{c['model']} cooling down until ", _stamp(c["until"], ctx.now)))
    if k.get("probing"):
        lines.append(el("div", {"class": "muted small key-probe"}, "re-checking the key now"))
    elif k.get("next_probe_at"):
        lines.append(el("div", {"class": "muted small key-probe"}, "next re-probe ", _stamp(k["next_probe_at"], ctx.now)))
    return Html.join(lines)


def _stamp(text: str | None, now: float) -> Html:
    """A registry timestamp (RFC 3339) as "5 min ago", the exact time on hover."""
    if not text:
        return el("span", {"class": "muted"}, "–")
    import datetime

    try:
        ts = datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return el("span", {"class": "small"}, text)
    when = ago(ts, now) if ts <= now else "in " + duration(ts - now)
    return el("time", {"datetime": text, "title": utc(ts)}, when)


def key_actions(ctx: PageContext, p: dict, k: dict) -> Html:
    fields = {"provider": p["name"], "key_id": k["id"]}
    buttons = []
    if not k["active"] or k["state"] != "ready":
        buttons.append(post_form(ctx, "/providers/keys/activate", fields, "Activate", title="Make this the active key and mark it ready"))
    if k["state"] != "disabled":
        buttons.append(post_form(ctx, "/providers/keys/disable", fields, "Disable", tone="btn-warn", title="Take this key out of rotation"))
    buttons.append(
        post_form(
            ctx,
            "/providers/keys/delete",
            fields,
            "Delete",
            tone="btn-danger",
            confirm=f"Delete key {k['label'] or k['id']} of {p['name']}?" + (" It comes back while its environment variable is set." if k["from_environment"] else ""),
        )
    )
    return el("div", {"class": "actions"}, buttons)


# --- budgets ----------------------------------------------------------------------------------------------------------


def budgets_page(ctx: PageContext, view: dict) -> Html:
    cards = []
    for a in view["agents"]:
        eff = a["effective"] or {}
        usage = a["usage"] or {}
        runtime = a["runtime"] or {}
        rt_budget = runtime.get("budget") or {}
        if a["effective"]:
            effective = budget_summary(a["effective"])
        elif a["status"] == "invalid":
            effective = "invalid: " + (a["problem"] or "")
        else:
            effective = "no budget: unlimited"
        lines = [
            ("Budget", effective),
            ("Counted now", f"{money(usage.get('cost_usd'))} · {plural(usage.get('requests'), 'request')}" if usage else "–"),
            ("In flight", f"{money(usage.get('reserved_usd'))} · {plural(usage.get('reserved_requests'), 'request')}" if usage else "–"),
            ("Resets", utc(usage.get("resets_at"), with_seconds=False) if usage.get("resets_at") else ("rolling window" if eff.get("window") else "–")),
            ("Runtime change", f"{', '.join(sorted(rt_budget)) or 'spend reset'} by {runtime.get('updated_by') or 'unknown'}, {ago(runtime.get('updated_at'), ctx.now)}" if runtime else "none: files only"),
        ]
        facts = el("dl", {"class": "facts"}, [el("div", None, el("dt", None, k), el("dd", None, v)) for k, v in lines])
        if eff.get("tiers"):
            current = (a["tier"] or {}).get("index")
            tiers = el(
                "div",
                {"class": "tiers-box"},
                el("h3", None, "Tiers"),
                el(
                    "ol",
                    {"class": "tiers"},
                    [
                        el(
                            "li",
                            {"class": "current" if current == i else None},
                            el("strong", None, t["name"] or f"tier {i + 1}"),
                            el("span", {"class": "muted"}, f" while more than {percent(t['threshold'])} is left"),
                            el("div", {"class": "small model"}, ", ".join(t["models"])),
                        )
                        for i, t in enumerate(eff["tiers"])
                    ],
                ),
            )
        else:
            tiers = Html("")
        form = Html("")
        reset = Html("")
        if view["editable"]:
            behavior_options = Html.join(
                [el("option", {"value": "", "selected": True}, "(keep: " + (eff.get("behavior") or "hard_stop").replace("_", " ") + ")")]
                + [el("option", {"value": b}, b.replace("_", " ")) for b in view["behaviors"]]
            )
            period_options = Html.join(
                [el("option", {"value": "", "selected": True}, "(keep" + (f": {eff['period']}" if eff.get("period") else "") + ")")]
                + [el("option", {"value": p}, p) for p in view["periods"]]
            )
            form = ctx.templates.render(
                "budget_form",
                csrf=csrf_field(ctx),
                agent=a["agent"],
                limit_placeholder=f"now {_plain(eff['limit_usd'])}" if eff.get("limit_usd") is not None else "none",
                requests_placeholder=f"now {eff['max_requests']}" if eff.get("max_requests") is not None else "none",
                window_placeholder=f"now {eff['window']}" if eff.get("window") else "e.g. 24h",
                behavior_options=behavior_options,
                period_options=period_options,
                tiers_placeholder='[{"threshold": 0.5, "models": ["openai/gpt-4.1-mini"]}]',
                open="open" if a["status"] == "invalid" or a["agent"] == view.get("editing") else "",
            )
            reset = post_form(
                ctx,
                f"/budgets/{a['agent']}/reset",
                {},
                "Reset spend",
                tone="btn-warn",
                confirm=f"Forget {a['agent']}'s spend so far and its runtime budget change?",
                title="Forget the spend counted so far and the runtime change",
            )
        cards.append(
            el(
                "article",
                {"class": "card budget-card", "id": f"agent-{a['agent']}"},
                el(
                    "header",
                    {"class": "agent-head"},
                    el("h2", None, el("a", {"href": f"/agents/{a['agent']}"}, a["agent"])),
                    el(
                        "div",
                        {"class": "badges"},
                        badge(f"tier: {a['tier']['name']}", "accent") if a["tier"] else "",
                        badge({"none": "no budget", "ok": "within budget", "warning": "80%+ used", "exhausted": "exhausted", "invalid": "invalid"}[a["status"]], TONE[a["status"]]),
                        reset,
                    ),
                ),
                el("div", {"class": "budget-now", "id": f"budget-now-{a['agent']}", "data-live": True}, budget_gauge(a), facts, tiers),
                form,
            )
        )
    content = el("div", {"class": "cards budget-cards"}, cards) if cards else el("p", {"class": "empty"}, "No agents yet.")
    return layout(
        ctx,
        page="budgets",
        title="Budgets",
        subtitle="changes made here are stored in the ledger and win over the files until the spend is reset",
        content=content,
    )


def _plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# --- virtual keys --------------------------------------------------------------------------------------------------------


def keys_page(ctx: PageContext, view: dict, created: dict | None = None) -> Html:
    if not view["enabled"]:
        content = el(
            "section",
            {"class": "card notice", "id": "vkeys-off"},
            el("h2", None, "The virtual key API is off"),
            el(
                "p",
                None,
                "Virtual keys are short-lived sk-… keys for sandboxes and sessions, scoped to a team and a "
                "user, each with its own model list, budget and rate limits. This daemon runs without the "
                "key store, so there is nothing to manage here. See docs/VIRTUAL_KEYS.md to turn it on.",
            ),
        )
        return layout(ctx, page="keys", title="Virtual keys", subtitle="off", content=content)
    shown = Html("")
    if created is not None:
        shown = el(
            "section",
            {"class": "card reveal", "id": "vkey-created", "role": "status"},
            el("h2", None, "Copy the new key now"),
            el("p", None, "This is the only time it is shown: only its hash is stored. If it is lost, revoke it and create another."),
            el(
                "div",
                {"class": "secret-row"},
                el("code", {"id": "vkey-secret", "class": "secret"}, created["secret"]),
                el("button", {"type": "button", "class": "btn btn-small", "data-copy": "#vkey-secret"}, "Copy"),
            ),
        )
    form = ctx.templates.render("vkey_form", csrf=csrf_field(ctx), open="" if view["keys"] else "open")
    rows = table(
        ["Key", "Team / user", "Models", "Spent", "Limits", "Expires", "State", ""],
        [
            [
                Html(el("strong", None, k["key_alias"] or k["key_name"]) + el("div", {"class": "muted small"}, el("code", None, k["key_name"]), " · created ", ago(k["created_at"], ctx.now))),
                Html(el("div", None, k["team_id"] or "–") + el("div", {"class": "muted small"}, k["user_id"] or "")),
                el("span", {"class": "small"}, ", ".join(k["models"]) or "every model"),
                _key_spend(k),
                " · ".join(x for x in (f"{count(k['rpm_limit'])} rpm" if k["rpm_limit"] is not None else "", f"{compact(k['tpm_limit'])} tpm" if k["tpm_limit"] is not None else "") if x) or "–",
                el("span", {"title": utc(k["expires"])}, _until(k["expires"], ctx.now)) if k["expires"] is not None else el("span", {"class": "muted"}, "never"),
                badge(k["state"], {"active": "ok", "expired": "muted", "blocked": "warn"}[k["state"]]),
                post_form(ctx, "/keys/revoke", {"key_id": k["id"]}, "Revoke", tone="btn-danger", confirm=f"Revoke {k['key_alias'] or k['key_name']}? Clients using it are refused at once."),
            ]
            for k in view["keys"]
        ],
        empty="No virtual keys yet.",
        ident="vkey-rows",
        row_ids=[f"vkey-{k['id'][:16]}" for k in view["keys"]],
    )
    more = el("p", {"class": "hint"}, f"showing the newest {view['shown']} of {view['total']}") if view["total"] > view["shown"] else ""
    content = Html.join([shown, form, el("section", {"class": "card", "id": "vkeys", "data-live": True}, rows, more)])
    return layout(ctx, page="keys", title="Virtual keys", subtitle=f"{plural(view['total'], 'live key')} (expired ones are kept a while)", content=content)


def _key_spend(k: dict) -> Html:
    spent = k.get("spend_usd")
    budget = k["max_budget"]
    if budget is None:
        return el("span", None, money(spent) if spent is not None else "–", el("div", {"class": "muted small"}, "no budget"))
    per = f" per {k['budget_duration']}" if k["budget_duration"] else ""
    fraction = (spent or 0.0) / budget if budget else 1.0
    tone = "crit" if fraction >= 1 else "warn" if fraction >= 0.8 else "accent"
    return el(
        "div",
        {"class": "key-spend"},
        el("span", None, money(spent) if spent is not None else "–", el("span", {"class": "muted"}, f" of {money(budget)}{per}")),
        hbar(fraction, tone=tone),
    )


def _until(ts: float, now: float) -> str:
    if ts <= now:
        return "expired " + ago(ts, now)
    return "in " + duration(ts - now)


# --- pricing ---------------------------------------------------------------------------------------------------------------


def pricing_page(ctx: PageContext, view: dict) -> Html:
    unpriced = table(
        ["Model", "Unpriced requests", "Agents", "How to price it"],
        [
            [
                Html(el("span", {"class": "model"}, e["model"]) + el("span", {"class": "provider"}, e["provider"])),
                f"{count(e['unpriced_requests'])} of {count(e['requests'])}",
                ", ".join(e["agents"]),
                el("p", {"class": "small hint-text"}, e.get("hint") or ""),
            ]
            for e in view["unpriced"]
        ],
        numeric=(1,),
        empty="Every model in use has a price.",
        ident="unpriced-rows",
    )
    snippet = el(
        "div",
        {"class": "snippet"},
        el("p", None, "All of them at once, for the override file (USD per million tokens; replace the zeros):"),
        el("pre", {"id": "pricing-snippet"}, json.dumps(view["snippet"], indent=2)),
        el("button", {"type": "button", "class": "btn btn-small", "data-copy": "#pricing-snippet"}, "Copy"),
    ) if view["snippet"] else Html("")
    priced = table(
        ["Model", "Requests", "Input $/M", "Output $/M", "Cache read $/M", "Cost so far"],
        [
            [
                Html(el("span", {"class": "model"}, e["model"]) + el("span", {"class": "provider"}, e["provider"])),
                count(e["requests"]),
                _rate(e["price"], "input"),
                _rate(e["price"], "output"),
                _rate(e["price"], "cache_read"),
                money(e["cost_usd"]),
            ]
            for e in view["priced"]
        ],
        numeric=(1, 2, 3, 4, 5),
        empty="No priced model has been used yet.",
    )
    where = view["override_file"] or "none (set CLLAMA_PRICING_FILE)"
    content = Html.join(
        [
            el(
                "section",
                {"class": "card", "id": "unpriced", "data-live": True},
                el("div", {"class": "card-head"}, el("h2", None, "Models without a price"), badge(f"{count(view['unpriced_requests'])} unpriced requests", "warn" if view["unpriced"] else "ok")),
                el("p", {"class": "muted"}, "Requests to these models are counted with a cost of zero: budgets in dollars cannot see them."),
                unpriced,
                snippet,
            ),
            el(
                "section",
                {"class": "card", "id": "priced", "data-live": True},
                el("div", {"class": "card-head"}, el("h2", None, "Priced models in use"), el("span", {"class": "hint"}, f"table updated {view['table_updated'] or '–'}")),
                priced,
            ),
        ]
    )
    reload = el(
        "form",
        {"method": "post", "action": "/reload", "class": "inline"},
        csrf_field(ctx),
        el("button", {"type": "submit", "class": "btn btn-ghost"}, "Reload pricing now"),
    )
    return layout(ctx, page="pricing", title="Pricing coverage", subtitle=f"override file: {where}", content=content, tools=reload)


# --- model table -----------------------------------------------------------------------------------------------------------


def models_page(ctx: PageContext, view: dict) -> Html:
    entries = table(
        ["Public name", "Routes to", "Upstream", "Key", "Input $/M", "Output $/M", "State"],
        [
            [
                el("span", {"class": "model"}, e["model_name"]),
                el("code", None, e["route"]),
                e["api_base"] or "the provider's base URL",
                e["key"],
                _rate(e["price"], "input"),
                _rate(e["price"], "output"),
                badge("cannot serve", "crit", e["problem"]) if e["problem"] else badge("ok", "ok"),
            ]
            for e in view["entries"]
        ],
        numeric=(4, 5),
        empty="No model table (set CLLAMA_MODEL_TABLE): names resolve by the rules below only.",
        ident="model-table-rows",
    )
    problems = [e for e in view["entries"] if e["problem"]]
    aliases = table(
        ["Alias", "Entry"],
        [[a, t] for a, t in sorted(view["aliases"].items())],
        empty="No model_group_alias.",
        ident="model-aliases",
    )
    families = table(
        ["Bare names", "Provider"],
        [[el("code", None, f["pattern"]), f["provider"]] for f in view["families"]],
        empty="No families.",
        ident="model-families",
    )
    content = Html.join(
        [
            el(
                "section",
                {"class": "card", "id": "entries"},
                el("div", {"class": "card-head"}, el("h2", None, "Public model names"),
                   badge(f"{len(problems)} cannot serve", "crit") if problems else Html("")),
                entries,
                el("ul", {"class": "plain-list small"}, [el("li", None, f"{e['model_name']}: {e['problem']}") for e in problems]),
            ),
            el("section", {"class": "card", "id": "aliases"}, el("h2", None, "Aliases"), aliases),
            el(
                "section",
                {"class": "card", "id": "families"},
                el("h2", None, "Bare names by family"),
                el("p", {"class": "muted"}, "A bare model name (no provider/) that matches goes to this provider; "
                   "other bare names on /v1/messages go to anthropic."),
                families,
            ),
        ]
    )
    loaded = utc(view["loaded_at"]) if view.get("loaded_at") else "–"
    reload = el(
        "form",
        {"method": "post", "action": "/reload", "class": "inline"},
        csrf_field(ctx),
        el("button", {"type": "submit", "class": "btn btn-ghost"}, "Reload configuration"),
    )
    return layout(ctx, page="models", title="Model table",
                  subtitle=f"file: {view['file'] or 'none (set CLLAMA_MODEL_TABLE)'} · loaded {loaded}",
                  content=content, tools=reload)


def _rate(price: dict | None, field: str) -> str:
    if not price or price.get(field) is None:
        return "–"
    value = price[field]
    return f"${value:,.4f}".rstrip("0").rstrip(".") if value else "$0"
