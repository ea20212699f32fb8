#!/usr/bin/env python3
"""
Probe: are streams billed for what was delivered? (issue 12, item 2)

Starts a fake provider (C{cllama_tx.testing.FakeProvider}) and the real
daemon (C{twistd -n cllama}, from C{--repo}) with C{CLLAMA_IDLE_TIMEOUT=--idle}
(2 s) and C{CLLAMA_AGENT_STALL_TIMEOUT=--stall} (5 s), then runs two sets:

  slow agent  for each size in C{--sizes} (2.3 MB, then 23 MB), C{--streams}
              (4) streams of that much SSE, one after the other, for an agent
              with a C{$0.05} C{hard_stop} budget (one agent per size) that
              opens its connection with a 4 KiB receive buffer and stops
              reading after its first bytes.  A stream that fits in the
              kernel's socket buffers (2.3 MB does on a Linux host with
              default TCP settings: up to 4 MiB of send buffer) is relayed
              whole; a larger one backs up into the proxy and pauses the
              provider, and it is the agent stall timeout that ends it;
  provider    streams an agent reads in full, broken by the provider after
              some output (a reset, a close without the final event, a stall
              that the idle timer cuts), or made of one 10 MB event or of
              garbage, with no usage, on both wire formats.

It prints each request's ledger row (status, tokens in and out, cost,
estimated) as the daemon recorded it, and what the budgeted agent was
charged against its limit.

    .venv/bin/python bench/probe_streams.py
    .venv/bin/python bench/probe_streams.py --repo /tmp/before   # another tree's daemon

Exit status 0 when every stream that delivered output was billed more than
$0, 1 otherwise, 2 when the daemon did not start.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sqlite3
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import treq  # noqa: E402
from probe_daemon import Daemon  # noqa: E402
from twisted.internet import defer, protocol, task  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed  # noqa: E402

from cllama_tx.testing import (  # noqa: E402
    FakeProvider,
    Reply,
    anthropic_sse_events,
    anthropic_stream_events,
    garbage_sse_events,
    huge_event_sse_events,
    openai_sse_events,
    openai_stream_chunks,
)

SECRET = "5eed" * 12
PROVIDER_KEY = "sk-probe-upstream-key"
SSE = {"content-type": "text/event-stream"}
PRICES = {
    "openai": {"gpt-4o-mini": {"input": 0.15, "output": 0.6}},  # also prices gpt-4o-mini-firehose-N (prefix)
    "anthropic": {"claude-sonnet-4-5": {"input": 3.0, "output": 15.0}},
}
LIMIT = 0.05
CHAT, MESSAGES = "/v1/chat/completions", "/v1/messages"
PIECES = ["The quick brown fox jumps over the lazy dog. "] * 40  # 1,800 characters


def chat(stream: bool = True) -> dict:
    return {
        "model": "openai/gpt-4o-mini",
        "max_tokens": 100,
        "stream": stream,
        "messages": [{"role": "user", "content": "Write a long story."}],
    }


def messages() -> dict:
    return {
        "model": "anthropic/claude-sonnet-4-5",
        "max_tokens": 100,
        "stream": True,
        "messages": [{"role": "user", "content": "Write a long story."}],
    }


def provider_cases(size_10mb: int) -> list[tuple[str, str, dict, Reply]]:
    openai = openai_sse_events(openai_stream_chunks(PIECES, "gpt-4o-mini", 14, 400))
    anthropic = anthropic_sse_events(anthropic_stream_events(PIECES, "claude-sonnet-4-5", 14, 400))
    half = len(PIECES) // 2
    return [
        ("openai: reset after 20 pieces", CHAT, chat(), Reply(sse=openai, headers=SSE, reset_after_chunks=1 + half)),
        ("openai: closed without usage or [DONE]", CHAT, chat(), Reply(sse=openai[:-2], headers=SSE)),
        ("openai: stalls after 20 pieces (idle cut)", CHAT, chat(), Reply(sse=openai, headers=SSE, stall_after_chunks=1 + half)),
        ("openai: one 10 MB event, no usage", CHAT, chat(), Reply(sse=huge_event_sse_events("openai", "gpt-4o-mini", size_10mb), headers=SSE)),
        ("openai: 100 garbage events + 100 junk lines", CHAT, chat(), Reply(sse=garbage_sse_events(100), headers=SSE)),
        ("anthropic: reset before message_delta", MESSAGES, messages(), Reply(sse=anthropic, headers=SSE, reset_after_chunks=3 + half)),
        ("anthropic: closed without message_delta/stop", MESSAGES, messages(), Reply(sse=anthropic[:-2], headers=SSE)),
    ]


class SlowAgent(protocol.Protocol):
    """Sends one request, reads its first bytes, then reads nothing more."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.head = b""
        self.headers: defer.Deferred = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)

    def dataReceived(self, data: bytes) -> None:
        self.head += data
        if b"\r\n\r\n" in self.head and not self.headers.called:
            self.transport.pauseProducing()
            self.headers.callback(self.head.split(b"\r\n\r\n", 1)[0].decode("latin-1"))


