"""
Tests for L{cllama_tx.surfaces.translate}: requests, JSON responses and
errors in both directions, checked field by field and validated with the
official SDKs' typed models.  Streams: C{test_translate_stream}; whole
tool-use conversations: C{test_translate_conversation}.

The helpers at the top (SDK validators) are imported by those modules.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pydantic
from anthropic.types import Message, RawMessageStreamEvent, message_create_params
from anthropic.types.shared import ErrorResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk, completion_create_params
from openai.types.shared import ErrorObject
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.surfaces import translate
from cllama_tx.surfaces.translate import (
    UntranslatableRequest,
    anthropic_error_to_openai,
    chat_response_to_messages,
    chat_to_messages_request,
    messages_response_to_chat,
    messages_to_chat_request,
    openai_error_to_anthropic,
)
from cllama_tx.surfaces.translate_common import Notes
from cllama_tx.surfaces.translate_request import JSON_MODE_INSTRUCTION
from cllama_tx.testing import (
    anthropic_error,
    anthropic_message,
    openai_completion,
    openai_error,
)

# ---------------------------------------------------------------------------
# SDK validation helpers (shared with the other test_translate_* modules)
# ---------------------------------------------------------------------------

_ANTHROPIC_EVENT = pydantic.TypeAdapter(RawMessageStreamEvent)
_ANTHROPIC_PARAMS = pydantic.TypeAdapter(message_create_params.MessageCreateParamsNonStreaming)
_ANTHROPIC_PARAMS_STREAM = pydantic.TypeAdapter(message_create_params.MessageCreateParamsStreaming)
_OPENAI_PARAMS = pydantic.TypeAdapter(completion_create_params.CompletionCreateParamsNonStreaming)
_OPENAI_PARAMS_STREAM = pydantic.TypeAdapter(completion_create_params.CompletionCreateParamsStreaming)


def _drain(value: Any) -> Any:
    """Validate lazily-validated iterables (the SDKs' C{Iterable} fields) too."""
    if type(value).__name__ == "ValidatorIterator":  # pydantic_core does not export the type
        return [_drain(v) for v in value]
    if isinstance(value, dict):
        return {k: _drain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_drain(v) for v in value]
    return value


def validate_anthropic_request(doc: dict) -> None:
    """Raise unless the Anthropic SDK's request params type accepts C{doc}."""
    adapter = _ANTHROPIC_PARAMS_STREAM if doc.get("stream") is True else _ANTHROPIC_PARAMS
    _drain(adapter.validate_python(doc))


def validate_openai_request(doc: dict) -> None:
    """Raise unless the OpenAI SDK's request params type accepts C{doc}."""
    adapter = _OPENAI_PARAMS_STREAM if doc.get("stream") is True else _OPENAI_PARAMS
    _drain(adapter.validate_python(doc))


def validate_anthropic_event(name: str | None, data: str) -> Any:
    """
    Validate one translated Anthropic SSE event: its C{event:} name equals
    its C{type}; message events parse as C{RawMessageStreamEvent}, errors as
    C{ErrorResponse}.  Returns the parsed model.
    """
    doc = json.loads(data)
    assert name == doc["type"], (name, doc)
    if name == "error":
        return ErrorResponse.model_validate(doc)
    return _ANTHROPIC_EVENT.validate_python(doc)


def validate_openai_data(data: str) -> Any:
    """Validate one translated OpenAI SSE data payload (a chunk or an error)."""
    doc = json.loads(data)
    if "error" in doc:
        return ErrorObject.model_validate(doc["error"])
    return ChatCompletionChunk.model_validate(doc)


# ---------------------------------------------------------------------------
# Requests: OpenAI chat -> Anthropic Messages
# ---------------------------------------------------------------------------


def chat(messages: list, **extra: Any) -> dict:
    return {"model": "claude-sonnet-4", "messages": messages, **extra}


def user(text: str = "Hi") -> dict:
    return {"role": "user", "content": text}


class ChatToMessagesRequestTests(SynchronousTestCase):
    def translate(self, doc: dict, **kw: Any) -> dict:
        original = copy.deepcopy(doc)
        out = chat_to_messages_request(doc, **kw)
        self.assertEqual(doc, original, "the input must not be modified")
        validate_anthropic_request(out)
        return out

    def test_minimal(self) -> None:
        out = self.translate(chat([user("Hello")]))
        self.assertEqual(
            out,
            {"model": "claude-sonnet-4", "max_tokens": 4096, "messages": [{"role": "user", "content": "Hello"}]},
        )

    def test_default_max_tokens(self) -> None:
        out = self.translate(chat([user()]), default_max_tokens=123)
        self.assertEqual(out["max_tokens"], 123)
        out = self.translate(chat([user()], max_tokens=None), default_max_tokens=77)
        self.assertEqual(out["max_tokens"], 77)

    def test_max_tokens(self) -> None:
        self.assertEqual(self.translate(chat([user()], max_tokens=50))["max_tokens"], 50)
        self.assertEqual(self.translate(chat([user()], max_completion_tokens=60))["max_tokens"], 60)
        both = self.translate(chat([user()], max_tokens=50, max_completion_tokens=60))
        self.assertEqual(both["max_tokens"], 60)
        self.assertNotIn("max_completion_tokens", both)

    def test_system_string(self) -> None:
        out = self.translate(chat([{"role": "system", "content": "Be brief."}, user()]))
        self.assertEqual(out["system"], "Be brief.")
        self.assertEqual(out["messages"], [{"role": "user", "content": "Hi"}])

    def test_developer_and_several_system_messages(self) -> None:
        out = self.translate(
            chat(
                [
                    {"role": "developer", "content": "Rule one."},
                    {"role": "system", "content": [{"type": "text", "text": "Rule two."}]},
                    user(),
                ]
            )
        )
        self.assertEqual(
            out["system"], [{"type": "text", "text": "Rule one."}, {"type": "text", "text": "Rule two."}]
        )

    def test_system_message_after_the_first_turn_is_hoisted(self) -> None:
        out = self.translate(
            chat([user("a"), {"role": "assistant", "content": "b"}, {"role": "system", "content": "late"}, user("c")])
        )
        self.assertEqual(out["system"], "late")
        self.assertEqual([m["role"] for m in out["messages"]], ["user", "assistant", "user"])

    def test_multi_turn_text(self) -> None:
        out = self.translate(chat([user("one"), {"role": "assistant", "content": "two"}, user("three")]))
        self.assertEqual(
            out["messages"],
            [
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": [{"type": "text", "text": "two"}]},
                {"role": "user", "content": "three"},
            ],
        )

    def test_participant_names_dropped(self) -> None:
        out = self.translate(chat([{"role": "user", "content": "hi", "name": "alice"}]))
        self.assertEqual(out["messages"], [{"role": "user", "content": "hi"}])

    def test_consecutive_user_messages_merge(self) -> None:
        out = self.translate(chat([user("one"), user("two")]))
        self.assertEqual(
            out["messages"],
            [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}],
        )

    def test_images(self) -> None:
        out = self.translate(
            chat(
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Compare"},
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
                            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                        ],
                    }
                ]
            )
        )
        self.assertEqual(
            out["messages"][0]["content"],
            [
                {"type": "text", "text": "Compare"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ],
        )

    def test_bad_images_refused(self) -> None:
        for url, name in [
            ("data:image/bmp;base64,AAAA", "messages[0].content[0].image_url"),
            ("data:image/png,notbase64", "messages[0].content[0].image_url"),
            ("ftp://example.com/x.png", "messages[0].content[0].image_url"),
        ]:
            doc = chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])
            e = self.assertRaises(UntranslatableRequest, chat_to_messages_request, doc)
            self.assertEqual(e.params, [name])

    def test_tools(self) -> None:
        schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        out = self.translate(
            chat(
                [user()],
                tools=[
                    {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": schema}},
                    {"type": "function", "function": {"name": "now"}},
                    {"type": "function", "function": {"name": "strict_one", "parameters": schema, "strict": True}},
                ],
            )
        )
        self.assertEqual(
            out["tools"],
            [
                {"name": "get_weather", "description": "Weather", "input_schema": schema},
                {"name": "now", "input_schema": {"type": "object", "properties": {}}},
                {"name": "strict_one", "input_schema": schema, "strict": True},
            ],
        )

    def test_tool_choice(self) -> None:
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        cases = [
            ("auto", {"type": "auto"}),
            ("none", {"type": "none"}),
            ("required", {"type": "any"}),
            ({"type": "function", "function": {"name": "f"}}, {"type": "tool", "name": "f"}),
        ]
        for given, expected in cases:
            out = self.translate(chat([user()], tools=tools, tool_choice=given))
            self.assertEqual(out["tool_choice"], expected)

    def test_parallel_tool_calls_false(self) -> None:
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
        out = self.translate(chat([user()], tools=tools, parallel_tool_calls=False))
        self.assertEqual(out["tool_choice"], {"type": "auto", "disable_parallel_tool_use": True})
        out = self.translate(chat([user()], tools=tools, tool_choice="required", parallel_tool_calls=False))
        self.assertEqual(out["tool_choice"], {"type": "any", "disable_parallel_tool_use": True})
        out = self.translate(chat([user()], tools=tools, tool_choice="none", parallel_tool_calls=False))
        self.assertEqual(out["tool_choice"], {"type": "none"})
        out = self.translate(chat([user()], tools=tools, parallel_tool_calls=True))
        self.assertNotIn("tool_choice", out)

    def test_assistant_tool_calls_and_results(self) -> None:
        out = self.translate(
            chat(
                [
                    user("Weather in Paris and Rome?"),
                    {
                        "role": "assistant",
                        "content": "Checking.",
                        "tool_calls": [
                            {"id": "call_a", "type": "function", "function": {"name": "w", "arguments": '{"city": "Paris"}'}},
                            {"id": "call_b", "type": "function", "function": {"name": "w", "arguments": '{"city":"Rome"}'}},
                        ],
                    },
                    {"role": "tool", "tool_call_id": "call_a", "content": "18C"},
                    {"role": "tool", "tool_call_id": "call_b", "content": [{"type": "text", "text": "21C"}]},
                ]
            )
        )
        self.assertEqual(
            out["messages"][1:],
            [
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "call_a", "name": "w", "input": {"city": "Paris"}},
                        {"type": "tool_use", "id": "call_b", "name": "w", "input": {"city": "Rome"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "call_a", "content": "18C"},
                        {"type": "tool_result", "tool_use_id": "call_b", "content": [{"type": "text", "text": "21C"}]},
                    ],
                },
            ],
        )

    def test_tool_results_then_user_text_share_one_turn(self) -> None:
        out = self.translate(
            chat(
                [
                    user("q"),
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "r"},
                    user("and now?"),
                ]
            )
        )
        self.assertEqual(
            out["messages"][2],
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "c1", "content": "r"},
                    {"type": "text", "text": "and now?"},
                ],
            },
        )
        self.assertEqual(out["messages"][1]["content"], [{"type": "tool_use", "id": "c1", "name": "f", "input": {}}])

    def test_empty_arguments_and_empty_content(self) -> None:
        out = self.translate(
            chat(
                [
                    user(),
                    {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}]},
                    {"role": "tool", "tool_call_id": "c1", "content": "ok"},
                ]
            )
        )
        self.assertEqual(out["messages"][1]["content"], [{"type": "tool_use", "id": "c1", "name": "f", "input": {}}])

    def test_tool_ids_made_acceptable(self) -> None:
        out = self.translate(
            chat(
                [
                    user(),
                    {"role": "assistant", "tool_calls": [{"id": "call:1/x", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                    {"role": "tool", "tool_call_id": "call:1/x", "content": "ok"},
                ]
            )
        )
        self.assertEqual(out["messages"][1]["content"][0]["id"], "call_1_x")
        self.assertEqual(out["messages"][2]["content"][0]["tool_use_id"], "call_1_x")

    def test_refusal_in_history_becomes_text(self) -> None:
        out = self.translate(chat([user(), {"role": "assistant", "content": None, "refusal": "I can't."}, user("ok")]))
        self.assertEqual(out["messages"][1]["content"], [{"type": "text", "text": "I can't."}])

    def test_sampling_and_stop(self) -> None:
        out = self.translate(chat([user()], temperature=0.7, top_p=0.9, stop="END"))
        self.assertEqual((out["temperature"], out["top_p"], out["stop_sequences"]), (0.7, 0.9, ["END"]))
        out = self.translate(chat([user()], stop=["a", "b"], temperature=1))
        self.assertEqual((out["stop_sequences"], out["temperature"]), (["a", "b"], 1))

    def test_temperature_above_one_clamped(self) -> None:
        notes = Notes()
        out = chat_to_messages_request(chat([user()], temperature=1.2), notes=notes)
        self.assertEqual(out["temperature"], 1)
        self.assertEqual(notes.adjusted, ["temperature: 1.2 clamped to 1, Anthropic's most"])

    def test_user_and_safety_identifier(self) -> None:
        self.assertEqual(self.translate(chat([user()], user="u-1"))["metadata"], {"user_id": "u-1"})
        self.assertEqual(self.translate(chat([user()], safety_identifier="s-1"))["metadata"], {"user_id": "s-1"})
        self.assertEqual(self.translate(chat([user()], user="x", safety_identifier="x"))["metadata"], {"user_id": "x"})
        e = self.assertRaises(
            UntranslatableRequest, chat_to_messages_request, chat([user()], user="a", safety_identifier="b")
        )
        self.assertEqual(e.params, ["safety_identifier", "user"])

    def test_stream(self) -> None:
        out = self.translate(chat([user()], stream=True, stream_options={"include_usage": True}))
        self.assertIs(out["stream"], True)
        self.assertNotIn("stream_options", out)
        self.assertIs(self.translate(chat([user()], stream=False))["stream"], False)

    def test_neutral_values_accepted(self) -> None:
        out = self.translate(
            chat(
                [user()],
                n=1,
                logprobs=False,
                presence_penalty=0,
                frequency_penalty=0.0,
                logit_bias={},
                response_format={"type": "text"},
                modalities=["text"],
                store=False,
                seed=None,
                prompt_cache_key="k",
                service_tier="auto",
            )
        )
        self.assertEqual(out["service_tier"], "auto")
        self.assertEqual(self.translate(chat([user()], service_tier="default"))["service_tier"], "standard_only")

    def test_refusals_name_every_param(self) -> None:
        doc = chat(
            [user()],
            n=2,
            logprobs=True,
            top_logprobs=3,
            presence_penalty=0.5,
            frequency_penalty=-1,
            logit_bias={"50256": -100},
            response_format={"type": "json_schema", "json_schema": {"name": "x"}},
            audio={"voice": "alloy", "format": "mp3"},
            modalities=["text", "audio"],
            functions=[{"name": "f"}],
            web_search_options={},
            surprise=1,
        )
        e = self.assertRaises(UntranslatableRequest, chat_to_messages_request, doc)
        expected = sorted(
            [
                "n",
                "logprobs",
                "top_logprobs",
                "presence_penalty",
                "frequency_penalty",
                "logit_bias",
                "response_format.json_schema.schema",
                "audio",
                "modalities",
                "functions",
                "web_search_options",
                "surprise",
            ]
        )
        self.assertEqual(e.params, expected)
        message = str(e)
        for name in expected:
            self.assertIn(name, message)
        self.assertIn("JSON schema", message)
        self.assertIsInstance(e, ValueError)

    def test_json_object_becomes_an_instruction(self) -> None:
        out = self.translate(chat([{"role": "system", "content": "Be brief."}, user()], response_format={"type": "json_object"}))
        self.assertEqual(
            out["system"], [{"type": "text", "text": "Be brief."}, {"type": "text", "text": JSON_MODE_INSTRUCTION}]
        )
        self.assertNotIn("output_config", out)

    def test_content_refusals(self) -> None:
        doc = chat(
            [
                {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]},
                {"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]},
                {"role": "function", "name": "f", "content": "x"},
                {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]},
                {"role": "assistant", "tool_calls": [{"id": "c2", "type": "custom", "custom": {"name": "g", "input": "x"}}]},
                user("next"),
            ],
            tools=[{"type": "custom", "custom": {"name": "g"}}],
            tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}},
        )
        e = self.assertRaises(UntranslatableRequest, chat_to_messages_request, doc)
        self.assertEqual(
            e.params,
            sorted(
                [
                    "messages[0].content[0].type=input_audio",
                    "messages[1].content[0].file",
                    "messages[2].role=function",
                    "messages[3].tool_calls[0].function.arguments",
                    "messages[4].tool_calls[0].type=custom",
                    "tools[0].type=custom",
                    "tool_choice",
                ]
            ),
        )

    def test_final_assistant_message_refused(self) -> None:
        doc = chat([user("a"), {"role": "assistant", "content": "The answer is"}])
        e = self.assertRaises(UntranslatableRequest, chat_to_messages_request, doc)
        self.assertEqual(e.params, ["messages[1].role=assistant"])
        self.assertIn("prefill", str(e))

    def test_not_an_object(self) -> None:
        e = self.assertRaises(UntranslatableRequest, chat_to_messages_request, ["x"])
        self.assertEqual(e.params, ["body"])
        e = self.assertRaises(UntranslatableRequest, chat_to_messages_request, {"model": "m", "messages": "x"})
        self.assertEqual(e.params, ["messages"])


