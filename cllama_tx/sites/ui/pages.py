"""
The HTML pages: each is a L{Template} of C{web/templates} filled from one
view dict (L{cllama_tx.sites.ui.views}, the page's JSON twin) and set in
the shared layout.  Sections marked C{data-live} are swapped in place by
C{ui.js} when the server says something changed, so they never hold a form
an operator may be typing into.

Everything shown is text given to the templates' slots or to L{h}: the
flattener escapes it when the page is written.  Nothing here builds markup
from strings.

A page is written in turns (L{in_turns}): its long lists (rows, cards) go
to the flattener a batch at a time, and the reactor, which also runs the
proxy, gets a turn between batches.  The signed-in pages therefore fire a
Deferred with the document; the sign-in and message pages, which hold no
such list, are written at once.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.web.template import Tag

from cllama_tx.sites.ui.charts import bar_chart, gauge, hbar
from cllama_tx.sites.ui.markup import Template, flatten_bytes, h, in_turns, next_turn, write_page
from cllama_tx.sites.ui.render import (
    ago,
    compact,
    count,
    duration,
    millis,
    money,
    money_short,
    percent,
    plural,
    utc,
)
from cllama_tx.sites.ui.web import Static, Templates

NAV = (
    ("overview", "/", "Overview"),
    ("agents", "/agents", "Agents"),
    ("costs", "/costs", "Costs"),
    ("requests", "/requests", "Requests"),
    ("budgets", "/budgets", "Budgets"),
    ("providers", "/providers", "Providers & keys"),
    ("discovery", "/discovery", "Local servers"),
    ("keys", "/keys", "Virtual keys"),
    ("teams", "/teams", "Teams & budgets"),
    ("pricing", "/pricing", "Pricing coverage"),
    ("models", "/models", "Model table"),
    ("debug", "/_debug", "Routing debug"),
)

TONE = {"ok": "ok", "warning": "warn", "exhausted": "crit", "invalid": "crit", "none": "muted"}
KEY_TONE = {"ready": "ok", "cooldown": "warn", "suspect": "warn", "dead": "crit", "disabled": "muted"}


@attrs.define
class PageContext:
    """Per-request things every page needs."""

    templates: Templates
    static: Static
    csrf: str | None
    now: float
    pod: str | None
    version: str
    actor_name: str | None = None
    auth_disabled: bool = False
    flash: list = attrs.Factory(list)
    live: bool = True
    # The reactor, to write long pages in turns (markup.in_turns); None: at once.
    clock: Any = None


# --- small pieces drawn in code ---------------------------------------------------------------------


def badge(text: str, tone: str = "muted", title: str | None = None) -> Tag:
    return h("span", {"class": f"badge badge-{tone}", "title": title}, text)


def csrf_field(ctx: PageContext) -> Tag | str:
    if not ctx.csrf:
        return ""
    return h("input", {"type": "hidden", "name": "csrf", "value": ctx.csrf})


def post_form(ctx: PageContext, action: str, fields: dict, label: str, *, tone: str = "", confirm: str | None = None, title: str | None = None) -> Tag:
    """A one-button form (an action on a row)."""
    return h(
        "form",
        {"method": "post", "action": action, "class": "inline", "data-confirm": confirm},
        csrf_field(ctx),
        [h("input", {"type": "hidden", "name": k, "value": v}) for k, v in fields.items()],
        h("button", {"type": "submit", "class": f"btn btn-small {tone}".strip(), "title": title}, label),
    )


def reload_form(ctx: PageContext, label: str, title: str | None = None) -> Tag:
    return h(
        "form",
        {"method": "post", "action": "/reload", "class": "inline"},
        csrf_field(ctx),
        h("button", {"type": "submit", "class": "btn btn-ghost", "title": title}, label),
    )


def status_pill(status: int) -> Tag:
    tone = "ok" if 200 <= status < 400 else "warn" if status in (429, 499) else "crit"
    return h("span", {"class": f"pill pill-{tone}", "title": f"HTTP {status}"}, str(status) if status else "—")


def _model_cell(m: dict) -> dict:
    """The slots of a model column: its name, provider, and an unpriced badge."""
    return {"model": m["model"], "provider": m["provider"], "unpriced": badge("unpriced", "warn") if m["pricing_status"] != "priced" else ""}


# --- the layout ---------------------------------------------------------------------------------------------


class Layout(Template):
    """The signed-in shell: sidebar, heading, flash messages, and the page's body."""

    template = "layout"

    def __init__(self, ctx: PageContext, *, page: str, title: str, content: Any, subtitle: Any = "", tools: Any = "") -> None:
        nav = [
            {"link": h("a", {"href": href, "class": "active" if key == page else None, "aria-current": "page" if key == page else None}, label)}
            for key, href, label in NAV
        ]
        super().__init__(
            ctx,
            title=title,
            css=ctx.static.url("ui.css"),
            js=ctx.static.url("ui.js"),
            icon=ctx.static.url("favicon.svg"),
            page=page,
            live="on" if ctx.live else "off",
            pod=ctx.pod or "no pod name",
            version=ctx.version,
            nav=nav,
            auth_disabled=ctx.auth_disabled,
            signed_in_as=f" as {ctx.actor_name}" if ctx.actor_name else "",
            signout=bool(ctx.csrf),
            subtitle=subtitle,
            tools=tools,
            flash=[{"level": level, "text": text} for level, text in ctx.flash],
            content=content,
        )


