"""
The operator UI's sessions as rows of the database instances share, so that
a browser signed in on one instance (or worker behind the same socket) is
signed in on all of them, and signed out of all of them at once.

Nothing in a row lets anyone present the session: its key is the SHA-256 of
the session id (the cookie's value, which is never stored), and the CSRF
token is derived from the id (L{csrf_token}), so it is not stored either.
A sign-out deletes the row and adds a C{ui_session} change row naming the
hash, so the other instances drop their cached copy.  Rows past their
lifetime or idle time are pruned whenever a session is created.

On SQLite the table is created here; on PostgreSQL by the migrations
(L{cllama_tx.store.pg_schema}).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Any

from twisted.internet import defer

from cllama_tx.store.shared import SQLITE_COORDINATION_SCHEMA, record_change

__all__ = ["SessionRows", "csrf_token", "looks_like_session_id", "session_hash"]

_SESSION_ID = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
_CSRF_CONTEXT = b"cllama_tx operator UI form token"

_SQLITE_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ui_sessions (session_hash TEXT PRIMARY KEY, name TEXT, "
    "created_at REAL NOT NULL, last_seen REAL NOT NULL)",
    "CREATE INDEX IF NOT EXISTS ui_sessions_created ON ui_sessions (created_at)",
)


def session_hash(session_id: str) -> str:
    """The row's key: the hex SHA-256 of the session id (also the change feed's subject)."""
    return hashlib.sha256(session_id.encode("ascii", "replace")).hexdigest()


def csrf_token(session_id: str) -> str:
    """
    The session's form token: an HMAC of a fixed context keyed with the
    session id.  Every instance that reads the cookie computes the same
    token; the token (shown in pages) does not reveal the id.
    """
    digest = hmac.new(session_id.encode("ascii", "replace"), _CSRF_CONTEXT, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def looks_like_session_id(value: object) -> bool:
    """Whether a cookie value can be a session id at all (no query for anything else)."""
    return isinstance(value, str) and _SESSION_ID.fullmatch(value) is not None


def _with_table(tx: Any, prepared: bool, function: Callable[..., Any], *args: Any) -> Any:
    if not prepared and tx.dialect == "sqlite":
        for statement in _SQLITE_SCHEMA + tuple(SQLITE_COORDINATION_SCHEMA.split(";")):
            if statement.strip():
                tx.execute(statement)
    return function(tx, *args)


def _insert(tx: Any, token: str, name: str | None, created: float, created_after: float, seen_after: float) -> None:
    tx.execute("DELETE FROM ui_sessions WHERE created_at <= ? OR last_seen <= ?", (created_after, seen_after))
    tx.execute(
        "INSERT INTO ui_sessions (session_hash, name, created_at, last_seen) VALUES (?, ?, ?, ?)",
        (token, name, created, created),
    )


def _fetch(tx: Any, hashes: list[str], created_after: float, seen_after: float) -> dict[str, tuple]:
    marks = ", ".join("?" for _ in hashes)
    rows = tx.execute(
        f"SELECT session_hash, name, created_at, last_seen FROM ui_sessions WHERE session_hash IN ({marks}) "
        "AND created_at > ? AND last_seen > ?",
        (*hashes, created_after, seen_after),
    ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def _touch(tx: Any, token: str, last_seen: float) -> None:
    tx.execute("UPDATE ui_sessions SET last_seen = ? WHERE session_hash = ? AND last_seen < ?",
               (last_seen, token, last_seen))


def _delete(tx: Any, token: str, instance: str, now: float) -> None:
    if tx.execute("DELETE FROM ui_sessions WHERE session_hash = ?", (token,)).rowcount:
        record_change(tx, instance, "ui_session", token, now)


class SessionRows:
    """
    The C{ui_sessions} table of C{database} (anything with
    C{run(function, *args)}: the SQLite state file or PostgreSQL).  Every
    method returns the database's Deferred; they fail with
    L{cllama_tx.store.database.DatabaseUnavailable} when it cannot be reached.
    """

    def __init__(self, database: Any, instance: str) -> None:
        self.database = database
        self.instance = instance
        self._prepared = False

    def _run(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        d = self.database.run(_with_table, self._prepared, function, *args)

        def done(result: Any) -> Any:
            self._prepared = True
            return result

        return d.addCallback(done)

    def insert(self, token: str, name: str | None, created: float, created_after: float,
               seen_after: float) -> defer.Deferred:
        """A new session (and the expired ones pruned: created or last seen before the bounds)."""
        return self._run(_insert, token, name, created, created_after, seen_after)

    def fetch(self, hashes: list[str], created_after: float, seen_after: float) -> defer.Deferred:
        """The live sessions among C{hashes}: hash -> C{(name, created, last_seen)}."""
        return self._run(_fetch, hashes, created_after, seen_after)

    def touch(self, token: str, last_seen: float) -> defer.Deferred:
        """The session was used at C{last_seen} (its idle time counts from there everywhere)."""
        return self._run(_touch, token, last_seen)

    def delete(self, token: str, now: float) -> defer.Deferred:
        """A sign-out: the row goes, and the other instances are told."""
        return self._run(_delete, token, self.instance, now)
