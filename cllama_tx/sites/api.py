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

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, cast

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from cllama_tx.pipeline.passthrough import Passthrough
from cllama_tx.pipeline.proxy import Proxy, Surface
from cllama_tx.sites.api_health import HealthResource
from cllama_tx.sites.guard import ConnectionGuard, GuardedRequest, GuardedSite
from cllama_tx.sites.header_gate import HeaderGate, Refusal, refusal, shape_for_path
from cllama_tx.sites.lazy import LazyResource
from cllama_tx.sites.lean_http import LeanChannel, answer_refusal
from cllama_tx.sites.passthrough import PREFIX as PASSTHROUGH_PREFIX
from cllama_tx.sites.passthrough import PassthroughGate, PassthroughResource
from cllama_tx.surfaces import matrix
from cllama_tx.surfaces.errors import ANTHROPIC, OPENAI, ProxyError, error_body
from cllama_tx.surfaces.errors import RESPONSES as RESPONSES_SHAPE

if TYPE_CHECKING:
    from cllama_tx.sites.api_app import ApiApp

CHAT = Surface(matrix.OPENAI_CHAT, "/v1/chat/completions", "openai", OPENAI)
log = Logger()

MESSAGES = Surface(matrix.ANTHROPIC_MESSAGES, "/v1/messages", "anthropic", ANTHROPIC)
COUNT_TOKENS = Surface(
    matrix.ANTHROPIC_MESSAGES, "/v1/messages/count_tokens", "anthropic", ANTHROPIC, billable=False
)
RESPONSES = Surface(matrix.OPENAI_RESPONSES, "/v1/responses", "responses", RESPONSES_SHAPE)


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
    make_app: Callable[[], ApiApp] | None = None,
    health_keys: Any = None,
) -> ApiSite:
    """
    The API site.  Its Klein app (every path but the inference ones) is
    C{app}, built now; or, with C{make_app}, made on the first request to
    one of its paths, C{GET /health} being answered meanwhile and after
    without it (L{HealthResource}, from C{health_keys}: the key API).
    """
    surfaces = {surface.path.encode(): surface for surface in (CHAT, MESSAGES, COUNT_TOKENS, RESPONSES)}
    # The same surfaces without /v1, as LiteLLM serves them: SDKs given a
    # LiteLLM-style base URL (no /v1) call these.
    surfaces.update({path[len(b"/v1"):]: surface for path, surface in list(surfaces.items())})
    hot = {path: ProxyResource(proxy, surface) for path, surface in surfaces.items()}
    gate = HeaderGate(proxy, surfaces, max_body_bytes)
    root: Resource
    if make_app is None:
        from cllama_tx.sites.api_app import ApiApp

        app = app or ApiApp()
        app.bind(proxy, audit)
        root = app.app.resource()
    else:
        build = make_app

        def klein_resource() -> Resource:
            made = build()
            made.bind(proxy, audit)
            return made.app.resource()

        lazy = LazyResource(klein_resource, "the API's Klein app")
        lazy.exact[b"/health"] = HealthResource(health_keys, lazy.resource)
        root = lazy
    site = ApiSite(
        root, hot, max_body_bytes, audit, gate=gate, guard=guard, request_line=request_line,
        lean=lean, direct=direct,
    )
    if passthrough is not None:
        # /_proxy/<provider>/<path>: decided on its headers, its uploads streamed.
        gate.passthrough = PassthroughGate(passthrough)
        site.passthrough = PassthroughResource(passthrough)
    return site


def __getattr__(name: str) -> Any:
    """The Klein app's names, imported when first asked for (L{cllama_tx.sites.api_app})."""
    if name in ("ApiApp", "model_refs"):
        from cllama_tx.sites import api_app

        return getattr(api_app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
