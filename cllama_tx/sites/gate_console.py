"""
The Execwall OR gate's console API, for the agents of its policy file.

The JetPatch console calls the gate's C{/api/spend/<agent>}, C{/api/spend},
C{/api/budget/<agent>}, C{/api/reset/<agent>}, C{/api/health} and
C{/api/reload}.  The operator API on the UI port has the same paths; when
the policy file is the gate's, each answer carries the gate's fields
beside ours, and C{/api/budget} takes the gate's C{budget_total} and
C{budget_spent}.  L{GateConsole} computes those fields and makes the gate's
changes through L{cllama_tx.sites.operations.Operations} (so every change
is audited as ours are); the UI app and the loopback console on the API
port (L{cllama_tx.sites.gate_console_api}) both use it.

Where the gate and ours differ (docs/EXECWALL.md):

  - C{budget_spent} sets what the agent has spent: the spend counted so far
    is reset and that amount counted instead (the gate overwrites its
    in-memory number); C{budget_total} sets the limit;
  - a reset forgets the spend (and a file's C{budget_spent}) but keeps a
    limit the console set, as the gate's does;
  - C{/api/health}'s C{agents} is the gate's list of agents (our count is
    C{agent_count}).
"""

from __future__ import annotations

import math
import time
from typing import Any

from cllama_tx.governance.budgets import BudgetError
from cllama_tx.governance.gate_policy import spend_fields
from cllama_tx.sites.operations import BUDGET_KEYS
from cllama_tx.surfaces.errors import ProxyError

#: The gate's fields of POST /api/budget/<agent>.
GATE_BUDGET_KEYS = ("budget_total", "budget_spent")
SERVICE = "cllama_tx"


