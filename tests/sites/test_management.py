"""
LiteLLM's management API over real sockets, on the proxy the daemon
builds (a real SQLite file, a fake provider): teams and their members,
users, organisations, customers and added models created, read, changed
and deleted with LiteLLM's request fields, answer shapes, statuses and
error bodies; the budgets they set enforced on inference, together; the
keys' new endpoints (regenerate, health, reset_spend); the spend endpoints
and the health endpoints.
"""

from __future__ import annotations

import json
import os
import uuid

from twisted.trial.unittest import TestCase

from cllama_tx.identity.virtual_keys import hash_key
from cllama_tx.testing import Reply, openai_completion
from tests.secret_scan import SCANNER
from tests.support import MASTER_KEY, ProxyHarness, chat_body

PRICES = {"openai": {"gpt-test": {"input": 2.0, "output": 8.0}, "gpt-mini": {"input": 1.0, "output": 2.0}}}
ERROR_FIELDS = {"message", "type", "param", "code"}


class ManagementCase(TestCase):
    async def setUp(self):
        prices = os.path.abspath(self.mktemp())
        with open(prices, "w") as f:
            json.dump(PRICES, f)
        self.h = await ProxyHarness(self, pricing_file=prices, fake_providers=("openai",)).start()
        self.replies = 0

    async def call(self, method, path, doc=None, token=MASTER_KEY, params=None):
        headers = {"Content-Type": ["application/json"]}
        if token is not None:
            headers["Authorization"] = [f"Bearer {token}"]
        kwargs = {"headers": headers}
        if doc is not None:
            kwargs["data"] = json.dumps(doc).encode()
        if params is not None:
            kwargs["params"] = params
        response = await self.h.http.request(method.upper(), self.h.base_url + path, **kwargs)
        content = await response.content()
        return response.code, (json.loads(content) if content else None)

    async def ok(self, method, path, doc=None, **kwargs):
        code, body = await self.call(method, path, doc, **kwargs)
        self.assertEqual(code, 200, body)
        return body

    def assertError(self, code, body, status, param=None):
        self.assertEqual(code, status, body)
        self.assertEqual(set(body), {"error"})
        self.assertEqual(set(body["error"]), ERROR_FIELDS)
        self.assertEqual((body["error"]["code"], body["error"]["param"]), (str(status), param))
        return body["error"]["message"]

    async def mint(self, **fields):
        body = await self.ok("post", "/key/generate", fields)
        SCANNER.register(body["key"])
        return body["key"]

    async def chat(self, key, cost_tokens=(10, 100), model="openai/gpt-test", **extra):
        """One answered request; returns the answer (its id is unique)."""
        self.replies += 1
        answer_id = f"chatcmpl-{self.replies}-{uuid.uuid4().hex[:8]}"
        self.h.fake.enqueue(Reply(json=openai_completion("ok", model.split("/")[-1], *cost_tokens, id=answer_id)))
        response = await self.h.chat(chat_body(model=model, max_tokens=200, **extra), token=key)
        body = await response.json()
        self.assertEqual(response.code, 200, body)
        return body

    async def refused(self, key, model="openai/gpt-test", **extra):
        response = await self.h.chat(chat_body(model=model, max_tokens=200, **extra), token=key)
        return response.code, (await response.json())["error"]


