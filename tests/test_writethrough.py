"""
Write-through TCP transports: with nothing buffered, a write reaches the
socket inside the call that makes it (the peer can read it before the
reactor turns again); what the kernel does not take is buffered in order
and pauses a producer as before; a broken peer still ends in
connectionLost.  Real sockets on the loopback.
"""

from __future__ import annotations

import hashlib
import io
import socket

from twisted.internet import defer, error, protocol, reactor, threads
from twisted.internet.interfaces import IPushProducer
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from cllama_tx import writethrough
from cllama_tx.config import Config, ConfigError
from cllama_tx.daemon import build_daemon


class Recorded(protocol.Protocol):
    def __init__(self, made: defer.Deferred, lost: defer.Deferred) -> None:
        self.made = made
        self.lost = lost

    def connectionMade(self) -> None:
        self.made.callback(self)

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


class WriteThroughTests(TestCase):
    def setUp(self) -> None:
        self.was_installed = writethrough.installed()
        self.addCleanup(self.restore)

    def restore(self) -> None:
        if self.was_installed:
            writethrough.install()
        else:
            writethrough.uninstall()

    async def connect(self):
        """A server-side transport of ours, and the peer's blocking socket."""
        made, lost = defer.Deferred(), defer.Deferred()
        factory = protocol.Factory.forProtocol(lambda: Recorded(made, lost))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        peer = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(peer.close)
        server = await made
        self.addCleanup(lambda: lost if lost.called else (server.transport.abortConnection(), lost)[1])
        return server, lost, peer

    async def test_sent_within_the_call(self) -> None:
        writethrough.install()
        server, _, peer = await self.connect()
        server.transport.write(b"hello")
        server.transport.writeSequence([b", ", b"world"])
        # No reactor turn since the writes: the bytes are already in the kernel.
        self.assertEqual(server.transport._tempDataLen, 0)
        peer.setblocking(False)
        self.assertEqual(peer.recv(100), b"hello, world")

    async def test_without_it_the_next_turn_sends(self) -> None:
        writethrough.uninstall()
        server, _, peer = await self.connect()
        server.transport.write(b"hello")
        peer.setblocking(False)
        self.assertRaises(BlockingIOError, peer.recv, 100)
        self.assertEqual(server.transport._tempDataLen, 5)  # buffered for the next turn

    async def test_what_the_kernel_refuses_is_buffered_in_order(self) -> None:
        writethrough.install()
        server, _, peer = await self.connect()
        producer = CountingProducer()
        server.transport.registerProducer(producer, True)
        big = bytes(range(256)) * (64 * 1024)  # 16 MiB: far more than the socket buffers
        tail = b"the end"
        server.transport.write(big)
        self.assertGreater(server.transport._tempDataLen, 0)  # the rest waits in the buffer
        self.assertGreater(producer.paused, 0)  # and backpressure reached the producer
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
        writethrough.install()
        server, lost, peer = await self.connect()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        peer.close()  # with linger 0: a reset
        for _ in range(50):
            server.transport.write(b"x" * 1000)  # must not raise
            if lost.called:
                break
        reason = await lost
        self.assertIsInstance(reason, (ConnectionResetError, error.ConnectionLost, error.ConnectionDone))

    def test_uninstall_restores_twisted(self) -> None:
        from twisted.internet import _newtls, tcp

        writethrough.install()
        writethrough.install()  # idempotent
        self.assertIs(tcp.Server.write, writethrough._write)
        writethrough.uninstall()
        self.assertIs(tcp.Server.write, _newtls.ConnectionMixin.write)
        self.assertIs(tcp.Client.writeSequence, _newtls.ConnectionMixin.writeSequence)
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
        was = writethrough.installed()
        self.addCleanup(writethrough.install if was else writethrough.uninstall)
        writethrough.uninstall()
        build_daemon(Config.from_env(self.env(CLLAMA_WRITE_THROUGH="0")), reactor, io.StringIO())
        self.assertFalse(writethrough.installed())
        build_daemon(Config.from_env(self.env()), reactor, io.StringIO())
        self.assertTrue(writethrough.installed())