def iso(ts: float | None) -> str | None:
    """An instant as the gate writes one (UTC, seconds, C{Z})."""
    if ts is None or not math.isfinite(ts) or ts <= 0:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _dollars(value: Any, name: str, positive: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ProxyError(400, "invalid_parameter", f"{name} must be a number of dollars {bound}",
                         extra={"detail": f"{name} must be a number of dollars {bound}"})
    return float(value)


class GateConsole:
    """The gate's fields and changes (see the module docstring)."""

    def __init__(self, *, governance: Any, agents: Any, operations: Any, ledger: Any, providers: Any) -> None:
        self._governance = governance
        self._agents = agents
        self._operations = operations
        self._ledger = ledger
        self._providers = providers

    # -- who

    @property
    def active(self) -> bool:
        """Whether the policy file is the gate's."""
        return self._governance.gate is not None

    def agent_ids(self) -> list[str]:
        return self._agents.names()

    def knows(self, agent: str) -> bool:
        return self._governance.is_gate_agent(agent)

    @staticmethod
    def not_found(agent: str, change: bool = False) -> ProxyError:
        """
        The 404 of an agent the gate's file does not name, with the gate's
        detail: its spend answer's object, or its changes' words.
        """
        detail: Any = "agent not found" if change else {"error": "agent_not_found", "agent_id": agent}
        return ProxyError(404, "unknown_agent", f"no agent {agent[:200]!r}", extra={"detail": detail})

    # -- reads

    def spend(self, agent: str) -> dict:
        """The gate's C{/api/spend/<agent>} fields (the agent must be the file's)."""
        gate = self._governance.gate
        described = gate.agents[agent]
        context = self._agents.context(agent)
        try:
            budget = self._governance.budget(context)
        except ProxyError:
            budget = None  # invalid (logged by governance): the file's words, nothing counted
        spent, start = 0.0, None
        if budget is not None:
            usage = self._governance.book.usage(agent, budget, context.timezone)
            spent = usage.cost_usd
            start = usage.start if budget.period is not None else None
        entry = self._ledger.budget_override(agent) or {}
        console = bool(entry.get("budget")) or bool(entry.get("spent_offset_usd"))
        reset = iso(entry.get("reset_at")) or iso(start) or described.period_reset
        return spend_fields(described, budget, spent, console=console, period_reset=reset)

    def add_spend(self, agent: str, doc: dict) -> dict:
        """Our C{/api/spend/<agent>} document with the gate's fields beside ours."""
        if not self.knows(agent):
            return doc
        return {**doc, **self.spend(agent)}

    def add_all_spend(self, doc: dict) -> dict:
        """
        Our C{/api/spend} with the gate's map of agent -> fields at the top
        level (ours keep their names when an agent is named like one of
        them), and the gate's fields in each of our C{agents} entries.
        """
        if not self.active:
            return doc
        out = dict(doc)
        agents = dict(out.get("agents") or {})
        for agent in self.agent_ids():
            fields = self.spend(agent)
            agents[agent] = {**(agents.get(agent) or {"agent": agent}), **fields}
            out.setdefault(agent, fields)
        out["agents"] = agents
        return out

    def add_health(self, doc: dict) -> dict:
        """Our C{/api/health} with the gate's C{status}, C{service}, C{agents} and C{openrouter_url}."""
        if not self.active:
            return doc
        out = dict(doc)
        if "agents" in out:
            out["agent_count"] = out["agents"]
        out.update({
            "status": "ok" if doc.get("ok") else "degraded",
            "service": SERVICE,
            "agents": self.agent_ids(),
            "openrouter_url": self.openrouter_url(),
        })
        return out

    def add_reload(self, doc: dict) -> dict:
        """Our C{/api/reload} with the gate's C{status} and C{agents}."""
        if not self.active:
            return doc
        return {**doc, "status": "reloaded" if not doc.get("failed") else "failed", "agents": self.agent_ids()}

    def openrouter_url(self) -> str | None:
        """Where OpenRouter is reached (the file's, the environment's or the catalog's base URL)."""
        try:
            return self._providers.resolve("openrouter").spec.base_url
        except Exception:
            gate = self._governance.gate
            return gate.upstream.base_url if gate is not None else None

    # -- changes

    def handles_budget(self, agent: str, doc: Any) -> bool:
        """Whether a POST /api/budget is the gate's: for an agent of its file, or with its fields."""
        if not self.active:
            return False
        return self.knows(agent) or (isinstance(doc, dict) and any(k in doc for k in GATE_BUDGET_KEYS))

    async def set_budget(self, agent: str, doc: Any, actor: str) -> dict:
        """
        The gate's budget change: C{budget_total} (the limit) and/or
        C{budget_spent} (what is spent now), and any of ours.  Raises the
        L{ProxyError} to answer with (the gate's 400 and 404 details).
        """
        if not isinstance(doc, dict):
            raise ProxyError(400, "invalid_body", "send a JSON object",
                             extra={"detail": "budget_total or budget_spent required"})
        if not self.knows(agent):
            raise self.not_found(agent, change=True)
        if not doc:
            raise ProxyError(400, "invalid_parameter", "budget_total or budget_spent required",
                             extra={"detail": "budget_total or budget_spent required"})
        change = {k: v for k, v in doc.items() if k not in GATE_BUDGET_KEYS}
        if doc.get("budget_total") is not None:
            change["limit_usd"] = _dollars(doc["budget_total"], "budget_total", positive=True)
        spent = None
        if doc.get("budget_spent") is not None:
            spent = _dollars(doc["budget_spent"], "budget_spent", positive=False)
        if not change and spent is None:
            raise ProxyError(400, "invalid_parameter", "budget_total or budget_spent required",
                             extra={"detail": "budget_total or budget_spent required"})
        entry = None
        if spent is not None:
            # The gate's budget_spent is what is spent now: the spend so far
            # stops counting, this amount counts instead; a limit the console
            # set before stays.
            kept = (self._ledger.budget_override(agent) or {}).get("budget") or {}
            self._check(agent, {**kept, **change})  # before anything is reset
            await self._operations.reset(agent, actor)
            change = {**kept, **change, "spent": spent}
        entry = await self._operations.set_budget(agent, change, actor)
        fields = self.spend(agent)
        return {
            "agent": agent, "override": entry,
            "status": "updated", "agent_id": agent,
            "budget_total": fields["budget_total"], "budget_spent": fields["budget_spent"],
        }

    def _check(self, agent: str, change: dict) -> None:
        """Refuse a change Operations.set_budget would refuse, before the spend is reset for it."""
        unknown = sorted(set(change) - set(BUDGET_KEYS))
        if unknown:
            raise ProxyError(400, "invalid_parameter", f"unknown budget fields: {', '.join(unknown)}")
        if change:
            try:
                self._governance.check_runtime(agent, self._agents.context(agent), change)
            except BudgetError as e:
                raise ProxyError(400, "invalid_budget", str(e)) from None

    async def reset(self, agent: str, actor: str) -> dict:
        """
        The gate's reset: the spend (and the file's C{budget_spent}) no
        longer counts; a limit the console set stays.
        """
        if not self.knows(agent):
            raise self.not_found(agent, change=True)
        kept = (self._ledger.budget_override(agent) or {}).get("budget") or {}
        await self._operations.reset(agent, actor)
        entry = await self._operations.set_budget(agent, {**kept, "spent": 0.0}, actor)
        return {"agent": agent, "override": entry, "status": "reset", "agent_id": agent, "budget_spent": 0.0}
