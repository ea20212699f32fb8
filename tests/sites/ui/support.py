"""
The operator UI for tests: the full L{UiApp} (governance, audit, pricing and
a real virtual key store) on a loopback port in front of the end-to-end
proxy harness, an HTTP client that keeps cookies by hand, and a browser
(Playwright driving Debian's Chromium) in a thread of its own.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import threading
from http.cookies import SimpleCookie
from urllib.parse import urlencode

from twisted.internet import defer, reactor
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure

from cllama_tx.identity.virtual_keys import VirtualKeyStore
from cllama_tx.sites.ui import UiApp, build_ui_site
from cllama_tx.store.records import LedgerRow
from tests.secret_scan import SCANNER
from tests.support import UI_TOKEN, ProxyHarness

CHROMIUM = os.environ.get("CLLAMA_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def browser_unavailable() -> str | None:
    """Why browser tests cannot run here, or None."""
    import importlib.util

    if importlib.util.find_spec("playwright") is None:
        return "Playwright for Python is not installed (pip install playwright; .ci/run installs it)"
    if not os.path.exists(CHROMIUM):
        return f"Chromium not found at {CHROMIUM} (apt-get install chromium; .ci/run installs it)"
    return None


class _TrackingFactory(WrappingFactory):
    """Knows every open connection, so a test can end them all and wait."""

    noisy = False

    def __init__(self, wrapped):
        super().__init__(wrapped)
        self._gone = []

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        if not self.protocols:
            waiting, self._gone = self._gone, []
            for d in waiting:
                d.callback(None)

    def close_all(self):
        if not self.protocols:
            return defer.succeed(None)
        d = defer.Deferred()
        self._gone.append(d)
        for p in list(self.protocols):
            p.transport.abortConnection()
        return d


class UiHarness:
    """
    C{self.h} is the proxy harness (API, ledger, governance, audit, fake
    provider); C{self.ui} the operator UI on C{self.url}.
    """

    def __init__(self, testcase, *, ui_kwargs=None, **proxy_kwargs):
        self.testcase = testcase
        self.proxy_kwargs = proxy_kwargs
        self.ui_kwargs = ui_kwargs or {}

    @defer.inlineCallbacks
    def start(self):
        case = self.testcase
        self.h = yield ProxyHarness(case, **self.proxy_kwargs).start()
        # The proxy's own key store: a key made in the UI works on the API.
        self.keys = getattr(self.h, "keys", None)
        if self.keys is None:
            self.keys = VirtualKeyStore(self.h.ledger.path, reactor, reactor)
            self.keys.startService()
            case.addCleanup(self.keys.stopService)
        kwargs = dict(
            token=UI_TOKEN,
            pod="test-pod",
            contexts=self.h.contexts,
            providers=self.h.providers,
            ledger=self.h.ledger,
            clock=reactor,
            operations=self.h.operations,
            governance=self.h.governance,
            pricing=self.h.pricing,
            audit=self.h.audit,
            keys=self.keys,
            live_interval=0.1,
            directory=self.h.directory,
            budgets=self.h.keys_api.budgets,
        )
        kwargs.update(self.ui_kwargs)
        self.ui = UiApp(**kwargs)
        self.factory = _TrackingFactory(build_ui_site(self.ui))
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        # Cleanups run last-in first-out: connections go before the port.
        case.addCleanup(self.port.stopListening)
        case.addCleanup(self.factory.close_all)
        case.addCleanup(self.ui.live.stop)
        self.client = UiClient(self.h.http, self.url)
        return self

    def operator_lines(self):
        return [line for line in self.h.audit_lines() if line["type"] == "operator"]

    def record(self, agent, ts, *, model="gpt-4.1-mini", provider="openai", cost=0.01, status=200,
               tokens_in=1200, tokens_out=300, priced=True, latency=850.0, key=None):
        """A ledger row as the proxy would write it (for history the API cannot make up)."""
        import secrets

        row = LedgerRow(
            request_id="req-" + secrets.token_hex(8),
            ts=ts,
            agent=agent,
            provider=provider,
            requested_model=f"{provider}/{model}",
            effective_model=model,
            status=status,
            stream=False,
            latency_ms=latency,
            ttfb_ms=latency * 0.4,
            input_tokens=tokens_in,
            output_tokens=tokens_out,
            cost_usd=cost if priced else 0.0,
            priced=priced,
            key_id=key.token_hash if key is not None else None,
            team_id=key.team_id if key is not None else None,
            user_id=key.user_id if key is not None else None,
        )
        return self.h.ledger.record(row)


class UiClient:
    """treq against the UI, keeping its cookies by hand (to see their flags)."""

    def __init__(self, http, base):
        self.http = http
        self.base = base
        self.cookies: dict[str, str] = {}
        self.set_cookie_headers: list[str] = []

    def _headers(self, headers):
        out = {}
        if self.cookies:
            out["Cookie"] = ["; ".join(f"{k}={v}" for k, v in self.cookies.items())]
        for k, v in (headers or {}).items():
            out[k] = v if isinstance(v, list) else [v]
        return out

    def _remember(self, response):
        for raw in response.headers.getRawHeaders("set-cookie", []):
            self.set_cookie_headers.append(raw)
            jar = SimpleCookie()
            jar.load(raw)
            for name, morsel in jar.items():
                if morsel["max-age"] == "0":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        return response

    def get(self, path, headers=None, **kwargs):
        d = self.http.get(self.base + path, headers=self._headers(headers), allow_redirects=False, **kwargs)
        return d.addCallback(self._remember)

    def post(self, path, form=None, headers=None, json_body=None, **kwargs):
        all_headers = dict(headers or {})
        if json_body is not None:
            data = json.dumps(json_body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        else:
            data = urlencode(form or {}).encode()
            all_headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        d = self.http.post(self.base + path, data=data, headers=self._headers(all_headers), allow_redirects=False, **kwargs)
        return d.addCallback(self._remember)

    @defer.inlineCallbacks
    def sign_in(self, token=UI_TOKEN, name="tester"):
        page = yield self.get("/signin", headers={"Accept": "text/html"})
        html = yield page.text()
        csrf = re.search(r'name="csrf" value="([^"]+)"', html).group(1)
        response = yield self.post("/signin", {"csrf": csrf, "token": token, "name": name, "next": "/"}, headers={"Accept": "text/html"})
        return response

    @defer.inlineCallbacks
    def csrf(self, path="/"):
        """The session's CSRF token, read from a page's form."""
        page = yield self.get(path, headers={"Accept": "text/html"})
        html = yield page.text()
        return re.search(r'name="csrf" value="([^"]+)"', html).group(1)


class BrowserThread:
    """
    Playwright's sync API bound to one dedicated thread: every call goes
    through L{run}, which returns a Deferred fired on the reactor thread, so
    the reactor keeps serving the UI and the API while the browser waits.
    """

    def __init__(self, testcase, *, screenshots: str):
        self.testcase = testcase
        self.screenshots = screenshots
        os.makedirs(screenshots, exist_ok=True)
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="playwright", daemon=True)
        self._thread.start()
        self.console_errors: list[str] = []
        self.saved: list[str] = []

    def _loop(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            function, args, d = item
            try:
                result = function(*args)
            except BaseException:
                failure = Failure()
                reactor.callFromThread(d.errback, failure)
            else:
                reactor.callFromThread(d.callback, result)

    def run(self, function, *args):
        d = defer.Deferred()
        self._queue.put((function, args, d))
        return d

    @defer.inlineCallbacks
    def start(self, width=1440, height=900):
        yield self.run(self._start, width, height)
        self.testcase.addCleanup(self.stop)
        return self

    def _start(self, width, height):
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        self.context = self.browser.new_context(viewport={"width": width, "height": height}, device_scale_factor=1)
        self.page = self.context.new_page()
        self.page.set_default_timeout(15000)
        self.page.on("console", self._console)
        self.page.on("pageerror", lambda error: self.console_errors.append(f"pageerror: {error}"))

    def _console(self, message):
        # Refusals the tests ask for (401, 403, 429) are logged by Chromium as
        # failed loads; anything else (CSP violations, script errors) is a bug.
        if message.type == "error" and not re.match(r"Failed to load resource: .* status of (401|403|429)\b", message.text):
            self.console_errors.append(message.text)

    def _stop(self):
        try:
            self.browser.close()
        finally:
            self._pw.stop()

    @defer.inlineCallbacks
    def stop(self):
        if self._thread.is_alive():
            try:
                yield self.run(self._stop)
            finally:
                self._queue.put(None)
                yield self.run_in_reactor_later()

    def run_in_reactor_later(self):
        d = defer.Deferred()
        reactor.callLater(0, d.callback, None)
        return d

    def shot(self, name, full_page=True):
        """Fires with the path of a PNG of the current page."""
        path = os.path.join(self.screenshots, f"{name}.png")

        def take():
            if full_page:
                # From the top: a page scrolled to an anchor would draw the
                # sticky sidebar where the viewport was.
                self.page.evaluate("window.scrollTo(0, 0)")
            self.page.screenshot(path=path, full_page=full_page)
            return path

        def saved(p):
            self.saved.append(p)
            return p

        return self.run(take).addCallback(saved)

    def page_call(self, method, *args, **kwargs):
        return self.run(lambda: getattr(self.page, method)(*args, **kwargs))


SCANNER.register(UI_TOKEN)
