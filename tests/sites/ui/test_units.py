"""
The UI's pure parts: the token file, the Host check, sessions,
content negotiation, escaping and templates, number formats, SVG.
"""

from __future__ import annotations

import gc
import os
import stat

from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.error import FlattenerError, UnfilledSlot

from cllama_tx.sites.ui import TokenFileError, ensure_ui_token, negotiate
from cllama_tx.sites.ui.app import _safe_next, budget_doc, vkey_fields
from cllama_tx.sites.ui.auth import (
    SessionStore,
    clean_name,
    cookie_header,
    csrf_matches,
    host_allowed,
    host_name,
)
from cllama_tx.sites.ui.charts import bar_chart, gauge
from cllama_tx.sites.ui.markup import Template, flatten_bytes, h, write_page
from cllama_tx.sites.ui.render import compact, money, percent
from cllama_tx.sites.ui.views import costs_csv, period_bounds
from cllama_tx.sites.ui.web import Static, Templates


class TokenFileTests(SynchronousTestCase):
    def test_generated_once_0600_then_reused(self):
        state = os.path.join(self.mktemp(), "state")
        token, path = ensure_ui_token(state)
        self.assertEqual(path, os.path.join(state, "ui-token"))
        self.assertGreaterEqual(len(token), 40)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(state).st_mode) & 0o077, 0)
        self.assertEqual(ensure_ui_token(state), (token, path))
        self.assertEqual(os.listdir(state), ["ui-token"])  # no temporary left behind

    def test_a_file_readable_by_others_is_tightened(self):
        state = self.mktemp()
        token, path = ensure_ui_token(state)
        os.chmod(path, 0o644)
        self.assertEqual(ensure_ui_token(state)[0], token)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    def test_an_unusable_file_is_refused_without_quoting_it(self):
        state = self.mktemp()
        os.makedirs(state)
        with open(os.path.join(state, "ui-token"), "w") as f:
            f.write("short secret")
        with self.assertRaises(TokenFileError) as caught:
            ensure_ui_token(state)
        self.assertNotIn("short secret", str(caught.exception))

    def test_a_symlink_is_refused(self):
        state = self.mktemp()
        os.makedirs(state)
        os.symlink("/etc/hostname", os.path.join(state, "ui-token"))
        self.assertRaises(TokenFileError, ensure_ui_token, state)


class HostCheckTests(SynchronousTestCase):
    """Authentication off: the names a DNS-rebinding page cannot use."""

    def test_loopback_names_and_ip_literals_pass(self):
        for host in (b"localhost", b"localhost:8081", b"LOCALHOST.", b"ui.localhost:8081", b"127.0.0.1:8081",
                     b"[::1]:8081", b"[::1]", b"10.1.2.3", b"192.168.0.7:8081", b"[fe80::1%25eth0]:8081", None, b""):
            self.assertTrue(host_allowed(host), host)

    def test_other_names_are_refused_unless_allowed(self):
        for host in (b"evil.example:8081", b"attacker.com", b"localhost.evil.com", b"127.0.0.1.nip.io:8081", b"[not-an-ip]:80", b":8081"):
            self.assertFalse(host_allowed(host), host)
        allowed = frozenset({"cllama.lan", ".corp.example"})
        self.assertTrue(host_allowed(b"CLLAMA.lan:8081", allowed))
        self.assertTrue(host_allowed(b"ui.corp.example", allowed))
        self.assertTrue(host_allowed(b"corp.example:8081", allowed))
        self.assertFalse(host_allowed(b"evilcorp.example", allowed))
        self.assertFalse(host_allowed(b"cllama.lan.evil.com", allowed))
        self.assertTrue(host_allowed(b"anything.at.all", frozenset({"*"})))

    def test_host_name(self):
        self.assertEqual(host_name(b"Ex.COM.:8081"), "ex.com")
        self.assertEqual(host_name(b"[::1]:8081"), "::1")
        self.assertEqual(host_name("::1"), "::1")


