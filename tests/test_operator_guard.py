"""
Operator credentials on the API port: C{/history/<agent>} (UI token), the
key API and billing (master key) share one throttle of wrong guesses, over
real loopback sockets, with the throttle on a fake clock.  Clients connect
from several loopback addresses to be several machines.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cllama_tx.identity.throttle import FailureThrottle
from tests.secret_scan import SCANNER
from tests.sources import client_from
from tests.support import AGENT, MASTER_KEY, SECRET, UI_TOKEN, ProxyHarness, chat_body, write_agent

WRONG = "sk-wrong-guess-000000000000000000000000000000000"


class OperatorGuardTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield ProxyHarness(self, history_dir=os.path.abspath(self.mktemp())).start()
        self.clock = Clock()
        self.clock.advance(1_000_000)
        # The one guard the harness wired into the key API, billing and the
        # API app: put its throttle on a clock the test moves.
        self.guard = self.h.keys_api.guard
        self.guard.throttle = FailureThrottle(self.clock)
        self.guard.audit = self.h.audit
        self.clients = {}

    def client(self, source="127.0.0.1"):
        if source not in self.clients:
            self.clients[source] = client_from(self, reactor, source)
        return self.clients[source]

    @defer.inlineCallbacks
    def get(self, path, token, source="127.0.0.1"):
        response = yield self.client(source).get(self.h.base_url + path, headers={"Authorization": f"Bearer {token}"})
        body = yield response.content()
        return response, body

    @defer.inlineCallbacks
    def post(self, path, doc, token, source="127.0.0.1"):
        response = yield self.client(source).post(
            self.h.base_url + path, data=json.dumps(doc).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        body = yield response.content()
        return response, body

    def guard_lines(self):
        return [(line["action"], line["surface"]) for line in self.h.audit_lines() if line["type"] == "operator" and "surface" in line]

    @defer.inlineCallbacks
    def test_history_stops_comparing_guesses_yet_the_right_token_works(self):
        response = yield self.h.chat(chat_body(model="openai/gpt-test"))
        self.assertEqual(response.code, 200)
        yield response.content()
        yield self.h.committed()
        path = f"/history/{AGENT}"
        # A burst of 200 guesses: 6 are compared, every other one is refused
        # without being compared.
        answers = yield defer.gatherResults([self.get(path, f"guess-{n}") for n in range(200)])
        codes = [response.code for response, _ in answers]
        self.assertEqual((codes.count(403), codes.count(429)), (6, 194))
        refused = next(body for response, body in answers if response.code == 429)
        error = json.loads(refused)["error"]
        self.assertEqual((error["code"], error["type"]), ("too_many_attempts", "rate_limit_error"))
        self.assertIn("compared in 1 s", error["message"])
        self.assertEqual({r.headers.getRawHeaders("retry-after")[0] for r, _ in answers if r.code == 429}, {"1"})
        # Even the right token waits here (a 200 would answer the guess)...
        response, _ = yield self.get(path, UI_TOKEN)
        self.assertEqual(response.code, 429)
        # ...and is served at once from any other address,
        response, body = yield self.get(path, UI_TOKEN, source="127.0.0.2")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body.splitlines()[0])["claw_id"], AGENT)
        # and from here once the wait is over.
        self.clock.advance(1)
        response, body = yield self.get(path, UI_TOKEN)
        self.assertEqual(response.code, 200)
        self.assertEqual(len(body.splitlines()), 1)
        self.assertEqual(self.guard_lines(), [("auth_failed", "history")] * 6 + [("auth_throttled", "history")])
        self.assertNotIn("guess-", self.h.audit_text())

    @defer.inlineCallbacks
    def test_key_api_and_billing_share_the_throttle(self):
        # Wrong guesses spread over three surfaces count together.
        for path in ("/key/list", "/key/info?key=x", "/spend/logs"):
            for _ in range(2):
                response, body = yield self.get(path, WRONG)
                self.assertEqual(response.code, 401, body)
        response, body = yield self.get("/history/x", "not-the-ui-token")
        self.assertEqual(response.code, 429)  # the 7th: not compared
        # The master key from this address waits too, on every surface, in each one's shape.
        response, body = yield self.post("/key/generate", {}, MASTER_KEY)
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
        self.assertEqual(json.loads(body), {"error": {
            "message": "too many wrong keys from this address: the next one is compared in 1 s",
            "type": "rate_limit_error", "param": None, "code": "429"}})
        response, body = yield self.get("/api/spend/events", MASTER_KEY)
        self.assertEqual(response.code, 429)
        self.assertEqual(json.loads(body)["error"]["code"], "429")
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["1"])
        # Elsewhere the master key works at once.
        response, body = yield self.post("/key/generate", {"key_alias": "elsewhere"}, MASTER_KEY, source="127.0.0.3")
        self.assertEqual(response.code, 200)
        SCANNER.register(json.loads(body)["key"])
        response, body = yield self.get("/spend/logs", MASTER_KEY, source="127.0.0.3")
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body), [])
        self.clock.advance(1)
        response, body = yield self.get("/key/list", MASTER_KEY)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["total_count"], 1)
        self.assertEqual(
            self.guard_lines(),
            [("auth_failed", "key_api")] * 4 + [("auth_failed", "billing")] * 2 + [("auth_throttled", "history")],
        )
        self.assertNotIn(WRONG, self.h.audit_text())

    @defer.inlineCallbacks
    def test_issued_virtual_keys_are_not_guesses(self):
        response, body = yield self.post("/key/generate", {"duration": "60s"}, MASTER_KEY)
        key = json.loads(body)["key"]
        SCANNER.register(key)
        # Misused at an administrative route, or expired and retried: not counted.
        for _ in range(10):
            response, _ = yield self.get("/key/list", key)
            self.assertEqual(response.code, 401)
        self.h.keys._clock = _Later(reactor, 61)  # the key has expired
        for _ in range(10):
            response, _ = yield self.get("/key/info", key)
            self.assertEqual(response.code, 401)
        self.assertEqual(self.guard.throttle.failures("127.0.0.1"), 0)
        # A live key reads its own info even while its address waits.
        self.h.keys._clock = reactor
        for _ in range(7):
            yield self.get("/key/list", WRONG)
        response, _ = yield self.get("/key/list", MASTER_KEY)
        self.assertEqual(response.code, 429)
        response, body = yield self.get("/key/info", key)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(body)["info"]["spend"], 0.0)

    @defer.inlineCallbacks
    def test_an_agent_reads_only_its_own_history(self):
        # Its own credentials read its own history (as the reference allows)...
        response, body = yield self.get(f"/history/{AGENT}", f"{AGENT}:{SECRET}")
        self.assertEqual((response.code, body), (200, b""))
        # ...not another agent's: a wrong token, counted.
        write_agent(self.h.context_root, "other", SECRET)
        response, body = yield self.get("/history/other", f"{AGENT}:{SECRET}")
        self.assertEqual(response.code, 403)
        self.assertEqual(json.loads(body)["error"]["code"], "invalid_credentials")
        # No credential at all is no guess.
        response = yield self.client().get(self.h.base_url + f"/history/{AGENT}")
        self.assertEqual(response.code, 401)
        yield response.content()
        self.assertEqual(self.guard.throttle.failures("127.0.0.1"), 1)


class _Later:
    """The reactor's clock, C{offset} seconds on."""

    def __init__(self, clock, offset):
        self._clock = clock
        self._offset = offset

    def seconds(self):
        return self._clock.seconds() + self._offset

    def callLater(self, *args, **kwargs):
        return self._clock.callLater(*args, **kwargs)
