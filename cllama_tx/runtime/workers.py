"""
The supervisor of C{twistd -n cllama --workers N}: N worker processes on
one host, one listening socket per site shared by all of them.

The supervisor binds the API and UI sockets (or adopts systemd's) and never
accepts on them: it starts N copies of the daemon (the same Python, the
same environment, plus the markers of C{cllama_tx.runtime.worker_env}),
each of which adopts the sockets, and the kernel spreads the connections.
On a TCP port the API has a socket per worker (C{SO_REUSEPORT}, see
L{cllama_tx.runtime.reuseport}); the UI's socket, and systemd's, are shared.
Workers share state only through the store.

It forwards SIGHUP to every worker, and on SIGTERM stops accepting and
tells every worker to drain, then exits once all have: 0 when every worker
stopped cleanly, 1 when one failed.  A worker that dies while the host is
serving is started again after a pause that doubles with each failure in
a row.  When the supervisor itself dies its workers see their lifeline
pipe close and drain too.

Audit lines: each worker writes its own to a pipe that the supervisor
relays, whole lines only, to its stdout (see L{AuditRelay};
docs/DEPLOYMENT.md has the choice and its cost).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, TextIO

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.logger import Logger

from cllama_tx.runtime import reuseport
from cllama_tx.runtime.audit import open_audit_output
from cllama_tx.runtime.config import Config
from cllama_tx.runtime.daemon import AUDIT_FLUSH_GRACE, Listener, ensure_private_dir
from cllama_tx.runtime.errors import ConfigError
from cllama_tx.runtime.host_metrics import SUPERVISOR, SnapshotPublisher, prepare_dir, snapshot_dir
from cllama_tx.runtime.metrics import Family, Metrics, family_docs
from cllama_tx.runtime.reuseport import PerWorkerListener
from cllama_tx.runtime.worker_env import (
    API_FD,
    AUDIT_FD,
    LIFELINE_FD,
    READY,
    STATUS_FD,
    STDERR_FD,
    UI_FD,
    role_env,
)
from cllama_tx.sites.ui import TokenFileError, ensure_ui_token

log = Logger()

RESTART_FIRST = 0.5
"""Seconds before a dead worker is started again, the first time in a row."""

RESTART_MAX = 30.0
"""The longest pause between two starts of a worker that keeps dying."""

STABLE_AFTER = 60.0
"""A worker that served this long before it died starts a new row of failures."""

STOP_MARGIN = 5.0
"""Seconds past the drain grace a worker gets to exit on SIGTERM before it is killed."""

RELAY_PAUSE = 0.01
"""
After a short read of a worker's audit pipe, the supervisor leaves it
this long before reading again, so one wake-up relays the lines of many
requests instead of one (an audit line is at most this much later).
"""

_PIPE_READ = 8192  # what Twisted reads from a child's pipe at once: a full read means more waits

# The environment of systemd's socket activation names the supervisor;
# a worker gets its sockets by CLLAMA_WORKER_FDS instead.
_NOT_FOR_WORKERS = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")

# A worker that ended by one of these while the host was stopping did what it was told.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def restart_delay(failures: int) -> float:
    """The pause before the next start of a worker that died C{failures} times in a row."""
    return min(RESTART_MAX, RESTART_FIRST * 2 ** max(0, failures - 1))


class AuditRelay:
    """
    One worker's audit pipe cut into whole lines, each tagged with the
    worker's index (C{"worker": i}, the line's last field), so the lines of
    N workers never mix on the supervisor's stdout.  Only a line's end
    makes it leave: a partial line waits for the rest.
    """

    def __init__(self, index: int) -> None:
        self._tag = b',"worker":%d}\n' % index
        self._partial = b""

    def feed(self, data: bytes) -> list[bytes]:
        """The lines C{data} completes (newline included)."""
        if self._partial:
            data = self._partial + data
        end = data.rfind(b"\n")
        if end < 0:
            self._partial = data
            return []
        self._partial = data[end + 1:]
        tag = self._tag
        return [
            line[:-1] + tag if line[-1:] == b"}" else line + b"\n"
            for line in data[:end].split(b"\n")
            if line
        ]

    def end(self) -> int:
        """The worker's pipe closed: bytes of an unfinished line, dropped (not a JSON line)."""
        left, self._partial = len(self._partial), b""
        return left


