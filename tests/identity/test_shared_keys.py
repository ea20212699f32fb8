"""
Virtual keys shared by several instances: two L{VirtualKeyStore}s on one
database, as two processes of a fleet, on SQLite and on a real PostgreSQL.
A key minted on one is honoured by the other at once (its miss path reads
the database), a change made on one reaches the other through
C{reload_key} / C{reload_team} (what the change feed calls), misses are
coalesced, batched, bounded and remembered, and a database that cannot be
read makes a miss a 503, never a 401.
"""

from __future__ import annotations

import calendar

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers

from cllama_tx.identity.authenticate import KeyNotChecked, identify, identify_stored
from cllama_tx.identity.key_model import DuplicateKey
from cllama_tx.identity.lookups import LookupsBusy
from cllama_tx.identity.principals import KeyPrincipal
from cllama_tx.identity.virtual_keys import KeyNotFound, VirtualKeyStore, hash_key
from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.surfaces.errors import ProxyError
from tests.identity.backends import PostgresBackend, SqliteBackend
from tests.secret_scan import SCANNER

NOW = float(calendar.timegm((2026, 11, 17, 12, 0, 0)))


async def retried(attempt, tries=10):
    """
    C{attempt()} until it is not a 503: a pool's connections that the
    outage ended are each found broken (and replaced) on their next use.
    """
    for _ in range(tries - 1):
        try:
            return await attempt()
        except ProxyError as error:
            if error.status != 503:
                raise
    return await attempt()


def bearer(key: str) -> Headers:
    return Headers({b"authorization": [b"Bearer " + key.encode()]})


