"""
A virtual key and the key API's fields: the key's shape and hash,
durations, the stored key as an immutable value, and (from
L{cllama_tx.identity.key_fields}) the validation of C{/key/generate} and
C{/key/update} bodies.

Pure: no I/O, tested without a reactor.  The store that keeps keys is
L{cllama_tx.identity.virtual_keys}; its tables, L{cllama_tx.identity.key_rows}.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import secrets
from typing import Any

import attrs

from cllama_tx.identity.key_fields import (
    KEY_FIELDS,
    UNSUPPORTED_FIELDS,
    stored_defaults,
    validate_key_fields,
)
from cllama_tx.identity.litellm_fields import (
    DuplicateKey,
    InvalidField,
    model_aliases,
    parse_duration,
)

__all__ = [
    "KEY_FIELDS",
    "UNSUPPORTED_FIELDS",
    "DuplicateKey",
    "InvalidField",
    "KeyPage",
    "VirtualKey",
    "generate_key",
    "hash_key",
    "iso_time",
    "key_name_of",
    "looks_like_virtual_key",
    "model_aliases",
    "parse_duration",
    "token_hash_of",
    "validate_key_fields",
]

KEY_PREFIX = "sk-"
#: Random bytes per generated key: secrets.token_urlsafe(32) is 43 characters.
KEY_RANDOM_BYTES = 32
MIN_KEY_BODY = 32
MAX_KEY_BODY = 256
_KEY_PATTERN = re.compile(rf"sk-[A-Za-z0-9_-]{{{MIN_KEY_BODY},{MAX_KEY_BODY}}}")
_HASH_PATTERN = re.compile(r"[0-9a-f]{64}")


# --------------------------------------------------------------------------
# Pure helpers


def generate_key() -> str:
    """A new key: C{sk-} and 43 URL-safe characters (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(KEY_RANDOM_BYTES)


def hash_key(key: str) -> str:
    """The hex SHA-256 of C{key}: its stored form and its id."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def looks_like_virtual_key(token: object) -> bool:
    """
    Whether a bearer token has the shape of a virtual key: C{sk-} then 32 to
    256 URL-safe characters.  Agents' tokens are C{agent:secret}, and a colon
    is not URL-safe, so the two never overlap.
    """
    return isinstance(token, str) and _KEY_PATTERN.fullmatch(token) is not None


def token_hash_of(identifier: object) -> str | None:
    """
    The hash named by an identifier of the key API: a clear key (anything
    starting with C{sk-}, as LiteLLM hashes it) or a 64-hex token hash.
    L{None} when it is neither.
    """
    if not isinstance(identifier, str):
        return None
    if identifier.startswith(KEY_PREFIX):
        return hash_key(identifier)
    if _HASH_PATTERN.fullmatch(identifier):
        return identifier
    return None


def key_name_of(key: str) -> str:
    """LiteLLM's display form of a key: C{sk-...} and its last 4 characters."""
    return f"{KEY_PREFIX}...{key[-4:]}"


def iso_time(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 UTC (C{2026-11-17T12:00:00+00:00}), as LiteLLM answers."""
    if ts is None:
        return None
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat()


# --------------------------------------------------------------------------
# The key


def _frozen_metadata(value: dict) -> dict:
    # A private copy with JSON types only, so no caller can change a key's
    # metadata behind the store's back.
    return json.loads(json.dumps(value))


def allows(allowed: tuple[str, ...], ref: str) -> bool:
    """
    Whether C{ref} is on an allow-list: an empty list allows everything;
    an entry matches exactly, C{*} matches everything and C{provider/*}
    every model of that provider (LiteLLM's wildcard forms).
    """
    if not allowed:
        return True
    for entry in allowed:
        if entry == ref or entry == "*":
            return True
        if entry.endswith("/*") and ref.startswith(entry[:-1]):
            return True
    return False


@attrs.frozen
class VirtualKey:
    """
    One key as stored: everything but the key itself.  Immutable: an update
    swaps in a new object, so a request keeps a consistent view.
    """

    token_hash: str
    key_name: str
    key_alias: str | None = None
    team_id: str | None = None
    user_id: str | None = None
    #: Allowed model refs; empty means every model.
    models: tuple[str, ...] = ()
    max_budget: float | None = None
    budget_duration: str | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    metadata: dict = attrs.field(factory=dict, hash=False)
    #: The key's own model names (LiteLLM's C{aliases}): name -> model name.
    aliases: dict = attrs.field(factory=dict, hash=False)
    created_at: float = 0.0
    updated_at: float = 0.0
    #: Epoch seconds; the key fails from this instant on.  None: never expires.
    expires: float | None = None
    blocked: bool = False
    organization_id: str | None = None
    #: Spend that raises an alert, without refusing anything.
    soft_budget: float | None = None
    #: Requests in flight at once; 0 refuses every request (as LiteLLM).
    max_parallel_requests: int | None = None
    tags: tuple[str, ...] = ()
    #: model name -> {"max_budget", "budget_duration"}.
    model_max_budget: dict = attrs.field(factory=dict, hash=False)
    model_rpm_limit: dict = attrs.field(factory=dict, hash=False)
    model_tpm_limit: dict = attrs.field(factory=dict, hash=False)
    #: When the budget's schedule was set: multi-day periods count from its day.
    budget_anchor: float | None = None
    #: LiteLLM fields kept as given (L{cllama_tx.identity.key_fields.STORED_FIELDS}).
    extra: dict = attrs.field(factory=dict, hash=False)

    def expired(self, now: float) -> bool:
        """Whether the key has expired at C{now} (to the second: C{now >= expires})."""
        return self.expires is not None and now >= self.expires

    def usable(self, now: float) -> bool:
        """Neither blocked nor expired."""
        return not self.blocked and not self.expired(now)

    @property
    def claw_id(self) -> str:
        """Who to name in the audit stream: the user, else the alias, else the key's display name."""
        return self.user_id or self.key_alias or self.key_name

    def allows_model(self, ref: str) -> bool:
        """Whether C{ref} is on the key's allow-list (L{allows})."""
        return allows(self.models, ref)

    def to_info(self) -> dict[str, Any]:
        """
        LiteLLM's C{/key/info} C{info} object (without C{spend} and
        C{budget_reset_at}, which the ledger and the budget's schedule
        know).  C{token} is the hash; the key itself is never here.  The
        stored LiteLLM fields are present with their values, or LiteLLM's
        defaults when never set, so clients that read them keep working.
        """
        info = stored_defaults()
        info.update(_frozen_metadata(self.extra))
        info.update({
            "token": self.token_hash,
            "key_name": self.key_name,
            "key_alias": self.key_alias,
            "team_id": self.team_id,
            "user_id": self.user_id,
            "organization_id": self.organization_id,
            "org_id": self.organization_id,
            "models": list(self.models),
            "max_budget": self.max_budget,
            "budget_duration": self.budget_duration,
            "soft_budget": self.soft_budget,
            "rpm_limit": self.rpm_limit,
            "tpm_limit": self.tpm_limit,
            "max_parallel_requests": self.max_parallel_requests,
            "metadata": _frozen_metadata(self.metadata),
            "tags": list(self.tags),
            "aliases": dict(self.aliases),
            "model_max_budget": _frozen_metadata(self.model_max_budget),
            "model_rpm_limit": dict(self.model_rpm_limit),
            "model_tpm_limit": dict(self.model_tpm_limit),
            "expires": iso_time(self.expires),
            "blocked": self.blocked,
            "created_at": iso_time(self.created_at),
            "updated_at": iso_time(self.updated_at),
            "created_by": None,
            "updated_by": None,
            "litellm_budget_table": None,
            "soft_budget_cooldown": False,
            "rotation_count": 0,
            "last_rotation_at": None,
            "key_rotation_at": None,
            "last_active": None,
            "object_permission_id": None,
        })
        return info


@attrs.frozen
class KeyPage:
    """One page of L{VirtualKeyStore.list}, newest first."""

    keys: tuple[VirtualKey, ...]
    total_count: int
    current_page: int
    total_pages: int
