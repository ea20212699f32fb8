"""
Every field of LiteLLM's C{/key/generate}, C{/key/update} and
C{/key/regenerate} bodies, and what cllama_tx does with it: the fields
that govern a request are checked and kept in their own columns (and
enforced by the proxy); the rest are checked for their JSON type, kept as
given and returned in C{/key/info}, so a platform that sets them reads
them back.  A field LiteLLM does not document is refused by name, unless
it is empty (what SDKs send by default): a typo must not silently drop a
limit.

Pure: no I/O.  The table against LiteLLM, with the reasons, is in
C{docs/VIRTUAL_KEYS.md}.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from cllama_tx.identity import litellm_fields as f
from cllama_tx.identity.litellm_fields import InvalidField

__all__ = [
    "GOVERNED_FIELDS",
    "HANDLED_FIELDS",
    "KEY_FIELDS",
    "STORED_FIELDS",
    "UNSUPPORTED_FIELDS",
    "stored_defaults",
    "validate_key_fields",
]


def _list(field: str, value: Any) -> list | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidField(field, f"'{field}' must be a list")
    return f.json_value(field, value)


def _object(field: str, value: Any) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidField(field, f"'{field}' must be a JSON object")
    return f.json_value(field, value)


def _choice(*allowed: str) -> Callable[[str, Any], str | None]:
    def check(field: str, value: Any) -> str | None:
        checked = f.text(field, value)
        if checked is not None and checked not in allowed:
            raise InvalidField(field, f"'{field}' must be one of {', '.join(allowed)}")
        return checked

    return check


#: Fields that govern a request: checked, kept in columns, enforced.
#: field -> its check (returns the normalised value).
GOVERNED_FIELDS: dict[str, Callable[[Any], Any]] = {
    "key_alias": lambda v: f.text("key_alias", v),
    "team_id": lambda v: f.text("team_id", v),
    "user_id": lambda v: f.text("user_id", v),
    "organization_id": lambda v: f.text("organization_id", v),
    "models": lambda v: f.models("models", v),
    "max_budget": lambda v: f.money("max_budget", v),
    "budget_duration": lambda v: f.budget_duration("budget_duration", v),
    "soft_budget": lambda v: f.money("soft_budget", v),
    "rpm_limit": lambda v: f.count("rpm_limit", v),
    "tpm_limit": lambda v: f.count("tpm_limit", v),
    "max_parallel_requests": lambda v: f.count("max_parallel_requests", v),
    "metadata": lambda v: f.metadata("metadata", v),
    "tags": lambda v: f.strings("tags", v),
    "duration": lambda v: f.duration("duration", v),
    "blocked": lambda v: f.boolean("blocked", v),
    "aliases": lambda v: f.model_aliases("aliases", v),
    "model_max_budget": lambda v: f.model_budgets("model_max_budget", v),
    "model_rpm_limit": lambda v: f.model_limits("model_rpm_limit", v),
    "model_tpm_limit": lambda v: f.model_limits("model_tpm_limit", v),
}

#: Names that are the key API's own business, not stored as given:
#: C{key} (a caller-chosen key, or which key), C{spend} (sets the spend
#: counted against the budgets), C{new_key} and C{grace_period}
#: (C{/key/regenerate}), C{new_master_key} (refused).
HANDLED_FIELDS = frozenset({"key", "spend", "new_key", "grace_period", "new_master_key"})

#: LiteLLM fields kept as given and returned, without effect here.
STORED_FIELDS: dict[str, Callable[[str, Any], Any]] = {
    "agent_id": f.text,
    "project_id": f.text,
    "budget_id": f.text,
    "end_user_budget_id": f.text,
    "key_type": _choice("llm_api", "management", "read_only", "default"),
    "rpm_limit_type": _choice("guaranteed_throughput", "best_effort_throughput", "dynamic"),
    "tpm_limit_type": _choice("guaranteed_throughput", "best_effort_throughput", "dynamic"),
    "rotation_interval": f.duration,
    "temp_budget_expiry": f.text,
    "auto_rotate": f.boolean,
    "send_invite_email": f.boolean,
    "disable_global_guardrails": f.boolean,
    "enable_prompt_caching": f.boolean,
    "throttle_on_budget_exceeded": f.boolean,
    "tpd_limit": f.count,
    "default_estimated_output_tokens": f.count,
    "temp_budget_increase": f.money,
    "budget_limits": _list,
    "allowed_cache_controls": _list,
    "guardrails": _list,
    "policies": _list,
    "prompts": _list,
    "enforced_params": _list,
    "allowed_routes": _list,
    "allowed_passthrough_routes": _list,
    "denied_passthrough_routes": _list,
    "allowed_vector_store_indexes": _list,
    "access_group_ids": _list,
    "config": _object,
    "permissions": _object,
    "budget_fallbacks": _object,
    "mcp_rpm_limit": _object,
    "tag_rpm_limit": _object,
    "object_permission": _object,
    "router_settings": _object,
    "default_estimated_output_tokens_per_model": _object,
}

#: What C{/key/info} says for a stored field that was never set (LiteLLM's defaults).
_STORED_DEFAULTS: dict[str, Any] = {
    name: ([] if check is _list else {} if check is _object else None) for name, check in STORED_FIELDS.items()
}
_STORED_DEFAULTS.update({"auto_rotate": False, "key_type": "default"})

#: Every field name the key API takes (besides C{key}).
KEY_FIELDS = tuple(GOVERNED_FIELDS)

#: Kept for callers of earlier versions: nothing LiteLLM documents is refused now.
UNSUPPORTED_FIELDS: frozenset[str] = frozenset()

_CREATE_DEFAULTS: dict[str, Any] = {
    "key_alias": None,
    "team_id": None,
    "user_id": None,
    "organization_id": None,
    "models": (),
    "max_budget": None,
    "budget_duration": None,
    "soft_budget": None,
    "rpm_limit": None,
    "tpm_limit": None,
    "max_parallel_requests": None,
    "metadata": {},
    "tags": (),
    "duration": None,
    "blocked": False,
    "aliases": {},
    "model_max_budget": {},
    "model_rpm_limit": {},
    "model_tpm_limit": {},
}


def stored_defaults() -> dict[str, Any]:
    """A fresh copy of the stored fields' defaults."""
    return {name: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
            for name, v in _STORED_DEFAULTS.items()}


