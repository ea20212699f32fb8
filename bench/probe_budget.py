#!/usr/bin/env python3
"""
Probe: do budget reservations count everything the provider bills?

Starts a fake provider that bills the most the real one would for each
request (C{cllama_tx.testing.billing.BillingModel}: text at a token a byte,
every image at the largest size the model keeps, the tool-use system prompt,
every candidate answer at its C{max_tokens}) and the real daemon
(C{twistd -n cllama}) in front of it.  Then, for each shape and for all of
them mixed, and for each kind of caller (an agent, a virtual key, a team),
it sends C{--requests} requests at once against a C{hard_stop} budget that
fits C{--fits} of the most expensive request of that shape.  The provider
holds every answer until each request was either refused or reached it, so
all of them compete for the budget at the same moment.

It prints, per shape and caller, how many requests were admitted and what
settled (from the daemon's ledger) against the limit.  The budget holds
when every ratio is at most 1.00.

    .venv/bin/python bench/probe_budget.py
    .venv/bin/python bench/probe_budget.py --repo /tmp/before   # another tree's daemon

Exit status 0 when every ratio is at most 1, 1 otherwise, 2 when the daemon
did not start.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import attr  # noqa: E402
import treq  # noqa: E402
from probe_daemon import Daemon  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402

from cllama_tx.testing import FakeProvider  # noqa: E402
from cllama_tx.testing.billing import BillingModel  # noqa: E402

SECRET = "5eed" * 12
MASTER = "sk-probe-master-key-000000000000"
PROVIDER_KEY = "sk-probe-upstream-key"

PRICES = {
    "openai": {"gpt-4o": {"input": 2.5, "output": 10.0, "max_output_tokens": 16_384}},
    "anthropic": {"claude-sonnet-4-5": {"input": 3.0, "output": 15.0, "max_output_tokens": 64_000}},
}
CHAT, MESSAGES = "/v1/chat/completions", "/v1/messages"
TOOLS = [
    {"name": "get_weather", "description": "The weather in a city", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}},
    {"name": "get_time", "description": "The time in a city", "input_schema": {"type": "object"}},
]
SHAPES = {
    "n=8": (CHAT, {"model": "openai/gpt-4o", "n": 8, "max_tokens": 1000,
                   "messages": [{"role": "user", "content": "Tell me a story"}]}),
    "3 image_url": (CHAT, {"model": "openai/gpt-4o", "max_tokens": 100, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "Compare these"},
        *({"type": "image_url", "image_url": {"url": f"https://img.example/{i}.png"}} for i in range(3)),
    ]}]}),
    "anthropic tools": (MESSAGES, {"model": "anthropic/claude-sonnet-4-5", "max_tokens": 10, "tools": TOOLS,
                                   "messages": [{"role": "user", "content": "Weather in Paris?"}]}),
}
MIXED = "mixed"


def billed(shape: str) -> float:
    """The most the provider bills for one request of C{shape}, in dollars."""
    path, body = SHAPES[shape]
    wire = "anthropic" if path == MESSAGES else "openai"
    provider, model = body["model"].split("/", 1)
    prompt, completion = BillingModel().usage(dict(body, model=model), wire)
    rates = PRICES[provider][model]
    return (prompt * rates["input"] + completion * rates["output"]) / 1e6


class Probe:
    def __init__(self, reactor, args) -> None:
        self.reactor = reactor
        self.args = args
        self.base = tempfile.mkdtemp(prefix="cllama-probe-budget-")
        self.context = os.path.join(self.base, "context")
        self.billing = BillingModel()
        self.held: list = []
        self.answered = 0

    def respond(self, received):
        """The fake provider's responder: the most the real one bills, held until the round is decided."""
        self.answered += 1
        self.round_check()
        return attr.evolve(self.billing.respond(received), hold_until=self.gate)

    def round_check(self) -> None:
        if self.answered + self.refused == self.args.requests and not self.decided.called:
            self.decided.callback(None)

    def write_agent(self, name: str, limit: float) -> None:
        directory = os.path.join(self.context, name)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "metadata.json"), "w") as f:
            json.dump({"token": f"{name}:{SECRET}", "pod": "probe", "service": name,
                       "budget": {"limit_usd": limit, "window": "1h", "behavior": "hard_stop"}}, f)

    async def admin(self, path: str, doc: dict) -> dict:
        response = await self.http.post(self.api + path, json=doc, headers={"Authorization": f"Bearer {MASTER}"})
        body = await response.json()
        if response.code != 200:
            raise RuntimeError(f"{path}: {response.code} {body}")
        return body

    async def caller(self, kind: str, label: str, limit: float) -> tuple[str, str, str]:
        """(credential, ledger column, value) of a fresh caller whose budget is C{limit}."""
        slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        if kind == "agent":
            name = f"probe-{slug}"  # written before the daemon started (agent_limits)
            return f"{name}:{SECRET}", "agent", name
        if kind == "key":
            key = await self.admin("/key/generate", {"max_budget": limit, "key_alias": f"probe-{slug}"})
            return key["key"], "key_id", key["token"]
        team = f"team-{slug}"
        await self.admin("/team/new", {"team_id": team, "max_budget": limit})
        key = await self.admin("/key/generate", {"team_id": team, "max_budget": limit * 1000})
        return key["key"], "team_id", team

    async def round(self, shapes: list[str], credential: str) -> tuple[int, int]:
        """C{--requests} requests at once; fires with (admitted, refused)."""
        self.gate: defer.Deferred = defer.Deferred()
        self.decided: defer.Deferred = defer.Deferred()
        self.answered = self.refused = 0
        self.fake.enqueue(*([self.respond] * self.args.requests))

        def arrived(response):
            if not self.gate.called:  # answered without reaching the provider: refused
                self.refused += 1
                self.round_check()
            return response

        pending = []
        for i in range(self.args.requests):
            path, body = SHAPES[shapes[i % len(shapes)]]
            pending.append(
                self.http.post(self.api + path, json=body, headers={"Authorization": f"Bearer {credential}"})
                .addCallback(arrived)
            )
        await self.decided.addTimeout(120, self.reactor)
        self.gate.callback(None)
        done = await defer.gatherResults(pending)
        codes: dict[int, int] = {}
        for response in done:
            await response.content()
            codes[response.code] = codes.get(response.code, 0) + 1
        unexpected = {c: n for c, n in codes.items() if c not in (200, 429)}
        if unexpected:
            raise RuntimeError(f"unexpected answers: {unexpected}")
        if codes.get(200, 0) != self.answered:
            raise RuntimeError(f"{self.answered} requests reached the provider but {codes.get(200, 0)} succeeded")
        return codes.get(200, 0), codes.get(429, 0)

    def settled(self, column: str, value: str) -> float:
        db = sqlite3.connect(os.path.join(self.base, "state", "ledger.sqlite3"))
        try:
            (spend,) = db.execute(
                f"SELECT COALESCE(SUM(cost_usd), 0) FROM requests WHERE {column} = ? AND status = 200", (value,)
            ).fetchone()
        finally:
            db.close()
        return spend

    async def run(self) -> int:
        os.makedirs(os.path.join(self.base, "auth"))
        os.makedirs(self.context)
        prices = os.path.join(self.base, "prices.json")
        with open(prices, "w") as f:
            json.dump(PRICES, f)
        for shapes, label in self.cases():
            slug = re.sub(r"[^a-z0-9]+", "-", f"{label}-agent".lower()).strip("-")
            self.write_agent(f"probe-{slug}", self.limit(shapes))
        self.fake = FakeProvider(self.reactor, responder=self.billing.respond)
        await self.fake.start()
        repo = os.path.abspath(self.args.repo)
        env = {
            "PATH": os.environ.get("PATH", ""), "PYTHONPATH": repo, "PYTHONUNBUFFERED": "1",
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1", "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": self.context, "CLAW_AUTH_DIR": os.path.join(self.base, "auth"),
            "CLLAMA_STATE_DIR": os.path.join(self.base, "state"), "CLLAMA_PRICING_FILE": prices,
            "CLLAMA_MASTER_KEY": MASTER,
            "OPENAI_API_KEY": PROVIDER_KEY, "OPENAI_BASE_URL": self.fake.base_url,
            "ANTHROPIC_API_KEY": PROVIDER_KEY, "ANTHROPIC_BASE_URL": self.fake.base_url,
        }
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.daemon = Daemon()
        transport = self.reactor.spawnProcess(
            self.daemon, twistd, [twistd, "--pidfile=", "-n", "cllama"], env=env, path=repo
        )
        pool = HTTPConnectionPool(self.reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(self.reactor, pool=pool))
        try:
            try:
                ports = await self.daemon.ready
            except RuntimeError as e:
                print(e, file=sys.stderr)
                return 2
            self.api = f"http://127.0.0.1:{ports['API']}"
            return await self.measure()
        finally:
            if not self.daemon.ended.called:
                transport.signalProcess("TERM")
                await self.daemon.ended
            await pool.closeCachedConnections()
            await self.fake.stop()

    @staticmethod
    def cases() -> list[tuple[list[str], str]]:
        return [([s], s) for s in SHAPES] + [(list(SHAPES), MIXED)]

    def limit(self, shapes: list[str]) -> float:
        return self.args.fits * max(billed(s) for s in shapes)

    async def measure(self) -> int:
        print(f"{self.args.requests} concurrent requests per row, hard_stop budget = {self.args.fits} x the most "
              f"a request of the row's shape is billed; daemon from {os.path.abspath(self.args.repo)}")
        print(f"{'shape':<16} {'caller':<6} {'limit $':>10} {'admitted':>8} {'settled $':>10} {'settled/limit':>13}")
        admitted_total = 0
        worst_ratio = 0.0
        for shapes, label in self.cases():
            for kind in ("agent", "key", "team"):
                limit = self.limit(shapes)
                credential, column, value = await self.caller(kind, f"{label}-{kind}", limit)
                admitted, _ = await self.round(shapes, credential)
                admitted_total += admitted
                await self.daemon.wait_for_responses(admitted_total)
                spend = self.settled(column, value)
                ratio = spend / limit
                worst_ratio = max(worst_ratio, ratio)
                print(f"{label:<16} {kind:<6} {limit:>10.6f} {admitted:>8} {spend:>10.6f} {ratio:>13.2f}")
        print(f"worst settled/limit: {worst_ratio:.2f} ({'holds' if worst_ratio <= 1 + 1e-9 else 'OVERSHOOT'})")
        return 0 if worst_ratio <= 1 + 1e-9 else 1


def main(reactor, argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="concurrent requests per row (200)")
    parser.add_argument("--fits", type=int, default=5, help="worst cases the budget fits (5)")
    parser.add_argument("--repo", default=REPO, help="the cllama_tx tree the daemon runs from (this one)")
    args = parser.parse_args(argv)
    return defer.ensureDeferred(Probe(reactor, args).run()).addCallback(_exit)


def _exit(status: int) -> None:
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    task.react(main, (sys.argv[1:],))
