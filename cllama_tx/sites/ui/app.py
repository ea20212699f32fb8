"""
The operator UI site (default :8081): pages, their JSON twins, the JSON
endpoints scripts and dashboards use, sign-in, and live updates.

Every route but C{/health}, C{/signin} and C{/static/*} needs the operator:
C{Authorization: Bearer <token>} (scripts) or a signed-in session cookie
(browsers; state changes then also need the session's CSRF token).  Without
a configured token everything stays shut, unless authentication was turned
off explicitly (C{auth_disabled}), which is logged loudly and shown on every
page.

Content negotiation: a page answers HTML when the request's C{Accept}
prefers C{text/html} (what browsers send), else JSON (scripts, C{curl}),
and C{?format=json} forces JSON.  The JSON is the dict the HTML is drawn
from.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from typing import Any
from urllib.parse import parse_qsl, quote

import attrs
from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from werkzeug.exceptions import MethodNotAllowed, NotFound

from cllama_tx import __version__
from cllama_tx.identity.lookups import LookupsBusy
from cllama_tx.identity.operator import OperatorGuard, request_source
from cllama_tx.identity.operator_sessions import SessionRows
from cllama_tx.identity.tokens import valid_agent_id
from cllama_tx.sites.guard import GuardedSite, guarded_request
from cllama_tx.sites.ui import debug_page, directory_page, directory_view, pages, routing_api, views
from cllama_tx.sites.ui.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    DEFAULT_SESSION_IDLE,
    DEFAULT_SESSION_LIFETIME,
    SIGNIN_COOKIE,
    Session,
    SessionStore,
    bearer_of,
    clean_name,
    client_address,
    cookie_header,
    csrf_matches,
    host_allowed,
    host_name,
    is_secure,
    read_session_cookie,
    same_origin,
    session_cookie_name,
    token_matches,
)
from cllama_tx.sites.ui.discovery_page import discovery_page, discovery_view
from cllama_tx.sites.ui.live import LiveHub
from cllama_tx.sites.ui.preflight import announce_auth_off, required_templates
from cllama_tx.sites.ui.web import Static, Templates
from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.store.ledger import SPEND_COUNTS
from cllama_tx.store.shared import scope_name
from cllama_tx.surfaces.errors import ProxyError

log = Logger(namespace="cllama_tx.sites.ui")

MAX_FORM_BYTES = 256 * 1024
CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


@attrs.frozen
class Principal:
    """Who is asking: C{bearer} (a script), C{session} (a browser), C{open} (auth off)."""

    kind: str
    actor: str
    session: Session | None = None
    name: str | None = None


class _Refused(Exception):
    """Raised inside a handler to answer a refusal already written."""

    def __init__(self, body: bytes) -> None:
        self.body = body


class UiApp:
    app = Klein()

    def __init__(
        self,
        *,
        token: str | None,
        pod: str | None,
        contexts,
        providers,
        ledger=None,
        clock=None,
        operations=None,
        governance=None,
        pricing=None,
        audit=None,
        keys=None,
        metrics=None,
        auth_disabled: bool = False,
        session_lifetime: float = DEFAULT_SESSION_LIFETIME,
        session_idle: float = DEFAULT_SESSION_IDLE,
        live_interval: float = 2.0,
        web_root: str | None = None,
        guard: OperatorGuard | None = None,
        allowed_hosts: frozenset[str] = frozenset(),
        model_table=None,
        session_rows: SessionRows | None = None,
        discovery=None,
        directory=None,
        budgets=None,
        routing: routing_api.Routing | None = None,
        announced: bool = False,  # the daemon said at start that authentication is off (preflight)
    ) -> None:
        self._token = token.encode("utf-8") if token else None
        # Model mappings, the resolver and the resolution trace (/_api/mappings, /_debug).
        self.routing = routing
        self.metrics = metrics
        # Local model servers (cllama_tx.discovery), None when discovery is off.
        self.discovery = discovery
        self._auth_disabled = bool(auth_disabled)
        if clock is None:
            clock = _WallClock()
        self._clock = clock
        # Objects built before these keywords existed are found through the
        # operations object, which holds them all.
        self.services = views.Services(
            pod=pod,
            contexts=contexts,
            providers=providers,
            clock=clock,
            ledger=ledger,
            operations=operations,
            governance=governance if governance is not None else getattr(operations, "_governance", None),
            pricing=pricing if pricing is not None else getattr(operations, "_pricing", None),
            keys=keys,
            audit=audit if audit is not None else getattr(operations, "_audit", None),
            model_table=model_table if model_table is not None else getattr(operations, "_model_table", None),
            directory=directory,
            budgets=budgets,
        )
        # With session_rows (several instances on one store), sessions are shared.
        self.sessions = SessionStore(clock, lifetime=session_lifetime, idle=session_idle, rows=session_rows)
        # The daemon passes its one guard, shared with the API port's
        # operator endpoints; a UI built alone gets its own.
        self.guard = guard if guard is not None else OperatorGuard(clock=clock, audit=self.services.audit)
        self.allowed_hosts = frozenset(allowed_hosts)
        self._refused_hosts: set[str] = set()
        self.templates = Templates(web_root)
        self.templates.require(required_templates())
        self.static = Static(web_root)
        self._generation = 0
        self.live = LiveHub(clock, self._signature, interval=live_interval, session_valid=self.sessions.valid)
        if self._auth_disabled and not announced:
            announce_auth_off()

    # --- plumbing ----------------------------------------------------------------------

    def _json(self, request, status: int, doc) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"vary", b"Accept, Authorization, Cookie")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return json.dumps(doc).encode("utf-8")

    def _html(self, request, status: int, body: bytes) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"vary", b"Accept, Authorization, Cookie")
        request.setHeader(b"content-security-policy", CSP)
        request.setHeader(b"x-frame-options", b"DENY")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"referrer-policy", b"same-origin")
        return body

    def _redirect(self, request, location: str) -> bytes:
        request.setResponseCode(303)
        request.setHeader(b"location", location.encode("utf-8"))
        request.setHeader(b"cache-control", b"no-store")
        return b""

    def _problem(self, request, error: ProxyError) -> bytes:
        doc = {"error": {"message": error.message, "type": "invalid_request_error", "code": error.code}}
        doc.update(error.extra or {})  # e.g. the OR gate's "detail"
        return self._json(request, error.status, doc)

    def _error_doc(self, message: str, code: str, kind: str = "invalid_request_error") -> dict:
        return {"error": {"message": message, "type": kind, "code": code}}

    def _emit(self, action: str, who: Principal, agent: str | None = None, **details) -> None:
        """An C{operator} audit line (never a secret)."""
        self._generation += 1
        audit = self.services.audit
        if audit is not None:
            audit.emit("operator", agent, None, action=action, actor=who.actor, **details)
        else:
            log.info("operator {action} by {actor}", action=action, actor=who.actor)

    def _signature(self):
        s = self.services
        totals = s.ledger.totals() if s.ledger is not None else None
        return (
            self._generation,
            (totals.requests, totals.errors) if totals is not None else None,
            json.dumps(s.providers.snapshot(), sort_keys=True),
            tuple(s.contexts.agent_ids()),
        )

    # --- who is asking ---------------------------------------------------------------------

    def _actor(self, kind: str, request, session: Session | None = None) -> str:
        address = client_address(request)
        if kind == "bearer":
            return f"operator-token@{address}"
        if kind == "open":
            return f"unauthenticated@{address}"
        if session is not None and session.name:
            return f"operator:{session.name}@{address}"
        return f"operator-session:{session.handle if session else 'unknown'}@{address}"

    def _principal(self, request) -> Principal | None:
        """
        The operator behind C{request}, or None.  A bearer token is a guess
        like any other: while its address must wait (L{OperatorGuard}) it
        is not compared and L{_Refused} (429) is raised; a wrong one is
        counted.  A session cookie is not a guess and never waits.
        """
        presented = bearer_of(request.getHeader(b"authorization"))
        if self._auth_disabled:
            session = self.sessions.get(read_session_cookie(request))
            if session is None and request.method in (b"GET", b"HEAD"):
                session = self._start_session(request, None)
            return Principal("open", self._actor("open", request), session)
        if presented is not None and self._token is not None:
            source = request_source(request)
            wait = self.guard.refusal(source, "ui")
            if wait is not None:
                raise _Refused(self._throttled(request, wait))
            if token_matches(presented, self._token):
                return Principal("bearer", self._actor("bearer", request))
            self.guard.failed(source, "ui")
            return None
        if self._token is None:
            return None
        session = self.sessions.get(read_session_cookie(request))
        if session is not None:
            return Principal("session", self._actor("session", request, session), session, session.name)
        return None

    def _throttled(self, request, wait: int) -> bytes:
        request.setHeader(b"retry-after", str(wait).encode())
        if self._wants_html(request):
            return self._html(
                request,
                429,
                pages.simple_page(self._context(request, None), title="Too many failed attempts", status_line="429",
                                  message=f"Too many wrong operator tokens from your address. Try again in {wait} seconds."),
            )
        return self._json(
            request,
            429,
            self._error_doc(
                f"too many wrong operator tokens from this address: the next one is compared in {wait} s",
                "too_many_attempts",
                "rate_limit_error",
            ),
        )

    def refuses_host(self, request) -> bool:
        """
        Authentication off: whether C{request} names a host this UI does
        not answer to (L{host_allowed}).  A DNS-rebinding page reaches the
        UI under its own name, and would otherwise be same-origin with it.
        """
        if not self._auth_disabled:
            return False
        host = request.getHeader(b"host")
        if host_allowed(host, self.allowed_hosts):
            return False
        name = host_name(host or b"")[:255]
        if name not in self._refused_hosts and len(self._refused_hosts) < 100:
            self._refused_hosts.add(name)  # logged once per name, not per request
            log.warn(
                "operator UI (authentication off): refused requests for host {host!r} from {address}; "
                "add it to CLLAMA_UI_ALLOWED_HOSTS if it is yours",
                host=name, address=client_address(request),
            )
        return True

    def misdirected(self, request) -> bytes:
        """The answer to a request L{refuses_host}: 421 Misdirected Request."""
        message = (
            "authentication is off, so this UI answers only to localhost, IP addresses and the names "
            "in CLLAMA_UI_ALLOWED_HOSTS (a protection against DNS rebinding)"
        )
        if self._wants_html(request):
            page = pages.simple_page(self._context(request, None), title="Unknown host name", status_line="421", message=message)
            return self._html(request, 421, page)
        return self._json(request, 421, self._error_doc(message, "host_not_allowed", "permission_error"))

    def _unauthorised(self, request) -> bytes:
        if self._wants_html(request):
            # A browser: to the sign-in page, and back here afterwards (a
            # refused POST is not replayed: back to the page it came from).
            if request.method in (b"GET", b"HEAD"):
                target = request.uri.decode("utf-8", "replace")
            else:
                target = _referer_path(request) or "/"
            return self._redirect(request, "/signin?next=" + quote(_safe_next(target), safe=""))
        if self._token is None:
            message = "the operator UI is locked: set CLLAMA_UI_TOKEN to use it"
        else:
            message = "operator token required (Authorization: Bearer <CLLAMA_UI_TOKEN>), or sign in at /signin"
            request.setHeader(b"www-authenticate", b'Bearer realm="cllama"')
        return self._json(request, 401, self._error_doc(message, "operator_token_required", "authentication_error"))

    def _gate(self, request, *, write: bool = False, form: dict | None = None) -> Principal:
        """
        The operator, or L{_Refused} with the answer.  For C{write}
        requests made with a cookie (not a bearer token), the session's
        CSRF token must come with it, and the request must not say it
        comes from another site.
        """
        who = self._principal(request)
        if who is None:
            raise _Refused(self._unauthorised(request))
        if write and who.kind != "bearer":
            presented = (form or {}).get(CSRF_FIELD) or request.getHeader(CSRF_HEADER)
            ok = same_origin(request) and who.session is not None and csrf_matches(who.session, presented)
            if not ok and who.kind == "open":
                # Auth off: scripts send JSON, which cannot be sent
                # cross-site without a CORS preflight we never answer.
                ok = same_origin(request) and _content_type(request) == b"application/json"
            if not ok:
                raise _Refused(self._csrf_refused(request))
        return who

    def _csrf_refused(self, request) -> bytes:
        log.warn("operator UI: refused a state change without a valid CSRF token from {address}", address=client_address(request))
        if self._wants_html(request):
            return self._html(
                request,
                403,
                pages.simple_page(
                    self._context(request, None),
                    title="This form has expired",
                    status_line="403",
                    message="The request did not carry this session's form token (CSRF). Reload the page and try again.",
                ),
            )
        return self._json(request, 403, self._error_doc("missing or invalid CSRF token (X-CSRF-Token) for a cookie session", "csrf_failed", "permission_error"))

    def _start_session(self, request, name: str | None) -> Session:
        session = self.sessions.create(name)
        self._session_cookie(request, session)
        return session

    def _session_cookie(self, request, session: Session) -> None:
        secure = is_secure(request)
        request.responseHeaders.addRawHeader(
            b"set-cookie",
            cookie_header(session_cookie_name(secure), session.id, secure=secure, max_age=int(self.sessions.lifetime)),
        )

    def session_lookup(self, request) -> defer.Deferred | None:
        """
        The read of this request's session from the shared store, when this
        instance has not seen it (None: nothing to wait for).  The site
        serves the request once it fires (L{UiSite.getResourceFor}).
        """
        cookie = read_session_cookie(request)
        if not self.sessions.needs_lookup(cookie):
            return None
        assert cookie is not None
        return self.sessions.load(cookie)

    def sessions_unavailable(self, request) -> bytes:
        """503: the shared session store cannot be read or written (nothing was done)."""
        request.setHeader(b"retry-after", b"5")
        message = "The operator sessions' database cannot be reached right now. Try again in a few seconds."
        if self._wants_html(request):
            page = pages.simple_page(self._context(request, None), title="Sessions unavailable", status_line="503",
                                     message=message)
            return self._html(request, 503, page)
        return self._json(request, 503, self._error_doc(message, "store_unavailable", "api_error"))

    # --- negotiation ---------------------------------------------------------------------------

    def _format(self, request) -> str:
        forced = (request.args.get(b"format") or [b""])[0].decode("ascii", "replace").lower()
        if forced in ("json", "html", "csv"):
            return forced
        return negotiate(request.getHeader(b"accept"))

    def _wants_html(self, request) -> bool:
        return self._format(request) == "html"

    def _context(self, request, who: Principal | None, *, consume_flash: bool = True) -> pages.PageContext:
        session = who.session if who is not None else None
        flash: list = []
        if session is not None and consume_flash and not request.getHeader(b"x-live"):
            flash, session.flash = session.flash, []
        return pages.PageContext(
            templates=self.templates,
            static=self.static,
            csrf=session.csrf if session is not None else None,
            now=self._clock.seconds(),
            pod=self.services.pod,
            version=__version__,
            actor_name=(session.name if session is not None else None) or ("bearer token" if who is not None and who.kind == "bearer" else None),
            auth_disabled=self._auth_disabled,
            flash=flash,
            live=self.live.available,
            clock=self._clock if hasattr(self._clock, "callLater") else None,
        )

    async def _page(self, request, who: Principal, view: dict, render, **extra) -> bytes:
        if self._format(request) != "html":
            return self._json(request, 200, view)
        # Written in turns (pages.py): the reactor serves the proxy meanwhile.
        body = await render(self._context(request, who), view, **extra)
        return self._html(request, 200, body)

    def _done(self, request, who: Principal, location: str, message: str, doc: dict, level: str = "ok") -> bytes:
        """After a successful change: back to a page (browsers) or JSON."""
        if self._wants_html(request) or (who.kind != "bearer" and self._format(request) != "json" and _content_type(request) != b"application/json"):
            if who.session is not None:
                who.session.flash.append((level, message))
            return self._redirect(request, location)
        return self._json(request, 200, doc)

    def _failed(self, request, who: Principal, location: str, error: ProxyError) -> bytes:
        if who.kind != "bearer" and self._format(request) != "json" and _content_type(request) != b"application/json":
            if who.session is not None:
                who.session.flash.append(("error", error.message))
            return self._redirect(request, location)
        return self._problem(request, error)

    # --- open routes ----------------------------------------------------------------------------

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request):
        return self._json(request, 200, {"ok": True})

    @app.route("/static/<name>", methods=["GET", "HEAD"])
    def static_file(self, request, name):
        found = self.static.files.get(name)
        if found is None:
            request.setResponseCode(404)
            request.setHeader(b"content-type", b"text/plain; charset=utf-8")
            return b"not found"
        data, content_type, digest = found
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"etag", f'"{digest}"'.encode())
        versioned = (request.args.get(b"v") or [b""])[0] == digest.encode()
        request.setHeader(b"cache-control", b"public, max-age=31536000, immutable" if versioned else b"no-cache")
        if request.getHeader(b"if-none-match") == f'"{digest}"'.encode():
            request.setResponseCode(304)
            return b""
        return data

    @app.route("/signin", methods=["GET"])
    def signin_form(self, request):
        next_url = _safe_next((request.args.get(b"next") or [b"/"])[0].decode("utf-8", "replace"))
        if self._auth_disabled:
            return self._redirect(request, next_url)
        who = self._principal(request)
        if who is not None:
            return self._redirect(request, next_url)
        wait = self.guard.throttle.retry_after(request_source(request))
        return self._signin_page(request, next_url, None, 200 if wait is None else 429, wait)

    def _signin_page(self, request, next_url: str, error: str | None, status: int, wait: int | None = None) -> bytes:
        nonce = secrets.token_urlsafe(24)
        request.responseHeaders.addRawHeader(
            b"set-cookie", cookie_header(SIGNIN_COOKIE, nonce, secure=is_secure(request), max_age=3600)
        )
        if wait is not None:
            request.setHeader(b"retry-after", str(wait).encode())
        if self._format(request) == "json":
            doc = self._error_doc(error or "sign in with the operator token (or send Authorization: Bearer)", "sign_in_required", "authentication_error")
            return self._json(request, status if status != 200 else 401, doc)
        body = pages.signin_page(
            self._context(request, None), csrf=nonce, next_url=next_url, error=error, locked=self._token is None, retry_after=wait
        )
        return self._html(request, status, body)

    @app.route("/signin", methods=["POST"])
    async def signin(self, request):
        form = _read_form(request)
        next_url = _safe_next(form.get("next") or "/")
        source = request_source(request)
        if self._auth_disabled:
            return self._redirect(request, next_url)
        if self._token is None:
            return self._signin_page(request, next_url, None, 403)
        # Not compared while the address waits: see OperatorGuard.
        wait = self.guard.refusal(source, "sign_in", action="sign_in_throttled")
        if wait is not None:
            return self._signin_page(request, next_url, None, 429, wait)
        nonce = request.getCookie(SIGNIN_COOKIE.encode())
        if not same_origin(request) or not nonce or not secrets.compare_digest(
            nonce, (form.get(CSRF_FIELD) or "").encode("utf-8", "replace")
        ):
            return self._signin_page(
                request, next_url, "The sign-in form expired or your browser refused its cookie. Please try again.", 403
            )
        if not token_matches(form.get("token") or "", self._token):
            self.guard.failed(source, "sign_in", action="sign_in_failed")
            wait = self.guard.throttle.retry_after(source)
            return self._signin_page(request, next_url, "That is not the operator token.", 401 if wait is None else 429, wait)
        # A fresh session id at every sign-in (no fixation); drop any old one.
        old = self.sessions.get(read_session_cookie(request), touch=False)
        if old is not None:
            self.sessions.destroy(old)
        try:
            # Stored before its cookie is handed out: the next request may reach another instance.
            session = await self.sessions.create_saved(clean_name(form.get("name")))
        except DatabaseUnavailable as e:
            log.error("operator UI: sign-in refused, the session could not be stored: {error}", error=str(e))
            return self.sessions_unavailable(request)
        self._session_cookie(request, session)
        request.responseHeaders.addRawHeader(b"set-cookie", cookie_header(SIGNIN_COOKIE, "", secure=is_secure(request), max_age=0))
        self._emit("sign_in", Principal("session", self._actor("session", request, session), session))
        return self._redirect(request, next_url)

    @app.route("/signout", methods=["POST"])
    async def signout(self, request):
        form = _read_form(request)
        who = self._gate(request, write=True, form=form)
        if who.session is not None:
            try:
                await self.sessions.end(who.session)  # on every instance
            except DatabaseUnavailable as e:
                log.error("operator UI: sign-out failed, the shared session store is unavailable: {error}",
                          error=str(e))
                return self.sessions_unavailable(request)
        secure = is_secure(request)
        request.responseHeaders.addRawHeader(b"set-cookie", cookie_header(session_cookie_name(secure), "", secure=secure, max_age=0))
        self._emit("sign_out", who)
        return self._redirect(request, "/signin" if not self._auth_disabled else "/")

    # --- pages -------------------------------------------------------------------------------------

    @app.route("/", methods=["GET"])
    def overview(self, request):
        who = self._gate(request)
        return self._page(request, who, views.overview(self.services), pages.overview_page)

    @app.route("/agents", methods=["GET"])
    async def agents(self, request):
        who = self._gate(request)
        view = await views.agents(self.services)
        return await self._page(request, who, view, pages.agents_page)

    @app.route("/agents/<agent>", methods=["GET"])
    async def agent(self, request, agent):
        who = self._gate(request)
        if not valid_agent_id(agent) or agent not in views.agent_ids(self.services):
            return self._not_found(request, f"no agent {agent!r}")
        view = await views.agents(self.services, only=agent, recent=25)
        return await self._page(request, who, view, pages.agent_page)

    @app.route("/costs", methods=["GET"])
    def costs(self, request):
        who = self._gate(request)
        try:
            view = self._costs_view(request)
        except ValueError as e:
            return self._bad_request(request, who, str(e))
        if self._format(request) == "csv":
            return self._csv(request, view)
        return self._page(request, who, view, pages.costs_page)

    @app.route("/costs.csv", methods=["GET"])
    def costs_csv(self, request):
        who = self._gate(request)
        try:
            view = self._costs_view(request)
        except ValueError as e:
            return self._bad_request(request, who, str(e))
        return self._csv(request, view)

    def _costs_view(self, request) -> dict:
        arg = lambda name: (request.args.get(name) or [b""])[0].decode("utf-8", "replace").strip() or None  # noqa: E731
        period, since, until = arg(b"period"), arg(b"since"), arg(b"until")
        if period and period != "custom":
            since = until = None  # a named period wins over the dates shown beside it
        elif period == "custom":
            period = None
        return views.costs(self.services, period, since, until)

    def _csv(self, request, view: dict) -> bytes:
        request.setHeader(b"content-type", b"text/csv; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        name = f"cllama-costs-{view['since_day'] or 'start'}-{view['until_day'] or 'now'}.csv"
        request.setHeader(b"content-disposition", f'attachment; filename="{name}"'.encode())
        return views.costs_csv(view)

    @app.route("/requests", methods=["GET"])
    async def requests(self, request):
        who = self._gate(request)
        agent = (request.args.get(b"agent") or [b""])[0].decode("utf-8", "replace").strip() or None
        if agent is not None and not valid_agent_id(agent):
            return self._bad_request(request, who, "not a valid agent id")
        errors_only = (request.args.get(b"errors") or [b""])[0] in (b"1", b"true", b"on")
        try:
            limit = max(1, min(int((request.args.get(b"limit") or [b"100"])[0]), 1000))
        except ValueError:
            limit = 100
        view = await views.requests(self.services, agent, errors_only, limit)
        return await self._page(request, who, view, pages.requests_page)

    @app.route("/providers", methods=["GET"])
    def providers_page(self, request):
        who = self._gate(request)
        return self._page(request, who, views.providers(self.services), pages.providers_page)

    @app.route("/budgets", methods=["GET"])
    def budgets(self, request):
        who = self._gate(request)
        view = views.budgets(self.services)
        editing = (request.args.get(b"edit") or [b""])[0].decode("utf-8", "replace")
        view["editing"] = editing if valid_agent_id(editing) else None
        return self._page(request, who, view, pages.budgets_page)

    @app.route("/keys", methods=["GET"])
    async def vkeys(self, request):
        who = self._gate(request)
        view = await views.virtual_keys(self.services)
        return await self._page(request, who, view, pages.keys_page)

    @app.route("/teams", methods=["GET"])
    async def teams(self, request):
        """Organisations, teams, users and customers of the key API, their budgets and spend."""
        who = self._gate(request)
        view = await directory_view.directory(self.services)
        return await self._page(request, who, view, directory_page.directory_page)

    @app.route("/pricing", methods=["GET"])
    def pricing(self, request):
        who = self._gate(request)
        return self._page(request, who, views.pricing(self.services), pages.pricing_page)

    @app.route("/models", methods=["GET"])
    def model_table(self, request):
        who = self._gate(request)
        return self._page(request, who, views.model_table(self.services), pages.models_page)

    @app.route("/discovery", methods=["GET"])
    def discovery_servers(self, request):
        """The local model servers discovery found, and how it is set (CLLAMA_DISCOVERY)."""
        who = self._gate(request)
        return self._page(request, who, discovery_view(self.discovery, self._clock.seconds()), discovery_page)

    @app.route("/discovery/rediscover", methods=["POST"])
    async def rediscover(self, request):
        """Look for local model servers now; answers once the round is over (a few probe timeouts at most)."""
        who, _ = self._form_gate(request)
        if self.discovery is None:
            off = ProxyError(409, "discovery_off", "discovery is off: set CLLAMA_DISCOVERY=on to find local model servers")
            return self._failed(request, who, "/discovery", off)
        servers = await self.discovery.rediscover()
        up = [s["name"] for s in servers if s["state"] == "up"]
        self._emit("discovery_rediscover", who, servers=up)
        self._generation += 1
        message = f"Looked again: {len(up)} local model server{'' if len(up) == 1 else 's'} up."
        return self._done(request, who, "/discovery", message, {"servers": servers})

    @app.route("/events", methods=["GET"])
    async def events(self, request):
        who = self._gate(request)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        if request.method != b"GET":
            # HEAD (which routing allows wherever GET is) must not hold the
            # connection open: its client is done once it has the headers.
            return b""
        done = self.live.subscribe(request, who.session)
        if done is None:
            request.setResponseCode(204)  # EventSource stops retrying on 204
            return b""
        try:
            await done
        finally:
            self.live.unsubscribe(request)
        return None

    # --- changes made from the pages ------------------------------------------------------------------

    def _form_gate(self, request) -> tuple[Principal, dict]:
        form = _read_form(request)
        return self._gate(request, write=True, form=form), form

    @app.route("/providers", methods=["POST"])
    def add_provider(self, request):
        who, form = self._form_gate(request)
        registry = self.services.providers
        name = (form.get("name") or "").strip()
        try:
            if not hasattr(registry, "add_provider"):
                raise ValueError("providers cannot be managed here (demo mode)")
            name = registry.add_provider(
                name,
                base_url=(form.get("base_url") or "").strip() or None,
                auth=(form.get("auth") or "").strip() or None,
                api_format=(form.get("api_format") or "").strip() or None,
            )
        except Exception as e:
            return self._failed(request, who, "/providers", ProxyError(400, "invalid_provider", _message(e)))
        self._emit("provider_add", who, provider=name, base_url=(form.get("base_url") or "").strip() or None)
        return self._done(request, who, f"/providers#provider-{name}", f"Provider {name} saved.", {"provider": name})

    @app.route("/providers/keys", methods=["POST"])
    def add_key(self, request):
        who, form = self._form_gate(request)
        provider = (form.get("provider") or "").strip()
        label = (form.get("label") or "").strip()[:64] or None
        try:
            key_id = self.services.providers.add_key(provider, form.get("secret") or "", label)
        except Exception as e:
            return self._failed(request, who, f"/providers#provider-{provider}", ProxyError(400, "invalid_key", _message(e)))
        self._emit("key_add", who, provider=provider, key_id=key_id, label=label)
        return self._done(
            request, who, f"/providers#provider-{provider}", f"Key {label or key_id} added to {provider}.", {"provider": provider, "key_id": key_id}
        )

    @app.route("/providers/keys/<action>", methods=["POST"])
    def key_action(self, request, action):
        who, form = self._form_gate(request)
        operations = {"activate": "activate_key", "disable": "disable_key", "delete": "delete_key"}
        if action not in operations:
            return self._not_found(request, f"no key action {action!r}")
        provider = (form.get("provider") or "").strip()
        key_id = (form.get("key_id") or "").strip()
        try:
            getattr(self.services.providers, operations[action])(provider, key_id)
        except Exception as e:
            return self._failed(request, who, f"/providers#provider-{provider}", ProxyError(400, "key_action_failed", _message(e)))
        self._emit(f"key_{action}", who, provider=provider, key_id=key_id)
        done = {"activate": "activated", "disable": "disabled", "delete": "deleted"}[action]
        return self._done(request, who, f"/providers#provider-{provider}", f"Key {key_id} of {provider} {done}.", {"provider": provider, "key_id": key_id, "action": action})

    @app.route("/budgets/<agent>", methods=["POST"])
    async def edit_budget(self, request, agent):
        who, form = self._form_gate(request)
        back = f"/budgets?edit={agent}#agent-{agent}"  # a refusal reopens the form
        if not valid_agent_id(agent):
            return self._failed(request, who, "/budgets", ProxyError(400, "invalid_agent", "not a valid agent id"))
        if self.services.operations is None:
            return self._failed(request, who, back, ProxyError(503, "unavailable", "budgets cannot be changed here"))
        try:
            doc = budget_doc(form)
        except ValueError as e:
            return self._failed(request, who, back, ProxyError(400, "invalid_parameter", str(e)))
        if not doc:
            return self._failed(request, who, back, ProxyError(400, "invalid_body", "nothing to change: every field was empty"))
        try:
            entry = await self.services.operations.set_budget(agent, doc, who.actor)
        except ProxyError as e:
            return self._failed(request, who, back, e)
        self._generation += 1
        return self._done(request, who, f"/budgets#agent-{agent}", f"Budget of {agent} updated ({', '.join(sorted(doc))}).", {"agent": agent, "override": entry})

    @app.route("/budgets/<agent>/reset", methods=["POST"])
    async def reset_budget_form(self, request, agent):
        who, form = self._form_gate(request)
        if not valid_agent_id(agent) or self.services.operations is None:
            return self._failed(request, who, "/budgets", ProxyError(400, "invalid_agent", "not a valid agent id"))
        entry = await self.services.operations.reset(agent, who.actor)
        self._generation += 1
        return self._done(request, who, f"/budgets#agent-{agent}", f"Spend of {agent} reset.", {"agent": agent, "override": entry})

    @app.route("/reload", methods=["POST"])
    def reload_form(self, request):
        who, form = self._form_gate(request)
        back = _safe_next(_referer_path(request) or "/")
        result = self.services.operations.reload(who.actor)
        self._generation += 1
        if result["failed"]:
            failed = ", ".join(f"{k}: {v}" for k, v in result["failed"].items())
            return self._failed(request, who, back, ProxyError(500, "reload_failed", f"Reload failed for {failed}"))
        return self._done(request, who, back, f"Reloaded {', '.join(result['reloaded'])}.", result)

    @app.route("/keys", methods=["POST"])
    async def create_vkey(self, request):
        who, form = self._form_gate(request)
        store = self.services.keys
        if store is None:
            return self._failed(request, who, "/keys", ProxyError(404, "key_api_off", "the virtual key API is off"))
        try:
            fields = vkey_fields(form)
            key, vk = await defer.maybeDeferred(store.create, **fields)
        except Exception as e:
            return self._failed(request, who, "/keys", ProxyError(400, "invalid_key", _message(e)))
        shown = views.vkey_record(vk, self._clock.seconds())
        self._emit(
            "virtual_key_create", who, None,
            key_id=vk.token_hash, key_name=shown["key_name"], key_alias=shown["key_alias"],
            team_id=shown["team_id"], user_id=shown["user_id"],
        )
        if self._format(request) == "json" or who.kind == "bearer" or _content_type(request) == b"application/json":
            return self._json(request, 201, {"key": key, **shown})
        # The key is shown once, in this answer: never stored, never in the session.
        ctx = self._context(request, who)
        ctx.flash.append(("ok", f"Virtual key {shown['key_alias'] or shown['key_name']} created."))
        view = await views.virtual_keys(self.services)
        return self._html(request, 201, await pages.keys_page(ctx, view, created={"secret": key, **shown}))

    @app.route("/teams", methods=["POST"])
    async def create_record(self, request):
        """Add an organisation, team, user or customer (as /team/new ... do)."""
        who, form = self._form_gate(request)
        kind = (form.get("kind") or "").strip()
        store = self.services.directory
        if store is None or kind not in directory_view.ID_FIELDS:
            return self._failed(request, who, "/teams", ProxyError(400, "invalid_kind", "choose a team, organisation, user or customer"))
        record_id = (form.get("id") or "").strip() or (None if kind == "customer" else str(uuid.uuid4()))
        try:
            if record_id is None:
                raise ValueError("a customer needs an id: the id its requests name in 'user'")
            fields = directory_view.validate(kind, directory_view.form_body(kind, form, update=False), update=False)
            await store.create(kind, record_id, fields)
        except Exception as e:
            return self._failed(request, who, "/teams", ProxyError(400, "invalid_record", _message(e)))
        self._emit("directory_create", who, kind=kind, record_id=record_id)
        return self._done(request, who, f"/teams#{kind}-{record_id}", f"{kind.title()} {record_id} added.",
                          {"kind": kind, "id": record_id})

    @app.route("/teams/<kind>/<record_id>", methods=["POST"])
    async def update_record(self, request, kind, record_id):
        who, form = self._form_gate(request)
        store = self.services.directory
        back = f"/teams#{kind}-{record_id}"
        if store is None or kind not in directory_view.ID_FIELDS or store.get(kind, record_id) is None:
            return self._failed(request, who, "/teams", ProxyError(404, "not_found", f"no {kind} {record_id!r}"))
        try:
            fields = directory_view.validate(kind, directory_view.form_body(kind, form, update=True), update=True)
            await store.update(kind, record_id, fields)
        except Exception as e:
            return self._failed(request, who, back, ProxyError(400, "invalid_record", _message(e)))
        self._emit("directory_update", who, kind=kind, record_id=record_id, fields=sorted(fields))
        return self._done(request, who, back, f"{kind.title()} {record_id} saved.", {"kind": kind, "id": record_id})

    @app.route("/teams/<kind>/<record_id>/reset", methods=["POST"])
    async def reset_record(self, request, kind, record_id):
        who, form = self._form_gate(request)
        store = self.services.directory
        if store is None or kind not in directory_view.ID_FIELDS or store.get(kind, record_id) is None:
            return self._failed(request, who, "/teams", ProxyError(404, "not_found", f"no {kind} {record_id!r}"))
        await self.services.budgets.set_spend(scope_name(kind, record_id), 0.0, who.actor)
        self._emit("directory_reset", who, kind=kind, record_id=record_id)
        return self._done(request, who, f"/teams#{kind}-{record_id}", f"Spend of {record_id} reset.",
                          {"kind": kind, "id": record_id, "spend": 0.0})

    @app.route("/teams/<kind>/<record_id>/delete", methods=["POST"])
    async def delete_record(self, request, kind, record_id):
        who, form = self._form_gate(request)
        store = self.services.directory
        if store is None or kind not in directory_view.ID_FIELDS or store.get(kind, record_id) is None:
            return self._failed(request, who, "/teams", ProxyError(404, "not_found", f"no {kind} {record_id!r}"))
        keys = self.services.keys
        if kind in ("team", "user") and keys is not None:
            # As the key API's /team/delete and /user/delete: their keys go too.
            filters = {"team_id": record_id} if kind == "team" else {"user_id": record_id}
            hashes = [vk.token_hash for vk in keys.list(page=1, size=10**9, **filters).keys]
            if hashes:
                await keys.delete(hashes)
        await store.delete(kind, [record_id])
        self._emit("directory_delete", who, kind=kind, record_id=record_id)
        return self._done(request, who, "/teams", f"{kind.title()} {record_id} deleted.", {"kind": kind, "id": record_id,
                                                                                             "deleted": True})

    @app.route("/keys/revoke", methods=["POST"])
    async def revoke_vkey(self, request):
        who, form = self._form_gate(request)
        store = self.services.keys
        key_id = (form.get("key_id") or "").strip()
        if store is None:
            return self._failed(request, who, "/keys", ProxyError(404, "key_api_off", "the virtual key API is off"))
        vk = store.get(key_id) if key_id else None
        if vk is None:
            return self._failed(request, who, "/keys", ProxyError(404, "key_not_found", "no such virtual key (already revoked?)"))
        try:
            await defer.maybeDeferred(store.delete, [key_id])
        except Exception as e:
            return self._failed(request, who, "/keys", ProxyError(500, "revoke_failed", _message(e)))
        self._emit("virtual_key_revoke", who, None, key_id=key_id, key_name=vk.key_name, key_alias=vk.key_alias)
        name = vk.key_alias or vk.key_name
        return self._done(request, who, "/keys", f"Virtual key {name} revoked.", {"key_id": key_id, "revoked": True})

    # --- the JSON endpoints (unchanged shapes) ------------------------------------------------------------

    @app.route("/api/status", methods=["GET"])
    def status(self, request):
        self._gate(request)
        return self._json(request, 200, views.status(self.services))

    @app.route("/metrics", methods=["GET"])
    def metrics_exposition(self, request):
        """Prometheus scrape (Authorization: Bearer <operator token>)."""
        self._gate(request)
        if self.metrics is None:
            return self._json(request, 404, self._error_doc("metrics are not enabled", "metrics_disabled", "not_found_error"))
        return self.metrics.render(request)

    @app.route("/costs/api", methods=["GET"])
    def costs_api(self, request):
        """The Clawdapus dashboard's cost feed (CONTRACT 5), from the ledger."""
        self._gate(request)
        return self._json(request, 200, self.services.ledger.totals().costs_api())

    @app.route("/api/spend", methods=["GET"])
    def spend(self, request):
        self._gate(request)
        totals = self.services.ledger.totals()
        now = self._clock.seconds()
        doc = spend_periods(totals, now, None)
        doc["agents"] = {agent: spend_periods(totals, now, agent, counts=False) for agent in totals.agents()}
        doc["summary"] = totals.summary()
        console = self._gate_console
        return self._json(request, 200, console.add_all_spend(doc) if console is not None else doc)

    @app.route("/api/spend/<agent>", methods=["GET"])
    def spend_agent(self, request, agent):
        self._gate(request)
        totals = self.services.ledger.totals()
        console = self._gate_console
        known = console is not None and console.knows(agent)
        if agent not in totals.agents() and self.services.contexts.get(agent) is None and not known:
            doc = {"error": {"message": f"no agent {agent!r}", "type": "not_found_error", "code": "unknown_agent"}}
            if console is not None and console.active:
                doc["detail"] = {"error": "agent_not_found", "agent_id": agent}  # the OR gate's
            return self._json(request, 404, doc)
        doc = spend_periods(totals, self._clock.seconds(), agent)
        return self._json(request, 200, console.add_spend(agent, doc) if known else doc)

    @app.route("/api/health", methods=["GET"])
    async def api_health(self, request):
        self._gate(request)
        doc = await self.services.operations.health()
        console = self._gate_console
        return self._json(request, 200 if doc["ok"] else 503, console.add_health(doc) if console is not None else doc)

    @property
    def _gate_console(self):
        """The Execwall OR gate's console fields (sites/gate_console.py), when the daemon has them."""
        return getattr(self.services.operations, "gate_console", None)

    def _api_body(self, request) -> tuple[Principal, Any]:
        """Gate a JSON POST; C{(who, doc)}, doc None when the body is not JSON."""
        request.content.seek(0)
        raw = request.content.read()
        form = {}
        if _content_type(request) == b"application/x-www-form-urlencoded":
            form = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
        who = self._gate(request, write=True, form=form)
        try:
            return who, json.loads(raw or b"null")
        except ValueError:
            return who, _INVALID

    @app.route("/api/budget/<agent>", methods=["POST"])
    async def set_budget(self, request, agent):
        who, doc = self._api_body(request)
        if not valid_agent_id(agent):
            return self._problem(request, ProxyError(400, "invalid_agent", "not a valid agent id"))
        if doc is _INVALID:
            return self._problem(request, ProxyError(400, "invalid_json", "the body is not valid JSON"))
        console = self._gate_console
        try:
            if console is not None and console.handles_budget(agent, doc):
                # The OR gate's budget_total / budget_spent, for an agent of its file.
                answer = await console.set_budget(agent, doc, who.actor)
                self._generation += 1
                return self._json(request, 200, answer)
            entry = await self.services.operations.set_budget(agent, doc, who.actor)
        except ProxyError as e:
            return self._problem(request, e)
        self._generation += 1
        return self._json(request, 200, {"agent": agent, "override": entry})

    @app.route("/api/reset/<agent>", methods=["POST"])
    async def reset_budget(self, request, agent):
        who, _ = self._api_body(request)
        if not valid_agent_id(agent):
            return self._problem(request, ProxyError(400, "invalid_agent", "not a valid agent id"))
        console = self._gate_console
        if console is not None and console.knows(agent):
            # The OR gate's reset: its spend, not a limit the console set.
            answer = await console.reset(agent, who.actor)
            self._generation += 1
            return self._json(request, 200, answer)
        entry = await self.services.operations.reset(agent, who.actor)
        self._generation += 1
        return self._json(request, 200, {"agent": agent, "override": entry})

    @app.route("/api/reload", methods=["POST"])
    def reload(self, request):
        who, _ = self._api_body(request)
        result = self.services.operations.reload(who.actor)
        self._generation += 1
        console = self._gate_console
        return self._json(request, 200 if not result["failed"] else 500,
                          console.add_reload(result) if console is not None else result)

    # --- model routing: the mappings API and the debug page (routing_api) ------------------------------

    def _routing(self, request) -> routing_api.Routing:
        if self.routing is None:
            raise _Refused(self._not_found(request, "model routing is not available here"))
        return self.routing

    @app.route("/_debug", methods=["GET"])
    async def debug(self, request):
        who = self._gate(request)
        view = routing_api.debug_view(self._routing(request))
        return await self._page(request, who, view, debug_page.debug_page)

    async def _loaded_routing(self, request) -> routing_api.Routing:
        """The routing parts once the stored mappings are in memory (a read never lists a start's empty memory)."""
        routing = self._routing(request)
        if not await routing.mappings.loaded_within(routing_api.LOAD_WAIT):
            raise ProxyError(503, "mappings_loading", "the stored mappings are not loaded yet; try again",
                             retry_after=2)
        return routing

    @app.route("/_api/mappings/", methods=["GET"])
    async def mappings(self, request):
        self._gate(request)
        try:
            routing = await self._loaded_routing(request)
        except ProxyError as e:
            return self._problem(request, e)
        return self._json(request, 200, {"mappings": routing_api.listing(routing)})

    @app.route("/_api/mappings/<path:name>", methods=["GET"])
    async def mapping(self, request, name):
        self._gate(request)
        try:
            return self._json(request, 200, routing_api.get(await self._loaded_routing(request), name))
        except ProxyError as e:
            return self._problem(request, e)

    @app.route("/_api/mappings/<path:name>", methods=["PUT"])
    async def put_mapping(self, request, name):
        who, doc = self._api_body(request)
        if doc is _INVALID:
            return self._problem(request, ProxyError(400, "invalid_json", "the body is not valid JSON"))
        try:
            status, mapping, action = await routing_api.put(self._routing(request), name, doc, who.actor)
        except ProxyError as e:
            return self._problem(request, e)
        self._emit(action, who, name=mapping["name"], target=mapping["target"], source=mapping["source"])
        return self._json(request, status, mapping)

    @app.route("/_api/mappings/<path:name>", methods=["DELETE"])
    async def delete_mapping(self, request, name):
        who, _ = self._api_body(request)
        try:
            done = await routing_api.delete(self._routing(request), name)
        except ProxyError as e:
            return self._problem(request, e)
        self._emit("mapping_delete", who, name=name)
        return self._json(request, 200, done)

    @app.route("/_api/mappings/<path:name>/confirm", methods=["POST"])
    async def confirm_mapping(self, request, name):
        who, _ = self._form_gate(request)
        try:
            mapping = await routing_api.confirm(self._routing(request), name, who.actor)
        except ProxyError as e:
            return self._failed(request, who, "/_debug#debug-mappings", e)
        self._emit("mapping_confirm", who, name=name, target=mapping["target"], source=mapping["source"])
        return self._done(request, who, "/_debug#debug-mappings", f"Mapping of {name} confirmed.", mapping)

    @app.route("/_api/mappings/<path:name>/delete", methods=["POST"])
    async def delete_mapping_form(self, request, name):
        who, _ = self._form_gate(request)
        try:
            done = await routing_api.delete(self._routing(request), name)
        except ProxyError as e:
            return self._failed(request, who, "/_debug#debug-mappings", e)
        self._emit("mapping_delete", who, name=name)
        return self._done(request, who, "/_debug#debug-mappings", f"Mapping of {name} deleted.", done)

    # --- errors ------------------------------------------------------------------------------------------

    def _not_found(self, request, message: str = "no such page") -> bytes:
        if self._wants_html(request):
            return self._html(request, 404, pages.simple_page(self._context(request, None), title="Not found", status_line="404", message=message))
        return self._json(request, 404, self._error_doc(message, "not_found", "not_found_error"))

    def _bad_request(self, request, who: Principal, message: str) -> bytes:
        if self._wants_html(request):
            return self._html(request, 400, pages.simple_page(self._context(request, who), title="That did not work", status_line="400", message=message))
        return self._json(request, 400, self._error_doc(message, "invalid_parameter"))

    @app.handle_errors(_Refused)
    def refused(self, request, failure):
        """A gate refused the request; the answer is already prepared."""
        return failure.value.body

    @app.handle_errors(NotFound)
    def not_found(self, request, failure):
        return self._not_found(request)

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request, failure):
        allowed = getattr(failure.value, "valid_methods", None) or []
        if allowed:
            request.setHeader(b"allow", ", ".join(allowed).encode())
        return self._json(request, 405, self._error_doc("method not allowed", "method_not_allowed"))


