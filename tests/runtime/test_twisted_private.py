"""
Twisted's private names (L{cllama_tx.runtime.twisted_private}) against the
installed Twisted: each is there, with the shape the daemon relies on, and
does what the daemon relies on it for.

When one of these fails, a Twisted release moved a private name: every
accessor has a fallback, so the daemon still works, but slower or plainer
(docs/OPERATIONS.md, "Twisted's private names").  Adapt the accessor in
cllama_tx/runtime/twisted_private.py to the new release (or drop it for a
public API that now does the job), run tests/runtime, tests/pipeline,
tests/sites and the end-to-end tests on it, then raise the bound in setup.py.
"""

from __future__ import annotations

import socket

from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import http
from twisted.web.client import Agent, HTTPConnectionPool

import twisted
from cllama_tx.runtime import twisted_private
from cllama_tx.runtime.twisted_private import (
    CHECKED_WITH,
    agent_steps,
    missing,
    pending_request_line,
    platform_trust_plus,
    quiet_pool,
)

WHAT_TO_DO = (
    "Twisted {version} no longer has private names cllama_tx relies on (checked with {checked}):\n  {gone}\n"
    "Each has a fallback (docs/OPERATIONS.md, \"Twisted's private names\"), so the daemon runs, "
    "slower or plainer. Adapt cllama_tx/runtime/twisted_private.py to this release, run the "
    "test suite on it, then raise the Twisted bound in setup.py."
)


class AllThereTests(SynchronousTestCase):
    def test_every_private_name_is_there(self) -> None:
        """The one check that names everything missing at once, and what to do about it."""
        gone = missing()
        if gone:
            self.fail(WHAT_TO_DO.format(version=twisted.__version__, checked=CHECKED_WITH, gone="\n  ".join(gone)))

    def test_missing_notices_a_name_that_went(self) -> None:
        """The check itself works: a Twisted without Agent._getEndpoint is reported."""
        self.patch(Agent, "_getEndpoint", None)
        self.assertIn("twisted.web.client.Agent._getEndpoint(uri): absent or other signature", missing())

    def test_missing_notices_a_changed_signature(self) -> None:
        def _requestWithEndpoint(self, key, endpoint, method, parsedURI, headers, bodyProducer):
            pass

        self.patch(Agent, "_requestWithEndpoint", _requestWithEndpoint)
        self.assertTrue([g for g in missing() if g.startswith("twisted.web.client.Agent._requestWithEndpoint(")])

    def test_report_logs_what_is_missing(self) -> None:
        self.patch(Agent, "_getEndpoint", None)
        logged = []

        class Log:
            def warn(self, fmt, **fields):
                logged.append(fields)

        gone = twisted_private.report(Log())
        self.assertEqual(len(logged), 1)
        self.assertIn("Agent._getEndpoint", logged[0]["gone"])
        self.assertEqual(logged[0]["version"], twisted.__version__)
        self.assertIn("twisted.web.client.Agent._getEndpoint(uri): absent or other signature", gone)

    def test_report_is_silent_when_all_are_there(self) -> None:
        class Log:
            def warn(self, fmt, **fields):
                raise AssertionError(fields)

        self.assertEqual(twisted_private.report(Log()), [])


class UpstreamClientNamesTests(TestCase):
    """_HTTP11ClientFactory, HTTPConnectionPool._factory, _ensureValidURI, Agent's two steps."""

    def test_the_pool_is_made_quiet(self) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.assertTrue(quiet_pool(pool))
        factory = pool._factory(lambda proto: None, "metadata")
        self.assertFalse(factory.noisy)

    def test_a_pool_without_the_factory_is_left_alone(self) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool._factory = protocol.Factory
        self.assertFalse(quiet_pool(pool))
        self.assertIs(pool._factory, protocol.Factory)

    @defer.inlineCallbacks
    def test_agent_steps_send_a_request(self) -> None:
        """The two steps, over loopback to a server that answers 200 with a body."""

        class Answer(protocol.Protocol):
            def dataReceived(self, data):
                self.factory.seen.append(data)
                if b"\r\n\r\n" in b"".join(self.factory.seen):
                    self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                    self.transport.loseConnection()

        factory = protocol.Factory.forProtocol(Answer)
        factory.seen = []
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        steps = agent_steps(Agent(reactor, pool=pool))
        self.assertIsNotNone(steps)
        target = steps.target(b" http://127.0.0.1:%d/v1/x?y=1 " % port.getHost().port)
        key, _endpoint, parsed = target
        self.assertEqual(key, (b"http", b"127.0.0.1", port.getHost().port))
        self.assertEqual(parsed.originForm, b"/v1/x?y=1")
        response = yield steps.send(target, b"GET", None, None)
        self.assertEqual(response.code, 200)
        from twisted.web.client import readBody

        self.assertEqual((yield readBody(response)), b"ok")
        self.assertTrue(b"".join(factory.seen).startswith(b"GET /v1/x?y=1 HTTP/1.1\r\n"))

    def test_a_bad_url_raises_in_target(self) -> None:
        steps = agent_steps(Agent(reactor))
        self.assertRaises(ValueError, steps.target, b"http://bad host/\x00")

    def test_no_steps_without_the_names(self) -> None:
        agent = Agent(reactor)
        self.patch(Agent, "_requestWithEndpoint", None)
        self.assertIsNone(agent_steps(agent))


