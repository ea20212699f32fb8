"""
The Klein apps in memory (no sockets): routing, JSON errors, operator auth.
"""

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cllama_tx.identity.contexts import ContextRegistry
from cllama_tx.providers.registry import ProviderRegistry
from cllama_tx.sites.api import ApiApp
from cllama_tx.sites.ui import UiApp
from cllama_tx.surfaces import matrix
from tests.secret_scan import SCANNER
from tests.support import SECRET, write_agent

UI_TOKEN = "operator-token-5150"
SCANNER.register(UI_TOKEN, "sk-abcd-secret-wxyz")


class ApiAppTests(TestCase):
    def setUp(self):
        self.client = StubTreq(ApiApp().app.resource())

    @defer.inlineCallbacks
    def test_health(self):
        response = yield self.client.get("http://proxy/health")
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json()), {"ok": True})

    @defer.inlineCallbacks
    def test_claude_code_connection_warmup(self):
        # Claude Code sends HEAD <base URL>/api/hello when it starts.
        for method in ("head", "get"):
            response = yield getattr(self.client, method)("http://proxy/api/hello")
            self.assertEqual(response.code, 200, method)
        self.assertEqual((yield response.json()), {"ok": True})

    @defer.inlineCallbacks
    def test_surfaces_served_from_the_matrix(self):
        response = yield self.client.get("http://proxy/v1/surfaces")
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual((yield response.json()), matrix.describe())

    @defer.inlineCallbacks
    def test_not_found_shapes(self):
        response = yield self.client.get("http://proxy/nope")
        self.assertEqual(response.code, 404)
        body = yield response.json()
        self.assertEqual(body["error"]["code"], "not_found")
        response = yield self.client.get("http://proxy/v1/messages/nope")
        body = yield response.json()
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"]["type"], "not_found_error")

    @defer.inlineCallbacks
    def test_method_not_allowed(self):
        response = yield self.client.delete("http://proxy/v1/surfaces")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["GET, HEAD"])
        self.assertEqual((yield response.json())["error"]["code"], "method_not_allowed")


class UiAppTests(TestCase):
    def make(self, token):
        root = self.mktemp()
        write_agent(root, "alpha", SECRET)
        write_agent(root, "beta", SECRET)
        clock = Clock()
        contexts = ContextRegistry(root, clock)
        providers = ProviderRegistry({"OPENAI_API_KEY": "sk-abcd-secret-wxyz"}, self.mktemp(), clock)
        app = UiApp(token=token, pod="pod-a", contexts=contexts, providers=providers)
        return StubTreq(app.app.resource())

    @defer.inlineCallbacks
    def test_locked_without_token(self):
        client = self.make(None)
        response = yield client.get("http://ui/api/status", headers={"Authorization": "Bearer anything"})
        self.assertEqual(response.code, 401)
        self.assertIn("CLLAMA_UI_TOKEN", (yield response.json())["error"]["message"])

    @defer.inlineCallbacks
    def test_wrong_token(self):
        client = self.make(UI_TOKEN)
        response = yield client.get("http://ui/api/status", headers={"Authorization": "Bearer nope"})
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ['Bearer realm="cllama"'])

    @defer.inlineCallbacks
    def test_status_with_token_masks_keys(self):
        client = self.make(UI_TOKEN)
        response = yield client.get("http://ui/api/status", headers={"Authorization": f"Bearer {UI_TOKEN}"})
        self.assertEqual(response.code, 200)
        text = yield response.text()
        self.assertNotIn("sk-abcd-secret-wxyz", text)
        body = yield response.json()
        self.assertEqual(body["pod"], "pod-a")
        self.assertEqual(body["agents"], ["alpha", "beta"])
        self.assertIn("openai", str(body["providers"]))

    @defer.inlineCallbacks
    def test_health_is_open(self):
        response = yield self.make(UI_TOKEN).get("http://ui/health")
        self.assertEqual(response.code, 200)
