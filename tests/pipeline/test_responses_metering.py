"""
Metering the Responses wire format: usage from a response object and from
a stream's terminal event (which the tap holds until the row is
committed), whatever the chunking; generated text counted for estimates;
prompts estimated from input items; and over a real proxy, an agent that
hangs up mid-stream billed by estimate, budgets reserved and refused in
OpenAI's shape.
"""

from __future__ import annotations

import json

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cllama_tx.accounting.usage import (
    SseTap,
    estimate_prompt_tokens,
    output_chars_from_json,
    usage_from_json,
)
from cllama_tx.testing import (
    Reply,
    responses_response,
    responses_sse_events,
    responses_stream_events,
)
from tests.support import SECRET, ProxyHarness, write_agent
from tests.test_stream_billing import PAYER, SSE, StallingAgent, raw_request

CALL = {"id": "call_1", "name": "run", "arguments": {"cmd": "ls"}}


class Usage(SynchronousTestCase):
    def test_json(self):
        doc = responses_response("Hello", "gpt-4.1", 100, 20, cached_tokens=60, reasoning_tokens=5)
        doc["usage"]["input_tokens_details"]["cache_write_tokens"] = 10
        usage = usage_from_json(doc, "responses")
        self.assertEqual(
            (usage.input_tokens, usage.cache_read_tokens, usage.cache_write_tokens, usage.output_tokens, usage.reasoning_tokens),
            (30, 60, 10, 20, 5),
        )
        self.assertTrue(usage.seen)
        self.assertFalse(usage_from_json({"output": []}, "responses").seen)

    def test_output_chars(self):
        doc = responses_response("Hello", "m", 1, 1, tool_calls=[CALL])
        self.assertEqual(output_chars_from_json(doc, "responses"), len("Hello") + len(json.dumps(CALL["arguments"])))

    def test_prompt_estimate_reads_input_and_instructions(self):
        short = estimate_prompt_tokens({"input": "x" * 40}, "responses")
        items = estimate_prompt_tokens(
            {"instructions": "y" * 400, "input": [{"role": "user", "content": [{"type": "input_text", "text": "x" * 40}]},
                                                 {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]},
            "responses",
        )
        self.assertGreaterEqual(short, 10)
        self.assertGreater(items, short + 100 + 1000 - 1)  # instructions and one image


class StreamTap(SynchronousTestCase):
    def body(self):
        events = responses_stream_events(["Hel", "lo"], "gpt-4.1", 40, 7, cached_tokens=8, tool_calls=[CALL])
        return b"".join(responses_sse_events(events))

    def run_tap(self, body: bytes, split: int) -> tuple[SseTap, bytes, bytes]:
        tap = SseTap("responses")
        out = b"".join(tap.feed(body[i:i + split]) for i in range(0, len(body), split)) + tap.finish()
        return tap, out, tap.held()

    def test_usage_from_the_terminal_event_which_is_held(self):
        body = self.body()
        for split in (1, 13, len(body)):
            tap, out, held = self.run_tap(body, split)
            self.assertEqual(out + held, body)
            self.assertTrue(held.startswith(b"event: response.completed"), held[:60])
            self.assertTrue(tap.usage_final)
            self.assertEqual((tap.usage.input_tokens, tap.usage.cache_read_tokens, tap.usage.output_tokens), (32, 8, 7))
            self.assertEqual(tap.output_chars, len("Hello") + len(json.dumps(CALL["arguments"])))
            self.assertEqual((tap.response_id, tap.response_model), ("resp_cllamatxfake", "gpt-4.1"))
            self.assertEqual(tap.sequence_number, 15)

    def test_cut_before_the_end_has_no_final_usage(self):
        events = responses_sse_events(responses_stream_events(["Hel", "lo"], "gpt-4.1", 40, 7))
        tap = SseTap("responses")
        for event in events[:5]:
            tap.feed(event)
        self.assertFalse(tap.usage_final)
        self.assertEqual(tap.output_chars, 3)
        self.assertEqual(tap.sequence_number, 5)

    def test_failed_and_error_events(self):
        tap = SseTap("responses")
        tap.feed(b'event: error\ndata: {"type":"error","code":"x","message":"bad","sequence_number":3}\n\n')
        self.assertEqual(tap.error_event["message"], "bad")
        self.assertEqual(tap.sequence_number, 4)


class OverTheProxy(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def connect(self, h, client):
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", h.port.getHost().port), client)
        self.addCleanup(lambda: client.transport.abortConnection())
        return client

    @defer.inlineCallbacks
    def test_agent_gone_mid_stream_is_billed_by_estimate(self):
        h = yield ProxyHarness(self).start()
        events = responses_stream_events(["abcd"] * 40, "gpt-4.1", 30, 200)
        h.fake.enqueue(Reply(sse=responses_sse_events(events), headers=SSE, delay_between_chunks=0.05))
        doc = {"model": "openai/gpt-4.1", "input": "Go", "stream": True}
        agent = yield self.connect(h, StallingAgent(raw_request(doc, path="/v1/responses"), stall=False))
        yield agent.wait_for(b'"delta":"abcd"')
        agent.transport.abortConnection()
        yield h.fake.wait_for_disconnect()
        yield h.wait_for_audit(lambda line: line.get("status_code") == 499)
        yield h.committed()
        [row] = yield h.ledger_rows()
        self.assertEqual((row["status"], row["estimated"]), (499, 1))
        self.assertGreaterEqual(row["input_tokens"], 1)  # estimated from the input
        self.assertGreaterEqual(row["output_tokens"], 1)
        self.assertLess(row["output_tokens"], 40)  # what was relayed, not the whole answer

    @defer.inlineCallbacks
    def test_budget_reserves_max_output_tokens_and_refuses_in_openai_shape(self):
        h = yield ProxyHarness(self, fake_providers=("openai", "xai")).start()
        write_agent(h.context_root, PAYER, SECRET, budget={"limit_usd": 0.001, "window": "24h", "behavior": "hard_stop"})
        doc = {"model": "xai/grok-4", "input": "Hi", "max_output_tokens": 100000}
        response = yield h.post("/v1/responses", doc, token=f"{PAYER}:{SECRET}")
        self.assertEqual(response.code, 429)
        body = yield response.json()
        self.assertEqual(body["error"]["code"], "budget_exceeded")
        self.assertEqual(body["budget"]["behavior"], "hard_stop")
        self.assertEqual(h.fake.received, [])