class TeamTests(ManagementCase):
    async def test_a_team_without_id_or_budget(self):
        team = await self.ok("post", "/team/new", {"team_alias": "Acme"})
        uuid.UUID(team["team_id"])  # made for it, as LiteLLM does
        self.assertEqual((team["team_alias"], team["max_budget"], team["spend"], team["members_with_roles"]),
                         ("Acme", None, 0.0, []))
        info = await self.ok("get", "/team/info", params={"team_id": team["team_id"]})
        self.assertEqual(set(info), {"team_id", "team_info", "keys", "team_memberships"})
        self.assertEqual(info["team_info"]["team_alias"], "Acme")
        listed = await self.ok("get", "/team/list")
        self.assertEqual([t["team_id"] for t in listed], [team["team_id"]])

    async def test_members_and_their_budgets(self):
        await self.ok("post", "/team/new", {"team_id": "t1", "members_with_roles": [{"role": "admin", "user_id": "boss"}],
                                            "team_member_budget": 5})
        added = await self.ok("post", "/team/member_add",
                              {"team_id": "t1", "member": {"role": "user", "user_id": "u1"}, "max_budget_in_team": 1.5})
        self.assertEqual(added["updated_team_memberships"][0]["litellm_budget_table"]["max_budget"], 1.5)
        self.assertEqual(sorted(added["members"]), ["boss", "u1"])
        code, body = await self.call("post", "/team/member_add", {"team_id": "t1", "member": {"role": "user", "user_id": "u1"}})
        self.assertError(code, body, 400, "member")
        updated = await self.ok("post", "/team/member_update", {"team_id": "t1", "user_id": "u1", "max_budget_in_team": 2,
                                                                "role": "admin", "rpm_limit": 9})
        self.assertEqual((updated["max_budget_in_team"], updated["role"], updated["rpm_limit"]), (2.0, "admin", 9))
        info = await self.ok("get", "/team/info", params={"team_id": "t1"})
        budgets = {m["user_id"]: m["litellm_budget_table"]["max_budget"] for m in info["team_memberships"]}
        self.assertEqual(budgets, {"boss": 5.0, "u1": 2.0})  # the team's default, and u1's own
        await self.ok("post", "/team/member_delete", {"team_id": "t1", "user_id": "u1"})
        info = await self.ok("get", "/team/info", params={"team_id": "t1"})
        self.assertEqual(info["team_info"]["members"], ["boss"])

    async def test_update_block_models_and_delete(self):
        await self.ok("post", "/team/new", {"team_id": "t1", "model_aliases": {"fast": "openai/gpt-mini"}})
        key = await self.mint(team_id="t1")
        await self.chat(key, model="fast", cost_tokens=(5, 5))
        self.assertEqual(self.h.fake.received[-1].json["model"], "gpt-mini")
        updated = await self.ok("post", "/team/update", {"team_id": "t1", "max_budget": 3, "budget_duration": "1d"})
        self.assertEqual((updated["max_budget"], updated["budget_duration"]), (3.0, "1d"))
        self.assertTrue(updated["budget_reset_at"].endswith("T00:00:00+00:00"))
        await self.ok("post", "/team/block", {"team_id": "t1"})
        code, error = await self.refused(key)
        self.assertEqual((code, error["type"]), (401, "auth_error"))
        await self.ok("post", "/team/unblock", {"team_id": "t1"})
        await self.ok("post", "/team/model/add", {"team_id": "t1", "models": ["openai/gpt-mini"]})
        code, error = await self.refused(key)  # gpt-test is not among the team's models now
        self.assertEqual((code, error["type"], error["param"]), (403, "team_model_access_denied", "model"))
        deleted = await self.ok("post", "/team/delete", {"team_ids": ["t1"]})
        self.assertEqual(deleted, {"deleted_teams": ["t1"], "deleted_keys": 1})
        response = await self.h.chat(chat_body(model="openai/gpt-mini"), token=key)
        self.assertEqual(response.code, 401)  # the team's keys went with it
        code, body = await self.call("get", "/team/info", params={"team_id": "t1"})
        self.assertError(code, body, 404, "team_id")

    async def test_refusals(self):
        code, body = await self.call("post", "/team/new", {"team_id": "t1"}, token=None)
        self.assertError(code, body, 401)
        await self.ok("post", "/team/new", {"team_id": "t1"})
        code, body = await self.call("post", "/team/new", {"team_id": "t1"})
        self.assertError(code, body, 400, "team_id")
        code, body = await self.call("post", "/team/new", {"max_budget": "lots"})
        self.assertError(code, body, 400, "max_budget")
        code, body = await self.call("post", "/team/update", {"team_id": "nope", "max_budget": 1})
        self.assertError(code, body, 404, "team_id")
        code, body = await self.call("get", "/team/new")
        self.assertError(code, body, 405)
        code, body = await self.call("get", "/team/nothing-here")
        self.assertError(code, body, 404)


