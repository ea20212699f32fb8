"""
LiteLLM's key endpoints, on the API port: C{/key/generate}, C{/key/info},
C{/key/update}, C{/key/delete}, C{/key/list}, C{/key/regenerate} (and
C{/key/{key}/regenerate}), C{/key/block}, C{/key/unblock},
C{/key/health}, C{/key/{key}/reset_spend}.

Platforms that mint a key per sandbox session already call these on
LiteLLM; they can point the same code at cllama_tx.  Request and response
field names, statuses and the error shape are LiteLLM's
(L{cllama_tx.sites.admin_http}); the differences are listed in
C{docs/VIRTUAL_KEYS.md}.

Key administration needs the master key (C{CLLAMA_MASTER_KEY}, or
C{LITELLM_MASTER_KEY}), presented as C{Authorization: Bearer <master>} or
C{x-api-key: <master>} and compared in constant time.  Without one
configured, administration is off and every administrative call answers 403
saying so.  A virtual key may read its own C{/key/info} and
C{/key/health}.  Wrong credentials are slowed by the daemon's
L{OperatorGuard} (shared with the operator UI).

L{KeyApi} has one plain C{async} method per endpoint taking a
C{twisted.web} request and returning the body (status and content type
set); the management API (L{cllama_tx.sites.management}) routes to them,
and its own Klein C{app} (L{cllama_tx.sites.klein_routes}) serves the same
methods, for tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from cllama_tx.identity.key_fields import HANDLED_FIELDS
from cllama_tx.identity.litellm_fields import money, parse_duration
from cllama_tx.identity.operator import OperatorGuard
from cllama_tx.identity.virtual_keys import (
    KEY_FIELDS,
    KeyPage,
    VirtualKey,
    hash_key,
    looks_like_virtual_key,
    token_hash_of,
)
from cllama_tx.sites.admin_http import (
    ADMIN_OFF,
    MASTER_KEY_ENV,
    MIN_MASTER_KEY_LENGTH,
    AdminAuth,
    KeyApiError,
    answers,
    arg,
    bool_arg,
    error_body,
    int_arg,
    json_answer,
    master_key_from_env,
    presented_credential,
    read_body,
    throttled,
)
from cllama_tx.sites.health import ALIVE, READINESS_TIMEOUT, HealthApi
from cllama_tx.sites.scope_budget import ScopeBudgets
from cllama_tx.store.shared import scope_name

__all__ = [
    "ADMIN_OFF",
    "ALIVE",
    "MASTER_KEY_ENV",
    "MIN_MASTER_KEY_LENGTH",
    "KeyApi",
    "KeyApiError",
    "error_body",
    "master_key_from_env",
    "presented_credential",
    "throttled",
]

log = Logger(namespace="cllama_tx.sites.keys")

DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 100
MAX_DELETE = 1000
#: The longest a regenerated key's predecessor may keep working.
MAX_GRACE_SECONDS = 7 * 86400


def _identifier(doc: dict, name: str = "key") -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise KeyApiError(400, f"'{name}' is required: the key (sk-...) or its token hash", name)
    return value


class KeyApi:
    """
    The key API over a L{cllama_tx.identity.virtual_keys.VirtualKeyStore}.

    @param store: the virtual key store.
    @param master_key: the master key, or L{None} (administration off).
    @param ledger: the ledger: C{ready()} for C{/health/readiness},
        C{report()} for spend, C{reset_budget()} and
        C{set_budget_override()} for setting it; L{None}: spend is 0.
    @param clock: times the readiness check out, budget periods and the
        throttle of a guard made here (L{None}: none).
    @param spend_of: C{spend_of(token_hash)} -> a key's spend in USD (a
        float or a Deferred of one), read instead of the ledger when given.
    @param guard: the daemon's L{OperatorGuard}; L{None}: one of its own.
    @param governance: the daemon's governance (runtime resets and offsets).
    @param audit: the audit stream, for operator lines.
    """

    def __init__(
        self,
        store: Any,
        master_key: str | None,
        ledger: Any = None,
        clock: Any = None,
        spend_of: Callable[[str], Any] | None = None,
        readiness_timeout: float = READINESS_TIMEOUT,
        guard: OperatorGuard | None = None,
        governance: Any = None,
        audit: Any = None,
    ) -> None:
        guard = guard if guard is not None else OperatorGuard(clock=clock)
        self.auth = AdminAuth(master_key, guard, self._issued)
        self.guard = guard
        self._store = store
        self._ledger = ledger
        self._clock = clock
        self.clock = clock
        self._spend_of = spend_of
        self._audit = audit
        self.budgets = ScopeBudgets(ledger, governance, clock, audit)
        #: The directory (teams a user is in, for include_team_keys), when the daemon has one.
        self.directory: Any = None
        self.health = HealthApi(store, ledger, clock, self.auth, readiness_timeout)

    @property
    def store(self) -> Any:
        """The virtual key store (team aliases are kept there too)."""
        return self._store

    @property
    def administration_enabled(self) -> bool:
        return self.auth.enabled

    # -- authorisation (the proxy asks these of the master key too)

    def is_master(self, token: str | None) -> bool:
        """Whether C{token} is the master key (constant time; False when none is set)."""
        return self.auth.is_master(token)

    def require_master(self, request: Any, surface: str = "key_api") -> None:
        """See L{AdminAuth.require_master}."""
        self.auth.require_master(request, surface)

    def _issued(self, token: str) -> bool:
        """
        Whether C{token} is a virtual key this proxy issued (expired and
        blocked ones included): a client holding one is not guessing, and
        is not counted (else an expired session key, retried, would slow
        the master key of everyone at its address).
        """
        return looks_like_virtual_key(token) and self._store.get(hash_key(token)) is not None

    def _found(self, identifier: str) -> VirtualKey:
        token_hash = token_hash_of(identifier)
        vk = None if token_hash is None else self._store.get(token_hash)
        if vk is None:
            vk = self._store.find_alias(identifier)
        if vk is None:
            raise KeyApiError(404, "key not found", "key")
        return vk

    def _key_of(self, doc: dict) -> VirtualKey:
        """The key a body names by C{key}, else by C{key_alias} (as LiteLLM's update accepts)."""
        if isinstance(doc.get("key"), str) and doc["key"]:
            return self._found(doc["key"])
        alias = doc.get("key_alias")
        if isinstance(alias, str) and alias:
            vk = self._store.find_alias(alias)
            if vk is None:
                raise KeyApiError(404, "key not found", "key_alias")
            return vk
        raise KeyApiError(400, "'key' is required: the key (sk-...) or its token hash", "key")

    async def spend(self, vk: VirtualKey) -> float | None:
        """A key's spend: what counts against its budget now (None when it cannot be read)."""
        try:
            if self._spend_of is not None:
                return float(await defer.maybeDeferred(self._spend_of, vk.token_hash))
            return await self.budgets.spend(
                scope_name("key", vk.token_hash), vk.budget_duration, vk.budget_anchor or vk.created_at
            )
        except defer.CancelledError:
            raise
        except Exception:
            log.failure("key API: could not read the spend of key {token}", token=vk.token_hash[:12])
            return None

    async def describe(self, vk: VirtualKey) -> dict[str, Any]:
        """LiteLLM's info object of a key, with its spend and C{budget_reset_at}."""
        info = vk.to_info()
        info["spend"] = await self.spend(vk)
        info["budget_reset_at"] = self.budgets.reset_at(vk.budget_duration, vk.budget_anchor or vk.created_at)
        return info

    def _operator(self, action: str, **fields: Any) -> None:
        if self._audit is not None:
            self._audit.emit("operator", None, None, action=action, actor="master-key", **fields)

    @staticmethod
    def _spend_field(doc: dict) -> float | None:
        if "spend" not in doc or doc["spend"] is None:
            return None
        return money("spend", doc["spend"])

    # -- the endpoints (plain methods: the management API routes to them)

    @answers
    async def generate(self, request: Any) -> bytes:
        """C{POST /key/generate}: mint a key; the answer is the only place the key appears."""
        self.require_master(request)
        doc = read_body(request, allow_empty=True)
        return await self._mint(request, doc, doc.get("key"))


    async def _mint(self, request: Any, doc: dict, custom: Any) -> bytes:
        key, vk, spend = await self.mint(doc, custom)
        answer = {
            "key": key,
            **vk.to_info(),
            "token_id": vk.token_hash,
            "spend": spend,
            "duration": doc.get("duration") or None,
            "budget_reset_at": self.budgets.reset_at(vk.budget_duration, vk.budget_anchor),
        }
        return json_answer(request, 200, answer, no_store=True)

    async def mint(self, doc: dict, custom: Any, base: dict | None = None) -> tuple[str, VirtualKey, float]:
        """Mint a key of C{base}'s fields with C{doc}'s laid over them; its spend starts at C{doc}'s C{spend}."""
        if custom is not None and not isinstance(custom, str):
            raise KeyApiError(400, "'key' must be a string", "key")
        spend = self._spend_field(doc)
        fields = dict(base or {})
        fields.update({name: value for name, value in doc.items() if name not in HANDLED_FIELDS})
        key, vk = await self._store.create(key=custom or None, **fields)
        if spend:
            await self.budgets.set_spend(scope_name("key", vk.token_hash), spend)
        self._operator("key_generated", token=vk.token_hash[:12], team_id=vk.team_id, user_id=vk.user_id)
        return key, vk, spend or 0.0

    @answers
    async def info(self, request: Any) -> bytes:
        """
        C{GET /key/info?key=<key or token hash>}: with the master key, any
        key; with a virtual key, its own (C{?key=} may then be left out).
        """
        token = presented_credential(request)
        wanted = arg(request, "key")
        # A live virtual key reading its own info is answered at once (the
        # inference paths tell a live key from a dead one anyway); anything
        # else may be a guess at the master key, compared only when the
        # address need not wait.
        own = None if token is None else self._store.lookup(token)
        if own is not None and not self.is_master(token):
            if wanted and token_hash_of(wanted) != own.token_hash:
                raise KeyApiError(403, "a key may only read its own info", "key")
            vk = own
        elif token is None:
            if not self.auth.enabled:
                raise KeyApiError(403, ADMIN_OFF)
            raise KeyApiError(401, "Authentication Error, send 'Authorization: Bearer <key>'")
        else:
            if not self.auth.check_token(request, token):
                if not self.auth.enabled:
                    raise KeyApiError(403, ADMIN_OFF)
                raise KeyApiError(401, "Authentication Error, invalid, expired or blocked key")
            if not wanted:
                raise KeyApiError(400, "pass the key to look up as ?key=<key or token hash>", "key")
            vk = self._found(wanted)
        return json_answer(request, 200, {"key": vk.token_hash, "info": await self.describe(vk)})

    @answers
    async def update(self, request: Any) -> bytes:
        """C{POST /key/update}: change the fields given; C{null} clears one; C{spend} sets the spend."""
        self.require_master(request)
        doc = read_body(request)
        vk = self._key_of(doc)
        spend = self._spend_field(doc)
        changes = {name: value for name, value in doc.items() if name not in ("key", "spend")}
        if "key" not in doc or not doc.get("key"):
            changes.pop("key_alias", None)  # it named the key
        updated = await self._store.update(vk.token_hash, **changes) if changes else vk
        if spend is not None:
            await self.budgets.set_spend(scope_name("key", vk.token_hash), spend)
        self._operator("key_updated", token=vk.token_hash[:12], fields=sorted(doc))
        return json_answer(request, 200, {"key": updated.token_hash, **await self.describe(updated)})

    @answers
    async def delete(self, request: Any) -> bytes:
        """
        C{POST /key/delete} with C{{"keys": [...]}} (keys or token hashes)
        and/or C{{"key_aliases": [...]}}: the keys fail at once.
        """
        self.require_master(request)
        doc = read_body(request)
        keys = doc.get("keys")
        aliases = doc.get("key_aliases")
        if keys is None and aliases is None:
            raise KeyApiError(400, "send 'keys': a list of keys or token hashes (or 'key_aliases')", "keys")
        pairs: list[tuple[str, str | None]] = []
        for name, values in (("keys", keys), ("key_aliases", aliases)):
            if values is None:
                continue
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise KeyApiError(400, f"'{name}' must be a list of strings", name)
            if len(values) > MAX_DELETE:
                raise KeyApiError(400, f"'{name}' has more than {MAX_DELETE} entries", name)
            for value in values:
                if name == "keys":
                    pairs.append((value, token_hash_of(value)))
                else:
                    vk = self._store.find_alias(value)
                    pairs.append((value, None if vk is None else vk.token_hash))
        hashes = [h for _, h in pairs if h is not None]
        deleted = set(await self._store.delete(hashes))
        self._operator("keys_deleted", count=len(deleted))
        return json_answer(
            request,
            200,
            {
                "deleted_keys": [ident for ident, h in pairs if h in deleted],
                "not_found": [ident for ident, h in pairs if h not in deleted],
            },
        )

    @answers
    async def list(self, request: Any) -> bytes:
        """
        C{GET /key/list?page=&size=&team_id=&user_id=&organization_id=&key_alias=&key_hash=&return_full_object=&include_team_keys=}:
        token hashes (or info objects), newest first; with C{include_team_keys}
        a user's keys and those of the teams the user is in.
        """
        self.require_master(request)
        page = int_arg(request, "page", 1, 1, None)
        size = int_arg(request, "size", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        full = bool_arg(request, "return_full_object")
        key_hash = arg(request, "key_hash")
        filters = {
            "team_id": arg(request, "team_id"),
            "user_id": arg(request, "user_id"),
            "key_alias": arg(request, "key_alias"),
            "organization_id": arg(request, "organization_id"),
            "token_hash": token_hash_of(key_hash) if key_hash else None,
        }
        teams = self.directory.teams_of(filters["user_id"]) if (
            bool_arg(request, "include_team_keys") and filters["user_id"] and self.directory is not None) else []
        if teams:
            # The user's keys and the keys of the user's teams (LiteLLM's include_team_keys).
            user_keys = self._store.list(page=1, size=10**9, **filters).keys
            team_keys = [vk for team in teams
                         for vk in self._store.list(page=1, size=10**9, **{**filters, "user_id": None,
                                                                              "team_id": team}).keys]
            merged = sorted({vk.token_hash: vk for vk in (*user_keys, *team_keys)}.values(),
                            key=lambda vk: (vk.created_at, vk.token_hash), reverse=True)
            found = KeyPage(keys=tuple(merged[(page - 1) * size: page * size]), total_count=len(merged),
                            current_page=page, total_pages=-(-len(merged) // size))
        else:
            found = self._store.list(page=page, size=size, **filters)
        keys: list[Any] = []
        for vk in found.keys:
            keys.append(await self.describe(vk) if full else vk.token_hash)
        return json_answer(
            request,
            200,
            {
                "keys": keys,
                "total_count": found.total_count,
                "current_page": found.current_page,
                "total_pages": found.total_pages,
            },
        )

    async def _set_blocked(self, request: Any, blocked: bool) -> bytes:
        self.require_master(request)
        vk = self._found(_identifier(read_body(request)))
        updated = await self._store.update(vk.token_hash, blocked=blocked)
        self._operator("key_blocked" if blocked else "key_unblocked", token=vk.token_hash[:12])
        return json_answer(request, 200, {"key": updated.token_hash, **await self.describe(updated)})

    @answers
    async def block(self, request: Any) -> bytes:
        """C{POST /key/block} C{{"key": ...}}: the key fails at once until unblocked."""
        return await self._set_blocked(request, True)

    @answers
    async def unblock(self, request: Any) -> bytes:
        """C{POST /key/unblock} C{{"key": ...}}."""
        return await self._set_blocked(request, False)

    @answers
    async def regenerate(self, request: Any, key: str | None = None) -> bytes:
        """
        C{POST /key/regenerate} (or C{/key/{key}/regenerate}): a new key
        with the old one's fields (and those the body changes) takes its
        place; the old key fails at once, or after C{grace_period}.  The
        spend counted against the old key's budget carries over.  C{new_key}
        is a caller-chosen new key.
        """
        self.require_master(request)
        doc = read_body(request, allow_empty=True)
        if doc.get("new_master_key"):
            raise KeyApiError(400, "the master key is set in CLLAMA_MASTER_KEY, not through the key API",
                              "new_master_key")
        old = self._found(key if key is not None else _identifier(doc))
        grace = doc.get("grace_period")
        grace_seconds = 0.0
        if grace:
            try:
                grace_seconds = parse_duration(grace)
            except ValueError as e:
                raise KeyApiError(400, f"'grace_period': {e}", "grace_period") from None
            if grace_seconds > MAX_GRACE_SECONDS:
                raise KeyApiError(400, "'grace_period' is longer than 7 days", "grace_period")
        base = _fields_of(old)
        if old.expires is not None and "duration" not in doc and self._clock is not None:
            left = max(1, int(old.expires - self._clock.seconds()))
            base["duration"] = f"{left}s"
        base.pop("key_alias", None)  # the alias moves once the old key is gone (below)
        carried = await self.spend(old)
        changes = {name: value for name, value in doc.items() if name not in ("key", "grace_period", "new_key")}
        alias = changes.pop("key_alias", old.key_alias)
        key_text, new, _spend = await self.mint({**changes, "spend": carried or 0.0}, doc.get("new_key"), base)
        if grace_seconds > 0:
            await self._store.update(old.token_hash, duration=f"{int(grace_seconds)}s", key_alias=None)
        else:
            await self._store.delete([old.token_hash])
        if alias:
            new = await self._store.update(new.token_hash, key_alias=alias)
        answer = {"key": key_text, **await self.describe(new), "token_id": new.token_hash,
                  "duration": doc.get("duration") or None}
        self._operator("key_regenerated", token=old.token_hash[:12], new_token=new.token_hash[:12])
        return json_answer(request, 200, answer, no_store=True)

    @answers
    async def reset_spend(self, request: Any, key: str) -> bytes:
        """C{POST /key/{key}/reset_spend} C{{"reset_to": dollars}}: the spend counted from now on starts there."""
        self.require_master(request)
        doc = read_body(request)
        if "reset_to" not in doc:
            raise KeyApiError(400, "'reset_to' is required: the spend in US dollars to start from", "reset_to")
        amount = money("reset_to", doc["reset_to"])
        vk = self._found(key)
        await self.budgets.set_spend(scope_name("key", vk.token_hash), amount or 0.0)
        return json_answer(request, 200, {"key": vk.token_hash, **await self.describe(vk)})

    @answers
    async def key_health(self, request: Any) -> bytes:
        """
        C{POST /key/health} (or GET) with the key as the credential: C{{"key":
        "healthy", "logging_callbacks": null}} for a usable key (cllama_tx
        has no logging callbacks to check); 401 for any other.
        """
        token = presented_credential(request)
        vk = None if token is None else self._store.lookup(token)
        if vk is None:
            raise KeyApiError(401, "Authentication Error, invalid, expired or blocked key")
        return json_answer(request, 200, {"key": "healthy", "logging_callbacks": None})

    async def liveliness(self, request: Any) -> bytes:
        return await self.health.liveliness(request)

    async def readiness(self, request: Any) -> bytes:
        return await self.health.readiness(request)

    @property
    def app(self):
        """
        KeyApi's own Klein app, for tests (the daemon's management API routes
        to the methods instead): imported on use, so the daemon never loads Klein for it.
        """
        from cllama_tx.sites.klein_routes import KeyRoutes

        return KeyRoutes(self).app


def _fields_of(vk: VirtualKey) -> dict[str, Any]:
    """A key's fields as a C{/key/generate} body (to mint its successor)."""
    doc: dict[str, Any] = {name: getattr(vk, name) for name in KEY_FIELDS if name != "duration"}
    doc["models"] = list(vk.models)
    doc["tags"] = list(vk.tags)
    doc.update(vk.extra)
    return doc


