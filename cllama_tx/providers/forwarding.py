"""
Which request headers reach a provider: an explicit allow-list per wire
format (and provider), never "everything but a deny-list".

An agent shares the operator's provider key with every other agent, so any
header that the provider reads as account configuration is a way for one
agent to break the key for all: a bogus C{OpenAI-Organization} answers 401
and used to kill the only key.  Only headers that describe the request
itself travel; organization and project come from the operator's provider
configuration.  Pure data and pure functions: no I/O.
"""

from __future__ import annotations

import attrs
from twisted.web.http_headers import Headers

from cllama_tx.providers.catalog import ANTHROPIC_FORMAT, OPENAI_FORMAT, ProviderSpec
from cllama_tx.providers.lean_headers import LeanHeaders

ANTHROPIC_VERSION = b"2023-06-01"

# What every upstream may get from the agent: how to answer (Accept) and
# which client is asking (User-Agent, for the provider's compatibility
# fixes and support).  Content-Type is always set by the proxy itself: the
# body it sends is JSON it serialised.
_COMMON = frozenset({b"accept", b"user-agent"})

ALLOWED_BY_FORMAT: dict[str, frozenset[bytes]] = {
    OPENAI_FORMAT: _COMMON,
    # The API version and the beta features of the request (CONTRACT 3.2).
    ANTHROPIC_FORMAT: _COMMON | {b"anthropic-version", b"anthropic-beta"},
}

# Documented per-provider additions: OpenRouter's optional app attribution.
ALLOWED_BY_PROVIDER: dict[str, frozenset[bytes]] = {
    "openrouter": frozenset({b"http-referer", b"x-title"}),
}

# Never forwarded, whatever a list above says (a test pins that none does):
# credentials, account selection, cookies, client identity and routing
# headers, this hop's framing, the pod's markers.
NEVER_FORWARD = frozenset(
    {
        b"authorization",
        b"x-api-key",
        b"proxy-authorization",
        b"openai-organization",
        b"openai-project",
        b"cookie",
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-real-ip",
        b"x-agent-id",
        b"host",
        b"content-length",
        b"accept-encoding",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"x-claw-consumer-session-epoch",
        b"x-cllama-policy-origin",
    }
)

_JSON = [b"application/json"]


@attrs.frozen
class HeaderPolicy:
    """
    What one provider gets: C{allowed} lower-case names copied from the
    agent; C{defaults} sent when the agent sent none; C{fixed} the
    operator's headers, always sent, replacing anything of that name.
    """

    allowed: frozenset[bytes]
    defaults: tuple[tuple[bytes, bytes], ...] = ()
    fixed: tuple[tuple[bytes, bytes], ...] = attrs.field(default=(), repr=False)


def policy_for(spec: ProviderSpec) -> HeaderPolicy:
    """
    The header policy of C{spec}: its format's list plus its own additions;
    for the anthropic format a default C{anthropic-version}; for the openai
    format the operator's organization and project.
    """
    allowed = ALLOWED_BY_FORMAT[spec.api_format] | ALLOWED_BY_PROVIDER.get(
        spec.name, frozenset()
    )
    allowed = allowed - NEVER_FORWARD
    defaults: tuple[tuple[bytes, bytes], ...] = ()
    fixed: list[tuple[bytes, bytes]] = []
    if spec.api_format == ANTHROPIC_FORMAT:
        defaults = ((b"anthropic-version", ANTHROPIC_VERSION),)
    else:
        if spec.organization:
            fixed.append((b"OpenAI-Organization", spec.organization.encode("ascii")))
        if spec.project:
            fixed.append((b"OpenAI-Project", spec.project.encode("ascii")))
    return HeaderPolicy(allowed=frozenset(allowed), defaults=defaults, fixed=tuple(fixed))


def first_header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header C{name}, or None."""
    values = headers.getRawHeaders(name)
    return values[0] if values else None


def valid_header_value(value: str) -> bool:
    """Printable ASCII without spaces: safe in a header, no injection."""
    return bool(value) and all(0x21 <= ord(c) <= 0x7E for c in value)


def forward(incoming: Headers, policy: HeaderPolicy) -> Headers:
    """
    The upstream request's headers: the allowed ones of C{incoming} (minus
    any the agent named in C{Connection}), C{Content-Type: application/json},
    the policy's defaults where missing and its fixed headers.
    """
    out = LeanHeaders()
    allowed = policy.allowed
    named: set[bytes] | None = None
    connection = incoming.getRawHeaders(b"connection")
    if connection:
        named = {v.strip().lower() for value in connection for v in value.split(b",")}
    for name, values in incoming.getAllRawHeaders():
        lowered = name.lower()
        if lowered in allowed and (named is None or lowered not in named):
            out.setRawHeaders(lowered, values)
    out.setRawHeaders(b"content-type", _JSON)
    for name, value in policy.defaults:
        if not out.hasHeader(name):
            out.setRawHeaders(name, [value])
    for name, value in policy.fixed:
        out.setRawHeaders(name, [value])
    return out