class LevelTests(ManagementCase):
    async def test_every_level_is_billed_and_enforced(self):
        await self.ok("post", "/organization/new", {"organization_id": "o1", "organization_alias": "Org", "max_budget": 100})
        await self.ok("post", "/team/new", {"team_id": "t1", "organization_id": "o1", "max_budget": 100})
        await self.ok("post", "/user/new", {"user_id": "u1", "max_budget": 100, "auto_create_key": False,
                                            "teams": [{"team_id": "t1", "max_budget_in_team": 100}]})
        await self.ok("post", "/customer/new", {"user_id": "c1", "max_budget": 100})
        key = await self.mint(team_id="t1", user_id="u1")
        answers = [await self.chat(key, user="c1") for _ in range(3)]
        await self.h.committed()
        rows = await self.h.ledger_rows()
        total = sum(r["cost_usd"] for r in rows)
        self.assertGreater(total, 0)
        self.assertEqual({(r["organization_id"], r["end_user"], r["team_id"], r["user_id"]) for r in rows},
                         {("o1", "c1", "t1", "u1")})
        self.assertEqual([r["response_id"] for r in rows], [a["id"] for a in answers])
        spends = {
            "team": (await self.ok("get", "/team/info", params={"team_id": "t1"}))["team_info"]["spend"],
            "member": (await self.ok("get", "/team/info", params={"team_id": "t1"}))["team_memberships"][0]["spend"],
            "user": (await self.ok("get", "/user/info", params={"user_id": "u1"}))["user_info"]["spend"],
            "org": (await self.ok("get", "/organization/info", params={"organization_id": "o1"}))["spend"],
            "customer": (await self.ok("get", "/customer/info", params={"end_user_id": "c1"}))["spend"],
            "key": (await self.ok("get", "/key/info", params={"key": key}))["info"]["spend"],
        }
        for level, spend in spends.items():
            self.assertAlmostEqual(spend, total, places=9, msg=level)
        # The customer's budget is spent: refused, whatever else has room.
        await self.ok("post", "/customer/update", {"user_id": "c1", "max_budget": total})
        code, error = await self.refused(key, user="c1")
        self.assertEqual((code, error["type"], error["code"]), (422, "budget_exceeded", "422"))
        self.assertTrue(error["message"].startswith("Budget has been exceeded! End User=c1 Current cost: "), error)
        await self.chat(key, user="another-customer")
        # Spend set through the API starts the count again.
        await self.ok("post", "/customer/update", {"user_id": "c1", "spend": 0})
        await self.chat(key, user="c1")

    async def test_a_member_budget_within_the_team(self):
        await self.ok("post", "/team/new", {"team_id": "t1"})
        await self.ok("post", "/team/member_add", {"team_id": "t1", "member": {"role": "user", "user_id": "u1"},
                                                   "max_budget_in_team": 0.0000001})
        key = await self.mint(team_id="t1", user_id="u1")
        code, error = await self.refused(key)
        self.assertEqual(code, 422)
        self.assertIn("User=u1 in Team=t1", error["message"])
        other = await self.mint(team_id="t1", user_id="u2")
        await self.chat(other)

    async def test_an_organisation_budget_over_its_teams(self):
        await self.ok("post", "/organization/new", {"organization_id": "o1", "organization_alias": "O", "max_budget": 0})
        await self.ok("post", "/team/new", {"team_id": "t1", "organization_id": "o1"})
        key = await self.mint(team_id="t1")
        code, error = await self.refused(key)
        self.assertEqual(code, 422)
        self.assertIn("Organization=o1", error["message"])
        await self.ok("patch", "/organization/update", {"organization_id": "o1", "max_budget": 10})
        await self.chat(key)


