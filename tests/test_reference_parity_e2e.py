"""
The reference proxy's behaviours of issue 19 (items 1-5) against the real
daemon (`twistd -n cllama` in a child process, fake providers on loopback):
its behaviour tests replayed (internal/proxy/handler_test.go,
cmd/cllama/main_test.go of mostlydev/cllama), each audit line on stdout
checked field by field against the reference's documented names
(internal/logging/logger.go); docs/REFERENCE_PARITY.md is the table.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib

import anthropic
import openai
import treq
from twisted.internet import defer, reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from cllama_tx.runtime.upstream import BytesProducer
from cllama_tx.testing import (
    FakeProvider,
    Reply,
    anthropic_message,
    anthropic_sse_events,
    anthropic_stream_events,
    openai_completion,
    openai_error,
    openai_sse_events,
    openai_stream_chunks,
    parse_sse,
)
from tests.runtime.test_daemon import spawn_daemon
from tests.secret_scan import SCANNER
from tests.support import AGENT, PROVIDER_KEY, SECRET, write_agent

UI_TOKEN = "parity-ui-token-never-logged-5150"
REPLAY_TOKEN = "history-replay-token-0042"
MEMORY_TOKEN = "team-memory-token-0043"
SCANNER.register(UI_TOKEN, REPLAY_TOKEN, MEMORY_TOKEN)

PRICES = {
    "openai": {"gpt-test": {"input": 2.0, "output": 8.0}},
    "anthropic": {"claude-test": {"input": 3.0, "output": 15.0}},
}
SSE = {"content-type": "text/event-stream"}
POLICY = {
    "mode": "clamp",
    "allowed": [
        {"slot": "primary", "ref": "openai/gpt-test"},
        {"slot": "fallback", "ref": "anthropic/claude-test"},
    ],
}

# The reference's audit entry (internal/logging/logger.go): the fields of
# each line type that fleet tooling reads, and their JSON types.
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
BASE = {"ts": str, "type": str, "model": (str, type(None)), "intervention": (str, type(None))}
REFERENCE_FIELDS = {
    "request": {**BASE, "claw_id": str},
    "response": {**BASE, "claw_id": str, "latency_ms": (int, float), "status_code": int, "tokens_in": int,
                 "tokens_out": int, "cached_tokens": int, "cache_write_tokens": int},
    "error": {**BASE, "claw_id": (str, type(None)), "latency_ms": (int, float), "status_code": int, "error": str},
    "intervention": {**BASE, "claw_id": str},
    "failover": {**BASE, "claw_id": str, "from_provider": str, "from_model": str, "to_provider": str,
                 "to_model": str, "reason": str, "slot_index": int, "latency_ms": (int, float)},
    "provider_pool": {**BASE, "provider": str, "key_id": str, "action": str, "reason": str},
}


def price(provider, model, tokens_in, tokens_out):
    rates = PRICES[provider][model]
    return (tokens_in * rates["input"] + tokens_out * rates["output"]) / 1e6


class Daemon:
    """One real daemon in front of one fake provider serving OpenAI and Anthropic."""

    def __init__(self, case, agents, env=None, base=None):
        self.case = case
        self.agents = agents
        self.env = env or {}
        self.base = base

    @defer.inlineCallbacks
    def start(self):
        case = self.case
        self.fake = FakeProvider(reactor)
        yield self.fake.start()
        case.addCleanup(self.fake.stop)
        base = self.base or os.path.abspath(case.mktemp())
        self.context_root = os.path.join(base, "context")
        self.history_dir = os.path.join(base, "history")
        os.makedirs(os.path.join(base, "auth"))
        for name, metadata in self.agents.items():
            write_agent(self.context_root, name, SECRET, **metadata)
        prices = os.path.join(base, "prices.json")
        with open(prices, "w") as f:
            json.dump(PRICES, f)
        env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": self.context_root,
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "CLAW_SESSION_HISTORY_DIR": self.history_dir,
            "CLLAMA_PRICING_FILE": prices,
            "CLLAMA_UI_TOKEN": UI_TOKEN,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.fake.base_url,
            "ANTHROPIC_API_KEY": PROVIDER_KEY,
            "ANTHROPIC_BASE_URL": self.fake.base_url,
            **self.env,
        }
        self.process, self.transport = spawn_daemon(case, env)
        ports = yield self.process.ready
        self.api = f"http://127.0.0.1:{ports['API']}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        case.addCleanup(pool.closeCachedConnections)
        # treq asks for gzip and decodes; the raw agent shows what the daemon sends.
        self.raw_agent = Agent(reactor, pool=pool)
        self.http = treq.client.HTTPClient(self.raw_agent)
        return self

    @defer.inlineCallbacks
    def raw_post(self, path, doc, headers):
        """POST with exactly C{headers}: the response and its body as they came."""
        response = yield self.raw_agent.request(
            b"POST", (self.api + path).encode(),
            Headers({k.encode(): [v.encode()] for k, v in headers.items()} | {b"content-type": [b"application/json"]}),
            BytesProducer(json.dumps(doc).encode()),
        )
        body = yield readBody(response)
        return response, body

    def chat(self, agent, doc, headers=None):
        return self.http.post(self.api + "/v1/chat/completions", data=json.dumps(doc).encode(), headers={
            "Authorization": f"Bearer {agent}:{SECRET}", "Content-Type": "application/json", **(headers or {})})

    def messages(self, agent, doc):
        return self.http.post(self.api + "/v1/messages", data=json.dumps(doc).encode(), headers={
            "x-api-key": f"{agent}:{SECRET}", "anthropic-version": "2023-06-01", "Content-Type": "application/json"})

    def get(self, path, token=None, headers=None):
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        return self.http.get(self.api + path, headers=all_headers)

    @defer.inlineCallbacks
    def lines_of(self, response, kinds=("response", "error")):
        """Every audit line of C{response}'s request, once its last line (C{kinds}) is out."""
        [request_id] = response.headers.getRawHeaders("x-cllama-request-id")
        mine = lambda lines: [line for line in lines if line.get("request_id") == request_id]  # noqa: E731
        yield self.process.wait_for_audit(lambda lines: any(line["type"] in kinds for line in mine(lines)))
        return mine(self.process.audit_lines())