# --- helpers -------------------------------------------------------------------------------------------------

_INVALID = object()


class _WallClock:
    """For UIs built without a clock (tests of the JSON endpoints): no timers, so no live updates."""

    @staticmethod
    def seconds() -> float:
        return time.time()


def negotiate(accept: bytes | None) -> str:
    """
    C{html} when C{Accept} names C{text/html} and ranks it at least as high
    as JSON; C{csv} when C{text/csv} ranks highest; else C{json} (so
    C{*/*}, which scripts send, means JSON).
    """
    if not accept:
        return "json"
    ranks: dict[str, float] = {}
    wildcard = 0.0
    for part in accept.decode("latin-1").split(","):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        q = 1.0
        for f in fields[1:]:
            if f.startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        if media in ("*/*", "application/*", "text/*"):
            wildcard = max(wildcard, q)
        else:
            ranks[media] = max(ranks.get(media, 0.0), q)
    html_q = ranks.get("text/html", ranks.get("application/xhtml+xml", 0.0))
    json_q = ranks.get("application/json", wildcard)
    csv_q = ranks.get("text/csv", 0.0)
    if csv_q > 0 and csv_q > html_q and csv_q > ranks.get("application/json", 0.0):
        return "csv"
    if html_q > 0 and html_q >= json_q:
        return "html"
    return "json"


