"""
The LiteLLM-compatible key API and health endpoints, on the API port.

Platforms that mint a key per sandbox session already call LiteLLM's
C{/key/generate}, C{/key/info}, C{/key/update}, C{/key/delete} and
C{/key/list}; they can point the same code at cllama_tx.  Request and
response field names, the error shape (C{{"error": {"message", "type",
"param", "code"}}}, C{code} the status as a string) and the health answers
are LiteLLM's; the differences are listed in C{docs/VIRTUAL_KEYS.md}.

Key administration needs the master key (C{CLLAMA_MASTER_KEY}, or
C{LITELLM_MASTER_KEY}), presented as C{Authorization: Bearer <master>} or
C{x-api-key: <master>} and compared in constant time.  Without one
configured, administration is off and every administrative call answers 403
saying so.  A virtual key may read its own C{/key/info}.  Wrong credentials
are slowed by the daemon's L{OperatorGuard} (shared with the operator UI):
an address that keeps guessing gets 429 and C{Retry-After}, and what it
presents meanwhile is not compared.

L{KeyApi} has one plain C{async} method per endpoint taking a
C{twisted.web} request and returning the body (status and content type set),
so the API site can delegate to them from its own routes; its own Klein
C{app} serves the same methods, for tests and for mounting as is.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from klein import Klein
from twisted.internet import defer
from twisted.logger import Logger
from werkzeug.exceptions import MethodNotAllowed, NotFound

from cllama_tx import __version__
from cllama_tx.identity.operator import OperatorGuard, request_source
from cllama_tx.identity.virtual_keys import (
    KEY_FIELDS,
    InvalidField,
    KeyNotFound,
    StoreClosed,
    VirtualKey,
    hash_key,
    looks_like_virtual_key,
    token_hash_of,
    validate_key_fields,
)
from cllama_tx.store.database import DatabaseUnavailable

log = Logger(namespace="cllama_tx.sites.keys")

#: Where the master key is read from, first found wins.
MASTER_KEY_ENV = ("CLLAMA_MASTER_KEY", "LITELLM_MASTER_KEY")
#: A shorter master key is refused at start: it guards every key and budget.
MIN_MASTER_KEY_LENGTH = 16
ADMIN_OFF = "key administration is off: set CLLAMA_MASTER_KEY"
DEFAULT_PAGE_SIZE = 10
MAX_PAGE_SIZE = 100
MAX_DELETE = 1000
READINESS_TIMEOUT = 5.0
ALIVE = "I'm alive!"

_TYPES = {
    400: "bad_request_error",
    401: "auth_error",
    403: "auth_error",
    404: "not_found_error",
    405: "bad_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


def master_key_from_env(env: Mapping[str, str]) -> str | None:
    """
    The master key: C{CLLAMA_MASTER_KEY}, else C{LITELLM_MASTER_KEY};
    L{None} (administration off) when neither is set or both are empty.
    Surrounding spaces are removed.

    @raise ValueError: the key is shorter than L{MIN_MASTER_KEY_LENGTH}
        characters (the message names the variable, never the value).
    """
    for name in MASTER_KEY_ENV:
        value = (env.get(name) or "").strip()
        if value:
            if len(value) < MIN_MASTER_KEY_LENGTH:
                raise ValueError(
                    f"{name} is shorter than {MIN_MASTER_KEY_LENGTH} characters:"
                    " use a long random value (e.g. 'sk-' and 40 random characters)"
                )
            return value
    return None


class KeyApiError(Exception):
    """A refusal, answered in LiteLLM's error shape.  Never holds a secret."""

    def __init__(
        self, status: int, message: str, param: str | None = None, kind: str | None = None, retry_after: int | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind or _TYPES.get(status, "internal_server_error")
        self.retry_after = retry_after


def error_body(error: KeyApiError) -> bytes:
    """LiteLLM's error body: C{code} is the HTTP status as a string."""
    doc = {
        "error": {
            "message": error.message,
            "type": error.kind,
            "param": error.param,
            "code": str(error.status),
        }
    }
    return json.dumps(doc).encode("utf-8")


def _json(request: Any, status: int, doc: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(doc).encode("utf-8")


def _write_error(request: Any, error: KeyApiError) -> bytes:
    request.setResponseCode(error.status)
    request.setHeader(b"content-type", b"application/json")
    if error.retry_after is not None:
        request.setHeader(b"retry-after", str(error.retry_after).encode("ascii"))
    return error_body(error)


def throttled(wait: int) -> KeyApiError:
    """The refusal of a credential not compared because its address must wait."""
    return KeyApiError(
        429,
        f"too many wrong keys from this address: the next one is compared in {wait} s",
        retry_after=wait,
    )


def presented_credential(request: Any) -> str | None:
    """
    The credential of the request: C{Authorization: Bearer <token>} (any
    case), else C{x-api-key}, else C{x-litellm-api-key}.  L{None} when
    absent, malformed or not UTF-8.  As for agents, a present
    C{Authorization} decides: it is never papered over by the others.
    """
    authorization = request.getHeader(b"authorization")
    if authorization is not None:
        parts = authorization.strip().split(None, 1)
        if len(parts) != 2 or parts[0].lower() != b"bearer":
            return None
        raw = parts[1].strip()
    else:
        raw = request.getHeader(b"x-api-key")
        if raw is None:
            raw = request.getHeader(b"x-litellm-api-key")
        if raw is None:
            return None
        raw = raw.strip()
    try:
        token = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return token or None


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


def _read_body(request: Any, allow_empty: bool = False) -> dict[str, Any]:
    """The JSON object of the request body (read before any await)."""
    content = request.content
    content.seek(0)  # a form content type makes twisted.web read it first
    raw = content.read()
    if not raw.strip():
        if allow_empty:
            return {}
        raise KeyApiError(400, "the request body must be a JSON object")

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        doc = json.loads(raw, parse_constant=no_constants)
    except (ValueError, RecursionError):
        raise KeyApiError(400, "the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise KeyApiError(400, "the request body must be a JSON object")
    return doc


def _arg(request: Any, name: str) -> str | None:
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise KeyApiError(400, f"'{name}' is not valid UTF-8", name) from None


def _int_arg(request: Any, name: str, default: int, low: int, high: int | None) -> int:
    raw = _arg(request, name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise KeyApiError(400, f"'{name}' must be a whole number", name) from None
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise KeyApiError(400, f"'{name}' must be {bound}", name)
    return value


def _bool_arg(request: Any, name: str) -> bool:
    raw = _arg(request, name)
    if raw is None or raw == "":
        return False
    lowered = raw.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise KeyApiError(400, f"'{name}' must be true or false", name)


def _identifier(doc: Mapping[str, Any], name: str = "key") -> str:
    value = doc.get(name)
    if not isinstance(value, str) or not value:
        raise KeyApiError(400, f"'{name}' is required: the key (sk-...) or its token hash", name)
    return value


def _answers(method: Callable[..., Awaitable[bytes]]) -> Callable[..., Awaitable[bytes]]:
    """Turn refusals and surprises into LiteLLM-shaped error bodies."""

    @functools.wraps(method)
    async def wrapper(self: KeyApi, request: Any) -> bytes:
        try:
            return await method(self, request)
        except defer.CancelledError:
            raise  # the client went away; Klein handles it
        except KeyApiError as e:
            return _write_error(request, e)
        except InvalidField as e:
            return _write_error(request, KeyApiError(400, str(e), e.field))
        except KeyNotFound:
            return _write_error(request, KeyApiError(404, "key not found", "key"))
        except StoreClosed:
            return _write_error(request, KeyApiError(503, "the key store is shutting down"))
        except DatabaseUnavailable:
            return _write_error(request, KeyApiError(503, "the key store's database cannot be reached; try again"))
        except Exception:
            log.failure("key API: unexpected error on {path}", path=request.path)
            return _write_error(request, KeyApiError(500, "internal error"))

    return wrapper


class KeyApi:
    """
    The key API over a L{cllama_tx.identity.virtual_keys.VirtualKeyStore}.

    @param store: the virtual key store.
    @param master_key: the master key, or L{None} (administration off).
    @param ledger: anything with C{ready() -> Deferred[bool]}, for
        C{/health/readiness}; L{None} reports the database as not connected.
    @param clock: times the readiness check out (L{None}: no timeout), and
        the throttle of a guard made here.
    @param spend_of: C{spend_of(token_hash)} -> the key's spend in USD, a
        float or a Deferred of one, for C{/key/info}; L{None}: 0.0.
    @param guard: the daemon's L{OperatorGuard}; L{None}: one of its own.
    """

    app = Klein()

    def __init__(
        self,
        store: Any,
        master_key: str | None,
        ledger: Any = None,
        clock: Any = None,
        spend_of: Callable[[str], Any] | None = None,
        readiness_timeout: float = READINESS_TIMEOUT,
        guard: OperatorGuard | None = None,
    ) -> None:
        self.guard = guard if guard is not None else OperatorGuard(clock=clock)
        self._store = store
        self._master_digest = _digest(master_key) if master_key else None
        self._ledger = ledger
        self._clock = clock
        self._spend_of = spend_of
        self._readiness_timeout = readiness_timeout

    @property
    def store(self) -> Any:
        """The virtual key store (team aliases are kept there too)."""
        return self._store

    @property
    def administration_enabled(self) -> bool:
        return self._master_digest is not None

    # -- authorisation

    def is_master(self, token: str | None) -> bool:
        """Whether C{token} is the master key (constant time; False when none is set)."""
        if token is None or self._master_digest is None:
            return False
        return hmac.compare_digest(_digest(token), self._master_digest)

    def require_master(self, request: Any, surface: str = "key_api") -> None:
        """
        Pass when C{request} carries the master key, else raise the
        L{KeyApiError} to answer: 403 (administration off), 401 (missing or
        wrong; a wrong one is counted by the guard), 429 (the address must
        wait: the credential is not compared).
        """
        if self._master_digest is None:
            raise KeyApiError(403, ADMIN_OFF)
        token = presented_credential(request)
        if token is None:
            raise KeyApiError(401, "Authentication Error, send the master key as 'Authorization: Bearer <master key>'")
        source = request_source(request)
        wait = self.guard.refusal(source, surface)
        if wait is not None:
            raise throttled(wait)
        if not self.is_master(token):
            if not self._issued(token):
                self.guard.failed(source, surface)
            raise KeyApiError(401, "Authentication Error, invalid master key")

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
            raise KeyApiError(404, "key not found", "key")
        return vk

    async def _spend(self, token_hash: str) -> float | None:
        if self._spend_of is None:
            return 0.0
        try:
            return await defer.maybeDeferred(self._spend_of, token_hash)
        except defer.CancelledError:
            raise
        except Exception:
            log.failure("key API: could not read the spend of key {token}", token=token_hash[:12])
            return None

    # -- the endpoints (plain methods: the API site delegates to them)

    @_answers
    async def generate(self, request: Any) -> bytes:
        """C{POST /key/generate}: mint a key; the answer is the only place the key appears."""
        self.require_master(request)
        doc = _read_body(request, allow_empty=True)
        validate_key_fields(doc, update=False)  # refuses unknown and unsupported fields
        custom = doc.get("key")
        if custom is not None and not isinstance(custom, str):
            raise KeyApiError(400, "'key' must be a string", "key")
        fields = {name: doc[name] for name in KEY_FIELDS if name in doc}
        key, vk = await self._store.create(key=custom or None, **fields)
        answer = {
            "key": key,
            **vk.to_info(),
            "token_id": vk.token_hash,
            "spend": 0.0,
            "duration": doc.get("duration") or None,
        }
        request.setHeader(b"cache-control", b"no-store")
        return _json(request, 200, answer)

    @_answers
    async def info(self, request: Any) -> bytes:
        """
        C{GET /key/info?key=<key or token hash>}: with the master key, any
        key; with a virtual key, its own (C{?key=} may then be left out).
        """
        token = presented_credential(request)
        wanted = _arg(request, "key")
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
            if self._master_digest is None:
                raise KeyApiError(403, ADMIN_OFF)
            raise KeyApiError(401, "Authentication Error, send 'Authorization: Bearer <key>'")
        else:
            source = request_source(request)
            wait = self.guard.refusal(source, "key_api")
            if wait is not None:
                raise throttled(wait)
            if not self.is_master(token):
                if not self._issued(token):
                    self.guard.failed(source, "key_api")
                if self._master_digest is None:
                    raise KeyApiError(403, ADMIN_OFF)
                raise KeyApiError(401, "Authentication Error, invalid, expired or blocked key")
            if not wanted:
                raise KeyApiError(400, "pass the key to look up as ?key=<key or token hash>", "key")
            vk = self._found(wanted)
        spend = await self._spend(vk.token_hash)
        return _json(request, 200, {"key": vk.token_hash, "info": {**vk.to_info(), "spend": spend}})

    @_answers
    async def update(self, request: Any) -> bytes:
        """C{POST /key/update}: change the fields given; C{null} clears one."""
        self.require_master(request)
        doc = _read_body(request)
        vk = self._found(_identifier(doc))
        changes = {name: value for name, value in doc.items() if name != "key"}
        updated = await self._store.update(vk.token_hash, **changes)
        return _json(request, 200, {"key": updated.token_hash, **updated.to_info()})

    @_answers
    async def delete(self, request: Any) -> bytes:
        """
        C{POST /key/delete} with C{{"keys": [...]}} (keys or token hashes)
        and/or C{{"key_aliases": [...]}}: the keys fail at once.
        """
        self.require_master(request)
        doc = _read_body(request)
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
        return _json(
            request,
            200,
            {
                "deleted_keys": [ident for ident, h in pairs if h in deleted],
                "not_found": [ident for ident, h in pairs if h not in deleted],
            },
        )

    @_answers
    async def list(self, request: Any) -> bytes:
        """
        C{GET /key/list?page=&size=&team_id=&user_id=&key_alias=&return_full_object=}:
        token hashes (or info objects), newest first.
        """
        self.require_master(request)
        page = _int_arg(request, "page", 1, 1, None)
        size = _int_arg(request, "size", DEFAULT_PAGE_SIZE, 1, MAX_PAGE_SIZE)
        full = _bool_arg(request, "return_full_object")
        found = self._store.list(
            team_id=_arg(request, "team_id") or None,
            user_id=_arg(request, "user_id") or None,
            key_alias=_arg(request, "key_alias") or None,
            page=page,
            size=size,
        )
        return _json(
            request,
            200,
            {
                "keys": [vk.to_info() if full else vk.token_hash for vk in found.keys],
                "total_count": found.total_count,
                "current_page": found.current_page,
                "total_pages": found.total_pages,
            },
        )

    async def _set_blocked(self, request: Any, blocked: bool) -> bytes:
        self.require_master(request)
        vk = self._found(_identifier(_read_body(request)))
        updated = await self._store.update(vk.token_hash, blocked=blocked)
        return _json(request, 200, {"key": updated.token_hash, **updated.to_info()})

    @_answers
    async def block(self, request: Any) -> bytes:
        """C{POST /key/block} C{{"key": ...}}: the key fails at once until unblocked."""
        return await self._set_blocked(request, True)

    @_answers
    async def unblock(self, request: Any) -> bytes:
        """C{POST /key/unblock} C{{"key": ...}}."""
        return await self._set_blocked(request, False)

    async def liveliness(self, request: Any) -> bytes:
        """C{GET /health/liveliness} (and C{/health/liveness}): LiteLLM's JSON string."""
        return _json(request, 200, ALIVE)

    async def readiness(self, request: Any) -> bytes:
        """
        C{GET /health/readiness}: 200 when the key store runs and the ledger
        answers a query (within C{readiness_timeout}) and writes its rows,
        else 503.  C{ledger} says how it stands: C{failing} while rows are
        held in memory because the disk refuses them.
        """
        store_ok = bool(getattr(self._store, "running", False)) and bool(getattr(self._store, "loaded", True))
        ledger = None
        if self._ledger is None:
            db = "Not connected"
            db_ok = True
        else:
            try:
                d = self._ledger.ready()
                if self._clock is not None:
                    d.addTimeout(self._readiness_timeout, self._clock)
                db_ok = bool(await d)
            except defer.CancelledError:
                raise
            except Exception:
                db_ok = False
            db = "connected" if db_ok else "disconnected"
            if hasattr(self._ledger, "health"):
                storage = self._ledger.health()
                ledger = {"state": storage["state"], "pending_rows": storage["pending_rows"]}
                if storage["state"] == "failing":
                    db = "failing"
        healthy = store_ok and db_ok
        doc = {
            "status": "healthy" if healthy else "unhealthy",
            "db": db,
            "ledger": ledger,
            "virtual_keys": "loaded" if store_ok else "loading" if getattr(self._store, "running", False) else "not running",
            "key_administration": "on" if self.administration_enabled else "off",
            "cache": None,
            "cllama_tx_version": __version__,
        }
        return _json(request, 200 if healthy else 503, doc)

    # -- KeyApi's own Klein app (the API site may delegate to the methods instead)

    @app.route("/key/generate", methods=["POST"])
    async def _generate_route(self, request):
        return await self.generate(request)

    @app.route("/key/info", methods=["GET"])
    async def _info_route(self, request):
        return await self.info(request)

    @app.route("/key/update", methods=["POST"])
    async def _update_route(self, request):
        return await self.update(request)

    @app.route("/key/delete", methods=["POST"])
    async def _delete_route(self, request):
        return await self.delete(request)

    @app.route("/key/list", methods=["GET"])
    async def _list_route(self, request):
        return await self.list(request)

    @app.route("/key/block", methods=["POST"])
    async def _block_route(self, request):
        return await self.block(request)

    @app.route("/key/unblock", methods=["POST"])
    async def _unblock_route(self, request):
        return await self.unblock(request)

    @app.route("/health/liveliness", methods=["GET", "HEAD"])
    @app.route("/health/liveness", methods=["GET", "HEAD"])
    async def _liveliness_route(self, request):
        return await self.liveliness(request)

    @app.route("/health/readiness", methods=["GET", "HEAD"])
    async def _readiness_route(self, request):
        return await self.readiness(request)

    @app.handle_errors(NotFound)
    def _not_found(self, request, failure):
        path = request.path.decode("latin-1")
        return _write_error(request, KeyApiError(404, f"no such endpoint: {path}"))

    @app.handle_errors(MethodNotAllowed)
    def _method_not_allowed(self, request, failure):
        allowed = failure.value.valid_methods or []
        if allowed:
            request.setHeader(b"allow", ", ".join(sorted(allowed)).encode())
        method = request.method.decode("latin-1")
        return _write_error(request, KeyApiError(405, f"method {method} is not allowed here"))
