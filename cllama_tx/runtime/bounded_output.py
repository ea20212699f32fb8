"""
Bounded, non-blocking output for the daemon's own streams: the audit on
stdout and the operational log on stderr.

A reader that stops reading (a stalled log shipper) used to fill the pipe,
and the next write(2) then blocked the reactor: the whole daemon stopped,
health checks included.  These streams are telemetry (the ledger is the
record), so they are written without ever blocking the reactor: lines go
into a buffer of bounded size that the reactor drains whenever the
descriptor can take more.  When the buffer is full, whole lines are dropped
and counted; once the reader has caught up, one gap line (made by the
owner, in the stream's own format) says how many went missing, before
anything newer.

Which descriptors become non-blocking (see L{open_sink}):

  - a pipe is reopened through C{/proc/self/fd/N}: a file description of
    our own, so O_NONBLOCK never reaches the processes (or our own other
    descriptors) that share the original one;
  - a stream socket (journald) is written with C{MSG_DONTWAIT}: non-blocking
    for each call, the socket's flags untouched;
  - regular files, terminals and devices keep blocking writes: a file only
    blocks on a failing disk, and a terminal's O_NONBLOCK would be the
    shell's too.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IWriteDescriptor
from zope.interface import implementer


@attrs.frozen
class Gap:
    """Lines dropped in a row, and when: what a gap line reports."""

    lines: int
    bytes: int
    first_at: float
    last_at: float

    def merged(self, other: Gap | None) -> Gap:
        if other is None:
            return self
        return Gap(
            self.lines + other.lines,
            self.bytes + other.bytes,
            min(self.first_at, other.first_at),
            max(self.last_at, other.last_at),
        )


class Sink(Protocol):
    """A descriptor to write to.  C{send} raises L{BlockingIOError} when full."""

    blocking: bool
    kind: str

    def fileno(self) -> int: ...

    def send(self, data: bytes | bytearray) -> int: ...

    def close(self) -> None: ...


class FdSink:
    """write(2) on a descriptor."""

    def __init__(self, fd: int, *, blocking: bool, owned: bool, kind: str) -> None:
        self._fd = fd
        self.blocking = blocking
        self.kind = kind
        self._owned = owned

    def fileno(self) -> int:
        return self._fd

    def send(self, data: bytes | bytearray) -> int:
        return os.write(self._fd, data)

    def close(self) -> None:
        if self._owned and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1


class SocketSink:
    """
    send(2) with C{MSG_DONTWAIT} on a duplicate of a stream socket: each call
    is non-blocking while the socket's own flags, shared with whoever else
    holds it, stay as they are.
    """

    blocking = False
    kind = "socket"

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, data: bytes | bytearray) -> int:
        return self._sock.send(data, socket.MSG_DONTWAIT)

    def close(self) -> None:
        self._sock.close()


def open_sink(fd: int) -> Sink:
    """The right way to write C{fd} without blocking (see the module docstring)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return FdSink(fd, blocking=True, owned=False, kind="closed")
    if stat.S_ISFIFO(mode):
        return _pipe_sink(fd)
    if stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=os.dup(fd))
        if sock.type == socket.SOCK_STREAM:
            return SocketSink(sock)
        sock.close()  # a datagram socket: one write, one datagram; left as it was
        return FdSink(fd, blocking=True, owned=False, kind="datagram socket")
    if stat.S_ISREG(mode):
        return FdSink(fd, blocking=True, owned=False, kind="file")
    return FdSink(fd, blocking=True, owned=False, kind="tty" if os.isatty(fd) else "device")


def _pipe_sink(fd: int) -> FdSink:
    """
    A non-blocking descriptor of the pipe C{fd} with a file description of
    its own.  Where C{/proc} cannot reopen it (no procfs, a pipe of another
    user after a privilege change), a duplicate with O_NONBLOCK set: that
    flag is then shared with every holder of the original description.
    """
    original = os.fstat(fd)
    try:
        own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        own = -1
    if own >= 0:
        reopened = os.fstat(own)
        if (reopened.st_dev, reopened.st_ino) == (original.st_dev, original.st_ino):
            return FdSink(own, blocking=False, owned=True, kind="pipe")
        os.close(own)
    shared = os.dup(fd)
    fcntl.fcntl(shared, fcntl.F_SETFL, fcntl.fcntl(shared, fcntl.F_GETFL) | os.O_NONBLOCK)
    return FdSink(shared, blocking=False, owned=True, kind="pipe (O_NONBLOCK shared)")


