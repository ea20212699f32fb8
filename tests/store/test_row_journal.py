"""
The ledger's row journal: while a WAL reset owns the database, rows are
appended to it and answered at once, then committed in record order once
the reset is done; rows a crash left in it are committed at the next
start.  Real files, the real reactor, a real TRUNCATE checkpoint held at a
gate on the writer thread.
"""

from __future__ import annotations

import os
import signal
import stat
import sys
import threading

from twisted.internet import defer, error, protocol, reactor

from cllama_tx.store import row_journal
from cllama_tx.store import writer as writer_module
from cllama_tx.store.spill import encode_row
from tests.store.test_ledger import REPO, LedgerCase, row, sql
from tests.store.test_ledger_writer import next_turn


def stored_ids(path: str) -> list[str]:
    return [r for (r,) in sql(path, "SELECT request_id FROM requests ORDER BY id")]


class DuringResetTests(LedgerCase):
    """Rows recorded while the thread empties the WAL do not wait for it."""

    async def start_reset(self):
        """A ledger whose WAL reset has started on the thread and waits at a gate; the gate, the reset."""
        gate, entered = threading.Event(), threading.Event()
        self.addCleanup(gate.set)
        truncate = writer_module.truncate_wal

        def gated(conn, patient=True):
            entered.set()
            gate.wait(30)
            return truncate(conn, patient)

        self.patch(writer_module, "truncate_wal", gated)
        ledger = self.open_ledger()
        await ledger.record(row("before"))
        writer = ledger._writer
        reset = writer._reset_wal()
        self.assertIsNotNone(reset)
        if not entered.wait(30):
            self.fail("the reset did not start")
        return ledger, gate, reset

    async def test_rows_are_answered_before_the_reset_ends(self) -> None:
        ledger, gate, reset = await self.start_reset()
        writer = ledger._writer
        first = [ledger.record(row(f"a{i}")) for i in range(3)]
        self.assertEqual(await defer.gatherResults(first), [None, None, None])  # the reset still runs
        second = await ledger.record(row("b0"))
        self.assertIsNone(second)
        self.assertFalse(reset.called)
        # Answered from the journal (one write a turn), not from the database yet.
        self.assertEqual(stored_ids(ledger.path), ["before"])
        rows, bad = row_journal.read_journal(row_journal.journal_path(ledger.path))
        self.assertEqual([r.request_id for r in rows], ["a0", "a1", "a2", "b0"])
        self.assertEqual(bad, 0)
        self.assertEqual(writer.journaled_rows, 4)
        self.assertEqual(writer.handed_rows, 0)
        self.assertEqual(ledger.totals().summary()["requests"], 5)  # counted at once
        gate.set()
        await reset
        # Committed right after it, in record order, ahead of later rows; the journal is emptied.
        self.assertEqual(stored_ids(ledger.path), ["before", "a0", "a1", "a2", "b0"])
        self.assertEqual(os.path.getsize(row_journal.journal_path(ledger.path)), 0)
        await ledger.record(row("after"))
        self.assertEqual(stored_ids(ledger.path), ["before", "a0", "a1", "a2", "b0", "after"])
        self.assertEqual(writer.wal_resets, 1)
        self.assertEqual(ledger.writer_stats()["rows"], 6)

    async def test_an_operator_write_during_the_reset_follows_the_journaled_rows(self) -> None:
        ledger, gate, reset = await self.start_reset()
        writer = ledger._writer
        await ledger.record(row("j0"))
        counted = ledger._ordered(lambda conn: conn.execute("SELECT COUNT(*) FROM requests").fetchone()[0])
        later = ledger.record(row("j1"))  # follows the call to the thread: waits
        await next_turn()
        self.assertFalse(later.called)
        self.assertEqual(writer.handed_rows, 2)
        gate.set()
        self.assertEqual(await counted, 2)  # "before" and j0 were committed ahead of the call
        await later
        await reset
        self.assertEqual(stored_ids(ledger.path), ["before", "j0", "j1"])

    async def test_a_journal_that_cannot_be_written_makes_rows_wait(self) -> None:
        ledger, gate, reset = await self.start_reset()
        writer = ledger._writer

        def refuse(rows):
            raise OSError(28, "No space left on device")

        self.patch(writer.journal, "append", refuse)
        d = ledger.record(row("w0"))
        await next_turn()
        self.assertFalse(d.called)  # behind the reset, as without a journal
        self.assertEqual(writer.handed_rows, 1)
        gate.set()
        self.assertIsNone(await d)
        await reset
        self.assertEqual(stored_ids(ledger.path), ["before", "w0"])

    async def test_closing_during_the_reset_commits_the_journaled_rows(self) -> None:
        ledger, gate, reset = await self.start_reset()
        await ledger.record(row("c0"))
        closed = ledger.close()
        gate.set()
        await closed
        self.assertEqual(stored_ids(ledger.path), ["before", "c0"])
        self.assertFalse(os.path.exists(row_journal.journal_path(ledger.path)))


