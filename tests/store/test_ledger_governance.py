"""
The ledger's budget side: C{spend_timeline} (seeding the budget book at
start, aggregated per agent and minute in SQL, rollups included, resets
honoured) and runtime budget overrides (in memory at once, on disk through
the writer thread in queue order with C{record()}, across restarts).

Real files and the real reactor, as in C{test_ledger}; time-dependent
operations (resets) use an injected L{Clock}.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3

from twisted.internet import defer, reactor
from twisted.internet.task import Clock

from cllama_tx.store.ledger import (
    SCHEMA_VERSION,
    LedgerClosed,
    LedgerSchemaError,
    SqliteLedger,
    day_number,
)
from tests.store.test_ledger import DAY, NOON, LedgerCase, rounded, row, sql

MIDNIGHT = day_number(NOON) * DAY  # 00:00 UTC of NOON's day


def expected_timeline(rows, since, resets=None, bucket=60):
    """The timeline computed row by row in Python, as the docs define it."""
    resets = resets or {}
    groups: dict[tuple[str, float], list] = {}
    for r in rows:
        if not r.agent or r.ts < since or r.ts < resets.get(r.agent, r.ts):
            continue
        entry = groups.setdefault((r.agent, int(r.ts / bucket) * float(bucket)), [0.0, 0, 0])
        entry[0] += r.cost_usd
        if 200 <= r.status < 300:
            entry[1] += 1
            if not r.priced:
                entry[2] += 1
    return [
        (agent, ts, cost, counted, unpriced)
        for (agent, ts), (cost, counted, unpriced) in sorted(groups.items())
        if cost or counted
    ]


def busy_rows(n: int, start: float, span: float, seed: int = 7):
    """C{n} rows over C{[start, start + span)}: agents, statuses, prices mixed."""
    rng = random.Random(seed)
    statuses = [200, 200, 200, 201, 204, 299, 300, 400, 403, 429, 499, 500, 502, 0]
    rows = []
    for i in range(n):
        status = rng.choice(statuses)
        priced = rng.random() < 0.8
        rows.append(
            row(
                f"busy-{i}",
                ts=start + rng.random() * span,
                agent=rng.choice(["a", "b", "c", None]),
                status=status,
                priced=priced,
                cost_usd=rng.choice([0.0, 0.001, 0.25, 0.0625]) if priced else 0.0,
            )
        )
    return rows


def totals_by_agent(entries):
    out: dict[str, list] = {}
    for agent, _, cost, counted, unpriced in entries:
        t = out.setdefault(agent, [0.0, 0, 0])
        t[0] += cost
        t[1] += counted
        t[2] += unpriced
    return {agent: (round(c, 9), n, u) for agent, (c, n, u) in out.items()}


class TimelineTestsMixin:
    async def record_all(self, ledger, rows):
        await defer.gatherResults([ledger.record(r) for r in rows])

    async def test_aggregation_matches_raw_rows(self) -> None:
        ledger = await self.start_ledger()
        rows = busy_rows(3000, NOON - 2 * 3600, 3 * 3600)
        await self.record_all(ledger, rows)
        since = NOON - 3600
        timeline = await self.timeline(ledger, since)
        self.assertEqual(rounded(timeline), rounded(expected_timeline(rows, since)))
        # Aggregated: far fewer entries than rows, at most one per agent and minute.
        self.assertLess(len(timeline), len(rows) / 4)
        self.assertEqual(len({(a, ts) for a, ts, *_ in timeline}), len(timeline))
        for agent, ts, cost, counted, unpriced in timeline:
            self.assertIsInstance(agent, str)
            self.assertIsInstance(ts, float)
            self.assertIsInstance(cost, float)
            self.assertIsInstance(counted, int)
            self.assertIsInstance(unpriced, int)
            self.assertGreaterEqual(ts, since - 60)
            self.assertEqual(ts % 60, 0)
            self.assertLessEqual(unpriced, counted)
        # Sorted by agent, then time.
        self.assertEqual(timeline, sorted(timeline))
        # The async twin answers the same from the read pool.
        self.assertEqual(await ledger.spend_timeline_async(since), timeline)
        # Hourly buckets on request.
        self.assertEqual(
            rounded(await self.timeline(ledger, since, bucket_seconds=3600)),
            rounded(expected_timeline(rows, since, bucket=3600)),
        )

    async def test_since_is_inclusive_and_counted_means_2xx(self) -> None:
        ledger = await self.start_ledger()
        since = NOON + 30  # in the middle of a minute
        rows = [
            row("before", ts=since - 0.001, cost_usd=1.0),
            row("at", ts=since, cost_usd=0.5),
            row("later", ts=since + 10, status=201, priced=False, cost_usd=0.0),
            row("cut-off", ts=since + 11, status=499, cost_usd=0.25),  # billed, not counted
            row("refused", ts=since + 12, status=429, cost_usd=0.0),  # neither: nothing added
            row("anon", ts=since + 13, agent=None, cost_usd=9.0),
            row("empty-agent", ts=since + 14, agent="", cost_usd=9.0),
            row("error-only", ts=since + 120, status=500, cost_usd=0.0),  # a minute of nothing
        ]
        await self.record_all(ledger, rows)
        self.assertEqual(
            rounded(await self.timeline(ledger, since)), rounded([("tiverton", NOON, 0.75, 2, 1)])
        )
        self.assertEqual(await self.timeline(ledger, since + 3600), [])

    async def test_bad_arguments_and_closed(self) -> None:
        ledger = self.unstarted_ledger()
        await self.assertFailure(ledger.spend_timeline_async(0), LedgerClosed)
        ledger.startService()
        self.addCleanup(ledger.close)
        await ledger.loaded()
        for since in (float("nan"), float("inf"), True, "0", None):
            await self.assertFailure(ledger.spend_timeline_async(since), ValueError)
        for bucket in (0, -60, 86401, 1.5, True):
            await self.assertFailure(ledger.spend_timeline_async(0, bucket), ValueError)
        self.assertEqual(await ledger.spend_timeline_async(0), [])
        self.assertEqual(await ledger.spend_timeline_async(-1e300), [])
        self.assertEqual(await ledger.spend_timeline_async(1e300), [])
        await ledger.close()
        await self.assertFailure(ledger.spend_timeline_async(0), LedgerClosed)

    async def test_rollups_included_one_entry_per_day(self) -> None:
        ledger = await self.start_ledger()
        start = MIDNIGHT - 10 * DAY
        rows = busy_rows(2000, start, 12 * DAY, seed=11)
        # A late row of a day that will be rolled up, in that day's first minute.
        rows.append(row("late", ts=MIDNIGHT - 8 * DAY + 10, cost_usd=0.5, agent="a"))
        await self.record_all(ledger, rows[:-1])
        before = await self.timeline(ledger, start)
        self.assertEqual(rounded(before), rounded(expected_timeline(rows[:-1], start)))

        cutoff = MIDNIGHT - 5 * DAY
        moved = await ledger.prune(cutoff)
        self.assertGreater(moved, 0)
        await ledger.record(rows[-1])
        after = await self.timeline(ledger, start)
        self.assertEqual(await ledger.spend_timeline_async(start), after)

        old = [e for e in after if e[1] < cutoff]
        recent = [e for e in after if e[1] >= cutoff]
        # Pruned days: one entry per agent and day, at the day's start, exactly
        # the day's rows (the late row merged into its day's entry) ...
        self.assertTrue(old)
        self.assertTrue(all(ts % DAY == 0 for _, ts, *_ in old))
        self.assertEqual(len({(a, ts) for a, ts, *_ in old}), len(old))
        self.assertEqual(
            rounded(old), rounded(expected_timeline([r for r in rows if r.ts < cutoff], start, bucket=DAY))
        )
        # ... days still in requests: per minute as before.
        self.assertEqual(rounded(recent), rounded(expected_timeline(rows[:-1], cutoff)))
        # Nothing is lost by retention: per agent, the sums are the same.
        self.assertEqual(totals_by_agent(after), totals_by_agent(expected_timeline(rows, start)))
        # The same after a restart.
        reopened = await self.reopen(ledger)
        self.assertEqual(await self.timeline(reopened, start), after)
        # A rolled-up day that starts before `since` is left out whole; every
        # entry is at or after `since`.
        since = MIDNIGHT - 8 * DAY + 3600
        partial = await self.timeline(reopened, since)
        self.assertTrue(all(ts >= since for _, ts, *_ in partial))
        self.assertEqual(
            [e for e in partial if e[1] < cutoff],
            [e for e in after if since <= e[1] < cutoff],
        )
        self.assertNotIn(MIDNIGHT - 8 * DAY, {ts for _, ts, *_ in partial})

    async def test_rollup_counts_only_2xx(self) -> None:
        ledger = await self.start_ledger()
        day = MIDNIGHT - 3 * DAY
        await self.record_all(
            ledger,
            [
                row("ok", ts=day + 100, cost_usd=0.25),
                row("ok-unpriced", ts=day + 200, priced=False, cost_usd=0.0),
                row("bad-unpriced", ts=day + 300, status=502, priced=False, cost_usd=0.0),
                row("denied", ts=day + 400, status=403, provider=None, effective_model=None,
                    priced=False, cost_usd=0.0),
                row("redirect", ts=day + 500, status=302, cost_usd=0.0),
            ],
        )
        await ledger.prune(MIDNIGHT)
        self.assertEqual(
            self.query(ledger, "SELECT SUM(requests), SUM(counted_requests), SUM(counted_unpriced_requests) "
                "FROM rollups"),
            [(5, 2, 1)],
        )
        self.assertEqual(rounded(await self.timeline(ledger, day)), rounded([("tiverton", day, 0.25, 2, 1)]))

    async def test_reset_filters_rows_before_it(self) -> None:
        clock = Clock()
        clock.advance(NOON)
        ledger = await self.start_ledger(clock=clock)
        start = MIDNIGHT - 4 * DAY
        rows = busy_rows(1500, start, 4 * DAY + 12 * 3600 - 1, seed=3)
        await self.record_all(ledger, rows)
        await ledger.prune(MIDNIGHT - 2 * DAY)  # two days into rollups

        # A reset of "a" in the middle of the last rolled-up day, another of "b" today.
        clock.advance(-NOON + MIDNIGHT - 2 * DAY - 6 * 3600)
        await ledger.reset_budget("a", "ops")
        clock.advance(MIDNIGHT + 6 * 3600 - clock.seconds())
        await ledger.reset_budget("b", "ops")
        resets = {"a": MIDNIGHT - 2 * DAY - 6 * 3600, "b": MIDNIGHT + 6 * 3600}
        self.assertEqual({a: e["reset_at"] for a, e in ledger.budget_overrides().items()}, resets)

        timeline = await self.timeline(ledger, start)
        for agent, ts, *_ in timeline:
            self.assertGreaterEqual(ts, resets.get(agent, start))
        # "a": its rolled-up day holding the reset is left out whole, every
        # later day is complete.
        a = [e for e in timeline if e[0] == "a"]
        a_rows = [r for r in rows if r.agent == "a" and r.ts >= MIDNIGHT - 2 * DAY]
        self.assertTrue(a_rows)
        self.assertEqual(totals_by_agent(a), totals_by_agent(expected_timeline(a_rows, start)))
        self.assertNotIn(MIDNIGHT - 3 * DAY, {ts for _, ts, *_ in a})
        # "b": rows still in requests are filtered to the second.
        b = [e for e in timeline if e[0] == "b"]
        b_rows = [r for r in rows if r.agent == "b"]
        self.assertEqual(rounded(b), rounded(expected_timeline(b_rows, start, resets)))
        # "c" was never reset: everything counts.
        c = [e for e in timeline if e[0] == "c"]
        c_rows = [r for r in rows if r.agent == "c"]
        self.assertEqual(totals_by_agent(c), totals_by_agent(expected_timeline(c_rows, start)))
        self.assertEqual(await ledger.spend_timeline_async(start), timeline)

        # The resets survive a restart, and so does the filter.
        reopened = await self.reopen(ledger, clock=clock)
        self.assertEqual({a: e["reset_at"] for a, e in reopened.budget_overrides().items()}, resets)
        self.assertEqual(await self.timeline(reopened, start), timeline)

    async def test_reset_counts_before_its_commit(self) -> None:
        clock = Clock()
        clock.advance(NOON)
        ledger = await self.start_ledger(clock=clock)
        await ledger.record(row("old", ts=NOON - 60))
        gate, held = await self.hold(ledger)
        reset = ledger.reset_budget("tiverton", "ops")
        recorded = ledger.record(row("new", ts=NOON + 1, cost_usd=0.5))
        self.assertFalse(reset.called)
        # The reset is in memory already: the timeline honours it at once.
        self.assertEqual(await ledger.spend_timeline_async(0), [])
        gate.set()
        await held
        await reset
        await recorded
        self.assertEqual(rounded(await self.timeline(ledger, 0)), rounded([("tiverton", NOON, 0.5, 1, 0)]))


class TimelineTests(TimelineTestsMixin, LedgerCase):
    async def test_synchronous_reads_at_start(self) -> None:
        """SQLite's timelines can be read on the reactor at start; they check as the async ones do."""
        ledger = self.unstarted_ledger()
        self.assertRaises(LedgerClosed, ledger.spend_timeline, 0)
        ledger.startService()
        self.addCleanup(ledger.close)
        for since in (float("nan"), float("inf"), True, "0", None):
            self.assertRaises(ValueError, ledger.spend_timeline, since)
        for bucket in (0, -60, 86401, 1.5, True):
            self.assertRaises(ValueError, ledger.spend_timeline, 0, bucket)
        self.assertRaises(ValueError, ledger.scope_timeline, "agent", 0)
        await ledger.record(row("k", key_id="k1", cost_usd=0.5))
        self.assertEqual(await self.scope_timeline(ledger, "key_id", 0.0), [("k1", NOON, 0.5, 1, 0)])
        # One process on its file: the seed is read at once (nothing is served yet).
        seeded = ledger.seed_data(NOON - DAY)
        self.assertEqual(self.successResultOf(seeded).keys, [("k1", NOON, 0.5, 1, 0)])
        await ledger.close()
        self.assertRaises(LedgerClosed, ledger.spend_timeline, 0)


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('schema_version', '1');
CREATE TABLE requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE, ts REAL NOT NULL,
    agent TEXT, provider TEXT, requested_model TEXT, effective_model TEXT,
    status INTEGER NOT NULL, stream INTEGER NOT NULL, latency_ms REAL NOT NULL, ttfb_ms REAL,
    input_tokens INTEGER NOT NULL DEFAULT 0, output_tokens INTEGER NOT NULL DEFAULT 0,
    cache_read_tokens INTEGER NOT NULL DEFAULT 0, cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0, cost_usd REAL NOT NULL DEFAULT 0,
    priced INTEGER NOT NULL, estimated INTEGER NOT NULL, key_id TEXT, team_id TEXT, user_id TEXT
);
CREATE INDEX requests_ts ON requests (ts);
CREATE INDEX requests_agent ON requests (agent);
CREATE TABLE rollups (
    day TEXT NOT NULL, agent TEXT NOT NULL DEFAULT '', provider TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '', key_id TEXT NOT NULL DEFAULT '', team_id TEXT NOT NULL DEFAULT '',
    user_id TEXT NOT NULL DEFAULT '', requests INTEGER NOT NULL, priced_requests INTEGER NOT NULL,
    unpriced_requests INTEGER NOT NULL, estimated_requests INTEGER NOT NULL, errors INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL, output_tokens INTEGER NOT NULL, cache_read_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL, cost_usd REAL NOT NULL,
    PRIMARY KEY (day, agent, provider, model, key_id, team_id, user_id)
) WITHOUT ROWID;
INSERT INTO rollups VALUES
    ('2025-11-10', 'a', 'openai', 'gpt-4o', '', '', '', 5, 3, 2, 0, 1, 500, 100, 0, 0, 1.5),
    ('2025-11-10', 'b', 'openai', 'gpt-4o', '', '', '', 4, 0, 4, 0, 1, 400, 80, 0, 0, 0.0);
