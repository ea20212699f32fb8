"""
The resolution trace: how the last requests' model names were resolved
(which rule decided, and where the request went or why it was refused),
kept in a bounded ring for the operator's debug page (C{/_debug}).

One small tuple per request, appended on the request path: the ring never
grows past its size, and nothing here does I/O.
"""

from __future__ import annotations

import collections
from typing import Any

from cllama_tx.store.records import rfc3339_ms

__all__ = ["DEFAULT_SIZE", "EXACT", "REFUSED", "ResolutionTrace"]

#: Requests the ring keeps.
DEFAULT_SIZE = 200

#: The rule of a name that needed no rewriting (C{<provider>/<model>} as sent).
EXACT = "exact"
#: The rule of a name no rule resolved (the request was refused).
REFUSED = "refused"

_ECHO = 200


def _short(value: Any) -> Any:
    if isinstance(value, str) and len(value) > _ECHO:
        return value[: _ECHO - 3] + "..."
    return value


class ResolutionTrace:
    """A ring of the last L{DEFAULT_SIZE} resolutions, newest last."""

    def __init__(self, clock: Any, size: int = DEFAULT_SIZE) -> None:
        self._clock = clock
        self._ring: collections.deque[tuple] = collections.deque(maxlen=max(1, size))

    def record(self, request_id: str | None, caller: str | None, requested: Any, rules: tuple[str, ...],
               result: str | None, error: str | None = None, note: str | None = None) -> None:
        """
        One request's resolution: the rules applied in order (the last
        decided; none: the name was exact), and the ref it resolved to, or
        the error code it was refused with.
        """
        self._ring.append((self._clock.seconds(), request_id, caller, _short(requested), rules, result, error, note))

    def __len__(self) -> int:
        return len(self._ring)

    def entries(self, limit: int | None = None) -> list[dict]:
        """The newest first, as the debug page shows them."""
        rows = list(self._ring)
        rows.reverse()
        if limit is not None:
            rows = rows[:limit]
        out = []
        for at, request_id, caller, requested, rules, result, error, note in rows:
            decided = REFUSED if error is not None else rules[-1] if rules else EXACT
            entry = {
                "at": rfc3339_ms(at),
                "request_id": request_id,
                "caller": caller,
                "requested": requested,
                "rules": list(rules),
                "decided_by": decided,
                "result": result,
                "error": error,
            }
            if note is not None:
                entry["note"] = note
            out.append(entry)
        return out
