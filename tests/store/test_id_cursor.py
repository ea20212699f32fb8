"""
The follower's bookkeeping (L{cllama_tx.store.id_cursor}): ids seen out of
order are counted once each, skipped ids are kept as holes and looked for
until they show up or their patience runs out; and the read it asks for.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.store.follower import follow_reader
from cllama_tx.store.id_cursor import IdCursor


class IdCursorTests(SynchronousTestCase):
    def test_in_order(self) -> None:
        cursor = IdCursor()
        self.assertEqual(cursor.seen([1, 2, 3], now=0), [1, 2, 3])
        self.assertEqual((cursor.high, cursor.holes), (3, []))

    def test_a_skipped_id_is_a_hole_until_it_shows_up(self) -> None:
        cursor = IdCursor()
        self.assertEqual(cursor.seen([1, 2, 5], now=0), [1, 2, 5])
        self.assertEqual(cursor.holes, [3, 4])
        self.assertEqual(cursor.seen([4], now=1), [4])
        self.assertEqual(cursor.holes, [3])
        self.assertEqual(cursor.seen([3, 6], now=2), [3, 6])
        self.assertEqual((cursor.high, cursor.holes), (6, []))

    def test_each_id_counts_once(self) -> None:
        cursor = IdCursor()
        self.assertEqual(cursor.seen([2, 1, 2], now=0), [1, 2])  # duplicates and order of a read
        self.assertEqual(cursor.seen([1, 2], now=1), [])  # read again
        cursor.seen([4], now=2)
        self.assertEqual(cursor.seen([3, 3, 4], now=3), [3])

    def test_a_start_after_rows_already_counted(self) -> None:
        cursor = IdCursor(10)
        self.assertEqual(cursor.seen([9, 10], now=0), [])  # counted by the totals rebuilt at start
        self.assertEqual(cursor.seen([12], now=0), [12])
        self.assertEqual(cursor.holes, [11])

    def test_holes_expire_after_their_patience(self) -> None:
        cursor = IdCursor(patience=120)
        cursor.seen([1, 3], now=100)
        cursor.seen([6], now=150)
        self.assertEqual(cursor.expire(now=220), [])
        self.assertEqual(cursor.expire(now=221), [2])  # missing since 100: given up
        self.assertEqual(cursor.holes, [4, 5])
        self.assertEqual(cursor.given_up, 1)
        # An id given up is not counted if it shows up after all (the documented bound).
        self.assertEqual(cursor.seen([2], now=222), [])
        self.assertEqual(cursor.expire(now=271), [4, 5])
        self.assertEqual(cursor.holes, [])

    def test_at_most_limit_holes(self) -> None:
        cursor = IdCursor(limit=3)
        cursor.seen([10], now=0)
        self.assertEqual(cursor.holes, [7, 8, 9])  # the oldest ids are given up first
        self.assertEqual(cursor.given_up, 6)
        self.assertEqual(len(cursor), 3)


class Recording:
    """A connection that records the statement it is asked."""

    def __init__(self) -> None:
        self.asked: list = []

    def execute(self, statement, params):
        self.asked.append((statement, list(params)))
        return self

    def fetchall(self):
        return []


class FollowReaderTests(SynchronousTestCase):
    def test_the_read_asks_for_holes_and_what_is_new(self) -> None:
        conn = Recording()
        follow_reader("postgresql", 10, [3, 7], limit=50)(conn)
        [(statement, params)] = conn.asked
        self.assertIn("WHERE id > ? OR id = ANY(?) ORDER BY id LIMIT ?", statement)
        self.assertEqual(params, [10, [3, 7], 50])

    def test_sqlite_asks_for_the_oldest_holes_in_a_list(self) -> None:
        conn = Recording()
        follow_reader("sqlite", 1000, list(range(1, 900)), limit=50)(conn)
        [(statement, params)] = conn.asked
        self.assertEqual(statement.count("?"), 1 + 500 + 1)
        self.assertEqual(params[:3], [1000, 1, 2])
        self.assertEqual(params[-1], 50)