class SessionTests(SynchronousTestCase):
    def test_expiry_idle_and_absolute(self):
        clock = Clock()
        store = SessionStore(clock, lifetime=100, idle=30)
        session = store.create("ada")
        clock.advance(20)
        self.assertIs(store.get(session.id), session)
        clock.advance(29)
        self.assertIs(store.get(session.id), session)  # touched at 20
        clock.advance(31)
        self.assertIsNone(store.get(session.id))
        other = store.create()
        for _ in range(5):
            clock.advance(25)
            found = store.get(other.id)
        self.assertIsNone(found)  # 125 s old

    def test_bounded(self):
        store = SessionStore(Clock(), maximum=3)
        first = store.create()
        for _ in range(3):
            store.create()
        self.assertEqual(len(store), 3)
        self.assertIsNone(store.get(first.id))

    def test_csrf_and_names(self):
        session = SessionStore(Clock()).create()
        self.assertTrue(csrf_matches(session, session.csrf))
        other = ("y" if session.csrf[0] == "x" else "x") + session.csrf[1:]  # one character off, never equal
        self.assertFalse(csrf_matches(session, other))
        self.assertFalse(csrf_matches(session, None))
        self.assertNotIn(session.id, session.handle)
        self.assertEqual(clean_name(" Ada <script>\n"), "Ada script")
        self.assertIsNone(clean_name("<>"))

    def test_cookie_flags(self):
        plain = cookie_header("cllama_session", "v", secure=False, max_age=3600).decode()
        self.assertEqual(plain, "cllama_session=v; Path=/; HttpOnly; SameSite=Strict; Max-Age=3600")
        self.assertTrue(cookie_header("n", "v", secure=True, max_age=1).decode().endswith("; Secure"))


class NegotiationTests(SynchronousTestCase):
    def test_browsers_get_html_scripts_get_json(self):
        chrome = b"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
        self.assertEqual(negotiate(chrome), "html")
        self.assertEqual(negotiate(b"*/*"), "json")  # curl
        self.assertEqual(negotiate(None), "json")
        self.assertEqual(negotiate(b"application/json"), "json")
        self.assertEqual(negotiate(b"application/json, text/html;q=0.5"), "json")
        self.assertEqual(negotiate(b"text/csv"), "csv")
        self.assertEqual(negotiate(b"text/html;q=0"), "json")

    def test_next_is_local_only(self):
        for bad in ("https://evil.example/", "//evil.example", "/\\evil", "/signin", "/x\r\nSet-Cookie: a=b", ""):
            self.assertEqual(_safe_next(bad), "/", bad)
        self.assertEqual(_safe_next("/costs?period=7d"), "/costs?period=7d")


class FormTests(SynchronousTestCase):
    def test_budget_doc(self):
        self.assertEqual(
            budget_doc({"limit_usd": "12.5", "max_requests": "", "period": "weekly", "behavior": "soft_alert", "window": " "}),
            {"limit_usd": 12.5, "period": "weekly", "behavior": "soft_alert"},
        )
        self.assertEqual(budget_doc({"tiers": '[{"threshold": 0.5, "models": ["a/b"]}]', "spent": "1"}),
                         {"tiers": [{"threshold": 0.5, "models": ["a/b"]}], "spent": 1.0})
        self.assertRaises(ValueError, budget_doc, {"window": "24h", "period": "daily"})
        self.assertRaises(ValueError, budget_doc, {"max_requests": "1.5"})
        self.assertRaises(ValueError, budget_doc, {"tiers": "[nope"})

    def test_vkey_fields(self):
        self.assertEqual(
            vkey_fields({"key_alias": "s-1", "models": "openai/a, anthropic/*", "max_budget": "2", "rpm_limit": "60", "team_id": ""}),
            {"key_alias": "s-1", "models": ["openai/a", "anthropic/*"], "max_budget": 2.0, "rpm_limit": 60},
        )


class _Context:
    """What a L{Template} reads from a page context."""

    def __init__(self, templates, csrf=None):
        self.templates = templates
        self.csrf = csrf


