"""
Which store holds the state that instances share: the embedded SQLite file
(the default, one box) or PostgreSQL (several processes or hosts), named by
C{CLLAMA_DATABASE_URL} or, as LiteLLM reads it, C{DATABASE_URL}.

Pure: parsing and redacting the URL, and turning the project's portable SQL
(C{?} placeholders, the subset both databases speak) into PostgreSQL's.
"""

from __future__ import annotations

import functools
import re
import urllib.parse

import attrs

__all__ = [
    "POSTGRESQL",
    "SQLITE",
    "DatabaseUnavailable",
    "DatabaseUrl",
    "database_url_from_env",
    "parse_database_url",
    "postgres_sql",
]

SQLITE = "sqlite"
POSTGRESQL = "postgresql"

_POSTGRES_SCHEMES = frozenset({"postgres", "postgresql", "postgresql+psycopg", "postgresql+psycopg2"})


class DatabaseUnavailable(Exception):
    """
    The shared database cannot be reached or refused the work for a reason
    of its own (connection lost, server shutting down, timeout): the same
    work may succeed later.  The message never carries the URL's password.
    """


@attrs.frozen
class DatabaseUrl:
    """A parsed database URL; C{str()} and C{repr()} never show a password."""

    backend: str
    # SQLite: the file's path (None: the state directory's ledger file).
    path: str | None = None
    # PostgreSQL: the libpq connection string, password included.
    conninfo: str = attrs.field(default="", repr=False)
    redacted: str = ""

    @property
    def shared(self) -> bool:
        """True when several hosts can share it (PostgreSQL)."""
        return self.backend == POSTGRESQL

    def __str__(self) -> str:
        return self.redacted


def _redact(parts: urllib.parse.SplitResult) -> str:
    netloc = parts.hostname or ""
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    if parts.username:
        user = parts.username + (":***" if parts.password else "")
        netloc = f"{user}@{netloc}"
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    shown = urllib.parse.urlencode([(k, "***" if k.lower() in ("password", "sslpassword") else v) for k, v in query])
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, shown, ""))


def parse_database_url(text: str | None) -> DatabaseUrl:
    """
    C{postgresql://user:password@host:port/db?sslmode=require} (also
    C{postgres://}), C{sqlite:///absolute/path} or C{sqlite://} (the state
    directory's file); empty means SQLite.  Raises C{ValueError} with a
    message that does not repeat the password.
    """
    if not text or not text.strip():
        return DatabaseUrl(SQLITE, redacted="sqlite://")
    text = text.strip()
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:
        raise ValueError("database URL is not a URL") from None
    scheme = parts.scheme.lower()
    if scheme == SQLITE:
        path = urllib.parse.unquote(parts.path) or None
        if parts.netloc:
            raise ValueError("a sqlite URL names a file: sqlite:///absolute/path (three slashes)")
        return DatabaseUrl(SQLITE, path=path, redacted=f"sqlite://{path or ''}")
    if scheme not in _POSTGRES_SCHEMES:
        raise ValueError(f"database URL scheme {scheme!r} is not supported (postgresql:// or sqlite://)")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ValueError(f"database URL {_redact(parts._replace(netloc=parts.hostname or ''))} has a bad port") from None
    if not parts.path.strip("/"):
        raise ValueError(f"database URL {_redact(parts)} names no database")
    # libpq reads postgresql:// URLs itself; the driver's suffix is ours to drop.
    conninfo = urllib.parse.urlunsplit(("postgresql",) + tuple(parts)[1:])
    return DatabaseUrl(POSTGRESQL, conninfo=conninfo, redacted=_redact(parts))


def database_url_from_env(env) -> DatabaseUrl:
    """C{CLLAMA_DATABASE_URL}, else C{DATABASE_URL}, else SQLite."""
    return parse_database_url(env.get("CLLAMA_DATABASE_URL") or env.get("DATABASE_URL"))


_PLACEHOLDER = re.compile(r"'[^']*'|::|\?|:([A-Za-z_][A-Za-z0-9_]*)|%")


@functools.lru_cache(maxsize=512)
def postgres_sql(statement: str) -> str:
    """
    Portable SQL for PostgreSQL: C{?} becomes C{%s}, C{:name} becomes
    C{%(name)s}, a literal C{%} is doubled; quoted strings are left alone.
    """

    def swap(match: re.Match) -> str:
        text = match.group(0)
        if text.startswith("'"):
            return text.replace("%", "%%")
        if text == "::":
            return text
        if text == "?":
            return "%s"
        if text == "%":
            return "%%"
        return f"%({match.group(1)})s"

    return _PLACEHOLDER.sub(swap, statement)
