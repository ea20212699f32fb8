"""
The reactor's dispatch of ready sockets without Twisted's per-event log
context (twisted_private.lean_dispatch), on an epoll reactor of the test's
own over real loopback sockets: data flows, a handler's exception is still
a disconnection, what escapes is logged and the loop goes on, any other
reactor is left alone; CLLAMA_LEAN_DISPATCH read and wired.
"""

from __future__ import annotations

import gc
import io

from twisted.internet import protocol
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from cllama_tx.runtime import twisted_private
from cllama_tx.runtime.config import Config, ConfigError
from cllama_tx.runtime.daemon import build_daemon


class _Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        if data == b"boom":
            raise RuntimeError("a handler's bug")
        self.transport.write(data)


class _Client(protocol.Protocol):
    def __init__(self, reactor, send: bytes) -> None:
        self.reactor = reactor
        self.send = send
        self.received = b""
        self.reason = None

    def connectionMade(self) -> None:
        self.transport.write(self.send)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received == self.send:
            self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self.reason = reason
        self.reactor.stop()


class LeanDispatchTests(TestCase):
    def reactor(self) -> EPollReactor:
        reactor = EPollReactor()
        self.addCleanup(self.close, reactor)
        return reactor

    def close(self, reactor: EPollReactor) -> None:
        """Its descriptors: the epoll object and the waker's pipe (the test's sockets are closed)."""
        reactor.removeAll()
        reactor._poller.close()
        reactor.waker.connectionLost(None)

    def exchange(self, reactor, send: bytes) -> _Client:
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(_Echo), interface="127.0.0.1")
        client = _Client(reactor, send)
        factory = protocol.ClientFactory()
        factory.buildProtocol = lambda addr: client
        reactor.connectTCP("127.0.0.1", port.getHost().port, factory)
        reactor.callLater(5.0, reactor.stop)  # a bound, should the exchange hang
        reactor.run(installSignalHandlers=False)
        port.stopListening()
        return client

    def test_installed_data_flows(self) -> None:
        reactor = self.reactor()
        self.assertTrue(twisted_private.lean_dispatch(reactor, Logger()))
        self.assertTrue(twisted_private.lean_dispatch(reactor, Logger()))  # twice is once
        self.assertIs(reactor.doIteration, reactor.doPoll)
        self.assertEqual(reactor.doIteration.__name__, "do_poll")
        client = self.exchange(reactor, b"hello " * 1000)
        self.assertEqual(client.received, b"hello " * 1000)
        self.assertTrue(client.reason.check(ConnectionDone))

    def test_a_handlers_exception_still_closes_its_connection(self) -> None:
        reactor = self.reactor()
        twisted_private.lean_dispatch(reactor, Logger())
        client = self.exchange(reactor, b"boom")
        self.assertEqual(client.received, b"")
        self.assertIsNotNone(client.reason)  # the server side dropped it
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_what_escapes_the_handler_is_logged_and_the_loop_goes_on(self) -> None:
        reactor = self.reactor()
        real = reactor._doReadOrWrite
        failed: list[int] = []

        def once(selectable, fd, event):
            """Twisted's handler, but the first event's call fails outside it."""
            if not failed:
                failed.append(fd)
                raise ValueError("escaped")
            return real(selectable, fd, event)

        reactor._doReadOrWrite = once
        events: list[dict] = []
        self.assertTrue(twisted_private.lean_dispatch(reactor, Logger(observer=events.append)))
        # Epoll reports a socket until it is read: the failed event comes again.
        client = self.exchange(reactor, b"after the failure")
        self.assertEqual(client.received, b"after the failure")
        self.assertEqual(len(failed), 1)
        [event] = events
        self.assertIn("handling a socket event", event["log_format"])
        self.assertTrue(event["log_failure"].check(ValueError))

    def test_other_reactors_are_left_alone(self) -> None:
        clock = Clock()
        self.assertFalse(twisted_private.lean_dispatch(clock, Logger()))
        self.assertFalse(hasattr(clock, "doIteration"))

    def test_every_name_it_reads_is_there(self) -> None:
        self.assertEqual(twisted_private._missing_epoll_names(), [])


class SettingTests(TestCase):
    def env(self, **extra) -> dict:
        base = self.mktemp()
        env = {"CLAW_CONTEXT_ROOT": base + "/context", "CLAW_AUTH_DIR": base + "/auth",
               "CLLAMA_STATE_DIR": base + "/state", "CLLAMA_UI_TOKEN": "t" * 32}
        env.update(extra)
        return env

    def test_on_by_default_and_off_by_the_switch(self) -> None:
        self.assertTrue(Config.from_env(self.env()).lean_dispatch)
        for off in ("0", "off", "false"):
            self.assertFalse(Config.from_env(self.env(CLLAMA_LEAN_DISPATCH=off)).lean_dispatch)
        error = self.assertRaises(ConfigError, Config.from_env, self.env(CLLAMA_LEAN_DISPATCH="maybe"))
        self.assertIn("CLLAMA_LEAN_DISPATCH", str(error))

    def test_the_daemon_installs_it_unless_switched_off(self) -> None:
        self.addCleanup(gc.unfreeze)
        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        for env, installed in (({}, True), ({"CLLAMA_LEAN_DISPATCH": "0"}, False)):
            reactor = EPollReactor()
            self.addCleanup(LeanDispatchTests.close, None, reactor)
            build_daemon(Config.from_env(self.env(**env)), reactor, io.StringIO())
            self.assertEqual(getattr(reactor, "_cllama_lean_dispatch", False), installed)
            self.assertEqual(reactor.doIteration.__name__, "do_poll" if installed else "doPoll")
