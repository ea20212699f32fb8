"""
The model mappings' table (C{model_mappings}: one row per requested name
an operator or the LLM resolver mapped to an available model) and the
transactions the mapping store runs on it, in the portable SQL both
databases speak.

Every write adds its change row (L{record_change}, kind C{model_mapping},
subject the name), so the other instances of a fleet re-read exactly that
name within a second.  On SQLite, L{prepare} creates the table; on
PostgreSQL the migrations do (L{cllama_tx.store.pg_schema}).
"""

from __future__ import annotations

import json
from typing import Any

from cllama_tx.store.shared import SQLITE_COORDINATION_SCHEMA, record_change

__all__ = ["CHANGE_KIND", "Row", "delete", "fetch", "load", "prepare", "upsert"]

#: The change feed's kind for a mapping (L{cllama_tx.store.shared.CHANGE_KINDS}).
CHANGE_KIND = "model_mapping"

#: C{(name, target, source, created_at, updated_at, confirmed_at, created_by, detail)}.
Row = tuple[str, str, str, float, float, "float | None", "str | None", dict]

_COLUMNS = "name, target, source, created_at, updated_at, confirmed_at, created_by, detail"

_SQLITE_TABLE = (
    "CREATE TABLE IF NOT EXISTS model_mappings (name TEXT PRIMARY KEY, target TEXT NOT NULL, "
    "source TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL, confirmed_at REAL, "
    "created_by TEXT, detail TEXT NOT NULL DEFAULT '{}')"
)


def prepare(tx: Any) -> None:
    """SQLite: create the table and the change feed's (PostgreSQL has them from its migrations)."""
    if tx.dialect == "sqlite":
        tx.execute(_SQLITE_TABLE)
        for statement in SQLITE_COORDINATION_SCHEMA.split(";"):
            if statement.strip():
                tx.execute(statement)


def _row(raw: Any) -> Row:
    name, target, source, created, updated, confirmed, created_by, detail = raw
    try:
        parsed = json.loads(detail or "{}")
    except ValueError:
        parsed = {}
    return (name, target, source, created, updated, confirmed, created_by, parsed if isinstance(parsed, dict) else {})


def load(tx: Any) -> list[Row]:
    """Every mapping."""
    prepare(tx)
    return [_row(raw) for raw in tx.execute(f"SELECT {_COLUMNS} FROM model_mappings").fetchall()]


def fetch(tx: Any, name: str) -> Row | None:
    """One mapping, or None."""
    prepare(tx)
    raw = tx.execute(f"SELECT {_COLUMNS} FROM model_mappings WHERE name = ?", (name,)).fetchone()
    return None if raw is None else _row(raw)


def upsert(tx: Any, row: Row, instance: str, only_source: str | None = None) -> bool:
    """
    Store C{row} (a new mapping, or one replacing the name's); returns
    whether it was written.  With C{only_source}, a stored mapping of
    another source is left alone (an LLM answer never replaces an
    operator's mapping that another instance set meanwhile).
    """
    prepare(tx)
    name, target, source, created, updated, confirmed, created_by, detail = row
    tx.advisory_locks([f"model_mapping:{name}"])
    if only_source is not None:
        stored = tx.execute("SELECT source FROM model_mappings WHERE name = ?", (name,)).fetchone()
        if stored is not None and stored[0] != only_source:
            return False
    tx.execute(
        f"INSERT INTO model_mappings ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (name) DO UPDATE SET target = excluded.target, source = excluded.source, "
        "updated_at = excluded.updated_at, confirmed_at = excluded.confirmed_at, "
        "created_by = excluded.created_by, detail = excluded.detail, "
        "created_at = CASE WHEN model_mappings.target = excluded.target "
        "AND model_mappings.source = excluded.source THEN model_mappings.created_at ELSE excluded.created_at END",
        (name, target, source, created, updated, confirmed, created_by, json.dumps(detail, sort_keys=True)),
    )
    record_change(tx, instance, CHANGE_KIND, name, updated)
    return True


def delete(tx: Any, name: str, now: float, instance: str) -> bool:
    """Remove a mapping; returns whether one was stored."""
    prepare(tx)
    removed = tx.execute("DELETE FROM model_mappings WHERE name = ?", (name,)).rowcount
    if removed:
        record_change(tx, instance, CHANGE_KIND, name, now)
    return bool(removed)
