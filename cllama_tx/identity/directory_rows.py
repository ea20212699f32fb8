"""
The directory's table (C{directory}: one JSON document per user, team,
organisation, customer or stored model) and the transactions the
directory runs on it, in the portable SQL both databases speak.

Why documents: these records are read on the hot path from memory only,
written rarely, and carry dozens of LiteLLM fields that mostly are only
kept; one row per record keeps their writes simple.  An update applies
its changes to the document as stored, in the transaction
(L{cllama_tx.identity.entities.apply_changes}), so that another instance's
change to other fields or members is kept.  Every write adds its change
row (L{record_change}), so other instances re-read exactly that record.

On SQLite, L{prepare} creates the table; on PostgreSQL the migrations do
(L{cllama_tx.store.pg_schema}).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cllama_tx.identity.entities import apply_changes
from cllama_tx.identity.litellm_fields import DuplicateKey
from cllama_tx.store.shared import SQLITE_COORDINATION_SCHEMA, record_change

__all__ = ["CHANGE_KIND", "delete", "fetch", "insert", "load", "prepare", "update"]

#: Each kind's change row kind (L{cllama_tx.store.shared.CHANGE_KINDS}).
CHANGE_KIND = {"team": "team", "user": "user", "org": "organization", "customer": "customer", "model": "model"}

_SQLITE_TABLE = (
    "CREATE TABLE IF NOT EXISTS directory (kind TEXT NOT NULL, id TEXT NOT NULL, doc TEXT NOT NULL, "
    "created_at REAL NOT NULL, updated_at REAL NOT NULL, PRIMARY KEY (kind, id))"
)


def prepare(tx: Any) -> None:
    """SQLite: create the table and the change feed's (PostgreSQL has them from its migrations)."""
    if tx.dialect == "sqlite":
        tx.execute(_SQLITE_TABLE)
        for statement in SQLITE_COORDINATION_SCHEMA.split(";"):
            if statement.strip():
                tx.execute(statement)


def load(tx: Any) -> list[tuple[str, str, dict, float, float]]:
    """Every record: C{(kind, id, doc, created_at, updated_at)}."""
    prepare(tx)
    rows = tx.execute("SELECT kind, id, doc, created_at, updated_at FROM directory").fetchall()
    return [(kind, rid, json.loads(doc), created, updated) for kind, rid, doc, created, updated in rows]


def fetch(tx: Any, kind: str, record_id: str) -> tuple[dict, float, float] | None:
    """One record: C{(doc, created_at, updated_at)}, or None."""
    row = tx.execute(
        "SELECT doc, created_at, updated_at FROM directory WHERE kind = ? AND id = ?", (kind, record_id)
    ).fetchone()
    return None if row is None else (json.loads(row[0]), row[1], row[2])


def insert(tx: Any, kind: str, record_id: str, doc: Mapping[str, Any], now: float, instance: str) -> None:
    """A new record; one with this id already stored is refused."""
    prepare(tx)
    tx.advisory_locks([f"directory:{kind}:{record_id}"])
    if tx.execute("SELECT 1 FROM directory WHERE kind = ? AND id = ?", (kind, record_id)).fetchone() is not None:
        raise DuplicateKey(_ID_FIELDS.get(kind, "id"), f"{record_id!r} already exists")
    tx.execute(
        "INSERT INTO directory (kind, id, doc, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
        (kind, record_id, json.dumps(doc), now, now),
    )
    record_change(tx, instance, CHANGE_KIND[kind], record_id, now)


def update(
    tx: Any, kind: str, record_id: str, values: Mapping[str, Any], now: float, instance: str
) -> tuple[dict, float, float] | None:
    """Apply C{values} to the stored document; the record as it now is, or None when it is gone."""
    tx.advisory_locks([f"directory:{kind}:{record_id}"])
    found = fetch(tx, kind, record_id)
    if found is None:
        return None
    doc, created, _updated = found
    changed = apply_changes(doc, values, now)
    tx.execute(
        "UPDATE directory SET doc = ?, updated_at = ? WHERE kind = ? AND id = ?",
        (json.dumps(changed), now, kind, record_id),
    )
    record_change(tx, instance, CHANGE_KIND[kind], record_id, now)
    return changed, created, now


def delete(tx: Any, kind: str, record_ids: list[str], now: float, instance: str) -> list[str]:
    """Remove records; returns the ids that were stored."""
    removed = []
    for record_id in record_ids:
        if tx.execute("DELETE FROM directory WHERE kind = ? AND id = ?", (kind, record_id)).rowcount:
            removed.append(record_id)
            record_change(tx, instance, CHANGE_KIND[kind], record_id, now)
    return removed


_ID_FIELDS = {"team": "team_id", "user": "user_id", "org": "organization_id", "customer": "user_id",
              "model": "model_id"}