def _content_type(request) -> bytes:
    return (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()


def _read_form(request) -> dict:
    """The urlencoded (or JSON object) body of a POST, as strings; query args are not read."""
    request.content.seek(0)
    raw = request.content.read(MAX_FORM_BYTES + 1)
    if len(raw) > MAX_FORM_BYTES:
        return {}
    kind = _content_type(request)
    if kind == b"application/x-www-form-urlencoded":
        return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
    if kind == b"application/json":
        try:
            doc = json.loads(raw or b"{}")
        except ValueError:
            return {}
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in doc.items()} if isinstance(doc, dict) else {}
    return {}


def _safe_next(value: str) -> str:
    """A local path to go back to after sign-in (never another site)."""
    if (
        not value
        or not value.startswith("/")
        or value.startswith("//")
        or "\\" in value
        or any(ord(c) < 0x20 for c in value)
        or len(value) > 512
        or value.startswith(("/signin", "/signout", "/events"))
    ):
        return "/"
    return value


def _referer_path(request) -> str | None:
    referer = request.getHeader(b"referer")
    if not referer or not same_origin(request):
        return None
    text = referer.decode("utf-8", "replace")
    start = text.find("/", text.find("//") + 2) if "//" in text else -1
    return text[start:] if start >= 0 else "/"


