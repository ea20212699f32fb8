"""
The API site (default :8080).

The inference paths (chat completions, messages, token counting, responses;
each with and without C{/v1}) are served by lean L{ProxyResource}s looked up by exact
path before any routing library runs: they are the hot path.  Every other
route lives in a Klein app, where clarity matters more than microseconds;
its answers that no route writes a line for (C{/v1/models}, 404, 405) are
audited here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, cast

from klein import Klein
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from werkzeug.exceptions import MethodNotAllowed, NotFound

from cllama_tx.accounting.history import clamp_limit
from cllama_tx.identity.authenticate import identify
from cllama_tx.identity.history_access import history_allowed, presented_token
from cllama_tx.identity.operator import OperatorGuard, request_source
from cllama_tx.identity.tokens import MalformedCredentials, parse_credentials
from cllama_tx.pipeline.passthrough import Passthrough
from cllama_tx.pipeline.proxy import Proxy, Surface, new_request_id
from cllama_tx.sites.guard import ConnectionGuard, GuardedRequest, GuardedSite
from cllama_tx.sites.header_gate import HeaderGate, Refusal, refusal, shape_for_path
from cllama_tx.sites.lean_http import LeanChannel, answer_refusal
from cllama_tx.sites.management import build_management
from cllama_tx.sites.passthrough import PREFIX as PASSTHROUGH_PREFIX
from cllama_tx.sites.passthrough import PassthroughGate, PassthroughResource
from cllama_tx.surfaces import matrix
from cllama_tx.surfaces.errors import ANTHROPIC, OPENAI, ProxyError, error_body
from cllama_tx.surfaces.errors import RESPONSES as RESPONSES_SHAPE

CHAT = Surface(matrix.OPENAI_CHAT, "/v1/chat/completions", "openai", OPENAI)
MANAGEMENT_METHODS = ["GET", "HEAD", "POST", "PATCH", "DELETE", "PUT"]
log = Logger()

MESSAGES = Surface(matrix.ANTHROPIC_MESSAGES, "/v1/messages", "anthropic", ANTHROPIC)
COUNT_TOKENS = Surface(
    matrix.ANTHROPIC_MESSAGES, "/v1/messages/count_tokens", "anthropic", ANTHROPIC, billable=False
)
RESPONSES = Surface(matrix.OPENAI_RESPONSES, "/v1/responses", "responses", RESPONSES_SHAPE)


def _shape_for_path(path: bytes) -> str:
    return ANTHROPIC if path.startswith((b"/v1/messages", b"/messages")) else OPENAI


def _json(request, status: int, doc) -> bytes:
    body = json.dumps(doc).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return body


class ProxyResource(Resource):
    """One inference surface: POST only, handed to the L{Proxy}."""

    isLeaf = True

    def __init__(self, proxy: Proxy, surface: Surface) -> None:
        super().__init__()
        self._proxy = proxy
        self._surface = surface

    def render(self, request):
        if request.method != b"POST":
            request.setHeader(b"allow", b"POST")
            error = ProxyError(405, "method_not_allowed", f"use POST for {self._surface.path}")
            body = error_body(error, self._surface.shape)
            request.setResponseCode(405)
            request.setHeader(b"content-type", b"application/json")
            return body
        self._proxy.handle(request, self._surface)
        return NOT_DONE_YET


class CappedRequest(GuardedRequest):
    """
    A request whose headers decide whether its body is read at all, and
    whose body may not exceed its cap.

    twisted.web reads the whole body before a resource runs, with no limit
    of its own, so both are decided here, when the headers are in
    (C{gotLength}): the L{HeaderGate} authenticates an inference request
    (and hands its principal to the proxy) or refuses it; a body larger
    than the cap is refused from C{Content-Length} before reading, or while
    reading a chunked one.  A refusal is answered at once in the surface's
    shape and no more of the body is read or kept (L{refuse_request}).
    """

    _refused = False
    _received = 0
    _limit = 0
    _target = b""
    # While the gate reads the caller's key from the shared store: the
    # arguments of a requestReceived that came meanwhile.
    _deciding = False
    _held: tuple[bytes, bytes, bytes] | None = None
    # A passthrough upload's sink (sites/passthrough.py): the body's chunks
    # go there, upstream, instead of into request.content.
    body_sink: Any = None
    request_target = b""

    @property
    def _site(self) -> ApiSite:
        """The site whose channel read this request (Site.buildProtocol sets
        C{channel.site}; HTTPChannel does not declare it)."""
        channel: Any = self.channel
        return channel.site

    def gotLength(self, length):
        channel = self.channel
        site = self._site
        # Twisted sets method and path once the body is in; until then the
        # site's accessor reads them off the channel (None: it cannot, and
        # the body is then only capped, its credentials checked after it).
        line = site.request_line(channel)
        gate = site.gate if line is not None else None
        method, target = line if line is not None else (b"", b"")
        path = self._target = target.split(b"?", 1)[0]
        self.request_target = target  # the passthrough's gate reads its query too
        self._limit = site.max_body_bytes
        if gate is not None:
            self._limit = gate.body_limit(method, path, self)
            refused = gate.check(self, method, path, length)
            if isinstance(refused, defer.Deferred):
                self._decide_later(refused, path, length)
                return
            if refused is not None:
                self._answer(refused, path)
                return
        if length is not None and length > self._limit:
            self._refuse_oversized(path)
            return
        super().gotLength(length)

    def _decide_later(self, deciding: defer.Deferred, path: bytes, length: int | None) -> None:
        """
        The gate reads the caller's key from the shared store (a
        millisecond): nothing more is read from the connection until it
        answers (what already came is kept, within the cap), then the
        request goes on, or is refused, as if it had been decided at once.
        """
        # TCP, TLS and UNIX transports (and the guard's wrapper) are push producers.
        transport = cast(IPushProducer, self.channel.transport)
        transport.pauseProducing()
        self._deciding = True
        super().gotLength(length)

        def decided(refused: Refusal | None) -> None:
            self._deciding = False
            if self.channel is None:
                return  # the client left meanwhile
            transport.resumeProducing()
            if refused is not None:
                self._answer(refused, path)
            elif length is not None and length > self._limit:
                self._refuse_oversized(path)
            elif self._held is not None:
                held, self._held = self._held, None
                super(CappedRequest, self).requestReceived(*held)

        deciding.addCallback(decided).addErrback(lambda f: log.failure("deciding on a request's headers", f))

    def handleContentChunk(self, data):
        if self._refused:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._refuse_oversized(self._target)
            return
        sink = self.body_sink
        if sink is not None:
            sink.write(data)  # a passthrough upload: upstream as it comes, never spooled
            return
        super().handleContentChunk(data)

    def requestReceived(self, command, path, version):
        if self._refused:
            return  # answered on its headers; the channel only finished parsing
        if self._deciding:
            self._held = (command, path, version)  # served once the gate has decided
            return
        super().requestReceived(command, path, version)

    def _refuse_oversized(self, path: bytes) -> None:
        if self.body_sink is not None:
            # A passthrough upload already on its way: its pipeline stops it and settles.
            self._answer(self.body_sink.oversized(self._limit), path)
            return
        error = ProxyError(
            413, "request_too_large", f"the request body is larger than {self._limit} bytes"
        )
        gate = self._site.gate
        shape = gate.shape(path) if gate is not None else shape_for_path(path)
        self._answer(refusal(error, shape), path)

    def _answer(self, refused: Refusal, path: bytes) -> None:
        """Answer with C{refused}, audited, and read no more of this request."""
        self._refused = True
        answer_refusal(self._site, self, refused, path)


class ApiSite(GuardedSite, Site):
    """
    The API's Site: exact-path dispatch to the inference resources, the
    Klein app for the rest, requests checked on their headers (L{HeaderGate}),
    capped bodies, and (with a guard) capped connections with deadlines.

    @param request_line: C{(channel) -> (method, target) | None}, the request
        line of the request whose headers a channel is reading; Twisted keeps
        it private until the body is in, so the runtime hands in its accessor
        (L{cllama_tx.runtime.twisted_private.pending_request_line}).
    @param lean: connections start on the lean channel
        (L{cllama_tx.sites.lean_http}), which serves the inference paths and
        hands any other path to twisted.web; False: twisted.web serves all.
    @param direct: the lean channel sends with the socket's C{send()}
        where it can (C{CLLAMA_WRITE_THROUGH}).
    """

    requestFactory = CappedRequest

    def __init__(
        self,
        klein_resource,
        hot: Mapping[bytes, Resource],
        max_body_bytes: int,
        audit=None,
        gate: HeaderGate | None = None,
        guard: ConnectionGuard | None = None,
        *,
        request_line: Callable[[Any], tuple[bytes, bytes] | None],
        lean: bool = True,
        direct: bool = True,
    ):
        # No form parsing: twisted.web would otherwise build an email.Message
        # per POST to look at its Content-Type (a tenth of the per-request CPU).
        super().__init__(klein_resource, parsePOSTFormSubmission=False)
        self._hot = self.hot = hot
        self.lean = lean
        self.direct = direct
        self.max_body_bytes = max_body_bytes
        self.audit = audit
        self.gate = gate
        self.request_line = request_line
        self.noisy = False
        if guard is not None:
            self.set_guard(guard)

    def log(self, request):
        """No access log: the audit stream records every request already."""

    def build_channel(self, addr):
        if not self.lean:
            return super().build_channel(addr)
        return LeanChannel(self, lambda: Site.buildProtocol(self, addr), self.direct)

    #: The passthrough's resource (C{/_proxy/<provider>/<path>}), when it is on.
    passthrough: Resource | None = None

    #: The OR gate's console on this port (C{CLLAMA_CONSOLE_ON_API_PORT}): C{(claims, resource)}.
    console: tuple[Callable[[bytes, bytes], bool], Resource] | None = None

    def getResourceFor(self, request):
        request.site = self
        request.sitepath = request.prepath[:]
        hot = self._hot.get(request.path)
        if hot is not None:
            return hot
        if self.passthrough is not None and request.path.startswith(PASSTHROUGH_PREFIX):
            return self.passthrough
        console = self.console
        if console is not None and console[0](request.method, request.path):
            return console[1]
        return super().getResourceFor(request)

    def serve_console(self, claims: Callable[[bytes, bytes], bool], resource: Resource,
                      posts: Callable[[bytes], bool]) -> None:
        """Answer the OR gate's console paths on this port without credentials (a loopback-only port)."""
        self.console = (claims, resource)
        if self.gate is not None:
            self.gate.open_paths = posts