CARDS_AT_ONCE = 2


def layout(ctx: PageContext, *, page: str, title: str, content: Any, subtitle: Any = "", tools: Any = "") -> Deferred[bytes]:
    """A signed-in page: fires with the document once written."""
    # The body after a turn of the reactor: the view was just gathered.
    return write_page(Layout(ctx, page=page, title=title, content=next_turn(ctx.clock, content), subtitle=subtitle, tools=tools))


class Message(Template):
    template = "message"


def simple_page(ctx: PageContext, *, title: str, message: Any, status_line: str = "") -> bytes:
    """Errors and notices outside the signed-in shell."""
    page = Message(
        ctx, title=title, css=ctx.static.url("ui.css"), icon=ctx.static.url("favicon.svg"), status_line=status_line, message=message
    )
    return flatten_bytes(page, doctype=True)


class SignIn(Template):
    template = "signin"


def signin_page(ctx: PageContext, *, csrf: str, next_url: str, error: str | None, locked: bool, retry_after: int | None) -> bytes:
    if locked:
        error = None
    elif retry_after is not None:
        error = f"Too many failed sign-ins from your address. Try again in {duration(retry_after)}."
    page = SignIn(
        ctx,
        css=ctx.static.url("ui.css"),
        icon=ctx.static.url("favicon.svg"),
        pod=ctx.pod or "cllama",
        locked=locked,
        error=error,
        csrf=csrf,
        next=next_url,
        disabled=locked,
    )
    return flatten_bytes(page, doctype=True)


# --- overview ----------------------------------------------------------------------------------------


class DailyChart(Template):
    template = "daily_chart"

    def __init__(self, ctx: PageContext, daily: list[dict], ident: str, title: str = "Daily spend") -> None:
        points = [
            (d["day"][5:].replace("-", "/"), d["cost_usd"], f"{d['day']}: {money(d['cost_usd'])}, {count(d['requests'])} requests")
            for d in daily
        ]
        chart = bar_chart(points, label=f"{title} over the last {len(points)} days")
        super().__init__(ctx, ident=ident, title=title, days=len(points), chart=chart)


