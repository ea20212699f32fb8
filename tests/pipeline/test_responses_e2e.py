"""
The Responses surface end to end: the official openai SDK's
C{client.responses.create} and C{.stream} through a real proxy on loopback
to fake providers: natively to OpenAI (passthrough), translated to a chat
provider and to Anthropic (JSON, streams, function tools, a two-turn
conversation with C{previous_response_id}), metered and audited.
"""

from __future__ import annotations

import json

import openai
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cllama_tx.testing import (
    Reply,
    anthropic_message,
    anthropic_sse_events,
    anthropic_stream_events,
    openai_completion,
    openai_sse_events,
    openai_stream_chunks,
    parse_sse,
    responses_response,
    responses_sse_events,
    responses_stream_events,
)
from tests.support import AGENT, PROVIDER_KEY, SECRET, ProxyHarness

SSE = {"content-type": "text/event-stream"}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": False,
}


class Harnessed(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield ProxyHarness(self, fake_providers=("openai", "anthropic", "xai")).start()
        self.client = openai.OpenAI(
            base_url=self.h.base_url + "/v1", api_key=f"{AGENT}:{SECRET}", max_retries=0, timeout=20
        )
        self.addCleanup(self.client.close)

    def interventions(self, name):
        return [line for line in self.h.audit_lines() if line.get("intervention") == name]

    @defer.inlineCallbacks
    def rows(self):
        yield self.h.committed()
        rows = yield self.h.ledger_rows()
        return rows


class NativePassthrough(Harnessed):
    """OpenAI serves the Responses API: the request goes as it came, key swapped."""

    @defer.inlineCallbacks
    def test_json(self):
        self.h.fake.enqueue(Reply(json=responses_response("Hi there.", "gpt-4.1", 20, 4, cached_tokens=8)))
        response = yield deferToThread(
            self.client.responses.create, model="openai/gpt-4.1", input="Hello", instructions="Be brief.",
            previous_response_id="resp_openai_owns_this",
        )
        self.assertEqual(response.output_text, "Hi there.")
        received = self.h.fake.received[0]
        self.assertEqual(received.path, "/v1/responses")
        self.assertEqual(received.header("authorization"), f"Bearer {PROVIDER_KEY}")
        self.assertNotIn(SECRET, json.dumps(received.headers))
        # The body as sent, the model's provider prefix stripped.
        self.assertEqual(
            received.json,
            {"model": "gpt-4.1", "input": "Hello", "instructions": "Be brief.", "previous_response_id": "resp_openai_owns_this"},
        )
        self.assertEqual(self.interventions("surface_translated"), [])
        [row] = yield self.rows()
        self.assertEqual((row["provider"], row["effective_model"], row["status"]), ("openai", "gpt-4.1", 200))
        self.assertEqual((row["input_tokens"], row["cache_read_tokens"], row["output_tokens"]), (12, 8, 4))
        self.assertGreater(row["cost_usd"], 0)

    @defer.inlineCallbacks
    def test_stream_event_by_event(self):
        events = responses_stream_events(["Hel", "lo!"], "gpt-4.1", 30, 5, reasoning_tokens=2)
        self.h.fake.enqueue(Reply(sse=responses_sse_events(events), headers=SSE))

        def call():
            with self.client.responses.stream(model="openai/gpt-4.1", input="Hi") as stream:
                kinds = [event.type for event in stream]
                return kinds, stream.get_final_response()

        kinds, final = yield deferToThread(call)
        self.assertEqual(kinds, [name for name, _ in events])
        self.assertEqual(final.output_text, "Hello!")
        self.assertEqual(final.usage.output_tokens_details.reasoning_tokens, 2)
        [row] = yield self.rows()
        self.assertEqual((row["input_tokens"], row["output_tokens"], row["reasoning_tokens"]), (30, 5, 2))
        self.assertEqual(row["estimated"], 0)

    @defer.inlineCallbacks
    def test_upstream_cut_mid_stream_ends_with_error_and_failed(self):
        events = responses_stream_events(["one ", "two ", "three"], "gpt-4.1", 30, 5)
        self.h.fake.enqueue(Reply(sse=responses_sse_events(events), headers=SSE, cut_after_chunks=5))
        response = yield self.h.post("/v1/responses", {"model": "openai/gpt-4.1", "input": "Hi", "stream": True})
        body = yield response.content()
        parsed = parse_sse(body)
        names = [name for name, _ in parsed]
        self.assertEqual(names[-2:], ["error", "response.failed"])
        error = json.loads(parsed[-2][1])
        failed = json.loads(parsed[-1][1])
        self.assertEqual(error["code"], "upstream_interrupted")
        # Numbered on after what the agent got; the response it belongs to.
        self.assertEqual((error["sequence_number"], failed["sequence_number"]), (5, 6))
        self.assertEqual(failed["response"]["id"], "resp_cllamatxfake")
        self.assertEqual(failed["response"]["status"], "failed")
        [row] = yield self.rows()
        self.assertEqual(row["status"], 502)
        self.assertEqual(row["estimated"], 1)  # billed by estimate: part of it reached the agent
        self.assertGreater(row["output_tokens"], 0)


class TranslatedToChat(Harnessed):
    """xAI speaks chat completions: the proxy translates both ways."""

    @defer.inlineCallbacks
    def test_json(self):
        self.h.fake.enqueue(Reply(json=openai_completion("Hola!", "grok-4", 21, 3, cached_tokens=5)))
        response = yield deferToThread(
            self.client.responses.create, model="xai/grok-4", input="Hello", instructions="Answer in Spanish.",
            max_output_tokens=50, temperature=0.5, metadata={"task": "greet"},
        )
        self.assertEqual(response.output_text, "Hola!")
        self.assertTrue(response.id.startswith("resp_"))
        self.assertEqual(response.metadata, {"task": "greet"})
        self.assertEqual(response.instructions, "Answer in Spanish.")
        self.assertEqual((response.usage.input_tokens, response.usage.output_tokens), (21, 3))
        self.assertEqual(response.usage.input_tokens_details.cached_tokens, 5)
        received = self.h.fake.received[0]
        self.assertEqual(received.path, "/v1/chat/completions")
        self.assertEqual(
            received.json,
            {
                "model": "grok-4",
                "messages": [
                    {"role": "system", "content": "Answer in Spanish."},
                    {"role": "user", "content": "Hello"},
                ],
                "max_completion_tokens": 50,
                "temperature": 0.5,
            },
        )
        [line] = self.interventions("surface_translated")
        self.assertEqual((line["from_surface"], line["to_format"]), ("openai-responses", "openai"))
        [row] = yield self.rows()
        self.assertEqual((row["input_tokens"], row["cache_read_tokens"], row["output_tokens"]), (16, 5, 3))

    @defer.inlineCallbacks
    def test_stream(self):
        chunks = openai_stream_chunks(["Ho", "la", "!"], "grok-4", 21, 3)
        self.h.fake.enqueue(Reply(sse=openai_sse_events(chunks), headers=SSE))

        def call():
            with self.client.responses.stream(model="xai/grok-4", input="Hello") as stream:
                deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
                return deltas, stream.get_final_response()

        deltas, final = yield deferToThread(call)
        self.assertEqual(deltas, ["Ho", "la", "!"])
        self.assertEqual(final.output_text, "Hola!")
        self.assertEqual(final.status, "completed")
        self.assertEqual(final.usage.total_tokens, 24)
        self.assertTrue(self.h.fake.received[0].json["stream_options"]["include_usage"])

    @defer.inlineCallbacks
    def test_function_tools_and_a_second_turn_by_previous_response_id(self):
        call_ = {"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}
        self.h.fake.enqueue(
            Reply(json=openai_completion(None, "grok-4", 30, 12, finish_reason="tool_calls", tool_calls=[call_])),
            Reply(json=openai_completion("Sunny in Paris.", "grok-4", 60, 5)),
        )

        def conversation():
            first = self.client.responses.create(
                model="xai/grok-4", input="Weather in Paris?", tools=[WEATHER], tool_choice="auto"
            )
            [fc] = [item for item in first.output if item.type == "function_call"]
            second = self.client.responses.create(
                model="xai/grok-4", previous_response_id=first.id, tools=[WEATHER],
                input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "sunny"}],
            )
            return first, fc, second

        first, fc, second = yield deferToThread(conversation)
        self.assertEqual((fc.name, json.loads(fc.arguments), fc.call_id), ("get_weather", {"city": "Paris"}, "call_1"))
        self.assertEqual(second.output_text, "Sunny in Paris.")
        self.assertEqual(second.previous_response_id, first.id)
        sent = self.h.fake.received[1].json
        self.assertEqual(sent["tools"][0]["function"]["name"], "get_weather")
        # The first turn came back from the proxy's memory: question, call, result.
        self.assertEqual(
            sent["messages"],
            [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
                ]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
        )
        [restored] = self.interventions("conversation_restored")
        self.assertEqual((restored["previous_response_id"], restored["items"]), (first.id, 2))

    @defer.inlineCallbacks
    def test_store_false_keeps_nothing(self):
        self.h.fake.enqueue(Reply(json=openai_completion("One.", "grok-4", 5, 1)))
        first = yield deferToThread(self.client.responses.create, model="xai/grok-4", input="1", store=False)

        def follow_up():
            return self.client.responses.create(model="xai/grok-4", input="2", previous_response_id=first.id)

        failure = yield self.assertFailure(deferToThread(follow_up), openai.BadRequestError)
        self.assertEqual(failure.body["code"], "previous_response_not_found")
        self.assertEqual(failure.body["param"], "previous_response_id")
        self.assertEqual(len(self.h.fake.received), 1)

    @defer.inlineCallbacks
    def test_another_agents_response_is_not_found(self):
        from tests.support import write_agent

        self.h.fake.enqueue(Reply(json=openai_completion("Mine.", "grok-4", 5, 1)))
        first = yield deferToThread(self.client.responses.create, model="xai/grok-4", input="secret plans")
        write_agent(self.h.context_root, "other", "b" * 48)
        response = yield self.h.post(
            "/v1/responses", {"model": "xai/grok-4", "input": "and?", "previous_response_id": first.id},
            token="other:" + "b" * 48,
        )
        self.assertEqual(response.code, 400)
        body = yield response.json()
        self.assertEqual(body["error"]["code"], "previous_response_not_found")
        self.assertEqual(len(self.h.fake.received), 1)

    @defer.inlineCallbacks
    def test_untranslatable_parameter_is_refused_by_name(self):
        response = yield self.h.post(
            "/v1/responses",
            {"model": "xai/grok-4", "input": "Hi", "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]},
        )
        self.assertEqual(response.code, 400)
        body = yield response.json()
        self.assertEqual(body["error"]["code"], "untranslatable_parameters")
        self.assertIn("tools[0].type=file_search", body["error"]["message"])
        self.assertEqual(body["error"]["param"], "tools[0].type=file_search")
        self.assertEqual(self.h.fake.received, [])

    @defer.inlineCallbacks
    def test_dropped_hints_are_named_on_the_intervention(self):
        self.h.fake.enqueue(Reply(json=openai_completion("Ok.", "grok-4", 5, 1)))
        yield deferToThread(
            self.client.responses.create, model="xai/grok-4", input="Hi", prompt_cache_key="k1",
            reasoning={"summary": "auto"}, include=["reasoning.encrypted_content"],
            tools=[WEATHER, {"type": "web_search"}],
        )
        [line] = self.interventions("surface_translated")
        self.assertEqual(
            sorted(line["dropped"]),
            ["include.reasoning.encrypted_content", "prompt_cache_key", "reasoning.summary", "tools[1].type=web_search"],
        )
        sent = self.h.fake.received[0].json
        self.assertEqual([t["function"]["name"] for t in sent["tools"]], ["get_weather"])
        self.assertNotIn("prompt_cache_key", sent)


class TranslatedToAnthropic(Harnessed):
    @defer.inlineCallbacks
    def test_json(self):
        self.h.fake.enqueue(Reply(json=anthropic_message("Bonjour.", "claude-sonnet-4-5", 17, 3, cache_read_input_tokens=4)))
        response = yield deferToThread(
            self.client.responses.create, model="anthropic/claude-sonnet-4-5", input="Hello",
            instructions="French.", max_output_tokens=64,
        )
        self.assertEqual(response.output_text, "Bonjour.")
        self.assertEqual(response.usage.input_tokens, 21)
        self.assertEqual(response.usage.input_tokens_details.cached_tokens, 4)
        received = self.h.fake.received[0]
        self.assertEqual(received.path, "/v1/messages")
        self.assertEqual(received.header("x-api-key"), PROVIDER_KEY)
        self.assertEqual(
            received.json,
            {"model": "claude-sonnet-4-5", "max_tokens": 64, "system": "French.",
             "messages": [{"role": "user", "content": "Hello"}]},
        )
        [row] = yield self.rows()
        self.assertEqual((row["provider"], row["input_tokens"], row["cache_read_tokens"], row["output_tokens"]), ("anthropic", 17, 4, 3))

    @defer.inlineCallbacks
    def test_stream_with_tool_call_then_second_turn(self):
        use = {"id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}
        self.h.fake.enqueue(
            Reply(sse=anthropic_sse_events(anthropic_stream_events(["Let me check."], "claude-sonnet-4-5", 40, 15, tool_uses=[use])), headers=SSE),
            Reply(sse=anthropic_sse_events(anthropic_stream_events(["Cold."], "claude-sonnet-4-5", 80, 2)), headers=SSE),
        )

        def conversation():
            with self.client.responses.stream(
                model="anthropic/claude-sonnet-4-5", input="Weather in Oslo?", tools=[WEATHER]
            ) as stream:
                kinds = [e.type for e in stream]
                first = stream.get_final_response()
            [fc] = [item for item in first.output if item.type == "function_call"]
            with self.client.responses.stream(
                model="anthropic/claude-sonnet-4-5", previous_response_id=first.id, tools=[WEATHER],
                input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "-5C"}],
            ) as stream:
                list(stream)
                second = stream.get_final_response()
            return kinds, first, fc, second

        kinds, first, fc, second = yield deferToThread(conversation)
        self.assertEqual(kinds[:2], ["response.created", "response.in_progress"])
        self.assertEqual(kinds[-1], "response.completed")
        self.assertIn("response.function_call_arguments.delta", kinds)
        self.assertEqual(first.output_text, "Let me check.")
        self.assertEqual((fc.call_id, json.loads(fc.arguments)), ("toolu_1", {"city": "Oslo"}))
        self.assertEqual(second.output_text, "Cold.")
        sent = self.h.fake.received[1].json
        self.assertEqual(sent["messages"][0], {"role": "user", "content": "Weather in Oslo?"})
        self.assertEqual(sent["messages"][1]["content"][1]["type"], "tool_use")
        self.assertEqual(sent["messages"][2]["content"][0], {"type": "tool_result", "tool_use_id": "toolu_1", "content": "-5C"})
        rows = yield self.rows()
        self.assertEqual([(r["input_tokens"], r["output_tokens"]) for r in rows], [(40, 15), (80, 2)])

    @defer.inlineCallbacks
    def test_json_schema_and_effort_become_output_config(self):
        self.h.fake.enqueue(Reply(json=anthropic_message('{"a": 1}', "claude-opus-4-5", 10, 5)))
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False}
        yield deferToThread(
            self.client.responses.create, model="anthropic/claude-opus-4-5", input="Give a",
            text={"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}},
            reasoning={"effort": "high"},
        )
        sent = self.h.fake.received[0].json
        self.assertEqual(sent["output_config"], {"format": {"type": "json_schema", "schema": schema}, "effort": "high"})
        # Opus 4.5 thinks on a budget, below the default max_tokens.
        self.assertEqual(sent["thinking"], {"type": "enabled", "budget_tokens": 4095})

    @defer.inlineCallbacks
    def test_upstream_error_in_openai_shape(self):
        from cllama_tx.testing import anthropic_error

        self.h.fake.enqueue(Reply(status=400, json=anthropic_error("invalid_request_error", "prompt is too long")))
        response = yield self.h.post("/v1/responses", {"model": "anthropic/claude-sonnet-4-5", "input": "Hi"})
        self.assertEqual(response.code, 400)
        body = yield response.json()
        self.assertEqual(body["error"]["message"], "prompt is too long")
        self.assertEqual(body["error"]["type"], "invalid_request_error")


class UpstreamAdapter(Harnessed):
    """A chat or Messages request for a model only the Responses API serves."""

    @defer.inlineCallbacks
    def test_chat_json_for_a_catalog_responses_only_model(self):
        self.h.fake.enqueue(Reply(json=responses_response("Deep thought.", "o3-pro", 12, 30, reasoning_tokens=20)))
        completion = yield deferToThread(
            self.client.chat.completions.create, model="openai/o3-pro",
            messages=[{"role": "system", "content": "Think."}, {"role": "user", "content": "Why?"}],
            max_completion_tokens=500,
        )
        self.assertEqual(completion.choices[0].message.content, "Deep thought.")
        self.assertEqual(completion.choices[0].finish_reason, "stop")
        self.assertEqual(completion.usage.completion_tokens_details.reasoning_tokens, 20)
        received = self.h.fake.received[0]
        self.assertEqual(received.path, "/v1/responses")
        self.assertEqual(
            received.json,
            {"model": "o3-pro", "store": False, "max_output_tokens": 500, "input": [
                {"type": "message", "role": "system", "content": "Think."},
                {"type": "message", "role": "user", "content": "Why?"},
            ]},
        )
        [adapter] = self.interventions("responses_adapter")
        self.assertEqual(adapter["reason"], "the catalog says so")
        [row] = yield self.rows()
        self.assertEqual((row["effective_model"], row["output_tokens"], row["reasoning_tokens"]), ("o3-pro", 30, 20))

    @defer.inlineCallbacks
    def test_chat_stream_with_tool_call(self):
        call_ = {"id": "call_9", "name": "get_weather", "arguments": {"city": "Rome"}}
        events = responses_stream_events([], "gpt-5-codex", 50, 9, tool_calls=[call_])
        self.h.fake.enqueue(Reply(sse=responses_sse_events(events), headers=SSE))
        tool = {"type": "function", "function": {k: WEATHER[k] for k in ("name", "description", "parameters")}}

        def call():
            stream = self.client.chat.completions.create(
                model="openai/gpt-5-codex", messages=[{"role": "user", "content": "Rome?"}], tools=[tool],
                stream=True, stream_options={"include_usage": True},
            )
            return list(stream)

        chunks = yield deferToThread(call)
        arguments = "".join(
            c.choices[0].delta.tool_calls[0].function.arguments or ""
            for c in chunks if c.choices and c.choices[0].delta.tool_calls
        )
        self.assertEqual(json.loads(arguments), {"city": "Rome"})
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1], "tool_calls")
        self.assertEqual((chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens), (50, 9))
        sent = self.h.fake.received[0].json
        self.assertEqual(sent["tools"], [dict(WEATHER, strict=False)])
        [row] = yield self.rows()
        self.assertEqual((row["input_tokens"], row["output_tokens"], row["estimated"]), (50, 9, 0))

    @defer.inlineCallbacks
    def test_messages_request_through_the_adapter(self):
        import anthropic

        self.h.fake.enqueue(Reply(json=responses_response("Pro answer.", "gpt-5-pro", 9, 4)))
        client = anthropic.Anthropic(base_url=self.h.base_url, api_key=f"{AGENT}:{SECRET}", max_retries=0, timeout=20)
        self.addCleanup(client.close)
        message = yield deferToThread(
            client.messages.create, model="openai/gpt-5-pro", max_tokens=100,
            messages=[{"role": "user", "content": "Hi"}],
        )
        self.assertEqual(message.content[0].text, "Pro answer.")
        self.assertEqual((message.usage.input_tokens, message.usage.output_tokens), (9, 4))
        self.assertEqual(self.h.fake.received[0].path, "/v1/responses")

    @defer.inlineCallbacks
    def test_a_provider_that_says_responses_only_is_asked_again_that_way(self):
        hint = {"error": {"message": "This model is only supported in v1/responses and not in v1/chat/completions.",
                          "type": "invalid_request_error", "param": "model", "code": None}}
        self.h.fake.enqueue(
            Reply(status=404, json=hint),
            Reply(json=responses_response("Fine.", "o9-new", 5, 2)),
        )
        response = yield self.h.chat({"model": "openai/o9-new", "messages": [{"role": "user", "content": "Hi"}]})
        self.assertEqual(response.code, 200)
        body = yield response.json()
        self.assertEqual(body["choices"][0]["message"]["content"], "Fine.")
        self.assertEqual([r.path for r in self.h.fake.received], ["/v1/chat/completions", "/v1/responses"])
        [adapter] = self.interventions("responses_adapter")
        self.assertEqual(adapter["reason"], "the provider said so")
        [row] = yield self.rows()
        self.assertEqual((row["status"], row["output_tokens"]), (200, 2))

    @defer.inlineCallbacks
    def test_other_404s_are_passed_on(self):
        self.h.fake.enqueue(Reply(status=404, json={"error": {"message": "The model `o9` does not exist", "type": "invalid_request_error"}}))
        response = yield self.h.chat({"model": "openai/o9", "messages": [{"role": "user", "content": "Hi"}]})
        self.assertEqual(response.code, 404)
        self.assertEqual(len(self.h.fake.received), 1)
        self.assertEqual(self.interventions("responses_adapter"), [])


