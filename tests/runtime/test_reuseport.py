"""
The API's sockets of C{--workers N} on a TCP port: one per worker on one
port (C{SO_REUSEPORT}), every new connection handed by the kernel to one of
them, and the endpoints that cannot (systemd's, UNIX sockets) told apart.
"""

from __future__ import annotations

import select
import socket

from twisted.internet.error import CannotListenError
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.runtime.reuseport import PerWorkerListener, listen_args


class ListenArgsTests(SynchronousTestCase):
    def test_tcp_kinds(self):
        self.assertEqual(listen_args("tcp:8080:interface=127.0.0.1"), (8080, "127.0.0.1", 1024))
        self.assertEqual(listen_args("tcp:0:interface=127.0.0.1:backlog=7"), (0, "127.0.0.1", 7))
        self.assertEqual(listen_args("tcp6:8080:interface=\\:\\:1"), (8080, "::1", 1024))
        self.assertEqual(listen_args("tcp:9000")[0:2], (9000, ""))

    def test_what_keeps_one_shared_socket(self):
        for description in ("systemd:domain=INET:index=0", "unix:/tmp/x.sock", "tcp:notaport"):
            self.assertIsNone(listen_args(description), description)


class PerWorkerListenerTests(SynchronousTestCase):
    def start(self, count=2, description="tcp:0:interface=127.0.0.1"):
        listener = PerWorkerListener(description, count, "API")
        listener.privilegedStartService()
        self.addCleanup(listener.stopService)
        return listener

    def test_one_socket_each_on_one_port(self):
        listener = self.start(3)
        self.assertEqual(len(listener.sockets), 3)
        ports = {sock.getsockname()[1] for sock in listener.sockets}
        self.assertEqual(len(ports), 1)
        self.assertEqual(listener.getHost(), ("127.0.0.1", ports.pop()))
        self.assertEqual(len({listener.fileno_for(i) for i in range(3)}), 3)
        self.assertFalse(listener.shared)

    def test_the_kernel_shares_the_connections_out(self):
        listener = self.start(2)
        port = listener.getHost()[1]
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
        self.addCleanup(lambda: [c.close() for c in clients])
        accepted = [0, 0]
        for index, sock in enumerate(listener.sockets):
            while select.select([sock], [], [], 0.5)[0]:
                conn, _ = sock.accept()
                conn.close()
                accepted[index] += 1
        self.assertEqual(sum(accepted), 64)
        self.assertTrue(all(accepted), accepted)  # all 64 on one socket: 1 chance in 2**63

    def test_a_busy_port_stops_the_start(self):
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        listener = PerWorkerListener(f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1", 2, "API")
        self.assertRaises(CannotListenError, listener.privilegedStartService)
        self.assertEqual(listener.sockets, [])

    def test_stop_closes_them(self):
        listener = self.start(2)
        sockets = list(listener.sockets)
        listener.stopService()
        self.assertTrue(all(sock.fileno() == -1 for sock in sockets))
        self.assertRaises(RuntimeError, listener.fileno_for, 0)
