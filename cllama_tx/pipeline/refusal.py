"""
How a request ends when it is not served, alike on the inference surfaces
and the passthrough: L{serve_guarded} turns every way a request's service
can fail (refused, the agent gone, a bug) into exactly one settlement, and
L{refuse} answers the error in the surface's own shape (or aborts the
connection when the answer's headers have gone already).
"""

from __future__ import annotations

from collections.abc import Awaitable

from twisted.logger import Logger
from twisted.web.http_headers import Headers

from cllama_tx.pipeline.metering import CLIENT_CLOSED, Exchange
from cllama_tx.surfaces.errors import ProxyError, error_body

log = Logger()


class AgentGone(Exception):
    """The agent disconnected; nothing more is written to it."""


async def serve_guarded(serving: Awaitable[None], metering, request, ex: Exchange, what: str) -> None:
    """
    Await C{serving} (a request's whole service); a refusal, the agent
    leaving, or a bug ends in exactly one settlement and, while the agent
    is there, an answer in the surface's shape.
    """
    try:
        await serving
    except ProxyError as error:
        refuse(metering, request, ex, error)
    except AgentGone:
        metering.settle(ex, CLIENT_CLOSED, "client disconnected")
    except Exception:
        log.failure("unexpected error serving {what} {request_id}", what=what, request_id=ex.request_id)
        refuse(metering, request, ex, ProxyError(500, "internal_error", "internal error"))


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
