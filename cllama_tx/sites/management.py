"""
LiteLLM's management API on the API port: one table of every path
(keys, health, teams, users, organisations, customers, models, spend) and
the resource group that answers it.  The API site hands each request under
these paths here (L{ManagementApi.dispatch}); an unknown path or method is
answered in LiteLLM's error shape.  The groups themselves are
L{cllama_tx.sites.keys}, C{health}, C{teams}, C{users},
C{organizations}, C{customers}, C{models_api} and C{spend}.

L{ManagementApi} also has a Klein C{app} serving every path, for tests
and for mounting as is.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from cllama_tx.sites.admin_http import MANAGEMENT_PREFIXES, KeyApiError, write_error
from cllama_tx.sites.customers import CustomersApi
from cllama_tx.sites.models_api import ModelsApi
from cllama_tx.sites.organizations import OrganizationsApi
from cllama_tx.sites.spend import SpendApi
from cllama_tx.sites.teams import TeamsApi
from cllama_tx.sites.users import UsersApi

__all__ = ["PREFIXES", "ManagementApi", "build_management"]

Handler = Callable[..., Awaitable[bytes]]

#: The first path segments the API site hands here.
PREFIXES = MANAGEMENT_PREFIXES

_PATH_KEY = re.compile(r"/key/([^/]+)/(regenerate|reset_spend)")
_PATH_MODEL = re.compile(r"/model/([^/]+)/update")


class ManagementApi:
    """
    @param keys: the L{cllama_tx.sites.keys.KeyApi} (keys and health).
    @param spend: the L{cllama_tx.sites.spend.SpendApi}.
    @param teams, users, organizations, customers, models: the resource
        groups, or None (their paths then answer 404 saying so).
    """

    def __init__(self, keys: Any, spend: SpendApi | None = None, teams: TeamsApi | None = None,
                 users: UsersApi | None = None, organizations: OrganizationsApi | None = None,
                 customers: CustomersApi | None = None, models: ModelsApi | None = None) -> None:
        self.keys = keys
        self.spend = spend
        self.teams = teams
        self.users = users
        self.organizations = organizations
        self.customers = customers
        self.models = models
        self.routes: dict[str, dict[bytes, Handler]] = {}
        self._build()

    def _add(self, methods: str, paths: tuple[str, ...], handler: Handler | None) -> None:
        if handler is None:
            return
        for path in paths:
            table = self.routes.setdefault(path, {})
            for method in methods.split():
                table[method.encode("ascii")] = handler

    def _build(self) -> None:
        k = self.keys
        add = self._add
        add("POST", ("/key/generate",), k.generate)
        add("GET", ("/key/info",), k.info)
        add("POST", ("/key/update",), k.update)
        add("POST", ("/key/delete",), k.delete)
        add("GET", ("/key/list",), k.list)
        add("POST", ("/key/block",), k.block)
        add("POST", ("/key/unblock",), k.unblock)
        add("POST", ("/key/regenerate",), k.regenerate)
        add("GET POST", ("/key/health",), k.key_health)
        add("GET HEAD", ("/health/liveliness", "/health/liveness"), k.liveliness)
        add("GET HEAD", ("/health/readiness",), k.readiness)
        s = self.spend
        if s is not None:
            add("GET", ("/spend/logs",), s.logs)
            add("GET", ("/spend/logs/v2",), s.logs_v2)
            add("GET", ("/api/spend/events",), s.events)
            add("GET", ("/global/spend",), s.global_spend)
            add("GET", ("/global/spend/report",), s.report)
            add("GET", ("/global/spend/keys",), s.keys)
            add("GET", ("/global/spend/models",), s.models)
            add("GET", ("/global/spend/teams",), s.teams)
            add("POST", ("/global/spend/end_users",), s.end_users)
            add("GET", ("/user/daily/activity",), s.daily_activity)

            async def team_activity(request: Any) -> bytes:
                return await s.daily_activity(request, scope="team")

            add("GET", ("/team/daily/activity",), team_activity)
        t = self.teams
        if t is not None:
            add("POST", ("/team/new",), t.new)
            add("GET", ("/team/info",), t.info)
            add("POST", ("/team/update",), t.update)
            add("POST DELETE", ("/team/delete",), t.delete)
            add("GET", ("/team/list",), t.list)
            add("GET", ("/v2/team/list",), t.list_v2)
            add("POST", ("/team/member_add",), t.member_add)
            add("POST", ("/team/member_delete",), t.member_delete)
            add("POST", ("/team/member_update",), t.member_update)
            add("POST", ("/team/block",), t.block)
            add("POST", ("/team/unblock",), t.unblock)
            add("POST", ("/team/model/add",), t.model_add)
            add("POST", ("/team/model/delete",), t.model_delete)
        u = self.users
        if u is not None:
            add("POST", ("/user/new",), u.new)
            add("GET", ("/user/info",), u.info)
            add("POST", ("/user/update",), u.update)
            add("POST DELETE", ("/user/delete",), u.delete)
            add("GET", ("/user/list",), u.list)
            add("GET", ("/v2/user/info",), u.info_v2)
        o = self.organizations
        if o is not None:
            add("POST", ("/organization/new",), o.new)
            add("GET POST", ("/organization/info",), o.info)
            add("PATCH POST", ("/organization/update",), o.update)
            add("DELETE POST", ("/organization/delete",), o.delete)
            add("GET", ("/organization/list",), o.list)
            add("POST", ("/organization/member_add",), o.member_add)
            add("DELETE POST", ("/organization/member_delete",), o.member_delete)
            add("PATCH POST", ("/organization/member_update",), o.member_update)
        c = self.customers
        if c is not None:
            for prefix in ("/customer", "/end_user"):
                add("POST", (f"{prefix}/new",), c.new)
                add("GET", (f"{prefix}/info",), c.info)
                add("POST", (f"{prefix}/update",), c.update)
                add("POST DELETE", (f"{prefix}/delete",), c.delete)
                add("GET", (f"{prefix}/list",), c.list)
                add("POST", (f"{prefix}/block",), c.block)
                add("POST", (f"{prefix}/unblock",), c.unblock)
        m = self.models
        if m is not None:
            add("POST", ("/model/new",), m.new)
            add("POST", ("/model/update",), m.update)
            add("POST", ("/model/delete",), m.delete)
            add("GET", ("/model/info", "/v1/model/info", "/v2/model/info"), m.info)
            add("GET", ("/model_group/info",), m.group_info)

    async def dispatch(self, request: Any) -> bytes:
        """Answer a request under one of L{PREFIXES}."""
        path = request.path.decode("latin-1")
        if len(path) > 1 and path.endswith("/"):
            path = path[:-1]
        methods = self.routes.get(path)
        handler: Handler | None = None
        args: tuple = ()
        if methods is None:
            matched = _PATH_KEY.fullmatch(path)
            if matched is not None:
                methods = {b"POST": self.keys.regenerate if matched.group(2) == "regenerate" else self.keys.reset_spend}
                args = (_unquote(matched.group(1)),)
            matched = _PATH_MODEL.fullmatch(path)
            if matched is not None and self.models is not None:
                methods = {b"PATCH": self.models.update, b"POST": self.models.update}
                args = (_unquote(matched.group(1)),)
        if methods is None:
            return write_error(request, KeyApiError(404, f"no such endpoint: {path[:200]}"))
        method = b"GET" if request.method == b"HEAD" and b"GET" in methods else request.method
        handler = methods.get(method)
        if handler is None:
            request.setHeader(b"allow", b", ".join(sorted(methods)))
            return write_error(request, KeyApiError(405, f"method {request.method.decode('latin-1')} is not allowed here"))
        return await handler(request, *args)

    @property
    def app(self):
        """A Klein app serving every path (L{cllama_tx.sites.klein_routes}), imported on use."""
        from cllama_tx.sites.klein_routes import ManagementRoutes

        return ManagementRoutes(self).app


def _unquote(segment: str) -> str:
    from urllib.parse import unquote

    return unquote(segment)


def build_management(keys_api: Any, billing: Any, *, directory: Any = None, model_table: Any = None,
                     pricing: Any = None, clock: Any = None, audit: Any = None) -> ManagementApi:
    """Every resource group over the daemon's objects (without a directory: keys, health and spend only)."""
    spend = getattr(billing, "spend", None)
    if directory is None:
        return ManagementApi(keys_api, spend)
    keys_api.directory = directory
    common = (keys_api.auth, directory, keys_api, keys_api.budgets, audit)
    return ManagementApi(
        keys_api,
        spend,
        teams=TeamsApi(*common),
        users=UsersApi(*common),
        organizations=OrganizationsApi(*common),
        customers=CustomersApi(*common),
        models=ModelsApi(*common, table=model_table, pricing=pricing, clock=clock) if model_table is not None else None,
    )
