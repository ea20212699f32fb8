"""
Small JSON files read on the reactor thread (agent contexts, the price
override, governance files): bounded, never blocking on a FIFO, versioned by
a cheap stat() signature so that steady state reads nothing.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any

Signature = tuple[int, int, int] | None


class UnreadableFile(Exception):
    """The file exists but cannot be used; the message never quotes it."""


def file_signature(path: str) -> Signature:
    """What identifies a version of the file at C{path}, without reading it."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        # Unstattable but maybe present: a distinct signature, so the load is
        # attempted (and reports the problem) once per change of errno.
        return (-1, -1, e.errno or 0)
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def read_text_file(path: str, max_bytes: int) -> tuple[Signature, str | None]:
    """
    Read the UTF-8 text file at C{path} (a BOM is dropped): its signature and
    text; C{(None, None)} when it does not exist.

    @raise UnreadableFile: it exists but cannot be read (never quoting it).
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except OSError as e:
        raise UnreadableFile(f"cannot be opened ({errno.errorcode.get(e.errno or 0, e)})") from None
    try:
        st = os.fstat(fd)
        # O_NONBLOCK and this check: a FIFO must not block the reactor.
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile("is not a regular file")
        chunks: list[bytes] = []
        remaining = max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
    except OSError as e:
        raise UnreadableFile(f"cannot be read ({errno.errorcode.get(e.errno or 0, e)})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise UnreadableFile(f"is larger than {max_bytes} bytes")
    try:
        return (st.st_mtime_ns, st.st_size, st.st_ino), data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UnreadableFile("is not UTF-8") from None


def read_json_file(path: str, max_bytes: int) -> tuple[Signature, Any]:
    """
    Read and parse the JSON file at C{path}: its signature and value;
    C{(None, None)} when it does not exist.

    @raise UnreadableFile: it exists but cannot be read or parsed (the
        message says why, with a line and column, never the content, which
        may hold secrets).
    """
    signature, text = read_text_file(path, max_bytes)
    if text is None:
        return None, None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UnreadableFile(f"is not valid JSON (line {e.lineno} column {e.colno})") from None
    return signature, value
