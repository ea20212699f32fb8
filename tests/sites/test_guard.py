"""
The connection guard (cllama_tx.sites.guard) driven through Twisted's own HTTP
channel in memory, with a fake clock: each state's deadline, that trickled
bytes do not reset it, the order of eviction at the cap, refusal when
nothing may be evicted.  Real sockets and the real daemon are in
tests/test_connections_e2e.py.
"""

from __future__ import annotations

import resource

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from cllama_tx.runtime.config import Config, ConfigError
from cllama_tx.runtime.descriptors import RESERVE, descriptors_needed, fit_caps
from cllama_tx.sites.guard import (
    BODY,
    BODY_AUTHENTICATED,
    BUSY,
    DRAIN,
    HEAD,
    IDLE,
    ConnectionGuard,
    GuardedConnection,
    GuardedRequest,
    GuardedSite,
    GuardLimits,
    guarded_request,
    refuse_request,
)

ADDRESS = IPv4Address("TCP", "127.0.0.1", 40000)


class _Hold(Resource):
    """Answers C{/hold} only when the test says so; everything else at once."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.held = []

    def render(self, request):
        if request.path == b"/hold":
            self.held.append(request)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/plain")
        return b"ok"


class _AuthRequest(GuardedRequest):
    """Authenticated on its headers when it says C{X-Auth: yes}; refused on C{X-Auth: no}."""

    def gotLength(self, length):
        verdict = self.requestHeaders.getRawHeaders(b"x-auth", [None])[0]
        if verdict == b"no":
            refuse_request(self, 401, b'{"error":"who are you"}')
            return
        if verdict == b"yes":
            self.principal = "agent"
        super().gotLength(length)


class _Site(GuardedSite, Site):
    requestFactory = _AuthRequest


class _Transport(StringTransportWithDisconnection):
    """Connection lost at once on close; with C{deaf}, a peer that never reads our FIN."""

    deaf = False

    def loseConnection(self):
        if not self.deaf:
            super().loseConnection()

    def abortConnection(self):
        self.disconnected = True  # tells an abort from a close
        super().loseConnection()


class _Connection:
    """One in-memory connection to the guarded site."""

    def __init__(self, site):
        self.protocol = site.buildProtocol(ADDRESS)
        self.transport = _Transport()
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    @property
    def state(self) -> str:
        return self.protocol.state

    @property
    def open(self) -> bool:
        return self.transport.connected

    @property
    def aborted(self) -> bool:
        return self.transport.disconnected  # StringTransport: set by abortConnection only

    def written(self) -> bytes:
        return self.transport.value()


class GuardTestCase(SynchronousTestCase):
    limits = GuardLimits(max_connections=100, header_timeout=10, body_timeout=60, keepalive_timeout=120, linger=5)

    def setUp(self):
        self.clock = Clock()
        self.resource = _Hold()
        self.site = _Site(self.resource)
        self.guard = ConnectionGuard(self.clock, self.limits)
        self.site.set_guard(self.guard)

    def connect(self) -> _Connection:
        return _Connection(self.site)

    def served(self) -> _Connection:
        """A connection that made one request and got its answer (idle keep-alive)."""
        conn = self.connect()
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", conn.written())
        self.assertEqual(conn.state, IDLE)
        return conn

    def busy(self) -> _Connection:
        conn = self.connect()
        conn.send(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(conn.state, BUSY)
        return conn


class DeadlineTests(GuardTestCase):
    def test_trickled_headers_are_cut_at_the_header_deadline(self):
        """A byte a second does not reset the deadline (Twisted's idle timer it would)."""
        conn = self.connect()
        request_line = b"POST /v1/chat/completions HTTP/1.1\r\nX-Slow: "
        for second in range(10):
            conn.send(request_line[second : second + 1])
            self.assertTrue(conn.open, f"cut after {second} s")
            self.clock.advance(1)
        self.assertFalse(conn.open)
        self.assertTrue(conn.aborted)
        self.assertEqual(self.guard.closed["header_timeout"], 1)
        self.assertEqual((self.guard.live, self.guard.closing), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no timer left behind

    def test_a_silent_connection_is_cut_at_the_header_deadline(self):
        conn = self.connect()
        self.clock.advance(9.9)
        self.assertTrue(conn.open)
        self.clock.advance(1.1)  # deadlines are kept to within one sweep (1 s here)
        self.assertFalse(conn.open)

    def test_a_trickled_body_is_cut_at_the_body_deadline(self):
        conn = self.connect()
        conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        self.assertEqual(conn.state, BODY)
        for _ in range(59):
            self.clock.advance(1)
            conn.send(b"x")
        self.assertTrue(conn.open)
        self.clock.advance(1.5)
        self.assertFalse(conn.open)
        self.assertEqual(self.guard.closed["body_timeout"], 1)

    def test_a_request_being_served_is_never_cut(self):
        conn = self.busy()
        self.clock.advance(10_000)
        self.assertTrue(conn.open)
        [request] = self.resource.held
        request.write(b"done")
        request.finish()
        self.assertEqual(conn.state, IDLE)

    def test_idle_keepalive_is_closed_gently_at_its_deadline(self):
        conn = self.served()
        self.clock.advance(119)
        self.assertTrue(conn.open)
        self.clock.advance(1.5)
        self.assertFalse(conn.open)
        self.assertFalse(conn.aborted)  # loseConnection: nothing was in flight
        self.assertEqual(self.guard.closed["idle_timeout"], 1)

    def test_the_next_request_on_a_keepalive_connection_has_a_header_deadline(self):
        conn = self.served()
        self.clock.advance(100)
        conn.send(b"G")  # the first byte of the next request
        self.assertEqual(conn.state, HEAD)
        for _ in range(9):
            self.clock.advance(1)
            conn.send(b"E")
        self.assertTrue(conn.open)
        self.clock.advance(1.5)
        self.assertFalse(conn.open)
        self.assertEqual(self.guard.closed["header_timeout"], 1)

    def test_keepalive_requests_are_served_one_after_another(self):
        conn = self.served()
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(conn.written().count(b"200 OK"), 2)
        self.assertEqual(conn.state, IDLE)

    def test_a_refused_request_is_drained_then_cut(self):
        """
        The answer goes out, what the client still sends is dropped (never
        reaching the HTTP channel), and the connection ends after the linger.
        """
        conn = self.connect()
        conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nX-Auth: no\r\nExpect: 100-continue\r\nContent-Length: 1000000\r\n\r\n")
        answer = conn.written()
        self.assertTrue(answer.startswith(b"HTTP/1.1 401 Unauthorized\r\n"), answer)
        self.assertTrue(answer.endswith(b'\r\n\r\n{"error":"who are you"}'), answer)
        self.assertNotIn(b"100 Continue", answer)
        self.assertIn(b"Connection: close\r\n", answer)
        # Not plain TCP (a StringTransport): closed after the answer, not half-closed.
        self.assertFalse(conn.open)


class DrainTests(GuardTestCase):
    def test_drained_bytes_are_dropped_and_the_linger_ends_it(self):
        """Over a transport that stays open after the answer, the linger cuts the drain."""
        conn = self.connect()
        conn.transport.deaf = True  # a client that never reads the FIN
        conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nX-Auth: no\r\nContent-Length: 1000000\r\n\r\n")
        self.assertEqual(conn.state, DRAIN)
        before = conn.written()
        conn.send(b"x" * 65536)
        conn.protocol.wrappedProtocol._channel.transport.write(b"late")  # the channel writes nothing more
        self.assertEqual(conn.written(), before)
        self.clock.advance(4)
        self.assertTrue(conn.open)
        self.clock.advance(1.5)
        self.assertFalse(conn.open)
        self.assertEqual(self.guard.closed["linger_timeout"], 1)


class CapTests(GuardTestCase):
    limits = GuardLimits(max_connections=3, header_timeout=10, body_timeout=60, keepalive_timeout=120, linger=5)

    def test_the_oldest_connection_waiting_for_headers_is_evicted_first(self):
        idle = self.served()
        self.clock.advance(1)
        oldest = self.connect()
        self.clock.advance(1)
        newer = self.connect()
        newest = self.connect()  # at the cap: evicts the oldest waiting one
        self.assertFalse(oldest.open)
        self.assertTrue(oldest.aborted)
        self.assertTrue(all(c.open for c in (idle, newer, newest)))
        self.assertEqual(self.guard.closed["evicted"], 1)
        self.assertEqual(self.guard.live, 3)

    def test_an_unauthenticated_body_is_evicted_before_idle_keepalive(self):
        idle = self.served()
        self.clock.advance(1)
        uploading = self.connect()
        uploading.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
        self.assertEqual(uploading.state, BODY)
        self.busy()
        self.connect()
        self.assertFalse(uploading.open)
        self.assertTrue(idle.open)

    def test_idle_keepalive_goes_when_no_connection_waits(self):
        busy = self.busy()
        idle = self.served()
        authenticated = self.connect()
        authenticated.send(b"POST / HTTP/1.1\r\nHost: x\r\nX-Auth: yes\r\nContent-Length: 100\r\n\r\n")
        self.assertEqual(authenticated.state, BODY_AUTHENTICATED)
        newcomer = self.connect()
        self.assertFalse(idle.open)
        self.assertTrue(busy.open and authenticated.open and newcomer.open)

    def test_a_drained_connection_goes_first(self):
        waiting = self.connect()
        self.clock.advance(1)
        refused = self.connect()
        refused.transport.deaf = True
        refused.send(b"POST / HTTP/1.1\r\nHost: x\r\nX-Auth: no\r\nContent-Length: 10\r\n\r\n")
        self.assertEqual(refused.state, DRAIN)
        self.connect()
        self.connect()
        self.assertFalse(refused.open)
        self.assertTrue(waiting.open)

    def test_past_the_cap_with_nothing_to_evict_a_connection_is_refused(self):
        busy = [self.busy() for _ in range(3)]
        refused = self.connect()
        self.assertFalse(refused.open)
        self.assertTrue(refused.aborted)
        self.assertNotIsInstance(refused.protocol, GuardedConnection)
        self.assertTrue(all(c.open for c in busy))
        self.assertEqual(self.guard.closed["refused"], 1)
        # Once one is answered (idle), the next newcomer gets in by evicting it.
        self.resource.held[0].finish()
        newcomer = self.connect()
        self.assertTrue(newcomer.open)
        self.assertFalse(busy[0].open)

    def test_counts_follow_connections(self):
        conns = [self.connect() for _ in range(3)]
        self.assertEqual((self.guard.live, self.guard.count(HEAD)), (3, 3))
        conns[0].transport.loseConnection()
        self.assertEqual((self.guard.live, self.guard.count(HEAD)), (2, 2))
        for conn in conns[1:]:
            conn.transport.loseConnection()
        self.assertEqual((self.guard.live, self.guard.closing), (0, 0))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class UnguardedTests(SynchronousTestCase):
    def test_without_a_guard_the_site_is_twisteds(self):
        site = _Site(_Hold())
        protocol = site.buildProtocol(ADDRESS)
        self.assertNotIsInstance(protocol, GuardedConnection)


class DescriptorFitTests(SynchronousTestCase):
    def test_enough_descriptors(self):
        fit = fit_caps(4096, 256, 65536, 65536)
        self.assertEqual((fit.api_cap, fit.ui_cap, fit.soft_limit), (4096, 256, 65536))
        self.assertEqual(fit.needed, 2 * 4096 + 256 + RESERVE)

    def test_soft_limit_raised_as_far_as_needed(self):
        fit = fit_caps(4096, 256, 1024, 524288)
        self.assertEqual((fit.api_cap, fit.ui_cap, fit.soft_limit), (4096, 256, descriptors_needed(4096, 256)))
        self.assertFalse(fit.lowered(4096, 256))

    def test_caps_lowered_under_a_hard_limit(self):
        """The issue's host: 1,024 descriptors, soft and hard."""
        fit = fit_caps(4096, 256, 1024, 1024)
        self.assertEqual(fit.soft_limit, 1024)
        self.assertTrue(fit.lowered(4096, 256))
        self.assertEqual((fit.api_cap, fit.ui_cap), (392, 112))
        self.assertLessEqual(descriptors_needed(fit.api_cap, fit.ui_cap), 1024)

    def test_unlimited(self):
        inf = resource.RLIM_INFINITY
        fit = fit_caps(4096, 256, inf, inf)
        self.assertEqual((fit.api_cap, fit.ui_cap, fit.soft_limit), (4096, 256, inf))


class ConfigTests(SynchronousTestCase):
    def test_defaults(self):
        config = Config.from_env({})
        self.assertEqual(
            (config.max_connections, config.ui_max_connections, config.header_timeout, config.body_timeout,
             config.keepalive_timeout),
            (4096, 256, 10.0, 60.0, 120.0),
        )

    def test_settings(self):
        config = Config.from_env({
            "CLLAMA_MAX_CONNECTIONS": "900", "CLLAMA_UI_MAX_CONNECTIONS": "20", "CLLAMA_HEADER_TIMEOUT": "2.5",
            "CLLAMA_BODY_TIMEOUT": "30", "CLLAMA_KEEPALIVE_TIMEOUT": "15",
        })
        self.assertEqual(
            (config.max_connections, config.ui_max_connections, config.header_timeout, config.body_timeout,
             config.keepalive_timeout),
            (900, 20, 2.5, 30.0, 15.0),
        )

    def test_bad_values(self):
        for name, value in (("CLLAMA_MAX_CONNECTIONS", "0"), ("CLLAMA_MAX_CONNECTIONS", "many"),
                            ("CLLAMA_HEADER_TIMEOUT", "-1"), ("CLLAMA_BODY_TIMEOUT", "soon")):
            with self.assertRaises(ConfigError, msg=name):
                Config.from_env({name: value})


class GuardedRequestClassTests(GuardTestCase):
    def test_a_request_class_not_ours_reports_too(self):
        """guarded_request() (the UI's way) moves the connection through its states."""
        self.site.requestFactory = guarded_request(Request)
        conn = self.connect()
        conn.send(b"POST /hold HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
        self.assertEqual(conn.state, BODY)
        conn.send(b"abcd")
        self.assertEqual(conn.state, BUSY)
        self.resource.held[0].finish()
        self.assertEqual(conn.state, IDLE)


class ReportTests(GuardTestCase):
    def test_the_log_says_what_was_cut_but_not_routine_closes(self):
        from twisted.logger import capturedLogs

        with capturedLogs() as events:
            self.served()
            self.clock.advance(121)  # an idle keep-alive connection ends: routine
        self.assertEqual([e for e in events if e.get("log_namespace") == "cllama_tx.sites.guard"], [])
        with capturedLogs() as events:
            self.clock.advance(60)
            self.connect()
            self.connect()
            self.clock.advance(11)
        [event] = [e for e in events if e.get("log_namespace") == "cllama_tx.sites.guard"]
        self.assertEqual(event["what"], "2 header timeout")
        self.assertEqual((event["label"], event["live"], event["cap"]), ("API", 0, 100))


class HeldHeadTests(GuardTestCase):
    def test_no_channel_until_the_first_head_is_complete(self):
        """A connection that never finishes its headers never costs an HTTP channel."""
        conn = self.connect()
        request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        for byte in request[:-1]:
            conn.send(bytes([byte]))
            self.assertIsNone(conn.protocol.wrappedProtocol)
        conn.send(request[-1:])  # the terminator split across reads
        self.assertIsNotNone(conn.protocol.wrappedProtocol)
        self.assertIn(b"200 OK", conn.written())
        self.assertEqual(conn.state, IDLE)

    def test_an_endless_head_goes_to_the_channel_which_refuses_it(self):
        """Past MAX_HEAD the channel gets it: a line over its limit closes the connection."""
        conn = self.connect()
        conn.send(b"GET / HTTP/1.1\r\n" + b"X-Padding: " + b"p" * (21 * 1024))
        self.assertFalse(conn.open)
        conn = self.connect()
        conn.send(b"GET / HTTP/1.1\r\n" + b"X-Padding: ppppppppp\r\n" * 1200)
        self.assertTrue(conn.written().startswith(b"HTTP/1.1 400 "), conn.written()[:40])

    def test_pipelined_requests_after_the_first_head(self):
        conn = self.connect()
        conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(conn.written().count(b"200 OK"), 2)
