"""
Governance: pure decisions about what an agent may do.

 - L{policy}: model policy (ADR-019, CONTRACT section 4).
 - L{ratelimit}: sliding one-minute request and token limits.
"""

from cllama_tx.governance.policy import (
    AllowedModel,
    Decision,
    ModelPolicy,
    PolicyError,
    PolicyRefusal,
    decide,
    models_for,
    parse_policy,
)
from cllama_tx.governance.ratelimit import Admission, RateLimiter

__all__ = [
    "Admission",
    "AllowedModel",
    "Decision",
    "ModelPolicy",
    "PolicyError",
    "PolicyRefusal",
    "RateLimiter",
    "decide",
    "models_for",
    "parse_policy",
]
