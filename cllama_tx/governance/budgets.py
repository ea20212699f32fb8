"""
Budgets (CONTRACT section 6): parsing and layering of budget objects, and
L{BudgetBook}, which admits requests against them with reservations so that
concurrent requests cannot overshoot a limit.

Pure logic with an injected clock (anything with C{seconds()}); used on the
reactor thread only.  See C{docs/BUDGETS.md} for the operator's view.

The flow for one request::

    budget = parse_budget(layer_budgets(metadata, override, governance))
    choice = book.choose_model(agent, budget, ref, tz)        # tiers
    if isinstance(choice, Refusal): answer 429 (refusal_body, Retry-After)
    worst = book.worst_case(provider, model, input_tokens, max_tokens, choices=n)
    held = book.reserve(agent, budget, worst, tz)
    if isinstance(held, Refusal): answer held.status (refusal_body, Retry-After)
    if held.alert: audit intervention "budget_alert"
    ... upstream ...
    book.settle(held, cost_usd if priced else None)   # or book.release(held)

Admission
=========

C{committed} is the spend settled inside the window (plus a policy file's
C{spent_offset_usd}), C{reserved} the worst cases of the requests in flight.
A request of worst case C{w} fits when C{committed + reserved + w <=
limit_usd} and C{committed requests + in flight + 1 <= max_requests}.

 - C{rate_limit}: a request that does not fit is refused, 429
   C{rate_limited}; it is paced, not stopped: C{Retry-After} is the moment
   it would fit.
 - C{hard_stop}: the same, 429 C{budget_exceeded} (C{rate_limited} when only
   C{max_requests} is in the way, as the reference proxy answers), and in
   addition the budget B{trips} once it is exhausted (committed spend at the
   dollar limit, or committed requests at C{max_requests}): then every
   request is refused until the budget resets: the next calendar boundary,
   or, for a rolling window, the moment the newest spend counted at the trip
   has left the window.  Small requests do not trickle through meanwhile.
 - C{soft_alert}: never refuses; a reservation made while the budget is
   exhausted carries C{alert=True}.

C{Retry-After} says when the request could succeed, not the whole window:
when only requests in flight are in the way, L{BudgetBook.inflight_retry_after}
(they may finish or be released any moment); else, for a rolling window,
when enough of the oldest committed spend leaves; for a calendar period, the
next boundary.  L{None} when the request can never fit (its worst case alone
exceeds C{limit_usd}).
"""

from __future__ import annotations

import copy
import datetime
import heapq
import math
from collections.abc import Iterable
from typing import Any

import attrs

from cllama_tx.governance.periods import (
    EPSILON_USD,
    BudgetError,
    SpendTimeline,
    check_period,
    parse_window,
    period_bounds,
    quantum_for,
    resolve_timezone,
    retry_after,
    window_bounds,
)
from cllama_tx.governance.tiers import (
    ABOVE,
    TIERS_RULES,
    Tier,
    TierDecision,
    parse_tiers,
    tier_decision,
)

__all__ = [
    "BUDGET_ALERT",
    "BUDGET_EXCEEDED",
    "Budget",
    "BudgetBook",
    "BudgetError",
    "BudgetUsage",
    "Headroom",
    "RATE_LIMITED",
    "Refusal",
    "Reservation",
    "UNPRICED_MODEL",
    "affordable_max_tokens",
    "layer_budgets",
    "parse_budget",
    "refusal_body",
    "worst_case_cost",
    "worst_input_cost",
]

HARD_STOP = "hard_stop"
RATE_LIMIT = "rate_limit"
SOFT_ALERT = "soft_alert"
BEHAVIORS = (HARD_STOP, RATE_LIMIT, SOFT_ALERT)

BUDGET_EXCEEDED = "budget_exceeded"
RATE_LIMITED = "rate_limited"
UNPRICED_MODEL = "unpriced_model"
#: The intervention the proxy audits for a soft_alert reservation over the limit.
BUDGET_ALERT = "budget_alert"

MESSAGES = {
    BUDGET_EXCEEDED: "budget exceeded",
    RATE_LIMITED: "request rate limit exceeded",
    UNPRICED_MODEL: "model has no price, so this agent's dollar budget cannot cover it",
}
STATUS = {BUDGET_EXCEEDED: 429, RATE_LIMITED: 429, UNPRICED_MODEL: 403}

UNPRICED_REFUSE = "refuse"
UNPRICED_ALLOW = "allow"

#: Output tokens assumed for a priced model whose limit the table does not
#: know, when the request sets no max_tokens (the largest limit in the table).
FALLBACK_MAX_OUTPUT_TOKENS = 128_000

_BUDGET_KEYS = frozenset(
    {"limit_usd", "max_requests", "window", "period", "behavior", "tiers", "spent_offset_usd", "tiers_rule"}
)
_EXCLUSIVE = {"window": "period", "period": "window"}


# --------------------------------------------------------------------------
# The budget object


