"""
Model routing on the UI port, behind the operator token like every UI
route: the mappings API (C{/_api/mappings/}) and the debug page's view
(C{/_debug}, HTML or JSON by C{Accept}).

  - C{GET /_api/mappings/}: every mapping: the stored ones (C{operator},
    C{llm}) and the model table's names (C{alias}, read-only).
  - C{GET /_api/mappings/{name}}: one; 404 C{mapping_not_found}.
  - C{PUT /_api/mappings/{name}} with C{{"target": "<model>"}}: the
    operator's mapping (source C{operator}, confirmed at once); with
    C{{"confirmed": true}} alone: confirms the resolver's mapping as it is.
    400 for a bad body or a target that is not available here, 409 for a
    name of the model table (the table decides it first: change it there).
  - C{POST /_api/mappings/{name}/confirm}: the same confirmation, for the
    debug page's button (and scripts); C{POST .../delete}: the page's
    delete button.
  - C{DELETE /_api/mappings/{name}}: removes it (the resolver may be asked
    again); 404 when there is none, 409 for a model table name.

Every change is an C{operator} audit line.  The handlers are called by the
routes of L{cllama_tx.sites.ui.app.UiApp}, which gate them first.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import attrs
from twisted.logger import Logger

from cllama_tx.governance.mapping_store import StoreNotRunning
from cllama_tx.governance.mappings import (
    LLM,
    OPERATOR,
    MappingError,
    ModelMapping,
    alias_mapping,
    check_name,
)
from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.surfaces.errors import ProxyError

__all__ = ["Routing", "confirm", "debug_view", "delete", "get", "listing", "put"]

log = Logger(namespace="cllama_tx.sites.ui")

#: Fields a PUT body may have.
_FIELDS = frozenset({"target", "confirmed"})
#: Resolution trace entries the debug page shows.
TRACE_SHOWN = 100


@attrs.define
class Routing:
    """What the mappings API and the debug page read: built once by the daemon."""

    router: Any
    mappings: Any
    clock: Any
    resolver: Any = None
    trace: Any = None
    providers: Any = None
    discovery: Any = None  # anything with snapshot() (local model discovery), or None

    def discovered(self) -> list[dict]:
        """The discovered local model servers (C{snapshot()}), or none."""
        snapshot = getattr(self.discovery, "snapshot", None)
        if snapshot is None:
            return []
        try:
            servers = snapshot()
        except Exception:
            log.failure("debug page: the discovery snapshot failed")
            return []
        return [dict(server) for server in servers or () if isinstance(server, dict)]


#: Seconds a read of the mappings waits at start for them to be in memory (then 503).
LOAD_WAIT = 5.0


def listing(routing: Routing) -> list[dict]:
    """Every mapping: stored ones, then the model table's names not stored (by name)."""
    stored = {m.name: m.to_json() for m in routing.mappings.all()}
    loaded_at = routing.router.table_loaded_at()
    for name, (target, kind) in routing.router.table_names().items():
        if name not in stored:
            stored[name] = {**alias_mapping(name, target, loaded_at), "kind": kind}
    return [stored[name] for name in sorted(stored)]


def _not_found(name: str) -> ProxyError:
    return ProxyError(404, "mapping_not_found", f"no mapping of {name[:200]!r}")


def _table_conflict(routing: Routing, name: str) -> ProxyError | None:
    if name in routing.router.table_names():
        return ProxyError(
            409, "managed_by_model_table",
            f"{name[:200]!r} is a name of the operator model table (CLLAMA_MODEL_TABLE), which decides it "
            "before any mapping: change it in that file",
        )
    return None


def _unavailable() -> ProxyError:
    return ProxyError(503, "store_unavailable", "the mappings' database cannot be written right now; try again",
                      retry_after=5)


def get(routing: Routing, name: str) -> dict:
    """One mapping as listed; @raise ProxyError: 404."""
    mapping = routing.mappings.get(name)
    if mapping is not None:
        return mapping.to_json()
    table = routing.router.table_names()
    if name in table:
        target, kind = table[name]
        return {**alias_mapping(name, target, routing.router.table_loaded_at()), "kind": kind}
    raise _not_found(name)


