"""
Several instances on one store: each ledger counts the rows the others
commit (fleet-wide totals), hands them to its subscribers, and re-reads
the budget overrides others change.  Two ledgers in this process stand for
two instances (two workers on one SQLite file here; two hosts on one
PostgreSQL database in tests.store.test_pg_ledger).
"""

from __future__ import annotations

import attrs
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.store.test_ledger import LedgerCase, crash_row, mixed_rows, rounded, row


def next_rows(ledger) -> defer.Deferred:
    """Fires with the next rows of other instances C{ledger} counts (its follower's own pace)."""
    d: defer.Deferred = defer.Deferred()

    def once(rows):
        ledger.on_foreign_rows.remove(once)
        d.callback(rows)

    ledger.on_foreign_rows.append(once)
    return d


class SharedStoreTestsMixin:
    async def test_each_counts_the_others_rows(self) -> None:
        a, b = await self.start_pair()
        mine = mixed_rows()
        theirs = [crash_row(i) for i in range(40)]
        await defer.gatherResults([a.record(r) for r in mine] + [b.record(r) for r in theirs])
        self.assertEqual(await a.follow(), len(theirs))
        self.assertEqual(await b.follow(), len(mine))
        # Once each, however often read.
        self.assertEqual(await a.follow(), 0)
        self.assertEqual(await b.follow(), 0)
        shown = [(t.costs_api(), t.summary(), t.period()) for t in (a.totals(), b.totals())]
        self.assertEqual(rounded(shown[0]), rounded(shown[1]))
        self.assertEqual(a.totals().requests, len(mine) + len(theirs))
        # What an instance starting now rebuilds from the store.
        third = await self.reopen(a)
        self.assertEqual(rounded((third.totals().costs_api(), third.totals().summary(), third.totals().period())),
                         rounded(shown[0]))
        self.assertEqual(await third.follow(), 0)

    async def test_summed_and_row_by_row_count_alike(self) -> None:
        """Without subscribers a ledger reads other instances' rows summed per group: the same totals."""
        a, b = await self.start_pair()
        a.on_foreign_rows.append(lambda rows: None)  # a reads rows, b sums
        mine = mixed_rows()
        theirs = [crash_row(i) for i in range(25)] + [attrs.evolve(r, request_id=f"b-{r.request_id}") for r in mine]
        await defer.gatherResults([a.record(r) for r in mine] + [b.record(r) for r in theirs])
        self.assertEqual((await a.follow(), await b.follow()), (len(theirs), len(mine)))
        self.assertEqual(a._follower.foreign_rows, len(theirs))
        self.assertEqual(b._follower.foreign_rows, len(mine))
        shown = [rounded((t.costs_api(), t.summary(), t.period())) for t in (a.totals(), b.totals())]
        self.assertEqual(shown[0], shown[1])

    async def test_foreign_rows_reach_the_subscribers_in_order(self) -> None:
        a, b = await self.start_pair()
        got = []
        a.on_foreign_rows.append(got.extend)
        await a.record(row("own"))
        rows = [row(f"r{i}", key_id="k1", cost_usd=0.25) for i in range(3)]
        for r in rows:
            await b.record(r)
        await a.follow()
        self.assertEqual([f.row for f in got], rows)
        self.assertEqual({f.instance for f in got}, {b.instance})
        ids = [f.id for f in got]
        self.assertEqual(ids, sorted(ids))
        stored = dict(self.query(a, "SELECT request_id, id FROM requests"))
        self.assertEqual(ids, [stored[r.request_id] for r in rows])

    async def test_followed_every_second_without_asking(self) -> None:
        a, b = await self.start_pair()
        arriving = next_rows(a)
        await b.record(row("r1", cost_usd=0.5))
        [followed] = await arriving
        self.assertEqual(followed.row.request_id, "r1")
        self.assertAlmostEqual(a.totals().costs_api()["total_cost_usd"], 0.5)

    async def test_rows_name_their_instance(self) -> None:
        a, b = await self.start_pair()
        await a.record(row("from-a"))
        await b.record(row("from-b"))
        self.assertEqual(
            sorted(self.query(a, "SELECT request_id, instance FROM requests")),
            [("from-a", a.instance), ("from-b", b.instance)],
        )

    async def test_overrides_reach_the_other_instance(self) -> None:
        a, b = await self.start_pair()
        budget = {"limit_usd": 5, "window": "24h"}
        entry = await a.set_budget_override("agent-x", budget, 1.5, "alice")
        # The change row, committed with the override, tells others to re-read it.
        self.assertEqual(
            self.query(a, "SELECT kind, subject, instance FROM changes"), [("budget_override", "agent-x", a.instance)]
        )
        self.assertIsNone(b.budget_override("agent-x"))
        self.assertEqual(await b.reload_override("agent-x"), entry)
        self.assertEqual(b.budget_override("agent-x"), entry)
        reset = await a.reset_budget("agent-x", "bob")
        await b.reload_override("agent-x")
        self.assertEqual(b.budget_override("agent-x")["reset_at"], reset["reset_at"])
        await a.clear_budget_override("agent-x", forget_reset=True)
        self.assertIsNone(await b.reload_override("agent-x"))
        self.assertEqual(b.budget_overrides(), {})
        self.assertEqual(len(self.query(a, "SELECT id FROM changes")), 3)

    async def test_a_reload_does_not_undo_a_change_on_its_way(self) -> None:
        a, b = await self.start_pair()
        await a.set_budget_override("agent-x", {"limit_usd": 1, "window": "1h"}, None, "alice")
        gate, held = await self.hold(b)
        reload = b.reload_override("agent-x")  # queued behind the hold ...
        mine = b.set_budget_override("agent-x", None, 9.0, "bob")  # ... and so is this change
        gate.set()
        await held
        await reload
        await mine
        self.assertEqual(b.budget_override("agent-x")["spent_offset_usd"], 9.0)
        self.assertEqual(b.budget_override("agent-x")["updated_by"], "bob")


class SqliteSharedTests(SharedStoreTestsMixin, LedgerCase):
    """Two workers on one state file."""

    async def start_pair(self):
        a = self.open_ledger(shared=True, instance="host:1:aa")
        b = self.open_ledger(a.path, shared=True, instance="host:2:bb")
        return a, b

    async def reopen(self, ledger, **kwargs):
        return self.open_ledger(ledger.path, shared=True, **kwargs)


class NotSharedTests(TestCase):
    async def test_one_process_follows_nothing(self) -> None:
        case = LedgerCase()
        case.mktemp = self.mktemp  # type: ignore[method-assign]
        case.addCleanup = self.addCleanup  # type: ignore[method-assign]
        ledger = case.open_ledger()
        self.assertEqual(await ledger.follow(), 0)
        self.assertEqual(ledger.follower_stats()["polls"], 0)
