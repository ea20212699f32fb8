"""
Tests for L{cllama_tx.sites.gate_console_api}: which API-port paths are the
OR gate's console, and that it answers loopback connections only.
"""

from __future__ import annotations

import json

from twisted.internet.address import IPv4Address
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from cllama_tx.sites.gate_console_api import GateConsoleApi, claims, posts


class PathTests(SynchronousTestCase):
    def test_claims(self) -> None:
        for path in (b"/api/health", b"/api/spend", b"/api/reload", b"/api/spend/agent-1", b"/api/budget/agent-1",
                     b"/api/reset/default"):
            with self.subTest(path=path):
                self.assertTrue(claims(b"GET", path))
        # The key API's cursor feed, deeper paths and other routes stay theirs.
        for path in (b"/api/spend/events", b"/api/spend/", b"/api/spend/a/b", b"/api/hello", b"/v1/chat/completions",
                     b"/api/budget/"):
            with self.subTest(path=path):
                self.assertFalse(claims(b"GET", path))

    def test_bodies_without_credentials(self) -> None:
        self.assertTrue(posts(b"/api/budget/agent-1"))
        self.assertTrue(posts(b"/api/reset/agent-1"))
        self.assertTrue(posts(b"/api/reload"))
        self.assertFalse(posts(b"/api/spend/agent-1"))
        self.assertFalse(posts(b"/key/generate"))


class LoopbackTests(SynchronousTestCase):
    def test_another_host_is_refused(self) -> None:
        api = GateConsoleApi(console=None, operations=None, ledger=None, clock=None)  # type: ignore[arg-type]
        request = DummyRequest([b"api", b"spend"])
        request.client = IPv4Address("TCP", "10.0.0.7", 40000)
        body = api.spend(request)
        self.assertEqual(request.responseCode, 403)
        self.assertEqual(json.loads(body)["error"]["code"], "loopback_only")
