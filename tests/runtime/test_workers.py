"""
Several worker processes on one host (`twistd -n cllama --workers N`): the
supervisor binds, the workers adopt and serve, signals reach them all,
audit lines arrive whole, /metrics sums the host.  Real twistd processes,
real sockets, real state directories; the pure parts without a reactor.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import sys

import treq
from twisted.internet import defer, error, reactor, task, utils
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.python import filepath
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface import implementer

from cllama_tx.runtime.config import Config
from cllama_tx.runtime.errors import ConfigError
from cllama_tx.runtime.host_metrics import (
    STALE_AFTER,
    SnapshotPublisher,
    prepare_dir,
    read_peers,
    read_snapshot,
    write_snapshot,
)
from cllama_tx.runtime.metrics import Metrics, Peer, family_docs, history_only, merge_families
from cllama_tx.runtime.worker_env import (
    WorkerEnvError,
    WorkerRole,
    parse_count,
    parse_role,
    role_env,
)
from cllama_tx.runtime.workers import (
    RESTART_MAX,
    STOP_MARGIN,
    AuditRelay,
    WorkerPool,
    restart_delay,
)
from cllama_tx.testing import (
    FakeProvider,
    Reply,
    openai_completion,
    openai_sse_events,
    openai_stream_chunks,
)
from tests.runtime.test_daemon import REPO, TWISTD, DaemonProcess
from tests.runtime.test_systemd import INSTALLED_BINARY, UNITS_DIR, _exec_start, _free_port, _tool
from tests.secret_scan import SCANNER
from tests.support import AGENT, PROVIDER_KEY, SECRET, chat_body, write_agent

UI_TOKEN = "workers-ui-token-2718281828"
SCANNER.register(UI_TOKEN)
READY = re.compile(rb"worker (\d+) \(pid (\d+)\) ready")
AUTH = {"Authorization": f"Bearer {AGENT}:{SECRET}"}


# --- pure parts -----------------------------------------------------------------------------


class WorkerEnvTests(SynchronousTestCase):
    def test_the_markers_round_trip(self):
        env = role_env(1, 3)
        self.assertEqual(env["CLLAMA_WORKERS"], "3")
        self.assertEqual(env["CLLAMA_WORKER_INDEX"], "1")
        self.assertEqual(parse_role(env), WorkerRole(1, 3, api_fd=4, ui_fd=5, lifeline_fd=0, status_fd=3))

    def test_no_marker_is_no_worker(self):
        self.assertIsNone(parse_role({"CLLAMA_WORKERS": "4"}))

    def test_bad_markers_say_what_is_wrong(self):
        good = role_env(0, 2)
        for change, needle in (
            ({"CLLAMA_WORKER_INDEX": "2"}, "below CLLAMA_WORKERS (2)"),
            ({"CLLAMA_WORKER_INDEX": "x"}, "below CLLAMA_WORKERS"),
            ({"CLLAMA_WORKER_FDS": "api:4,ui:5"}, "lacks lifeline, status"),
            ({"CLLAMA_WORKER_FDS": "api:4,api:5,lifeline:0,status:3"}, "cannot understand"),
            ({"CLLAMA_WORKER_FDS": ""}, "come together"),
        ):
            with self.assertRaises(WorkerEnvError) as caught:
                parse_role({**good, **change})
            self.assertIn(needle, str(caught.exception))

    def test_count(self):
        self.assertEqual(parse_count(None), 1)
        self.assertEqual(parse_count(" 8 "), 8)
        for bad in ("0", "65", "two", "-1"):
            self.assertRaises(WorkerEnvError, parse_count, bad)


class ConfigTests(SynchronousTestCase):
    def test_workers_from_the_environment(self):
        config = Config.from_env({"CLLAMA_WORKERS": "3"})
        self.assertEqual((config.workers, config.worker), (3, None))
        self.assertEqual(Config.from_env({}).workers, 1)

    def test_a_worker_knows_its_role(self):
        config = Config.from_env({**role_env(1, 2), "LISTEN_ADDR": "127.0.0.1:0"})
        self.assertEqual(config.worker.index, 1)

    def test_what_workers_cannot_do_is_refused_at_start(self):
        for env, demo, needle in (
            ({"CLLAMA_WORKERS": "2"}, True, "--demo runs in one process"),
            ({"CLLAMA_WORKERS": "2", "LISTEN_ADDR": "unix:/tmp/x.sock"}, False, "needs TCP listeners"),
            ({"CLLAMA_WORKERS": "100"}, False, "from 1 to 64"),
        ):
            with self.assertRaises(ConfigError) as caught:
                Config.from_env(env, demo=demo)
            self.assertIn(needle, str(caught.exception))
        # One process may listen on a UNIX socket as before.
        self.assertEqual(Config.from_env({"LISTEN_ADDR": "unix:/tmp/x.sock"}).workers, 1)


class AuditRelayTests(SynchronousTestCase):
    def test_only_whole_lines_leave_tagged_with_the_worker(self):
        relay = AuditRelay(3)
        self.assertEqual(relay.feed(b'{"type":"request"}\n{"type":"resp'), [b'{"type":"request","worker":3}\n'])
        self.assertEqual(relay.feed(b'onse"}'), [])
        self.assertEqual(relay.feed(b'\n'), [b'{"type":"response","worker":3}\n'])
        for line in [b'{"a":1}\n{"b":2}\n']:
            self.assertEqual([json.loads(x) for x in relay.feed(line)], [{"a": 1, "worker": 3}, {"b": 2, "worker": 3}])
        self.assertEqual(relay.end(), 0)

    def test_a_line_that_is_not_an_object_passes_as_it_is(self):
        relay = AuditRelay(0)
        self.assertEqual(relay.feed(b"not json\n\n"), [b"not json\n"])

    def test_an_unfinished_line_at_the_end_is_counted_not_written(self):
        relay = AuditRelay(0)
        relay.feed(b'{"half":')
        self.assertEqual(relay.end(), 8)
        self.assertEqual(relay.feed(b'{"next":1}\n'), [b'{"next":1,"worker":0}\n'])


class _Transport:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []
        self.paused = 0

    def signalProcess(self, name):
        self.signals.append(name)

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        self.paused -= 1


class _Reactor(Clock):
    """A clock that spawns nothing: it records what would have been started."""

    def __init__(self):
        super().__init__()
        self.spawned = []
        self.refuse = 0

    def callWhenRunning(self, f, *args):
        f(*args)

    def spawnProcess(self, proto, executable, args, env, path, childFDs):
        if self.refuse:
            self.refuse -= 1
            raise OSError(11, "Resource temporarily unavailable")
        proto.makeConnection(_Transport(1000 + len(self.spawned)))
        self.spawned.append((proto, env, childFDs))
        return proto.transport


class _Held:
    shared = True

    def __init__(self, fd):
        self._fd = fd

    def fileno(self):
        return self._fd

    def fileno_for(self, index):
        return self._fd


class _PerWorker:
    shared = False

    def fileno_for(self, index):
        return 20 + index


def _ended(code=0, sig=None):
    from twisted.internet.error import ProcessDone, ProcessTerminated
    from twisted.python.failure import Failure

    return Failure(ProcessDone(0) if code == 0 and sig is None else ProcessTerminated(code, sig))


class WorkerPoolTests(SynchronousTestCase):
    """The supervisor's decisions, on a clock: who is started, when again, with which signal."""

    def setUp(self):
        self.reactor = _Reactor()
        self.lines = []
        config = Config.from_env({"CLLAMA_WORKERS": "2", "LISTEN_FDS": "2", "LISTEN_PID": "1", "SECRET_KEY": "k"})
        self.pool = WorkerPool(self.reactor, config, (_Held(7), _Held(8)), self.lines.extend)
        self.pool.startService()

    def worker(self, index):
        return self.pool.workers[index]

    def test_starts_every_worker_with_its_markers_and_descriptors(self):
        self.assertEqual(len(self.reactor.spawned), 2)
        for index, (_proto, env, fds) in enumerate(self.reactor.spawned):
            self.assertEqual(parse_role(env).index, index)
            self.assertFalse(parse_role(env).own_api)  # systemd's socket is shared
            self.assertEqual(env["SECRET_KEY"], "k")  # the same environment
            self.assertNotIn("LISTEN_FDS", env)  # systemd's sockets are the supervisor's
            self.assertNotIn("LISTEN_PID", env)
            self.assertEqual(fds, {0: "w", 1: "r", 2: 2, 3: "r", 4: 7, 5: 8})

    def test_each_worker_gets_its_own_api_socket_when_there_is_one_each(self):
        pool = WorkerPool(self.reactor, self.pool.config, (_PerWorker(), _Held(8)), self.lines.extend)
        del self.reactor.spawned[:]
        pool.startService()
        for index, (_proto, env, fds) in enumerate(self.reactor.spawned):
            role = parse_role(env)
            self.assertEqual((role.index, role.own_api), (index, True))
            self.assertEqual((fds[4], fds[5]), (20 + index, 8))
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertFalse(parse_role(role_env(0, 2)).own_api)  # a shared socket says nothing

    def test_relays_whole_lines_and_pauses_after_a_short_read(self):
        worker = self.worker(0)
        worker.childDataReceived(1, b'{"a":1}\n{"b"')
        self.assertEqual(self.lines, [b'{"a":1,"worker":0}\n'])
        self.assertEqual(worker.transport.paused, 1)
        self.reactor.advance(0.01)
        self.assertEqual(worker.transport.paused, 0)
        worker.childDataReceived(1, b':2}\n' + b"x" * 8192)  # a full read: more is waiting
        self.assertEqual(worker.transport.paused, 0)
        self.assertEqual(self.lines[-1], b'{"b":2,"worker":0}\n')

    def test_a_dead_worker_comes_back_after_a_doubling_pause(self):
        for attempt, delay in enumerate((0.5, 1.0, 2.0)):
            worker = self.worker(1)
            worker.processEnded(_ended(sig=9))
            self.assertNotIn(1, self.pool.workers)
            self.reactor.advance(delay - 0.01)
            self.assertNotIn(1, self.pool.workers)
            self.reactor.advance(0.01)
            self.assertEqual(self.worker(1).index, 1, attempt)
        # One that served a minute starts a new row.
        self.reactor.advance(60)
        self.worker(1).processEnded(_ended(code=3))
        self.reactor.advance(0.5)
        self.assertIn(1, self.pool.workers)
        self.assertEqual(len(self.reactor.spawned), 6)
        self.assertFalse(self.pool.failed)

    def test_a_refused_start_is_tried_again(self):
        self.reactor.refuse = 1
        self.worker(0).processEnded(_ended(sig=9))
        self.reactor.advance(0.5)  # the start fails (no process left)
        self.assertNotIn(0, self.pool.workers)
        self.reactor.advance(1.0)
        self.assertIn(0, self.pool.workers)

    def test_sighup_waits_for_a_worker_that_is_starting(self):
        self.worker(0).childDataReceived(3, b"ready\n")
        self.pool.forward("HUP")
        self.assertEqual(self.worker(0).transport.signals, ["HUP"])
        self.assertEqual(self.worker(1).transport.signals, [])
        self.worker(1).childDataReceived(3, b"rea")
        self.worker(1).childDataReceived(3, b"dy\n")
        self.assertEqual(self.worker(1).transport.signals, ["HUP"])

    def test_stop_drains_every_worker_and_restarts_none(self):
        self.worker(1).processEnded(_ended(sig=9))  # a restart is pending
        stopped = []
        self.pool.stopService().addCallback(stopped.append)
        self.assertEqual(self.worker(0).transport.signals, ["TERM"])
        self.reactor.advance(5)
        self.assertEqual(len(self.reactor.spawned), 2)  # the pending restart was cancelled
        self.worker(0).processEnded(_ended(sig=signal.SIGTERM))  # what we asked for: clean
        self.assertEqual(stopped, [None])
        self.assertFalse(self.pool.failed)

    def test_a_worker_that_fails_its_drain_fails_the_host(self):
        stopped = []
        self.pool.stopService().addCallback(stopped.append)
        self.worker(0).processEnded(_ended(code=0))
        self.worker(1).processEnded(_ended(code=1))
        self.assertEqual(stopped, [None])
        self.assertTrue(self.pool.failed)

    def test_a_worker_that_does_not_stop_is_killed(self):
        stopped = []
        self.pool.stopService().addCallback(stopped.append)
        self.worker(0).processEnded(_ended(code=0))
        self.reactor.advance(self.pool.config.drain_grace + STOP_MARGIN)
        self.assertEqual(self.worker(1).transport.signals, ["TERM", "KILL"])
        self.worker(1).processEnded(_ended(sig=signal.SIGKILL))
        self.assertEqual(stopped, [None])
        self.assertTrue(self.pool.failed)


