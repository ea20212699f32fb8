"""
Why one candidate model failed and the next is tried, as the reference
proxy names it: the C{reason} of a C{failover} audit line is a short code
fleet tooling groups by (C{http_500}, C{transport_error}, ...), and the
words for people go in its C{detail}.  Pure: the proxy says where the
attempt failed, this module names it.
"""

from __future__ import annotations

import attrs

from cllama_tx.surfaces.errors import ProxyError

TRANSPORT_ERROR = "transport_error"
STREAM_FIRST_BYTE_TIMEOUT = "stream_first_byte_timeout"
STREAM_READ_ERROR = "stream_read_error"
PROVIDER_COOLDOWN = "provider_cooldown"
PROVIDER_KEY_UNAVAILABLE = "provider_key_unavailable"
PROVIDER_KEYS_EXHAUSTED = "provider_keys_exhausted"

#: Reasons of the key pool: the reference writes no
#: C{provider_candidate_fallback:<reason>} intervention for these, only
#: the C{failover} line and C{provider_exhausted_failover}.
POOL_REASONS = frozenset({PROVIDER_COOLDOWN, PROVIDER_KEY_UNAVAILABLE, PROVIDER_KEYS_EXHAUSTED})

#: The intervention written once per hop, after the C{failover} line.
EXHAUSTED_FAILOVER = "provider_exhausted_failover"


def candidate_fallback(reason: str) -> str:
    """The reference's per-candidate intervention: C{provider_candidate_fallback:<reason>}."""
    return "provider_candidate_fallback:" + (reason or "unknown")


def http_status(status: int) -> str:
    """A provider's 5xx answer: C{http_<status>}."""
    return f"http_{status}"


@attrs.define
class KeysUnavailable(ProxyError):
    """
    No key of the provider could serve the request.  The agent sees the
    pool's refusal (C{provider_keys_exhausted}, 429 or 503); C{reason} is
    the reference's name for why, for the failover line: every key
    cooling down (C{provider_cooldown}), none usable
    (C{provider_key_unavailable}), or every try spent on a key that then
    failed (C{provider_keys_exhausted}).
    """

    reason: str = PROVIDER_KEYS_EXHAUSTED


def pool_reason(cooling: bool, tries_spent: bool) -> str:
    """The reason of a L{KeysUnavailable}."""
    if cooling:
        return PROVIDER_COOLDOWN
    return PROVIDER_KEYS_EXHAUSTED if tries_spent else PROVIDER_KEY_UNAVAILABLE


def reason_for(error: ProxyError, *, answered: bool, stream: bool, got_bytes: bool) -> str:
    """
    The code of a failed attempt.  C{answered}: the provider's headers had
    arrived (the body then failed); C{stream}: the agent asked for a
    stream; C{got_bytes}: some of the body had arrived.

    Before the headers, a timeout is the reference's
    C{stream_first_byte_timeout} for a stream and C{transport_error}
    otherwise (it bounds a non-stream attempt with a context deadline); once
    they are in, a body that never starts is C{stream_first_byte_timeout}
    and any other broken or stalled body C{stream_read_error}.
    """
    if isinstance(error, KeysUnavailable):
        return error.reason
    if not answered:
        if error.code == "upstream_timeout" and stream:
            return STREAM_FIRST_BYTE_TIMEOUT
        return TRANSPORT_ERROR
    if error.code == "upstream_timeout" and not got_bytes:
        return STREAM_FIRST_BYTE_TIMEOUT
    return STREAM_READ_ERROR
