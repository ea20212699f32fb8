"""
Requests in flight per scope, for LiteLLM's C{max_parallel_requests}: a
key (or team, user, ...) with a limit of N has at most N requests between
admission and settlement at once; 0 refuses every request.

Pure bookkeeping, no clock: a request is counted from its admission
(L{ParallelLimiter.acquire}) to its end (L{ParallelLimiter.release}).
With several instances on one store, the requests in flight elsewhere are
told by the coordinator (L{ParallelLimiter.set_foreign}) before each
decision, from the reservations the other instances hold for the scope.
"""

from __future__ import annotations

__all__ = ["ParallelLimiter"]


class ParallelLimiter:
    def __init__(self) -> None:
        self._own: dict[str, int] = {}
        self._foreign: dict[str, int] = {}

    def in_flight(self, scope: str) -> int:
        """Requests of C{scope} in flight here and (as last told) elsewhere."""
        return self._own.get(scope, 0) + self._foreign.get(scope, 0)

    def set_foreign(self, scope: str, count: int) -> None:
        """The requests other instances have in flight for C{scope}, as the store says now."""
        if count > 0:
            self._foreign[scope] = count
        else:
            self._foreign.pop(scope, None)

    def acquire(self, scope: str, limit: int) -> bool:
        """Count one more request of C{scope} if it stays within C{limit}; False (nothing counted) otherwise."""
        if self.in_flight(scope) + 1 > limit:
            return False
        self._own[scope] = self._own.get(scope, 0) + 1
        return True

    def release(self, scope: str) -> None:
        """A request of C{scope} ended."""
        left = self._own.get(scope, 0) - 1
        if left > 0:
            self._own[scope] = left
        else:
            self._own.pop(scope, None)
