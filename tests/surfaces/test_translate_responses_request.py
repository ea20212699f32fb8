"""
Responses requests as chat and Anthropic requests (and the adapter's chat
requests as Responses ones): every row of the tables in
docs/TRANSLATION.md that decides something, carried, mapped, dropped or
refused by name.  The translated chat bodies are checked with the openai
SDK's request types, the Anthropic ones with the anthropic SDK's.
"""

from __future__ import annotations

import anthropic.types
import pydantic
from openai.types.chat import completion_create_params
from openai.types.responses import response_create_params
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.providers.model_limits import traits_for
from cllama_tx.surfaces.translate_common import UntranslatableRequest
from cllama_tx.surfaces.translate_responses_request import (
    responses_to_chat_request,
    responses_to_messages_request,
)
from cllama_tx.surfaces.translate_responses_upstream import chat_to_responses_request

CHAT_REQUEST = pydantic.TypeAdapter(completion_create_params.CompletionCreateParamsNonStreaming)
RESPONSES_REQUEST = pydantic.TypeAdapter(response_create_params.ResponseCreateParamsNonStreaming)
MESSAGES_REQUEST = pydantic.TypeAdapter(anthropic.types.MessageCreateParams)

FUNCTION = {"type": "function", "name": "run", "description": "Run a command",
            "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}, "strict": False}

#: What Codex CLI sends (its shape, trimmed): developer messages, namespaced
#: tools, a hosted search tool, reasoning summaries, encrypted reasoning.
CODEX = {
    "model": "claude-sonnet-4-5",
    "instructions": "You are Codex.",
    "input": [
        {"type": "message", "id": "msg_1", "role": "developer", "content": [{"type": "input_text", "text": "Rules."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "List files."}]},
    ],
    "tools": [
        FUNCTION,
        {"type": "namespace", "name": "agents_v1", "description": "Sub-agents.", "tools": [
            {"type": "function", "name": "spawn", "description": "Spawn one", "strict": False,
             "parameters": {"type": "object", "properties": {}}},
        ]},
        {"type": "web_search", "external_web_access": False},
    ],
    "tool_choice": "auto",
    "parallel_tool_calls": True,
    "reasoning": {"summary": "auto"},
    "store": False,
    "stream": True,
    "include": ["reasoning.encrypted_content"],
    "prompt_cache_key": "thread-1",
    "client_metadata": {"turn_id": "t1"},
}


def refused(call, *args, **kwargs) -> list[str]:
    try:
        call(*args, **kwargs)
    except UntranslatableRequest as e:
        return e.params
    raise AssertionError("not refused")


class ToChat(SynchronousTestCase):
    def test_codex_turn(self):
        translated = responses_to_chat_request(CODEX)
        chat = translated.request
        CHAT_REQUEST.validate_python({k: v for k, v in chat.items() if k != "stream"})
        self.assertEqual(chat["messages"], [
            {"role": "system", "content": "You are Codex."},
            {"role": "system", "content": "Rules."},
            {"role": "user", "content": [{"type": "text", "text": "List files."}]},
        ])
        self.assertEqual([t["function"]["name"] for t in chat["tools"]], ["run", "agents_v1__spawn"])
        self.assertEqual((chat["tool_choice"], chat["parallel_tool_calls"]), ("auto", True))
        self.assertEqual(chat["stream_options"], {"include_usage": True})
        self.assertEqual(
            sorted(translated.dropped),
            ["client_metadata", "include.reasoning.encrypted_content", "prompt_cache_key", "reasoning.summary",
             "tools[2].type=web_search"],
        )
        self.assertEqual(translated.tools.split("agents_v1__spawn"), ("agents_v1", "spawn"))
        for name in ("store", "prompt_cache_key", "client_metadata", "include", "reasoning"):
            self.assertNotIn(name, chat)

    def test_a_tool_loop_in_items(self):
        doc = {"model": "m", "input": [
            {"role": "user", "content": "Weather?"},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
            {"type": "function_call", "call_id": "c1", "name": "spawn", "namespace": "agents_v1", "arguments": "{}"},
            {"type": "function_call", "call_id": "c2", "name": "run", "arguments": '{"cmd": "ls"}'},
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
            {"type": "function_call_output", "call_id": "c1", "output": "spawned"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "a.txt"}]},
            {"role": "user", "content": [{"type": "input_image", "image_url": "https://x/y.png", "detail": "low"}]},
        ]}
        translated = responses_to_chat_request(doc)
        self.assertEqual(translated.request["messages"], [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "agents_v1__spawn", "arguments": "{}"}},
                {"id": "c2", "type": "function", "function": {"name": "run", "arguments": '{"cmd": "ls"}'}},
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "spawned"},
            {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "a.txt"}]},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}]},
        ])
        self.assertEqual(translated.dropped, ("input.type=reasoning",))

    def test_mapped_settings(self):
        chat = responses_to_chat_request({
            "model": "m", "input": "x", "max_output_tokens": 99, "temperature": 0.2, "top_p": 0.9,
            "user": "u", "safety_identifier": "s", "service_tier": "flex", "truncation": "disabled",
            "text": {"format": {"type": "json_schema", "name": "t", "schema": {"type": "object"}, "strict": True},
                     "verbosity": "low"},
            "reasoning": {"effort": "minimal"}, "tool_choice": {"type": "function", "name": "run"},
            "tools": [FUNCTION], "top_logprobs": 0, "background": False,
        }, max_tokens_field="max_tokens").request
        CHAT_REQUEST.validate_python(chat)
        self.assertEqual(chat["max_tokens"], 99)
        self.assertEqual(chat["response_format"], {"type": "json_schema", "json_schema": {"name": "t", "schema": {"type": "object"}, "strict": True}})
        self.assertEqual((chat["verbosity"], chat["reasoning_effort"]), ("low", "minimal"))
        self.assertEqual(chat["tool_choice"], {"type": "function", "function": {"name": "run"}})
        self.assertEqual((chat["user"], chat["safety_identifier"], chat["service_tier"]), ("u", "s", "flex"))

    def test_refused_by_name(self):
        self.assertEqual(
            refused(responses_to_chat_request, {
                "model": "m", "input": [{"type": "item_reference", "id": "x"}, {"role": "user", "content": [
                    {"type": "input_file", "file_id": "f"}]}],
                "tools": [{"type": "file_search"}, {"type": "custom", "name": "c"}],
                "conversation": "conv_1", "prompt": {"id": "p"}, "background": True, "top_logprobs": 2,
                "include": ["message.output_text.logprobs"], "tool_choice": {"type": "allowed_tools"},
                "max_tool_calls": 3, "previous_response_id": "resp_unknown", "frobnicate": 1,
            }),
            ["background", "conversation", "frobnicate", "include[0]=message.output_text.logprobs",
             "input[0].type=item_reference", "input[1].content[0].type=input_file", "max_tool_calls",
             "previous_response_id", "prompt", "tool_choice", "tools[0].type=file_search", "tools[1].type=custom",
             "top_logprobs"],
        )

    def test_namespaced_name_collision_is_refused(self):
        tools = [dict(FUNCTION, name="agents_v1__spawn"), CODEX["tools"][1]]
        self.assertEqual(refused(responses_to_chat_request, {"model": "m", "input": "x", "tools": tools}),
                         ["tools.agents_v1__spawn"])

    def test_does_not_change_its_input(self):
        import copy

        before = copy.deepcopy(CODEX)
        responses_to_chat_request(CODEX)
        responses_to_messages_request(CODEX)
        self.assertEqual(CODEX, before)