INSERT INTO requests (request_id, ts, agent, provider, requested_model, effective_model, status, stream,
                      latency_ms, cost_usd, priced, estimated)
VALUES ('kept', 1763380800.0, 'a', 'openai', 'gpt-4o', 'gpt-4o', 200, 0, 1.0, 0.25, 1, 0);
"""


class MigrationTests(LedgerCase):
    async def test_version_1_is_migrated(self) -> None:
        path = os.path.join(os.path.abspath(self.mktemp()), "ledger.db")
        os.makedirs(os.path.dirname(path))
        conn = sqlite3.connect(path)
        conn.executescript(V1_SCHEMA)
        conn.close()
        ledger = self.open_ledger(path)
        self.assertEqual(
            sql(path, "SELECT value FROM meta WHERE key = 'schema_version'"), [(str(SCHEMA_VERSION),)]
        )
        self.assertEqual(ledger.budget_overrides(), {})
        # Version-1 rollups: non-error rows are counted; their unpriced part is
        # bounded by the group's unpriced rows.
        self.assertEqual(
            sql(path, "SELECT agent, counted_requests, counted_unpriced_requests "
                "FROM rollups ORDER BY agent"),
            [("a", 4, 2), ("b", 3, 3)],
        )
        day = (day_number(1763380800.0) - 7) * DAY  # 2025-11-10
        self.assertEqual(
            rounded(ledger.spend_timeline(0)),
            rounded([("a", day, 1.5, 4, 2), ("a", 1763380800.0, 0.25, 1, 0), ("b", day, 0.0, 3, 3)]),
        )
        self.assertEqual(ledger.totals().costs_api()["total_requests"], 10)
        # Overrides work on the migrated file, and pruning fills the new columns.
        await ledger.set_budget_override("a", {"limit_usd": 5, "window": "24h"}, None, "ops")
        self.assertEqual(await ledger.prune(1763380800.0 + DAY), 1)
        await ledger.close()
        reopened = self.open_ledger(path)
        self.assertEqual(reopened.budget_override("a")["budget"], {"limit_usd": 5, "window": "24h"})

    async def test_unreadable_override_refuses_to_start(self) -> None:
        ledger = self.open_ledger()
        await ledger.set_budget_override("a", {"limit_usd": 1, "window": "1h"}, None, "ops")
        await ledger.close()
        conn = sqlite3.connect(ledger.path)
        conn.execute("UPDATE budget_overrides SET budget_json = '[1, 2'")
        conn.commit()
        conn.close()
        again = SqliteLedger(ledger.path, reactor)
        exc = self.assertRaises(LedgerSchemaError, again.startService)
        self.assertIn("'a'", str(exc))
        self.assertFalse(again.running)


class OverrideTestsMixin:
    def stored(self, ledger):
        return {
            agent: (None if budget is None else json.loads(budget), offset, reset_at, updated_at, by)
            for agent, budget, offset, reset_at, updated_at, by in self.query(
                ledger,
                "SELECT agent, budget_json, spent_offset_usd, reset_at, updated_at, updated_by "
                "FROM budget_overrides",
            )
        }

    async def open_clocked(self):
        clock = Clock()
        clock.advance(NOON)
        return await self.start_ledger(clock=clock), clock

    async def test_set_memory_now_disk_on_commit(self) -> None:
        ledger, clock = await self.open_clocked()
        self.assertEqual(ledger.budget_overrides(), {})
        self.assertIsNone(ledger.budget_override("a"))
        gate, held = await self.hold(ledger)
        budget = {"limit_usd": 10, "window": "24h", "behavior": "hard_stop"}
        d = ledger.set_budget_override("a", budget, 1.5, "alice")
        expected = {"budget": budget, "spent_offset_usd": 1.5, "reset_at": None,
                    "updated_at": NOON, "updated_by": "alice"}
        # In memory at once, not yet on disk.
        self.assertEqual(ledger.budget_overrides(), {"a": expected})
        self.assertFalse(d.called)
        self.assertEqual(self.stored(ledger), {})
        gate.set()
        await held
        self.assertEqual(await d, expected)
        self.assertEqual(self.stored(ledger), {"a": (budget, 1.5, None, NOON, "alice")})

    async def test_none_keeps_previous_values(self) -> None:
        ledger, clock = await self.open_clocked()
        first = {"limit_usd": 10, "window": "24h"}
        await ledger.set_budget_override("a", first, None, "alice")
        self.assertIsNone(ledger.budget_override("a")["spent_offset_usd"])
        clock.advance(60)
        await ledger.set_budget_override("a", None, 2.0, "bob")
        self.assertEqual(
            ledger.budget_override("a"),
            {"budget": first, "spent_offset_usd": 2.0, "reset_at": None,
             "updated_at": NOON + 60, "updated_by": "bob"},
        )
        second = {"max_requests": 100, "period": "daily"}
        await ledger.set_budget_override("a", second, None, "carol")
        self.assertEqual(ledger.budget_override("a")["budget"], second)  # replaced whole, not merged
        self.assertEqual(ledger.budget_override("a")["spent_offset_usd"], 2.0)
        self.assertEqual(self.stored(ledger)["a"], (second, 2.0, None, NOON + 60, "carol"))

    async def test_reset_and_clear(self) -> None:
        ledger, clock = await self.open_clocked()
        await ledger.set_budget_override("a", {"limit_usd": 10, "window": "1h"}, 3.0, "alice")
        clock.advance(100)
        entry = await ledger.reset_budget("a", "bob")
        self.assertEqual(entry, {"budget": None, "spent_offset_usd": None, "reset_at": NOON + 100,
                                 "updated_at": NOON + 100, "updated_by": "bob"})
        self.assertEqual(self.stored(ledger)["a"], (None, None, NOON + 100, NOON + 100, "bob"))
        # A new override after the reset keeps the reset.
        clock.advance(100)
        await ledger.set_budget_override("a", {"limit_usd": 20, "window": "1h"}, None, "carol")
        self.assertEqual(ledger.budget_override("a")["reset_at"], NOON + 100)
        # Clearing drops the budget and offset but not the reset ...
        clock.advance(100)
        self.assertIsNone(await ledger.clear_budget_override("a", "dave"))
        self.assertEqual(ledger.budget_override("a"), {"budget": None, "spent_offset_usd": None,
                                                        "reset_at": NOON + 100, "updated_at": NOON + 300,
                                                        "updated_by": "dave"})
        self.assertEqual(self.stored(ledger)["a"], (None, None, NOON + 100, NOON + 300, "dave"))
        # ... unless asked to; an override that was never reset goes whole.
        await ledger.clear_budget_override("a", forget_reset=True)
        await ledger.set_budget_override("b", {"limit_usd": 1, "window": "1h"}, None, "ops")
        await ledger.clear_budget_override("b")
        self.assertEqual(ledger.budget_overrides(), {})
        self.assertEqual(self.stored(ledger), {})
        self.assertIsNone(await ledger.clear_budget_override("nobody"))

    async def test_survives_restart(self) -> None:
        ledger, clock = await self.open_clocked()
        await ledger.set_budget_override("a", {"limit_usd": 10, "window": "24h", "tiers": [
            {"threshold": 0.5, "model": "openai/gpt-4o-mini"}]}, 0.5, "alice")
        await ledger.set_budget_override("b", None, 7.25, "bob")
        await ledger.reset_budget("c", "carol")
        await ledger.record(row("r1"))
        before = ledger.budget_overrides()
        self.assertEqual(set(before), {"a", "b", "c"})
        await ledger.close()
        self.assertEqual(ledger.budget_overrides(), before)  # memory stays readable when closed
        reopened = await self.reopen(ledger)
        self.assertEqual(reopened.budget_overrides(), before)
        self.assertEqual(await reopened.count(), 1)

    async def test_copies_only(self) -> None:
        ledger, clock = await self.open_clocked()
        budget = {"limit_usd": 10, "window": "24h", "tiers": [{"threshold": 0.5, "model": "m"}]}
        returned = await ledger.set_budget_override("a", budget, None, "alice")
        budget["limit_usd"] = 999
        budget["tiers"][0]["threshold"] = 0.9
        returned["budget"]["window"] = "1h"
        ledger.budget_overrides()["a"]["budget"]["limit_usd"] = 5
        ledger.budget_override("a")["budget"]["tiers"].clear()
        self.assertEqual(
            ledger.budget_override("a")["budget"],
            {"limit_usd": 10, "window": "24h", "tiers": [{"threshold": 0.5, "model": "m"}]},
        )

    async def test_bad_arguments_and_closed(self) -> None:
        ledger, clock = await self.open_clocked()
        for budget in ([1], "x", {"limit_usd": float("nan")}, {"x": object()}):
            self.assertRaises(ValueError, ledger.set_budget_override, "a", budget, None, "ops")
        for offset in (-1, float("inf"), float("nan"), True, "1"):
            self.assertRaises(ValueError, ledger.set_budget_override, "a", None, offset, "ops")
        for agent in ("", None, 3):
            self.assertRaises(ValueError, ledger.set_budget_override, agent, None, None, "ops")
            self.assertRaises(ValueError, ledger.reset_budget, agent, "ops")
            self.assertRaises(ValueError, ledger.clear_budget_override, agent)
        self.assertEqual(ledger.budget_overrides(), {})
        await ledger.set_budget_override("a", {"limit_usd": 1, "window": "1h"}, None, "ops")
        await ledger.close()
        before = ledger.budget_overrides()
        await self.assertFailure(ledger.set_budget_override("a", {"limit_usd": 2, "window": "1h"}, None, "x"),
                                 LedgerClosed)
        await self.assertFailure(ledger.reset_budget("a", "x"), LedgerClosed)
        await self.assertFailure(ledger.clear_budget_override("a"), LedgerClosed)
        self.assertEqual(ledger.budget_overrides(), before)  # refused: memory unchanged

    async def test_ordered_with_record(self) -> None:
        ledger, clock = await self.open_clocked()
        gate, held = await self.hold(ledger)
        fired = []

        def on_disk(_, name):
            # When a Deferred fires, everything queued before it is committed.
            fired.append((name, self.query(ledger, "SELECT COUNT(*) FROM requests")[0][0],
                          sorted(self.stored(ledger))))

        one_dollar = {"limit_usd": 1, "window": "1h"}
        ds = [
            ledger.record(row("r1")).addCallback(on_disk, "r1"),
            ledger.set_budget_override("a", one_dollar, None, "x").addCallback(on_disk, "set-a"),
            ledger.record(row("r2")).addCallback(on_disk, "r2"),
            ledger.record(row("r3")).addCallback(on_disk, "r3"),
            ledger.reset_budget("b", "x").addCallback(on_disk, "reset-b"),
            ledger.set_budget_override("a", None, 4.0, "y").addCallback(on_disk, "set-a-again"),
            ledger.clear_budget_override("a", forget_reset=True).addCallback(on_disk, "clear-a"),
            ledger.record(row("r4")).addCallback(on_disk, "r4"),
        ]
        self.assertEqual(set(ledger.budget_overrides()), {"b"})  # memory: every change applied already
        gate.set()
        await held
        await defer.gatherResults(ds)
        names = [f[0] for f in fired]
        self.assertEqual(names, ["r1", "set-a", "r2", "r3", "reset-b", "set-a-again", "clear-a", "r4"])
        by_name = {name: (count, agents) for name, count, agents in fired}
        self.assertGreaterEqual(by_name["set-a"][0], 1)
        self.assertGreaterEqual(by_name["reset-b"][0], 3)
        self.assertGreaterEqual(by_name["clear-a"][0], 3)
        self.assertEqual(by_name["r4"], (4, ["b"]))
        self.assertEqual(ledger.writer_stats()["rows"], 4)

    async def test_failed_write_reloads_memory(self) -> None:
        ledger, clock = await self.open_clocked()
        kept = {"limit_usd": 1, "window": "1h"}
        await ledger.set_budget_override("a", kept, None, "ops")
        await self.refuse_override_writes(ledger, "refused by the test")
        d = ledger.set_budget_override("a", {"limit_usd": 99, "window": "1h"}, None, "mallory")
        d2 = ledger.set_budget_override("new", {"limit_usd": 5, "window": "1h"}, None, "mallory")
        self.assertEqual(ledger.budget_override("a")["budget"]["limit_usd"], 99)  # optimistic
        failure = await self.assertFailure(d, self.refusal_error)
        self.assertIn("refused by the test", str(failure))
        await self.assertFailure(d2, self.refusal_error)
        await ledger._on_writer(lambda conn: None)  # the reloads are done
        self.assertEqual(ledger.budget_override("a")["budget"], kept)
        self.assertEqual(ledger.budget_override("a")["updated_by"], "ops")
        self.assertIsNone(ledger.budget_override("new"))
        # The writer carries on.
        await self.allow_override_writes(ledger)
        await ledger.record(row("after"))
        await ledger.set_budget_override("a", None, 1.0, "ops")
        self.assertEqual(self.stored(ledger)["a"][:2], (kept, 1.0))


class OverrideTests(OverrideTestsMixin, LedgerCase):
    pass
