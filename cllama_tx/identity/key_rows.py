"""
The virtual key store's tables (C{virtual_keys}, C{team_settings}) and the
transactions the store runs on them, in the portable SQL both databases
speak (L{cllama_tx.store.database.postgres_sql}).

Why here and not in the store: the store decides what memory holds and in
which order writes go; this module only says what a write or a read is in
SQL.  Every write adds its change row (L{record_change}) in its own
transaction, so other instances re-read exactly what changed, and checks in
the database what memory cannot see alone (an alias or a caller-chosen key
taken by another instance), under an advisory lock on PostgreSQL.

On SQLite, L{prepare} creates or completes the tables; on PostgreSQL the
migrations do (L{cllama_tx.store.pg_schema}).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from cllama_tx.identity.key_model import DuplicateKey, VirtualKey
from cllama_tx.store.shared import SQLITE_COORDINATION_SCHEMA, record_change

__all__ = [
    "ROW_COLUMNS",
    "delete",
    "fetch",
    "fetch_teams",
    "insert",
    "key_of",
    "load",
    "merge_extra",
    "prepare",
    "row_of",
    "set_team",
    "update",
]

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
    # Schema 4 (LiteLLM's fields, docs/VIRTUAL_KEYS.md).
    ("organization_id", "TEXT"),
    ("soft_budget", "REAL"),
    ("max_parallel_requests", "INTEGER"),
    ("tags_json", "TEXT NOT NULL DEFAULT '[]'"),
    ("model_max_budget_json", "TEXT NOT NULL DEFAULT '{}'"),
    ("model_rpm_limit_json", "TEXT NOT NULL DEFAULT '{}'"),
    ("model_tpm_limit_json", "TEXT NOT NULL DEFAULT '{}'"),
    ("budget_anchor", "REAL"),
    ("extra_json", "TEXT NOT NULL DEFAULT '{}'"),
)
ROW_COLUMNS = tuple(name for name, _ in _COLUMNS if name != "deleted_at")
_SELECTED = ", ".join(ROW_COLUMNS)

# SQLite only: PostgreSQL has the same tables from its migrations.
_SQLITE_TABLE = "CREATE TABLE IF NOT EXISTS virtual_keys ({})".format(
    ", ".join(f"{name} {kind}" for name, kind in _COLUMNS)
)
_SQLITE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS virtual_keys_team ON virtual_keys (team_id)",
    "CREATE INDEX IF NOT EXISTS virtual_keys_user ON virtual_keys (user_id)",
    "CREATE INDEX IF NOT EXISTS virtual_keys_alias ON virtual_keys (key_alias) WHERE key_alias IS NOT NULL",
    "CREATE INDEX IF NOT EXISTS virtual_keys_organization ON virtual_keys (organization_id)",
)
# A team's settings kept here (its budget lives in the ledger): LiteLLM's
# model_aliases for now.
_SQLITE_TEAMS = (
    "CREATE TABLE IF NOT EXISTS team_settings (team_id TEXT PRIMARY KEY, "
    "model_aliases_json TEXT NOT NULL DEFAULT '{}', updated_at REAL NOT NULL DEFAULT 0)"
)

_INSERT = "INSERT INTO virtual_keys ({}) VALUES ({}) ON CONFLICT (token_hash) DO NOTHING".format(
    _SELECTED, ", ".join("?" for _ in ROW_COLUMNS)
)
_DELETE = "UPDATE virtual_keys SET deleted_at = ? WHERE token_hash = ? AND deleted_at IS NULL"
_LIVE = "deleted_at IS NULL AND (expires IS NULL OR expires > ?)"
_UPSERT_TEAM = (
    "INSERT INTO team_settings (team_id, model_aliases_json, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (team_id) DO UPDATE SET model_aliases_json = excluded.model_aliases_json, "
    "updated_at = excluded.updated_at"
)
_ALIAS_TAKEN = (
    f"SELECT token_hash FROM virtual_keys WHERE key_alias = ? AND token_hash <> ? AND {_LIVE} LIMIT 1"
)

#: A key field as it is stored: its column, and how its value is written.
_FIELD_COLUMNS: dict[str, tuple[str, Any]] = {
    "key_alias": ("key_alias", None),
    "team_id": ("team_id", None),
    "user_id": ("user_id", None),
    "models": ("models_json", lambda v: json.dumps(list(v))),
    "max_budget": ("max_budget", None),
    "budget_duration": ("budget_duration", None),
    "rpm_limit": ("rpm_limit", None),
    "tpm_limit": ("tpm_limit", None),
    "metadata": ("metadata_json", json.dumps),
    "aliases": ("aliases_json", json.dumps),
    "expires": ("expires", None),
    "blocked": ("blocked", lambda v: 1 if v else 0),
    "organization_id": ("organization_id", None),
    "soft_budget": ("soft_budget", None),
    "max_parallel_requests": ("max_parallel_requests", None),
    "tags": ("tags_json", lambda v: json.dumps(list(v))),
    "model_max_budget": ("model_max_budget_json", json.dumps),
    "model_rpm_limit": ("model_rpm_limit_json", json.dumps),
    "model_tpm_limit": ("model_tpm_limit_json", json.dumps),
    "budget_anchor": ("budget_anchor", None),
}


def row_of(vk: VirtualKey) -> tuple[Any, ...]:
    """A key as the values of L{ROW_COLUMNS}."""
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
        vk.organization_id,
        vk.soft_budget,
        vk.max_parallel_requests,
        json.dumps(list(vk.tags)),
        json.dumps(vk.model_max_budget),
        json.dumps(vk.model_rpm_limit),
        json.dumps(vk.model_tpm_limit),
        vk.budget_anchor,
        json.dumps(vk.extra),
    )


def key_of(values: Iterable[Any]) -> VirtualKey:
    """The key of a row of L{ROW_COLUMNS}."""
    row = dict(zip(ROW_COLUMNS, tuple(values), strict=True))
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
        organization_id=row["organization_id"],
        soft_budget=row["soft_budget"],
        max_parallel_requests=row["max_parallel_requests"],
        tags=tuple(json.loads(row["tags_json"] or "[]")),
        model_max_budget=json.loads(row["model_max_budget_json"] or "{}"),
        model_rpm_limit=json.loads(row["model_rpm_limit_json"] or "{}"),
        model_tpm_limit=json.loads(row["model_tpm_limit_json"] or "{}"),
        budget_anchor=row["budget_anchor"],
        extra=json.loads(row["extra_json"] or "{}"),
    )


def merge_extra(current: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Stored fields after an update: a null value removes one."""
    merged = dict(current)
    for name, value in changes.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


