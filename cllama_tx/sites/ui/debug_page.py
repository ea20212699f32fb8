"""
The C{/_debug} page: model mappings (the resolver's marked until an
operator confirms them, with the button that does), the resolution trace
of recent requests, discovered local model servers, the LLM resolver's
state and the key pools (ids and states only).  Filled from
L{cllama_tx.sites.ui.routing_api.debug_view}, its JSON twin; the tables
are L{Tag}s drawn in code (escaped by the flattener like the rest).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.template import Tag

from cllama_tx.governance.mappings import LLM
from cllama_tx.sites.ui.markup import Template, h
from cllama_tx.sites.ui.pages import KEY_TONE, PageContext, badge, layout, post_form
from cllama_tx.sites.ui.render import utc
from cllama_tx.sites.ui.routing_api import path_of

__all__ = ["TEMPLATES", "debug_page"]

_SOURCE_TONE = {"operator": "accent", "llm": "warn", "alias": "muted"}


def _table(row_id: str, heads: tuple[str, ...], rows: list[Tag], empty: str) -> Tag:
    if not rows:
        return h("p", {"class": "empty", "id": row_id}, empty)
    head = h("tr", None, [h("th", {"scope": "col"}, text) for text in heads])
    return h("div", {"class": "table-wrap"},
             h("table", {"class": "table", "id": row_id}, h("thead", None, head), h("tbody", None, rows)))


def _mapping_row(ctx: PageContext, m: dict) -> Tag:
    source = m["source"]
    marks: list[Any] = [badge(source, _SOURCE_TONE.get(source, "muted"))]
    actions: list[Any] = []
    if source == LLM and not m["confirmed"]:
        marks.append(" ")
        marks.append(badge("unconfirmed", "warn", "made by the LLM resolver; not yet confirmed by an operator"))
        actions.append(post_form(ctx, path_of(m["name"]) + "/confirm", {}, "Confirm", tone="btn-primary"))
    if source != "alias":
        actions.append(post_form(ctx, path_of(m["name"]) + "/delete", {}, "Delete", tone="btn-danger",
                                 confirm=f"Delete the mapping of {m['name']}? The resolver may be asked again."))
    about = [m.get("created_by") or ""]
    if m.get("resolver_model"):
        about.append(f" · by {m['resolver_model']}")
    if m.get("prompt"):
        about.append(f" · note: {m['prompt']}")
    return h(
        "tr", {"class": "unconfirmed" if source == LLM and not m["confirmed"] else None},
        h("td", None, h("code", None, m["name"])),
        h("td", None, h("code", None, m["target"])),
        h("td", None, marks),
        h("td", {"class": "small"}, m.get("created_at") or "–"),
        h("td", {"class": "small"}, m.get("confirmed_at") or "–"),
        h("td", {"class": "small muted"}, about),
        h("td", {"class": "actions"}, actions),
    )


def _trace_row(entry: dict) -> Tag:
    result = h("code", None, entry["result"]) if entry["result"] else badge(entry["error"] or "refused", "crit")
    return h(
        "tr", None,
        h("td", {"class": "small"}, entry["at"]),
        h("td", {"class": "small"}, h("code", None, entry["request_id"] or "–")),
        h("td", None, entry["caller"] or "–"),
        h("td", None, h("code", None, str(entry["requested"]))),
        h("td", None, " → ".join(entry["rules"]) or ("–" if entry["error"] else "exact")),
        h("td", None, badge(entry["decided_by"], "crit" if entry["error"] else "accent")),
        h("td", None, result, h("div", {"class": "muted small"}, entry.get("note") or "")),
    )


def _server_row(server: dict) -> Tag:
    models = server.get("models") or []
    names = [m if isinstance(m, str) else str(m.get("id") or m.get("name") or "") for m in models]
    return h(
        "tr", None,
        h("td", None, h("strong", None, str(server.get("name") or "?"))),
        h("td", None, str(server.get("kind") or "")),
        h("td", None, h("code", None, str(server.get("base_url") or ""))),
        h("td", None, str(server.get("found_by") or "")),
        h("td", None, str(server.get("state") or "")),
        h("td", {"class": "small"}, _when(server.get("last_seen"))),
        h("td", {"class": "small"}, ", ".join(names) or "–"),
    )


def _when(value: Any) -> str:
    """A time as discovery gives it (epoch seconds) or as text."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return utc(value)
    return str(value or "")


