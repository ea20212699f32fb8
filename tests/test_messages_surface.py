"""
The Anthropic Messages surface, first class: the official anthropic SDK as
the agent against an anthropic-format fake provider; token counting; the
model list in both shapes.
"""


import anthropic
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cllama_tx.testing import (
    Reply,
    anthropic_message,
    anthropic_sse_events,
    anthropic_stream_events,
)
from tests.support import AGENT, PROVIDER_KEY, SECRET, ProxyHarness, write_agent

SSE = {"content-type": "text/event-stream"}
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


class AnthropicSdkTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield ProxyHarness(self, fake_providers=("anthropic", "openai")).start()
        # The Anthropic SDK sends its key as x-api-key.
        self.client = anthropic.Anthropic(
            base_url=self.h.base_url, api_key=f"{AGENT}:{SECRET}", max_retries=0, timeout=20
        )
        self.addCleanup(self.client.close)

    @defer.inlineCallbacks
    def test_non_stream(self):
        self.h.fake.enqueue(Reply(json=anthropic_message("Bonjour!", "claude-test", 12, 4)))

        def call():
            return self.client.messages.create(
                model="anthropic/claude-test",
                max_tokens=64,
                messages=[{"role": "user", "content": "Say hello in French"}],
            )

        message = yield deferToThread(call)
        self.assertEqual(message.content[0].text, "Bonjour!")
        self.assertEqual((message.usage.input_tokens, message.usage.output_tokens), (12, 4))
        received = self.h.fake.received[0]
        self.assertEqual(received.path, "/v1/messages")
        self.assertEqual(received.json["model"], "claude-test")
        self.assertEqual(received.header("x-api-key"), PROVIDER_KEY)
        self.assertIsNone(received.header("authorization"))
        # The agent's own anthropic-version travels on (the SDK sends one).
        self.assertRegex(received.header("anthropic-version"), r"^\d{4}-\d\d-\d\d$")

    @defer.inlineCallbacks
    def test_stream(self):
        events = anthropic_stream_events(["Bon", "jour", "!"], "claude-test", 12, 4)
        self.h.fake.enqueue(Reply(sse=anthropic_sse_events(events), headers=SSE, delay_between_chunks=0.005))

        def call():
            with self.client.messages.stream(
                model="anthropic/claude-test",
                max_tokens=64,
                messages=[{"role": "user", "content": "Say hello in French"}],
            ) as stream:
                text = "".join(stream.text_stream)
                return text, stream.get_final_message()

        text, final = yield deferToThread(call)
        self.assertEqual(text, "Bonjour!")
        self.assertEqual(final.usage.output_tokens, 4)
        self.assertEqual(final.stop_reason, "end_turn")

    @defer.inlineCallbacks
    def test_tool_use_round_trip(self):
        tool_use = {"id": "toolu_01", "name": "get_weather", "input": {"city": "Paris"}}
        self.h.fake.enqueue(
            Reply(json=anthropic_message(None, "claude-test", 30, 12, tool_uses=[tool_use])),
            Reply(json=anthropic_message("It is sunny in Paris.", "claude-test", 60, 8)),
        )

        def call():
            messages = [{"role": "user", "content": "Weather in Paris?"}]
            first = self.client.messages.create(
                model="anthropic/claude-test", max_tokens=64, tools=[WEATHER_TOOL], messages=messages
            )
            use = [b for b in first.content if b.type == "tool_use"][0]
            messages += [
                {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]},
            ]
            second = self.client.messages.create(
                model="anthropic/claude-test", max_tokens=64, tools=[WEATHER_TOOL], messages=messages
            )
            return first, use, second

        first, use, second = yield deferToThread(call)
        self.assertEqual(first.stop_reason, "tool_use")
        self.assertEqual((use.name, use.input), ("get_weather", {"city": "Paris"}))
        self.assertEqual(second.content[0].text, "It is sunny in Paris.")
        sent = self.h.fake.received[1].json
        self.assertEqual(sent["messages"][2]["content"][0]["tool_use_id"], "toolu_01")
        self.assertEqual(sent["tools"][0]["name"], "get_weather")

    @defer.inlineCallbacks
    def test_errors_reach_the_sdk_typed(self):
        bad = anthropic.Anthropic(base_url=self.h.base_url, api_key=f"{AGENT}:wrong", max_retries=0)
        self.addCleanup(bad.close)

        def call():
            return bad.messages.create(
                model="anthropic/claude-test", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )

        error = yield self.assertFailure(deferToThread(call), anthropic.PermissionDeniedError)
        self.assertEqual(error.status_code, 403)
        self.assertEqual(error.body["error"]["type"], "permission_error")

    @defer.inlineCallbacks
    def test_count_tokens_is_forwarded_and_never_billed(self):
        self.h.fake.enqueue(Reply(json={"input_tokens": 17}))

        def call():
            return self.client.messages.count_tokens(
                model="anthropic/claude-test", messages=[{"role": "user", "content": "count me"}]
            )

        counted = yield deferToThread(call)
        self.assertEqual(counted.input_tokens, 17)
        received = self.h.fake.received[0]
        self.assertEqual(received.path, "/v1/messages/count_tokens")
        self.assertEqual(received.json["model"], "claude-test")
        yield self.h.committed()
        self.assertEqual((yield self.h.ledger_rows()), [])
        line = [entry for entry in self.h.audit_lines() if entry["type"] == "response"][0]
        self.assertEqual(line["cost_usd"], 0.0)

    @defer.inlineCallbacks
    def test_anthropic_beta_is_passed_on(self):
        self.h.fake.enqueue(Reply(json=anthropic_message("ok", "claude-test", 1, 1)))
        response = yield self.h.post(
            "/v1/messages",
            {"model": "anthropic/claude-test", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
            headers={"anthropic-version": ["2023-06-01"], "anthropic-beta": ["prompt-caching-2024-07-31"]},
        )
        yield response.content()
        self.assertEqual(self.h.fake.received[0].header("anthropic-beta"), "prompt-caching-2024-07-31")


class ModelListTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield ProxyHarness(self, fake_providers=("openai",)).start()

    @defer.inlineCallbacks
    def test_catalog_models_in_openai_shape(self):
        response = yield self.h.http.get(
            self.h.base_url + "/v1/models", headers={"Authorization": f"Bearer {AGENT}:{SECRET}"}
        )
        doc = yield response.json()
        self.assertEqual(doc["object"], "list")
        ids = [m["id"] for m in doc["data"]]
        self.assertIn("openai/gpt-4o-mini", ids)
        self.assertTrue(all(i.startswith("openai/") for i in ids), ids)  # only configured providers
        self.assertEqual(doc["data"][0]["object"], "model")
        self.assertEqual(doc["data"][0]["owned_by"], "openai")

    @defer.inlineCallbacks
    def test_policy_models_in_anthropic_shape(self):
        write_agent(
            self.h.context_root,
            "scoped",
            SECRET,
            model_policy={
                "mode": "clamp",
                "allowed": [
                    {"slot": "primary", "ref": "anthropic/claude-sonnet-4-5"},
                    {"slot": "fallback", "ref": "openai/gpt-4o-mini"},
                ],
            },
        )
        response = yield self.h.http.get(
            self.h.base_url + "/v1/models",
            headers={"x-api-key": f"scoped:{SECRET}", "anthropic-version": "2023-06-01"},
        )
        doc = yield response.json()
        self.assertEqual([m["id"] for m in doc["data"]], ["anthropic/claude-sonnet-4-5", "openai/gpt-4o-mini"])
        self.assertEqual(doc["data"][0]["type"], "model")
        self.assertEqual((doc["has_more"], doc["first_id"]), (False, "anthropic/claude-sonnet-4-5"))

    @defer.inlineCallbacks
    def test_models_need_credentials(self):
        response = yield self.h.http.get(self.h.base_url + "/v1/models", headers={"anthropic-version": "2023-06-01"})
        self.assertEqual(response.code, 401)
        body = yield response.json()
        self.assertEqual(body["type"], "error")



