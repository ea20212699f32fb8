"""
What an operator can do to a running daemon: change or reset an agent's
budget, reload configuration, ask how it is.  The UI's endpoints and SIGHUP
call these; every change is an C{operator} audit line naming the action and
who asked (never a secret).
"""

from __future__ import annotations

import time

from twisted.logger import Logger

from cllama_tx.governance.budgets import BudgetError
from cllama_tx.surfaces.errors import ProxyError

log = Logger()

# The budget keys an operator may set at runtime.
BUDGET_KEYS = ("limit_usd", "max_requests", "window", "period", "behavior", "tiers")


class Operations:
    # The Execwall OR gate's console fields (sites/gate_console.py); set by the daemon.
    gate_console = None

    def __init__(self, *, clock, audit, ledger, governance, pricing, providers, contexts, model_table=None,
                 changes=None) -> None:
        self._clock = clock
        # Several instances: a reload here is announced to the others (change feed).
        self._changes = changes
        self._model_table = model_table
        self._audit = audit
        self._ledger = ledger
        self._governance = governance
        self._pricing = pricing
        self._providers = providers
        self._contexts = contexts
        self._started = clock.seconds()

    def _record(self, action: str, actor: str, agent: str | None = None, **details) -> None:
        self._audit.emit("operator", agent, None, action=action, actor=actor, **details)

    async def health(self) -> dict:
        ready = await self._ledger.ready()
        # Rows held in memory because the disk refuses them: not ok, and said so.
        storage = self._ledger.health() if hasattr(self._ledger, "health") else {"state": "ok"}
        return {
            "ok": bool(ready),
            "ledger": "ready" if ready else ("failing" if storage["state"] == "failing" else "unavailable"),
            "ledger_storage": storage,
            "agents": len(self._contexts.agent_ids()),
            "providers": self._providers.names(),
            "uptime_s": round(self._clock.seconds() - self._started, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self._clock.seconds())),
        }

    async def set_budget(self, agent: str, doc: dict, actor: str) -> dict:
        """
        Change an agent's budget at runtime: any of BUDGET_KEYS (merged over
        its current runtime change) and/or C{spent} (dollars already spent
        this period).  Persisted in the ledger; wins over files until reset.
        """
        if not isinstance(doc, dict):
            raise ProxyError(400, "invalid_body", "send a JSON object")
        unknown = sorted(set(doc) - set(BUDGET_KEYS) - {"spent"})
        if unknown:
            raise ProxyError(400, "invalid_parameter", f"unknown budget fields: {', '.join(unknown)}")
        spent = doc.get("spent")
        if spent is not None and (not isinstance(spent, (int, float)) or isinstance(spent, bool) or spent < 0):
            raise ProxyError(400, "invalid_parameter", "spent must be a number of dollars >= 0")
        current = self._ledger.budget_override(agent) or {}
        budget = dict(current.get("budget") or {})
        budget.update({k: doc[k] for k in BUDGET_KEYS if k in doc})
        if budget:
            try:
                self._governance.check_runtime(agent, self._contexts.get(agent), budget)
            except BudgetError as e:
                raise ProxyError(400, "invalid_budget", str(e)) from None
        entry = await self._ledger.set_budget_override(
            agent, budget or None, float(spent) if spent is not None else None, actor
        )
        self._governance.set_runtime(agent, entry)
        self._record("budget_set", actor, agent, changes=sorted(doc))
        return entry

    async def reset(self, agent: str, actor: str) -> dict:
        """Forget an agent's spend and its runtime budget change."""
        entry = await self._ledger.reset_budget(agent, actor)
        self._governance.set_runtime(agent, None, reset=True)
        self._record("budget_reset", actor, agent)
        return entry

    def reload(self, actor: str, announce: bool = True) -> dict:
        """
        Re-read policy file, pricing, providers, the model table and contexts;
        with other instances sharing the store, they reload too (C{announce}
        is false for a reload another instance announced).
        """
        done, failed = [], {}
        steps = [
            ("policy", self._governance.load_policy_file),
            ("pricing", self._pricing.reload),
            ("providers", getattr(self._providers, "reload", lambda: None)),
            ("contexts", self._contexts.reload),
        ]
        if self._model_table is not None and self._model_table.path:
            # After pricing: the table's prices are laid over the reloaded ones.
            steps.insert(3, ("model_table", self._model_table.reload))
        for name, step in steps:
            try:
                step()
                done.append(name)
            except Exception as e:  # a broken file keeps the previous state
                log.error("reload of {name} failed: {error}", name=name, error=str(e))
                failed[name] = str(e)
        self._record("reload", actor, reloaded=done, failed=sorted(failed))
        if announce and self._changes is not None:
            self._changes.publish("reload").addErrback(
                lambda f: log.error("could not announce the reload to other instances: {e}", e=f.getErrorMessage())
            )
        return {"reloaded": done, "failed": failed}
