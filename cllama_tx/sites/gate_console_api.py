"""
The Execwall OR gate's console API on the API port, for a loopback-only
deployment like the gate's (C{CLLAMA_CONSOLE_ON_API_PORT}).

The gate serves C{/api/*} beside C{/v1/chat/completions} on one port with
no credentials: whoever reaches its loopback port is trusted.  By default
cllama_tx serves these paths on the UI port behind the operator token
(L{cllama_tx.sites.ui.app}); with this opt-in it also answers them on the
API port, without a token, when that port listens on loopback only (the
daemon refuses to start otherwise) and only to connections from loopback.
The answers are the UI port's: ours with the gate's fields beside
(L{cllama_tx.sites.gate_console.GateConsole}); every change is an
C{operator} audit line with the actor C{console@loopback}.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.web.resource import Resource

from cllama_tx.identity.agent_header import from_loopback
from cllama_tx.identity.tokens import valid_agent_id
from cllama_tx.sites.gate_console import GateConsole
from cllama_tx.sites.ui.app import spend_periods
from cllama_tx.surfaces.errors import ProxyError

ACTOR = "console@loopback"
#: Paths under /api/spend/ that are not an agent's (the key API's cursor feed).
NOT_AGENTS = frozenset({b"events"})


def claims(method: bytes, path: bytes) -> bool:
    """Whether a request on the API port is the console's."""
    if path in (b"/api/health", b"/api/spend", b"/api/reload"):
        return True
    for prefix in (b"/api/spend/", b"/api/budget/", b"/api/reset/"):
        if path.startswith(prefix):
            rest = path[len(prefix):]
            return bool(rest) and b"/" not in rest and rest not in NOT_AGENTS
    return False


def posts(path: bytes) -> bool:
    """The console's paths that take a body (no credentials needed for them on this port)."""
    return path == b"/api/reload" or path.startswith((b"/api/budget/", b"/api/reset/"))


class GateConsoleApi:
    """The console's routes (see the module docstring)."""

    app = Klein()

    def __init__(self, *, console: GateConsole, operations: Any, ledger: Any, clock: Any) -> None:
        self._console = console
        self._operations = operations
        self._ledger = ledger
        self._clock = clock

    def resource(self) -> Resource:
        return self.app.resource()

    @staticmethod
    def _json(request, status: int, doc: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(doc).encode("utf-8")

    def _problem(self, request, error: ProxyError) -> bytes:
        doc = {"error": {"message": error.message, "type": "invalid_request_error", "code": error.code}}
        doc.update(error.extra or {})
        return self._json(request, error.status, doc)

    def _refuse_remote(self, request) -> bytes | None:
        if from_loopback(request.getClientAddress()):
            return None
        error = ProxyError(403, "loopback_only", "the console API on this port answers loopback connections only")
        return self._problem(request, error)

    def _body(self, request) -> Any:
        request.content.seek(0)
        raw = request.content.read()
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise ProxyError(400, "invalid_json", "the body is not valid JSON",
                             extra={"detail": "the body is not valid JSON"}) from None

    @app.route("/api/health", methods=["GET"])
    async def health(self, request):
        refused = self._refuse_remote(request)
        if refused is not None:
            return refused
        doc = await self._operations.health()
        return self._json(request, 200 if doc["ok"] else 503, self._console.add_health(doc))

    @app.route("/api/spend", methods=["GET"])
    def spend(self, request):
        refused = self._refuse_remote(request)
        if refused is not None:
            return refused
        totals = self._ledger.totals()
        now = self._clock.seconds()
        doc = spend_periods(totals, now, None)
        doc["agents"] = {agent: spend_periods(totals, now, agent, counts=False) for agent in totals.agents()}
        doc["summary"] = totals.summary()
        return self._json(request, 200, self._console.add_all_spend(doc))

    @app.route("/api/spend/<agent>", methods=["GET"])
    def spend_agent(self, request, agent):
        refused = self._refuse_remote(request)
        if refused is not None:
            return refused
        if not self._console.knows(agent):
            return self._problem(request, self._console.not_found(agent))
        doc = spend_periods(self._ledger.totals(), self._clock.seconds(), agent)
        return self._json(request, 200, self._console.add_spend(agent, doc))

    @app.route("/api/budget/<agent>", methods=["POST"])
    async def set_budget(self, request, agent):
        refused = self._refuse_remote(request)
        if refused is not None:
            return refused
        try:
            if not valid_agent_id(agent):
                raise ProxyError(400, "invalid_agent", "not a valid agent id")
            doc = await self._console.set_budget(agent, self._body(request), ACTOR)
        except ProxyError as error:
            return self._problem(request, error)
        return self._json(request, 200, doc)

    @app.route("/api/reset/<agent>", methods=["POST"])
    async def reset(self, request, agent):
        refused = self._refuse_remote(request)
        if refused is not None:
            return refused
        try:
            doc = await self._console.reset(agent, ACTOR)
        except ProxyError as error:
            return self._problem(request, error)
        return self._json(request, 200, doc)

    @app.route("/api/reload", methods=["POST"])
    def reload(self, request):
        refused = self._refuse_remote(request)
        if refused is not None:
            return refused
        result = self._operations.reload(ACTOR)
        return self._json(request, 200 if not result["failed"] else 500, self._console.add_reload(result))
