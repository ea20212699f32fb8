"""
The bounded, non-blocking output of the audit (stdout) and the operational
log (stderr): whole lines dropped and counted when the reader is behind, one
gap line when it is back, and the real descriptors (pipes, sockets, files,
terminals) opened the way the module says.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading

from twisted.internet import defer, main, reactor
from twisted.internet.interfaces import IReadDescriptor, IWriteDescriptor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatTime
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cllama_tx.runtime.audit import AuditLog, gap_line, open_audit_output
from cllama_tx.runtime.bounded_output import BoundedOutput, FdSink, Gap, SocketSink, open_sink
from cllama_tx.runtime.config import DEFAULT_AUDIT_BUFFER, Config, ConfigError
from cllama_tx.runtime.logs import BoundedLogObserver, bounded_stderr_observer
from cllama_tx.runtime.metrics import Metrics


def line(n: int, size: int = 100) -> bytes:
    """An audit-like JSON line of exactly C{size} bytes, newline included."""
    head = b'{"n":%d,"pad":"' % n
    return head + b"x" * (size - len(head) - 3) + b'"}\n'


def parse(data: bytes) -> list[dict]:
    return [json.loads(text) for text in data.splitlines()]


class FakeSink:
    """A reader with C{room} bytes of space left; C{error} makes writes fail."""

    kind = "fake"

    def __init__(self, room: int, blocking: bool = False) -> None:
        self.room = room
        self.blocking = blocking
        self.data = bytearray()
        self.error: OSError | None = None
        self.closed = False

    def fileno(self) -> int:
        return 99

    def send(self, data) -> int:
        if self.error is not None:
            raise self.error
        if not self.room:
            raise BlockingIOError(errno.EAGAIN, "would block")
        written = min(len(data), self.room)
        self.data += data[:written]
        self.room -= written
        return written

    def close(self) -> None:
        self.closed = True


class FakeReactor(Clock):
    """A clock that also records writers and calls from threads."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: set = set()
        self.from_thread: list = []

    def addWriter(self, writer) -> None:
        self.writers.add(writer)

    def removeWriter(self, writer) -> None:
        self.writers.discard(writer)

    def callFromThread(self, f, *args) -> None:
        self.from_thread.append((f, args))


def fake_gap(gap: Gap) -> bytes:
    return b'{"type":"gap","lines":%d,"bytes":%d}\n' % (gap.lines, gap.bytes)


