"""
LiteLLM's teams (C{/team/new}, C{/team/update}, C{/team/member_add} ...):
which fields a team takes, what governs (its budget and schedule, rate and
parallel limits, models, blocked, its organisation, its members' budgets),
what is only kept, and how C{/team/info} and C{/team/list} show a team.

A key with C{team_id} counts against its team's budget and that of its
user within the team (a member budget: C{max_budget_in_team}, else the
team's C{team_member_budget}).  Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cllama_tx.identity import litellm_fields as f
from cllama_tx.identity.entities import COMMON_FIELDS, Entity, Membership, validate_fields
from cllama_tx.identity.litellm_fields import InvalidField

__all__ = [
    "MEMBER_DEFAULTS",
    "ROLES",
    "member_entry",
    "membership",
    "team_info",
    "validate_member",
    "validate_team",
]

ROLES = ("admin", "user")

GOVERNED = {
    **COMMON_FIELDS,
    "team_alias": lambda v: f.text("team_alias", v),
    "organization_id": lambda v: f.text("organization_id", v),
}

#: The team's defaults for its members' budgets (they govern: see L{membership}).
MEMBER_DEFAULTS = {
    "team_member_budget": lambda v: f.money("team_member_budget", v),
    "team_member_budget_duration": lambda v: f.budget_duration("team_member_budget_duration", v),
    "team_member_rpm_limit": lambda v: f.count("team_member_rpm_limit", v),
    "team_member_tpm_limit": lambda v: f.count("team_member_tpm_limit", v),
}

STORED = {
    name: f.json_value
    for name in (
        "tpd_limit", "budget_limits", "team_member_permissions", "router_settings", "access_group_ids",
        "default_team_member_models", "tags", "guardrails", "policies", "prompts", "object_permission",
        "allowed_passthrough_routes", "denied_passthrough_routes", "disable_global_guardrails",
        "require_trace_id", "secret_manager_settings", "model_rpm_limit", "model_tpm_limit", "rpm_limit_type",
        "tpm_limit_type", "default_estimated_output_tokens", "default_estimated_output_tokens_per_model",
        "mcp_rpm_limit", "team_member_key_duration", "team_member_model_max_budget",
        "allowed_vector_store_indexes", "enforced_batch_output_expires_after", "enforced_file_expires_after",
        "model_max_budget", "budget_id",
    )
}

#: Names the API handles itself: the id, aliases (kept with the keys), members, spend.
HANDLED = frozenset({"team_id", "model_aliases", "members_with_roles", "members", "admins", "spend"})


def validate_team(doc: Mapping[str, Any], *, update: bool) -> dict[str, Any]:
    """
    The fields of a C{/team/new} or C{/team/update} body, checked:
    C{alias}, C{org} and the common fields by the entity's names, the
    member defaults and the kept fields under C{extra}.

    @raise InvalidField: naming the first bad field.
    """
    checks = {**GOVERNED, **MEMBER_DEFAULTS}
    fields = validate_fields(doc, checks, STORED, HANDLED, update=update)
    defaults = {name: fields.pop(name) for name in MEMBER_DEFAULTS if name in fields}
    if defaults:
        extra = fields.setdefault("extra", {})
        for name, value in defaults.items():
            if value is not None or update:
                extra[name] = value
    if "team_alias" in fields:
        fields["alias"] = fields.pop("team_alias")
    if "organization_id" in fields:
        fields["org"] = fields.pop("organization_id")
    return fields


def validate_member(entry: Any, field: str = "member") -> tuple[str, str, str | None]:
    """A C{member} object: C{(user_id, role, user_email)}; C{user_id} is required here (no e-mail lookup)."""
    if not isinstance(entry, Mapping):
        raise InvalidField(field, f"'{field}' must be an object with 'user_id' and 'role'")
    user_id = f.text(field, entry.get("user_id"))
    email = f.text(field, entry.get("user_email"))
    if user_id is None:
        if email is not None:
            user_id = email  # LiteLLM looks the user up by e-mail; here the e-mail is the id
        else:
            raise InvalidField(field, f"'{field}' needs a 'user_id' (or 'user_email')")
    role = entry.get("role", "user")
    if role not in ROLES:
        raise InvalidField(field, f"'{field}.role' must be one of {', '.join(ROLES)}")
    return user_id, role, email


def member_entry(role: str, email: str | None, budget: Mapping[str, Any], now: float,
                 previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A member as the team keeps it; C{budget} holds the member's own limits given (None clears one)."""
    entry = dict(previous or {})
    entry["role"] = role
    if email is not None:
        entry["user_email"] = email
    entry.setdefault("added_at", now)
    for name in ("max_budget", "budget_duration", "tpm_limit", "rpm_limit", "models"):
        if name in budget:
            entry[name] = budget[name]
    if "budget_duration" in budget and budget["budget_duration"] != (previous or {}).get("budget_duration"):
        entry["budget_anchor"] = now
    return entry


def membership(team: Entity, user_id: str) -> Membership | None:
    """A user's membership of C{team} with its budget (its own, else the team's member defaults)."""
    entry = team.members.get(user_id)
    if entry is None:
        return None
    extra = team.extra
    max_budget = entry.get("max_budget")
    duration = entry.get("budget_duration")
    anchor = entry.get("budget_anchor")
    if max_budget is None:
        max_budget = extra.get("team_member_budget")
        duration = extra.get("team_member_budget_duration")
        anchor = team.budget_anchor
    rpm = entry.get("rpm_limit")
    tpm = entry.get("tpm_limit")
    return Membership(
        team_id=team.id,
        user_id=user_id,
        role=entry.get("role", "user"),
        user_email=entry.get("user_email"),
        max_budget=max_budget,
        budget_duration=duration,
        budget_anchor=anchor if anchor is not None else entry.get("added_at"),
        rpm_limit=rpm if rpm is not None else extra.get("team_member_rpm_limit"),
        tpm_limit=tpm if tpm is not None else extra.get("team_member_tpm_limit"),
        models=tuple(entry.get("models") or ()),
        created_at=float(entry.get("added_at") or 0.0),
    )


def team_info(team: Entity, aliases: Mapping[str, str], spend: float | None, reset_at: str | None) -> dict[str, Any]:
    """LiteLLM's team object (C{LiteLLM_TeamTable}), with its spend and C{budget_reset_at}."""
    members = [m for m in (membership(team, u) for u in sorted(team.members)) if m is not None]
    info = {name: value for name, value in team.extra.items()}
    info.update(team.budget_fields())
    info.update({
        "team_id": team.id,
        "team_alias": team.alias,
        "organization_id": team.org,
        "admins": [m.user_id for m in members if m.role == "admin"],
        "members": [m.user_id for m in members],
        "members_with_roles": [m.member() for m in members],
        "spend": spend,
        "budget_reset_at": reset_at,
        "model_aliases": dict(aliases),
        "litellm_model_table": {"model_aliases": dict(aliases)} if aliases else None,
        "model_spend": {},
        "model_id": None,
    })
    for name in MEMBER_DEFAULTS:
        info.setdefault(name, None)
    info.setdefault("model_max_budget", {})
    info.setdefault("tpd_limit", None)
    return info
