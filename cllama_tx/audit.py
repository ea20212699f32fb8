"""
The audit stream: one JSON object per line on stdout (CONTRACT section 7).

It is written directly to its own file object instead of travelling through
the global log publisher: that keeps audit lines out of operational log files
and costs one dict and one C{json.dumps} per line.
"""

from __future__ import annotations

import json
import time
from typing import Callable, TextIO

from zope.interface import implementer

from .interfaces import IAuditLog


def rfc3339_ms(epoch: float) -> str:
    """C{epoch} as RFC 3339 UTC with milliseconds: C{2026-11-22T11:08:45.123Z}."""
    whole = int(epoch)
    millis = int((epoch - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


@implementer(IAuditLog)
class AuditLog:
    """
    Formats audit lines and hands them to C{write}.  Lines are buffered and
    flushed once per reactor turn (via C{schedule}), so a request's three
    lines cost one C{write} system call, not three.
    """

    def __init__(
        self,
        stream: TextIO,
        clock,
        schedule: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self._stream = stream
        self._clock = clock
        self._schedule = schedule
        self._pending: list[str] = []

    def emit(self, event_type, claw_id, model, request_id=None, intervention=None, **fields):
        line = {
            "ts": rfc3339_ms(self._clock.seconds()),
            "claw_id": claw_id,
            "type": event_type,
            "model": model,
            "intervention": intervention,
        }
        if request_id is not None:
            line["request_id"] = request_id
        line.update(fields)
        text = json.dumps(line, separators=(",", ":"), default=str) + "\n"
        if self._schedule is None:
            self._stream.write(text)
            self._stream.flush()
            return
        if not self._pending:
            self._schedule(self.flush)
        self._pending.append(text)

    def flush(self) -> None:
        """Write every pending line now."""
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self._stream.write(text)
            self._stream.flush()