class ParityCase(TestCase):
    timeout = 90

    def check(self, line, kind, **expected):
        """C{line} is a C{kind} line with the reference's fields, typed as it writes them, and C{expected}."""
        self.assertEqual(line["type"], kind, line)
        for name, types in REFERENCE_FIELDS[kind].items():
            self.assertIn(name, line, (kind, name, line))
            self.assertIsInstance(line[name], types, (kind, name, line))
        self.assertRegex(line["ts"], TS)
        for name, value in expected.items():
            if value is ABSENT:
                self.assertNotIn(name, line, (name, line))
            else:
                self.assertEqual(line[name], value, (name, line))
        if kind != "intervention":
            self.assertIsNone(line["intervention"], line)
        return line

    def interventions(self, lines):
        return [line["intervention"] for line in lines if line["type"] == "intervention"]


ABSENT = object()


class BudgetParityTests(ParityCase):
    """Reference: TestHandlerRejectsOpenAIWhenBudgetExceeded, ...RejectsAnthropicWhenRequestRateLimited,
    ...BudgetCheckUnavailableFails{Open,Closed}..., ...MarksUnknownPricingWithoutDroppingUsage."""

    @defer.inlineCallbacks
    def test_refusals_soft_alerts_unavailable_budgets_and_unpriced_answers(self):
        d = yield Daemon(self, {
            "capped": {"budget": {"limit_usd": 0.0015, "window": "1h", "behavior": "hard_stop"}},
            "nano-bot": {"budget": {"max_requests": 1, "window": "1h", "behavior": "rate_limit"}},
            "soft": {"budget": {"limit_usd": 0.0001, "window": "24h", "behavior": "soft_alert"}},
            "broken": {"budget": {"limit_usd": 1.0, "window": "forever", "behavior": "hard_stop"}},
            "plain": {},
        }).start()
        chat = {"model": "openai/gpt-test", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}

        # hard_stop: a first turn spends past the limit, the next is refused.
        d.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 500, 100)))
        first = yield d.chat("capped", chat)
        self.assertEqual(first.code, 200, (yield first.text()))
        [response] = [line for line in (yield d.lines_of(first)) if line["type"] == "response"]
        self.check(response, "response", claw_id="capped", model="openai/gpt-test", status_code=200, tokens_in=500,
                   tokens_out=100, cached_tokens=0, cache_write_tokens=0, priced=True, estimated=False)
        self.assertAlmostEqual(response["cost_usd"], price("openai", "gpt-test", 500, 100))
        refused = yield d.chat("capped", chat)
        body = yield refused.json()
        self.assertEqual(refused.code, 429, body)
        self.assertTrue(body["error"]["message"].startswith("budget exceeded"), body)
        self.assertEqual((body["error"]["type"], body["error"]["code"]), ("budget_exceeded", "budget_exceeded"))
        budget = body["budget"]
        self.assertEqual(
            {k: budget[k] for k in ("behavior", "window", "requests", "unknown_cost_requests", "limit_usd")},
            {"behavior": "hard_stop", "window": "1h", "requests": 1, "unknown_cost_requests": 0, "limit_usd": 0.0015},
        )
        self.assertAlmostEqual(budget["reported_cost_usd"], price("openai", "gpt-test", 500, 100))
        retry = int(refused.headers.getRawHeaders("retry-after")[0])
        self.assertTrue(3500 <= retry <= 3600, retry)
        lines = yield d.lines_of(refused)
        self.assertEqual([line["type"] for line in lines], ["request", "intervention", "error"])
        self.check(lines[1], "intervention", claw_id="capped", model="openai/gpt-test", intervention="budget_exceeded",
                   status_code=429, behavior="hard_stop", window="1h", limit_usd=0.0015)
        self.check(lines[2], "error", claw_id="capped", model="openai/gpt-test", status_code=429,
                   error=body["error"]["message"], cost_usd=0.0)

        # max_requests on the messages surface: rate_limited, the code in Anthropic's shape too.
        messages = {"model": "anthropic/claude-test", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
        d.fake.enqueue(Reply(json=anthropic_message("ok", "claude-test", 10, 5)))
        allowed = yield d.messages("nano-bot", messages)
        self.assertEqual(allowed.code, 200, (yield allowed.text()))
        refused = yield d.messages("nano-bot", messages)
        body = yield refused.json()
        self.assertEqual(refused.code, 429, body)
        self.assertEqual(body["type"], "error")
        self.assertEqual(body["error"], {"type": "rate_limited", "message": "request rate limit exceeded", "code": "rate_limited"})
        self.assertEqual((body["budget"]["max_requests"], body["budget"]["requests"]), (1, 1))
        self.assertIsNotNone(refused.headers.getRawHeaders("retry-after"))
        lines = yield d.lines_of(refused)
        self.assertEqual(self.interventions(lines), ["rate_limited"])
        self.check(lines[1], "intervention", claw_id="nano-bot", model="anthropic/claude-test", intervention="rate_limited",
                   behavior="rate_limit", max_requests=1)

        # soft_alert over its limit: named budget_exceeded as the reference names it, never refused.
        for _ in range(2):
            d.fake.enqueue(Reply(json=openai_completion("ok", "gpt-test", 500, 100)))
            response = yield d.chat("soft", chat)
            self.assertEqual(response.code, 200, (yield response.text()))
            lines = yield d.lines_of(response)
        self.assertIn("budget_exceeded", self.interventions(lines))
        [soft] = [line for line in lines if line.get("intervention") == "budget_exceeded"]
        self.check(soft, "intervention", claw_id="soft", intervention="budget_exceeded", behavior="soft_alert", window="24h")
        self.assertEqual([line["status_code"] for line in lines if line["type"] in ("response", "error")], [200])
        self.assertIn("budget_alert", self.interventions(lines))  # and ours, once it is settled

        # A budget that cannot be evaluated: closed by default (the reference's
        # words), audited budget_check_unavailable, nothing sent upstream.
        sent = len(d.fake.received)
        refused = yield d.chat("broken", chat)
        body = yield refused.json()
        self.assertEqual((refused.code, body), (503, {"error": {
            "message": "budget enforcement unavailable for this agent", "type": "api_error", "code": "budget_unavailable"}}))
        self.assertEqual(len(d.fake.received), sent)
        lines = yield d.lines_of(refused)
        self.assertEqual([line["type"] for line in lines], ["request", "intervention", "error"])
        self.check(lines[1], "intervention", claw_id="broken", intervention="budget_check_unavailable", fail_mode="closed",
                   scope="broken", reason="budget enforcement unavailable for this agent")
        self.check(lines[2], "error", status_code=503)

        # An unpriced answer: tokens counted, cost_usd left out (not 0); a priced one says its cost.
        d.fake.enqueue(Reply(json=openai_completion("ok", "gpt-unpriced", 240, 90)))
        response = yield d.chat("plain", dict(chat, model="openai/gpt-unpriced"))
        self.assertEqual(response.code, 200, (yield response.text()))
        [line] = [line for line in (yield d.lines_of(response)) if line["type"] == "response"]
        self.check(line, "response", claw_id="plain", tokens_in=240, tokens_out=90, priced=False, estimated=False,
                   cost_usd=ABSENT)


class FailModeParityTests(ParityCase):
    @defer.inlineCallbacks
    def test_open_lets_the_request_go_on_audited(self):
        d = yield Daemon(self, {"broken": {"budget": {"limit_usd": 0.5, "window": "1h", "behavior": "sideways"}}},
                         env={"CLLAMA_BUDGET_FAIL_MODE": "open"}).start()
        d.fake.enqueue(Reply(json=openai_completion("hello", "gpt-test", 9, 2)))
        response = yield d.chat("broken", {"model": "openai/gpt-test", "messages": [{"role": "user", "content": "hi"}]})
        body = yield response.json()
        self.assertEqual((response.code, body["choices"][0]["message"]["content"]), (200, "hello"))
        lines = yield d.lines_of(response)
        self.assertEqual([line["type"] for line in lines], ["request", "intervention", "response"])
        self.check(lines[1], "intervention", claw_id="broken", model="openai/gpt-test",
                   intervention="budget_check_unavailable", fail_mode="open", scope="broken")
        self.check(lines[2], "response", status_code=200, tokens_in=9, tokens_out=2)

    @defer.inlineCallbacks
    def test_a_mode_it_cannot_read_stops_the_start(self):
        d = Daemon(self, {}, env={"CLLAMA_BUDGET_FAIL_MODE": "fail-open"})
        yield self.assertFailure(d.start(), RuntimeError)
        self.assertEqual((yield d.process.ended), 1)
        # twistd says a configuration error as a usage error, on stdout.
        self.assertIn(b"CLLAMA_BUDGET_FAIL_MODE must be open or closed, not 'fail-open'", d.process.stdout)


class FailoverParityTests(ParityCase):
    """Reference: TestHandlerFallsBackToDeclaredCandidateOn{Upstream500,TransportError,StreamFirstByteTimeout},
    TestHandlerReturns429WhenAllKeysCooling, TestHandlerWarnsWhenDeclaredModelsCannotFailOver; the failover
    line as LogFailover writes it."""

    def hop(self, lines, reason, detail_start, slot=1):
        """The reference's sequence for one hop, and its failover line field by field."""
        kinds = [(line["type"], line.get("intervention")) for line in lines]
        at = kinds.index(("failover", None))
        expected = [("failover", None), ("intervention", "provider_exhausted_failover")]
        if reason not in ("provider_cooldown", "provider_key_unavailable", "provider_keys_exhausted"):
            expected.insert(0, ("intervention", f"provider_candidate_fallback:{reason}"))
            at -= 1
        self.assertEqual(kinds[at:at + len(expected)], expected, kinds)
        failover = [line for line in lines if line["type"] == "failover"][0]
        self.check(failover, "failover", claw_id="fo", model="openai/gpt-test", from_provider="openai",
                   from_model="gpt-test", to_provider="anthropic", to_model="claude-test", reason=reason, slot_index=slot)
        self.assertTrue(failover["detail"].startswith(detail_start), failover)
        self.assertEqual(lines[-1]["type"], "response")
        self.check(lines[-1], "response", claw_id="fo", status_code=200, provider="anthropic", effective_model="claude-test")

    @defer.inlineCallbacks
    def test_each_reason_as_a_code(self):
        narrow = {"mode": "clamp", "allowed": [{"slot": "primary", "ref": "openai/gpt-test"},
                                                {"slot": "analysis", "ref": "anthropic/claude-test"}]}
        d = yield Daemon(self, {"fo": {"model_policy": POLICY}, "narrow": {"model_policy": narrow}},
                         env={"CLLAMA_FIRST_BYTE_TIMEOUT": "1"}).start()
        claude = Reply(json=anthropic_message("from claude", "claude-test", 5, 2))
        claude_stream = Reply(sse=anthropic_sse_events(anthropic_stream_events(["from ", "claude"], "claude-test", 5, 2)),
                              headers=SSE)
        chat = {"model": "openai/gpt-test", "messages": [{"role": "user", "content": "hi"}]}
        stream = dict(chat, stream=True)

        # Two models declared, none a fallback: the reference's warning (TestHandlerWarnsWhenDeclaredModelsCannotFailOver).
        d.fake.enqueue(Reply(json=openai_completion("hi", "gpt-test", 3, 1)))
        response = yield d.chat("narrow", chat)
        self.assertEqual(response.code, 200, (yield response.text()))
        lines = yield d.lines_of(response)
        [warning] = [line for line in lines if line["type"] == "intervention"]
        self.check(warning, "intervention", claw_id="narrow", model="openai/gpt-test",
                   intervention="policy_failover_unreachable", chosen="openai/gpt-test",
                   declared=["openai/gpt-test", "anthropic/claude-test"])

        # A 5xx: http_500.
        d.fake.enqueue(Reply(status=500, json=openai_error("upstream exploded", "server_error")), claude)
        response = yield d.chat("fo", chat)
        self.assertEqual((yield response.json())["choices"][0]["message"]["content"], "from claude")
        self.hop((yield d.lines_of(response)), "http_500", "provider 'openai' answered 500")

        # The connection fails before the headers: transport_error.
        d.fake.enqueue(Reply(abort_before_headers=True), claude)
        response = yield d.chat("fo", chat)
        self.assertEqual(response.code, 200, (yield response.text()))
        self.hop((yield d.lines_of(response)), "transport_error", "could not reach provider 'openai'")

        # A stream whose headers do not come in time: stream_first_byte_timeout.
        held = defer.Deferred()
        self.addCleanup(lambda: held.called or held.callback(None))
        d.fake.enqueue(Reply(sse=openai_sse_events(openai_stream_chunks(["late"], "gpt-test")), headers=SSE,
                             hold_until=held), claude_stream)
        response = yield d.chat("fo", stream)
        self.assertIn(b"claude", (yield response.content()))
        self.hop((yield d.lines_of(response)), "stream_first_byte_timeout", "provider 'openai' sent no response within 1 s")
        held.callback(None)

        # Headers, then the connection breaks before a byte: stream_read_error.
        d.fake.enqueue(Reply(sse=openai_sse_events(openai_stream_chunks(["lost"], "gpt-test")), headers=SSE,
                             cut_after_chunks=0), claude_stream)
        response = yield d.chat("fo", stream)
        self.assertIn(b"claude", (yield response.content()))
        self.hop((yield d.lines_of(response)), "stream_read_error", "the connection to provider 'openai' broke")

        # The only key is rate limited: provider_cooldown (no candidate_fallback line, as the reference).
        d.fake.enqueue(Reply(status=429, headers={"retry-after": "7"},
                             json=openai_error("Rate limit reached", "requests", "rate_limit_exceeded")), claude)
        response = yield d.chat("fo", chat)
        self.assertEqual(response.code, 200, (yield response.text()))
        yield d.process.wait_for_audit(lambda lines: any(line["type"] == "provider_pool" for line in lines))
        [pool] = [line for line in d.process.audit_lines() if line["type"] == "provider_pool"]
        self.check(pool, "provider_pool", provider="openai", action="cooldown")
        lines = yield d.lines_of(response)
        self.hop(lines, "provider_cooldown", "every key of provider 'openai' is cooling down")
        self.assertNotIn("provider_candidate_fallback:provider_cooldown", self.interventions(lines))


class StreamErrorParityTests(ParityCase):
    """Reference: TestHandlerCutsStreamOnIdleTimeoutAfterDownstreamBytes (event: error, 'upstream stream idle timeout')."""

    @defer.inlineCallbacks
    def test_mid_stream_failures_are_error_events_the_sdks_raise(self):
        d = yield Daemon(self, {AGENT: {}}, env={"CLLAMA_IDLE_TIMEOUT": "1"}).start()
        chunks = openai_stream_chunks(["Hel", "lo ", "wor", "ld"], "gpt-test", 5, 4)
        stream = {"model": "openai/gpt-test", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        idle = "upstream stream idle timeout: provider 'openai' sent nothing for 1 s"

        # The idle cut after bytes reached the agent: the partial stream, then the reference's error event.
        d.fake.enqueue(Reply(sse=openai_sse_events(chunks), headers=SSE, stall_after_chunks=3))
        response = yield d.chat(AGENT, stream)
        self.assertEqual(response.code, 200)
        events = parse_sse((yield response.content()))
        self.assertEqual([name for name, _ in events], [None, None, None, "error"])
        self.assertEqual(json.loads(events[1][1])["choices"][0]["delta"]["content"], "Hel")
        self.assertEqual(json.loads(events[-1][1]), {"error": {"message": idle, "type": "api_error", "code": "upstream_timeout"}})
        lines = yield d.lines_of(response)
        self.check(lines[-1], "error", claw_id=AGENT, model="openai/gpt-test", status_code=504, error=idle)
        self.assertIn("idle timeout", lines[-1]["error"])

        # The official SDKs raise a typed error on it (openai's APIError), after the text that came.
        client = openai.OpenAI(base_url=d.api + "/v1", api_key=f"{AGENT}:{SECRET}", max_retries=0, timeout=20)
        self.addCleanup(client.close)

        def consume():
            got = []
            try:
                for chunk in client.chat.completions.create(model="openai/gpt-test", stream=True,
                                                            messages=[{"role": "user", "content": "hi"}]):
                    got.append(chunk.choices[0].delta.content if chunk.choices else "")
            except openai.APIError as e:
                return got, e
            return got, None

        for reply, expected in (
            (Reply(sse=openai_sse_events(chunks), headers=SSE, stall_after_chunks=3), idle),
            (Reply(sse=openai_sse_events(chunks), headers=SSE, cut_after_chunks=3),
             "the connection to provider 'openai' broke mid-response"),
        ):
            d.fake.enqueue(reply)
            got, error = yield deferToThread(consume)
            self.assertEqual(got, ["", "Hel", "lo "])
            self.assertIsInstance(error, openai.APIError)
            self.assertTrue(error.message.startswith(expected), error.message)

        # The messages surface: Anthropic's event: error, which its SDK raises too.
        events = anthropic_sse_events(anthropic_stream_events(["Hel", "lo"], "claude-test", 5, 2))
        d.fake.enqueue(Reply(sse=events, headers=SSE, stall_after_chunks=3))
        client_a = anthropic.Anthropic(base_url=d.api, api_key=f"{AGENT}:{SECRET}", max_retries=0, timeout=20)
        self.addCleanup(client_a.close)

        def consume_messages():
            try:
                with client_a.messages.stream(model="anthropic/claude-test", max_tokens=50,
                                              messages=[{"role": "user", "content": "hi"}]) as s:
                    for _ in s.text_stream:
                        pass
            except anthropic.APIStatusError as e:
                return e
            return None

        error = yield deferToThread(consume_messages)
        self.assertIsInstance(error, anthropic.APIStatusError)
        self.assertEqual(error.body["error"]["type"], "api_error")
        self.assertEqual(error.body["error"]["message"], "upstream stream idle timeout: provider 'anthropic' sent nothing for 1 s")


class HistoryParityTests(ParityCase):
    """Reference: TestAPIHistoryEndpointAllowsAgentAndDedicatedReplayAuth, ...SelfRouteAllowsAgentBearer,
    ...AllowsAdminTokenAndRejectsWrongBearer."""

    @defer.inlineCallbacks
    def test_agent_bearer_replay_tokens_and_wrong_bearers(self):
        # Seed the agent's context and history before the daemon starts (as the reference's tests record entries).
        base = os.path.abspath(self.mktemp())
        auth = os.path.join(base, "context", AGENT, "service-auth")
        os.makedirs(auth)
        for name, doc in (
            ("cllama-history.json", {"service": "cllama-history", "auth_type": "bearer", "token": REPLAY_TOKEN,
                                     "principal": "team-memory"}),
            ("team-memory.json", {"service": "team-memory", "auth_type": "bearer", "token": MEMORY_TOKEN}),
        ):
            with open(os.path.join(auth, name), "w") as f:
                json.dump(doc, f)
        os.makedirs(os.path.join(base, "history", AGENT), mode=0o700)
        entries = [{"version": 1, "id": f"turn-{n}", "ts": f"2026-03-31T12:0{n}:00.000Z", "claw_id": AGENT,
                    "path": "/v1/chat/completions", "response": {"format": "json", "json": {}}} for n in range(2)]
        with open(os.path.join(base, "history", AGENT, "history.jsonl"), "w") as f:
            f.writelines(json.dumps(entry, separators=(",", ":")) + "\n" for entry in entries)
        d = yield Daemon(self, {AGENT: {}, "other": {}}, base=base).start()

        @defer.inlineCallbacks
        def read(path, token=None, headers=None):
            response = yield d.get(path, token, headers)
            body = yield response.content()
            return response.code, body

        def ids(body):
            return [json.loads(line)["id"] for line in body.splitlines()]

        # /history/<agent>: the replay token, the agent's own bearer, the operator token.
        code, body = yield read(f"/history/{AGENT}?limit=1", REPLAY_TOKEN)
        self.assertEqual((code, ids(body)), (200, ["turn-0"]))
        code, body = yield read(f"/history/{AGENT}?after=2026-03-31T12:00:00Z", f"{AGENT}:{SECRET}")
        self.assertEqual((code, ids(body)), (200, ["turn-1"]))
        code, body = yield read(f"/history/{AGENT}", UI_TOKEN)
        self.assertEqual((code, ids(body)), (200, ["turn-0", "turn-1"]))
        code, body = yield read(f"/history/{AGENT}", headers={"x-api-key": REPLAY_TOKEN})
        self.assertEqual((code, ids(body)), (200, ["turn-0", "turn-1"]))
        # Another service's token, a wrong bearer, another agent's: 403, as the reference answers.
        forbidden = {"error": {"message": "this token may not read this history", "type": "permission_error",
                               "code": "invalid_credentials"}}
        for token in (MEMORY_TOKEN, "wrong-token", f"other:{SECRET}"):
            code, body = yield read(f"/history/{AGENT}", token)
            self.assertEqual((code, json.loads(body)), (403, forbidden), token)
        # No token: 401.  An agent that does not exist: 403 too (better: no enumeration).
        code, body = yield read(f"/history/{AGENT}")
        self.assertEqual((code, json.loads(body)["error"]["code"]), (401, "missing_credentials"))
        code, body = yield read("/history/ghost", REPLAY_TOKEN)
        self.assertEqual(code, 403)

        # /history: the caller's own, with its own bearer only.
        code, body = yield read("/history", f"{AGENT}:{SECRET}")
        self.assertEqual((code, ids(body)), (200, ["turn-0", "turn-1"]))
        code, body = yield read("/history?limit=1&after=2026-03-31T12:00:00Z", f"{AGENT}:{SECRET}")
        self.assertEqual((code, ids(body)), (200, ["turn-1"]))
        code, body = yield read("/history", "wrong:secret")
        self.assertEqual(code, 403)
        for token in (REPLAY_TOKEN, UI_TOKEN, None):
            code, body = yield read("/history", token)
            self.assertEqual(code, 401, token)


class CompressedAnswerParityTests(ParityCase):
    """Reference: TestHandlerRecordsCostFromGzipJSONResponse, for JSON and streams on both surfaces."""

    @defer.inlineCallbacks
    def test_gzip_and_deflate_answers_are_metered_and_relayed_decoded(self):
        d = yield Daemon(self, {AGENT: {}}).start()
        # The agent asks for gzip (as every SDK does): it gets the plain body.
        chat_headers = {"authorization": f"Bearer {AGENT}:{SECRET}", "accept-encoding": "gzip"}
        chat = {"model": "openai/gpt-test", "messages": [{"role": "user", "content": "hi"}]}

        # JSON, gzip: usage read, not estimated.
        plain = json.dumps(openai_completion("hello", "gpt-test", 90, 20)).encode()
        d.fake.enqueue(Reply(raw=gzip.compress(plain), headers={"content-type": "application/json",
                                                                 "content-encoding": "gzip"}))
        response, body = yield d.raw_post("/v1/chat/completions", chat, chat_headers)
        self.assertEqual((response.code, body), (200, plain))
        self.assertIsNone(response.headers.getRawHeaders("content-encoding"))
        self.assertEqual(response.length, len(plain))  # its Content-Length, the plain body's
        self.assertIsNone(d.fake.received[-1].header("accept-encoding"))  # the agent's is not forwarded
        expected = price("openai", "gpt-test", 90, 20)
        self.assertAlmostEqual(float(response.headers.getRawHeaders("x-cllama-cost-usd")[0]), expected)
        [line] = [line for line in (yield d.lines_of(response)) if line["type"] == "response"]
        self.check(line, "response", tokens_in=90, tokens_out=20, estimated=False, priced=True)
        self.assertAlmostEqual(line["cost_usd"], expected)

        # A stream, gzip in flushed blocks: decoded as it comes, its usage chunk read (and hidden).
        events = b"".join(openai_sse_events(openai_stream_chunks(["Hello", " there"], "gpt-test", 12, 3)))
        compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        blocks = [compressor.compress(events[i:i + 64]) + compressor.flush(zlib.Z_SYNC_FLUSH)
                  for i in range(0, len(events), 64)] + [compressor.flush()]
        d.fake.enqueue(Reply(sse=blocks, headers={**SSE, "content-encoding": "gzip"}))
        response, body = yield d.raw_post("/v1/chat/completions", dict(chat, stream=True), chat_headers)
        self.assertEqual(response.code, 200)
        self.assertIsNone(response.headers.getRawHeaders("content-encoding"))
        chunks = [json.loads(data) for _, data in parse_sse(body) if data != "[DONE]"]
        self.assertEqual("".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]), "Hello there")
        self.assertTrue(all(c["choices"] for c in chunks))  # the usage-only chunk was not asked for
        [line] = [line for line in (yield d.lines_of(response)) if line["type"] == "response"]
        self.check(line, "response", tokens_in=12, tokens_out=3, estimated=False, stream=True)

        # The messages surface, deflate.
        message = anthropic_message("hi there", "claude-test", 30, 4)
        d.fake.enqueue(Reply(raw=zlib.compress(json.dumps(message).encode()),
                             headers={"content-type": "application/json", "content-encoding": "deflate"}))
        response, body = yield d.raw_post("/v1/messages", {
            "model": "anthropic/claude-test", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}],
        }, {"x-api-key": f"{AGENT}:{SECRET}", "anthropic-version": "2023-06-01", "accept-encoding": "gzip, deflate"})
        self.assertEqual((response.code, json.loads(body)), (200, message))
        self.assertIsNone(response.headers.getRawHeaders("content-encoding"))
        [line] = [line for line in (yield d.lines_of(response)) if line["type"] == "response"]
        self.check(line, "response", tokens_in=30, tokens_out=4, estimated=False)
        self.assertAlmostEqual(line["cost_usd"], price("anthropic", "claude-test", 30, 4))

        # A provider's error, gzip: passed through as the provider said it, decoded.
        error = openai_error("bad thing", "invalid_request_error", "bad_thing")
        d.fake.enqueue(Reply(status=400, raw=gzip.compress(json.dumps(error).encode()),
                             headers={"content-type": "application/json", "content-encoding": "gzip"}))
        response, body = yield d.raw_post("/v1/chat/completions", chat, chat_headers)
        self.assertEqual((response.code, json.loads(body)), (400, error))
        self.assertIsNone(response.headers.getRawHeaders("content-encoding"))