def _message(error: Exception) -> str:
    # Registry errors never contain a secret; show their text, else the kind.
    text = str(error.args[0]) if getattr(error, "args", None) else ""
    return text or type(error).__name__


def _number(form: dict, name: str, kind):
    raw = (form.get(name) or "").strip()
    if not raw:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a {'whole ' if kind is int else ''}number, not {raw!r}") from None
    return value


def budget_doc(form: dict) -> dict:
    """The POST /api/budget body a budget form stands for (empty fields are left out)."""
    doc: dict[str, Any] = {}
    limit = _number(form, "limit_usd", float)
    if limit is not None:
        doc["limit_usd"] = limit
    requests = _number(form, "max_requests", int)
    if requests is not None:
        doc["max_requests"] = requests
    window = (form.get("window") or "").strip()
    period = (form.get("period") or "").strip()
    if window and period:
        raise ValueError("give a rolling window or a calendar period, not both")
    if window:
        doc["window"] = window
    if period:
        doc["period"] = period
    behavior = (form.get("behavior") or "").strip()
    if behavior:
        doc["behavior"] = behavior
    tiers = (form.get("tiers") or "").strip()
    if tiers:
        try:
            doc["tiers"] = json.loads(tiers)
        except ValueError:
            raise ValueError("tiers must be JSON: a list of {\"threshold\", \"models\"} objects") from None
    spent = _number(form, "spent", float)
    if spent is not None:
        doc["spent"] = spent
    return doc


