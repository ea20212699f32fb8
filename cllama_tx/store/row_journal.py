"""
Where the ledger's rows go while a WAL reset owns the database: a file of
JSON lines beside it (C{<ledger>-rows}), so no agent's answer waits for a
checkpoint.

A TRUNCATE checkpoint holds SQLite's write lock for tens of milliseconds
(it copies the last frames, fsyncs and empties the WAL); rows recorded
meanwhile used to wait behind it, and so did their answers.  Now each
reactor turn's rows are appended here with one C{write()} (what a WAL
commit with C{synchronous=NORMAL} is: kept by the operating system if the
process dies, not fsynced) and their Deferreds fire; once the reset is done
they are inserted, in order, ahead of the rows recorded after them, and the
file is emptied.  Rows left in it by a crash are inserted at the next
start (C{ON CONFLICT (request_id) DO NOTHING}: a row may already be in
the database).  The line format is the spill file's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from cllama_tx.store.records import LedgerRow
from cllama_tx.store.spill import decode_row, encode_row

FILE_MODE = 0o600
SUFFIX = "-rows"


def journal_path(ledger_path: str) -> str:
    """The journal of the ledger at C{ledger_path}, beside it in the state directory."""
    return ledger_path + SUFFIX


class RowJournal:
    """
    An append-only file of rows, kept open: L{append} before the rows'
    Deferreds fire, L{clear} once they are all in the database.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        self.size = os.fstat(self._fd).st_size
        self.appended = 0  # rows ever appended

    def append(self, rows: Iterable[LedgerRow]) -> None:
        """
        Write C{rows} whole, or raise L{OSError} with the file as it was
        (a partial line is cut off again, so the next append starts clean).
        """
        data = "".join(encode_row(row) + "\n" for row in rows).encode("utf-8")
        start, written = self.size, 0
        try:
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except OSError:
            if written:
                os.ftruncate(self._fd, start)
            raise
        self.size = start + written
        self.appended += data.count(b"\n")

    def clear(self) -> None:
        """Every row appended is in the database: empty the file."""
        if self.size:
            os.ftruncate(self._fd, 0)
            self.size = 0

    def close(self, remove: bool) -> None:
        """Close the file; C{remove} it when it holds nothing the database lacks."""
        os.close(self._fd)
        if remove:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def read_journal(path: str) -> tuple[list[LedgerRow], int]:
    """
    The rows a previous run left in the journal at C{path}, and how many
    lines could not be read.  A crash while appending can leave the last
    line torn: it is skipped (its row's Deferred had not fired), and so is
    any other line that is not a row (counted, for the log).
    """
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return [], 0
    rows: list[LedgerRow] = []
    bad = 0
    last = len(lines) - 1
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(decode_row(line))
        except (ValueError, TypeError):
            if number != last:  # the last line, without its newline: torn by a crash, not bad
                bad += 1
    return rows, bad
