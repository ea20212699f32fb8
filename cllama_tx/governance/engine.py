"""
Governance of one request: which model it may use (model policy, budget
tiers), whether it may go at all (rate limits, budget reservations), and
closing those books when it ends.  The proxy calls L{Governance.admit}
before it sends anything upstream and L{Governance.finish} once the request
is settled; everything in between is the rooms' pure logic.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from cllama_tx.governance import budget_audit, litellm_errors
from cllama_tx.governance.alerts import budget_fraction
from cllama_tx.governance.budgets import (
    BUDGET_EXCEEDED,
    HARD_STOP,
    SOFT_ALERT,
    BudgetError,
    Refusal,
    Reservation,
    layer_budgets,
    parse_budget,
    refusal_body,
    worst_case_cost,
    worst_input_cost,
)
from cllama_tx.governance.ceiling import AUTO, CeilingPricing, ceiling_cost
from cllama_tx.governance.gate_policy import GatePolicy, openrouter_id, read_policy, routing_info
from cllama_tx.governance.kept import KeptByIdentity
from cllama_tx.governance.output_limit import DEFAULT_MIN_OUTPUT_TOKENS, OutputLimit, fit_output
from cllama_tx.governance.parallel import ParallelLimiter
from cllama_tx.governance.periods import EPSILON_USD, LIFETIME
from cllama_tx.governance.policy import PolicyError, parse_policy
from cllama_tx.governance.ratelimit import Admission as RateAdmission
from cllama_tx.governance.ratelimit import RateLimiter
from cllama_tx.governance.request_cost import (
    RequestShape,
    read_request_and_estimate,
    worst_input_tokens,
)
from cllama_tx.governance.resolution import Resolution, Router
from cllama_tx.store.coordination import Decision
from cllama_tx.store.database import DatabaseUnavailable
from cllama_tx.store.jsonfile import UnreadableFile, file_signature, read_json_file
from cllama_tx.store.shared import scope_name
from cllama_tx.surfaces.errors import ProxyError
from cllama_tx.surfaces.matrix import (
    ANTHROPIC_MESSAGES,
    BARE_REF_PROVIDER,
    InvalidModelRef,
    ModelRef,
    split_model_ref,
)

log = Logger()

#: The reference's intervention for a model policy that declares several
#: models of which the request can reach only one.
FAILOVER_UNREACHABLE = "policy_failover_unreachable"

# Seconds a caller refused because the ledger cannot write is told to wait.
LEDGER_RETRY_AFTER = 5

#: Budget scopes that count only requests in flight (max_parallel_requests).
PARALLEL_PREFIX = scope_name("parallel", "")
#: LiteLLM's customers: a request's "user" names one (at most this long).
MAX_END_USER = 256


def end_user_of(doc: dict) -> str | None:
    """The customer a request names in its C{user} field (LiteLLM's end user), if any."""
    user = doc.get("user")
    if not isinstance(user, str) or not user or len(user) > MAX_END_USER:
        return None
    if any(ord(c) < 32 or ord(c) == 127 for c in user):
        return None
    return user

#: The shape handed to L{Governance._decide} for a request nothing is held or
#: counted for (no budget, rate or parallel limit): never read there.
_NO_SHAPE = RequestShape(text_bytes=0)

# How often an agent's governance file is stat()ed at most.
RECHECK_INTERVAL = 1.0
MAX_GOVERNANCE_FILE_BYTES = 1 << 20


@attrs.frozen
class Ceiling:
    """
    The worst case of a request whose body the proxy does not read for its
    cost (a passthrough request, C{ex.fixed_worst}): what its budgets hold
    while it runs; C{usd} None when it cannot be priced (then the budget's
    rule for unpriced models applies, C{CLLAMA_UNPRICED_BUDGET}).
    """

    usd: float | None


@attrs.define
class Admission:
    """What admitting a request decided, kept until it is finished."""

    agent: str
    candidates: tuple[ModelRef, ...]
    # One reservation per budget scope (an agent; or a virtual key and the
    # levels above it: team, member, user, organisation, customer).
    reservations: list = attrs.Factory(list)
    openrouter_models: list[str] | None = None
    # The rate windows this request is counted in: (scope, admitted at).
    rate_holds: list = attrs.Factory(list)
    token_estimate: int = 0
    # Scopes whose requests in flight count this one (max_parallel_requests).
    parallel_holds: list = attrs.Factory(list)
    # LiteLLM's levels of a key's request, by budget scope (their names and limits).
    levels: dict = attrs.Factory(dict)
    budget_label: str | None = None
    # Shared store (several instances): the ids of this request's
    # reservations and rate event there, released once its row is committed.
    shared_reservations: list = attrs.Factory(list)
    shared_rate_events: list = attrs.Factory(list)
    # The output limit the request is sent with when its budget lowered it.
    output_limit: OutputLimit | None = None
    # What its first budget had left (limit - settled spend) when it was admitted.
    remaining_usd: float | None = None

    @property
    def reservation(self) -> Reservation | None:
        return self.reservations[0] if self.reservations else None

    @property
    def rate_key(self) -> str | None:
        """The first rate window this request is counted in (None: none)."""
        return self.rate_holds[0][0] if self.rate_holds else None


@attrs.frozen
class BudgetReport:
    """What a settled request tells its caller of its budget (headers, the OR gate's C{_execwall})."""

    agent: str
    remaining_usd: float | None
    models_allowed: list[str]
    gate: bool = False


@attrs.frozen
class RateLimits:
    rpm: int | None = None
    tpm: int | None = None


def budget_error(refusal: Refusal) -> ProxyError:
    """A budget refusal as a ProxyError with the contract's body."""
    retry = refusal.retry_after_header
    return ProxyError(
        refusal.status,
        refusal.code,
        refusal.message,
        retry_after=int(retry) if retry is not None else None,
        extra={"budget": refusal_body(refusal)["budget"]},
        error_type=refusal.code,
    )


class _FileCache:
    """
    C{CLAW_GOVERNANCE_DIR/<agent>/budget.json}, stat()ed at most once per
    interval and re-read only when it changed: no per-request file reads.
    """

    def __init__(self, root: str | None, clock) -> None:
        self._root = root
        self._clock = clock
        self._entries: dict[str, tuple[float, tuple | None, dict | None]] = {}

    def get(self, agent: str) -> dict | None:
        if not self._root:
            return None
        now = self._clock.seconds()
        cached = self._entries.get(agent)
        if cached is not None and now - cached[0] < RECHECK_INTERVAL:
            return cached[2]
        path = os.path.join(self._root, agent, "budget.json")
        signature = file_signature(path)
        if cached is not None and cached[1] == signature:
            self._entries[agent] = (now, signature, cached[2])
            return cached[2]
        doc = None
        try:
            signature, doc = read_json_file(path, MAX_GOVERNANCE_FILE_BYTES)
            if doc is not None and not isinstance(doc, dict):
                raise UnreadableFile("is not a JSON object")
        except UnreadableFile as e:
            log.warn("ignoring governance budget file {path}: {error}", path=path, error=str(e))
            doc = None
        self._entries[agent] = (now, signature, doc)
        return doc


class Governance:
    """Admission control for every request; one instance per daemon."""

    def __init__(
        self,
        *,
        clock,
        book,
        limiter: RateLimiter,
        governance_dir: str | None = None,
        policy_file: str | None = None,
        runtime_overrides: dict | None = None,
        default_limits: RateLimits = RateLimits(),
        intervention: Callable[..., None] = lambda *a, **k: None,
        alerts=None,
        ledger=None,
        router: Router | None = None,
        min_output_tokens: int = DEFAULT_MIN_OUTPUT_TOKENS,
        coordinator=None,
        directory=None,
        budget_fail_open: bool = False,
    ) -> None:
        # CLLAMA_BUDGET_FAIL_MODE=open: a budget that cannot be evaluated
        # is audited and passed over instead of refusing the request.
        self._budget_fail_open = budget_fail_open
        # Several instances on one store: admission under the store's locks.
        self._coordinator = coordinator
        # Users, teams, organisations and customers (the levels above a key).
        self.directory = directory
        self._parallel = ParallelLimiter()
        # scope -> when its spend was last reset (counts only after it).
        self._reset_at: dict[str, float] = {}
        # The shortest answer a budget lowers max_tokens to; 0: never lower.
        self._min_output_tokens = min_output_tokens
        # Which provider and model a requested name means (resolution.py).
        self.router = router if router is not None else Router()
        self._clock = clock
        self.book = book
        self._limiter = limiter
        self._files = _FileCache(governance_dir, clock)
        self._policy_file = policy_file
        self._policy_budgets: dict = {}
        # The Execwall OR gate's settings when the policy file is its own (gate_policy.py).
        self.gate: GatePolicy | None = None
        self.load_policy_file()
        # The operator's runtime changes (POST /api/budget), agent -> entry;
        # an entry is replaced, never mutated, so identity tells a change.
        self.runtime: dict[str, dict] = dict(runtime_overrides or {})
        self._default_limits = default_limits
        self._intervention = intervention
        self._alerts = alerts
        # Asked before a metered request is admitted: can its row be kept?
        self._ledger = ledger
        self._policies: dict[str, tuple[Any, Any]] = {}
        self._budgets: dict[str, tuple[tuple, Any]] = {}
        self._limits: dict[str, tuple[Any, RateLimits]] = {}

    # -- configuration per agent (cached; recomputed only when a source changed)

    def policy(self, context):
        cached = self._policies.get(context.agent_id)
        if cached is not None and cached[0] is context:
            return cached[1]
        try:
            policy = parse_policy(context.model_policy)
        except PolicyError as e:
            log.warn("agent {agent} has an invalid model_policy: {error}", agent=context.agent_id, error=str(e))
            raise ProxyError(403, "invalid_model_policy", "this agent's model policy is invalid; ask the operator") from None
        self._policies[context.agent_id] = (context, policy)
        return policy

    def _sources(self, context) -> tuple:
        """Every layer of an agent's budget, lowest first."""
        agent = context.agent_id
        return (context, self._policy_budgets.get(agent), self._files.get(agent), self.runtime.get(agent))

    @staticmethod
    def raw_budget(sources: tuple) -> dict | None:
        """
        metadata.json's budget (with budget-override.json), then the policy
        file, then CLAW_GOVERNANCE_DIR/<agent>/budget.json, then the
        operator's runtime change: later layers win key by key.
        """
        context, policy_file, governance_file, runtime = sources
        files = layer_budgets(context.budget, None, governance_file, policy_file_budget=policy_file)
        if not runtime:
            return files
        layer = dict(runtime.get("budget") or {})
        if runtime.get("spent_offset_usd") is not None:
            layer["spent_offset_usd"] = runtime["spent_offset_usd"]
        return layer_budgets(files, None, layer) if layer else files

    def load_policy_file(self) -> int:
        """
        (Re-)read CLLAMA_POLICY_FILE.  At start a broken file stops the
        daemon; on a reload it raises and the previous budgets stay.
        """
        if self._policy_file:
            read = read_policy(self._policy_file, os.environ)
            self._policy_budgets, self.gate = read.budgets, read.gate
        return len(self._policy_budgets)

    def policy_agent_ids(self) -> list[str]:
        """The agents the policy file names, in its order."""
        return list(self._policy_budgets)

    def policy_budget(self, agent: str) -> dict | None:
        """The policy file's raw budget for C{agent}, if it has one."""
        return self._policy_budgets.get(agent)

    def is_gate_agent(self, agent: str | None) -> bool:
        """Whether C{agent} comes from the OR gate's policy file (its rules apply)."""
        return self.gate is not None and agent is not None and agent in self.gate.agents

    def has_lifetime_budgets(self, raw_budgets=()) -> bool:
        """Whether the policy file, or one of C{raw_budgets}, has a lifetime budget (its whole spend is seeded)."""
        budgets = list(self._policy_budgets.values()) + list(raw_budgets)
        return any(isinstance(b, dict) and str(b.get("period") or "").strip().lower() == LIFETIME for b in budgets)

    def check_runtime(self, agent: str, context, layer: dict) -> None:
        """
        Would this runtime budget change give the agent a valid budget?
        Raises BudgetError when not (the change is then refused).
        """
        if context is None:
            # An agent without a context: its policy file's budget (the OR gate's agents), under the change.
            policy = self._policy_budgets.get(agent)
            parse_budget(layer_budgets(None, None, layer, policy_file_budget=policy) if policy else layer)
            return
        sources = (context, self._policy_budgets.get(agent), self._files.get(agent), {"budget": layer})
        parse_budget(self.raw_budget(sources))

    def set_runtime(self, agent: str, entry: dict | None, reset: bool = False) -> None:
        """Apply an operator change; a reset also forgets the agent's spend."""
        if entry is None:
            self.runtime.pop(agent, None)
        else:
            self.runtime[agent] = entry
        if reset:
            self.book.forget(agent)
            reset_at = (entry or {}).get("reset_at")
            self._reset_at[agent] = float(reset_at) if reset_at is not None else self._clock.seconds()
            if self._coordinator is not None:
                # Read the scope again, from the reset on, at its next admission.
                self._coordinator.forget_scope(agent)

    def apply_shared_override(self, agent: str, entry: dict | None) -> None:
        """Another instance changed C{agent}'s override (change feed); a new reset forgets its spend here too."""
        new_reset = (entry or {}).get("reset_at")
        known = self._reset_at.get(agent, (self.runtime.get(agent) or {}).get("reset_at"))
        self.set_runtime(agent, entry, reset=new_reset is not None and new_reset != known)

    def seed(self, timeline) -> None:
        """Committed spend from the ledger, at start: (agent, ts, cost, requests, unknown)."""
        by_agent: dict[str, list] = {}
        for agent, ts, cost, requests, unknown in timeline:
            by_agent.setdefault(agent, []).append((ts, cost, requests, unknown))
        for agent, entries in by_agent.items():
            self.book.load_counts(agent, entries)

    def scopes(self, context, levels: list | None = None) -> list[tuple[str, Any, Any]]:
        """
        The budgets a request of this principal must fit: C{(scope, budget,
        timezone)}.  An agent has its own; a virtual key (a context with
        C{limits}) has one per level of C{levels} (L{request_levels}) with a
        budget: its own, its team's, its member budget, its user's, its
        organisation's, the customer's; the master key has its own, as an
        agent's, and the customer's.  An operator's runtime budget on a
        scope (C{POST /api/budget/<scope>}) is laid over the level's.
        """
        if levels is None and getattr(context, "litellm", False):
            levels = self.request_levels(context, None, None)
        if levels is not None:
            scopes = []
            if getattr(context, "agent_budget", False):
                budget = self.budget(context)
                scopes = [] if budget is None else [(context.agent_id, budget, context.timezone)]
            return scopes + self._layered([(level.scope, level.budget) for level in levels])
        extra = getattr(context, "budget_scopes", None)
        if extra is not None:
            return self._layered(extra())
        budget = self.budget(context)
        return [] if budget is None else [(context.agent_id, budget, context.timezone)]

    def _layered(self, raw_scopes) -> list[tuple[str, Any, Any]]:
        """Budget scopes with the operator's runtime changes laid over them, parsed (cached)."""
        scopes = []
        for scope, raw in raw_scopes:
            runtime = self.runtime.get(scope) or {}
            layer = dict(raw or {})
            layer.update(runtime.get("budget") or {})
            if not layer:
                continue
            if runtime.get("spent_offset_usd") is not None:
                layer["spent_offset_usd"] = runtime["spent_offset_usd"]
            budget = self._parsed(scope, (json.dumps(layer, sort_keys=True),), lambda layer=layer: layer)
            if budget is not None:
                scopes.append((scope, budget, None))
        return scopes

    def request_levels(self, context, requested: str | None, end_user: str | None) -> list:
        """
        The levels (L{cllama_tx.identity.principals.ScopeLimit}) a request
        of a key or of the master key must fit, as the directory says now;
        empty for an agent.
        """
        limits = getattr(context, "limits", None)
        if limits is None:
            return []
        return list(limits(self.directory, requested, end_user))

    def _parsed(self, scope: str, key: tuple, raw):
        cached = self._budgets.get(scope)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            budget = parse_budget(raw())
        except BudgetError as e:
            log.warn("budget of {scope} is invalid: {error}", scope=scope, error=str(e))
            raise ProxyError(503, "budget_unavailable", "budget enforcement unavailable for this caller") from None
        self._budgets[scope] = (key, budget)
        return budget

    def budget(self, context):
        sources = self._sources(context)
        cached = self._budgets.get(context.agent_id)
        if cached is not None:
            kept = cached[0]
            if (len(kept) == 4 and kept[0] is sources[0] and kept[1] is sources[1] and kept[2] is sources[2]
                    and kept[3] is sources[3]):
                return cached[1]
        raw = self.raw_budget(sources)
        key = sources
        try:
            budget = parse_budget(raw)
        except BudgetError as e:
            log.warn("agent {agent} has an invalid budget: {error}", agent=context.agent_id, error=str(e))
            raise ProxyError(503, "budget_unavailable", "budget enforcement unavailable for this agent") from None
        self._budgets[context.agent_id] = (key, budget)
        return budget

    def limits(self, context) -> RateLimits:
        """The rate limits of C{context}'s metadata (cached while the context is the same object)."""
        cached = self._limits.get(context.agent_id)
        if cached is not None and cached[0] is context:
            return cached[1]
        limits = self._read_limits(context)
        self._limits[context.agent_id] = (context, limits)
        return limits

    def _read_limits(self, context) -> RateLimits:
        raw = (context.metadata or {}).get("rate_limits")
        if not isinstance(raw, dict):
            return self._default_limits
        def number(name, default):
            value = raw.get(name)
            return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default
        return RateLimits(number("rpm", self._default_limits.rpm), number("tpm", self._default_limits.tpm))

    def models_for(self, context) -> list[str]:
        """What C{GET /v1/models} lists for C{context} (L{Router.models_for})."""
        return self.router.models_for(context, self.policy(context))

    # -- admission

    def admit(self, ex, context, doc: dict, route: Resolution | None = None) -> Admission:
        """
        Decide the model and admit the request, or raise the ProxyError to
        answer with.  Nothing is held when this raises.  A budget or rate
        refusal is audited as the reference names it (C{budget_exceeded},
        C{rate_limited}) before the error line.  (A Deferred of the
        admission when several instances share the store.)

        C{route}: where the request goes, decided by its caller instead of
        the resolution order (the passthrough: its provider and the model it
        names, if any, with C{ex.fixed_worst} its worst case; see
        L{Ceiling}).
        """
        try:
            admitted = self._admit(ex, context, doc, route)
        except ProxyError as error:
            self._audit_refusal(ex, error)
            raise
        if isinstance(admitted, defer.Deferred):

            def refused(failure: Failure) -> Failure:
                if isinstance(failure.value, ProxyError):
                    self._audit_refusal(ex, failure.value)
                return failure

            admitted.addErrback(refused)
        return admitted

    def _audit_refusal(self, ex, error: ProxyError) -> None:
        named = budget_audit.refusal_intervention(error)
        if named is not None:
            name, details = named
            self._intervention(ex, name, **details)

    def _evaluable(self, ex, scope: str, budget, tz) -> bool:
        """Whether a budget scope can be evaluated; when not, L{_budget_unavailable} decides."""
        problem = budget_audit.zone_problem(budget, tz)
        if problem is None:
            return True
        log.warn("budget of {scope} cannot be evaluated: {problem}", scope=scope, problem=problem)
        self._budget_unavailable(
            ex, scope, ProxyError(503, budget_audit.BUDGET_UNAVAILABLE, "budget enforcement unavailable for this agent"),
        )
        return False

    def _budget_unavailable(self, ex, scope: str | None, error: ProxyError) -> None:
        """
        A budget that cannot be evaluated: audited as
        C{budget_check_unavailable}; then, unless the fail mode is open,
        the request is refused with C{error} (503).
        """
        self._intervention(
            ex, budget_audit.BUDGET_CHECK_UNAVAILABLE,
            **budget_audit.unavailable(scope, error.message, self._budget_fail_open),
        )
        if not self._budget_fail_open:
            raise error

    def _admit(self, ex, context, doc: dict, resolved=None) -> Admission:
        requested = doc.get("model") if "model" in doc else None
        bare = BARE_REF_PROVIDER if ex.surface.name == ANTHROPIC_MESSAGES else None
        # The OR gate's agents get their tier's model, whatever they asked for.
        route = requested if resolved is not None else self._gate_route(ex, context, requested)
        decision = resolved or self.router.resolve(context, route, self.policy(context), bare, ex)
        if isinstance(decision, defer.Deferred):
            # The LLM resolver is asked what a name no rule knows means.
            return decision.addCallback(lambda found: self._admit(ex, context, doc, found))  # type: ignore[return-value]
        candidates = decision.candidates
        levels: list | None = None
        if getattr(context, "litellm", False):
            # A virtual key or the master key: LiteLLM's levels and words.
            requested_name = requested if isinstance(requested, str) else None
            end_user = end_user_of(doc)
            if hasattr(ex, "end_user"):
                ex.end_user = end_user
            organization_of = getattr(context, "organization_of", None)
            if organization_of is not None and hasattr(ex, "organization_id"):
                ex.organization_id = organization_of(self.directory)
            blocked = context.blocked_by(self.directory, end_user)
            if blocked is not None:
                raise litellm_errors.blocked(blocked)
            # A passthrough request that names no model has no model to check.
            named = bool(decision.ref.model)
            denial = context.model_denial(self.directory, decision.names, str(decision.ref), end_user) if named else None
            if denial is not None:
                raise litellm_errors.model_access_denied(denial, requested)
            levels = self.request_levels(context, requested_name, end_user)
            for level in levels:
                if level.denied:
                    raise litellm_errors.budget_exceeded(level.entity, 0.0, 0.0)
            allows = getattr(context, "allows_model", None)
            if allows is not None and not any(allows(n) for n in decision.names):
                # Allowed by the ref it resolved to: no failover beyond it.
                candidates = (decision.ref,)
        else:
            allows = getattr(context, "allows_model", None)
            if allows is not None:
                # A principal with a model list (names as sent, aliased or
                # resolved), and no failover beyond what a listed name means.
                by_name = any(allows(n) for n in decision.names)
                if not by_name and not allows(str(decision.ref)):
                    raise ProxyError(403, "model_not_allowed", f"this key may not use {str(requested)[:200]!r}")
                if getattr(context, "spending_denied", False):
                    raise ProxyError(429, "budget_exceeded", "this key has a budget of 0", error_type="budget_exceeded")
                if not by_name:
                    candidates = (decision.ref,)
        for step in decision.steps:
            self._intervention(ex, step.rule, requested_model=requested, **step.details)
        policy = self.policy(context)
        if policy is not None and len(candidates) == 1 and len(policy.refs) > 1:
            # The reference's warning: several models declared, yet no failover
            # reachable from this one (none is in a "fallback" slot).
            self._intervention(ex, FAILOVER_UNREACHABLE, chosen=str(candidates[0]),
                               declared=[str(ref) for ref in policy.refs])
        admission = Admission(agent=context.agent_id, candidates=candidates)
        if levels:
            admission.levels = {level.scope: level for level in levels}
        try:
            scopes = self.scopes(context, levels)
        except ProxyError as error:
            if error.code != budget_audit.BUDGET_UNAVAILABLE:
                raise
            self._budget_unavailable(ex, context.agent_id, error)
            scopes = []  # open: admitted without the budgets
        if scopes:
            scopes = [entry for entry in scopes if self._evaluable(ex, *entry)]
        self._check_ledger(ex, scopes)
        rates = self._rate_checks(context, levels)
        parallel = self._parallel_checks(levels) if levels else []
        if not (scopes or rates or parallel):
            # Nothing to hold or count: the body's shape and token estimate
            # are read only for a request something is decided on.
            return self._decide(ex, context, admission, scopes, _NO_SHAPE, rates, parallel)
        shape, admission.token_estimate = read_request_and_estimate(doc, ex.body_size, ex.surface.api_format)
        if self._coordinator is not None:
            return self._admit_shared(ex, context, admission, scopes, shape, rates, parallel)
        return self._decide(ex, context, admission, scopes, shape, rates, parallel)

    def _rate_checks(self, context, levels: list | None) -> list[tuple[str, RateLimits, str | None]]:
        """C{(rate scope, limits, LiteLLM's name of the level or None)} of every rate limit the request is under."""
        if levels is None:
            limits = self.limits(context)
            if limits.rpm is None and limits.tpm is None:
                return []
            return [(getattr(context, "rate_scope", context.agent_id), limits, None)]
        checks: list[tuple[str, RateLimits, str | None]] = []
        if getattr(context, "agent_budget", False):
            limits = self.limits(context)
            if limits.rpm is not None or limits.tpm is not None:
                checks.append((context.agent_id, limits, None))
        for level in levels:
            if level.rpm is not None or level.tpm is not None:
                checks.append((level.scope, RateLimits(level.rpm, level.tpm), level.entity))
        return checks

    @staticmethod
    def _parallel_checks(levels: list | None) -> list[tuple[str, int, str]]:
        """C{(parallel scope, limit, LiteLLM's name of the level)} of every C{max_parallel_requests}."""
        return [(PARALLEL_PREFIX + level.scope, level.parallel, level.entity)
                for level in levels or () if level.parallel is not None]

    def _decide(self, ex, context, admission: Admission, scopes: list, shape: RequestShape,
                rates: list | None = None, parallel: list | None = None) -> Admission:
        """Tiers, parallel and rate limits and reservations: the book's part of L{admit}."""
        if rates is None:
            rates = self._rate_checks(context, None)
        if scopes:
            scope, budget, tz = scopes[0]
            admission.budget_label = budget.label
            try:
                self._apply_tiers(ex, admission, scope, budget, tz)
            except ProxyError as error:
                if error.code != budget_audit.BUDGET_UNAVAILABLE:
                    raise
                self._budget_unavailable(ex, scope, error)
        if parallel:
            self._check_parallel(admission, parallel)
        try:
            self._check_rates(admission, rates, shape)
            # OpenRouter may answer with any model of the fallback list: each is held for.
            fixed = getattr(ex, "fixed_worst", None)
            worst = None
            if fixed is not None:
                # A passthrough request: its worst case is its caller's (no
                # output limit to lower in a body the proxy does not rewrite).
                worst = fixed.usd if scopes else None
            elif scopes:
                priced = admission.candidates + fallback_refs(admission)
                worst = self._worst_case(priced, shape)
                if worst is not None:
                    shape, worst = self._fit_output(admission, scopes, shape, worst, priced)
            for scope, budget, tz in scopes:
                try:
                    self._reserve(admission, scope, budget, tz, worst, shape)
                except ProxyError as error:
                    if error.code != budget_audit.BUDGET_UNAVAILABLE:
                        raise
                    self._budget_unavailable(ex, scope, error)
        except ProxyError:
            self._release_rate(admission)
            self._release_parallel(admission)
            for held in admission.reservations:
                self.book.release(held)
            admission.reservations = []
            raise
        admission.remaining_usd = self._remaining_usd(admission)
        for held in admission.reservations:
            if held.alert and held.alert_reason in budget_audit.REFUSALS:
                # soft_alert over its limit: the reference's refusal name, no refusal.
                self._intervention(ex, held.alert_reason, behavior=held.budget.behavior,
                                   window=held.budget.label, scope=held.agent)
        limit = admission.output_limit
        if limit is not None:
            thinking = {}
            if limit.thinking_budget is not None:
                thinking = {"from_thinking_budget": limit.from_thinking_budget, "to_thinking_budget": limit.thinking_budget}
            self._intervention(
                ex, "max_tokens_lowered", from_max_tokens=limit.from_max_tokens, to_max_tokens=limit.max_tokens,
                **thinking, remaining_usd=round(limit.available_usd, 10), reserved_usd=round(worst or 0.0, 10),
            )
        return admission

    def _admit_shared(self, ex, context, admission: Admission, scopes: list, shape: RequestShape,
                      rates: list, parallel: list):
        """
        L{_decide} under the scopes' locks in the shared store, with this
        instance's book and rate windows first brought up to date with what
        other instances did (L{cllama_tx.store.coordination}).  Returns a
        Deferred firing with the L{Admission}; fails with the ProxyError
        to answer with (503 C{store_unavailable} when the store is down).
        """
        budget_scopes = {scope: self._counts_since(scope) for scope, _budget, _tz in scopes}
        # Requests in flight elsewhere: the other instances' reservations of
        # the parallel scopes (which have no ledger rows).
        budget_scopes.update({scope: 0.0 for scope, _limit, _entity in parallel})
        rate_scopes = list(dict.fromkeys(scope for scope, _limits, _entity in rates))
        decided: list[Admission] = []

        def decide(syncs, rate_syncs):
            for sync in syncs:
                if sync.scope.startswith(PARALLEL_PREFIX):
                    self._parallel.set_foreign(sync.scope, sync.foreign_requests)
                    continue
                if sync.rows:
                    self.book.load(sync.scope, sync.rows)
                self.book.set_foreign(sync.scope, sync.foreign_usd, sync.foreign_requests)
            for rate in rate_syncs:
                for at, tokens in rate.events:
                    self._limiter.absorb(rate.scope, at, tokens)
            result = self._decide(ex, context, admission, scopes, shape, rates, parallel)
            decided.append(result)
            events = [(scope, at, result.token_estimate) for scope, at in result.rate_holds]
            held = [(held.agent, held.worst_case_usd) for held in result.reservations]
            held.extend((scope, 0.0) for scope in result.parallel_holds)
            return Decision(reservations=held, rate_events=events, result=result)

        def written(decision) -> Admission:
            result = decision.result
            result.shared_reservations = list(decision.reservation_ids)
            result.shared_rate_events = list(decision.rate_event_ids)
            return result

        def failed(failure):
            if failure.check(ProxyError):
                return failure
            # Decided here but not written there: give back what was held.
            for result in decided:
                self._release_rate(result)
                self._release_parallel(result)
                for held in result.reservations:
                    self.book.release(held)
                result.reservations = []
            if failure.check(DatabaseUnavailable):
                log.warn("shared store unavailable for an admission: {error}", error=failure.getErrorMessage())
            else:
                log.failure("shared admission failed", failure)
            refusal = ProxyError(
                503, "store_unavailable", "budget and rate limit enforcement is unavailable: the shared store "
                "cannot be reached", retry_after=LEDGER_RETRY_AFTER,
            )
            scope = scopes[0][0] if scopes else None
            self._budget_unavailable(ex, scope, refusal)
            # Open: decided by this instance alone, on what it knows.
            admission.output_limit = None
            return self._decide(ex, context, admission, scopes, shape, rates, parallel)

        work = self._coordinator.admit(budget_scopes, rate_scopes, decide).addCallbacks(written, failed)
        # The caller may be cancelled (its agent left) while the store works:
        # the work still ends, and what it held is then given back.
        out: defer.Deferred = defer.Deferred(lambda _: None)

        def deliver(result):
            if out.called:
                if isinstance(result, Admission):
                    self.abandon(ex, result)
                return None
            out.callback(result) if not isinstance(result, Failure) else out.errback(result)
            return None

        work.addBoth(deliver)
        return out

    def abandon(self, ex, admission: Admission) -> None:
        """Give back everything an admission held whose request will not go on."""
        self._release_rate(admission)
        self._release_parallel(admission)
        for held in admission.reservations:
            self.book.release(held)
        admission.reservations = []
        if self._coordinator is not None and (admission.shared_reservations or admission.shared_rate_events):
            self._coordinator.release(admission.shared_reservations, [])
            admission.shared_reservations = []

    def _counts_since(self, scope: str) -> float:
        """The time before which a scope's spend no longer counts (its last reset)."""
        reset = self._reset_at.get(scope, (self.runtime.get(scope) or {}).get("reset_at"))
        return float(reset) if isinstance(reset, (int, float)) else 0.0

    def _apply_tiers(self, ex, admission: Admission, scope: str, budget, tz) -> None:
        if not budget.tiers or budget.limit_usd is None:
            return  # no tier applies: BudgetBook.choose_model would keep the ref as it is
        chosen = admission.candidates[0]
        try:
            decision = self.book.choose_model(scope, budget, str(chosen), tz)
        except BudgetError as e:
            log.warn("budget check failed for {agent}: {error}", agent=admission.agent, error=str(e))
            raise ProxyError(503, "budget_unavailable", "budget enforcement unavailable for this agent") from None
        if isinstance(decision, Refusal):
            raise self._refused(admission, scope, decision, None)
        if getattr(ex, "fixed_worst", None) is not None:
            return  # a passthrough request goes to the model it names: a tier only refuses it
        if decision.ref is not None and decision.ref != str(chosen):
            try:
                ref = split_model_ref(decision.ref)
            except InvalidModelRef:
                log.warn("budget tier names an unroutable model {ref}", ref=decision.ref)
                return
            self._intervention(
                ex, "budget_tier_downgrade", from_model=str(chosen), to_model=decision.ref,
                remaining_fraction=decision.remaining_fraction,
            )
            # A downgrade never fails over to the dearer models it replaced.
            admission.candidates = (ref,)
        if decision.openrouter_models:
            admission.openrouter_models = [
                m.partition("/")[2] if m.lower().startswith("openrouter/") else m
                for m in decision.openrouter_models
            ]

    # -- the Execwall OR gate's agents (gate_policy.py)

    def _gate_route(self, ex, context, requested):
        """
        The ref a request of an OR gate agent is routed by: its current
        tier's first model, whatever it asked for (the gate ignores the
        request's model); C{requested} for everyone else.  An exhausted
        C{hard_cap} budget refuses here, with the gate's 402.
        """
        agent = context.agent_id
        if not self.is_gate_agent(agent) or getattr(context, "litellm", False):
            return requested
        try:
            budget = self.budget(context)
        except ProxyError:
            return requested  # the budget's own check refuses, or lets it go (the fail mode)
        if budget is None or not budget.tiers or budget.limit_usd is None:
            return requested
        try:
            decision = self.book.choose_model(agent, budget, "", context.timezone)
        except BudgetError as e:
            log.warn("budget check failed for {agent}: {error}", agent=agent, error=str(e))
            raise ProxyError(503, "budget_unavailable", "budget enforcement unavailable for this agent") from None
        if isinstance(decision, Refusal):
            raise self._gate_refusal(agent, decision) or budget_error(decision)
        ref = decision.ref
        if isinstance(requested, str) and requested.strip() and requested.strip() not in (ref, openrouter_id(ref or "")):
            self._intervention(ex, "requested_model_ignored", requested_model=requested[:200], to_model=ref)
        return ref

    def _gate_refusal(self, scope: str, refusal: Refusal) -> ProxyError | None:
        """
        The gate's 402 for an OR gate agent whose C{hard_cap} budget is
        spent (its detail as the gate writes it, beside the contract's
        C{budget}); None for any other refusal, which keeps ours.
        """
        if not self.is_gate_agent(scope) or refusal.code != BUDGET_EXCEEDED:
            return None
        budget = refusal.budget
        if budget.behavior != HARD_STOP or budget.limit_usd is None:
            return None
        if refusal.reported_cost_usd < budget.limit_usd - EPSILON_USD:
            return None  # room is left, this request does not fit it: ours (429)
        retry = refusal.retry_after_header
        return ProxyError(
            402, BUDGET_EXCEEDED, "budget exhausted",
            retry_after=int(retry) if retry is not None else None,
            extra={
                "detail": routing_info(scope, budget, refusal.reported_cost_usd, True),
                "budget": refusal_body(refusal)["budget"],
            },
            error_type=BUDGET_EXCEEDED,
        )

    def _check_ledger(self, ex, scopes: list) -> None:
        """503 when the ledger could not keep this request's row (docs/LEDGER.md)."""
        if self._ledger is None or not ex.surface.billable:
            return
        reason = self._ledger.admission_refusal(budgeted=bool(scopes))
        if reason is None:
            return
        refusal = ProxyError(503, "ledger_unavailable", reason, retry_after=LEDGER_RETRY_AFTER)
        if scopes and self._ledger.admission_refusal(budgeted=False) is None:
            # Only the budget is in the way: its spend could be counted in
            # memory only.  A fail mode of open lets the request go on.
            self._budget_unavailable(ex, scopes[0][0], refusal)
            return
        raise refusal

    def _check_rates(self, admission: Admission, checks: list, shape: RequestShape) -> None:
        """
        Count the request in every rate window it is under, or refuse it
        (the windows it was counted in keep the request, not its tokens:
        L{_release_rate}).
        """
        if not checks:
            return
        # Every candidate's output counts (n=8 asks for eight answers).
        tokens = admission.token_estimate + shape.choices * shape.output_tokens(0) + shape.prediction_bytes
        admission.token_estimate = tokens
        for scope, limits, entity in checks:
            verdict = self._limiter.admit(scope, limits.rpm, limits.tpm, tokens)
            if isinstance(verdict, RateAdmission):  # refused
                retry = max(1, int(-(-verdict.retry_after // 1)))
                if entity is not None:
                    reason = (
                        f"this request is larger than the tpm limit of {limits.tpm}" if verdict.never
                        else f"{verdict.reason} limit of {getattr(limits, verdict.reason or 'rpm')} reached"
                    )
                    raise litellm_errors.rate_limited(entity, reason, retry)
                message = (
                    "request too large for the agent's tokens-per-minute limit"
                    if verdict.never
                    else "request rate limit exceeded"
                )
                raise ProxyError(429, "rate_limited", message, retry_after=retry, error_type="rate_limited")
            admission.rate_holds.append((scope, verdict))

    def _release_rate(self, admission: Admission) -> None:
        for scope, at in admission.rate_holds:
            self._limiter.settle(scope, admission.token_estimate, 0, admitted_at=at)
        admission.rate_holds = []

    def _check_parallel(self, admission: Admission, checks: list) -> None:
        """Count the request in flight for every C{max_parallel_requests}, or refuse it."""
        for scope, limit, entity in checks:
            if limit <= 0 or not self._parallel.acquire(scope, limit):
                self._release_parallel(admission)
                raise litellm_errors.parallel_limited(entity, limit)
            admission.parallel_holds.append(scope)

    def _release_parallel(self, admission: Admission) -> None:
        for scope in admission.parallel_holds:
            self._parallel.release(scope)
        admission.parallel_holds = []

    def _worst_case(self, candidates, shape: RequestShape) -> float | None:
        """
        The worst case of the dearest candidate: everything the provider can
        bill for this request (L{worst_input_tokens}: text by its bytes,
        images, documents and tool use by the provider's rules; every
        candidate answer at its output limit), so a settled cost never
        exceeds what was held.  L{None} when no candidate is priced.
        """
        worst = None
        pricing = self.book.pricing
        for ref in candidates:
            cost = worst_case_cost(
                pricing,
                ref.provider,
                ref.model,
                worst_input_tokens(shape, ref.provider, ref.model),
                shape.max_tokens,
                choices=shape.choices,
                min_output_tokens=shape.thinking_budget or 0,
                extra_output_tokens=shape.prediction_bytes,
            )
            if cost is not None:
                worst = cost if worst is None else max(worst, cost)
        return worst

    def _fit_output(self, admission: Admission, scopes: list, shape: RequestShape, worst: float, priced=None):
        """
        Lower the request's output limit to what the tightest budget has
        left when a C{hard_stop} budget could not pay for it as sent even
        once the requests in flight are done (docs/BUDGETS.md, "Lowering
        max_tokens"); only in-flight requests in the way still get a 429
        and a retry in a second, for the whole answer.  Returns the shape
        and worst case to hold: lowered, or as they were.
        """
        if self._min_output_tokens <= 0:
            return shape, worst
        book = self.book
        if all(budget.behavior != HARD_STOP or book.surely_fits(scope, budget, worst) for scope, budget, _tz in scopes):
            return shape, worst  # every hard stop's settled room holds it: nothing to lower (below)
        rooms = []
        must = False
        for scope, budget, tz in scopes:
            if budget.behavior == SOFT_ALERT:
                continue
            room = self.book.headroom(scope, budget, tz)
            if room is None:
                continue
            rooms.append(room.now)
            must = must or (budget.behavior == HARD_STOP and worst > room.settled + EPSILON_USD)
        if not must:
            return shape, worst
        priced = admission.candidates if priced is None else priced
        limit = fit_output(self.book.pricing, priced, shape, min(rooms), self._min_output_tokens)
        if limit is None:
            return shape, worst
        lowered = limit.shape(shape)
        lowered_worst = self._worst_case(priced, lowered)
        if lowered_worst is None:
            return shape, worst
        admission.output_limit = limit
        return lowered, lowered_worst

    def _reserve(self, admission: Admission, scope: str, budget, tz, worst: float | None, shape: RequestShape) -> None:
        """Hold C{worst} (L{_worst_case}) against one budget scope."""
        try:
            held = self.book.reserve(scope, budget, worst, tz)
        except BudgetError as e:
            log.warn("budget check failed for {agent}: {error}", agent=admission.agent, error=str(e))
            raise ProxyError(503, "budget_unavailable", "budget enforcement unavailable for this agent") from None
        if isinstance(held, Refusal):
            if held.code == BUDGET_EXCEEDED and worst is not None:
                held = self._explain(admission, scope, budget, tz, held, shape, worst)
            raise self._refused(admission, scope, held, worst)
        admission.reservations.append(held)

    def _refused(self, admission: Admission, scope: str, refusal: Refusal, worst: float | None) -> ProxyError:
        """
        The error of a budget refusal: the contract's (an agent's scope), or
        LiteLLM's for a key's levels: C{budget_exceeded} when the spend
        leaves no room for the request, a 429 to retry shortly when only
        requests in flight hold the room.
        """
        gate = self._gate_refusal(scope, refusal)
        if gate is not None:
            return gate
        level = admission.levels.get(scope)
        if level is None or refusal.code != BUDGET_EXCEEDED:
            return budget_error(refusal)
        retry = refusal.retry_after_header
        extra = {"budget": refusal_body(refusal)["budget"]}
        limit = refusal.budget.limit_usd
        if limit is not None and refusal.reported_cost_usd + (worst or 0.0) <= limit + EPSILON_USD:
            return litellm_errors.held_in_flight(level.entity, int(retry) if retry else 1, extra)
        detail = None
        if refusal.input_cost_usd is not None and refusal.reported_cost_usd < (limit or 0.0):
            # What the contract's message says too: what is left, what the prompt alone costs.
            detail = (f"{_dollars(refusal.remaining_usd or 0.0)} left, this request's input alone costs about "
                      f"{_dollars(refusal.input_cost_usd)}")
        return litellm_errors.budget_exceeded(
            level.entity, refusal.reported_cost_usd, level.max_budget if level.max_budget is not None else limit,
            detail, int(retry) if retry else None, extra,
        )

    def _explain(self, admission: Admission, scope: str, budget, tz, refusal: Refusal, shape: RequestShape,
                 worst: float) -> Refusal:
        """
        A dollar refusal that says what is left and what the request's
        prompt alone costs, so the caller can tell a shorter prompt from
        waiting (the least it could be admitted at is C{worst}: its output
        already lowered to the floor when it could be).
        """
        room = self.book.headroom(scope, budget, tz)
        left = room.now if room is not None else 0.0
        costs = [
            worst_input_cost(self.book.pricing, ref.provider, ref.model, worst_input_tokens(shape, ref.provider, ref.model))
            for ref in admission.candidates
        ]
        prompt = max((c for c in costs if c is not None), default=0.0)
        return attrs.evolve(
            refusal,
            message=f"budget exceeded: {_dollars(left)} left, this request's input alone costs about {_dollars(prompt)}",
            remaining_usd=left,
            input_cost_usd=prompt,
            min_request_cost_usd=worst,
        )

    # -- the end of a request

    def finish(self, ex, row) -> None:
        """Settle the reservation and the rate window with what it cost."""
        admission = ex.admission
        if admission is None:
            return
        ex.admission = None
        # Token counting (count_tokens) is free and no inference: it never
        # counts against max_requests (the ledger keeps no row of it, so a
        # budget seeded after a restart would not count it either).
        success = 200 <= row.status < 300 and getattr(ex.surface, "billable", True)
        actual = row.prompt_tokens + row.output_tokens
        for scope, at in admission.rate_holds:
            self._limiter.settle(scope, admission.token_estimate, actual, admitted_at=at)
        if admission.parallel_holds:
            self._release_parallel(admission)
        if admission.shared_reservations or admission.shared_rate_events:
            actual = row.prompt_tokens + row.output_tokens
            ex.shared_release = (
                admission.shared_reservations, [(event, actual) for event in admission.shared_rate_events]
            )
        committed = None
        for held in admission.reservations:
            level = admission.levels.get(held.agent)
            soft = getattr(level, "soft_usd", None)
            before = self.book.usage(held.agent, held.budget, held.tz).cost_usd if soft is not None else 0.0
            # An OpenRouter model held at the ceiling counts at it when no cost came back.
            cost = row.cost_usd if row.priced else ceiling_cost(self.book.pricing, row)
            counts = None
            if success or row.cost_usd > 0 or cost:
                counts = self.book.settle_counting(held, cost, counted=success)
            else:
                self.book.release(held)
            if held.alert:
                self._intervention(ex, "budget_alert", reason=held.alert_reason, scope=held.agent)
            if soft is not None:
                after = self.book.usage(held.agent, held.budget, held.tz).cost_usd
                if before < soft <= after + EPSILON_USD:
                    # LiteLLM's soft_budget: an alert, never a refusal.
                    self._intervention(ex, "budget_alert", reason="soft_budget", scope=held.agent,
                                       soft_budget_usd=soft, spend_usd=round(after, 10))
            if type(counts) is not tuple:
                counts = None  # released, or settled against another budget: read again when needed
            if self._alerts is not None:
                counts = self._observe_alerts(held, counts)
            if held is admission.reservations[0] and counts is not None:
                committed = counts[0]
        if hasattr(ex, "budget_report"):
            ex.budget_report = self.report(admission, committed)

    def _observe_alerts(self, held, counts: tuple[float, int] | None) -> tuple[float, int]:
        """
        Tell the alerts what a settled request left spent; a whole usage
        report only when a threshold could be crossed (L{AlertNotifier.quiet}).
        C{counts}: the budget's C{(cost_usd, requests)} if just read; returns them.
        """
        cost, requests = counts if counts is not None else self.book.committed(held.agent, held.budget, held.tz)
        alerts = self._alerts
        quiet = getattr(alerts, "quiet", None)
        try:
            skip = quiet is not None and quiet(held.agent, budget_fraction(held.budget, cost, requests))
        except Exception:
            skip = False  # observe_usage says what is wrong
        if not skip:
            alerts.observe_usage(held.agent, held.budget, self.book.usage(held.agent, held.budget, held.tz))
        return cost, requests

    def report(self, admission: Admission, committed: float | None = None) -> BudgetReport:
        """
        What the caller is told of its budget now: what is left of the first
        one, the models it may get.  C{committed}: the first budget's settled
        spend when the caller just read it (L{BudgetBook.committed}).
        """
        held = admission.reservation
        remaining = None
        if held is not None and held.budget.limit_usd is not None:
            if committed is None:
                committed = self.book.committed_usd(held.agent, held.budget, held.tz)
            remaining = round(held.budget.limit_usd - committed, 10)
        elif admission.remaining_usd is not None:
            remaining = admission.remaining_usd
        if admission.openrouter_models:
            allowed = list(admission.openrouter_models)
        else:
            allowed = list(_ref_names(admission.candidates))
        return BudgetReport(admission.agent, remaining, allowed, self.is_gate_agent(admission.agent))

    @staticmethod
    def _remaining_usd(admission: Admission) -> float | None:
        """What the first budget with a dollar limit had left of its settled spend at admission (headers)."""
        for held in admission.reservations:
            if held.budget.limit_usd is not None:
                return round(held.budget.limit_usd - held.committed_usd, 10)
        return None

    def after_record(self, ex, committed) -> None:
        """
        Release a request's shared reservations once its row is in the
        store (before that, other instances must still count it).
        """
        pending = getattr(ex, "shared_release", None)
        if pending is None or self._coordinator is None:
            return
        ex.shared_release = None
        ids, rate_updates = pending
        coordinator = self._coordinator

        def release(result):
            coordinator.release(ids, rate_updates)
            return result

        if committed is None:
            release(None)
        else:
            committed.addBoth(release)


#: The names of a candidates tuple, kept per tuple (a kept policy decision or
#: resolution hands every request of a name the same tuple).
_ref_names: KeptByIdentity[tuple[ModelRef, ...], tuple[str, ...]] = KeptByIdentity(
    lambda candidates: tuple([str(ref) for ref in candidates])
)


def fallback_refs(admission: Admission) -> tuple[ModelRef, ...]:
    """The OpenRouter models of a C{models} + C{route: "fallback"} request beyond its candidates."""
    models = admission.openrouter_models
    if not models:
        return ()
    known = {str(ref) for ref in admission.candidates}
    return tuple(ModelRef("openrouter", m) for m in models if f"openrouter/{m}" not in known)


def _dollars(value: float) -> str:
    """$1.23; amounts under a cent with four decimals, so they do not read as nothing."""
    return f"${value:.4f}" if 0 < value < 0.01 else f"${value:.2f}"


def build_governance(*, clock, pricing, metering, governance_dir, policy_file, unpriced, default_rpm, default_tpm,
                     runtime_overrides=None, alerts=None, ledger=None, router=None,
                     min_output_tokens=DEFAULT_MIN_OUTPUT_TOKENS, coordinator=None, directory=None,
                     budget_fail_mode=budget_audit.DEFAULT_FAIL_MODE, openrouter_ceiling=AUTO):
    """The daemon's Governance, wired to metering (interventions, settlement)."""
    from cllama_tx.governance.budgets import BudgetBook

    governance = Governance(
        clock=clock,
        # Reservations hold an OpenRouter model the table does not price at the ceiling (ceiling.py).
        book=BudgetBook(clock, CeilingPricing(pricing, openrouter_ceiling), unpriced=unpriced),
        limiter=RateLimiter(clock),
        governance_dir=governance_dir,
        policy_file=policy_file,
        runtime_overrides=runtime_overrides,
        default_limits=RateLimits(default_rpm, default_tpm),
        intervention=metering.intervention,
        alerts=alerts,
        ledger=ledger,
        router=router,
        min_output_tokens=min_output_tokens,
        coordinator=coordinator,
        directory=directory,
        budget_fail_open=budget_fail_mode == budget_audit.FAIL_OPEN,
    )
    metering.on_settled.append(governance.finish)
    metering.on_recorded.append(governance.after_record)
    return governance