class RestartDelayTests(SynchronousTestCase):
    def test_doubles_up_to_the_cap(self):
        self.assertEqual([restart_delay(n) for n in (1, 2, 3, 4)], [0.5, 1.0, 2.0, 4.0])
        self.assertEqual(restart_delay(30), RESTART_MAX)


def _counter_family(name, value, labels=None, created=100.0):
    labels = labels or {}
    return {
        "name": name, "type": "counter", "help": "h", "unit": "",
        "samples": [[name + "_total", labels, value], [name + "_created", labels, created]],
    }


def _gauge_family(name, value):
    return {"name": name, "type": "gauge", "help": "h", "unit": "", "samples": [[name, {}, value]]}


class MergeTests(SynchronousTestCase):
    def test_samples_add_up_and_created_is_the_earliest(self):
        merged = merge_families([
            [_counter_family("c", 2, {"a": "x"}, created=50), _gauge_family("g", 1)],
            [_counter_family("c", 3, {"a": "x"}, created=40), _counter_family("c", 7, {"a": "y"}), _gauge_family("g", 4)],
        ])
        by_name = {f["name"]: f["samples"] for f in merged}
        self.assertEqual(
            by_name["c"],
            [["c_total", {"a": "x"}, 5], ["c_created", {"a": "x"}, 40], ["c_total", {"a": "y"}, 7], ["c_created", {"a": "y"}, 100.0]],
        )
        self.assertEqual(by_name["g"], [["g", {}, 5]])

    def test_history_keeps_what_only_grows(self):
        families = [_counter_family("c", 1), _gauge_family("g", 1)]
        self.assertEqual([f["name"] for f in history_only(families)], ["c"])

    def test_histograms_merge_bucket_by_bucket(self):
        a, b = Metrics(), Metrics()
        a.latency.observe(("chat",), 0.02)
        b.latency.observe(("chat",), 3)
        b.latency.observe(("messages",), 0.2)
        [merged] = [f for f in merge_families([family_docs(a.registry.collect()), family_docs(b.registry.collect())])
                    if f["name"] == "cllama_request_latency_seconds"]
        samples = {(name, tuple(sorted(labels.items()))): value for name, labels, value in merged["samples"]}
        self.assertEqual(samples[("cllama_request_latency_seconds_count", (("surface", "chat"),))], 2)
        self.assertEqual(samples[("cllama_request_latency_seconds_bucket", (("le", "0.025"), ("surface", "chat")))], 1)
        self.assertEqual(samples[("cllama_request_latency_seconds_bucket", (("le", "+Inf"), ("surface", "chat")))], 2)
        self.assertEqual(samples[("cllama_request_latency_seconds_count", (("surface", "messages"),))], 1)


