"""
The C{/teams} page: organisations, teams with their members, users and
customers of the key API, their budgets, schedules, spend in the current
period and limits, each with a form to change them, reset the spend or
delete the record.  Filled from L{cllama_tx.sites.ui.directory_view}; the
tables are L{Tag}s drawn in code (escaped by the flattener like the rest).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.template import Tag

from cllama_tx.sites.ui.markup import Template, h
from cllama_tx.sites.ui.pages import PageContext, badge, csrf_field, layout, post_form
from cllama_tx.sites.ui.render import money

__all__ = ["TEMPLATES", "directory_page"]

_TITLES = {"org": "organisation", "team": "team", "user": "user", "customer": "customer"}


def _limits(entry: dict) -> str:
    parts = []
    if entry["rpm_limit"] is not None:
        parts.append(f"{entry['rpm_limit']:,} rpm")
    if entry["tpm_limit"] is not None:
        parts.append(f"{entry['tpm_limit']:,} tpm")
    if entry["max_parallel_requests"] is not None:
        parts.append(f"{entry['max_parallel_requests']:,} at once")
    return " · ".join(parts) or "–"


def _budget(entry: dict) -> Any:
    if entry["max_budget"] is None:
        return h("span", {"class": "muted"}, "no budget")
    schedule = f" / {entry['budget_duration']}" if entry["budget_duration"] else " (ever)"
    return [money(entry["max_budget"]), h("span", {"class": "muted small"}, schedule)]


def _spend(entry: dict) -> Any:
    spend = money(entry["spend"]) if entry["spend"] is not None else "–"
    if entry["max_budget"]:
        share = (entry["spend"] or 0.0) / entry["max_budget"]
        tone = "crit" if share >= 1 else "warn" if share >= 0.8 else "ok"
        return [spend, " ", badge(f"{share:.0%}", tone)]
    return spend


def _field(label: str, name: str, value: Any, kind: str = "text", **attrs: Any) -> Tag:
    shown = "" if value is None else (" ".join(value) if isinstance(value, list) else str(value))
    return h("label", None, label, " ", h("input", {"type": kind, "name": name, "value": shown, **attrs}))


def _edit_form(ctx: PageContext, entry: dict) -> Tag:
    kind, record_id = entry["kind"], entry["id"]
    fields = [
        _field("Name", "alias", entry["alias"], maxlength="256"),
        _field("Budget (USD)", "max_budget", entry["max_budget"], "number", min="0", step="any"),
        _field("Resets every", "budget_duration", entry["budget_duration"]),
        _field("Alert at (USD)", "soft_budget", entry["soft_budget"], "number", min="0", step="any"),
        _field("Requests / min", "rpm_limit", entry["rpm_limit"], "number", min="0", step="1"),
        _field("Tokens / min", "tpm_limit", entry["tpm_limit"], "number", min="0", step="1"),
        _field("Requests at once", "max_parallel_requests", entry["max_parallel_requests"], "number", min="0", step="1"),
        _field("Models", "models", entry["models"]),
    ]
    if kind == "team":
        fields.insert(1, _field("Organisation", "organization_id", entry.get("organization_id")))
        fields.append(_field("Member budget (USD)", "team_member_budget", entry.get("team_member_budget"),
                             "number", min="0", step="any"))
    if kind in ("team", "customer"):
        fields.append(h("label", None, h("input", {"type": "hidden", "name": "blocked_shown", "value": "1"}),
                        h("input", {"type": "checkbox", "name": "blocked", "checked": entry["blocked"]}), " blocked"))
    return h(
        "details", {"class": "edit"},
        h("summary", {"class": "btn btn-small"}, "Edit"),
        h("form", {"method": "post", "action": f"/teams/{kind}/{record_id}", "class": "grid-form"},
          csrf_field(ctx), fields,
          h("div", {"class": "form-actions"},
            h("button", {"type": "submit", "class": "btn btn-primary btn-small"}, "Save"))),
    )


def _row(ctx: PageContext, entry: dict) -> Tag:
    kind, record_id = entry["kind"], entry["id"]
    name = entry["alias"] or record_id
    details: list[Any] = [h("code", None, record_id)]
    if kind == "team" and entry.get("organization_id"):
        details.append(f" · in {entry['organization_id']}")
    if entry.get("keys") is not None:
        details.append(f" · {entry['keys']} key{'' if entry['keys'] == 1 else 's'}")
    if kind == "org" and entry.get("teams"):
        details.append(f" · teams {', '.join(entry['teams'])}")
    state = badge("blocked", "warn") if entry["blocked"] else ""
    actions = [
        _edit_form(ctx, entry),
        post_form(ctx, f"/teams/{kind}/{record_id}/reset", {}, "Reset spend",
                  confirm=f"Start counting the spend of {name} again from now?"),
        post_form(ctx, f"/teams/{kind}/{record_id}/delete", {}, "Delete", tone="btn-danger",
                  confirm=f"Delete {_TITLES[kind]} {name}?" + (" Its keys are deleted with it." if kind in ("team", "user") else "")),
    ]
    cells = [
        h("td", None, h("strong", None, name), " ", state, h("div", {"class": "muted small"}, details)),
        h("td", None, _budget(entry)),
        h("td", None, _spend(entry)),
        h("td", None, h("span", {"title": entry["budget_reset_at"] or ""}, utc_text(entry["budget_reset_at"]))),
        h("td", None, _limits(entry)),
        h("td", None, ", ".join(entry["models"]) or "every model"),
        h("td", {"class": "actions"}, actions),
    ]
    rows = [h("tr", {"id": f"{kind}-{record_id}"}, cells)]
    for member in entry.get("members") or ():
        rows.append(h(
            "tr", {"class": "member", "id": f"member-{record_id}-{member['user_id']}"},
            h("td", None, "↳ ", member["user_id"], h("span", {"class": "muted small"}, f" ({member['role']})")),
            h("td", None, money(member["max_budget"]) if member["max_budget"] is not None else
              h("span", {"class": "muted"}, "no member budget")),
            h("td", None, money(member["spend"]) if member["spend"] is not None else "–"),
            h("td", None, member["budget_duration"] or ""),
            h("td", None, ""), h("td", None, ""), h("td", None, ""),
        ))
    return rows  # type: ignore[return-value]


def utc_text(iso: str | None) -> str:
    return iso.replace("+00:00", "Z").replace("T", " ") if iso else "never"


def _table(ctx: PageContext, entries: list[dict], kind: str) -> Any:
    if not entries:
        return h("p", {"class": "empty", "id": f"{kind}-rows"}, f"No {_TITLES[kind]}s yet.")
    head = h("tr", None, [h("th", {"scope": "col"}, text) for text in
                          ("Name", "Budget", "Spent this period", "Resets", "Limits", "Models", "")])
    body = [_row(ctx, entry) for entry in entries]
    return h("div", {"class": "table-wrap"},
             h("table", {"class": "table", "id": f"{kind}-rows"}, h("thead", None, head), h("tbody", None, body)))


class Directory(Template):
    template = "directory"

    def __init__(self, ctx: PageContext, view: dict) -> None:
        empty = not any(view[kind] for kind in ("org", "team", "user", "customer"))
        super().__init__(ctx, open=empty, **{kind: _table(ctx, view[kind], kind)
                                              for kind in ("org", "team", "user", "customer")})


def directory_page(ctx: PageContext, view: dict) -> Deferred[bytes]:
    counts = ", ".join(f"{len(view[kind])} {_TITLES[kind]}s" for kind in ("org", "team", "user", "customer"))
    return layout(ctx, page="teams", title="Teams & budgets", subtitle=counts, content=Directory(ctx, view))


#: The templates this module fills (the UI checks they are present at start).
TEMPLATES = frozenset({Directory.template})