class SameRulesAsTheOtherSurfaces(TestCase):
    """Policy, failover before the first byte, history and the audit apply here too."""

    @defer.inlineCallbacks
    def test_failover_from_native_to_translated_before_the_first_byte(self):
        from tests.support import write_agent

        history = self.mktemp()
        h = yield ProxyHarness(self, fake_providers=("openai", "anthropic"), history_dir=history).start()
        policy = {"mode": "clamp", "allowed": [{"slot": "primary", "ref": "openai/gpt-4.1"},
                                               {"slot": "fallback", "ref": "anthropic/claude-sonnet-4-5"}]}
        write_agent(h.context_root, AGENT, SECRET, model_policy=policy)
        h.fake.enqueue(
            Reply(status=503, json={"error": {"message": "overloaded", "type": "server_error"}}),
            Reply(sse=anthropic_sse_events(anthropic_stream_events(["Fallback."], "claude-sonnet-4-5", 9, 2)), headers=SSE),
        )
        response = yield h.post("/v1/responses", {"model": "gpt-4.1", "input": "Hi", "stream": True})
        self.assertEqual(response.code, 200)
        events = [json.loads(data) for _, data in parse_sse((yield response.content()))]
        self.assertEqual(events[-1]["type"], "response.completed")
        self.assertEqual(events[-1]["response"]["output"][0]["content"][0]["text"], "Fallback.")
        self.assertEqual([r.path for r in h.fake.received], ["/v1/responses", "/v1/messages"])
        audit = h.audit_lines()
        [failover] = [line for line in audit if line["type"] == "failover"]
        self.assertEqual((failover["from_provider"], failover["to_provider"]), ("openai", "anthropic"))
        [done] = [line for line in audit if line["type"] == "response"]
        self.assertEqual((done["provider"], done["status_code"], done["tokens_out"]), ("anthropic", 200, 2))
        yield h.committed()
        entry = yield h.wait_for_audit(lambda line: line["type"] == "response")
        self.assertEqual(entry["claw_id"], AGENT)
        lines = yield h.history.read(AGENT, None, 10)
        [turn] = [json.loads(line) for line in lines]
        self.assertEqual((turn["path"], turn["effective_provider"], turn["stream"]), ("/v1/responses", "anthropic", True))
        self.assertIn(b"response.completed", turn["response"]["text"].encode())

    @defer.inlineCallbacks
    def test_reject_policy_and_missing_endpoints_are_audited(self):
        from tests.support import write_agent

        h = yield ProxyHarness(self).start()
        write_agent(h.context_root, AGENT, SECRET, model_policy={"mode": "reject", "allowed": [{"slot": "primary", "ref": "openai/gpt-4.1"}]})
        response = yield h.post("/v1/responses", {"model": "openai/o3", "input": "Hi"})
        self.assertEqual(response.code, 403)
        body = yield response.json()
        self.assertEqual(set(body["error"]), {"message", "type", "param", "code"})
        response = yield h.http.get(h.base_url + "/v1/responses/resp_1", headers={"Authorization": [f"Bearer {AGENT}:{SECRET}"]})
        self.assertEqual(response.code, 404)
        [missing] = [line for line in h.audit_lines() if line.get("path") == "/v1/responses/resp_1"]
        self.assertEqual((missing["type"], missing["claw_id"], missing["status_code"]), ("error", AGENT, 404))
        # Without /v1 too, as LiteLLM serves it; refused on the headers without credentials.
        response = yield h.post("/responses", {"model": "openai/gpt-4.1", "input": "Hi"}, token=None)
        self.assertEqual(response.code, 401)
        self.assertEqual(h.fake.received, [])


