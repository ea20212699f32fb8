"""
Operational logging: human-readable lines on stderr, never the audit stream.

stderr gets the audit's treatment (L{BoundedOutput}): a reader that stops
reading costs log lines, dropped and then reported by one line saying how
many, never the reactor.
"""

from __future__ import annotations

import atexit
import threading
import time

from twisted.logger import ILogObserver, formatEventAsClassicLogText
from zope.interface import implementer

from cllama_tx.runtime.bounded_output import BoundedOutput, Gap, open_sink

LOG_BUFFER = 1024 * 1024
"""Bytes of log lines kept for a stderr reader that is behind."""

EXIT_FLUSH_SECONDS = 0.5
"""How long the process, once the reactor stopped, waits for a stderr reader that is behind."""


def _rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+0000", time.gmtime(epoch))


def log_gap_line(gap: Gap, epoch: float) -> bytes:
    """The line that marks where log lines are missing (classic log format)."""
    return (
        f"{_rfc3339(epoch)} [cllama_tx.runtime.logs] {gap.lines} log lines dropped between "
        f"{_rfc3339(gap.first_at)} and {_rfc3339(gap.last_at)}: stderr was not read fast enough\n"
    ).encode()


@implementer(ILogObserver)
class BoundedLogObserver:
    """
    Formats each event as a classic log line into a L{BoundedOutput}.  One
    event is one record, so a traceback is kept or dropped whole.  Events
    from other threads (the ledger writer, the thread pool) are handed to
    the reactor thread, which owns the output.
    """

    def __init__(self, output: BoundedOutput, reactor, format_event=formatEventAsClassicLogText) -> None:
        self.output = output
        self._reactor = reactor
        self._format = format_event
        self._thread = threading.get_ident()

    def __call__(self, event) -> None:
        text = self._format(event)
        if not text:
            return
        record = text.encode("utf-8", "backslashreplace")
        if threading.get_ident() == self._thread:
            self.output.write(record)
        else:
            self._reactor.callFromThread(self.output.write, record)


def bounded_stderr_observer(reactor, fd: int = 2, limit: int = LOG_BUFFER) -> BoundedLogObserver:
    """An observer writing C{fd} (stderr) without blocking C{reactor}."""
    output = BoundedOutput(
        open_sink(fd), reactor, limit, lambda gap: log_gap_line(gap, reactor.seconds()), name="stderr"
    )
    return BoundedLogObserver(output, reactor)


def stderr_observer() -> ILogObserver:
    """
    The default operational log observer under twistd (C{--logger}): stderr,
    not stdout, never blocking the reactor.  Called once per process, in the
    thread that then runs the reactor.
    """
    from twisted.internet import reactor

    observer = bounded_stderr_observer(reactor)
    atexit.register(observer.output.flush_blocking, EXIT_FLUSH_SECONDS)
    return observer
