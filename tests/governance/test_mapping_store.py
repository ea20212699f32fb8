"""
The model mapping store on a real SQLite file and a real PostgreSQL, with
two instances on one database as two processes of a fleet: what one sets
the other reads when the change feed delivers its row, a restart finds
every mapping, an LLM answer never replaces an operator's mapping set on
another instance, a failed write is undone in memory.
"""

from __future__ import annotations

import calendar

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cllama_tx.governance.mapping_store import MappingStore, StoreNotRunning
from cllama_tx.governance.mappings import LLM, OPERATOR, ModelMapping
from cllama_tx.store.changes import ChangeFeed
from cllama_tx.store.database import DatabaseUnavailable
from tests.identity.backends import PostgresBackend, SqliteBackend

NOW = float(calendar.timegm((2026, 11, 17, 12, 0, 0)))


def mapping(name, target, source=OPERATOR, at=NOW, confirmed=True, **detail) -> ModelMapping:
    return ModelMapping(name, target, source, at, at, at if confirmed else None, "tests", detail)


class MappingStoreMixin:
    async def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.database = await self.make_database()
        self.a = await self.store("host-a:1:aa")
        self.b = await self.store("host-b:2:bb")

    async def store(self, instance) -> MappingStore:
        store = MappingStore(self.database, self.clock, instance=instance)
        store.startService()
        self.addCleanup(store.stopService)
        await store.when_loaded()
        return store

    async def changes(self):
        return await self.database.run(
            lambda tx: tx.execute("SELECT instance, kind, subject FROM changes ORDER BY id").fetchall()
        )

    async def test_set_read_on_the_other_instance_and_deleted(self):
        heard = []
        self.b.on_change.append(heard.append)
        feed = ChangeFeed(self.database, reactor, self.b.instance)
        reloads = []
        feed.subscribe("model_mapping", lambda name: reloads.append(self.b.reload(name)))
        await feed.poll()  # finds where the feed is
        m = mapping("house-fast", "openai/gpt-4o-mini", LLM, confirmed=False, resolver_model="r/judge")
        self.assertTrue(await self.a.put(m, only_source=LLM))
        self.assertEqual(self.a.get("house-fast"), m)
        self.assertIsNone(self.b.get("house-fast"))
        await feed.poll()
        self.assertEqual(len(reloads), 1)
        await reloads[0]  # the re-read the feed's handler started
        self.assertEqual(self.b.get("house-fast"), m)
        confirmed = ModelMapping("house-fast", "openai/gpt-4o-mini", LLM, NOW, NOW + 5, NOW + 5, "tests",
                                 {"resolver_model": "r/judge"})
        await self.a.put(confirmed)
        await self.b.reload("house-fast")
        self.assertTrue(self.b.get("house-fast").confirmed)
        self.assertEqual(self.b.get("house-fast").created_at, NOW)  # same target and source: created then
        self.assertTrue(await self.a.delete("house-fast"))
        await self.b.reload("house-fast")
        self.assertIsNone(self.b.get("house-fast"))
        self.assertEqual([tuple(r) for r in await self.changes()], [("host-a:1:aa", "model_mapping", "house-fast")] * 3)
        self.assertEqual(heard, ["house-fast"] * 3)
        self.assertFalse(await self.a.delete("house-fast"))

    async def test_a_restart_finds_every_mapping(self):
        await self.a.put(mapping("a", "openai/gpt-4o"))
        await self.a.put(mapping("b/c d", "team-default", LLM, confirmed=False, prompt="cheap"))
        fresh = await self.store("host-c:3:cc")
        self.assertEqual([m.name for m in fresh.all()], ["a", "b/c d"])
        self.assertEqual(fresh.get("b/c d").detail, {"prompt": "cheap"})
        self.assertEqual(fresh.get("a"), mapping("a", "openai/gpt-4o"))

    async def test_an_llm_answer_never_replaces_an_operators_mapping(self):
        await self.a.put(mapping("x", "openai/gpt-4o"))
        # Here first: refused at once.
        self.assertFalse(await self.a.put(mapping("x", "openai/gpt-4o-mini", LLM), only_source=LLM))
        self.assertEqual(self.a.get("x").source, OPERATOR)
        # Set on another instance meanwhile: refused by the database, and read.
        self.assertFalse(await self.b.put(mapping("x", "openai/gpt-4o-mini", LLM), only_source=LLM))
        await self.b.reload("x")
        self.assertEqual((self.b.get("x").source, self.b.get("x").target), (OPERATOR, "openai/gpt-4o"))
        # An operator's mapping replaces the resolver's.
        await self.a.put(mapping("y", "openai/gpt-4o-mini", LLM))
        await self.b.put(mapping("y", "openai/gpt-4o", OPERATOR, at=NOW + 1))
        await self.a.reload("y")
        self.assertEqual((self.a.get("y").source, self.a.get("y").created_at), (OPERATOR, NOW + 1))

    async def test_a_failed_write_is_undone_in_memory(self):
        await self.a.put(mapping("x", "openai/gpt-4o"))
        await self.make_unavailable(self.database)
        with self.assertRaises(DatabaseUnavailable):
            await self.a.put(mapping("x", "openai/gpt-4o-mini"))
        self.assertEqual(self.a.get("x").target, "openai/gpt-4o")
        with self.assertRaises(DatabaseUnavailable):
            await self.a.delete("x")
        self.assertEqual(self.a.get("x").target, "openai/gpt-4o")
        await self.make_available(self.database)

    async def test_a_stopped_store_changes_nothing(self):
        await self.a.stopService()
        with self.assertRaises(StoreNotRunning):
            self.a.put(mapping("x", "openai/gpt-4o"))
        with self.assertRaises(StoreNotRunning):
            self.a.delete("x")


class SqliteMappingStoreTests(MappingStoreMixin, SqliteBackend, TestCase):
    pass


class PostgresMappingStoreTests(MappingStoreMixin, PostgresBackend, TestCase):
    pass
