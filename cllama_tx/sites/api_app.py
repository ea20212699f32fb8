"""
The API port's Klein app: every route except the inference paths (models,
LiteLLM's management API, session history, health, surfaces).  Built on the
API's first request to such a path (L{cllama_tx.sites.api.build_api_site}),
not at start: Klein and werkzeug are megabytes a daemon that only proxies
never needs.
"""

from __future__ import annotations

import json

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound

from cllama_tx.accounting.history import clamp_limit
from cllama_tx.identity.authenticate import identify
from cllama_tx.identity.history_access import history_allowed, presented_token
from cllama_tx.identity.operator import OperatorGuard, request_source
from cllama_tx.identity.tokens import MalformedCredentials, parse_credentials
from cllama_tx.pipeline.proxy import Proxy, new_request_id
from cllama_tx.sites.api_health import answer_health
from cllama_tx.sites.management import build_management
from cllama_tx.surfaces import matrix
from cllama_tx.surfaces.errors import ANTHROPIC, OPENAI, ProxyError, error_body

MANAGEMENT_METHODS = ["GET", "HEAD", "POST", "PATCH", "DELETE", "PUT"]
log = Logger(namespace="cllama_tx.sites.api")


def _shape_for_path(path: bytes) -> str:
    return ANTHROPIC if path.startswith((b"/v1/messages", b"/messages")) else OPENAI


def _json(request, status: int, doc) -> bytes:
    body = json.dumps(doc).encode("utf-8")
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return body


