"""
What C{input_tokens} means in the ledger: plain input, the cache tokens
apart (schema 3).  A database written by schema 2 or older, which stored
every prompt token there, is converted at start, rollups included; so is a
spill file saved by such a version.  Real files.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer

from cllama_tx.store.ledger import SCHEMA_VERSION
from cllama_tx.store.spill import read_spill, spill_path, write_spill
from tests.store.test_ledger import DAY, NOON, LedgerCase, rounded, row, sql


def _old_meaning(path: str, version: int) -> None:
    """Turn a ledger file into what schema C{version} (2 or older) wrote: every prompt token in input_tokens."""
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.execute("UPDATE requests SET input_tokens = input_tokens + cache_read_tokens + cache_write_tokens")
            conn.execute("UPDATE rollups SET input_tokens = input_tokens + cache_read_tokens + cache_write_tokens")
            conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    finally:
        conn.close()


class MigrationTests(LedgerCase):
    async def test_version_2_rows_and_rollups_are_converted(self) -> None:
        self.assertGreaterEqual(SCHEMA_VERSION, 3)
        ledger = self.open_ledger()
        rows = [
            row("old", ts=NOON - 10 * DAY, input_tokens=1168, cache_read_tokens=32, cost_usd=0.5),
            row("r1", input_tokens=1606, cache_read_tokens=20, cache_write_tokens=12),
            row("r2", input_tokens=7),
            row("refused", provider=None, effective_model=None, status=400, input_tokens=0, output_tokens=0,
                priced=False, cost_usd=0.0),
        ]
        await defer.gatherResults([ledger.record(r) for r in rows])
        self.assertEqual(await ledger.prune(NOON - 5 * DAY), 1)
        expected_period = ledger.totals().period()
        await ledger.close()
        _old_meaning(ledger.path, 2)
        self.assertEqual(
            sql(ledger.path, "SELECT input_tokens FROM requests ORDER BY id"), [(1638,), (7,), (0,)]
        )

        reopened = self.open_ledger(ledger.path)
        self.assertEqual(sql(ledger.path, "SELECT value FROM meta WHERE key = 'schema_version'"), [(str(SCHEMA_VERSION),)])
        self.assertEqual(
            sql(ledger.path, "SELECT request_id, input_tokens, cache_read_tokens, cache_write_tokens "
                             "FROM requests ORDER BY id"),
            [("r1", 1606, 20, 12), ("r2", 7, 0, 0), ("refused", 0, 0, 0)],
        )
        self.assertEqual(sql(ledger.path, "SELECT input_tokens, cache_read_tokens FROM rollups"), [(1168, 32)])
        totals = reopened.totals()
        self.assertEqual(rounded(totals.period()), rounded(expected_period))
        [model] = totals.costs_api()["agents"]["tiverton"]["models"]
        self.assertEqual(model["input_tokens"], 1168 + 32 + 1606 + 20 + 12 + 7)

    async def test_version_1_is_converted_too(self) -> None:
        import sqlite3

        from tests.store.test_ledger_governance import V1_SCHEMA

        path = os.path.join(os.path.abspath(self.mktemp()), "ledger.db")
        os.makedirs(os.path.dirname(path))
        conn = sqlite3.connect(path)
        conn.executescript(V1_SCHEMA)
        with conn:
            conn.execute("UPDATE requests SET input_tokens = 155, cache_read_tokens = 50, cache_write_tokens = 5")
            conn.execute("UPDATE rollups SET input_tokens = 530, cache_read_tokens = 30 WHERE agent = 'a'")
        conn.close()
        self.open_ledger(path)
        self.assertEqual(sql(path, "SELECT input_tokens FROM requests"), [(100,)])
        self.assertEqual(sql(path, "SELECT agent, input_tokens FROM rollups ORDER BY agent"), [("a", 500), ("b", 400)])
        self.assertEqual(sql(path, "SELECT value FROM meta WHERE key = 'schema_version'"), [(str(SCHEMA_VERSION),)])

    async def test_a_version_3_file_is_left_alone(self) -> None:
        ledger = self.open_ledger()
        await ledger.record(row("r1", input_tokens=100, cache_read_tokens=50, cache_write_tokens=5))
        await ledger.close()
        self.open_ledger(ledger.path)
        self.assertEqual(sql(ledger.path, "SELECT input_tokens FROM requests"), [(100,)])


class SpillFormatTests(LedgerCase):
    def test_rows_round_trip_with_their_format(self) -> None:
        path = spill_path(os.path.abspath(self.mktemp()), "/var/lib/x/ledger.sqlite3")
        rows = [row("r1", input_tokens=100, cache_read_tokens=50, cache_write_tokens=5)]
        write_spill(path, rows)
        with open(path) as f:
            self.assertEqual(json.loads(f.readline())["format"], 2)
        self.assertEqual(read_spill(path), rows)

    async def test_a_spill_of_an_older_version_is_converted_on_import(self) -> None:
        spill_dir = os.path.abspath(self.mktemp())
        ledger_path = os.path.join(os.path.abspath(self.mktemp()), "ledger.db")
        path = spill_path(spill_dir, ledger_path)
        write_spill(path, [])
        # What a version before schema 3 spilled: no format, every prompt token in input_tokens.
        old = row("s1", input_tokens=1638, cache_read_tokens=20, cache_write_tokens=12)
        from attrs import asdict

        with open(path, "w") as f:
            f.write(json.dumps(asdict(old)) + "\n")
        self.assertEqual(read_spill(path)[0].input_tokens, 1606)
        ledger = self.open_ledger(ledger_path, spill_dir=spill_dir)
        self.assertEqual(
            sql(ledger.path, "SELECT request_id, input_tokens, cache_read_tokens, cache_write_tokens FROM requests"),
            [("s1", 1606, 20, 12)],
        )
        self.assertFalse(os.path.exists(path))
