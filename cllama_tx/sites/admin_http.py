"""
What every endpoint of the LiteLLM-compatible management API shares: the
master key and how it is checked, LiteLLM's error shape
(C{{"error": {"message", "type", "param", "code"}}}, C{code} the status as
a string), reading JSON bodies and query arguments, and turning the
rooms' refusals into those errors.

Why one module: the key, team, user, organisation, customer, model and
spend endpoints (C{cllama_tx.sites.keys}, C{teams}, C{users}, ...) must
answer alike, and a wrong master key presented to any of them must slow
guesses at all of them (the daemon's one L{OperatorGuard}).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from cllama_tx.identity.litellm_fields import InvalidField
from cllama_tx.identity.operator import OperatorGuard, request_source
from cllama_tx.store.database import DatabaseUnavailable

__all__ = [
    "ADMIN_OFF",
    "MASTER_KEY_ENV",
    "MIN_MASTER_KEY_LENGTH",
    "AdminAuth",
    "KeyApiError",
    "answers",
    "error_body",
    "is_management_path",
    "json_answer",
    "master_key_from_env",
    "presented_credential",
    "read_body",
    "throttled",
    "write_error",
]

log = Logger(namespace="cllama_tx.sites.admin")

#: Where the master key is read from, first found wins.
MASTER_KEY_ENV = ("CLLAMA_MASTER_KEY", "LITELLM_MASTER_KEY")
#: A shorter master key is refused at start: it guards every key and budget.
MIN_MASTER_KEY_LENGTH = 16
ADMIN_OFF = "key administration is off: set CLLAMA_MASTER_KEY"
#: The most ids one call may name (deletions, blocks).
MAX_LIST_PAGE = 1000

#: The first path segments of the management API (the API site hands these to it).
MANAGEMENT_PREFIXES = (
    "key", "team", "user", "organization", "customer", "end_user", "model", "model_group", "v1/model", "v2/model",
    "v2/user", "v2/team", "global", "spend", "health", "api/spend",
)
_MANAGEMENT_STARTS = tuple(f"/{prefix}/".encode() for prefix in MANAGEMENT_PREFIXES) + (b"/global/spend",)


def is_management_path(path: bytes) -> bool:
    """Whether a path is the management API's (its refusals then take LiteLLM's shape)."""
    return path.startswith(_MANAGEMENT_STARTS)

_TYPES = {
    400: "bad_request_error",
    401: "auth_error",
    403: "auth_error",
    404: "not_found_error",
    405: "bad_request_error",
    409: "bad_request_error",
    422: "bad_request_error",
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


class NotFoundError(KeyApiError):
    """404 for a record that does not exist (a team, user, organisation, ...)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(404, message, param)


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


def json_answer(request: Any, status: int, doc: Any, *, no_store: bool = False) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    if no_store:
        request.setHeader(b"cache-control", b"no-store")
    return json.dumps(doc).encode("utf-8")


def write_error(request: Any, error: KeyApiError) -> bytes:
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


def read_body(request: Any, allow_empty: bool = False) -> dict[str, Any]:
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


def arg(request: Any, name: str) -> str | None:
    """A query argument (the first), or None; C{""} is None."""
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        value = values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise KeyApiError(400, f"'{name}' is not valid UTF-8", name) from None
    return value or None


def int_arg(request: Any, name: str, default: int, low: int, high: int | None) -> int:
    raw = arg(request, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise KeyApiError(400, f"'{name}' must be a whole number", name) from None
    if value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise KeyApiError(400, f"'{name}' must be {bound}", name)
    return value


def bool_arg(request: Any, name: str) -> bool:
    raw = arg(request, name)
    if raw is None:
        return False
    lowered = raw.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise KeyApiError(400, f"'{name}' must be true or false", name)


def required_text(doc: Mapping[str, Any], name: str, what: str) -> str:
    """A required non-empty string field of a body (C{what} says what it names)."""
    value = doc.get(name)
    if not isinstance(value, str) or not value.strip():
        raise KeyApiError(400, f"'{name}' is required: {what}", name)
    return value


def string_list(doc: Mapping[str, Any], name: str, limit: int = MAX_LIST_PAGE) -> list[str]:
    """A required list of strings (ids to delete, ...)."""
    values = doc.get(name)
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise KeyApiError(400, f"'{name}' must be a list of strings", name)
    if len(values) > limit:
        raise KeyApiError(400, f"'{name}' has more than {limit} entries", name)
    return list(dict.fromkeys(values))


class AdminAuth:
    """
    The master key, compared in constant time, behind the daemon's one
    L{OperatorGuard}.  C{issued(token)} says whether a token is a virtual
    key this proxy issued (expired and blocked ones too): a client holding
    one is not guessing, and is not counted.
    """

    def __init__(self, master_key: str | None, guard: OperatorGuard,
                 issued: Callable[[str], bool] = lambda token: False) -> None:
        self._master_digest = _digest(master_key) if master_key else None
        self.guard = guard
        self._issued = issued

    @property
    def enabled(self) -> bool:
        return self._master_digest is not None

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

    def check_token(self, request: Any, token: str, surface: str = "key_api") -> bool:
        """
        Compare a presented C{token} with the master key when the address
        need not wait (429 otherwise); a wrong one that is not an issued
        key is counted.  Returns whether it is the master key.
        """
        source = request_source(request)
        wait = self.guard.refusal(source, surface)
        if wait is not None:
            raise throttled(wait)
        if self.is_master(token):
            return True
        if not self._issued(token):
            self.guard.failed(source, surface)
        return False


def answers(method: Callable[..., Awaitable[bytes]]) -> Callable[..., Awaitable[bytes]]:
    """Turn refusals and surprises into LiteLLM-shaped error bodies."""
    from cllama_tx.identity.virtual_keys import KeyNotFound, StoreClosed

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, *args: Any, **kwargs: Any) -> bytes:
        try:
            return await method(self, request, *args, **kwargs)
        except defer.CancelledError:
            raise  # the client went away; Klein handles it
        except KeyApiError as e:
            return write_error(request, e)
        except InvalidField as e:
            return write_error(request, KeyApiError(400, str(e), e.field))
        except KeyNotFound:
            return write_error(request, KeyApiError(404, "key not found", "key"))
        except StoreClosed:
            return write_error(request, KeyApiError(503, "the key store is shutting down"))
        except DatabaseUnavailable:
            return write_error(request, KeyApiError(503, "the store's database cannot be reached; try again"))
        except Exception:
            log.failure("management API: unexpected error on {path}", path=request.path)
            return write_error(request, KeyApiError(500, "internal error"))

    return wrapper
