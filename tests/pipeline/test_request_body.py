"""
L{cllama_tx.pipeline.request_body.StreamingBody}: an upload passes through
a bounded buffer; the agent's connection is paused while the upstream's is
full or not there yet, and resumed once it drains.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface.verify import verifyObject

from cllama_tx.pipeline.request_body import StreamingBody


class Source:
    """The agent's connection as the body sees it: paused or not."""

    def __init__(self) -> None:
        self.paused = False
        self.pauses = 0

    def pauseProducing(self) -> None:
        self.paused = True
        self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


class Consumer:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)


class StreamingBodyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.source = Source()
        self.consumer = Consumer()

    def test_interface_and_length(self) -> None:
        body = StreamingBody(10, self.source)
        self.assertTrue(verifyObject(IBodyProducer, body))
        self.assertEqual(body.length, 10)
        self.assertIs(StreamingBody(None, self.source).length, UNKNOWN_LENGTH)

    def test_chunks_pass_through_as_they_come(self) -> None:
        body = StreamingBody(None, self.source, high_water=100)
        done = body.startProducing(self.consumer)
        body.write(b"a" * 40)
        body.write(b"b" * 40)
        self.assertEqual(self.consumer.chunks, [b"a" * 40, b"b" * 40])
        self.assertNoResult(done)
        body.finish()
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual((body.received, body.sent), (80, 80))
        self.assertFalse(self.source.paused)

    def test_before_the_upstream_connects_the_agent_is_paused_at_the_high_water(self) -> None:
        body = StreamingBody(None, self.source, high_water=100)
        body.write(b"x" * 60)
        self.assertFalse(self.source.paused)
        body.write(b"x" * 60)
        self.assertTrue(self.source.paused)
        self.assertEqual(body.buffered_peak, 120)
        done = body.startProducing(self.consumer)
        self.assertEqual(b"".join(self.consumer.chunks), b"x" * 120)
        self.assertFalse(self.source.paused)
        body.finish()
        self.successResultOf(done)

    def test_a_full_upstream_pauses_the_agent_and_its_drain_resumes_it(self) -> None:
        body = StreamingBody(None, self.source, high_water=100)
        done = body.startProducing(self.consumer)
        body.pauseProducing()
        for _ in range(5):
            body.write(b"y" * 30)
        self.assertTrue(self.source.paused)
        self.assertEqual(self.consumer.chunks, [])
        body.finish()
        self.assertNoResult(done)  # the buffer still holds the end
        body.resumeProducing()
        self.assertEqual(b"".join(self.consumer.chunks), b"y" * 150)
        self.assertFalse(self.source.paused)
        self.successResultOf(done)

    def test_an_agent_gone_fails_the_upload(self) -> None:
        body = StreamingBody(100, self.source)
        done = body.startProducing(self.consumer)
        body.write(b"z" * 10)
        body.fail(ConnectionError("agent gone"))
        self.failureResultOf(done, ConnectionError)
        body.write(b"more")
        self.assertEqual(body.sent, 10)

    def test_a_failed_upstream_drops_the_rest_without_pausing(self) -> None:
        body = StreamingBody(None, self.source, high_water=10)
        body.write(b"q" * 20)
        self.assertTrue(self.source.paused)
        body.abandon()
        self.assertFalse(self.source.paused)
        body.write(b"q" * 1000)
        self.assertFalse(self.source.paused)
        self.assertEqual((body.received, body.sent), (1020, 0))

    def test_cancel_and_stop(self) -> None:
        body = StreamingBody(None, self.source)
        done = body.startProducing(self.consumer)
        done.cancel()
        self.failureResultOf(done, CancelledError)
        other = StreamingBody(None, self.source)
        started = other.startProducing(self.consumer)
        other.stopProducing()
        other.finish()
        self.assertNoResult(started)  # never fired once stopped (IBodyProducer)
