"""
Virtual keys: short-lived C{sk-...} keys minted through the LiteLLM-compatible
key API (L{cllama_tx.sites.keys}), each scoped to a team and a user, with its own
model allow-list, budget and rate limits.

Why it is shaped like this:

  - B{Only a hash is stored.}  A key is C{sk-} plus 43 URL-safe characters
    (256 random bits); the database and memory hold its SHA-256 (hex), which
    is also its id in C{/key/list}, as in LiteLLM (the same hash function, so
    LiteLLM's token hashes mean the same here).  The clear key is returned
    once, by C{create}, and never stored or logged.
  - B{The hot path is a hash and a dict lookup.}  Every live key is in
    memory, loaded at C{startService}; L{VirtualKeyStore.lookup} checks the
    expiry against the injected clock, to the second.
  - B{Memory changes first, on the reactor thread.}  A deleted or blocked key
    fails at once, even before its row is committed.  Writes go through one
    writer thread (a one-thread pool: its FIFO queue keeps them in order, so
    a delete can never overtake the create it follows) on the store's own
    connection to the ledger's database file (WAL, C{busy_timeout}).
  - B{Failure is handled per kind.}  A create whose commit fails is taken
    out of memory again (its key was never shown to anyone); an update whose
    commit fails is rolled back in memory; a delete stays in effect in
    memory (fail closed), and a retried delete writes it again.

Pure helpers (L{generate_key}, L{hash_key}, L{looks_like_virtual_key},
L{parse_duration}, L{validate_key_fields}) do no I/O and are tested without a
reactor.
"""

from __future__ import annotations

import builtins
import calendar
import datetime
import hashlib
import heapq
import json
import math
import os
import re
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from cllama_tx.store.sqlite_tx import transaction as _transaction