class UserTests(ManagementCase):
    async def test_user_lifecycle(self):
        await self.ok("post", "/team/new", {"team_id": "t1"})
        user = await self.ok("post", "/user/new", {"user_email": "a@b.c", "teams": ["t1"], "max_budget": 2,
                                                   "key_alias": "first"})
        SCANNER.register(user["key"])
        uuid.UUID(user["user_id"])
        self.assertEqual((user["user_email"], user["teams"], user["max_budget"], user["key_alias"]),
                         ("a@b.c", ["t1"], 2.0, "first"))
        await self.chat(user["key"])  # the key made with the user works
        info = await self.ok("get", "/user/info", params={"user_id": user["user_id"]})
        self.assertEqual(set(info), {"user_id", "user_info", "keys", "teams"})
        self.assertEqual([k["key_alias"] for k in info["keys"]], ["first"])
        self.assertEqual(info["teams"], [{"team_id": "t1", "team_alias": None}])
        updated = await self.ok("post", "/user/update", {"user_id": user["user_id"], "user_alias": "Ann", "rpm_limit": 5})
        self.assertEqual((updated["user_alias"], updated["rpm_limit"]), ("Ann", 5))
        for i in range(3):
            await self.ok("post", "/user/new", {"user_id": f"extra-{i}", "auto_create_key": False})
        page = await self.ok("get", "/user/list", params={"page": 2, "page_size": 3})
        self.assertEqual((page["total"], page["page"], page["total_pages"], len(page["users"])), (4, 2, 2, 1))
        deleted = await self.ok("post", "/user/delete", {"user_ids": [user["user_id"]]})
        self.assertEqual(deleted["deleted_keys"], 1)
        response = await self.h.chat(chat_body(model="openai/gpt-test"), token=user["key"])
        self.assertEqual(response.code, 401)
        info = await self.ok("get", "/team/info", params={"team_id": "t1"})
        self.assertEqual(info["team_info"]["members"], [])
        code, body = await self.call("post", "/user/new", {"password": "secret"})
        self.assertError(code, body, 400, "password")


class CustomerAndOrganizationTests(ManagementCase):
    async def test_customers(self):
        made = await self.ok("post", "/customer/new", {"user_id": "c1", "alias": "Shop", "max_budget": 1,
                                                       "budget_duration": "30d", "allowed_model_region": "eu"})
        self.assertEqual((made["alias"], made["litellm_budget_table"]["max_budget"], made["allowed_model_region"]),
                         ("Shop", 1.0, "eu"))
        self.assertTrue(made["litellm_budget_table"]["budget_reset_at"].endswith("-01T00:00:00+00:00"))
        await self.ok("post", "/end_user/new", {"user_id": "c2"})  # LiteLLM's older name
        self.assertEqual([c["user_id"] for c in await self.ok("get", "/customer/list")], ["c1", "c2"])
        await self.ok("post", "/customer/block", {"user_ids": ["c1"]})
        key = await self.mint()
        code, error = await self.refused(key, user="c1")
        self.assertEqual((code, error["type"]), (401, "auth_error"))
        await self.ok("post", "/customer/unblock", {"user_ids": ["c1"]})
        await self.chat(key, user="c1")
        self.assertEqual(await self.ok("post", "/customer/delete", {"user_ids": ["c1", "c2"]}),
                         {"deleted_customers": ["c1", "c2"]})
        code, body = await self.call("get", "/customer/info", params={"end_user_id": "c1"})
        self.assertError(code, body, 404, "user_id")
        code, body = await self.call("post", "/customer/new", {"user_id": "c3", "max_budget": 1, "budget_id": "b"})
        self.assertError(code, body, 400, "budget_id")

    async def test_organizations(self):
        org = await self.ok("post", "/organization/new", {"organization_alias": "Org", "max_budget": 50, "models": ["a"]})
        org_id = org["organization_id"]
        self.assertEqual((org["organization_alias"], org["litellm_budget_table"]["max_budget"], org["models"]),
                         ("Org", 50.0, ["a"]))
        await self.ok("post", "/team/new", {"team_id": "t1", "organization_id": org_id})
        added = await self.ok("post", "/organization/member_add",
                              {"organization_id": org_id, "member": {"user_id": "u1", "role": "org_admin"}})
        self.assertEqual(added["updated_organization_memberships"][0]["user_role"], "org_admin")
        info = await self.ok("get", "/organization/info", params={"organization_id": org_id})
        self.assertEqual((info["teams"], [m["user_id"] for m in info["members"]]),
                         ([{"team_id": "t1", "team_alias": None}], ["u1"]))
        self.assertEqual(len(await self.ok("get", "/organization/list")), 1)
        await self.ok("delete", "/organization/delete", {"organization_ids": [org_id]})
        team = await self.ok("get", "/team/info", params={"team_id": "t1"})
        self.assertIsNone(team["team_info"]["organization_id"])  # the team stays, without it
        code, body = await self.call("put", "/organization/update", {"organization_id": org_id})
        self.assertError(code, body, 405)


