"""
The operator UI in a real browser: Playwright for Python driving Debian's
Chromium (headless) against the UI and the API on loopback, with the reactor
serving both while the browser works in its own thread.

Each test saves screenshots under its trial temporary directory
(C{_trial_temp/tests.sites.ui.test_browser.../screenshots/*.png}); the paths are
also printed in the test log.
"""

from __future__ import annotations

import os
import re

from twisted.internet import defer
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from cllama_tx.sites.ui.render import money
from tests.secret_scan import SCANNER
from tests.sites.ui.fleet import kill_a_key, make_virtual_keys, seed_fleet
from tests.sites.ui.support import BrowserThread, UiHarness, browser_unavailable
from tests.support import AGENT, UI_TOKEN, chat_body

log = Logger()
NEW_PROVIDER_KEY = "sk-proj-added-through-the-ui-5678wxyz"
SCANNER.register(NEW_PROVIDER_KEY)


class BrowserCase(TestCase):
    timeout = 120
    skip = browser_unavailable()

    @defer.inlineCallbacks
    def setUp(self):
        self.harness = yield UiHarness(self).start()
        self.h = self.harness.h
        self.url = self.harness.url
        self.screenshots = os.path.abspath(os.path.join(self.mktemp(), "screenshots"))
        self.browser = yield BrowserThread(self, screenshots=self.screenshots).start()
        self.addCleanup(self._report)

    def _report(self):
        for path in self.browser.saved:
            log.info("screenshot: {path}", path=path)
        self.assertEqual(self.browser.console_errors, [], "the browser reported errors (CSP violations, script errors)")

    # Browser steps: each runs in the browser's thread.

    def goto(self, path):
        return self.browser.run(lambda: self.browser.page.goto(self.url + path))

    def sign_in(self, token=UI_TOKEN, name="ada"):
        def steps():
            page = self.browser.page
            page.goto(self.url + "/")
            page.wait_for_url(re.compile(r"/signin"))
            page.fill("#token", token)
            page.fill("#name", name)
            page.click("#signin-form button[type=submit]")
            page.wait_for_load_state()
            return page.url

        return self.browser.run(steps)

    def live(self):
        """Fires once the page's live-update stream is connected."""
        return self.browser.run(lambda: self.browser.page.wait_for_selector("#live-state.on"))

    def text(self, selector):
        return self.browser.run(lambda: self.browser.page.inner_text(selector))

    def html(self):
        return self.browser.run(lambda: self.browser.page.content())