class ApiApp:
    """Everything on the API port except the inference paths."""

    app = Klein()

    def __init__(
        self,
        matrix_doc: dict | None = None,
        contexts=None,
        history=None,
        ui_token: str | None = None,
        providers=None,
        pricing=None,
        keys_api=None,
        billing=None,
        guard: OperatorGuard | None = None,
        management=None,
    ) -> None:
        # The daemon's one guard for operator credentials (shared with the
        # UI and the key API): wrong UI tokens here slow guesses there too.
        self._guard = guard if guard is not None else getattr(keys_api, "guard", None) or OperatorGuard()
        self._keys_api = keys_api
        if management is None and keys_api is not None:
            management = build_management(keys_api, billing)
        self._management = management
        self._matrix_doc = matrix_doc or matrix.describe()
        self._contexts = contexts
        self._history = history
        self._ui_token = ui_token.encode("utf-8") if ui_token else None
        self._providers = providers
        self._pricing = pricing
        self._proxy: Proxy | None = None
        self._audit = None

    def bind(self, proxy: Proxy, audit=None) -> None:
        """The proxy (who is calling, what it may use) and the audit stream."""
        self._proxy = proxy
        self._audit = audit

    def _audited(self, request, status: int, who: str | None, error: str | None = None) -> None:
        """One audit line for a request served here (the inference paths write their own)."""
        if self._audit is None:
            return
        clock = self._proxy.clock if self._proxy is not None else None
        started = getattr(request, "_cllama_started", None)
        latency = round((clock.seconds() - started) * 1000, 3) if clock is not None and started is not None else 0
        fields = {
            "request_id": new_request_id(), "status_code": status, "latency_ms": latency,
            "path": request.path.decode("latin-1")[:500], "method": request.method.decode("latin-1")[:16],
        }
        if error is None:
            self._audit.emit("response", who, None, **fields)
        else:
            self._audit.emit("error", who, None, error=error, **fields)

    def _who(self, request) -> str | None:
        """The caller's name when its credentials are good (agents and keys), else None."""
        store = getattr(self._keys_api, "store", None)
        try:
            return identify(request.requestHeaders, self._contexts, store).agent_id
        except ProxyError:
            return None

    def _agent(self, request):
        """The calling agent's context, or the ProxyError to answer with."""
        try:
            agent_id, secret = parse_credentials(
                request.getHeader(b"authorization"), request.getHeader(b"x-api-key")
            )
        except MalformedCredentials as e:
            return ProxyError(401, "missing_credentials", str(e))
        context = None if self._contexts is None else self._contexts.authenticate(agent_id, secret)
        if context is None:
            return ProxyError(403, "invalid_credentials", "unknown agent or wrong secret")
        return context

    @app.route("/v1/models", methods=["GET"])
    @app.route("/models", methods=["GET"])
    async def models(self, request):
        """
        The models the caller may use, under the names it may use them by
        (L{cllama_tx.governance.resolution.visible_models}): an agent's
        model policy refs; a virtual key's aliases and model list; else
        the model table's names and every priced model of every configured
        provider.  Agents, virtual keys and the master key may ask.
        Anthropic's list shape when the request carries
        C{anthropic-version}, else OpenAI's.  Audited.
        """
        anthropic = request.getHeader(b"anthropic-version") is not None
        shape = ANTHROPIC if anthropic else OPENAI
        clock = self._proxy.clock if self._proxy is not None else None
        request._cllama_started = clock.seconds() if clock is not None else None
        if self._proxy is None:
            context = self._agent(request)
            if isinstance(context, ProxyError):
                self._audited(request, context.status, None, context.message)
                return _error(request, context, shape)
            refs = model_refs(context, self._providers, self._pricing)
        else:
            try:
                context = self._proxy.authenticate(request.requestHeaders, request)
                if isinstance(context, defer.Deferred):
                    context = await context  # a virtual key read from the shared store
            except ProxyError as error:
                self._audited(request, error.status, None, error.message)
                if error.retry_after is not None:
                    request.setHeader(b"retry-after", b"%d" % error.retry_after)
                return _error(request, error, shape)
            refs = self._proxy.models_for(context)
        self._audited(request, 200, context.agent_id)
        request.setHeader(b"content-type", b"application/json")
        if anthropic:
            data = [
                {"type": "model", "id": ref, "display_name": ref, "created_at": "1970-01-01T00:00:00Z"}
                for ref in refs
            ]
            doc = {
                "data": data,
                "has_more": False,
                "first_id": refs[0] if refs else None,
                "last_id": refs[-1] if refs else None,
            }
        else:
            owner = lambda ref: ref.partition("/")[0] if "/" in ref else "cllama_tx"  # noqa: E731
            doc = {
                "object": "list",
                "data": [{"id": ref, "object": "model", "created": 0, "owned_by": owner(ref)} for ref in refs],
            }
        return json.dumps(doc).encode("utf-8")

    # -- LiteLLM's management API (keys, teams, users, organisations,
    # customers, models, spend, health): sites/management.py answers.

    @app.route("/key/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/team/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/user/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/organization/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/customer/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/end_user/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/model/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/model_group/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/v1/model/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/v2/model/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/v2/user/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/v2/team/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/global/spend", methods=MANAGEMENT_METHODS)
    @app.route("/global/spend/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/spend/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/api/spend/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/health/<path:rest>", methods=MANAGEMENT_METHODS)
    async def management(self, request, rest=None):
        if self._management is None:
            return _error(request, ProxyError(404, "not_found", "the key API is not enabled"))
        return await self._management.dispatch(request)

    @app.route("/history", methods=["GET"])
    async def own_history(self, request):
        """The calling agent's own session history, NDJSON."""
        context = self._agent(request)
        if isinstance(context, ProxyError):
            return _error(request, context)
        return await self._history_lines(request, context.agent_id)

    @app.route("/history/<agent>", methods=["GET"])
    async def agent_history(self, request, agent):
        """
        An agent's session history, for the operator (the UI token), the
        agent itself (its own credentials) or a replay service (a
        C{cllama-history} token of its context's C{service-auth/}), as
        the reference allows.  No token is a 401, a token that may not
        read this history a 403 (the same for an agent that does not
        exist).  Tokens are compared only when the caller's address need
        not wait (see L{OperatorGuard}); a wrong one is counted.
        """
        token = presented_token(request.getHeader(b"authorization"), request.getHeader(b"x-api-key"))
        if token is None:
            return _error(request, ProxyError(
                401, "missing_credentials",
                "send Authorization: Bearer <token>: the operator token, the agent's own credentials "
                "or a cllama-history replay token",
            ))
        source = request_source(request)
        wait = self._guard.refusal(source, "history")
        if wait is not None:
            request.setHeader(b"retry-after", str(wait).encode("ascii"))
            message = f"too many wrong tokens from this address: the next one is compared in {wait} s"
            return _error(request, ProxyError(429, "too_many_attempts", message, retry_after=wait))
        if not history_allowed(token, agent, self._contexts, self._ui_token):
            self._guard.failed(source, "history")
            return _error(request, ProxyError(403, "invalid_credentials", "this token may not read this history"))
        return await self._history_lines(request, agent)

    async def _history_lines(self, request, agent: str):
        if self._history is None:
            return _error(request, ProxyError(404, "history_disabled", "session history is off: set CLAW_SESSION_HISTORY_DIR"))
        args = request.args
        try:
            limit = clamp_limit(_arg(args, b"limit"))
            lines = self._history.read(agent, _arg(args, b"after"), limit)
        except ValueError as e:
            return _error(request, ProxyError(400, "invalid_parameter", str(e)))
        lines = await lines
        request.setHeader(b"content-type", b"application/x-ndjson")
        return b"".join(lines)

    @app.route("/health", methods=["GET", "HEAD"])
    async def health(self, request):
        """C{{"ok": true}} (the probes read that); with the master key, LiteLLM's model health too."""
        keys = getattr(self._management, "keys", None)
        if keys is not None:
            return await keys.health.health(request)
        return _json(request, 200, {"ok": True})

    # Claude Code warms its connection with HEAD <ANTHROPIC_BASE_URL>/api/hello
    # on every start: answered like /health, not as a 404 in the audit.
    @app.route("/api/hello", methods=["GET", "HEAD"])
    def hello(self, request):
        return _json(request, 200, {"ok": True})

    @app.route("/v1/surfaces", methods=["GET"])
    def surfaces(self, request):
        return _json(request, 200, self._matrix_doc)

    @app.handle_errors(NotFound)
    def not_found(self, request, failure):
        error = ProxyError(404, "not_found", f"no such endpoint: {request.path.decode('latin-1')[:200]}")
        # Audited: a runner calling a path that is not here shows up.
        self._audited(request, 404, self._who(request), error.message)
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return error_body(error, _shape_for_path(request.path))

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request, failure):
        allowed = failure.value.valid_methods or []
        if allowed:
            request.setHeader(b"allow", ", ".join(sorted(allowed)).encode())
        error = ProxyError(405, "method_not_allowed", f"method {request.method.decode()} is not allowed here")
        self._audited(request, 405, self._who(request), error.message)
        request.setResponseCode(405)
        request.setHeader(b"content-type", b"application/json")
        return error_body(error, _shape_for_path(request.path))

    @app.handle_errors(Exception)
    def unexpected(self, request, failure):
        log.failure("unexpected error on {path}", failure, path=request.path)
        if request.startedWriting:
            request.transport.abortConnection()
            return b""
        error = ProxyError(500, "internal_error", "internal error")
        request.setResponseCode(500)
        request.setHeader(b"content-type", b"application/json")
        return error_body(error, _shape_for_path(request.path))


