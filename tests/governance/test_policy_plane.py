"""
The policy plane's pure rules (ADR-025): the reference's wire bodies, how
answers are read, and how a decoration, a tool filter and an amendment are
carried out.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from cllama_tx.governance.policy_plane import (
    DecorateCall,
    Decoration,
    GateRequestCall,
    GateResponseCall,
    PolicyAnswerError,
    RequestMeta,
    ResponseDecision,
    RulesRef,
    ToolFilter,
    amended_bytes,
    apply_decoration,
    denial_message,
    filter_tools,
    go_header_key,
    header_map,
    parse_decoration,
    parse_gate_decision,
    parse_response_decision,
    tool_name,
)

META = RequestMeta("tiverton", "openai", stream=True, model="openai/gpt-4o", request_id="abc")


class WireBodies(SynchronousTestCase):
    def test_meta_in_the_references_order(self):
        self.assertEqual(
            json.dumps(GateRequestCall(META, {"model": "openai/gpt-4o"}).wire()),
            '{"agent_id": "tiverton", "format": "openai", "mode": "plain", "stream": true, '
            '"model": "openai/gpt-4o", "rules": {}, "request": {"model": "openai/gpt-4o"}}',
        )

    def test_empty_model_and_rules_as_go_omits_them(self):
        meta = RequestMeta("a", "anthropic", rules=RulesRef("/claw/context/a/rules.json", "ab12"))
        self.assertEqual(
            DecorateCall(meta, {}).wire(),
            {"agent_id": "a", "format": "anthropic", "mode": "plain", "stream": False,
             "rules": {"path": "/claw/context/a/rules.json", "digest": "ab12"}, "request": {}},
        )

    def test_gate_response_leaves_out_what_is_empty(self):
        stream = GateResponseCall(META, "", 200, {})
        self.assertEqual(
            list(stream.wire()), ["agent_id", "format", "mode", "stream", "model", "rules", "response_status"]
        )
        whole = GateResponseCall(META, '{"a":1}', 200, {"Content-Type": ["application/json"]}, '{"b":2}')
        self.assertEqual(
            {k: whole.wire()[k] for k in ("request_body", "response_status", "response_header", "response_body")},
            {"request_body": '{"a":1}', "response_status": 200,
             "response_header": {"Content-Type": ["application/json"]}, "response_body": '{"b":2}'},
        )

    def test_header_names_as_go_spells_them(self):
        self.assertEqual(go_header_key("content-type"), "Content-Type")
        self.assertEqual(go_header_key("X-CLLAMA-REQUEST-ID"), "X-Cllama-Request-Id")
        headers = Headers({b"content-type": [b"text/event-stream"], b"x-request-id": [b"1", b"2"]})
        self.assertEqual(
            header_map(headers.getAllRawHeaders()),
            {"Content-Type": ["text/event-stream"], "X-Request-Id": ["1", "2"]},
        )


class Answers(SynchronousTestCase):
    def test_gate_decisions(self):
        self.assertTrue(parse_gate_decision({"verdict": " DENY ", "reason": "r"}).denied)
        self.assertFalse(parse_gate_decision({"verdict": "allow"}).denied)
        # Anything but deny, and null, are allows, as in the reference.
        self.assertFalse(parse_gate_decision({"verdict": "maybe"}).denied)
        self.assertEqual(parse_gate_decision(None), parse_gate_decision({}))
        decision = parse_gate_decision({"verdict": "allow", "tool_filter": {"mode": "allow_list", "tools": ["a"]},
                                        "intervention": "x", "unknown": 1})
        self.assertEqual((decision.tool_filter, decision.intervention), (ToolFilter("allow_list", ("a",)), "x"))

    def test_answers_that_cannot_be_read(self):
        for doc in ([], "allow", {"verdict": 1}, {"reason": []}, {"tool_filter": []},
                    {"tool_filter": {"mode": "allow_list", "tools": "a"}}, {"tool_filter": {"mode": 3}}):
            self.assertRaises(PolicyAnswerError, parse_gate_decision, doc)
        self.assertRaises(PolicyAnswerError, parse_decoration, {"messages_patch": {"role": "system"}})
        self.assertRaises(PolicyAnswerError, parse_decoration, {"messages_patch": ["text"]})
        self.assertRaises(PolicyAnswerError, parse_decoration, {"system_patch": 5})
        self.assertRaises(PolicyAnswerError, parse_response_decision, {"verdict": None, "reason": 5})

    def test_reason_and_intervention_are_bounded(self):
        decision = parse_gate_decision({"verdict": "deny", "reason": "r" * 5000, "intervention": "a\nb" * 200})
        self.assertEqual(len(decision.reason), 2000)
        self.assertEqual(decision.intervention, ("ab" * 200)[:200])

    def test_decorations(self):
        decoration = parse_decoration({"messages_patch": [{"role": "system", "content": "c"}, None],
                                       "system_patch": "s"})
        self.assertEqual(decoration, Decoration("", ({"role": "system", "content": "c"},), "s"))
        self.assertTrue(decoration.decorates)
        self.assertFalse(parse_decoration({"system_patch": "  "}).decorates)

    def test_amendments(self):
        self.assertEqual(parse_response_decision({"verdict": "amend", "amended_body": {"a": "é"}}).amended_body,
                         '{"a":"é"}'.encode())
        # A JSON string stands for its text.
        self.assertEqual(amended_bytes('data: {"x":1}\n\n'), b'data: {"x":1}\n\n')
        self.assertIsNone(amended_bytes(None))
        self.assertIsNone(amended_bytes(""))
        self.assertEqual(ResponseDecision(verdict="amend", amended_body=b"x").action, "amend")
        # An amend without a body changes nothing.
        self.assertEqual(ResponseDecision(verdict="amend").action, "allow")
        self.assertEqual(ResponseDecision(verdict="Deny").action, "deny")
        self.assertEqual(ResponseDecision(verdict="").action, "allow")

    def test_denial_messages(self):
        self.assertEqual(denial_message(""), "policy denied request")
        self.assertEqual(denial_message("  blocked \x00"), "policy denied request: blocked")


class Decorating(SynchronousTestCase):
    PATCH = Decoration(messages_patch=({"role": "system", "content": "p"},), system_patch="rules")

    def test_openai_appends_messages_and_ignores_the_system_patch(self):
        doc = {"messages": [{"role": "user", "content": "hi"}]}
        out = apply_decoration(doc, "openai", self.PATCH)
        self.assertEqual(out["messages"], [{"role": "user", "content": "hi"}, {"role": "system", "content": "p"}])
        self.assertEqual(doc, {"messages": [{"role": "user", "content": "hi"}]})  # untouched
        only_system = Decoration(system_patch="rules")
        self.assertIs(apply_decoration(doc, "openai", only_system), doc)

    def test_anthropic_system(self):
        cases = [
            ({"system": "base"}, "base\n\nrules"),
            ({"system": "   "}, "rules"),
            ({}, "rules"),
            ({"system": [{"type": "text", "text": "b"}]}, [{"type": "text", "text": "b"}, {"type": "text", "text": "rules"}]),
        ]
        for doc, system in cases:
            self.assertEqual(apply_decoration(doc, "anthropic", self.PATCH)["system"], system)
        messages_only = Decoration(messages_patch=({"role": "system", "content": "p"},))
        doc = {"system": "x"}
        self.assertIs(apply_decoration(doc, "anthropic", messages_only), doc)

    def test_responses_input(self):
        self.assertEqual(
            apply_decoration({"input": "hi"}, "responses", self.PATCH)["input"],
            [{"role": "user", "content": "hi"}, {"role": "system", "content": "p"}],
        )
        self.assertEqual(
            apply_decoration({"input": [{"type": "message", "role": "user", "content": "a"}]}, "responses", self.PATCH)["input"],
            [{"type": "message", "role": "user", "content": "a"}, {"role": "system", "content": "p"}],
        )
        self.assertEqual(apply_decoration({}, "responses", self.PATCH)["input"], [{"role": "system", "content": "p"}])


def chat_tool(name):
    return {"type": "function", "function": {"name": name, "parameters": {}}}


class FilteringTools(SynchronousTestCase):
    def test_tool_names_on_every_surface(self):
        self.assertEqual(tool_name(chat_tool("a")), "a")
        self.assertEqual(tool_name({"name": "b", "input_schema": {}}), "b")  # Anthropic
        self.assertEqual(tool_name({"type": "function", "name": "c"}), "c")  # Responses
        self.assertEqual(tool_name({"type": "web_search_preview"}), "web_search_preview")
        self.assertEqual(tool_name({"type": "web_search_20250305", "name": "web_search"}), "web_search")
        self.assertIsNone(tool_name("nope"))

    def test_allow_list(self):
        doc = {"tools": [chat_tool("a"), chat_tool("b")], "tool_choice": "auto"}
        out, removed = filter_tools(doc, ToolFilter("allow_list", ("a",)))
        self.assertEqual((out, removed), ({"tools": [chat_tool("a")], "tool_choice": "auto"}, ("b",)))
        self.assertEqual(len(doc["tools"]), 2)

    def test_a_forced_tool_that_is_removed(self):
        doc = {"tools": [chat_tool("a"), chat_tool("b")], "tool_choice": {"type": "function", "function": {"name": "b"}}}
        out, _ = filter_tools(doc, ToolFilter("deny_list", ("b",)))
        self.assertEqual(out, {"tools": [chat_tool("a")]})
        anthropic = {"tools": [{"name": "a"}, {"name": "b"}], "tool_choice": {"type": "tool", "name": "a"}}
        out, _ = filter_tools(anthropic, ToolFilter("deny_list", ("b",)))
        self.assertEqual(out, {"tools": [{"name": "a"}], "tool_choice": {"type": "tool", "name": "a"}})

    def test_no_tool_left(self):
        doc = {"tools": [chat_tool("a")], "tool_choice": "required", "parallel_tool_calls": True, "model": "m"}
        out, removed = filter_tools(doc, ToolFilter(" ALLOW_LIST ", ()))
        self.assertEqual((out, removed), ({"model": "m"}, ("a",)))
        legacy = {"functions": [{"name": "f"}], "function_call": {"name": "f"}}
        self.assertEqual(filter_tools(legacy, ToolFilter("deny_list", ("f",)))[0], {})

    def test_nothing_to_filter(self):
        doc = {"messages": []}
        self.assertEqual(filter_tools(doc, ToolFilter("allow_list", ("a",))), (doc, ()))
        doc = {"tools": [chat_tool("a")]}
        out, removed = filter_tools(doc, ToolFilter("allow_list", ("a", " ")))
        self.assertIs(out, doc)
        self.assertEqual(removed, ())

    def test_an_unknown_mode(self):
        with self.assertRaises(PolicyAnswerError) as caught:
            filter_tools({"tools": []}, ToolFilter("block", ("a",)))
        self.assertEqual(str(caught.exception), "unknown policy tool filter mode 'block'")
