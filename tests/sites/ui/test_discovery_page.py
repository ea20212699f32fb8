"""
The operator UI's discovery page (GET /discovery, HTML or JSON) and its
on-demand round (POST /discovery/rediscover): behind the operator token,
CSRF-checked for a browser session, audited, names escaped; with
discovery off, said so (and 409 for a round).
"""

from __future__ import annotations

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import HTTPConnectionPool

from cllama_tx.discovery.probe import Prober, probe_agent
from cllama_tx.discovery.service import Discovery
from cllama_tx.discovery.settings import DiscoverySettings
from cllama_tx.testing.local_servers import FakeLocalServer
from tests.sites.ui.support import UiHarness
from tests.support import UI_TOKEN

MODELS = ["llama3.2:latest", "evil<script>alert(1)</script>"]
HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
BEARER = {"Authorization": f"Bearer {UI_TOKEN}"}


class UiCase(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def start(self, discovery=None):
        self.harness = yield UiHarness(self, ui_kwargs={"discovery": discovery}).start()
        self.h = self.harness.h
        self.client = self.harness.client


class DiscoveryPageTests(UiCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.ollama = FakeLocalServer(reactor, "ollama", MODELS)
        yield self.ollama.start()
        self.addCleanup(self.ollama.stop)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        settings = DiscoverySettings(
            enabled=True, targets=(("127.0.0.1", self.ollama.port),), port_scan=False, docker_socket=None,
        )
        self.discovery = Discovery(settings, reactor, None, Prober(reactor, probe_agent(reactor, pool, 1.0), 1.0))
        yield self.start(self.discovery)
        self.name = f"local-ollama-{self.ollama.port}"

    @defer.inlineCallbacks
    def test_the_page_and_its_json_twin_behind_the_token(self):
        response = yield self.client.get("/discovery")
        self.assertEqual(response.code, 401)
        self.assertEqual((yield response.json())["error"]["code"], "operator_token_required")
        response = yield self.client.get("/discovery", headers=BEARER)
        doc = yield response.json()
        self.assertEqual((response.code, doc["enabled"], doc["servers"]), (200, True, []))
        self.assertEqual(doc["status"]["targets"], [f"127.0.0.1:{self.ollama.port}"])
        self.assertIsNone(doc["status"]["last_round"])

        response = yield self.client.post("/discovery/rediscover", headers=BEARER, json_body={})
        self.assertEqual(response.code, 200)
        servers = (yield response.json())["servers"]
        self.assertEqual([(s["name"], s["kind"], s["state"], s["models"]) for s in servers],
                         [(self.name, "ollama", "up", MODELS)])
        [line] = self.harness.operator_lines()
        self.assertEqual((line["action"], line["servers"], line["actor"]),
                         ("discovery_rediscover", [self.name], "operator-token@127.0.0.1"))

        yield self.client.sign_in()
        page = yield self.client.get("/discovery", headers=HTML)
        html = yield page.text()
        self.assertEqual(page.code, 200)
        self.assertIn(f"server-{self.name}", html)
        self.assertIn(f"http://127.0.0.1:{self.ollama.port}/v1", html)
        self.assertIn("<code>llama3.2:latest</code>", html)
        self.assertIn("evil&lt;script&gt;alert(1)&lt;/script&gt;", html)
        self.assertNotIn("<script>alert", html)
        self.assertIn('href="/discovery"', html)  # in the navigation
        self.assertIn("Last round", html)

    @defer.inlineCallbacks
    def test_a_browser_round_needs_its_form_token(self):
        response = yield self.client.post("/discovery/rediscover", {}, headers=HTML)
        self.assertEqual(response.code, 303)
        self.assertTrue(response.headers.getRawHeaders("location")[0].startswith("/signin"))
        yield self.client.sign_in()
        response = yield self.client.post("/discovery/rediscover", {"csrf": "made-up"}, headers=HTML)
        self.assertEqual(response.code, 403)
        yield response.text()
        self.assertEqual(self.discovery.rounds, 0)
        csrf = yield self.client.csrf("/discovery")
        response = yield self.client.post("/discovery/rediscover", {"csrf": csrf}, headers=HTML)
        self.assertEqual((response.code, response.headers.getRawHeaders("location")), (303, ["/discovery"]))
        self.assertEqual(self.discovery.rounds, 1)
        page = yield self.client.get("/discovery", headers=HTML)
        self.assertIn("Looked again: 1 local model server up.", (yield page.text()))
        self.assertEqual([line["action"] for line in self.harness.operator_lines()], ["sign_in", "discovery_rediscover"])


class DiscoveryOffTests(UiCase):
    @defer.inlineCallbacks
    def test_off_is_said_and_a_round_refused(self):
        yield self.start(None)
        response = yield self.client.get("/discovery", headers=BEARER)
        self.assertEqual((yield response.json())["enabled"], False)
        response = yield self.client.post("/discovery/rediscover", headers=BEARER, json_body={})
        self.assertEqual(response.code, 409)
        self.assertEqual((yield response.json())["error"]["code"], "discovery_off")
        yield self.client.sign_in()
        page = yield self.client.get("/discovery", headers=HTML)
        self.assertIn("Set CLLAMA_DISCOVERY=on", (yield page.text()))