def validate_key_fields(doc: Mapping[str, Any], *, update: bool) -> dict[str, Any]:
    """
    The fields of a C{/key/generate} (C{update=False}) or C{/key/update}
    body, checked and normalised: the governed fields by name, and
    C{extra}, the stored fields given (C{{name: value}}; on an update a
    null value removes one).  The names in L{HANDLED_FIELDS} are not
    looked at: the caller handles them.

    Strings: C{""} is null.  For an update only the fields present are
    returned; an explicit null clears the field (C{models}: every model,
    C{metadata}: C{{}}), except C{duration} and C{blocked}, where null
    leaves the key as it is.

    @raise InvalidField: naming the first bad field; also for a field
        LiteLLM does not document, unless its value is empty.
    """
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name in sorted(doc):
        if name in HANDLED_FIELDS:
            continue
        value = doc[name]
        check = GOVERNED_FIELDS.get(name)
        if check is not None:
            checked = check(value)
            if update and checked is None and name in ("duration", "blocked"):
                continue
            out[name] = checked
            continue
        stored = STORED_FIELDS.get(name)
        if stored is not None:
            checked = stored(name, value)
            if checked is not None or update:
                extra[name] = checked
            continue
        if f.empty(value):
            continue
        raise InvalidField(name, f"unknown field '{name}'")
    if not update:
        for name, default in _CREATE_DEFAULTS.items():
            if out.get(name) is None:
                out[name] = default
    if extra or not update:
        out["extra"] = extra
    return out