@attrs.frozen
class Budget:
    """
    A validated budget.  Exactly one of C{window} (rolling, as written, with
    C{window_seconds}) and C{period} (C{daily}, C{weekly}, C{monthly}) is
    set.  C{tiers} are sorted by threshold, highest first.
    C{spent_offset_usd} is spend made elsewhere, counted in the window or
    period current when the book first sees the value.  C{tiers_rule} is
    how thresholds compare (L{cllama_tx.governance.tiers}): C{"above"}, or
    C{"at_least"} as the Execwall OR gate compares them.
    """

    behavior: str = HARD_STOP
    limit_usd: float | None = None
    max_requests: int | None = None
    window: str | None = None
    window_seconds: float | None = None
    period: str | None = None
    tiers: tuple[Tier, ...] = ()
    spent_offset_usd: float = 0.0
    tiers_rule: str = ABOVE

    @property
    def label(self) -> str:
        """The C{window} of the 429 body: the window as written, or the period."""
        return self.window if self.window is not None else self.period  # type: ignore[return-value]

    @property
    def rolling(self) -> bool:
        return self.period is None


def _number(raw: dict, key: str, positive: bool) -> float | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BudgetError(f"'{key}' must be a number")
    if positive and value <= 0:
        raise BudgetError(f"'{key}' must be greater than 0")
    if not positive and value < 0:
        raise BudgetError(f"'{key}' must not be negative")
    return float(value)


