"""
The operator UI site (default :8081).

Every route but C{/health} needs the operator token.  Without a configured
token the operator endpoints stay shut: there is no unauthenticated mode.
"""

from __future__ import annotations

import json
import time

from klein import Klein

from . import __version__
from .errors import ProxyError
from .identity.operator import bearer_matches
from .identity.tokens import valid_agent_id


class UiApp:
    app = Klein()

    def __init__(
        self, *, token: str | None, pod: str | None, contexts, providers, ledger=None, clock=None, operations=None
    ) -> None:
        self._operations = operations
        self._token = token.encode("utf-8") if token else None
        self._pod = pod
        self._contexts = contexts
        self._providers = providers
        self._ledger = ledger
        self._clock = clock

    def _json(self, request, status: int, doc) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(doc).encode("utf-8")

    def _authorised(self, request) -> bool:
        return bearer_matches(request.getHeader(b"authorization"), self._token)

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

    @app.route("/costs/api", methods=["GET"])
    def costs_api(self, request):
        """The Clawdapus dashboard's cost feed (CONTRACT 5), from the ledger."""
        if not self._authorised(request):
            return self._refuse(request)
        return self._json(request, 200, self._ledger.totals().costs_api())

    @app.route("/api/spend", methods=["GET"])
    def spend(self, request):
        if not self._authorised(request):
            return self._refuse(request)
        totals = self._ledger.totals()
        doc = spend_periods(totals, self._clock.seconds(), None)
        doc["agents"] = {agent: spend_periods(totals, self._clock.seconds(), agent) for agent in totals.agents()}
        doc["summary"] = totals.summary()
        return self._json(request, 200, doc)

    @app.route("/api/spend/<agent>", methods=["GET"])
    def spend_agent(self, request, agent):
        if not self._authorised(request):
            return self._refuse(request)
        totals = self._ledger.totals()
        if agent not in totals.agents() and self._contexts.get(agent) is None:
            return self._json(request, 404, {"error": {"message": f"no agent {agent!r}", "type": "not_found_error", "code": "unknown_agent"}})
        return self._json(request, 200, spend_periods(totals, self._clock.seconds(), agent))


    @app.route("/api/health", methods=["GET"])
    async def api_health(self, request):
        if not self._authorised(request):
            return self._refuse(request)
        doc = await self._operations.health()
        return self._json(request, 200 if doc["ok"] else 503, doc)

    @app.route("/api/budget/<agent>", methods=["POST"])
    async def set_budget(self, request, agent):
        if not self._authorised(request):
            return self._refuse(request)
        if not valid_agent_id(agent):
            return self._problem(request, ProxyError(400, "invalid_agent", "not a valid agent id"))
        try:
            doc = json.loads(request.content.read() or b"null")
        except ValueError:
            return self._problem(request, ProxyError(400, "invalid_json", "the body is not valid JSON"))
        try:
            entry = await self._operations.set_budget(agent, doc, actor_of(request))
        except ProxyError as e:
            return self._problem(request, e)
        return self._json(request, 200, {"agent": agent, "override": entry})

    @app.route("/api/reset/<agent>", methods=["POST"])
    async def reset_budget(self, request, agent):
        if not self._authorised(request):
            return self._refuse(request)
        if not valid_agent_id(agent):
            return self._problem(request, ProxyError(400, "invalid_agent", "not a valid agent id"))
        entry = await self._operations.reset(agent, actor_of(request))
        return self._json(request, 200, {"agent": agent, "override": entry})

    @app.route("/api/reload", methods=["POST"])
    def reload(self, request):
        if not self._authorised(request):
            return self._refuse(request)
        result = self._operations.reload(actor_of(request))
        return self._json(request, 200 if not result["failed"] else 500, result)

    def _problem(self, request, error: ProxyError) -> bytes:
        return self._json(
            request, error.status, {"error": {"message": error.message, "type": "invalid_request_error", "code": error.code}}
        )


def actor_of(request) -> str:
    """Who did it, for the audit: the credential kind and the client address."""
    address = request.getClientAddress()
    return f"operator-token@{getattr(address, 'host', 'unknown')}"


def spend_periods(totals, now: float, agent: str | None) -> dict:
    """Spend today, this calendar month and all time (UTC days), with models."""
    today = time.strftime("%Y-%m-%d", time.gmtime(now))
    month_start = today[:8] + "01"
    return {
        "agent": agent,
        "today": totals.period(today, today, agent),
        "month": totals.period(month_start, today, agent),
        "all_time": totals.period(None, None, agent),
    }
