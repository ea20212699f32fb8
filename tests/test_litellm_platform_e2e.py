"""
A sandbox platform built on LiteLLM's proxy API, pointed at the real
daemon (C{twistd -n cllama}) instead: its base URL and master key changed,
nothing else.  It drives the API the way LiteLLM's documentation shows:
LiteLLM's own Python client (C{litellm.proxy.client}), C{requests} for the
documented curl calls, C{aiohttp} for keys minted concurrently per
session, the C{openai} SDK with C{base_url} at the proxy for inference;
and a billing worker that syncs C{/spend/logs} every second while traffic
runs ends with exactly the ledger's rows.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import sqlite3
import threading
import time
import uuid

import openai
import requests
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cllama_tx.testing import FakeProvider, Reply, openai_completion
from tests.runtime.test_daemon import spawn_daemon
from tests.secret_scan import SCANNER
from tests.support import PROVIDER_KEY

# LiteLLM's client package would fetch its price list from the network at import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

MASTER = "sk-platform-master-key-" + "7" * 20
SCANNER.register(MASTER)
PRICES = {"openai": {"gpt-test": {"input": 2.0, "output": 8.0}}}


def today() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")


class PlatformCase(TestCase):
    timeout = 120

    async def setUp(self):
        self.fake = FakeProvider(reactor)
        await self.fake.start()
        self.addCleanup(self.fake.stop)
        base = os.path.abspath(self.mktemp())
        for name in ("auth", "context", "state"):
            os.makedirs(os.path.join(base, name))
        prices = os.path.join(base, "prices.json")
        with open(prices, "w") as f:
            json.dump(PRICES, f)
        self.state = os.path.join(base, "state")
        env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": os.path.join(base, "context"),
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": self.state,
            "CLLAMA_PRICING_FILE": prices,
            "LITELLM_MASTER_KEY": MASTER,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.fake.base_url,
        }
        self.process, _transport = spawn_daemon(self, env)
        ports = await self.process.ready
        self.api = f"http://127.0.0.1:{ports['API']}"

    def answers(self, n: int, tokens=(20, 200)) -> list[str]:
        """Queue C{n} answers of the fake provider, each with its own id."""
        ids = [f"chatcmpl-{uuid.uuid4().hex}" for _ in range(n)]
        for answer_id in ids:
            self.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", *tokens, id=answer_id)))
        return ids

    def ledger_rows(self) -> list[dict]:
        """The rows as the ledger file has them (read by another process, as an auditor would)."""
        conn = sqlite3.connect(os.path.join(self.state, "ledger.sqlite3"))
        try:
            conn.row_factory = sqlite3.Row
            return [dict(r) for r in conn.execute("SELECT * FROM requests ORDER BY id")]
        finally:
            conn.close()


class LiteLLMClientTests(PlatformCase):
    async def test_a_platform_written_for_litellm(self):
        answer_ids = self.answers(3)
        api = self.api

        def platform():
            from litellm.proxy.client import Client
            from litellm.proxy.client.users import UsersManagementClient

            headers = {"Authorization": f"Bearer {MASTER}"}
            client = Client(base_url=api, api_key=MASTER)
            out: dict = {}
            # The documented curl calls, as requests.
            org = requests.post(api + "/organization/new", headers=headers,
                                json={"organization_alias": "acme-corp", "max_budget": 10}).json()
            team = requests.post(api + "/team/new", headers=headers, json={
                "team_alias": "acme", "organization_id": org["organization_id"], "max_budget": 5,
                "budget_duration": "30d",
            }).json()
            out["team"] = team
            users = UsersManagementClient(api, api_key=MASTER)
            out["user"] = users.create_user({"user_id": "session-1", "auto_create_key": False,
                                              "teams": [team["team_id"]]})
            # LiteLLM's own client mints and reads the session's key.
            key = client.keys.generate(models=["openai/gpt-test"], team_id=team["team_id"], user_id="session-1",
                                       duration="1h", key_alias="session-1")
            out["key"] = key
            out["info"] = client.keys.info(key["key"])
            out["listed"] = client.keys.list(team_id=team["team_id"], return_full_object=True)
            out["teams"] = client.teams.list()
            out["teams_v2"] = client.teams.list_v2()
            out["user_v2"] = users.get_user_v2("session-1")
            out["readiness"] = client.health.get_readiness() if hasattr(client, "health") else requests.get(
                api + "/health/readiness").json()
            # The sandbox's agent, through the openai SDK with LiteLLM's base URL (no /v1).
            sdk = openai.OpenAI(base_url=api, api_key=key["key"], max_retries=0, timeout=30)
            try:
                out["chat"] = [sdk.chat.completions.create(model="openai/gpt-test", user="customer-9",
                                                           messages=[{"role": "user", "content": "hi"}])
                               for _ in range(3)]
                try:
                    sdk.chat.completions.create(model="openai/gpt-other", messages=[{"role": "user", "content": "x"}])
                except openai.PermissionDeniedError as e:
                    out["denied"] = e
                # The team's budget is spent: the refusal LiteLLM's clients know.
                requests.post(api + "/team/update", headers=headers, json={"team_id": team["team_id"], "max_budget": 0})
                try:
                    sdk.chat.completions.create(model="openai/gpt-test", messages=[{"role": "user", "content": "x"}])
                except openai.UnprocessableEntityError as e:
                    out["budget"] = e
            finally:
                sdk.close()
            out["logs"] = requests.get(api + "/spend/logs", headers=headers,
                                       params={"request_id": out["chat"][0].id}).json()
            out["by_key"] = requests.get(api + "/spend/logs", headers=headers, params={"api_key": key["key"]}).json()
            out["team_info"] = requests.get(api + "/team/info", headers=headers,
                                            params={"team_id": team["team_id"]}).json()
            client.keys.delete(keys=[key["key"]])
            out["after_delete"] = requests.get(api + "/key/info", headers=headers, params={"key": key["key"]})
            return out

        out = await deferToThread(platform)
        key = out["key"]
        SCANNER.register(key["key"])
        uuid.UUID(out["team"]["team_id"])  # made by the proxy, as LiteLLM makes it
        self.assertEqual((out["user"]["user_id"], out["user"]["teams"]), ("session-1", [out["team"]["team_id"]]))
        self.assertEqual((key["key_alias"], key["team_id"], key["models"]), ("session-1", out["team"]["team_id"],
                                                                            ["openai/gpt-test"]))
        self.assertEqual(out["info"]["info"]["key_alias"], "session-1")
        self.assertEqual([k["key_alias"] for k in out["listed"]["keys"]], ["session-1"])
        self.assertEqual([t["team_alias"] for t in out["teams"]], ["acme"])
        self.assertEqual(out["teams_v2"]["total"], 1)
        self.assertEqual(out["user_v2"]["teams"], [out["team"]["team_id"]])
        self.assertEqual(out["readiness"]["status"], "healthy")
        self.assertEqual([c.id for c in out["chat"]], answer_ids)
        denied = out["denied"]
        self.assertEqual((denied.status_code, denied.type, denied.param, denied.code),
                         (403, "key_model_access_denied", "model", "403"))
        budget = out["budget"]
        self.assertEqual((budget.status_code, budget.type, budget.code), (422, "budget_exceeded", "422"))
        self.assertIn("Budget has been exceeded! Team=", budget.message)
        [log] = out["logs"]
        self.assertEqual((log["request_id"], log["api_key"], log["user"], log["end_user"], log["team_id"]),
                         (answer_ids[0], key["token"], "session-1", "customer-9", out["team"]["team_id"]))
        # Refused requests are rows too (failures, as LiteLLM's spend logs keep them).
        self.assertEqual(sorted(line["status"] for line in out["by_key"]), ["failure", "failure", "success", "success",
                                                                            "success"])
        rows = self.ledger_rows()
        spent = sum(r["cost_usd"] for r in rows)
        self.assertGreater(spent, 0)
        self.assertAlmostEqual(out["team_info"]["team_info"]["spend"], spent, places=9)
        self.assertEqual({r["organization_id"] for r in rows if r["status"] == 200}, {out["team"]["organization_id"]})
        self.assertEqual(out["after_delete"].status_code, 404)
        self.assertEqual(out["after_delete"].json()["error"]["code"], "404")


class BillingConsumerTests(PlatformCase):
    async def test_a_billing_worker_syncing_while_traffic_runs_ends_with_the_ledger(self):
        api = self.api
        headers = {"Authorization": f"Bearer {MASTER}"}

        async def mint_sessions():
            import aiohttp

            async with aiohttp.ClientSession(headers=headers) as session:
                async def mint(i):
                    async with session.post(api + "/key/generate", json={
                        "team_id": f"org-{i % 2}", "user_id": f"session-{i}", "duration": "1h",
                        "metadata": {"sandbox": f"sb-{i}"}, "max_budget": 5,
                    }) as response:
                        assert response.status == 200, await response.text()
                        return await response.json()

                return await asyncio.gather(*(mint(i) for i in range(4)))

        keys = await deferToThread(asyncio.run, mint_sessions())
        for minted in keys:
            SCANNER.register(minted["key"])
        requests_per_key = 12
        expected_ids = set(self.answers(len(keys) * requests_per_key))
        synced: dict[str, dict] = {}
        snapshots: list[int] = []
        stop = threading.Event()

        def sync() -> None:
            logs = requests.get(api + "/spend/logs", headers=headers,
                                params={"start_date": today(), "end_date": today(), "summarize": "false"},
                                timeout=30).json()
            for line in logs:
                synced[line["request_id"]] = line
            snapshots.append(len(synced))

        def billing_worker() -> None:
            while not stop.wait(1.0):
                sync()
            sync()  # the last sync, once traffic is over

        def sandbox(minted: dict) -> list[str]:
            client = openai.OpenAI(base_url=api + "/v1", api_key=minted["key"], max_retries=0, timeout=30)
            try:
                ids = []
                for _ in range(requests_per_key):
                    ids.append(client.chat.completions.create(
                        model="openai/gpt-test", messages=[{"role": "user", "content": "work"}]).id)
                    time.sleep(0.1)  # the sandbox thinks between turns
                return ids
            finally:
                client.close()

        worker = deferToThread(billing_worker)
        seen = await defer.gatherResults([deferToThread(sandbox, minted) for minted in keys])
        stop.set()
        await worker
        answered = {answer_id for ids in seen for answer_id in ids}
        self.assertEqual(answered, expected_ids)
        rows = self.ledger_rows()
        self.assertEqual(len(rows), len(keys) * requests_per_key)
        # Exactly the ledger's rows: each once, with the ledger's cost and who it is billed to.
        self.assertEqual(set(synced), {r["response_id"] for r in rows})
        by_id = {r["response_id"]: r for r in rows}
        for request_id, line in synced.items():
            row = by_id[request_id]
            self.assertEqual((line["spend"], line["api_key"], line["team_id"], line["user"]),
                             (row["cost_usd"], row["key_id"], row["team_id"], row["user_id"]))
        # The worker ran while traffic ran: it saw the rows grow.
        self.assertGreaterEqual(len([n for n in snapshots if 0 < n < len(rows)]), 1, snapshots)
        # Each sandbox's spend, as the platform bills it, is its key's.
        for minted in keys:
            info = await deferToThread(lambda k=minted: requests.get(api + "/key/info", headers=headers,
                                                                      params={"key": k["key"]}).json())
            billed = sum(line["spend"] for line in synced.values() if line["api_key"] == minted["token"])
            self.assertAlmostEqual(info["info"]["spend"], billed, places=9)
