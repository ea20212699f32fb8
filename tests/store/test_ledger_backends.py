"""
Choosing the ledger from the environment (L{cllama_tx.store.backends}),
C{cllama-tx migrate} on both backends (the real command, in a process of
its own), and the daemon's budget seeding (L{GovernanceSeed}) that waits
for the ledger instead of blocking the reactor: admission refused and
readiness false until it is done.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import psycopg
from twisted.internet import reactor, threads
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cllama_tx.runtime.daemon import GovernanceSeed
from cllama_tx.store.backends import STATE_FILE, DatabaseConfigError, configured_url, open_ledger
from cllama_tx.store.ledger import SCHEMA_VERSION, SqliteLedger
from cllama_tx.store.pg_ledger import PostgresLedger
from cllama_tx.store.pg_schema import SCHEMA_VERSION as PG_SCHEMA_VERSION
from cllama_tx.testing.postgres import shared_cluster
from tests.store.test_ledger import NOON, REPO, LedgerCase, row
from tests.store.test_pg_ledger import PostgresBackend

SECRET = "hunter2-not-for-logs"


class ChoiceTests(SynchronousTestCase):
    def test_sqlite_by_default(self) -> None:
        state = self.mktemp()
        backend = open_ledger({}, reactor, state_dir=state)
        self.assertIsInstance(backend.ledger, SqliteLedger)
        self.assertEqual(backend.ledger.path, os.path.join(state, STATE_FILE))
        self.assertEqual(backend.state_file, backend.ledger.path)
        self.assertFalse(backend.ledger.shared)
        self.assertIsNone(backend.database)

    def test_workers_share_the_file(self) -> None:
        env = {"CLLAMA_WORKERS": "3", "CLLAMA_WORKER_INDEX": "1"}
        backend = open_ledger(env, reactor, state_dir=self.mktemp(), spill_dir=self.mktemp())
        self.assertTrue(backend.ledger.shared)
        self.assertEqual(backend.workers, 3)
        # Each worker its own spill file.
        other = open_ledger(dict(env, CLLAMA_WORKER_INDEX="2"), reactor, state_dir=self.mktemp(),
                            spill_dir=self.mktemp())
        self.assertNotEqual(os.path.basename(backend.ledger.spill_file), os.path.basename(other.ledger.spill_file))

    def test_a_sqlite_url_names_the_file(self) -> None:
        path = os.path.abspath(os.path.join(self.mktemp(), "elsewhere.db"))
        backend = open_ledger({"DATABASE_URL": f"sqlite://{path}"}, reactor, state_dir=self.mktemp())
        self.assertEqual(backend.ledger.path, path)

    def test_postgresql_and_its_pool(self) -> None:
        url = f"postgresql://cllama:{SECRET}@db.example:5432/cllama"
        for name in ("CLLAMA_DATABASE_URL", "DATABASE_URL"):
            backend = open_ledger({name: url}, reactor, state_dir=self.mktemp())
            self.assertIsInstance(backend.ledger, PostgresLedger)
            self.assertIs(backend.ledger.database, backend.database)
            self.assertNotIn(SECRET, repr(backend) + str(backend.url) + str(backend.ledger.spill_file))
        # CLLAMA_DATABASE_URL wins over DATABASE_URL (LiteLLM's name).
        both = configured_url({"CLLAMA_DATABASE_URL": url, "DATABASE_URL": "sqlite://"})
        self.assertEqual(both.backend, "postgresql")

    def test_a_bad_url_names_its_variable_not_its_password(self) -> None:
        for name, url in (
            ("CLLAMA_DATABASE_URL", f"mysql://root:{SECRET}@db/x"),
            ("DATABASE_URL", f"postgresql://cllama:{SECRET}@db.example:99999999/x"),
            ("DATABASE_URL", f"postgresql://cllama:{SECRET}@db.example:5432"),
        ):
            error = self.assertRaises(DatabaseConfigError, open_ledger, {name: url}, reactor, state_dir="x")
            self.assertTrue(str(error).startswith(name + ":"), str(error))
            self.assertNotIn(SECRET, str(error))


def run_cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    code = "import sys; from cllama_tx.runtime.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], env=dict(env, PYTHONPATH=REPO), cwd=REPO,
                          capture_output=True, text=True, timeout=60)


class MigrateCommandTests(TestCase):
    timeout = 120

    async def test_sqlite(self) -> None:
        state = os.path.abspath(self.mktemp())
        done = await threads.deferToThread(run_cli, "migrate", env={"CLLAMA_STATE_DIR": state})
        self.assertEqual(done.returncode, 0, done.stderr)
        path = os.path.join(state, STATE_FILE)
        self.assertEqual(done.stdout.strip(), f"sqlite://{path}: schema version {SCHEMA_VERSION}")
        with sqlite3.connect(path) as conn:
            self.assertEqual(conn.execute("SELECT value FROM meta").fetchone(), (str(SCHEMA_VERSION),))

    async def test_postgresql(self) -> None:
        url = shared_cluster().database()
        done = await threads.deferToThread(run_cli, "migrate", env={"DATABASE_URL": url})
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertTrue(done.stdout.strip().endswith(f": schema version {PG_SCHEMA_VERSION}"), done.stdout)
        with psycopg.connect(url) as conn:
            self.assertEqual(conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone(),
                             (PG_SCHEMA_VERSION,))

    async def test_failures_never_show_the_password(self) -> None:
        port = shared_cluster().port
        unreachable = {"CLLAMA_DATABASE_URL": f"postgresql://cllama:{SECRET}@127.0.0.1:{port}/no_such_db"}
        done = await threads.deferToThread(run_cli, "migrate", env=unreachable)
        self.assertEqual(done.returncode, 1)
        self.assertIn("no_such_db", done.stderr)
        self.assertIn("***", done.stderr)
        bad = await threads.deferToThread(run_cli, "migrate", env={"DATABASE_URL": f"mysql://u:{SECRET}@h/x"})
        self.assertEqual(bad.returncode, 2)
        self.assertIn("DATABASE_URL:", bad.stderr)
        for out in (done, bad):
            self.assertNotIn(SECRET, out.stdout + out.stderr)


class FakeGovernance:
    def __init__(self) -> None:
        self.runtime: dict = {}
        self.seeded: list = []

    def set_runtime(self, agent, entry) -> None:
        self.runtime[agent] = entry

    def seed(self, entries) -> None:
        self.seeded.extend(entries)

    def has_lifetime_budgets(self, raw_budgets=()) -> bool:
        return False


class SqliteSeedTests(LedgerCase):
    async def test_one_process_is_seeded_before_anything_is_served(self) -> None:
        ledger = self.open_ledger()
        await ledger.record(row("r1", ts=NOON, key_id="k1", cost_usd=0.5))
        await ledger.set_budget_override("tiverton", {"limit_usd": 5, "window": "24h"}, None, "ops")
        governance = FakeGovernance()
        clock = _Clock(NOON + 60)
        seed = GovernanceSeed(ledger, governance, clock)
        seed.startService()
        self.addCleanup(seed.stopService)
        # Done inside startService: nothing waits, nothing is refused.
        self.assertTrue(seed.seeded)
        self.assertIsNone(ledger.admission_refusal(budgeted=True))
        self.assertEqual(set(governance.runtime), {"tiverton"})
        self.assertIn(("tiverton", NOON, 0.5, 1, 0), governance.seeded)
        self.assertIn(("key:k1", NOON, 0.5, 1, 0), governance.seeded)


class PostgresSeedTests(PostgresBackend, TestCase):
    timeout = 120

    async def test_seeding_waits_for_the_database_and_admission_waits_for_it(self) -> None:
        cluster = shared_cluster()
        self.addCleanup(lambda: None if cluster.running else threads.deferToThread(cluster.start))
        url = self.new_database()
        first = await self.start_ledger(url)
        await first.record(row("r1", ts=NOON, cost_usd=0.5))
        await first.set_budget_override("tiverton", {"limit_usd": 5, "window": "24h"}, None, "ops")
        await first.close()
        await threads.deferToThread(cluster.stop)

        ledger = self.make_ledger(url)
        governance = FakeGovernance()
        seed = GovernanceSeed(ledger, governance, _Clock(NOON + 60))
        self.patch(GovernanceSeed, "RETRY", 0.1)
        ledger.startService()
        seed.startService()
        self.addCleanup(seed.stopService)
        # Nothing blocked: start-up returned with the database down; until
        # the book is seeded nothing metered is admitted and readiness is false.
        self.assertFalse(seed.seeded)
        self.assertIsNotNone(ledger.admission_refusal(budgeted=False))
        self.assertFalse(await ledger.ready())
        loaded = ledger.loaded()
        await threads.deferToThread(cluster.start)
        await loaded
        await seed.done  # the seed's read follows the load
        self.assertEqual(governance.runtime["tiverton"]["budget"], {"limit_usd": 5, "window": "24h"})
        self.assertIn(("tiverton", NOON, 0.5, 1, 0), governance.seeded)
        self.assertIsNone(ledger.admission_refusal(budgeted=True))
        self.assertTrue(await ledger.ready())


class _Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def seconds(self) -> float:
        return self.now

    def callLater(self, delay, f, *args):  # noqa: N802 - Twisted's name
        return reactor.callLater(delay, f, *args)

