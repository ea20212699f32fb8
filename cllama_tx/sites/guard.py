"""
Connections cannot exhaust the daemon: a cap per listener, and deadlines a
client trickling one byte a second cannot reset.

Twisted's HTTP channel has one idle timer, reset by every byte received, and
no limit on connections.  A thousand clients sending a byte a second each
held a descriptor as long as they liked, and once the process ran out of
descriptors Twisted accepted and closed every new connection, the agents'
included.

Every connection of a guarded site is wrapped in a L{GuardedConnection} (a
L{ProtocolWrapper}, so the HTTP channel is Twisted's own) and is in one
state at a time, with a deadline counted from when it entered that state:

    head    waiting for a request's headers          header_timeout
    body    reading a body                           body_timeout
    busy    the request is being served              none (upstream timeouts apply)
    idle    keep-alive, between requests             keepalive_timeout
    drain   refused on its headers: the answer is    linger
            sent, the rest of the body dropped

Each state's table is ordered by entry time and all its entries share one
timeout, so a sweep (a timer per listener, not per connection) cuts the
expired ones from the front and stops at the first that is not.  Per
request that is four dictionary moves.

At the cap a new connection is admitted by evicting one that has proven
nothing: first one being drained, then the oldest still waiting for its
headers or sending a body without credentials, then the longest idle
keep-alive connection.  Connections being served or uploading an
authenticated body are never evicted; when every connection is such, the
new one is closed at once.  So slow and unauthenticated clients only crowd
each other out: an agent's new connection sends its headers within
milliseconds, is authenticated on them, and is then out of their reach.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from typing import cast

import attrs
from twisted.internet.interfaces import IProtocol, ISSLTransport, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES
from twisted.web.server import Request, Site
from zope.interface import directlyProvides, providedBy

LISTEN_BACKLOG = 1024
"""
Connections the kernel queues before the reactor accepts them.  Twisted's
default of 50 overflows when a fleet of agents connects at once, and a
client that sends its request right after the handshake (as most do) can
then see its connection reset; Go servers use the system maximum.  The
kernel caps it at C{net.core.somaxconn}.
"""

log = Logger()

HEAD = "head"
BODY = "body"  # a body sent without (or before) credentials
BODY_AUTHENTICATED = "body_authenticated"
BUSY = "busy"
IDLE = "idle"
DRAIN = "drain"
CLOSING = "closing"  # cut by the guard; its descriptor is freed on the next turn
GONE = "gone"

# Why the guard closed a connection (the metrics' reason label).
TIMEOUT_REASONS = {
    HEAD: "header_timeout",
    BODY: "body_timeout",
    BODY_AUTHENTICATED: "body_timeout",
    IDLE: "idle_timeout",
    DRAIN: "linger_timeout",
}
EVICTED = "evicted"
REFUSED = "refused"
REASONS = (EVICTED, REFUSED, "header_timeout", "body_timeout", "idle_timeout", "linger_timeout")

DEFAULT_MAX_CONNECTIONS = 4096
DEFAULT_UI_MAX_CONNECTIONS = 256
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 60.0
# Above the 90 s most client pools (Go, urllib3 via OS defaults, Node) keep an
# idle connection: the client closes first, so it never sends a request into
# a connection the proxy is closing.
DEFAULT_KEEPALIVE_TIMEOUT = 120.0
# How long a refused request's sender may keep sending the body we drop:
# long enough for its client to read the answer instead of a reset.
LINGER = 5.0
# The first request's head is held (the channel not yet built) up to this
# size; past it the channel gets it, and refuses it (its own limit is
# 16 KiB of headers).
MAX_HEAD = 20 * 1024
# The log says what the guard did at most this often; idle keep-alive
# connections ending and drained ones cut are routine, counted in the
# metrics only.
REPORT_EVERY = 60.0
REPORTED = (EVICTED, REFUSED, "header_timeout", "body_timeout")


@attrs.frozen
class GuardLimits:
    """One listener's cap and deadlines (seconds)."""

    max_connections: int = DEFAULT_MAX_CONNECTIONS
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    body_timeout: float = DEFAULT_BODY_TIMEOUT
    keepalive_timeout: float = DEFAULT_KEEPALIVE_TIMEOUT
    linger: float = LINGER