@implementer(IWriteDescriptor)
class BoundedOutput:
    """
    Lines (each C{bytes} ending in a newline) written to a L{Sink} without
    blocking the reactor, with at most C{limit} bytes waiting.

    Rules:
      - a line that does not fit is dropped whole, never cut; a line that
        arrives when nothing is waiting is always attempted, however long;
      - a line partly written stays until its end is written;
      - once a line was dropped, every newer line is dropped too until the
        reader has drained the buffer to half the limit: then the gap line
        goes first, so the gap sits exactly where lines are missing;
      - a hard error (the reader closed the pipe, a full disk) drops what was
        waiting, counted like any other drop; the next write tries again,
        gap line first.

    Reactor-thread only.  C{on_dropped} callables get the number of lines
    dropped each time (a metric); C{on_error} gets the first hard error of
    each failing spell (a log line).
    """

    def __init__(
        self,
        sink: Sink,
        reactor,
        limit: int,
        gap_record: Callable[[Gap], bytes],
        name: str = "output",
    ) -> None:
        self._sink = sink
        self._reactor = reactor
        self.limit = max(0, limit)
        self._low_water = self.limit // 2
        self._gap_record = gap_record
        self.name = name
        self._buf = bytearray()
        # One [bytes not yet written, Gap or None] per line in _buf.
        self._entries: deque[list] = deque()
        self._gap: Gap | None = None
        self._writing = False
        self._failing = False
        self._waiters: list[Deferred] = []
        self.dropped_total = 0
        self.on_dropped: list[Callable[[int], None]] = []
        self.on_error: Callable[[BaseException], None] | None = None

    @property
    def sink(self) -> Sink:
        return self._sink

    @property
    def buffered(self) -> int:
        """Bytes waiting for the reader."""
        return len(self._buf)

    def pending_lines(self) -> int:
        """Lines not written yet: waiting, or dropped and not yet reported by a gap line."""
        waiting = sum(1 if gap is None else gap.lines for _left, gap in self._entries)
        return waiting + (self._gap.lines if self._gap is not None else 0)

    # --- writing ------------------------------------------------------------------------

    def write(self, record: bytes) -> None:
        self.write_records((record,))

    def write_records(self, records: Iterable[bytes]) -> None:
        if not self._buf and self._gap is None:
            # The usual case, a reader that keeps up: one write(2), no bookkeeping.
            records = list(records)
            data = b"".join(records)
            try:
                written = self._sink.send(data) if data else 0
            except OSError:
                written = 0  # full, or failing: the general path below deals with it
            if written == len(data):
                self._failing = False
                return
            records = self._unwritten(records, written)
        dropped = 0
        for record in records:
            if self._gap is not None:
                if len(self._buf) > self._low_water:
                    self._widen_gap(1, len(record))
                    dropped += 1
                    continue
                self._close_gap()
            if self._buf and len(self._buf) + len(record) > self.limit:
                self._widen_gap(1, len(record))
                dropped += 1
                continue
            self._buf += record
            self._entries.append([len(record), None])
        if dropped:
            self._count(dropped)
        if self._buf and not self._writing:
            self._send()

    def _unwritten(self, records: list[bytes], written: int) -> list[bytes]:
        """
        The records a first write did not take all of.  A partly written
        one has its tail put in the buffer here (it must be finished, fit
        or not); the rest are returned to be admitted or dropped.
        """
        for i, record in enumerate(records):
            if written >= len(record):
                written -= len(record)
                continue
            if written:
                self._failing = False
                self._buf += record[written:]
                self._entries.append([len(record) - written, None])
                return records[i + 1:]
            return records[i:]
        return []

    def _widen_gap(self, lines: int, size: int) -> None:
        now = self._reactor.seconds()
        self._gap = Gap(lines, size, now, now).merged(self._gap)

    def _close_gap(self) -> None:
        gap, self._gap = self._gap, None
        if gap is None:
            return
        record = self._gap_record(gap)
        self._buf += record
        self._entries.append([len(record), gap])

    def _count(self, lines: int) -> None:
        self.dropped_total += lines
        for observer in self.on_dropped:
            observer(lines)

    def _step(self) -> bool:
        """One write(2).  True when something was written."""
        try:
            written = self._sink.send(self._buf)
        except BlockingIOError:
            return False
        except OSError as e:
            self._lose(e)
            return False
        if not written:
            return False
        self._failing = False
        self._consume(written)
        if self._gap is not None and len(self._buf) <= self._low_water:
            self._close_gap()
        return True

    def _send(self) -> None:
        while self._buf:
            if not self._step():
                break
        if self._buf and not self._writing:
            # The reader is behind: the reactor says when it can take more.
            self._writing = True
            self._reactor.addWriter(self)
        elif not self._buf:
            self._idle()

    def _consume(self, written: int) -> None:
        del self._buf[:written]
        entries = self._entries
        while written:
            head = entries[0]
            if written >= head[0]:
                written -= head[0]
                entries.popleft()
            else:
                head[0] -= written
                written = 0

    def _lose(self, error: BaseException) -> None:
        """A hard error: what waits is dropped, and counted."""
        lost = 0
        gap = self._gap
        now = self._reactor.seconds()
        for left, carried in self._entries:
            if carried is None:
                lost += 1
                gap = Gap(1, left, now, now).merged(gap)
            else:
                gap = carried.merged(gap)  # already counted when dropped
        self._buf.clear()
        self._entries.clear()
        self._gap = gap
        if lost:
            self._count(lost)
        if self._writing:
            self._writing = False
            self._reactor.removeWriter(self)
        if not self._failing:
            self._failing = True
            if self.on_error is not None:
                self.on_error(error)
        self._release_waiters()

    def _idle(self) -> None:
        if self._writing:
            self._writing = False
            self._reactor.removeWriter(self)
        if self._gap is None:
            self._release_waiters()

    def _release_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        left = self.pending_lines()
        for d in waiters:
            if not d.called:
                d.callback(left)

    # --- IWriteDescriptor ---------------------------------------------------------------

    def fileno(self) -> int:
        return self._sink.fileno()

    def doWrite(self):
        self._send()
        return None

    def connectionLost(self, reason) -> None:
        # The reactor saw the descriptor fail (the reader closed the pipe)
        # and already stopped watching it.
        self._writing = False
        self._lose(reason.value)

    def logPrefix(self) -> str:
        return self.name

    # --- shutdown -----------------------------------------------------------------------

    def drain(self, timeout: float) -> Deferred:
        """
        Fires with the number of lines still unwritten (0: everything, gap
        line included, reached the reader) once the buffer is empty, or
        after C{timeout} seconds if the reader does not come back.
        """
        if self._gap is not None and len(self._buf) <= self._low_water:
            self._close_gap()
        if self._buf and not self._writing:
            self._send()
        if not self._buf and self._gap is None:
            return succeed(0)
        d: Deferred[int] = Deferred()
        self._waiters.append(d)
        timer = self._reactor.callLater(timeout, self._release_waiters)

        def done(left):
            if timer.active():
                timer.cancel()
            return left

        return d.addBoth(done)

    def flush_blocking(self, timeout: float) -> int:
        """
        For when the reactor no longer runs (process exit): wait up to
        C{timeout} seconds for the reader.  Returns the lines left unwritten.
        """
        deadline = time.monotonic() + timeout
        if self._gap is not None and len(self._buf) <= self._low_water:
            self._close_gap()
        while self._buf:
            if self._step():
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                select.select([], [self._sink.fileno()], [], remaining)
            except (OSError, ValueError):
                break
        return self.pending_lines()

    def close(self) -> None:
        """Stop watching the descriptor and close it if it is our own."""
        if self._writing:
            self._writing = False
            self._reactor.removeWriter(self)
        self._sink.close()