class Overview(Template):
    template = "overview"

    def __init__(self, ctx: PageContext, view: dict) -> None:
        spend = view["spend"]
        today, month, all_time = spend["today"], spend["month"], spend["all_time"]
        rate = today["error_rate"]
        items = view["attention"]
        critical = sum(1 for i in items if i["level"] == "critical")
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
                {
                    "agent": a["agent"],
                    "bar": hbar(a["month"]["cost_usd"] / peak, tone=tone),
                    "cost": money(a["month"]["cost_usd"]),
                    "budget_class": ("text-" + tone) if used is not None and tone != "accent" else "muted",
                    "budget": budget_text,
                }
            )
        super().__init__(
            ctx,
            attention=[
                {"level": i["level"], "tone": "crit" if i["level"] == "critical" else "warn", "href": i["href"], "text": i["text"]}
                for i in items[:8]
            ],
            attention_class=f"attention {'attention-crit' if critical else 'attention-warn'}",
            attention_head=f"{len(items)} thing{'s' if len(items) != 1 else ''} need{'s' if len(items) == 1 else ''} attention",
            attention_more=len(items) - 8 if len(items) > 8 else None,
            today_cost=money_short(today["cost_usd"]),
            today_exact=money(today["cost_usd"]),
            today_requests=plural(today["requests"], "request"),
            month_cost=money_short(month["cost_usd"]),
            month_exact=money(month["cost_usd"]),
            month_requests=plural(month["requests"], "request"),
            all_cost=money_short(all_time["cost_usd"]),
            all_exact=money(all_time["cost_usd"]),
            all_requests=plural(all_time["requests"], "request"),
            requests=count(today["requests"]),
            failed=count(today["errors"]),
            tokens=compact(today["tokens"]),
            tokens_in=compact(today["prompt_tokens"]),
            tokens_out=compact(today["output_tokens"]),
            error_class="kpi tone-crit" if (rate or 0) >= 0.05 and today["requests"] >= 20 else "kpi",
            error_rate=percent(rate, 1) if rate is not None else "–",
            error_sub="of metered requests" if rate is not None else "no requests yet",
            chart=DailyChart(ctx, view["daily"], "spend-chart"),
            bars=bars,
            more_agents=len(agent_rows) - 12 if bars and len(agent_rows) > 12 else None,
            top_agents=[
                {
                    "agent": a["agent"],
                    "today": money(a["today"]["cost_usd"]),
                    "month": money(a["month"]["cost_usd"]),
                    "requests": count(a["month"]["requests"]),
                    "errors": count(a["month"]["errors"]),
                    "tier": a["tier"] or "–",
                }
                for a in agent_rows[:8]
            ],
            top_models=[
                {**_model_cell(m), "requests": count(m["requests"]), "tokens": compact(m["tokens"]), "cost": money(m["cost_usd"])}
                for m in view["top_models"]
            ],
        )


def overview_page(ctx: PageContext, view: dict) -> Deferred[bytes]:
    subtitle = f"{plural(len(view['agents']), 'agent')} · {plural(sum(1 for p in view['providers'] if p['configured']), 'provider')} configured"
    return layout(ctx, page="overview", title="Overview", subtitle=subtitle, content=Overview(ctx, view))


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


def budget_gauge(state: dict) -> Tag:
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
    return h(
        "div",
        {"class": "gauge-box"},
        gauge(used if status not in ("none", "invalid") else None, tone, f"Budget used: {percent(used)}", text),
        h("div", {"class": f"gauge-caption{' text-crit' if status == 'invalid' else ''}"}, caption),
    )


class AgentCard(Template):
    template = "agent_card"

    def __init__(self, ctx: PageContext, a: dict, *, recent_limit: int = 5) -> None:
        state = a["budget"]
        badges = []
        if state["tier"]:
            t = state["tier"]
            badges.append(badge(f"tier: {t['name']}", "accent", title=", ".join(t["models"]) or None))
        if a["has_context"] or state["status"] != "none":
            label = {"none": "no budget", "ok": "within budget", "warning": "budget 80%+", "exhausted": "budget exhausted", "invalid": "budget invalid"}
            badges.append(badge(label[state["status"]], TONE[state["status"]]))
        if a.get("kind") == "key":
            badges.append(h("a", {"href": "/keys"}, badge("virtual key", "accent", title="Requests made with a virtual key are billed to its user (or alias)")))
        elif not a["has_context"]:
            badges.append(badge("no context", "muted", title="Known from the ledger only: its context directory is gone"))
        meta = [x for x in (a.get("pod"), a.get("service"), a.get("type")) if isinstance(x, str) and x]
        stats = (
            ("Today", money(a["today"]["cost_usd"])),
            ("This month", money(a["month"]["cost_usd"])),
            ("All time", money(a["all_time"]["cost_usd"])),
            ("Requests", count(a["all_time"]["requests"])),
            ("Error rate", percent(a["all_time"]["error_rate"], 1) if a["all_time"]["error_rate"] is not None else "–"),
            ("Last request", ago(a["last_request_at"], ctx.now)),
        )
        super().__init__(
            ctx,
            agent=a["agent"],
            meta=" · ".join(meta),
            badges=badges,
            gauge=budget_gauge(state),
            budget=budget_summary(state["effective"]) if state["effective"] else None,
            stats=[{"label": label, "value": value} for label, value in stats],
            models=[
                {**_model_cell(m), "requests": count(m["requests"]), "tokens": compact(m["tokens"]), "cost": money(m["cost_usd"])}
                for m in a["models"][:5]
            ],
            recent=[
                {
                    "pill": status_pill(r["status"]),
                    "model": r["model"] or r["requested_model"] or "–",
                    "latency": millis(r["latency_ms"]),
                    "cost": money(r["cost_usd"]),
                    "utc": utc(r["ts"]),
                    "ago": ago(r["ts"], ctx.now),
                }
                for r in a["recent"][:recent_limit]
            ],
        )


