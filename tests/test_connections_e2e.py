"""
Connections cannot exhaust the daemon: the real `twistd -n cllama` process
over loopback sockets.  Trickled headers and bodies are cut at their
deadlines on both listeners, the cap evicts the oldest connection that has
not sent a request (never an agent's keep-alive connection) and refuses when
every connection is busy, unauthenticated bodies are refused on their
headers without a byte spooled, and agents are served through a slowloris
of hundreds of connections against a daemon with 256 descriptors.

Time is real here (a real process), so deadlines are configured short and
every wait is on an event: a connection closed, a response, a log line.
"""

from __future__ import annotations

import json
import os
import sys
import time

import treq
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.testing import FakeProvider, Reply, openai_completion
from tests.runtime.test_daemon import TWISTD, spawn_daemon
from tests.support import AGENT, PROVIDER_KEY, SECRET, chat_body, write_agent

UI_TOKEN = "connections-ui-token-5150"
AUTH = f"Authorization: Bearer {AGENT}:{SECRET}\r\n".encode()
# Runs the daemon with a hard descriptor limit (soft = hard: it cannot raise it).
WITH_FD_LIMIT = (
    "import os, resource, sys\n"
    "n = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class RawClient(protocol.Protocol):
    """A client that writes exactly what it is told and keeps what it gets."""

    def __init__(self):
        self.data = b""
        self.sent = 0
        self.closed = defer.Deferred()
        self._waiters = []

    def send(self, data: bytes) -> None:
        self.sent += len(data)
        self.transport.write(data)

    def dataReceived(self, data):
        self.data += data
        for needle, d in list(self._waiters):
            if needle in self.data:
                self._waiters.remove((needle, d))
                d.callback(self.data)

    def wait_for(self, needle: bytes):
        """Fires once C{needle} was received."""
        d = defer.Deferred()
        self._waiters.append((needle, d))
        self.dataReceived(b"")
        return d

    def connectionLost(self, reason):
        self.closed.callback(self.data)

    @property
    def is_open(self) -> bool:
        return not self.closed.called


def response_of(raw: bytes) -> tuple[int, dict, bytes]:
    """(status, lower-cased headers, body) of the first HTTP response in C{raw}."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(rest)))
    return int(lines[0].split()[1]), headers, rest[:length]


def chat_request(body: dict | None = None, extra: bytes = b"") -> bytes:
    data = json.dumps(body or chat_body()).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
        + AUTH + extra + b"Content-Length: %d\r\n\r\n" % len(data) + data
    )


class ConnectionTestCase(TestCase):
    timeout = 90
    settings: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = FakeProvider(reactor)
        yield self.fake.start()
        self.addCleanup(self.fake.stop)
        base = os.path.abspath(self.mktemp())
        self.context_root = os.path.join(base, "context")
        auth_dir = os.path.join(base, "auth")
        self.tmpdir = os.path.join(base, "tmp")
        os.makedirs(auth_dir)
        os.makedirs(self.tmpdir)
        write_agent(self.context_root, AGENT, SECRET)
        self.env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": self.context_root,
            "CLAW_AUTH_DIR": auth_dir,
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.fake.base_url,
            "CLLAMA_UI_TOKEN": UI_TOKEN,
            # Where twisted.web would spool request bodies: watched below.
            "TMPDIR": self.tmpdir,
        }
        self.env.update(self.settings)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        self.clients = []
        self.addCleanup(self._close_clients)

    @defer.inlineCallbacks
    def start_daemon(self, fd_limit: int | None = None):
        command = None
        if fd_limit is not None:
            command = [sys.executable, "-c", WITH_FD_LIMIT, str(fd_limit), TWISTD, "--pidfile=", "-n", "cllama"]
        self.process, self.transport = spawn_daemon(self, self.env, command=command)
        self.ports = yield self.process.ready
        self.api = f"http://127.0.0.1:{self.ports['API']}"
        return self.ports

    def connect(self, port: int | None = None):
        client = RawClient()
        self.clients.append(client)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port or self.ports["API"])
        return connectProtocol(endpoint, client)

    def _close_clients(self):
        waits = []
        for client in self.clients:
            if client.is_open and client.transport is not None:
                client.transport.abortConnection()
                waits.append(client.closed)
        return defer.DeferredList(waits)

    @defer.inlineCallbacks
    def chat(self, **kwargs):
        response = yield self.http.post(
            self.api + "/v1/chat/completions", json=chat_body(),
            headers={"Authorization": f"Bearer {AGENT}:{SECRET}"}, **kwargs,
        )
        body = yield response.json()
        return response.code, body

    def daemon_fds(self) -> list[str]:
        """Where the daemon's open descriptors point."""
        directory = f"/proc/{self.transport.pid}/fd"
        links = []
        for name in os.listdir(directory):
            try:
                links.append(os.readlink(os.path.join(directory, name)))
            except OSError:
                pass  # closed meanwhile
        return links


class DeadlineTests(ConnectionTestCase):
    settings = {"CLLAMA_HEADER_TIMEOUT": "1", "CLLAMA_BODY_TIMEOUT": "1"}

    @defer.inlineCallbacks
    def trickle_until_cut(self, port: int, head: bytes, trickle: bytes):
        """Send C{head}, then C{trickle} a byte each 0.1 s; the seconds until the proxy hung up."""
        client = yield self.connect(port)
        started = time.monotonic()
        client.send(head)
        pieces = iter(trickle * 100)

        def one_byte():
            client.send(bytes([next(pieces)]))

        loop = task.LoopingCall(one_byte)
        loop.start(0.1)
        self.addCleanup(lambda: loop.running and loop.stop())
        data = yield client.closed
        elapsed = time.monotonic() - started
        loop.stop()
        return client, data, elapsed

    @defer.inlineCallbacks
    def test_trickled_headers_are_cut_on_both_listeners(self):
        """
        A byte every 0.1 s (which resets Twisted's own idle timer each time)
        is cut at the 1 s header deadline, on the API and on the UI port.
        """
        ports = yield self.start_daemon()
        for port in (ports["API"], ports["UI"]):
            client, data, elapsed = yield self.trickle_until_cut(
                port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"abcdefgh"
            )
            self.assertEqual(data, b"")  # cut, not answered
            self.assertGreaterEqual(elapsed, 0.9)
            self.assertLess(elapsed, 3.0)
            self.assertGreater(client.sent, 60)  # it kept trickling until the cut
        health = yield self.http.get(self.api + "/health")
        self.assertEqual((yield health.json()), {"ok": True})

    @defer.inlineCallbacks
    def test_trickled_body_is_cut_at_the_body_deadline(self):
        """An authenticated request whose body trickles is cut at the body deadline, unanswered."""
        yield self.start_daemon()
        client, data, elapsed = yield self.trickle_until_cut(
            self.ports["API"],
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 5000\r\n\r\n{",
            b" ",
        )
        self.assertEqual(data, b"")
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 3.0)
        self.assertEqual(self.fake.received, [])
        # The agent is fine otherwise: its next request is served.
        code, body = yield self.chat()
        self.assertEqual((code, body["object"]), (200, "chat.completion"))


class CapTests(ConnectionTestCase):
    settings = {"CLLAMA_MAX_CONNECTIONS": "4", "CLLAMA_HEADER_TIMEOUT": "60"}

    @defer.inlineCallbacks
    def test_the_oldest_waiting_connection_is_evicted_not_an_agents(self):
        yield self.start_daemon()
        agent = yield self.connect()
        agent.send(chat_request())
        first = yield agent.wait_for(b"chat.completion")
        self.assertEqual(response_of(first)[0], 200)
        # Three silent connections: with the agent's, the cap (4) is reached.
        silent = []
        for _ in range(3):
            silent.append((yield self.connect()))
        # Each newcomer evicts the oldest silent one, never the agent's idle
        # keep-alive connection (nor a newer silent one).
        for n in range(3):
            silent.append((yield self.connect()))
            yield silent[n].closed
            self.assertTrue(all(c.is_open for c in silent[n + 1:]), n)
        self.assertTrue(agent.is_open)
        agent.data = b""
        agent.send(chat_request())
        second = yield agent.wait_for(b"chat.completion")
        status, headers, body = response_of(second)
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["object"], "chat.completion")

    @defer.inlineCallbacks
    def test_past_the_cap_with_every_connection_busy_a_newcomer_is_closed(self):
        """
        Connections being served are never evicted: when all are, a new
        connection is closed at once, and the metrics count it.
        """
        self.env["CLLAMA_MAX_CONNECTIONS"] = "2"
        yield self.start_daemon()
        release = defer.Deferred()
        completion = openai_completion("held", "gpt-4o-mini", 1, 1)
        self.fake.enqueue(Reply(json=completion, hold_until=release), Reply(json=completion, hold_until=release))
        held = [self.chat(), self.chat()]
        yield self.fake.wait_for_request(2)
        try:
            newcomer = yield self.connect()
        except error.ConnectError:
            pass  # reset before the client saw its handshake complete: refused too
        else:
            newcomer.send(chat_request())
            data = yield newcomer.closed
            self.assertEqual(data, b"")  # closed, not answered
        release.callback(None)
        for code, body in (yield defer.gatherResults(held)):
            self.assertEqual((code, body["choices"][0]["message"]["content"]), (200, "held"))
        metrics = yield self.http.get(
            f"http://127.0.0.1:{self.ports['UI']}/metrics", headers={"Authorization": f"Bearer {UI_TOKEN}"}
        )
        text = (yield metrics.text())
        self.assertIn('cllama_connections_closed_total{listener="api",reason="refused"} 1.0', text)
        self.assertIn('cllama_connections_cap{listener="api"} 2.0', text)