class _Turns:
    """A reactor's timers, run one turn at a time (what is scheduled during a turn waits for the next)."""

    def __init__(self):
        self.pending = []

    def callLater(self, delay, f, *args, **kwargs):
        call = (f, args, kwargs)
        self.pending.append(call)
        return _Call(lambda: self.pending.remove(call))

    def turn(self):
        calls, self.pending = self.pending, []
        for f, args, kwargs in calls:
            f(*args, **kwargs)


class _Call:
    def __init__(self, cancel):
        self.cancel = cancel


class _Probe(Template):
    template = "probe"


class RenderTests(SynchronousTestCase):
    def test_text_and_attributes_are_escaped_by_the_flattener(self):
        page = flatten_bytes(h("td", {"title": '"><script>', "class": None, "hidden": True}, "<b>&", h("i", None, "ok"), 12, None))
        self.assertEqual(page, b'<td title="&quot;&gt;&lt;script&gt;" hidden="">&lt;b&gt;&amp;<i>ok</i>12</td>')
        self.assertEqual(flatten_bytes(h("input", {"disabled": True, "value": None})), b'<input disabled="" />')
        self.assertRaises(ValueError, h, "td onclick", None)
        self.assertRaises(ValueError, h, "td", {"onclick=x": 1})

    def _probe(self, text: str) -> Templates:
        root = self.mktemp()
        os.makedirs(os.path.join(root, "templates"))
        with open(os.path.join(root, "templates", "probe.xml"), "w") as f:
            f.write(text)
        return Templates(root)

    def test_templates_fill_slots_rows_and_conditions(self):
        templates = self._probe(
            '<div xmlns:t="http://twistedmatrix.com/ns/twisted.web.template/0.1" t:render="flag:open">'
            '<a><t:attr name="href">/x?<t:slot name="query"/></t:attr><t:slot name="name"/></a>'
            '<p t:render="if:rows">rows</p><p t:render="unless:rows">none</p>'
            '<b t:render="each:rows"><t:slot name="name"/></b>'
            '<input type="hidden" name="csrf" t:render="csrf"/></div>'
        )
        page = flatten_bytes(_Probe(_Context(templates, csrf="c-1"), open=True, query="a=1&b=\"2\"", name="<x>", rows=[{"name": "r&1"}, {"name": 2}]))
        self.assertEqual(
            page,
            b'<div open=""><a href="/x?a=1&amp;b=&quot;2&quot;">&lt;x&gt;</a><p>rows</p>'
            b'<b>r&amp;1</b><b>2</b><input type="hidden" name="csrf" value="c-1" /></div>',
        )
        page = flatten_bytes(_Probe(_Context(templates), open=False, query="", name="n", rows=[]))
        self.assertEqual(page, b'<div><a href="/x?">n</a><p>none</p></div>')

    def test_long_lists_are_written_in_turns(self):
        # Rows go to the flattener a batch at a time, the reactor getting a
        # turn before each batch: the page is the same as written at once.
        templates = self._probe(
            '<ul xmlns:t="http://twistedmatrix.com/ns/twisted.web.template/0.1">'
            '<li t:render="each:rows"><t:slot name="n"/></li></ul>'
        )
        rows = [{"n": n} for n in range(40)]
        at_once = flatten_bytes(_Probe(_Context(templates), rows=rows))
        self.assertEqual(at_once, b"<ul>" + b"".join(b"<li>%d</li>" % n for n in range(40)) + b"</ul>")
        reactor = _Turns()
        context = _Context(templates)
        context.clock = reactor
        written = write_page(_Probe(context, rows=rows))
        turns = 0
        while not written.called:
            self.assertEqual(len(reactor.pending), 1)  # one batch waits for its turn
            reactor.turn()
            turns += 1
        self.assertEqual(turns, 3)  # 15 + 15 + 10 rows
        self.assertEqual(self.successResultOf(written), b"<!DOCTYPE html>\n" + at_once)
        # A client that goes away between two turns: the page fails as
        # cancelled (quiet in Klein), not as a broken template.
        written = write_page(_Probe(context, rows=rows))
        reactor.turn()
        written.cancel()
        self.failureResultOf(written, CancelledError)
        self.assertEqual(reactor.pending, [])
        del written
        gc.collect()  # a failure left in a Deferred is logged when it is collected: none is
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_a_slot_left_unfilled_is_an_error(self):
        templates = self._probe('<p xmlns:t="http://twistedmatrix.com/ns/twisted.web.template/0.1"><t:slot name="missing"/></p>')
        caught = self.assertRaises(FlattenerError, flatten_bytes, _Probe(_Context(templates)))
        self.assertIsInstance(caught.args[0], UnfilledSlot)

    def test_every_template_of_the_ui_parses(self):
        # Parsed at start: a broken template stops the daemon, not a page.
        names = Templates().names()
        self.assertIn("layout", names)
        self.assertIn("overview", names)

    def test_static_files_are_versioned(self):
        static = Static()
        self.assertRegex(static.url("ui.css"), r"^/static/ui\.css\?v=[0-9a-f]{12}$")
        self.assertIn("ui.js", static.files)

    def test_money(self):
        self.assertEqual(money(0), "$0.00")
        self.assertEqual(money(12345.6), "$12,346")
        self.assertEqual(money(1234.5), "$1,234.50")
        self.assertEqual(money(12.345), "$12.35")
        self.assertEqual(money(0.42), "$0.42")
        self.assertEqual(money(0.042), "$0.042")
        self.assertEqual(money(0.0042), "$0.0042")
        self.assertEqual(money(0.000071), "$0.000071")
        self.assertEqual(money(None), "–")
        self.assertEqual(compact(123456), "123k")
        self.assertEqual(compact(1234567), "1.23M")
        self.assertEqual(compact(999), "999")
        self.assertEqual(percent(0.004), "<1%")
        self.assertEqual(percent(0.5), "50%")

    def test_svg_has_no_style_attributes(self):
        # The Content-Security-Policy allows no inline style.
        chart = flatten_bytes(bar_chart([("11/01", 1.0, "a"), ("11/02", 0.0, "b"), ("11/03", 2.5, "c")], label="spend")).decode()
        self.assertNotIn("style=", chart)
        self.assertEqual(chart.count("<rect"), 3)
        self.assertIn("$2.50", chart)  # the nice ceiling
        self.assertNotIn("style=", flatten_bytes(gauge(0.5, "ok", "half", "50%")).decode())


