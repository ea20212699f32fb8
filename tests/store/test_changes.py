"""
The change feed (L{cllama_tx.store.changes}): other instances' changes reach
the subscribed handlers, never this instance's own; ids that become visible
out of order are not skipped.
"""

from __future__ import annotations

import os
import tempfile

from twisted.internet import defer, reactor
from twisted.trial import unittest

from cllama_tx.store.changes import ChangeFeed
from cllama_tx.store.database import parse_database_url
from cllama_tx.store.postgres import PostgresDatabase
from cllama_tx.store.shared import SQLITE_COORDINATION_SCHEMA, record_change
from cllama_tx.store.sqlite_database import SqliteDatabase
from cllama_tx.testing.postgres import shared_cluster


class FeedMixin:
    @defer.inlineCallbacks
    def setUp(self):
        self.database = yield self.make_database()
        self.mine = ChangeFeed(self.database, reactor, "me")
        self.seen = []
        self.mine.subscribe("virtual_key", self.seen.append)
        self.mine.subscribe("reload", lambda subject: self.seen.append(("reload", subject)))
        yield self.mine.poll()  # finds where the feed is

    def change(self, instance, kind, subject):
        return self.database.run(record_change, instance, kind, subject, reactor.seconds())

    @defer.inlineCallbacks
    def test_others_changes_delivered_once(self):
        yield self.change("other", "virtual_key", "abc")
        yield self.change("me", "virtual_key", "mine")
        other = ChangeFeed(self.database, reactor, "other")
        yield other.publish("reload", None)
        yield self.mine.poll()
        yield self.mine.poll()
        self.assertEqual(self.seen, ["abc", ("reload", None)])

    @defer.inlineCallbacks
    def test_old_changes_not_replayed_at_start(self):
        yield self.change("other", "virtual_key", "before")
        late = ChangeFeed(self.database, reactor, "late")
        got = []
        late.subscribe("virtual_key", got.append)
        yield late.poll()
        yield self.change("other", "virtual_key", "after")
        yield late.poll()
        self.assertEqual(got, ["after"])

    def test_unknown_kind_refused(self):
        self.assertRaises(ValueError, self.mine.subscribe, "nonsense", lambda s: None)


class PostgresFeedTests(FeedMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def make_database(self):
        database = PostgresDatabase(parse_database_url(shared_cluster().database()), reactor, threads=2)
        self.addCleanup(database.close)
        yield database.connect_and_migrate()
        return database

    @defer.inlineCallbacks
    def test_out_of_order_commit_not_skipped(self):
        """A change whose id was taken first but committed last still arrives."""
        import psycopg

        slow = psycopg.connect(self.database.url.conninfo)
        self.addCleanup(slow.close)
        cursor = slow.cursor()
        cursor.execute("INSERT INTO changes (instance, kind, subject, at) VALUES ('other', 'virtual_key', 'slow', 0)")
        yield self.change("other", "virtual_key", "fast")
        yield self.mine.poll()
        self.assertEqual(self.seen, ["fast"])
        slow.commit()
        yield self.mine.poll()
        self.assertEqual(self.seen, ["fast", "slow"])


class SqliteFeedTests(FeedMixin, unittest.TestCase):
    def make_database(self):
        path = os.path.join(tempfile.mkdtemp(), "state.sqlite3")
        database = SqliteDatabase(path, reactor, schema=lambda conn: conn.executescript(SQLITE_COORDINATION_SCHEMA))
        self.addCleanup(database.close)
        return defer.succeed(database)