class KeyEndpointTests(ManagementCase):
    async def test_every_litellm_field_comes_back(self):
        made = await self.ok("post", "/key/generate", {
            "soft_budget": 1, "max_parallel_requests": 3, "tags": ["prod"], "organization_id": "o1",
            "model_max_budget": {"openai/gpt-test": {"budget_limit": "0.5", "time_period": "1d"}},
            "model_rpm_limit": {"openai/gpt-test": 2}, "config": {"x": 1}, "guardrails": ["pii"],
            "key_type": "llm_api", "tpd_limit": 9, "budget_duration": "6h", "max_budget": 4,
        })
        SCANNER.register(made["key"])
        info = (await self.ok("get", "/key/info", params={"key": made["key"]}))["info"]
        for name, value in [("soft_budget", 1.0), ("max_parallel_requests", 3), ("tags", ["prod"]),
                            ("organization_id", "o1"), ("model_rpm_limit", {"openai/gpt-test": 2}),
                            ("config", {"x": 1}), ("guardrails", ["pii"]), ("key_type", "llm_api"), ("tpd_limit", 9),
                            ("model_max_budget", {"openai/gpt-test": {"max_budget": 0.5, "budget_duration": "1d"}})]:
            self.assertEqual(info[name], value, name)
        self.assertIsNotNone(info["budget_reset_at"])
        self.assertEqual(info["spend"], 0.0)

    async def test_regenerate(self):
        key = await self.mint(key_alias="session", max_budget=5, team_id="t9")
        await self.chat(key)
        await self.h.committed()
        spent = (await self.ok("get", "/key/info", params={"key": key}))["info"]["spend"]
        new = await self.ok("post", f"/key/{hash_key(key)}/regenerate", {"max_budget": 6})
        SCANNER.register(new["key"])
        self.assertNotEqual(new["key"], key)
        self.assertEqual((new["key_alias"], new["team_id"], new["max_budget"]), ("session", "t9", 6.0))
        self.assertAlmostEqual(new["spend"], spent, places=9)  # the spend carries over
        response = await self.h.chat(chat_body(model="openai/gpt-test"), token=key)
        self.assertEqual(response.code, 401)
        await self.chat(new["key"])
        # With a grace period the old key keeps working meanwhile.
        graced = await self.ok("post", "/key/regenerate", {"key": new["key"], "grace_period": "1h"})
        SCANNER.register(graced["key"])
        await self.chat(new["key"])
        await self.chat(graced["key"])

    async def test_health_and_reset_spend(self):
        key = await self.mint(max_budget=1)
        self.assertEqual(await self.ok("post", "/key/health", token=key), {"key": "healthy", "logging_callbacks": None})
        code, body = await self.call("post", "/key/health", token="sk-" + "z" * 43)
        self.assertError(code, body, 401)
        await self.chat(key)
        await self.h.committed()
        self.assertGreater((await self.ok("get", "/key/info", params={"key": key}))["info"]["spend"], 0)
        reset = await self.ok("post", f"/key/{key}/reset_spend", {"reset_to": 0.25})
        self.assertEqual(reset["spend"], 0.25)

    async def test_list_filters(self):
        first = await self.mint(organization_id="o1")
        await self.mint(organization_id="o2")
        listed = await self.ok("get", "/key/list", params={"organization_id": "o1"})
        self.assertEqual(listed["keys"], [hash_key(first)])
        listed = await self.ok("get", "/key/list", params={"key_hash": hash_key(first), "return_full_object": "true"})
        self.assertEqual([k["organization_id"] for k in listed["keys"]], ["o1"])
        # A user's keys, and with include_team_keys those of the user's teams.
        await self.ok("post", "/team/new", {"team_id": "t1", "members_with_roles": [{"role": "user", "user_id": "u1"}]})
        own = await self.mint(user_id="u1")
        team_key = await self.mint(team_id="t1")
        listed = await self.ok("get", "/key/list", params={"user_id": "u1"})
        self.assertEqual(listed["keys"], [hash_key(own)])
        listed = await self.ok("get", "/key/list", params={"user_id": "u1", "include_team_keys": "true"})
        self.assertEqual(listed["keys"], [hash_key(team_key), hash_key(own)])


