"""
The official OpenAI Python SDK as the agent: what it parses must be what the
provider said.  The SDK is synchronous, so it runs in a thread while the
reactor serves the proxy and the fake provider.
"""

import openai
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cllama_tx.testing import Reply, openai_completion, openai_sse_events, openai_stream_chunks
from tests.support import AGENT, PROVIDER_KEY, SECRET, ProxyHarness


class OpenAISdkTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield ProxyHarness(self).start()
        self.client = openai.OpenAI(
            base_url=self.h.base_url + "/v1", api_key=f"{AGENT}:{SECRET}", max_retries=0, timeout=20
        )
        self.addCleanup(self.client.close)

    @defer.inlineCallbacks
    def test_non_stream(self):
        self.h.fake.enqueue(Reply(json=openai_completion("Paris.", "gpt-4o-mini", 14, 2, cached_tokens=4)))

        def call():
            return self.client.chat.completions.create(
                model="openai/gpt-4o-mini",
                messages=[{"role": "user", "content": "Capital of France?"}],
            )

        completion = yield deferToThread(call)
        self.assertEqual(completion.choices[0].message.content, "Paris.")
        self.assertEqual(completion.usage.prompt_tokens, 14)
        self.assertEqual(completion.usage.completion_tokens, 2)
        self.assertEqual(completion.usage.prompt_tokens_details.cached_tokens, 4)
        [received] = self.h.fake.received
        self.assertEqual(received.json["model"], "gpt-4o-mini")
        self.assertEqual(received.header("authorization"), f"Bearer {PROVIDER_KEY}")

    @defer.inlineCallbacks
    def test_stream(self):
        pieces = ["The ", "capital ", "is ", "Paris."]
        chunks = openai_stream_chunks(pieces, "gpt-4o-mini")
        self.h.fake.enqueue(
            Reply(sse=openai_sse_events(chunks), headers={"content-type": "text/event-stream"}, delay_between_chunks=0.01)
        )

        def call():
            stream = self.client.chat.completions.create(
                model="openai/gpt-4o-mini",
                messages=[{"role": "user", "content": "Capital of France?"}],
                stream=True,
            )
            return [chunk for chunk in stream]

        received_chunks = yield deferToThread(call)
        text = "".join(c.choices[0].delta.content or "" for c in received_chunks if c.choices)
        self.assertEqual(text, "The capital is Paris.")
        self.assertEqual([c for c in received_chunks if c.choices][-1].choices[0].finish_reason, "stop")
        # The usage-only chunk the proxy asked for is not shown to an agent
        # that did not ask for it; every other chunk arrives.
        self.assertEqual(len(received_chunks), len(chunks) - 1)
        self.assertTrue(all(c.choices for c in received_chunks))
        self.assertTrue(self.h.fake.received[0].json["stream_options"]["include_usage"])

    @defer.inlineCallbacks
    def test_sdk_sees_proxy_errors_as_typed_exceptions(self):
        bad = openai.OpenAI(base_url=self.h.base_url + "/v1", api_key=f"{AGENT}:wrong", max_retries=0)
        self.addCleanup(bad.close)

        def call():
            return bad.chat.completions.create(
                model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )

        error = yield self.assertFailure(deferToThread(call), openai.PermissionDeniedError)
        self.assertEqual(error.status_code, 403)
        self.assertEqual(error.code, "invalid_credentials")
        self.assertEqual(self.h.fake.received, [])
