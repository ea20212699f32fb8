"""
Every string an agent, an upstream or an operator controls is shown as text
on every page: model names, provider labels, pod names, metadata, tier names,
key labels and errors, virtual key fields, model table names, alert texts,
flash messages, the sign-in page's return path, error messages.  Each is
planted with markup that would run if it were not escaped; every HTML page
is fetched signed in and parsed: no planted element or attribute survives,
and each planted string reads back as the exact text it was.
"""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser
from urllib.parse import quote

from twisted.application.service import MultiService
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from cllama_tx.governance.mappings import LLM, ModelMapping
from cllama_tx.identity.teams import member_entry
from cllama_tx.providers.keys import classify_failure
from cllama_tx.runtime.routing import build_routing
from cllama_tx.sites.ui.app import UiApp
from cllama_tx.sites.ui.auth import clean_name
from tests.sites.ui.support import UiClient, UiHarness
from tests.sources import client_from
from tests.support import SECRET, UI_TOKEN, write_agent

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
BAD_AGENT = "mallory"  # agent ids are [A-Za-z0-9._-]: the agent itself is plain


def planted(field: str) -> str:
    """What an attacker would put in C{field}: markup for text, for attributes, and for <title>."""
    return (
        f"{field}<script>alert('{field}')</script>\"'&amp;</title>"
        f"<img src=x onerror=alert('{field}')>javascript:alert('{field}')"
    )


# Names that must still be usable as what they are (a provider key label is
# free text; a model name can be anything an upstream answers).
POD = planted("pod")
META = planted("service")
TIER = planted("tier")
TIER_MODEL = "openai/" + planted("tiermodel")
MODEL = planted("model")
PROVIDER = planted("provider")
KEY_LABEL = planted("keylabel")
KEY_ERROR = planted("keyerror")
BASE_URL = "https://evil.example/" + re.sub(r"\s", "", planted("baseurl"))
VKEY = planted("vkey")
VKEY_USER = planted("vkeyuser")
TABLE_MODEL = planted("tablemodel")
TABLE_ALIAS = planted("tablealias")
FLASH_KEY_ID = planted("flashkey")
NEXT = "/" + planted("next")
NOT_AN_AGENT = planted("notanagent").replace("/", "")  # a path segment: no slash
BAD_DAY = planted("badday")
OPERATOR = "Ada <b>\"&'</b>"  # the audit's actor name: kept to plain characters
MAPPED = planted("mapped")  # a requested name the resolver mapped, its caller's note, a name it traced
PROMPT = planted("prompt")
SERVER = planted("server")  # what a local model server says of itself

TABLE = f"""
model_list:
  - model_name: {json.dumps(TABLE_MODEL)}
    litellm_params:
      model: openai/gpt-4o
  - model_name: gpt-4
    litellm_params:
      model: openai/gpt-4o
router_settings:
  model_group_alias:
    {json.dumps(TABLE_ALIAS)}: gpt-4
"""


class _Servers:
    """The discovery object's part the debug page reads."""

    def __init__(self, servers):
        self.servers = servers

    def snapshot(self):
        return self.servers

    def status(self):
        """The discovery page's facts, with markup where an operator's settings could put it."""
        return {
            "enabled": True, "interval_s": 60.0, "probe_timeout_s": 1.0, "concurrency": 16,
            "targets": [SERVER + ":11434"],
            "port_scan": {"on": True, "method": SERVER, "ports": "1024-65535", "excluded": 3},
            "docker": {"socket": "/run/" + SERVER, "present": False, "project": SERVER},
            "running": False,
            "last_round": {"started_at": 0.0, "duration_ms": 12.0, "probed": 3, "found": 1, "problems": {SERVER: SERVER}},
            "next_round_at": None,
        }


