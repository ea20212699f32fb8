"""
A ledger whose disk is full: rows are held in memory (bounded), in order,
counted, reported, and committed when space returns; a close with rows still
held saves them elsewhere and the next start imports them.  A real tmpfs is
filled to its last byte (tests.store.small_fs); the retry timer is made
short and its end awaited, never slept on.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat

from twisted.internet import defer
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.store import writer as writer_module
from cllama_tx.store.ledger import HELD, NOT_KEPT, SqliteLedger
from cllama_tx.store.spill import SpillError, read_spill, spill_path, write_spill
from cllama_tx.store.sqlite_tx import is_storage_error
from tests.store.small_fs import fill, free, mount_tmpfs
from tests.store.test_ledger import DAY, NOON, LedgerCase, row, sql

FULL = "database or disk is full"


def recovered(ledger: SqliteLedger) -> defer.Deferred:
    """Fires once every held row of C{ledger} is written."""
    d: defer.Deferred = defer.Deferred()
    writer = ledger._writer

    def once() -> None:
        writer.on_recovered.remove(once)
        d.callback(None)

    writer.on_recovered.append(once)
    return d


def stored(path: str) -> list[str]:
    return [r for (r,) in sql(path, "SELECT request_id FROM requests ORDER BY id")]


class StorageCase(LedgerCase):
    def setUp(self) -> None:
        self.patch(writer_module, "RETRY_FIRST", 0.01)
        self.patch(writer_module, "RETRY_MAX", 0.05)
        self.disk = mount_tmpfs(self, 1024)
        self.path = os.path.join(self.disk, "state", "ledger.db")
        self.spill_dir = os.path.abspath(self.mktemp())  # another filesystem

    def watch_log(self) -> list[dict]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events


class FullDiskTests(StorageCase):
    async def test_rows_are_held_and_committed_in_order_when_space_returns(self) -> None:
        ledger = self.open_ledger(self.path, spill_dir=self.spill_dir)
        await ledger.record(row("warm"))
        filler = fill(self.disk)
        first = [ledger.record(row(f"r{i}")) for i in range(5)]  # one turn: one failed commit
        self.assertEqual(await defer.gatherResults(first), [HELD] * 5)
        for i in range(5, 8):  # later turns: behind the held rows, never tried ahead of them
            self.assertEqual(await ledger.record(row(f"r{i}", cost_usd=0.5)), HELD)
        self.assertEqual(stored(self.path), ["warm"])
        stats = ledger.writer_stats()
        self.assertEqual(stats["held"], 8)
        self.assertEqual(stats["failed_rows"], 0)
        # Counted all the same: the spend is not forgotten.
        self.assertEqual(ledger.totals().requests, 9)
        self.assertAlmostEqual(ledger.totals().costs_api()["total_cost_usd"], 6 * 0.001 + 3 * 0.5)
        health = ledger.health()
        self.assertEqual(health["state"], "failing")
        self.assertEqual(health["pending_rows"], 8)
        self.assertEqual(health["error"], FULL)
        self.assertIsNotNone(health["failing_since"])
        self.assertFalse(await ledger.ready())
        self.assertIn("budget", ledger.admission_refusal(budgeted=True))
        self.assertIsNone(ledger.admission_refusal(budgeted=False))  # room left for 9,992 more
        done = recovered(ledger)
        free(filler)
        await done
        self.assertEqual(stored(self.path), ["warm"] + [f"r{i}" for i in range(8)])
        self.assertEqual(ledger.health()["state"], "ok")
        self.assertIsNone(ledger.health()["error"])
        self.assertTrue(await ledger.ready())
        self.assertIsNone(ledger.admission_refusal(budgeted=True))
        stats = ledger.writer_stats()
        self.assertEqual((stats["held"], stats["recovered"]), (0, 8))
        inline = ledger._writer.inline_commits
        self.assertIsNone(await ledger.record(row("after")))  # committed on the reactor again
        self.assertEqual(ledger._writer.inline_commits, inline + 1)
        self.assertEqual(ledger.totals().requests, 10)

    async def test_full_backlog_refuses_and_keeps_only_metered_rows(self) -> None:
        ledger = self.open_ledger(self.path, spill_dir=self.spill_dir, backlog=3)
        await ledger.record(row("warm"))
        filler = fill(self.disk)
        self.assertEqual(await defer.gatherResults([ledger.record(row(f"m{i}")) for i in range(3)]), [HELD] * 3)
        self.assertIn("holds as many", ledger.admission_refusal(budgeted=False))
        # A refusal (never reached a provider, costs nothing): not kept, not counted.
        before = ledger.totals().requests
        refused = row("refused", provider=None, effective_model=None, status=503, cost_usd=0.0)
        self.assertEqual(await ledger.record(refused), NOT_KEPT)
        self.assertEqual(ledger.totals().requests, before)
        # A request admitted before the backlog filled still settles: its row is kept.
        self.assertEqual(await ledger.record(row("late")), HELD)
        self.assertEqual(ledger.writer_stats()["held"], 4)
        self.assertEqual(ledger.writer_stats()["unkept"], 1)
        self.assertEqual(ledger.health()["unkept_rows"], 1)
        done = recovered(ledger)
        free(filler)
        await done
        self.assertEqual(stored(self.path), ["warm", "m0", "m1", "m2", "late"])

    async def test_a_held_row_already_on_disk_is_not_written_twice(self) -> None:
        # A commit reported as failed may have reached the disk after all:
        # a held row whose request_id is stored is taken as written.
        ledger = self.open_ledger(self.path, spill_dir=self.spill_dir)
        await ledger.record(row("warm"))
        filler = fill(self.disk)
        self.assertEqual(await ledger.record(row("new")), HELD)
        self.assertEqual(await ledger.record(row("warm")), HELD)  # held behind "new"
        self.assertEqual(await ledger.record(row("newer")), HELD)
        done = recovered(ledger)
        free(filler)
        await done
        self.assertEqual(stored(self.path), ["warm", "new", "newer"])
        self.assertEqual(ledger.writer_stats()["failed_rows"], 0)


class ThreadPathTests(StorageCase):
    async def test_full_sync_holds_rows_on_the_thread(self) -> None:
        ledger = self.open_ledger(self.path, spill_dir=self.spill_dir, sync="full")
        await ledger.record(row("warm"))
        filler = fill(self.disk)
        self.assertEqual(await defer.gatherResults([ledger.record(row(f"r{i}")) for i in range(3)]), [HELD] * 3)
        self.assertEqual(ledger.health()["pending_rows"], 3)
        done = recovered(ledger)
        free(filler)
        await done
        self.assertEqual(stored(self.path), ["warm", "r0", "r1", "r2"])

    async def test_rows_queued_behind_a_failed_commit_do_not_overtake_it(self) -> None:
        # The thread fails to commit "a"; the disk has room again before it
        # reaches "b", queued behind "a" before the reactor knew: "b" is
        # held too, so "a" is still written first.
        ledger = self.open_ledger(self.path, spill_dir=self.spill_dir)
        await ledger.record(row("warm"))
        filler = fill(self.disk)
        gate, held = self.hold_writer(ledger)
        a = ledger.record(row("a"))
        freed = ledger._on_writer(lambda conn: free(filler))  # on the thread, between "a" and "b"
        b = ledger.record(row("b"))
        done = recovered(ledger)
        gate.set()
        await held
        await freed
        self.assertEqual(await defer.gatherResults([a, b]), [HELD, HELD])
        await done
        self.assertEqual(stored(self.path), ["warm", "a", "b"])


class StopWithHeldRowsTests(StorageCase):
    async def test_close_tries_once_more(self) -> None:
        self.patch(writer_module, "RETRY_FIRST", 3600.0)  # no retry before the close
        ledger = self.open_ledger(self.path, spill_dir=self.spill_dir)
        filler = fill(self.disk)
        self.assertEqual(await ledger.record(row("a")), HELD)
        free(filler)
        await ledger.close()
        self.assertEqual(stored(self.path), ["a"])
        self.assertEqual(os.listdir(self.spill_dir) if os.path.exists(self.spill_dir) else [], [])

    async def test_close_spills_and_the_next_start_imports(self) -> None:
        ledger = self.open_ledger(self.path, spill_dir=self.spill_dir)
        await ledger.record(row("warm"))
        filler = fill(self.disk)
        for i in range(3):
            self.assertEqual(await ledger.record(row(f"s{i}", cost_usd=0.25)), HELD)
        events = self.watch_log()
        await ledger.close()
        spilled = spill_path(self.spill_dir, self.path)
        self.assertEqual(stat.S_IMODE(os.stat(spilled).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(self.spill_dir).st_mode), 0o700)
        self.assertEqual([r.request_id for r in read_spill(spilled)], ["s0", "s1", "s2"])
        [said] = [e for e in events if "saved to" in e.get("log_format", "")]
        self.assertEqual((said["count"], said["spill"]), (3, spilled))
        self.assertEqual(stored(self.path), ["warm"])
        free(filler)
        again = self.open_ledger(self.path, spill_dir=self.spill_dir)
        self.assertEqual(stored(self.path), ["warm", "s0", "s1", "s2"])
        self.assertFalse(os.path.exists(spilled))
        self.assertEqual(again.health()["state"], "ok")
        self.assertAlmostEqual(again.totals().costs_api()["total_cost_usd"], 0.001 + 0.75)

    async def test_restart_on_a_still_full_disk_holds_the_saved_rows(self) -> None:
        ledger = self.open_ledger(self.path, spill_dir=self.spill_dir)
        await ledger.record(row("warm"))
        filler = fill(self.disk)
        for i in range(2):
            self.assertEqual(await ledger.record(row(f"s{i}", cost_usd=0.25, ts=NOON + 60 * i, key_id=f"k{i}")), HELD)
        await ledger.close()
        again = self.open_ledger(self.path, spill_dir=self.spill_dir)
        health = again.health()
        self.assertEqual((health["state"], health["pending_rows"]), ("failing", 2))
        self.assertEqual(again.totals().requests, 3)
        # Budgets are seeded with the held spend too.
        timeline = again.spend_timeline(NOON - DAY)
        self.assertEqual(
            timeline, [("tiverton", NOON, 0.251, 2, 0), ("tiverton", NOON + 60, 0.25, 1, 0)]
        )
        keys = [("k0", NOON, 0.25, 1, 0), ("k1", NOON + 60, 0.25, 1, 0)]
        self.assertEqual(again.scope_timeline("key_id", 0.0), keys)
        self.assertIsNotNone(again.admission_refusal(budgeted=True))
        done = recovered(again)
        free(filler)
        await done
        self.assertEqual(stored(self.path), ["warm", "s0", "s1"])
        self.assertFalse(os.path.exists(spill_path(self.spill_dir, self.path)))
        self.assertEqual(again.spend_timeline(NOON - DAY), timeline)  # now from SQL alone
        self.assertEqual(again.scope_timeline("key_id", 0.0), keys)

    async def test_nowhere_to_spill_is_said_loudly(self) -> None:
        ledger = self.open_ledger(self.path)  # no spill directory
        filler = fill(self.disk)
        self.addCleanup(free, filler)
        self.assertEqual(await ledger.record(row("lost-1", cost_usd=0.5)), HELD)
        events = self.watch_log()
        await ledger.close()
        [said] = [e for e in events if "are LOST" in e.get("log_format", "")]
        self.assertEqual(said["count"], 1)
        self.assertIn(FULL, said["error"])
        [each] = [e for e in events if "lost row" in e.get("log_format", "")]
        self.assertEqual(each["row"]["request_id"], "lost-1")
        self.assertEqual(each["row"]["cost_usd"], 0.5)


class SpillFileTests(SynchronousTestCase):
    def test_round_trip_and_mode(self) -> None:
        directory = os.path.join(os.path.abspath(self.mktemp()), "spill")
        path = spill_path(directory, "/var/lib/x/ledger.sqlite3")
        rows = [row("a", key_id="k", estimated=True), row("b", agent=None, ttfb_ms=None)]
        write_spill(path, rows)
        self.assertEqual(read_spill(path), rows)
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertNotEqual(spill_path(directory, "/other/ledger.sqlite3"), path)
        self.assertEqual(read_spill(os.path.join(directory, "none.jsonl")), [])

    def test_a_spill_file_others_could_write_is_not_read(self) -> None:
        directory = os.path.join(os.path.abspath(self.mktemp()), "spill")
        path = spill_path(directory, "/l.db")
        write_spill(path, [row("a")])
        os.chmod(path, 0o622)
        self.assertRaises(SpillError, read_spill, path)
        os.chmod(path, 0o600)
        os.chmod(directory, 0o777)
        self.assertRaises(SpillError, read_spill, path)
        self.assertRaises(SpillError, write_spill, path, [row("b")])

    def test_a_line_that_is_not_a_row(self) -> None:
        directory = os.path.join(os.path.abspath(self.mktemp()), "spill")
        path = spill_path(directory, "/l.db")
        write_spill(path, [row("a")])
        with open(path, "a") as f:
            f.write(json.dumps({"request_id": "x"}) + "\n")
        self.assertRaises(SpillError, read_spill, path)



class ForeignSpillTests(LedgerCase):
    async def test_a_foreign_spill_file_is_left_alone(self) -> None:
        spill_dir = os.path.abspath(self.mktemp())
        path = os.path.join(os.path.abspath(self.mktemp()), "ledger.db")
        spilled = spill_path(spill_dir, path)
        write_spill(spilled, [row("a")])
        os.chmod(spilled, 0o666)
        ledger = self.open_ledger(path, spill_dir=spill_dir)
        self.assertIsNone(ledger.spill_file)  # neither imported, nor overwritten, nor removed
        self.assertIsNone(await ledger.record(row("b")))
        await ledger.close()
        self.assertTrue(os.path.exists(spilled))
        self.assertEqual(stored(path), ["b"])


class StorageErrorTests(SynchronousTestCase):
    def test_what_blames_the_storage(self) -> None:
        conn = sqlite3.connect(":memory:")
        conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v BLOB)")
        conn.execute("INSERT INTO t VALUES ('a', NULL)")
        with self.assertRaises(sqlite3.IntegrityError) as duplicate:
            conn.execute("INSERT INTO t VALUES ('a', NULL)")
        self.assertFalse(is_storage_error(duplicate.exception))
        conn.execute("PRAGMA max_page_count = 3")  # the database may not grow: SQLITE_FULL
        with self.assertRaises(sqlite3.OperationalError) as full:
            conn.execute("INSERT INTO t VALUES ('b', zeroblob(100000))")
        self.assertEqual(str(full.exception), FULL)
        self.assertTrue(is_storage_error(full.exception))
        self.assertFalse(is_storage_error(ValueError("no")))
        with self.assertRaises(sqlite3.ProgrammingError) as misuse:
            conn.execute("INSERT INTO t VALUES (?, ?)", (1,))
        self.assertFalse(is_storage_error(misuse.exception))