class PeriodTests(SynchronousTestCase):
    NOW = 1795000000.0  # 2026-11-18 (a Wednesday)

    def test_named_and_custom_periods(self):
        self.assertEqual(period_bounds("today", self.NOW)[2:], ("2026-11-18", "2026-11-18"))
        self.assertEqual(period_bounds("7d", self.NOW)[2:], ("2026-11-12", "2026-11-18"))
        self.assertEqual(period_bounds("month", self.NOW)[2:], ("2026-11-01", "2026-11-18"))
        self.assertEqual(period_bounds("last_month", self.NOW)[2:], ("2026-10-01", "2026-10-31"))
        self.assertEqual(period_bounds("all", self.NOW)[2:], (None, None))
        self.assertEqual(period_bounds(None, self.NOW, "2026-01-01", None)[0], "custom")
        self.assertRaises(ValueError, period_bounds, "fortnight", self.NOW)
        self.assertRaises(ValueError, period_bounds, None, self.NOW, "2026-02-30", None)
        self.assertRaises(ValueError, period_bounds, None, self.NOW, "2026-02-02", "2026-02-01")

    def test_csv_defuses_formulas(self):
        view = {"since_day": "2026-11-01", "until_day": None, "rows": [{
            "agent": "a", "provider": "openai", "model": "=HYPERLINK(\"x\")", "requests": 1, "errors": 0,
            "prompt_tokens": 10, "output_tokens": 5, "cache_read_tokens": 0, "cache_write_tokens": 0,
            "cost_usd": 0.00001, "priced_requests": 1, "unpriced_requests": 0, "estimated_requests": 0,
            "pricing_status": "priced",
        }]}
        text = costs_csv(view).decode()
        self.assertIn("'=HYPERLINK", text)
        self.assertIn(",0.00001,", text)
        self.assertTrue(text.startswith("since_day,until_day,agent,provider,model,"))
