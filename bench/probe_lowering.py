#!/usr/bin/env python3
"""
Probe: does a small budget answer a Claude Code request instead of refusing it?

Starts a fake provider that bills every answer to its C{max_tokens}
(C{cllama_tx.testing.billing.BillingModel}) and the real daemon
(C{twistd -n cllama}) in front of it, then, with virtual keys of $1:

 1. spends $0.05, then sends a Claude Code request (C{max_tokens} 32,000,
    streamed, ten tools, a 24 KB system prompt) to Claude Opus 4.1
    ($15/$75 a million) on C{/v1/messages};
 2. the same with Claude Code's thinking (C{budget_tokens} 31,999);
 3. a chat request without C{max_tokens} to a priced OpenAI model;
 4. spends $0.9999, then sends the Claude Code request again;
 5. spends $0.05, then sends C{--requests} requests at once, half Claude
    Code's and half small ones, and reads what settled from the ledger.

It prints each answer's status, the C{max_tokens} the provider received,
the C{x-cllama-max-tokens-lowered} header, the error message and what
settled against the limit.

    .venv/bin/python bench/probe_lowering.py
    .venv/bin/python bench/probe_lowering.py --repo /tmp/before   # another tree's daemon

Exit status 0 when every settled spend is within its limit, 1 otherwise, 2
when the daemon did not start.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attr  # noqa: E402
import treq  # noqa: E402
from probe_daemon import Daemon  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402

from cllama_tx.testing import FakeProvider  # noqa: E402
from cllama_tx.testing.billing import BillingModel  # noqa: E402

MASTER = "sk-probe-master-key-000000000000"
PROVIDER_KEY = "sk-probe-upstream-key"
PRICES = {
    "anthropic": {
        "claude-opus-4-1": {"input": 15.0, "output": 75.0, "max_output_tokens": 32_000},
        "claude-spend": {"input": 0.0, "output": 1.0},  # a request spends max_tokens / 1e6 dollars
    },
    "openai": {"gpt-dear": {"input": 10.0, "output": 60.0, "max_output_tokens": 100_000}},
}
MESSAGES, CHAT = "/v1/messages", "/v1/chat/completions"
TOOLS = [
    {"name": name, "description": f"{name}: " + "Performs the operation described. " * 20, "input_schema": {
        "type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
        "required": ["path"]}}
    for name in ("Read", "Write", "Edit", "Bash", "Glob", "Grep", "LS", "WebFetch", "TodoWrite", "Task")
]


def claude_code(**extra) -> dict:
    doc = {
        "model": "claude-opus-4-1-20250805",
        "max_tokens": 32_000,
        "stream": True,
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude."},
            {"type": "text", "text": "Follow the repository's conventions. " * 650},
        ],
        "tools": TOOLS,
        "metadata": {"user_id": "user_probe_account_probe_session_probe"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Fix the failing test in tests/test_x.py"}]}],
    }
    doc.update(extra)
    return doc


SMALL = {"model": "claude-opus-4-1", "max_tokens": 500, "messages": [{"role": "user", "content": "hi"}]}


class Probe:
    def __init__(self, reactor, args) -> None:
        self.reactor = reactor
        self.args = args
        self.base = tempfile.mkdtemp(prefix="cllama-probe-lowering-")
        self.billing = BillingModel()
        self.ok = True

    async def admin(self, path: str, doc: dict) -> dict:
        response = await self.http.post(self.api + path, json=doc, headers={"Authorization": f"Bearer {MASTER}"})
        body = await response.json()
        if response.code != 200:
            raise RuntimeError(f"{path}: {response.code} {body}")
        return body

    async def key(self, spent: float) -> tuple[str, str]:
        """A fresh $1 key with C{spent} dollars spent through the daemon: (key, token hash)."""
        key = await self.admin("/key/generate", {"max_budget": 1.0})
        response = await self.post(MESSAGES, {
            "model": "anthropic/claude-spend", "max_tokens": round(spent * 1e6),
            "messages": [{"role": "user", "content": "hi"}],
        }, key["key"])
        await response.content()
        if response.code != 200:
            raise RuntimeError(f"could not spend: {response.code}")
        return key["key"], key["token"]

    def post(self, path: str, doc: dict, key: str):
        return self.http.post(
            self.api + path, data=json.dumps(doc).encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )

    async def settled(self, token_hash: str, responses: int) -> float:
        await self.daemon.wait_for_responses(responses)
        db = sqlite3.connect(os.path.join(self.base, "state", "ledger.sqlite3"))
        try:
            (spend,) = db.execute(
                "SELECT COALESCE(SUM(cost_usd), 0) FROM requests WHERE key_id = ?", (token_hash,)
            ).fetchone()
        finally:
            db.close()
        return spend

    async def one(self, label: str, path: str, doc: dict, spent: float) -> None:
        key, token_hash = await self.key(spent)
        before = len(self.fake.received)
        response = await self.post(path, doc, key)
        body = await response.content()
        sent = self.fake.received[before].json if len(self.fake.received) > before else None
        limit = None
        if sent is not None:
            limit = sent.get("max_tokens", sent.get("max_completion_tokens"))
            if isinstance(sent.get("thinking"), dict):
                limit = f"{limit} (thinking {sent['thinking'].get('budget_tokens')})"
        lowered = (response.headers.getRawHeaders("x-cllama-max-tokens-lowered") or ["-"])[0]
        message = "-"
        if response.code != 200:
            doc = json.loads(body)
            message = doc["error"]["message"]
            extra = {k: doc["budget"][k] for k in ("remaining_usd", "input_cost_usd", "min_request_cost_usd") if k in doc.get("budget", {})}
            if extra:
                message += f" {extra}"
        self.responses += 2 if response.code == 200 else 1
        spend = await self.settled(token_hash, self.responses)
        self.ok = self.ok and spend <= 1.0 + 1e-9
        print(f"{label}\n    status {response.code}, upstream limit {limit or '-'}, header {lowered}, "
              f"key settled ${spend:.6f} of $1\n    message: {message}")

    async def burst(self) -> None:
        key, token_hash = await self.key(0.05)
        self.responses += 1
        gate: defer.Deferred = defer.Deferred()
        decided: defer.Deferred = defer.Deferred()
        counts = {"received": 0, "refused": 0}
        total = self.args.requests

        def check() -> None:
            if counts["received"] + counts["refused"] == total and not decided.called:
                decided.callback(None)

        def answer(received):
            counts["received"] += 1
            check()
            return attr.evolve(self.billing.respond(received), hold_until=gate)

        def arrived(response):
            if not gate.called:
                counts["refused"] += 1
                check()
            return response

        self.fake.enqueue(*([answer] * total))
        pending = [
            self.post(MESSAGES, claude_code(stream=False) if i % 2 else SMALL, key).addCallback(arrived)
            for i in range(total)
        ]
        await decided.addTimeout(120, self.reactor)
        gate.callback(None)
        done = await defer.gatherResults(pending)
        codes: dict[int, int] = {}
        lowered = []
        for response in done:
            await response.content()
            codes[response.code] = codes.get(response.code, 0) + 1
            header = response.headers.getRawHeaders("x-cllama-max-tokens-lowered")
            if header:
                lowered.append(int(header[0]))
        self.responses += codes.get(200, 0)
        spend = await self.settled(token_hash, self.responses)
        self.ok = self.ok and spend <= 1.0 + 1e-9
        print(f"{total} at once (half Claude Code, half max_tokens 500), $1 key with $0.05 spent\n"
              f"    answers {dict(sorted(codes.items()))}, lowered {sorted(lowered)}, "
              f"key settled ${spend:.6f} of $1 ({'holds' if spend <= 1 + 1e-9 else 'OVERSHOOT'})")

    async def run(self) -> int:
        os.makedirs(os.path.join(self.base, "auth"))
        os.makedirs(os.path.join(self.base, "context"))
        prices = os.path.join(self.base, "prices.json")
        with open(prices, "w") as f:
            json.dump(PRICES, f)
        self.fake = FakeProvider(self.reactor, responder=self.billing.respond)
        await self.fake.start()
        repo = os.path.abspath(self.args.repo)
        env = {
            "PATH": os.environ.get("PATH", ""), "PYTHONPATH": repo, "PYTHONUNBUFFERED": "1",
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1", "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": os.path.join(self.base, "context"), "CLAW_AUTH_DIR": os.path.join(self.base, "auth"),
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
        self.responses = 0
        try:
            try:
                ports = await self.daemon.ready
            except RuntimeError as e:
                print(e, file=sys.stderr)
                return 2
            self.api = f"http://127.0.0.1:{ports['API']}"
            print(f"daemon from {repo}; Claude Code body {len(json.dumps(claude_code()))} bytes")
            await self.one("Claude Code, max_tokens 32,000, $1 key with $0.05 spent", MESSAGES, claude_code(), 0.05)
            await self.one("Claude Code with thinking 31,999, $0.05 spent", MESSAGES,
                           claude_code(thinking={"type": "enabled", "budget_tokens": 31_999}), 0.05)
            await self.one("chat without max_tokens to gpt-dear ($10/$60, 100,000 output), $0.05 spent", CHAT,
                           {"model": "openai/gpt-dear", "messages": [{"role": "user", "content": "Write an essay"}]},
                           0.05)
            await self.one("Claude Code, $0.9999 spent", MESSAGES, claude_code(), 0.9999)
            await self.burst()
            return 0 if self.ok else 1
        finally:
            if not self.daemon.ended.called:
                transport.signalProcess("TERM")
                await self.daemon.ended
            await pool.closeCachedConnections()
            await self.fake.stop()


def main(reactor, argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="concurrent requests in the last round (200)")
    parser.add_argument("--repo", default=REPO, help="the cllama_tx tree the daemon runs from (this one)")
    args = parser.parse_args(argv)
    return defer.ensureDeferred(Probe(reactor, args).run()).addCallback(_exit)


def _exit(status: int) -> None:
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    task.react(main, (sys.argv[1:],))