async def put(routing: Routing, name: str, doc: Any, actor: str) -> tuple[int, dict, str]:
    """
    Set or confirm a mapping from a PUT body: C{(status, mapping, action)}.

    @raise ProxyError: 400, 404, 409 or 503, with the reason.
    """
    try:
        name = check_name(name)
    except MappingError as e:
        raise ProxyError(400, "invalid_name", str(e)) from None
    if not isinstance(doc, dict):
        raise ProxyError(400, "invalid_body", 'the body must be a JSON object: {"target": "<model>"}, or '
                         '{"confirmed": true} to confirm the resolver\'s mapping')
    unknown = sorted(set(doc) - _FIELDS)
    if unknown:
        raise ProxyError(400, "invalid_field", f"unknown field {unknown[0][:100]!r}: a mapping takes 'target' "
                         "and 'confirmed'")
    conflict = _table_conflict(routing, name)
    if conflict is not None:
        raise conflict
    confirmed = doc.get("confirmed")
    if confirmed is not None and not isinstance(confirmed, bool):
        raise ProxyError(400, "invalid_field", "'confirmed' must be true or false")
    if "target" not in doc:
        if confirmed is True:
            return 200, await confirm(routing, name, actor), "mapping_confirm"
        raise ProxyError(400, "invalid_body", "the body needs a 'target' (or {\"confirmed\": true} to confirm "
                         "the resolver's mapping)")
    if confirmed is False:
        raise ProxyError(400, "invalid_field", "an operator's mapping is confirmed when it is set: leave "
                         "'confirmed' out")
    try:
        target = check_name(doc["target"], "target")
    except MappingError as e:
        raise ProxyError(400, "invalid_target", str(e)) from None
    if target == name:
        raise ProxyError(400, "invalid_target", "a name cannot be mapped to itself")
    problem = routing.router.target_problem(target)
    if problem is not None:
        raise ProxyError(400, "unknown_target", f"target {target[:200]!r} is not available here: {problem}")
    now = routing.clock.seconds()
    previous = routing.mappings.get(name)
    created = now
    if previous is not None and previous.source == OPERATOR and previous.target == target:
        created = previous.created_at
    mapping = ModelMapping(name, target, OPERATOR, created, now, now, actor, {})
    await _stored(routing.mappings.put(mapping))
    return (201 if previous is None else 200), mapping.to_json(), "mapping_set"


async def confirm(routing: Routing, name: str, actor: str) -> dict:
    """Confirm the resolver's mapping of C{name} as it is; @raise ProxyError: 404, 409, 503."""
    conflict = _table_conflict(routing, name)
    if conflict is not None:
        raise conflict
    mapping = routing.mappings.get(name)
    if mapping is None:
        raise _not_found(name)
    if mapping.confirmed:
        return mapping.to_json()
    now = routing.clock.seconds()
    detail = {**mapping.detail, "confirmed_by": actor}
    confirmed = attrs.evolve(mapping, confirmed_at=now, updated_at=now, detail=detail)
    stored = await _stored(routing.mappings.put(confirmed, only_source=LLM if mapping.source == LLM else None))
    if not stored:
        raise ProxyError(409, "mapping_changed", "the mapping was changed meanwhile (by another instance): "
                         "read it again")
    return confirmed.to_json()


async def delete(routing: Routing, name: str) -> dict:
    """Remove the stored mapping of C{name}; @raise ProxyError: 404, 409, 503."""
    conflict = _table_conflict(routing, name)
    if conflict is not None:
        raise conflict
    if routing.mappings.get(name) is None:
        raise _not_found(name)
    existed = await _stored(routing.mappings.delete(name))
    if not existed:
        raise _not_found(name)
    return {"name": name, "deleted": True}


async def _stored(writing) -> Any:
    try:
        return await writing
    except (DatabaseUnavailable, StoreNotRunning) as e:
        log.error("mappings API: the change could not be stored: {error}", error=str(e))
        raise _unavailable() from None


def path_of(name: str) -> str:
    """The API path of a mapping (its name escaped; C{/} kept, the route takes it)."""
    return "/_api/mappings/" + quote(name, safe="/")


def _pools(providers: Any) -> list[dict]:
    """Key pool states: ids and states only, never a secret (not even masked)."""
    snapshot = getattr(providers, "snapshot", None)
    out = []
    for provider in (snapshot() if snapshot is not None else None) or ():
        out.append({
            "provider": provider.get("name"),
            "configured": provider.get("configured"),
            "keyless": provider.get("keyless"),
            "active_key_id": provider.get("active_key_id"),
            "retry_after": provider.get("retry_after"),
            "keys": [
                {"id": key.get("id"), "state": key.get("state"), "active": key.get("active"),
                 "cooldown_until": key.get("cooldown_until"), "last_error_code": key.get("last_error_code")}
                for key in provider.get("keys") or ()
            ],
        })
    return out


def debug_view(routing: Routing) -> dict:
    """The debug page (and its JSON twin): discovery, mappings, the trace, key pools, the resolver."""
    mappings = listing(routing)
    resolver = routing.resolver
    return {
        "discovered": routing.discovered(),
        "mappings": mappings,
        "unconfirmed": sum(1 for m in mappings if m["source"] == LLM and not m["confirmed"]),
        "trace": routing.trace.entries(TRACE_SHOWN) if routing.trace is not None else [],
        "pools": _pools(routing.providers),
        "resolver": resolver.state() if resolver is not None else {"enabled": False, "model": None},
    }