class SpendTests(ManagementCase):
    async def traffic(self):
        self.key_a = await self.mint(team_id="ta", user_id="ua")
        self.key_b = await self.mint(team_id="tb", user_id="ub")
        self.answers = [await self.chat(self.key_a, user="c1") for _ in range(2)]
        self.answers.append(await self.chat(self.key_b, model="openai/gpt-mini"))
        await self.h.committed()
        self.rows = await self.h.ledger_rows()

    async def test_logs_and_their_filters(self):
        await self.traffic()
        logs = await self.ok("get", "/spend/logs")
        self.assertEqual([line["request_id"] for line in logs], [a["id"] for a in reversed(self.answers)])
        for params, count in [({"api_key": self.key_a}, 2), ({"api_key": hash_key(self.key_b)}, 1),
                              ({"user_id": "ua"}, 2), ({"team_id": "tb"}, 1),
                              ({"request_id": self.answers[0]["id"]}, 1),
                              ({"request_id": self.rows[1]["request_id"]}, 1), ({"end_user": "c1"}, 2)]:
            self.assertEqual(len(await self.ok("get", "/spend/logs", params=params)), count, params)
        line = (await self.ok("get", "/spend/logs", params={"request_id": self.answers[0]["id"]}))[0]
        self.assertEqual((line["api_key"], line["team_id"], line["user"], line["end_user"], line["model"]),
                         (hash_key(self.key_a), "ta", "ua", "c1", "gpt-test"))
        self.assertNotIn(self.key_a, json.dumps(logs))
        today = line["startTime"][:10]
        summary = await self.ok("get", "/spend/logs", params={"start_date": today, "end_date": today})
        self.assertEqual([day["startTime"] for day in summary], [today])
        self.assertAlmostEqual(summary[0]["spend"], sum(r["cost_usd"] for r in self.rows), places=9)
        self.assertEqual(set(summary[0]["users"]), {"ua", "ub"})
        rows = await self.ok("get", "/spend/logs", params={"start_date": today, "end_date": today, "summarize": "false"})
        self.assertEqual(len(rows), 3)
        page = await self.ok("get", "/spend/logs/v2", params={"page": 2, "page_size": 2})
        self.assertEqual((page["total"], page["total_pages"], len(page["data"])), (3, 2, 1))
        code, body = await self.call("get", "/spend/logs", params={"api_key": "not-a-key"})
        self.assertError(code, body, 400, "api_key")

    async def test_tags_and_metadata_reach_the_logs(self):
        key = await self.mint(tags=["prod"], metadata={"tags": ["sandbox", "prod"], "spend_logs_metadata": {"run": 7}})
        answer = await self.chat(key)
        [line] = await self.ok("get", "/spend/logs", params={"request_id": answer["id"]})
        self.assertEqual(line["request_tags"], ["prod", "sandbox"])
        self.assertEqual(line["metadata"]["spend_logs_metadata"], {"run": 7})

    async def test_global_reports(self):
        await self.traffic()
        cost = {h: sum(r["cost_usd"] for r in self.rows if r["key_id"] == h) for h in {r["key_id"] for r in self.rows}}
        keys = await self.ok("get", "/global/spend/keys")
        self.assertEqual({k["api_key"]: k["total_spend"] for k in keys}, cost)
        models = await self.ok("get", "/global/spend/models")
        self.assertEqual({m["model"] for m in models}, {"openai/gpt-test", "openai/gpt-mini"})
        teams = await self.ok("get", "/global/spend/teams")
        self.assertEqual(sorted(teams["teams"]), ["ta", "tb"])
        end_users = await self.ok("post", "/global/spend/end_users", {})
        self.assertEqual([(e["end_user"], e["total_count"]) for e in end_users if e["end_user"]], [("c1", 2)])
        today = self.rows[0]["ts"]
        import datetime

        day = datetime.datetime.fromtimestamp(today, datetime.timezone.utc).strftime("%Y-%m-%d")
        report = await self.ok("get", "/global/spend/report", params={"start_date": day, "end_date": day})
        self.assertEqual([r["group_by_day"] for r in report], [day])
        self.assertEqual(sorted(t["team_name"] for t in report[0]["teams"]), ["ta", "tb"])
        by_customer = await self.ok("get", "/global/spend/report",
                                    params={"start_date": day, "end_date": day, "group_by": "customer"})
        self.assertIn("c1", [c["customer"] for c in by_customer[0]["customers"]])
        activity = await self.ok("get", "/user/daily/activity", params={"start_date": day, "end_date": day})
        self.assertEqual(activity["metadata"]["total_api_requests"], 3)
        self.assertEqual(set(activity["results"][0]["breakdown"]["api_keys"]), set(cost))
        overall = await self.ok("get", "/global/spend")
        self.assertAlmostEqual(overall["spend"], sum(cost.values()), places=9)