def prepare(tx: Any) -> None:
    """SQLite: create the tables, or add what an older version's lack; the change feed's too."""
    if tx.dialect != "sqlite":
        return
    tx.execute(_SQLITE_TABLE)
    present = {r[1] for r in tx.execute("PRAGMA table_info(virtual_keys)").fetchall()}
    for name, kind in _COLUMNS:
        if name not in present:
            tx.execute(f"ALTER TABLE virtual_keys ADD COLUMN {name} {kind}")
    for statement in _SQLITE_INDEXES:
        tx.execute(statement)
    tx.execute(_SQLITE_TEAMS)
    for statement in SQLITE_COORDINATION_SCHEMA.split(";"):
        if statement.strip():
            tx.execute(statement)


def load(tx: Any, since: float) -> tuple[list[VirtualKey], dict[str, dict]]:
    """Every live key (expired after C{since} included) and every team's aliases."""
    prepare(tx)
    keys = [key_of(r) for r in tx.execute(f"SELECT {_SELECTED} FROM virtual_keys WHERE {_LIVE}", (since,)).fetchall()]
    return keys, fetch_teams(tx, None)


def fetch(tx: Any, hashes: list[str], since: float) -> dict[str, VirtualKey]:
    """The live keys among C{hashes} (deleted ones and those expired before C{since} are absent)."""
    if not hashes:
        return {}
    marks = ", ".join("?" for _ in hashes)
    rows = tx.execute(
        f"SELECT {_SELECTED} FROM virtual_keys WHERE token_hash IN ({marks}) AND {_LIVE}", (*hashes, since)
    ).fetchall()
    return {vk.token_hash: vk for vk in map(key_of, rows)}


