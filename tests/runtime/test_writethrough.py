"""
Write-through TCP transports: the writes one reactor callback makes on a
connection leave in one send() as that callback returns, before the
reactor's next turn, and the socket is not registered for writability;
what the kernel does not take is buffered in order and pauses a producer
as before; a broken peer still ends in connectionLost.  Real sockets on
the loopback, the real reactor.
"""

from __future__ import annotations

import hashlib
import io
import socket

from twisted.internet import defer, error, protocol, reactor, task, threads
from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from cllama_tx.runtime import writethrough
from cllama_tx.runtime.config import Config, ConfigError
from cllama_tx.runtime.daemon import build_daemon


class Recorded(protocol.Protocol):
    def __init__(self, made: defer.Deferred, lost: defer.Deferred) -> None:
        self.made = made
        self.lost = lost
        self.on_data = None

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data()

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(reason.value)  # the exception, not the Failure (an errback)


@implementer(IPushProducer)
class CountingProducer:
    def __init__(self) -> None:
        self.paused = 0

    def pauseProducing(self) -> None:
        self.paused += 1

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def peek(sock: socket.socket) -> bytes | None:
    """What the peer can read right now, without waiting (None: nothing)."""
    sock.setblocking(False)
    try:
        return sock.recv(1 << 16)
    except BlockingIOError:
        return None
    finally:
        sock.setblocking(True)


class WriteThroughTests(TestCase):
    def setUp(self) -> None:
        self.was_installed = writethrough.installed()
        self.addCleanup(self.restore)

    def restore(self) -> None:
        writethrough.uninstall()
        if self.was_installed:
            writethrough.install(reactor)

    async def connect(self):
        """A server-side protocol of ours, its connectionLost, and the peer's blocking socket."""
        made, lost = defer.Deferred(), defer.Deferred()
        factory = protocol.Factory.forProtocol(lambda: Recorded(made, lost))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(peer.close)
        server = await made

        def cleanup():
            if not lost.called:
                server.transport.abortConnection()
            return lost

        self.addCleanup(cleanup)
        return server, lost, peer

    async def answer_and_look(self, server, peer):
        """
        On the peer's next bytes, the server writes three pieces in its
        dataReceived; returns what the peer could read inside that callback,
        and in the reactor's next round of timed calls (before it polls again),
        and whether the socket was then registered for writability.
        """
        seen = {}
        done = defer.Deferred()

        def look():
            seen["after"] = peek(peer)
            seen["writing"] = server.transport in reactor.getWriters()
            done.callback(None)

        def on_data():
            server.transport.write(b"hello")
            server.transport.writeSequence([b", ", b"world"])
            seen["inside"] = peek(peer)
            reactor.callLater(0, look)

        server.on_data = on_data
        peer.sendall(b"go")
        await done
        return seen

    async def test_writes_leave_when_the_callback_returns(self) -> None:
        writethrough.install(reactor)
        server, _, peer = await self.connect()
        seen = await self.answer_and_look(server, peer)
        self.assertIsNone(seen["inside"])  # joined while the callback runs
        self.assertEqual(seen["after"], b"hello, world")  # sent before the next poll
        self.assertFalse(seen["writing"])  # never registered for writability

    async def test_without_it_the_next_turn_sends(self) -> None:
        writethrough.uninstall()
        server, _, peer = await self.connect()
        seen = await self.answer_and_look(server, peer)
        self.assertIsNone(seen["inside"])
        self.assertIsNone(seen["after"])  # still in Twisted's buffer
        self.assertTrue(seen["writing"])  # waiting for the next poll

    async def test_what_the_kernel_refuses_is_buffered_in_order(self) -> None:
        writethrough.install(reactor)
        server, _, peer = await self.connect()
        producer = CountingProducer()
        server.transport.registerProducer(producer, True)
        big = bytes(range(256)) * (64 * 1024)  # 16 MiB: far more than the socket buffers
        tail = b"the end"
        server.transport.write(big)
        await task.deferLater(reactor, 0, lambda: None)  # the callback has returned: sent
        self.assertGreater(server.transport._tempDataLen + len(server.transport.dataBuffer), 0)
        self.assertGreater(producer.paused, 0)  # the rest waits in the buffer, the producer too
        server.transport.write(tail)  # must not overtake the buffered rest

        def read_all(sock, n):
            sock.settimeout(30)
            digest, got = hashlib.sha256(), 0
            while got < n:
                data = sock.recv(1 << 20)
                if not data:
                    break
                digest.update(data)
                got += len(data)
            return got, digest.hexdigest()

        got, digest = await threads.deferToThread(read_all, peer, len(big) + len(tail))
        self.assertEqual(got, len(big) + len(tail))
        self.assertEqual(digest, hashlib.sha256(big + tail).hexdigest())

    async def test_broken_peer_still_loses_the_connection(self) -> None:
        writethrough.install(reactor)
        server, lost, peer = await self.connect()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()  # with linger 0: a reset
        for _ in range(20):
            server.transport.write(b"x" * 1000)  # must not raise
            await task.deferLater(reactor, 0, lambda: None)
            if lost.called:
                break
        reason = await lost
        self.assertIsInstance(reason, (ConnectionResetError, error.ConnectionLost, error.ConnectionDone))

    def test_install_and_uninstall(self) -> None:
        from twisted.internet import _newtls, tcp

        writethrough.uninstall()
        writethrough.install(reactor)
        writethrough.install(reactor)  # idempotent
        self.assertIs(tcp.Server.write, writethrough._write)
        self.assertIn("_doReadOrWrite", reactor.__dict__)
        self.assertIn("runUntilCurrent", reactor.__dict__)
        writethrough.uninstall()
        self.assertIs(tcp.Server.write, _newtls.ConnectionMixin.write)
        self.assertIs(tcp.Client.writeSequence, _newtls.ConnectionMixin.writeSequence)
        self.assertNotIn("_doReadOrWrite", reactor.__dict__)
        self.assertNotIn("runUntilCurrent", reactor.__dict__)
        self.assertFalse(writethrough.installed())


