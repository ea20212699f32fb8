"""
Virtual keys: short-lived C{sk-...} keys minted through the LiteLLM-compatible
key API (L{cllama_tx.sites.keys}), each scoped to a team and a user, with its own
model allow-list, budget and rate limits.  The store keeps them in memory and
in the database the instances share (the SQLite state file, or PostgreSQL),
so every instance of a fleet honours the same keys.

Why it is shaped like this:

  - B{Only a hash is stored.}  A key is C{sk-} plus 43 URL-safe characters
    (256 random bits); the database and memory hold its SHA-256 (hex), which
    is also its id in C{/key/list}, as in LiteLLM (the same hash function, so
    LiteLLM's token hashes mean the same here).  The clear key is returned
    once, by C{create}, and never stored or logged.
  - B{The hot path is a hash and a dict lookup.}  Every live key is in
    memory, loaded when the store starts; L{VirtualKeyStore.lookup} checks
    the expiry against the injected clock, to the second.
  - B{Memory changes first, on the reactor thread.}  A deleted or blocked key
    fails at once, even before its row is committed.  Writes are run one
    after another (each starts once the one before it is done, whatever the
    database's threads, so a delete can never overtake the create it
    follows), each in one transaction with its change row
    (L{cllama_tx.store.shared.record_change}).  An update writes only the
    fields it changes, so another instance's change to the others is kept.
  - B{Failure is handled per kind.}  A create whose commit fails is taken
    out of memory again (its key was never shown to anyone); an update whose
    commit fails is rolled back in memory; a delete stays in effect in
    memory (fail closed: no read from the database brings the key back),
    and a retried delete writes it again.
  - B{Other instances' changes} reach memory through L{reload_key} and
    L{reload_team}, which the change feed calls within a second.  A row
    read from the database replaces memory only if this instance changed
    nothing of that key since the read began and has no write of it
    pending, so a slow read never undoes a newer change.
  - B{A key minted elsewhere works at once.}  In a shared store (C{shared}:
    several processes or hosts), a miss for a well-formed key is read from
    the database before it is refused (L{lookup_stored}, a Deferred;
    L{cllama_tx.identity.lookups.MissLookups} coalesces, batches and
    bounds those reads and remembers absent hashes for a second).  The
    single process refuses a miss at once, as before; until the first load
    is done every miss waits for it, so a restart never refuses a good key.

The key and its fields (pure) are L{cllama_tx.identity.key_model}; the
tables and their SQL, L{cllama_tx.identity.key_rows}.
"""

from __future__ import annotations

import builtins
import collections
import heapq
import os
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from cllama_tx.identity import key_rows
from cllama_tx.identity.key_model import (
    KEY_FIELDS,
    KEY_PREFIX,
    MAX_KEY_BODY,
    MIN_KEY_BODY,
    UNSUPPORTED_FIELDS,
    DuplicateKey,
    InvalidField,
    KeyPage,
    VirtualKey,
    generate_key,
    hash_key,
    iso_time,
    key_name_of,
    looks_like_virtual_key,
    model_aliases,
    parse_duration,
    token_hash_of,
    validate_key_fields,
)
from cllama_tx.identity.lookups import LookupsBusy, MissLookups
from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.store.shared import new_instance_id
from cllama_tx.store.sqlite_database import SqliteDatabase

__all__ = [
    "KEY_FIELDS",
    "UNSUPPORTED_FIELDS",
    "DuplicateKey",
    "InvalidField",
    "KeyNotFound",
    "KeyPage",
    "LookupsBusy",
    "StoreClosed",
    "VirtualKey",
    "VirtualKeyStore",
    "generate_key",
    "hash_key",
    "iso_time",
    "key_name_of",
    "looks_like_virtual_key",
    "model_aliases",
    "parse_duration",
    "token_hash_of",
    "validate_key_fields",
]

