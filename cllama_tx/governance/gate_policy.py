"""
The Execwall OR gate's own C{policy.yaml}, read as the gate reads it.

The gate (a budget-tier proxy in front of OpenRouter) keeps its agents in
the same C{cost_routing.agents} section as our operator policy file
(L{cllama_tx.governance.policy_file}), with its own meaning, and a
C{cost_routing.openrouter} section that says where OpenRouter is.  A file
with that section is read in the gate's dialect, so the gate's file starts
the daemon as it is:

  - tier models are OpenRouter ids (C{anthropic/claude-3.5-sonnet}) and are
    routed to OpenRouter (refs C{openrouter/<id>}), the current tier's list
    sent as C{models} with C{route: "fallback"};
  - a tier applies when the remaining fraction is at or above its threshold
    (C{tiers_rule: at_least}); below every threshold the lowest tier;
  - C{hard_cap} defaults to true (C{hard_stop}: once spent, a 402), and
    C{period} to C{none}, a lifetime budget;
  - the request's C{model} is ignored: the gate always sends its tier;
  - C{budget_source} and C{period_reset} are reported by the console API.

Everything else in the file (rules, sandboxes, seccomp profiles, the
console section) is the gate's business and ignored.  Pure logic but for
L{read_policy}, which reads the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

from cllama_tx.governance.periods import EPSILON_USD, LIFETIME
from cllama_tx.governance.policy_file import (
    PolicyFileError,
    _read,
    agent_budget,
    agent_entries,
    interpolate,
    parse_policy_text,
    policy_budgets,
)
from cllama_tx.governance.tiers import AT_LEAST

#: The section that makes a policy file the gate's.
GATE_SECTION = "openrouter"
OPENROUTER_PREFIX = "openrouter/"
#: The gate's defaults for an agent entry (its config.Agent model).
GATE_DEFAULTS = {"hard_cap": True, "period": "none", "budget_source": "local"}

BUDGET_EXHAUSTED = "budget_exhausted"


@attrs.frozen
class GateAgent:
    """An agent of the gate's file, with the fields its console API reports as written."""

    agent_id: str
    budget_source: str = "local"
    period: str = "none"
    period_reset: str | None = None
    hard_cap: bool = True


@attrs.frozen
class GateUpstream:
    """Where the gate's file says OpenRouter is (C{cost_routing.openrouter})."""

    base_url: str | None = None
    api_key: str | None = attrs.field(default=None, repr=False)
    timeout_seconds: float | None = None


@attrs.frozen
class GatePolicy:
    """What a gate file says besides budgets: its agents (in file order) and OpenRouter."""

    agents: Mapping[str, GateAgent]
    upstream: GateUpstream = GateUpstream()

    @property
    def agent_ids(self) -> list[str]:
        return list(self.agents)


@attrs.frozen
class PolicyFile:
    """A policy file read: C{{agent: raw budget}}, and the gate's settings when it is the gate's."""

    budgets: dict[str, dict]
    gate: GatePolicy | None = None


def is_gate_document(doc: Any) -> bool:
    """Whether a parsed policy document is the gate's (it has C{cost_routing.openrouter})."""
    if not isinstance(doc, dict):
        return False
    routing = doc.get("cost_routing")
    return isinstance(routing, dict) and isinstance(routing.get(GATE_SECTION), dict)


def openrouter_ref(model: Any) -> Any:
    """C{openrouter/<id>} for an OpenRouter id (left as it is when it says so already)."""
    if isinstance(model, str) and model.strip() and not model.strip().lower().startswith(OPENROUTER_PREFIX):
        return OPENROUTER_PREFIX + model.strip()
    return model


def openrouter_id(ref: str) -> str:
    """The OpenRouter id of a ref (C{openrouter/} taken off)."""
    return ref[len(OPENROUTER_PREFIX):] if ref.lower().startswith(OPENROUTER_PREFIX) else ref


def gate_budget(entry: Any, where: str, warnings: list[str] | None = None) -> dict:
    """
    The raw budget of one gate agent entry: the gate's defaults, its tier
    models as OpenRouter refs, its threshold rule.

    @raise PolicyFileError: as L{agent_budget}.
    """
    if not isinstance(entry, dict):
        raise PolicyFileError(f"{where}: must be a mapping")
    entry = dict(entry)
    for key, value in GATE_DEFAULTS.items():
        if entry.get(key) is None:
            entry[key] = value
    tiers = entry.get("tiers")
    if isinstance(tiers, list):
        entry["tiers"] = [
            {**tier, "models": [openrouter_ref(m) for m in tier["models"]]}
            if isinstance(tier, dict) and isinstance(tier.get("models"), list) else tier
            for tier in tiers
        ]
    budget = agent_budget(entry, where, warnings)
    budget["tiers_rule"] = AT_LEAST
    return budget


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def gate_agent(agent_id: str, entry: dict) -> GateAgent:
    """The console API's view of one (already validated) entry."""
    hard_cap = entry.get("hard_cap", True)
    if isinstance(hard_cap, str):
        hard_cap = hard_cap.strip().lower() in ("true", "yes", "on", "1")
    period = entry.get("period")
    reset = entry.get("period_reset")
    return GateAgent(
        agent_id=agent_id,
        budget_source=_text(entry.get("budget_source")) or "local",
        period=_text(period) or "none",
        period_reset=str(reset) if reset is not None else None,
        hard_cap=bool(hard_cap),
    )