class SettingTests(TestCase):
    def env(self, **extra) -> dict:
        base = self.mktemp()
        env = {
            "CLAW_CONTEXT_ROOT": base + "/context",
            "CLAW_AUTH_DIR": base + "/auth",
            "CLLAMA_STATE_DIR": base + "/state",
            "CLLAMA_UI_TOKEN": "t" * 32,
        }
        env.update(extra)
        return env

    def test_values(self) -> None:
        self.assertTrue(Config.from_env(self.env()).write_through)
        for off in ("0", "off", "false", "NO"):
            self.assertFalse(Config.from_env(self.env(CLLAMA_WRITE_THROUGH=off)).write_through)
        for on in ("1", "on", "yes"):
            self.assertTrue(Config.from_env(self.env(CLLAMA_WRITE_THROUGH=on)).write_through)
        error = self.assertRaises(ConfigError, Config.from_env, self.env(CLLAMA_WRITE_THROUGH="maybe"))
        self.assertIn("CLLAMA_WRITE_THROUGH", str(error))

    def test_the_daemon_installs_it_unless_told_not_to(self) -> None:
        import gc

        was = writethrough.installed()
        self.addCleanup(lambda: writethrough.install(reactor) if was else writethrough.uninstall())
        self.addCleanup(gc.unfreeze)
        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        writethrough.uninstall()
        build_daemon(Config.from_env(self.env(CLLAMA_WRITE_THROUGH="0")), reactor, io.StringIO())
        self.assertFalse(writethrough.installed())
        build_daemon(Config.from_env(self.env()), reactor, io.StringIO())
        self.assertTrue(writethrough.installed())



class FlushFailureTests(TestCase):
    def test_one_failing_transport_does_not_strand_the_others(self) -> None:
        class Broken:
            """Not a transport we know: its fallback write raises."""

        sent = []

        class Fine:
            pass

        self.patch(writethrough, "_eligible", lambda t: False)
        originals = {Broken: lambda t, d: (_ for _ in ()).throw(RuntimeError("boom")),
                     Fine: lambda t, d: sent.append(d)}
        self.patch(writethrough, "_original", lambda t, name: originals[type(t)])
        broken, fine = Broken(), Fine()
        writethrough._flush({broken: [b"a"], fine: [b"b", b"c"]})
        self.assertEqual(sent, [b"bc"])
        [failure] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(failure.value), "boom")


class UnknownInternalsTests(TestCase):
    async def test_a_transport_without_the_expected_state_takes_twisted_path(self) -> None:
        from twisted.internet import tcp

        was = writethrough.installed()
        self.addCleanup(lambda: writethrough.install(reactor) if was else writethrough.uninstall())
        writethrough.install(reactor)
        made, lost = defer.Deferred(), defer.Deferred()
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: Recorded(made, lost)),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(peer.close)
        server = await made
        self.assertIsInstance(server.transport, tcp.Server)
        self.assertTrue(writethrough._eligible(server.transport))
        del server.transport._tempDataLen  # as if a Twisted release renamed it
        self.assertFalse(writethrough._eligible(server.transport))
        server.transport._tempDataLen = 0
        server.transport.abortConnection()
        await lost