class Agents(Template):
    template = "agents"


def agents_page(ctx: PageContext, view: dict) -> Deferred[bytes]:
    cards = [AgentCard(ctx, a) for a in view["agents"]]
    subtitle = f"{plural(len(cards), 'agent')}, from the context root and the ledger"
    return layout(ctx, page="agents", title="Agents", subtitle=subtitle, content=Agents(ctx, cards=in_turns(ctx.clock, cards, CARDS_AT_ONCE)))


class Agent(Template):
    template = "agent"


def agent_page(ctx: PageContext, view: dict) -> Deferred[bytes]:
    [a] = view["agents"]
    content = Agent(ctx, chart=DailyChart(ctx, a["daily"], "agent-chart", f"Daily spend of {a['agent']}"), card=AgentCard(ctx, a, recent_limit=25))
    return layout(ctx, page="agents", title=f"Agent {a['agent']}", subtitle=h("a", {"href": "/agents"}, "← all agents"), content=content)


# --- costs ---------------------------------------------------------------------------------------------------


def pricing_badge(row: dict) -> Tag:
    status = row["pricing_status"]
    if status == "priced":
        return badge("priced", "ok")
    if status == "unrouted":
        # Refused before routing (a model name nothing resolves): no provider was asked, so there is nothing to price.
        return badge("unrouted", "muted", title=f"{row['requests']} requests refused before routing: no provider was asked")
    title = f"{row['unpriced_requests']} of {row['requests']} requests had no price"
    return h("a", {"href": "/pricing"}, badge(status, "warn", title=title))


class Costs(Template):
    template = "costs"

    def __init__(self, ctx: PageContext, view: dict) -> None:
        options = [h("option", {"value": p["key"], "selected": p["key"] == view["period"]}, p["label"]) for p in view["periods"]]
        options.append(h("option", {"value": "custom", "selected": view["period"] == "custom"}, "Custom dates"))
        query = f"period={view['period']}" if view["period"] != "custom" else f"since={view['since_day'] or ''}&until={view['until_day'] or ''}"
        total = view["total"]
        whole = total["cost_usd"]
        super().__init__(
            ctx,
            options=options,
            since=view["since_day"] or "",
            until=view["until_day"] or "",
            csv_href=f"/costs.csv?{query}",
            cost=money_short(whole),
            cost_exact=money(whole),
            label=view["label"],
            requests=count(total["requests"]),
            failed=count(total["errors"]),
            tokens=compact(total["tokens"]),
            tokens_in=compact(total["prompt_tokens"]),
            tokens_out=compact(total["output_tokens"]),
            unpriced=bool(total["unpriced_requests"]),
            unpriced_count=count(total["unpriced_requests"]),
            agents=[
                {
                    "agent": a["agent"],
                    "requests": count(a["requests"]),
                    "errors": count(a["errors"]),
                    "tokens": compact(a["tokens"]),
                    "cost": money(a["cost_usd"]),
                    "bar": hbar(a["cost_usd"] / whole if whole else 0.0),
                    "share": percent(a["cost_usd"] / whole if whole else None),
                }
                for a in view["agents"]
            ],
            rows=[
                {
                    "agent": r["agent"],
                    "provider": r["provider"],
                    "model": r["model"],
                    "requests": count(r["requests"]),
                    "prompt_tokens": count(r["prompt_tokens"]),
                    "output_tokens": count(r["output_tokens"]),
                    "cost": money(r["cost_usd"]),
                    "pricing": pricing_badge(r),
                }
                for r in view["rows"]
            ],
        )


def costs_page(ctx: PageContext, view: dict) -> Deferred[bytes]:
    return layout(ctx, page="costs", title="Costs", subtitle=f"{view['label']} · UTC days", content=Costs(ctx, view))


# --- requests ----------------------------------------------------------------------------------------------------