def vkey_fields(form: dict) -> dict:
    """The C{VirtualKeyStore.create} arguments a key form stands for (empty fields left out)."""
    fields: dict[str, Any] = {}
    for name in ("key_alias", "team_id", "user_id", "budget_duration", "duration"):
        value = (form.get(name) or "").strip()
        if value:
            fields[name] = value
    models = [m for m in (form.get("models") or "").replace(",", " ").split() if m]
    if models:
        fields["models"] = models
    budget = _number(form, "max_budget", float)
    if budget is not None:
        fields["max_budget"] = budget
    for name in ("rpm_limit", "tpm_limit"):
        value = _number(form, name, int)
        if value is not None:
            fields[name] = value
    return fields


def actor_of(request) -> str:
    """Who did it, for the audit: the credential kind and the client address."""
    return f"operator-token@{client_address(request)}"


def spend_periods(totals, now: float, agent: str | None, *, counts: bool = True) -> dict:
    """
    Spend today, this calendar month and all time (UTC days), with models;
    with C{counts}, what the totals count (L{SPEND_COUNTS}).
    """
    today = time.strftime("%Y-%m-%d", time.gmtime(now))
    month_start = today[:8] + "01"
    stated = {"counts": SPEND_COUNTS} if counts else {}
    return {
        **stated,
        "agent": agent,
        "today": totals.period(today, today, agent),
        "month": totals.period(month_start, today, agent),
        "all_time": totals.period(None, None, agent),
    }


