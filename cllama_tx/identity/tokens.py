"""
Agent credentials: parsing what an agent presents and what its context holds.

Pure functions, no I/O, so every rule of CONTRACT section 2 is tested without
a reactor or a file system.  Nothing here ever puts a secret into an
exception message, because exception messages end up in logs and responses.
"""

from __future__ import annotations

import hmac
import re

AGENT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

_BEARER = "bearer"


def valid_agent_id(agent_id: object) -> bool:
    """
    Whether C{agent_id} is safe to use as one path component.

    The first character excludes C{.} and C{..}, the alphabet excludes
    separators, so an id can never leave the context root.
    """
    return (
        isinstance(agent_id, str) and AGENT_ID_PATTERN.fullmatch(agent_id) is not None
    )


class MalformedCredentials(Exception):
    """
    The agent's credentials could not be parsed (a 401, unlike a wrong
    secret, which is a 403).  The message is safe to log and to return: it
    never quotes the header.
    """


def _decode(value: bytes, header: str) -> str:
    """
    Decode a header value strictly, so that two different byte strings never
    map to the same credentials.
    """
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedCredentials(f"the {header} header is not valid UTF-8") from None


def _split_scheme(value: str) -> tuple[str, str] | None:
    """
    Split C{"<scheme> <rest>"} at the first run of whitespace; L{None} when
    there is no whitespace.
    """
    parts = value.split(None, 1)
    if len(parts) != 2:
        return None
    return parts[0], parts[1].strip()


def parse_credentials(
    authorization: bytes | None, x_api_key: bytes | None
) -> tuple[str, str]:
    """
    Return C{(agent_id, secret)} from the request's headers.

    C{Authorization: Bearer <agent-id>:<secret>} wins; C{x-api-key:
    <agent-id>:<secret>} (what the Anthropic SDK sends) is only consulted
    when C{Authorization} is absent, so a broken C{Authorization} is never
    papered over.  The agent id's syntax is deliberately not checked here:
    the registry rejects invalid and unknown ids with the same answer.

    @raise MalformedCredentials: missing, not UTF-8, not Bearer, or not two
        non-empty parts around a colon.
    """
    if authorization is not None:
        value = _decode(authorization, "Authorization").strip()
        scheme_and_token = _split_scheme(value)
        if scheme_and_token is None or scheme_and_token[0].lower() != _BEARER:
            raise MalformedCredentials(
                "the Authorization header must be 'Bearer <agent-id>:<secret>'"
            )
        token = scheme_and_token[1]
    elif x_api_key is not None:
        token = _decode(x_api_key, "x-api-key").strip()
    else:
        raise MalformedCredentials(
            "missing credentials: send 'Authorization: Bearer <agent-id>:<secret>'"
        )
    # The first colon: Clawdapus secrets are hex, but operators' are not.
    agent_id, colon, secret = token.partition(":")
    if not colon or not agent_id or not secret:
        raise MalformedCredentials("credentials must have the form <agent-id>:<secret>")
    return agent_id, secret


def expected_secret(token_field: object, agent_id: str) -> str | None:
    """
    The secret that C{agent_id} must present, from its C{metadata.json}
    C{token} field, or L{None} when the field gives no usable secret.

    Accepted forms: C{agent:secret}, C{Bearer agent:secret} (any case) and a
    bare C{secret}.  A token that names another agent is refused, so a
    context copied to the wrong directory cannot be used under a new name.
    """
    if not isinstance(token_field, str):
        return None
    token = token_field.strip()
    scheme_and_token = _split_scheme(token)
    if scheme_and_token is not None and scheme_and_token[0].lower() == _BEARER:
        token = scheme_and_token[1]
    elif token.lower() == _BEARER:
        # A scheme with nothing after it is not a secret called "Bearer".
        return None
    name, colon, secret = token.partition(":")
    if colon:
        if name != agent_id:
            return None
        token = secret
    return token or None


def secrets_equal(a: str, b: str) -> bool:
    """
    Compare two secrets in time that does not depend on where they differ.
    """
    return hmac.compare_digest(
        a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass")
    )
