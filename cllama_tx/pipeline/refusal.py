"""
How a request the pipeline will not serve is answered: its error in the
surface's own shape, settled in the books, and the connection aborted
instead when the answer's headers have gone already.  Shared by the
inference surfaces and the passthrough, so both refuse alike.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

from cllama_tx.pipeline.metering import CLIENT_CLOSED, Exchange
from cllama_tx.surfaces.errors import ProxyError, error_body


def refuse(metering, request, ex: Exchange, error: ProxyError) -> None:
    """Answer with C{error} in the surface's shape, and settle."""
    if ex.gone:
        metering.settle(ex, CLIENT_CLOSED, "client disconnected")
        return
    ex.error_code = error.code
    metering.settle(ex, error.status, error.message)
    if request.startedWriting:
        # Headers are gone already: the body cannot become an error body.
        request.transport.abortConnection()
        return
    body = error_body(error, ex.surface.shape)
    request.responseHeaders = Headers()
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % len(body))
    request.setHeader(b"x-cllama-request-id", ex.request_id.encode())
    if error.retry_after is not None:
        request.setHeader(b"retry-after", b"%d" % error.retry_after)
    request.write(body)
    request.finish()
