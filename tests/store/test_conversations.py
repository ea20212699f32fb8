"""
Responses conversations kept in the shared store (L{cllama_tx.store.conversations}):
a follow-up turn finds its conversation on another instance, within the bounds,
on PostgreSQL and on the SQLite state file.
"""

from __future__ import annotations

import os
import tempfile

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from cllama_tx.store.conversations import SharedConversations
from cllama_tx.store.database import parse_database_url
from cllama_tx.store.postgres import PostgresDatabase
from cllama_tx.store.shared import SQLITE_COORDINATION_SCHEMA
from cllama_tx.store.sqlite_database import SqliteDatabase
from cllama_tx.surfaces.responses_state import ConversationStore
from cllama_tx.testing.postgres import shared_cluster

TURN = [{"type": "message", "role": "user", "content": "hello"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi there"}]}]


class ConversationsMixin:
    @defer.inlineCallbacks
    def setUp(self):
        self.database = yield self.make_database()
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.a = SharedConversations(self.database, self.clock, ConversationStore(self.clock, max_per_agent=3))
        self.b = SharedConversations(self.database, self.clock, ConversationStore(self.clock, max_per_agent=3))

    @defer.inlineCallbacks
    def test_follow_up_found_on_another_instance(self):
        yield self.a.put("agent-1", "resp_1", TURN)
        self.assertEqual(self.a.get("agent-1", "resp_1"), TURN)  # from memory, at once
        found = yield self.b.get("agent-1", "resp_1")
        self.assertEqual(found, TURN)
        self.assertEqual(self.b.get("agent-1", "resp_1"), TURN)  # now cached there

    @defer.inlineCallbacks
    def test_only_the_agents_own(self):
        yield self.a.put("agent-1", "resp_1", TURN)
        found = yield self.b.get("agent-2", "resp_1")
        self.assertIsNone(found)

    @defer.inlineCallbacks
    def test_bounded_per_agent(self):
        for i in range(5):
            self.clock.advance(1)
            yield self.a.put("agent-1", f"resp_{i}", TURN)
        kept = yield self.database.run(lambda tx: sorted(r[0] for r in tx.execute(
            "SELECT response_id FROM responses_conversations WHERE agent = 'agent-1'").fetchall()))
        self.assertEqual(kept, ["resp_2", "resp_3", "resp_4"])

    @defer.inlineCallbacks
    def test_retention(self):
        yield self.a.put("agent-1", "resp_1", TURN)
        self.clock.advance(self.a.retention + 1)
        found = yield self.b.get("agent-1", "resp_1")
        self.assertIsNone(found)
        yield self.a.prune()
        left = yield self.database.run(lambda tx: tx.execute(
            "SELECT COUNT(*) FROM responses_conversations").fetchone()[0])
        self.assertEqual(left, 0)

    def test_too_large_kept_nowhere(self):
        small = SharedConversations(self.database, self.clock, ConversationStore(self.clock, max_agent_bytes=10))
        self.assertIs(small.put("agent-1", "resp_1", TURN), False)


class PostgresConversationsTests(ConversationsMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def make_database(self):
        database = PostgresDatabase(parse_database_url(shared_cluster().database()), reactor, threads=2)
        self.addCleanup(database.close)
        yield database.connect_and_migrate()
        return database


class SqliteConversationsTests(ConversationsMixin, unittest.TestCase):
    def make_database(self):
        path = os.path.join(tempfile.mkdtemp(), "state.sqlite3")
        database = SqliteDatabase(path, reactor, schema=lambda conn: conn.executescript(SQLITE_COORDINATION_SCHEMA))
        self.addCleanup(database.close)
        return defer.succeed(database)