class ConnectionGuard:
    """
    One listener's connections: admission at the cap, the deadlines of each
    state.  It is the wrappers' factory as far as L{ProtocolWrapper} knows
    (C{registerProtocol}, C{unregisterProtocol}).
    """

    def __init__(self, clock, limits: GuardLimits, label: str = "API") -> None:
        self._clock = clock
        self.limits = limits
        self.label = label
        # Connections that count against the cap, and those cut but not yet gone.
        self.live = 0
        self.closing = 0
        self.closed: Counter = Counter()
        self._tables: dict[str, OrderedDict] = {
            state: OrderedDict() for state in (DRAIN, HEAD, BODY, BODY_AUTHENTICATED, IDLE)
        }
        self._timeouts = {
            HEAD: limits.header_timeout,
            BODY: limits.body_timeout,
            BODY_AUTHENTICATED: limits.body_timeout,
            IDLE: limits.keepalive_timeout,
            DRAIN: limits.linger,
        }
        # A deadline is kept to within a quarter of the shortest one (at most 1 s).
        self._tick = min(1.0, min(self._timeouts.values()) / 4)
        self._sweeper = None
        self._reported: Counter = Counter()
        self._last_report: float | None = None

    # -- admission -------------------------------------------------------------------------

    def admit(self) -> bool:
        """Room for one more connection, evicting one if need be; False: refuse it."""
        if self.live < self.limits.max_connections:
            return True
        victim = self._victim()
        if victim is None:
            self.closed[REFUSED] += 1
            return False
        self._cut(victim, EVICTED)
        return True

    def _victim(self):
        """The connection whose eviction costs least, or None when none may go."""
        drain = self._tables[DRAIN]
        if drain:
            return next(iter(drain))
        best, best_since = None, 0.0
        for state in (HEAD, BODY):
            table = self._tables[state]
            if table:
                conn, since = next(iter(table.items()))
                if best is None or since < best_since:
                    best, best_since = conn, since
        if best is not None:
            return best
        idle = self._tables[IDLE]
        return next(iter(idle)) if idle else None

    # -- the wrappers' factory ------------------------------------------------------------

    def registerProtocol(self, conn: GuardedConnection) -> None:
        self.live += 1
        conn.state = HEAD
        self._tables[HEAD][conn] = self._clock.seconds()
        if self._sweeper is None:
            self._sweeper = self._clock.callLater(self._tick, self._sweep)

    def unregisterProtocol(self, conn: GuardedConnection) -> None:
        state = conn.state
        if state == CLOSING:
            self.closing -= 1
        elif state != GONE:
            self.live -= 1
            table = self._tables.get(state)
            if table is not None:
                table.pop(conn, None)
        conn.state = GONE
        if not self.live and not self.closing and self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    # -- states --------------------------------------------------------------------------------

    def move(self, conn: GuardedConnection, state: str) -> None:
        """C{conn} enters C{state}; its deadline (if the state has one) starts now."""
        old = conn.state
        if old == state or old in (DRAIN, CLOSING, GONE):
            return  # a refused or cut connection stays so
        table = self._tables.get(old)
        if table is not None:
            table.pop(conn, None)
        conn.state = state
        table = self._tables.get(state)
        if table is not None:
            table[conn] = self._clock.seconds()

    def count(self, state: str) -> int:
        """How many connections are in C{state} (for tests and tooling)."""
        table = self._tables.get(state)
        return len(table) if table is not None else 0

    def _cut(self, conn: GuardedConnection, reason: str) -> None:
        table = self._tables.get(conn.state)
        if table is not None:
            table.pop(conn, None)
        gentle = conn.state == IDLE and reason != EVICTED
        conn.state = CLOSING
        self.live -= 1
        self.closing += 1
        self.closed[reason] += 1
        if gentle:
            conn.outer.loseConnection()  # nothing is in flight on an idle connection
        else:
            conn.outer.abortConnection()

    def _sweep(self) -> None:
        self._sweeper = None
        now = self._clock.seconds()
        for state, table in self._tables.items():
            limit = now - self._timeouts[state]
            while table:
                conn, since = next(iter(table.items()))
                if since > limit:
                    break
                self._cut(conn, TIMEOUT_REASONS[state])
        self._report(now)
        if self.live or self.closing:
            self._sweeper = self._clock.callLater(self._tick, self._sweep)

    def _report(self, now: float) -> None:
        """Say in the log what the guard did since it last said so (at most once a minute)."""
        if self._last_report is not None and now - self._last_report < REPORT_EVERY:
            return
        news = Counter({reason: self.closed[reason] - self._reported[reason] for reason in REPORTED})
        news = +news  # only what grew
        if not news:
            return
        self._reported = Counter({reason: self.closed[reason] for reason in REPORTED})
        self._last_report = now
        log.warn(
            "{label} listener: closed {what}; {live} connections open (cap {cap})",
            label=self.label,
            what=", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in sorted(news.items())),
            live=self.live,
            cap=self.limits.max_connections,
        )