def _pool_rows(pool: dict) -> list[Tag]:
    keys = pool["keys"]
    state = "keyless" if pool["keyless"] else ("configured" if pool["configured"] else "not configured")
    first = h("td", {"rowspan": str(max(1, len(keys)))}, h("strong", None, pool["provider"] or "?"),
              h("div", {"class": "muted small"}, state))
    if not keys:
        return [h("tr", None, first, h("td", {"colspan": "3", "class": "muted"}, "no keys"))]
    rows = []
    for index, key in enumerate(keys):
        cells = [first] if index == 0 else []
        cells += [
            h("td", None, h("code", None, key["id"]), " ", badge("active", "accent") if key["active"] else ""),
            h("td", None, badge(key["state"] or "?", KEY_TONE.get(key["state"], "muted"))),
            h("td", {"class": "small"}, key["cooldown_until"] or (f"last error {key['last_error_code']}"
                                                                 if key["last_error_code"] else "")),
        ]
        rows.append(h("tr", None, cells))
    return rows


def _resolver(state: dict) -> Tag:
    if not state.get("enabled"):
        return h("p", {"class": "empty", "id": "resolver-state"},
                 "Off: names no rule knows are refused (set CLLAMA_RESOLVER_MODEL to turn it on).")
    items = [
        ("Model", state["model"]),
        ("Billed to", state["principal"]),
        ("Calls in the last minute", f"{state['calls_last_minute']} of {state['calls_per_minute']}"),
        ("Calls since start", str(state["calls"])),
        ("Asking now about", ", ".join(state["in_flight"]) or "–"),
        ("Remembered without a mapping", ", ".join(f"{r['name']} ({r['outcome']})" for r in state["remembered"]) or "–"),
    ]
    return h("dl", {"class": "facts", "id": "resolver-state"},
             [h("div", None, h("dt", None, label), h("dd", None, value)) for label, value in items])


class Debug(Template):
    template = "debug"

    def __init__(self, ctx: PageContext, view: dict) -> None:
        unconfirmed = view["unconfirmed"]
        super().__init__(
            ctx,
            unconfirmed_badge=badge(f"{unconfirmed} unconfirmed", "warn") if unconfirmed else "",
            mappings=_table("mapping-rows", ("Name", "Target", "Source", "Created", "Confirmed", "About", ""),
                            [_mapping_row(ctx, m) for m in view["mappings"]], "No mappings yet."),
            trace=_table("trace-rows", ("At", "Request", "Caller", "Requested", "Rules", "Decided by", "Result"),
                         [_trace_row(e) for e in view["trace"]], "No request resolved since start."),
            discovered=_table("discovered-rows", ("Name", "Kind", "Base URL", "Found by", "State", "Last seen", "Models"),
                              [_server_row(s) for s in view["discovered"]],
                              "No local model server discovered (discovery off, or none found)."),
            resolver=_resolver(view["resolver"]),
            pools=_table("pool-rows", ("Provider", "Key", "State", ""),
                         [row for pool in view["pools"] for row in _pool_rows(pool)], "No providers."),
        )


def debug_page(ctx: PageContext, view: dict) -> Deferred[bytes]:
    subtitle = f"{len(view['mappings'])} mappings · {len(view['discovered'])} discovered servers"
    return layout(ctx, page="debug", title="Routing debug", subtitle=subtitle, content=Debug(ctx, view))


#: The templates this module fills (the UI checks they are present at start).
TEMPLATES = frozenset({Debug.template})
