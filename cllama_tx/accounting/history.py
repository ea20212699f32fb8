"""
Session history (CONTRACT section 7): one JSON line per successful turn in
C{<root>/<agent>/history.jsonl}, enabled by C{CLAW_SESSION_HISTORY_DIR}.

Writes happen on one dedicated thread, so they never block the reactor and
lines of one agent land in the order C{append} was called.  Reads happen on
a small separate pool and stream the files line by line, so a large history
is never loaded into memory.  A lock shared by rotation and by the reader's
"open every file" step gives a reader a consistent set of files even while a
rotation renames them (open descriptors survive renames).

Pure helpers (RFC 3339 parsing, limit clamping, line assembly) are free of
I/O and tested without a reactor.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import threading
from typing import Any, BinaryIO

import attrs
from twisted.application import service
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from cllama_tx.identity.tokens import valid_agent_id
from cllama_tx.store.records import Usage

log = Logger()

HISTORY_VERSION = 1
HISTORY_FILE = "history.jsonl"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

_ROTATED = re.compile(r"history\.jsonl\.([1-9][0-9]{0,5})")
_DIR_MODE = 0o700
_FILE_MODE = 0o600
_OPEN_FLAGS = (
    os.O_RDWR | os.O_APPEND | os.O_CREAT
    | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

# Compact, ASCII-only (so a line can never contain a raw newline or invalid
# UTF-8) and strict (no NaN/Infinity, which other JSON parsers reject).
_ENCODER = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))

# C{ts} of a line written by L{HistoryEntry.to_json_line} without parsing the
# whole (possibly large) line; anything else falls back to C{json.loads}.
_TS_PREFIX = re.compile(rb'\{"version":-?[0-9]+,"id":(?:null|"(?:[^"\\]|\\.)*"),"ts":"([^"\\]*)"')

_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]+))?(?:([Zz])|([+\- ])([0-9]{2}):([0-9]{2}))"
)
_RFC3339_HELP = (
    "after must be an RFC 3339 timestamp, e.g. 2026-03-31T12:00:00Z or "
    "2026-03-31T14:00:00.250+02:00"
)


def _encode(value: Any) -> bytes:
    try:
        return _ENCODER.encode(value).encode("ascii")
    except ValueError:
        # NaN or Infinity (a provider's answer may carry them; requests with
        # them are refused): written as null rather than losing the turn.
        return _ENCODER.encode(_finite(value)).encode("ascii")


def _finite(value: Any) -> Any:
    """C{value} with every NaN and infinity replaced by C{None}."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def parse_rfc3339(value: str) -> _dt.datetime:
    """
    Parse an RFC 3339 date-time into an aware L{datetime}, for comparing
    instants across offsets.

    Accepts C{Z}/C{z} or a numeric offset, C{T}/C{t} or a space between date
    and time, any number of fractional digits (truncated to microseconds,
    which never changes a strict "after" comparison against our millisecond
    timestamps) and a leap second (read as C{:59.999999}).  A space where the
    offset's sign belongs is read as C{+}: form decoding turns an unescaped
    C{+} in a query string into a space.

    @raise ValueError: with a message fit for a 400 response.
    """
    if not isinstance(value, str):
        raise ValueError(_RFC3339_HELP)
    match = _RFC3339.fullmatch(value.strip())
    if match is None:
        raise ValueError(_RFC3339_HELP)
    year, month, day, hour, minute, second = (int(g) for g in match.group(1, 2, 3, 4, 5, 6))
    fraction = match.group(7) or ""
    microsecond = int((fraction + "000000")[:6])
    if second == 60:
        second, microsecond = 59, 999999
    if match.group(8):
        offset = _dt.timedelta(0)
    else:
        off_hours, off_minutes = int(match.group(10)), int(match.group(11))
        if off_hours > 23 or off_minutes > 59:
            raise ValueError(_RFC3339_HELP)
        offset = _dt.timedelta(hours=off_hours, minutes=off_minutes)
        if match.group(9) == "-":
            offset = -offset
    try:
        return _dt.datetime(
            year, month, day, hour, minute, second, microsecond, tzinfo=_dt.timezone(offset)
        )
    except ValueError:
        raise ValueError(_RFC3339_HELP) from None


