"""The operator token: who may read every agent's data and manage keys."""

from __future__ import annotations

import hmac


def bearer_matches(authorization: bytes | None, token: bytes | None) -> bool:
    """
    True when C{authorization} is C{Bearer <token>}.  No configured token
    means nobody is the operator (operator endpoints stay shut).
    """
    if not token or not authorization:
        return False
    scheme, _, presented = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(presented.strip(), token)