class StartTests(LedgerCase):
    """Rows a crash left in the journal are committed at the next start."""

    def write_journal(self, path: str, text: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(row_journal.journal_path(path), "w", encoding="utf-8") as f:
            f.write(text)

    async def test_left_rows_are_committed_once(self) -> None:
        ledger = self.open_ledger()
        await ledger.record(row("kept"))
        await ledger.close()
        torn = encode_row(row("torn"))[:40]  # a crash in the middle of a write
        self.write_journal(ledger.path, encode_row(row("kept")) + "\n" + encode_row(row("left", cost_usd=0.5)) + "\n" + torn)
        again = self.open_ledger(ledger.path)
        self.assertEqual(stored_ids(again.path), ["kept", "left"])  # "kept" was there: not twice
        self.assertEqual(again.totals().summary()["requests"], 2)
        self.assertEqual(os.path.getsize(row_journal.journal_path(again.path)), 0)
        await again.close()
        self.assertFalse(os.path.exists(row_journal.journal_path(again.path)))

    async def test_journal_file_is_private(self) -> None:
        old = os.umask(0o022)
        try:
            ledger = self.open_ledger()
        finally:
            os.umask(old)
        mode = stat.S_IMODE(os.stat(row_journal.journal_path(ledger.path)).st_mode)
        self.assertEqual(mode, 0o600)

    async def test_full_sync_and_workers_have_none(self) -> None:
        self.assertIsNone(self.open_ledger(sync="full")._writer.journal)
        self.assertIsNone(self.open_ledger(shared=True)._writer.journal)


class ReadTests(LedgerCase):
    def test_bad_lines_are_counted_and_a_torn_last_one_is_not(self) -> None:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(encode_row(row("a")) + "\n" + "{not a row}\n" + encode_row(row("b")) + "\n" + '{"request_id": "c"')
        rows, bad = row_journal.read_journal(path)
        self.assertEqual([r.request_id for r in rows], ["a", "b"])
        self.assertEqual(bad, 1)
        self.assertEqual(row_journal.read_journal(path + "-none"), ([], 0))



CHILD = """
import itertools
import sys
import time
from twisted.internet import defer, task
from cllama_tx.store import writer
from cllama_tx.store.ledger import SqliteLedger
from tests.store.test_ledger import crash_row

writer.CHECKPOINT_EVERY = 5
writer.WAL_RESET_BYTES = 64 * 1024
truncate = writer.truncate_wal


def slow(conn, patient=True):
    time.sleep(0.2)  # a slow reset: a wide window for the kill
    return truncate(conn, patient)


writer.truncate_wal = slow


async def main(reactor, path):
    ledger = SqliteLedger(path, reactor)
    ledger.startService()
    numbers = itertools.count()

    def committed(_, request_id):
        # "+": answered while the reset owned the database (from the journal).
        sys.stdout.write(("+" if ledger._writer._journaling else "") + request_id + "\\n")
        sys.stdout.flush()
        record_next()

    def record_next():
        row = crash_row(next(numbers))
        ledger.record(row).addCallback(committed, row.request_id)

    for _ in range(5):
        record_next()
    await defer.Deferred()


task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1])))
"""


class _Child(protocol.ProcessProtocol):
    """Kills the child with SIGKILL while a reset owns its database, after C{kill_after} rows."""

    def __init__(self, kill_after: int) -> None:
        self.kill_after = kill_after
        self.out = b""
        self.err = b""
        self.killed = False
        self.ended: defer.Deferred = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.out += data
        lines = self.out.split(b"\n")[:-1]
        if not self.killed and len(lines) >= self.kill_after and lines[-1].startswith(b"+"):
            self.killed = True
            self.transport.signalProcess("KILL")

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason) -> None:
        self.ended.callback(reason.value)

    def reported(self) -> list[str]:
        return [line.lstrip("+") for line in self.out.decode().split("\n")[:-1]]


class CrashTests(LedgerCase):
    timeout = 120

    async def test_sigkill_during_a_reset_loses_nothing_reported(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "ledger.db")
        child = _Child(kill_after=300)
        env = dict(os.environ, PYTHONPATH=REPO)
        transport = reactor.spawnProcess(child, sys.executable, [sys.executable, "-c", CHILD, path], env=env, path=REPO)

        def kill_if_alive():
            if not child.ended.called:
                try:
                    transport.signalProcess("KILL")
                except error.ProcessExitedAlready:
                    pass
                return child.ended

        self.addCleanup(kill_if_alive)
        ended = await child.ended
        self.assertTrue(child.killed, child.err.decode(errors="replace"))
        self.assertEqual(ended.signal, signal.SIGKILL)
        reported = child.reported()
        stored = [r for (r,) in sql(path, "SELECT request_id FROM requests ORDER BY id")]
        journaled, _ = row_journal.read_journal(row_journal.journal_path(path))
        # Killed while answering from the journal: rows the database does not have yet.
        self.assertTrue(journaled)
        self.assertFalse(set(r.request_id for r in journaled) & set(stored))
        ledger = self.open_ledger(path)  # commits them
        stored = [r for (r,) in sql(path, "SELECT request_id FROM requests ORDER BY id")]
        self.assertEqual(sql(path, "PRAGMA integrity_check"), [("ok",)])
        self.assertEqual(set(reported) - set(stored), set())  # every answered row is there
        self.assertEqual(stored, [f"crash-{i}" for i in range(len(stored))])  # once each, in order
        self.assertEqual(ledger.totals().summary()["requests"], len(stored))
        self.assertEqual(os.path.getsize(row_journal.journal_path(path)), 0)
