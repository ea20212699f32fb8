"""
The directory: LiteLLM's users, teams (and their members), organisations,
customers and stored models, in memory and in the C{directory} table of
the database the instances share, so every instance governs a key by the
same levels above it.

Why it is shaped like this (as the virtual key store, more simply):

  - B{Reads are from memory} (L{team}, L{user}, L{organization},
    L{customer}, L{member}): governance asks them on every request of a
    key.  Everything is loaded when the service starts.
  - B{Memory changes first}, then the database, writes one after another,
    each in one transaction with its change row.  A write whose commit
    fails is undone in memory (unless a later one came).
  - B{Other instances' changes} arrive through L{reload} (the change feed
    calls it within a second); a read never replaces a record this
    instance changed while the read was on its way.

Records are L{cllama_tx.identity.entities.Entity} (users, teams,
organisations, customers) and plain documents (models); their SQL is
L{cllama_tx.identity.directory_rows}.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Hashable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from cllama_tx.identity import directory_rows
from cllama_tx.identity.entities import KINDS, Entity, Membership
from cllama_tx.identity.litellm_fields import DuplicateKey
from cllama_tx.identity.teams import membership
from cllama_tx.identity.virtual_keys import StoreClosed
from cllama_tx.store.mirror import Mirror

__all__ = ["Directory", "RecordNotFound"]

_log = Logger(namespace="cllama_tx.directory")

MODEL = "model"


class RecordNotFound(LookupError):
    """No record of this kind has this id."""

    def __init__(self, kind: str, record_id: str) -> None:
        super().__init__(f"{kind} {record_id!r} not found")
        self.kind = kind
        self.record_id = record_id


def _entity_or_doc(kind: str, record_id: str, doc: dict, created: float, updated: float) -> Any:
    if kind == MODEL:
        return {**doc, "model_id": record_id, "created_at": created, "updated_at": updated}
    return Entity.from_doc(kind, record_id, doc, created, updated)


class Directory(Mirror):
    """
    @param database: anything with C{run(function, *args)} (the SQLite
        state file or PostgreSQL), as the virtual key store takes.
    @param after: called at start; the records are loaded once its
        Deferred fires (the ledger's C{loaded}: PostgreSQL is migrated then).
    """

    name = "directory"
    label = "directory"
    _log = _log
    _load_rows = staticmethod(directory_rows.load)

    def __init__(self, database: Any, clock: Any, *, instance: str | None = None,
                 after: Callable[[], Any] | None = None, reactor: Any = None) -> None:
        super().__init__(database, clock, instance=instance, after=after, reactor=reactor)
        self._records: dict[str, dict[str, Any]] = {kind: {} for kind in (*KINDS, MODEL)}
        #: Called with (kind, id) after any change, local or from another instance.
        self.on_change: list[Callable[[str, str], Any]] = []

    def _loaded(self, rows: list, untouched: Callable[[Hashable], bool]) -> int:
        fresh: dict[str, dict[str, Any]] = {kind: {} for kind in self._records}
        for kind, record_id, doc, created, updated in rows:
            if kind in fresh:
                fresh[kind][record_id] = _entity_or_doc(kind, record_id, doc, created, updated)
        for kind, records in fresh.items():
            for record_id in set(self._records[kind]) | set(records):
                if untouched((kind, record_id)):
                    self._set(kind, record_id, records.get(record_id))
        return sum(len(r) for r in fresh.values())

    # -- reads (memory)

    def get(self, kind: str, record_id: str | None) -> Any:
        if record_id is None:
            return None
        return self._records[kind].get(record_id)

    def team(self, team_id: str | None) -> Entity | None:
        return self.get("team", team_id)

    def user(self, user_id: str | None) -> Entity | None:
        return self.get("user", user_id)

    def organization(self, organization_id: str | None) -> Entity | None:
        return self.get("org", organization_id)

    def customer(self, user_id: str | None) -> Entity | None:
        return self.get("customer", user_id)

    def model(self, model_id: str | None) -> dict | None:
        return self.get(MODEL, model_id)

    def member(self, team_id: str | None, user_id: str | None) -> Membership | None:
        team = self.team(team_id)
        if team is None or user_id is None:
            return None
        return membership(team, user_id)

    def all(self, kind: str) -> builtins.list[Any]:
        """Every record of a kind, oldest first (then by id)."""
        records = self._records[kind].values()
        if kind == MODEL:
            return sorted(records, key=lambda r: (r["created_at"], r["model_id"]))
        return sorted(records, key=lambda r: (r.created_at, r.id))

    def teams_of(self, user_id: str) -> builtins.list[str]:
        """The teams a user is a member of."""
        return [team.id for team in self.all("team") if user_id in team.members]

    def teams_in(self, organization_id: str) -> builtins.list[Entity]:
        """The teams of an organisation."""
        return [team for team in self.all("team") if team.org == organization_id]

    # -- writes

    def _check_open(self) -> None:
        if not self.running:
            raise StoreClosed("the directory is not running")

    def _set(self, kind: str, record_id: str, record: Any) -> None:
        if record is None:
            self._records[kind].pop(record_id, None)
        else:
            self._records[kind][record_id] = record
        for observer in self.on_change:
            try:
                observer(kind, record_id)
            except Exception:
                _log.failure("directory: a change observer failed")


    def create(self, kind: str, record_id: str, doc: Mapping[str, Any]) -> defer.Deferred:
        """
        A new record; fires with it once committed.

        @raise DuplicateKey: the id is taken (also as the Deferred's
            failure, when another instance has it).
        """
        self._check_open()
        if record_id in self._records[kind]:
            raise DuplicateKey(directory_rows._ID_FIELDS[kind], f"{record_id!r} already exists")
        now = self._clock.seconds()
        stored = dict(doc)
        if kind != MODEL:
            stored.setdefault("budget_anchor", now)
        record = _entity_or_doc(kind, record_id, stored, now, now)
        self._set(kind, record_id, record)
        d = self._write([(kind, record_id)], directory_rows.insert, kind, record_id, stored, now, self.instance)

        def failed(failure: Failure) -> Failure:
            if self._records[kind].get(record_id) is record:
                self._set(kind, record_id, None)
            if not failure.check(DuplicateKey):
                _log.error("directory: could not store {kind} {id}: {error}", kind=kind, id=record_id,
                           error=failure.getErrorMessage())
            return failure

        return d.addCallbacks(lambda _: record, failed)

    def update(self, kind: str, record_id: str, values: Mapping[str, Any]) -> defer.Deferred:
        """
        Apply C{values} (L{cllama_tx.identity.entities.apply_changes});
        memory changes at once; fires with the record as the database now
        has it.

        @raise RecordNotFound: no such record.
        """
        self._check_open()
        previous = self._records[kind].get(record_id)
        if previous is None:
            raise RecordNotFound(kind, record_id)
        now = self._clock.seconds()
        if kind == MODEL:
            record: Any = {**previous, **values, "updated_at": now}
        else:
            record = previous.changed(values, now)
        self._set(kind, record_id, record)
        d = self._write([(kind, record_id)], directory_rows.update, kind, record_id, dict(values), now, self.instance)

        def stored(found: tuple | None) -> Any:
            if found is None:
                if self._records[kind].get(record_id) is record:
                    self._set(kind, record_id, None)
                raise RecordNotFound(kind, record_id)
            fresh = _entity_or_doc(kind, record_id, *found)
            if self._records[kind].get(record_id) is record:
                self._set(kind, record_id, fresh)
            return fresh

        def failed(failure: Failure) -> Failure:
            if failure.check(RecordNotFound):
                return failure
            if self._records[kind].get(record_id) is record:
                self._set(kind, record_id, previous)
            _log.error("directory: could not update {kind} {id}: {error}", kind=kind, id=record_id,
                       error=failure.getErrorMessage())
            return failure

        return d.addCallback(stored).addErrback(failed)

    def delete(self, kind: str, record_ids: builtins.list[str]) -> defer.Deferred:
        """Remove records (in effect at once); fires with the ids that existed."""
        self._check_open()
        ordered = builtins.list(dict.fromkeys(record_ids))
        removed = {rid: self._records[kind].get(rid) for rid in ordered}
        for rid in ordered:
            self._set(kind, rid, None)
        now = self._clock.seconds()
        d = self._write([(kind, rid) for rid in ordered], directory_rows.delete, kind, ordered, now, self.instance)

        def failed(failure: Failure) -> Failure:
            for rid, record in removed.items():
                if record is not None and rid not in self._records[kind]:
                    self._set(kind, rid, record)
            return failure

        return d.addCallbacks(lambda stored: [rid for rid in ordered if rid in stored or removed.get(rid)], failed)

    # -- other instances' changes

    def reload(self, kind: str, record_id: str | None) -> defer.Deferred:
        """Re-read one record (None: everything) after another instance changed it."""
        if not self.running:
            return defer.succeed(None)
        if record_id is None:
            self._load()
            return defer.succeed(None)
        may_apply = self._read_guard((kind, record_id))
        d = self.database.run(directory_rows.fetch, kind, record_id)

        def apply(found: tuple | None) -> Any:
            if not may_apply():
                return self._records[kind].get(record_id)
            record = None if found is None else _entity_or_doc(kind, record_id, *found)
            self._set(kind, record_id, record)
            return record

        return d.addCallback(apply)
