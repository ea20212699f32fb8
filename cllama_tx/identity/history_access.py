"""
Who may read an agent's session history (C{GET /history/<agent>}), as the
reference proxy allows it: the operator token, the agent's own credentials,
and the replay tokens Clawdapus mounts in the agent's context as
C{service-auth/*.json} with C{"service": "cllama-history"} and
C{"auth_type": "bearer"} (a memory service replaying the agent's turns).

The replay tokens are read when a history request asks, not kept: the
history endpoint reads files anyway, and a token added or revoked counts
at once.  Every comparison is made in constant time; nothing here puts a
token into a message.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable

from cllama_tx.store.jsonfile import UnreadableFile, read_json_file

SERVICE_AUTH_DIR = "service-auth"
HISTORY_SERVICE = "cllama-history"
BEARER = "bearer"

# Bounds on what one history request reads from a context: a replay token
# file is a few hundred bytes.
MAX_SERVICE_AUTH_FILES = 64
MAX_SERVICE_AUTH_BYTES = 64 * 1024


def presented_token(authorization: bytes | None, x_api_key: bytes | None) -> str | None:
    """
    The token a history request presents: C{Authorization: Bearer <token>},
    else (no Authorization at all) C{x-api-key: <token>}; None when there
    is none or Authorization is not a bearer (a 401).
    """
    if authorization is not None:
        scheme, _, rest = authorization.strip().partition(b" ")
        if scheme.lower() != BEARER.encode() or not rest.strip():
            return None
        raw = rest.strip()
    elif x_api_key is not None and x_api_key.strip():
        raw = x_api_key.strip()
    else:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def replay_tokens(context_dir: str) -> list[str]:
    """
    The C{cllama-history} bearer tokens of the context at C{context_dir}:
    from every C{service-auth/*.json} (in name order, at most
    L{MAX_SERVICE_AUTH_FILES}) that is a JSON object naming that service
    and auth type with a non-empty string token.  A file that cannot be
    read or parsed grants nothing.
    """
    directory = os.path.join(context_dir, SERVICE_AUTH_DIR)
    try:
        names = sorted(name for name in os.listdir(directory) if name.endswith(".json"))
    except OSError:
        return []
    tokens = []
    for name in names[:MAX_SERVICE_AUTH_FILES]:
        try:
            _, doc = read_json_file(os.path.join(directory, name), MAX_SERVICE_AUTH_BYTES)
        except (UnreadableFile, OSError):
            continue
        if (
            isinstance(doc, dict)
            and doc.get("service") == HISTORY_SERVICE
            and doc.get("auth_type") == BEARER
            and isinstance(doc.get("token"), str)
            and doc["token"]
        ):
            tokens.append(doc["token"])
    return tokens


def matches_any(token: str, candidates: Iterable[str]) -> bool:
    """Whether C{token} is one of C{candidates}, every one compared in constant time."""
    presented = token.encode("utf-8", "surrogatepass")
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(presented, candidate.encode("utf-8", "surrogatepass"))
    return found


def agent_credentials_match(token: str, agent_id: str, contexts) -> bool:
    """
    Whether C{token} is C{agent_id}'s own credentials: C{<agent-id>:<secret>}
    as it calls inference with, or the bare secret (its C{metadata.json}
    token may be just that, and the reference compares the token as
    written there).
    """
    if contexts is None:
        return False
    named, colon, secret = token.partition(":")
    if colon and named == agent_id:
        return contexts.authenticate(agent_id, secret) is not None
    return contexts.authenticate(agent_id, token) is not None


def history_allowed(token: str, agent_id: str, contexts, operator_token: bytes | None) -> bool:
    """
    Whether C{token} may read C{agent_id}'s history: the operator token,
    the agent's own credentials, or one of its replay tokens.
    """
    if operator_token and hmac.compare_digest(token.encode("utf-8", "surrogatepass"), operator_token):
        return True
    if agent_credentials_match(token, agent_id, contexts):
        return True
    context = contexts.get(agent_id) if contexts is not None else None
    return context is not None and matches_any(token, replay_tokens(context.path))
