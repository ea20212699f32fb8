"""
The operator UI over loopback HTTP (no browser): sign-in, cookies, CSRF,
throttling, content negotiation, every page's JSON twin, CSV, live events,
and the modes without a token.
"""

from __future__ import annotations

import json
import re
import time

import treq
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseFailed

from cllama_tx.identity.operator import OperatorGuard
from cllama_tx.identity.throttle import FailureThrottle
from cllama_tx.runtime.metrics import Metrics
from tests.secret_scan import SCANNER
from tests.sites.ui.support import UiClient, UiHarness
from tests.sources import client_from
from tests.support import AGENT, PROVIDER_KEY, UI_TOKEN, chat_body

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
BEARER = {"Authorization": f"Bearer {UI_TOKEN}"}
SCANNER.register("sk-second-key-for-rotation-42", "sk-never-added-0000-0000-zzzz", "sk-script-added-key-000000001")


class UiCase(TestCase):
    timeout = 30
    ui_kwargs: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.harness = yield UiHarness(self, ui_kwargs=dict(self.ui_kwargs)).start()
        self.h = self.harness.h
        self.client = self.harness.client

    def actions(self):
        return [line["action"] for line in self.harness.operator_lines()]


class SignInTests(UiCase):
    @defer.inlineCallbacks
    def test_browsers_are_sent_to_sign_in_scripts_get_401(self):
        response = yield self.client.get("/costs?period=7d", headers=HTML)
        self.assertEqual(response.code, 303)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/signin?next=%2Fcosts%3Fperiod%3D7d"])
        response = yield self.client.get("/costs")
        self.assertEqual(response.code, 401)
        self.assertEqual(response.headers.getRawHeaders("www-authenticate"), ['Bearer realm="cllama"'])
        self.assertEqual((yield response.json())["error"]["code"], "operator_token_required")

    @defer.inlineCallbacks
    def test_sign_in_sets_a_strict_expiring_cookie(self):
        response = yield self.client.sign_in()
        self.assertEqual(response.code, 303)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/"])
        [cookie] = [c for c in self.client.set_cookie_headers if c.startswith("cllama_session=")]
        self.assertRegex(cookie, r"^cllama_session=[A-Za-z0-9_-]{40,}; Path=/; HttpOnly; SameSite=Strict; Max-Age=43200$")
        page = yield self.client.get("/", headers=HTML)
        self.assertEqual(page.code, 200)
        html = yield page.text()
        self.assertIn("Signed in", html)
        self.assertIn("as tester", html)
        self.assertEqual(self.actions(), ["sign_in"])
        self.assertEqual(self.harness.operator_lines()[0]["actor"], "operator:tester@127.0.0.1")

    @defer.inlineCallbacks
    def test_secure_cookie_behind_tls(self):
        page = yield self.client.get("/signin", headers={**HTML, "X-Forwarded-Proto": "https"})
        csrf = re.search(r'name="csrf" value="([^"]+)"', (yield page.text())).group(1)
        yield self.client.post("/signin", {"csrf": csrf, "token": UI_TOKEN}, headers={**HTML, "X-Forwarded-Proto": "https"})
        [cookie] = [c for c in self.client.set_cookie_headers if c.startswith("__Host-cllama_session=")]
        self.assertTrue(cookie.endswith("; Secure"))
        page = yield self.client.get("/agents", headers=HTML)
        self.assertEqual(page.code, 200)

    @defer.inlineCallbacks
    def test_sign_in_form_needs_its_nonce(self):
        response = yield self.client.post("/signin", {"csrf": "made-up", "token": UI_TOKEN}, headers=HTML)
        self.assertEqual(response.code, 403)
        self.assertNotIn("cllama_session", self.client.cookies)
        self.assertEqual(self.actions(), [])

    @defer.inlineCallbacks
    def test_five_wrong_tokens_never_lock_out_the_right_one(self):
        for n in range(3):
            response = yield self.client.sign_in(token=f"guess-{n}")
            self.assertEqual(response.code, 401)
            self.assertIn("That is not the operator token", (yield response.text()))
        for _ in range(2):
            response = yield self.client.get("/api/status", headers={"Authorization": "Bearer guess-bearer"})
            self.assertEqual(response.code, 401)
            yield response.text()
        # Five wrong tokens from this address (the old limit then refused
        # even the right one for 300 s): the right one works at once, on the
        # sign-in form and on /metrics, from here and from elsewhere.
        response = yield self.client.sign_in()
        self.assertEqual(response.code, 303)
        self.assertIn("cllama_session", self.client.cookies)
        self.harness.ui.metrics = Metrics(ledger=self.h.ledger)
        scrape = yield self.client.get("/metrics", headers=BEARER)
        self.assertEqual(scrape.code, 200)
        self.assertIn("cllama_requests", (yield scrape.text()))
        other = UiClient(client_from(self, reactor, "127.0.0.2"), self.harness.url)
        scrape = yield other.get("/metrics", headers=BEARER)
        self.assertEqual(scrape.code, 200)
        yield scrape.text()
        self.assertEqual(self.actions(), ["sign_in_failed"] * 3 + ["auth_failed"] * 2 + ["sign_in"])
        self.assertEqual(self.harness.operator_lines()[4]["failures"], 5)
        self.assertNotIn("guess-", self.h.audit_text())

    @defer.inlineCallbacks
    def test_wrong_tokens_from_many_addresses_lock_nobody_out(self):
        # 100 wrong tokens from 25 addresses (the old limit locked the UI
        # for everybody for 300 s): the right token works from all of them.
        clients = [UiClient(client_from(self, reactor, f"127.0.0.{n}"), self.harness.url) for n in range(2, 27)]
        for _ in range(4):
            answers = yield defer.gatherResults(
                [c.get("/api/status", headers={"Authorization": "Bearer wrong-guess"}) for c in clients]
            )
            self.assertEqual({a.code for a in answers}, {401})
            yield defer.gatherResults([a.text() for a in answers])
        for client in (self.client, clients[0], clients[-1]):
            response = yield client.get("/api/status", headers=BEARER)
            self.assertEqual(response.code, 200)
            self.assertIn("providers", (yield response.json()))
        response = yield clients[3].sign_in()
        self.assertEqual(response.code, 303)
        self.assertEqual(self.actions().count("auth_failed"), 100)


    @defer.inlineCallbacks
    def test_sign_out_ends_the_session(self):
        yield self.client.sign_in()
        session = self.client.cookies["cllama_session"]
        csrf = yield self.client.csrf()
        response = yield self.client.post("/signout", {"csrf": csrf}, headers=HTML)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/signin"])
        self.client.cookies["cllama_session"] = session  # a stolen copy is worthless now
        response = yield self.client.get("/", headers=HTML)
        self.assertEqual(response.code, 303)
        self.assertEqual(self.actions(), ["sign_in", "sign_out"])