class TrustRootTests(SynchronousTestCase):
    """IOpenSSLTrustRoot._addCACertsToContext, both ways: Twisted calls ours, we call the platform's."""

    def test_twisted_asks_our_trust_root_and_we_ask_the_platform(self) -> None:
        calls = []
        self.patch(ssl.platformTrust().__class__, "_addCACertsToContext",
                   lambda self, context: calls.append(("platform", context)))
        root = platform_trust_plus(lambda context: calls.append(("extra", context)))
        context = ssl.CertificateOptions(trustRoot=root).getContext()
        self.assertIsInstance(context, SSL.Context)
        self.assertEqual(calls, [("platform", context), ("extra", context)])

    def test_optionsForClientTLS_takes_it(self) -> None:
        root = platform_trust_plus(lambda context: None)
        ssl.optionsForClientTLS("provider.example", trustRoot=root)  # adapts to IOpenSSLTrustRoot or raises

    def test_without_the_interface_it_refuses(self) -> None:
        self.patch(twisted_private, "IOpenSSLTrustRoot", None)
        e = self.assertRaises(twisted_private.TrustRootUnavailable, platform_trust_plus, lambda context: None)
        self.assertIn("_addCACertsToContext", str(e))


class RequestLineTests(SynchronousTestCase):
    """HTTPChannel._command and _path, while a request's headers are read (as Request.gotLength sees them)."""

    def feed(self, data: bytes) -> list:
        seen = []

        class Looking(http.Request):
            def gotLength(self, length):
                seen.append(pending_request_line(self.channel))
                super().gotLength(length)

        channel = http.HTTPChannel()
        channel.timeOut = None
        channel.requestFactory = Looking
        channel.makeConnection(StringTransport())
        self.addCleanup(channel.connectionLost, None)
        channel.dataReceived(data)
        return seen

    def test_the_request_line_is_there_when_the_headers_are(self) -> None:
        seen = self.feed(b"POST /v1/chat/completions?beta=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 99\r\n\r\n")
        self.assertEqual(seen, [(b"POST", b"/v1/chat/completions?beta=1")])

    def test_a_channel_without_it_says_none(self) -> None:
        self.assertIsNone(pending_request_line(http.HTTPChannel()))
        self.assertIsNone(pending_request_line(object()))


class AcceptFairlyTests(TestCase):
    """A shared listening socket: a few accepts per wake-up, so other workers get the next connections."""

    def _port_with_backlog(self, waiting):
        accepted = []

        class Count(protocol.Protocol):
            def connectionMade(self):
                accepted.append(self)

        port = reactor.listenTCP(0, protocol.Factory.forProtocol(Count), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        port.stopReading()  # the test, not the reactor, decides when it reads
        clients = []
        for _ in range(waiting):
            client = socket.create_connection(("127.0.0.1", port.getHost().port))
            self.addCleanup(client.close)
            clients.append(client)
        for a in list(accepted):
            self.addCleanup(a.transport.abortConnection)
        return port, accepted

    def test_a_few_connections_per_read(self):
        port, accepted = self._port_with_backlog(7)
        self.assertTrue(twisted_private.accept_fairly(port, most=3))
        port.doRead()
        self.assertEqual(len(accepted), 3)
        port.doRead()
        self.assertEqual(len(accepted), 6)
        for connection in accepted:
            connection.transport.abortConnection()

    def test_without_it_one_read_takes_the_whole_backlog(self):
        """What the accessor changes: Twisted's own doRead drains what waits."""
        port, accepted = self._port_with_backlog(7)
        port.doRead()
        self.assertEqual(len(accepted), 7)
        for connection in accepted:
            connection.transport.abortConnection()

    def test_a_port_without_the_attribute_is_left_alone(self):
        class Other:
            def doRead(self):
                return None

        self.assertFalse(twisted_private.accept_fairly(Other()))