def request_bytes(doc: dict, agent: str) -> bytes:
    body = json.dumps(doc).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
        b"Authorization: Bearer " + f"{agent}:{SECRET}".encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body


class Probe:
    def __init__(self, reactor, args) -> None:
        self.reactor = reactor
        self.args = args
        self.base = tempfile.mkdtemp(prefix="cllama-probe-streams-")
        self.context = os.path.join(self.base, "context")
        self.state = os.path.join(self.base, "state")
        self.delivered_unbilled = 0

    def write_agent(self, name: str, budget: dict | None = None) -> None:
        directory = os.path.join(self.context, name)
        os.makedirs(directory, exist_ok=True)
        doc: dict = {"token": f"{name}:{SECRET}", "pod": "probe"}
        if budget is not None:
            doc["budget"] = budget
        with open(os.path.join(directory, "metadata.json"), "w") as f:
            json.dump(doc, f)

    def firehose(self, received) -> Reply:
        """The answer to a slow agent's request: as many bytes as its model name says."""
        size = int(str(received.json.get("model", "")).rsplit("-", 1)[-1])
        return Reply(firehose_bytes=size, headers=SSE)

    async def run(self) -> int:
        # Scripted replies are for the provider cases; the slow agents' streams
        # come from the responder (a refused request consumes nothing).
        self.fake = FakeProvider(self.reactor, responder=self.firehose)
        await self.fake.start()
        for size in self.args.sizes:
            self.write_agent(f"slow-{size}", {"limit_usd": LIMIT, "window": "24h", "behavior": "hard_stop"})
        self.write_agent("reader")
        os.makedirs(os.path.join(self.base, "auth"))
        pricing = os.path.join(self.base, "pricing.json")
        with open(pricing, "w") as f:
            json.dump(PRICES, f)
        env = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": self.args.repo,
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": self.context,
            "CLAW_AUTH_DIR": os.path.join(self.base, "auth"),
            "CLLAMA_STATE_DIR": self.state,
            "CLLAMA_PRICING_FILE": pricing,
            "CLLAMA_UI_TOKEN": "probe-streams-ui-token",
            "CLLAMA_IDLE_TIMEOUT": str(self.args.idle),
            "CLLAMA_AGENT_STALL_TIMEOUT": str(self.args.stall),
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
            self.port = ports["API"]
            for size in self.args.sizes:
                await self.slow_agents(size)
            await self.broken_providers()
        finally:
            if not self.daemon.ended.called:
                transport.signalProcess("TERM")
                await self.daemon.ended
            await pool.closeCachedConnections()
            await self.fake.stop()
        self.ledger_summary()
        return 1 if self.delivered_unbilled else 0

    def row(self, label: str, line: dict) -> None:
        print(
            f"  {label:<46} {line['status_code']:>4}  in {line.get('tokens_in') or 0:>9,}  "
            f"out {line.get('tokens_out') or 0:>9,}  ${line.get('cost_usd') or 0:>10.6f}  "
            f"{'estimated' if line.get('estimated') else 'reported'}"
            + (f"  ({line['error'][:60]})" if line.get("error") else "")
        )

    async def slow_agents(self, size: int) -> None:
        print(
            f"slow agent: {self.args.streams} x {size / 1e6:.1f} MB streams, agent stops reading; "
            f"hard budget ${LIMIT}, idle timeout {self.args.idle:g} s, agent stall timeout {self.args.stall:g} s"
        )
        doc = dict(chat(), model=f"openai/gpt-4o-mini-firehose-{size}")
        for n in range(self.args.streams):
            agent = SlowAgent(request_bytes(doc, f"slow-{size}"))
            sock = socket.socket()
            # A small window from the handshake on: the proxy's writes back up soon.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", self.port))
            sock.setblocking(False)
            factory = protocol.Factory.forProtocol(lambda agent=agent: agent)
            connection = self.reactor.adoptStreamConnection(sock.fileno(), socket.AF_INET, factory)
            sock.close()
            del connection
            headers = await agent.headers
            match = re.search(r"(?im)^x-cllama-request-id: *(\S+)", headers)
            status = headers.split(" ", 2)[1]
            if match is None:
                print(f"  stream {n + 1}: {status} without a request id")
                agent.transport.abortConnection()
                continue
            line = await self.daemon.wait_settled(match.group(1))
            agent.transport.abortConnection()
            self.row(f"stream {n + 1} (agent stops reading)", line)
            if line["status_code"] < 400 or line["status_code"] in (408, 499, 502, 504):
                if not line.get("cost_usd"):
                    self.delivered_unbilled += 1
        await task.deferLater(self.reactor, 0.5, lambda: None)  # the last abort reaches the daemon

    async def broken_providers(self) -> None:
        print("provider breaks or sends unreadable output (the agent reads everything):")
        for label, path, doc, reply in provider_cases(self.args.huge):
            self.fake.enqueue(reply)
            response = await self.http.post(
                f"http://127.0.0.1:{self.port}{path}",
                data=json.dumps(doc).encode(),
                headers={"Authorization": [f"Bearer reader:{SECRET}"], "Content-Type": ["application/json"]},
            )
            try:
                body = await response.content()
            except ResponseFailed:
                body = b""
            request_id = response.headers.getRawHeaders("x-cllama-request-id", [""])[0]
            line = await self.daemon.wait_settled(request_id)
            self.row(f"{label} [{len(body):,} B]", line)
            if not line.get("cost_usd"):
                self.delivered_unbilled += 1

    def ledger_summary(self) -> None:
        db = sqlite3.connect(os.path.join(self.state, "ledger.sqlite3"))
        try:
            rows = db.execute(
                "SELECT agent, COUNT(*), SUM(cost_usd), SUM(estimated) FROM requests GROUP BY agent ORDER BY agent"
            ).fetchall()
        finally:
            db.close()
        print("ledger (after shutdown):")
        for agent, count, cost, estimated in rows:
            extra = f" against a ${LIMIT} hard budget" if agent.startswith("slow") else ""
            print(f"  {agent:<16} {count} rows, {estimated} estimated, ${cost or 0:.6f} charged{extra}")
        if self.delivered_unbilled:
            print(f"{self.delivered_unbilled} stream(s) delivered output and were billed $0")


def main(reactor, argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=4, help="slow-agent streams (4)")
    parser.add_argument(
        "--sizes", type=lambda text: [int(v) for v in text.split(",")], default=[2_300_000, 23_000_000],
        help="bytes of SSE per slow-agent stream, one run per size (2300000,23000000)",
    )
    parser.add_argument("--huge", type=int, default=10 * 1024 * 1024, help="bytes of the one huge event (10 MiB)")
    parser.add_argument("--idle", type=float, default=2.0, help="CLLAMA_IDLE_TIMEOUT of the daemon (2 s)")
    parser.add_argument("--stall", type=float, default=5.0, help="CLLAMA_AGENT_STALL_TIMEOUT of the daemon (5 s)")
    parser.add_argument("--repo", default=REPO, help="the cllama_tx tree the daemon runs from (this one)")
    args = parser.parse_args(argv)
    return defer.ensureDeferred(Probe(reactor, args).run()).addCallback(_exit)


def _exit(status: int) -> None:
    if status:
        raise SystemExit(status)


if __name__ == "__main__":
    task.react(main, (sys.argv[1:],))
