"""
The budget's audit lines as the reference proxy writes them, and its
C{CLLAMA_BUDGET_FAIL_MODE}: what a refusal, a soft alert and a budget that
cannot be evaluated are called in the audit stream, and whether such a
budget stops the request.  Pure: the engine decides, this module names.
"""

from __future__ import annotations

from typing import Any

from cllama_tx.governance.periods import BudgetError, resolve_timezone
from cllama_tx.surfaces.errors import ProxyError

#: The reference's interventions for a budget that refuses (or, with
#: C{soft_alert}, would refuse) a request.
BUDGET_EXCEEDED = "budget_exceeded"
RATE_LIMITED = "rate_limited"
#: A budget that could not be evaluated (invalid, or its store unreachable).
BUDGET_CHECK_UNAVAILABLE = "budget_check_unavailable"
#: The 503 code of a budget that cannot be evaluated while the mode is closed.
BUDGET_UNAVAILABLE = "budget_unavailable"

#: Refusals audited as an intervention of their code: the reference's two,
#: and a virtual key's LiteLLM refusals of the same kind (its budget's room
#: held by requests in flight, its parallel limit).
REFUSALS = frozenset({BUDGET_EXCEEDED, RATE_LIMITED, "budget_held", "parallel_limited"})

FAIL_OPEN = "open"
FAIL_CLOSED = "closed"
FAIL_MODES = (FAIL_CLOSED, FAIL_OPEN)
#: Money first: a budget nobody can evaluate stops the request.  The
#: reference fails open unless told otherwise (docs/REFERENCE_PARITY.md).
DEFAULT_FAIL_MODE = FAIL_CLOSED


def parse_fail_mode(text: str | None) -> str:
    """
    C{CLLAMA_BUDGET_FAIL_MODE} as the reference reads it (blanks around it
    and case do not matter); empty is L{DEFAULT_FAIL_MODE}.  Anything but
    C{open} or C{closed} raises ValueError: the reference would fail open
    on a typo, this proxy refuses to start instead.
    """
    value = (text or "").strip().lower()
    if not value:
        return DEFAULT_FAIL_MODE
    if value not in FAIL_MODES:
        raise ValueError(f"CLLAMA_BUDGET_FAIL_MODE must be open or closed, not {value[:40]!r}")
    return value


def refusal_intervention(error: ProxyError) -> tuple[str, dict[str, Any]] | None:
    """
    The intervention a governance refusal is audited with (its name and
    details), or None when it is not a budget or rate refusal.
    """
    if error.code not in REFUSALS:
        return None
    details: dict[str, Any] = {"status_code": error.status}
    if error.retry_after is not None:
        details["retry_after"] = error.retry_after
    budget = (error.extra or {}).get("budget")
    if isinstance(budget, dict):
        for name in ("behavior", "window", "limit_usd", "max_requests"):
            if budget.get(name) is not None:
                details[name] = budget[name]
    return error.code, details


def zone_problem(budget: Any, tz: Any) -> str | None:
    """
    Why a calendar budget cannot be evaluated with the agent's timezone
    (an unknown name), or None.  Asked before anything is held, so the
    fail mode decides, not an error deep in the book.
    """
    if getattr(budget, "period", None) is None:
        return None
    try:
        resolve_timezone(tz)
    except BudgetError as e:
        return str(e)
    return None


def unavailable(scope: str | None, reason: str, fail_open: bool) -> dict[str, Any]:
    """The details of a C{budget_check_unavailable} line."""
    details: dict[str, Any] = {"reason": reason, "fail_mode": FAIL_OPEN if fail_open else FAIL_CLOSED}
    if scope is not None:
        details["scope"] = scope
    return details