class GuardedConnection(ProtocolWrapper):
    """
    One connection as the guard sees it: Twisted's HTTP channel inside, the
    transport outside.

    The channel is built only once the first request's headers are complete
    (held here until then, at most L{MAX_HEAD} bytes): a connection that
    never sends them, a slowloris's, costs an accept, a few bytes and a
    close, not a channel and a request object.  That halves what a flood
    of such connections costs the event loop, which is what the agents'
    latency pays during one.

    A refused request's connection is drained: what the client still sends
    is dropped, what the channel still writes too.
    """

    state = HEAD
    # None until the first request's head is complete: ProtocolWrapper
    # declares a channel from the start, this wrapper builds it late.
    wrappedProtocol: IProtocol | None = None  # type: ignore[assignment]
    _head = b""

    def __init__(self, factory: ConnectionGuard, build) -> None:
        self.factory = factory
        self._build = build  # makes the HTTP channel

    def logPrefix(self):
        return self.__class__.__name__

    @property
    def outer(self) -> ITCPTransport:
        """The connection's own transport (TCP, TLS or UNIX: each can abort),
        set before any event reaches this wrapper."""
        return cast(ITCPTransport, self.transport)

    def makeConnection(self, transport) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)

    def dataReceived(self, data: bytes) -> None:
        state = self.state
        if state is DRAIN:
            return
        channel = self.wrappedProtocol
        if channel is None:
            self._hold(data)
            return
        if state is IDLE:
            self.factory.move(self, HEAD)  # the first byte of the next request
        channel.dataReceived(data)

    def _hold(self, data: bytes) -> None:
        """Keep the first request's head until it is complete, then start the channel with it."""
        held = self._head
        self._head = held + data
        if self._head.find(b"\r\n\r\n", max(0, len(held) - 3)) < 0 and len(self._head) <= MAX_HEAD:
            return
        head, self._head = self._head, b""
        channel, self._build = self._build(), None
        self.wrappedProtocol = channel
        channel.makeConnection(self)
        channel.dataReceived(head)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.unregisterProtocol(self)
        channel, self.wrappedProtocol, self._build = self.wrappedProtocol, None, None
        if channel is not None:
            channel.connectionLost(reason)

    def write(self, data: bytes) -> None:
        if self.state is not DRAIN:
            self.outer.write(data)

    def writeSequence(self, data) -> None:
        if self.state is not DRAIN:
            self.outer.writeSequence(data)

    def refuse(self, response: bytes) -> None:
        """
        Send C{response} (a whole answer that closes the connection) and read
        no more of the request.  Closing with unread data would reset the
        connection, and a client still sending its body could lose the
        answer: over plain TCP the write side is shut instead and what comes
        in is dropped until the client closes or the linger time is over.
        """
        transport = self.outer
        transport.write(response)
        self.factory.move(self, DRAIN)
        if ITCPTransport.providedBy(transport) and not ISSLTransport.providedBy(transport):
            transport.loseWriteConnection()
        else:
            transport.loseConnection()