def parse_budget(raw: dict | None, warnings: list[str] | None = None) -> Budget | None:
    """
    Validate a budget object (CONTRACT 6, plus C{period}, C{tiers} and
    C{spent_offset_usd}).

    Like the reference proxy: no object, or one with neither C{limit_usd}
    nor C{max_requests}, is no budget (L{None}); C{behavior} defaults to
    C{hard_stop}; keys it does not know are ignored (named in C{warnings}
    when a list is given; keys starting with C{_} are comments).

    @raise BudgetError: a value is malformed, C{window}/C{period} is missing
        or both are given, or C{tiers}/C{spent_offset_usd} come without
        C{limit_usd}.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise BudgetError("the budget must be a JSON object")
    if warnings is not None:
        for key in sorted(str(k) for k in raw if k not in _BUDGET_KEYS and not str(k).startswith("_")):
            warnings.append(f"unknown budget key {key!r} ignored")
    limit = _number(raw, "limit_usd", positive=True)
    max_requests = raw.get("max_requests")
    if max_requests is not None:
        if (
            isinstance(max_requests, bool)
            or not isinstance(max_requests, (int, float))
            or not math.isfinite(max_requests)
            or max_requests != int(max_requests)
        ):
            raise BudgetError("'max_requests' must be a whole number")
        max_requests = int(max_requests)
        if max_requests <= 0:
            raise BudgetError("'max_requests' must be greater than 0")
    offset = _number(raw, "spent_offset_usd", positive=False) or 0.0
    tiers = parse_tiers(raw.get("tiers"))
    rule = raw.get("tiers_rule")
    if rule is None or (isinstance(rule, str) and not rule.strip()):
        rule = ABOVE
    if not isinstance(rule, str) or rule.strip() not in TIERS_RULES:
        raise BudgetError(f"'tiers_rule' must be one of {', '.join(TIERS_RULES)}, not {rule!r}")
    if limit is None and max_requests is None:
        if tiers or offset:
            raise BudgetError("'tiers' and 'spent_offset_usd' need 'limit_usd'")
        return None
    if limit is None and (tiers or offset):
        raise BudgetError("'tiers' and 'spent_offset_usd' need 'limit_usd'")
    behavior = raw.get("behavior")
    if behavior is None or (isinstance(behavior, str) and not behavior.strip()):
        behavior = HARD_STOP
    if not isinstance(behavior, str) or behavior.strip() not in BEHAVIORS:
        raise BudgetError(f"'behavior' must be one of {', '.join(BEHAVIORS)}, not {behavior!r}")
    behavior = behavior.strip()
    window = raw.get("window")
    period = raw.get("period")
    if isinstance(window, str) and not window.strip():
        window = None
    if isinstance(period, str) and not period.strip():
        period = None
    if window is not None and period is not None:
        raise BudgetError("give either 'window' (rolling) or 'period' (calendar), not both")
    window_seconds = None
    if window is not None:
        window_seconds = parse_window(window)
        window = window.strip()
    elif period is not None:
        period = check_period(period)
    else:
        raise BudgetError("a budget needs a 'window' (e.g. \"24h\") or a 'period' (e.g. \"daily\")")
    return Budget(
        behavior=behavior,
        limit_usd=limit,
        max_requests=max_requests,
        window=window,
        window_seconds=window_seconds,
        period=period,
        tiers=tiers,
        spent_offset_usd=offset,
        tiers_rule=rule.strip(),
    )


def layer_budgets(
    metadata_budget: dict | None,
    override_file_budget: dict | None,
    governance_file_budget: dict | None,
    *,
    policy_file_budget: dict | None = None,
) -> dict | None:
    """
    The raw budget after layering, later layers winning B{key by key} (as
    the reference proxy merges): C{metadata.budget}, then
    C{<context>/budget-override.json}, then the operator policy file
    (C{CLLAMA_POLICY_FILE}), then C{CLAW_GOVERNANCE_DIR/<agent>/budget.json}.

    A key that is absent, L{None} or an empty string in a layer does not
    change the value below it.  C{window} and C{period} are alternatives:
    setting one drops the other from the layers below.  Lists (C{tiers})
    are replaced whole.  L{None} when every layer is L{None}.

    @raise BudgetError: a layer is not a JSON object.
    """
    layers = (metadata_budget, override_file_budget, policy_file_budget, governance_file_budget)
    if all(layer is None for layer in layers):
        return None
    merged: dict = {}
    for layer in layers:
        if layer is None:
            continue
        if not isinstance(layer, dict):
            raise BudgetError("a budget layer must be a JSON object")
        for key, value in layer.items():
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            other = _EXCLUSIVE.get(key)
            if other is not None:
                merged.pop(other, None)
            merged[key] = copy.deepcopy(value)
    return merged


# --------------------------------------------------------------------------
# Worst cases


def _rates(price: Any, input_tokens: int) -> tuple[float, float]:
    # The highest of input, cache read and cache write (no list: every request pays for this).
    input_rate = price.input
    cache_read = price.cache_read
    if cache_read is not None and cache_read > input_rate:
        input_rate = cache_read
    cache_write = price.cache_write
    if cache_write is not None and cache_write > input_rate:
        input_rate = cache_write
    output_rate = price.output
    rule = price.long_context
    if rule is not None and input_tokens > rule.threshold_input_tokens:
        input_rate *= rule.input_multiplier
        output_rate *= rule.output_multiplier
    return input_rate, output_rate


def _tokens(value: Any) -> int | None:
    if type(value) is int:
        return value if value > 0 else 0  # the common case, without the checks below
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return max(0, math.ceil(value))


def worst_case_cost(
    pricing: Any,
    provider: str,
    model: str,
    input_tokens: int,
    max_tokens: int | None,
    fallback_max_output: int = FALLBACK_MAX_OUTPUT_TOKENS,
    *,
    choices: int = 1,
    min_output_tokens: int = 0,
    extra_output_tokens: int = 0,
) -> float | None:
    """
    The most a request can cost: C{input_tokens} at the model's highest
    input-side rate (input, cache read or cache write) plus the output at
    the output rate, with the long-context multipliers when C{input_tokens}
    is over the threshold.  The output is C{choices} candidates of
    C{max_tokens} each (else the model's C{max_output_tokens}, else
    C{fallback_max_output}; at least C{min_output_tokens}, a thinking
    budget), plus C{extra_output_tokens} (a predicted output, billed as
    output when rejected).  L{None} when the model is unpriced.
    C{input_tokens} must not be an underestimate (see C{docs/BUDGETS.md}).
    """
    price = pricing.price(provider, model) if pricing is not None else None
    if price is None:
        return None
    # Whole positive counts (the usual request) skip _tokens' checks; the results are its.
    if type(input_tokens) is int and input_tokens > 0:
        tokens_in = input_tokens
    else:
        tokens_in = _tokens(input_tokens) or 0
    if max_tokens is None:
        out = None
    elif type(max_tokens) is int:
        out = max_tokens if max_tokens > 0 else 0
    else:
        out = _tokens(max_tokens)
    if not out:
        out = price.max_output_tokens or fallback_max_output
    if type(min_output_tokens) is not int or min_output_tokens > 0:
        out = max(out, _tokens(min_output_tokens) or 0)
    if type(choices) is not int or choices > 1:
        out *= max(1, _tokens(choices) or 1)
    if type(extra_output_tokens) is not int or extra_output_tokens > 0:
        out += _tokens(extra_output_tokens) or 0
    input_rate, output_rate = _rates(price, tokens_in)
    return (tokens_in * input_rate + out * output_rate) / 1_000_000


def affordable_max_tokens(
    pricing: Any,
    provider: str,
    model: str,
    input_tokens: int,
    available_usd: float,
    *,
    choices: int = 1,
    extra_output_tokens: int = 0,
) -> int | None:
    """
    The largest C{max_tokens} whose worst case (L{worst_case_cost} with the
    same C{choices} and C{extra_output_tokens}) fits in C{available_usd},
    capped at the model's output limit when known; 0 when not even the
    input fits; L{None} when the model is unpriced.  What a budget lowers
    C{max_tokens} to instead of refusing (C{docs/BUDGETS.md}).
    """
    price = pricing.price(provider, model) if pricing is not None else None
    if price is None:
        return None
    tokens_in = _tokens(input_tokens) or 0
    candidates = max(1, _tokens(choices) or 1)
    extra = _tokens(extra_output_tokens) or 0
    input_rate, output_rate = _rates(price, tokens_in)
    budget = available_usd * 1_000_000
    fixed = tokens_in * input_rate + extra * output_rate
    left = budget - fixed
    if left < 0:
        return 0
    cap = price.max_output_tokens
    if output_rate <= 0:
        return cap if cap is not None else FALLBACK_MAX_OUTPUT_TOKENS
    tokens = math.floor(left / (output_rate * candidates))
    while tokens > 0 and fixed + tokens * candidates * output_rate > budget:
        tokens -= 1  # float rounding
    return min(tokens, cap) if cap is not None else tokens


def worst_input_cost(pricing: Any, provider: str, model: str, input_tokens: int) -> float | None:
    """
    What C{input_tokens} of prompt can cost at the model's highest
    input-side rate (the input part of L{worst_case_cost}); L{None} when
    the model is unpriced.
    """
    price = pricing.price(provider, model) if pricing is not None else None
    if price is None:
        return None
    tokens_in = _tokens(input_tokens) or 0
    input_rate, _ = _rates(price, tokens_in)
    return tokens_in * input_rate / 1_000_000


# --------------------------------------------------------------------------
# Results


@attrs.frozen
class Headroom:
    """
    Dollars a budget can still hold (L{BudgetBook.headroom}), never below 0:
    C{settled} counts only the settled spend, C{now} also the requests in
    flight.  A request whose worst case fits C{settled} but not C{now}
    will fit once those finish.
    """

    settled: float
    now: float


@attrs.frozen
class BudgetUsage:
    """What counts against a budget right now (L{BudgetBook.usage})."""

    cost_usd: float
    requests: int
    unknown_cost_requests: int
    reserved_usd: float
    reserved_requests: int
    remaining_fraction: float | None
    start: float
    # None for a lifetime budget: it never ends.
    end: float | None


OPEN = "open"
SETTLED = "settled"
RELEASED = "released"


@attrs.define(eq=False)
class Reservation:
    """
    Room held for one admitted request until L{BudgetBook.settle} or
    L{BudgetBook.release}.  C{alert} is true for a C{soft_alert} budget that
    is exhausted (C{alert_reason} C{budget_exceeded} or C{rate_limited});
    C{unpriced} when the model had no price (held at 0 dollars).
    """

    agent: str
    budget: Budget
    worst_case_usd: float
    unpriced: bool
    tz: datetime.tzinfo
    created: float
    alert: bool = False
    alert_reason: str | None = None
    state: str = OPEN
    actual_cost_usd: float | None = None
    # The settled spend (and offset) counted when it was admitted.
    committed_usd: float = 0.0
    # The book's per-agent state it was taken from (forget() starts a new one).
    owner: Any = attrs.field(default=None, repr=False)

    @property
    def open(self) -> bool:
        return self.state == OPEN


@attrs.frozen
class Refusal:
    """
    A refused request: answer C{status} with L{refusal_body} and, when
    C{retry_after} is not L{None}, C{Retry-After: retry_after_header}.
    C{requests}, C{reported_cost_usd} and C{unknown_cost_requests} are the
    committed usage in the window.
    """

    status: int
    code: str
    message: str
    budget: Budget
    retry_after: float | None
    requests: int
    reported_cost_usd: float
    unknown_cost_requests: int
    # Set by the proxy for a dollar refusal of a priced request: what is
    # left now, what the request's prompt alone can cost, and the least the
    # request could be admitted at (its output lowered to the floor).
    remaining_usd: float | None = None
    input_cost_usd: float | None = None
    min_request_cost_usd: float | None = None

    @property
    def retry_after_header(self) -> str | None:
        """Whole seconds, rounded up, at least 1; L{None} without a retry time."""
        if self.retry_after is None:
            return None
        return str(max(1, math.ceil(self.retry_after - 1e-6)))


def refusal_body(refusal: Refusal) -> dict:
    """
    The contract's 429 body (also used, same shape, for the 403
    C{unpriced_model}): C{{"error": {"message", "type", "code"}, "budget":
    {"behavior", "window", "requests", "reported_cost_usd",
    "unknown_cost_requests", "limit_usd"?, "max_requests"?, "remaining_usd"?,
    "input_cost_usd"?, "min_request_cost_usd"?}}}.
    """
    budget = refusal.budget
    summary: dict[str, Any] = {
        "behavior": budget.behavior,
        "window": budget.label,
        "requests": refusal.requests,
        "reported_cost_usd": refusal.reported_cost_usd,
        "unknown_cost_requests": refusal.unknown_cost_requests,
    }
    if budget.limit_usd is not None:
        summary["limit_usd"] = budget.limit_usd
    if budget.max_requests is not None:
        summary["max_requests"] = budget.max_requests
    for name in ("remaining_usd", "input_cost_usd", "min_request_cost_usd"):
        value = getattr(refusal, name)
        if value is not None:
            summary[name] = round(value, 10)
    return {
        "error": {"message": refusal.message, "type": refusal.code, "code": refusal.code},
        "budget": summary,
    }


# --------------------------------------------------------------------------
# The book


def _zone_for(budget: Budget, tz: Any) -> datetime.tzinfo:
    """The agent's timezone, resolved only when the budget has a calendar period."""
    if budget.period is None:
        return datetime.timezone.utc
    return resolve_timezone(tz)


