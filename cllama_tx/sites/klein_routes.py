"""
The Klein apps of the key API (L{cllama_tx.sites.keys.KeyApi}) and the
management API (L{cllama_tx.sites.management.ManagementApi}), for tests
and for mounting one of them as it is.

The daemon routes to those objects' methods itself (the API site's Klein
app, built on first use), so it never imports Klein and werkzeug for
them; their C{app} attributes import this module when asked for.
"""

from __future__ import annotations

from typing import Any

from klein import Klein
from werkzeug.exceptions import MethodNotAllowed, NotFound

from cllama_tx.sites.admin_http import KeyApiError, write_error


class KeyRoutes:
    """KeyApi's own routes: each calls the method of the same name."""

    app = Klein()

    def __init__(self, api: Any) -> None:
        self.api = api

    @app.route("/key/generate", methods=["POST"])
    async def _generate_route(self, request):
        return await self.api.generate(request)

    @app.route("/key/info", methods=["GET"])
    async def _info_route(self, request):
        return await self.api.info(request)

    @app.route("/key/update", methods=["POST"])
    async def _update_route(self, request):
        return await self.api.update(request)

    @app.route("/key/delete", methods=["POST"])
    async def _delete_route(self, request):
        return await self.api.delete(request)

    @app.route("/key/list", methods=["GET"])
    async def _list_route(self, request):
        return await self.api.list(request)

    @app.route("/key/block", methods=["POST"])
    async def _block_route(self, request):
        return await self.api.block(request)

    @app.route("/key/unblock", methods=["POST"])
    async def _unblock_route(self, request):
        return await self.api.unblock(request)

    @app.route("/key/regenerate", methods=["POST"])
    async def _regenerate_route(self, request):
        return await self.api.regenerate(request)

    @app.route("/key/<string:key>/regenerate", methods=["POST"])
    async def _regenerate_path_route(self, request, key):
        return await self.api.regenerate(request, key)

    @app.route("/key/<string:key>/reset_spend", methods=["POST"])
    async def _reset_spend_route(self, request, key):
        return await self.api.reset_spend(request, key)

    @app.route("/key/health", methods=["GET", "POST"])
    async def _key_health_route(self, request):
        return await self.api.key_health(request)

    @app.route("/health/liveliness", methods=["GET", "HEAD"])
    @app.route("/health/liveness", methods=["GET", "HEAD"])
    async def _liveliness_route(self, request):
        return await self.api.liveliness(request)

    @app.route("/health/readiness", methods=["GET", "HEAD"])
    async def _readiness_route(self, request):
        return await self.api.readiness(request)

    @app.handle_errors(NotFound)
    def _not_found(self, request, failure):
        path = request.path.decode("latin-1")
        return write_error(request, KeyApiError(404, f"no such endpoint: {path}"))

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request, failure):
        allowed = failure.value.valid_methods or []
        if allowed:
            request.setHeader(b"allow", ", ".join(sorted(allowed)).encode())
        method = request.method.decode("latin-1")
        return write_error(request, KeyApiError(405, f"method {method} is not allowed here"))


class ManagementRoutes:
    """Every management path, answered by L{ManagementApi.dispatch}."""

    app = Klein()

    def __init__(self, api: Any) -> None:
        self.api = api

    @app.route("/", branch=True, methods=["GET", "HEAD", "POST", "PATCH", "DELETE", "PUT"])
    async def _everything(self, request):
        return await self.api.dispatch(request)
