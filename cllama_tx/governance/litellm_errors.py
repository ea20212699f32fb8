"""
Refusals of requests made with a virtual key or the master key, in
LiteLLM's words: its statuses, its error types (C{budget_exceeded},
C{key_model_access_denied}, ...), C{param}, and C{code} the status as a
string, so a platform's error handling written against LiteLLM reads them
as it always did.  Agents keep the cllama contract's refusals.

Pure: each function returns the L{ProxyError} to raise.
"""

from __future__ import annotations

from cllama_tx.surfaces.errors import ProxyError

__all__ = [
    "BUDGET_EXCEEDED_STATUS",
    "blocked",
    "budget_exceeded",
    "held_in_flight",
    "model_access_denied",
    "parallel_limited",
    "rate_limited",
]

#: LiteLLM's status for a budget that ran out (its default since it moved
#: off 429, which clients retried; C{docs/VIRTUAL_KEYS.md}).
BUDGET_EXCEEDED_STATUS = 422

#: LiteLLM's error types of a model a level does not allow.
_ACCESS_TYPES = {
    "key": "key_model_access_denied",
    "team": "team_model_access_denied",
    "member": "team_model_access_denied",
    "user": "user_model_access_denied",
    "org": "org_model_access_denied",
    "customer": "customer_model_access_denied",
}


def _money(value: float) -> str:
    return f"{value:.10g}"


def model_access_denied(level: str, model: object) -> ProxyError:
    """403: the level (C{key}, C{team}, C{member}, C{user}, C{org}, C{customer}) does not allow the model."""
    name = str(model)[:200]
    if level == "customer":
        message = (f"The requested model '{name}' is not in the allowed models for this customer. "
                   "Check the models this customer can use and try again.")
    else:
        message = (f"The requested model '{name}' is not available for this API key, or the model name is "
                   "invalid. Check the models available to you and try again.")
    return ProxyError(403, "model_not_allowed", message, error_type=_ACCESS_TYPES.get(level, "key_model_access_denied"),
                      param="model", wire_code="403")


def budget_exceeded(
    entity: str, spend: float, max_budget: float | None, detail: str | None = None,
    retry_after: int | None = None, extra: dict | None = None,
) -> ProxyError:
    """
    LiteLLM's C{Budget has been exceeded! <entity> Current cost: <spend>,
    Max budget: <max>}, status L{BUDGET_EXCEEDED_STATUS}; C{detail} says
    why a request still under the budget does not fit (its worst case).
    """
    message = f"Budget has been exceeded! {entity} Current cost: {_money(spend)}, Max budget: {_money(max_budget or 0.0)}"
    if detail:
        message += f" ({detail})"
    return ProxyError(BUDGET_EXCEEDED_STATUS, "budget_exceeded", message, retry_after=retry_after, extra=extra,
                      error_type="budget_exceeded", wire_code=str(BUDGET_EXCEEDED_STATUS))


def held_in_flight(entity: str, retry_after: int | None, extra: dict | None = None) -> ProxyError:
    """429: the budget has room, but requests in flight hold it until they are settled."""
    return ProxyError(
        429, "budget_held", f"{entity}: the budget's room is held by requests in flight; retry shortly",
        retry_after=retry_after, extra=extra, error_type="rate_limit_error", wire_code="429",
    )


def rate_limited(entity: str, message: str, retry_after: int | None) -> ProxyError:
    """429 for an rpm or tpm limit of a level."""
    return ProxyError(429, "rate_limited", f"Rate limit exceeded for {entity}: {message}", retry_after=retry_after,
                      error_type="rate_limit_error", wire_code="429")


def parallel_limited(entity: str, limit: int) -> ProxyError:
    """429: C{max_parallel_requests} reached (0: every request refused, as LiteLLM)."""
    if limit <= 0:
        message = f"Max parallel request limit reached for {entity}: max_parallel_requests is 0, no request may run"
    else:
        message = f"Max parallel request limit reached for {entity}: {limit} requests are in flight"
    return ProxyError(429, "parallel_limited", message, retry_after=1, error_type="rate_limit_error", wire_code="429")


def blocked(entity: str) -> ProxyError:
    """401, as LiteLLM's authentication answers a blocked team or customer."""
    return ProxyError(401, "blocked", f"{entity} is blocked. Unblock it through the key API if you are an admin.",
                      error_type="auth_error", wire_code="401")