def parse_after(raw: str | None) -> _dt.datetime | None:
    """The C{after} query parameter: absent or blank means no lower bound."""
    if raw is None or not raw.strip():
        return None
    return parse_rfc3339(raw)


def clamp_limit(raw: str | None) -> int:
    """
    The C{limit} query parameter: absent or blank gives 100, values above
    1000 give 1000 (as the reference proxy does).

    @raise ValueError: not a base-10 integer, or below 1.
    """
    if raw is None or not raw.strip():
        return DEFAULT_LIMIT
    text = raw.strip()
    if re.fullmatch(r"-[0-9]+", text):
        raise ValueError("limit must be a positive integer")
    if not re.fullmatch(r"\+?[0-9]+", text):
        raise ValueError("limit must be an integer")
    digits = text.lstrip("+").lstrip("0")
    if not digits:
        raise ValueError("limit must be a positive integer")
    if len(digits) > 4:
        return MAX_LIMIT
    return min(int(digits), MAX_LIMIT)


def json_response(body: Any) -> dict:
    """C{response} of a JSON turn: the parsed upstream body."""
    return {"format": "json", "json": body}


def sse_response(text: str | bytes, total_bytes: int | None = None) -> dict:
    """
    C{response} of a streamed turn: the SSE text as the agent received it.

    A relay that kept only the start of a long stream passes the stream's
    full size as C{total_bytes}; the stored record then says
    C{"truncated": true} with that size even though C{text} fits.
    """
    response: dict = {"format": "sse", "text": text}
    if total_bytes is not None:
        response["bytes"] = total_bytes
    return response


