"""
Which rows of a table with serial ids a reader has seen, when ids can
become visible out of order.

PostgreSQL hands out a serial id when a row is inserted, not when it is
committed: a transaction that took id 100 may commit after the one that
took 101, so a reader that moved its cursor past 101 would never see 100.
An id skipped over is therefore kept as a B{hole} and asked for again until
it shows up or has been missing for C{patience} seconds: an id is also
skipped for good by a rolled-back insert, or by an C{INSERT ... ON CONFLICT
DO NOTHING} that found its row already there.  C{patience} must be longer
than a writer's transaction can stay open after taking its ids (the ledger
bounds that: see C{docs/LEDGER.md}).

SQLite commits one writer at a time and gives ids in commit order, so
holes only appear there when a row is deleted before it was read.

Pure: the caller reads, this decides what the reading means.
"""

from __future__ import annotations

__all__ = ["HOLE_PATIENCE", "MAX_HOLES", "IdCursor"]

HOLE_PATIENCE = 120.0
"""Seconds an id skipped over is looked for before it is taken as never coming."""

MAX_HOLES = 100000
"""At most this many holes are kept (the oldest are given up first)."""


class IdCursor:
    """
    Every id up to L{high} was seen, except the L{holes}; ids above L{high}
    are unread.  C{seen()} takes what a read of C{id > high OR id IN holes}
    returned and says which of its ids are new.
    """

    def __init__(self, high: int = 0, patience: float = HOLE_PATIENCE, limit: int = MAX_HOLES) -> None:
        self.high = int(high)
        self.patience = patience
        self.limit = limit
        self._holes: dict[int, float] = {}  # id -> when it was first missed
        self.given_up = 0  # holes dropped without being seen

    @property
    def holes(self) -> list[int]:
        """The ids still looked for, in order."""
        return sorted(self._holes)

    def __len__(self) -> int:
        return len(self._holes)

    def seen(self, ids: list[int], now: float) -> list[int]:
        """
        Take the ids a read returned; return those seen for the first time
        (so a row is counted once, however often it is read).  Ids skipped
        over on the way up become holes, missed since C{now}.
        """
        new = []
        for row_id in sorted(set(int(i) for i in ids)):
            if row_id > self.high:
                for missing in range(self.high + 1, row_id):
                    self._holes[missing] = now
                self.high = row_id
                new.append(row_id)
            elif self._holes.pop(row_id, None) is not None:
                new.append(row_id)
        self._bound()
        return new

    def expire(self, now: float) -> list[int]:
        """Give up the holes missing for longer than C{patience}; returns them."""
        old = [row_id for row_id, since in self._holes.items() if now - since > self.patience]
        for row_id in old:
            del self._holes[row_id]
        self.given_up += len(old)
        return sorted(old)

    def _bound(self) -> None:
        excess = len(self._holes) - self.limit
        if excess > 0:
            for row_id in sorted(self._holes)[:excess]:
                del self._holes[row_id]
            self.given_up += excess
