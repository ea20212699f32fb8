"""
The PostgreSQL ledger when things go wrong, on a real server: the server
stopped while rows are recorded (held, budgeted admission refused, every
row written exactly once when it returns), a start while it is down, a
close while it is down (spilled, imported at the next start), a batch
waiting for its scopes' locks, an instance starting while another's
transaction holds an id, and a child process killed with SIGKILL.

The server is stopped and started with pg_ctl (in a thread: it waits);
what the tests wait for are events (held rows written, locks waited on in
pg_locks), never a fixed time.
"""

from __future__ import annotations

import os
import signal
import sys

import psycopg
from twisted.internet import defer, error, reactor, task, threads
from twisted.trial.unittest import TestCase

from cllama_tx.store import pg_ledger
from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.store.ledger_sql import LedgerClosed
from cllama_tx.store.pg_ledger import ROWS_LOCK
from cllama_tx.store.spill import read_spill
from cllama_tx.store.writer import HELD
from cllama_tx.testing.postgres import shared_cluster
from tests.store.test_ledger import REPO, _Child, crash_row, row
from tests.store.test_pg_ledger import PostgresBackend


def recovered(ledger) -> defer.Deferred:
    """Fires once every held row of C{ledger} is written."""
    d: defer.Deferred = defer.Deferred()

    def once() -> None:
        ledger.on_recovered.remove(once)
        d.callback(None)

    ledger.on_recovered.append(once)
    return d


async def until(predicate, what: str, limit: float = 30.0) -> None:
    """Poll C{predicate} (a state in another process) every 20 ms until true."""
    waited = 0.0
    while not predicate():
        if waited > limit:
            raise AssertionError(f"gave up waiting for {what}")
        await task.deferLater(reactor, 0.02, lambda: None)
        waited += 0.02


def waiting_locks(url: str) -> int:
    """Advisory locks some session is waiting for."""
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        ).fetchone()[0]