class _Page(HTMLParser):
    """A page as the browser's parser sees it: elements, attributes, text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.texts: list[str] = []
        self.title: list[str] | None = None  # the text of the first <title>, the document's
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, {k: v or "" for k, v in attrs}))
        if tag == "title" and self.title is None:
            self.title, self._in_title = [], True

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False

    def handle_data(self, data):
        self.texts.append(data)
        if self._in_title:
            self.title.append(data)

    def strings(self) -> list[str]:
        return self.texts + [v for _, attrs in self.elements for v in attrs.values()]


class EscapingTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        table = os.path.abspath(self.mktemp())
        with open(table, "w") as f:
            f.write(TABLE)
        self.harness = yield UiHarness(self, ui_kwargs={"pod": POD}, model_table=table).start()
        h = self.harness.h
        # An agent whose metadata and budget tiers carry markup.
        write_agent(
            h.context_root, BAD_AGENT, SECRET, pod=POD, service=META, type=META,
            budget={"limit_usd": 5, "period": "monthly", "behavior": "hard_stop",
                    "tiers": [{"threshold": 0.5, "models": [TIER_MODEL], "name": TIER}]},
        )
        h.contexts.reload()
        # Model names and provider labels as the ledger keeps them (they come from upstreams).
        now = reactor.seconds()
        yield self.harness.record(BAD_AGENT, now - 120, model=MODEL, priced=False)
        yield self.harness.record(BAD_AGENT, now - 60, model="gpt-4.1-mini", provider=PROVIDER, cost=0.5)
        # A provider key with a label, refused by its provider with a reason.
        registry = h.providers
        key_id = registry.add_key("openai", "sk-escaping-test-key-0000-1111", KEY_LABEL)
        pool = registry.resolve("openai").pool
        key = pool.get(key_id)
        pool.report(key, classify_failure(401, None, b'{"error":"invalid api key"}'))
        pool.check_failed(key, KEY_ERROR)
        registry.add_provider("evilbase", base_url=BASE_URL)
        # A virtual key with markup in every field, and spend billed to its user.
        _, vk = yield self.harness.keys.create(
            key_alias=VKEY, team_id=VKEY, user_id=VKEY_USER, models=[VKEY], max_budget=1.0, budget_duration="30d", duration="7d"
        )
        yield self.harness.record(vk.user_id, now - 30, cost=0.2, key=vk)
        # Model routing: a mapping the resolver made, a traced request, a discovered server.
        self.services = MultiService()
        servers = _Servers([{"name": SERVER, "kind": SERVER, "base_url": BASE_URL, "found_by": SERVER,
                              "models": [MODEL], "last_seen": now, "state": SERVER, "container": SERVER}])
        routing = build_routing(
            env={}, clock=reactor, database=h.keys.database, ledger=h.ledger, instance="test", router=h.router,
            providers=h.providers, upstream=h.upstream, metering=h.metering, parent=self.services,
            discovery=servers,
        )
        self.services.startService()
        self.addCleanup(self.services.stopService)
        yield routing.mappings.when_loaded()
        yield routing.mappings.put(ModelMapping(MAPPED, "openai/" + MODEL, LLM, now, now, None, BAD_AGENT,
                                                {"resolver_model": "openai/" + MODEL, "prompt": PROMPT}))
        routing.trace.record("req-1", BAD_AGENT, MAPPED, ("llm_mapping",), "openai/" + MODEL, None, PROMPT)
        self.harness.ui.routing = routing
        self.harness.ui.discovery = servers
        # Teams, organisations, users and customers named with markup (the key API takes any name).
        yield h.directory.create("org", VKEY, {"alias": VKEY})
        yield h.directory.create("team", VKEY, {"alias": VKEY, "org": VKEY, "models": [VKEY],
                                                "members": {VKEY_USER: member_entry("user", None, {}, now)}})
        yield h.directory.create("user", VKEY_USER, {"alias": VKEY_USER})
        yield h.directory.create("customer", VKEY_USER, {"max_budget": 1.0})
        yield h.committed()
        self.client = self.harness.client
        yield self.client.sign_in(name=OPERATOR)
        self.csrf = yield self.client.csrf()

    @defer.inlineCallbacks
    def page(self, path, *, client=None, method="GET", form=None, expect=(200,)):
        client = client or self.client
        if method == "GET":
            response = yield client.get(path, headers=HTML)
        else:
            response = yield client.post(path, form, headers=HTML)
        body = yield response.content()
        self.assertIn(response.code, expect, (path, body[:400]))
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/html; charset=utf-8"], path)
        return body.decode("utf-8")

    def assertSafe(self, path: str, html: str, shown: tuple[str, ...]) -> None:
        """Nothing planted became markup; each of C{shown} reads back as its exact text."""
        page = _Page()
        page.feed(html)
        page.close()
        for tag, attrs in page.elements:
            self.assertNotEqual(tag, "img", path)
            if tag == "script":
                self.assertRegex(attrs.get("src", ""), r"^/static/ui\.js\?v=[0-9a-f]{12}$", path)
            for name, value in attrs.items():
                self.assertFalse(name.startswith("on"), (path, tag, name))
                if name in ("href", "src", "action", "formaction", "data-copy"):
                    self.assertFalse(value.strip().lower().startswith("javascript:"), (path, tag, name, value))
        # The document's title is the page's own, never cut short by a planted </title>.
        self.assertRegex("".join(page.title or ()), r"^[A-Za-z0-9 &]+ · cllama$", path)
        for raw in ("<script>alert(", "<img src=x", "</title><img"):
            # Only the escaped forms are in the bytes sent.
            self.assertNotIn(raw, html, path)
        texts = page.strings()
        for value in shown:
            self.assertTrue(any(value in text for text in texts), (path, value))
        # One escaping, never two: what was planted as "&amp;" reads back as "&amp;".
        self.assertNotIn("&amp;amp;amp;", html, path)

    @defer.inlineCallbacks
    def test_every_page_escapes_what_agents_and_operators_control(self):
        pages = {
            "/": (POD, MODEL, KEY_ERROR, VKEY_USER),
            "/agents": (POD, META, TIER, TIER_MODEL, MODEL, PROVIDER, VKEY_USER),
            f"/agents/{BAD_AGENT}": (POD, META, TIER, MODEL, PROVIDER),
            "/costs?period=all": (POD, MODEL, PROVIDER, VKEY_USER),
            "/costs?since=2020-01-01": (POD, MODEL, PROVIDER),
            "/requests": (POD, MODEL, PROVIDER, VKEY_USER),
            f"/requests?agent={BAD_AGENT}&errors=1": (POD,),
            "/providers": (POD, KEY_LABEL, KEY_ERROR, BASE_URL),
            "/budgets": (POD, TIER, TIER_MODEL),
            f"/budgets?edit={BAD_AGENT}": (POD, TIER, TIER_MODEL),
            "/keys": (POD, VKEY, VKEY_USER),
            "/teams": (POD, VKEY, VKEY_USER),
            "/pricing": (POD, MODEL),
            "/models": (POD, TABLE_MODEL, TABLE_ALIAS),
            "/discovery": (POD, SERVER, MODEL, BASE_URL),
            "/_debug": (POD, MAPPED, PROMPT, SERVER, MODEL, TABLE_MODEL, TABLE_ALIAS, "openai"),
        }
        for path, shown in pages.items():
            html = yield self.page(path)
            self.assertSafe(path, html, shown + (f"Signed in as {clean_name(OPERATOR)}",))
        # Every page route is covered above (a new page must come with its case here).
        routes = {r.rule for r in UiApp.app.url_map.iter_rules() if "GET" in (r.methods or ())}
        html_routes = routes - {"/health", "/static/<name>", "/events", "/costs.csv", "/costs/api", "/metrics", "/signin"}
        html_routes = {r for r in html_routes if not r.startswith(("/api/", "/_api/"))}
        covered = {re.sub(r"\?.*", "", p).replace(f"/{BAD_AGENT}", "/<agent>") for p in pages}
        self.assertEqual(html_routes - covered, set())

    @defer.inlineCallbacks
    def test_error_pages_and_flash_messages(self):
        html = yield self.page("/agents/" + quote(NOT_AN_AGENT, safe=""), expect=(404,))
        self.assertSafe("404", html, (f"no agent {NOT_AN_AGENT!r}",))
        html = yield self.page("/costs?since=" + quote(BAD_DAY, safe=""), expect=(400,))
        self.assertSafe("400", html, (f"Invalid isoformat string: {BAD_DAY!r}",))
        # Refusals echo what was sent (a key id, a provider name) in the next page's flash.
        refused = yield self.client.post("/providers/keys/delete", {"csrf": self.csrf, "provider": "openai", "key_id": FLASH_KEY_ID}, headers=HTML)
        self.assertEqual(refused.code, 303)
        yield refused.content()
        html = yield self.page("/providers")
        self.assertSafe("flash", html, (f"has no key {FLASH_KEY_ID!r}",))
        # A virtual key made in the form: its page names it in the flash.
        html = yield self.page("/keys", method="POST", form={"csrf": self.csrf, "key_alias": VKEY[:100], "duration": "1h"}, expect=(201,))
        self.assertSafe("created", html, (f"Virtual key {VKEY[:100]} created.",))

    @defer.inlineCallbacks
    def test_the_sign_in_page_keeps_its_return_path_as_text(self):
        stranger = UiClient(client_from(self, reactor, "127.0.0.3"), self.harness.url)
        html = yield self.page("/signin?next=" + quote(NEXT, safe=""), client=stranger)
        self.assertSafe("signin", html, (POD, NEXT))
        html = yield self.page("/signin", client=stranger, method="POST", form={"csrf": "forged", "token": UI_TOKEN, "next": NEXT}, expect=(403,))
        self.assertSafe("signin refused", html, (POD, NEXT))

