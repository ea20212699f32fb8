"""
The C{/teams} page's view (its JSON twin): organisations, teams (and
their members), users and customers of the key API, each with its budget,
the budget's schedule and next reset, what it spent in the current period,
and its limits; and the reading of the page's forms into the same
LiteLLM bodies the key API takes, so the UI and the API change records
alike.
"""

from __future__ import annotations

from typing import Any

from cllama_tx.identity.customers import validate_customer
from cllama_tx.identity.organizations import validate_organization
from cllama_tx.identity.teams import membership, validate_team
from cllama_tx.identity.users import validate_user
from cllama_tx.store.shared import scope_name

__all__ = ["KINDS", "directory", "form_body", "validate"]

#: The kinds the page shows, in order: (kind, its id field, its alias field).
KINDS = (
    ("org", "organization_id", "organization_alias"),
    ("team", "team_id", "team_alias"),
    ("user", "user_id", "user_alias"),
    ("customer", "user_id", "alias"),
)
ID_FIELDS = {kind: id_field for kind, id_field, _alias in KINDS}
ALIAS_FIELDS = {kind: alias for kind, _id, alias in KINDS}
_VALIDATORS = {"org": validate_organization, "team": validate_team, "user": validate_user,
               "customer": validate_customer}
#: What the forms may set, besides the id and the alias.
_NUMBERS = ("max_budget", "soft_budget", "rpm_limit", "tpm_limit", "max_parallel_requests")
_TEAM_ONLY = ("organization_id", "team_member_budget")


def validate(kind: str, doc: dict, *, update: bool) -> dict:
    """A body checked as the key API checks it (L{cllama_tx.identity.teams} ...)."""
    return _VALIDATORS[kind](doc, update=update)


def _number(name: str, raw: str) -> float | int:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number") from None
    if name in ("rpm_limit", "tpm_limit", "max_parallel_requests"):
        if value != int(value):
            raise ValueError(f"{name} must be a whole number")
        return int(value)
    return value


def form_body(kind: str, form: dict, *, update: bool) -> dict[str, Any]:
    """
    A form as a LiteLLM body: numbers read as numbers, C{models} split on
    spaces and commas, C{blocked} a checkbox.  On an update an empty field
    clears what it names; on a creation it is left out.
    """
    doc: dict[str, Any] = {}
    alias = (form.get("alias") or "").strip()
    if alias or update:
        doc[ALIAS_FIELDS[kind]] = alias or None
    for name in _NUMBERS + ("budget_duration", "models") + (_TEAM_ONLY if kind == "team" else ()):
        if name not in form:
            continue
        raw = (form.get(name) or "").strip()
        if not raw:
            if update:
                doc[name] = [] if name == "models" else None
            continue
        if name in _NUMBERS or name == "team_member_budget":
            doc[name] = _number(name, raw)
        elif name == "models":
            doc[name] = [m for m in raw.replace(",", " ").split() if m]
        else:
            doc[name] = raw
    if update and "blocked_shown" in form:
        doc["blocked"] = form.get("blocked") in ("on", "1", "true")
    return doc


async def _spend(services: Any, scope: str, record: Any) -> float | None:
    budgets = services.budgets
    if budgets is None:
        return None
    try:
        return await budgets.spend(scope, record.budget_duration, record.budget_anchor or record.created_at)
    except Exception:
        return None


async def _entry(services: Any, kind: str, record: Any) -> dict[str, Any]:
    budgets = services.budgets
    return {
        "kind": kind,
        "id": record.id,
        "alias": record.alias,
        "max_budget": record.max_budget,
        "soft_budget": record.soft_budget,
        "budget_duration": record.budget_duration,
        "budget_reset_at": budgets.reset_at(record.budget_duration, record.budget_anchor or record.created_at)
        if budgets is not None else None,
        "spend": await _spend(services, scope_name(kind, record.id), record),
        "rpm_limit": record.rpm_limit,
        "tpm_limit": record.tpm_limit,
        "max_parallel_requests": record.max_parallel_requests,
        "models": list(record.models),
        "blocked": record.blocked,
        "created_at": record.created_at,
    }


async def directory(services: Any) -> dict[str, Any]:
    """Every organisation, team, user and customer, with budgets and spend."""
    store = services.directory
    if store is None:
        return {"enabled": False, "org": [], "team": [], "user": [], "customer": []}
    view: dict[str, Any] = {"enabled": True}
    keys = services.keys
    for kind, _id_field, _alias in KINDS:
        entries = []
        for record in store.all(kind):
            entry = await _entry(services, kind, record)
            if kind == "team":
                entry["organization_id"] = record.org
                entry["team_member_budget"] = record.extra.get("team_member_budget")
                entry["aliases"] = dict(keys.team_aliases(record.id)) if keys is not None else {}
                members = []
                for user_id in sorted(record.members):
                    member = membership(record, user_id)
                    if member is None:
                        continue
                    spend = None
                    if services.budgets is not None:
                        spend = await services.budgets.spend(scope_name("member", record.id, user_id),
                                                             member.budget_duration, member.budget_anchor)
                    members.append({"user_id": user_id, "role": member.role, "max_budget": member.max_budget,
                                    "budget_duration": member.budget_duration, "spend": spend})
                entry["members"] = members
            if kind == "org":
                entry["teams"] = [t.id for t in store.teams_in(record.id)]
            if kind in ("team", "user") and keys is not None:
                filters = {"team_id": record.id} if kind == "team" else {"user_id": record.id}
                entry["keys"] = keys.list(page=1, size=1, **filters).total_count
            entries.append(entry)
        view[kind] = entries
    return view