class _Refused(Protocol):
    """A connection past the cap with nothing to evict: closed at once."""

    def connectionMade(self) -> None:
        cast(ITCPTransport, self.transport).abortConnection()


class GuardedSite(Site):
    """
    A L{Site} whose connections, with a guard set, are each admitted and
    then watched by it.
    """

    guard: ConnectionGuard | None = None

    def set_guard(self, guard: ConnectionGuard) -> None:
        self.guard = guard
        # The guard keeps the keep-alive deadline; Twisted's idle timer (a
        # timer per connection, reset by every byte) has nothing left to do.
        self.timeOut = None

    def build_channel(self, addr):
        """The protocol that serves one admitted connection: twisted.web's channel."""
        return Site.buildProtocol(self, addr)

    def buildProtocol(self, addr):
        guard = self.guard
        if guard is None:
            return self.build_channel(addr)
        if not guard.admit():
            return _Refused()
        return GuardedConnection(guard, lambda: self.build_channel(addr))


def _connection(request: Request) -> GuardedConnection | None:
    channel = request.channel
    transport = getattr(channel, "transport", None)
    return transport if isinstance(transport, GuardedConnection) else None


class GuardedRequest(Request):
    """
    A request that tells the guard where it is: headers in (the body
    deadline starts), body in (being served), answered (idle).

    @ivar principal: who the request was authenticated as on its headers,
        if the site did that; such a body upload is never evicted.
    """

    principal = None

    def gotLength(self, length):
        conn = _connection(self)
        if conn is not None:
            conn.factory.move(conn, BODY if self.principal is None else BODY_AUTHENTICATED)
        super().gotLength(length)

    def requestReceived(self, command, path, version):
        conn = _connection(self)
        if conn is not None:
            conn.factory.move(conn, BUSY)
        super().requestReceived(command, path, version)

    def finish(self):
        if not self.finished:
            conn = _connection(self)  # None once the connection is lost (no channel)
            if conn is not None:
                # Before the channel replays a pipelined request's bytes.
                conn.factory.move(conn, IDLE)
        return super().finish()


def guarded_request(request_class: type[Request]) -> type[GuardedRequest]:
    """C{request_class} reporting to the guard (for a site whose request class is not ours)."""
    name = "Guarded" + request_class.__name__.lstrip("_")
    return cast("type[GuardedRequest]", type(name, (GuardedRequest, request_class), {}))


def refuse_request(request: Request, status: int, body: bytes, headers=()) -> None:
    """
    Answer C{request} on its headers alone, with a JSON C{body}, and read no
    more of it: nothing of its body is buffered or spooled.
    """
    # Twisted answers "Expect: 100-continue" right after the headers: not now.
    request.requestHeaders.removeHeader(b"expect")
    lines = [b"HTTP/1.1 %d %s" % (status, RESPONSES.get(status, b"Error"))]
    lines.extend(b"%s: %s" % (name, value) for name, value in headers)
    lines.append(b"Content-Type: application/json")
    lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Connection: close")
    response = b"\r\n".join(lines) + b"\r\n\r\n" + body
    conn = _connection(request)
    if conn is not None:
        conn.refuse(response)
        return
    transport = request.channel.transport if request.channel is not None else None
    if transport is not None:  # None: the client is gone already
        transport.write(response)
        transport.loseConnection()
