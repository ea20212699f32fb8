"""
Model routing in the real daemon (`twistd -n cllama` in a child process):
the LLM resolver turned on by CLLAMA_RESOLVER_MODEL asks a fake resolver
model on loopback; its mapping and an operator's, set over the mappings
API with the token, survive a restart (the resolver is not asked again);
C{?force} re-resolves after the restart; the debug page and the costs feed
show what happened, the resolver's calls billed to C{cllama-resolver}.
"""

from __future__ import annotations

import json
import os

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.pipeline.model_resolver import RESOLVER_PRINCIPAL
from cllama_tx.testing import FakeProvider, Reply, openai_completion
from cllama_tx.testing.postgres import shared_cluster
from tests.runtime.test_daemon import spawn_daemon
from tests.runtime.test_fleet import _eventually, _Fleet, _ready
from tests.secret_scan import SCANNER
from tests.support import AGENT, PROVIDER_KEY, SECRET, chat_body, write_agent

UI_TOKEN = "routing-daemon-ui-token-5150"
SCANNER.register(UI_TOKEN)


class Provider:
    """
    One fake OpenAI: it answers the resolver's questions from C{answers}
    (by the requested name it reads in them) and every other request as a
    model would.
    """

    def __init__(self) -> None:
        self.answers = {"house-fast": "openai/gpt-4o"}
        self.questions: list[str] = []
        self.chats: list[str] = []

    def __call__(self, received) -> Reply:
        doc = received.json
        first = doc["messages"][0]
        if first["role"] == "system" and first["content"].startswith("You route requests"):
            text = doc["messages"][-1]["content"]
            name = json.loads(text.splitlines()[0].split(": ", 1)[1])
            self.questions.append(name)
            return Reply(json=openai_completion(json.dumps({"model": self.answers.get(name)}), doc["model"], 200, 10))
        self.chats.append(doc["model"])
        return Reply(json=openai_completion("hello", doc["model"], 8, 2))


class RoutingDaemonTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        self.model = Provider()
        self.fake = FakeProvider(reactor, self.model)
        yield self.fake.start()
        self.addCleanup(self.fake.stop)
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "auth"))
        write_agent(os.path.join(base, "context"), AGENT, SECRET)
        self.env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": os.path.join(base, "context"),
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "CLLAMA_UI_TOKEN": UI_TOKEN,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.fake.base_url,
            "CLLAMA_RESOLVER_MODEL": "openai/gpt-4o-mini",
        }
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    @defer.inlineCallbacks
    def chat(self, ports, model, query=""):
        response = yield self.http.post(
            f"http://127.0.0.1:{ports['API']}/v1/chat/completions{query}", json=chat_body(model=model),
            headers={"Authorization": f"Bearer {AGENT}:{SECRET}"},
        )
        body = yield response.json()
        return response.code, body

    @defer.inlineCallbacks
    def ui(self, ports, method, path, doc=None, token=UI_TOKEN):
        headers = {"Accept": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        kwargs = {"json": doc} if doc is not None else {}
        response = yield getattr(self.http, method)(f"http://127.0.0.1:{ports['UI']}{path}", headers=headers, **kwargs)
        body = yield response.json()
        return response.code, body

    @defer.inlineCallbacks
    def test_mappings_survive_a_restart_and_force_re_resolves(self):
        process, transport = spawn_daemon(self, self.env)
        ports = yield process.ready
        code, body = yield self.chat(ports, "house-fast")
        self.assertEqual(code, 200, body)
        self.assertEqual((self.model.questions, self.model.chats), (["house-fast"], ["gpt-4o"]))
        code, _ = yield self.ui(ports, "put", "/_api/mappings/my-fast", {"target": "openai/gpt-4o-mini"}, token=None)
        self.assertEqual(code, 401)
        code, mapping = yield self.ui(ports, "put", "/_api/mappings/my-fast", {"target": "openai/gpt-4o-mini"})
        self.assertEqual((code, mapping["source"]), (201, "operator"))
        yield process.wait_for_audit(lambda lines: any(
            line["type"] == "operator" and line.get("action") == "mapping_set" for line in lines))
        [line] = [entry for entry in process.audit_lines()
                  if entry["type"] == "intervention" and entry["intervention"] == "llm_mapping"]
        self.assertEqual((line["mapping"], line["target"], line["fresh"], line["claw_id"]),
                         ("house-fast", "openai/gpt-4o", True, AGENT))
        transport.signalProcess("TERM")
        yield process.ended

        # Another day: the resolver model would now answer differently.
        self.model.answers["house-fast"] = "openai/gpt-4o-mini"
        process, _ = spawn_daemon(self, self.env)
        ports = yield process.ready
        code, listed = yield self.ui(ports, "get", "/_api/mappings/")
        self.assertEqual(code, 200)
        kept = {m["name"]: (m["target"], m["source"], m["confirmed"]) for m in listed["mappings"]}
        self.assertEqual(kept, {"house-fast": ("openai/gpt-4o", "llm", False),
                                "my-fast": ("openai/gpt-4o-mini", "operator", True)})
        code, _ = yield self.chat(ports, "house-fast")
        self.assertEqual(code, 200)
        code, _ = yield self.chat(ports, "my-fast")
        self.assertEqual(code, 200)
        self.assertEqual(self.model.questions, ["house-fast"])  # the kept mapping served it
        self.assertEqual(self.model.chats, ["gpt-4o", "gpt-4o", "gpt-4o-mini"])
        # ?force asks again, and the new answer is kept.
        code, _ = yield self.chat(ports, "house-fast", "?force&prompt=cheaper")
        self.assertEqual(code, 200)
        self.assertEqual(self.model.questions, ["house-fast", "house-fast"])
        self.assertEqual(self.model.chats[-1], "gpt-4o-mini")
        self.assertNotIn("prompt=", self.fake.received[-1].query)
        code, view = yield self.ui(ports, "get", "/_debug")
        self.assertEqual(code, 200)
        self.assertEqual([m["target"] for m in view["mappings"] if m["name"] == "house-fast"], ["openai/gpt-4o-mini"])
        self.assertEqual([e["decided_by"] for e in view["trace"][:3]], ["llm_mapping", "mapping", "llm_mapping"])
        self.assertEqual((view["resolver"]["model"], view["resolver"]["calls"]), ("openai/gpt-4o-mini", 1))
        self.assertNotIn(PROVIDER_KEY, json.dumps(view))
        # Both resolver calls, one before the restart, are billed to the operator's principal.
        code, costs = yield self.ui(ports, "get", "/costs/api")
        self.assertEqual(costs["agents"][RESOLVER_PRINCIPAL]["total_requests"], 2)
        self.assertEqual(costs["agents"][AGENT]["total_requests"], 4)


class RoutingFleetTests(TestCase):
    """Two daemons on one PostgreSQL: a mapping made on one serves on the other."""

    timeout = 120

    @defer.inlineCallbacks
    def test_mappings_reach_every_instance(self):
        model = Provider()
        model.answers = {"house-fast": "openai/gpt-test"}
        fake = FakeProvider(reactor, model)
        yield fake.start()
        self.addCleanup(fake.stop)
        url = shared_cluster().database()
        fleet = _Fleet(self)
        ports = []
        for name in ("d0", "d1"):
            env = fleet.env(name, fake, CLLAMA_DATABASE_URL=url, CLLAMA_RESOLVER_MODEL="openai/gpt-test")
            process, _ = spawn_daemon(self, env)
            found = yield process.ready
            yield _ready(self, f"http://127.0.0.1:{found['API']}")
            ports.append(found)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        operator = {"Authorization": "Bearer fleet-ui-token-0123456789", "Accept": "application/json"}

        def chat(found, name):
            return http.post(f"http://127.0.0.1:{found['API']}/v1/chat/completions",
                             json=chat_body(model=name), headers={"Authorization": f"Bearer {AGENT}:{SECRET}"})

        def known_on(found, name, present=True):
            @defer.inlineCallbacks
            def check():
                response = yield http.get(f"http://127.0.0.1:{found['UI']}/_api/mappings/{name}", headers=operator)
                yield response.content()
                return (response.code == 200) == present

            return check

        # An operator's mapping set on d0 is served by d1 within a second or so.
        response = yield http.put(f"http://127.0.0.1:{ports[0]['UI']}/_api/mappings/team-fast",
                                  json={"target": "openai/gpt-test"}, headers=operator)
        self.assertEqual(response.code, 201, (yield response.text()))
        yield _eventually(known_on(ports[1], "team-fast"), timeout=10.0)
        response = yield chat(ports[1], "team-fast")
        self.assertEqual(response.code, 200, (yield response.text()))
        # The resolver's mapping made on d0 serves d1 without asking again.
        response = yield chat(ports[0], "house-fast")
        self.assertEqual(response.code, 200, (yield response.text()))
        yield _eventually(known_on(ports[1], "house-fast"), timeout=10.0)
        response = yield chat(ports[1], "house-fast")
        self.assertEqual(response.code, 200, (yield response.text()))
        self.assertEqual(model.questions, ["house-fast"])
        # A deletion on d1 reaches d0.
        response = yield http.delete(f"http://127.0.0.1:{ports[1]['UI']}/_api/mappings/team-fast", headers=operator)
        self.assertEqual(response.code, 200, (yield response.text()))
        yield _eventually(known_on(ports[0], "team-fast", present=False), timeout=10.0)