class GuessingTests(UiCase):
    """An address that keeps guessing waits, on a fake clock."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.guard = OperatorGuard(FailureThrottle(self.clock))
        self.ui_kwargs = {"guard": self.guard}
        d = super().setUp()
        d.addCallback(lambda _: setattr(self.guard, "audit", self.h.audit))
        return d

    @defer.inlineCallbacks
    def test_a_guessing_address_waits_and_its_tokens_are_not_compared(self):
        for _ in range(6):
            response = yield self.client.get("/api/status", headers={"Authorization": "Bearer wrong"})
            self.assertEqual(response.code, 401)
            yield response.text()
        # While it waits even the right token is not compared: a 200 here
        # would tell a guesser it had found it.
        refused = yield self.client.get("/api/status", headers=BEARER)
        self.assertEqual(refused.code, 429)
        self.assertEqual(refused.headers.getRawHeaders("retry-after"), ["1"])
        body = yield refused.json()
        self.assertEqual(body["error"]["code"], "too_many_attempts")
        self.assertEqual(body["error"]["type"], "rate_limit_error")
        page = yield self.client.sign_in()
        self.assertEqual(page.code, 429)
        self.assertIn("Too many failed sign-ins from your address. Try again in 1 s.", (yield page.text()))
        self.assertNotIn("cllama_session", self.client.cookies)
        # Any other address is served at once.
        other = UiClient(client_from(self, reactor, "127.0.0.2"), self.harness.url)
        response = yield other.get("/api/status", headers=BEARER)
        self.assertEqual(response.code, 200)
        yield response.text()
        # Once the wait is over, the right token works from here too.
        self.clock.advance(1)
        response = yield self.client.get("/api/status", headers=BEARER)
        self.assertEqual(response.code, 200)
        yield response.text()
        response = yield self.client.sign_in()
        self.assertEqual(response.code, 303)
        self.assertEqual(self.actions(), ["auth_failed"] * 6 + ["auth_throttled", "sign_in"])
        throttled = self.harness.operator_lines()[6]
        self.assertEqual((throttled["surface"], throttled["retry_after"], throttled["actor"]), ("ui", 1, "anonymous@127.0.0.1"))

    @defer.inlineCallbacks
    def test_the_waits_grow_and_the_sign_in_form_shows_them(self):
        for n in range(6):
            response = yield self.client.sign_in(token=f"guess-{n}")
            yield response.text()
        self.assertEqual(response.code, 429)  # the 6th wrong one: counted, and now a wait
        for expected in ("2", "4", "8"):
            self.clock.advance(int(expected) // 2)
            response = yield self.client.sign_in(token="guess-again")
            self.assertEqual(response.code, 429)
            self.assertEqual(response.headers.getRawHeaders("retry-after"), [expected])
            yield response.text()
        page = yield self.client.get("/signin", headers=HTML)
        self.assertEqual(page.code, 429)
        self.assertEqual(page.headers.getRawHeaders("retry-after"), ["8"])
        yield page.text()
        self.assertEqual(self.actions(), ["sign_in_failed"] * 9)


class CsrfTests(UiCase):
    @defer.inlineCallbacks
    def test_cookie_writes_need_the_csrf_token(self):
        yield self.client.sign_in()
        csrf = yield self.client.csrf()
        form = {"provider": "openai", "secret": "sk-never-added-0000-0000-zzzz"}
        refused = yield self.client.post("/providers/keys", form, headers=HTML)
        self.assertEqual(refused.code, 403)
        self.assertIn("This form has expired", (yield refused.text()))
        refused = yield self.client.post("/providers/keys", {**form, "csrf": csrf}, headers={**HTML, "Origin": "http://evil.example"})
        self.assertEqual(refused.code, 403)
        refused = yield self.client.post(f"/api/budget/{AGENT}", json_body={"limit_usd": 1, "window": "24h"})
        self.assertEqual(refused.code, 403)
        self.assertEqual((yield refused.json())["error"]["code"], "csrf_failed")
        self.assertEqual(len(self.h.providers.resolve("openai").pool.keys), 1)
        self.assertIsNone(self.h.ledger.budget_override(AGENT))
        # With the token (form field or header) the same requests work.
        done = yield self.client.post("/providers/keys", {**form, "csrf": csrf}, headers=HTML)
        self.assertEqual(done.code, 303)
        done = yield self.client.post(f"/api/budget/{AGENT}", json_body={"limit_usd": 1, "window": "24h"}, headers={"X-CSRF-Token": csrf})
        self.assertEqual(done.code, 200)
        self.assertEqual(self.actions(), ["sign_in", "key_add", "budget_set"])

    @defer.inlineCallbacks
    def test_bearer_needs_no_csrf_and_keeps_every_json_endpoint(self):
        for path in ("/api/status", "/costs/api", "/api/spend", f"/api/spend/{AGENT}", "/api/health"):
            response = yield self.client.get(path, headers=BEARER)
            self.assertEqual(response.code, 200, path)
            self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"], path)
        response = yield self.client.post(f"/api/budget/{AGENT}", json_body={"limit_usd": 5, "window": "24h"}, headers=BEARER)
        self.assertEqual(response.code, 200)
        response = yield self.client.post(f"/api/reset/{AGENT}", headers=BEARER)
        self.assertEqual(response.code, 200)
        response = yield self.client.post("/api/reload", headers=BEARER)
        self.assertEqual(response.code, 200)
        # Pages' forms answer JSON to scripts.
        response = yield self.client.post("/providers/keys", {"provider": "openai", "secret": "sk-script-added-key-000000001"}, headers=BEARER)
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json())["provider"], "openai")
        self.assertEqual([(line["action"], line["actor"]) for line in self.harness.operator_lines()][-1], ("key_add", "operator-token@127.0.0.1"))


class ProviderTests(UiCase):
    @defer.inlineCallbacks
    def test_key_lifecycle_and_refusals(self):
        yield self.client.sign_in()
        csrf = yield self.client.csrf("/providers")
        post = lambda path, **form: self.client.post(path, {"csrf": csrf, **form}, headers=HTML)  # noqa: E731
        yield post("/providers/keys", provider="openai", secret="sk-second-key-for-rotation-42", label="second")
        pool = self.h.providers.resolve("openai").pool
        [added] = [k for k in pool.keys if k.label == "second"]
        response = yield post("/providers/keys/activate", provider="openai", key_id=added.id)
        self.assertEqual(response.code, 303)
        self.assertEqual(pool.active_key_id, added.id)
        response = yield post("/providers/keys/delete", provider="openai", key_id=added.id)
        self.assertEqual(response.code, 303)
        self.assertNotIn(added.id, [k.id for k in pool.keys])
        # Refusals come back as a message on the page, never a stack trace.
        response = yield post("/providers/keys/delete", provider="openai", key_id="runtime:nope")
        page = yield self.client.get(response.headers.getRawHeaders("location")[0].split("#")[0], headers=HTML)
        self.assertIn("has no key", (yield page.text()))
        response = yield post("/providers/keys", provider="openai", secret="has spaces in it")
        page = yield self.client.get("/providers", headers=HTML)
        self.assertIn("printable ASCII without spaces", (yield page.text()))
        response = yield post("/providers", name="Bad Name!", base_url="https://x.example/v1")
        page = yield self.client.get("/providers", headers=HTML)
        self.assertIn("provider names are", (yield page.text()))
        response = yield self.client.post("/providers/keys/explode", {"csrf": csrf}, headers=HTML)
        self.assertEqual(response.code, 404)
        self.assertEqual(self.actions(), ["sign_in", "key_add", "key_activate", "key_delete"])
        self.assertNotIn("sk-second-key-for-rotation-42", self.h.audit_text())


class NegotiationTests(UiCase):
    PAGES = {
        "/": {"spend", "daily", "agent_spend", "top_models", "attention", "pod", "version", "agents", "providers"},
        "/agents": {"agents"},
        f"/agents/{AGENT}": {"agents"},
        "/costs?period=7d": {"period", "rows", "agents", "total"},
        "/requests": {"requests", "agents"},
        "/providers": {"providers", "unconfigured"},
        "/budgets": {"agents", "behaviors"},
        "/keys": {"enabled", "keys"},
        "/teams": {"enabled", "org", "team", "user", "customer"},
        "/pricing": {"unpriced", "priced", "snippet"},
    }

    @defer.inlineCallbacks
    def test_every_page_has_a_json_twin(self):
        response = yield self.h.chat(chat_body(model="openai/gpt-4.1-mini"))
        yield response.text()
        yield self.h.committed()
        yield self.client.sign_in()
        for path, keys in self.PAGES.items():
            for headers in ({"Accept": "application/json"}, BEARER):
                response = yield self.client.get(path, headers=headers)
                self.assertEqual(response.code, 200, path)
                doc = yield response.json()
                self.assertTrue(keys <= set(doc), (path, sorted(doc)))
            html = yield self.client.get(path, headers=HTML)
            self.assertEqual(html.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"], path)
            forced = yield self.client.get(path + ("&" if "?" in path else "?") + "format=json", headers=HTML)
            self.assertEqual(forced.headers.getRawHeaders("content-type"), ["application/json"], path)
            yield forced.text()
        overview = yield (yield self.client.get("/", headers=BEARER)).json()
        self.assertEqual(overview["spend"]["today"]["requests"], 1)
        self.assertEqual(overview["agents"], [AGENT])

    @defer.inlineCallbacks
    def test_security_headers(self):
        yield self.client.sign_in()
        response = yield self.client.get("/providers", headers=HTML)
        headers = response.headers
        csp = headers.getRawHeaders("content-security-policy")[0]
        self.assertIn("default-src 'none'", csp)
        self.assertIn("script-src 'self'", csp)
        self.assertNotIn("unsafe-inline", csp)
        self.assertEqual(headers.getRawHeaders("x-frame-options"), ["DENY"])
        self.assertEqual(headers.getRawHeaders("x-content-type-options"), ["nosniff"])
        self.assertEqual(headers.getRawHeaders("cache-control"), ["no-store"])
        html = yield response.text()
        self.assertNotIn("style=", html)
        self.assertNotIn("<script>", html)
        self.assertNotIn(PROVIDER_KEY, html)
        self.assertIn(PROVIDER_KEY[:4] + "…" + PROVIDER_KEY[-4:], html)

    @defer.inlineCallbacks
    def test_static_files_cache_by_version(self):
        response = yield self.client.get("/static/ui.css")
        etag = response.headers.getRawHeaders("etag")[0]
        self.assertEqual(response.headers.getRawHeaders("cache-control"), ["no-cache"])
        again = yield self.client.get("/static/ui.css", headers={"If-None-Match": etag})
        self.assertEqual(again.code, 304)
        versioned = yield self.client.get(f"/static/ui.css?v={etag.strip(chr(34))}")
        self.assertIn("immutable", versioned.headers.getRawHeaders("cache-control")[0])
        missing = yield self.client.get("/static/../ui.py")
        self.assertEqual(missing.code, 404)

    @defer.inlineCallbacks
    def test_unknown_pages(self):
        yield self.client.sign_in()
        response = yield self.client.get("/nope", headers=HTML)
        self.assertEqual(response.code, 404)
        self.assertIn("Not found", (yield response.text()))
        response = yield self.client.get("/agents/nobody", headers=BEARER)
        self.assertEqual(response.code, 404)
        self.assertEqual((yield response.json())["error"]["code"], "not_found")


class ContentTests(UiCase):
    @defer.inlineCallbacks
    def test_names_from_upstreams_are_escaped(self):
        yield self.harness.record(AGENT, time.time(), model='<img src=x onerror="alert(1)">', priced=False)
        yield self.client.sign_in()
        for path in ("/", "/agents", "/costs", "/requests", "/pricing"):
            html = yield (yield self.client.get(path, headers=HTML)).text()
            self.assertNotIn("<img src=x", html, path)
            # Twisted's flattener escapes & < > in text ("&quot;" is for attribute values).
            self.assertIn('&lt;img src=x onerror="alert(1)"&gt;', html, path)

    @defer.inlineCallbacks
    def test_costs_csv(self):
        response = yield self.h.chat(chat_body(model="openai/gpt-4.1-mini"))
        yield response.text()
        yield self.h.committed()
        response = yield self.client.get("/costs.csv?period=today", headers=BEARER)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/csv; charset=utf-8"])
        today = time.strftime("%Y-%m-%d", time.gmtime())
        self.assertEqual(
            response.headers.getRawHeaders("content-disposition"), [f'attachment; filename="cllama-costs-{today}-{today}.csv"']
        )
        lines = (yield response.text()).strip().split("\r\n")
        self.assertEqual(len(lines), 2)
        self.assertTrue(lines[1].startswith(f"{today},{today},{AGENT},openai,gpt-4.1-mini,1,0,"))
        same = yield self.client.get("/costs?period=today", headers={**BEARER, "Accept": "text/csv"})
        self.assertEqual((yield same.text()).strip().split("\r\n"), lines)
        bad = yield self.client.get("/costs?since=2026-13-01", headers=BEARER)
        self.assertEqual(bad.code, 400)

    @defer.inlineCallbacks
    def test_virtual_keys_for_scripts(self):
        response = yield self.client.post("/keys", json_body={"key_alias": "s-1", "team_id": "org", "duration": "1h"}, headers=BEARER)
        self.assertEqual(response.code, 201)
        doc = yield response.json()
        self.assertEqual(self.harness.keys.lookup(doc["key"]).key_alias, "s-1")
        listed = yield (yield self.client.get("/keys", headers=BEARER)).text()
        self.assertNotIn(doc["key"], listed)
        self.assertIn(doc["id"], listed)
        self.assertNotIn(doc["key"], self.h.audit_text())
        response = yield self.client.post("/keys/revoke", {"key_id": doc["id"]}, headers=BEARER)
        self.assertEqual(response.code, 200)
        self.assertIsNone(self.harness.keys.lookup(doc["key"]))
        self.assertEqual(self.actions(), ["virtual_key_create", "virtual_key_revoke"])
        refused = yield self.client.post("/keys", json_body={"rpm_limit": -1}, headers=BEARER)
        self.assertEqual(refused.code, 400)


class LiveTests(UiCase):
    @defer.inlineCallbacks
    def test_events_announce_changes(self):
        response = yield self.client.get("/events", headers={**BEARER, "Accept": "text/event-stream"})
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        seen = []
        hello, change = defer.Deferred(), defer.Deferred()

        def chunk(data):
            seen.append(data)
            text = b"".join(seen)
            if b"event: hello" in text and not hello.called:
                hello.callback(None)
            if b"event: change" in text and not change.called:
                change.callback(None)

        body = treq.collect(response, chunk)
        body.addErrback(lambda f: f.trap(ResponseFailed))
        yield hello
        self.assertEqual(self.harness.ui.live.clients, 1)
        chat = yield self.h.chat(chat_body(model="openai/gpt-4.1-mini"))
        yield chat.text()
        yield change
        yield self.harness.factory.close_all()
        yield body
        self.assertEqual(self.harness.ui.live.clients, 0)

    @defer.inlineCallbacks
    def test_head_does_not_hold_the_connection(self):
        # A client is done with a HEAD once it has the headers, and may reuse
        # the connection: the server must not keep streaming on it.
        response = yield self.h.http.request("HEAD", self.harness.url + "/events", headers=BEARER)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.harness.ui.live.clients, 0)

    @defer.inlineCallbacks
    def test_events_need_the_operator(self):
        response = yield self.client.get("/events", headers={"Accept": "text/event-stream"})
        self.assertEqual(response.code, 401)
        yield response.text()


class NoTokenTests(UiCase):
    ui_kwargs = {"token": None}

    @defer.inlineCallbacks
    def test_locked(self):
        response = yield self.client.get("/signin", headers=HTML)
        self.assertIn("The operator UI is locked", (yield response.text()))
        response = yield self.client.get("/api/status", headers={"Authorization": "Bearer anything"})
        self.assertEqual(response.code, 401)
        self.assertIn("CLLAMA_UI_TOKEN", (yield response.json())["error"]["message"])
        response = yield self.client.get("/", headers=HTML)
        self.assertEqual(response.code, 303)


class AuthOffTests(UiCase):
    ui_kwargs = {"token": None, "auth_disabled": True}

    def setUp(self):
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)
        return super().setUp()

    @defer.inlineCallbacks
    def test_open_but_loud_and_still_csrf_safe(self):
        self.assertTrue(any(e.get("log_level").name == "critical" and "AUTHENTICATION IS OFF" in e.get("log_format", "") for e in self.logged))
        page = yield self.client.get("/", headers=HTML)
        self.assertEqual(page.code, 200)
        html = yield page.text()
        self.assertIn("Authentication is OFF", html)
        status = yield self.client.get("/api/status")
        self.assertEqual(status.code, 200)
        yield status.text()
        # A cross-site form post carries no token: refused.
        self.client.cookies.clear()
        refused = yield self.client.post(f"/budgets/{AGENT}/reset", {}, headers=HTML)
        self.assertEqual(refused.code, 403)
        csrf = yield self.client.csrf("/budgets")
        done = yield self.client.post(f"/budgets/{AGENT}/reset", {"csrf": csrf}, headers=HTML)
        self.assertEqual(done.code, 303)
        json_script = yield self.client.post(f"/api/reset/{AGENT}", json_body={})
        self.assertEqual(json_script.code, 200)
        self.assertEqual([(line["action"], line["actor"]) for line in self.harness.operator_lines()],
                         [("budget_reset", "unauthenticated@127.0.0.1")] * 2)
        self.assertEqual(json.loads((yield json_script.text()))["agent"], AGENT)

    @defer.inlineCallbacks
    def test_a_dns_rebinding_page_is_refused(self):
        # evil.example resolved to 127.0.0.1 for the browser: the page is
        # same-origin with the UI, so only the Host header gives it away.
        port = self.harness.port.getHost().port
        evil = {"Host": f"evil.example:{port}", "Origin": f"http://evil.example:{port}"}
        page = yield self.client.get("/budgets", headers={**HTML, "Host": evil["Host"]})
        self.assertEqual(page.code, 421)
        self.assertIn("CLLAMA_UI_ALLOWED_HOSTS", (yield page.text()))
        self.assertEqual(self.client.cookies, {})  # no session handed out either
        for path in (f"/api/reset/{AGENT}", f"/api/budget/{AGENT}"):
            refused = yield self.client.post(path, json_body={"limit_usd": 1000}, headers=evil)
            self.assertEqual(refused.code, 421)
            body = yield refused.json()
            self.assertEqual(body["error"]["code"], "host_not_allowed")
        status = yield self.client.get("/api/status", headers={"Host": "EVIL.example."})
        self.assertEqual(status.code, 421)
        yield status.text()
        self.assertEqual(self.harness.operator_lines(), [])
        warnings = [e for e in self.logged if "refused requests for host" in e.get("log_format", "")]
        self.assertEqual([e["host"] for e in warnings], ["evil.example"])  # once per name
        # The names that cannot be rebound are served.
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"ui.localhost:{port}"):
            response = yield self.client.get("/api/status", headers={"Host": host})
            self.assertEqual(response.code, 200, host)
            yield response.text()
        done = yield self.client.post(f"/api/reset/{AGENT}", json_body={}, headers={"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"})
        self.assertEqual(done.code, 200)
        yield done.text()
        self.assertEqual(self.actions(), ["budget_reset"])


class AuthOffAllowedHostsTests(UiCase):
    ui_kwargs = {"token": None, "auth_disabled": True, "allowed_hosts": frozenset({"cllama.lan", ".corp.example"})}

    @defer.inlineCallbacks
    def test_the_operators_names_are_served(self):
        for host, code in (("cllama.lan:8081", 200), ("ui.corp.example", 200), ("cllama.lan.evil.example", 421)):
            response = yield self.client.get("/api/status", headers={"Host": host})
            self.assertEqual(response.code, code, host)
            yield response.text()


class TokenHostTests(UiCase):
    @defer.inlineCallbacks
    def test_with_authentication_any_host_name_is_served(self):
        # The token stops a rebinding page already; proxies may use any name.
        response = yield self.client.get("/api/status", headers={**BEARER, "Host": "cllama.internal:443"})
        self.assertEqual(response.code, 200)
        yield response.text()


del UiCase  # a base, not a test

_ = reactor  # the harness runs on the global reactor
