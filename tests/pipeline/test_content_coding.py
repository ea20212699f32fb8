"""
L{cllama_tx.pipeline.content_coding}: a provider's compressed answer read
decoded, chunk by chunk, with backpressure and aborts reaching the
upstream transport unchanged; broken or absurd compression is an error,
an unknown coding is left alone.
"""

from __future__ import annotations

import gzip
import zlib

from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface.verify import verifyObject

from cllama_tx.pipeline import content_coding
from cllama_tx.pipeline.content_coding import Decoder, UndecodableBody, codings, decoded

SSE = b"".join(b'data: {"choices":[{"delta":{"content":"w%d "}}]}\n\n' % i for i in range(50))


def gzip_stream(data: bytes, pieces: int) -> list[bytes]:
    """C{data} gzipped as a provider streams it: one sync-flushed block per piece."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    step = max(1, len(data) // pieces)
    out = [compressor.compress(data[i:i + step]) + compressor.flush(zlib.Z_SYNC_FLUSH) for i in range(0, len(data), step)]
    out.append(compressor.flush())
    return out


class Transport:
    """The upstream body's push producer."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class Reader(Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data.append(data)

    def connectionLost(self, reason=None) -> None:
        self.reason = reason


class FakeResponse:
    """An upstream response whose body arrives in C{chunks}, then ends with C{end}."""

    version = (b"HTTP", 1, 1)
    code = 200
    phrase = b"OK"

    def __init__(self, headers: dict, chunks: list[bytes], end=ResponseDone) -> None:
        self.headers = Headers({k.encode(): [v.encode()] for k, v in headers.items()})
        self.length = sum(map(len, chunks))
        self.chunks = chunks
        self.end = end
        self.transport = Transport()
        self.protocol = None

    def deliverBody(self, protocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def run(self) -> None:
        for chunk in self.chunks:
            self.protocol.dataReceived(chunk)
        self.protocol.connectionLost(Failure(self.end()))


def read(response, headers=None):
    reader = Reader()
    wrapped = decoded(response)
    wrapped.deliverBody(reader)
    response.run()
    return wrapped, reader


class CodingsTests(SynchronousTestCase):
    def test_names(self) -> None:
        def of(value):
            return codings(Headers({b"content-encoding": [value]}))

        self.assertEqual(codings(Headers()), [])
        self.assertEqual(of(b"gzip"), [b"gzip"])
        self.assertEqual(of(b"X-GZIP"), [b"gzip"])
        self.assertEqual(of(b"deflate, gzip"), [b"deflate", b"gzip"])
        self.assertEqual(of(b"identity"), [])
        self.assertIsNone(of(b"br"))
        self.assertIsNone(of(b"gzip, zstd"))


class DecoderTests(SynchronousTestCase):
    def test_gzip_streamed_in_blocks(self) -> None:
        decoder = Decoder([b"gzip"])
        pieces = gzip_stream(SSE, 7)
        out = [decoder.feed(piece) for piece in pieces]
        self.assertEqual(b"".join(out) + decoder.finish(), SSE)
        # Each sync-flushed block decodes as it arrives: the stream still streams.
        self.assertTrue(all(out[:7]))

    def test_one_byte_at_a_time_and_concatenated_members(self) -> None:
        body = gzip.compress(b"first half, ") + gzip.compress(b"second half")
        decoder = Decoder([b"gzip"])
        out = b"".join(decoder.feed(body[i:i + 1]) for i in range(len(body)))
        self.assertEqual(out + decoder.finish(), b"first half, second half")

    def test_deflate_wrapped_raw_and_stacked(self) -> None:
        raw = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        for coded in (zlib.compress(SSE), raw.compress(SSE) + raw.flush()):
            decoder = Decoder([b"deflate"])
            self.assertEqual(decoder.feed(coded) + decoder.finish(), SSE)
        decoder = Decoder([b"deflate", b"gzip"])  # deflated, then gzipped
        self.assertEqual(decoder.feed(gzip.compress(zlib.compress(SSE))) + decoder.finish(), SSE)

    def test_garbage_and_truncation(self) -> None:
        with self.assertRaises(UndecodableBody):
            Decoder([b"gzip"]).feed(b"this is not gzip at all")
        decoder = Decoder([b"gzip"])
        decoder.feed(gzip.compress(SSE)[:-12])
        with self.assertRaises(UndecodableBody) as caught:
            decoder.finish()
        self.assertIn("ends before its end", str(caught.exception))

    def test_a_compression_bomb_is_refused(self) -> None:
        self.patch(content_coding, "MAX_CHUNK_EXPANSION", 1024 * 1024)
        bomb = gzip.compress(b"\0" * (8 * 1024 * 1024))
        with self.assertRaises(UndecodableBody) as caught:
            Decoder([b"gzip"]).feed(bomb)
        self.assertIn("expands past", str(caught.exception))


class DecodedResponseTests(SynchronousTestCase):
    def test_a_gzip_answer_is_read_plain_without_its_coding_headers(self) -> None:
        body = gzip.compress(b'{"usage":{"prompt_tokens":90,"completion_tokens":20}}')
        response = FakeResponse({"content-encoding": "gzip", "content-length": str(len(body)),
                                 "content-type": "application/json"}, [body[:10], body[10:]])
        wrapped, reader = read(response)
        verifyObject(IResponse, wrapped)
        self.assertEqual(b"".join(reader.data), b'{"usage":{"prompt_tokens":90,"completion_tokens":20}}')
        self.assertTrue(reader.reason.check(ResponseDone))
        self.assertEqual((wrapped.code, wrapped.length), (200, UNKNOWN_LENGTH))
        self.assertIsNone(wrapped.headers.getRawHeaders(b"content-encoding"))
        self.assertIsNone(wrapped.headers.getRawHeaders(b"content-length"))
        self.assertEqual(wrapped.headers.getRawHeaders(b"content-type"), [b"application/json"])

    def test_the_reader_drives_the_upstream_transport(self) -> None:
        response = FakeResponse({"content-encoding": "gzip"}, gzip_stream(SSE, 3))
        reader = Reader()
        decoded(response).deliverBody(reader)
        # Backpressure and aborts go straight to the socket's producer.
        self.assertIs(reader.transport, response.transport)
        reader.transport.pauseProducing()
        reader.transport.resumeProducing()
        self.assertEqual(response.transport.calls, ["pause", "resume"])

    def test_a_body_cut_short_still_delivers_what_decoded(self) -> None:
        chunks = gzip_stream(SSE, 4)
        response = FakeResponse({"content-encoding": "gzip"}, chunks[:2], end=PotentialDataLoss)
        _, reader = read(response)
        self.assertTrue(SSE.startswith(b"".join(reader.data)) and reader.data)
        self.assertTrue(reader.reason.check(UndecodableBody))

    def test_garbage_stops_the_upstream_and_fails_the_read(self) -> None:
        response = FakeResponse({"content-encoding": "gzip"}, [b"garbage, not gzip", b"more"])
        _, reader = read(response)
        self.assertEqual(reader.data, [])
        self.assertEqual(response.transport.calls, ["stop"])
        self.assertTrue(reader.reason.check(UndecodableBody))

    def test_plain_and_unknown_codings_are_left_alone(self) -> None:
        for headers in ({}, {"content-encoding": "br"}, {"content-encoding": "identity"}):
            response = FakeResponse(headers, [b"as it came"])
            self.assertIs(decoded(response), response)
        self.assertEqual(response.headers.getRawHeaders(b"content-encoding"), [b"identity"])
