"""
The shared provider key in the real daemon (`twistd -n cllama`): the
operator's organization and project from the command line and environment
reach the provider, an agent's never; a 401 caused by one agent's request is
re-checked through the daemon's own upstream client and leaves the key to
everyone; a provider error echoing the key reaches the agent scrubbed.
"""

from __future__ import annotations

import os

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.testing import FakeProvider, Reply, echo_headers_error, openai_error, strict_provider
from tests.runtime.test_daemon import spawn_daemon
from tests.secret_scan import SCANNER
from tests.support import AGENT, PROVIDER_KEY, SECRET, chat_body, write_agent

ORG = "org-daemon-operator-00000042"
PROJECT = "proj_daemon_operator_0042"
OTHER, OTHER_SECRET = "atlas", "5c3d" * 12
SCANNER.register(ORG, PROJECT, OTHER_SECRET)


class DaemonKeyHealthTests(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def test_one_agent_cannot_break_the_key_for_the_others(self):
        fake = FakeProvider(reactor)
        yield fake.start()
        self.addCleanup(fake.stop)
        strict = strict_provider({PROVIDER_KEY}, organization=ORG)
        echo = echo_headers_error(400)

        def respond(received):
            doc = received.json if isinstance(received.json, dict) else {}
            if doc.get("user") == "poison":
                return Reply(status=401, json=openai_error("not for you", "invalid_request_error", "no_access"))
            if doc.get("user") == "echo":
                return echo(received)
            return strict(received)

        fake._responder = respond
        base = os.path.abspath(self.mktemp())
        context_root = os.path.join(base, "context")
        auth_dir = os.path.join(base, "auth")
        os.makedirs(auth_dir)
        write_agent(context_root, AGENT, SECRET)
        write_agent(context_root, OTHER, OTHER_SECRET)
        env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": context_root,
            "CLAW_AUTH_DIR": auth_dir,
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": fake.base_url,
            "OPENAI_ORG_ID": ORG,
            "CLLAMA_UI_TOKEN": "daemon-key-health-ui-token",
        }
        SCANNER.register("daemon-key-health-ui-token")
        process, transport = spawn_daemon(self, env, args=["--openai-project", PROJECT])
        ports = yield process.ready
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        url = f"http://127.0.0.1:{ports['API']}/v1/chat/completions"

        def chat(who, secret, headers=None, **extra):
            return http.post(
                url,
                json=chat_body(**extra),
                headers={"Authorization": f"Bearer {who}:{secret}", **(headers or {})},
            )

        # A bogus organization: dropped, the operator's sent instead.
        response = yield chat(AGENT, SECRET, {"OpenAI-Organization": "org-bogus", "OpenAI-Project": "proj_bogus"})
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json())["object"], "chat.completion")
        self.assertEqual(fake.received[0].header("openai-organization"), ORG)
        self.assertEqual(fake.received[0].header("openai-project"), PROJECT)

        # A request the provider refuses with 401: re-checked, the key stays.
        response = yield chat(AGENT, SECRET, user="poison")
        self.assertEqual(response.code, 401)
        self.assertEqual((yield response.json())["error"]["code"], "no_access")
        probe = fake.received[-1]
        self.assertEqual((probe.method, probe.path), ("GET", "/v1/models"))
        self.assertEqual(probe.header("openai-organization"), ORG)
        self.assertEqual(probe.header("openai-project"), PROJECT)
        self.assertIsNone(probe.header("user-agent"))
        response = yield chat(OTHER, OTHER_SECRET)
        self.assertEqual(response.code, 200)
        yield response.content()

        # An error that echoes the request's headers: no key, no organization.
        response = yield chat(OTHER, OTHER_SECRET, user="echo")
        self.assertEqual(response.code, 400)
        text = yield response.text()
        self.assertIn("authorization: Bearer [redacted]", text)
        for secret in (PROVIDER_KEY, ORG, PROJECT):
            self.assertNotIn(secret, text)

        yield process.wait_for_audit(
            lambda lines: [line["action"] for line in lines if line["type"] == "provider_pool"] == ["suspect", "ready"]
            and sum(line["type"] in ("response", "error") for line in lines) == 4
        )
        transport.signalProcess("TERM")
        self.assertEqual((yield process.ended), 0)
        for secret in (PROVIDER_KEY, ORG, PROJECT, SECRET, OTHER_SECRET):
            self.assertNotIn(secret.encode(), process.stdout + process.stderr)
