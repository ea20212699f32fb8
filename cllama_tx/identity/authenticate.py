"""
Who is calling, from the request's headers alone: an agent (C{Bearer
agent:secret}, or C{x-api-key}) or a virtual key.

One function for both places that ask: the API site, on the headers of an
inference request before a byte of its body is read, and the proxy, for a
request that reached it without that answer.  It reads no file (contexts
and keys are cached), so it is cheap enough to run on every request.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

from cllama_tx.identity.principals import KeyPrincipal
from cllama_tx.identity.tokens import MalformedCredentials, parse_credentials
from cllama_tx.identity.virtual_keys import looks_like_virtual_key
from cllama_tx.surfaces.errors import ProxyError

_KEY_REFUSALS = {"expired": "this key has expired", "blocked": "this key is blocked"}


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
            reason = _KEY_REFUSALS.get(keys.status(token), "unknown or deleted key")
            raise ProxyError(401, "invalid_api_key", reason)
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