class HeldListener(Listener):
    """
    A listener the supervisor binds and holds for its workers without ever
    accepting on it: the descriptor is what they inherit, every one of them.
    """

    shared = True

    def privilegedStartService(self):
        super().privilegedStartService()
        if self.port is not None:
            self.port.stopReading()  # type: ignore[attr-defined]

    def fileno(self) -> int:
        if self.port is None:
            raise RuntimeError(f"{self.label}: not listening")
        return self.port.fileno()  # type: ignore[attr-defined]

    def fileno_for(self, index: int) -> int:
        """The descriptor worker C{index} inherits: the one socket, shared."""
        return self.fileno()


def _describe(reason) -> tuple[str, bool]:
    """How a worker ended, and whether that is a clean stop (exit 0 or a stop signal)."""
    value = reason.value
    sig = getattr(value, "signal", None)
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by {name}", sig in _STOP_SIGNALS
    code = getattr(value, "exitCode", None) or 0
    return (f"exited with status {code}", code == 0)


class WorkerProcess(protocol.ProcessProtocol):
    """One worker: relays its audit lines, hears when it serves, reports its end."""

    def __init__(self, pool: WorkerPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.relay = AuditRelay(index)
        self.pid: int | None = None
        self.started_at = pool.clock.seconds()
        self.ready = False
        self.hangup_pending = False
        self._status = b""
        self._resume: Any = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == AUDIT_FD:
            lines = self.relay.feed(data)
            if lines:
                self.pool.write_audit(lines)
            if len(data) < _PIPE_READ and self._resume is None:
                self.transport.pauseProducing()  # type: ignore[union-attr]
                self._resume = self.pool.clock.callLater(RELAY_PAUSE, self._read_again)
        elif childFD == STATUS_FD and not self.ready:
            self._status += data
            if READY in self._status:
                self.ready = True
                self.pool.worker_ready(self)

    def _read_again(self) -> None:
        self._resume = None
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def childConnectionLost(self, childFD: int) -> None:
        if childFD == AUDIT_FD:
            left = self.relay.end()
            if left:
                log.warn(
                    "worker {index} (pid {pid}) ended in the middle of an audit line: {n} bytes dropped",
                    index=self.index, pid=self.pid, n=left,
                )

    def processEnded(self, reason) -> None:
        if self._resume is not None and self._resume.active():
            self._resume.cancel()
        self._resume = None
        self.pool.worker_ended(self, reason)

    def signal(self, name: str) -> None:
        try:
            self.transport.signalProcess(name)  # type: ignore[union-attr]
        except error.ProcessExitedAlready:
            pass


class WorkerPool(service.Service):
    """
    Starts the workers, starts again the ones that die, forwards signals,
    and on stop waits for every worker's drain.  C{failed} says whether one
    did not stop cleanly (the supervisor's exit status).
    """

    def __init__(
        self,
        reactor,
        config: Config,
        listeners: tuple[HeldListener | PerWorkerListener, HeldListener],
        write_audit: Callable[[list[bytes]], object],
        output=None,
        argv: list[str] | None = None,
    ) -> None:
        self._reactor = reactor
        self.clock = reactor
        self.config = config
        self.count = config.workers
        self._listeners = listeners
        self.write_audit = write_audit
        self._output = output
        self._argv = argv or [sys.executable, "-m", "cllama_tx.runtime.cli"]
        self.workers: dict[int, WorkerProcess] = {}
        self._failures = dict.fromkeys(range(self.count), 0)
        self._restarts: dict[int, Any] = {}
        self._stopping = False
        self._all_ended: defer.Deferred | None = None
        self.failed = False

    def startService(self) -> None:
        super().startService()
        self._reactor.callWhenRunning(self._start_all)

    def _start_all(self) -> None:
        for index in range(self.count):
            if not self._stopping and index not in self.workers:
                self._start(index)

    def _environment(self, index: int) -> dict[str, str]:
        env = {k: v for k, v in self.config.env.items() if k not in _NOT_FOR_WORKERS}
        env.update(role_env(index, self.count, own_api=not self._listeners[0].shared))
        return env

    def _start(self, index: int) -> None:
        self._restarts.pop(index, None)
        worker = WorkerProcess(self, index)
        api, ui = self._listeners
        try:
            self._reactor.spawnProcess(
                worker,
                self._argv[0],
                self._argv,
                env=self._environment(index),
                path=os.getcwd(),
                childFDs={
                    LIFELINE_FD: "w",  # we never write: its end of file is our death
                    AUDIT_FD: "r",
                    STDERR_FD: STDERR_FD,
                    STATUS_FD: "r",
                    API_FD: api.fileno_for(index),
                    UI_FD: ui.fileno_for(index),
                },
            )
        except OSError as e:  # out of processes or descriptors: later, like a death
            self._again(index, f"could not be started ({e})")
            return
        self.workers[index] = worker
        log.info("worker {index} started (pid {pid})", index=index, pid=worker.pid)

    def _again(self, index: int, how: str, lived: float = 0.0, pid: int | None = None) -> None:
        """Start worker C{index} again after a pause that doubles with each failure in a row."""
        failures = 1 if lived >= STABLE_AFTER else self._failures[index] + 1
        self._failures[index] = failures
        delay = restart_delay(failures)
        who = f"worker {index}" if pid is None else f"worker {index} (pid {pid})"
        log.error("{who} {how}; starting it again in {delay}s", who=who, how=how, delay=delay)
        self._restarts[index] = self.clock.callLater(delay, self._start, index)

    def worker_ready(self, worker: WorkerProcess) -> None:
        log.info("worker {index} (pid {pid}) ready", index=worker.index, pid=worker.pid)
        if worker.hangup_pending:
            worker.hangup_pending = False
            worker.signal("HUP")

    def worker_ended(self, worker: WorkerProcess, reason) -> None:
        if self.workers.get(worker.index) is worker:
            del self.workers[worker.index]
        how, clean = _describe(reason)
        if self._stopping:
            if clean:
                log.info("worker {index} (pid {pid}) stopped", index=worker.index, pid=worker.pid)
            else:
                self.failed = True
                log.error("worker {index} (pid {pid}) {how} while stopping", index=worker.index, pid=worker.pid, how=how)
            if not self.workers and self._all_ended is not None and not self._all_ended.called:
                self._all_ended.callback(None)
            return
        self._again(worker.index, how, self.clock.seconds() - worker.started_at, worker.pid)

    def forward(self, name: str) -> None:
        """Send signal C{name} to every worker (one that is starting gets a SIGHUP once it serves)."""
        for worker in list(self.workers.values()):
            if name == "HUP" and not worker.ready:
                worker.hangup_pending = True
            else:
                worker.signal(name)

    def stopService(self):
        super().stopService()
        self._stopping = True
        for call in self._restarts.values():
            if call.active():
                call.cancel()
        self._restarts.clear()
        return self._stop_workers()

    @defer.inlineCallbacks
    def _stop_workers(self):
        if self.workers:
            log.info("stopping {n} worker(s): each drains its requests", n=len(self.workers))
            self._all_ended = defer.Deferred()
            self.forward("TERM")
            limit = self.config.drain_grace + STOP_MARGIN
            timer = self.clock.callLater(limit, self._kill_the_rest, limit)
            yield self._all_ended
            if timer.active():
                timer.cancel()
        if self._output is not None:
            left = yield self._output.drain(AUDIT_FLUSH_GRACE)
            if left:
                log.warn("{lines} audit lines were not written: stdout was not read before shutdown", lines=left)

    def _kill_the_rest(self, limit: float) -> None:
        for worker in list(self.workers.values()):
            log.error("worker {index} (pid {pid}) still runs {limit}s after SIGTERM: killed", index=worker.index, pid=worker.pid, limit=limit)
            self.failed = True
            worker.signal("KILL")


class SupervisorSignals(service.Service):
    """
    SIGHUP goes to every worker; SIGTERM stops the host (the workers drain)
    and, unlike the reactor's own handler, leaves an exit status to the
    workers' outcome instead of dying by the signal.
    """

    def __init__(self, reactor, pool: WorkerPool) -> None:
        self._reactor = reactor
        self._pool = pool
        self._previous_hup: Any = None
        self._hup_installed = False
        self._stopping = False

    def privilegedStartService(self):
        # Before the listeners bind: a SIGHUP must never meet the default action.
        super().privilegedStartService()
        self._install_hup()

    def startService(self):
        super().startService()
        self._install_hup()
        # The reactor installs its own SIGTERM handler as it starts; ours after.
        self._reactor.callWhenRunning(self._install_term)

    def _install_hup(self) -> None:
        if self._hup_installed:
            return
        try:
            self._previous_hup = signal.signal(signal.SIGHUP, self._hangup)
            self._hup_installed = True
        except ValueError:  # not the main thread
            pass

    def _install_term(self) -> None:
        if not self.running:
            return
        try:
            signal.signal(signal.SIGTERM, self._terminate)
        except ValueError:
            pass

    def _hangup(self, signum, frame) -> None:
        self._reactor.callFromThread(log.info, "Received SIGHUP: every worker reloads.")
        self._reactor.callFromThread(self._pool.forward, "HUP")

    def _terminate(self, signum, frame) -> None:
        self._reactor.callFromThread(self._stop)

    def _stop(self) -> None:
        if self._stopping or not self._reactor.running:
            return
        self._stopping = True
        log.info("Received SIGTERM: stopping, the workers drain (grace {grace}s).", grace=self._pool.config.drain_grace)
        self._reactor.stop()

    def stopService(self):
        super().stopService()
        if self._hup_installed:
            signal.signal(signal.SIGHUP, self._previous_hup or signal.SIG_DFL)
            self._hup_installed = False


class Supervisor(service.MultiService):
    """The supervisor's service tree, with handles for tests and tooling."""

    pool: WorkerPool
    listeners: tuple[HeldListener | PerWorkerListener, HeldListener]


_RELAY_FAMILIES = ("cllama_audit_lines_dropped", "cllama_audit_buffer_bytes")


def _relay_families(metrics: Metrics) -> Callable[[], list[Family]]:
    """The supervisor's own figures: its audit relay's drops and what it holds."""
    return lambda: [f for f in family_docs(metrics.registry.collect()) if f["name"] in _RELAY_FAMILIES]


def build_supervisor(config: Config, reactor, audit_stream: TextIO, argv: list[str] | None = None) -> Supervisor:
    """
    The tree of C{--workers N}: the listeners last (so they close first on
    stop), the pool before them, which waits for the workers' drain.
    """
    ensure_private_dir(config.state_dir)
    if config.ui_token is None and not config.ui_no_auth:
        # Made here, once: N workers generating it at once would disagree.
        try:
            _token, path = ensure_ui_token(config.state_dir)
        except (OSError, TokenFileError) as e:
            raise ConfigError(f"cannot keep the operator UI token in {config.state_dir}: {e}") from None
        log.info("Operator UI token (no CLLAMA_UI_TOKEN set): the workers sign in with the contents of {path}", path=path)
    directory = snapshot_dir(config.state_dir)
    prepare_dir(directory)

    output = open_audit_output(audit_stream, reactor, config.audit_buffer_bytes)
    write_audit: Callable[[list[bytes]], object]
    if output is not None:
        write_audit = output.write_records
    else:  # an in-memory stream (tests)
        write_audit = lambda lines: (audit_stream.write(b"".join(lines).decode()), audit_stream.flush())  # noqa: E731
    metrics = Metrics()
    if output is not None:
        metrics.watch_audit_output(output)

    top = Supervisor()
    factory = protocol.Factory()  # never used: the supervisor accepts nothing
    factory.noisy = False
    api: HeldListener | PerWorkerListener
    if reuseport.supported() and reuseport.listen_args(config.api_endpoint) is not None:
        api = PerWorkerListener(config.api_endpoint, config.workers, "API")
    else:
        api = HeldListener(reactor, config.api_endpoint, factory, "API")
    listeners = (api, HeldListener(reactor, config.ui_endpoint, factory, "UI"))
    pool = WorkerPool(reactor, config, listeners, write_audit, output, argv)
    pool.setServiceParent(top)
    SnapshotPublisher(reactor, directory, SUPERVISOR, _relay_families(metrics), "supervisor").setServiceParent(top)
    SupervisorSignals(reactor, pool).setServiceParent(top)
    for listener in listeners:
        listener.setServiceParent(top)
    top.pool = pool
    top.listeners = listeners
    log.info("supervising {n} workers (pid {pid})", n=config.workers, pid=os.getpid())
    return top


def exit_with_status(supervisor: Supervisor) -> None:
    """
    At exit, a worker that failed to stop cleanly makes the supervisor's
    status 1 (twistd itself always returns 0).  Register before twistd
    starts its log observer: handlers run last-registered first, so the
    log is flushed before this one ends the process.
    """

    def finish() -> None:
        if supervisor.pool.failed:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            os._exit(1)

    atexit.register(finish)
