"""StreamRelay without a reactor: timers, producer registration, outcomes."""

from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from zope.interface.verify import verifyObject

from cllama_tx.pipeline.relay import AgentStalled, StreamRelay, UpstreamTimeout


class FakeTransport:
    def __init__(self):
        self.stopped = 0
        self.paused = 0
        self.resumed = 0

    def stopProducing(self):
        self.stopped += 1

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        self.resumed += 1


class FakeRequest:
    def __init__(self):
        self.channel = object()
        self.written = []
        self.producer = None
        self.unregistered = 0

    def registerProducer(self, producer, streaming):
        self.producer = (producer, streaming)

    def unregisterProducer(self):
        self.unregistered += 1

    def write(self, data):
        self.written.append(data)


class StreamRelayTests(SynchronousTestCase):
    def make(self, first=5.0, idle=1.0, on_data=None, stall=None, progress=None):
        self.clock, self.request, self.transport = Clock(), FakeRequest(), FakeTransport()
        relay = StreamRelay(
            self.request, self.clock, idle_timeout=idle, first_byte_timeout=first, on_data=on_data,
            stall_timeout=stall, agent_progress=progress,
        )
        relay.makeConnection(self.transport)
        return relay

    def test_registers_itself_as_streaming_producer(self):
        relay = self.make()
        self.assertEqual(self.request.producer, (relay, True))
        verifyObject(IPushProducer, relay)
        relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.request.unregistered, 1)
        self.assertIsNone(self.successResultOf(relay.done))

    def test_backpressure_is_passed_to_the_upstream(self):
        relay = self.make()
        relay.pauseProducing()
        relay.pauseProducing()  # twice paused is paused once
        self.assertEqual((self.transport.paused, self.transport.resumed), (1, 0))
        relay.resumeProducing()
        self.assertEqual((self.transport.paused, self.transport.resumed), (1, 1))
        relay.stopProducing()  # the agent's connection went away
        self.assertEqual(self.transport.stopped, 1)

    def test_idle_timer_stands_still_while_the_agent_pauses(self):
        """A paused upstream cannot send: its silence is not the provider's."""
        relay = self.make(first=5.0, idle=1.0, stall=100.0)
        relay.dataReceived(b"x")  # t=0
        relay.pauseProducing()
        self.clock.advance(10.0)  # ten idle periods, all of them paused
        self.assertEqual(self.transport.stopped, 0)
        relay.resumeProducing()  # t=10: the provider's silence counts from here
        self.clock.advance(0.9)
        self.assertEqual(self.transport.stopped, 0)
        self.clock.advance(1.2)  # t=12.1: more than a second since the resume
        self.assertEqual(self.transport.stopped, 1)
        relay.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.failureResultOf(relay.done, UpstreamTimeout).value.phase, "data")

    def test_agent_stall_cuts_the_stream(self):
        relay = self.make(first=5.0, idle=1.0, stall=30.0)
        relay.dataReceived(b"x")
        relay.pauseProducing()
        self.clock.advance(29.9)
        self.assertEqual(self.transport.stopped, 0)
        self.clock.advance(0.2)
        self.assertEqual(self.transport.stopped, 1)
        relay.connectionLost(Failure(ConnectionLost()))
        failure = self.failureResultOf(relay.done, AgentStalled)
        self.assertEqual(failure.value.seconds, 30.0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_resume_restarts_the_stall_timer(self):
        """A slow reader is not a stalled one: only one unbroken pause counts."""
        relay = self.make(first=5.0, idle=100.0, stall=30.0)
        relay.dataReceived(b"x")
        for _ in range(3):
            relay.pauseProducing()
            self.clock.advance(20.0)
            relay.resumeProducing()
        self.assertEqual(self.transport.stopped, 0)
        relay.connectionLost(Failure(ResponseDone()))
        self.assertIsNone(self.successResultOf(relay.done))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_slow_reader_that_keeps_reading_is_not_cut(self):
        """Paused for ten periods, but the agent's count grows every few seconds."""
        acked = [0]
        relay = self.make(first=5.0, idle=1.0, stall=8.0, progress=lambda: acked[0])
        relay.dataReceived(b"x")
        relay.pauseProducing()
        for _ in range(20):
            self.clock.pump([0.5] * 8)
            acked[0] += 100
        self.assertEqual(self.transport.stopped, 0)
        # It stops reading (t=80): cut between one and one and a quarter
        # periods later.
        self.clock.pump([0.5] * 15)  # t=87.5
        self.assertEqual(self.transport.stopped, 0)
        self.clock.pump([0.5] * 5)  # t=90
        self.assertEqual(self.transport.stopped, 1)
        relay.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(relay.done, AgentStalled)

    def test_progress_just_after_the_pause_does_not_double_the_wait(self):
        """Bytes in flight when the pause begins land within the first quarter."""
        acked = [1000]
        relay = self.make(first=5.0, idle=100.0, stall=8.0, progress=lambda: acked[0])
        relay.dataReceived(b"x")
        relay.pauseProducing()
        acked[0] += 50  # acknowledged an instant after the pause
        self.clock.pump([0.5] * 20)  # the first look (t=2) sees it; cut by t=10
        self.assertEqual(self.transport.stopped, 1)
        relay.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(relay.done, AgentStalled)

    def test_an_unknown_count_falls_back_to_the_pause(self):
        relay = self.make(first=5.0, idle=100.0, stall=8.0, progress=lambda: None)
        relay.dataReceived(b"x")
        relay.pauseProducing()
        self.clock.advance(7.9)
        self.assertEqual(self.transport.stopped, 0)
        self.clock.advance(0.2)
        self.assertEqual(self.transport.stopped, 1)
        relay.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(relay.done, AgentStalled)

    def test_no_stall_timer_when_off(self):
        relay = self.make(first=5.0, idle=1.0, stall=None)
        relay.dataReceived(b"x")
        relay.pauseProducing()
        self.clock.advance(1000.0)
        self.assertEqual(self.transport.stopped, 0)
        relay.connectionLost(Failure(ResponseDone()))
        self.assertIsNone(self.successResultOf(relay.done))

    def test_chunks_go_to_the_request_by_default(self):
        relay = self.make()
        relay.dataReceived(b"a")
        relay.dataReceived(b"bc")
        self.assertEqual(self.request.written, [b"a", b"bc"])
        self.assertEqual(relay.bytes_relayed, 3)

    def test_chunks_go_to_on_data_in_order(self):
        seen = []
        relay = self.make(on_data=seen.append)
        relay.dataReceived(b"a")
        relay.dataReceived(b"bc")
        self.assertEqual(seen, [b"a", b"bc"])
        self.assertEqual(self.request.written, [])

    def test_first_byte_timeout(self):
        relay = self.make(first=5.0)
        self.clock.advance(4.9)
        self.assertNoResult(relay.done)
        self.clock.advance(0.2)
        self.assertEqual(self.transport.stopped, 1)
        relay.connectionLost(Failure(ConnectionLost()))
        failure = self.failureResultOf(relay.done, UpstreamTimeout)
        self.assertEqual(failure.value.phase, "first byte")

    def test_idle_timer_counts_from_the_last_chunk(self):
        relay = self.make(first=5.0, idle=1.0)
        relay.dataReceived(b"x")  # t=0: idle timer armed for t=1
        self.clock.advance(0.6)
        relay.dataReceived(b"y")  # t=0.6
        self.clock.advance(0.5)  # t=1.1: silent 0.5, re-armed for t=1.6
        self.assertEqual(self.transport.stopped, 0)
        self.clock.advance(0.4)  # t=1.5
        self.assertEqual(self.transport.stopped, 0)
        self.clock.advance(0.2)  # t=1.7
        self.assertEqual(self.transport.stopped, 1)
        relay.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.failureResultOf(relay.done, UpstreamTimeout).value.phase, "data")

    def test_broken_connection_fails_done(self):
        relay = self.make()
        relay.dataReceived(b"x")
        relay.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(relay.done, ConnectionLost)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_agent_gone_skips_unregister(self):
        relay = self.make()
        self.request.channel = None
        relay.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.request.unregistered, 0)
        self.failureResultOf(relay.done, ConnectionLost)