class Requests(Template):
    template = "requests"

    def __init__(self, ctx: PageContext, view: dict) -> None:
        options = [h("option", {"value": "", "selected": not view["agent"]}, "All agents")] + [
            h("option", {"value": a, "selected": a == view["agent"]}, a) for a in view["agents"]
        ]
        rows = []
        for r in view["requests"]:
            rows.append(
                {
                    "utc": utc(r["ts"]),
                    "ago": ago(r["ts"], ctx.now),
                    "agent": h("a", {"href": f"/requests?agent={r['agent']}"}, r["agent"]) if r["agent"] else h("span", {"class": "muted"}, "unidentified"),
                    "model": r["model"] or r["requested_model"] or "–",
                    "provider": h("span", {"class": "provider"}, r["provider"]) if r["provider"] else "",
                    "status": [
                        status_pill(r["status"]),
                        badge("stream", "muted") if r["stream"] else "",
                        badge("estimated", "warn", "tokens estimated: the provider reported no usage") if r["estimated"] else "",
                    ],
                    "latency": millis(r["latency_ms"]),
                    "ttfb": millis(r["ttfb_ms"]),
                    "tokens_in": count(r["input_tokens"]),
                    "tokens_out": count(r["output_tokens"]),
                    "cost": [
                        money(r["cost_usd"]),
                        "" if r["priced"] or not r["model"] else " ",
                        badge("unpriced", "warn") if not r["priced"] and r["model"] and r["ok"] else "",
                    ],
                    "request_id": r["request_id"],
                    "rid": r["request_id"][-10:],
                }
            )
        super().__init__(
            ctx,
            options=options,
            checked=view["errors_only"],
            requests=rows,
            empty="No requests match." if view["agent"] or view["errors_only"] else "No requests yet.",
        )


def requests_page(ctx: PageContext, view: dict) -> Deferred[bytes]:
    subtitle = f"the latest {view['limit']}" + (f" of {view['agent']}" if view["agent"] else "") + (", failures only" if view["errors_only"] else "")
    return layout(ctx, page="requests", title="Requests", subtitle=subtitle, content=Requests(ctx, view))


# --- providers -------------------------------------------------------------------------------------------------------


class ProviderAdd(Template):
    template = "provider_add"


class KeyAdd(Template):
    """The form that adds a key to one provider."""

    template = "key_add"


def _stamp(text: str | None, now: float) -> Tag:
    """A registry timestamp (RFC 3339) as "5 min ago", the exact time on hover."""
    if not text:
        return h("span", {"class": "muted"}, "–")
    try:
        ts = datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return h("span", {"class": "small"}, text)
    when = ago(ts, now) if ts <= now else "in " + duration(ts - now)
    return h("time", {"datetime": text, "title": utc(ts)}, when)


def key_health(ctx: PageContext, k: dict) -> list[Tag]:
    """Under a key's state: until when it cools down (for every model, or
    which ones), when a dead key is re-probed, whether a re-check runs."""
    lines = []
    if k.get("cooldown_until"):
        lines.append(h("div", {"class": "muted small"}, "until ", _stamp(k["cooldown_until"], ctx.now)))
    for c in k.get("model_cooldowns") or ():
        lines.append(h("div", {"class": "muted small key-model-cooldown"}, f"{c['model']} cooling down until ", _stamp(c["until"], ctx.now)))
    if k.get("probing"):
        lines.append(h("div", {"class": "muted small key-probe"}, "re-checking the key now"))
    elif k.get("next_probe_at"):
        lines.append(h("div", {"class": "muted small key-probe"}, "next re-probe ", _stamp(k["next_probe_at"], ctx.now)))
    return lines


def key_actions(ctx: PageContext, p: dict, k: dict) -> Tag:
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
    return h("div", {"class": "actions"}, buttons)


def _key_error(ctx: PageContext, k: dict) -> Any:
    if not (k.get("last_error_code") or k.get("last_error_reason")):
        return h("span", {"class": "muted"}, "none")
    return [
        h("span", None, " ".join(str(x) for x in (k.get("last_error_code"), k.get("last_error_reason")) if x)),
        h("div", {"class": "muted small"}, _stamp(k.get("last_error_at"), ctx.now)) if k.get("last_error_at") else "",
    ]


