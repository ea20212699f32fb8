"""
Graceful shutdown: SIGTERM stops accepting, drains in-flight requests within
the grace period, cuts and settles the rest, flushes the ledger, exits 0.
"""

import os
import sqlite3

import treq
from twisted.internet import defer, error, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.runtime import daemon as daemon_module
from cllama_tx.runtime.drain import InFlight
from cllama_tx.testing import FakeProvider, Reply, openai_sse_events, openai_stream_chunks
from tests.runtime.test_daemon import spawn_daemon
from tests.support import AGENT, PROVIDER_KEY, SECRET, chat_body, write_agent

# The daemon wiring (daemon.py/proxy.py/config.py) is delivered as a patch.
WIRED = "DrainService" in open(daemon_module.__file__).read()


class FakeRequest:
    def __init__(self):
        self._finish = []
        self.transport = self
        self.aborted = False

    def notifyFinish(self):
        d = defer.Deferred()
        self._finish.append(d)
        return d

    def finish(self, failure=None):
        for d in self._finish:
            d.errback(failure) if failure is not None else d.callback(None)
        self._finish = []

    def abortConnection(self):
        self.aborted = True
        from twisted.python.failure import Failure

        self.finish(Failure(error.ConnectionAborted()))


class InFlightTests(TestCase):
    def test_nothing_in_flight_fires_at_once(self):
        fired = []
        InFlight().wait(5, Clock()).addCallback(fired.append)
        self.assertEqual(fired, [0])

    def test_fires_when_the_last_request_finishes(self):
        inflight, clock, a, b = InFlight(), Clock(), FakeRequest(), FakeRequest()
        inflight.track(a)
        inflight.track(b)
        self.assertEqual(inflight.count, 2)
        fired = []
        inflight.wait(5, clock).addCallback(fired.append)
        a.finish()
        self.assertEqual((fired, inflight.count), ([], 1))
        b.finish()
        self.assertEqual(fired, [0])
        self.assertFalse(clock.getDelayedCalls())
        self.assertFalse(a.aborted or b.aborted)

    def test_cuts_the_rest_after_the_grace(self):
        inflight, clock, a, b = InFlight(), Clock(), FakeRequest(), FakeRequest()
        inflight.track(a)
        inflight.track(b)
        fired = []
        inflight.wait(5, clock, settle_delay=0.5).addCallback(fired.append)
        a.finish()
        clock.advance(5)
        self.assertTrue(b.aborted)
        self.assertEqual(inflight.count, 0)
        self.assertEqual(fired, [])  # time for the cut request to settle
        clock.advance(0.5)
        self.assertEqual(fired, [1])


class _Raw(Protocol):
    """Reads a streamed HTTP response byte by byte; fires when it ends."""

    def __init__(self):
        self.data = b""
        self.lost = defer.Deferred()
        self._waiters = []

    def dataReceived(self, data):
        self.data += data
        for needle, d in list(self._waiters):
            if needle in self.data:
                self._waiters.remove((needle, d))
                d.callback(None)

    def wait_for(self, needle):
        d = defer.Deferred()
        self._waiters.append((needle, d))
        self.dataReceived(b"")
        return d

    def connectionLost(self, reason):
        self.lost.callback(reason.value)


class GracefulShutdownTests(TestCase):
    timeout = 60

    if not WIRED:
        skip = "the drain patch to cllama_tx/runtime/daemon.py is not applied"

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = FakeProvider(reactor)
        yield self.fake.start()
        self.addCleanup(self.fake.stop)
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "auth"))
        write_agent(os.path.join(base, "context"), AGENT, SECRET)
        self.state = os.path.join(base, "state")
        self.env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": os.path.join(base, "context"),
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": self.state,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.fake.base_url,
            "CLLAMA_UI_TOKEN": "graceful-ui-token",
        }
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    def slow_stream(self, pieces, delay):
        self.fake.enqueue(
            Reply(
                sse=openai_sse_events(openai_stream_chunks(pieces, "gpt-4o-mini", 5, len(pieces))),
                delay_between_chunks=delay,
            )
        )

    @defer.inlineCallbacks
    def start_stream(self, port):
        """A raw streaming request (no client pool, no retries)."""
        import json

        body = json.dumps(chat_body(stream=True)).encode()
        raw = _Raw()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), raw)
        raw.transport.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + f"{AGENT}:{SECRET}".encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        yield raw.wait_for(b"data: ")  # the stream is relaying
        return raw

    def ledger_rows(self):
        db = sqlite3.connect(os.path.join(self.state, "ledger.sqlite3"))
        try:
            return db.execute("SELECT request_id, status FROM requests").fetchall()
        finally:
            db.close()

    @defer.inlineCallbacks
    def test_sigterm_lets_the_stream_finish_and_exits_0(self):
        process, transport = spawn_daemon(self, self.env)
        ports = yield process.ready
        self.slow_stream(["a", "b", "c", "d", "e", "f"], 0.4)  # ~3 s in all
        raw = yield self.start_stream(ports["API"])
        transport.signalProcess("TERM")
        yield process.wait_for_stderr(b"draining")
        yield task.deferLater(reactor, 0.2, lambda: None)
        # New connections are refused at once.
        yield self.assertFailure(
            connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", ports["API"]), Protocol()),
            error.ConnectionRefusedError,
        )
        self.assertFalse(raw.lost.called)
        yield raw.lost
        self.assertIn(b"data: [DONE]", raw.data)
        code = yield process.ended
        self.assertEqual((code, process.signal), (0, None))
        [response] = [line for line in process.audit_lines() if line["type"] == "response"]
        self.assertEqual(response["status_code"], 200)
        self.assertEqual(self.ledger_rows(), [(response["request_id"], 200)])

    @defer.inlineCallbacks
    def test_a_stream_longer_than_the_grace_is_cut_and_settled(self):
        env = dict(self.env, CLLAMA_DRAIN_GRACE="1")
        process, transport = spawn_daemon(self, env)
        ports = yield process.ready
        self.slow_stream([str(i) for i in range(40)], 0.5)  # ~20 s
        raw = yield self.start_stream(ports["API"])
        transport.signalProcess("TERM")
        started = reactor.seconds()
        yield raw.lost
        elapsed = reactor.seconds() - started
        self.assertGreaterEqual(elapsed, 0.9)
        self.assertLess(elapsed, 5)
        self.assertNotIn(b"[DONE]", raw.data)
        code = yield process.ended
        self.assertEqual((code, process.signal), (0, None))
        lines = process.audit_lines()
        [cut] = [line for line in lines if line["type"] in ("response", "error")]
        self.assertEqual((cut["type"], cut["status_code"], cut["error"]), ("error", 499, "client disconnected"))
        self.assertEqual(self.ledger_rows(), [(cut["request_id"], 499)])
