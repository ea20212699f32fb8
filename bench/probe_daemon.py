"""
The real daemon as the bench probes run it: a C{ProcessProtocol} that keeps
its stdout (the audit stream) and stderr (where it logs the ports it listens
on), fires C{ready} with C{{"API": port, "UI": port}}, and fires Deferreds as
audit lines arrive, so that a probe waits for events instead of sleeping.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable

from twisted.internet import defer, protocol

LISTENING = re.compile(r"(API|UI) listening on 127\.0\.0\.1:(\d+)")


class Daemon(protocol.ProcessProtocol):
    """The daemon's stdout (audit lines) and stderr (its ports)."""

    def __init__(self) -> None:
        self.stdout = b""
        self.stderr = b""
        self.ports: dict[str, int] = {}
        self.ready: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()
        self._waiters: list[tuple[Callable[[], object], defer.Deferred]] = []

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        for check, d in list(self._waiters):
            found = check()
            if found is not None:
                self._waiters.remove((check, d))
                d.callback(found)

    def errReceived(self, data: bytes) -> None:
        self.stderr += data
        for kind, port in LISTENING.findall(self.stderr.decode(errors="replace")):
            self.ports[kind] = int(port)
        if len(self.ports) == 2 and not self.ready.called:
            self.ready.callback(self.ports)

    def processEnded(self, reason) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError("the daemon exited:\n" + self.stderr.decode(errors="replace")[-3000:]))
        self.ended.callback(None)

    def audit(self) -> list[dict]:
        """Every complete audit line so far."""
        complete = self.stdout[: self.stdout.rfind(b"\n") + 1]
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def responses(self) -> int:
        """How many C{response} lines the audit has."""
        return sum(1 for line in self.audit() if line["type"] == "response")

    def settled(self, request_id: str) -> dict | None:
        """The C{response} or C{error} line of C{request_id}, once written."""
        for line in self.audit():
            if line.get("request_id") == request_id and line["type"] in ("response", "error"):
                return line
        return None

    def wait_for_responses(self, count: int) -> defer.Deferred:
        """Fires once the audit has at least C{count} C{response} lines."""
        return self._wait(lambda: self.responses() if self.responses() >= count else None)

    def wait_settled(self, request_id: str) -> defer.Deferred:
        """Fires with the line that settles C{request_id}."""
        return self._wait(lambda: self.settled(request_id))

    def _wait(self, check: Callable[[], object]) -> defer.Deferred:
        found = check()
        if found is not None:
            return defer.succeed(found)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((check, d))
        return d