class NativeConversation(Harnessed):
    """Natively the provider keeps the conversation: previous_response_id goes along."""

    @defer.inlineCallbacks
    def test_two_turns_with_a_function_tool(self):
        call_ = {"id": "call_n1", "name": "get_weather", "arguments": {"city": "Bergen"}}
        self.h.fake.enqueue(
            Reply(json=responses_response(None, "gpt-4.1", 30, 12, id="resp_native1", tool_calls=[call_])),
            Reply(json=responses_response("Rainy.", "gpt-4.1", 60, 3, id="resp_native2")),
        )

        def conversation():
            first = self.client.responses.create(model="openai/gpt-4.1", input="Bergen?", tools=[WEATHER])
            [fc] = [item for item in first.output if item.type == "function_call"]
            second = self.client.responses.create(
                model="openai/gpt-4.1", previous_response_id=first.id, tools=[WEATHER],
                input=[{"type": "function_call_output", "call_id": fc.call_id, "output": "rain"}],
            )
            return first, fc, second

        first, fc, second = yield deferToThread(conversation)
        self.assertEqual((first.id, fc.call_id, second.output_text), ("resp_native1", "call_n1", "Rainy."))
        sent = self.h.fake.received[1].json
        self.assertEqual(sent["previous_response_id"], "resp_native1")
        self.assertEqual(sent["input"], [{"type": "function_call_output", "call_id": "call_n1", "output": "rain"}])
        self.assertEqual(sent["tools"], [WEATHER])
        self.assertEqual(self.interventions("conversation_restored"), [])

    @defer.inlineCallbacks
    def test_a_slow_agent_pauses_the_provider(self):
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        from tests.test_stream_billing import StallingAgent, raw_request

        self.h.fake.enqueue(Reply(firehose_bytes=64 * 1024 * 1024, headers=SSE))
        doc = {"model": "openai/gpt-4.1", "input": "Go", "stream": True}
        agent = StallingAgent(raw_request(doc, path="/v1/responses"))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.h.port.getHost().port), agent)
        self.addCleanup(lambda: agent.transport.abortConnection())
        yield agent.first_data
        paused = yield self.h.fake.paused  # backpressure reached the provider
        self.assertGreaterEqual(paused, 1)
        self.assertIn(b"response.output_text.delta", agent.data)
