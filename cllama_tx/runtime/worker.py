"""
One worker's side of C{--workers N} (the supervisor is
C{cllama_tx.runtime.workers}).

A worker is the ordinary daemon with five differences: it adopts the
listening sockets its supervisor bound instead of binding them (the kernel
spreads the connections over the workers); it accepts on the API socket
only once it serves (its budgets seeded), so a worker that is starting,
first or again after a crash, leaves new connections to the others or
lets them wait instead of refusing them; it drains and stops when its
supervisor is gone (its lifeline pipe reaches end of file), so no worker
outlives it; it tells the supervisor once it serves; and it publishes its
process-local metrics for the others to sum (C{cllama_tx.runtime.host_metrics}).
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Any

from twisted.application import service
from twisted.internet import defer, endpoints, error, fdesc, main
from twisted.internet.interfaces import IListeningPort, IReadDescriptor
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from cllama_tx.runtime import twisted_private
from cllama_tx.runtime.config import Config
from cllama_tx.runtime.errors import ConfigError
from cllama_tx.runtime.host_metrics import (
    SnapshotPublisher,
    read_peers,
    read_snapshot,
    snapshot_dir,
)
from cllama_tx.runtime.worker_env import READY, WorkerRole

log = Logger()


class _TlsContextOf:
    """
    Stands in for the reactor while an C{ssl:} endpoint string is parsed
    and listened with: keeps the TLS context it was given, binds nothing.
    """

    context: Any = None

    def listenSSL(self, port, factory, contextFactory, backlog=50, interface=""):
        self.context = contextFactory


def _tls_context(description: str):
    catcher = _TlsContextOf()
    endpoints.serverFromString(catcher, description).listen(None)
    if catcher.context is None:
        raise ConfigError(f"cannot build the TLS context of {description!r}")
    return catcher.context


def adopt_listener(reactor, fd: int, description: str, factory, shared: bool = True) -> IListeningPort:
    """
    Serve C{factory} on the inherited listening socket C{fd} (then closed:
    the port holds its own descriptor).  An C{ssl:} endpoint gets its TLS
    here, in the worker, as its own listener would.  C{shared}: every
    worker accepts from this socket (else it is this worker's own).
    """
    probe = socket.socket(fileno=os.dup(fd))
    family = probe.family
    probe.close()
    if description.partition(":")[0] == "ssl":
        factory = TLSMemoryBIOFactory(_tls_context(description), False, factory)
    fdesc.setNonBlocking(fd)
    try:
        port = reactor.adoptStreamPort(fd, family, factory)
    finally:
        os.close(fd)
    if shared:
        # Every worker is woken for a new connection: take a few, leave the next.
        twisted_private.accept_fairly(port)
    return port


@implementer(IReadDescriptor)
class Lifeline:
    """
    The read end of a pipe whose write end only the supervisor holds: end
    of file means the supervisor is gone (even by SIGKILL), and so must we.
    """

    def __init__(self, fd: int, on_lost) -> None:
        self._fd = fd
        self._on_lost = on_lost
        fdesc.setNonBlocking(fd)

    def fileno(self) -> int:
        return self._fd

    def doRead(self):
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        return None if data else main.CONNECTION_DONE

    def connectionLost(self, reason) -> None:
        self._on_lost()

    def logPrefix(self) -> str:
        return "lifeline"


class WorkerService(service.Service):
    """Watches the lifeline, says when this worker serves, leaves Ctrl-C to the supervisor."""

    def __init__(self, reactor, role: WorkerRole) -> None:
        self._reactor = reactor
        self.role = role
        self._lifeline: Lifeline | None = None

    def startService(self) -> None:
        super().startService()
        self._lifeline = Lifeline(self.role.lifeline_fd, self._supervisor_gone)
        self._reactor.addReader(self._lifeline)
        # Started after the listeners, before the reactor reads anything:
        # the API socket waits until this worker serves.
        for port in _api_ports(self.parent):
            port.stopReading()
        self._reactor.callWhenRunning(self._running)

    def _running(self) -> None:
        # A terminal's Ctrl-C reaches the whole process group: the
        # supervisor decides, and tells its workers with SIGTERM.  (After
        # the reactor's own handlers, which it installs as it starts.)
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
        # Ready once the budgets are loaded: until then metered requests are refused.
        _seeded(self.parent).addCallback(lambda _: self._serving())

    def _serving(self) -> None:
        if not self.running:
            return
        for port in _api_ports(self.parent):
            port.startReading()
        try:
            os.write(self.role.status_fd, READY)
            os.close(self.role.status_fd)
        except OSError:
            pass  # the supervisor is gone: the lifeline says so too
        log.info(
            "worker {index} of {count} (pid {pid}) serving",
            index=self.role.index, count=self.role.count, pid=os.getpid(),
        )

    def _supervisor_gone(self) -> None:
        self._lifeline = None
        if not self.running:
            return
        log.warn("the supervisor is gone: worker {index} drains and stops", index=self.role.index)
        try:
            self._reactor.stop()
        except error.ReactorNotRunning:
            pass

    def stopService(self):
        super().stopService()
        if self._lifeline is not None:
            self._reactor.removeReader(self._lifeline)
            self._lifeline = None


def _api_ports(daemon) -> list[Any]:
    """The listening ports of C{daemon}'s API listener (one, or none before it listens)."""
    from cllama_tx.runtime.daemon import Listener  # the daemon imports this module

    pending = [daemon] if daemon is not None else []
    ports = []
    while pending:
        node = pending.pop()
        if isinstance(node, Listener) and node.label == "API" and node.port is not None:
            ports.append(node.port)
        if isinstance(node, service.MultiService):
            pending.extend(node)
    return ports


def _seeded(daemon) -> defer.Deferred:
    """Fires once the daemon's budgets are seeded from the ledger (at once when it has no seed)."""
    from cllama_tx.runtime.daemon import GovernanceSeed  # the daemon imports this module

    pending = [daemon]
    while pending:
        node = pending.pop()
        if isinstance(node, GovernanceSeed):
            return _follow(node.done)
        if isinstance(node, service.MultiService):
            pending.extend(node)
    return defer.succeed(None)


def _follow(done: defer.Deferred) -> defer.Deferred:
    """A Deferred of our own that fires when C{done} does, leaving C{done}'s result as it was."""
    seeded: defer.Deferred = defer.Deferred()

    def fire(result):
        if not seeded.called:
            seeded.callback(None)
        return result

    done.addBoth(fire)
    return seeded


def attach_worker(daemon, config: Config, reactor) -> None:
    """Make C{daemon} (built by C{build_daemon} on the inherited sockets) one worker of the host."""
    role = config.worker
    if role is None:
        raise ValueError("attach_worker: not a worker")
    directory = snapshot_dir(config.state_dir)
    name = str(role.index)
    previous = read_snapshot(os.path.join(directory, name + ".json"))
    if previous is not None:
        daemon.metrics.carry(previous["families"])
    daemon.metrics.sum_with(lambda: read_peers(directory, name, reactor.seconds()))
    publisher = SnapshotPublisher(reactor, directory, name, daemon.metrics.local_families, "worker", role.index)
    publisher.setServiceParent(daemon)
    # After the drain (the services' stop), so its requests are counted.
    reactor.addSystemEventTrigger("after", "shutdown", publisher.publish)
    WorkerService(reactor, role).setServiceParent(daemon)
