#!/usr/bin/env python3
"""
Probe: numbers the operator can trust (issue 13, item 4).

Starts a fake provider (C{cllama_tx.testing.FakeProvider}) and the real
daemon (C{twistd -n cllama}, from C{--repo}), sends one agent's traffic:

  - an OpenAI answer of 1,200 prompt tokens, 32 of them read from the cache,
    and an Anthropic one of 1,606 plain input tokens, 20 read from the cache
    and 12 written to it (2,838 prompt tokens in all: the issue's figure);
  - the same with streams on both wire formats (400 prompt tokens with 100
    cached; 50 plain, 300 read, 40 written);
  - a model the provider answers 404 for (C{openai/gpt-nope}), two names
    refused before routing, and one free C{count_tokens} call;

then reads C{/costs/api}, C{/api/spend} and the UI's JSON twins and prints
each figure next to the truth: token counts as the provider reported them
(the audit lines' C{tokens_in}, every prompt token), requests as the
ledger file holds them (plain SQL), and the compact numbers of the UI for
the issue's examples.

    .venv/bin/python bench/probe_numbers.py
    .venv/bin/python bench/probe_numbers.py --repo /tmp/before   # another tree's daemon

Exit status 0 when every figure agrees, 1 otherwise, 2 when the daemon did
not start.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import treq  # noqa: E402
from probe_daemon import Daemon  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool  # noqa: E402

from cllama_tx.testing import (  # noqa: E402
    FakeProvider,
    Reply,
    anthropic_message,
    anthropic_sse_events,
    anthropic_stream_events,
    openai_completion,
    openai_error,
    openai_sse_events,
    openai_stream_chunks,
)

AGENT = "probe"
SECRET = "7a11" * 12
PROVIDER_KEY = "sk-probe-numbers-upstream"
UI_TOKEN = "probe-numbers-ui-token"
SSE = {"content-type": "text/event-stream"}
PRICES = {
    "openai": {"gpt-test": {"input": 2.0, "output": 8.0, "cache_read": 0.5}},
    "anthropic": {"claude-test": {"input": 3.0, "output": 15.0, "cache_read": 0.3, "cache_write": 3.75}},
}
COMPACT_CASES = (100_300, 229_500, 200_000, 1_234_567)


def messages_body(stream: bool = False) -> dict:
    doc: dict = {"model": "anthropic/claude-test", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        doc["stream"] = True
    return doc


def chat_body(model: str, stream: bool = False) -> dict:
    doc: dict = {"model": model, "messages": [{"role": "user", "content": "Say hello"}]}
    if stream:
        doc["stream"] = True
    return doc


class Probe:
    def __init__(self, reactor, args) -> None:
        self.reactor = reactor
        self.args = args
        self.base = tempfile.mkdtemp(prefix="cllama-probe-numbers-")
        self.state = os.path.join(self.base, "state")
        self.disagreements = 0

    async def run(self) -> int:
        self.fake = FakeProvider(self.reactor)
        await self.fake.start()
        context = os.path.join(self.base, "context", AGENT)
        os.makedirs(context)
        with open(os.path.join(context, "metadata.json"), "w") as f:
            json.dump({"token": f"{AGENT}:{SECRET}", "pod": "probe",
                       "budget": {"max_requests": 100, "window": "24h", "behavior": "hard_stop"}}, f)
        os.makedirs(os.path.join(self.base, "auth"))
        pricing = os.path.join(self.base, "pricing.json")
        with open(pricing, "w") as f:
            json.dump(PRICES, f)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": self.args.repo,
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": os.path.join(self.base, "context"),
            "CLAW_AUTH_DIR": os.path.join(self.base, "auth"),
            "CLLAMA_STATE_DIR": self.state,
            "CLLAMA_PRICING_FILE": pricing,
            "CLLAMA_UI_TOKEN": UI_TOKEN,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.fake.base_url,
            "ANTHROPIC_API_KEY": PROVIDER_KEY,
            "ANTHROPIC_BASE_URL": self.fake.base_url,
        }
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.daemon = Daemon()
        transport = self.reactor.spawnProcess(
            self.daemon, twistd, [twistd, "--pidfile=", "-n", "cllama"], env=env, path=self.args.repo
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
            self.ui = f"http://127.0.0.1:{ports['UI']}"
            await self.the_pair()
            await self.traffic()
            await self.compare()
        finally:
            if not self.daemon.ended.called:
                transport.signalProcess("TERM")
                await self.daemon.ended
            await pool.closeCachedConnections()
            await self.fake.stop()
            shutil.rmtree(self.base, ignore_errors=True)
        self.compact_numbers()
        print(f"\n{self.disagreements} figure(s) disagree" if self.disagreements else "\nevery figure agrees")
        return 1 if self.disagreements else 0

    async def post(self, path: str, doc: dict) -> int:
        response = await self.http.post(
            self.api + path, json=doc, headers={"Authorization": f"Bearer {AGENT}:{SECRET}"}
        )
        await response.content()
        return response.code

    async def the_pair(self) -> None:
        """The issue's figures: 2,838 prompt tokens, shown as 2,902 before."""
        self.fake.enqueue(
            Reply(json=openai_completion("one", "gpt-test", 1200, 50, cached_tokens=32)),
            Reply(json=anthropic_message("two", "claude-test", 1606, 20, cache_read_input_tokens=20,
                                         cache_creation_input_tokens=12)),
        )
        codes = [
            await self.post("/v1/chat/completions", chat_body("openai/gpt-test")),
            await self.post("/v1/messages", messages_body()),
        ]
        print("the issue's pair: statuses", codes)
        costs = await self.get("/costs/api")
        spend = await self.get("/api/spend")
        overview = await self.get("/")
        print(f"  {'figure':<52} {'shown':>12} {'truth':>12}")
        print("prompt tokens of the pair (1,200 OpenAI + 1,638 Anthropic):")
        models = costs["agents"][AGENT]["models"]
        self.show("/costs/api sum of models' input_tokens", sum(m["input_tokens"] for m in models), 2838,
                  "provider usage")
        self.show("/api/spend all_time.prompt_tokens", spend["all_time"]["prompt_tokens"], 2838, "provider usage")
        self.show("UI / spend.all_time.prompt_tokens", overview["spend"]["all_time"]["prompt_tokens"], 2838,
                  "provider usage")

    async def traffic(self) -> None:
        self.fake.enqueue(
            Reply(sse=openai_sse_events(openai_stream_chunks(["a", "b"], "gpt-test", 400, 10, cached_tokens=100)),
                  headers=SSE),
            Reply(sse=anthropic_sse_events(anthropic_stream_events(
                ["Hel", "lo"], "claude-test", 50, 30, cache_read_input_tokens=300, cache_creation_input_tokens=40)),
                headers=SSE),
            Reply(status=404, json=openai_error("The model `gpt-nope` does not exist", "invalid_request_error",
                                                "model_not_found")),
        )
        codes = [
            await self.post("/v1/chat/completions", chat_body("openai/gpt-test", stream=True)),
            await self.post("/v1/messages", messages_body(stream=True)),
            await self.post("/v1/chat/completions", chat_body("openai/gpt-nope")),
            await self.post("/v1/chat/completions", chat_body("nonexistent-model-xyz")),
            await self.post("/v1/chat/completions", chat_body("bogus/model")),
            await self.post("/v1/messages/count_tokens",
                            {"model": "anthropic/claude-test", "messages": [{"role": "user", "content": "hi"}]}),
        ]
        print("then streams, a 404, two refused names, count_tokens: statuses", codes)

    async def get(self, path: str) -> dict:
        response = await self.http.get(
            self.ui + path, headers={"Authorization": f"Bearer {UI_TOKEN}", "Accept": "application/json"}
        )
        return json.loads(await response.content())

    def sql(self, query: str):
        db = sqlite3.connect(os.path.join(self.state, "ledger.sqlite3"))
        try:
            return db.execute(query).fetchone()[0]
        finally:
            db.close()

    def show(self, label: str, shown, truth, source: str) -> None:
        agree = shown == truth
        self.disagreements += not agree
        shown_text = f"{shown:,}" if isinstance(shown, int) else str(shown)
        truth_text = f"{truth:,}" if isinstance(truth, int) else str(truth)
        print(f"  {label:<52} {shown_text:>12} {truth_text:>12}  {'ok' if agree else 'WRONG'}  ({source})")

    async def compare(self) -> None:
        audit = self.daemon.audit()
        ledgered = {line["request_id"] for line in audit if line["type"] in ("response", "error") and line.get("provider")}
        served = [line for line in audit if line["type"] == "response" and line.get("request_id") in ledgered]
        # Every prompt token as the providers reported them (tokens_in is
        # every prompt token on the audit line, in every version).
        prompt = sum(line["tokens_in"] for line in served)
        costs = await self.get("/costs/api")
        spend = await self.get("/api/spend")
        overview = await self.get("/")
        costs_page = await self.get("/costs?period=all")
        budgets = await self.get("/budgets")
        pricing = await self.get("/pricing")
        models = costs["agents"][AGENT]["models"]
        print("prompt tokens of everything (cache reads and writes counted once):")
        self.show("/costs/api sum of models' input_tokens", sum(m["input_tokens"] for m in models), prompt,
                  "audit tokens_in")
        self.show("/api/spend all_time.prompt_tokens", spend["all_time"]["prompt_tokens"], prompt, "audit tokens_in")
        self.show("UI / spend.all_time.prompt_tokens", overview["spend"]["all_time"]["prompt_tokens"], prompt,
                  "audit tokens_in")
        self.show("UI /costs total.prompt_tokens", costs_page["total"]["prompt_tokens"], prompt, "audit tokens_in")
        print("requests:")
        everything = self.sql("SELECT COUNT(*) FROM requests WHERE agent IS NOT NULL")
        metered = self.sql("SELECT COUNT(*) FROM requests WHERE provider IS NOT NULL AND effective_model IS NOT NULL")
        self.show("/costs/api total_requests (reached a provider)", costs["total_requests"], metered, "ledger SQL")
        self.show("/api/spend all_time.total_requests (every request)", spend["all_time"]["total_requests"],
                  everything, "ledger SQL")
        self.show("UI / spend.all_time.requests", overview["spend"]["all_time"]["requests"], everything, "ledger SQL")
        self.show("UI /costs total.requests", costs_page["total"]["requests"], everything, "ledger SQL")
        served_2xx = self.sql("SELECT COUNT(*) FROM requests WHERE status >= 200 AND status < 300")
        usage = budgets["agents"][0]["usage"] or {}
        self.show("UI /budgets usage.requests (count_tokens not counted)", usage.get("requests"), served_2xx,
                  "ledger SQL, 2xx")
        print("pricing:")
        listed = sorted(f"{e['provider']}/{e['model']}" for e in pricing["unpriced"] + pricing["priced"])
        db = sqlite3.connect(os.path.join(self.state, "ledger.sqlite3"))
        try:
            truth = sorted(f"{p}/{m}" for p, m in db.execute(
                "SELECT DISTINCT provider, effective_model FROM requests WHERE status >= 200 AND status < 300 "
                "AND provider IS NOT NULL"))
        finally:
            db.close()
        self.show("UI /pricing models listed", ", ".join(listed), ", ".join(truth), "served models in the ledger")

    def compact_numbers(self) -> None:
        code = (
            "import json, sys; from cllama_tx.sites.ui.render import compact; "
            f"print(json.dumps([compact(v) for v in {list(COMPACT_CASES)!r}]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": self.args.repo},
            cwd=self.args.repo, capture_output=True, text=True, check=True,
        ).stdout
        print("compact numbers (the UI's tiles):")
        for value, shown, truth in zip(COMPACT_CASES, json.loads(out), ("100k", "230k", "200k", "1.23M"), strict=True):
            self.show(f"{value:,}", shown, truth, "three significant digits")


def main(reactor, argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=REPO, help="the cllama_tx tree the daemon runs from (this one)")
    args = parser.parse_args(argv)
    return defer.ensureDeferred(Probe(reactor, args).run()).addCallback(_exit)


def _exit(status: int) -> None:
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    task.react(main, (sys.argv[1:],))
