"""
The operator UI as the real daemon builds it (`twistd -n cllama` in a child
process): a token generated at the first start into the state directory,
kept across restarts, its path logged and never its value; authentication
off only when asked for, and loudly.
"""

from __future__ import annotations

import json
import os
import stat

import attrs
import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.runtime.config import Config
from tests.runtime.test_daemon import spawn_daemon
from tests.secret_scan import SCANNER
from tests.sites.ui.support import UiClient
from tests.sources import client_from
from tests.support import SECRET, write_agent

DAEMON_UI_TOKEN = "daemon-ui-token-for-guessing-tests-5150"
DAEMON_MASTER_KEY = "sk-daemon-master-key-for-guessing-tests-2718"
SCANNER.register(DAEMON_UI_TOKEN, DAEMON_MASTER_KEY)

WIRED = "ui_no_auth" in attrs.fields_dict(Config)


class DaemonWiringTests(TestCase):
    timeout = 60
    skip = None if WIRED else "the daemon does not wire the UI token file yet (Config.ui_no_auth missing)"

    def setUp(self):
        base = os.path.abspath(self.mktemp())
        self.state = os.path.join(base, "state")
        context_root = os.path.join(base, "context")
        write_agent(context_root, "tiverton", SECRET)
        os.makedirs(os.path.join(base, "auth"))
        self.env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": context_root,
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": self.state,
        }
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    @defer.inlineCallbacks
    def _start_daemon(self, env):
        process, transport = spawn_daemon(self, env)
        ports = yield process.ready
        return process, transport, f"http://127.0.0.1:{ports['UI']}"

    @defer.inlineCallbacks
    def _stop_daemon(self, process, transport):
        transport.signalProcess("TERM")
        yield process.ended

    @defer.inlineCallbacks
    def test_a_generated_token_kept_in_the_state_directory(self):
        process, transport, ui = yield self._start_daemon(self.env)
        path = os.path.join(self.state, "ui-token")
        with open(path) as f:
            token = f.read().strip()
        SCANNER.register(token)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertIn(f"sign in with the contents of {path}".encode(), process.stderr)
        refused = yield self.http.get(ui + "/api/status")
        self.assertEqual(refused.code, 401)
        yield refused.text()
        allowed = yield self.http.get(ui + "/api/status", headers={"Authorization": f"Bearer {token}"})
        self.assertEqual(allowed.code, 200)
        yield allowed.text()
        yield self._stop_daemon(process, transport)
        self.assertNotIn(token.encode(), process.stdout + process.stderr)
        # The same token after a restart.
        process, transport, ui = yield self._start_daemon(self.env)
        again = yield self.http.get(ui + "/api/status", headers={"Authorization": f"Bearer {token}"})
        self.assertEqual(again.code, 200)
        yield again.text()
        yield self._stop_daemon(process, transport)

    @defer.inlineCallbacks
    def test_no_auth_only_when_asked_and_loudly(self):
        process, transport, ui = yield self._start_daemon(dict(self.env, CLLAMA_UI_NO_AUTH="1"))
        self.assertIn(b"OPERATOR UI AUTHENTICATION IS OFF", process.stderr)
        self.assertFalse(os.path.exists(os.path.join(self.state, "ui-token")))
        page = yield self.http.get(ui + "/", headers={"Accept": "text/html"})
        self.assertEqual(page.code, 200)
        self.assertIn("Authentication is OFF", (yield page.text()))
        yield self._stop_daemon(process, transport)

    @defer.inlineCallbacks
    def test_no_auth_refuses_dns_rebinding_hosts(self):
        env = dict(self.env, CLLAMA_UI_NO_AUTH="1", CLLAMA_UI_ALLOWED_HOSTS="cllama.lan")
        process, transport, ui = yield self._start_daemon(env)
        port = ui.rsplit(":", 1)[1]
        evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}", "Content-Type": "application/json"}
        refused = yield self.http.post(ui + "/api/reset/tiverton", data=b"{}", headers=evil)
        self.assertEqual(refused.code, 421)
        self.assertEqual((yield refused.json())["error"]["code"], "host_not_allowed")
        page = yield self.http.get(ui + "/budgets", headers={"Host": f"evil.example:{port}", "Accept": "text/html"})
        self.assertEqual(page.code, 421)
        self.assertIn("CLLAMA_UI_ALLOWED_HOSTS", (yield page.text()))
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"cllama.lan:{port}"):
            status = yield self.http.get(ui + "/api/status", headers={"Host": host})
            self.assertEqual(status.code, 200, host)
            self.assertIn("providers", (yield status.json()))
        done = yield self.http.post(
            ui + "/api/reset/tiverton", data=b"{}",
            headers={"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}", "Content-Type": "application/json"},
        )
        self.assertEqual(done.code, 200)
        yield done.text()
        yield self._stop_daemon(process, transport)
        resets = [line for line in process.audit_lines() if line.get("action") == "budget_reset"]
        self.assertEqual(len(resets), 1)
        self.assertIn(b"refused requests for host 'evil.example'", process.stderr)


