"""
A virtual key (or the master key) as the proxy's governance sees a caller:
the same face as an agent context (an id for the audit and the ledger, a
model check, budgets, rate limits), scoped to the key and what it belongs
to instead of an agent.

Everything a request of a key must fit is one list of L{ScopeLimit}s,
checked and reserved together (L{cllama_tx.governance.engine}): the key's
own budget, rate limits and parallel limit; its team's; the key's user
within the team (a member budget); its user's; its organisation's (the
key's, else its team's); the customer the request names in C{user}; and
the key's per-model budgets and rate limits for the model as requested.
Scope names are the store's vocabulary (L{cllama_tx.store.shared.scope_name}).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import attrs

from cllama_tx.identity.budget_docs import LIFETIME_WINDOW, budget_doc
from cllama_tx.identity.key_model import VirtualKey, allows
from cllama_tx.store.shared import scope_name

__all__ = [
    "LIFETIME_WINDOW",
    "MASTER",
    "KeyPrincipal",
    "MasterPrincipal",
    "ScopeLimit",
    "key_budget",
]


def key_budget(vk: VirtualKey) -> dict | None:
    """A key's max_budget/budget_duration as a budget object (hard stop)."""
    return budget_doc(vk.max_budget, vk.budget_duration, vk.budget_anchor or vk.created_at)


@attrs.frozen
class ScopeLimit:
    """
    One level a request must fit: its budget scope, LiteLLM's name for it
    in messages (C{Key=sk-...abcd}, C{Team=t1}, ...), and its limits.
    C{budget} is a budget object (or None); C{denied} is a budget of 0
    (LiteLLM: nothing may be spent); C{soft_usd} alerts without refusing.
    """

    scope: str
    entity: str
    budget: dict | None = None
    denied: bool = False
    soft_usd: float | None = None
    rpm: int | None = None
    tpm: int | None = None
    parallel: int | None = None
    max_budget: float | None = None


def _limit(scope: str, entity: str, record: Any, anchor: float | None = None,
           budget_field: str = "max_budget") -> ScopeLimit:
    """A record with LiteLLM's budget and limit fields (a key, user, team, organisation, customer)."""
    limit = getattr(record, budget_field, None)
    duration = getattr(record, "budget_duration", None)
    start = anchor if anchor is not None else getattr(record, "budget_anchor", None) or getattr(record, "created_at", 0.0)
    soft = getattr(record, "soft_budget", None)
    soft_doc = None
    if soft is not None and soft > 0 and limit is None:
        # Only a soft budget: held as a soft_alert budget, never refusing.
        soft_doc = budget_doc(soft, duration, start, behavior="soft_alert")
    return ScopeLimit(
        scope=scope,
        entity=entity,
        budget=budget_doc(limit, duration, start) or soft_doc,
        denied=limit is not None and limit <= 0,
        soft_usd=soft if soft is not None and soft > 0 and limit is not None else None,
        rpm=getattr(record, "rpm_limit", None),
        tpm=getattr(record, "tpm_limit", None),
        parallel=getattr(record, "max_parallel_requests", None),
        max_budget=limit,
    )


