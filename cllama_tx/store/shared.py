"""
The vocabulary every writer of shared state uses, on SQLite and PostgreSQL
alike: who an instance is, the lock names of a ledger row's budget scopes,
and the change feed that tells other instances to re-read something.

Why a change feed: instances keep what they read on the hot path in memory
(keys, overrides, provider keys).  A writer adds a C{changes} row in the
same transaction as its change; every instance polls the feed (at most a
second apart) and re-reads what a row names.  See C{docs/DEPLOYMENT.md}.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterable
from typing import Any

__all__ = [
    "CHANGE_KINDS",
    "SQLITE_COORDINATION_SCHEMA",
    "get_document",
    "put_document",
    "lock_names",
    "new_instance_id",
    "record_change",
    "row_scopes",
    "scope_filter",
    "scope_name",
]

#: What a change row can name; C{subject} says which one (None: all).
CHANGE_KINDS = frozenset({
    "budget_override",   # subject: the scope (agent, key:<hash>, team:<id>); also resets
    "virtual_key",       # subject: the key's token hash (created, updated, blocked, deleted)
    "team",              # subject: team id (aliases, settings, members)
    "user",              # subject: user id (LiteLLM's internal users)
    "organization",      # subject: organisation id
    "customer",          # subject: customer (end user) id
    "model",             # subject: a stored model's id (/model/new, /model/update, /model/delete)
    "reload",            # an operator reload: contexts, policy, pricing, model table
    "provider_keys",     # subject: provider name: a key added, removed, enabled or disabled
    "ui_session",        # subject: the session's public id (signed out)
    "model_mapping",     # subject: the requested name (set, confirmed or deleted)
})

SQLITE_COORDINATION_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    instance TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance TEXT NOT NULL,
    scope TEXT NOT NULL,
    amount_usd REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reservations_scope ON reservations (scope);
CREATE INDEX IF NOT EXISTS reservations_instance ON reservations (instance);
CREATE TABLE IF NOT EXISTS rate_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance TEXT NOT NULL,
    scope TEXT NOT NULL,
    at REAL NOT NULL,
    tokens INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS rate_events_scope ON rate_events (scope, id);
CREATE INDEX IF NOT EXISTS rate_events_at ON rate_events (at);
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    instance TEXT NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS responses_conversations (
    agent TEXT NOT NULL,
    response_id TEXT NOT NULL,
    items TEXT NOT NULL,
    size INTEGER NOT NULL,
    used_at REAL NOT NULL,
    PRIMARY KEY (agent, response_id)
);
CREATE INDEX IF NOT EXISTS responses_conversations_used ON responses_conversations (used_at);
CREATE TABLE IF NOT EXISTS shared_documents (
    name TEXT PRIMARY KEY,
    content TEXT NOT NULL,
    updated_at REAL NOT NULL,
    instance TEXT NOT NULL
);
"""


def new_instance_id() -> str:
    """This process's name in the shared store: host, pid and a random part (pids are reused)."""
    host = socket.gethostname()[:64] or "host"
    return f"{host}:{os.getpid()}:{secrets.token_hex(4)}"


#: Budget scopes other than an agent's (a plain agent id): kind -> the
#: ledger columns its rows are found by.  C{member} is a user within a
#: team, C{keymodel} one model (as requested) of a key; C{parallel} counts
#: only requests in flight, and has no rows.
SCOPE_KINDS: dict[str, tuple[str, ...]] = {
    "key": ("key_id",),
    "team": ("team_id",),
    "user": ("user_id",),
    "org": ("organization_id",),
    "customer": ("end_user",),
    "member": ("team_id", "user_id"),
    "keymodel": ("key_id", "requested_model"),
    "parallel": (),
}


def scope_name(kind: str, *values: str) -> str:
    """
    A budget scope's name: C{key:<hash>}, C{team:<id>}, C{user:<id>},
    C{org:<id>}, C{customer:<id>}; C{member:<len>:<team>:<user>} (the
    team's length makes any id safe); C{keymodel:<hash>:<model>} (a hash
    has 64 characters); C{parallel:<scope>}.
    """
    if kind == "member":
        team, user = values
        return f"member:{len(team)}:{team}:{user}"
    return f"{kind}:" + ":".join(values)


def scope_filter(scope: str) -> tuple[str, tuple[str, ...]]:
    """
    The SQL condition on C{requests} (and its parameters) of the rows whose
    spend counts against a budget scope: C{agent = ?} for an agent; none
    (C{1 = 0}) for a parallel scope.
    """
    kind, _, rest = scope.partition(":")
    columns = SCOPE_KINDS.get(kind) if rest or kind == "parallel" else None
    if columns is None:
        return "agent = ?", (scope,)
    if not columns:
        return "1 = 0", ()
    if kind == "member":
        length, _, tail = rest.partition(":")
        size = int(length)
        values: tuple[str, ...] = (tail[:size], tail[size + 1:])
    elif kind == "keymodel":
        values = (rest[:64], rest[65:])
    else:
        values = (rest,)
    return " AND ".join(f"{column} = ?" for column in columns), values


def row_scopes(
    agent: str | None, key_id: str | None, team_id: str | None,
    user_id: str | None = None, organization_id: str | None = None, end_user: str | None = None,
) -> list[str]:
    """
    The budget scopes a ledger row's spend counts against, as the budget
    book names them: the agent, C{key:<hash>}, C{team:<id>},
    C{user:<id>}, C{org:<id>}, C{customer:<id>}.  Writers of ledger rows
    hold these scopes' locks (L{advisory_locks}) so that, per scope, rows
    commit in the order of their ids.  (A member's rows are among its
    team's, a key's model's among its key's: their order is kept by
    those locks.)
    """
    scopes = []
    if agent:
        scopes.append(agent)
    for kind, value in (("key", key_id), ("team", team_id), ("user", user_id), ("org", organization_id),
                        ("customer", end_user)):
        if value:
            scopes.append(scope_name(kind, value))
    return scopes


def record_change(tx: Any, instance: str, kind: str, subject: str | None, at: float) -> None:
    """Add a change row, in the caller's transaction (so it commits with the change)."""
    if kind not in CHANGE_KINDS:
        raise ValueError(f"unknown change kind {kind!r}")
    tx.execute("INSERT INTO changes (instance, kind, subject, at) VALUES (?, ?, ?, ?)", (instance, kind, subject, at))


def put_document(tx: Any, instance: str, name: str, content: str, at: float, kind: str) -> None:
    """
    Keep a configuration file that instances on other hosts need too (the
    operator's C{providers.json}), and announce it as a change of C{kind}.
    """
    tx.execute(
        "INSERT INTO shared_documents (name, content, updated_at, instance) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (name) DO UPDATE SET content = excluded.content, updated_at = excluded.updated_at, "
        "instance = excluded.instance",
        (name, content, at, instance),
    )
    record_change(tx, instance, kind, name, at)


def get_document(tx: Any, name: str) -> str | None:
    row = tx.execute("SELECT content FROM shared_documents WHERE name = ?", (name,)).fetchone()
    return None if row is None else row[0]


def lock_names(scopes: Iterable[str]) -> list[str]:
    """The advisory lock names of budget scopes (one namespace for all writers)."""
    return sorted({f"scope:{s}" for s in scopes})