# ---------------------------------------------------------------------------
# Requests: Anthropic Messages -> OpenAI chat
# ---------------------------------------------------------------------------


def messages(msgs: list, **extra: Any) -> dict:
    return {"model": "gpt-4o", "max_tokens": 256, "messages": msgs, **extra}


class MessagesToChatRequestTests(SynchronousTestCase):
    def translate(self, doc: dict, **kw: Any) -> dict:
        original = copy.deepcopy(doc)
        out = messages_to_chat_request(doc, **kw)
        self.assertEqual(doc, original, "the input must not be modified")
        validate_openai_request(out)
        return out

    def test_minimal(self) -> None:
        out = self.translate(messages([user("Hello")]))
        self.assertEqual(
            out,
            {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}], "max_completion_tokens": 256},
        )

    def test_max_tokens_field(self) -> None:
        out = self.translate(messages([user()]), max_tokens_field="max_tokens")
        self.assertEqual(out["max_tokens"], 256)
        self.assertNotIn("max_completion_tokens", out)

    def test_system(self) -> None:
        out = self.translate(messages([user()], system="Be brief."))
        self.assertEqual(out["messages"][0], {"role": "system", "content": "Be brief."})
        out = self.translate(
            messages(
                [user()],
                system=[
                    {"type": "text", "text": "One.", "cache_control": {"type": "ephemeral"}},
                    {"type": "text", "text": "Two."},
                ],
            )
        )
        self.assertEqual(
            out["messages"][0],
            {"role": "system", "content": [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}]},
        )
        out = self.translate(messages([user()], system=[{"type": "text", "text": "Only."}]))
        self.assertEqual(out["messages"][0], {"role": "system", "content": "Only."})

    def test_multi_turn_text_blocks(self) -> None:
        out = self.translate(
            messages(
                [
                    {"role": "user", "content": [{"type": "text", "text": "one"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "tw"}, {"type": "text", "text": "o"}]},
                    {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                ]
            )
        )
        self.assertEqual(
            out["messages"],
            [
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": "two"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
        )

    def test_images(self) -> None:
        out = self.translate(
            messages(
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}},
                            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                            {"type": "text", "text": "What?"},
                        ],
                    }
                ]
            )
        )
        self.assertEqual(
            out["messages"][0]["content"],
            [
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                {"type": "text", "text": "What?"},
            ],
        )

    def test_tools_and_choice(self) -> None:
        schema = {"type": "object", "properties": {"q": {"type": "string"}}}
        tools = [
            {"name": "search", "description": "Search", "input_schema": schema, "cache_control": {"type": "ephemeral"}},
            {"type": "custom", "name": "now", "input_schema": {"type": "object"}, "strict": True},
        ]
        out = self.translate(messages([user()], tools=tools))
        self.assertEqual(
            out["tools"],
            [
                {"type": "function", "function": {"name": "search", "description": "Search", "parameters": schema}},
                {"type": "function", "function": {"name": "now", "parameters": {"type": "object"}, "strict": True}},
            ],
        )
        self.assertNotIn("tool_choice", out)
        cases = [
            ({"type": "auto"}, "auto"),
            ({"type": "any"}, "required"),
            ({"type": "none"}, "none"),
            ({"type": "tool", "name": "search"}, {"type": "function", "function": {"name": "search"}}),
        ]
        for given, expected in cases:
            out = self.translate(messages([user()], tools=tools, tool_choice=given))
            self.assertEqual(out["tool_choice"], expected)
            self.assertNotIn("parallel_tool_calls", out)
        out = self.translate(messages([user()], tools=tools, tool_choice={"type": "any", "disable_parallel_tool_use": True}))
        self.assertEqual((out["tool_choice"], out["parallel_tool_calls"]), ("required", False))

    def test_tool_use_and_results(self) -> None:
        out = self.translate(
            messages(
                [
                    user("Weather?"),
                    {
                        "role": "assistant",
                        "content": [
                            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                            {"type": "text", "text": "Checking."},
                            {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {"city": "Paris"}},
                            {"type": "tool_use", "id": "toolu_2", "name": "w", "input": {"city": "Rome"}},
                        ],
                    },
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                            {"type": "tool_result", "tool_use_id": "toolu_2", "content": [{"type": "text", "text": "21C"}], "is_error": False},
                            {"type": "text", "text": "Thanks"},
                        ],
                    },
                ]
            )
        )
        self.assertEqual(
            out["messages"][1:],
            [
                {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [
                        {"id": "toolu_1", "type": "function", "function": {"name": "w", "arguments": '{"city":"Paris"}'}},
                        {"id": "toolu_2", "type": "function", "function": {"name": "w", "arguments": '{"city":"Rome"}'}},
                    ],
                },
                {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
                {"role": "tool", "tool_call_id": "toolu_2", "content": "21C"},
                {"role": "user", "content": "Thanks"},
            ],
        )

    def test_tool_use_only_has_null_content(self) -> None:
        out = self.translate(
            messages(
                [
                    user(),
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "ok"}]},
                ]
            )
        )
        self.assertIsNone(out["messages"][1]["content"])
        self.assertEqual(out["messages"][1]["tool_calls"][0]["function"]["arguments"], "{}")

    def test_sampling_stop_metadata_stream(self) -> None:
        out = self.translate(
            messages(
                [user()],
                temperature=0.2,
                top_p=0.8,
                stop_sequences=["X", "Y"],
                metadata={"user_id": "u-9"},
                stream=True,
                cache_control={"type": "ephemeral"},
                thinking={"type": "disabled"},
                service_tier="standard_only",
            )
        )
        self.assertEqual(out["temperature"], 0.2)
        self.assertEqual(out["top_p"], 0.8)
        self.assertEqual(out["stop"], ["X", "Y"])
        self.assertEqual(out["user"], "u-9")
        self.assertIs(out["stream"], True)
        self.assertEqual(out["stream_options"], {"include_usage": True})
        self.assertEqual(out["service_tier"], "default")
        self.assertNotIn("cache_control", json.dumps(out))
        out = self.translate(messages([user()], stream=False))
        self.assertIs(out["stream"], False)
        self.assertNotIn("stream_options", out)

    def test_refusals_name_every_param(self) -> None:
        doc = messages(
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "document", "source": {"type": "url", "url": "https://x/y.pdf"}},
                        {"type": "image", "source": {"type": "file", "file_id": "file_1"}},
                        {"type": "search_result", "source": "s", "title": "t", "content": []},
                        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "search_result"}]},
                    ],
                },
                {"role": "assistant", "content": [{"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}]},
                user("next"),
            ],
            top_k=5,
            tools=[{"type": "web_search_20250305", "name": "web_search"}],
            tool_choice={"type": "mystery"},
            metadata={"user_id": "u", "team": "x"},
            output_config={"format": {"type": "json_object"}},
            container="c",
            mystery=True,
        )
        e = self.assertRaises(UntranslatableRequest, messages_to_chat_request, doc)
        expected = sorted(
            [
                "messages[0].content[0].source.type=url",
                "messages[0].content[1].source.type=file",
                "messages[0].content[2].type=search_result",
                "messages[0].content[3].content[0].type=search_result",
                "messages[1].content[0].type=server_tool_use",
                "top_k",
                "tools[0].type=web_search_20250305",
                "tool_choice",
                "metadata.team",
                "output_config.format",
                "container",
                "mystery",
            ]
        )
        self.assertEqual(e.params, expected)
        for name in expected:
            self.assertIn(name, str(e))

    def test_prefill_refused(self) -> None:
        doc = messages([user("a"), {"role": "assistant", "content": "{"}])
        e = self.assertRaises(UntranslatableRequest, messages_to_chat_request, doc)
        self.assertEqual(e.params, ["messages[1].role=assistant"])
        self.assertIn("prefill", str(e))

    def test_top_k_alone(self) -> None:
        e = self.assertRaises(UntranslatableRequest, messages_to_chat_request, messages([user()], top_k=40))
        self.assertEqual(e.params, ["top_k"])
        self.assertEqual(str(e), "cannot translate to the OpenAI Chat Completions format: top_k (OpenAI has no top_k sampling)")


class RequestRoundTripTests(SynchronousTestCase):
    """chat -> messages -> chat (and back) keeps everything that matters."""

    def test_chat_round_trip(self) -> None:
        original = {
            "model": "m",
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "https://x/y.png"}}]},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a":[1,2]}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "done"},
                {"role": "assistant", "content": "fine"},
                {"role": "user", "content": "bye"},
            ],
            "max_completion_tokens": 100,
            "temperature": 0.5,
            "top_p": 0.9,
            "stop": ["Z"],
            "user": "u",
            "tools": [{"type": "function", "function": {"name": "f", "description": "F", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "parallel_tool_calls": False,
        }
        back = messages_to_chat_request(chat_to_messages_request(original))
        self.assertEqual(back, original)

    def test_messages_round_trip(self) -> None:
        original = {
            "model": "m",
            "max_tokens": 100,
            "system": "S",
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "text", "text": "t"}, {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"x": "y"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "r"}]},
            ],
            "stop_sequences": ["Q"],
            "temperature": 0.1,
            "metadata": {"user_id": "u"},
            "stream": True,
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        }
        back = chat_to_messages_request(messages_to_chat_request(original))
        self.assertEqual(back, original)


