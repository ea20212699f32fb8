"""
SQLite when several worker processes share the state file (C{shared}): the
reactor commits while the lock is free and never waits for it (the writer
thread does), the WAL reset never waits for another process's reader, and a
file of schema 3 gains the instance column and the coordination tables.
Other processes are stood for by connections of our own.
"""

from __future__ import annotations

import sqlite3
import time

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher

from cllama_tx.store import writer as writer_module
from cllama_tx.store.ledger import SCHEMA_VERSION
from tests.store.test_ledger import LedgerCase, row, sql


def next_turn() -> defer.Deferred:
    return task.deferLater(reactor, 0, lambda: None)


class SharedFileTests(LedgerCase):
    async def test_commits_on_the_reactor_while_the_lock_is_free(self) -> None:
        ledger = self.open_ledger(shared=True)
        writer = ledger._writer
        self.assertIsNotNone(writer._inline)
        await defer.gatherResults([ledger.record(row(f"r{i}")) for i in range(3)])
        self.assertEqual((writer.inline_commits, writer.handed_rows), (1, 0))  # one turn, one commit
        self.assertEqual(await ledger.count(), 3)
        # The thread's connection leaves checkpoints to the background ones.
        autocheckpoint = await ledger._on_writer(lambda conn: conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
        self.assertEqual(autocheckpoint, 0)

    async def test_another_process_holding_the_lock_never_holds_the_reactor(self) -> None:
        ledger = self.open_ledger(shared=True)
        await ledger.record(row("before"))
        other = sqlite3.connect(ledger.path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")  # another worker writes, and takes its time
        recorded = ledger.record(row("waiting"))
        started = time.monotonic()
        turns = 0
        while ledger._writer.handed_rows == 0 and time.monotonic() - started < 1.0:
            await next_turn()  # the reactor turns while its tries, then the thread, wait for the lock
            turns += 1
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertGreater(turns, writer_module.BUSY_RETRIES)
        self.assertFalse(recorded.called)
        # The reactor's tries met the lock each time: the thread waits for it.
        self.assertEqual(ledger._writer.busy_retries, writer_module.BUSY_RETRIES)
        self.assertEqual(ledger._writer.handed_rows, 1)
        other.execute("ROLLBACK")
        self.assertIsNone(await recorded)
        self.assertEqual([r for (r,) in sql(ledger.path, "SELECT request_id FROM requests ORDER BY id")],
                         ["before", "waiting"])

    async def test_the_wal_reset_does_not_wait_for_another_processs_reader(self) -> None:
        self.patch(writer_module, "CHECKPOINT_EVERY", 2)
        self.patch(writer_module, "WAL_RESET_BYTES", 32 * 1024)
        ledger = self.open_ledger(shared=True)
        writer = ledger._writer
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        tried = []
        truncate = writer_module.truncate_wal

        def timed(conn, patient=True):
            started = time.monotonic()
            result = truncate(conn, patient=patient)
            tried.append((patient, result[0], time.monotonic() - started))
            return result

        self.patch(writer_module, "truncate_wal", timed)
        await ledger.record(row("first"))
        reader = sqlite3.connect(ledger.path, isolation_level=None)
        self.addCleanup(reader.close)
        reader.execute("BEGIN")
        reader.execute("SELECT COUNT(*) FROM requests").fetchone()  # a snapshot pinned in the WAL
        for turn in range(12):
            await defer.gatherResults([ledger.record(row(f"t{turn}-{i}")) for i in range(40)])
            if writer.checkpointing is not None:
                await writer.checkpointing  # and the reset it asked for
        self.assertTrue(tried, "no reset was tried")
        # One try each that waits for nothing (waiting would take RESET_PATIENCE, 2 s), busy.
        self.assertEqual({(patient, busy) for patient, busy, _ in tried}, {(False, 1)})
        self.assertLess(max(seconds for _, _, seconds in tried), 0.5)
        self.assertEqual(writer.wal_resets, 0)
        self.assertFalse([e for e in events if "could not be reset" in e.get("log_format", "")
                          and e["log_level"].name != "debug"])
        # The reader gone, the next reset empties the WAL.
        reader.execute("COMMIT")
        for turn in range(6):
            await defer.gatherResults([ledger.record(row(f"u{turn}-{i}")) for i in range(40)])
            if writer.checkpointing is not None:
                await writer.checkpointing
        self.assertGreater(writer.wal_resets, 0)
        self.assertEqual(await ledger.count(), 1 + 12 * 40 + 6 * 40)


class MigrationToFourTests(LedgerCase):
    async def test_a_version_3_file_gains_the_instance_and_the_coordination_tables(self) -> None:
        ledger = self.open_ledger()
        await ledger.record(row("old"))
        await ledger.close()
        conn = sqlite3.connect(ledger.path)
        with conn:  # what schema 3 had
            conn.execute("ALTER TABLE requests DROP COLUMN instance")
            for table in ("instances", "reservations", "rate_events", "changes"):
                conn.execute(f"DROP TABLE {table}")
            conn.execute("DROP INDEX requests_key")
            conn.execute("DROP INDEX requests_team")
            conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
        conn.close()
        reopened = self.open_ledger(ledger.path, instance="host:9:zz")
        self.assertEqual(sql(ledger.path, "SELECT value FROM meta WHERE key = 'schema_version'"),
                         [(str(SCHEMA_VERSION),)])
        tables = {name for (name,) in sql(ledger.path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.assertTrue({"instances", "reservations", "rate_events", "changes"} <= tables)
        indexes = {name for (name,) in sql(ledger.path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
        self.assertTrue({"requests_key", "requests_team"} <= indexes)
        await reopened.record(row("new"))
        self.assertEqual(sql(ledger.path, "SELECT request_id, instance FROM requests ORDER BY id"),
                         [("old", None), ("new", "host:9:zz")])
        self.assertEqual(reopened.totals().requests, 2)