class ApiApp:
    """Everything on the API port except the inference paths."""

    app = Klein()

    def __init__(
        self,
        matrix_doc: dict | None = None,
        contexts=None,
        history=None,
        ui_token: str | None = None,
        providers=None,
        pricing=None,
        keys_api=None,
        billing=None,
        guard: OperatorGuard | None = None,
        management=None,
    ) -> None:
        # The daemon's one guard for operator credentials (shared with the
        # UI and the key API): wrong UI tokens here slow guesses there too.
        self._guard = guard if guard is not None else getattr(keys_api, "guard", None) or OperatorGuard()
        self._keys_api = keys_api
        if management is None and keys_api is not None:
            management = build_management(keys_api, billing)
        self._management = management
        self._matrix_doc = matrix_doc or matrix.describe()
        self._contexts = contexts
        self._history = history
        self._ui_token = ui_token.encode("utf-8") if ui_token else None
        self._providers = providers
        self._pricing = pricing
        self._proxy: Proxy | None = None
        self._audit = None

    def bind(self, proxy: Proxy, audit=None) -> None:
        """The proxy (who is calling, what it may use) and the audit stream."""
        self._proxy = proxy
        self._audit = audit

    def _audited(self, request, status: int, who: str | None, error: str | None = None) -> None:
        """One audit line for a request served here (the inference paths write their own)."""
        if self._audit is None:
            return
        clock = self._proxy.clock if self._proxy is not None else None
        started = getattr(request, "_cllama_started", None)
        latency = round((clock.seconds() - started) * 1000, 3) if clock is not None and started is not None else 0
        fields = {
            "request_id": new_request_id(), "status_code": status, "latency_ms": latency,
            "path": request.path.decode("latin-1")[:500], "method": request.method.decode("latin-1")[:16],
        }
        if error is None:
            self._audit.emit("response", who, None, **fields)
        else:
            self._audit.emit("error", who, None, error=error, **fields)

    def _who(self, request) -> str | None:
        """The caller's name when its credentials are good (agents and keys), else None."""
        store = getattr(self._keys_api, "store", None)
        try:
            return identify(request.requestHeaders, self._contexts, store).agent_id
        except ProxyError:
            return None

    def _agent(self, request):
        """The calling agent's context, or the ProxyError to answer with."""
        try:
            agent_id, secret = parse_credentials(
                request.getHeader(b"authorization"), request.getHeader(b"x-api-key")
            )
        except MalformedCredentials as e:
            return ProxyError(401, "missing_credentials", str(e))
        context = None if self._contexts is None else self._contexts.authenticate(agent_id, secret)
        if context is None:
            return ProxyError(403, "invalid_credentials", "unknown agent or wrong secret")
        return context

    @app.route("/v1/models", methods=["GET"])
    @app.route("/models", methods=["GET"])
    async def models(self, request):
        """
        The models the caller may use, under the names it may use them by
        (L{cllama_tx.governance.resolution.visible_models}): an agent's
        model policy refs; a virtual key's aliases and model list; else
        the model table's names and every priced model of every configured
        provider.  Agents, virtual keys and the master key may ask.
        Anthropic's list shape when the request carries
        C{anthropic-version}, else OpenAI's.  Audited.
        """
        anthropic = request.getHeader(b"anthropic-version") is not None
        shape = ANTHROPIC if anthropic else OPENAI
        clock = self._proxy.clock if self._proxy is not None else None
        request._cllama_started = clock.seconds() if clock is not None else None
        if self._proxy is None:
            context = self._agent(request)
            if isinstance(context, ProxyError):
                self._audited(request, context.status, None, context.message)
                return _error(request, context, shape)
            refs = model_refs(context, self._providers, self._pricing)
        else:
            try:
                context = self._proxy.authenticate(request.requestHeaders, request)
                if isinstance(context, defer.Deferred):
                    context = await context  # a virtual key read from the shared store
            except ProxyError as error:
                self._audited(request, error.status, None, error.message)
                if error.retry_after is not None:
                    request.setHeader(b"retry-after", b"%d" % error.retry_after)
                return _error(request, error, shape)
            refs = self._proxy.models_for(context)
        self._audited(request, 200, context.agent_id)
        request.setHeader(b"content-type", b"application/json")
        if anthropic:
            data = [
                {"type": "model", "id": ref, "display_name": ref, "created_at": "1970-01-01T00:00:00Z"}
                for ref in refs
            ]
            doc = {
                "data": data,
                "has_more": False,
                "first_id": refs[0] if refs else None,
                "last_id": refs[-1] if refs else None,
            }
        else:
            owner = lambda ref: ref.partition("/")[0] if "/" in ref else "cllama_tx"  # noqa: E731
            doc = {
                "object": "list",
                "data": [{"id": ref, "object": "model", "created": 0, "owned_by": owner(ref)} for ref in refs],
            }
        return json.dumps(doc).encode("utf-8")

    # -- LiteLLM's management API (keys, teams, users, organisations,
    # customers, models, spend, health): sites/management.py answers.

    @app.route("/key/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/team/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/user/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/organization/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/customer/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/end_user/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/model/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/model_group/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/v1/model/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/v2/model/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/v2/user/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/v2/team/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/global/spend", methods=MANAGEMENT_METHODS)
    @app.route("/global/spend/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/spend/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/api/spend/<path:rest>", methods=MANAGEMENT_METHODS)
    @app.route("/health/<path:rest>", methods=MANAGEMENT_METHODS)
    async def management(self, request, rest=None):
        if self._management is None:
            return _error(request, ProxyError(404, "not_found", "the key API is not enabled"))
        return await self._management.dispatch(request)

    @app.route("/history", methods=["GET"])
    async def own_history(self, request):
        """The calling agent's own session history, NDJSON."""
        context = self._agent(request)
        if isinstance(context, ProxyError):
            return _error(request, context)
        return await self._history_lines(request, context.agent_id)

    @app.route("/history/<agent>", methods=["GET"])
    async def agent_history(self, request, agent):
        """
        An agent's session history, for the operator (the UI token), the
        agent itself (its own credentials) or a replay service (a
        C{cllama-history} token of its context's C{service-auth/}), as
        the reference allows.  No token is a 401, a token that may not
        read this history a 403 (the same for an agent that does not
        exist).  Tokens are compared only when the caller's address need
        not wait (see L{OperatorGuard}); a wrong one is counted.
        """
        token = presented_token(request.getHeader(b"authorization"), request.getHeader(b"x-api-key"))
        if token is None:
            return _error(request, ProxyError(
                401, "missing_credentials",
                "send Authorization: Bearer <token>: the operator token, the agent's own credentials "
                "or a cllama-history replay token",
            ))
        source = request_source(request)
        wait = self._guard.refusal(source, "history")
        if wait is not None:
            request.setHeader(b"retry-after", str(wait).encode("ascii"))
            message = f"too many wrong tokens from this address: the next one is compared in {wait} s"
            return _error(request, ProxyError(429, "too_many_attempts", message, retry_after=wait))
        if not history_allowed(token, agent, self._contexts, self._ui_token):
            self._guard.failed(source, "history")
            return _error(request, ProxyError(403, "invalid_credentials", "this token may not read this history"))
        return await self._history_lines(request, agent)

    async def _history_lines(self, request, agent: str):
        if self._history is None:
            return _error(request, ProxyError(404, "history_disabled", "session history is off: set CLAW_SESSION_HISTORY_DIR"))
        args = request.args
        try:
            limit = clamp_limit(_arg(args, b"limit"))
            lines = self._history.read(agent, _arg(args, b"after"), limit)
        except ValueError as e:
            return _error(request, ProxyError(400, "invalid_parameter", str(e)))
        lines = await lines
        request.setHeader(b"content-type", b"application/x-ndjson")
        return b"".join(lines)

    @app.route("/health", methods=["GET", "HEAD"])
    async def health(self, request):
        """C{{"ok": true}} (the probes read that); with the master key, LiteLLM's model health too."""
        return await answer_health(getattr(self._management, "keys", None), request)

    # Claude Code warms its connection with HEAD <ANTHROPIC_BASE_URL>/api/hello
    # on every start: answered like /health, not as a 404 in the audit.
    @app.route("/api/hello", methods=["GET", "HEAD"])
    def hello(self, request):
        return _json(request, 200, {"ok": True})

    @app.route("/v1/surfaces", methods=["GET"])
    def surfaces(self, request):
        return _json(request, 200, self._matrix_doc)

    @app.handle_errors(NotFound)
    def not_found(self, request, failure):
        error = ProxyError(404, "not_found", f"no such endpoint: {request.path.decode('latin-1')[:200]}")
        # Audited: a runner calling a path that is not here shows up.
        self._audited(request, 404, self._who(request), error.message)
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"application/json")
        return error_body(error, _shape_for_path(request.path))

    @app.handle_errors(MethodNotAllowed)
    def method_not_allowed(self, request, failure):
        allowed = failure.value.valid_methods or []
        if allowed:
            request.setHeader(b"allow", ", ".join(sorted(allowed)).encode())
        error = ProxyError(405, "method_not_allowed", f"method {request.method.decode()} is not allowed here")
        self._audited(request, 405, self._who(request), error.message)
        request.setResponseCode(405)
        request.setHeader(b"content-type", b"application/json")
        return error_body(error, _shape_for_path(request.path))

    @app.handle_errors(Exception)
    def unexpected(self, request, failure):
        log.failure("unexpected error on {path}", failure, path=request.path)
        if request.startedWriting:
            request.transport.abortConnection()
            return b""
        error = ProxyError(500, "internal_error", "internal error")
        request.setResponseCode(500)
        request.setHeader(b"content-type", b"application/json")
        return error_body(error, _shape_for_path(request.path))


def _arg(args, name: bytes) -> str | None:
    values = args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


def _error(request, error: ProxyError, shape: str = OPENAI) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    return error_body(error, shape)


def model_refs(context, providers, pricing) -> list[str]:
    """The model refs an agent may use, sorted as declared or by name."""
    policy = context.model_policy or {}
    allowed = [entry.get("ref") for entry in policy.get("allowed") or () if isinstance(entry, dict)]
    refs = [ref for ref in allowed if isinstance(ref, str)]
    if refs:
        return list(dict.fromkeys(refs))
    if providers is None or pricing is None:
        return []
    table = pricing.table
    return [f"{name}/{model}" for name in providers.names() for model in sorted(table.get(name, {}))]