class ToAnthropic(SynchronousTestCase):
    def test_codex_turn(self):
        translated = responses_to_messages_request(CODEX)
        messages = translated.request
        MESSAGES_REQUEST.validate_python(messages)
        self.assertEqual(messages["system"], [{"type": "text", "text": "You are Codex."}, {"type": "text", "text": "Rules."}])
        self.assertEqual([t["name"] for t in messages["tools"]], ["run", "agents_v1__spawn"])
        self.assertEqual(messages["max_tokens"], 4096)
        self.assertIn("tools[2].type=web_search", translated.dropped)

    def test_output_config(self):
        schema = {"type": "object", "properties": {}}
        out = responses_to_messages_request({
            "model": "m", "input": "x", "reasoning": {"effort": "xhigh"},
            "text": {"format": {"type": "json_schema", "name": "n", "schema": schema}},
        }).request
        # The schema in Anthropic's subset (objects closed); an unknown model takes no effort: dropped.
        closed = {"type": "object", "properties": {}, "additionalProperties": False}
        self.assertEqual(out["output_config"], {"format": {"type": "json_schema", "schema": closed}})
        self.assertNotIn("thinking", out)
        adaptive = responses_to_messages_request(
            {"model": "m", "input": "x", "reasoning": {"effort": "xhigh"}}, traits=traits_for("anthropic", "claude-opus-4-6")
        ).request
        self.assertEqual((adaptive["thinking"], adaptive["output_config"]), ({"type": "adaptive"}, {"effort": "high"}))
        none = responses_to_messages_request({"model": "m", "input": "x", "reasoning": {"effort": "none"}}).request
        self.assertNotIn("output_config", none)

    def test_mapped_and_dropped_for_anthropic(self):
        """What Anthropic cannot take is mapped (a clamp, an instruction) or dropped, as from chat."""
        translated = responses_to_messages_request({
            "model": "m", "input": "x", "reasoning": {"effort": "minimal"}, "temperature": 1.5,
            "text": {"format": {"type": "json_object"}, "verbosity": "high"},
        })
        out = translated.request
        self.assertEqual(out["temperature"], 1)
        self.assertIn("JSON", out["system"])
        self.assertEqual(set(translated.dropped), {"reasoning_effort", "verbosity"})
        self.assertEqual(translated.adjusted, ("temperature: 1.5 clamped to 1, Anthropic's most",))


class ChatToResponsesUpstream(SynchronousTestCase):
    def test_carried(self):
        out = chat_to_responses_request({
            "model": "o3-pro", "max_tokens": 10, "reasoning_effort": "high", "verbosity": "low",
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}},
            "messages": [
                {"role": "developer", "content": "Rules."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url", "image_url": {"url": "https://i/x.png"}}]},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "run", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "done"},
            ],
            "tools": [{"type": "function", "function": {"name": "run", "parameters": {"type": "object"}}}],
            "tool_choice": "required", "parallel_tool_calls": False, "n": 1, "stream_options": {"include_usage": True},
        })
        RESPONSES_REQUEST.validate_python(out)
        self.assertEqual(out["input"][2], {"type": "function_call", "call_id": "c1", "name": "run", "arguments": "{}"})
        self.assertEqual(out["input"][3], {"type": "function_call_output", "call_id": "c1", "output": "done"})
        self.assertEqual(out["tools"], [{"type": "function", "name": "run", "parameters": {"type": "object"}, "strict": False}])
        self.assertEqual((out["max_output_tokens"], out["reasoning"], out["store"]), (10, {"effort": "high"}, False))
        self.assertEqual(out["text"], {"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}}, "verbosity": "low"})

    def test_refused(self):
        self.assertEqual(
            refused(chat_to_responses_request, {"model": "m", "messages": [], "stop": ["x"], "n": 2, "seed": 1,
                                                "logit_bias": {"1": 2}}),
            ["logit_bias", "n", "seed", "stop"],
        )