class ServerCase(PostgresBackend, TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.cluster = shared_cluster()
        self.addCleanup(self.ensure_running)

    def ensure_running(self):
        if not self.cluster.running:
            return threads.deferToThread(self.cluster.start)
        return None

    def stop_server(self) -> defer.Deferred:
        return threads.deferToThread(self.cluster.stop)

    def start_server(self) -> defer.Deferred:
        return threads.deferToThread(self.cluster.start)

    def stored(self, ledger) -> list[str]:
        return [r for (r,) in self.query(ledger, "SELECT request_id FROM requests ORDER BY id")]


class ServerStoppedTests(ServerCase):
    async def test_rows_are_held_and_land_once_when_the_server_returns(self) -> None:
        ledger = await self.start_ledger(backlog=100)
        await ledger.record(row("before"))
        down: defer.Deferred = defer.Deferred()
        ledger.database.on_availability.append(lambda up: None if up or down.called else down.callback(None))
        await self.stop_server()
        await down  # the database's heartbeat found it gone
        # Before any row is held: budgets are refused at once, the rest may go on.
        self.assertIn("budget", ledger.admission_refusal(budgeted=True))
        self.assertIsNone(ledger.admission_refusal(budgeted=False))
        self.assertEqual(ledger.health()["state"], "failing")
        first = [ledger.record(row(f"r{i}")) for i in range(5)]  # one turn: one failed batch
        self.assertEqual(await defer.gatherResults(first), [HELD] * 5)
        self.assertEqual(await ledger.record(row("r5", cost_usd=0.5, key_id="k1")), HELD)
        health = ledger.health()
        self.assertEqual((health["state"], health["pending_rows"]), ("failing", 6))
        self.assertIsNotNone(health["failing_since"])
        self.assertNotIn("password", str(health))
        # Counted all the same; budgets cannot be kept, the rest may go on.
        self.assertEqual(ledger.totals().requests, 7)
        self.assertIn("budget", ledger.admission_refusal(budgeted=True))
        self.assertIsNone(ledger.admission_refusal(budgeted=False))
        self.assertFalse(await ledger.ready())

        done = recovered(ledger)
        await self.start_server()
        await done
        self.assertEqual(self.stored(ledger), ["before"] + [f"r{i}" for i in range(6)])
        self.assertEqual(ledger.health()["state"], "ok")
        self.assertTrue(await ledger.ready())
        self.assertIsNone(ledger.admission_refusal(budgeted=True))
        stats = ledger.writer_stats()
        self.assertEqual((stats["held"], stats["recovered"], stats["failed_rows"]), (0, 6, 0))
        self.assertIsNone(await ledger.record(row("after")))
        # Exactly once: in memory as in the database (a restart rebuilds from it).
        summary = ledger.totals().summary()
        self.assertEqual(summary["requests"], 8)
        reopened = await self.reopen(ledger)
        self.assertEqual(reopened.totals().summary(), summary)

    async def test_a_held_row_already_stored_is_not_written_twice(self) -> None:
        # The commit of a batch can reach the database and still be reported
        # as failed (the connection drops at COMMIT): its retry finds it there.
        self.patch(pg_ledger, "RETRY_FIRST", 3600.0)  # no retry but the one this test asks for
        self.heartbeat = 3600.0
        self.pool_threads = 1
        ledger = await self.start_ledger()
        await self.stop_server()
        self.assertEqual(await ledger.record(row("dup", cost_usd=0.25)), HELD)
        self.assertEqual(await ledger.record(row("next")), HELD)
        done = recovered(ledger)
        await self.start_server()
        self.query(ledger, "INSERT INTO requests (request_id, ts, status, stream, latency_ms, priced, estimated) "
                   "VALUES ('dup', 0, 200, 0, 1, 1, 0)")
        self.assertFalse(done.called)
        # The pool's connection to the stopped server fails once, then one
        # answers: the database is available, and held rows are retried at once.
        for _ in range(3):
            try:
                await ledger.database.run(lambda tx: None)
                break
            except DatabaseUnavailable:
                continue
        await done
        self.assertEqual(self.stored(ledger), ["dup", "next"])
        self.assertEqual(ledger.writer_stats()["failed_rows"], 0)

    async def test_start_while_the_server_is_down(self) -> None:
        url = self.new_database()
        await self.stop_server()
        ledger = self.make_ledger(url)
        ledger.startService()
        self.assertEqual(ledger.health()["state"], "loading")
        self.assertIn("not connected", ledger.admission_refusal(budgeted=False))
        self.assertFalse(await ledger.ready())
        self.assertEqual(await ledger.record(row("early", cost_usd=0.5)), HELD)
        await self.assertFailure(ledger.recent(), Exception)
        loaded = ledger.loaded()
        self.assertFalse(loaded.called)
        done = recovered(ledger)
        await self.start_server()
        await loaded
        await done
        self.assertEqual(self.stored(ledger), ["early"])
        self.assertEqual(ledger.totals().requests, 1)  # counted once, not again by the load
        self.assertEqual(await ledger.follow(), 0)  # its own row, not another instance's
        self.assertIsNone(ledger.admission_refusal(budgeted=True))

    async def test_close_while_down_spills_and_the_next_start_imports(self) -> None:
        spill_dir = os.path.abspath(self.mktemp())
        ledger = await self.start_ledger(spill_dir=spill_dir)
        await ledger.record(row("warm"))
        await self.stop_server()
        for i in range(3):
            self.assertEqual(await ledger.record(row(f"s{i}", cost_usd=0.25)), HELD)
        await ledger.close()
        self.assertEqual([r.request_id for r in read_spill(ledger.spill_file)], ["s0", "s1", "s2"])
        await self.start_server()
        again = await self.start_ledger(ledger.url.conninfo, spill_dir=spill_dir)
        self.assertEqual(self.stored(again), ["warm", "s0", "s1", "s2"])
        self.assertFalse(os.path.exists(ledger.spill_file))
        self.assertAlmostEqual(again.totals().costs_api()["total_cost_usd"], 0.001 + 0.75)

    async def test_the_password_is_never_shown(self) -> None:
        from cllama_tx.store.database import parse_database_url
        from cllama_tx.store.pg_ledger import PostgresLedger
        from cllama_tx.store.postgres import PostgresDatabase

        url = parse_database_url(f"postgresql://cllama:hunter2@127.0.0.1:{self.cluster.port}/nowhere")
        ledger = PostgresLedger(PostgresDatabase(url, reactor, threads=1, connect_timeout=1), reactor)
        self.addCleanup(ledger.close)
        ledger.startService()
        self.assertEqual(await ledger.record(row("r")), HELD)
        shown = repr((ledger.health(), ledger.admission_refusal(True), str(ledger.url), ledger.spill_file))
        self.assertIn("***", shown)
        self.assertNotIn("hunter2", shown)


class LockTests(ServerCase):
    async def test_a_batch_waits_for_its_scopes(self) -> None:
        """A batch takes its rows' scope locks: while another transaction holds one, it waits."""
        ledger = await self.start_ledger()
        url = ledger.url.conninfo
        with psycopg.connect(url) as other:
            other.execute("SELECT pg_advisory_xact_lock(hashtextextended('scope:key:k1', 0))")
            d = ledger.record(row("r1", key_id="k1"))
            await until(lambda: waiting_locks(url) == 1, "the batch to wait for the scope's lock")
            self.assertFalse(d.called)
            self.assertEqual(self.stored(ledger), [])
            other.rollback()
            self.assertIsNone(await d)
        self.assertEqual(self.stored(ledger), ["r1"])

    async def test_an_instance_starting_waits_for_ids_in_flight(self) -> None:
        """
        A row whose transaction holds its id while another instance starts
        is counted by that instance exactly once: the start waits for it.
        """
        first = await self.start_ledger(instance="first")
        url = first.url.conninfo
        with psycopg.connect(url) as other:
            other.execute("SELECT pg_advisory_xact_lock_shared(hashtextextended(%s, 0))", (ROWS_LOCK,))
            other.execute("INSERT INTO requests (request_id, ts, agent, status, stream, latency_ms, cost_usd, "
                          "priced, estimated, instance) VALUES ('in-flight', 0, 'a', 200, 0, 1, 0.5, 1, 0, 'x')")
            await first.record(row("committed"))  # a larger id, visible first
            second = self.make_ledger(url, instance="second")
            second.startService()
            loaded = second.loaded()
            await until(lambda: waiting_locks(url) == 1, "the start to wait for the rows lock")
            self.assertFalse(loaded.called)
            other.commit()
        await loaded
        self.assertEqual(second.totals().requests, 2)
        self.assertEqual(await second.follow(), 0)
        self.assertEqual(second.totals().requests, 2)  # once
        self.assertEqual(await first.follow(), 1)
        self.assertEqual(first.totals().requests, 2)


CHILD = """
import itertools
import sys
from twisted.internet import defer, task
from cllama_tx.store.database import parse_database_url
from cllama_tx.store.pg_ledger import PostgresLedger
from cllama_tx.store.postgres import PostgresDatabase
from tests.store.test_ledger import crash_row


async def main(reactor, url):
    ledger = PostgresLedger(PostgresDatabase(parse_database_url(url), reactor), reactor)
    ledger.startService()
    await ledger.loaded()
    numbers = itertools.count()

    def committed(_, request_id):
        sys.stdout.write(request_id + "\\n")
        sys.stdout.flush()
        record_next()

    def record_next():
        row = crash_row(next(numbers))
        ledger.record(row).addCallback(committed, row.request_id)

    for _ in range(25):
        record_next()
    await defer.Deferred()


task.react(lambda reactor: defer.ensureDeferred(main(reactor, sys.argv[1])))
"""


class CrashTests(ServerCase):
    async def test_sigkill_loses_nothing_reported(self) -> None:
        url = self.new_database()
        child = _Child(kill_after=300)
        env = dict(os.environ, PYTHONPATH=REPO)
        transport = reactor.spawnProcess(child, sys.executable, [sys.executable, "-c", CHILD, url], env=env,
                                         path=REPO)

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
        self.assertGreaterEqual(len(reported), 300)
        ledger = await self.start_ledger(url)
        stored = self.stored(ledger)
        # Every row the child saw committed is there, and what is there is
        # a prefix of what it recorded, in order.
        self.assertEqual(set(reported) - set(stored), set())
        self.assertEqual(stored, [f"crash-{i}" for i in range(len(stored))])
        self.assertEqual(ledger.totals().requests, len(stored))
        self.assertAlmostEqual(ledger.totals().costs_api()["total_cost_usd"],
                               sum(crash_row(i).cost_usd for i in range(len(stored)) if crash_row(i).agent),
                               places=6)


class ClosedTests(ServerCase):
    async def test_reads_and_writes_after_close(self) -> None:
        ledger = await self.start_ledger()
        await ledger.close()
        await self.assertFailure(ledger.record(row("late")), LedgerClosed)
        await self.assertFailure(ledger.set_budget_override("a", None, 1.0, "x"), LedgerClosed)
        await self.assertFailure(ledger.loaded(), LedgerClosed)
        self.assertEqual(ledger.health()["state"], "closed")