class SignInAndLiveSpendTests(BrowserCase):
    @defer.inlineCallbacks
    def test_sign_in_then_spend_appears_live(self):
        # Wrong token first: refused, counted, audited, no session.
        def wrong():
            page = self.browser.page
            page.goto(self.url + "/agents")
            page.wait_for_url(re.compile(r"/signin\?next=%2Fagents"))
            page.fill("#token", "not-the-token-at-all")
            page.click("#signin-form button[type=submit]")
            page.wait_for_selector("#signin-error")
            return page.inner_text("#signin-error")

        message = yield self.browser.run(wrong)
        self.assertIn("not the operator token", message)
        yield self.browser.shot("01-signin-refused")
        url = yield self.sign_in()
        self.assertTrue(url.endswith("/"), url)
        cookies = yield self.browser.run(lambda: self.browser.context.cookies())
        [session] = [c for c in cookies if c["name"] == "cllama_session"]
        self.assertTrue(session["httpOnly"])
        self.assertEqual(session["sameSite"], "Strict")
        self.assertGreater(session["expires"], 0)
        before = yield self.text("#kpi-spend-today .kpi-value")
        self.assertEqual(before, "$0.00")
        yield self.browser.run(lambda: self.browser.page.wait_for_selector("#live-state.on"))
        # Real traffic through the API: the page updates by itself (SSE).
        response = yield self.h.chat(chat_body(model="openai/gpt-4.1-mini"))
        self.assertEqual(response.code, 200, (yield response.text()))
        yield self.h.committed()

        def spend_shows():
            page = self.browser.page
            page.wait_for_function(
                "() => document.querySelector('#kpi-spend-today .kpi-value').textContent !== '$0.00'"
            )
            value = page.locator("#kpi-spend-today .kpi-value")
            return value.inner_text(), value.get_attribute("title"), page.inner_text("#kpi-requests .kpi-value")

        spend, exact, requests = yield self.browser.run(spend_shows)
        self.assertEqual(spend, "<$0.01")  # a fraction of a cent; the exact amount on hover
        [row] = yield self.h.ledger_rows()
        self.assertGreater(row["cost_usd"], 0)
        self.assertEqual(exact, money(row["cost_usd"]))
        self.assertEqual(requests, "1")
        yield self.browser.shot("02-overview-after-traffic")
        agents_html = yield self.browser.run(lambda: (self.browser.page.goto(self.url + "/agents"), self.browser.page.content())[1])
        self.assertIn(f'id="agent-{AGENT}"', agents_html)
        self.assertIn("gpt-4.1-mini", agents_html)
        actions = [(line["action"], line["actor"]) for line in self.harness.operator_lines()]
        self.assertEqual(actions[0][0], "sign_in_failed")
        self.assertEqual(actions[1], ("sign_in", "operator:ada@127.0.0.1"))
        self.assertNotIn("not-the-token-at-all", self.h.audit_text())

    @defer.inlineCallbacks
    def test_sign_out(self):
        yield self.sign_in()

        def out():
            page = self.browser.page
            page.click("#signout")
            page.wait_for_url(re.compile(r"/signin"))
            page.goto(self.url + "/costs")
            page.wait_for_url(re.compile(r"/signin\?next=%2Fcosts"))
            return page.url

        yield self.browser.run(out)
        self.assertEqual([line["action"] for line in self.harness.operator_lines()], ["sign_in", "sign_out"])


class ProviderKeyTests(BrowserCase):
    @defer.inlineCallbacks
    def test_add_a_provider_then_add_and_disable_a_key(self):
        yield self.sign_in()

        def add_provider():
            page = self.browser.page
            page.goto(self.url + "/providers")
            page.click("#add-provider summary")
            page.fill("#add-provider input[name=name]", "acme-gateway")
            page.fill("#add-provider input[name=base_url]", "https://llm.acme.example/v1")
            page.click("#add-provider button[type=submit]")
            page.wait_for_selector("#provider-acme-gateway")
            return page.inner_text("#flash")

        flash = yield self.browser.run(add_provider)
        self.assertIn("acme-gateway saved", flash)

        def add_key():
            page = self.browser.page
            form = page.locator("#provider-openai form.add-key")
            form.locator("input[name=secret]").fill(NEW_PROVIDER_KEY)
            form.locator("input[name=label]").fill("second key")
            form.locator("button[type=submit]").click()
            page.wait_for_selector("#provider-openai >> text=second key")
            return page.content()

        html = yield self.browser.run(add_key)
        self.assertNotIn(NEW_PROVIDER_KEY, html)
        self.assertIn("sk-p…wxyz", html)  # first and last four, nothing else
        [key] = [k for k in self.h.providers.resolve("openai").pool.keys if k.secret == NEW_PROVIDER_KEY]

        def disable():
            page = self.browser.page
            row = page.locator(f"#key-openai-{key.id.replace(':', '-')}")
            page.once("dialog", lambda dialog: dialog.accept())
            row.locator("button:has-text('Disable')").click()
            page.wait_for_selector(f"#key-openai-{key.id.replace(':', '-')} .badge-muted:has-text('disabled')")

        yield self.browser.run(disable)
        self.assertEqual(self.h.providers.resolve("openai").pool.get(key.id).state, "disabled")
        yield self.browser.shot("03-providers")
        lines = self.harness.operator_lines()
        self.assertEqual([line["action"] for line in lines], ["sign_in", "provider_add", "key_add", "key_disable"])
        self.assertEqual(lines[2]["key_id"], key.id)
        self.assertEqual(lines[2]["actor"], "operator:ada@127.0.0.1")
        self.assertNotIn(NEW_PROVIDER_KEY, self.h.audit_text())


