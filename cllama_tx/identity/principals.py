"""
A virtual key as the proxy's governance sees a caller: the same face as an
agent context (an id for the audit and the ledger, a model check, budgets,
rate limits), scoped to the key and its team instead of an agent.
"""

from __future__ import annotations

import re

import attrs

from cllama_tx.identity.virtual_keys import VirtualKey

_MONTHS = re.compile(r"^\s*(\d+)\s*mo\s*$")
# A key budget without budget_duration lasts the key's life.
LIFETIME_WINDOW = "3650d"


def key_budget(vk: VirtualKey) -> dict | None:
    """A key's max_budget/budget_duration as a budget object (hard stop)."""
    if vk.max_budget is None or vk.max_budget <= 0:
        return None
    doc = {"limit_usd": vk.max_budget, "behavior": "hard_stop"}
    months = _MONTHS.match(vk.budget_duration or "")
    if months and int(months.group(1)) == 1:
        doc["period"] = "monthly"
    elif months:
        doc["window"] = f"{int(months.group(1)) * 30}d"
    else:
        doc["window"] = vk.budget_duration or LIFETIME_WINDOW
    return doc


@attrs.frozen
class KeyPrincipal:
    """A request authenticated by a virtual key."""

    key: VirtualKey

    @property
    def agent_id(self) -> str:
        return self.key.claw_id

    @property
    def key_scope(self) -> str:
        return f"key:{self.key.token_hash}"

    @property
    def rate_scope(self) -> str:
        return self.key_scope

    model_policy = None
    timezone = None
    budget = None

    @property
    def metadata(self) -> dict:
        return {"rate_limits": {"rpm": self.key.rpm_limit, "tpm": self.key.tpm_limit}}

    def allows_model(self, ref: str) -> bool:
        return self.key.allows_model(ref)

    @property
    def spending_denied(self) -> bool:
        """LiteLLM's max_budget 0: the key may not spend anything."""
        return self.key.max_budget is not None and self.key.max_budget <= 0

    def budget_scopes(self) -> list[tuple[str, dict | None]]:
        """The key's own budget, then its team's (set by the operator)."""
        scopes = [(self.key_scope, key_budget(self.key))]
        if self.key.team_id:
            scopes.append((f"team:{self.key.team_id}", None))
        return scopes


#: The name the master key's requests are attributed to (ledger, audit, UI).
MASTER = "master"


@attrs.frozen
class MasterPrincipal:
    """
    An inference request made with the master key (LiteLLM allows it): no
    model policy and no model list; governed like an agent named
    C{master} (a budget for it can be set as for any agent, e.g.
    C{CLAW_GOVERNANCE_DIR/master/budget.json} or the UI).
    """

    agent_id: str = MASTER
    model_policy = None
    timezone = None
    budget = None

    @property
    def metadata(self) -> dict:
        return {}