def _scrape(metrics: Metrics) -> dict:
    """name{labels} -> value from the exposition text."""
    values = {}
    for line in metrics.render().decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            values[key] = float(value)
    return values


class HostMetricsTests(SynchronousTestCase):
    def test_one_process_reports_one_worker(self):
        metrics = Metrics()
        metrics.stream_started()
        values = _scrape(metrics)
        self.assertEqual((values["cllama_workers"], values["cllama_inflight_streams"]), (1.0, 1.0))

    def test_the_host_is_the_sum_of_fresh_peers_and_the_history_of_stale_ones(self):
        metrics = Metrics()
        metrics.inflight_streams.set(1)
        metrics.audit_lines_dropped.inc(2)
        peer = Metrics()
        peer.inflight_streams.set(5)
        peer.audit_lines_dropped.inc(10)
        gone = Metrics()
        gone.inflight_streams.set(100)
        gone.audit_lines_dropped.inc(1000)
        supervisor = [_counter_family("cllama_audit_lines_dropped", 3)]
        metrics.sum_with(lambda: [
            Peer(family_docs(peer.registry.collect()), fresh=True),
            Peer(family_docs(gone.registry.collect()), fresh=False),
            Peer(supervisor, fresh=True, worker=False),
        ])
        values = _scrape(metrics)
        self.assertEqual(values["cllama_workers"], 2.0)  # this one and the fresh peer
        self.assertEqual(values["cllama_inflight_streams"], 6.0)  # a dead worker streams nothing
        self.assertEqual(values["cllama_audit_lines_dropped_total"], 1015.0)  # but what it counted stays

    def test_a_successor_carries_its_predecessors_counters(self):
        before = Metrics()
        before.audit_lines_dropped.inc(7)
        before.inflight_streams.set(3)
        after = Metrics()
        after.carry(before.local_families())
        after.audit_lines_dropped.inc(1)
        values = _scrape(after)
        self.assertEqual((values["cllama_audit_lines_dropped_total"], values["cllama_inflight_streams"]), (8.0, 0.0))
        # ...and publishes them as its own, for the next one.
        again = Metrics()
        again.carry(after.local_families())
        self.assertEqual(_scrape(again)["cllama_audit_lines_dropped_total"], 8.0)