# --- the site ----------------------------------------------------------------------------------------------------


class _CappedUiRequest(Request):
    """Operator requests are small: a body over the cap closes the connection."""

    MAX_BODY = 1024 * 1024
    _received = 0

    def gotLength(self, length):
        if length is not None and length > self.MAX_BODY:
            self._too_large()
            return
        super().gotLength(length)

    def handleContentChunk(self, data):
        self._received += len(data)
        if self._received > self.MAX_BODY:
            self._too_large()
            return
        super().handleContentChunk(data)

    def _too_large(self) -> None:
        transport = self.channel.transport if self.channel is not None else None
        if transport is None:  # the client is gone already
            return
        transport.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        transport.loseConnection()


class _Misdirected(Resource):
    """Answers a request for a host name the UI does not serve (see L{UiApp.refuses_host})."""

    isLeaf = True

    def __init__(self, ui: UiApp) -> None:
        super().__init__()
        self._ui = ui

    def render(self, request):
        return self._ui.misdirected(request)


class _AfterSessionLookup(Resource):
    """
    Renders C{resource} once the request's session has been read from the
    shared store (L{UiApp.session_lookup}); a 503 when it cannot be read.
    """

    isLeaf = True

    def __init__(self, ui: UiApp, resource: Resource, reading: defer.Deferred) -> None:
        super().__init__()
        self._ui = ui
        self._resource = resource
        self._reading = reading

    def render(self, request):
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def read(result) -> None:
            if gone:
                return  # the client left meanwhile
            if isinstance(result, Failure):
                if not result.check(DatabaseUnavailable, LookupsBusy):
                    log.failure("operator UI: reading a session failed", result)
                body = self._ui.sessions_unavailable(request)
            else:
                body = self._resource.render(request)
                if body is NOT_DONE_YET:
                    return
            request.write(body)
            request.finish()

        self._reading.addBoth(read)
        return NOT_DONE_YET


class UiSite(GuardedSite, Site):
    """
    The UI's Site: capped bodies, forms parsed by the app, no access log, the
    Host check; with a guard (the daemon sets one), capped connections and
    header, body and keep-alive deadlines, as on the API.
    """

    requestFactory = guarded_request(_CappedUiRequest)

    def __init__(self, ui: UiApp) -> None:
        super().__init__(ui.app.resource(), parsePOSTFormSubmission=False)
        self.ui = ui
        self.noisy = False

    def log(self, request):
        """No access log: operator actions are in the audit stream."""

    def getResourceFor(self, request):
        """
        Every request, before any route, passes the Host check
        (authentication off), and waits for its session to be read when
        the sessions are shared and this instance has not seen it.
        """
        if self.ui.refuses_host(request):
            request.site = self
            request.sitepath = request.prepath[:]
            return _Misdirected(self.ui)
        resource = super().getResourceFor(request)
        reading = self.ui.session_lookup(request)
        if reading is not None:
            return _AfterSessionLookup(self.ui, resource, reading)
        return resource

    def stopFactory(self):
        self.ui.live.stop()
        super().stopFactory()


def build_ui_site(ui: UiApp) -> UiSite:
    return UiSite(ui)
