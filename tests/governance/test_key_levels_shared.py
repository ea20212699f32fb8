"""
The levels above a key decided across instances: two governances, each
with its own budget book and a coordinator on one real PostgreSQL (as two
hosts of a fleet), admit together what one would: a team budget, an
organisation's spend committed by the other instance, and
C{max_parallel_requests} held across both.
"""

from __future__ import annotations

import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from cllama_tx.governance.budgets import BudgetBook
from cllama_tx.governance.engine import Governance
from cllama_tx.governance.ratelimit import RateLimiter
from cllama_tx.identity.entities import Entity
from cllama_tx.identity.key_model import VirtualKey
from cllama_tx.identity.principals import KeyPrincipal
from cllama_tx.store.coordination import Coordinator
from cllama_tx.store.database import parse_database_url
from cllama_tx.store.postgres import PostgresDatabase
from cllama_tx.surfaces.errors import ProxyError
from cllama_tx.testing.postgres import shared_cluster
from tests.governance.test_key_levels import Directory, Ex, FakePricing, chat, worst


class SharedLevelTests(TestCase):
    async def setUp(self):
        url = parse_database_url(shared_cluster().database())
        self.database = PostgresDatabase(url, reactor, threads=4)
        self.addCleanup(self.database.close)
        await self.database.connect_and_migrate()
        self.directory = Directory(
            Entity("team", "t1", max_budget=worst() * 3.5, org="o1"),
            Entity("org", "o1", max_budget=1.0),
            Entity("team", "t2", max_parallel_requests=2),
        )
        self.a = await self.governance("host-a:1:aa")
        self.b = await self.governance("host-b:2:bb")

    async def governance(self, name):
        coordinator = Coordinator(self.database, reactor, instance=name)
        await coordinator.register()
        return Governance(clock=reactor, book=BudgetBook(reactor, FakePricing()), limiter=RateLimiter(reactor),
                          directory=self.directory, coordinator=coordinator)

    def key(self, name, **fields):
        return KeyPrincipal(VirtualKey(token_hash=name * 64, key_name="sk-...abcd", created_at=reactor.seconds(),
                                       **fields))

    async def attempt(self, governance, principal):
        try:
            return await governance.admit(Ex(), principal, chat())
        except ProxyError as error:
            return error

    async def test_a_team_budget_across_instances(self):
        """Ten admissions over two instances against a team budget of three and a half: three pass."""
        keys = [self.key(str(i), team_id="t1") for i in range(10)]
        results = await defer.gatherResults([
            defer.ensureDeferred(self.attempt(self.a if i % 2 else self.b, keys[i])) for i in range(10)
        ])
        admitted = [r for r in results if not isinstance(r, ProxyError)]
        self.assertEqual(len(admitted), 3)
        refusals = {(r.status, r.code) for r in results if isinstance(r, ProxyError)}
        self.assertEqual(refusals, {(429, "budget_held")})  # room held by the three in flight
        held = await self.database.run(lambda tx: tx.execute(
            "SELECT COUNT(*) FROM reservations WHERE scope = 'team:t1'").fetchone()[0])
        self.assertEqual(held, 3)

    async def test_an_organisation_s_spend_committed_elsewhere_counts(self):
        await self.database.run(lambda tx: tx.execute(
            "INSERT INTO requests (request_id, ts, agent, status, stream, latency_ms, cost_usd, priced, estimated, "
            "team_id, organization_id, instance) VALUES (?, ?, 'x', 200, 0, 1.0, 1.0, 1, 0, 'other', 'o1', ?)",
            (os.urandom(8).hex(), reactor.seconds(), "host-b:2:bb")))
        error = await self.attempt(self.a, self.key("k", team_id="t1"))
        self.assertEqual((error.status, error.error_type), (422, "budget_exceeded"))
        self.assertIn("Organization=o1", error.message)

    async def test_requests_in_flight_across_instances(self):
        first = await self.attempt(self.a, self.key("1", team_id="t2"))
        second = await self.attempt(self.b, self.key("2", team_id="t2"))
        third = await self.attempt(self.a, self.key("3", team_id="t2"))
        self.assertFalse(isinstance(first, ProxyError) or isinstance(second, ProxyError))
        self.assertEqual((third.status, third.code), (429, "parallel_limited"))
        ids = list(second.shared_reservations)
        self.b.abandon(Ex(), second)  # releases them in the store too; wait until they are gone
        await self.b._coordinator.release(ids)
        fourth = await self.attempt(self.a, self.key("3", team_id="t2"))
        self.assertNotIsInstance(fourth, ProxyError)
