"""
LiteLLM's organisations (C{/organization/new}, C{/organization/update},
C{/organization/info}, C{/organization/list}, members): which fields an
organisation takes, what governs (its budget and schedule, rate and
parallel limits, models: over every key of its teams and every key that
names it), what is only kept, and how LiteLLM's answers show one (its
budget under C{litellm_budget_table}).  Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cllama_tx.identity import litellm_fields as f
from cllama_tx.identity.entities import COMMON_FIELDS, Entity, validate_fields
from cllama_tx.identity.key_model import iso_time

__all__ = ["ROLES", "organization_info", "validate_organization"]

ROLES = ("org_admin", "internal_user", "internal_user_viewer")

GOVERNED = {
    **COMMON_FIELDS,
    "organization_alias": lambda v: f.text("organization_alias", v),
}

STORED = {
    name: f.json_value
    for name in ("budget_id", "model_max_budget", "object_permission", "tpd_limit", "budget_limits",
                 "temp_budget_increase", "temp_budget_expiry", "allowed_models")
}

#: Names the API handles itself: the id, spend, the members given at creation.
HANDLED = frozenset({"organization_id", "spend", "members", "users"})


def validate_organization(doc: Mapping[str, Any], *, update: bool) -> dict[str, Any]:
    """The fields of a C{/organization/new} or C{/organization/update} body, checked."""
    fields = validate_fields(doc, GOVERNED, STORED, HANDLED, update=update)
    if "organization_alias" in fields:
        fields["alias"] = fields.pop("organization_alias")
    return fields


def organization_info(org: Entity, teams: list[dict], spend: float | None, reset_at: str | None) -> dict[str, Any]:
    """LiteLLM's organisation object, with its budget table, members, teams and spend."""
    budget = {
        "budget_id": org.extra.get("budget_id"),
        "max_budget": org.max_budget,
        "soft_budget": org.soft_budget,
        "max_parallel_requests": org.max_parallel_requests,
        "tpm_limit": org.tpm_limit,
        "rpm_limit": org.rpm_limit,
        "model_max_budget": org.extra.get("model_max_budget"),
        "budget_duration": org.budget_duration,
        "budget_reset_at": reset_at,
    }
    members = [
        {"user_id": user_id, "organization_id": org.id, "user_role": entry.get("role"),
         "spend": 0.0, "budget_id": None, "created_at": iso_time(entry.get("added_at")),
         "updated_at": iso_time(entry.get("added_at")), "user_email": entry.get("user_email")}
        for user_id, entry in sorted(org.members.items())
    ]
    return {
        "organization_id": org.id,
        "organization_alias": org.alias,
        "budget_id": budget["budget_id"],
        "spend": spend,
        "metadata": dict(org.metadata),
        "models": list(org.models),
        "model_spend": {},
        "blocked": org.blocked,
        "created_by": None,
        "updated_by": None,
        "created_at": iso_time(org.created_at),
        "updated_at": iso_time(org.updated_at),
        "litellm_budget_table": budget,
        "max_budget": org.max_budget,
        "budget_duration": org.budget_duration,
        "budget_reset_at": reset_at,
        "tpm_limit": org.tpm_limit,
        "rpm_limit": org.rpm_limit,
        "members": members,
        "users": [{"user_id": m["user_id"], "user_email": m["user_email"]} for m in members],
        "teams": teams,
        "object_permission": org.extra.get("object_permission"),
    }
