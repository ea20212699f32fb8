"""
The operator's credentials (the UI token, the master key): who may read
every agent's data and manage keys, and how guessing them is slowed.

Every place that compares an operator credential asks one shared
L{OperatorGuard} first (the UI's sign-in and bearer header, C{/metrics},
C{/history/<agent>} on the API port, the key API and billing), so a
client guessing on one of them waits on all of them.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from twisted.logger import Logger

from cllama_tx.identity.throttle import FailureThrottle, source_of

log = Logger(namespace="cllama_tx.operator")


def bearer_matches(authorization: bytes | None, token: bytes | None) -> bool:
    """
    True when C{authorization} is C{Bearer <token>}.  No configured token
    means nobody is the operator (operator endpoints stay shut).
    """
    if not token or not authorization:
        return False
    scheme, _, presented = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(presented.strip(), token)


def request_source(request: Any) -> str:
    """The throttled source of a twisted.web request (see L{source_of})."""
    address = request.getClientAddress()
    return source_of(getattr(address, "host", None))


class _WallClock:
    """For guards built without a clock (objects made outside the daemon)."""

    @staticmethod
    def seconds() -> float:
        return time.time()


class OperatorGuard:
    """
    One L{FailureThrottle} plus its audit: C{operator} lines with
    C{action} C{auth_failed} (a wrong credential was compared) and
    C{auth_throttled} (the first refusal of each wait), naming the
    C{surface}, the client C{source} and never what was presented.

    @param audit: an L{cllama_tx.runtime.audit.AuditLog}, or None (the
        operational log gets the lines instead).
    """

    def __init__(self, throttle: FailureThrottle | None = None, audit: Any = None, clock: Any = None) -> None:
        self.throttle = throttle if throttle is not None else FailureThrottle(clock or _WallClock())
        self.audit = audit

    def refusal(self, source: str, surface: str, action: str = "auth_throttled") -> int | None:
        """
        Seconds (for C{Retry-After}) C{source} must wait before the
        credential it presents may be compared, or None to compare it now.
        """
        wait = self.throttle.retry_after(source)
        if wait is not None and self.throttle.first_refusal(source):
            self._emit(action, surface, source, retry_after=wait, failures=self.throttle.failures(source))
        return wait

    def failed(self, source: str, surface: str, action: str = "auth_failed") -> None:
        """A wrong credential from C{source} was compared (and refused)."""
        failures = self.throttle.failed(source)
        self._emit(action, surface, source, failures=failures)

    def _emit(self, action: str, surface: str, source: str, **fields: Any) -> None:
        actor = f"anonymous@{source}"
        if self.audit is not None:
            self.audit.emit("operator", None, None, action=action, actor=actor, surface=surface, **fields)
        else:
            log.warn(
                "operator credential: {action} on {surface} from {source} {fields}",
                action=action, surface=surface, source=source, fields=fields,
            )