class ProviderCard(Template):
    template = "provider_card"

    def __init__(self, ctx: PageContext, p: dict, manageable: bool) -> None:
        if p["keyless"]:
            state = badge("no key needed", "ok")
        elif p["configured"]:
            state = badge("ready", "ok")
        else:
            state = badge("not usable", "crit", title=p["problem"])
        pool = p.get("pool") or {}
        summary = (
            f"{p['base_url'] or 'no base URL'} · auth {p['auth']} · {p['api_format']} format · from {p['source']}"
            + (" · rate limits per model" if p.get("rate_limit_scope") == "model" else "")
            + (f" · organization {p['organization']}" if p.get("organization") else "")
            + (f" · project {p['project']}" if p.get("project") else "")
        )
        keys = [
            {
                "row_id": f"key-{p['name']}-{k['id']}".replace(":", "-"),
                "label": k["label"] or k["id"],
                "active": badge("active", "accent") if k["active"] else "",
                "id": k["id"],
                "masked": k["masked_secret"] or "–",
                "source": "environment" if k["from_environment"] else k["source"],
                "state": [badge(k["state"], KEY_TONE.get(k["state"], "muted")), key_health(ctx, k)],
                "error": _key_error(ctx, k),
                "added": _stamp(k.get("added_at"), ctx.now),
                "actions": key_actions(ctx, p, k) if manageable else "",
            }
            for k in p["keys"]
        ]
        super().__init__(
            ctx,
            name=p["name"],
            summary=summary,
            keyless=p["keyless"],
            pool=" · ".join(f"{n} {s}" for s, n in pool.items() if n) or "no keys",
            state=state,
            waiting=badge(f"all cooling down, {p['waiting_s']} s", "warn") if p.get("waiting_s") else "",
            problem=p.get("problem"),
            keys=keys,
            key_form=KeyAdd(ctx, provider=p["name"]) if manageable and not p["keyless"] else "",
        )


class Providers(Template):
    template = "providers"

    def __init__(self, ctx: PageContext, view: dict) -> None:
        manageable = view["manageable"]
        if manageable:
            auth_options = [h("option", {"value": m, "selected": m == "bearer"}, m) for m in view["auth_modes"]]
            format_options = [h("option", {"value": f, "selected": f == "openai"}, f) for f in view["api_formats"]]
            add_provider: Any = ProviderAdd(ctx, auth_options=auth_options, format_options=format_options)
        else:
            add_provider = ""
        others = view["unconfigured"]
        super().__init__(
            ctx,
            add_provider=add_provider,
            cards=in_turns(ctx.clock, [ProviderCard(ctx, p, manageable) for p in view["providers"]], CARDS_AT_ONCE),
            others=[
                {
                    "name": p["name"],
                    "summary": f"{p['base_url'] or 'no base URL'} · {p['auth']} · {p['api_format']}",
                    "key_form": KeyAdd(ctx, provider=p["name"]) if manageable and not p["keyless"] else "",
                }
                for p in others
            ],
            others_count=len(others),
        )


def providers_page(ctx: PageContext, view: dict) -> Deferred[bytes]:
    tools = reload_form(ctx, "Reload configuration", "Re-read providers.json, pricing, policy file and contexts") if view.get("reload", True) else ""
    where = view["path"] or "memory only (no CLAW_AUTH_DIR)"
    return layout(ctx, page="providers", title="Providers & keys", subtitle=f"keys saved to {where}", content=Providers(ctx, view), tools=tools)


# --- budgets ----------------------------------------------------------------------------------------------------------


def _plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class BudgetForm(Template):
    template = "budget_form"

    def __init__(self, ctx: PageContext, a: dict, view: dict) -> None:
        eff = a["effective"] or {}
        behavior_options = [h("option", {"value": "", "selected": True}, "(keep: " + (eff.get("behavior") or "hard_stop").replace("_", " ") + ")")] + [
            h("option", {"value": b}, b.replace("_", " ")) for b in view["behaviors"]
        ]
        period_options = [h("option", {"value": "", "selected": True}, "(keep" + (f": {eff['period']}" if eff.get("period") else "") + ")")] + [
            h("option", {"value": p}, p) for p in view["periods"]
        ]
        super().__init__(
            ctx,
            agent=a["agent"],
            limit_placeholder=f"now {_plain(eff['limit_usd'])}" if eff.get("limit_usd") is not None else "none",
            requests_placeholder=f"now {eff['max_requests']}" if eff.get("max_requests") is not None else "none",
            window_placeholder=f"now {eff['window']}" if eff.get("window") else "e.g. 24h",
            behavior_options=behavior_options,
            period_options=period_options,
            open=a["status"] == "invalid" or a["agent"] == view.get("editing"),
        )


