"""
Which ledger a daemon keeps, from its environment: PostgreSQL when
C{CLLAMA_DATABASE_URL} (or C{DATABASE_URL}) names one, shared by every
instance of the fleet; else the SQLite state file, shared by the workers of
one host when C{CLLAMA_WORKERS} is above 1.  Also C{cllama-tx migrate}'s
work: bring the configured database's schema up to date.

Errors name the variable they come from and never the password.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from cllama_tx.store.database import (
    POSTGRESQL,
    DatabaseUnavailable,
    DatabaseUrl,
    database_url_from_env,
)
from cllama_tx.store.ledger import SqliteLedger, migrate_file
from cllama_tx.store.ledger_sql import DEFAULT_BACKLOG
from cllama_tx.store.pg_ledger import PostgresLedger
from cllama_tx.store.postgres import PostgresDatabase, Transaction, migrate

__all__ = [
    "STATE_FILE",
    "DatabaseConfigError",
    "LedgerBackend",
    "configured_url",
    "migrate_database",
    "open_ledger",
]

STATE_FILE = "ledger.sqlite3"
"""The state file's name in the state directory."""

POOL_THREADS = 4
"""Connections to PostgreSQL, each on a thread of its own (the ledger uses one at a time)."""

_URL_VARIABLES = ("CLLAMA_DATABASE_URL", "DATABASE_URL")


class DatabaseConfigError(ValueError):
    """The database URL cannot be used; the message names its variable, never its password."""


@attrs.frozen
class LedgerBackend:
    """The ledger a daemon keeps, and what other stores can share with it."""

    url: DatabaseUrl
    ledger: Any  # SqliteLedger or PostgresLedger
    # PostgreSQL: the pool other stores share (started and stopped with the ledger).
    database: PostgresDatabase | None
    # The SQLite state file: the ledger's on SQLite, and the stores that keep theirs there.
    state_file: str
    workers: int = 1


def configured_url(env: Mapping[str, str]) -> DatabaseUrl:
    """C{CLLAMA_DATABASE_URL}, else C{DATABASE_URL}, else SQLite (L{DatabaseConfigError} if unusable)."""
    try:
        return database_url_from_env(env)
    except ValueError as e:
        name = next((n for n in _URL_VARIABLES if env.get(n)), _URL_VARIABLES[0])
        raise DatabaseConfigError(f"{name}: {e}") from None


def _workers(env: Mapping[str, str]) -> int:
    raw = (env.get("CLLAMA_WORKERS") or "").strip()
    return int(raw) if raw.isdigit() and int(raw) > 0 else 1


def _spill_name(base: str, env: Mapping[str, str]) -> str:
    """Workers of one host share a spill directory: each its own file."""
    index = (env.get("CLLAMA_WORKER_INDEX") or "").strip()
    return f"{base}#worker{index}" if index.isdigit() else base


def _state_file(url: DatabaseUrl, state_dir: str) -> str:
    if url.backend != POSTGRESQL and url.path:
        return url.path
    return os.path.join(state_dir, STATE_FILE)


def open_ledger(
    env: Mapping[str, str],
    reactor: Any,
    *,
    state_dir: str,
    sync: str = "normal",
    retention_seconds: float | None = None,
    backlog: int = DEFAULT_BACKLOG,
    spill_dir: str | None = None,
    instance: str | None = None,
) -> LedgerBackend:
    """
    The ledger C{env} asks for, not started.  On PostgreSQL C{sync} does not
    apply (the server's own C{synchronous_commit} decides); the ledger
    starts and stops the database's pool with itself.
    """
    url = configured_url(env)
    workers = _workers(env)
    state_file = _state_file(url, state_dir)
    if url.backend == POSTGRESQL:
        database = PostgresDatabase(url, reactor, threads=POOL_THREADS)
        shared_ledger = PostgresLedger(
            database, reactor, retention_seconds=retention_seconds, backlog=backlog, spill_dir=spill_dir,
            instance=instance, spill_name=_spill_name(f"/{url.redacted}", env), own_database=True,
        )
        return LedgerBackend(url, shared_ledger, database, state_file, workers)
    shared = workers > 1
    ledger = SqliteLedger(
        state_file, reactor, sync=sync, retention_seconds=retention_seconds, backlog=backlog, spill_dir=spill_dir,
        shared=shared, instance=instance, spill_name=_spill_name(state_file, env) if shared else None,
    )
    return LedgerBackend(url, ledger, None, state_file, workers)


def migrate_database(env: Mapping[str, str], state_dir: str, connect_timeout: int = 10) -> tuple[str, int]:
    """
    Bring the configured database's ledger schema up to date, here and now
    (no reactor: C{cllama-tx migrate}).  Returns the database (as it may be
    shown) and its schema version.  Raises L{DatabaseConfigError},
    L{DatabaseUnavailable} (the server cannot be reached) or the schema's
    own error (a database newer than this cllama_tx).
    """
    url = configured_url(env)
    if url.backend != POSTGRESQL:
        path = _state_file(url, state_dir)
        return f"sqlite://{path}", migrate_file(path)
    import psycopg

    try:
        with psycopg.connect(url.conninfo, connect_timeout=connect_timeout, application_name="cllama_tx migrate") as conn:
            with conn.transaction(), conn.cursor() as cursor:
                version = migrate(Transaction(cursor))
    except psycopg.OperationalError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DatabaseUnavailable(f"{url}: {first}"[:500]) from None
    return str(url), version
