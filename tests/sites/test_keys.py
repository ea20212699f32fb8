"""
The LiteLLM-compatible key API end to end: a real store on a temporary
SQLite file, KeyApi's Klein app on a loopback socket, treq as the client.
Expiry runs on an injected Clock; every key the tests see is registered with
the secret scanner, which fails the run if one reaches a log line.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import os

import treq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.server import Site

from cllama_tx.identity.virtual_keys import VirtualKeyStore, iso_time, looks_like_virtual_key
from cllama_tx.sites.keys import ADMIN_OFF, ALIVE, KeyApi, master_key_from_env
from cllama_tx.store.ledger import SqliteLedger
from tests.secret_scan import SCANNER

MASTER = "sk-master-" + "m4st3r" * 6
SCANNER.register(MASTER)
NOW = float(calendar.timegm((2026, 11, 17, 12, 0, 0)))

GENERATE_FIELDS = {
    "key", "key_name", "key_alias", "expires", "team_id", "user_id", "models", "max_budget",
    "budget_duration", "rpm_limit", "tpm_limit", "metadata", "token", "token_id", "spend",
    "duration", "blocked", "created_at",
}
ERROR_FIELDS = {"message", "type", "param", "code"}


class QuietSite(Site):
    """No access log: C{/key/info?key=sk-...} must not reach a log line (as on the API site)."""

    noisy = False

    def log(self, request):
        pass


class FakeLedger:
    def __init__(self, answer=True):
        self.answer = answer

    def ready(self):
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        return defer.succeed(self.answer)


class SilentLedger:
    """Never answers; moves the fake clock past the readiness timeout instead."""

    def __init__(self, clock):
        self.clock = clock

    def ready(self):
        reactor.callLater(0, self.clock.advance, 60)
        return defer.Deferred()


class KeyApiTestCase(TestCase):
    master = MASTER

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.path = os.path.join(os.path.abspath(self.mktemp()), "ledger.sqlite3")
        self.store = VirtualKeyStore(self.path, self.clock, reactor)
        self.store.startService()
        self.addCleanup(self.store.stopService)
        self.spend = {}
        self.ledger = FakeLedger(True)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        self.serve(self.make_api())
        return self.store.when_loaded()

    def make_api(self, **kwargs):
        options = dict(
            master_key=self.master,
            ledger=self.ledger,
            clock=self.clock,
            spend_of=lambda token_hash: self.spend.get(token_hash, 0.0),
        )
        options.update(kwargs)
        return KeyApi(self.store, **options)

    def serve(self, api):
        self.api = api
        port = reactor.listenTCP(0, QuietSite(api.app.resource()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.url = f"http://127.0.0.1:{port.getHost().port}"

    async def call(self, method, path, body=None, token=MASTER, headers=None, raw=None, params=None):
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        kwargs = {"headers": sent, "pool": self.pool}
        if params is not None:
            kwargs["params"] = params
        if raw is not None:
            kwargs["data"] = raw
        elif body is not None:
            kwargs["json"] = body
        response = await treq.request(method, self.url + path, **kwargs)
        content = await response.content()
        return response, (json.loads(content) if content else None)

    async def generate(self, **fields):
        response, body = await self.call("POST", "/key/generate", fields)
        self.assertEqual(response.code, 200, body)
        SCANNER.register(body["key"])
        return body

    def assertError(self, response, body, status, param=None):
        self.assertEqual(response.code, status, body)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(set(body), {"error"})
        self.assertEqual(set(body["error"]), ERROR_FIELDS)
        self.assertEqual(body["error"]["code"], str(status))
        self.assertEqual(body["error"]["param"], param)
        return body["error"]["message"]


class GenerateTests(KeyApiTestCase):
    async def test_litellm_fields(self):
        body = await self.generate(
            duration="24h", team_id="org-7", user_id="session-42", key_alias="session-42",
            models=["openai/gpt-4o", "anthropic/claude-sonnet-4"], max_budget=2.5, budget_duration="1d",
            rpm_limit=60, tpm_limit=100000, metadata={"sandbox": "sb-42"},
        )
        self.assertLessEqual(GENERATE_FIELDS, set(body))
        key = body["key"]
        self.assertTrue(looks_like_virtual_key(key))
        self.assertEqual(len(key), 46)
        self.assertEqual(body["key_name"], "sk-..." + key[-4:])
        self.assertEqual(body["token"], hashlib.sha256(key.encode()).hexdigest())
        self.assertEqual(body["token_id"], body["token"])
        self.assertEqual(body["expires"], "2026-11-18T12:00:00+00:00")
        self.assertEqual(body["duration"], "24h")
        self.assertEqual(
            {k: body[k] for k in ("team_id", "user_id", "key_alias", "models", "max_budget", "budget_duration",
                                  "rpm_limit", "tpm_limit", "metadata", "spend", "blocked")},
            {"team_id": "org-7", "user_id": "session-42", "key_alias": "session-42",
             "models": ["openai/gpt-4o", "anthropic/claude-sonnet-4"], "max_budget": 2.5,
             "budget_duration": "1d", "rpm_limit": 60, "tpm_limit": 100000, "metadata": {"sandbox": "sb-42"},
             "spend": 0.0, "blocked": False},
        )
        vk = self.store.lookup(key)
        self.assertEqual((vk.team_id, vk.user_id, vk.expires), ("org-7", "session-42", NOW + 86400))

    async def test_the_key_is_not_cached(self):
        response, body = await self.call("POST", "/key/generate", {})
        SCANNER.register(body["key"])
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-store"])

    async def test_empty_body_makes_a_key_that_never_expires(self):
        response, body = await self.call("POST", "/key/generate", raw=b"")
        self.assertEqual(response.code, 200)
        SCANNER.register(body["key"])
        self.assertIsNone(body["expires"])
        self.assertEqual(body["models"], [])
        self.assertIsNotNone(self.store.lookup(body["key"]))

    async def test_a_form_content_type_is_still_json(self):
        # curl -d sends application/x-www-form-urlencoded.
        response, body = await self.call(
            "POST", "/key/generate", raw=b'{"user_id": "u1"}',
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        self.assertEqual(response.code, 200, body)
        SCANNER.register(body["key"])
        self.assertEqual(body["user_id"], "u1")

    async def test_sdk_defaults_for_unsupported_fields_are_ignored(self):
        body = await self.generate(
            aliases={}, config={}, permissions={}, spend=0, tags=None, send_invite_email=False,
            max_parallel_requests=None, soft_budget=None, allowed_cache_controls=[],
        )
        self.assertIsNotNone(self.store.lookup(body["key"]))

    async def test_caller_chosen_key(self):
        key = "sk-" + "c4ll3r" * 7
        SCANNER.register(key)
        body = await self.generate(key=key)
        self.assertEqual(body["key"], key)
        response, again = await self.call("POST", "/key/generate", {"key": key})
        self.assertError(response, again, 400, "key")
        response, short = await self.call("POST", "/key/generate", {"key": "sk-1234"})
        self.assertError(response, short, 400, "key")

    async def test_validation_names_the_field(self):
        for doc, param in [
            ({"max_budget": -1}, "max_budget"),
            ({"max_budget": "5"}, "max_budget"),
            ({"rpm_limit": 1.5}, "rpm_limit"),
            ({"tpm_limit": -3}, "tpm_limit"),
            ({"duration": "forever"}, "duration"),
            ({"budget_duration": "1y"}, "budget_duration"),
            ({"models": "openai/gpt-4o"}, "models"),
            ({"models": [1, 2]}, "models"),
            ({"metadata": ["x"]}, "metadata"),
            ({"key_alias": 7}, "key_alias"),
            ({"team_id": {"id": 1}}, "team_id"),
            ({"user_id": "a\u0000b"}, "user_id"),
            ({"blocked": "no"}, "blocked"),
            ({"soft_budget": "10"}, "soft_budget"),
            ({"organization_id": ["org-1"]}, "organization_id"),
            ({"max_parallel_requests": -3}, "max_parallel_requests"),
            ({"model_max_budget": {"gpt-4o": "a lot"}}, "model_max_budget"),
            ({"model_rpm_limit": {"gpt-4o": 1.5}}, "model_rpm_limit"),
            ({"tags": "prod"}, "tags"),
            ({"guardrails": "pii"}, "guardrails"),
            ({"key_type": "superuser"}, "key_type"),
            ({"max_budgte": 5}, "max_budgte"),
        ]:
            response, body = await self.call("POST", "/key/generate", doc)
            message = self.assertError(response, body, 400, param)
            self.assertIn(param, message)
            self.assertEqual(body["error"]["type"], "bad_request_error")
        self.assertEqual(len(self.store), 0)

    async def test_malformed_bodies(self):
        for raw in [b"{", b"[1, 2]", b'"text"', b'{"max_budget": NaN}', b"\xff\xfe"]:
            response, body = await self.call("POST", "/key/generate", raw=raw)
            self.assertError(response, body, 400)

    async def test_aliases_are_unique(self):
        await self.generate(key_alias="session-1")
        response, body = await self.call("POST", "/key/generate", {"key_alias": "session-1"})
        self.assertError(response, body, 400, "key_alias")


class MasterKeyTests(KeyApiTestCase):
    async def test_refusals(self):
        response, body = await self.call("POST", "/key/generate", {}, token=None)
        self.assertError(response, body, 401)
        self.assertEqual(body["error"]["type"], "auth_error")
        response, body = await self.call("POST", "/key/generate", {}, token="sk-not-the-master-key-at-all")
        self.assertError(response, body, 401)
        response, body = await self.call("POST", "/key/generate", {}, token=None, headers={"Authorization": f"Basic {MASTER}"})
        self.assertError(response, body, 401)
        # A present Authorization decides: a right x-api-key does not paper over it.
        response, body = await self.call(
            "POST", "/key/generate", {}, token="sk-wrong-wrong-wrong-wrong", headers={"x-api-key": MASTER}
        )
        self.assertError(response, body, 401)
        for path, method in [("/key/list", "GET"), ("/key/update", "POST"), ("/key/delete", "POST"), ("/key/block", "POST")]:
            response, body = await self.call(method, path, {"key": "x", "keys": []}, token=None)
            self.assertError(response, body, 401)
        self.assertEqual(len(self.store), 0)

    async def test_x_api_key_and_bearer_case(self):
        response, body = await self.call("POST", "/key/generate", {}, token=None, headers={"x-api-key": MASTER})
        self.assertEqual(response.code, 200)
        SCANNER.register(body["key"])
        response, body = await self.call("POST", "/key/generate", {}, token=None, headers={"Authorization": f"bearer  {MASTER}"})
        self.assertEqual(response.code, 200)
        SCANNER.register(body["key"])

    async def test_a_virtual_key_is_not_the_master_key(self):
        key = (await self.generate())["key"]
        response, body = await self.call("POST", "/key/generate", {}, token=key)
        self.assertError(response, body, 401)
        response, body = await self.call("GET", "/key/list", token=key)
        self.assertError(response, body, 401)

    async def test_administration_off_without_a_master_key(self):
        own, vk = await self.store.create(user_id="u")
        SCANNER.register(own)
        self.serve(self.make_api(master_key=None))
        for method, path in [("POST", "/key/generate"), ("GET", "/key/list"), ("POST", "/key/update"), ("POST", "/key/delete")]:
            response, body = await self.call(method, path, {}, token=MASTER)
            self.assertEqual(self.assertError(response, body, 403), ADMIN_OFF)
        response, body = await self.call("GET", "/key/info", params={"key": vk.token_hash}, token=MASTER)
        self.assertEqual(self.assertError(response, body, 403), ADMIN_OFF)
        # A key still reads its own info.
        response, body = await self.call("GET", "/key/info", token=own)
        self.assertEqual(response.code, 200)
        self.assertEqual(body["key"], vk.token_hash)
        # Anything else is told that administration is off.
        response, body = await self.call("GET", "/key/info", token="sk-" + "u" * 43)
        self.assertEqual(self.assertError(response, body, 403), ADMIN_OFF)
        response, body = await self.call("GET", "/health/readiness", token=None)
        self.assertEqual(body["key_administration"], "off")


class InfoTests(KeyApiTestCase):
    async def test_with_the_master_key(self):
        made = await self.generate(team_id="org", user_id="u", duration="1h")
        key, token_hash = made["key"], made["token"]
        self.spend[token_hash] = 1.25
        for wanted in (key, token_hash):
            response, body = await self.call("GET", "/key/info", params={"key": wanted})
            self.assertEqual(response.code, 200, body)
            self.assertEqual(body["key"], token_hash)
            self.assertEqual(body["info"]["spend"], 1.25)
            self.assertEqual(body["info"]["team_id"], "org")
            self.assertEqual(body["info"]["expires"], iso_time(NOW + 3600))
            self.assertNotIn(key, json.dumps(body))
        response, body = await self.call("GET", "/key/info")
        self.assertError(response, body, 400, "key")
        response, body = await self.call("GET", "/key/info", params={"key": "sk-" + "z" * 43})
        self.assertError(response, body, 404, "key")
        response, body = await self.call("GET", "/key/info", params={"key": "an-alias"})
        self.assertError(response, body, 404, "key")

    async def test_spend_may_be_a_deferred(self):
        made = await self.generate()
        self.serve(self.make_api(spend_of=lambda token_hash: defer.succeed(3.5)))
        response, body = await self.call("GET", "/key/info", params={"key": made["token"]})
        self.assertEqual(body["info"]["spend"], 3.5)

    async def test_a_key_reads_its_own_info(self):
        mine = await self.generate(user_id="me")
        other = await self.generate(user_id="other")
        response, body = await self.call("GET", "/key/info", token=mine["key"])
        self.assertEqual(response.code, 200)
        self.assertEqual(body["info"]["user_id"], "me")
        response, body = await self.call("GET", "/key/info", token=None, headers={"x-api-key": mine["key"]})
        self.assertEqual(body["info"]["user_id"], "me")
        response, body = await self.call("GET", "/key/info", params={"key": mine["token"]}, token=mine["key"])
        self.assertEqual(response.code, 200)
        response, body = await self.call("GET", "/key/info", params={"key": other["token"]}, token=mine["key"])
        self.assertError(response, body, 403, "key")
        response, body = await self.call("GET", "/key/info", token=None)
        self.assertError(response, body, 401)

    async def test_an_expired_key_is_refused_to_the_second(self):
        made = await self.generate(duration="30s")
        self.clock.advance(29)
        response, body = await self.call("GET", "/key/info", token=made["key"])
        self.assertEqual(response.code, 200)
        self.clock.advance(1)
        self.assertIsNone(self.store.lookup(made["key"]))
        response, body = await self.call("GET", "/key/info", token=made["key"])
        self.assertError(response, body, 401)
        # The master key still sees it, with its expiry.
        response, body = await self.call("GET", "/key/info", params={"key": made["token"]})
        self.assertEqual(body["info"]["expires"], iso_time(NOW + 30))


class UpdateTests(KeyApiTestCase):
    async def test_update_fields(self):
        made = await self.generate(max_budget=5, models=["a"], duration="1h", key_alias="old")
        self.clock.advance(60)
        response, body = await self.call(
            "POST", "/key/update",
            {"key": made["key"], "max_budget": None, "models": ["b"], "metadata": {"v": 2},
             "key_alias": "new", "duration": "2h", "tpm_limit": 500},
        )
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body["key"], made["token"])
        self.assertNotIn(made["key"], json.dumps(body))
        self.assertEqual(
            {k: body[k] for k in ("max_budget", "models", "metadata", "key_alias", "tpm_limit", "expires")},
            {"max_budget": None, "models": ["b"], "metadata": {"v": 2}, "key_alias": "new",
             "tpm_limit": 500, "expires": iso_time(NOW + 60 + 7200)},
        )
        vk = self.store.lookup(made["key"])
        self.assertEqual((vk.models, vk.max_budget, vk.tpm_limit), (("b",), None, 500))
        # By hash too.
        response, body = await self.call("POST", "/key/update", {"key": made["token"], "rpm_limit": 7})
        self.assertEqual(body["rpm_limit"], 7)

    async def test_refusals(self):
        first = await self.generate(key_alias="taken")
        second = await self.generate()
        response, body = await self.call("POST", "/key/update", {"max_budget": 1})
        self.assertError(response, body, 400, "key")
        response, body = await self.call("POST", "/key/update", {"key": "sk-" + "q" * 43, "max_budget": 1})
        self.assertError(response, body, 404, "key")
        response, body = await self.call("POST", "/key/update", {"key": second["key"], "key_alias": "taken"})
        self.assertError(response, body, 400, "key_alias")
        response, body = await self.call("POST", "/key/update", {"key": second["key"], "rpm_limit": "many"})
        self.assertError(response, body, 400, "rpm_limit")
        response, body = await self.call("POST", "/key/update", {"key": second["key"], "guardrails": "pii"})
        self.assertError(response, body, 400, "guardrails")
        response, body = await self.call("POST", "/key/update", {"key": second["key"], "max_budgte": 1})
        self.assertError(response, body, 400, "max_budgte")
        self.assertIsNone(self.store.lookup(second["key"]).key_alias)
        self.assertEqual(self.store.lookup(first["key"]).key_alias, "taken")

    async def test_block_and_unblock(self):
        made = await self.generate()
        response, body = await self.call("POST", "/key/block", {"key": made["key"]})
        self.assertEqual((response.code, body["blocked"]), (200, True))
        self.assertIsNone(self.store.lookup(made["key"]))
        response, body = await self.call("GET", "/key/info", token=made["key"])
        self.assertError(response, body, 401)
        response, body = await self.call("POST", "/key/unblock", {"key": made["token"]})
        self.assertEqual(body["blocked"], False)
        self.assertIsNotNone(self.store.lookup(made["key"]))
        response, body = await self.call("POST", "/key/block", {"key": "sk-" + "n" * 43})
        self.assertError(response, body, 404, "key")


class DeleteTests(KeyApiTestCase):
    async def test_a_deleted_key_fails_at_once(self):
        made = await self.generate(key_alias="doomed")
        response, body = await self.call("POST", "/key/delete", {"keys": [made["key"]]})
        self.assertEqual(response.code, 200)
        self.assertEqual(body, {"deleted_keys": [made["key"]], "not_found": []})
        self.assertIsNone(self.store.lookup(made["key"]))
        response, body = await self.call("GET", "/key/info", params={"key": made["token"]})
        self.assertError(response, body, 404, "key")
        response, body = await self.call("GET", "/key/info", token=made["key"])
        self.assertError(response, body, 401)
        # Again: nothing left to delete.
        response, body = await self.call("POST", "/key/delete", {"keys": [made["key"]]})
        self.assertEqual(body, {"deleted_keys": [], "not_found": [made["key"]]})

    async def test_by_hash_and_alias(self):
        first = await self.generate()
        second = await self.generate(key_alias="session-2")
        response, body = await self.call(
            "POST", "/key/delete", {"keys": [first["token"], "nonsense"], "key_aliases": ["session-2", "nobody"]}
        )
        self.assertEqual(body, {"deleted_keys": [first["token"], "session-2"], "not_found": ["nonsense", "nobody"]})
        self.assertIsNone(self.store.lookup(first["key"]))
        self.assertIsNone(self.store.lookup(second["key"]))

    async def test_refusals(self):
        for doc, param in [({}, "keys"), ({"keys": "sk-x"}, "keys"), ({"keys": [1]}, "keys"),
                           ({"key_aliases": [None]}, "key_aliases"), ({"keys": ["x"] * 1001}, "keys")]:
            response, body = await self.call("POST", "/key/delete", doc)
            self.assertError(response, body, 400, param)


class ListTests(KeyApiTestCase):
    async def test_pages_and_filters(self):
        made = []
        for i in range(12):
            made.append(await self.generate(team_id=f"org-{i % 3}", user_id=f"user-{i % 2}", key_alias=f"s{i}"))
            self.clock.advance(1)
        newest_first = [m["token"] for m in reversed(made)]
        response, body = await self.call("GET", "/key/list", params={"size": "5", "page": "3"})
        self.assertEqual(response.code, 200)
        self.assertEqual(body, {"keys": newest_first[10:], "total_count": 12, "current_page": 3, "total_pages": 3})
        response, body = await self.call("GET", "/key/list")
        self.assertEqual((body["keys"], body["total_pages"]), (newest_first[:10], 2))
        response, body = await self.call("GET", "/key/list", params={"team_id": "org-1", "size": "100"})
        self.assertEqual(body["total_count"], 4)
        self.assertEqual(set(body["keys"]), {made[i]["token"] for i in (1, 4, 7, 10)})
        response, body = await self.call("GET", "/key/list", params={"team_id": "org-1", "user_id": "user-0"})
        self.assertEqual(set(body["keys"]), {made[i]["token"] for i in (4, 10)})
        response, body = await self.call("GET", "/key/list", params={"key_alias": "s3", "return_full_object": "true"})
        self.assertEqual(len(body["keys"]), 1)
        self.assertEqual((body["keys"][0]["token"], body["keys"][0]["key_alias"]), (made[3]["token"], "s3"))
        dumped = json.dumps(body)
        self.assertFalse(any(m["key"] in dumped for m in made))

    async def test_bad_parameters(self):
        for params, param in [({"size": "0"}, "size"), ({"size": "101"}, "size"), ({"page": "0"}, "page"),
                              ({"page": "two"}, "page"), ({"return_full_object": "maybe"}, "return_full_object")]:
            response, body = await self.call("GET", "/key/list", params=params)
            self.assertError(response, body, 400, param)


class HealthTests(KeyApiTestCase):
    async def test_liveliness(self):
        for path in ("/health/liveliness", "/health/liveness"):
            response, body = await self.call("GET", path, token=None)
            self.assertEqual((response.code, body), (200, ALIVE))
            self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])

    async def test_readiness(self):
        response, body = await self.call("GET", "/health/readiness", token=None)
        self.assertEqual(response.code, 200)
        self.assertEqual(
            {k: body[k] for k in ("status", "db", "virtual_keys", "key_administration")},
            {"status": "healthy", "db": "connected", "virtual_keys": "loaded", "key_administration": "on"},
        )
        for ledger in (FakeLedger(False), FakeLedger(RuntimeError("gone")), SilentLedger(self.clock)):
            self.serve(self.make_api(ledger=ledger))
            response, body = await self.call("GET", "/health/readiness", token=None)
            self.assertEqual(response.code, 503)
            self.assertEqual((body["status"], body["db"]), ("unhealthy", "disconnected"))
        self.serve(self.make_api(ledger=None))
        response, body = await self.call("GET", "/health/readiness", token=None)
        self.assertEqual((response.code, body["db"]), (200, "Not connected"))

    async def test_readiness_with_the_real_ledger(self):
        ledger = SqliteLedger(self.path, reactor)
        ledger.startService()
        self.addCleanup(ledger.stopService)
        self.serve(self.make_api(ledger=ledger))
        response, body = await self.call("GET", "/health/readiness", token=None)
        self.assertEqual((response.code, body["db"]), (200, "connected"))
        await ledger.stopService()
        response, body = await self.call("GET", "/health/readiness", token=None)
        self.assertEqual((response.code, body["db"]), (503, "disconnected"))

    async def test_readiness_waits_for_the_keys(self):
        gate = defer.Deferred()
        loading = VirtualKeyStore(self.path, self.clock, reactor, after=lambda: gate)
        loading.startService()
        self.addCleanup(loading.stopService)
        self.serve(KeyApi(loading, master_key=self.master, ledger=self.ledger, clock=self.clock))
        response, body = await self.call("GET", "/health/readiness", token=None)
        self.assertEqual((response.code, body["virtual_keys"]), (503, "loading"))
        gate.callback(None)
        await loading.when_loaded()
        response, body = await self.call("GET", "/health/readiness", token=None)
        self.assertEqual((response.code, body["virtual_keys"]), (200, "loaded"))

    async def test_readiness_needs_the_key_store(self):
        await self.store.stopService()
        response, body = await self.call("GET", "/health/readiness", token=None)
        self.assertEqual((response.code, body["virtual_keys"]), (503, "not running"))
        response, body = await self.call("POST", "/key/generate", {})
        self.assertError(response, body, 503)


class RoutingTests(KeyApiTestCase):
    async def test_unknown_path_and_method(self):
        response, body = await self.call("GET", "/key/nothing")
        self.assertError(response, body, 404)
        response, body = await self.call("GET", "/key/generate")
        self.assertError(response, body, 405)
        self.assertEqual(response.headers.getRawHeaders("allow"), ["POST"])


class MasterKeyFromEnvTests(SynchronousTestCase):
    def test_names_and_alias(self):
        strong, other = "c" * 20, "l" * 20
        self.assertEqual(master_key_from_env({"CLLAMA_MASTER_KEY": strong, "LITELLM_MASTER_KEY": other}), strong)
        self.assertEqual(master_key_from_env({"LITELLM_MASTER_KEY": f"  {other}\n"}), other)
        self.assertEqual(master_key_from_env({"CLLAMA_MASTER_KEY": "", "LITELLM_MASTER_KEY": other}), other)
        self.assertIsNone(master_key_from_env({}))
        self.assertIsNone(master_key_from_env({"CLLAMA_MASTER_KEY": "  "}))

    def test_a_short_master_key_is_refused(self):
        with self.assertRaises(ValueError) as caught:
            master_key_from_env({"LITELLM_MASTER_KEY": "sk-1234"})
        self.assertIn("LITELLM_MASTER_KEY", str(caught.exception))
        self.assertNotIn("sk-1234", str(caught.exception))