@attrs.define
class _Trip:
    budget: Budget
    until: float
    code: str


class _AgentState:
    __slots__ = (
        "timeline", "own_usd", "own_requests", "foreign_usd", "foreign_requests", "offset", "anchor", "trip",
        "budget", "tz",
    )

    def __init__(self) -> None:
        self.timeline = SpendTimeline()
        # Held by this process's requests in flight ...
        self.own_usd = 0.0
        self.own_requests = 0
        # ... and by other instances' (shared store; see set_foreign).
        self.foreign_usd = 0.0
        self.foreign_requests = 0
        self.offset = 0.0
        self.anchor = 0.0
        self.trip: _Trip | None = None
        self.budget: Budget | None = None
        self.tz: datetime.tzinfo | None = None

    @property
    def reserved_usd(self) -> float:
        return self.own_usd + self.foreign_usd

    @property
    def reserved_requests(self) -> int:
        return self.own_requests + self.foreign_requests


class BudgetBook:
    """
    Committed spend and reservations per agent; see the module docstring.

    @param clock: anything with C{seconds()} (the reactor, or a
        L{twisted.internet.task.Clock}).
    @param pricing: an C{IPricing} for L{worst_case} (may be L{None}).
    @param unpriced: what a request for an unpriced model gets under a
        budget with C{limit_usd}: C{"refuse"} (403 C{unpriced_model};
        C{soft_alert} budgets never refuse) or C{"allow"} (admitted, held at
        0 dollars, counted as a request of unknown cost).
    @param inflight_retry_after: the C{Retry-After} when only requests in
        flight are in the way.
    """

    def __init__(
        self,
        clock: Any,
        pricing: Any = None,
        unpriced: str = UNPRICED_REFUSE,
        inflight_retry_after: float = 1.0,
    ) -> None:
        if unpriced not in (UNPRICED_REFUSE, UNPRICED_ALLOW):
            raise ValueError(f"unpriced must be {UNPRICED_REFUSE!r} or {UNPRICED_ALLOW!r}, not {unpriced!r}")
        self._clock = clock
        self._pricing = pricing
        self.unpriced = unpriced
        self.inflight_retry_after = inflight_retry_after
        self._states: dict[str, _AgentState] = {}

    # -- seeding

    def load(self, agent: str, rows: Iterable[tuple], replace: bool = False) -> None:
        """
        Seed committed spend (at start, from the ledger): C{rows} of C{(ts,
        cost_usd, counted)} or C{(ts, cost_usd, counted, priced)}, in any
        order; C{counted} says whether the row counts as a request,
        C{priced=False} makes it a request of unknown cost.  Rows too old
        for the agent's window are dropped at the next use.
        C{replace=True} forgets the committed spend first (reservations in
        flight stay).
        """
        state = self._state(agent)
        if replace:
            state.timeline.clear()
            state.trip = None
        converted = []
        for row in rows:
            ts, cost, counted = float(row[0]), float(row[1] or 0.0), bool(row[2])
            priced = bool(row[3]) if len(row) > 3 else True
            if not math.isfinite(ts) or not math.isfinite(cost):
                continue
            converted.append((ts, max(0.0, cost), int(counted), int(counted and not priced)))
        state.timeline.load(converted)

    def load_counts(self, agent: str, entries: Iterable[tuple]) -> None:
        """
        Seed from the ledger's aggregated timeline: C{(ts, cost_usd,
        requests, unknown_cost_requests)} per bucket (a minute, or a rolled-up
        day), so a month of traffic is thousands of entries, not millions.
        """
        converted = [
            (float(ts), max(0.0, float(cost or 0.0)), int(requests), int(unknown))
            for ts, cost, requests, unknown in entries
            if math.isfinite(float(ts)) and math.isfinite(float(cost or 0.0))
        ]
        self._state(agent).timeline.load(converted)

    def set_foreign(self, agent: str, reserved_usd: float, reserved_requests: int) -> None:
        """
        What other instances sharing the store hold for C{agent} right now
        (read under the scope's lock, L{cllama_tx.store.coordination}):
        counted like this process's own reservations.
        """
        state = self._state(agent)
        state.foreign_usd = max(0.0, float(reserved_usd))
        state.foreign_requests = max(0, int(reserved_requests))

    def forget(self, agent: str) -> None:
        """Drop everything known about C{agent} (its reservations become no-ops)."""
        self._states.pop(agent, None)

    # -- reads

    def worst_case(
        self, provider: str, model: str, input_tokens: int, max_tokens: int | None, **output: int
    ) -> float | None:
        """L{worst_case_cost} with the book's pricing (C{output}: its keyword arguments)."""
        return worst_case_cost(self._pricing, provider, model, input_tokens, max_tokens, **output)

    def usage(self, agent: str, budget: Budget, tz: Any = None) -> BudgetUsage:
        """What counts against C{budget} for C{agent} now."""
        now = self._clock.seconds()
        zone = _zone_for(budget, tz)
        state = self._state(agent)
        self._prepare(state, budget, now, zone)
        cost, requests, unknown = self._committed(state, budget, now, zone)
        start, end = window_bounds(budget, now, zone)
        return BudgetUsage(
            cost_usd=round(cost, 10),
            requests=requests,
            unknown_cost_requests=unknown,
            reserved_usd=round(state.reserved_usd, 10),
            reserved_requests=state.reserved_requests,
            remaining_fraction=self._remaining(state, budget, cost),
            start=start,
            end=end if math.isfinite(end) else None,
        )

    def headroom(self, agent: str, budget: Budget, tz: Any = None) -> Headroom | None:
        """
        What C{budget} can still hold for C{agent} (nothing while a
        C{hard_stop} budget is stopped); L{None} without C{limit_usd}.
        """
        if budget.limit_usd is None:
            return None
        now = self._clock.seconds()
        zone = _zone_for(budget, tz)
        state = self._state(agent)
        self._prepare(state, budget, now, zone)
        trip = state.trip
        if budget.behavior == HARD_STOP and trip is not None and trip.budget == budget and now < trip.until:
            return Headroom(settled=0.0, now=0.0)  # stopped until it resets
        cost, _, _ = self._committed(state, budget, now, zone)
        settled = max(0.0, budget.limit_usd - cost)
        return Headroom(settled=settled, now=max(0.0, settled - state.reserved_usd))

    def surely_fits(self, agent: str, budget: Budget, worst_usd: float) -> bool:
        """
        Whether C{worst_usd} fits what C{budget} has left of its settled
        spend (L{headroom}'s C{settled}) whatever the window drops now: no
        stop in force, and the limit is above everything the timeline holds
        plus the offset.  Without a pass over the window; False means only
        "ask L{headroom}".
        """
        limit = budget.limit_usd
        if limit is None:
            return False
        state = self._states.get(agent)
        if state is None:
            return worst_usd <= limit - max(0.0, budget.spent_offset_usd or 0.0)
        if state.trip is not None:
            return False
        held = max(0.0, state.timeline.cost) + max(0.0, state.offset, budget.spent_offset_usd or 0.0)
        return worst_usd <= limit - held

    def committed_usd(self, agent: str, budget: Budget, tz: Any = None) -> float:
        """C{usage(...).cost_usd} alone: the settled spend counted now (what a caller is told is left)."""
        return self.committed(agent, budget, tz)[0]

    def committed(self, agent: str, budget: Budget, tz: Any = None) -> tuple[float, int]:
        """
        C{(usage(...).cost_usd, usage(...).requests)}: the settled spend and
        requests counted now, for the remaining-budget header and the alerts'
        fraction of one settled request, without a whole usage report.
        """
        now = self._clock.seconds()
        zone = _zone_for(budget, tz)
        state = self._state(agent)
        self._prepare(state, budget, now, zone)
        cost, requests, _ = self._committed(state, budget, now, zone)
        return round(cost, 10), requests

    @property
    def pricing(self) -> Any:
        """The price table worst cases are computed with."""
        return self._pricing

    def remaining_fraction(self, agent: str, budget: Budget, tz: Any = None) -> float | None:
        """C{1 - (committed + reserved) / limit_usd} in C{[0, 1]}; L{None} without C{limit_usd}."""
        return self.usage(agent, budget, tz).remaining_fraction

    # -- decisions

    def choose_model(
        self, agent: str, budget: Budget, requested_ref: str, tz: Any = None
    ) -> TierDecision | Refusal:
        """
        The tier decision (L{tier_decision}) for C{requested_ref} at the
        agent's current remaining fraction, or a L{Refusal} when no tier
        applies to a C{hard_stop}/C{rate_limit} budget (or a C{hard_stop}
        budget is tripped).  Without tiers: the ref unchanged.
        """
        if not budget.tiers or budget.limit_usd is None:
            return TierDecision(requested_ref)
        now = self._clock.seconds()
        zone = _zone_for(budget, tz)
        state = self._state(agent)
        self._prepare(state, budget, now, zone)
        cost, requests, _ = self._committed(state, budget, now, zone)
        stopped = self._check_trip(state, budget, now, zone, cost, requests)
        if stopped is not None:
            return stopped
        decision = tier_decision(budget, self._remaining(state, budget, cost), requested_ref)
        if not decision.refused:
            return decision
        allowed = budget.limit_usd * (1 - budget.tiers[-1].threshold)
        if cost < allowed - EPSILON_USD:
            retry: float | None = self.inflight_retry_after
        else:
            retry = retry_after(
                budget,
                self._spend(state, budget, now, zone),
                now,
                zone,
                free_usd=cost - allowed + 2 * EPSILON_USD,
            )
        code = RATE_LIMITED if budget.behavior == RATE_LIMIT else BUDGET_EXCEEDED
        return self._refusal(state, budget, now, zone, code, retry)

    def reserve(
        self, agent: str, budget: Budget, worst_case_cost: float | None, tz: Any = None
    ) -> Reservation | Refusal:
        """
        Admit a request whose cost is at most C{worst_case_cost} (L{None}:
        the model is unpriced) and hold that much until it is settled or
        released, or refuse it (see the module docstring).  C{tz} is the
        agent's timezone (IANA name, tzinfo or L{None} for UTC), used only
        by calendar periods.

        @raise BudgetError: C{tz} is not a known timezone and the budget has
            a calendar period (validate it beforehand with
            L{resolve_timezone}).
        """
        now = self._clock.seconds()
        zone = _zone_for(budget, tz)
        state = self._state(agent)
        self._prepare(state, budget, now, zone)
        cost, requests, _ = self._committed(state, budget, now, zone)
        unpriced = worst_case_cost is None
        if (
            unpriced
            and budget.limit_usd is not None
            and self.unpriced == UNPRICED_REFUSE
            and budget.behavior != SOFT_ALERT
        ):
            return self._refusal(state, budget, now, zone, UNPRICED_MODEL, None)
        worst = 0.0 if unpriced else float(worst_case_cost)  # type: ignore[arg-type]
        if not math.isfinite(worst) or worst < 0:
            raise ValueError(f"worst_case_cost must be a non-negative number, not {worst_case_cost!r}")
        if budget.behavior == SOFT_ALERT:
            reason = self._exhausted(budget, cost, requests)
            held = self._hold(agent, state, budget, zone, now, worst, unpriced, reason)
            held.committed_usd = cost
            return held
        stopped = self._check_trip(state, budget, now, zone, cost, requests)
        if stopped is not None:
            return stopped
        limit = budget.limit_usd
        max_requests = budget.max_requests
        usd_blocked = limit is not None and cost + state.reserved_usd + worst > limit + EPSILON_USD
        requests_blocked = (
            max_requests is not None and requests + state.reserved_requests + 1 > max_requests
        )
        if not usd_blocked and not requests_blocked:
            held = self._hold(agent, state, budget, zone, now, worst, unpriced, None)
            held.committed_usd = cost
            return held
        retries: list[float | None] = []
        spend = self._spend(state, budget, now, zone)
        if usd_blocked:
            assert limit is not None
            if cost + worst <= limit + EPSILON_USD:
                retries.append(self.inflight_retry_after)
            else:
                retries.append(retry_after(budget, spend, now, zone, free_usd=cost + worst - limit))
        if requests_blocked:
            assert max_requests is not None
            if requests + 1 <= max_requests:
                retries.append(self.inflight_retry_after)
            else:
                retries.append(
                    retry_after(budget, spend, now, zone, free_requests=requests + 1 - max_requests)
                )
        retry = None if None in retries else max(retries)  # type: ignore[type-var]
        if budget.behavior == RATE_LIMIT or not usd_blocked:
            code = RATE_LIMITED
        else:
            code = BUDGET_EXCEEDED
        return self._refusal(state, budget, now, zone, code, retry)

    def settle(self, reservation: Reservation, actual_cost: float | None, counted: bool = True) -> bool:
        """
        Replace C{reservation} by the request's actual cost (L{None}:
        unknown, counted as an unknown-cost request), recorded now.  False
        (and nothing changes) when it was already settled or released.
        """
        return self.settle_counting(reservation, actual_cost, counted) is not False

    def settle_counting(
        self, reservation: Reservation, actual_cost: float | None, counted: bool = True
    ) -> tuple[float, int] | bool:
        """
        L{settle}, telling what the agent's budget counts once this request
        is in: L{committed}'s C{(cost_usd, requests)} from the same pass over
        the window (the remaining-budget header and the alerts need it).
        True when settled for a forgotten agent, False when not settled.
        """
        if not reservation.open:
            return False
        reservation.state = SETTLED
        state = self._owner(reservation)
        if state is None:
            return True  # forgotten agent
        self._unhold(state, reservation)
        cost = 0.0
        if actual_cost is not None:
            cost = float(actual_cost)
            if not math.isfinite(cost) or cost < 0:
                cost = 0.0
            reservation.actual_cost_usd = cost
        now = self._clock.seconds()
        budget = state.budget or reservation.budget
        zone = state.tz or reservation.tz
        self._prepare(state, budget, now, zone)
        state.timeline.add(
            now, cost, 1 if counted else 0, 1 if counted and actual_cost is None else 0
        )
        if budget is not reservation.budget or (budget.period is not None and zone is not reservation.tz):
            return True  # counted against another budget or zone than the request's: ask committed()
        spent, requests, _ = self._committed(state, budget, now, zone)
        return round(spent, 10), requests

    def release(self, reservation: Reservation, counted: bool = False) -> bool:
        """
        Give back C{reservation} without cost (upstream failure, client gone
        before any usage).  C{counted=True} still counts it as a request.
        False when it was already settled or released.
        """
        if not reservation.open:
            return False
        reservation.state = RELEASED
        state = self._owner(reservation)
        if state is None:
            return True
        self._unhold(state, reservation)
        if counted:
            state.timeline.add(self._clock.seconds(), 0.0, 1, 0)
        return True

    # -- internals

    def _state(self, agent: str) -> _AgentState:
        state = self._states.get(agent)
        if state is None:
            state = self._states[agent] = _AgentState()
        return state

    def _owner(self, reservation: Reservation) -> _AgentState | None:
        state = self._states.get(reservation.agent)
        return state if state is not None and state is reservation.owner else None

    def _prepare(self, state: _AgentState, budget: Budget, now: float, zone: datetime.tzinfo) -> None:
        if state.budget is not budget:
            # The bucket size follows the budget (a request is prepared four
            # times: worked out once per budget, not each time).
            state.budget = budget
            state.timeline.set_quantum(quantum_for(budget))
        state.tz = zone
        if budget.spent_offset_usd != state.offset:
            state.offset = budget.spent_offset_usd
            state.anchor = now
        state.timeline.prune(budget, now, zone)

    def _offset_counts(self, state: _AgentState, budget: Budget, now: float, zone: datetime.tzinfo) -> bool:
        if state.offset <= 0:
            return False
        if budget.period is not None:
            start, _ = period_bounds(budget.period, now, zone)
            return state.anchor >= start
        return now < state.anchor + budget.window_seconds  # type: ignore[operator]

    def _committed(
        self, state: _AgentState, budget: Budget, now: float, zone: datetime.tzinfo
    ) -> tuple[float, int, int]:
        timeline = state.timeline
        cost = max(0.0, timeline.cost)
        if self._offset_counts(state, budget, now, zone):
            cost += state.offset
        return cost, timeline.requests, timeline.unknown

    def _spend(self, state: _AgentState, budget: Budget, now: float, zone: datetime.tzinfo) -> list:
        spend = state.timeline.leaving()
        if self._offset_counts(state, budget, now, zone):
            return list(heapq.merge(spend, [(state.anchor, state.offset, 0)], key=lambda e: e[0]))
        return list(spend)

    def _remaining(self, state: _AgentState, budget: Budget, cost: float) -> float | None:
        if budget.limit_usd is None:
            return None
        fraction = 1 - (cost + state.reserved_usd) / budget.limit_usd
        return min(1.0, max(0.0, fraction))

    @staticmethod
    def _exhausted(budget: Budget, cost: float, requests: int) -> str | None:
        if budget.limit_usd is not None and cost >= budget.limit_usd - EPSILON_USD:
            return BUDGET_EXCEEDED
        if budget.max_requests is not None and requests >= budget.max_requests:
            return RATE_LIMITED
        return None

    def _check_trip(
        self,
        state: _AgentState,
        budget: Budget,
        now: float,
        zone: datetime.tzinfo,
        cost: float,
        requests: int,
    ) -> Refusal | None:
        """A hard_stop budget that is tripped, or exhausted now, refuses."""
        if budget.behavior != HARD_STOP:
            return None
        trip = state.trip
        if trip is not None and trip.budget == budget and now < trip.until:
            return self._refusal(state, budget, now, zone, trip.code, trip.until - now)
        state.trip = None
        code = self._exhausted(budget, cost, requests)
        if code is None:
            return None
        if budget.period is not None:
            _, until = period_bounds(budget.period, now, zone)
        else:
            until = now
            for ts, spent, counted in self._spend(state, budget, now, zone):
                if (code == BUDGET_EXCEEDED and spent > 0) or (code == RATE_LIMITED and counted > 0):
                    until = max(until, ts + budget.window_seconds)
        if until <= now:
            return None
        state.trip = _Trip(budget, until, code)
        return self._refusal(state, budget, now, zone, code, until - now)

    def _hold(
        self,
        agent: str,
        state: _AgentState,
        budget: Budget,
        zone: datetime.tzinfo,
        now: float,
        worst: float,
        unpriced: bool,
        alert_reason: str | None,
    ) -> Reservation:
        state.own_usd += worst
        state.own_requests += 1
        return Reservation(
            agent=agent,
            budget=budget,
            worst_case_usd=worst,
            unpriced=unpriced,
            tz=zone,
            created=now,
            alert=alert_reason is not None,
            alert_reason=alert_reason,
            owner=state,
        )

    @staticmethod
    def _unhold(state: _AgentState, reservation: Reservation) -> None:
        state.own_requests -= 1
        state.own_usd -= reservation.worst_case_usd
        if state.own_requests <= 0:
            state.own_requests = 0
            state.own_usd = 0.0

    def _refusal(
        self,
        state: _AgentState,
        budget: Budget,
        now: float,
        zone: datetime.tzinfo,
        code: str,
        retry: float | None,
    ) -> Refusal:
        cost, requests, unknown = self._committed(state, budget, now, zone)
        if retry is not None and not math.isfinite(retry):
            retry = None  # a lifetime budget: no time to announce
        return Refusal(
            status=STATUS[code],
            code=code,
            message=MESSAGES[code],
            budget=budget,
            retry_after=retry,
            requests=requests,
            reported_cost_usd=round(cost, 10),
            unknown_cost_requests=unknown,
        )
