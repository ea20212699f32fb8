"""
LiteLLM's internal users (C{/user/new}, C{/user/update}, C{/user/info},
C{/user/list}): which fields a user takes, what governs (the user's budget
and schedule, rate and parallel limits, models: over every key with its
C{user_id}), what is only kept, and how LiteLLM's answers show a user.

Where LiteLLM differs: it skips a user's personal budget for a key that
has a team (unless C{apply_user_budget_to_team_keys}); here every budget
that names a request applies, so a user's C{max_budget} caps the user's
spend over all their keys (a budget within one team is a member budget).
Pure: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cllama_tx.identity import litellm_fields as f
from cllama_tx.identity.entities import COMMON_FIELDS, Entity, validate_fields
from cllama_tx.identity.litellm_fields import InvalidField

__all__ = ["ROLES", "user_info", "validate_user"]

ROLES = ("proxy_admin", "proxy_admin_viewer", "internal_user", "internal_user_viewer")

GOVERNED = {
    **COMMON_FIELDS,
    "user_alias": lambda v: f.text("user_alias", v),
}

STORED = {
    name: f.json_value
    for name in (
        "user_email", "user_role", "sso_user_id", "organizations", "send_invite_email", "allowed_cache_controls",
        "config", "permissions", "model_max_budget", "budget_fallbacks", "model_rpm_limit", "model_tpm_limit",
        "mcp_rpm_limit", "tag_rpm_limit", "guardrails", "policies", "prompts", "aliases", "object_permission",
        "budget_limits", "agent_id",
    )
}

#: Names the API handles itself: the id, teams to join, the key made with the user, spend.
HANDLED = frozenset({
    "user_id", "teams", "team_id", "auto_create_key", "key_alias", "duration", "spend", "password",
})


def validate_user(doc: Mapping[str, Any], *, update: bool) -> dict[str, Any]:
    """
    The fields of a C{/user/new} or C{/user/update} body, checked.

    @raise InvalidField: naming the first bad field; C{password} is refused
        (as LiteLLM refuses it here).
    """
    if doc.get("password") is not None:
        raise InvalidField("password", "a password cannot be set through the key API")
    role = doc.get("user_role")
    if role is not None and role not in ROLES:
        raise InvalidField("user_role", f"'user_role' must be one of {', '.join(ROLES)}")
    fields = validate_fields(doc, GOVERNED, STORED, HANDLED, update=update)
    if "user_alias" in fields:
        fields["alias"] = fields.pop("user_alias")
    return fields


def user_info(user: Entity, teams: list[str], spend: float | None, reset_at: str | None) -> dict[str, Any]:
    """LiteLLM's user object (C{LiteLLM_UserTable}), with its teams, spend and C{budget_reset_at}."""
    info = {name: value for name, value in user.extra.items()}
    info.update(user.budget_fields())
    info.update({
        "user_id": user.id,
        "user_alias": user.alias,
        "teams": teams,
        "team_id": teams[0] if teams else None,
        "spend": spend,
        "budget_reset_at": reset_at,
        "model_spend": {},
    })
    info.setdefault("user_role", "internal_user")
    for name in ("user_email", "sso_user_id", "organization_id"):
        info.setdefault(name, None)
    info.setdefault("model_max_budget", {})
    info.setdefault("allowed_cache_controls", [])
    info.setdefault("policies", [])
    return info