class BoundedOutputTests(SynchronousTestCase):
    def make(self, room: int, limit: int = 1000, blocking: bool = False):
        self.reactor = FakeReactor()
        self.sink = FakeSink(room, blocking=blocking)
        self.output = BoundedOutput(self.sink, self.reactor, limit, fake_gap)
        self.drops: list[int] = []
        self.errors: list = []
        self.output.on_dropped.append(self.drops.append)
        self.output.on_error = self.errors.append
        return self.output

    def reader_returns(self, room: int = 10**9) -> None:
        """The reader reads again: the reactor calls doWrite while it can."""
        self.sink.room = room
        while self.output in self.reactor.writers and self.sink.room:
            self.output.doWrite()

    def test_is_a_write_descriptor(self):
        verifyObject(IWriteDescriptor, self.make(0))

    def test_lines_go_straight_through_while_the_reader_keeps_up(self):
        output = self.make(10**6)
        output.write_records([line(0), line(1)])
        output.write(line(2))
        self.assertEqual(bytes(self.sink.data), line(0) + line(1) + line(2))
        self.assertEqual((output.buffered, output.dropped_total, self.reactor.writers), (0, 0, set()))

    def test_full_reader_fills_the_buffer_then_whole_lines_are_dropped_and_counted(self):
        output = self.make(0, limit=1000)
        for n in range(25):
            output.write(line(n))
        self.assertEqual(output.buffered, 1000)
        self.assertEqual(output.dropped_total, 15)
        self.assertEqual(sum(self.drops), 15)
        self.assertEqual(self.reactor.writers, {output})
        self.assertEqual(self.sink.data, b"")

    def fake_gap_line_once_the_reader_is_back_before_anything_newer(self):
        output = self.make(0, limit=1000)
        for n in range(25):
            output.write(line(n))
        self.reader_returns()
        output.write(line(99))
        lines = parse(bytes(self.sink.data))
        self.assertEqual([line.get("n") for line in lines[:10]], list(range(10)))
        self.assertEqual(lines[10], {"type": "gap", "lines": 15, "bytes": 1500})
        self.assertEqual(lines[11], json.loads(line(99)))
        self.assertEqual(len(lines), 12)
        self.assertEqual(self.reactor.writers, set())
        self.assertEqual(output.pending_lines(), 0)

    def test_lines_stay_dropped_until_the_reader_drained_half(self):
        output = self.make(0, limit=1000)
        for n in range(11):
            output.write(line(n))  # 10 wait, the 11th opens the gap
        self.reader_returns(room=300)  # 700 bytes left: above half
        self.sink.room = 0
        output.write(line(11))  # still in the gap
        self.assertEqual(output.dropped_total, 2)
        self.sink.room = 300  # 400 left: the gap closes behind them
        output.doWrite()
        output.write(line(12))
        self.reader_returns()
        lines = parse(bytes(self.sink.data))
        self.assertEqual([line.get("n") for line in lines], [*range(10), None, 12])
        self.assertEqual(lines[10], {"type": "gap", "lines": 2, "bytes": 200})

    def test_a_partly_written_line_is_finished_never_cut(self):
        output = self.make(150, limit=200)
        output.write_records([line(0), line(1)])  # line 1: 50 bytes out, 50 waiting
        self.assertEqual(output.buffered, 50)
        output.write(line(2, size=200))  # 50 + 200 > 200: dropped, line 1 stays
        self.reader_returns()
        lines = parse(bytes(self.sink.data))
        self.assertEqual(lines, [json.loads(line(0)), json.loads(line(1)), {"type": "gap", "lines": 1, "bytes": 200}])

    def test_a_line_longer_than_the_limit_is_attempted_when_nothing_waits(self):
        output = self.make(0, limit=10)
        output.write(line(0))
        output.write(line(1))
        self.assertEqual((output.buffered, output.dropped_total), (100, 1))
        self.reader_returns()
        self.assertEqual(parse(bytes(self.sink.data))[0], json.loads(line(0)))

    def test_hard_error_drops_what_waits_counts_it_once_and_marks_the_gap(self):
        output = self.make(0, limit=300)
        for n in range(5):
            output.write(line(n))  # 3 wait, 2 dropped
        self.sink.error = BrokenPipeError(errno.EPIPE, "Broken pipe")
        self.reader_returns()
        self.assertEqual(output.dropped_total, 5)
        self.assertEqual((output.buffered, self.reactor.writers), (0, set()))
        output.write(line(5))  # the gap line and line 5 both fail: 6 lines missing
        self.assertEqual(output.dropped_total, 6)
        self.assertEqual(len(self.errors), 1)
        self.assertIsInstance(self.errors[0], BrokenPipeError)
        self.sink.error = None
        output.write(line(6))
        self.assertEqual(parse(bytes(self.sink.data)), [{"type": "gap", "lines": 6, "bytes": 600}, json.loads(line(6))])
        self.assertEqual(sum(self.drops), 6)

    def test_connection_lost_while_waiting_counts_the_lines(self):
        output = self.make(0, limit=1000)
        for n in range(3):
            output.write(line(n))
        self.reactor.removeWriter(output)  # the reactor stops watching, then says why
        output.connectionLost(Failure(main.CONNECTION_LOST))
        self.assertEqual((output.dropped_total, output.buffered, output.pending_lines()), (3, 0, 3))
        self.assertEqual(len(self.errors), 1)

    def test_a_blocking_sink_is_written_in_place(self):
        output = self.make(10**6, blocking=True)
        output.write(line(0))
        self.assertEqual((bytes(self.sink.data), self.reactor.writers), (line(0), set()))

    def test_drain_fires_once_the_reader_took_everything(self):
        output = self.make(0, limit=1000)
        output.write(line(0))
        drained = output.drain(1.0)
        self.assertNoResult(drained)
        self.reader_returns()
        self.assertEqual(self.successResultOf(drained), 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.successResultOf(output.drain(1.0)), 0)

    def test_drain_gives_up_after_its_timeout_with_what_is_left(self):
        output = self.make(0, limit=1000)
        for n in range(25):
            output.write(line(n))
        drained = output.drain(1.0)
        self.reactor.advance(0.99)
        self.assertNoResult(drained)
        self.reactor.advance(0.01)
        self.assertEqual(self.successResultOf(drained), 25)  # 10 waiting, 15 dropped

    def test_close_stops_watching_and_closes_the_sink(self):
        output = self.make(0)
        output.write(line(0))
        output.close()
        self.assertEqual((self.reactor.writers, self.sink.closed), (set(), True))