class OperatorGuessingDaemonTests(TestCase):
    """
    The issue's probes against the real daemon: wrong operator tokens and
    master keys from one address and from 25, on the sign-in form,
    /metrics, /history/<agent> and /key/*.  Clients connect from several
    loopback addresses.
    """

    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        base = os.path.abspath(self.mktemp())
        context_root = os.path.join(base, "context")
        write_agent(context_root, "tiverton", SECRET)
        os.makedirs(os.path.join(base, "auth"))
        env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "tcp:0:interface=127.0.0.1",
            "CLAW_CONTEXT_ROOT": context_root,
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "CLAW_SESSION_HISTORY_DIR": os.path.join(base, "history"),
            "CLLAMA_UI_TOKEN": DAEMON_UI_TOKEN,
            "CLLAMA_MASTER_KEY": DAEMON_MASTER_KEY,
        }
        self.process, self.transport = spawn_daemon(self, env)
        ports = yield self.process.ready
        self.ui = f"http://127.0.0.1:{ports['UI']}"
        self.api = f"http://127.0.0.1:{ports['API']}"
        self.clients = {}

    def client(self, source):
        if source not in self.clients:
            self.clients[source] = client_from(self, reactor, source)
        return self.clients[source]

    @defer.inlineCallbacks
    def get(self, source, url, token):
        response = yield self.client(source).get(url, headers={"Authorization": f"Bearer {token}"})
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def burst(self, source, url, n=100):
        """n wrong guesses at once from one address: (compared, refused) counts."""
        answers = yield defer.gatherResults([self.get(source, url, f"guess-{i}-{'x' * 30}") for i in range(n)])
        codes = [response.code for response, _ in answers]
        # A wrong token is 401 at the key API, 403 at /history/<agent> (as the reference answers).
        compared = codes.count(401) + codes.count(403)
        self.assertEqual(compared + codes.count(429), n, codes)
        for response, body in answers:
            if response.code == 429:
                self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
                self.assertIn("compared in 1 s", body.decode())
        return compared, codes.count(429)

    @defer.inlineCallbacks
    def test_the_right_token_is_never_locked_out_and_guesses_stop_being_compared(self):
        # Five wrong tokens from one address (sign-in form and /metrics):
        # the right one still works there at once.
        here = UiClient(self.client("127.0.0.1"), self.ui)
        for n in range(3):
            response = yield here.sign_in(token=f"wrong-sign-in-{n}-xxxxxxxx")
            self.assertEqual(response.code, 401)
            yield response.text()
        for _ in range(2):
            response, _ = yield self.get("127.0.0.1", self.ui + "/metrics", "wrong-bearer-xxxxxxxxxxxx")
            self.assertEqual(response.code, 401)
        response = yield here.sign_in(token=DAEMON_UI_TOKEN)
        self.assertEqual(response.code, 303)
        self.assertIn("cllama_session", here.cookies)
        response, body = yield self.get("127.0.0.1", self.ui + "/metrics", DAEMON_UI_TOKEN)
        self.assertEqual(response.code, 200)
        self.assertIn(b"cllama_requests", body)

        # 100 wrong tokens from 25 addresses: nobody is locked out.
        sources = [f"127.0.0.{n}" for n in range(2, 27)]
        for _ in range(4):
            answers = yield defer.gatherResults([self.get(s, self.ui + "/metrics", "wrong-spread-xxxxxxxxxx") for s in sources])
            self.assertEqual({response.code for response, _ in answers}, {401})
        for source in ("127.0.0.1", sources[0], sources[-1]):
            response, body = yield self.get(source, self.ui + "/metrics", DAEMON_UI_TOKEN)
            self.assertEqual(response.code, 200, source)
            self.assertIn(b"cllama_requests", body)

        # /history/<agent> and /key/*: a burst of 100 guesses gets about
        # six compared (the rest 429, uncompared); the right credential
        # works at once from any other address.
        compared, refused = yield self.burst("127.0.0.30", self.api + "/history/tiverton")
        self.assertTrue(6 <= compared <= 8, (compared, refused))
        response, body = yield self.get("127.0.0.31", self.api + "/history/tiverton", DAEMON_UI_TOKEN)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/x-ndjson"])
        self.assertEqual(body, b"")
        compared, refused = yield self.burst("127.0.0.40", self.api + "/key/list")
        self.assertTrue(6 <= compared <= 8, (compared, refused))
        response, body = yield self.get("127.0.0.41", self.api + "/key/list", DAEMON_MASTER_KEY)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["total_count"], 0)
        # One throttle: the address that guessed at /history waits at /key/* too.
        response, body = yield self.get("127.0.0.30", self.api + "/key/list", DAEMON_MASTER_KEY)
        self.assertEqual(response.code, 429)
        self.assertEqual(json.loads(body)["error"]["code"], "429")

        self.transport.signalProcess("TERM")
        yield self.process.ended
        lines = [line for line in self.process.audit_lines() if line["type"] == "operator"]
        throttled = {(line["surface"], line["actor"]) for line in lines if line["action"] == "auth_throttled"}
        # Reported once per wait, on the surface that met it first.
        self.assertEqual(throttled, {("history", "anonymous@127.0.0.30"), ("key_api", "anonymous@127.0.0.40")})
        failed = [line for line in lines if line["action"] in ("auth_failed", "sign_in_failed")]
        self.assertGreaterEqual(len(failed), 3 + 2 + 100 + 12)
        output = self.process.stdout + self.process.stderr
        for secret in (b"guess-", b"wrong-", DAEMON_UI_TOKEN.encode(), DAEMON_MASTER_KEY.encode()):
            self.assertNotIn(secret, output)
