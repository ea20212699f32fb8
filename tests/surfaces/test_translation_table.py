"""
docs/TRANSLATION.md's request tables are the code's: each names exactly the
fields the translation knows, with the outcomes the code gives them
(C{CHAT_TO_MESSAGES}, C{MESSAGES_TO_CHAT}), and every outcome of every row
is run here through the translation, and its result through a fake provider
as strict as the real one (L{cllama_tx.testing.strict}): carried and mapped
fields arrive, clamped ones are brought in range and named, dropped ones
leave no trace but their name, refused ones are named in the 400.
"""

from __future__ import annotations

import os
import re
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.providers.model_limits import traits_for
from cllama_tx.surfaces.translate_common import Notes, UntranslatableRequest
from cllama_tx.surfaces.translate_request import (
    CHAT_TO_MESSAGES,
    MESSAGES_TO_CHAT,
    chat_to_messages_request,
    messages_to_chat_request,
)
from cllama_tx.testing.strict import anthropic_problems, openai_problems

DOC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "TRANSLATION.md")
OUTCOMES = ("carried", "mapped", "clamped", "dropped", "refused")

USER = [{"role": "user", "content": "Hi"}]
CHAT_TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
ANTHROPIC_TOOLS = [{"name": "f", "input_schema": {"type": "object", "properties": {}}}]
SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}}, "required": ["a"]}

# field -> [(outcome, the fields to add to the base request)]
CHAT_EXAMPLES: dict[str, list[tuple[str, dict]]] = {
    "model": [("carried", {"model": "claude-sonnet-4-5"})],
    "messages": [("mapped", {"messages": [{"role": "system", "content": "S"}, *USER]})],
    "max_completion_tokens": [("mapped", {"max_completion_tokens": 100}), ("clamped", {"max_completion_tokens": 100000})],
    "max_tokens": [("mapped", {"max_tokens": 100}), ("clamped", {"max_tokens": 100000})],
    "stop": [("mapped", {"stop": "END"})],
    "temperature": [("carried", {"temperature": 0.5}), ("clamped", {"temperature": 1.7})],
    "top_p": [("carried", {"top_p": 0.9})],
    "stream": [("carried", {"stream": True})],
    "stream_options": [("dropped", {"stream": True, "stream_options": {"include_usage": True}})],
    "user": [("mapped", {"user": "u1"}), ("refused", {"user": "u1", "safety_identifier": "u2"})],
    "safety_identifier": [("mapped", {"safety_identifier": "s1"}), ("refused", {"user": "u1", "safety_identifier": "u2"})],
    "tools": [("mapped", {"tools": CHAT_TOOLS}), ("refused", {"tools": [{"type": "custom", "custom": {"name": "g"}}]})],
    "tool_choice": [
        ("mapped", {"tools": CHAT_TOOLS, "tool_choice": "required"}),
        ("refused", {"tools": CHAT_TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {}}}),
    ],
    "parallel_tool_calls": [("mapped", {"tools": CHAT_TOOLS, "parallel_tool_calls": False})],
    "response_format": [
        ("carried", {"response_format": {"type": "text"}}),
        ("mapped", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}}),
        ("mapped", {"response_format": {"type": "json_object"}}),
        ("refused", {"response_format": {"type": "grammar"}}),
    ],
    "service_tier": [("mapped", {"service_tier": "default"}), ("dropped", {"service_tier": "priority"})],
    "reasoning_effort": [
        ("mapped", {"reasoning_effort": "high", "max_tokens": 30000}),
        ("dropped", {"reasoning_effort": "high", "max_tokens": 30000, "model": "claude-3-5-haiku-20241022"}),
        ("dropped", {"reasoning_effort": "high", "max_tokens": 30000, "temperature": 0.2}),
    ],
    "n": [("carried", {"n": 1}), ("refused", {"n": 3})],
    "logprobs": [("carried", {"logprobs": False}), ("refused", {"logprobs": True})],
    "top_logprobs": [("carried", {"top_logprobs": 0}), ("refused", {"top_logprobs": 2})],
    "presence_penalty": [("carried", {"presence_penalty": 0}), ("refused", {"presence_penalty": 0.5})],
    "frequency_penalty": [("carried", {"frequency_penalty": 0}), ("refused", {"frequency_penalty": 0.5})],
    "logit_bias": [("carried", {"logit_bias": {}}), ("refused", {"logit_bias": {"1": 5}})],
    "modalities": [("carried", {"modalities": ["text"]}), ("refused", {"modalities": ["text", "audio"]})],
    "audio": [("refused", {"audio": {"voice": "alloy", "format": "wav"}})],
    "seed": [("dropped", {"seed": 7})],
    "prediction": [("dropped", {"prediction": {"type": "content", "content": "x"}})],
    "store": [("dropped", {"store": True})],
    "metadata": [("dropped", {"metadata": {"run": "1"}})],
    "verbosity": [("dropped", {"verbosity": "low"})],
    "prompt_cache_key": [("dropped", {"prompt_cache_key": "k"})],
    "prompt_cache_retention": [("dropped", {"prompt_cache_retention": "24h"})],
    "prompt_cache_options": [("dropped", {"prompt_cache_options": {}})],
    "web_search_options": [("refused", {"web_search_options": {}})],
    "functions": [("refused", {"functions": [{"name": "f"}]})],
    "function_call": [("refused", {"function_call": "auto"})],
    "moderation": [("refused", {"moderation": {}})],
}