class AuditThroughBoundedOutputTests(SynchronousTestCase):
    def fake_gap_line_keeps_the_contract_fields(self):
        doc = json.loads(gap_line(Gap(3, 300, 1.0, 2.5), 3.25))
        self.assertEqual(
            doc,
            {
                "ts": "1970-01-01T00:00:03.250Z",
                "claw_id": None,
                "type": "audit_gap",
                "model": None,
                "intervention": None,
                "dropped_lines": 3,
                "dropped_bytes": 300,
                "first_dropped_at": "1970-01-01T00:00:01.000Z",
                "last_dropped_at": "1970-01-01T00:00:02.500Z",
            },
        )

    def test_a_turns_lines_are_kept_or_dropped_whole_and_the_metric_counts_them(self):
        clock = FakeReactor()
        sink = FakeSink(0)
        output = BoundedOutput(sink, clock, 700, lambda gap: gap_line(gap, clock.seconds()))
        metrics = Metrics()
        metrics.watch_audit_output(output)
        scheduled = []
        audit = AuditLog(output, clock, schedule=scheduled.append)
        for n in range(10):
            audit.emit("response", f"agent-{n}", "openai/gpt-4o", request_id=f"r{n}", status_code=200)
        scheduled.pop()()
        dropped = metrics.registry.get_sample_value("cllama_audit_lines_dropped_total")
        self.assertGreater(dropped, 0)
        self.assertEqual(metrics.registry.get_sample_value("cllama_audit_buffer_bytes"), output.buffered)
        clock.advance(2)
        sink.room = 10**6
        output.doWrite()
        lines = parse(bytes(sink.data))
        kept = [line for line in lines if line["type"] == "response"]
        self.assertEqual([line["request_id"] for line in kept], [f"r{n}" for n in range(len(kept))])
        self.assertEqual(lines[-1]["type"], "audit_gap")
        self.assertEqual(lines[-1]["dropped_lines"], dropped)
        self.assertEqual(len(kept) + dropped, 10)
        self.assertEqual(lines[-1]["ts"], "1970-01-01T00:00:02.000Z")
        self.assertEqual(metrics.registry.get_sample_value("cllama_audit_buffer_bytes"), 0)

    def test_a_stream_without_a_descriptor_is_written_as_is(self):
        import io

        self.assertIsNone(open_audit_output(io.StringIO(), FakeReactor(), 1000))

    def test_buffer_setting(self):
        env = {"CLLAMA_STATE_DIR": "/tmp/x"}
        self.assertEqual(Config.from_env(env).audit_buffer_bytes, DEFAULT_AUDIT_BUFFER)
        self.assertEqual(DEFAULT_AUDIT_BUFFER, 4 * 1024 * 1024)
        self.assertEqual(Config.from_env(dict(env, CLLAMA_AUDIT_BUFFER="256KiB")).audit_buffer_bytes, 262144)
        self.assertEqual(Config.from_env(dict(env, CLLAMA_AUDIT_BUFFER="0")).audit_buffer_bytes, 0)
        with self.assertRaises(ConfigError):
            Config.from_env(dict(env, CLLAMA_AUDIT_BUFFER="lots"))


