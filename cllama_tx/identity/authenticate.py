"""
Who is calling, from the request's headers alone: an agent (C{Bearer
agent:secret}, or C{x-api-key}) or a virtual key.

One function for both places that ask: the API site, on the headers of an
inference request before a byte of its body is read, and the proxy, for a
request that reached it without that answer.  It reads no file (contexts
and keys are cached), so it is cheap enough to run on every request.

The one exception is a virtual key this instance has not seen while the
store cannot yet say it is unknown (other instances share it, or it is
still loading): L{identify} raises L{KeyNotChecked}, a 401 to a caller
that cannot wait, and L{identify_stored} is the answer once the database
was asked.
"""

from __future__ import annotations

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from cllama_tx.identity.lookups import LookupsBusy
from cllama_tx.identity.principals import KeyPrincipal
from cllama_tx.identity.tokens import MalformedCredentials, parse_credentials
from cllama_tx.identity.virtual_keys import hash_key, looks_like_virtual_key
from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.surfaces.errors import ProxyError

_KEY_REFUSALS = {"expired": "this key has expired", "blocked": "this key is blocked"}
_UNKNOWN_KEY = "unknown or deleted key"
#: Seconds a client is told to wait when the key store cannot be read.
STORE_RETRY_AFTER = 1

_log = Logger(namespace="cllama_tx.identity")


@attrs.define
class KeyNotChecked(ProxyError):
    """
    A well-formed virtual key not in memory, which the store must read
    before refusing (L{identify_stored}).  Carries the key's hash, never
    the key.  Callers that cannot wait answer it as the 401 it is.
    """

    token_hash: str = attrs.field(default="", repr=False)


def identify(headers: Headers, contexts, keys=None):
    """
    The caller's principal: an agent context, or a L{KeyPrincipal}.

    @raise ProxyError: 401 for missing, malformed or unusable virtual-key
        credentials; 403 for an unknown agent or a wrong secret (the same
        answer for both: no agent enumeration).
    """
    token = presented_token(headers)
    if keys is not None and token is not None and looks_like_virtual_key(token):
        key = keys.lookup(token)
        if key is None:
            status = keys.status(token)
            if status == "unchecked":
                raise KeyNotChecked(401, "invalid_api_key", _UNKNOWN_KEY, token_hash=hash_key(token))
            raise ProxyError(401, "invalid_api_key", _KEY_REFUSALS.get(status, _UNKNOWN_KEY))
        return KeyPrincipal(key)
    try:
        agent_id, secret = parse_credentials(
            _first(headers, b"authorization"), _first(headers, b"x-api-key")
        )
    except MalformedCredentials as e:
        raise ProxyError(401, "missing_credentials", str(e)) from None
    context = contexts.authenticate(agent_id, secret) if contexts is not None else None
    if context is None:
        raise ProxyError(403, "invalid_credentials", "unknown agent or wrong secret")
    return context


def identify_stored(keys, unchecked: KeyNotChecked) -> defer.Deferred:
    """
    The key of L{KeyNotChecked} once the store has read it: fires with its
    L{KeyPrincipal}, or fails with the L{ProxyError} to answer: the 401 of
    an unknown, deleted, expired or blocked key, or a 503
    C{store_unavailable} when the store cannot tell (never a 401 for a key
    that may be good).
    """
    token_hash = unchecked.token_hash

    def found(key):
        if key is None:
            reason = _KEY_REFUSALS.get(keys.status_of(token_hash), _UNKNOWN_KEY)
            raise ProxyError(401, "invalid_api_key", reason)
        return KeyPrincipal(key)

    def failed(failure: Failure):
        if not failure.check(DatabaseUnavailable, LookupsBusy):
            _log.failure("reading a virtual key from the store failed", failure)
        raise ProxyError(
            503, "store_unavailable", "the key store cannot be read right now; try again",
            retry_after=STORE_RETRY_AFTER,
        )

    return keys.lookup_stored(token_hash).addCallbacks(found, failed)


def presented_token(headers: Headers) -> str | None:
    """The presented bearer or C{x-api-key} token (no colon: it cannot be an agent's)."""
    raw = _first(headers, b"authorization")
    if raw is not None:
        scheme, _, value = raw.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
    else:
        raw = _first(headers, b"x-api-key")
        if raw is None:
            return None
        value = raw
    token = value.strip().decode("ascii", "replace")
    return None if ":" in token else token


def _first(headers: Headers, name: bytes) -> bytes | None:
    values = headers.getRawHeaders(name)
    return values[0] if values else None
