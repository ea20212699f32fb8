"""
One listening socket per worker on the API's TCP port (C{SO_REUSEPORT}),
where the kernel shares the new connections out, instead of one socket
every worker accepts from.

Why: on one shared socket every idle worker is woken for each new
connection and the first awake takes what waits.  Taking all of it sent a
client's whole keep-alive pool to one worker; taking at most four per
wake-up (L{cllama_tx.runtime.twisted_private.accept_fairly}) kept pools
even but left a flood of new connections waiting for busy workers: 1,000
streams opened in half a second waited up to 11 s for their first event
with two workers (1.8 s with one).  With a socket each, the kernel hashes
every connection to one of them, so pools and floods are shared out
alike, and each worker accepts everything that waits on its own socket.

The supervisor binds and holds the sockets: a worker that dies and is
started again adopts the same one, and connections that arrived in
between wait on it instead of being refused.  Endpoints that are not
plain TCP here (C{systemd:} sockets, which systemd binds once) keep the
shared socket.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.abstract import isIPv6Address
from twisted.logger import Logger

from cllama_tx.runtime.config import with_backlog

__all__ = ["PerWorkerListener", "listen_args", "supported"]

log = Logger()


def supported() -> bool:
    """Can this platform put several listening sockets on one port (Linux, the BSDs)?"""
    return hasattr(socket, "SO_REUSEPORT")


class _ListenArgsOf:
    """Stands in for the reactor while an endpoint string is parsed and listened with: keeps its arguments."""

    args: tuple[int, str, int] | None = None

    def listenTCP(self, port, factory, backlog=50, interface=""):
        self.args = (port, interface, backlog)

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        self.args = (port, interface, backlog)  # the worker adds the TLS, as on a shared socket


def listen_args(description: str) -> tuple[int, str, int] | None:
    """C{(port, interface, backlog)} of a C{tcp:}, C{tcp6:} or C{ssl:} endpoint; None for any other kind."""
    if description.partition(":")[0] not in ("tcp", "tcp6", "ssl"):
        return None
    catcher = _ListenArgsOf()
    try:
        endpoints.serverFromString(catcher, with_backlog(description)).listen(None)
    except Exception:
        return None
    return catcher.args


def _bind(interface: str, port: int, backlog: int) -> socket.socket:
    family = socket.AF_INET6 if isIPv6Address(interface) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((interface or ("::" if family == socket.AF_INET6 else ""), port))
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class PerWorkerListener(service.Service):
    """
    The supervisor's API listener for C{count} workers: C{count} sockets on
    one port, bound at start (a busy port stops the start, as L{Listener}'s
    does), never accepted on here.  Worker C{i} inherits socket C{i}.
    """

    shared = False  # each worker has its own socket

    def __init__(self, description: str, count: int, label: str) -> None:
        self.description = description
        self.count = count
        self.label = label
        self.sockets: list[socket.socket] = []

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.sockets:
            return
        args = listen_args(self.description)
        if args is None:
            raise RuntimeError(f"{self.label}: {self.description!r} is not a TCP endpoint")
        port, interface, backlog = args
        try:
            first = _bind(interface, port, backlog)
            self.sockets.append(first)
            port = first.getsockname()[1]  # port 0: the others share the one it got
            for _ in range(self.count - 1):
                self.sockets.append(_bind(interface, port, backlog))
        except OSError as e:
            self._close()
            from twisted.internet.error import CannotListenError

            raise CannotListenError(interface, port, e) from None
        log.info(
            "{label} listening on {interface}:{port} (a socket for each of {count} workers)",
            label=self.label, interface=interface or "*", port=port, count=self.count,
        )

    def startService(self) -> None:
        if not self.sockets:
            self.privilegedStartService()
        super().startService()

    def stopService(self) -> Any:
        super().stopService()
        if self.sockets:
            port = self.sockets[0].getsockname()[1]
            self._close()
            log.info("{label} sockets of port {port} closed", label=self.label, port=port)

    def _close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []

    def fileno_for(self, index: int) -> int:
        """The descriptor worker C{index} inherits."""
        if not self.sockets:
            raise RuntimeError(f"{self.label}: not listening")
        return self.sockets[index % len(self.sockets)].fileno()

    def getHost(self) -> tuple[str, int]:
        """The address the sockets are bound to."""
        host, port = self.sockets[0].getsockname()[:2]
        return host, port
