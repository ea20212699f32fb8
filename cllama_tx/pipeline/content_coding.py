"""
Upstream answers a provider compressed anyway.

The proxy never forwards an agent's C{Accept-Encoding} and asks for none,
yet some providers and gateways answer C{Content-Encoding: gzip} all the
same.  Such a body is decoded as it arrives, before anything reads it: the
usage tap and the JSON parse meter the provider's real counts (not an
estimate from compressed bytes), a translation reads real events, secrets
are scrubbed from real text, and the agent gets the plain body with
neither C{Content-Encoding} nor the compressed C{Content-Length} (as the
reference, whose HTTP client decodes for it, answers too).  Streams are
decoded chunk by chunk, so they still stream.

C{gzip} (and C{x-gzip}) and C{deflate} (zlib-wrapped or raw, as servers
send it), also stacked; a body in any other coding (C{br}, C{zstd}) is
left as it is: metered by estimate, relayed with its header.
"""

from __future__ import annotations

import zlib
from typing import Any

from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from zope.interface import implementer

GZIP = b"gzip"
DEFLATE = b"deflate"
_ALIASES = {b"x-gzip": GZIP}
_DECODABLE = frozenset({GZIP, DEFLATE})

#: The most one received chunk may expand to.  A provider's 64 KiB read
#: that inflates past this is a compression bomb, not an answer.
MAX_CHUNK_EXPANSION = 64 * 1024 * 1024


class UndecodableBody(Exception):
    """The body is not valid in the coding its header names (or expands absurdly)."""


def codings(headers) -> list[bytes] | None:
    """
    The content codings of a response, in the order they were applied,
    when this module can undo all of them; [] for none; None when one of
    them is unknown (the body is then left alone).
    """
    if not headers.hasHeader(b"content-encoding"):
        return []  # nearly every answer: one lookup
    found = []
    for value in headers.getRawHeaders(b"content-encoding") or ():
        for part in value.split(b","):
            name = part.strip().lower()
            name = _ALIASES.get(name, name)
            if not name or name == b"identity":
                continue
            if name not in _DECODABLE:
                return None
            found.append(name)
    return found


class _Inflater:
    """Undoes one content coding, fed chunk by chunk."""

    def __init__(self, coding: bytes) -> None:
        self._coding = coding
        self._stream: Any = None  # a zlib decompressor, made on the first bytes

    def _start(self, first: bytes):
        if self._coding == GZIP:
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        # "deflate" is meant to be zlib-wrapped; some servers send it raw.
        wrapped = len(first) >= 2 and first[0] & 0x0F == 8 and (first[0] << 8 | first[1]) % 31 == 0
        return zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)

    def feed(self, data: bytes) -> bytes:
        out = []
        budget = MAX_CHUNK_EXPANSION
        while data:
            if self._stream is None:
                self._stream = self._start(data)
            try:
                piece = self._stream.decompress(data, budget + 1)
            except zlib.error as e:
                raise UndecodableBody(f"not valid {self._coding.decode()} data ({e})") from None
            if len(piece) > budget:
                raise UndecodableBody(f"a compressed chunk expands past {MAX_CHUNK_EXPANSION} bytes")
            budget -= len(piece)
            out.append(piece)
            if not self._stream.eof:
                break
            # One gzip member ended; another may follow (concatenated members).
            data = self._stream.unused_data if self._coding == GZIP else b""
            self._stream = None
        return b"".join(out)

    def finish(self) -> bytes:
        stream, self._stream = self._stream, None
        if stream is None:
            return b""
        tail = stream.flush()
        if not stream.eof:
            raise UndecodableBody(f"the {self._coding.decode()} data ends before its end")
        return tail


class Decoder:
    """Undoes a response's content codings, last applied first."""

    def __init__(self, applied: list[bytes]) -> None:
        self._stages = [_Inflater(coding) for coding in reversed(applied)]

    def feed(self, data: bytes) -> bytes:
        for stage in self._stages:
            data = stage.feed(data)
        return data

    def finish(self) -> bytes:
        pending = b""
        for stage in self._stages:
            pending = (stage.feed(pending) if pending else b"") + stage.finish()
        return pending


class _Decoding(Protocol):
    """
    Sits between an upstream body and the protocol that reads it.  The
    reader is connected to the upstream transport itself, so its pause,
    resume and abort (backpressure, timeouts) reach the socket unchanged.
    """

    def __init__(self, reader, decoder: Decoder) -> None:
        self._reader = reader
        self._decoder = decoder
        self._failure: UndecodableBody | None = None

    def makeConnection(self, transport) -> None:
        self.transport = transport
        self.connected = True
        self._reader.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self._failure is not None:
            return
        try:
            plain = self._decoder.feed(data)
        except UndecodableBody as e:
            self._fail(e)
            return
        if plain:
            self._reader.dataReceived(plain)

    def _fail(self, error: UndecodableBody) -> None:
        self._failure = error
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def connectionLost(self, reason=None) -> None:
        self.connected = False
        if self._failure is None and (reason is None or reason.check(ResponseDone, PotentialDataLoss)):
            try:
                tail = self._decoder.finish()
            except UndecodableBody as e:
                self._failure = e
            else:
                if tail:
                    self._reader.dataReceived(tail)
        if self._failure is not None:
            reason = Failure(self._failure)
        self._reader.connectionLost(reason)


@implementer(IResponse)
class DecodedResponse:
    """A response whose body is read decoded; everything else is the original's."""

    def __init__(self, original, applied: list[bytes]) -> None:
        self.original = original
        self.applied = applied
        self.version = original.version
        self.code = original.code
        self.phrase = original.phrase
        self.headers = original.headers
        self.length = UNKNOWN_LENGTH
        self.request = getattr(original, "request", None)
        self.previousResponse = getattr(original, "previousResponse", None)

    def deliverBody(self, protocol) -> None:
        self.original.deliverBody(_Decoding(protocol, Decoder(self.applied)))

    def setPreviousResponse(self, response) -> None:
        self.previousResponse = response


def decoded(response):
    """
    C{response}, or, when its body is compressed in codings this module
    undoes, a L{DecodedResponse} whose headers no longer announce the
    coding nor the compressed length.
    """
    applied = codings(response.headers)
    if not applied:
        return response
    response.headers.removeHeader(b"content-encoding")
    response.headers.removeHeader(b"content-length")
    return DecodedResponse(response, applied)
