"""
The model mappings in memory and in the C{model_mappings} table of the
database the instances share (the SQLite state file, or PostgreSQL), so a
mapping survives a restart and every instance of a fleet resolves a name
the same way.

Shaped like the directory (L{cllama_tx.identity.directory}), more simply;
both are L{cllama_tx.store.mirror.Mirror}s:

  - B{Reads are from memory} (L{current}): the resolution order looks a
    name up on every request that reaches its mapping rules.  Everything
    is loaded when the service starts.
  - B{Memory changes first}, then the database, writes one after another,
    each in one transaction with its change row.  A write whose commit
    fails is undone in memory (unless a later one came).
  - B{Other instances' changes} arrive through L{reload} (the change feed
    calls it within a second with the name); a read never replaces a
    mapping this instance changed while the read was on its way.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from cllama_tx.governance.mappings import ModelMapping
from cllama_tx.store import mapping_rows
from cllama_tx.store.mirror import Mirror

__all__ = ["MappingStore", "StoreNotRunning"]

_log = Logger(namespace="cllama_tx.mappings")


class StoreNotRunning(RuntimeError):
    """The mapping store is not running (starting or stopping): nothing was changed."""


class MappingStore(Mirror):
    """
    @param database: anything with C{run(function, *args)} (the SQLite
        state file or PostgreSQL), as the directory takes.
    @param after: called at start; the mappings are loaded once its
        Deferred fires (the ledger's C{loaded}: PostgreSQL is migrated then).
    """

    name = "model-mappings"
    label = "model mappings"
    _log = _log
    _load_rows = staticmethod(mapping_rows.load)

    def __init__(self, database: Any, clock: Any, *, instance: str | None = None,
                 after: Callable[[], Any] | None = None) -> None:
        super().__init__(database, clock, instance=instance, after=after)
        self._mappings: dict[str, ModelMapping] = {}
        #: Called with the name after any change, local or from another instance.
        self.on_change: list[Callable[[str], Any]] = []

    def _loaded(self, rows: list, untouched: Callable[[Hashable], bool]) -> int:
        fresh = {row[0]: ModelMapping.from_row(row) for row in rows}
        for name in set(self._mappings) | set(fresh):
            if untouched(name):
                self._set(name, fresh.get(name))
        return len(fresh)

    # -- reads (memory)

    @property
    def current(self) -> Mapping[str, ModelMapping]:
        """Every mapping by name (read-only use: the resolution order's view)."""
        return self._mappings

    def get(self, name: str) -> ModelMapping | None:
        return self._mappings.get(name)

    def all(self) -> builtins.list[ModelMapping]:
        """Every mapping, by name."""
        return [self._mappings[name] for name in sorted(self._mappings)]

    # -- writes

    def _check_open(self) -> None:
        if not self.running:
            raise StoreNotRunning("the mapping store is not running")

    def _set(self, name: str, mapping: ModelMapping | None) -> None:
        if mapping is None:
            self._mappings.pop(name, None)
        else:
            self._mappings[name] = mapping
        for observer in self.on_change:
            try:
                observer(name)
            except Exception:
                _log.failure("model mappings: a change observer failed")

    def put(self, mapping: ModelMapping, only_source: str | None = None) -> defer.Deferred:
        """
        Set a mapping (in effect at once); fires with whether it was stored.
        With C{only_source}, a mapping of another source is left as it is
        (here, and in the database when another instance set one meanwhile):
        an LLM answer never replaces an operator's mapping.

        @raise StoreNotRunning: the store is not running.
        """
        self._check_open()
        name = mapping.name
        previous = self._mappings.get(name)
        if only_source is not None and previous is not None and previous.source != only_source:
            return defer.succeed(False)
        self._set(name, mapping)
        d = self._write([name], mapping_rows.upsert, mapping.row(), self.instance, only_source)

        def stored(written: bool) -> bool:
            if not written and self._mappings.get(name) is mapping:
                # Another instance's mapping of another source won: read it.
                self._set(name, previous)
                self.reload(name)
            return written

        def failed(failure: Failure) -> Failure:
            if self._mappings.get(name) is mapping:
                self._set(name, previous)
            _log.error("model mappings: could not store {name!r}: {error}", name=name,
                       error=failure.getErrorMessage())
            return failure

        return d.addCallbacks(stored, failed)

    def delete(self, name: str) -> defer.Deferred:
        """
        Remove a mapping (in effect at once); fires with whether one
        existed (here or in the database).

        @raise StoreNotRunning: the store is not running.
        """
        self._check_open()
        previous = self._mappings.get(name)
        self._set(name, None)
        d = self._write([name], mapping_rows.delete, name, self._clock.seconds(), self.instance)

        def failed(failure: Failure) -> Failure:
            if previous is not None and name not in self._mappings:
                self._set(name, previous)
            return failure

        return d.addCallbacks(lambda removed: bool(removed) or previous is not None, failed)

    # -- other instances' changes

    def reload(self, name: str | None) -> defer.Deferred:
        """Re-read one mapping (None: every one) after another instance changed it."""
        if not self.running:
            return defer.succeed(None)
        if name is None:
            self._load()
            return defer.succeed(None)
        may_apply = self._read_guard(name)
        d = self.database.run(mapping_rows.fetch, name)

        def apply(found: tuple | None) -> ModelMapping | None:
            if not may_apply():
                return self._mappings.get(name)
            mapping = None if found is None else ModelMapping.from_row(found)
            self._set(name, mapping)
            return mapping

        def failed(failure: Failure) -> None:
            _log.warn("model mappings: could not re-read {name!r}: {error}", name=name,
                      error=failure.getErrorMessage())

        return d.addCallbacks(apply, failed)