class SharedKeysMixin:
    async def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.database = await self.make_database()
        self.a = await self.store("host-a:1:aa")
        self.b = await self.store("host-b:2:bb")

    async def store(self, instance, **kwargs) -> VirtualKeyStore:
        store = VirtualKeyStore(self.database, self.clock, reactor, shared=True, instance=instance, **kwargs)
        store.startService()
        self.addCleanup(store.stopService)
        await store.when_loaded()
        return store

    async def create(self, store, **fields):
        key, vk = await store.create(**fields)
        SCANNER.register(key)
        return key, vk

    def changes(self):
        return self.database.run(
            lambda tx: [tuple(r) for r in tx.execute("SELECT instance, kind, subject FROM changes ORDER BY id").fetchall()]
        )

    async def test_a_key_minted_elsewhere_is_honoured_at_once(self):
        key, vk = await self.create(self.a, team_id="org-1", user_id="session-1", max_budget=2)
        token_hash = vk.token_hash
        # Not in B's memory: the hot path cannot say, and says so.
        self.assertIsNone(self.b.lookup(key))
        self.assertEqual(self.b.status(key), "unchecked")
        with self.assertRaises(KeyNotChecked) as caught:
            identify(bearer(key), None, self.b)
        self.assertEqual((caught.exception.status, caught.exception.token_hash), (401, token_hash))
        self.assertNotIn(key, repr(caught.exception))
        principal = await identify_stored(self.b, caught.exception)
        self.assertIsInstance(principal, KeyPrincipal)
        self.assertEqual(principal.key, vk)
        # From then on B answers from memory, synchronously.
        self.assertEqual(self.b.lookup(key), vk)
        self.assertIsInstance(identify(bearer(key), None, self.b), KeyPrincipal)
        self.assertEqual(self.b.misses.queries, 1)

    async def test_the_single_process_never_asks(self):
        alone = await self.store("host-c:3:cc")
        alone.shared = False
        key, _ = await self.create(self.a)
        self.assertEqual(alone.status(key), "unknown")
        with self.assertRaises(ProxyError) as caught:
            identify(bearer(key), None, alone)
        self.assertNotIsInstance(caught.exception, KeyNotChecked)
        self.assertEqual(alone.misses.queries, 0)

    async def test_every_write_records_its_change(self):
        key, vk = await self.create(self.a)
        await self.a.update(vk.token_hash, max_budget=3)
        await self.a.set_team_aliases("org-9", {"fast": "openai/gpt-4o-mini"})
        await self.a.delete([vk.token_hash])
        self.assertEqual(
            await self.changes(),
            [
                ("host-a:1:aa", "virtual_key", vk.token_hash),
                ("host-a:1:aa", "virtual_key", vk.token_hash),
                ("host-a:1:aa", "team", "org-9"),
                ("host-a:1:aa", "virtual_key", vk.token_hash),
            ],
        )
        # A failed write leaves no change behind.
        with self.assertRaises(DuplicateKey):
            await self.b.create(key=key)
        self.assertEqual(len(await self.changes()), 4)

    async def test_a_delete_elsewhere_is_refused_after_reload(self):
        key, vk = await self.create(self.a)
        await self.b.lookup_stored(vk.token_hash)
        self.assertEqual(self.b.lookup(key), vk)
        self.assertEqual(await self.a.delete([vk.token_hash]), [vk.token_hash])
        self.assertIsNone(await self.b.reload_key(vk.token_hash))
        self.assertIsNone(self.b.lookup(key))
        self.assertIsNone(self.b.get(vk.token_hash))
        # Asked again (the hash is not remembered as present), still refused.
        self.assertIsNone(await self.b.lookup_stored(vk.token_hash))
        self.assertEqual(self.b.status(key), "unknown")

    async def test_a_block_or_expiry_elsewhere_is_refused_after_reload(self):
        key, vk = await self.create(self.a, duration="1h")
        other, other_vk = await self.create(self.a)
        for token_hash in (vk.token_hash, other_vk.token_hash):
            await self.b.lookup_stored(token_hash)
        await self.a.update(other_vk.token_hash, blocked=True)
        await self.a.update(vk.token_hash, duration="30s")
        await self.b.reload_key(other_vk.token_hash)
        await self.b.reload_key(vk.token_hash)
        self.assertIsNone(self.b.lookup(other))
        self.assertEqual(self.b.status(other), "blocked")
        self.assertIsNotNone(self.b.lookup(key))
        self.clock.advance(30)
        self.assertIsNone(self.b.lookup(key))
        self.assertEqual(self.b.status(key), "expired")

    async def test_an_update_keeps_what_another_instance_changed(self):
        key, vk = await self.create(self.a, max_budget=1)
        await self.b.lookup_stored(vk.token_hash)
        await self.a.update(vk.token_hash, blocked=True)
        # B has not reloaded: its update of another field must not unblock the key.
        updated = await self.b.update(vk.token_hash, max_budget=5)
        self.assertEqual((updated.max_budget, updated.blocked), (5.0, True))
        self.assertIsNone(self.b.lookup(key))
        fresh = await self.a.reload_key(vk.token_hash)
        self.assertEqual((fresh.max_budget, fresh.blocked), (5.0, True))

    async def test_an_update_of_a_key_deleted_elsewhere_fails(self):
        key, vk = await self.create(self.a)
        await self.b.lookup_stored(vk.token_hash)
        await self.a.delete([vk.token_hash])
        d = self.b.update(vk.token_hash, max_budget=5)
        self.assertIsNotNone(self.b.lookup(key))  # memory first ...
        with self.assertRaises(KeyNotFound):
            await d
        self.assertIsNone(self.b.get(vk.token_hash))  # ... until the database says otherwise

    async def test_an_alias_is_unique_across_instances(self):
        _, first = await self.create(self.a, key_alias="session-1")
        d = self.b.create(key_alias="session-1")  # B's memory does not know it
        with self.assertRaises(DuplicateKey) as caught:
            await d
        self.assertEqual(caught.exception.field, "key_alias")
        self.assertIsNone(self.b.find_alias("session-1"))
        self.assertEqual(len(self.b), 0)
        _, second = await self.create(self.b, key_alias="session-2")
        with self.assertRaises(DuplicateKey):
            await self.a.update(first.token_hash, key_alias="session-2")
        self.assertEqual(self.a.get(first.token_hash).key_alias, "session-1")  # rolled back
        await self.a.delete([first.token_hash])
        await self.create(self.b, key_alias="session-1")  # free again

    async def test_team_aliases_reach_the_other_instance(self):
        await self.a.set_team_aliases("org-1", {"smart": "openai/o3"})
        self.assertEqual(self.b.team_aliases("org-1"), {})
        self.assertEqual(await self.b.reload_team("org-1"), {"smart": "openai/o3"})
        await self.a.set_team_aliases("org-1", None)
        self.assertEqual(await self.b.reload_team("org-1"), {})

    async def test_reload_all(self):
        key, vk = await self.create(self.a)
        gone, gone_vk = await self.create(self.a)
        await self.b.lookup_stored(gone_vk.token_hash)
        await self.a.delete([gone_vk.token_hash])
        await self.a.set_team_aliases("org-2", {"x": "openai/gpt-4o"})
        await self.b.reload_all()
        self.assertEqual(self.b.lookup(key), vk)
        self.assertIsNone(self.b.lookup(gone))
        self.assertEqual(self.b.team_aliases("org-2"), {"x": "openai/gpt-4o"})

    async def test_a_slow_read_never_undoes_a_newer_change(self):
        key, vk = await self.create(self.a)
        await self.b.lookup_stored(vk.token_hash)
        reading = self.b.reload_key(vk.token_hash)  # reads the key as it is now ...
        deleting = self.b.delete([vk.token_hash])  # ... and B deletes it meanwhile
        await reading
        self.assertIsNone(self.b.lookup(key))
        await deleting
        self.assertIsNone(self.b.lookup(key))

    async def test_unknown_keys_are_asked_once_and_remembered(self):
        unknown = "sk-" + "u" * 43
        token_hash = hash_key(unknown)
        results = await defer.gatherResults([self.b.lookup_stored(token_hash) for _ in range(20)])
        self.assertEqual(results, [None] * 20)
        self.assertEqual(self.b.misses.queries, 1)  # coalesced
        self.assertEqual(self.b.status(unknown), "unknown")  # remembered: no second query
        with self.assertRaises(ProxyError) as caught:
            identify(bearer(unknown), None, self.b)
        self.assertNotIsInstance(caught.exception, KeyNotChecked)
        self.assertIsNone(await self.b.lookup_stored(token_hash))
        self.assertEqual(self.b.misses.queries, 1)
        self.clock.advance(1.0)  # a second later it may have been minted
        self.assertEqual(self.b.status(unknown), "unchecked")
        self.assertIsNone(await self.b.lookup_stored(token_hash))
        self.assertEqual(self.b.misses.queries, 2)

    async def test_a_key_created_after_a_miss_is_found(self):
        chosen = "sk-" + "c" * 43
        SCANNER.register(chosen)
        token_hash = hash_key(chosen)
        self.assertIsNone(await self.b.lookup_stored(token_hash))
        _, vk = await self.a.create(key=chosen)
        self.assertEqual(self.b.status(chosen), "unknown")  # remembered absent ...
        await self.b.reload_key(token_hash)  # ... until the change feed says it changed
        self.assertEqual(self.b.lookup(chosen), vk)

    async def test_many_unknown_keys_make_few_queries(self):
        hashes = [hash_key(f"sk-{i:043d}") for i in range(200)]
        results = await defer.gatherResults([self.b.lookup_stored(h) for h in hashes])
        self.assertEqual(results, [None] * 200)
        # At most 4 at once, 64 to a query: the first 4 alone, then batches.
        self.assertLessEqual(self.b.misses.queries, 4 + 4)
        self.assertEqual(self.b.misses.running, 0)

    async def test_a_flood_past_the_backlog_is_refused_as_busy(self):
        bounded = await self.store("host-d:4:dd", miss_concurrency=1, miss_backlog=8)
        hashes = [hash_key(f"sk-{i:043d}") for i in range(20)]
        outcomes = await defer.DeferredList([bounded.lookup_stored(h) for h in hashes], consumeErrors=True)
        busy = [r for ok, r in outcomes if not ok]
        self.assertTrue(all(f.check(LookupsBusy) for f in busy))
        self.assertEqual(len(busy), 20 - 1 - 8)  # one being read, eight waiting
        with self.assertRaises(ProxyError) as caught:
            await identify_stored(bounded, KeyNotChecked(401, "invalid_api_key", "x", token_hash=hashes[0]))
        # Remembered absent by now: a plain 401.
        self.assertEqual(caught.exception.status, 401)
        flood = [bounded.lookup_stored(hash_key(f"sk-{i:043d}x")) for i in range(9)]
        with self.assertRaises(ProxyError) as caught:
            await identify_stored(bounded, KeyNotChecked(401, "invalid_api_key", "x", token_hash="f" * 64))
        self.assertEqual((caught.exception.status, caught.exception.code), (503, "store_unavailable"))
        await defer.DeferredList(flood, consumeErrors=True)

    async def test_an_unavailable_database_on_a_miss_is_a_503(self):
        key, vk = await self.create(self.a)
        known, known_vk = await self.create(self.a)
        await self.b.lookup_stored(known_vk.token_hash)
        await self.make_unavailable(self.database)
        with self.assertRaises(KeyNotChecked) as caught:
            identify(bearer(key), None, self.b)
        with self.assertRaises(ProxyError) as refused:
            await identify_stored(self.b, caught.exception)
        error = refused.exception
        self.assertEqual((error.status, error.code, error.retry_after), (503, "store_unavailable", 1))
        self.assertIsNone(self.b.lookup(key))
        # A key already in memory still works: the hot path reads no database.
        self.assertEqual(self.b.lookup(known), known_vk)
        with self.assertRaises(DatabaseUnavailable):
            await self.b.create()
        self.flushLoggedErrors()
        await self.make_available(self.database)
        principal = await retried(lambda: identify_stored(self.b, caught.exception))
        self.assertEqual(principal.key, vk)

    async def test_a_store_still_loading_waits_instead_of_refusing(self):
        key, vk = await self.create(self.a)
        fresh = VirtualKeyStore(self.database, self.clock, reactor, shared=False, instance="host-e:5:ee")
        fresh.startService()
        self.addCleanup(fresh.stopService)
        self.assertFalse(fresh.loaded)
        self.assertEqual(fresh.status(key), "unchecked")  # even in a single process
        with self.assertRaises(KeyNotChecked) as caught:
            identify(bearer(key), None, fresh)
        principal = await identify_stored(fresh, caught.exception)
        self.assertEqual(principal.key, vk)
        self.assertTrue(fresh.loaded)
        self.assertEqual(fresh.misses.queries, 0)


class SqliteSharedKeysTests(SqliteBackend, SharedKeysMixin, TestCase):
    pass


class PostgresSharedKeysTests(PostgresBackend, SharedKeysMixin, TestCase):
    pass