class ModelTests(ManagementCase):
    async def test_models_added_through_the_api_are_served(self):
        SCANNER.register("sk-stored-model-key-000000")
        made = await self.ok("post", "/model/new", {
            "model_name": "house-model",
            "litellm_params": {"model": "openai/gpt-mini", "api_key": "sk-stored-model-key-000000",
                               "api_base": self.h.fake.base_url},
            "model_info": {"id": "m1", "description": "ours"},
        })
        self.assertEqual((made["model_id"], made["model_info"]["db_model"]), ("m1", True))
        key = await self.mint()
        await self.chat(key, model="house-model")
        self.assertEqual(self.h.fake.received[-1].json["model"], "gpt-mini")
        self.assertEqual(self.h.fake.received[-1].headers.get("authorization"), ["Bearer sk-stored-model-key-000000"])
        info = await self.ok("get", "/v1/model/info")
        self.assertEqual([m["model_name"] for m in info["data"]], ["house-model"])
        self.assertNotIn("sk-stored-model-key-000000", json.dumps(info))
        self.assertEqual(info["data"][0]["model_info"]["description"], "ours")
        groups = await self.ok("get", "/model_group/info")
        self.assertEqual(groups["data"][0]["model_group"], "house-model")
        await self.ok("post", "/model/update", {"model_info": {"id": "m1"}, "model_name": "renamed"})
        self.assertEqual([m["model_name"] for m in (await self.ok("get", "/v2/model/info"))["data"]], ["renamed"])
        await self.ok("post", "/model/delete", {"id": "m1"})
        self.assertEqual((await self.ok("get", "/model/info"))["data"], [])
        code, body = await self.call("post", "/model/new", {"model_name": "x", "litellm_params": {"model": "bedrock/claude"}})
        self.assertError(code, body, 400, "litellm_params")
        code, body = await self.call("post", "/model/delete", {"id": "m1"})
        self.assertError(code, body, 404, "id")


class HealthTests(ManagementCase):
    async def test_health(self):
        code, body = await self.call("get", "/health", token=None)
        self.assertEqual((code, body), (200, {"ok": True}))
        body = await self.ok("get", "/health")
        self.assertEqual(body["ok"], True)
        providers = {e["custom_llm_provider"] for e in body["healthy_endpoints"]}
        self.assertIn("openai", providers)
        self.assertEqual(body["healthy_count"], len(providers))
        self.assertEqual(body["unhealthy_endpoints"], [])
        ready = await self.ok("get", "/health/readiness", token=None)
        self.assertEqual((ready["status"], ready["db"]), ("healthy", "connected"))
        self.assertIn("litellm_version", ready)
        code, body = await self.call("get", "/health/liveliness", token=None)
        self.assertEqual((code, body), (200, "I'm alive!"))