__all__ = [
    "DuplicateKey",
    "InvalidField",
    "KeyNotFound",
    "KeyPage",
    "StoreClosed",
    "VirtualKey",
    "VirtualKeyStore",
    "generate_key",
    "hash_key",
    "iso_time",
    "looks_like_virtual_key",
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

#: Keys that expired longer ago than this are dropped from memory (they stay
#: in the database); /key/info then answers 404 for them.
DEFAULT_EXPIRED_RETENTION = 7 * 86400.0
PRUNE_INTERVAL = 3600.0

_log = Logger(namespace="cllama_tx.virtual_keys")


# --------------------------------------------------------------------------
# Errors


class InvalidField(ValueError):
    """A key field is malformed; C{field} names it (the 400's C{param})."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class DuplicateKey(InvalidField):
    """A caller-chosen key, or a key alias, that another key already has."""


class KeyNotFound(LookupError):
    """No live key has this hash."""


class StoreClosed(Exception):
    """The store is not running: writes are refused."""


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


# --------------------------------------------------------------------------
# The database

_COLUMNS: tuple[tuple[str, str], ...] = (
    ("token_hash", "TEXT PRIMARY KEY"),
    ("key_name", "TEXT NOT NULL"),
    ("key_alias", "TEXT"),
    ("team_id", "TEXT"),
    ("user_id", "TEXT"),
    ("models_json", "TEXT NOT NULL DEFAULT '[]'"),
    ("max_budget", "REAL"),
    ("budget_duration", "TEXT"),
    ("rpm_limit", "INTEGER"),
    ("tpm_limit", "INTEGER"),
    ("metadata_json", "TEXT NOT NULL DEFAULT '{}'"),
    ("aliases_json", "TEXT NOT NULL DEFAULT '{}'"),
    ("created_at", "REAL NOT NULL DEFAULT 0"),
    ("updated_at", "REAL NOT NULL DEFAULT 0"),
    ("expires", "REAL"),
    ("blocked", "INTEGER NOT NULL DEFAULT 0"),
    ("deleted_at", "REAL"),
)
_ROW_COLUMNS = tuple(name for name, _ in _COLUMNS if name != "deleted_at")
_CREATE_TABLE = "CREATE TABLE IF NOT EXISTS virtual_keys ({})".format(
    ", ".join(f"{name} {kind}" for name, kind in _COLUMNS)
)
# A team's settings kept here (its budget lives in the ledger): LiteLLM's
# model_aliases for now.
_CREATE_TEAMS = (
    "CREATE TABLE IF NOT EXISTS team_settings (team_id TEXT PRIMARY KEY, "
    "model_aliases_json TEXT NOT NULL DEFAULT '{}', updated_at REAL NOT NULL DEFAULT 0)"
)
_UPSERT_TEAM = (
    "INSERT INTO team_settings (team_id, model_aliases_json, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT(team_id) DO UPDATE SET model_aliases_json = excluded.model_aliases_json, "
    "updated_at = excluded.updated_at"
)
_CREATE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS virtual_keys_team ON virtual_keys (team_id)",
    "CREATE INDEX IF NOT EXISTS virtual_keys_user ON virtual_keys (user_id)",
)
_INSERT = "INSERT INTO virtual_keys ({}) VALUES ({})".format(
    ", ".join(_ROW_COLUMNS), ", ".join("?" for _ in _ROW_COLUMNS)
)
_UPDATE = "UPDATE virtual_keys SET {} WHERE token_hash = ? AND deleted_at IS NULL".format(
    ", ".join(f"{name} = ?" for name in _ROW_COLUMNS if name != "token_hash")
)
_DELETE = "UPDATE virtual_keys SET deleted_at = ? WHERE token_hash = ? AND deleted_at IS NULL"
_SELECT_LIVE = "SELECT {} FROM virtual_keys WHERE deleted_at IS NULL AND (expires IS NULL OR expires > ?)".format(
    ", ".join(_ROW_COLUMNS)
)

DIR_MODE = 0o700
FILE_MODE = 0o600


def _row(vk: VirtualKey) -> tuple[Any, ...]:
    return (
        vk.token_hash,
        vk.key_name,
        vk.key_alias,
        vk.team_id,
        vk.user_id,
        json.dumps(list(vk.models)),
        vk.max_budget,
        vk.budget_duration,
        vk.rpm_limit,
        vk.tpm_limit,
        json.dumps(vk.metadata),
        json.dumps(vk.aliases),
        vk.created_at,
        vk.updated_at,
        vk.expires,
        1 if vk.blocked else 0,
    )


def _from_row(values: tuple[Any, ...]) -> VirtualKey:
    row = dict(zip(_ROW_COLUMNS, values, strict=True))
    return VirtualKey(
        token_hash=row["token_hash"],
        key_name=row["key_name"],
        key_alias=row["key_alias"],
        team_id=row["team_id"],
        user_id=row["user_id"],
        models=tuple(json.loads(row["models_json"] or "[]")),
        max_budget=row["max_budget"],
        budget_duration=row["budget_duration"],
        rpm_limit=row["rpm_limit"],
        tpm_limit=row["tpm_limit"],
        metadata=json.loads(row["metadata_json"] or "{}"),
        aliases=json.loads(row["aliases_json"] or "{}"),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        expires=row["expires"],
        blocked=bool(row["blocked"]),
    )


def _open_database(path: str) -> sqlite3.Connection:
    """
    The store's connection to the (ledger's) database file: directory 0700
    and file 0600 when we create them, WAL, C{busy_timeout}, the
    C{virtual_keys} table created or completed.
    """
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
        os.chmod(directory, DIR_MODE)  # makedirs' mode is filtered by the umask
    if not os.path.exists(path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        os.close(fd)
        os.chmod(path, FILE_MODE)
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
        conn.execute("PRAGMA busy_timeout = 30000")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"{path}: cannot use WAL mode (journal_mode is {mode})")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(_CREATE_TABLE)
            present = {r[1] for r in conn.execute("PRAGMA table_info(virtual_keys)")}
            for name, kind in _COLUMNS:
                if name not in present:
                    # A table from an older version: add what it lacks.
                    conn.execute(f"ALTER TABLE virtual_keys ADD COLUMN {name} {kind}")
            for statement in _CREATE_INDEXES:
                conn.execute(statement)
            conn.execute(_CREATE_TEAMS)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    except BaseException:
        conn.close()
        raise
    return conn


def _insert(conn: sqlite3.Connection, row: tuple[Any, ...]) -> None:
    _transaction(conn, lambda c: c.execute(_INSERT, row))


def _set_team(conn: sqlite3.Connection, team_id: str, aliases_json: str, ts: float) -> None:
    _transaction(conn, lambda c: c.execute(_UPSERT_TEAM, (team_id, aliases_json, ts)))


def _update(conn: sqlite3.Connection, row: tuple[Any, ...]) -> None:
    params = row[1:] + (row[0],)
    _transaction(conn, lambda c: c.execute(_UPDATE, params))


def _delete(conn: sqlite3.Connection, hashes: list[str], ts: float) -> set[str]:
    """Mark C{hashes} deleted; return those that were live on disk."""

    def body(c: sqlite3.Connection) -> set[str]:
        marked = set()
        for token_hash in hashes:
            if c.execute(_DELETE, (ts, token_hash)).rowcount:
                marked.add(token_hash)
        return marked

    return _transaction(conn, body)


def _shield(d: defer.Deferred) -> defer.Deferred:
    """
    A Deferred with C{d}'s result whose cancellation does not reach C{d}:
    a client that goes away must not cancel the store's bookkeeping of a
    write that the writer thread will commit anyway.
    """
    out: defer.Deferred = defer.Deferred()

    def fire(result: Any) -> None:
        if out.called:
            return None  # cancelled by the caller; the store has logged failures
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return None

    d.addBoth(fire)
    return out


# --------------------------------------------------------------------------
# The store


class VirtualKeyStore(service.Service):
    """
    Every virtual key, in memory and in the C{virtual_keys} table of the
    database at C{db_path} (the ledger's file).  C{clock} times expiry and
    pruning; C{reactor} runs the writer thread's results.

    Reads (L{lookup}, L{get}, L{list}) are from memory and synchronous.
    Writes (L{create}, L{update}, L{delete}) change memory at once and return
    a Deferred that fires once the change is committed.
    """

    def __init__(
        self,
        db_path: str,
        clock: Any,
        reactor: Any,
        expired_retention: float = DEFAULT_EXPIRED_RETENTION,
        prune_interval: float = PRUNE_INTERVAL,
    ) -> None:
        self.path = db_path
        self._clock = clock
        self._reactor = reactor
        self.expired_retention = expired_retention
        self.prune_interval = prune_interval
        self._keys: dict[str, VirtualKey] = {}
        self._aliases: dict[str, str] = {}  # key_alias -> token_hash, live keys only
        self._team_aliases: dict[str, dict[str, str]] = {}  # team_id -> model_aliases
        self._conn: sqlite3.Connection | None = None
        self._pool: ThreadPool | None = None
        self._closing = False
        self._in_flight = 0
        self._idle_waiters: list[defer.Deferred] = []
        self._pruning: task.LoopingCall | None = None

    # -- lifecycle

    def startService(self) -> None:
        """
        Open the database, create the table if needed and load every live
        key, synchronously: a store that cannot open must stop the daemon
        before it serves anything.
        """
        if self._conn is not None:
            raise RuntimeError("virtual key store already started, or still closing")
        conn = _open_database(self.path)
        try:
            since = self._clock.seconds() - self.expired_retention
            keys = {vk.token_hash: vk for vk in map(_from_row, conn.execute(_SELECT_LIVE, (since,)))}
            teams = {
                team: json.loads(raw or "{}")
                for team, raw in conn.execute("SELECT team_id, model_aliases_json FROM team_settings")
            }
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._keys = keys
        self._team_aliases = {team: aliases for team, aliases in teams.items() if aliases}
        self._aliases = {vk.key_alias: h for h, vk in keys.items() if vk.key_alias is not None}
        self._closing = False
        # One thread: its FIFO queue keeps the writes in the order they were asked for.
        self._pool = ThreadPool(1, 1, name="cllama-virtual-keys-writer")
        self._pool.start()
        service.Service.startService(self)
        _log.info("virtual keys: {count} live keys loaded", count=len(keys))
        self._pruning = task.LoopingCall(self.prune)
        self._pruning.clock = self._clock
        self._pruning.start(self.prune_interval, now=False)

    def stopService(self) -> defer.Deferred:
        """Refuse new writes, commit those queued, then close the database."""
        service.Service.stopService(self)
        if self._pruning is not None:
            if self._pruning.running:
                self._pruning.stop()
            self._pruning = None
        if self._conn is None:
            return defer.succeed(None)
        self._closing = True
        d: defer.Deferred = defer.Deferred()
        if self._in_flight == 0:
            d.callback(None)
        else:
            self._idle_waiters.append(d)

        def close(_: Any) -> None:
            pool, conn = self._pool, self._conn
            self._pool = None
            self._conn = None
            if pool is not None:
                pool.stop()
            if conn is not None:
                conn.close()

        return d.addCallback(close)

    # -- reads (memory only)

    def lookup(self, key: str) -> VirtualKey | None:
        """
        The hot path: the key presented by a client, if it is a live,
        unblocked, unexpired virtual key (expiry to the second against the
        clock); else L{None}.  A hash and a dict lookup.
        """
        if not looks_like_virtual_key(key):
            return None
        found = self._keys.get(hash_key(key))
        if found is None or found.blocked:
            return None
        if found.expires is not None and self._clock.seconds() >= found.expires:
            return None
        return found

    def status(self, key: str) -> str:
        """
        Why L{lookup} refused (or not), for error messages only:
        C{valid}, C{unknown} (malformed, never issued, deleted or long
        expired), C{expired} or C{blocked}.
        """
        if not looks_like_virtual_key(key):
            return "unknown"
        found = self._keys.get(hash_key(key))
        if found is None:
            return "unknown"
        if found.blocked:
            return "blocked"
        if found.expired(self._clock.seconds()):
            return "expired"
        return "valid"

    def get(self, token_hash: str) -> VirtualKey | None:
        """The key with this hash, expired and blocked included; L{None} when deleted or unknown."""
        return self._keys.get(token_hash)

    def find_alias(self, key_alias: str) -> VirtualKey | None:
        """The live key with this alias (aliases are unique among live keys)."""
        token_hash = self._aliases.get(key_alias)
        return None if token_hash is None else self._keys.get(token_hash)

    def __len__(self) -> int:
        return len(self._keys)

    def list(
        self,
        team_id: str | None = None,
        user_id: str | None = None,
        page: int = 1,
        size: int = 10,
        key_alias: str | None = None,
    ) -> KeyPage:
        """
        Live keys (expired and blocked included), filtered, newest first
        (then by hash, so pages are stable), one page of C{size}.
        """
        if page < 1:
            raise ValueError("page must be at least 1")
        if size < 1:
            raise ValueError("size must be at least 1")
        matching = [
            vk
            for vk in self._keys.values()
            if (team_id is None or vk.team_id == team_id)
            and (user_id is None or vk.user_id == user_id)
            and (key_alias is None or vk.key_alias == key_alias)
        ]
        total = len(matching)
        start = (page - 1) * size
        # Only the pages up to this one are ordered: O(n log(page * size)).
        newest = heapq.nlargest(start + size, matching, key=lambda vk: (vk.created_at, vk.token_hash))
        return KeyPage(
            keys=tuple(newest[start : start + size]),
            total_count=total,
            current_page=page,
            total_pages=-(-total // size),
        )

    # -- writes

    def create(
        self,
        *,
        key: str | None = None,
        key_alias: str | None = None,
        team_id: str | None = None,
        user_id: str | None = None,
        # builtins.list: the class's own list() method shadows the builtin here.
        models: builtins.list[str] | tuple[str, ...] | None = (),
        max_budget: float | None = None,
        budget_duration: str | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        metadata: dict | None = None,
        duration: str | None = None,
        blocked: bool = False,
        aliases: dict | None = None,
    ) -> defer.Deferred:
        """
        Mint a key (or take the caller's C{key}, which must look like one).
        Fires with C{(key, VirtualKey)} once committed; the clear key is
        nowhere else.  Arguments are checked as L{validate_key_fields} does.

        @raise InvalidField: a bad argument.
        @raise DuplicateKey: C{key} or C{key_alias} is taken.
        @raise StoreClosed: the store is not running.
        """
        self._check_open()
        fields = validate_key_fields(
            {
                "key_alias": key_alias,
                "team_id": team_id,
                "user_id": user_id,
                "models": models,
                "max_budget": max_budget,
                "budget_duration": budget_duration,
                "rpm_limit": rpm_limit,
                "tpm_limit": tpm_limit,
                "metadata": metadata,
                "duration": duration,
                "blocked": blocked,
                "aliases": aliases,
            },
            update=False,
        )
        if key is None:
            key = generate_key()
        elif not looks_like_virtual_key(key):
            raise InvalidField(
                "key", f"'key' must be '{KEY_PREFIX}' and {MIN_KEY_BODY} to {MAX_KEY_BODY} URL-safe characters"
            )
        token_hash = hash_key(key)
        if token_hash in self._keys:
            raise DuplicateKey("key", "this key already exists")
        alias = fields["key_alias"]
        if alias is not None and alias in self._aliases:
            raise DuplicateKey("key_alias", f"a key with the alias {alias!r} already exists")
        now = self._clock.seconds()
        expires = None
        if fields["duration"] is not None:
            expires = now + parse_duration(fields["duration"], now)
        vk = VirtualKey(
            token_hash=token_hash,
            key_name=key_name_of(key),
            key_alias=alias,
            team_id=fields["team_id"],
            user_id=fields["user_id"],
            models=fields["models"],
            max_budget=fields["max_budget"],
            budget_duration=fields["budget_duration"],
            rpm_limit=fields["rpm_limit"],
            tpm_limit=fields["tpm_limit"],
            metadata=fields["metadata"],
            aliases=fields["aliases"],
            created_at=now,
            updated_at=now,
            expires=expires,
            blocked=fields["blocked"],
        )
        self._put(vk)
        d = self._write(_insert, _row(vk))

        def stored(_: Any) -> tuple[str, VirtualKey]:
            _log.info(
                "virtual key {token} created (team {team_id}, user {user_id})",
                token=token_hash[:12],
                team_id=vk.team_id,
                user_id=vk.user_id,
            )
            return key, vk

        def failed(failure: Failure) -> Failure:
            if self._keys.get(token_hash) is vk:
                self._remove(vk)
            if failure.check(sqlite3.IntegrityError):
                # Only a caller-chosen key can meet this: one deleted before.
                return Failure(DuplicateKey("key", "this key was used before"))
            _log.error(
                "virtual keys: could not store key {token}: {error}",
                token=token_hash[:12],
                error=failure.getErrorMessage(),
            )
            return failure

        return _shield(d.addCallbacks(stored, failed))

    def update(self, token_hash: str, **changes: Any) -> defer.Deferred:
        """
        Change a live key's fields (those of L{validate_key_fields} with
        C{update=True}; C{duration} sets a new expiry counted from now).
        Memory changes at once; fires with the new L{VirtualKey} once
        committed, or fails (memory is then rolled back, unless a later
        change came).

        @raise KeyNotFound: no live key has this hash.
        @raise InvalidField: a bad change.
        @raise DuplicateKey: the new alias is taken by another key.
        @raise StoreClosed: the store is not running.
        """
        self._check_open()
        previous = self._keys.get(token_hash)
        if previous is None:
            raise KeyNotFound(token_hash)
        fields = validate_key_fields(changes, update=True)
        now = self._clock.seconds()
        new_values: dict[str, Any] = {}
        for name, value in fields.items():
            if name == "duration":
                new_values["expires"] = now + parse_duration(value, now)
            else:
                new_values[name] = value
        alias = new_values.get("key_alias", previous.key_alias)
        if alias is not None and self._aliases.get(alias, token_hash) != token_hash:
            raise DuplicateKey("key_alias", f"a key with the alias {alias!r} already exists")
        vk = attrs.evolve(previous, updated_at=now, **new_values)
        self._remove(previous)
        self._put(vk)
        d = self._write(_update, _row(vk))

        def failed(failure: Failure) -> Failure:
            if self._keys.get(token_hash) is vk:
                self._remove(vk)
                self._put(previous)
            _log.error(
                "virtual keys: could not update key {token}: {error}",
                token=token_hash[:12],
                error=failure.getErrorMessage(),
            )
            return failure

        return _shield(d.addCallbacks(lambda _: vk, failed))

    def delete(self, hashes: Iterable[str]) -> defer.Deferred:
        """
        Delete keys by hash: they fail at once.  Fires, once committed, with
        the hashes (in the order given, without repeats) that named a key
        live in memory or on disk: a retried delete is answered the same way
        and writes again what a failed commit did not.  If the commit fails,
        the keys stay deleted in memory (fail closed) and the Deferred fails.

        @raise StoreClosed: the store is not running.
        """
        self._check_open()
        ordered = list(dict.fromkeys(h for h in hashes if isinstance(h, str)))
        removed = []
        for token_hash in ordered:
            vk = self._keys.get(token_hash)
            if vk is not None:
                self._remove(vk)
                removed.append(token_hash)
        d = self._write(_delete, ordered, self._clock.seconds())

        def stored(marked: set[str]) -> list[str]:
            deleted = set(removed) | marked
            if deleted:
                _log.info("virtual keys: {count} keys deleted", count=len(deleted))
            return [h for h in ordered if h in deleted]

        def failed(failure: Failure) -> Failure:
            _log.error(
                "virtual keys: {count} deletions are in effect but could not be stored: {error}",
                count=len(removed),
                error=failure.getErrorMessage(),
            )
            return failure

        return _shield(d.addCallbacks(stored, failed))

    def team_aliases(self, team_id: str) -> dict[str, str]:
        """A team's C{model_aliases} (empty when it has none); from memory."""
        return self._team_aliases.get(team_id, {})

    def set_team_aliases(self, team_id: str, aliases: Any) -> defer.Deferred:
        """
        Replace a team's C{model_aliases} (LiteLLM's C{/team/new} and
        C{/team/update}); in effect at once, fires once committed.

        @raise InvalidField: not a mapping of names to model names.
        """
        self._check_open()
        checked = model_aliases("model_aliases", aliases)
        previous = self._team_aliases.get(team_id)
        if checked:
            self._team_aliases[team_id] = checked
        else:
            self._team_aliases.pop(team_id, None)
        d = self._write(_set_team, team_id, json.dumps(checked), self._clock.seconds())

        def failed(failure: Failure) -> Failure:
            if previous is None:
                self._team_aliases.pop(team_id, None)
            else:
                self._team_aliases[team_id] = previous
            _log.error("virtual keys: could not store the aliases of team {team}: {error}",
                       team=team_id, error=failure.getErrorMessage())
            return failure

        return _shield(d.addCallbacks(lambda _: checked, failed))

    def prune(self) -> int:
        """
        Drop from memory the keys that expired longer than
        C{expired_retention} ago (they stay in the database).  Runs every
        C{prune_interval}; returns how many were dropped.
        """
        bound = self._clock.seconds() - self.expired_retention
        stale = [vk for vk in self._keys.values() if vk.expires is not None and vk.expires <= bound]
        for vk in stale:
            self._remove(vk)
        return len(stale)

    # -- internals

    def _check_open(self) -> None:
        if self._pool is None or self._closing:
            raise StoreClosed("the virtual key store is not running")

    def _put(self, vk: VirtualKey) -> None:
        self._keys[vk.token_hash] = vk
        if vk.key_alias is not None:
            self._aliases[vk.key_alias] = vk.token_hash

    def _remove(self, vk: VirtualKey) -> None:
        self._keys.pop(vk.token_hash, None)
        if vk.key_alias is not None and self._aliases.get(vk.key_alias) == vk.token_hash:
            del self._aliases[vk.key_alias]

    def _write(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        """Run C{function(connection, *args)} on the writer thread, in order."""
        assert self._pool is not None and self._conn is not None
        self._in_flight += 1
        d = threads.deferToThreadPool(self._reactor, self._pool, function, self._conn, *args)

        def done(result: Any) -> Any:
            self._in_flight -= 1
            if self._in_flight == 0:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    waiter.callback(None)
            return result

        return d.addBoth(done)
