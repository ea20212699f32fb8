"""
The operator UI as the real daemon builds it (`twistd -n cllama` in a child
process): a token generated at the first start into the state directory,
kept across restarts, its path logged and never its value; authentication
off only when asked for, and loudly.
"""

from __future__ import annotations

import os
import stat

import attrs
import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.config import Config

from ..secret_scan import SCANNER
from ..support import SECRET, write_agent
from ..test_daemon import spawn_daemon

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
