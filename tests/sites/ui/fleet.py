"""
A realistic fleet for the UI's screenshots and browser tests: several
agents with budgets and tiers, a month of ledger history, an unpriced
model, a dead provider key, virtual keys.
"""

from __future__ import annotations

import math

from twisted.internet import defer, reactor

from cllama_tx.providers.keys import classify_failure
from tests.support import SECRET, write_agent

DAY = 86400.0

AGENTS = {
    "atlas": {"budget": {"limit_usd": 60, "period": "monthly", "behavior": "hard_stop", "tiers": [
        {"threshold": 0.5, "models": ["openai/gpt-4.1", "openai/gpt-4.1-mini"], "name": "full"},
        {"threshold": 0.2, "models": ["openai/gpt-4.1-mini"], "name": "economy"},
        {"threshold": 0.0, "models": ["openai/gpt-4.1-nano"], "name": "survival"},
    ]}, "service": "research", "type": "openclaw"},
    "beacon": {"budget": {"limit_usd": 4, "window": "24h", "behavior": "hard_stop"}, "service": "support-bot", "type": "openclaw"},
    "cedar": {"service": "batch-summaries", "type": "nanoclaw"},
    "delta": {"budget": {"max_requests": 400, "period": "daily", "behavior": "rate_limit"}, "service": "triage", "type": "openclaw"},
}

# (agent, model, provider, base cost per request, requests per day, priced)
TRAFFIC = [
    ("atlas", "gpt-4.1", "openai", 0.031, 22, True),
    ("atlas", "gpt-4.1-mini", "openai", 0.0042, 60, True),
    ("beacon", "claude-sonnet-4-5", "anthropic", 0.018, 9, True),
    ("cedar", "gpt-4.1-nano", "openai", 0.0009, 120, True),
    ("cedar", "acme-summarizer-7b", "openai", 0.0, 25, False),
    ("delta", "gpt-4.1-mini", "openai", 0.0035, 35, True),
]


def write_fleet(context_root: str) -> None:
    for agent, spec in AGENTS.items():
        meta = {"service": spec["service"], "type": spec["type"]}
        if "budget" in spec:
            meta["budget"] = spec["budget"]
        write_agent(context_root, agent, SECRET, **meta)


@defer.inlineCallbacks
def seed_fleet(harness, days: int = 30):
    """Write the fleet's contexts and a month of history; fires when committed."""
    h = harness.h
    write_fleet(h.context_root)
    h.contexts.reload()
    now = reactor.seconds()
    today_start = now - (now % DAY)
    pending = []
    timeline = []
    for offset in range(days, -1, -1):
        day_start = today_start - offset * DAY
        # Weekly rhythm plus growth, deterministic.
        wave = 0.65 + 0.35 * math.sin(offset / 2.2) + (days - offset) / (days * 1.6)
        for agent, model, provider, cost, per_day, priced in TRAFFIC:
            n = max(1, int(per_day * wave / 6))  # a sixth: enough to draw, quick to write
            for i in range(n):
                ts = day_start + (i + 1) * (min(DAY, now - day_start if offset == 0 else DAY) / (n + 1))
                if ts >= now:
                    continue
                row_cost = cost * 6 * (0.8 + 0.4 * ((i * 7 + offset) % 5) / 4)
                failed = (i + offset) % 29 == 0
                pending.append(
                    harness.record(
                        agent, ts, model=model, provider=provider, cost=0.0 if failed else row_cost,
                        status=502 if failed else 200, priced=priced, tokens_in=1500 + 40 * i, tokens_out=420 + 9 * i,
                        latency=600 + 37 * ((i * 13) % 40),
                    )
                )
                if not failed and ts >= now - 29 * DAY:
                    timeline.append((agent, ts, row_cost if priced else 0.0, 1, 0 if priced else 1))
    yield defer.DeferredList(pending, fireOnOneErrback=True)
    h.governance.seed(sorted(timeline))


def kill_a_key(harness, secret: str = "sk-live-rotated-0000-deadbeef9999") -> str:
    """A runtime key that the provider refused: dead, with its error."""
    registry = harness.h.providers
    key_id = registry.add_key("openai", secret, "old production key")
    pool = registry.resolve("openai").pool
    key = pool.get(key_id)
    # A 401 makes it suspect; the re-check the provider refuses too kills it.
    pool.report(key, classify_failure(401, None, b'{"error":"invalid api key"}'))
    pool.check_failed(key, "GET /v1/models answered 401")
    return key_id


@defer.inlineCallbacks
def make_virtual_keys(harness):
    store = harness.keys
    made = []
    for alias, team, user, models, budget in (
        ("session-4711", "org-acme", "session-4711", ["openai/gpt-4.1-mini"], 2.5),
        ("ci-runner", "org-acme", "ci", ["openai/*"], 20.0),
        ("eval-nightly", "org-labs", "evals", [], None),
    ):
        key, vk = yield store.create(key_alias=alias, team_id=team, user_id=user, models=models, max_budget=budget,
                                     budget_duration="30d" if budget else None, duration="7d", rpm_limit=60)
        made.append((key, vk))
    # Some spend on two of them (as the proxy records it: billed to the key's user).
    now = reactor.seconds()
    pending = []
    for n, (_, vk) in enumerate(made[:2]):
        for i in range(6 + 10 * n):
            pending.append(harness.record(vk.user_id, now - 600 * (i + 1), cost=0.09 * (1 + n), key=vk))
    yield defer.DeferredList(pending, fireOnOneErrback=True)
    return made
