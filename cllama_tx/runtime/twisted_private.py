"""
Twisted's private names, in one place.

The daemon leans on a few parts of Twisted that are not its public API,
each for a reason measured or needed (the reason is in each accessor's
docstring).  Private names can change in any Twisted release, so they are
named here and nowhere else: the rest of the package calls the small
accessors below, L{missing} lists what the installed Twisted no longer
has, the daemon logs that list at start-up, and
C{tests/runtime/test_twisted_private.py} fails loudly on it.  C{setup.py}
bounds Twisted to the releases this was checked against (L{CHECKED_WITH}).

Every accessor has a fallback for a Twisted without its names: the
public, slower or plainer way where there is one, a refusal at start-up
where there is none (an extra upstream CA).  None of them fails a request.

Twisted's own camelCase names stay as Twisted spells them.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

from twisted.internet import defer, tcp
from twisted.web import client as web_client
from twisted.web import http

CHECKED_WITH = "Twisted 26.10"
"""
The Twisted release every name below was checked against, the one
C{setup.py} allows.  (They are all in 24.7.0 and 26.4.0 too, but the
daemon needs 26.10 for a public reason: C{Site(parsePOSTFormSubmission=)}.)
"""


def _optional(module: str, name: str) -> Any:
    """C{module.name}, or None when this Twisted has no such thing."""
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


IOpenSSLTrustRoot: Any = _optional("twisted.internet._sslverify", "IOpenSSLTrustRoot")


class PrivateName(NamedTuple):
    """One private name: where it lives, what uses it, what happens without it."""

    name: str
    used_for: str
    fallback: str


NAMES: tuple[PrivateName, ...] = (
    PrivateName(
        "twisted.web.client._HTTP11ClientFactory and HTTPConnectionPool._factory",
        "upstream connections open and close without a log line each",
        "the pool keeps Twisted's factory: each upstream connection logs its start and stop",
    ),
    PrivateName(
        "twisted.web.client._ensureValidURI, Agent._getEndpoint, Agent._requestWithEndpoint",
        "the upstream URL is validated and parsed and its endpoint built once per URL, not per request",
        "every request takes Agent.request (about 17 us more per request)",
    ),
    PrivateName(
        "twisted.internet._sslverify.IOpenSSLTrustRoot._addCACertsToContext",
        "CLLAMA_UPSTREAM_CA_FILE: the operator's CAs trusted in addition to the platform store",
        "the daemon refuses to start with CLLAMA_UPSTREAM_CA_FILE set and says why; without it nothing changes",
    ),
    PrivateName(
        "EPollReactor._poller, ._selectables, ._doReadOrWrite (its doIteration replaced on the instance)",
        "a ready socket's handler is called without building Twisted's legacy log context for each event "
        "(CLLAMA_LEAN_DISPATCH, on by default)",
        "Twisted's own poll loop: its log context costs a few microseconds a socket event",
    ),
    PrivateName(
        "HTTPChannel._command, HTTPChannel._path while a request's headers are read",
        "the API decides on a request's headers, before its body, whether to read the body at all",
        "the header gate is skipped: bodies are capped by CLLAMA_MAX_BODY_SIZE only, credentials checked after the body",
    ),
)


# -- the upstream HTTP client: twisted.web.client ------------------------------------------

_HTTP11ClientFactory: Any = _optional("twisted.web.client", "_HTTP11ClientFactory")
_ensureValidURI: Any = _optional("twisted.web.client", "_ensureValidURI")


def _quiet_factory() -> Any:
    if _HTTP11ClientFactory is None:
        return None

    class _QuietClientFactory(_HTTP11ClientFactory):
        """Upstream connections come and go all day; they are not log events."""

        noisy = False

    return _QuietClientFactory


_QuietClientFactory: Any = _quiet_factory()


def quiet_pool(pool: web_client.HTTPConnectionPool) -> bool:
    """
    Make C{pool}'s connections open and close without a log line each
    (Twisted logs every factory start and stop; upstream connections come
    and go all day).  Twisted has no public switch: the pool builds its
    connections with its private C{_factory}, a subclass of the private
    C{_HTTP11ClientFactory}.  Checked against L{CHECKED_WITH}.

    @return: False, and the pool left as it was, when this Twisted has
        neither (the connections then log).
    """
    if _QuietClientFactory is None or getattr(pool, "_factory", None) is not _HTTP11ClientFactory:
        return False
    pool._factory = _QuietClientFactory
    return True


class AgentSteps(NamedTuple):
    """
    C{Agent.request} in its two steps: C{target(url)} does the per-URL work
    (validation, parsing, a new endpoint; raises on a bad URL) and returns a
    target to keep; C{send(target, method, headers, producer)} sends one
    request to it.
    """

    target: Callable[[bytes], Any]
    send: Callable[..., defer.Deferred]


def agent_steps(agent: web_client.Agent) -> AgentSteps | None:
    """
    C{agent}'s request split at its private seams, so the per-URL work of
    C{Agent.request} (17 us a request: validate, parse, build an endpoint
    object) is done once per upstream URL: C{_ensureValidURI} (in
    C{twisted.web.client}), C{Agent._getEndpoint(uri)} and
    C{Agent._requestWithEndpoint(key, endpoint, method, parsedURI, headers,
    bodyProducer, requestPath)}.  Checked against L{CHECKED_WITH}.

    @return: None when this Twisted lacks any of them; the caller then
        uses the public C{agent.request}.
    """
    get_endpoint = getattr(agent, "_getEndpoint", None)
    request_with_endpoint = getattr(agent, "_requestWithEndpoint", None)
    ensure_valid = _ensureValidURI
    if get_endpoint is None or request_with_endpoint is None or ensure_valid is None:
        return None
    from_bytes = web_client.URI.fromBytes

    def target(url: bytes) -> tuple:
        parsed = from_bytes(ensure_valid(url.strip()))
        return (parsed.scheme, parsed.host, parsed.port), get_endpoint(parsed), parsed

    def send(target: tuple, method: bytes, headers, producer) -> defer.Deferred:
        key, endpoint, parsed = target
        return request_with_endpoint(key, endpoint, method, parsed, headers, producer, parsed.originForm)

    return AgentSteps(target, send)


# -- TLS towards the providers: twisted.internet._sslverify ---------------------------------


class TrustRootUnavailable(Exception):
    """This Twisted cannot take a trust root of ours; the message says why."""


def platform_trust_plus(add_extra: Callable[[Any], None]) -> Any:
    """
    A trust root for C{optionsForClientTLS(trustRoot=...)}: the platform's
    CA store, then C{add_extra(context)} (which adds more certificates to
    the OpenSSL context's store).  Twisted has no public way to widen the
    platform store: a trust root provides the private
    C{IOpenSSLTrustRoot} (in C{twisted.internet._sslverify}) whose one
    method, C{_addCACertsToContext(context)}, Twisted calls on each new
    context; the platform's own trust root is asked the same way.
    Checked against L{CHECKED_WITH}.

    @raise TrustRootUnavailable: this Twisted has neither; there is no
        fallback that keeps the platform store, so the caller refuses the
        setting at start-up.
    """
    from twisted.internet import ssl

    platform = ssl.platformTrust()
    add_platform = getattr(platform, "_addCACertsToContext", None)
    if IOpenSSLTrustRoot is None or add_platform is None:
        raise TrustRootUnavailable(
            "this Twisted release has no IOpenSSLTrustRoot._addCACertsToContext "
            f"(checked with {CHECKED_WITH}), so extra CAs cannot be added to the platform store"
        )
    from zope.interface import alsoProvides

    add_platform_cas: Callable[[Any], None] = add_platform  # not None, as checked above

    class _PlatformPlus:
        def _addCACertsToContext(self, context) -> None:
            add_platform_cas(context)
            add_extra(context)

    root = _PlatformPlus()
    alsoProvides(root, IOpenSSLTrustRoot)
    return root


# -- the request line while a request's headers are read: twisted.web.http -----------------


def pending_request_line(channel: Any) -> tuple[bytes, bytes] | None:
    """
    The method and target (path and query) of the request whose headers
    C{channel} is reading, as C{Request.gotLength} sees it: Twisted sets
    C{request.method} and C{request.uri} only once the body is in, and
    keeps the request line until then in the private C{HTTPChannel._command}
    and C{_path}.  Checked against L{CHECKED_WITH}.

    @return: None when the channel has neither (another Twisted, another
        channel class): the caller then decides without the request line.
    """
    command = getattr(channel, "_command", None)
    path = getattr(channel, "_path", None)
    if not isinstance(command, bytes) or not isinstance(path, bytes):
        return None
    return command, path


# -- the reactor's dispatch of ready sockets: twisted.internet.epollreactor ----------------


def lean_dispatch(reactor: Any, log: Any) -> bool:
    """
    Make C{reactor}'s poll loop call each ready socket's handler directly.

    Why: Twisted's epoll loop calls the handler of every ready socket
    through C{twisted.python.log.callWithLogger}, which asks the socket for
    its log prefix and pushes a copied context dictionary on a thread-local
    stack around the call, for every read and every write: about 2 us a
    socket event here, a tenth of what a relayed stream event costs the
    proxy in all.  That context only names the connection on Twisted's
    legacy log lines written inside the handler; the daemon logs through
    C{twisted.logger}, whose events do not read it.

    The replacement polls the same C{_poller} for the same C{_selectables}
    and calls the same C{_doReadOrWrite} (which turns a handler's
    exception or a hang-up into a disconnection, as ever); an exception
    that still escapes is logged on C{log} with the socket's prefix, as
    C{callWithLogger} logged it, and the loop goes on.  Installed on this
    reactor instance only (C{doIteration}, the method C{mainLoop} calls).

    @return: False, and the reactor left as it is, for any other reactor
        or a Twisted without these names.
    """
    from twisted.internet.epollreactor import EPollReactor

    target: Any = reactor  # its methods are replaced on the instance
    poller = getattr(reactor, "_poller", None)
    selectables = getattr(reactor, "_selectables", None)
    handle: Any = getattr(reactor, "_doReadOrWrite", None)
    if not isinstance(reactor, EPollReactor) or poller is None or not isinstance(selectables, dict):
        return False
    if not _has_params(handle, ("selectable", "fd", "event")):
        return False
    if getattr(target, "_cllama_lean_dispatch", False):
        return True

    def do_poll(timeout: float | None) -> None:
        try:
            ready = poller.poll(-1 if timeout is None else timeout, len(selectables))
        except InterruptedError:
            return
        for fd, event in ready:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                try:
                    prefix = selectable.logPrefix()
                except BaseException:
                    prefix = "(buggy logPrefix method)"
                log.failure("handling a socket event ({prefix})", prefix=prefix)

    target.doIteration = do_poll
    target.doPoll = do_poll
    target._cllama_lean_dispatch = True
    return True


# -- what is missing ---------------------------------------------------------------------


#: Connections a shared listener accepts per wake-up (see L{accept_fairly}).
FAIR_ACCEPTS = 4


def accept_fairly(port: Any, most: int = FAIR_ACCEPTS) -> bool:
    """
    Make a listening TCP port accept at most C{most} connections per wake-up.

    Why: workers share one listening socket, and every idle worker is woken
    for a new connection.  Twisted's C{tcp.Port.doRead} accepts as many as
    are waiting (up to C{numberAccepts}, which it raises while the backlog
    stays full): the first worker awake drains a burst of connects alone.
    A client that opens its keep-alive connections together (wrk, a
    connection pool) then talks to one worker only (measured: 32
    connections, one worker 744 us of CPU a request, the other 24).  A few
    accepts per wake-up leave the next waiting connections to whichever
    worker wakes next; more than one keeps a flood of new connections from
    overflowing the backlog while a busy worker's reactor turns are long
    (one per wake-up: 1,000 streams opened in a second waited up to 12 s
    for their first event, SYNs dropped and sent again).
    C{numberAccepts} is capped before every read, since C{doRead} adapts it
    afterwards.  False (and nothing changed) for a port without that
    attribute.
    """
    if not isinstance(getattr(port, "numberAccepts", None), int):
        return False
    read = port.doRead

    def fairly():
        port.numberAccepts = min(port.numberAccepts, most)
        return read()

    port.doRead = fairly
    return True


def _has_params(function: Any, names: tuple[str, ...]) -> bool:
    try:
        params = tuple(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        return False
    return params[: len(names)] == names or params[1 : len(names) + 1] == names


def missing() -> list[str]:
    """
    The private names (see L{NAMES}) this Twisted lacks or has in another
    shape, each said as "where: what"; empty when all are there.
    """
    gone: list[str] = []
    if _HTTP11ClientFactory is None:
        gone.append("twisted.web.client._HTTP11ClientFactory: absent")
    elif not _has_params(_HTTP11ClientFactory.__init__, ("quiescentCallback", "metadata")):
        gone.append("twisted.web.client._HTTP11ClientFactory(quiescentCallback, metadata): other signature")
    if getattr(web_client.HTTPConnectionPool, "_factory", None) is not _HTTP11ClientFactory:
        gone.append("twisted.web.client.HTTPConnectionPool._factory: absent or not _HTTP11ClientFactory")
    if _ensureValidURI is None:
        gone.append("twisted.web.client._ensureValidURI: absent")
    agent = web_client.Agent
    if not _has_params(getattr(agent, "_getEndpoint", None), ("uri",)):
        gone.append("twisted.web.client.Agent._getEndpoint(uri): absent or other signature")
    shape = ("key", "endpoint", "method", "parsedURI", "headers", "bodyProducer", "requestPath")
    if not _has_params(getattr(agent, "_requestWithEndpoint", None), shape):
        gone.append(f"twisted.web.client.Agent._requestWithEndpoint({', '.join(shape)}): absent or other signature")
    if IOpenSSLTrustRoot is None:
        gone.append("twisted.internet._sslverify.IOpenSSLTrustRoot: absent")
    elif "_addCACertsToContext" not in IOpenSSLTrustRoot.names():
        gone.append("twisted.internet._sslverify.IOpenSSLTrustRoot._addCACertsToContext: absent")
    from twisted.internet import ssl

    if not hasattr(ssl.platformTrust(), "_addCACertsToContext"):
        gone.append("twisted.internet.ssl.platformTrust()._addCACertsToContext: absent")
    if "self.numberAccepts" not in inspect.getsource(tcp.Port.doRead):
        gone.append("twisted.internet.tcp.Port.doRead: no longer reads numberAccepts")
    gone.extend(_missing_epoll_names())
    gone.extend(_missing_channel_state())
    return gone


def _missing_epoll_names() -> list[str]:
    """What L{lean_dispatch} reads of the epoll reactor, where this platform has it."""
    try:
        from twisted.internet import epollreactor
    except ImportError:  # no epoll here: nothing is replaced
        return []
    gone = []
    cls = epollreactor.EPollReactor
    if not _has_params(getattr(cls, "_doReadOrWrite", None), ("selectable", "fd", "event")):
        gone.append("twisted.internet.epollreactor.EPollReactor._doReadOrWrite(selectable, fd, event): absent")
    init = inspect.getsource(cls.__init__)
    if "self._poller" not in init or "self._selectables" not in init:
        gone.append("twisted.internet.epollreactor.EPollReactor._poller/_selectables: no longer set")
    if "callWithLogger" not in inspect.getsource(cls.doPoll):
        gone.append("twisted.internet.epollreactor.EPollReactor.doPoll: no longer wraps handlers in callWithLogger")
    return gone


class _ProbeTransport:
    """
    What an HTTPChannel needs of a transport to read a request line (not
    C{twisted.internet.testing.StringTransport}: that module imports
    trial, unittest and doctest, 2 MiB the daemon would keep for nothing).
    """

    disconnecting = False

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data) -> None:
        pass

    def loseConnection(self) -> None:
        pass

    def registerProducer(self, producer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def getPeer(self) -> Any:
        return None

    def getHost(self) -> Any:
        return None


def _missing_channel_state() -> list[str]:
    """Feed a request line and a header to an HTTPChannel: are C{_command} and C{_path} set?"""
    channel = http.HTTPChannel()
    channel.timeOut = None  # no idle timer: nothing on any reactor
    channel.makeConnection(_ProbeTransport())
    try:
        channel.dataReceived(b"POST /probe?x=1 HTTP/1.1\r\nHost: probe\r\n")
        if pending_request_line(channel) != (b"POST", b"/probe?x=1"):
            return ["twisted.web.http.HTTPChannel._command/_path: not set while headers are read"]
        return []
    finally:
        channel.connectionLost(None)


def report(log: Any) -> list[str]:
    """Log (a warning on C{log}, a L{twisted.logger.Logger}) what this Twisted lacks; return it."""
    gone = missing()
    if gone:
        import twisted

        log.warn(
            "Twisted {version} lacks private names this daemon was checked with ({checked}): {gone}; "
            "their fallbacks apply (docs/OPERATIONS.md, 'Twisted's private names')",
            version=twisted.__version__,
            checked=CHECKED_WITH,
            gone="; ".join(gone),
        )
    return gone