def _arg(args, name: bytes) -> str | None:
    values = args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


def _error(request, error: ProxyError, shape: str = OPENAI) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    return error_body(error, shape)


def model_refs(context, providers, pricing) -> list[str]:
    """The model refs an agent may use, sorted as declared or by name."""
    policy = context.model_policy or {}
    allowed = [entry.get("ref") for entry in policy.get("allowed") or () if isinstance(entry, dict)]
    refs = [ref for ref in allowed if isinstance(ref, str)]
    if refs:
        return list(dict.fromkeys(refs))
    if providers is None or pricing is None:
        return []
    table = pricing.table
    return [f"{name}/{model}" for name in providers.names() for model in sorted(table.get(name, {}))]


def build_api_site(
    proxy: Proxy,
    max_body_bytes: int,
    audit=None,
    app: ApiApp | None = None,
    guard: ConnectionGuard | None = None,
    *,
    request_line: Callable[[Any], tuple[bytes, bytes] | None],
    lean: bool = True,
    direct: bool = True,
    passthrough: Passthrough | None = None,
) -> ApiSite:
    surfaces = {surface.path.encode(): surface for surface in (CHAT, MESSAGES, COUNT_TOKENS, RESPONSES)}
    # The same surfaces without /v1, as LiteLLM serves them: SDKs given a
    # LiteLLM-style base URL (no /v1) call these.
    surfaces.update({path[len(b"/v1"):]: surface for path, surface in list(surfaces.items())})
    hot = {path: ProxyResource(proxy, surface) for path, surface in surfaces.items()}
    gate = HeaderGate(proxy, surfaces, max_body_bytes)
    app = app or ApiApp()
    app.bind(proxy, audit)
    site = ApiSite(
        app.app.resource(), hot, max_body_bytes, audit, gate=gate, guard=guard, request_line=request_line,
        lean=lean, direct=direct,
    )
    if passthrough is not None:
        # /_proxy/<provider>/<path>: decided on its headers, its uploads streamed.
        gate.passthrough = PassthroughGate(passthrough)
        site.passthrough = PassthroughResource(passthrough)
    return site