class BudgetCard(Template):
    template = "budget_card"

    def __init__(self, ctx: PageContext, a: dict, view: dict) -> None:
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
        facts = [
            ("Budget", effective),
            ("Counted now", f"{money(usage.get('cost_usd'))} · {plural(usage.get('requests'), 'request')}" if usage else "–"),
            ("In flight", f"{money(usage.get('reserved_usd'))} · {plural(usage.get('reserved_requests'), 'request')}" if usage else "–"),
            ("Resets", utc(usage.get("resets_at"), with_seconds=False) if usage.get("resets_at") else ("rolling window" if eff.get("window") else "–")),
            (
                "Runtime change",
                f"{', '.join(sorted(rt_budget)) or 'spend reset'} by {runtime.get('updated_by') or 'unknown'}, {ago(runtime.get('updated_at'), ctx.now)}"
                if runtime
                else "none: files only",
            ),
        ]
        current = (a["tier"] or {}).get("index")
        tiers = [
            {
                "current": "current" if current == i else "",
                "name": t["name"] or f"tier {i + 1}",
                "threshold": percent(t["threshold"]),
                "models": ", ".join(t["models"]),
            }
            for i, t in enumerate(eff.get("tiers") or ())
        ]
        status = {"none": "no budget", "ok": "within budget", "warning": "80%+ used", "exhausted": "exhausted", "invalid": "invalid"}[a["status"]]
        badges = [badge(f"tier: {a['tier']['name']}", "accent") if a["tier"] else "", badge(status, TONE[a["status"]])]
        if view["editable"]:
            badges.append(
                post_form(
                    ctx,
                    f"/budgets/{a['agent']}/reset",
                    {},
                    "Reset spend",
                    tone="btn-warn",
                    confirm=f"Forget {a['agent']}'s spend so far and its runtime budget change?",
                    title="Forget the spend counted so far and the runtime change",
                )
            )
        super().__init__(
            ctx,
            agent=a["agent"],
            badges=badges,
            gauge=budget_gauge(a),
            facts=[{"label": label, "value": value} for label, value in facts],
            tiers=tiers,
            form=BudgetForm(ctx, a, view) if view["editable"] else "",
        )


class Budgets(Template):
    template = "budgets"


def budgets_page(ctx: PageContext, view: dict) -> Deferred[bytes]:
    content = Budgets(ctx, cards=in_turns(ctx.clock, [BudgetCard(ctx, a, view) for a in view["agents"]], CARDS_AT_ONCE))
    return layout(
        ctx,
        page="budgets",
        title="Budgets",
        subtitle="changes made here are stored in the ledger and win over the files until the spend is reset",
        content=content,
    )


# --- virtual keys --------------------------------------------------------------------------------------------------------


def _key_spend(k: dict) -> Tag:
    spent = k.get("spend_usd")
    budget = k["max_budget"]
    if budget is None:
        return h("span", None, money(spent) if spent is not None else "–", h("div", {"class": "muted small"}, "no budget"))
    per = f" per {k['budget_duration']}" if k["budget_duration"] else ""
    fraction = (spent or 0.0) / budget if budget else 1.0
    tone = "crit" if fraction >= 1 else "warn" if fraction >= 0.8 else "accent"
    return h(
        "div",
        {"class": "key-spend"},
        h("span", None, money(spent) if spent is not None else "–", h("span", {"class": "muted"}, f" of {money(budget)}{per}")),
        hbar(fraction, tone=tone),
    )


def _until(ts: float, now: float) -> str:
    if ts <= now:
        return "expired " + ago(ts, now)
    return "in " + duration(ts - now)


class KeysOff(Template):
    template = "keys_off"


class VirtualKeys(Template):
    template = "keys"

    def __init__(self, ctx: PageContext, view: dict, created: dict | None) -> None:
        rows = []
        for k in view["keys"]:
            limits = " · ".join(
                x
                for x in (
                    f"{count(k['rpm_limit'])} rpm" if k["rpm_limit"] is not None else "",
                    f"{compact(k['tpm_limit'])} tpm" if k["tpm_limit"] is not None else "",
                )
                if x
            )
            rows.append(
                {
                    "row_id": k["id"][:16],
                    "name": k["key_alias"] or k["key_name"],
                    "key_name": k["key_name"],
                    "created_ago": ago(k["created_at"], ctx.now),
                    "team": k["team_id"] or "–",
                    "user": k["user_id"] or "",
                    "models": ", ".join(k["models"]) or "every model",
                    "spend": _key_spend(k),
                    "limits": limits or "–",
                    "expires": h("span", {"title": utc(k["expires"])}, _until(k["expires"], ctx.now))
                    if k["expires"] is not None
                    else h("span", {"class": "muted"}, "never"),
                    "state": badge(k["state"], {"active": "ok", "expired": "muted", "blocked": "warn"}[k["state"]]),
                    "revoke": post_form(
                        ctx,
                        "/keys/revoke",
                        {"key_id": k["id"]},
                        "Revoke",
                        tone="btn-danger",
                        confirm=f"Revoke {k['key_alias'] or k['key_name']}? Clients using it are refused at once.",
                    ),
                }
            )
        super().__init__(
            ctx,
            created=created["secret"] if created is not None else None,
            open=not view["keys"],
            keys=rows,
            more=view["total"] > view["shown"],
            shown=view["shown"],
            total=view["total"],
        )