@implementer(IReadDescriptor)
class PipeReader:
    """Reads a pipe or socket on the reactor once started; fires waiters on what it read."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.data = bytearray()
        self._waiters: list = []

    def start(self) -> PipeReader:
        reactor.addReader(self)
        return self

    def stop(self) -> None:
        reactor.removeReader(self)

    def fileno(self) -> int:
        return self.fd

    def doRead(self):
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return None
        if not chunk:
            return main.CONNECTION_DONE
        self.data += chunk
        for predicate, d in list(self._waiters):
            if predicate(self.data):
                self._waiters.remove((predicate, d))
                d.callback(bytes(self.data))
        return None

    def connectionLost(self, reason) -> None:
        pass

    def logPrefix(self) -> str:
        return "PipeReader"

    def wait_for(self, needle: bytes) -> defer.Deferred:
        """Fires with everything read once C{needle} was."""
        return self.wait_until(lambda data: needle in data)

    def wait_for_line(self, predicate) -> defer.Deferred:
        """Fires with everything read once a complete JSON line matches C{predicate}."""

        def matches(data):
            complete = bytes(data[: data.rfind(b"\n") + 1])
            return any(predicate(json.loads(text)) for text in complete.splitlines())

        return self.wait_until(matches)

    def wait_until(self, predicate) -> defer.Deferred:
        d = defer.Deferred()
        if predicate(self.data):
            d.callback(bytes(self.data))
        else:
            self._waiters.append((predicate, d))
        return d


def nonblocking(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


class RealDescriptorTests(TestCase):
    timeout = 30

    def pipe(self):
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        return r, w

    def test_a_pipe_gets_a_file_description_of_its_own(self):
        r, w = self.pipe()
        sink = open_sink(w)
        self.addCleanup(sink.close)
        self.assertIsInstance(sink, FdSink)
        self.assertEqual(sink.kind, "pipe")
        self.assertNotEqual(sink.fileno(), w)
        self.assertTrue(nonblocking(sink.fileno()))
        # The original description (shared with the terminal, the shell,
        # stderr...) stays blocking.
        self.assertFalse(nonblocking(w))

    @defer.inlineCallbacks
    def test_a_pipe_nobody_reads_never_blocks_and_the_gap_line_follows_the_reader(self):
        r, w = self.pipe()
        output = BoundedOutput(open_sink(w), reactor, 64 * 1024, fake_gap, name="test")
        self.addCleanup(output.close)
        count = 4000  # 400 KB: the pipe's 64 KiB and the buffer's, many times over
        for n in range(count):
            output.write(line(n))  # would hang the test if it blocked
        self.assertGreater(output.dropped_total, 2000)
        self.assertLessEqual(output.buffered, 64 * 1024)
        dropped = output.dropped_total
        reader = PipeReader(r).start()
        self.addCleanup(reader.stop)
        self.assertEqual((yield output.drain(10.0)), 0)
        data = yield reader.wait_for(b'"type":"gap"')
        lines = parse(data)
        gaps = [line for line in lines if line.get("type") == "gap"]
        self.assertEqual(gaps, [{"type": "gap", "lines": dropped, "bytes": dropped * 100}])
        numbers = [line["n"] for line in lines if "n" in line]
        self.assertEqual(numbers, list(range(len(numbers))))  # in order, none cut
        self.assertEqual(len(numbers) + dropped, count)

    def test_a_stream_socket_is_written_with_its_flags_untouched(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        sink = open_sink(a.fileno())
        self.addCleanup(sink.close)
        self.assertIsInstance(sink, SocketSink)
        output = BoundedOutput(sink, reactor, 1000, fake_gap)
        self.addCleanup(output.close)
        for n in range(20000):
            output.write(line(n))
        self.assertGreater(output.dropped_total, 0)
        self.assertFalse(nonblocking(a.fileno()))

    def test_files_and_terminals_keep_blocking_writes(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            sink = open_sink(f.fileno())
            self.assertEqual((sink.kind, sink.blocking, sink.fileno()), ("file", True, f.fileno()))
            BoundedOutput(sink, reactor, 0, fake_gap).write(line(0))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), line(0))
        master, slave = os.openpty()
        self.addCleanup(os.close, master)
        self.addCleanup(os.close, slave)
        sink = open_sink(slave)
        self.assertEqual((sink.kind, sink.blocking, sink.fileno()), ("tty", True, slave))
        self.assertFalse(nonblocking(slave))

    @defer.inlineCallbacks
    def test_a_reader_that_goes_away_costs_lines_not_the_process(self):
        r, w = os.pipe()
        self.addCleanup(os.close, w)
        output = BoundedOutput(open_sink(w), reactor, 64 * 1024, fake_gap)
        self.addCleanup(output.close)
        failed = defer.Deferred()
        output.on_error = failed.callback
        for n in range(2000):
            output.write(line(n))
        os.close(r)
        # Either the reactor sees the pipe fail or the next write meets EPIPE.
        output.write(line(2000))
        error = yield failed
        self.assertIsInstance(error, Exception)
        before = output.dropped_total
        output.write(line(2001))
        self.assertEqual(output.dropped_total, before + 1)
        self.assertEqual(output.buffered, 0)

    def test_flush_blocking_waits_a_bounded_time(self):
        r, w = self.pipe()
        output = BoundedOutput(open_sink(w), reactor, 1 << 20, fake_gap)
        self.addCleanup(output.close)
        for n in range(2000):
            output.write(line(n))
        self.assertEqual(output.flush_blocking(0.05), output.pending_lines())
        self.assertGreater(output.pending_lines(), 0)
        received = bytearray()

        def read_all():
            while len(received) < 2000 * 100:
                received.extend(os.read(r, 1 << 16))

        reader = threading.Thread(target=read_all)
        reader.start()
        left = output.flush_blocking(5.0)
        reader.join()
        self.assertEqual(left, 0)
        self.assertEqual(bytes(received), b"".join(line(n) for n in range(2000)))


class LogObserverTests(TestCase):
    timeout = 30

    def event(self, n: int) -> dict:
        return {
            "log_format": "event {n}",
            "n": n,
            "log_time": 0.0,
            "log_level": LogLevel.info,
            "log_namespace": "tests",
            "log_system": "-",
        }

    @defer.inlineCallbacks
    def test_stderr_nobody_reads_costs_log_lines_then_says_how_many(self):
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        observer = bounded_stderr_observer(reactor, fd=w, limit=16 * 1024)
        self.addCleanup(observer.output.close)
        for n in range(5000):
            observer(self.event(n))
        dropped = observer.output.dropped_total
        self.assertGreater(dropped, 1000)
        reader = PipeReader(r).start()
        self.addCleanup(reader.stop)
        data = yield reader.wait_for(b"stderr was not read fast enough\n")
        text = data.decode()
        self.assertEqual(text.count(" log lines dropped between "), 1)
        self.assertIn(f" [cllama_tx.runtime.logs] {dropped} log lines dropped between ", text)
        self.assertTrue(text.startswith(f"{formatTime(0.0)} [-] event 0\n"))
        kept = text.count(" [-] event ")
        self.assertEqual(kept + dropped, 5000)

    def test_events_from_other_threads_are_written_by_the_reactor_thread(self):
        fake = FakeReactor()
        sink = FakeSink(10**6)
        observer = BoundedLogObserver(BoundedOutput(sink, fake, 1000, fake_gap), fake)
        thread = threading.Thread(target=observer, args=(self.event(1),))
        thread.start()
        thread.join()
        self.assertEqual(sink.data, b"")
        [(write, (record,))] = fake.from_thread
        write(record)
        self.assertEqual(bytes(sink.data), f"{formatTime(0.0)} [-] event 1\n".encode())
        observer(self.event(2))  # the reactor's own thread writes in place
        self.assertIn(b"event 2\n", bytes(sink.data))