# ---------------------------------------------------------------------------
# JSON responses
# ---------------------------------------------------------------------------


class MessagesResponseToChatTests(SynchronousTestCase):
    def translate(self, doc: dict, **kw: Any) -> dict:
        Message.model_validate(doc)
        out = messages_response_to_chat(doc, **kw)
        ChatCompletion.model_validate(out)
        return out

    def test_text(self) -> None:
        out = self.translate(
            anthropic_message("Hello!", "claude-sonnet-4", 12, 5, id="msg_01AbC"), created=1700000123
        )
        self.assertEqual(
            out,
            {
                "id": "chatcmpl-01AbC",
                "object": "chat.completion",
                "created": 1700000123,
                "model": "claude-sonnet-4",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "Hello!", "refusal": None, "annotations": []},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": 12,
                    "completion_tokens": 5,
                    "total_tokens": 17,
                    "prompt_tokens_details": {"cached_tokens": 0},
                },
            },
        )

    def test_model_override(self) -> None:
        out = self.translate(anthropic_message("x", "claude-sonnet-4", 1, 1), model="anthropic/claude-sonnet-4")
        self.assertEqual(out["model"], "anthropic/claude-sonnet-4")

    def test_usage_with_cache(self) -> None:
        out = self.translate(anthropic_message("x", "c", 100, 7, cache_read_input_tokens=30, cache_creation_input_tokens=20))
        self.assertEqual(
            out["usage"],
            {
                "prompt_tokens": 150,
                "completion_tokens": 7,
                "total_tokens": 157,
                "prompt_tokens_details": {"cached_tokens": 30, "cache_write_tokens": 20},
            },
        )

    def test_tool_use(self) -> None:
        out = self.translate(
            anthropic_message(
                [{"type": "thinking", "thinking": "...", "signature": "s"}, {"type": "text", "text": "Let me check."}],
                "c",
                10,
                20,
                tool_uses=[{"id": "toolu_1", "name": "get_weather", "input": {"city": "Paris", "days": [1, 2]}}],
            )
        )
        message = out["choices"][0]["message"]
        self.assertEqual(message["content"], "Let me check.")
        self.assertEqual(
            message["tool_calls"],
            [{"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris","days":[1,2]}'}}],
        )
        self.assertEqual(out["choices"][0]["finish_reason"], "tool_calls")
        only_tools = self.translate(anthropic_message(None, "c", 1, 1, tool_uses=[{"id": "t", "name": "f", "input": {}}]))
        self.assertIsNone(only_tools["choices"][0]["message"]["content"])

    def test_stop_reasons(self) -> None:
        for stop, finish in [
            ("end_turn", "stop"),
            ("stop_sequence", "stop"),
            ("max_tokens", "length"),
            ("tool_use", "tool_calls"),
            ("refusal", "content_filter"),
            ("pause_turn", "stop"),
            ("model_context_window_exceeded", "length"),
        ]:
            out = self.translate(anthropic_message("x", "c", 1, 1, stop_reason=stop))
            self.assertEqual(out["choices"][0]["finish_reason"], finish, stop)

    def test_not_a_message(self) -> None:
        self.assertRaises(ValueError, messages_response_to_chat, anthropic_error("api_error", "x"))


class ChatResponseToMessagesTests(SynchronousTestCase):
    def translate(self, doc: dict, **kw: Any) -> dict:
        ChatCompletion.model_validate(doc)
        out = chat_response_to_messages(doc, **kw)
        Message.model_validate(out)
        return out

    def test_text(self) -> None:
        out = self.translate(openai_completion("Hello!", "gpt-4o", 12, 5, id="chatcmpl-Xyz"))
        self.assertEqual(
            out,
            {
                "id": "msg_Xyz",
                "type": "message",
                "role": "assistant",
                "model": "gpt-4o",
                "content": [{"type": "text", "text": "Hello!"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {
                    "input_tokens": 12,
                    "output_tokens": 5,
                    "cache_creation_input_tokens": 0,
                    "cache_read_input_tokens": 0,
                },
            },
        )

    def test_usage_with_cache(self) -> None:
        out = self.translate(openai_completion("x", "g", 100, 7, cached_tokens=40))
        self.assertEqual(
            out["usage"],
            {"input_tokens": 60, "output_tokens": 7, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 40},
        )
        doc = openai_completion("x", "g", 100, 7, cached_tokens=40)
        doc["usage"]["prompt_tokens_details"]["cache_write_tokens"] = 10
        self.assertEqual(
            self.translate(doc)["usage"],
            {"input_tokens": 50, "output_tokens": 7, "cache_creation_input_tokens": 10, "cache_read_input_tokens": 40},
        )

    def test_usage_round_trip(self) -> None:
        source = anthropic_message("x", "c", 100, 7, cache_read_input_tokens=30, cache_creation_input_tokens=20)
        back = chat_response_to_messages(messages_response_to_chat(source))
        self.assertEqual(back["usage"], source["usage"])

    def test_tool_calls(self) -> None:
        out = self.translate(
            openai_completion(
                None,
                "g",
                1,
                2,
                finish_reason="tool_calls",
                tool_calls=[
                    {"id": "call_1", "name": "w", "arguments": '{"city":"Paris"}'},
                    {"id": "call_2", "name": "w", "arguments": ""},
                    {"id": "call_3", "name": "w", "arguments": "{broken"},
                ],
            )
        )
        self.assertEqual(
            out["content"],
            [
                {"type": "tool_use", "id": "call_1", "name": "w", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "w", "input": {}},
                {"type": "tool_use", "id": "call_3", "name": "w", "input": {"_raw_arguments": "{broken"}},
            ],
        )
        self.assertEqual(out["stop_reason"], "tool_use")

    def test_finish_reasons(self) -> None:
        for finish, stop in [
            ("stop", "end_turn"),
            ("length", "max_tokens"),
            ("tool_calls", "tool_use"),
            ("content_filter", "refusal"),
            ("function_call", "tool_use"),
        ]:
            out = self.translate(openai_completion("x", "g", 1, 1, finish_reason=finish))
            self.assertEqual(out["stop_reason"], stop, finish)

    def test_refusal(self) -> None:
        doc = openai_completion(None, "g", 1, 1)
        doc["choices"][0]["message"]["refusal"] = "I can't help with that."
        out = self.translate(doc)
        self.assertEqual(out["content"], [{"type": "text", "text": "I can't help with that."}])
        self.assertEqual(out["stop_reason"], "refusal")

    def test_ids_round_trip(self) -> None:
        self.assertEqual(translate.chat_id_from_message_id("msg_01XyZ"), "chatcmpl-01XyZ")
        self.assertEqual(translate.message_id_from_chat_id("chatcmpl-01XyZ"), "msg_01XyZ")
        self.assertEqual(translate.message_id_from_chat_id("gen-123"), "msg_gen-123")
        self.assertEqual(translate.chat_id_from_message_id("weird"), "chatcmpl-weird")
        self.assertEqual(
            chat_response_to_messages(messages_response_to_chat(anthropic_message("x", "c", 1, 1, id="msg_abc")))["id"],
            "msg_abc",
        )

    def test_not_a_completion(self) -> None:
        self.assertRaises(ValueError, chat_response_to_messages, openai_error("x"))


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class ErrorTranslationTests(SynchronousTestCase):
    def to_openai(self, status: int, body: bytes) -> dict:
        out = json.loads(anthropic_error_to_openai(status, body))
        ErrorObject.model_validate(out["error"])
        return out

    def to_anthropic(self, status: int, body: bytes) -> dict:
        out = json.loads(openai_error_to_anthropic(status, body))
        self.assertEqual(out["type"], "error")
        self.assertEqual(set(out["error"]), {"type", "message"})
        return out

    def test_anthropic_to_openai(self) -> None:
        body = json.dumps(anthropic_error("invalid_request_error", "max_tokens: too big")).encode()
        self.assertEqual(
            self.to_openai(400, body),
            {"error": {"message": "max_tokens: too big", "type": "invalid_request_error", "param": None, "code": "invalid_request_error"}},
        )
        for status, kind, expected in [
            (401, "authentication_error", "authentication_error"),
            (403, "permission_error", "permission_error"),
            (404, "not_found_error", "not_found_error"),
            (429, "rate_limit_error", "rate_limit_error"),
            (500, "api_error", "api_error"),
            (529, "overloaded_error", "api_error"),
        ]:
            out = self.to_openai(status, json.dumps(anthropic_error(kind, "m")).encode())
            self.assertEqual((out["error"]["type"], out["error"]["code"]), (expected, kind))

    def test_openai_to_anthropic(self) -> None:
        for status, expected in [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (402, "billing_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (413, "request_too_large"),
            (422, "invalid_request_error"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (502, "api_error"),
            (503, "overloaded_error"),
            (504, "timeout_error"),
        ]:
            body = json.dumps(openai_error("Nope", code="x")).encode()
            out = self.to_anthropic(status, body)
            self.assertEqual(out, {"type": "error", "error": {"type": expected, "message": "Nope"}}, status)
            if expected != "request_too_large":
                # The API documents request_too_large for 413; the SDK's
                # ErrorResponse union does not list it (the SDK builds its
                # exception from the status code, not from this type).
                ErrorResponse.model_validate(out)

    def test_best_effort_never_raises(self) -> None:
        for body in [b"", b"<html>Bad Gateway</html>", b"\xff\xfe", b"[1,2]", b'{"error": "plain string"}', b"null"]:
            out = self.to_openai(502, body)
            self.assertEqual(out["error"]["type"], "api_error")
            self.assertTrue(out["error"]["message"])
            out = self.to_anthropic(502, body)
            self.assertEqual(out["error"]["type"], "api_error")
            self.assertTrue(out["error"]["message"])
        self.assertEqual(self.to_anthropic(400, b'{"error": "plain string"}')["error"]["message"], "plain string")
        self.assertEqual(self.to_openai(502, b"<html>Bad Gateway</html>")["error"]["message"], "<html>Bad Gateway</html>")
        self.assertEqual(self.to_openai(502, b"")["error"]["message"], "upstream error (HTTP 502)")
        long = b"x" * 100000
        self.assertLessEqual(len(self.to_openai(500, long)["error"]["message"]), 2000)

    def test_already_in_the_target_shape(self) -> None:
        oa = openai_error("m", code="c")
        self.assertEqual(json.loads(anthropic_error_to_openai(400, json.dumps(oa).encode())), oa)
        an = anthropic_error("invalid_request_error", "m")
        self.assertEqual(json.loads(openai_error_to_anthropic(400, json.dumps(an).encode())), an)
