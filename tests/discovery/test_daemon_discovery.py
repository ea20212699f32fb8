"""
Discovery in the real daemon (`twistd -n cllama` in a child process): a
fake Ollama on a listed address and an OpenAI-compatible server found by
the port scan (the real /proc/net/tcp, restricted to these ports and the
daemon's own, which are never probed) become providers an agent lists in
/v1/models and gets answers from, within its model policy; a server
started after the daemon is found by an operator's on-demand round; one
that stops is gone and refused clearly.  And a bad discovery setting
stops the start.
"""

from __future__ import annotations

import os
import socket

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.runtime.config import Config
from cllama_tx.runtime.errors import ConfigError
from cllama_tx.runtime.local_servers import build_discovery
from cllama_tx.testing.local_servers import FakeLocalServer
from tests.runtime.test_daemon import spawn_daemon
from tests.secret_scan import SCANNER
from tests.support import AGENT, SECRET, chat_body, write_agent

UI_TOKEN = "discovery-daemon-ui-token-2718"
STRICT, STRICT_SECRET = "warden", "7a2b" * 12
SCANNER.register(UI_TOKEN, STRICT_SECRET)
OLLAMA_MODELS = ["llama3.2:latest", "qwen2.5:7b"]


def free_port() -> int:
    """A loopback port nothing listens on now (for a server started later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaemonDiscoveryTests(TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def fake(self, kind, models, port=0):
        server = FakeLocalServer(reactor, kind, models, port=port)
        yield server.start()
        self.addCleanup(server.stop)
        return server

    @defer.inlineCallbacks
    def test_agents_use_discovered_servers_found_before_and_after_the_start(self):
        ollama = yield self.fake("ollama", OLLAMA_MODELS)
        generic = yield self.fake("openai", ["phi-4"])
        api_port, ui_port, late_port = free_port(), free_port(), free_port()
        base = os.path.abspath(self.mktemp())
        context_root = os.path.join(base, "context")
        os.makedirs(os.path.join(base, "auth"))
        o, g, late = f"local-ollama-{ollama.port}", f"local-openai-{generic.port}", f"local-lmstudio-{late_port}"
        write_agent(context_root, AGENT, SECRET)
        write_agent(context_root, STRICT, STRICT_SECRET, model_policy={
            "mode": "reject", "allowed": [{"slot": "primary", "ref": f"{o}/llama3.2:latest"}],
        })
        env = {
            "LISTEN_ADDR": f"127.0.0.1:{api_port}",
            "UI_ADDR": f"127.0.0.1:{ui_port}",
            "CLAW_CONTEXT_ROOT": context_root,
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "CLLAMA_UI_TOKEN": UI_TOKEN,
            "CLLAMA_DISCOVERY": "on",
            "CLLAMA_DISCOVERY_TARGETS": f"127.0.0.1:{ollama.port}",
            # The scan reads the whole socket table but probes only these
            # ports: the daemon's own two are among them, and skipped.
            "CLLAMA_DISCOVERY_PORTS": f"{generic.port},{late_port},{api_port},{ui_port}",
            "CLLAMA_DISCOVERY_DOCKER_SOCKET": "off",
            "CLLAMA_DISCOVERY_INTERVAL": "1h",
            "CLLAMA_DISCOVERY_PROBE_TIMEOUT": "3s",
        }
        process, transport = spawn_daemon(self, env)
        yield process.ready
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        api, ui = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{ui_port}"
        operator = {"Authorization": f"Bearer {UI_TOKEN}"}

        def agent(who=AGENT, secret=SECRET):
            return {"Authorization": f"Bearer {who}:{secret}"}

        @defer.inlineCallbacks
        def rediscover():
            response = yield http.post(ui + "/discovery/rediscover", json={}, headers=operator)
            self.assertEqual(response.code, 200)
            return {s["name"]: s for s in (yield response.json())["servers"]}

        @defer.inlineCallbacks
        def listed(who=AGENT, secret=SECRET):
            response = yield http.get(api + "/v1/models", headers=agent(who, secret))
            self.assertEqual(response.code, 200)
            return [m["id"] for m in (yield response.json())["data"]]

        # An operator's round (after the first, which ran at start-up).
        servers = yield rediscover()
        self.assertEqual(sorted(servers), sorted([o, g]))
        self.assertEqual((servers[o]["found_by"], servers[o]["kind"], servers[o]["models"]),
                         ("listed", "ollama", OLLAMA_MODELS))
        self.assertEqual((servers[g]["found_by"], servers[g]["kind"], servers[g]["base_url"]),
                         ("port_scan", "openai", f"http://127.0.0.1:{generic.port}/v1"))

        # /v1/models: everything for an agent without a policy, its own refs for the other.
        models = yield listed()
        for ref in [f"{o}/llama3.2:latest", f"{o}/qwen2.5:7b", f"{g}/phi-4"]:
            self.assertIn(ref, models)
        self.assertEqual((yield listed(STRICT, STRICT_SECRET)), [f"{o}/llama3.2:latest"])

        # A chat answered by the discovered Ollama: prefix stripped, no credential sent.
        response = yield http.post(api + "/v1/chat/completions", json=chat_body(f"{o}/llama3.2:latest"),
                                   headers=agent())
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        self.assertEqual((body["object"], body["model"]), ("chat.completion", "llama3.2:latest"))
        [chat] = ollama.received
        self.assertEqual((chat.method, chat.path, chat.json["model"]), ("POST", "/v1/chat/completions", "llama3.2:latest"))
        self.assertIsNone(chat.header("authorization"))
        self.assertIsNone(chat.header("x-api-key"))
        # Streamed, from the scanned server.
        response = yield http.post(api + "/v1/chat/completions", json=chat_body(f"{g}/phi-4", stream=True),
                                   headers=agent())
        text = yield response.text()
        self.assertEqual(response.code, 200)
        self.assertTrue(text.rstrip().endswith("data: [DONE]"), text[-200:])
        self.assertEqual(generic.received[-1].json["model"], "phi-4")
        # The policy still decides: the strict agent may not reach the other server.
        response = yield http.post(api + "/v1/chat/completions", json=chat_body(f"{g}/phi-4"),
                                   headers=agent(STRICT, STRICT_SECRET))
        self.assertEqual(response.code, 403)
        yield response.text()
        self.assertEqual(len(generic.received), 1)

        # A server started after the daemon: found by the operator's round.
        lmstudio = yield self.fake("lmstudio", ["qwen2.5-7b-instruct"], port=late_port)
        servers = yield rediscover()
        self.assertEqual((servers[late]["kind"], servers[late]["found_by"], servers[late]["state"]),
                         ("lmstudio", "port_scan", "up"))
        self.assertIn(f"{late}/qwen2.5-7b-instruct", (yield listed()))
        response = yield http.post(api + "/v1/chat/completions", json=chat_body(f"{late}/qwen2.5-7b-instruct"),
                                   headers=agent())
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json())["model"], "qwen2.5-7b-instruct")
        self.assertEqual(len(lmstudio.received), 1)

        # One that stops: gone, refused with the reason, out of the list.
        yield ollama.stop()
        servers = yield rediscover()
        self.assertEqual(servers[o]["state"], "gone")
        response = yield http.post(api + "/v1/chat/completions", json=chat_body(f"{o}/llama3.2:latest"),
                                   headers=agent())
        error = (yield response.json())["error"]
        self.assertEqual((response.code, error["code"]), (400, "provider_not_configured"))
        self.assertIn(f"the local model server {o}", error["message"])
        self.assertIn("has not answered since", error["message"])
        self.assertNotIn(f"{o}/llama3.2:latest", (yield listed()))

        # The operator's round needs the operator.
        response = yield http.post(ui + "/discovery/rediscover", json={})
        self.assertEqual(response.code, 401)
        yield response.text()

        yield process.wait_for_audit(
            lambda lines: sum(line["type"] in ("response", "error") and line.get("path") is None for line in lines) >= 5
        )
        transport.signalProcess("TERM")
        self.assertEqual((yield process.ended), 0)
        lines = process.audit_lines()
        # The daemon never probed itself: no audited request for a probe's path.
        self.assertEqual([line for line in lines if line.get("path") in ("/api/tags", "/api/v0/models")], [])
        self.assertEqual([line["action"] for line in lines if line["type"] == "operator"], ["discovery_rediscover"] * 3)
        [answered] = [line for line in lines if line["type"] == "response" and line.get("provider") == o]
        self.assertEqual((answered["effective_model"], answered["status_code"]), ("llama3.2:latest", 200))
        log = process.stderr.decode(errors="replace")
        self.assertIn(f"discovery: ollama server {o} at {servers[o]['base_url']} (listed) serves 2 model(s)", log)
        self.assertIn(f"discovery: {o} ({servers[o]['base_url']}) did not answer: marked gone", log)


class SettingsAtStartTests(SynchronousTestCase):
    def test_a_bad_setting_stops_the_start_and_off_builds_nothing(self):
        with self.assertRaises(ConfigError) as caught:
            build_discovery(Config.from_env({"CLLAMA_DISCOVERY": "on", "CLLAMA_DISCOVERY_TARGETS": "ollama"}),
                            reactor, None, tuple)
        self.assertIn("write host:port", str(caught.exception))
        self.assertIsNone(build_discovery(Config.from_env({}), reactor, None, tuple))
        self.assertIsNone(build_discovery(Config.from_env({"CLLAMA_DISCOVERY": "on"}, demo=True), reactor, None, tuple))
        found = build_discovery(Config.from_env({"CLLAMA_DISCOVERY": "on"}), reactor, None, tuple)
        self.assertEqual((found.settings.enabled, found.running), (True, False))