class HeaderAuthenticationTests(ConnectionTestCase):
    @defer.inlineCallbacks
    def test_unauthenticated_large_body_is_refused_before_it_is_sent(self):
        """A gigabyte declared, nothing sent: the answer comes at once, in the surface's shape."""
        yield self.start_daemon()
        cases = [
            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n", 401,
             {"error": {"message": "missing credentials: send 'Authorization: Bearer <agent-id>:<secret>'",
                        "type": "authentication_error", "code": "missing_credentials"}}),
            (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nx-api-key: " + f"{AGENT}:wrong-secret".encode() + b"\r\n", 403,
             {"type": "error", "error": {"type": "permission_error", "message": "unknown agent or wrong secret"}}),
            (b"POST /key/generate HTTP/1.1\r\nHost: x\r\n", 401,
             {"error": {"message": "a request with a body needs credentials (Authorization or x-api-key)",
                        "type": "auth_error", "param": None, "code": "401"}}),
        ]
        for head, status, doc in cases:
            client = yield self.connect()
            client.send(head + b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")
            data = yield client.closed  # the proxy answers and closes; the client sent no body
            got_status, headers, body = response_of(data)
            self.assertEqual((got_status, json.loads(body)), (status, doc))
            self.assertEqual(headers["connection"], "close")
            self.assertRegex(headers["x-cllama-request-id"], r"^[0-9a-f]{16}$")
        self.assertEqual(self.fake.received, [])
        yield self.process.wait_for_audit(lambda lines: len(lines) >= 3)
        errors = [(line["type"], line["status_code"]) for line in self.process.audit_lines()]
        self.assertEqual(errors, [("error", 401), ("error", 403), ("error", 401)])
        self.assertNotIn(b"wrong-secret", self.process.stdout)

    @defer.inlineCallbacks
    def test_other_routes_take_small_bodies_only(self):
        """
        A body for a route other than inference, with credentials (the
        route checks them), may be 64 KiB: more is refused on the headers.
        """
        yield self.start_daemon()
        client = yield self.connect()
        client.send(b"POST /key/generate HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-whatever-0000\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 70000\r\n\r\n")
        status, headers, body = response_of((yield client.closed))
        self.assertEqual((status, json.loads(body)), (413, {"error": {
            "message": "the request body is larger than 65536 bytes", "type": "invalid_request_error",
            "code": "request_too_large"}}))

    @defer.inlineCallbacks
    def test_unauthenticated_bodies_are_never_spooled(self):
        """
        Twenty unauthenticated connections each sending 1 MiB of a declared
        30 MB body (under the 32 MiB cap): all refused at once, no temporary
        file opened (twisted.web spools bodies over 100 KB to one), the body
        dropped as it comes.
        An authenticated large body is still read and served.
        """
        yield self.start_daemon()
        chunk = b"x" * 65536
        clients = []
        for n in range(20):
            client = yield self.connect()
            client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                        + f"{AGENT}:not-it-{n}".encode() + b"\r\nContent-Length: 30000000\r\n\r\n")
            for _ in range(16):
                client.send(chunk)
            clients.append(client)
        # An agent's large body (past the 100 KB spooling threshold), sent
        # after them, is read (spooled) and served meanwhile.
        code, body = yield self.chat_with_long_prompt(300_000)
        self.assertEqual((code, body["object"]), (200, "chat.completion"))
        self.assertEqual(self.fake.received[0].json["messages"], [{"role": "user", "content": "p" * 300_000}])
        spooled = [link for link in self.daemon_fds() if link.startswith(self.tmpdir)]
        self.assertEqual(spooled, [])
        for client in clients:
            yield client.wait_for(b"invalid_credentials")
            self.assertEqual(response_of(client.data)[0], 403)
            yield client.closed
        self.assertEqual([link for link in self.daemon_fds() if link.startswith(self.tmpdir)], [])

    @defer.inlineCallbacks
    def chat_with_long_prompt(self, size: int):
        """A prompt of C{size} characters, as a real client sends one."""
        response = yield self.http.post(
            self.api + "/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": "p" * size}]),
            headers={"Authorization": f"Bearer {AGENT}:{SECRET}"},
        )
        return response.code, (yield response.json())


class SlowlorisTests(ConnectionTestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_agents_are_served_through_a_slowloris(self):
        """
        The issue's attack in small: a daemon with 256 descriptors (soft and
        hard) and 300 connections trickling headers.  The daemon lowers its
        cap to fit and says so; every agent request is answered.
        """
        yield self.start_daemon(fd_limit=256)
        yield self.process.wait_for_stderr(b"too low for the connection caps")
        slow = []
        for _ in range(300):
            client = yield self.connect()
            client.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            slow.append(client)

        def trickle():
            for client in slow:
                if client.is_open:
                    client.send(b"X")

        loop = task.LoopingCall(trickle)
        loop.start(0.5)
        self.addCleanup(lambda: loop.running and loop.stop())
        latencies = []
        for _ in range(40):
            started = time.monotonic()
            code, body = yield self.chat()
            latencies.append(time.monotonic() - started)
            self.assertEqual((code, body["object"]), (200, "chat.completion"))
        latencies.sort()
        self.assertLess(latencies[-1], 2.0, latencies)
        # Most of the slow connections were evicted to make room.
        self.assertGreater(sum(not c.is_open for c in slow), 200)
