"""
The API site's door to the passthrough, C{/_proxy/<provider>/<path>}
(L{cllama_tx.pipeline.passthrough}): its part of the header gate, the sink
that streams an upload's body upstream as Twisted reads it, and the
resource that answers once the body is in.  Thin: the pipeline decides.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from cllama_tx.pipeline.passthrough import EarlyAnswer, Passthrough
from cllama_tx.providers.passthrough_rules import PREFIX
from cllama_tx.sites.header_gate import Refusal, refusal
from cllama_tx.surfaces.errors import OPENAI, ProxyError, error_body

__all__ = ["PREFIX", "PassthroughGate", "PassthroughResource"]


def _refusal(early: EarlyAnswer) -> Refusal:
    return refusal(early.error, early.shape, early.request_id)


class _Sink:
    """Where L{cllama_tx.sites.api.CappedRequest} puts an upload's chunks: upstream, as they come."""

    def __init__(self, passthrough: Passthrough, call) -> None:
        self._passthrough = passthrough
        self._call = call

    def write(self, data: bytes) -> None:
        self._call.body.write(data)

    def oversized(self, limit: int) -> Refusal:
        """The upload passed its cap: the pipeline stops it and settles the 413."""
        return _refusal(self._passthrough.oversized(self._call, limit))


class PassthroughGate:
    """
    The header gate for passthrough paths: every request is decided on its
    headers by the pipeline (L{Passthrough.begin}); an accepted upload gets
    its sink before the first chunk of its body is handed on.
    """

    def __init__(self, passthrough: Passthrough) -> None:
        self._passthrough = passthrough

    def body_limit(self, method: bytes, request) -> int:
        return self._passthrough.body_limit(method, request.requestHeaders)

    @staticmethod
    def shape(path: bytes) -> str:
        return OPENAI

    def check(self, request, method: bytes, path: bytes, length: int | None) -> defer.Deferred:
        target = getattr(request, "request_target", None) or path
        deciding = self._passthrough.begin(request, method, target, length)

        def decided(early: EarlyAnswer | None) -> Refusal | None:
            if early is not None:
                return _refusal(early)
            call = request.passthrough
            if call.body is not None:
                # What came with the headers was kept by Twisted meanwhile.
                content = request.content
                if content is not None:
                    content.seek(0)
                    kept = content.read()
                    content.seek(0)
                    content.truncate()
                    if kept:
                        call.body.write(kept)
                request.body_sink = _Sink(self._passthrough, call)
            return None

        return deciding.addCallback(decided)


class PassthroughResource(Resource):
    """Every C{/_proxy/...} path, any method: answered by the pipeline once the body is in."""

    isLeaf = True

    def __init__(self, passthrough: Passthrough) -> None:
        super().__init__()
        self._passthrough = passthrough

    def render(self, request):
        if getattr(request, "passthrough", None) is None:
            # Never decided on its headers (this Twisted hides them): not served blind.
            error = ProxyError(503, "passthrough_unavailable", "the passthrough cannot check this request")
            request.setResponseCode(503)
            request.setHeader(b"content-type", b"application/json")
            return error_body(error, OPENAI)
        self._passthrough.serve(request)
        return NOT_DONE_YET