def keys_page(ctx: PageContext, view: dict, created: dict | None = None) -> Deferred[bytes]:
    if not view["enabled"]:
        return layout(ctx, page="keys", title="Virtual keys", subtitle="off", content=KeysOff(ctx))
    subtitle = f"{plural(view['total'], 'live key')} (expired ones are kept a while)"
    return layout(ctx, page="keys", title="Virtual keys", subtitle=subtitle, content=VirtualKeys(ctx, view, created))


# --- pricing ---------------------------------------------------------------------------------------------------------------


def _rate(price: dict | None, field: str) -> str:
    if not price or price.get(field) is None:
        return "–"
    value = price[field]
    return f"${value:,.4f}".rstrip("0").rstrip(".") if value else "$0"


class Pricing(Template):
    template = "pricing"

    def __init__(self, ctx: PageContext, view: dict) -> None:
        super().__init__(
            ctx,
            badge=badge(f"{count(view['unpriced_requests'])} unpriced requests", "warn" if view["unpriced"] else "ok"),
            unpriced=[
                {
                    "model": e["model"],
                    "provider": e["provider"],
                    "unpriced_requests": count(e["unpriced_requests"]),
                    "requests": count(e["requests"]),
                    "agents": ", ".join(e["agents"]),
                    "hint": e.get("hint") or "",
                }
                for e in view["unpriced"]
            ],
            snippet=json.dumps(view["snippet"], indent=2) if view["snippet"] else None,
            table_updated=view["table_updated"] or "–",
            priced=[
                {
                    "model": e["model"],
                    "provider": e["provider"],
                    "requests": count(e["requests"]),
                    "input": _rate(e["price"], "input"),
                    "output": _rate(e["price"], "output"),
                    "cache_read": _rate(e["price"], "cache_read"),
                    "cost": money(e["cost_usd"]),
                }
                for e in view["priced"]
            ],
        )


def pricing_page(ctx: PageContext, view: dict) -> Deferred[bytes]:
    where = view["override_file"] or "none (set CLLAMA_PRICING_FILE)"
    return layout(
        ctx, page="pricing", title="Pricing coverage", subtitle=f"override file: {where}", content=Pricing(ctx, view),
        tools=reload_form(ctx, "Reload pricing now"),
    )


# --- model table -----------------------------------------------------------------------------------------------------------


class ModelTable(Template):
    template = "models"

    def __init__(self, ctx: PageContext, view: dict) -> None:
        problems = [e for e in view["entries"] if e["problem"]]
        super().__init__(
            ctx,
            problems_badge=badge(f"{len(problems)} cannot serve", "crit") if problems else "",
            entries=[
                {
                    "model_name": e["model_name"],
                    "route": e["route"],
                    "api_base": e["api_base"] or "the provider's base URL",
                    "key": e["key"],
                    "input": _rate(e["price"], "input"),
                    "output": _rate(e["price"], "output"),
                    "state": badge("cannot serve", "crit", e["problem"]) if e["problem"] else badge("ok", "ok"),
                }
                for e in view["entries"]
            ],
            problems=[{"model_name": e["model_name"], "problem": e["problem"]} for e in problems],
            aliases=[{"alias": a, "entry": t} for a, t in sorted(view["aliases"].items())],
            families=[{"pattern": f["pattern"], "provider": f["provider"]} for f in view["families"]],
        )


def models_page(ctx: PageContext, view: dict) -> Deferred[bytes]:
    loaded = utc(view["loaded_at"]) if view.get("loaded_at") else "–"
    subtitle = f"file: {view['file'] or 'none (set CLLAMA_MODEL_TABLE)'} · loaded {loaded}"
    return layout(
        ctx, page="models", title="Model table", subtitle=subtitle, content=ModelTable(ctx, view),
        tools=reload_form(ctx, "Reload configuration"),
    )


def _templates_used() -> frozenset[str]:
    """The name of every template a page of this module fills."""
    names, classes = set(), list(Template.__subclasses__())
    while classes:
        cls = classes.pop()
        if cls.__module__ == __name__:
            names.add(cls.template)
        classes.extend(cls.__subclasses__())
    return frozenset(names)


TEMPLATES = _templates_used()
