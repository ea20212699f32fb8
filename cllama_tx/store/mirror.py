"""
Records held in memory and in a table of the database the instances share
(the SQLite state file, or PostgreSQL): the common part of the directory
and the model mappings.

  - B{Reads are from memory}: everything is loaded when the service
    starts (again after L{LOAD_RETRY} seconds while the database is away).
  - B{Memory changes first}, then the database, writes one after another
    (L{Mirror._write}); while a write is on its way its subjects are
    I{pending}, and each write moves their I{generation} on.
  - B{A read never replaces what this instance changed while the read was
    on its way}: a load or a re-read applies to a subject only when it is
    not pending and its generation is the one seen when the read began.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.store.shared import new_instance_id

__all__ = ["LOAD_RETRY", "Mirror"]

#: A load that failed (the database unavailable at start) is tried again after this.
LOAD_RETRY = 2.0


class Mirror(service.Service):
    """
    Subclasses give C{label} (for the log and errors), C{_log},
    C{_load_rows} (a function of a transaction returning every row) and
    C{_loaded} (apply the rows to memory).

    @param database: anything with C{run(function, *args)}.
    @param after: called at start; the records are loaded once its
        Deferred fires (the ledger's C{loaded}: PostgreSQL is migrated then).
    """

    label = "records"
    _log = Logger()

    def __init__(self, database: Any, clock: Any, *, instance: str | None = None,
                 after: Callable[[], Any] | None = None, reactor: Any = None) -> None:
        self.database = database
        self._clock = clock
        self._reactor = reactor if reactor is not None else clock
        self.instance = instance or new_instance_id()
        self._after = after
        self._writes = defer.DeferredLock()
        self._pending: collections.Counter[Hashable] = collections.Counter()
        self._generation: collections.Counter[Hashable] = collections.Counter()
        self.loaded = False
        self._waiters: list[defer.Deferred] = []
        self._retry: Any = None

    # -- what a subclass gives

    #: A function of a transaction returning every row.
    _load_rows: Callable[[Any], Any]

    def _loaded(self, rows: list, untouched: Callable[[Hashable], bool]) -> int:
        """Apply every row to memory, skipping subjects not C{untouched}; return how many records."""
        raise NotImplementedError

    # -- lifecycle

    def startService(self) -> None:
        super().startService()
        self._load()

    def stopService(self) -> Any:
        super().stopService()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(DatabaseUnavailable(f"{self.label}: stopping"))
        # Writes in flight end on their own; wait for them.
        return self._writes.run(lambda: None)

    def when_loaded(self) -> defer.Deferred:
        """Fires once every record is in memory."""
        if self.loaded:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append(d)
        return d

    def loaded_within(self, seconds: float) -> defer.Deferred:
        """Fires with whether every record is in memory, waiting at most C{seconds} for it."""
        if self.loaded:
            return defer.succeed(True)
        d = self.when_loaded()
        d.addTimeout(seconds, self._reactor)
        return d.addCallbacks(lambda _: True, lambda _: False)

    def _load(self) -> None:
        self._retry = None
        if not self.running:
            return
        generations = dict(self._generation)
        if self._after is None:
            d = self.database.run(self._load_rows)
        else:
            d = defer.maybeDeferred(self._after).addCallback(lambda _: self.database.run(self._load_rows))

        def untouched(subject: Hashable) -> bool:
            return not self._pending[subject] and self._generation[subject] == generations.get(subject, 0)

        def loaded(rows: list) -> None:
            count = self._loaded(rows, untouched)
            self.loaded = True
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)
            self._log.info("{label}: {count} loaded", label=self.label, count=count)

        def failed(failure: Failure) -> None:
            if not failure.check(DatabaseUnavailable):
                self._log.failure("{label}: loading failed", failure, label=self.label)
            if self.running:
                self._retry = self._reactor.callLater(LOAD_RETRY, self._load)

        d.addCallbacks(loaded, failed)

    # -- writes, and re-reads that must not undo them

    def _write(self, subjects: list[Hashable], function: Any, *args: Any) -> defer.Deferred:
        """C{function(transaction, *args)} once the writes before it are done; C{subjects} are pending meanwhile."""
        for subject in subjects:
            self._pending[subject] += 1
            self._generation[subject] += 1
        d = self._writes.run(self.database.run, function, *args)

        def done(result: Any) -> Any:
            for subject in subjects:
                self._pending[subject] -= 1
                if self._pending[subject] <= 0:
                    del self._pending[subject]
            return result

        return d.addBoth(done)

    def _read_guard(self, subject: Hashable) -> Callable[[], bool]:
        """Taken before a re-read of C{subject}: says, when it returns, whether it may be applied."""
        generation = self._generation[subject]
        return lambda: not self._pending[subject] and self._generation[subject] == generation