#: Keys that expired longer ago than this are dropped from memory (they stay
#: in the database); /key/info then answers 404 for them.
DEFAULT_EXPIRED_RETENTION = 7 * 86400.0
PRUNE_INTERVAL = 3600.0
#: A load that failed (the database unavailable at start) is tried again after this.
LOAD_RETRY = 2.0
# Changes remembered for the reads in flight before they are pruned.
_STAMPS_KEPT = 4096

DIR_MODE = 0o700
FILE_MODE = 0o600

_log = Logger(namespace="cllama_tx.virtual_keys")


class KeyNotFound(LookupError):
    """No live key has this hash."""


class StoreClosed(Exception):
    """The store is not running: writes are refused."""


def _private_file(path: str) -> None:
    """The state file's directory 0700 and the file 0600, when we create them."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=DIR_MODE, exist_ok=True)
        os.chmod(directory, DIR_MODE)  # makedirs' mode is filtered by the umask
    if not os.path.exists(path):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE))
        os.chmod(path, FILE_MODE)


def _shield(d: defer.Deferred) -> defer.Deferred:
    """
    A Deferred with C{d}'s result whose cancellation does not reach C{d}:
    a client that goes away must not cancel the store's bookkeeping of a
    write that the database will commit anyway.
    """
    out: defer.Deferred = defer.Deferred()

    def fire(result: Any) -> None:
        if out.called:
            return None  # cancelled by the caller; the store has logged failures
        if isinstance(result, Failure):
            out.errback(result)
        else:
            out.callback(result)
        return None

    d.addBoth(fire)
    return out


# --------------------------------------------------------------------------
# The store


class VirtualKeyStore(service.Service):
    """
    Every virtual key, in memory and in the C{virtual_keys} table of
    C{database}: anything with L{cllama_tx.store.postgres.PostgresDatabase}'s
    C{run(function, *args)} (PostgreSQL, or the SQLite state file as
    L{SqliteDatabase}), or the path of a SQLite file (a L{SqliteDatabase} of
    the store's own, closed with it).  C{clock} times expiry, pruning and
    the cache of absent keys; C{reactor} runs the database's results.

    Reads (L{lookup}, L{get}, L{list}) are from memory and synchronous;
    L{lookup_stored} is the miss path.  Writes (L{create}, L{update},
    L{delete}) change memory at once and return a Deferred that fires once
    the change is committed.

    @param shared: other instances use the same database: a miss is read
        from it before it is refused.
    @param instance: this instance's name in the change feed.
    @param after: called at start; the keys are loaded once its Deferred
        fires (the ledger's C{loaded}: PostgreSQL's schema is migrated then).
    """

    def __init__(
        self,
        database: Any,
        clock: Any,
        reactor: Any,
        expired_retention: float = DEFAULT_EXPIRED_RETENTION,
        prune_interval: float = PRUNE_INTERVAL,
        *,
        shared: bool = False,
        instance: str | None = None,
        miss_concurrency: int = 4,
        miss_backlog: int = 4096,
        negative_ttl: float = 1.0,
        after: Callable[[], Any] | None = None,
    ) -> None:
        if isinstance(database, str):
            self.path: str | None = database
            database = SqliteDatabase(database, reactor)
            self._owns_database = True
        else:
            self.path = getattr(database, "path", None)
            self._owns_database = False
        self.database = database
        self.shared = shared
        self.instance = instance or new_instance_id()
        self._after = after
        self._clock = clock
        self._reactor = reactor
        self.expired_retention = expired_retention
        self.prune_interval = prune_interval
        self.misses = MissLookups(
            self._read_misses, clock, concurrency=miss_concurrency, backlog=miss_backlog, negative_ttl=negative_ttl
        )
        self._pruning: task.LoopingCall | None = None
        self._retry: Any = None
        self._in_flight = 0
        self._idle_waiters: list[defer.Deferred] = []
        self._reset()

    def _reset(self) -> None:
        self._keys: dict[str, VirtualKey] = {}
        self._aliases: dict[str, str] = {}  # key_alias -> token_hash, live keys only
        self._team_aliases: dict[str, dict[str, str]] = {}  # team_id -> model_aliases
        self._writes = defer.DeferredLock()
        self._closing = False
        self.loaded = False
        self._loading = False
        self._load_error: str | None = None
        self._load_waiters: list[defer.Deferred] = []
        # What keeps a read from undoing a newer change (see _fresh).
        self._epoch = 0
        self._reads: collections.Counter[int] = collections.Counter()  # start epochs of reads in flight
        self._stamps: dict[str, int] = {}
        self._pending: collections.Counter[str] = collections.Counter()
        # Deleted here, not (yet) committed: never read back from the database.
        self._tombstones: set[str] = set()

    # -- lifecycle

    def startService(self) -> None:
        """
        Start loading every live key (L{when_loaded} fires once they are in
        memory; lookups made before then wait for it).  A state file that
        cannot be created raises here, before the daemon serves anything.
        """
        if self.running or self._in_flight:
            raise RuntimeError("virtual key store already started, or still closing")
        if self._owns_database and self.path is not None:
            _private_file(self.path)
        self._reset()
        service.Service.startService(self)
        self._load()
        self._pruning = task.LoopingCall(self.prune)
        self._pruning.clock = self._clock
        self._pruning.start(self.prune_interval, now=False)

    def stopService(self) -> defer.Deferred:
        """Refuse new writes, commit those queued, then close the store's own database."""
        service.Service.stopService(self)
        if self._pruning is not None:
            if self._pruning.running:
                self._pruning.stop()
            self._pruning = None
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        self._closing = True
        self._fail_load_waiters("the virtual key store is stopping")
        d: defer.Deferred = defer.Deferred()
        if self._in_flight == 0:
            d.callback(None)
        else:
            self._idle_waiters.append(d)
        if self._owns_database:
            d.addCallback(lambda _: self.database.close())
        return d

    def when_loaded(self) -> defer.Deferred:
        """
        Fires once every live key is in memory; fails with
        L{DatabaseUnavailable} while the database cannot be read (the load
        is tried again every L{LOAD_RETRY} seconds) or the store is stopped.
        """
        if self.loaded:
            return defer.succeed(None)
        if not self.running:
            return defer.fail(DatabaseUnavailable("the virtual key store is not running"))
        if not self._loading and self._load_error is not None:
            return defer.fail(DatabaseUnavailable(self._load_error))
        d: defer.Deferred = defer.Deferred()
        self._load_waiters.append(d)
        return d

    def _load(self) -> None:
        self._retry = None
        if not self.running:
            return
        self._loading = True
        started = self._begin_read()
        since = self._clock.seconds() - self.expired_retention
        d = self._writes.run(self._read_all, since)
        d.addBoth(self._loaded, started)

    def _read_all(self, since: float) -> defer.Deferred:
        if self._after is None:
            return self.database.run(key_rows.load, since)
        return defer.maybeDeferred(self._after).addCallback(lambda _: self.database.run(key_rows.load, since))

    def _loaded(self, result: Any, started: int) -> None:
        self._loading = False
        try:
            if isinstance(result, Failure):
                self._load_error = result.getErrorMessage()
                if not result.check(DatabaseUnavailable):
                    _log.failure("virtual keys: loading the keys failed", result)
                _log.error("virtual keys: cannot load the keys ({error}); trying again in {delay} s",
                           error=self._load_error, delay=LOAD_RETRY)
                self._fail_load_waiters(self._load_error)
                if self.running:
                    self._retry = self._reactor.callLater(LOAD_RETRY, self._load)
                return
            keys, teams = result
            self._sync(keys, teams, started)
        finally:
            self._end_read(started)
        self.loaded = True
        self._load_error = None
        waiters, self._load_waiters = self._load_waiters, []
        for waiter in waiters:
            waiter.callback(None)
        _log.info("virtual keys: {count} live keys loaded", count=len(self._keys))

    def _fail_load_waiters(self, reason: str) -> None:
        waiters, self._load_waiters = self._load_waiters, []
        for waiter in waiters:
            waiter.errback(DatabaseUnavailable(reason))

    # -- reads (memory only)

    def lookup(self, key: str) -> VirtualKey | None:
        """
        The hot path: the key presented by a client, if it is a live,
        unblocked, unexpired virtual key (expiry to the second against the
        clock); else L{None}.  A hash and a dict lookup.
        """
        if not looks_like_virtual_key(key):
            return None
        found = self._keys.get(hash_key(key))
        if found is None or found.blocked:
            return None
        if found.expires is not None and self._clock.seconds() >= found.expires:
            return None
        return found

    def status(self, key: str) -> str:
        """
        Why L{lookup} refused (or not), for error messages only:
        C{valid}, C{unknown} (malformed, never issued, deleted or long
        expired), C{expired}, C{blocked}, or C{unchecked}: not in memory,
        and the database must be asked first (L{lookup_stored}).
        """
        if not looks_like_virtual_key(key):
            return "unknown"
        return self.status_of(hash_key(key))

    def status_of(self, token_hash: str) -> str:
        """L{status} by the key's hash."""
        found = self._keys.get(token_hash)
        if found is None:
            if not self.running or token_hash in self._tombstones:
                return "unknown"
            if not self.loaded:
                return "unchecked"
            if self.shared and not self.misses.known_absent(token_hash):
                return "unchecked"
            return "unknown"
        if found.blocked:
            return "blocked"
        if found.expired(self._clock.seconds()):
            return "expired"
        return "valid"

    def lookup_stored(self, token_hash: str) -> defer.Deferred:
        """
        The miss path: fires with the usable key of this hash, or None,
        once the store is loaded and, in a shared store, once the database
        was asked about a hash memory does not have.  Fails with
        L{DatabaseUnavailable} or L{LookupsBusy} when it cannot tell.
        """

        def loaded(_: Any) -> Any:
            if (
                not self.shared
                or token_hash in self._keys
                or token_hash in self._tombstones
                or token_hash in self._pending
            ):
                return self._usable(token_hash)
            return self.misses.get(token_hash).addCallback(lambda _: self._usable(token_hash))

        return self.when_loaded().addCallback(loaded)

    def _usable(self, token_hash: str) -> VirtualKey | None:
        found = self._keys.get(token_hash)
        if found is None or not found.usable(self._clock.seconds()):
            return None
        return found

    def get(self, token_hash: str) -> VirtualKey | None:
        """The key with this hash, expired and blocked included; L{None} when deleted or unknown."""
        return self._keys.get(token_hash)

    def find_alias(self, key_alias: str) -> VirtualKey | None:
        """The live key with this alias (aliases are unique among live keys)."""
        token_hash = self._aliases.get(key_alias)
        return None if token_hash is None else self._keys.get(token_hash)

    def __len__(self) -> int:
        return len(self._keys)


    def list(
        self,
        team_id: str | None = None,
        user_id: str | None = None,
        page: int = 1,
        size: int = 10,
        key_alias: str | None = None,
        organization_id: str | None = None,
        token_hash: str | None = None,
    ) -> KeyPage:
        """
        Live keys (expired and blocked included), filtered, newest first
        (then by hash, so pages are stable), one page of C{size}.
        """
        if page < 1:
            raise ValueError("page must be at least 1")
        if size < 1:
            raise ValueError("size must be at least 1")
        matching = [
            vk
            for vk in self._keys.values()
            if (team_id is None or vk.team_id == team_id)
            and (user_id is None or vk.user_id == user_id)
            and (key_alias is None or vk.key_alias == key_alias)
            and (organization_id is None or vk.organization_id == organization_id)
            and (token_hash is None or vk.token_hash == token_hash)
        ]
        total = len(matching)
        start = (page - 1) * size
        # Only the pages up to this one are ordered: O(n log(page * size)).
        newest = heapq.nlargest(start + size, matching, key=lambda vk: (vk.created_at, vk.token_hash))
        return KeyPage(
            keys=tuple(newest[start : start + size]),
            total_count=total,
            current_page=page,
            total_pages=-(-total // size),
        )

    # -- other instances' changes

    def reload_key(self, token_hash: str | None) -> defer.Deferred:
        """
        Re-read one key (None: every key) after another instance changed
        it: a key deleted, blocked or expired elsewhere is refused here
        from then on.  Fires with the key as memory now has it (or None).
        """
        if not self.running:
            return defer.succeed(None)
        if token_hash is None:
            return self.reload_all()
        self.misses.forget(token_hash)
        started = self._begin_read()
        since = self._clock.seconds() - self.expired_retention
        d = self.database.run(key_rows.fetch, [token_hash], since)

        def apply(found: dict[str, VirtualKey]) -> VirtualKey | None:
            self._apply(token_hash, found.get(token_hash), started)
            return self._keys.get(token_hash)

        return d.addCallback(apply).addBoth(self._read_ended, started)

    def reload_team(self, team_id: str | None) -> defer.Deferred:
        """Re-read one team's settings (None: every team's) after another instance changed them."""
        if not self.running:
            return defer.succeed(None)
        if team_id is None:
            return self.reload_all()
        started = self._begin_read()
        d = self.database.run(key_rows.fetch_teams, [team_id])

        def apply(found: dict[str, dict]) -> dict[str, str]:
            self._apply_team(team_id, found.get(team_id), started)
            return self.team_aliases(team_id)

        return d.addCallback(apply).addBoth(self._read_ended, started)

    def reload_all(self) -> defer.Deferred:
        """Re-read every key and team: memory becomes what the database has."""
        if not self.running:
            return defer.succeed(None)
        started = self._begin_read()
        since = self._clock.seconds() - self.expired_retention
        d = self.database.run(key_rows.load, since)
        d.addCallback(lambda result: self._sync(result[0], result[1], started))
        return d.addBoth(self._read_ended, started)

    def _read_misses(self, hashes: builtins.list[str]) -> defer.Deferred:
        """C{MissLookups}' fetch: the live keys among C{hashes}, put in memory."""
        started = self._begin_read()
        since = self._clock.seconds() - self.expired_retention
        d = self.database.run(key_rows.fetch, hashes, since)

        def apply(found: dict[str, VirtualKey]) -> dict[str, VirtualKey]:
            for token_hash, vk in found.items():
                self._apply(token_hash, vk, started)
            return found

        return d.addCallback(apply).addBoth(self._read_ended, started)

    # -- reads racing writes

    def _begin_read(self) -> int:
        self._epoch += 1
        self._reads[self._epoch] += 1
        return self._epoch

    def _end_read(self, started: int) -> None:
        self._reads[started] -= 1
        if self._reads[started] <= 0:
            del self._reads[started]
        if not self._reads:
            self._stamps.clear()  # every later read starts after every stamp
        elif len(self._stamps) > _STAMPS_KEPT:
            # Reads never all end under a steady flow of misses: forget the
            # stamps no read in flight can be older than.
            oldest = min(self._reads)
            self._stamps = {subject: at for subject, at in self._stamps.items() if at > oldest}

    def _read_ended(self, result: Any, started: int) -> Any:
        self._end_read(started)
        return result

    def _stamp_write(self, subject: str) -> None:
        # Only reads in flight can be older than this change.
        if self._reads:
            self._epoch += 1
            self._stamps[subject] = self._epoch

    def _fresh(self, subject: str, started: int) -> bool:
        """
        Whether a read that began at C{started} may replace memory's
        C{subject}: no write of it pending, and nothing changed it since
        (a local write, or a read that began later).
        """
        return subject not in self._pending and self._stamps.get(subject, 0) <= started

    def _apply(self, token_hash: str, vk: VirtualKey | None, started: int) -> None:
        if not self._fresh(token_hash, started):
            return
        current = self._keys.get(token_hash)
        if vk is None:
            if current is not None:
                self._remove(current)
        elif token_hash not in self._tombstones and current != vk:
            if current is not None:
                self._remove(current)
            self._put(vk)
        self._stamps[token_hash] = max(self._stamps.get(token_hash, 0), started)

    def _apply_team(self, team_id: str, aliases: dict | None, started: int) -> None:
        subject = "team:" + team_id
        if not self._fresh(subject, started):
            return
        if aliases:
            self._team_aliases[team_id] = aliases
        else:
            self._team_aliases.pop(team_id, None)
        self._stamps[subject] = max(self._stamps.get(subject, 0), started)

    def _sync(self, keys: builtins.list[VirtualKey], teams: dict[str, dict], started: int) -> None:
        """Memory becomes a whole read's keys and teams (but for what changed since it began)."""
        found = {vk.token_hash: vk for vk in keys}
        for token_hash in [h for h in self._keys if h not in found]:
            self._apply(token_hash, None, started)
        for token_hash, vk in found.items():
            self._apply(token_hash, vk, started)
        for team_id in [t for t in self._team_aliases if t not in teams]:
            self._apply_team(team_id, None, started)
        for team_id, aliases in teams.items():
            self._apply_team(team_id, aliases, started)

    # -- writes

    def create(self, *, key: str | None = None, **fields: Any) -> defer.Deferred:
        """
        Mint a key (or take the caller's C{key}, which must look like one).
        Fires with C{(key, VirtualKey)} once committed; the clear key is
        nowhere else.  C{fields} are those of a C{/key/generate} body,
        checked as L{validate_key_fields} does.

        @raise InvalidField: a bad argument.
        @raise DuplicateKey: C{key} or C{key_alias} is taken (also as the
            Deferred's failure, when another instance has it).
        @raise StoreClosed: the store is not running.
        """
        self._check_open()
        fields = validate_key_fields(fields, update=False)
        if key is None:
            key = generate_key()
        elif not looks_like_virtual_key(key):
            raise InvalidField(
                "key", f"'key' must be '{KEY_PREFIX}' and {MIN_KEY_BODY} to {MAX_KEY_BODY} URL-safe characters"
            )
        token_hash = hash_key(key)
        if token_hash in self._keys:
            raise DuplicateKey("key", "this key already exists")
        alias = fields["key_alias"]
        if alias is not None and alias in self._aliases:
            raise DuplicateKey("key_alias", f"a key with the alias {alias!r} already exists")
        now = self._clock.seconds()
        expires = None
        if fields["duration"] is not None:
            expires = now + parse_duration(fields["duration"], now)
        values = {name: fields[name] for name in KEY_FIELDS if name != "duration"}
        vk = VirtualKey(
            token_hash=token_hash,
            key_name=key_name_of(key),
            created_at=now,
            updated_at=now,
            expires=expires,
            budget_anchor=now,
            extra=fields["extra"],
            **values,
        )
        self._put(vk)
        self.misses.forget(token_hash)
        d = self._write([token_hash], key_rows.insert, vk, self._alias_bound(now), self.instance, now)

        def stored(_: Any) -> tuple[str, VirtualKey]:
            _log.info(
                "virtual key {token} created (team {team_id}, user {user_id})",
                token=token_hash[:12],
                team_id=vk.team_id,
                user_id=vk.user_id,
            )
            return key, vk

        def failed(failure: Failure) -> Failure:
            if self._keys.get(token_hash) is vk:
                self._remove(vk)
            if not failure.check(DuplicateKey):
                _log.error(
                    "virtual keys: could not store key {token}: {error}",
                    token=token_hash[:12],
                    error=failure.getErrorMessage(),
                )
            return failure

        return _shield(d.addCallbacks(stored, failed))

    def update(self, token_hash: str, **changes: Any) -> defer.Deferred:
        """
        Change a live key's fields (those of L{validate_key_fields} with
        C{update=True}; C{duration} sets a new expiry counted from now).
        Memory changes at once; fires with the new L{VirtualKey} once
        committed (as the database has it: another instance's change to
        other fields is kept), or fails (memory is then rolled back, unless
        a later change came).  Fails with L{KeyNotFound} when the key was
        deleted on another instance meanwhile.

        @raise KeyNotFound: no live key has this hash.
        @raise InvalidField: a bad change.
        @raise DuplicateKey: the new alias is taken by another key.
        @raise StoreClosed: the store is not running.
        """
        self._check_open()
        previous = self._keys.get(token_hash)
        if previous is None:
            raise KeyNotFound(token_hash)
        fields = validate_key_fields(changes, update=True)
        now = self._clock.seconds()
        new_values: dict[str, Any] = {}
        for name, value in fields.items():
            if name == "duration":
                new_values["expires"] = now + parse_duration(value, now)
            elif name == "extra":
                if value:
                    new_values["extra"] = key_rows.merge_extra(previous.extra, value)
            else:
                new_values[name] = value
        if "budget_duration" in new_values and new_values["budget_duration"] != previous.budget_duration:
            new_values["budget_anchor"] = now  # a new schedule counts from now
        alias = new_values.get("key_alias", previous.key_alias)
        if alias is not None and self._aliases.get(alias, token_hash) != token_hash:
            raise DuplicateKey("key_alias", f"a key with the alias {alias!r} already exists")
        vk = attrs.evolve(previous, updated_at=now, **new_values)
        self._remove(previous)
        self._put(vk)
        written = dict(new_values)
        if "extra" in written:
            written["extra"] = fields["extra"]  # merged with the stored ones in the transaction
        d = self._write([token_hash], key_rows.update, token_hash, written, now, self._alias_bound(now),
                        self.instance)

        def stored(row: VirtualKey | None) -> VirtualKey:
            if row is None:
                # Deleted by another instance before this commit.
                if self._keys.get(token_hash) is vk:
                    self._remove(vk)
                raise KeyNotFound(token_hash)
            if row == vk:
                return vk
            if self._keys.get(token_hash) is vk:
                self._remove(vk)
                self._put(row)
            return row

        def failed(failure: Failure) -> Failure:
            if failure.check(KeyNotFound):
                return failure
            if self._keys.get(token_hash) is vk:
                self._remove(vk)
                self._put(previous)
            if not failure.check(DuplicateKey):
                _log.error(
                    "virtual keys: could not update key {token}: {error}",
                    token=token_hash[:12],
                    error=failure.getErrorMessage(),
                )
            return failure

        return _shield(d.addCallback(stored).addErrback(failed))

    def delete(self, hashes: Iterable[str]) -> defer.Deferred:
        """
        Delete keys by hash: they fail at once.  Fires, once committed, with
        the hashes (in the order given, without repeats) that named a key
        live in memory or on disk: a retried delete is answered the same way
        and writes again what a failed commit did not.  If the commit fails,
        the keys stay deleted in memory (fail closed) and the Deferred fails.

        @raise StoreClosed: the store is not running.
        """
        self._check_open()
        ordered = builtins.list(dict.fromkeys(h for h in hashes if isinstance(h, str)))
        removed = []
        for token_hash in ordered:
            vk = self._keys.get(token_hash)
            if vk is not None:
                self._remove(vk)
                removed.append(token_hash)
        d = self._write(ordered, key_rows.delete, ordered, self._clock.seconds(), self.instance)

        def stored(marked: set[str]) -> builtins.list[str]:
            self._tombstones.difference_update(ordered)
            deleted = set(removed) | marked
            if deleted:
                _log.info("virtual keys: {count} keys deleted", count=len(deleted))
            return [h for h in ordered if h in deleted]

        def failed(failure: Failure) -> Failure:
            self._tombstones.update(ordered)
            _log.error(
                "virtual keys: {count} deletions are in effect but could not be stored: {error}",
                count=len(removed),
                error=failure.getErrorMessage(),
            )
            return failure

        return _shield(d.addCallbacks(stored, failed))

    def team_aliases(self, team_id: str) -> dict[str, str]:
        """A team's C{model_aliases} (empty when it has none); from memory."""
        return self._team_aliases.get(team_id, {})

    def set_team_aliases(self, team_id: str, aliases: Any) -> defer.Deferred:
        """
        Replace a team's C{model_aliases} (LiteLLM's C{/team/new} and
        C{/team/update}); in effect at once, fires once committed.

        @raise InvalidField: not a mapping of names to model names.
        """
        self._check_open()
        checked = model_aliases("model_aliases", aliases)
        previous = self._team_aliases.get(team_id)
        if checked:
            self._team_aliases[team_id] = checked
        else:
            self._team_aliases.pop(team_id, None)
        d = self._write(["team:" + team_id], key_rows.set_team, team_id, checked, self._clock.seconds(),
                        self.instance)

        def failed(failure: Failure) -> Failure:
            if self._team_aliases.get(team_id) is checked or (not checked and team_id not in self._team_aliases):
                if previous is None:
                    self._team_aliases.pop(team_id, None)
                else:
                    self._team_aliases[team_id] = previous
            _log.error("virtual keys: could not store the aliases of team {team}: {error}",
                       team=team_id, error=failure.getErrorMessage())
            return failure

        return _shield(d.addCallbacks(lambda _: checked, failed))

    def prune(self) -> int:
        """
        Drop from memory the keys that expired longer than
        C{expired_retention} ago (they stay in the database).  Runs every
        C{prune_interval}; returns how many were dropped.
        """
        bound = self._clock.seconds() - self.expired_retention
        stale = [vk for vk in self._keys.values() if vk.expires is not None and vk.expires <= bound]
        for vk in stale:
            self._remove(vk)
        return len(stale)

    # -- internals

    def _check_open(self) -> None:
        if not self.running or self._closing:
            raise StoreClosed("the virtual key store is not running")

    def _alias_bound(self, now: float) -> float:
        # An alias stays taken while its key is in memory somewhere: until
        # it has been expired for the retention period.
        return now - self.expired_retention

    def _put(self, vk: VirtualKey) -> None:
        self._keys[vk.token_hash] = vk
        if vk.key_alias is not None:
            self._aliases[vk.key_alias] = vk.token_hash

    def _remove(self, vk: VirtualKey) -> None:
        self._keys.pop(vk.token_hash, None)
        if vk.key_alias is not None and self._aliases.get(vk.key_alias) == vk.token_hash:
            del self._aliases[vk.key_alias]

    def _write(self, subjects: builtins.list[str], function: Any, *args: Any) -> defer.Deferred:
        """
        C{function(transaction, *args)} in the database once every write
        asked for before it is done.  C{subjects} (hashes, C{team:<id>})
        are pending meanwhile: no read of them replaces memory.
        """
        for subject in subjects:
            self._pending[subject] += 1
            self._stamp_write(subject)
        self._in_flight += 1
        d = self._writes.run(self.database.run, function, *args)

        def done(result: Any) -> Any:
            for subject in subjects:
                self._pending[subject] -= 1
                if self._pending[subject] <= 0:
                    del self._pending[subject]
                self._stamp_write(subject)
            self._in_flight -= 1
            if self._in_flight == 0:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    waiter.callback(None)
            return result

        return d.addBoth(done)
