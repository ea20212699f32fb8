"""
C{GET /health} on the API port without the API's Klein app.

Probes (Docker's, Kubernetes', the bench's) ask for C{/health} every few
seconds; were it a Klein route, the first probe would build the whole app
(Klein, werkzeug, every management route) that L{cllama_tx.sites.api}
otherwise builds only when an operator path is first asked for.  The
answer is the route's: L{answer_health} serves both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from cllama_tx.surfaces.errors import OPENAI, ProxyError, error_body

log = Logger(namespace="cllama_tx.sites.api")


async def answer_health(keys: Any, request: Any) -> bytes:
    """C{{"ok": true}}; with the master key, LiteLLM's model health too (the key API's C{health})."""
    if keys is not None:
        return await keys.health.health(request)
    request.setResponseCode(200)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"ok": True}).encode("utf-8")


class HealthResource(Resource):
    """
    GET and HEAD of C{/health}; any other method goes to C{fallback()} (the
    Klein app, which answers 405 in the API's shape and audits it).
    """

    isLeaf = True

    def __init__(self, keys: Any, fallback: Callable[[], Resource]) -> None:
        super().__init__()
        self._keys = keys
        self._fallback = fallback

    def render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            return self._fallback().render(request)
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        answering = defer.ensureDeferred(answer_health(self._keys, request))

        def answer(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            log.failure("unexpected error on {path}", failure, path=request.path)
            if gone:
                return
            if request.startedWriting:
                request.transport.abortConnection()
                return
            request.setResponseCode(500)
            request.setHeader(b"content-type", b"application/json")
            request.write(error_body(ProxyError(500, "internal_error", "internal error"), OPENAI))
            request.finish()

        answering.addCallbacks(answer, failed)
        return NOT_DONE_YET