def fetch_teams(tx: Any, team_ids: list[str] | None) -> dict[str, dict]:
    """The C{model_aliases} of C{team_ids} (None: every team); a team without a row is absent."""
    if team_ids is None:
        rows = tx.execute("SELECT team_id, model_aliases_json FROM team_settings").fetchall()
    elif not team_ids:
        return {}
    else:
        marks = ", ".join("?" for _ in team_ids)
        rows = tx.execute(
            f"SELECT team_id, model_aliases_json FROM team_settings WHERE team_id IN ({marks})", tuple(team_ids)
        ).fetchall()
    return {team: json.loads(raw or "{}") for team, raw in rows}


def _check_alias(tx: Any, alias: str | None, token_hash: str, since: float) -> None:
    """Refuse an alias another live key has (memory may not know every instance's keys)."""
    if alias is None:
        return
    tx.advisory_locks([f"key_alias:{alias}"])
    if tx.execute(_ALIAS_TAKEN, (alias, token_hash, since)).fetchone() is not None:
        raise DuplicateKey("key_alias", f"a key with the alias {alias!r} already exists")


def insert(tx: Any, vk: VirtualKey, alias_since: float, instance: str, now: float) -> None:
    """
    A new key.  A hash already on disk, even deleted, is refused: only a
    caller-chosen key can meet one, and a deleted key never comes back.
    """
    _check_alias(tx, vk.key_alias, vk.token_hash, alias_since)
    if not tx.execute(_INSERT, row_of(vk)).rowcount:
        raise DuplicateKey("key", "this key was used before")
    record_change(tx, instance, "virtual_key", vk.token_hash, now)


def update(
    tx: Any, token_hash: str, values: Mapping[str, Any], updated_at: float, alias_since: float, instance: str
) -> VirtualKey | None:
    """
    Write the fields in C{values} (and C{updated_at}) only, so that another
    instance's change to other fields is kept; return the row as it now is,
    or None when the key is deleted (here or elsewhere).
    """
    if "key_alias" in values:
        _check_alias(tx, values["key_alias"], token_hash, alias_since)
    columns: dict[str, Any] = {}
    for field, value in values.items():
        if field == "extra":
            continue
        column, encode = _FIELD_COLUMNS[field]
        columns[column] = encode(value) if encode is not None and value is not None else value
    if values.get("extra"):
        # The stored fields changed are merged into what the database has
        # (another instance may have set others meanwhile).
        found = tx.execute("SELECT extra_json FROM virtual_keys WHERE token_hash = ?", (token_hash,)).fetchone()
        columns["extra_json"] = json.dumps(merge_extra(json.loads((found[0] if found else None) or "{}"),
                                                       values["extra"]))
    columns["updated_at"] = updated_at
    assignments = ", ".join(f"{column} = ?" for column in columns)
    changed = tx.execute(
        f"UPDATE virtual_keys SET {assignments} WHERE token_hash = ? AND deleted_at IS NULL",
        (*columns.values(), token_hash),
    ).rowcount
    if not changed:
        return None
    row = tx.execute(f"SELECT {_SELECTED} FROM virtual_keys WHERE token_hash = ?", (token_hash,)).fetchone()
    record_change(tx, instance, "virtual_key", token_hash, updated_at)
    return key_of(row)


def delete(tx: Any, hashes: list[str], ts: float, instance: str) -> set[str]:
    """Mark C{hashes} deleted; return those that were live on disk."""
    marked = set()
    for token_hash in hashes:
        if tx.execute(_DELETE, (ts, token_hash)).rowcount:
            marked.add(token_hash)
            record_change(tx, instance, "virtual_key", token_hash, ts)
    return marked


def set_team(tx: Any, team_id: str, aliases: dict, ts: float, instance: str) -> None:
    """Replace a team's C{model_aliases}."""
    tx.execute(_UPSERT_TEAM, (team_id, json.dumps(aliases), ts))
    record_change(tx, instance, "team", team_id, ts)
