"""
Reads of single rows from the shared store on a cache miss, kept from
turning a flood of unknown identifiers into a flood of queries.

An instance keeps what it checks on the hot path in memory (virtual keys,
operator sessions).  With several instances on one store a row written by
another may not be in this one's memory yet, so a miss asks the database
once before refusing.  The identifiers come off the wire, chosen by anyone:

  - identical reads asked at the same time share one query (coalescing);
  - the ids waiting are read together, up to C{batch} in one query, at most
    C{concurrency} queries at once, and at most C{backlog} ids wait: past
    that a read fails at once with L{LookupsBusy} (a 503, never a refusal
    of a credential that may be good);
  - an id found absent is answered absent, without a query, for
    C{negative_ttl} seconds (at most C{negative_limit} ids, oldest dropped).

No I/O of its own: C{fetch(ids)} does the reading.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

__all__ = ["LookupsBusy", "MissLookups"]


class LookupsBusy(Exception):
    """Too many reads are waiting already: try again shortly."""


class MissLookups:
    """
    @param fetch: C{fetch(ids)} -> Deferred of a mapping of the ids found to
        their values; an id not in it is absent.
    @param clock: times the negative cache.
    """

    def __init__(
        self,
        fetch: Callable[[list[str]], defer.Deferred],
        clock: Any,
        *,
        concurrency: int = 4,
        batch: int = 64,
        backlog: int = 4096,
        negative_ttl: float = 1.0,
        negative_limit: int = 10000,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self.concurrency = concurrency
        self.batch = batch
        self.backlog = backlog
        self.negative_ttl = negative_ttl
        self.negative_limit = negative_limit
        self._waiting: collections.OrderedDict[str, list[defer.Deferred]] = collections.OrderedDict()
        self._asking: dict[str, list[defer.Deferred]] = {}
        self._forgotten: set[str] = set()  # forgotten while being read: not cached absent
        self._absent: collections.OrderedDict[str, float] = collections.OrderedDict()  # id -> until
        self.running = 0
        #: Queries made, for tests and metrics.
        self.queries = 0

    def __len__(self) -> int:
        """Ids waiting or being read."""
        return len(self._waiting) + len(self._asking)

    def known_absent(self, ident: str) -> bool:
        """Whether C{ident} was found absent less than C{negative_ttl} ago."""
        until = self._absent.get(ident)
        if until is None:
            return False
        if self._clock.seconds() < until:
            return True
        del self._absent[ident]
        return False

    def forget(self, ident: str) -> None:
        """C{ident} may exist now (created, or changed elsewhere): ask again next time."""
        self._absent.pop(ident, None)
        if ident in self._asking:
            self._forgotten.add(ident)

    def get(self, ident: str) -> defer.Deferred:
        """
        Fires with C{ident}'s value, or None when it is absent; fails with
        L{LookupsBusy}, or with the fetch's own failure (the database is
        unavailable).  Each caller gets a Deferred of its own.
        """
        if self.known_absent(ident):
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        waiters = self._asking.get(ident)
        if waiters is None:
            waiters = self._waiting.get(ident)
        if waiters is not None:
            waiters.append(d)
            return d
        if len(self._waiting) >= self.backlog:
            return defer.fail(LookupsBusy(f"{len(self._waiting)} reads are waiting for the database"))
        self._waiting[ident] = [d]
        self._pump()
        return d

    def _pump(self) -> None:
        while self.running < self.concurrency and self._waiting:
            ids: list[str] = []
            while self._waiting and len(ids) < self.batch:
                ident, waiters = self._waiting.popitem(last=False)
                self._asking[ident] = waiters
                ids.append(ident)
            self.running += 1
            self.queries += 1
            defer.maybeDeferred(self._fetch, ids).addBoth(self._answered, ids)

    def _answered(self, result: Any, ids: list[str]) -> None:
        self.running -= 1
        until = self._clock.seconds() + self.negative_ttl
        for ident in ids:
            waiters = self._asking.pop(ident, [])
            forgotten = ident in self._forgotten
            self._forgotten.discard(ident)
            if isinstance(result, Failure):
                for waiter in waiters:
                    waiter.errback(result)
                continue
            value = result.get(ident)
            if value is None and not forgotten:
                self._remember_absent(ident, until)
            for waiter in waiters:
                waiter.callback(value)
        self._pump()

    def _remember_absent(self, ident: str, until: float) -> None:
        self._absent.pop(ident, None)
        self._absent[ident] = until
        while len(self._absent) > self.negative_limit:
            self._absent.popitem(last=False)
