"""
LiteLLM's management API on a fleet: two real daemons on one real
PostgreSQL.  A team, its budget and its members set through one daemon
govern the keys the other serves, within a second; a customer blocked on
one is refused on the other; a model added on one is served by the other;
the spend logs of either list every row of both.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from cllama_tx.testing import Reply, openai_completion
from cllama_tx.testing.postgres import shared_cluster
from tests.runtime.test_daemon import spawn_daemon
from tests.runtime.test_fleet import MASTER, _eventually, _Fleet, _http, _ready, _start_fake
from tests.secret_scan import SCANNER


class ManagementFleetTests(TestCase):
    timeout = 120

    async def setUp(self):
        self.fake = await _start_fake(self)
        self.fleet = _Fleet(self)
        url = shared_cluster().database()
        self.urls = []
        for i in range(2):
            env = self.fleet.env(f"d{i}", self.fake, CLLAMA_DATABASE_URL=url)
            process, _transport = spawn_daemon(self, env)
            ports = await process.ready
            api = f"http://127.0.0.1:{ports['API']}"
            await _ready(self, api)
            self.urls.append(api)
        self.http = _http(self)

    async def admin(self, url, path, doc=None, method="POST"):
        response = await self.http.request(method, url + path, data=json.dumps(doc or {}).encode(),
                                           headers={"Authorization": [f"Bearer {MASTER}"],
                                                    "Content-Type": ["application/json"]})
        return response.code, await response.json()

    async def chat(self, url, key, **extra):
        self.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 10, 10)))
        response = await self.http.post(url + "/v1/chat/completions",
                                        json={"model": "openai/gpt-test", "messages": [{"role": "user", "content": "x"}],
                                              **extra},
                                        headers={"Authorization": f"Bearer {key}"})
        return response.code, await response.json()

    async def eventually_refused(self, url, key, status, **extra):
        seen = []

        @defer.inlineCallbacks
        def refused():
            code, body = yield defer.ensureDeferred(self.chat(url, key, **extra))
            seen.append((code, body))
            return code == status

        await _eventually(refused, timeout=10.0, step=0.2)
        return seen[-1][1]

    async def test_records_set_on_one_govern_the_other(self):
        a, b = self.urls
        code, _ = await self.admin(a, "/team/new", {"team_id": "t1", "max_budget": 10})
        self.assertEqual(code, 200)
        code, minted = await self.admin(a, "/key/generate", {"team_id": "t1", "user_id": "u1"})
        SCANNER.register(minted["key"])
        code, _ = await self.chat(b, minted["key"], user="c1")
        self.assertEqual(code, 200)
        # A budget of 0 for the team, set on A: B refuses the team's key within a second or so.
        await self.admin(a, "/team/update", {"team_id": "t1", "max_budget": 0})
        body = await self.eventually_refused(b, minted["key"], 422)
        self.assertIn("Team=t1", body["error"]["message"])
        await self.admin(a, "/team/update", {"team_id": "t1", "max_budget": 10})
        # A customer blocked on B is refused on A.
        await self.admin(b, "/customer/new", {"user_id": "c2", "blocked": True})
        body = await self.eventually_refused(a, minted["key"], 401, user="c2")
        self.assertIn("End User=c2 is blocked", body["error"]["message"])
        # The spend logs of either list the rows of both.
        for url in (a, b):
            code, logs = await self.admin(url, "/spend/logs?api_key=" + minted["token"], method="GET")
            self.assertEqual(code, 200)
            self.assertIn(200, {line["status_code"] for line in logs})
            self.assertEqual({line["team_id"] for line in logs}, {"t1"})

    async def test_a_model_added_on_one_is_served_by_the_other(self):
        a, b = self.urls
        code, made = await self.admin(a, "/model/new", {
            "model_name": "fleet-model", "litellm_params": {"model": "openai/gpt-test"}, "model_info": {"id": "m1"},
        })
        self.assertEqual(code, 200, made)
        code, minted = await self.admin(a, "/key/generate", {})
        SCANNER.register(minted["key"])
        served = []

        @defer.inlineCallbacks
        def on_b():
            self.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 1, 1)))
            response = yield self.http.post(b + "/v1/chat/completions", json={
                "model": "fleet-model", "messages": [{"role": "user", "content": "x"}]},
                headers={"Authorization": f"Bearer {minted['key']}"})
            yield response.content()
            served.append(response.code)
            return response.code == 200

        await _eventually(on_b, timeout=10.0, step=0.2)
        code, info = await self.admin(b, "/model/info", method="GET")
        self.assertEqual([m["model_info"]["id"] for m in info["data"]], ["m1"])