class VirtualKeyTests(BrowserCase):
    @defer.inlineCallbacks
    def test_create_shows_the_key_once_then_revoke(self):
        yield self.sign_in()

        def create():
            page = self.browser.page
            page.goto(self.url + "/keys")
            page.fill("#create-vkey input[name=key_alias]", "session-99")
            page.fill("#create-vkey input[name=team_id]", "org-7")
            page.fill("#create-vkey input[name=user_id]", "session-99")
            page.fill("#create-vkey input[name=duration]", "24h")
            page.fill("#create-vkey input[name=models]", "openai/gpt-4.1-mini")
            page.click("#create-vkey-button")
            page.wait_for_selector("#vkey-created")
            return page.inner_text("#vkey-secret")

        secret = yield self.browser.run(create)
        self.assertRegex(secret, r"^sk-[A-Za-z0-9_-]{43}$")
        yield self.browser.shot("04-virtual-key-created")
        [vk] = self.harness.keys.list().keys
        self.assertEqual((vk.key_alias, vk.team_id, vk.models), ("session-99", "org-7", ("openai/gpt-4.1-mini",)))
        self.assertIsNotNone(self.harness.keys.lookup(secret))
        # The new key works on the API, and its spend shows on the page.
        response = yield self.h.chat(chat_body(model="openai/gpt-4.1-mini"), token=secret)
        self.assertEqual(response.code, 200, (yield response.text()))
        yield self.h.committed()
        [row] = yield self.h.ledger_rows()
        self.assertEqual(row["key_id"], vk.token_hash)

        def listed():
            page = self.browser.page
            page.goto(self.url + "/keys")
            return page.content(), page.inner_text(f"#vkey-{vk.token_hash[:16]}")

        html, line = yield self.browser.run(listed)
        self.assertNotIn(secret, html)  # shown once
        self.assertIn(money(row["cost_usd"]), line)
        self.assertNotIn(secret, self.h.audit_text())

        def revoke():
            page = self.browser.page
            page.once("dialog", lambda dialog: dialog.accept())
            page.click(f"#vkey-{vk.token_hash[:16]} button:has-text('Revoke')")
            page.wait_for_selector("#vkey-rows:has-text('No virtual keys yet')")
            return page.inner_text("#flash")

        flash = yield self.browser.run(revoke)
        self.assertIn("session-99 revoked", flash)
        self.assertIsNone(self.harness.keys.lookup(secret))
        actions = [(line["action"], line.get("key_id")) for line in self.harness.operator_lines()]
        self.assertEqual(actions[1:], [("virtual_key_create", vk.token_hash), ("virtual_key_revoke", vk.token_hash)])


class BudgetTests(BrowserCase):
    @defer.inlineCallbacks
    def test_edit_a_budget(self):
        yield seed_fleet(self.harness, days=3)
        yield self.sign_in()

        def edit():
            page = self.browser.page
            page.goto(self.url + "/budgets")
            page.click("#edit-cedar summary")
            form = page.locator("#budget-form-cedar")
            form.locator("input[name=limit_usd]").fill("12.5")
            form.locator("select[name=period]").select_option("weekly")
            form.locator("select[name=behavior]").select_option("soft_alert")
            form.locator("button[type=submit]").click()
            page.wait_for_selector("#flash .flash-ok")
            return page.inner_text("#flash"), page.inner_text("#agent-cedar .facts")

        flash, facts = yield self.browser.run(edit)
        self.assertIn("Budget of cedar updated", flash)
        self.assertIn("$12.50 weekly · soft alert", facts)
        override = self.h.ledger.budget_override("cedar")
        self.assertEqual(override["budget"], {"limit_usd": 12.5, "period": "weekly", "behavior": "soft_alert"})
        self.assertEqual(override["updated_by"], "operator:ada@127.0.0.1")

        def invalid():
            page = self.browser.page
            page.click("#edit-cedar summary")
            form = page.locator("#budget-form-cedar")
            form.locator("input[name=window]").fill("forever")
            form.locator("button[type=submit]").click()
            page.wait_for_selector("#flash .flash-error")
            page.wait_for_selector("#budget-form-cedar input[name=window]", state="visible")  # reopened
            return page.inner_text("#flash")

        error = yield self.browser.run(invalid)
        self.assertIn("window", error)
        yield self.browser.shot("05-budgets")
        [line] = [entry for entry in self.harness.operator_lines() if entry["action"] == "budget_set"]
        self.assertEqual((line["claw_id"], line["changes"]), ("cedar", ["behavior", "limit_usd", "period"]))


