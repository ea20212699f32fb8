"""
A virtual key and the key API's fields: the key's shape and hash,
durations, the stored key as an immutable value, and the validation of
C{/key/generate} and C{/key/update} bodies.

Pure: no I/O, tested without a reactor.  The store that keeps keys is
L{cllama_tx.identity.virtual_keys}; its tables, L{cllama_tx.identity.key_rows}.
"""

from __future__ import annotations

import calendar
import datetime
import hashlib
import json
import math
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any

import attrs

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

#: Durations are capped, so that an expiry always fits a datetime.
MAX_DURATION_SECONDS = 100 * 366 * 86400
_DURATION = re.compile(r"(\d{1,10})(mo|[smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_MONTH_APPROXIMATION = 30 * 86400

MAX_TEXT = 256
MAX_MODELS = 1000
MAX_METADATA_BYTES = 16 * 1024
MAX_ALIASES = 1000
MAX_COUNT = 2**53  # rpm / tpm: any larger is not a limit a JSON client can mean


# --------------------------------------------------------------------------
# Errors


class InvalidField(ValueError):
    """A key field is malformed; C{field} names it (the 400's C{param})."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class DuplicateKey(InvalidField):
    """A caller-chosen key, or a key alias, that another key already has."""


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


def _months_ahead(now: float, months: int) -> float:
    """Seconds from C{now} to the same day and time C{months} calendar months later (UTC)."""
    start = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    index = start.month - 1 + months
    year = start.year + index // 12
    month = index % 12 + 1
    day = min(start.day, calendar.monthrange(year, month)[1])
    return (start.replace(year=year, month=month, day=day) - start).total_seconds()


def parse_duration(text: object, now: float | None = None) -> float:
    """
    Seconds of a LiteLLM duration: a whole number and one of C{s}, C{m}
    (minutes), C{h}, C{d}, C{w}, C{mo} (calendar months: the same day of the
    month, clamped to its last day, counted from C{now} in UTC; 30 days each
    when C{now} is not given).  C{30s}, C{15m}, C{24h}, C{7d}, C{2w},
    C{1mo}.  Surrounding spaces are ignored; the number must be positive and
    the duration at most 100 years.

    @raise ValueError: anything else.
    """
    if not isinstance(text, str):
        raise ValueError("a duration must be a string such as \"30s\", \"24h\" or \"7d\"")
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: use a whole number and s, m, h, d, w or mo"
            " (e.g. \"30s\", \"15m\", \"24h\", \"7d\", \"1mo\")"
        )
    value, unit = int(match.group(1)), match.group(2)
    if value <= 0:
        raise ValueError(f"the duration {text!r} must be positive")
    if unit == "mo":
        if value > 1200:
            raise ValueError(f"the duration {text!r} is longer than 100 years")
        seconds = _MONTH_APPROXIMATION * value if now is None else _months_ahead(now, value)
    else:
        seconds = value * _DURATION_UNITS[unit]
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"the duration {text!r} is longer than 100 years")
    return float(seconds)


# --------------------------------------------------------------------------
# The key


def _frozen_metadata(value: dict) -> dict:
    # A private copy with JSON types only, so no caller can change a key's
    # metadata behind the store's back.
    return json.loads(json.dumps(value))


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
        """
        Whether C{ref} is on the allow-list: an empty list allows everything;
        an entry matches exactly, C{*} matches everything and C{provider/*}
        every model of that provider (LiteLLM's wildcard forms).
        """
        if not self.models:
            return True
        for allowed in self.models:
            if allowed == ref or allowed == "*":
                return True
            if allowed.endswith("/*") and ref.startswith(allowed[:-1]):
                return True
        return False

    def to_info(self) -> dict[str, Any]:
        """
        LiteLLM's C{/key/info} C{info} object (without C{spend}, which the
        ledger knows).  C{token} is the hash; the key itself is never here.
        Fields LiteLLM has and cllama_tx does not support are present with
        their empty values, so clients that read them keep working.
        """
        return {
            "token": self.token_hash,
            "key_name": self.key_name,
            "key_alias": self.key_alias,
            "team_id": self.team_id,
            "user_id": self.user_id,
            "models": list(self.models),
            "max_budget": self.max_budget,
            "budget_duration": self.budget_duration,
            "rpm_limit": self.rpm_limit,
            "tpm_limit": self.tpm_limit,
            "metadata": _frozen_metadata(self.metadata),
            "expires": iso_time(self.expires),
            "blocked": self.blocked,
            "created_at": iso_time(self.created_at),
            "updated_at": iso_time(self.updated_at),
            # LiteLLM fields without an equivalent here.
            "max_parallel_requests": None,
            "soft_budget": None,
            "aliases": dict(self.aliases),
            "config": {},
            "permissions": {},
            "allowed_cache_controls": [],
            "model_max_budget": {},
            "budget_id": None,
            "organization_id": None,
        }


@attrs.frozen
class KeyPage:
    """One page of L{VirtualKeyStore.list}, newest first."""

    keys: tuple[VirtualKey, ...]
    total_count: int
    current_page: int
    total_pages: int


# --------------------------------------------------------------------------
# Validation of the key API's fields (pure)

#: Fields cllama_tx understands, besides C{key}.
KEY_FIELDS = (
    "key_alias",
    "team_id",
    "user_id",
    "models",
    "max_budget",
    "budget_duration",
    "rpm_limit",
    "tpm_limit",
    "metadata",
    "duration",
    "blocked",
    "aliases",
)

#: LiteLLM fields that cllama_tx does not support.  Sent empty (null, {},
#: [], "", 0, false: what SDKs send by default) they are ignored; sent with a
#: value they are refused, because silently dropping a limit or a scope is
#: worse than a 400.
UNSUPPORTED_FIELDS = frozenset(
    {
        "allowed_cache_controls",
        "allowed_routes",
        "auto_rotate",
        "budget_id",
        "config",
        "enforced_params",
        "guardrails",
        "key_type",
        "max_parallel_requests",
        "model_max_budget",
        "model_rpm_limit",
        "model_tpm_limit",
        "object_permission",
        "organization_id",
        "permissions",
        "prompts",
        "rotation_interval",
        "send_invite_email",
        "soft_budget",
        "spend",
        "tags",
        "temp_budget_expiry",
        "temp_budget_increase",
    }
)

_HINTS = {
    "organization_id": " (use team_id for the organisation)",
    "max_parallel_requests": " (use rpm_limit and tpm_limit)",
}


def _empty(value: Any) -> bool:
    return value is None or value is False or value in ("", 0) or value == {} or value == []


def _text(field: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise InvalidField(field, f"'{field}' must be a string")
    if len(value) > MAX_TEXT:
        raise InvalidField(field, f"'{field}' is longer than {MAX_TEXT} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidField(field, f"'{field}' contains control characters")
    return value


def _models(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise InvalidField("models", "'models' must be a list of model names")
    if len(value) > MAX_MODELS:
        raise InvalidField("models", f"'models' has more than {MAX_MODELS} entries")
    out: dict[str, None] = {}
    for item in value:
        if not isinstance(item, str) or not item:
            raise InvalidField("models", "'models' must be a list of non-empty strings")
        out[_text("models", item)] = None  # type: ignore[index]
    return tuple(out)


def _money(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidField("max_budget", "'max_budget' must be a number (US dollars)")
    if value < 0:
        raise InvalidField("max_budget", "'max_budget' must not be negative")
    return float(value)


def _count(field: str, value: Any) -> int | None:
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value != int(value)
    ):
        raise InvalidField(field, f"'{field}' must be a whole number")
    if value < 0:
        raise InvalidField(field, f"'{field}' must not be negative")
    if value > MAX_COUNT:
        raise InvalidField(field, f"'{field}' is too large")
    return int(value)


def _duration(field: str, value: Any) -> str | None:
    if value is None or value == "":
        return None
    try:
        parse_duration(value)
    except ValueError as e:
        raise InvalidField(field, f"'{field}': {e}") from None
    return value.strip()


def _metadata(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidField("metadata", "'metadata' must be a JSON object")
    try:
        encoded = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        raise InvalidField("metadata", "'metadata' must hold JSON values only") from None
    if len(encoded.encode("utf-8")) > MAX_METADATA_BYTES:
        raise InvalidField("metadata", f"'metadata' is larger than {MAX_METADATA_BYTES} bytes")
    return json.loads(encoded)


def model_aliases(field: str, value: Any) -> dict:
    """
    A name -> model name mapping (a key's C{aliases}, a team's
    C{model_aliases}): strings as L{_text} checks them, at most
    L{MAX_ALIASES}; None is no alias.
    """
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidField(field, f"'{field}' must be an object mapping model names to model names")
    if len(value) > MAX_ALIASES:
        raise InvalidField(field, f"'{field}' has more than {MAX_ALIASES} entries")
    out: dict[str, str] = {}
    for name, target in value.items():
        name = _text(field, name)
        target = _text(field, target)
        if name is None or target is None:
            raise InvalidField(field, f"'{field}' must map non-empty names to non-empty model names")
        out[name.strip()] = target.strip()
    return out


def _blocked(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise InvalidField("blocked", "'blocked' must be true or false")


_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "key_alias": lambda v: _text("key_alias", v),
    "team_id": lambda v: _text("team_id", v),
    "user_id": lambda v: _text("user_id", v),
    "models": _models,
    "max_budget": _money,
    "budget_duration": lambda v: _duration("budget_duration", v),
    "rpm_limit": lambda v: _count("rpm_limit", v),
    "tpm_limit": lambda v: _count("tpm_limit", v),
    "metadata": _metadata,
    "duration": lambda v: _duration("duration", v),
    "blocked": _blocked,
    "aliases": lambda v: model_aliases("aliases", v),
}


def validate_key_fields(doc: Mapping[str, Any], *, update: bool) -> dict[str, Any]:
    """
    The fields of a C{/key/generate} (C{update=False}) or C{/key/update}
    body, checked and normalised: strings (C{""} is null), C{models} a tuple
    of distinct non-empty strings, C{max_budget} a float >= 0, C{rpm_limit}
    and C{tpm_limit} whole numbers >= 0, C{duration} and C{budget_duration}
    parseable by L{parse_duration}, C{metadata} a JSON object of at most
    16 KiB, C{blocked} a boolean.

    For an update only the fields present are returned; an explicit null
    clears the field (C{models}: every model, C{metadata}: C{{}}), except
    C{duration} and C{blocked}, where null leaves the key as it is.  C{key}
    is not looked at (the caller handles it: a custom key on generate, the
    key's identifier on update).

    @raise InvalidField: naming the first bad field; also for a field
        cllama_tx does not support or know, unless its value is empty.
    """
    out: dict[str, Any] = {}
    for name in sorted(doc):
        if name == "key":
            continue
        value = doc[name]
        validator = _VALIDATORS.get(name)
        if validator is None:
            if _empty(value):
                continue
            if name in UNSUPPORTED_FIELDS:
                hint = _HINTS.get(name, "")
                raise InvalidField(name, f"'{name}' is not supported by cllama_tx{hint}")
            raise InvalidField(name, f"unknown field '{name}'")
        checked = validator(value)
        if update and checked is None and name in ("duration", "blocked"):
            continue
        out[name] = checked
    if not update:
        defaults: dict[str, Any] = {
            "key_alias": None,
            "team_id": None,
            "user_id": None,
            "models": (),
            "max_budget": None,
            "budget_duration": None,
            "rpm_limit": None,
            "tpm_limit": None,
            "metadata": {},
            "duration": None,
            "blocked": False,
            "aliases": {},
        }
        for name, default in defaults.items():
            if out.get(name) is None:
                out[name] = default
    return out
