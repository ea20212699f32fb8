"""One write transaction: committed, rolled back on error, DatabaseBusy when the lock is taken."""

import os
import sqlite3

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.store.sqlite_tx import DatabaseBusy, transaction


class TransactionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(self.mktemp(), "t.db")
        os.makedirs(os.path.dirname(self.path))
        self.conn = sqlite3.connect(self.path, isolation_level=None, timeout=0)
        self.addCleanup(self.conn.close)
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("CREATE TABLE t (x INTEGER)")

    def rows(self):
        return [x for (x,) in self.conn.execute("SELECT x FROM t ORDER BY x")]

    def test_commits_and_returns(self) -> None:
        self.assertEqual(transaction(self.conn, lambda c: c.execute("INSERT INTO t VALUES (1)").rowcount), 1)
        self.assertEqual(self.rows(), [1])

    def test_rolls_back_what_failed(self) -> None:
        def body(c):
            c.execute("INSERT INTO t VALUES (2)")
            raise ValueError("no")

        self.assertRaises(ValueError, transaction, self.conn, body)
        self.assertFalse(self.conn.in_transaction)
        self.assertEqual(self.rows(), [])

    def test_busy_when_another_connection_writes(self) -> None:
        other = sqlite3.connect(self.path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        error = self.assertRaises(DatabaseBusy, transaction, self.conn, lambda c: None)
        self.assertIsInstance(error, sqlite3.OperationalError)  # callers catching sqlite errors still do
        self.assertEqual(error.done, [])
        other.execute("ROLLBACK")
        transaction(self.conn, lambda c: c.execute("INSERT INTO t VALUES (3)"))
        self.assertEqual(self.rows(), [3])
