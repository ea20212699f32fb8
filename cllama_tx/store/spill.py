"""
The ledger's last resort: rows the database could not take before the
daemon stopped, saved as JSON lines in a directory of their own (on another
filesystem than the state directory, ideally), and imported at the next
start.  Without it, a graceful stop with a full disk would lose them.

The file is named after the ledger it belongs to, so several daemons can
share a spill directory.  Rows change money: the directory must be ours
and closed to others (0700), the file ours and 0600, or nothing is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from collections.abc import Iterable

import attrs

from cllama_tx.store.records import LedgerRow

DIR_MODE = 0o700
FILE_MODE = 0o600
_FIELDS = tuple(f.name for f in attrs.fields(LedgerRow))
_PASSTHROUGH_FIELDS = frozenset({"path", "request_bytes", "response_bytes"})


class SpillError(Exception):
    """The spill file cannot be trusted or read; it is left where it is."""


def default_spill_dir() -> str:
    """C{<temp dir>/cllama_tx-ledger-spill-<uid>}: usually not the state directory's filesystem."""
    return os.path.join(tempfile.gettempdir(), f"cllama_tx-ledger-spill-{os.geteuid()}")


def spill_path(directory: str, ledger_path: str) -> str:
    """The spill file of the ledger at C{ledger_path}."""
    digest = hashlib.sha256(os.path.abspath(ledger_path).encode("utf-8")).hexdigest()[:16]
    return os.path.join(directory, f"ledger-{digest}.jsonl")


def _check_private(path: str, what: str, kind: int) -> None:
    info = os.lstat(path)
    if stat.S_IFMT(info.st_mode) != kind:
        raise SpillError(f"{path}: the spill {what} is not a plain {what}")
    if info.st_uid != os.geteuid():
        raise SpillError(f"{path}: the spill {what} belongs to uid {info.st_uid}, not to us")
    if info.st_mode & 0o022:
        raise SpillError(f"{path}: the spill {what} is writable by others (mode {stat.S_IMODE(info.st_mode):o})")


#: The spill line format.  Lines without C{format} were written by a
#: version whose rows held every prompt token in C{input_tokens} (ledger
#: schema 2 and older): they are converted on import, as the ledger's
#: migration converts the rows already in the database.
_FORMAT = 2


def _encode(row: LedgerRow) -> str:
    doc = attrs.asdict(row)
    doc["format"] = _FORMAT
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


def _decode(line: str) -> LedgerRow:
    doc = json.loads(line)
    if not isinstance(doc, dict):
        raise ValueError("not a ledger row")
    version = doc.pop("format", 1)
    # Rows spilled before the passthrough's columns existed have none (None).
    missing = set(_FIELDS) - set(doc)
    if version not in (1, _FORMAT) or not set(doc) <= set(_FIELDS) or not missing <= _PASSTHROUGH_FIELDS:
        raise ValueError("not a ledger row")
    row = LedgerRow(**doc)
    cache = row.cache_read_tokens + row.cache_write_tokens
    if version == 1 and cache and row.input_tokens >= cache:
        row = attrs.evolve(row, input_tokens=row.input_tokens - cache)
    return row


encode_row = _encode
decode_row = _decode
"""One row as a line, and back (the ledger's row journal shares the format)."""


def write_spill(path: str, rows: Iterable[LedgerRow]) -> str:
    """
    Replace the spill file at C{path} with C{rows} (every row still held:
    rows read from an earlier spill are among them), atomically and
    fsynced.  Returns C{path}.
    """
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
        os.chmod(directory, DIR_MODE)
    _check_private(directory, "directory", stat.S_IFDIR)
    fd, temporary = tempfile.mkstemp(prefix=".spill-", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), FILE_MODE)
            for row in rows:
                f.write(_encode(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass  # the rename is what matters; some filesystems cannot fsync a directory
    return path


def read_spill(path: str) -> list[LedgerRow]:
    """
    The rows of the spill file at C{path} (none when there is no file).
    A torn last line (a crash while writing cannot make one: the file is
    renamed into place whole) or a foreign file raises L{SpillError}.
    """
    try:
        _check_private(os.path.dirname(path), "directory", stat.S_IFDIR)
    except FileNotFoundError:
        return []
    try:
        _check_private(path, "file", stat.S_IFREG)
    except FileNotFoundError:
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(_decode(line))
            except (ValueError, TypeError) as e:
                raise SpillError(f"{path}: line {number} is not a ledger row ({e})") from None
    return rows


def remove_spill(path: str) -> None:
    """The spill file's rows are all in the database: forget it."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