@attrs.frozen
class KeyPrincipal:
    """
    A request authenticated by a virtual key.  The methods that look above
    the key take the C{directory} (users, teams, organisations, customers;
    L{cllama_tx.identity.directory}); with None only the key's own limits
    and its team's operator budget apply.
    """

    key: VirtualKey

    @property
    def agent_id(self) -> str:
        return self.key.claw_id

    @property
    def key_scope(self) -> str:
        return scope_name("key", self.key.token_hash)

    @property
    def rate_scope(self) -> str:
        return self.key_scope

    model_policy = None
    timezone = None
    budget = None
    #: Refusals in LiteLLM's words, types and statuses.
    litellm = True

    @property
    def metadata(self) -> dict:
        return {"rate_limits": {"rpm": self.key.rpm_limit, "tpm": self.key.tpm_limit}}

    @property
    def entity(self) -> str:
        """LiteLLM's name for the key in messages."""
        return f"Key={self.key.key_alias or self.key.key_name}"

    def allows_model(self, ref: str) -> bool:
        return self.key.allows_model(ref)

    @property
    def spending_denied(self) -> bool:
        """LiteLLM's max_budget 0: the key may not spend anything."""
        return self.key.max_budget is not None and self.key.max_budget <= 0

    # -- what the levels above the key say

    def _records(self, directory: Any, end_user: str | None = None) -> dict[str, Any]:
        """The directory's records of this key's team, member, user, organisation and customer."""
        key = self.key
        if directory is None:
            return {}
        found: dict[str, Any] = {}
        team = directory.team(key.team_id) if key.team_id else None
        if team is not None:
            found["team"] = team
            if key.user_id:
                member = directory.member(key.team_id, key.user_id)
                if member is not None:
                    found["member"] = member
        if key.user_id:
            user = directory.user(key.user_id)
            if user is not None:
                found["user"] = user
        org_id = self.organization_of(directory)
        if org_id:
            org = directory.organization(org_id)
            if org is not None:
                found["org"] = org
        if end_user:
            customer = directory.customer(end_user)
            if customer is not None:
                found["customer"] = customer
        return found

    def organization_of(self, directory: Any) -> str | None:
        """The organisation the key's spend counts against: its own, else its team's."""
        if self.key.organization_id:
            return self.key.organization_id
        team = directory.team(self.key.team_id) if directory is not None and self.key.team_id else None
        return None if team is None else team.organization_id

    def blocked_by(self, directory: Any, end_user: str | None = None) -> str | None:
        """LiteLLM's name of a blocked team or customer this request belongs to, else None."""
        records = self._records(directory, end_user)
        team = records.get("team")
        if team is not None and team.blocked:
            return f"Team={team.team_id}"
        customer = records.get("customer")
        if customer is not None and customer.blocked:
            return f"End User={customer.user_id}"
        return None

    def model_denial(self, directory: Any, names: Iterable[str], ref: str, end_user: str | None = None) -> str | None:
        """
        Which level refuses the model (C{key}, C{team}, C{member}, C{user},
        C{org}, C{customer}), or None: each level's C{models} must allow one
        of the names the request's model goes by (as sent, aliased,
        resolved) or the ref it resolved to.  An empty list allows all.
        """
        candidates = [*names, ref]
        if not any(allows(self.key.models, n) for n in candidates):
            return "key"
        records = self._records(directory, end_user)
        for level in ("team", "member", "user", "org", "customer"):
            record = records.get(level)
            allowed = tuple(getattr(record, "models", ()) or ()) if record is not None else ()
            if allowed and not any(allows(allowed, n) for n in candidates):
                return level
        return None

    def limits(self, directory: Any = None, requested: str | None = None, end_user: str | None = None) -> list[ScopeLimit]:
        """
        Every level this request must fit, the key's first: see the module
        docstring.  C{requested} is the model as the request names it (the
        per-model limits of LiteLLM are keyed by that name); C{end_user}
        the request's C{user} field.
        """
        key = self.key
        out = [_limit(self.key_scope, self.entity, key)]
        if requested is not None:
            model_budget = key.model_max_budget.get(requested)
            rpm = key.model_rpm_limit.get(requested)
            tpm = key.model_tpm_limit.get(requested)
            if model_budget is not None or rpm is not None or tpm is not None:
                limit = model_budget.get("max_budget") if model_budget else None
                duration = model_budget.get("budget_duration") if model_budget else None
                anchor = key.budget_anchor or key.created_at
                out.append(ScopeLimit(
                    scope=scope_name("keymodel", key.token_hash, requested),
                    entity=f"{self.entity} model={requested}",
                    budget=budget_doc(limit, duration, anchor),
                    denied=limit is not None and limit <= 0,
                    rpm=rpm,
                    tpm=tpm,
                    max_budget=limit,
                ))
        records = self._records(directory, end_user)
        team = records.get("team")
        if key.team_id:
            # The team's scope always comes: an operator budget may be set on it.
            if team is not None:
                out.append(_limit(scope_name("team", key.team_id), f"Team={key.team_id}", team))
            else:
                out.append(ScopeLimit(scope=scope_name("team", key.team_id), entity=f"Team={key.team_id}"))
        member = records.get("member")
        if member is not None:
            out.append(_limit(
                scope_name("member", member.team_id, member.user_id),
                f"User={member.user_id} in Team={member.team_id}", member,
            ))
        user = records.get("user")
        if user is not None:
            out.append(_limit(scope_name("user", user.user_id), f"User={user.user_id}", user))
        org = records.get("org")
        if org is not None:
            out.append(_limit(scope_name("org", org.organization_id), f"Organization={org.organization_id}", org))
        customer = records.get("customer")
        if customer is not None:
            out.append(_limit(scope_name("customer", customer.user_id), f"End User={customer.user_id}", customer))
        return out

    def budget_scopes(self) -> list[tuple[str, dict | None]]:
        """The key's own budget, then its team's (kept for callers that do not pass a request)."""
        return [(limit.scope, limit.budget) for limit in self.limits()]


#: The name the master key's requests are attributed to (ledger, audit, UI).
MASTER = "master"


@attrs.frozen
class MasterPrincipal:
    """
    An inference request made with the master key (LiteLLM allows it): no
    model policy and no model list; governed like an agent named
    C{master} (a budget for it can be set as for any agent, e.g.
    C{CLAW_GOVERNANCE_DIR/master/budget.json} or the UI), and by the
    budget of the customer its request names in C{user}.
    """

    agent_id: str = MASTER
    model_policy = None
    timezone = None
    budget = None
    litellm = True
    #: Its own budget is an agent's (files, policy, the UI), besides the customer's.
    agent_budget = True

    @property
    def metadata(self) -> dict:
        return {}

    def limits(self, directory: Any = None, requested: str | None = None, end_user: str | None = None) -> list[ScopeLimit]:
        """The customer's budget and limits, when the request names a known customer (the master's own are an agent's)."""
        if not end_user or directory is None:
            return []
        customer = directory.customer(end_user)
        if customer is None:
            return []
        return [_limit(scope_name("customer", customer.user_id), f"End User={customer.user_id}", customer)]

    def blocked_by(self, directory: Any, end_user: str | None = None) -> str | None:
        if not end_user or directory is None:
            return None
        customer = directory.customer(end_user)
        return f"End User={customer.user_id}" if customer is not None and customer.blocked else None

    def model_denial(self, directory: Any, names: Iterable[str], ref: str, end_user: str | None = None) -> str | None:
        if not end_user or directory is None:
            return None
        customer = directory.customer(end_user)
        allowed = tuple(getattr(customer, "models", ()) or ()) if customer is not None else ()
        if allowed and not any(allows(allowed, n) for n in [*names, ref]):
            return "customer"
        return None
