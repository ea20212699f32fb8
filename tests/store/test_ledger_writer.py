"""
Where ledger rows are committed: on the reactor at the end of the turn they
were recorded in (C{sync="normal"}), on the writer thread while it owns the
database, when another process holds the write lock, or always
(C{sync="full"}); and the background checkpoint that keeps the reactor's
commits free of fsyncs.  Real files and the real reactor.
"""

from __future__ import annotations

import sqlite3

from twisted.internet import defer, reactor, task

from cllama_tx.store import writer as writer_module
from tests.store.test_ledger import LedgerCase, row, sql


def next_turn() -> defer.Deferred:
    """Fires in a later reactor turn than the one it was called in."""
    return task.deferLater(reactor, 0, lambda: None)


class InlineCommitTests(LedgerCase):
    async def test_rows_of_one_turn_commit_together_on_the_reactor(self) -> None:
        ledger = self.open_ledger()
        await ledger.record(row("warm"))
        writer = ledger._writer
        before = ledger.writer_stats()
        ds = [ledger.record(row(f"r{i}")) for i in range(5)]
        self.assertFalse(any(d.called for d in ds))  # at the end of the turn, not inside record()
        self.assertEqual(ledger.writer_stats()["queued"], 5)
        await defer.gatherResults(ds)
        stats = ledger.writer_stats()
        self.assertEqual(stats["commits"] - before["commits"], 1)
        self.assertEqual(stats["largest_batch"], 5)
        self.assertEqual(stats["queued"], 0)
        self.assertEqual(writer.inline_commits, 2)
        self.assertEqual(writer.handed_rows, 0)  # the thread committed none of them
        stored = [r for (r,) in sql(ledger.path, "SELECT request_id FROM requests ORDER BY id")]
        self.assertEqual(stored, ["warm", "r0", "r1", "r2", "r3", "r4"])

    async def test_reactor_connection_settings(self) -> None:
        ledger = self.open_ledger()
        conn = ledger._writer._inline
        pragma = lambda name: conn.execute(f"PRAGMA {name}").fetchone()[0]  # noqa: E731
        self.assertEqual(pragma("synchronous"), 1)  # NORMAL: no fsync at commit
        self.assertEqual(pragma("wal_autocheckpoint"), 0)  # checkpoints run off the reactor
        self.assertEqual(pragma("busy_timeout"), 0)  # never waits for a lock
        self.assertEqual(pragma("journal_mode"), "wal")

    async def test_bad_row_in_a_reactor_batch(self) -> None:
        ledger = self.open_ledger()
        await ledger.record(row("dup"))
        ok1, bad, ok2 = ledger.record(row("a")), ledger.record(row("dup")), ledger.record(row("b"))
        await ok1
        await self.assertFailure(bad, sqlite3.IntegrityError)
        await ok2
        self.assertEqual(await ledger.count(), 3)
        self.assertEqual(ledger.writer_stats()["failed_rows"], 1)
        self.assertEqual(ledger._writer.handed_rows, 0)

    async def test_full_sync_commits_on_the_thread(self) -> None:
        ledger = self.open_ledger(sync="full")
        writer = ledger._writer
        self.assertIsNone(writer._inline)
        await defer.gatherResults([ledger.record(row(f"r{i}")) for i in range(3)])
        self.assertEqual(writer.inline_commits, 0)
        self.assertEqual(writer.handed_rows, 3)
        self.assertEqual(await ledger.count(), 3)

    async def test_a_brief_foreign_write_lock_is_waited_for_on_the_reactor(self) -> None:
        ledger = self.open_ledger()
        await ledger.record(row("before"))
        writer = ledger._writer
        other = sqlite3.connect(ledger.path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")  # another worker commits
        first = ledger.record(row("first"))
        await next_turn()
        # The reactor did not wait for the lock, nor hand the row over: it tries again shortly.
        self.assertFalse(first.called)
        self.assertEqual(writer.busy_retries, 1)
        second = ledger.record(row("second"))  # waits with it, behind it
        other.execute("ROLLBACK")  # the other commit is done
        await defer.gatherResults([first, second])
        self.assertEqual(writer.handed_rows, 0)
        self.assertEqual(writer.inline_commits, 2)  # both in one commit
        stored = [r for (r,) in sql(ledger.path, "SELECT request_id FROM requests ORDER BY id")]
        self.assertEqual(stored, ["before", "first", "second"])

    async def test_a_long_foreign_write_lock_sends_rows_to_the_thread(self) -> None:
        ledger = self.open_ledger()
        await ledger.record(row("before"))
        writer = ledger._writer
        other = sqlite3.connect(ledger.path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")  # another process writes, and takes its time
        first = ledger.record(row("first"))
        while writer.handed_rows == 0:
            await task.deferLater(reactor, writer_module.BUSY_RETRY_SECONDS, lambda: None)
        # After its tries on the reactor the row went to the thread, which waits for the lock.
        self.assertEqual(writer.busy_retries, writer_module.BUSY_RETRIES)
        self.assertEqual(writer.handed_rows, 1)
        self.assertFalse(first.called)
        second = ledger.record(row("second"))  # follows it there, in order
        self.assertEqual(writer.handed_rows, 2)
        other.execute("ROLLBACK")
        await defer.gatherResults([first, second])
        # The database is the reactor's again.
        await ledger.record(row("after"))
        self.assertEqual(writer.handed_rows, 2)
        self.assertEqual(writer.inline_commits, 2)
        stored = [r for (r,) in sql(ledger.path, "SELECT request_id FROM requests ORDER BY id")]
        self.assertEqual(stored, ["before", "first", "second", "after"])

    async def test_an_operator_write_never_overtakes_rows_waiting_for_the_lock(self) -> None:
        ledger = self.open_ledger()
        await ledger.record(row("before"))
        writer = ledger._writer
        other = sqlite3.connect(ledger.path, isolation_level=None)
        self.addCleanup(other.close)
        other.execute("BEGIN IMMEDIATE")
        first = ledger.record(row("first"))
        await next_turn()
        self.assertEqual(writer.busy_retries, 1)
        # A write for the thread: the waiting row goes to the thread ahead of it.
        seen: defer.Deferred = defer.Deferred()
        read = lambda conn: [r for (r,) in conn.execute("SELECT request_id FROM requests ORDER BY id")]  # noqa: E731
        writer.call(writer_module.Call(read, seen))
        self.assertEqual(writer.handed_rows, 1)
        other.execute("ROLLBACK")
        self.assertEqual(await seen, ["before", "first"])
        await first

    async def test_rows_wait_for_a_call_on_the_thread(self) -> None:
        ledger = self.open_ledger()
        gate, held = self.hold_writer(ledger)
        d = ledger.record(row("queued"))
        await next_turn()
        self.assertFalse(d.called)
        self.assertEqual(ledger._writer.handed_rows, 1)
        gate.set()
        await held
        await d
        self.assertEqual(await ledger.count(), 1)

    async def test_background_checkpoint(self) -> None:
        self.patch(writer_module, "CHECKPOINT_EVERY", 3)
        ledger = self.open_ledger()
        writer = ledger._writer
        for i in range(3):
            await ledger.record(row(f"r{i}"))  # three turns, three commits
        self.assertIsNotNone(writer.checkpointing)
        await writer.checkpointing
        self.assertEqual(writer.checkpoints, 1)
        busy, wal_frames, copied = writer.last_checkpoint
        self.assertEqual(busy, 0)
        self.assertGreater(wal_frames, 0)
        self.assertEqual(copied, wal_frames)  # the whole WAL is in the database file
        await ledger.record(row("r3"))
        self.assertIsNone(writer.checkpointing)  # the count starts again
        self.assertEqual(await ledger.count(), 4)


class WalBoundTests(LedgerCase):
    """The WAL is emptied once it passed a size: it does not grow without limit under steady writes."""

    async def test_a_large_wal_is_emptied_on_the_thread(self) -> None:
        self.patch(writer_module, "CHECKPOINT_EVERY", 3)
        self.patch(writer_module, "WAL_RESET_BYTES", 64 * 1024)
        ledger = self.open_ledger()
        writer = ledger._writer
        for turn in range(3):
            await defer.gatherResults([ledger.record(row(f"t{turn}-{i}")) for i in range(100)])
        self.assertGreater(writer_module.wal_size(ledger.path), 64 * 1024)
        checkpointing = writer.checkpointing
        self.assertIsNotNone(checkpointing)
        await checkpointing
        self.assertEqual(writer.wal_resets, 1)
        self.assertEqual(writer_module.wal_size(ledger.path), 0)  # TRUNCATE: emptied
        self.assertEqual(ledger.writer_stats()["wal_bytes"], 0)
        self.assertEqual(await ledger.count(), 300)

    async def test_steady_writes(self) -> None:
        # Rows keep coming while each PASSIVE checkpoint runs: it never
        # catches up with the end of the WAL, so SQLite never starts the
        # WAL over by itself (without the reset it grows to megabytes here).
        # Bound: twice the reset size, plus what CHECKPOINT_EVERY commits add.
        self.patch(writer_module, "CHECKPOINT_EVERY", 2)
        self.patch(writer_module, "WAL_RESET_BYTES", 128 * 1024)
        ledger = self.open_ledger()
        largest = 0
        for turn in range(300):
            await defer.gatherResults([ledger.record(row(f"t{turn}-{i}")) for i in range(10)])
            largest = max(largest, writer_module.wal_size(ledger.path))
        self.assertLess(largest, 4 * 128 * 1024)
        self.assertGreater(ledger._writer.wal_resets, 0)
        if ledger._writer._resetting is not None:
            await ledger._writer._resetting  # rows answered during it are in the row journal until it ends
        self.assertEqual(await ledger.count(), 3000)
        stored = [r for (r,) in sql(ledger.path, "SELECT request_id FROM requests ORDER BY id")]
        self.assertEqual(stored, [f"t{turn}-{i}" for turn in range(300) for i in range(10)])