THINKING = {"type": "enabled", "budget_tokens": 8000}
MESSAGES_EXAMPLES: dict[str, list[tuple[str, dict]]] = {
    "model": [("carried", {"model": "gpt-4o"})],
    "messages": [("mapped", {"messages": [*USER, {"role": "assistant", "content": "A"}, {"role": "system", "content": "S"}, *USER]})],
    "max_tokens": [("mapped", {"max_tokens": 100}), ("clamped", {"max_tokens": 32000})],
    "system": [("mapped", {"system": [{"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}]})],
    "stop_sequences": [("mapped", {"stop_sequences": ["END"]})],
    "temperature": [("carried", {"temperature": 0.5}), ("dropped", {"temperature": 0.5, "model": "o3"})],
    "top_p": [("carried", {"top_p": 0.9}), ("dropped", {"top_p": 0.9, "model": "o3"})],
    "top_k": [("refused", {"top_k": 5})],
    "metadata": [("mapped", {"metadata": {"user_id": '{"device_id":"' + "d" * 80 + '"}'}}), ("refused", {"metadata": {"team": "x"}})],
    "stream": [("carried", {"stream": False})],
    "tools": [("mapped", {"tools": ANTHROPIC_TOOLS}), ("refused", {"tools": [{"type": "web_search_20250305", "name": "web_search"}]})],
    "tool_choice": [("mapped", {"tools": ANTHROPIC_TOOLS, "tool_choice": {"type": "any", "disable_parallel_tool_use": True}})],
    "thinking": [("mapped", {"thinking": THINKING, "model": "o3"}), ("dropped", {"thinking": THINKING})],
    "output_config": [
        ("mapped", {"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}}),
        ("mapped", {"output_config": {"effort": "high"}, "model": "gpt-5"}),
        ("dropped", {"output_config": {"effort": "high"}}),
    ],
    "service_tier": [("mapped", {"service_tier": "standard_only"})],
    "speed": [("carried", {"speed": "standard"}), ("dropped", {"speed": "fast"})],
    "cache_control": [("dropped", {"cache_control": {"type": "ephemeral"}})],
    "context_management": [("dropped", {"context_management": {"edits": [{"type": "clear_thinking_20251015"}]}})],
    "container": [("refused", {"container": "c"})],
    "mcp_servers": [("refused", {"mcp_servers": [{"type": "url", "url": "https://x", "name": "x"}]})],
    "inference_geo": [("refused", {"inference_geo": "us"})],
    "diagnostics": [("refused", {"diagnostics": {}})],
    "user_profile_id": [("refused", {"user_profile_id": "p"})],
    "workspace_id": [("refused", {"workspace_id": "w"})],
}


def doc_table(heading: str) -> dict[str, tuple[str, ...]]:
    """The C{| parameter | outcome | what happens |} table under C{heading}: name -> outcomes."""
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows: dict[str, tuple[str, ...]] = {}
    in_table = False
    for line in section.splitlines():
        if line.startswith("| parameter | outcome |"):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            break
        if in_table and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            name = re.fullmatch(r"`([^`]+)`", cells[0])
            assert name is not None, line
            rows[name.group(1)] = tuple(o.strip() for o in cells[1].split(","))
    return rows


class Direction:
    """One direction's translation, its base request and its strict upstream."""

    def __init__(self, translate, base: dict, provider: str, problems) -> None:
        self.translate = translate
        self.base = base
        self.provider = provider
        self.problems = problems

    def run(self, extra: dict) -> tuple[dict, Notes]:
        doc = {**self.base, **extra}
        notes = Notes()
        out = self.translate(doc, traits=traits_for(self.provider, doc["model"]), notes=notes)
        return out, notes

    def without(self, extra: dict, name: str) -> dict | None:
        rest = {k: v for k, v in extra.items() if k != name}
        doc = {k: v for k, v in {**self.base, **rest}.items() if k != name}
        try:
            return self.translate(doc, traits=traits_for(self.provider, doc.get("model", "")), notes=Notes())
        except UntranslatableRequest:
            return None


CHAT = Direction(chat_to_messages_request, {"model": "claude-sonnet-4-5", "messages": USER}, "anthropic",
                 lambda out: anthropic_problems(out))
MESSAGES = Direction(messages_to_chat_request, {"model": "gpt-4o", "max_tokens": 1000, "messages": USER}, "openai",
                     lambda out: openai_problems(out))


class TableWalk:
    """Mixed into a test case per direction."""

    heading: str
    code: dict[str, str]
    examples: dict[str, list[tuple[str, dict]]]
    direction: Direction

    def test_the_doc_is_the_code(self):
        table = doc_table(self.heading)
        code = {name: tuple(o.strip() for o in outcome.split(",")) for name, outcome in self.code.items()}
        self.assertEqual(table, code)
        for outcomes in table.values():
            self.assertTrue(set(outcomes) <= set(OUTCOMES), outcomes)

    def test_every_outcome_has_an_example(self):
        table = doc_table(self.heading)
        for name, outcomes in table.items():
            shown = {outcome for outcome, _ in self.examples.get(name, ())}
            self.assertEqual(shown, set(outcomes), name)

    def test_every_example_behaves_as_the_table_says(self):
        for name, examples in self.examples.items():
            for outcome, extra in examples:
                with self.subTest(field=name, outcome=outcome, extra=extra):
                    self.check(name, outcome, extra)

    def check(self, name: str, outcome: str, extra: dict) -> None:
        if outcome == "refused":
            with self.assertRaises(UntranslatableRequest) as caught:
                self.direction.run(extra)
            self.assertTrue(any(p.split(".")[0].split("[")[0] == name for p in caught.exception.params),
                            caught.exception.params)
            return
        out, notes = self.direction.run(extra)
        self.assertEqual(self.direction.problems(out), [], f"the strict provider refuses {out}")
        named = [d for d in notes.dropped if d == name or d.startswith(name + ".")]
        adjusted = [a for a in notes.adjusted if a.startswith(name + ":")]
        if outcome == "dropped":
            self.assertTrue(named, notes.dropped)
            self.assertEqual(out, self.direction.without(extra, name), "a dropped field leaves no trace")
        else:
            self.assertEqual(named, [], notes.dropped)
        if outcome == "clamped":
            self.assertTrue(adjusted, notes.adjusted)
        elif outcome in ("carried", "mapped"):
            self.assertEqual(adjusted, [], notes.adjusted)
        if outcome == "carried" and name in out:
            self.assertEqual(out[name], extra[name])
        if outcome == "mapped":
            self.assertNotEqual(out, self.direction.without(extra, name), "a mapped field has an effect")

    def subTest(self, **kwargs: Any):  # trial's SynchronousTestCase has no subTest: name the case in failures
        case = self

        class _Named:
            def __enter__(self):
                return self

            def __exit__(self, kind, value, tb):
                if value is not None and isinstance(value, AssertionError):
                    raise case.failureException(f"{kwargs}: {value}") from None
                return False

        return _Named()


class ChatToMessagesTable(TableWalk, SynchronousTestCase):
    heading = "## Requests: OpenAI chat → Anthropic Messages"
    code = CHAT_TO_MESSAGES
    examples = CHAT_EXAMPLES
    direction = CHAT


class MessagesToChatTable(TableWalk, SynchronousTestCase):
    heading = "## Requests: Anthropic Messages → OpenAI chat"
    code = MESSAGES_TO_CHAT
    examples = MESSAGES_EXAMPLES
    direction = MESSAGES