class _Lenient(Mapping):
    """The environment as the gate reads it: an unset C{${VAR}} is empty."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def __getitem__(self, name: str) -> str:
        return self._env.get(name, "")

    def get(self, name: str, default: Any = None) -> Any:
        return self._env.get(name, "")

    def __iter__(self):
        return iter(self._env)

    def __len__(self) -> int:
        return len(self._env)


def gate_upstream(section: Any, env: Mapping[str, str] | None) -> GateUpstream:
    """C{cost_routing.openrouter}, interpolated as the gate does (unset variables are empty)."""
    if not isinstance(section, dict):
        return GateUpstream()
    if env is not None:
        section = interpolate(section, _Lenient(env), "cost_routing.openrouter")
    timeout = section.get("timeout_seconds")
    number = isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and math.isfinite(timeout) and timeout > 0
    return GateUpstream(
        base_url=_text(section.get("base_url")),
        api_key=_text(section.get("api_key")),
        timeout_seconds=float(timeout) if number else None,
    )


def gate_policy(
    doc: dict, source: str = "policy file", warnings: list[str] | None = None, env: Mapping[str, str] | None = None
) -> PolicyFile:
    """
    The budgets and settings of a gate document (L{is_gate_document}).

    @raise PolicyFileError: an agent entry is wrong (with its place in the file).
    """
    routing = doc["cost_routing"]
    budgets: dict[str, dict] = {}
    described: dict[str, GateAgent] = {}
    for agent_id, entry in agent_entries(routing, source, env).items():
        budgets[agent_id] = gate_budget(entry, f"{source}: cost_routing.agents.{agent_id}", warnings)
        described[agent_id] = gate_agent(agent_id, entry)
    return PolicyFile(budgets, GatePolicy(described, gate_upstream(routing.get(GATE_SECTION), env)))


def policy_document(
    doc: Any, source: str = "policy file", warnings: list[str] | None = None, env: Mapping[str, str] | None = None
) -> PolicyFile:
    """A parsed policy document in whichever dialect it is written."""
    if is_gate_document(doc):
        return gate_policy(doc, source, warnings, env)
    return PolicyFile(policy_budgets(doc, source, warnings, env))


def read_policy(path: str, env: Mapping[str, str], warnings: list[str] | None = None) -> PolicyFile:
    """
    Read C{CLLAMA_POLICY_FILE} in its dialect.  Blocking I/O: at start, or
    from an operator's reload.

    @raise PolicyFileError: as L{cllama_tx.governance.policy_file.load_policy_file}.
    """
    return policy_document(parse_policy_text(_read(path), path), path, warnings, env)


# --------------------------------------------------------------------------
# What the gate reports


def remaining_fraction(total: float | None, spent: float) -> float:
    """The gate's remaining fraction: C{(total - spent) / total}, 0 when nothing is left."""
    if not total or total <= 0:
        return 0.0
    remaining = total - spent
    return 0.0 if remaining <= 0 else remaining / total


def routing_info(agent_id: str, budget: Any, spent: float, hard_cap: bool) -> dict:
    """
    The gate's routing information for C{agent_id} under C{budget} (its
    effective budget) with C{spent} dollars counted: the detail of its 402,
    with the tier it is in (index, highest threshold first) and its models
    as OpenRouter ids.
    """
    total = budget.limit_usd or 0.0
    pct = remaining_fraction(total, spent)
    tiers = budget.tiers
    current = next((i for i, tier in enumerate(tiers) if pct >= tier.threshold), None)
    chosen = tiers[current] if current is not None else (tiers[-1] if tiers else None)
    exhausted = bool(hard_cap) and total - spent <= EPSILON_USD
    return {
        "error": BUDGET_EXHAUSTED,
        "agent_id": agent_id,
        "budget_total": total,
        "budget_spent": round(spent, 6),
        "budget_remaining": round(total - spent, 6),
        "budget_percentage": round(pct * 100, 2),
        "current_tier": current,
        "models_allowed": [openrouter_id(m) for m in chosen.models] if chosen is not None else [],
        "hard_cap": bool(hard_cap),
        "exhausted": exhausted,
    }


def models_allowed(budget: Any, spent: float) -> list[str]:
    """The gate's C{models_allowed}: the tier's models as OpenRouter ids."""
    return routing_info("", budget, spent, False)["models_allowed"]


def spend_fields(
    agent: GateAgent, budget: Any, spent: float, *, console: bool, period_reset: str | None
) -> dict:
    """
    The gate's C{/api/spend/<agent>} fields: C{budget_total}, C{budget_spent}
    (what counts in the current period, file offset included),
    C{budget_remaining}, C{budget_source} (C{console} once the console API
    changed the budget), C{period} as the file writes it, C{period_reset}
    and C{hard_cap}.
    """
    total = budget.limit_usd if budget is not None and budget.limit_usd is not None else 0.0
    return {
        "agent_id": agent.agent_id,
        "budget_total": total,
        "budget_spent": round(spent, 6),
        "budget_remaining": round(total - spent, 6),
        "budget_source": "console" if console else agent.budget_source,
        "period": _period_word(agent, budget),
        "period_reset": period_reset,
        "hard_cap": budget.behavior == "hard_stop" if budget is not None else agent.hard_cap,
    }


def _period_word(agent: GateAgent, budget: Any) -> str:
    """The period as the gate writes it: the file's word, or the one a runtime change set."""
    if budget is None:
        return agent.period
    if budget.period == LIFETIME:
        return "none" if agent.period.lower() in ("none", LIFETIME) else LIFETIME
    return budget.period if budget.period is not None else (budget.window or agent.period)