class RefusalTests(BrowserCase):
    @defer.inlineCallbacks
    def test_a_form_without_its_csrf_token_is_refused(self):
        yield self.sign_in()

        def tamper():
            page = self.browser.page
            page.goto(self.url + "/budgets")
            page.click("#edit-tiverton summary")
            page.eval_on_selector("#budget-form-tiverton input[name=csrf]", "e => e.value = 'forged'")
            form = page.locator("#budget-form-tiverton")
            form.locator("input[name=limit_usd]").fill("1")
            form.locator("button[type=submit]").click()
            page.wait_for_selector("h1:has-text('This form has expired')")
            return page.content()

        yield self.browser.run(tamper)
        self.assertIsNone(self.h.ledger.budget_override(AGENT))

    @defer.inlineCallbacks
    def test_another_site_cannot_post_with_the_session(self):
        yield self.sign_in()
        # A page on another origin (a second loopback name) auto-submits a form
        # to the UI; SameSite=Strict keeps the cookie home, the CSRF token is
        # missing anyway: nothing changes.
        evil = self.url.replace("127.0.0.1", "localhost") + "/static/nothing"

        def attack():
            page = self.browser.page
            page.route(evil, lambda route: route.fulfill(
                status=200, content_type="text/html",
                body=f'<form id=f method=post action="{self.url}/budgets/{AGENT}/reset"></form><script>document.getElementById("f").submit()</script>',
            ))
            page.goto(evil, wait_until="commit")  # its script navigates away at once
            # No cookie went with the cross-site POST: it was sent to sign in.
            page.wait_for_selector("#signin-form")
            return page.url

        url = yield self.browser.run(attack)
        self.assertNotIn("budget_reset", [line["action"] for line in self.harness.operator_lines()])
        self.assertIn("/signin", url)


class ScreenshotTests(BrowserCase):
    """Every page of a busy fleet, at desktop and phone widths."""

    @defer.inlineCallbacks
    def test_every_page(self):
        yield seed_fleet(self.harness)
        kill_a_key(self.harness)
        yield make_virtual_keys(self.harness)
        for _ in range(3):
            response = yield self.h.chat(chat_body(model="openai/gpt-4.1-mini"))
            yield response.text()
        yield self.h.committed()
        yield self.sign_in()
        for name, path in (
            ("10-overview", "/"),
            ("11-agents", "/agents"),
            ("12-agent-atlas", "/agents/atlas"),
            ("13-costs", "/costs?period=30d"),
            ("14-requests", "/requests"),
            ("15-budgets", "/budgets"),
            ("16-providers", "/providers"),
            ("17-virtual-keys", "/keys"),
            ("18-pricing", "/pricing"),
        ):
            yield self.goto(path)
            yield self.live()
            yield self.browser.shot(name)
        yield self.browser.run(lambda: self.browser.page.set_viewport_size({"width": 390, "height": 844}))
        for name, path in (("20-phone-overview", "/"), ("21-phone-agents", "/agents"), ("22-phone-providers", "/providers")):
            yield self.goto(path)
            yield self.live()
            yield self.browser.shot(name)
        yield self.browser.run(lambda: self.browser.context.clear_cookies())
        yield self.goto("/signin")
        yield self.browser.shot("00-signin", full_page=False)
        for path in self.browser.saved:
            self.assertGreater(os.path.getsize(path), 5000, path)
