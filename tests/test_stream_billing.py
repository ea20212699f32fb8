"""
Streams are billed for what was delivered, always: over loopback, against
fake providers that break, close, stall, send one huge event or garbage,
and agents that stop reading (a paused socket: once its receive buffer is
full, backpressure really reaches the proxy and the provider).  Each test
reads the ledger row (status, tokens, cost, estimated) and, where a hard
budget is set, what the budget holds; the last ones run the real daemon.
"""

import json
import os
import sqlite3

import treq
from twisted.internet import defer, error, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseFailed

from cllama_tx.accounting.usage import estimate_prompt_tokens
from cllama_tx.pipeline import proxy as proxy_module
from cllama_tx.testing import (
    FakeProvider,
    Reply,
    anthropic_sse_events,
    anthropic_stream_events,
    garbage_sse_events,
    huge_event_sse_events,
    openai_sse_events,
    openai_stream_chunks,
    parse_sse,
)
from tests.runtime.test_daemon import spawn_daemon
from tests.support import AGENT, PROVIDER_KEY, SECRET, ProxyHarness, chat_body, write_agent

SSE = {"content-type": "text/event-stream"}
PRICES = {
    "openai": {"gpt-test": {"input": 2.0, "output": 8.0}},
    "anthropic": {"claude-test": {"input": 3.0, "output": 15.0}},
}
PAYER = "payer"
HARD_BUDGET = {"limit_usd": 0.05, "window": "24h", "behavior": "hard_stop"}


def openai_cost(prompt, completion):
    return (prompt * 2.0 + completion * 8.0) / 1e6


def anthropic_cost(inp, out):
    return (inp * 3.0 + out * 15.0) / 1e6


