"""
One write transaction on a SQLite connection, shared by the two writers of
the state database (the ledger and the virtual-key store).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any


class DatabaseBusy(sqlite3.OperationalError):
    """
    The write lock could not be taken within the connection's busy timeout
    (at once, with a timeout of 0).  C{done} holds whatever a caller
    committed before it gave up (see the ledger's writer).
    """

    def __init__(self, message: str, done: list | None = None) -> None:
        super().__init__(message)
        self.done = done or []


# Primary result codes that blame the statement or its values, not the
# storage: a duplicate key, a type mismatch, a value too big, a bad bind.
_ROW_FAULTS = frozenset({18, 19, 20, 25})  # TOOBIG, CONSTRAINT, MISMATCH, RANGE


def is_storage_error(error: BaseException) -> bool:
    """
    True when C{error} says the database could not be written (a full disk,
    an I/O error, a read-only or vanished file, a lock held too long), so
    the same write may succeed later; False when the write itself is at
    fault (a duplicate key) and would fail again.
    """
    if isinstance(error, (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError, sqlite3.DataError)):
        return False
    if not isinstance(error, sqlite3.DatabaseError):
        return False
    code = getattr(error, "sqlite_errorcode", None)
    return code is None or (code & 0xFF) not in _ROW_FAULTS


def transaction(conn: sqlite3.Connection, body: Callable[[sqlite3.Connection], Any]) -> Any:
    """C{body(conn)} in one write transaction (BEGIN IMMEDIATE), rolled back if it raises."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            raise DatabaseBusy(str(e)) from None
        raise
    try:
        result = body(conn)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        raise
    return result