class SnapshotFileTests(SynchronousTestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())

    def test_written_private_and_read_back(self):
        prepare_dir(self.dir)
        self.assertEqual(stat.S_IMODE(os.stat(self.dir).st_mode), 0o700)
        write_snapshot(self.dir, "0", {"written_at": 10.0, "families": [_gauge_family("g", 1)]})
        path = os.path.join(self.dir, "0.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(read_snapshot(path)["families"][0]["name"], "g")
        self.assertEqual(sorted(os.listdir(self.dir)), ["0.json"])  # no temporary file left

    def test_peers_are_the_others_fresh_or_not(self):
        prepare_dir(self.dir)
        for name, at in (("0", 100.0), ("1", 100.0 - STALE_AFTER - 1), ("supervisor", 99.0)):
            write_snapshot(self.dir, name, {"written_at": at, "role": "supervisor" if name == "supervisor" else "worker", "families": []})
        with open(os.path.join(self.dir, "2.json"), "w") as f:
            f.write("{not json")
        peers = read_peers(self.dir, "0", now=100.0)
        self.assertEqual([(p.fresh, p.worker) for p in peers], [(False, True), (True, False)])

    def test_a_new_supervisor_starts_from_nothing(self):
        prepare_dir(self.dir)
        write_snapshot(self.dir, "0", {"written_at": 1.0, "families": []})
        prepare_dir(self.dir)
        self.assertEqual(os.listdir(self.dir), [])

    def test_the_publisher_writes_at_start_every_second_and_at_stop(self):
        from twisted.internet.task import Clock

        prepare_dir(self.dir)
        clock, calls = Clock(), []
        publisher = SnapshotPublisher(clock, self.dir, "1", lambda: calls.append(1) or [], "worker", 1)
        publisher.startService()
        clock.advance(1.0)
        clock.advance(1.0)
        publisher.stopService()
        self.assertEqual(len(calls), 4)
        doc = read_snapshot(os.path.join(self.dir, "1.json"))
        self.assertEqual((doc["index"], doc["role"], doc["pid"], doc["written_at"]), (1, "worker", os.getpid(), 2.0))


class AdoptTests(TestCase):
    """A worker serves on a socket bound elsewhere, over TLS too."""

    @defer.inlineCallbacks
    def test_adopts_an_inherited_socket(self):
        from twisted.web.resource import Resource
        from twisted.web.server import Site
        from twisted.web.static import Data

        from cllama_tx.runtime.worker import adopt_listener

        bound = socket.socket()
        bound.bind(("127.0.0.1", 0))
        bound.listen(8)
        address = bound.getsockname()
        root = Resource()
        root.putChild(b"x", Data(b"adopted", "text/plain"))
        port = adopt_listener(reactor, os.dup(bound.fileno()), "tcp:0", Site(root))
        self.addCleanup(port.stopListening)
        bound.close()  # the supervisor's copy may go: the worker's own descriptor serves
        pool = HTTPConnectionPool(reactor, persistent=False)
        body = yield treq.get(f"http://127.0.0.1:{address[1]}/x", pool=pool).addCallback(treq.content)
        self.assertEqual(body, b"adopted")


# --- real processes -------------------------------------------------------------------------


class HostProcess(DaemonProcess):
    """A supervisor's output: its workers' audit lines, its own and its workers' logs."""

    def __init__(self):
        super().__init__()
        self._checks = []

    def outReceived(self, data):
        super().outReceived(data)
        self._check()

    def errReceived(self, data):
        super().errReceived(data)
        self._check()

    def _check(self):
        for check, d in list(self._checks):
            found = check()
            if found:
                self._checks.remove((check, d))
                d.callback(found)

    def wait(self, check):
        """Fires with C{check()} once it is true (checked on every output)."""
        found = check()
        if found:
            return defer.succeed(found)
        d = defer.Deferred()
        self._checks.append((check, d))
        return d

    def ready_workers(self) -> dict[int, int]:
        """Worker index -> pid of the last start that said it serves."""
        return {int(index): int(pid) for index, pid in READY.findall(self.stderr)}

    def wait_ready(self, count, exclude=()):
        def check():
            ready = self.ready_workers()
            if len(ready) == count and not set(ready.values()) & set(exclude):
                return ready
            return None

        return self.wait(check)

    def count_in_stderr(self, needle: bytes) -> int:
        return self.stderr.count(needle)


def spawn_host(testcase, env, args=()):
    process = HostProcess()
    full_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1", **env}
    command = [TWISTD, "--pidfile=", "-n", "cllama", *args]
    transport = reactor.spawnProcess(process, command[0], command, env=full_env, path=REPO)

    def stop():
        if process.ended.called:
            return None
        try:
            transport.signalProcess("TERM")
        except error.ProcessExitedAlready:
            return None
        return process.ended

    testcase.addCleanup(stop)
    return process, transport


@implementer(IReadDescriptor)
class _ProcessExit:
    """A pidfd: readable once the process exited, whoever its parent is."""

    def __init__(self, pid):
        self._fd = os.pidfd_open(pid)
        self.ended = defer.Deferred()
        reactor.addReader(self)

    def fileno(self):
        return self._fd

    def doRead(self):
        reactor.removeReader(self)
        os.close(self._fd)
        self._fd = -1
        self.ended.callback(None)

    def connectionLost(self, reason):
        pass

    def logPrefix(self):
        return "pidfd"


def _state(pid) -> str | None:
    """A process's state letter (R, S, Z, ...), None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except FileNotFoundError:
        return None


def exited(pid) -> defer.Deferred:
    try:
        return _ProcessExit(pid).ended
    except ProcessLookupError:
        return defer.succeed(None)


class _Raw(Protocol):
    """A raw streamed response; fires when it holds a needle, and when it ends."""

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
        waiters, self._waiters = self._waiters, []
        for needle, d in waiters:  # what was awaited will never come: say what came instead
            d.errback(AssertionError(f"connection closed before {needle!r}: {self.data[:300]!r}"))
        self.lost.callback(reason.value)


class SnapshotWatch:
    """Fires when every worker's snapshot was rewritten after a moment (inotify: no polling)."""

    def __init__(self, testcase, directory):
        from twisted.internet import inotify

        self.directory = directory
        self._notifier = inotify.INotify()
        self._notifier.startReading()
        testcase.addCleanup(self._notifier.loseConnection)
        self._notifier.watch(filepath.FilePath(directory), mask=inotify.IN_MOVED_TO, callbacks=[self._changed])
        self._waiters = []

    def snapshots(self) -> dict[str, dict]:
        found = {}
        for name in os.listdir(self.directory):
            if name.endswith(".json"):
                doc = read_snapshot(os.path.join(self.directory, name))
                if doc is not None:
                    found[name[: -len(".json")]] = doc
        return found

    def _changed(self, *_):
        for check, d in list(self._waiters):
            if check(self.snapshots()):
                self._waiters.remove((check, d))
                d.callback(self.snapshots())

    def wait_written_after(self, moment, names):
        def check(snapshots):
            return all(name in snapshots and snapshots[name]["written_at"] > moment for name in names)

        if check(self.snapshots()):
            return defer.succeed(self.snapshots())
        d = defer.Deferred()
        self._waiters.append((check, d))
        return d


def requests_total(snapshot_or_text) -> float:
    """The 2xx requests a snapshot or an exposition counts."""
    if isinstance(snapshot_or_text, dict):
        return sum(
            value
            for family in snapshot_or_text["families"] if family["name"] == "cllama_requests"
            for name, labels, value in family["samples"]
            if name == "cllama_requests_total" and labels["status_class"] == "2xx"
        )
    return sum(
        float(line.rpartition(" ")[2])
        for line in snapshot_or_text.splitlines()
        if line.startswith("cllama_requests_total{") and 'status_class="2xx"' in line
    )


def _sample(snapshot, name, labels) -> float:
    [value] = [v for f in snapshot["families"] for n, la, v in f["samples"] if n == name and la == labels]
    return value


def gauge(text, name) -> float:
    [value] = [float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(name + " ")]
    return value


class WorkersTests(TestCase):
    timeout = 90

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
            "CLLAMA_UI_TOKEN": UI_TOKEN,
        }
        pool = HTTPConnectionPool(reactor, persistent=False)  # every request its own connection
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    @defer.inlineCallbacks
    def start(self, env=None, args=("--workers", "2"), count=2):
        process, transport = spawn_host(self, env or self.env, args)
        ports = yield process.ready
        pids = yield process.wait_ready(count)
        return process, transport, ports, pids

    @defer.inlineCallbacks
    def spread_requests(self, process, api, batch=6, most=16):
        """
        Requests held in flight, each on its own connection, a few at once
        (the kernel hashes each connection to one worker's socket; on a
        shared socket a worker accepts at most 4 per wake-up, so a batch of
        6 needs two accepts), until both workers hold one: the proof that
        both serve.
        """
        gate = defer.Deferred()
        answer = openai_completion("hi", "gpt-4o-mini", 5, 1)
        self.fake.enqueue(*[Reply(json=answer, hold_until=gate) for _ in range(batch * most)])
        answers = []
        for _ in range(most):
            answers.extend(self.http.post(api, json=chat_body(), headers=AUTH) for _ in range(batch))
            sent = len(answers)
            yield process.wait(lambda sent=sent: len(self.request_lines(process)) >= sent)
            workers = {x["worker"] for x in self.request_lines(process)}
            if workers == {0, 1}:
                break
        gate.callback(None)
        responses = yield defer.gatherResults(answers)
        self.assertEqual([r.code for r in responses], [200] * len(responses))
        for r in responses:
            yield r.content()
        return workers, len(responses)

    @staticmethod
    def request_lines(process):
        return [x for x in process.audit_lines() if x["type"] == "request"]

    @defer.inlineCallbacks
    def test_both_workers_serve_and_metrics_sum_them(self):
        """
        With CLLAMA_WORKERS=2 (the environment spelling of --workers) the
        supervisor's two workers, two pids, both accept connections on the
        one API port; every audit line arrives whole, tagged with its
        worker; /metrics answered by either worker counts every request.
        """
        process, _transport, ports, pids = yield self.start(dict(self.env, CLLAMA_WORKERS="2"), args=())
        self.assertEqual(len(set(pids.values())), 2)
        api = f"http://127.0.0.1:{ports['API']}/v1/chat/completions"
        watch = SnapshotWatch(self, os.path.join(self.state, "workers"))
        workers, held = yield self.spread_requests(process, api)
        self.assertEqual(workers, {0, 1}, "one worker took every connection")
        more = yield defer.gatherResults([self.http.post(api, json=chat_body(), headers=AUTH) for _ in range(10)])
        for r in more:
            self.assertEqual(r.code, 200)
            yield r.content()
        total = held + 10
        yield process.wait(lambda: len([x for x in process.audit_lines() if x["type"] == "response"]) == total)
        lines = process.audit_lines()
        self.assertEqual({x["worker"] for x in lines}, {0, 1})
        last = reactor.seconds()
        snapshots = yield watch.wait_written_after(last, ["0", "1"])
        self.assertEqual({snapshots["0"]["pid"], snapshots["1"]["pid"]}, set(pids.values()))
        served = {name: requests_total(snapshots[name]) for name in ("0", "1")}
        self.assertEqual(sum(served.values()), total)
        self.assertTrue(all(served.values()), served)
        # Several scrapes (connections spread over both workers): each sums the host.
        for _ in range(4):
            scrape = yield self.http.get(
                f"http://127.0.0.1:{ports['UI']}/metrics", headers={"Authorization": f"Bearer {UI_TOKEN}"}
            )
            text = (yield scrape.content()).decode()
            self.assertEqual(requests_total(text), total)
            self.assertEqual(gauge(text, "cllama_workers"), 2.0)
            # Gauges add up too: the host's connection cap is both workers' caps.
            self.assertEqual(
                gauge(text, 'cllama_connections_cap{listener="api"}'),
                sum(_sample(snapshots[name], "cllama_connections_cap", {"listener": "api"}) for name in ("0", "1")),
            )
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(self.state, "workers", "0.json")).st_mode), 0o600)

    @defer.inlineCallbacks
    def test_sighup_reaches_every_worker(self):
        process, transport, _ports, _pids = yield self.start()
        transport.signalProcess("HUP")
        reloads = yield process.wait(
            lambda: [x for x in process.audit_lines() if x.get("action") == "reload"] if len(
                [x for x in process.audit_lines() if x.get("action") == "reload"]) == 2 else None
        )
        self.assertEqual(sorted(x["worker"] for x in reloads), [0, 1])
        self.assertEqual({x["actor"] for x in reloads}, {"SIGHUP"})
        # Still serving after the reload, and nobody restarted (the log says why if one was).
        self.assertEqual(process.count_in_stderr(b"starting it again"), 0, process.stderr.decode(errors="replace")[-4000:])

    @defer.inlineCallbacks
    def start_stream(self, port):
        body = json.dumps(chat_body(stream=True)).encode()
        raw = _Raw()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), raw)
        raw.transport.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer " + f"{AGENT}:{SECRET}".encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        yield raw.wait_for(b"data: ")
        return raw

    @defer.inlineCallbacks
    def streams_on_both_workers(self, process, port, pieces=8, delay=0.4, batch=6, most=10):
        """
        Slow streams, a few at once, until each worker relays one (as in
        L{spread_requests}).
        """
        chunks = openai_sse_events(openai_stream_chunks([str(i) for i in range(pieces)], "gpt-4o-mini", 5, pieces))
        self.fake.enqueue(*[Reply(sse=chunks, delay_between_chunks=delay) for _ in range(batch * most)])
        streams = []
        for _ in range(most):
            streams.extend((yield defer.gatherResults([self.start_stream(port) for _ in range(batch)])))
            if {x["worker"] for x in self.request_lines(process)} == {0, 1}:
                return streams
        self.fail("one worker took every connection")

    @defer.inlineCallbacks
    def test_sigterm_drains_every_worker_and_exits_0(self):
        process, transport, ports, pids = yield self.start()
        streams = yield self.streams_on_both_workers(process, ports["API"])
        transport.signalProcess("TERM")
        # The supervisor's sockets and both workers' close: new connections are refused.
        closed = f"(TCP Port {ports['API']} Closed)".encode()
        held = f"API sockets of port {ports['API']} closed".encode()
        yield process.wait(lambda: process.count_in_stderr(closed) == 2 and process.count_in_stderr(held) == 1)
        # Twisted says a port closed just before it closes it (in another
        # process here): a connection may still land in that instant.
        for _ in range(40):
            try:
                client = yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", ports["API"]), Protocol())
            except error.ConnectionRefusedError:
                break
            client.transport.abortConnection()
            yield task.deferLater(reactor, 0.05, lambda: None)
        else:
            self.fail("the API port still takes connections 2 s after every socket of it closed")
        self.assertFalse(any(raw.lost.called for raw in streams))
        for raw in streams:
            yield raw.lost
            self.assertIn(b"data: [DONE]", raw.data)
        code = yield process.ended
        self.assertEqual((code, process.signal), (0, None))
        responses = [x for x in process.audit_lines() if x["type"] == "response"]
        self.assertEqual(len(responses), len(streams))
        self.assertEqual({x["worker"] for x in responses}, {0, 1})
        self.assertEqual({x["status_code"] for x in responses}, {200})
        for pid in pids.values():
            self.assertIn(f"(pid {pid}) stopped".encode(), process.stderr)
        # Each worker's last snapshot, written after its drain, counts the streams it finished then.
        for index in (0, 1):
            snapshot = read_snapshot(os.path.join(self.state, "workers", f"{index}.json"))
            self.assertEqual(requests_total(snapshot), len([x for x in responses if x["worker"] == index]))
        self.assertNotIn(b"Traceback", process.stderr)

    @defer.inlineCallbacks
    def test_a_worker_that_fails_the_drain_makes_the_exit_status_1(self):
        process, transport, ports, pids = yield self.start()
        yield self.streams_on_both_workers(process, ports["API"], pieces=40, delay=0.5)
        transport.signalProcess("TERM")
        yield process.wait_for_stderr(b"stopping 2 worker(s)")
        os.kill(pids[1], signal.SIGKILL)
        code = yield process.ended
        self.assertEqual(code, 1)
        self.assertIn(f"worker 1 (pid {pids[1]}) was killed by SIGKILL while stopping".encode(), process.stderr)

    @defer.inlineCallbacks
    def test_a_killed_worker_is_started_again_and_keeps_its_counts(self):
        process, _transport, ports, pids = yield self.start()
        api = f"http://127.0.0.1:{ports['API']}/v1/chat/completions"
        watch = SnapshotWatch(self, os.path.join(self.state, "workers"))
        _workers, served = yield self.spread_requests(process, api)
        snapshots = yield watch.wait_written_after(reactor.seconds(), ["0", "1"])
        self.assertGreater(requests_total(snapshots["1"]), 0)
        os.kill(pids[1], signal.SIGKILL)
        # Meanwhile the other worker takes every connection.
        during = yield defer.gatherResults([self.http.post(api, json=chat_body(), headers=AUTH) for _ in range(6)])
        for r in during:
            self.assertEqual(r.code, 200)
            yield r.content()
        again = yield process.wait_ready(2, exclude=[pids[1]])
        self.assertNotEqual(again[1], pids[1])
        self.assertEqual(again[0], pids[0])
        self.assertIn(f"worker 1 (pid {pids[1]}) was killed by SIGKILL; starting it again in 0.5s".encode(), process.stderr)
        after = yield defer.gatherResults([self.http.post(api, json=chat_body(), headers=AUTH) for _ in range(6)])
        for r in after:
            self.assertEqual(r.code, 200)
            yield r.content()
        total = served + 12
        yield process.wait(lambda: len([x for x in process.audit_lines() if x["type"] == "response"]) == total)
        # The new worker 1 counts on from the old one's last snapshot: the host's sum never goes back.
        snapshots = yield watch.wait_written_after(reactor.seconds(), ["0", "1"])
        self.assertEqual(snapshots["1"]["pid"], again[1])
        self.assertEqual(requests_total(snapshots["0"]) + requests_total(snapshots["1"]), total)

    @defer.inlineCallbacks
    def test_killing_the_supervisor_takes_the_workers_down(self):
        process, transport, ports, pids = yield self.start()
        ends = [exited(pid) for pid in pids.values()]
        transport.signalProcess("KILL")
        yield process.ended
        yield defer.gatherResults(ends)
        for pid in pids.values():
            self.assertIn(_state(pid), (None, "Z"))  # gone, or dead and not yet reaped by init
        self.assertEqual(process.count_in_stderr(b"the supervisor is gone"), 2)
        yield self.assertFailure(
            connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", ports["API"]), Protocol()),
            error.ConnectionRefusedError,
        )

    @defer.inlineCallbacks
    def test_one_worker_is_one_process_as_before(self):
        """--workers 1 (the default) runs no supervisor: the daemon serves itself."""
        process, transport = spawn_host(self, self.env, ["--workers", "1"])
        ports = yield process.ready
        response = yield self.http.post(f"http://127.0.0.1:{ports['API']}/v1/chat/completions", json=chat_body(), headers=AUTH)
        self.assertEqual(response.code, 200)
        yield response.content()
        yield process.wait(lambda: any(x["type"] == "response" for x in process.audit_lines()))
        self.assertNotIn(b"supervising", process.stderr)
        self.assertNotIn("worker", process.audit_lines()[-1])
        self.assertFalse(os.path.exists(os.path.join(self.state, "workers")))
        transport.signalProcess("TERM")
        self.assertEqual((yield process.ended), 0)