def messages_body(stream=True):
    doc = {"model": "anthropic/claude-test", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        doc["stream"] = True
    return doc


def raw_request(doc, path="/v1/chat/completions", agent=AGENT):
    body = json.dumps(doc).encode()
    return (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
        b"Authorization: Bearer " + f"{agent}:{SECRET}".encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body


def dechunk(raw):
    """The body of a raw chunked HTTP/1.1 response (as far as it arrived)."""
    body = raw.split(b"\r\n\r\n", 1)[1]
    out = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out.append(rest[:size])
        body = rest[size + 2 :]
    return b"".join(out)


class StallingAgent(protocol.Protocol):
    """
    An agent that reads the first bytes of its answer and then stops
    reading (its socket paused), so that once its receive buffer is full
    the proxy's writes back up into the proxy and pause the upstream.  With
    C{stall=False} it reads on (and C{wait_for} finds bytes in what came).
    """

    def __init__(self, payload, stall=True):
        self.payload = payload
        self.stall = stall
        self.parts = []
        self.first_data = defer.Deferred()
        self.lost = defer.Deferred()
        self._waiters = []

    def connectionMade(self):
        self.transport.write(self.payload)

    def dataReceived(self, data):
        self.parts.append(data)
        if not self.first_data.called:
            if self.stall:
                self.transport.pauseProducing()
            self.first_data.callback(None)
        for needle, d in list(self._waiters):
            if needle in self.data:
                self._waiters.remove((needle, d))
                d.callback(None)

    def read_on(self):
        self.transport.resumeProducing()

    def wait_for(self, needle):
        d = defer.Deferred()
        self._waiters.append((needle, d))
        self.dataReceived(b"")
        return d

    @property
    def data(self):
        return b"".join(self.parts)

    def connectionLost(self, reason):
        self.lost.callback(reason.value)


class StreamBillingCase(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def start(self, **options):
        pricing = os.path.abspath(self.mktemp())
        with open(pricing, "w") as f:
            json.dump(PRICES, f)
        self.h = yield ProxyHarness(
            self, pricing_file=pricing, fake_providers=("openai", "anthropic"), **options
        ).start()
        write_agent(self.h.context_root, PAYER, SECRET, budget=HARD_BUDGET)
        return self.h

    @defer.inlineCallbacks
    def only_row(self):
        yield self.h.committed()
        rows = yield self.h.ledger_rows()
        self.assertEqual(len(rows), 1, rows)
        return rows[0]

    def budget_usage(self):
        context = self.h.contexts.get(PAYER)
        return self.h.governance.book.usage(PAYER, self.h.governance.budget(context))

    def assertBudgetCharged(self, row):
        """The hard budget holds the row's cost, and nothing is still reserved."""
        usage = self.budget_usage()
        self.assertAlmostEqual(usage.cost_usd, row["cost_usd"], places=9)
        self.assertEqual((usage.reserved_usd, usage.reserved_requests), (0, 0))

    def assertCost(self, actual, expected):
        self.assertAlmostEqual(actual, expected, places=12)

    @defer.inlineCallbacks
    def connect(self, client):
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.h.port.getHost().port), client)
        self.addCleanup(lambda: client.transport.abortConnection())
        return client


class SlowAgentTests(StreamBillingCase):
    @defer.inlineCallbacks
    def test_stalled_agent_is_cut_and_billed_not_blamed_on_the_provider(self):
        """
        The agent stops reading: the upstream is paused far longer than the
        idle timeout without a 504; the agent stall timeout cuts the stream
        as 408 agent_stalled, billed for the relayed output, charged to the
        hard budget, which then refuses the next request.
        """
        yield self.start(idle_timeout=0.3, agent_stall_timeout=1.5)
        self.h.fake.enqueue(Reply(firehose_bytes=256 * 1024 * 1024, headers=SSE))
        doc = chat_body(model="openai/gpt-test", stream=True, max_tokens=100)
        agent = yield self.connect(StallingAgent(raw_request(doc, agent=PAYER)))
        yield agent.first_data
        yield self.h.fake.paused  # backpressure reached the provider
        line = yield self.h.wait_for_audit(lambda entry: entry["type"] in ("response", "error"))
        self.assertEqual((line["type"], line["status_code"]), ("error", 408), line)
        self.assertEqual(line["error"], "stream cut: the agent read nothing for 1.5 s")
        yield self.h.fake.wait_for_disconnect()  # the provider's connection is closed
        agent.read_on()  # and the agent, reading again, finds its own cut
        reason = yield agent.lost
        self.assertIsInstance(reason, error.ConnectionLost)
        self.assertNotIn(b"[DONE]", agent.data)
        row = yield self.only_row()
        self.assertEqual((row["status"], row["stream"], row["estimated"]), (408, True, True))
        self.assertEqual(row["input_tokens"], estimate_prompt_tokens(doc, "openai"))
        # Firehose events carry 1,000 characters each (about 1,100 bytes); at
        # least the 64 KiB the proxy's transport holds before it pauses the
        # upstream was relayed.
        self.assertEqual(row["output_tokens"] % 250, 0)
        self.assertGreaterEqual(row["output_tokens"], 250 * (64 * 1024 // 1200))
        received = agent.data.count(b'"content":"firehose')
        self.assertGreaterEqual(row["output_tokens"], 250 * received)
        self.assertCost(row["cost_usd"], openai_cost(row["input_tokens"], row["output_tokens"]))
        self.assertGreater(row["cost_usd"], HARD_BUDGET["limit_usd"])
        self.assertEqual((line["tokens_out"], line["estimated"]), (row["output_tokens"], True))
        self.assertBudgetCharged(row)
        refused = yield self.h.chat(doc, token=f"{PAYER}:{SECRET}")
        self.assertEqual(refused.code, 429)
        body = yield refused.json()
        self.assertEqual(body["error"]["code"], "budget_exceeded")
        self.assertAlmostEqual(body["budget"]["reported_cost_usd"], row["cost_usd"], places=9)

    @defer.inlineCallbacks
    def test_a_pause_longer_than_the_idle_timeout_is_not_an_upstream_timeout(self):
        """
        An agent that stops reading for a while and then reads on gets its
        whole stream, billed as the provider reported it.
        """
        yield self.start(idle_timeout=0.3, agent_stall_timeout=30)
        self.h.fake.enqueue(Reply(firehose_bytes=8 * 1024 * 1024, headers=SSE))
        doc = chat_body(model="openai/gpt-test", stream=True, stream_options={"include_usage": True})
        agent = yield self.connect(StallingAgent(raw_request(doc)))
        yield agent.first_data
        yield self.h.fake.paused
        yield task.deferLater(reactor, 1.0, lambda: None)  # paused for three idle timeouts
        agent.read_on()
        yield agent.lost
        self.assertTrue(b"data: [DONE]" in agent.data, self.h.audit_lines()[-1])
        [usage] = [json.loads(data)["usage"] for _, data in parse_sse(dechunk(agent.data)) if '"usage":{' in data]
        row = yield self.only_row()
        self.assertEqual((row["status"], row["estimated"]), (200, False))
        self.assertEqual(row["output_tokens"], usage["completion_tokens"])
        self.assertGreater(row["output_tokens"], 8 * 1024 * 1024 // 4 * 0.7)

    @defer.inlineCallbacks
    def test_agent_disconnect_keeps_anthropic_input_and_estimates_output(self):
        """message_start's input is the provider's; the output is what was relayed."""
        yield self.start()
        events = anthropic_sse_events(anthropic_stream_events(["abcd"] * 40, "claude-test", 25, 160))
        self.h.fake.enqueue(Reply(sse=events, headers=SSE, delay_between_chunks=0.05))
        agent = yield self.connect(StallingAgent(raw_request(messages_body(), path="/v1/messages"), stall=False))
        yield agent.wait_for(b'"text":"abcd"')
        agent.transport.abortConnection()
        yield self.h.fake.wait_for_disconnect()
        yield self.h.wait_for_audit(lambda line: line.get("status_code") == 499)
        row = yield self.only_row()
        self.assertEqual((row["status"], row["input_tokens"], row["estimated"]), (499, 25, True))
        self.assertGreaterEqual(row["output_tokens"], 1)
        self.assertLess(row["output_tokens"], 40)
        self.assertCost(row["cost_usd"], anthropic_cost(25, row["output_tokens"]))


class ProviderFailureTests(StreamBillingCase):
    """Output relayed, then the provider fails: the row bills that output."""

    pieces = ["abcd", "efgh", "ijkl"]  # 12 characters: 3 tokens

    def openai_events(self):
        return openai_sse_events(openai_stream_chunks(self.pieces, "gpt-test", 40, 10))

    @defer.inlineCallbacks
    def assertOpenAIBilled(self, status, code=None):
        doc = chat_body(model="openai/gpt-test", stream=True, max_tokens=100)
        response = yield self.h.chat(doc, token=f"{PAYER}:{SECRET}")
        self.assertEqual(response.code, 200)
        events = parse_sse((yield response.content()))
        text = "".join(json.loads(data)["choices"][0]["delta"].get("content", "") for _, data in events if '"choices":[{' in data)
        self.assertEqual(text, "abcdefghijkl")  # everything relayed reached the agent
        if code is not None:
            self.assertEqual(json.loads(events[-1][1])["error"]["code"], code)
        row = yield self.only_row()
        prompt = estimate_prompt_tokens(doc, "openai")
        self.assertEqual(
            (row["status"], row["input_tokens"], row["output_tokens"], row["estimated"]), (status, prompt, 3, True)
        )
        self.assertCost(row["cost_usd"], openai_cost(prompt, 3))
        self.assertGreater(row["cost_usd"], 0)
        self.assertBudgetCharged(row)

    @defer.inlineCallbacks
    def test_reset_after_output(self):
        yield self.start()
        self.h.fake.enqueue(Reply(sse=self.openai_events(), headers=SSE, reset_after_chunks=4))
        yield self.assertOpenAIBilled(502, "upstream_interrupted")

    @defer.inlineCallbacks
    def test_connection_closed_mid_body(self):
        yield self.start()
        self.h.fake.enqueue(Reply(sse=self.openai_events(), headers=SSE, cut_after_chunks=4))
        yield self.assertOpenAIBilled(502, "upstream_interrupted")

    @defer.inlineCallbacks
    def test_clean_end_without_usage_chunk_or_done(self):
        yield self.start()
        events = self.openai_events()[:5]  # role, three pieces, finish; no usage, no [DONE]
        self.h.fake.enqueue(Reply(sse=events, headers=SSE))
        yield self.assertOpenAIBilled(200)

    @defer.inlineCallbacks
    def test_stall_after_output_is_an_idle_cut(self):
        yield self.start(idle_timeout=0.3)
        self.h.fake.enqueue(Reply(sse=self.openai_events(), headers=SSE, stall_after_chunks=4))
        yield self.assertOpenAIBilled(504, "upstream_timeout")

    @defer.inlineCallbacks
    def assertAnthropicBilled(self, reply, status):
        self.h.fake.enqueue(reply)
        response = yield self.h.post("/v1/messages", messages_body(), token=f"{PAYER}:{SECRET}")
        body = yield response.content()
        self.assertIn(b"ijkl", body)
        row = yield self.only_row()
        # message_start's input is the provider's word; its output (1) is not.
        self.assertEqual(
            (row["status"], row["input_tokens"], row["output_tokens"], row["estimated"]), (status, 25, 3, True)
        )
        self.assertCost(row["cost_usd"], anthropic_cost(25, 3))
        self.assertBudgetCharged(row)

    def anthropic_events(self):
        # message_start, block start, ping, three deltas, block stop, message_delta, message_stop
        return anthropic_sse_events(anthropic_stream_events(self.pieces, "claude-test", 25, 9))

    @defer.inlineCallbacks
    def test_anthropic_reset_before_message_delta(self):
        yield self.start()
        yield self.assertAnthropicBilled(Reply(sse=self.anthropic_events(), headers=SSE, reset_after_chunks=7), 502)

    @defer.inlineCallbacks
    def test_anthropic_clean_end_without_message_delta_and_stop(self):
        yield self.start()
        yield self.assertAnthropicBilled(Reply(sse=self.anthropic_events()[:7], headers=SSE), 200)

    @defer.inlineCallbacks
    def test_anthropic_usage_that_arrived_is_the_bill(self):
        """message_delta came before the reset: the provider's count stands."""
        yield self.start()
        self.h.fake.enqueue(Reply(sse=self.anthropic_events(), headers=SSE, reset_after_chunks=8))
        response = yield self.h.post("/v1/messages", messages_body(), token=f"{PAYER}:{SECRET}")
        yield response.content()
        row = yield self.only_row()
        self.assertEqual((row["status"], row["input_tokens"], row["output_tokens"], row["estimated"]), (502, 25, 9, False))
        self.assertBudgetCharged(row)


class UnreadableOutputTests(StreamBillingCase):
    """Output the tap cannot read as text is billed by its size."""

    @defer.inlineCallbacks
    def test_one_ten_megabyte_event(self):
        yield self.start()
        events = huge_event_sse_events("openai", "gpt-test", 10 * 1024 * 1024)
        [huge] = [e for e in events if len(e) > 1024 * 1024]
        self.h.fake.enqueue(Reply(sse=events, headers=SSE))
        doc = chat_body(model="openai/gpt-test", stream=True)
        response = yield self.h.chat(doc, headers={})
        body = yield response.content()
        self.assertTrue(huge in body)
        row = yield self.only_row()
        # The event is counted whole, framing included: 4 bytes a token.
        expected = -(-len(huge) // 4)
        self.assertEqual((row["status"], row["output_tokens"], row["estimated"]), (200, expected, True))
        self.assertCost(row["cost_usd"], openai_cost(estimate_prompt_tokens(doc, "openai"), expected))

    @defer.inlineCallbacks
    def test_one_ten_megabyte_event_cut_mid_way(self):
        """Half of the event reached the agent before the connection broke: that half is billed."""
        yield self.start()
        events = huge_event_sse_events("openai", "gpt-test", 10 * 1024 * 1024)
        index = next(i for i, e in enumerate(events) if len(e) > 1024 * 1024)
        half = events[index][: len(events[index]) // 2]
        self.h.fake.enqueue(Reply(sse=events[:index] + [half], headers=SSE, cut_after_chunks=index + 1))
        response = yield self.h.chat(chat_body(model="openai/gpt-test", stream=True))
        body = yield response.content()
        self.assertTrue(half in body)
        row = yield self.only_row()
        self.assertEqual((row["status"], row["estimated"]), (502, True))
        self.assertEqual(row["output_tokens"], -(-len(half) // 4))

    @defer.inlineCallbacks
    def test_garbage_events(self):
        yield self.start()
        events = garbage_sse_events(20, size=1000)
        self.h.fake.enqueue(Reply(sse=events, headers=SSE))
        response = yield self.h.chat(chat_body(model="openai/gpt-test", stream=True))
        self.assertEqual((yield response.content()), b"".join(events))
        row = yield self.only_row()
        # 20 data payloads and 20 lines that are no SSE field, 1,000 bytes each.
        self.assertEqual((row["status"], row["output_tokens"], row["estimated"]), (200, 40 * 1000 // 4, True))
        self.assertGreater(row["cost_usd"], 0)

    @defer.inlineCallbacks
    def test_huge_anthropic_event_keeps_the_reported_input(self):
        yield self.start()
        events = huge_event_sse_events("anthropic", "claude-test", 2 * 1024 * 1024, input_tokens=25)
        [huge] = [e for e in events if len(e) > 1024 * 1024]
        self.h.fake.enqueue(Reply(sse=events, headers=SSE))
        response = yield self.h.post("/v1/messages", messages_body())
        yield response.content()
        row = yield self.only_row()
        expected = -(-len(huge) // 4)
        self.assertEqual((row["status"], row["input_tokens"], row["output_tokens"], row["estimated"]), (200, 25, expected, True))


class BrokenJsonBodyTests(StreamBillingCase):
    @defer.inlineCallbacks
    def test_passed_through_body_that_breaks_is_billed_by_size(self):
        """A large JSON answer is passed through as it comes; cut mid-way, its relayed part is billed."""
        self.patch(proxy_module, "MAX_BUFFERED_BODY", 1024)
        yield self.start()
        part = b'{"choices":[{"message":{"content":"' + b"x" * 5000
        self.h.fake.enqueue(
            Reply(raw=part, headers={"content-type": "application/json", "content-length": "20000"}, cut_after_chunks=1)
        )
        response = yield self.h.chat(chat_body(model="openai/gpt-test", max_tokens=100), token=f"{PAYER}:{SECRET}")
        self.assertEqual(response.code, 200)
        yield self.assertFailure(response.content(), ResponseFailed)
        row = yield self.only_row()
        self.assertEqual((row["status"], row["output_tokens"], row["estimated"]), (502, -(-len(part) // 4), True))
        self.assertGreater(row["cost_usd"], 0)
        self.assertBudgetCharged(row)

    @defer.inlineCallbacks
    def test_buffered_body_that_breaks_before_anything_was_relayed_is_not_billed(self):
        """Nothing reached the agent (a clean 502): no output to bill."""
        yield self.start()
        self.h.fake.enqueue(
            Reply(raw=b'{"choices":', headers={"content-type": "application/json", "content-length": "2000"}, cut_after_chunks=1)
        )
        response = yield self.h.chat(chat_body(model="openai/gpt-test"))
        self.assertEqual(response.code, 502)
        self.assertEqual((yield response.json())["error"]["code"], "upstream_interrupted")
        row = yield self.only_row()
        self.assertEqual((row["status"], row["output_tokens"], row["cost_usd"], row["estimated"]), (502, 0, 0.0, False))


class DaemonTests(TestCase):
    """The same, through a real `twistd -n cllama` and its SQLite ledger."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = FakeProvider(reactor)
        yield self.fake.start()
        self.addCleanup(self.fake.stop)
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "auth"))
        context = os.path.join(base, "context")
        write_agent(context, AGENT, SECRET)
        write_agent(context, PAYER, SECRET, budget=HARD_BUDGET)
        pricing = os.path.join(base, "pricing.json")
        with open(pricing, "w") as f:
            json.dump(PRICES, f)
        self.state = os.path.join(base, "state")
        self.env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": context,
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": self.state,
            "CLLAMA_PRICING_FILE": pricing,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.fake.base_url,
            "CLLAMA_UI_TOKEN": "stream-billing-ui-token",
        }

    def ledger_rows(self):
        db = sqlite3.connect(os.path.join(self.state, "ledger.sqlite3"))
        db.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in db.execute("SELECT * FROM requests ORDER BY id")]
        finally:
            db.close()

    @defer.inlineCallbacks
    def connect(self, port, client):
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        self.addCleanup(lambda: client.transport.abortConnection())
        return client

    @defer.inlineCallbacks
    def test_stalled_agent_cut_by_the_configured_timeout_and_billed(self):
        env = dict(self.env, CLLAMA_IDLE_TIMEOUT="0.3", CLLAMA_AGENT_STALL_TIMEOUT="1.5")
        process, transport = spawn_daemon(self, env)
        ports = yield process.ready
        self.fake.enqueue(Reply(firehose_bytes=256 * 1024 * 1024, headers=SSE))
        doc = chat_body(model="openai/gpt-test", stream=True, max_tokens=100)
        agent = yield self.connect(ports["API"], StallingAgent(raw_request(doc, agent=PAYER)))
        yield agent.first_data
        yield process.wait_for_audit(lambda lines: any(line["type"] in ("response", "error") for line in lines))
        [line] = [entry for entry in process.audit_lines() if entry["type"] in ("response", "error")]
        self.assertEqual((line["status_code"], line["error"], line["estimated"]), (408, "stream cut: the agent read nothing for 1.5 s", True))
        self.assertGreater(line["cost_usd"], HARD_BUDGET["limit_usd"])
        # The hard budget was charged: the agent's next request is refused.
        refused = yield self.post(ports["API"], doc)
        self.assertEqual(refused[0], 429)
        self.assertEqual(refused[1]["error"]["code"], "budget_exceeded")
        self.assertAlmostEqual(refused[1]["budget"]["reported_cost_usd"], line["cost_usd"], places=6)
        transport.signalProcess("TERM")
        self.assertEqual((yield process.ended), 0)
        [row] = [r for r in self.ledger_rows() if r["status"] != 429]
        self.assertEqual(
            (row["request_id"], row["status"], row["estimated"], row["output_tokens"]),
            (line["request_id"], 408, 1, line["tokens_out"]),
        )
        self.assertGreater(row["output_tokens"], 0)
        self.assertAlmostEqual(row["cost_usd"], openai_cost(row["input_tokens"], row["output_tokens"]), places=9)

    @defer.inlineCallbacks
    def test_stream_cut_by_the_shutdown_drain_is_billed(self):
        env = dict(self.env, CLLAMA_DRAIN_GRACE="1")
        process, transport = spawn_daemon(self, env)
        ports = yield process.ready
        pieces = ["abcd"] * 40
        self.fake.enqueue(Reply(sse=openai_sse_events(openai_stream_chunks(pieces, "gpt-test", 9, 40)), headers=SSE, delay_between_chunks=0.2))
        doc = chat_body(model="openai/gpt-test", stream=True)
        agent = yield self.connect(ports["API"], StallingAgent(raw_request(doc), stall=False))
        yield agent.wait_for(b'"content":"abcd"')
        transport.signalProcess("TERM")
        yield agent.lost
        self.assertEqual((yield process.ended), 0)
        received = agent.data.count(b'"content":"abcd"')
        [row] = self.ledger_rows()
        self.assertEqual((row["status"], row["estimated"]), (499, 1))
        self.assertEqual(row["input_tokens"], estimate_prompt_tokens(doc, "openai"))
        self.assertTrue(received <= row["output_tokens"] < len(pieces), (received, row["output_tokens"]))
        self.assertAlmostEqual(row["cost_usd"], openai_cost(row["input_tokens"], row["output_tokens"]), places=9)
        self.assertGreater(row["cost_usd"], 0)

    @defer.inlineCallbacks
    def post(self, port, doc):
        """POST as the budgeted agent; (status, JSON body)."""
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        response = yield http.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(doc).encode(),
            headers={"Authorization": [f"Bearer {PAYER}:{SECRET}"], "Content-Type": ["application/json"]},
        )
        return response.code, (yield response.json())
