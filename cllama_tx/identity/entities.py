"""
The records of LiteLLM's management API above the key: users, teams,
organisations and customers (end users), and a team's members.  They
share what governs a request (a budget, its schedule, rate and parallel
limits, a model list, blocked) and differ in a few fields and in how
LiteLLM names them; one immutable L{Entity} holds any of them, the
resource modules (L{cllama_tx.identity.teams}, C{users},
C{organizations}, C{customers}) say which fields each takes and how its
answers look.

Pure: no I/O.  Stored as JSON documents (L{Entity.to_doc}) by
L{cllama_tx.identity.directory}.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from cllama_tx.identity import litellm_fields as f
from cllama_tx.identity.key_model import iso_time
from cllama_tx.identity.litellm_fields import InvalidField

__all__ = [
    "COMMON_FIELDS",
    "CUSTOMER",
    "KINDS",
    "ORGANIZATION",
    "TEAM",
    "USER",
    "Entity",
    "Membership",
    "apply_changes",
    "validate_fields",
]

TEAM = "team"
USER = "user"
ORGANIZATION = "org"
CUSTOMER = "customer"
KINDS = (TEAM, USER, ORGANIZATION, CUSTOMER)

#: What the records share: field -> its check.
COMMON_FIELDS: dict[str, Callable[[Any], Any]] = {
    "max_budget": lambda v: f.money("max_budget", v),
    "soft_budget": lambda v: f.money("soft_budget", v),
    "budget_duration": lambda v: f.budget_duration("budget_duration", v),
    "rpm_limit": lambda v: f.count("rpm_limit", v),
    "tpm_limit": lambda v: f.count("tpm_limit", v),
    "max_parallel_requests": lambda v: f.count("max_parallel_requests", v),
    "models": lambda v: f.models("models", v),
    "metadata": lambda v: f.metadata("metadata", v),
    "blocked": lambda v: f.boolean("blocked", v),
}

_DEFAULTS: dict[str, Any] = {"models": (), "metadata": {}, "blocked": False}


def validate_fields(
    doc: Mapping[str, Any], governed: Mapping[str, Callable[[Any], Any]], stored: Mapping[str, Callable[[str, Any], Any]],
    ignored: frozenset[str], *, update: bool,
) -> dict[str, Any]:
    """
    A body's fields: those in C{governed} checked by name, those in
    C{stored} under C{extra} (kept as given), those in C{ignored} left to
    the caller.  A field in none of them is refused, unless it is empty.
    On an update only what is present comes back (null clears; C{blocked}
    null leaves it).
    """
    out: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    for name in sorted(doc):
        if name in ignored:
            continue
        value = doc[name]
        check = governed.get(name)
        if check is not None:
            checked = check(value)
            if update and checked is None and name == "blocked":
                continue
            out[name] = checked
            continue
        keep = stored.get(name)
        if keep is not None:
            checked = keep(name, value)
            if checked is not None or update:
                extra[name] = checked
            continue
        if f.empty(value):
            continue
        raise InvalidField(name, f"unknown field '{name}'")
    if not update:
        for name in governed:
            if out.get(name) is None and name in _DEFAULTS:
                out[name] = _DEFAULTS[name]
    if extra or not update:
        out["extra"] = extra
    return out


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


def apply_changes(doc: Mapping[str, Any], values: Mapping[str, Any], now: float) -> dict[str, Any]:
    """
    A stored document with C{values} applied: fields set; C{extra} and
    C{members} merged entry by entry (None removes one), so that changes
    made elsewhere to other entries are kept; a new C{budget_duration}
    counts from now.  The same function runs in memory and, on the stored
    document, in the database's transaction.
    """
    out = _copy(dict(doc))
    for name, value in values.items():
        if name in ("extra", "members"):
            merged = dict(out.get(name) or {})
            for entry, item in value.items():
                if item is None:
                    merged.pop(entry, None)
                else:
                    merged[entry] = _copy(item)
            out[name] = merged
        else:
            out[name] = list(value) if isinstance(value, tuple) else _copy(value)
    if "budget_duration" in values and values["budget_duration"] != doc.get("budget_duration"):
        out["budget_anchor"] = now
    return out


@attrs.frozen
class Entity:
    """
    A user, team, organisation or customer (C{kind}), by its C{id}.
    Immutable: an update swaps in a new object.  C{org} is a team's
    organisation; C{members} a team's members (user id -> their role,
    e-mail and budget within the team); C{extra} the LiteLLM fields kept
    as given.
    """

    kind: str
    id: str
    alias: str | None = None
    max_budget: float | None = None
    soft_budget: float | None = None
    budget_duration: str | None = None
    #: When the budget's schedule was set: multi-day periods count from its day.
    budget_anchor: float | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    models: tuple[str, ...] = ()
    blocked: bool = False
    metadata: dict = attrs.field(factory=dict, hash=False)
    org: str | None = None
    members: dict = attrs.field(factory=dict, hash=False)
    extra: dict = attrs.field(factory=dict, hash=False)
    created_at: float = 0.0
    updated_at: float = 0.0

    # LiteLLM's names for the id, by kind.
    @property
    def team_id(self) -> str | None:
        return self.id if self.kind == TEAM else None

    @property
    def user_id(self) -> str | None:
        return self.id if self.kind in (USER, CUSTOMER) else None

    @property
    def organization_id(self) -> str | None:
        return self.id if self.kind == ORGANIZATION else self.org

    def to_doc(self) -> dict[str, Any]:
        """The stored JSON document."""
        return {
            "alias": self.alias,
            "max_budget": self.max_budget,
            "soft_budget": self.soft_budget,
            "budget_duration": self.budget_duration,
            "budget_anchor": self.budget_anchor,
            "rpm_limit": self.rpm_limit,
            "tpm_limit": self.tpm_limit,
            "max_parallel_requests": self.max_parallel_requests,
            "models": list(self.models),
            "blocked": self.blocked,
            "metadata": self.metadata,
            "org": self.org,
            "members": self.members,
            "extra": self.extra,
        }

    @classmethod
    def from_doc(cls, kind: str, entity_id: str, doc: Mapping[str, Any], created_at: float,
                 updated_at: float) -> Entity:
        return cls(
            kind=kind,
            id=entity_id,
            alias=doc.get("alias"),
            max_budget=doc.get("max_budget"),
            soft_budget=doc.get("soft_budget"),
            budget_duration=doc.get("budget_duration"),
            budget_anchor=doc.get("budget_anchor"),
            rpm_limit=doc.get("rpm_limit"),
            tpm_limit=doc.get("tpm_limit"),
            max_parallel_requests=doc.get("max_parallel_requests"),
            models=tuple(doc.get("models") or ()),
            blocked=bool(doc.get("blocked")),
            metadata=dict(doc.get("metadata") or {}),
            org=doc.get("org"),
            members=dict(doc.get("members") or {}),
            extra=dict(doc.get("extra") or {}),
            created_at=created_at,
            updated_at=updated_at,
        )

    def changed(self, values: Mapping[str, Any], now: float) -> Entity:
        """This record with C{values} applied (L{apply_changes})."""
        return Entity.from_doc(self.kind, self.id, apply_changes(self.to_doc(), values, now), self.created_at, now)

    def budget_fields(self) -> dict[str, Any]:
        """The fields LiteLLM's records and budget tables share, as its answers spell them."""
        return {
            "max_budget": self.max_budget,
            "soft_budget": self.soft_budget,
            "budget_duration": self.budget_duration,
            "tpm_limit": self.tpm_limit,
            "rpm_limit": self.rpm_limit,
            "max_parallel_requests": self.max_parallel_requests,
            "models": list(self.models),
            "metadata": _copy(self.metadata),
            "blocked": self.blocked,
            "created_at": iso_time(self.created_at),
            "updated_at": iso_time(self.updated_at),
        }


@attrs.frozen
class Membership:
    """
    A user within a team: its role and its budget there (LiteLLM's
    C{max_budget_in_team}, else the team's C{team_member_budget}), with
    the limits governance reads off any level.
    """

    team_id: str
    user_id: str
    role: str = "user"
    user_email: str | None = None
    max_budget: float | None = None
    budget_duration: str | None = None
    budget_anchor: float | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    models: tuple[str, ...] = ()
    created_at: float = 0.0
    soft_budget = None
    max_parallel_requests = None

    def member(self) -> dict[str, Any]:
        """LiteLLM's C{members_with_roles} entry."""
        return {"user_id": self.user_id, "user_email": self.user_email, "role": self.role}

    def membership(self) -> dict[str, Any]:
        """LiteLLM's C{team_memberships} entry (C{spend} added by the caller)."""
        return {
            "user_id": self.user_id,
            "team_id": self.team_id,
            "budget_id": None,
            "litellm_budget_table": {
                "max_budget": self.max_budget,
                "budget_duration": self.budget_duration,
                "tpm_limit": self.tpm_limit,
                "rpm_limit": self.rpm_limit,
                "allowed_models": list(self.models) or None,
            },
        }
