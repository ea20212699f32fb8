"""
Sites built on first use (cllama_tx.sites.lazy): the stand-in alone, and
the daemon's operator UI and the API's Klein app, not built at start,
built by their first connection or request, which they answer as before;
C{/health} answered without building the API's app.
"""

from __future__ import annotations

import gc
import io
import json

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from cllama_tx.runtime.config import Config
from cllama_tx.runtime.daemon import build_daemon
from cllama_tx.sites.lazy import LazyResource, LazySite
from cllama_tx.sites.ui.app import UiSite


class _Site:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def doStart(self) -> None:
        self.calls.append("start")

    def doStop(self) -> None:
        self.calls.append("stop")

    def buildProtocol(self, addr):
        self.calls.append(f"protocol {addr}")
        return f"protocol for {addr}"


class LazySiteTests(SynchronousTestCase):
    def test_built_on_the_first_connection_and_started_as_the_stand_in_was(self) -> None:
        built: list[_Site] = []

        def build() -> _Site:
            built.append(_Site())
            return built[-1]

        lazy = LazySite(build, "UI")
        from twisted.internet.interfaces import IProtocolFactory

        verifyObject(IProtocolFactory, lazy)
        lazy.doStart()
        self.assertEqual((built, lazy.built), ([], None))
        self.assertEqual(lazy.buildProtocol("a"), "protocol for a")
        self.assertEqual(lazy.buildProtocol("b"), "protocol for b")
        [site] = built
        self.assertIs(lazy.built, site)
        self.assertEqual(site.calls, ["start", "protocol a", "protocol b"])
        lazy.doStop()
        self.assertEqual(site.calls[-1], "stop")

    def test_stopped_before_it_was_ever_used_builds_nothing(self) -> None:
        built: list[_Site] = []
        lazy = LazySite(lambda: built.append(_Site()), "UI")  # type: ignore[func-returns-value]
        lazy.doStart()
        lazy.doStop()
        lazy.doStop()  # a second stop is ignored, as Factory.doStop does
        self.assertEqual(built, [])

    def test_a_site_built_after_a_stop_is_not_started(self) -> None:
        lazy = LazySite(_Site, "UI")
        lazy.doStart()
        lazy.doStop()
        lazy.buildProtocol("a")
        self.assertEqual(lazy.built.calls, ["protocol a"])


class DaemonUiTests(TestCase):
    """The daemon's UI listener serves a stand-in until the UI's first connection."""

    TOKEN = "u" * 32

    def setUp(self) -> None:
        self.addCleanup(gc.unfreeze)
        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        base = self.mktemp()
        env = {
            "CLAW_CONTEXT_ROOT": base + "/context",
            "CLAW_AUTH_DIR": base + "/auth",
            "CLLAMA_STATE_DIR": base + "/state",
            "CLLAMA_UI_TOKEN": self.TOKEN,
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "tcp:0:interface=127.0.0.1",
        }
        self.daemon = build_daemon(Config.from_env(env), reactor, io.StringIO())
        self.daemon.startService()
        self.addCleanup(self.daemon.stopService)
        [self.ui] = [s for s in self.daemon if getattr(s, "label", None) == "UI"]
        [self.api] = [s for s in self.daemon if getattr(s, "label", None) == "API"]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.ui.port.getHost().port}{path}"

    @defer.inlineCallbacks
    def test_built_on_first_use_and_answers_as_before(self):
        lazy = self.ui.factory
        self.assertIsInstance(lazy, LazySite)
        self.assertIsNone(lazy.built, "the UI was built at start")
        response = yield treq.get(self.url("/api/status"), persistent=False)
        self.assertEqual(response.code, 401)  # no token: the UI's own answer
        self.assertIn("error", json.loads((yield response.text())))
        self.assertIsInstance(lazy.built, UiSite)
        site = lazy.built
        self.assertIsNotNone(site.guard, "the UI's connection guard was not set on the built site")
        response = yield treq.get(
            self.url("/api/status"), headers={"Authorization": f"Bearer {self.TOKEN}"}, persistent=False
        )
        self.assertEqual(response.code, 200)
        doc = json.loads((yield response.text()))
        self.assertIn("providers", doc)
        self.assertIs(lazy.built, site)  # built once

    def api_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.api.port.getHost().port}{path}"

    @defer.inlineCallbacks
    def test_api_app_built_on_first_use_not_by_health_probes(self):
        root = self.api.factory.resource
        self.assertIsInstance(root, LazyResource)
        self.assertIsNone(root.built, "the API's Klein app was built at start")
        for method in ("GET", "HEAD"):
            response = yield treq.request(method, self.api_url("/health"), persistent=False)
            self.assertEqual(response.code, 200)
            self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
            body = yield response.content()
            self.assertEqual(json.loads(body) if method == "GET" else body, {"ok": True} if method == "GET" else b"")
        self.assertIsNone(root.built, "a health probe built the API's Klein app")
        response = yield treq.get(self.api_url("/v1/surfaces"), persistent=False)
        self.assertEqual(response.code, 200)
        self.assertIn("surfaces", json.loads((yield response.text())))
        built = root.built
        self.assertIsNotNone(built)
        # A method /health does not take: the app's 405, in the API's error shape.
        response = yield treq.delete(self.api_url("/health"), persistent=False)
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["GET, HEAD"])
        self.assertEqual(json.loads((yield response.text()))["error"]["code"], "method_not_allowed")
        response = yield treq.get(self.api_url("/no/such/path"), persistent=False)
        self.assertEqual(response.code, 404)
        self.assertEqual(json.loads((yield response.text()))["error"]["code"], "not_found")
        self.assertIs(root.built, built)  # built once