class DemoRefusedTests(SynchronousTestCase):
    def test_the_command_line_refuses_demo_with_workers(self):
        from twisted.python import usage

        from cllama_tx.runtime.tap import Options

        options = Options()
        with self.assertRaises(usage.UsageError) as caught:
            options.parseOptions(["--demo", "--workers", "2"])
        self.assertIn("--demo runs in one process", str(caught.exception))

    def test_workers_is_an_option(self):
        from cllama_tx.runtime.tap import Options

        options = Options()
        options.parseOptions(["--workers", "3", "--listen", "127.0.0.1:0"])
        self.assertEqual(options.config.workers, 3)
        self.assertEqual(options.environment({})["CLLAMA_WORKERS"], "3")



class SystemdTemplateTests(TestCase):
    """The template units of systemd/ for workers: cllama-tx@<N>.service and its sockets."""

    timeout = 60
    TEMPLATES = ("cllama-tx-api@.socket", "cllama-tx-ui@.socket", "cllama-tx@.service")

    @defer.inlineCallbacks
    def test_template_units_verify_cleanly(self):
        analyze = _tool("systemd-analyze")
        copies = os.path.abspath(self.mktemp())
        os.makedirs(copies)
        for name in self.TEMPLATES:
            with open(os.path.join(UNITS_DIR, name)) as f:
                text = f.read()
            text = text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={_daemon_command()} ")
            with open(os.path.join(copies, name), "w") as f:
                f.write(text)
            os.symlink(name, os.path.join(copies, name.replace("@.", "@4.")))
        out, err, code = yield utils.getProcessOutputAndValue(
            analyze,
            ["verify", *(os.path.join(copies, name.replace("@.", "@4.")) for name in self.TEMPLATES)],
            env={"PATH": os.environ.get("PATH", ""), "SYSTEMD_LOG_COLOR": "0"},
            path=copies,
        )
        self.assertEqual((code, (out + err).decode(errors="replace")), (0, ""))

    def test_the_template_is_the_single_unit_with_workers(self):
        """
        The instance's number is --workers; the sockets are the instance's,
        each conflicting with the single-process one (same port); SIGTERM
        reaches the supervisor alone; every other line (the hardening, the
        limits, the state directory) is the single-process unit's.
        """

        def settings(name):
            with open(os.path.join(UNITS_DIR, name)) as f:
                return [line.strip() for line in f if line.strip() and not line.startswith("#")]

        single, template = settings("cllama-tx.service"), settings("cllama-tx@.service")
        argv = _exec_start(os.path.join(UNITS_DIR, "cllama-tx@.service"))
        self.assertEqual(argv[:3], [INSTALLED_BINARY, "--workers", "%i"])
        self.assertEqual(argv[3:], _exec_start(os.path.join(UNITS_DIR, "cllama-tx.service"))[1:])
        self.assertEqual(
            sorted(set(template) - set(single)),
            sorted([
                "Also=cllama-tx-api@%i.socket cllama-tx-ui@%i.socket",
                "After=cllama-tx-api@%i.socket cllama-tx-ui@%i.socket",
                "Conflicts=cllama-tx.service",
                "Description=cllama_tx governance proxy for AI agents (%i workers)",
                "Documentation=file:///usr/share/doc/cllama-tx/DEPLOYMENT.md file:///usr/share/doc/cllama-tx/SYSTEMD.md",
                "ExecStart=" + " ".join(argv),
                "KillMode=mixed",
                "Requires=cllama-tx-api@%i.socket cllama-tx-ui@%i.socket",
            ]),
        )
        self.assertEqual(len(set(single) - set(template)), 6)  # the lines replaced above
        for kind in ("api", "ui"):
            self.assertEqual(
                sorted(set(settings(f"cllama-tx-{kind}@.socket")) - set(settings(f"cllama-tx-{kind}.socket"))),
                sorted([f"Conflicts=cllama-tx-{kind}.socket", "Service=cllama-tx@%i.service",
                        [line for line in settings(f"cllama-tx-{kind}@.socket") if line.startswith("Description=")][0]]),
            )

    @defer.inlineCallbacks
    def test_socket_activated_supervisor_hands_systemds_sockets_to_its_workers(self):
        """
        Under C{systemd-socket-activate} with the template's options (two
        workers): the supervisor adopts the named descriptors, both workers
        serve them, and SIGTERM (KillMode=mixed: the supervisor alone) ends
        the host with status 0.
        """
        activate = _tool("systemd-socket-activate")
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "auth"))
        os.makedirs(os.path.join(base, "state"), mode=0o700)
        write_agent(os.path.join(base, "context"), AGENT, SECRET)
        api_port, ui_port = _free_port(), _free_port()
        child_env = {
            "PYTHONPATH": REPO,
            "PYTHONUNBUFFERED": "1",
            "CLAW_CONTEXT_ROOT": os.path.join(base, "context"),
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "STATE_DIRECTORY": os.path.join(base, "state"),
            "OPENAI_API_KEY": PROVIDER_KEY,
        }
        options = [arg.replace("%i", "2") for arg in _exec_start(os.path.join(UNITS_DIR, "cllama-tx@.service"))[1:]]
        command = [
            activate,
            f"--listen=127.0.0.1:{api_port}",
            f"--listen=127.0.0.1:{ui_port}",
            "--fdname=cllama-api:cllama-ui",
            *(f"--setenv={k}={v}" for k, v in child_env.items()),
            sys.executable, "-m", "cllama_tx.runtime.cli", *options,
        ]
        process = HostProcess()
        transport = reactor.spawnProcess(
            process, command[0], command, env={"PATH": os.environ.get("PATH", "")}, path=REPO
        )
        self.addCleanup(lambda: None if process.ended.called else (transport.signalProcess("KILL"), process.ended)[1])
        yield process.wait_for_stderr(f"Listening on 127.0.0.1:{api_port} as ".encode())
        yield process.wait_for_stderr(f"Listening on 127.0.0.1:{ui_port} as ".encode())
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        # The first connection makes systemd-socket-activate exec the supervisor.
        health = yield http.get(f"http://127.0.0.1:{api_port}/health", timeout=30)
        self.assertEqual(health.code, 200)
        yield health.content()
        ports = yield process.ready
        self.assertEqual(ports, {"API": api_port, "UI": ui_port})
        yield process.wait_ready(2)
        for port in (api_port, ui_port):
            answer = yield http.get(f"http://127.0.0.1:{port}/health", timeout=30)
            self.assertEqual(answer.code, 200)
            yield answer.content()
        self.assertEqual(process.count_in_stderr(b"serving the supervisor's socket 127.0.0.1:%d" % api_port), 2)
        transport.signalProcess("TERM")
        code = yield process.ended
        self.assertEqual((code, process.signal), (0, None))
        self.assertEqual(process.count_in_stderr(b") stopped"), 2)


def _daemon_command():
    script = os.path.join(os.path.dirname(sys.executable), "cllama-tx")
    if os.access(script, os.X_OK):
        return script
    return f"{sys.executable} -m cllama_tx.runtime.cli"
