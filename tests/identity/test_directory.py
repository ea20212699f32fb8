"""
The directory (users, teams and their members, organisations, customers,
added models) on a real SQLite file and a real PostgreSQL, with two
instances on one database as two processes of a fleet: what one writes the
other reads after C{reload} (what the change feed calls), every write has
its change row, concurrent member changes on two instances are both kept,
a restart finds everything, a failed write is undone in memory; and the
records' pure parts (validation, LiteLLM's shapes).
"""

from __future__ import annotations

import calendar

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cllama_tx.identity.customers import customer_info, validate_customer
from cllama_tx.identity.directory import Directory, RecordNotFound
from cllama_tx.identity.entities import Entity, apply_changes
from cllama_tx.identity.litellm_fields import DuplicateKey, InvalidField
from cllama_tx.identity.organizations import organization_info, validate_organization
from cllama_tx.identity.teams import (
    member_entry,
    membership,
    team_info,
    validate_member,
    validate_team,
)
from cllama_tx.identity.users import user_info, validate_user
from cllama_tx.store.database import DatabaseUnavailable
from tests.identity.backends import PostgresBackend, SqliteBackend

NOW = float(calendar.timegm((2026, 11, 17, 12, 0, 0)))


class RecordTests(SynchronousTestCase):
    def test_team_fields(self) -> None:
        fields = validate_team(
            {"team_id": "t1", "team_alias": "Acme", "organization_id": "o1", "max_budget": 10,
             "budget_duration": "30d", "tpm_limit": 1000, "models": ["a", "a", "b"], "team_member_budget": 2,
             "guardrails": ["pii"], "members_with_roles": [], "model_aliases": {"x": "y"}},
            update=False,
        )
        self.assertEqual((fields["alias"], fields["org"], fields["max_budget"], fields["models"]),
                         ("Acme", "o1", 10.0, ("a", "b")))
        self.assertEqual(fields["extra"], {"team_member_budget": 2.0, "guardrails": ["pii"]})
        self.assertNotIn("team_id", fields)
        with self.assertRaises(InvalidField) as caught:
            validate_team({"max_budget": "ten"}, update=False)
        self.assertEqual(caught.exception.field, "max_budget")
        with self.assertRaises(InvalidField) as caught:
            validate_team({"max_budgte": 1}, update=False)
        self.assertEqual(caught.exception.field, "max_budgte")
        self.assertEqual(validate_team({"team_member_budget": None}, update=True), {"extra": {"team_member_budget": None}})

    def test_members(self) -> None:
        self.assertEqual(validate_member({"user_id": "u1", "role": "admin"}), ("u1", "admin", None))
        self.assertEqual(validate_member({"user_email": "a@b.c"}), ("a@b.c", "user", "a@b.c"))
        for bad in ({"role": "user"}, {"user_id": "u", "role": "owner"}, "u1"):
            with self.assertRaises(InvalidField):
                validate_member(bad)

    def test_member_budget_and_team_defaults(self) -> None:
        team = Entity("team", "t1", members={
            "own": member_entry("user", None, {"max_budget": 1.0, "budget_duration": "1d"}, NOW),
            "default": member_entry("admin", "d@x", {}, NOW),
        }, extra={"team_member_budget": 5.0, "team_member_rpm_limit": 3})
        own = membership(team, "own")
        self.assertEqual((own.max_budget, own.budget_duration, own.budget_anchor, own.rpm_limit), (1.0, "1d", NOW, 3))
        default = membership(team, "default")
        self.assertEqual((default.max_budget, default.role, default.user_email), (5.0, "admin", "d@x"))
        self.assertIsNone(membership(team, "stranger"))

    def test_apply_changes_merges_entries(self) -> None:
        doc = {"members": {"a": {"role": "user"}, "b": {"role": "user"}}, "extra": {"x": 1}, "budget_duration": "1d"}
        changed = apply_changes(doc, {"members": {"b": None, "c": {"role": "admin"}}, "extra": {"y": 2},
                                      "budget_duration": "7d"}, NOW)
        self.assertEqual(changed["members"], {"a": {"role": "user"}, "c": {"role": "admin"}})
        self.assertEqual(changed["extra"], {"x": 1, "y": 2})
        self.assertEqual(changed["budget_anchor"], NOW)
        self.assertEqual(doc["members"], {"a": {"role": "user"}, "b": {"role": "user"}})  # not changed in place

    def test_user_customer_organization_fields(self) -> None:
        self.assertEqual(validate_user({"user_alias": "Bob", "user_role": "internal_user", "max_budget": 3},
                                       update=False)["alias"], "Bob")
        for doc, field in (({"password": "x"}, "password"), ({"user_role": "god"}, "user_role")):
            with self.assertRaises(InvalidField) as caught:
                validate_user(doc, update=False)
            self.assertEqual(caught.exception.field, field)
        with self.assertRaises(InvalidField) as caught:
            validate_customer({"max_budget": 1, "budget_id": "b"}, update=False)
        self.assertEqual(caught.exception.field, "budget_id")
        with self.assertRaises(InvalidField):
            validate_customer({"allowed_model_region": "mars"}, update=False)
        self.assertEqual(validate_organization({"organization_alias": "Org", "models": ["a"]}, update=False)["alias"],
                         "Org")

    def test_litellm_shapes(self) -> None:
        team = Entity("team", "t1", alias="Acme", max_budget=10.0, org="o1",
                      members={"u1": member_entry("admin", None, {}, NOW)}, created_at=NOW, updated_at=NOW)
        info = team_info(team, {"fast": "openai/gpt-4o-mini"}, 1.5, "2026-12-01T00:00:00+00:00")
        self.assertEqual((info["team_id"], info["team_alias"], info["organization_id"], info["admins"],
                          info["members_with_roles"], info["spend"], info["max_budget"]),
                         ("t1", "Acme", "o1", ["u1"], [{"user_id": "u1", "user_email": None, "role": "admin"}], 1.5,
                          10.0))
        self.assertEqual(info["litellm_model_table"], {"model_aliases": {"fast": "openai/gpt-4o-mini"}})
        user = user_info(Entity("user", "u1", max_budget=2.0), ["t1"], 0.5, None)
        self.assertEqual((user["user_id"], user["teams"], user["max_budget"], user["user_role"]),
                         ("u1", ["t1"], 2.0, "internal_user"))
        org = organization_info(Entity("org", "o1", alias="Org", max_budget=7.0), [{"team_id": "t1"}], 1.0, None)
        self.assertEqual((org["organization_alias"], org["litellm_budget_table"]["max_budget"], org["teams"]),
                         ("Org", 7.0, [{"team_id": "t1"}]))
        customer = customer_info(Entity("customer", "c1", max_budget=1.0, blocked=True), 0.25, None)
        self.assertEqual((customer["user_id"], customer["blocked"], customer["spend"],
                          customer["litellm_budget_table"]["max_budget"]), ("c1", True, 0.25, 1.0))


