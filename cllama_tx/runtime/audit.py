"""
The audit stream: one JSON object per line on stdout (CONTRACT section 7).

It is written directly to its own output instead of travelling through the
global log publisher: that keeps audit lines out of operational log files
and costs one dict and one C{json.dumps} per line.  In the daemon that
output is stdout as a L{BoundedOutput}: a reader that stops reading costs
audit lines (dropped, counted, and marked by one C{audit_gap} line), never
the reactor.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TextIO

from twisted.logger import Logger
from zope.interface import implementer

from cllama_tx.interfaces import IAuditLog
from cllama_tx.runtime.bounded_output import BoundedOutput, Gap, open_sink
from cllama_tx.store.records import rfc3339_ms

log = Logger()

# One encoder for every line (json.dumps with options builds a new one per call).
_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode


def format_line(
    epoch: float, event_type, claw_id, model, request_id=None, intervention=None, fields=None
) -> str:
    """One audit line, newline included: the contract's fields first."""
    line = {
        "ts": rfc3339_ms(epoch),
        "claw_id": claw_id,
        "type": event_type,
        "model": model,
        "intervention": intervention,
    }
    if request_id is not None:
        line["request_id"] = request_id
    if fields:
        line.update(fields)
    return _encode(line) + "\n"


def gap_line(gap: Gap, epoch: float) -> bytes:
    """
    The C{audit_gap} line: C{dropped_lines} audit lines are missing right
    here (stdout was not read fast enough), dropped between
    C{first_dropped_at} and C{last_dropped_at}.
    """
    return format_line(
        epoch,
        "audit_gap",
        None,
        None,
        fields={
            "dropped_lines": gap.lines,
            "dropped_bytes": gap.bytes,
            "first_dropped_at": rfc3339_ms(gap.first_at),
            "last_dropped_at": rfc3339_ms(gap.last_at),
        },
    ).encode()


def open_audit_output(stream, reactor, limit: int) -> BoundedOutput | None:
    """
    C{stream}'s descriptor (stdout) as a bounded, non-blocking output, or
    None when C{stream} has none (an in-memory stream in tests).
    """
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    stream.flush()  # whatever Python buffered goes first
    output = BoundedOutput(
        open_sink(fd), reactor, limit, lambda gap: gap_line(gap, reactor.seconds()), name="audit"
    )

    def failed(error: BaseException) -> None:
        log.warn("Audit output failed ({error}); audit lines are dropped and counted until it works", error=error)

    output.on_error = failed
    return output


@implementer(IAuditLog)
class AuditLog:
    """
    Formats audit lines and hands them to C{output}.  Lines are buffered and
    flushed once per reactor turn (via C{schedule}), so a request's three
    lines cost one C{write} system call, not three.

    C{output} is a L{BoundedOutput} (the daemon's stdout) or a text stream
    (tests), written and flushed as is.
    """

    def __init__(
        self,
        output: BoundedOutput | TextIO,
        clock,
        schedule: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self._clock = clock
        self._schedule = schedule
        self._pending: list[str] = []
        self._write: Callable[[list[str]], object]
        if isinstance(output, BoundedOutput):
            self._write = lambda lines: output.write_records([line.encode() for line in lines])
        else:
            self._write = lambda lines: (output.write("".join(lines)), output.flush())

    def emit(self, event_type, claw_id, model, request_id=None, intervention=None, **fields):
        text = format_line(
            self._clock.seconds(), event_type, claw_id, model, request_id, intervention, fields
        )
        if self._schedule is None:
            self._write([text])
            return
        if not self._pending:
            self._schedule(self.flush)
        self._pending.append(text)

    def flush(self) -> None:
        """Write every pending line now."""
        if self._pending:
            lines = self._pending
            self._pending = []
            self._write(lines)
