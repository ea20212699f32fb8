"""
The spend of a key, team, user, organisation, customer or team member as
LiteLLM's management API reports and sets it: C{spend} is what counts
against the budget now (since the start of the current period of its
C{budget_duration}, or ever), C{budget_reset_at} the end of that period;
setting C{spend} (C{/key/update}, C{/key/{key}/reset_spend}, ...)
resets the scope and counts the amount given as already spent.

Why in one place: every resource group reads and sets spend alike, through
the ledger (committed rows) and the governance's runtime overrides (the
resets and offsets other instances apply too, through the change feed).
"""

from __future__ import annotations

from typing import Any

from cllama_tx.governance.periods import period_bounds
from cllama_tx.identity.budget_docs import period_of
from cllama_tx.identity.key_model import iso_time
from cllama_tx.store.spend_reports import cost_reader

__all__ = ["ScopeBudgets"]


class ScopeBudgets:
    """
    @param ledger: the ledger (C{report}, C{reset_budget},
        C{set_budget_override}, C{budget_override}); None: spend is 0.
    @param governance: the daemon's governance (its runtime overrides), or None.
    """

    def __init__(self, ledger: Any, governance: Any, clock: Any, audit: Any = None) -> None:
        self._ledger = ledger
        self._governance = governance
        self._clock = clock
        self._audit = audit

    def now(self) -> float:
        return self._clock.seconds() if self._clock is not None else 0.0

    async def drop_override_budget(self, scope: str, actor: str = "master-key") -> None:
        """
        Forget an operator budget laid over the scope's own (teams got theirs
        that way before they had records), keeping its reset.
        """
        if self._ledger is None or not (self._override(scope).get("budget")):
            return
        await self._ledger.clear_budget_override(scope, actor)
        if self._governance is not None:
            self._governance.set_runtime(scope, self._ledger.budget_override(scope))

    def window(self, duration: str | None, anchor: float | None) -> tuple[float | None, float | None]:
        """C{(start, end)} of the current period of a C{budget_duration}; C{(None, None)} without one."""
        if duration is None or self._clock is None:
            return None, None
        period = period_of(duration, anchor).get("period")
        if period is None:
            return None, None
        start, end = period_bounds(period, self._clock.seconds())
        return start, end

    def _override(self, scope: str) -> dict:
        if self._governance is not None:
            entry = self._governance.runtime.get(scope)
            if entry is not None:
                return entry
        if self._ledger is not None and hasattr(self._ledger, "budget_override"):
            return self._ledger.budget_override(scope) or {}
        return {}

    async def spend(self, scope: str, duration: str | None = None, anchor: float | None = None) -> float:
        """What counts against the scope's budget now (the ledger's rows since the period began or the last reset)."""
        if self._ledger is None or not hasattr(self._ledger, "report"):
            return 0.0
        start, _end = self.window(duration, anchor)
        entry = self._override(scope)
        reset_at = entry.get("reset_at")
        since = max(start or 0.0, float(reset_at or 0.0))
        cost = await self._ledger.report(lambda _dialect: cost_reader(scope, since or None))
        offset = entry.get("spent_offset_usd")
        if offset and float(entry.get("updated_at") or 0.0) >= since:
            cost += float(offset)
        return round(cost, 10)

    def reset_at(self, duration: str | None, anchor: float | None) -> str | None:
        """LiteLLM's C{budget_reset_at}: when the current period ends (ISO 8601), or None."""
        _start, end = self.window(duration, anchor)
        return iso_time(end)

    async def set_spend(self, scope: str, amount: float, actor: str = "master-key") -> None:
        """
        Start the scope's count again from now with C{amount} already spent
        (LiteLLM's C{spend} on an update, C{reset_spend}'s C{reset_to}).
        """
        if self._ledger is None:
            return
        entry = await self._ledger.reset_budget(scope, actor)
        if self._governance is not None:
            self._governance.set_runtime(scope, entry, reset=True)
        if amount > 0:
            entry = await self._ledger.set_budget_override(scope, None, float(amount), actor)
            if self._governance is not None:
                self._governance.set_runtime(scope, entry)
        if self._audit is not None:
            self._audit.emit("operator", None, None, action="spend_set", actor=actor, scope=scope,
                             spend_usd=float(amount))