class DirectoryMixin:
    async def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.database = await self.make_database()
        self.a = await self.directory("host-a:1:aa")
        self.b = await self.directory("host-b:2:bb")

    async def directory(self, instance) -> Directory:
        directory = Directory(self.database, self.clock, instance=instance, reactor=reactor)
        directory.startService()
        self.addCleanup(directory.stopService)
        await directory.when_loaded()
        return directory

    async def changes(self):
        return await self.database.run(
            lambda tx: tx.execute("SELECT instance, kind, subject FROM changes ORDER BY id").fetchall()
        )

    async def test_records_reach_the_other_instance(self):
        created = await self.a.create("team", "t1", validate_team({"max_budget": 5, "team_alias": "Acme"},
                                                                  update=False))
        self.assertEqual((created.alias, created.max_budget, created.budget_anchor), ("Acme", 5.0, NOW))
        self.assertIsNone(self.b.team("t1"))
        await self.b.reload("team", "t1")
        self.assertEqual(self.b.team("t1"), created)
        await self.a.update("team", "t1", {"max_budget": 7.0})
        await self.b.reload("team", "t1")
        self.assertEqual(self.b.team("t1").max_budget, 7.0)
        await self.a.delete("team", ["t1"])
        await self.b.reload("team", "t1")
        self.assertIsNone(self.b.team("t1"))
        self.assertEqual(
            [tuple(r) for r in await self.changes()],
            [("host-a:1:aa", "team", "t1")] * 3,
        )

    async def test_member_changes_on_two_instances_are_both_kept(self):
        await self.a.create("team", "t1", {"members": {}})
        await self.b.reload("team", "t1")
        # Each instance adds a member to its own (stale) view: the database merges.
        await self.a.update("team", "t1", {"members": {"u1": member_entry("user", None, {}, NOW)}})
        updated = await self.b.update("team", "t1", {"members": {"u2": member_entry("admin", None, {}, NOW)}})
        self.assertEqual(sorted(updated.members), ["u1", "u2"])
        self.assertEqual(sorted(self.b.team("t1").members), ["u1", "u2"])
        self.assertEqual(self.b.member("t1", "u2").role, "admin")
        self.assertEqual(self.b.teams_of("u1"), ["t1"])

    async def test_every_kind_survives_a_restart(self):
        await self.a.create("team", "t1", {"org": "o1"})
        await self.a.create("user", "u1", {"max_budget": 3.0})
        await self.a.create("org", "o1", {"alias": "Org"})
        await self.a.create("customer", "c1", {"blocked": True})
        await self.a.create("model", "m1", {"model_name": "gpt", "litellm_params": {"model": "openai/gpt-4o"}})
        fresh = await self.directory("host-c:3:cc")
        self.assertEqual(fresh.team("t1").org, "o1")
        self.assertEqual(fresh.user("u1").max_budget, 3.0)
        self.assertEqual(fresh.organization("o1").alias, "Org")
        self.assertTrue(fresh.customer("c1").blocked)
        self.assertEqual(fresh.model("m1")["litellm_params"], {"model": "openai/gpt-4o"})
        self.assertEqual([t.id for t in fresh.teams_in("o1")], ["t1"])

    async def test_ids_are_unique_across_instances(self):
        await self.a.create("user", "u1", {})
        with self.assertRaises(DuplicateKey):
            await self.b.create("user", "u1", {})
        self.assertIsNone(self.b.user("u1"))  # taken back from memory
        with self.assertRaises(DuplicateKey):
            await self.a.create("user", "u1", {})

    async def test_missing_records(self):
        with self.assertRaises(RecordNotFound):
            await self.a.update("team", "nope", {"max_budget": 1.0})
        await self.a.create("team", "t1", {})
        await self.b.reload("team", "t1")
        await self.a.delete("team", ["t1"])
        with self.assertRaises(RecordNotFound):
            await self.b.update("team", "t1", {"max_budget": 1.0})
        self.assertIsNone(self.b.team("t1"))

    async def test_a_failed_write_is_undone_in_memory(self):
        await self.a.create("team", "t1", {"max_budget": 1.0})
        await self.make_unavailable(self.database)
        with self.assertRaises(DatabaseUnavailable):
            await self.a.update("team", "t1", {"max_budget": 2.0})
        self.assertEqual(self.a.team("t1").max_budget, 1.0)
        with self.assertRaises(DatabaseUnavailable):
            await self.a.create("user", "u9", {})
        self.assertIsNone(self.a.user("u9"))
        await self.make_available(self.database)

    async def test_observers_hear_every_change(self):
        heard = []
        self.b.on_change.append(lambda kind, record_id: heard.append((kind, record_id)))
        await self.a.create("model", "m1", {"model_name": "x", "litellm_params": {"model": "openai/x"}})
        await self.b.reload("model", "m1")
        await self.b.create("customer", "c1", {})
        self.assertEqual(heard, [("model", "m1"), ("customer", "c1")])


class SqliteDirectoryTests(DirectoryMixin, SqliteBackend, TestCase):
    pass


class PostgresDirectoryTests(DirectoryMixin, PostgresBackend, TestCase):
    pass
