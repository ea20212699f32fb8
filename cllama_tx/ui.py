"""
The operator UI site (default :8081).

Every route but C{/health} needs the operator token.  Without a configured
token the operator endpoints stay shut: there is no unauthenticated mode.
"""

from __future__ import annotations

import hmac
import json

from klein import Klein

from . import __version__


class UiApp:
    app = Klein()

    def __init__(self, *, token: str | None, pod: str | None, contexts, providers) -> None:
        self._token = token.encode("utf-8") if token else None
        self._pod = pod
        self._contexts = contexts
        self._providers = providers

    def _json(self, request, status: int, doc) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(doc).encode("utf-8")

    def _authorised(self, request) -> bool:
        if self._token is None:
            return False
        header = request.getHeader(b"authorization") or b""
        scheme, _, presented = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(presented.strip(), self._token)

    def _refuse(self, request) -> bytes:
        if self._token is None:
            message = "the operator UI is locked: set CLLAMA_UI_TOKEN to use it"
        else:
            message = "operator token required (Authorization: Bearer <CLLAMA_UI_TOKEN>)"
            request.setHeader(b"www-authenticate", b'Bearer realm="cllama"')
        return self._json(request, 401, {"error": {"message": message, "type": "authentication_error", "code": "operator_token_required"}})

    @app.route("/health", methods=["GET", "HEAD"])
    def health(self, request):
        return self._json(request, 200, {"ok": True})

    @app.route("/", methods=["GET"])
    @app.route("/api/status", methods=["GET"])
    def status(self, request):
        if not self._authorised(request):
            return self._refuse(request)
        return self._json(
            request,
            200,
            {
                "pod": self._pod,
                "version": __version__,
                "agents": self._contexts.agent_ids(),
                "providers": self._providers.snapshot(),
            },
        )
