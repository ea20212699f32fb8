"""
The ledger's passthrough columns (schema 6): a row's path and bytes are
kept and read back, a file of schema 5 is migrated (its rows keep None),
and a spill file written before the columns existed is still imported.
"""

from __future__ import annotations

import json
import os
import sqlite3

import attrs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cllama_tx.store.ledger import migrate_file
from cllama_tx.store.spill import read_spill, spill_path, write_spill
from tests.store.test_ledger import LedgerCase, row, sql
from tests.store.test_pg_ledger import PostgresBackend


class PassthroughRowTestsMixin:
    """Run on SQLite here and on PostgreSQL (L{PostgresPassthroughRowTests})."""

    async def test_path_and_bytes_are_kept(self) -> None:
        ledger = await self.start_ledger()
        await ledger.record(row("p1", path="/_proxy/openai/audio/speech", request_bytes=52, response_bytes=4096,
                                priced=False, cost_usd=0.0))
        await ledger.record(row("c1"))
        [chat, passthrough] = sorted(await ledger.recent(10), key=lambda r: r["request_id"])
        self.assertEqual(
            (chat["path"], chat["request_bytes"], chat["response_bytes"]), (None, None, None)
        )
        self.assertEqual(
            (passthrough["path"], passthrough["request_bytes"], passthrough["response_bytes"]),
            ("/_proxy/openai/audio/speech", 52, 4096),
        )
        # The totals count the unmetered request as unpriced (/costs/api).
        self.assertEqual(ledger.totals().costs_api()["unpriced_requests"], 1)


class PassthroughRowTests(PassthroughRowTestsMixin, LedgerCase):
    pass


class PostgresPassthroughRowTests(PassthroughRowTestsMixin, PostgresBackend, TestCase):
    pass


class MigrationTests(LedgerCase):
    async def test_a_schema_5_file_is_migrated(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "ledger.db")
        os.makedirs(os.path.dirname(path))
        migrate_file(path)
        conn = sqlite3.connect(path)
        for column in ("path", "request_bytes", "response_bytes"):
            conn.execute(f"ALTER TABLE requests DROP COLUMN {column}")
        conn.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
        conn.execute(
            "INSERT INTO requests (request_id, ts, agent, status, stream, latency_ms, priced, estimated) "
            "VALUES ('old', 1.0, 'a', 200, 0, 1.0, 1, 0)"
        )
        conn.commit()
        conn.close()
        self.assertEqual(migrate_file(path), 6)
        self.assertEqual(sql(path, "SELECT value FROM meta WHERE key = 'schema_version'"), [("6",)])
        self.assertEqual(sql(path, "SELECT request_id, path, request_bytes FROM requests"), [("old", None, None)])


class SpillTests(SynchronousTestCase):
    def test_rows_spilled_before_the_columns_existed_are_read(self) -> None:
        directory = os.path.join(os.path.abspath(self.mktemp()), "spill")
        path = spill_path(directory, "/l.db")
        write_spill(path, [row("new", path="/_proxy/openai/embeddings", request_bytes=3, response_bytes=9)])
        doc = attrs.asdict(row("old"))
        for name in ("path", "request_bytes", "response_bytes"):
            del doc[name]
        doc["format"] = 2
        with open(path, "a") as f:
            f.write(json.dumps(doc) + "\n")
        new, old = read_spill(path)
        self.assertEqual((new.path, new.request_bytes, new.response_bytes), ("/_proxy/openai/embeddings", 3, 9))
        self.assertEqual((old.request_id, old.path), ("old", None))
