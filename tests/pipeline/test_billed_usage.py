"""
billed_usage, the rule that decides what a settled exchange is billed for:
every way a stream ends, without a reactor.
"""

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting.usage import estimate_prompt_tokens
from cllama_tx.pipeline.metering import AGENT_STALLED, CLIENT_CLOSED, Exchange, billed_usage
from cllama_tx.pipeline.proxy import Surface
from cllama_tx.store.records import Usage

CHAT = Surface("chat", "/v1/chat/completions", "openai", "openai")
COUNT = Surface("count", "/v1/messages/count_tokens", "anthropic", "anthropic", billable=False)
BODY = {"model": "m", "messages": [{"role": "user", "content": "x" * 40}]}
PROMPT = estimate_prompt_tokens(BODY, "openai")


def exchange(**fields) -> Exchange:
    ex = Exchange("r", 0.0, CHAT, original=BODY, upstream_called=True, stream=True)
    for name, value in fields.items():
        setattr(ex, name, value)
    return ex


class BilledUsageTests(SynchronousTestCase):
    def test_final_usage_is_the_bill_however_the_stream_ended(self):
        reported = Usage(input_tokens=30, output_tokens=9, seen=True)
        for status, delivered in ((200, False), (502, True), (504, True), (AGENT_STALLED, True), (CLIENT_CLOSED, False)):
            usage, estimated = billed_usage(exchange(usage=reported, usage_final=True, output_chars=400, delivered=delivered), status)
            self.assertEqual((usage, estimated), (reported, False), status)

    def test_no_usage_estimates_both_sides(self):
        for status in (200, 502, 504, AGENT_STALLED, CLIENT_CLOSED):
            usage, estimated = billed_usage(
                exchange(usage=Usage(), usage_final=False, output_chars=40, unmetered_bytes=9, delivered=status != 200), status
            )
            self.assertEqual((usage.input_tokens, usage.output_tokens, estimated), (PROMPT, 10 + 3, True), status)

    def test_partial_usage_keeps_the_input_and_raises_the_output(self):
        """Anthropic's message_start: input 25 and a placeholder output of 1."""
        start = Usage(input_tokens=25, output_tokens=1, cache_read_tokens=5, seen=True)
        usage, estimated = billed_usage(exchange(usage=start, usage_final=False, output_chars=400, delivered=True), 502)
        self.assertEqual((usage.input_tokens, usage.cache_read_tokens, usage.output_tokens, estimated), (25, 5, 100, True))
        # The provider's part is kept when it is the larger.
        big = Usage(input_tokens=25, output_tokens=500, seen=True)
        usage, _ = billed_usage(exchange(usage=big, usage_final=False, output_chars=400, delivered=True), 502)
        self.assertEqual(usage.output_tokens, 500)
        self.assertEqual(start.output_tokens, 1)  # the tap's own count is not changed

    def test_a_json_body_usage_is_final(self):
        reported = Usage(input_tokens=3, output_tokens=2, seen=True)
        usage, estimated = billed_usage(exchange(usage=reported, stream=False), 200)
        self.assertEqual((usage, estimated), (reported, False))

    def test_errors_before_anything_reached_the_agent_are_not_billed(self):
        for status in (400, 429, 502, 504):
            usage, estimated = billed_usage(exchange(usage=None, output_chars=0, delivered=False), status)
            self.assertEqual((usage, estimated), (Usage(), False), status)

    def test_nothing_billed_without_an_upstream_call_or_on_a_free_surface(self):
        self.assertEqual(billed_usage(exchange(upstream_called=False), 200), (Usage(), False))
        free = exchange(output_chars=40)
        free.surface = COUNT
        self.assertEqual(billed_usage(free, 200), (Usage(), False))