def history_usage(usage: Usage) -> dict:
    """C{usage} from a metered L{Usage}."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.output_tokens,
        "reported_cost_usd": usage.reported_cost_usd,
    }


@attrs.frozen(kw_only=True)
class HistoryEntry:
    """
    One successful turn, exactly the contract's fields in the contract's
    order.  The dicts are handed over: do not mutate them after L{append
    <SessionHistory.append>}, the writer thread serialises them later.

    C{ts} is RFC 3339 UTC with milliseconds (C{cllama_tx.runtime.audit.rfc3339_ms});
    take it when the turn completes, so that file order and C{ts} order
    agree and C{after} pagination never skips a line.
    """

    version: int = HISTORY_VERSION
    id: str
    ts: str
    claw_id: str
    path: str
    requested_model: str | None
    effective_provider: str | None
    effective_model: str | None
    status_code: int
    stream: bool
    request_original: Any
    request_effective: Any
    response: dict
    usage: dict

    def to_json_line(self) -> bytes:
        """
        The entry as one compact ASCII JSON line, C{\\n} included, with the
        response as given (L{SessionHistory} bounds it first).
        """
        return _assemble(self, _encode(self.response))


_FIELDS = tuple(a.name for a in attrs.fields(HistoryEntry))
_KEYS = {name: _encode(name) + b":" for name in _FIELDS}


def _assemble(entry: HistoryEntry, response_json: bytes) -> bytes:
    """
    Serialise field by field so the (large) response is encoded only once,
    after it was measured.  Same bytes as one C{json.dumps} of the dict.
    """
    parts = [
        _KEYS[name] + (response_json if name == "response" else _encode(getattr(entry, name)))
        for name in _FIELDS
    ]
    return b"{" + b",".join(parts) + b"}\n"


def bounded_response_json(response: dict, max_bytes: int) -> bytes:
    """
    The serialised C{response}, replaced by a truncation record when the
    body is larger than C{max_bytes}: the JSON body measured as compact
    ASCII JSON, the SSE text as UTF-8.  The record is
    C{{"format", "truncated": true, "bytes": <original size>, "text": <the
    first max_bytes bytes, decoded with errors="replace">}}.  An SSE
    response may carry C{"bytes"} (see L{sse_response}): the stream's full
    size when the caller kept only its start.

    @raise ValueError: the format is neither C{json} nor C{sse}.
    """
    fmt = response.get("format") if isinstance(response, dict) else None
    if fmt == "json":
        raw = _encode(response.get("json"))
        if len(raw) <= max_bytes:
            return b'{"format":"json","json":' + raw + b"}"
    elif fmt == "sse":
        text = response.get("text")
        if text is None:
            text = ""
        if isinstance(text, (bytes, bytearray, memoryview)):
            raw = bytes(text)
        elif isinstance(text, str):
            raw = text.encode("utf-8", "surrogatepass")
        else:
            raise ValueError("an sse response's text must be str or bytes")
        total = response.get("bytes")
        size = max(len(raw), total if isinstance(total, int) and not isinstance(total, bool) else 0)
        if size <= max_bytes:
            return _encode({"format": "sse", "text": raw.decode("utf-8", "replace")})
    else:
        raise ValueError("response format must be 'json' or 'sse'")
    return _encode(
        {
            "format": fmt,
            "truncated": True,
            "bytes": len(raw) if fmt == "json" else size,
            "text": raw[:max_bytes].decode("utf-8", "replace"),
        }
    )


def _line_ts(line: bytes) -> _dt.datetime | None:
    """The instant of one stored line, or L{None} when it has none."""
    match = _TS_PREFIX.match(line)
    try:
        if match is not None:
            return parse_rfc3339(match.group(1).decode("ascii"))
        ts = json.loads(line).get("ts")
        return parse_rfc3339(ts) if isinstance(ts, str) else None
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None


class HistoryStopped(Exception):
    """The history service has stopped; nothing more is read or written."""


class SessionHistory(service.Service):
    """
    The per-agent history store.  C{append} and C{read} return Deferreds
    fired on the reactor thread; the file work runs on threads owned here.
    C{stopService} waits for every pending write and read, then stops them.
    """

    def __init__(
        self,
        root: str,
        reactor,
        max_file_bytes: int = 64 << 20,
        max_response_bytes: int = 256 << 10,
        keep_rotated: int = 5,
        *,
        max_read_bytes: int = 64 << 20,
    ) -> None:
        if max_file_bytes < 1 or max_response_bytes < 0 or keep_rotated < 0 or max_read_bytes < 1:
            raise ValueError("history limits must be positive (keep_rotated may be 0)")
        self.root = os.path.abspath(root)
        self._reactor = reactor
        self.max_file_bytes = max_file_bytes
        self.max_response_bytes = max_response_bytes
        self.keep_rotated = keep_rotated
        self.max_read_bytes = max_read_bytes
        self._writer, self._readers = self._make_pools()
        self._rotation_lock = threading.Lock()
        self._known_dirs: set[str] = set()  # writer thread only
        self._in_flight = 0
        self._idle_waiters: list[defer.Deferred] = []
        self._stopped = False

    # -- service -----------------------------------------------------------

    @staticmethod
    def _make_pools() -> tuple[ThreadPool, ThreadPool]:
        # One writer thread: its FIFO queue is what keeps appends in order.
        # Work queued before startService waits in the queue.
        return (
            ThreadPool(0, 1, name="cllama-history-writer"),
            ThreadPool(0, 2, name="cllama-history-reader"),
        )

    def startService(self) -> None:
        super().startService()
        if self._stopped:  # a stopped ThreadPool cannot start again
            self._writer, self._readers = self._make_pools()
            self._stopped = False
        self._writer.start()
        self._readers.start()

    def stopService(self):
        """Drain pending writes and reads, then stop the threads."""
        super().stopService()
        d = self._when_idle()

        def stop(_):
            self._stopped = True
            self._writer.stop()
            self._readers.stop()

        return d.addCallback(stop)

    def _when_idle(self) -> defer.Deferred:
        if self._in_flight == 0:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._idle_waiters.append(d)
        return d

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        self._in_flight += 1

        def done(result):
            self._in_flight -= 1
            if self._in_flight == 0:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    waiter.callback(None)
            return result

        return d.addBoth(done)

    # -- writing -----------------------------------------------------------

    def append(self, entry: HistoryEntry) -> defer.Deferred:
        """
        Queue one line for C{entry.claw_id}.  Never fails: the Deferred fires
        with C{True} once the line is written, C{False} when it was refused
        (invalid agent id or C{ts}, service stopped) or the write failed;
        both are logged.  Serialisation and the response bound run on the
        writer thread.
        """
        agent = entry.claw_id
        if not valid_agent_id(agent):
            log.warn(
                "session history: refused an entry with an invalid agent id {agent}",
                agent=repr(agent)[:80], request_id=entry.id,
            )
            return defer.succeed(False)
        try:
            parse_rfc3339(entry.ts)
        except ValueError:
            log.warn(
                "session history: refused an entry for {agent} with a bad ts {ts}",
                agent=agent, ts=repr(entry.ts)[:80], request_id=entry.id,
            )
            return defer.succeed(False)
        if self._stopped:
            log.warn(
                "session history: stopped, dropped the entry of {request_id} for {agent}",
                agent=agent, request_id=entry.id,
            )
            return defer.succeed(False)
        d = threads.deferToThreadPool(self._reactor, self._writer, self._append_sync, entry)

        def failed(failure: Failure) -> bool:
            log.failure(
                "session history: could not write the entry of {request_id} for {agent}",
                failure, agent=agent, request_id=entry.id,
            )
            return False

        d.addCallbacks(lambda _: True, failed)
        return self._track(d)

    def _append_sync(self, entry: HistoryEntry) -> None:
        """Writer thread: serialise, rotate when needed, append one line."""
        line = _assemble(entry, bounded_response_json(entry.response, self.max_response_bytes))
        agent_dir = os.path.join(self.root, entry.claw_id)
        path = os.path.join(agent_dir, HISTORY_FILE)
        fd = self._open_for_append(agent_dir, path)
        try:
            size = os.fstat(fd).st_size
            if size > 0 and size + len(line) > self.max_file_bytes:
                os.close(fd)
                fd = -1
                self._rotate(agent_dir)
                fd = self._open_for_append(agent_dir, path)
                size = os.fstat(fd).st_size
            if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
                # A crash left half a line: end it, so it stays one bad line
                # (skipped by readers) instead of spoiling this one.
                line = b"\n" + line
            self._write_all(fd, line, size)
        finally:
            if fd >= 0:
                os.close(fd)

    def _open_for_append(self, agent_dir: str, path: str) -> int:
        if agent_dir not in self._known_dirs:
            self._ensure_dir(agent_dir)
        try:
            fd = os.open(path, _OPEN_FLAGS, _FILE_MODE)
        except FileNotFoundError:
            # The directory was removed while we ran: make it again.
            self._known_dirs.discard(agent_dir)
            self._ensure_dir(agent_dir)
            fd = os.open(path, _OPEN_FLAGS, _FILE_MODE)
        try:
            mode = os.fstat(fd).st_mode & 0o777
            if mode & 0o077:
                os.fchmod(fd, _FILE_MODE)  # tighten a file made by an older proxy
        except OSError:
            pass
        return fd

    def _ensure_dir(self, agent_dir: str) -> None:
        os.makedirs(self.root, _DIR_MODE, exist_ok=True)
        try:
            os.mkdir(agent_dir, _DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(agent_dir) or os.path.islink(agent_dir):
                raise NotADirectoryError(f"{agent_dir} is not a directory") from None
            try:
                if os.stat(agent_dir).st_mode & 0o077:
                    os.chmod(agent_dir, _DIR_MODE)
            except OSError:
                pass
        self._known_dirs.add(agent_dir)

    @staticmethod
    def _write_all(fd: int, data: bytes, size_before: int) -> None:
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                written += os.write(fd, view[written:])
        except OSError:
            try:
                os.ftruncate(fd, size_before)  # never leave half a line behind
            except OSError:
                pass
            raise

    def _rotate(self, agent_dir: str) -> None:
        """C{history.jsonl} becomes C{.1}, C{.1} becomes C{.2} … the oldest goes."""
        base = os.path.join(agent_dir, HISTORY_FILE)
        keep = self.keep_rotated
        with self._rotation_lock:
            for name in os.listdir(agent_dir):
                match = _ROTATED.fullmatch(name)
                if match is not None and int(match.group(1)) > keep:
                    os.unlink(os.path.join(agent_dir, name))  # left by a larger keep_rotated
            if keep == 0:
                os.unlink(base)
            else:
                for i in range(keep - 1, 0, -1):
                    older = f"{base}.{i}"
                    if os.path.exists(older):
                        os.replace(older, f"{base}.{i + 1}")
                os.replace(base, f"{base}.1")
        log.info("session history: rotated {path}", path=base)

    # -- reading -----------------------------------------------------------

    def read(self, agent: str, after: str | None, limit: int) -> defer.Deferred:
        """
        Up to C{limit} raw lines of C{agent}'s history (each ending in
        C{\\n}), oldest first across rotated files, only those with C{ts}
        strictly after C{after}.  Also stops once the lines gathered reach
        C{max_read_bytes} (always returning at least one line).  A missing
        history gives C{[]}.

        @raise ValueError: synchronously, for an invalid agent id, a bad
            C{after} or a negative C{limit}; the message suits a 400.
        """
        if not valid_agent_id(agent):
            raise ValueError("invalid agent id")
        after_instant = parse_after(after)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise ValueError("limit must be a non-negative integer")
        if self._stopped:
            return defer.fail(HistoryStopped("session history has stopped"))
        if limit == 0:
            return defer.succeed([])
        d = threads.deferToThreadPool(
            self._reactor, self._readers, self._read_sync, agent, after_instant, limit
        )
        return self._track(d)

    def _open_snapshot(self, agent_dir: str) -> list[BinaryIO]:
        """
        Open every history file of one agent, oldest first, under the
        rotation lock: the set is consistent and later renames do not matter.
        """
        files: list[BinaryIO] = []
        with self._rotation_lock:
            try:
                names = os.listdir(agent_dir)
            except (FileNotFoundError, NotADirectoryError):
                return files
            rotated = sorted(
                ((int(m.group(1)), name) for name in names if (m := _ROTATED.fullmatch(name))),
                reverse=True,
            )
            ordered = [name for _, name in rotated]
            if HISTORY_FILE in names:
                ordered.append(HISTORY_FILE)
            try:
                for name in ordered:
                    try:
                        fd = os.open(os.path.join(agent_dir, name), _READ_FLAGS)
                    except FileNotFoundError:
                        continue
                    files.append(os.fdopen(fd, "rb"))
            except BaseException:
                for f in files:
                    f.close()
                raise
        return files

    def _read_sync(self, agent: str, after: _dt.datetime | None, limit: int) -> list[bytes]:
        """Reader thread: stream the files, keep at most C{limit} lines."""
        files = self._open_snapshot(os.path.join(self.root, agent))
        out: list[bytes] = []
        total = 0
        try:
            for f in files:
                for line in f:
                    # Only whole lines: skips a line still being written, a
                    # crash's half line and blank lines.
                    if not (line.startswith(b"{") and line.endswith(b"}\n")):
                        continue
                    if after is not None:
                        ts = _line_ts(line)
                        if ts is None or ts <= after:
                            continue
                    out.append(line)
                    total += len(line)
                    if len(out) >= limit or total >= self.max_read_bytes:
                        return out
            return out
        finally:
            for f in files:
                f.close()
