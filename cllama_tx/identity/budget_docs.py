"""
LiteLLM budgets (C{max_budget} and C{budget_duration}, on a key, a user,
a team, a team member, an organisation, a customer, or one model of a
key) as the budget objects the proxy's governance enforces.

LiteLLM resets a budget's spend at C{budget_reset_at} and moves that to
the next boundary of its schedule; here the schedule is a period (the
spend counted is the spend since its start), which needs no job, holds
across restarts and instances, and gives the same boundaries:

  - C{1d}/C{24h}/C{daily}: every UTC midnight; C{7d}/C{1w}/C{weekly}:
    Mondays at midnight; C{30d}/C{1mo}/C{monthly}: the 1st of each month;
  - shorter than a day: aligned within the day (C{6h}: 00:00, 06:00, ...);
  - other days, weeks and hours of a day or more: that length again and
    again from the midnight of the day the budget was set;
  - C{Nmo}: N calendar months from the first of the month it was set.

No C{budget_duration}: the budget lasts the life of what it belongs to.
Pure: no I/O.
"""

from __future__ import annotations

import calendar
import datetime
from typing import Any

from cllama_tx.identity.litellm_fields import split_duration

__all__ = ["LIFETIME_WINDOW", "budget_doc", "period_of"]

#: A budget without budget_duration lasts the key's (or team's ...) life.
LIFETIME_WINDOW = "3650d"

_SUB_DAY = {"s": 1, "m": 60, "h": 3600}


def _midnight(ts: float) -> int:
    day = datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).date()
    return calendar.timegm(day.timetuple())


def period_of(duration: str | None, anchor: float | None) -> dict[str, str]:
    """
    The window or period of a budget with this C{budget_duration}, set at
    C{anchor} (epoch seconds; only multi-day and multi-month schedules
    use it): C{{"period": ...}} or C{{"window": LIFETIME_WINDOW}}.

    @raise ValueError: C{duration} is not a LiteLLM duration.
    """
    if duration is None:
        return {"window": LIFETIME_WINDOW}
    value, unit = split_duration(duration)
    if (value, unit) in ((1, "d"), (24, "h")):
        return {"period": "daily"}
    if (value, unit) in ((7, "d"), (1, "w")):
        return {"period": "weekly"}
    if (value, unit) in ((30, "d"), (1, "mo")):
        return {"period": "monthly"}
    base = _midnight(anchor or 0.0)
    if unit in _SUB_DAY and value * _SUB_DAY[unit] < 86400:
        return {"period": f"every:{value}{unit}"}
    return {"period": f"every:{value}{unit}@{base}"}


def budget_doc(
    limit_usd: float | None, duration: str | None, anchor: float | None, behavior: str = "hard_stop"
) -> dict[str, Any] | None:
    """
    The budget object of a LiteLLM C{max_budget} (or C{soft_budget}, with
    C{behavior} C{soft_alert}); L{None} for no budget or a budget of 0
    (nothing may be spent: the caller refuses those itself, as LiteLLM
    does).
    """
    if limit_usd is None or limit_usd <= 0:
        return None
    doc: dict[str, Any] = {"limit_usd": float(limit_usd), "behavior": behavior}
    doc.update(period_of(duration, anchor))
    return doc
