"""
Who may send the API a body: decided on the request's headers, before a
byte of the body is read.

twisted.web reads a whole body before any resource runs, spooling more than
100 KB of it to a temporary file, and used to do so for anyone: twenty
unauthenticated connections held 630 MB.  Now:

  - an inference request (a POST to an inference surface) is authenticated
    on its headers, as an agent or a virtual key, by the same function the
    proxy uses; a refusal is answered at once in the surface's shape and
    the principal of an accepted one is handed to the proxy (it does not
    authenticate twice);
  - any other request with a body must carry credentials (C{Authorization}
    or C{x-api-key}; the route checks them, throttled as ever) and may
    send at most L{SMALL_BODY} bytes, which stay in memory: no other API
    route takes more than a small JSON document.

A virtual key this instance has not seen, in a store other instances share,
is read from the store before it is accepted or refused: L{HeaderGate.check}
then answers a Deferred, and the request reads nothing more of its body
until it fires (see L{cllama_tx.sites.api.CappedRequest}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.python.failure import Failure

from cllama_tx.providers.passthrough_rules import PREFIX as PASSTHROUGH_PREFIX
from cllama_tx.sites.admin_http import is_management_path
from cllama_tx.surfaces.errors import ANTHROPIC, OPENAI, ProxyError, error_body

# The body of a request that is not an inference request: key and team
# administration documents, all small.  Below twisted.web's 100 KB spooling
# threshold, so such a body is never written to disk.
SMALL_BODY = 64 * 1024


def shape_for_path(path: bytes) -> str:
    """The error shape of an API path: Anthropic's under /v1/messages (or /messages), else OpenAI's."""
    return ANTHROPIC if path.startswith((b"/v1/messages", b"/messages")) else OPENAI


@attrs.frozen
class Refusal:
    """A request answered on its headers: the status, the JSON body, the headers to add."""

    status: int
    body: bytes
    request_id: str | None = None  # set when the proxy settled (and audited) it
    retry_after: int | None = None
    message: str = ""


def refusal(error: ProxyError, shape: str, request_id: str | None = None) -> Refusal:
    return Refusal(error.status, error_body(error, shape), request_id, error.retry_after, error.message)


class HeaderGate:
    """
    The API site's check of a request's headers.

    @param proxy: authenticates (C{authenticate(headers, request)}) and settles a
        refused inference request (C{refuse_early(surface, error)}).
    @param surfaces: inference path -> its L{Surface}.
    """

    def __init__(self, proxy, surfaces: dict, max_body_bytes: int) -> None:
        self._proxy = proxy
        self._surfaces = surfaces
        self.max_body_bytes = max_body_bytes
        # Paths whose small bodies need no credentials: the OR gate's console
        # on a loopback API port, when the operator opted in (gate_console_api).
        self.open_paths: Callable[[bytes], bool] | None = None
        # The passthrough's own gate (/_proxy/..., sites/passthrough.py), when it is on.
        self.passthrough: Any = None

    def body_limit(self, method: bytes, path: bytes, request: Any = None) -> int:
        """The largest body this request may send."""
        if self.passthrough is not None and request is not None and path.startswith(PASSTHROUGH_PREFIX):
            return self.passthrough.body_limit(method, request)
        if method == b"POST" and path in self._surfaces:
            return self.max_body_bytes
        return min(SMALL_BODY, self.max_body_bytes)

    def shape(self, path: bytes) -> str:
        """The error shape of a refusal on C{path}: its surface's, else by path."""
        surface = self._surfaces.get(path)
        return surface.shape if surface is not None else shape_for_path(path)

    def check(self, request, method: bytes, path: bytes, length: int | None) -> Refusal | None | defer.Deferred:
        """
        None to read the body, else the refusal to answer with, or a
        Deferred of either when the caller's key must be read from the
        shared store first.  Sets C{request.principal} for an authenticated
        inference request.
        """
        if self.passthrough is not None and path.startswith(PASSTHROUGH_PREFIX):
            # Every passthrough request is decided by the pipeline on its headers.
            return self.passthrough.check(request, method, path, length)
        surface = self._surfaces.get(path)
        if surface is not None and method == b"POST":
            try:
                # The request tells the client's address: a wrong master key
                # presented here is throttled like anywhere else.
                principal = self._proxy.authenticate(request.requestHeaders, request)
            except ProxyError as error:
                return refusal(error, surface.shape, self._proxy.refuse_early(surface, error))
            if isinstance(principal, defer.Deferred):
                return principal.addCallbacks(
                    self._accepted, self._refused, callbackArgs=(request,), errbackArgs=(surface,)
                )
            request.principal = principal
            return None
        if length == 0 or (self.open_paths is not None and self.open_paths(path)):
            return None
        headers = request.requestHeaders
        if headers.hasHeader(b"authorization") or headers.hasHeader(b"x-api-key"):
            return None
        missing = ProxyError(
            401, "missing_credentials", "a request with a body needs credentials (Authorization or x-api-key)"
        )
        if is_management_path(path):
            # LiteLLM's error shape, as the management API answers everything.
            missing = attrs.evolve(missing, error_type="auth_error", param=None, wire_code="401")
        return refusal(missing, shape_for_path(path))

    def _accepted(self, principal, request) -> None:
        request.principal = principal
        return None

    def _refused(self, failure: Failure, surface) -> Refusal:
        error = failure.value
        if not isinstance(error, ProxyError):
            error = ProxyError(500, "internal_error", "internal error")
        return refusal(error, surface.shape, self._proxy.refuse_early(surface, error))
