"""
The policy plane (ADR-025) end to end over real sockets: a real proxy on
loopback, a fake provider, and the fake policy sidecar speaking the
reference's protocol (cllama_tx.testing.policy).  Each test replays one of
the reference's behaviours (its policy tests and ADR-025) and checks the
sidecar's bodies, the agent's answer, the audit lines and the ledger.
"""

from __future__ import annotations

import hashlib
import json
import os

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from cllama_tx.governance.policy_plane import PolicyPlane
from cllama_tx.governance.policy_sidecar import PolicySidecar
from cllama_tx.testing import (
    Reply,
    anthropic_message,
    openai_completion,
    openai_sse_events,
    openai_stream_chunks,
    responses_response,
)
from cllama_tx.testing.policy import (
    FakePolicySidecar,
    PolicyReply,
    allow,
    amend,
    decorate,
    deny,
    filter_tools,
)
from tests.secret_scan import SCANNER
from tests.support import AGENT, SECRET, ProxyHarness, chat_body, write_agent

POLICY_TOKEN = "policy-sidecar-token-2718"
SCANNER.register(POLICY_TOKEN)
SSE = {"content-type": "text/event-stream"}
JUDGE, JUDGE_SECRET = "judge", "7e3a" * 12
OTHER, OTHER_SECRET = "other", "5b5b" * 12
CONTRACT_FIELDS = ("ts", "claw_id", "type", "model", "intervention")


def weather_tool(name):
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}


class PolicyHarness(TestCase):
    """A proxy consulting the fake sidecar."""

    timeout = 30
    fail_open = False
    policy_timeout = 2.0

    @defer.inlineCallbacks
    def setUp(self):
        self.sidecar = FakePolicySidecar(reactor, token=POLICY_TOKEN)
        yield self.sidecar.start()
        self.addCleanup(self.sidecar.stop)
        client = PolicySidecar(reactor, self.sidecar.url, POLICY_TOKEN)
        self.addCleanup(client.pool.closeCachedConnections)
        self.h = ProxyHarness(
            self,
            fake_providers=("openai", "anthropic"),
            policy=PolicyPlane(client, self.policy_timeout, self.fail_open),
            history_dir=self.mktemp(),
        )
        yield self.h.start()
        write_agent(self.h.context_root, JUDGE, JUDGE_SECRET, policy_exempt=True)
        write_agent(self.h.context_root, OTHER, OTHER_SECRET)

    def lines(self, kind=None):
        return [line for line in self.h.audit_lines() if kind is None or line["type"] == kind]

    def interventions(self):
        return [line for line in self.lines("intervention")]

    @defer.inlineCallbacks
    def rows(self):
        yield self.h.committed()
        rows = yield self.h.ledger_rows()
        return rows

    def assertContractLine(self, line, kind, model, intervention=None, claw_id=AGENT):
        """The reference's fields of an audit line, each checked."""
        for field in CONTRACT_FIELDS:
            self.assertIn(field, line)
        self.assertRegex(line["ts"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
        self.assertEqual(
            (line["claw_id"], line["type"], line["model"], line["intervention"]),
            (claw_id, kind, model, intervention),
        )


class GateRequest(PolicyHarness):
    @defer.inlineCallbacks
    def test_allow_sends_the_references_bodies(self):
        """An allowed request: the three calls carry the reference's fields, the token and the request id."""
        self.h.fake.enqueue(Reply(json=openai_completion("Hello!", "gpt-4o-mini", 12, 3)))
        doc = chat_body()
        response = yield self.h.chat(doc)
        answer = yield response.json()
        self.assertEqual(response.code, 200)
        self.assertEqual(answer["choices"][0]["message"]["content"], "Hello!")
        yield self.sidecar.arrived("score")  # fire and forget, once the request is settled
        self.assertEqual([c.hook for c in self.sidecar.received], ["gate-request", "decorate", "gate-response", "score"])
        request_id = response.headers.getRawHeaders("x-cllama-request-id")[0]
        for call in self.sidecar.received:
            self.assertEqual(call.header("authorization"), f"Bearer {POLICY_TOKEN}")
            self.assertEqual(call.header("content-type"), "application/json")
            self.assertEqual(call.header("x-cllama-request-id"), request_id)
        meta = {"agent_id": AGENT, "format": "openai", "mode": "plain", "stream": False,
                "model": "openai/gpt-4o-mini", "rules": {}}
        gate, decoration, gated, scored = self.sidecar.received
        self.assertEqual(gate.json, {**meta, "request": doc})
        self.assertEqual(list(gate.json), ["agent_id", "format", "mode", "stream", "model", "rules", "request"])
        self.assertEqual(decoration.json, {**meta, "request": doc})
        self.assertEqual(
            list(gated.json),
            ["agent_id", "format", "mode", "stream", "model", "rules", "request_body", "response_status",
             "response_header", "response_body"],
        )
        self.assertEqual(json.loads(gated.json["request_body"]), self.h.fake.received[0].json)
        self.assertEqual(gated.json["response_status"], 200)
        self.assertEqual(gated.json["response_header"]["Content-Type"], ["application/json"])
        self.assertEqual(json.loads(gated.json["response_body"]), answer)
        self.assertEqual(scored.json, gated.json)  # the same fields, about the answer delivered
        self.assertEqual([line["type"] for line in self.lines()], ["request", "response"])

    @defer.inlineCallbacks
    def test_deny_before_dispatch(self):
        """TestPolicyRequestGateDeniesBeforeBackend: 403 with the reason, nothing sent, nothing billed."""
        self.sidecar.answer("gate-request", deny("blocked"))
        response = yield self.h.chat(chat_body())
        self.assertEqual(response.code, 403)
        self.assertEqual(
            (yield response.json()),
            {"error": {"message": "policy denied request: blocked", "type": "permission_error",
                       "code": "policy_denied"}},
        )
        self.assertEqual(self.h.fake.received, [])
        self.assertEqual([c.hook for c in self.sidecar.received], ["gate-request"])
        request, denied, error = self.lines()
        self.assertContractLine(request, "request", "openai/gpt-4o-mini")
        self.assertContractLine(denied, "intervention", "openai/gpt-4o-mini", "policy_denied")
        self.assertEqual((denied["hook"], denied["reason"]), ("gate-request", "blocked"))
        self.assertContractLine(error, "error", "openai/gpt-4o-mini")
        self.assertEqual((error["status_code"], error["cost_usd"], error["tokens_in"]), (403, 0.0, 0))
        self.assertEqual(len({line["request_id"] for line in self.lines()}), 1)
        (row,) = yield self.rows()
        self.assertEqual((row["status"], row["cost_usd"], row["input_tokens"], row["output_tokens"]), (403, 0.0, 0, 0))

    @defer.inlineCallbacks
    def test_the_sidecars_own_intervention_comes_first(self):
        self.sidecar.answer("gate-request", deny("", intervention="contract_violation"))
        response = yield self.h.chat(chat_body())
        self.assertEqual((yield response.json())["error"]["message"], "policy denied request")
        self.assertEqual(
            [(line["intervention"], line["hook"]) for line in self.interventions()],
            [("contract_violation", "gate-request"), ("policy_denied", "gate-request")],
        )

    @defer.inlineCallbacks
    def test_a_denied_request_holds_no_budget(self):
        """The budget reserved at admission is released: the one request the budget allows still goes."""
        write_agent(self.h.context_root, AGENT, SECRET,
                    budget={"max_requests": 1, "limit_usd": 1.0, "window": "24h", "behavior": "hard_stop"})
        self.sidecar.answer("gate-request", lambda call: deny("no") if "forbidden" in json.dumps(call.json) else allow())
        denied = yield self.h.chat(chat_body(messages=[{"role": "user", "content": "forbidden words"}]))
        self.assertEqual(denied.code, 403)
        yield denied.content()
        response = yield self.h.chat(chat_body())
        self.assertEqual(response.code, 200, (yield response.text()))
        over = yield self.h.chat(chat_body())
        self.assertEqual(over.code, 429)  # the budget counts the one that went, not the denied one
        yield over.content()
        rows = yield self.rows()
        self.assertEqual([row["status"] for row in rows], [403, 200, 429])
        self.assertEqual(rows[0]["cost_usd"], 0.0)

    @defer.inlineCallbacks
    def test_deny_in_the_messages_shape(self):
        self.sidecar.answer("gate-request", deny("not here"))
        response = yield self.h.post("/v1/messages", {
            "model": "anthropic/claude-sonnet-4-5", "max_tokens": 50,
            "messages": [{"role": "user", "content": "hi"}],
        })
        self.assertEqual(response.code, 403)
        self.assertEqual(
            (yield response.json()),
            {"type": "error", "error": {"type": "permission_error", "message": "policy denied request: not here"}},
        )
        self.assertEqual(self.sidecar.received[0].json["format"], "anthropic")

    @defer.inlineCallbacks
    def test_deny_in_the_responses_shape(self):
        self.sidecar.answer("gate-request", deny("nope"))
        response = yield self.h.post("/v1/responses", {"model": "openai/gpt-4.1", "input": "hi"})
        self.assertEqual(response.code, 403)
        self.assertEqual(
            (yield response.json()),
            {"error": {"message": "policy denied request: nope", "type": "permission_error", "param": None,
                       "code": "policy_denied"}},
        )
        self.assertEqual(self.sidecar.received[0].json["format"], "openai")

    @defer.inlineCallbacks
    def test_tool_filter_allow_list(self):
        """TestPolicyToolFilterRestrictsManagedTools, on the request's own tools."""
        self.sidecar.answer("gate-request", filter_tools("allow_list", ["svc_allowed"]))
        doc = chat_body(tools=[weather_tool("svc_allowed"), weather_tool("svc_denied")],
                        tool_choice={"type": "function", "function": {"name": "svc_denied"}})
        response = yield self.h.chat(doc)
        self.assertEqual(response.code, 200, (yield response.text()))
        sent = self.h.fake.received[0].json
        self.assertEqual(sent["tools"], [weather_tool("svc_allowed")])
        self.assertNotIn("tool_choice", sent)  # it forced a tool that is gone
        (filtered,) = self.interventions()
        self.assertEqual((filtered["intervention"], filtered["removed"]), ("policy_tools_filtered", ["svc_denied"]))
        # Decoration sees the filtered request.
        self.assertEqual(self.sidecar.calls("decorate")[0].json["request"]["tools"], [weather_tool("svc_allowed")])

    @defer.inlineCallbacks
    def test_tool_filter_deny_list_of_every_tool(self):
        self.sidecar.answer("gate-request", filter_tools("deny_list", ["a", "b"]))
        doc = chat_body(tools=[weather_tool("a"), weather_tool("b")], tool_choice="required",
                        parallel_tool_calls=False)
        response = yield self.h.chat(doc)
        self.assertEqual(response.code, 200, (yield response.text()))
        sent = self.h.fake.received[0].json
        for field in ("tools", "tool_choice", "parallel_tool_calls"):
            self.assertNotIn(field, sent)

    @defer.inlineCallbacks
    def test_an_unknown_tool_filter_mode_fails_closed(self):
        self.sidecar.answer("gate-request", filter_tools("maybe_list", ["a"]))
        response = yield self.h.chat(chat_body(tools=[weather_tool("a")]))
        self.assertEqual(response.code, 403)
        self.assertEqual((yield response.json())["error"]["code"], "policy_unavailable")
        (unavailable,) = self.interventions()
        self.assertEqual(unavailable["reason"], "unknown policy tool filter mode 'maybe_list'")
        self.assertEqual(self.h.fake.received, [])


class Decorate(PolicyHarness):
    @defer.inlineCallbacks
    def test_openai_messages_patch(self):
        """TestPolicyDecorationOpenAIAndAnthropic/openai: the patch is appended to the messages."""
        self.sidecar.answer("decorate", decorate(messages_patch=[{"role": "system", "content": "policy context"}]))
        response = yield self.h.chat(chat_body())
        self.assertEqual(response.code, 200)
        yield response.content()
        messages = self.h.fake.received[0].json["messages"]
        self.assertEqual(messages[-1], {"role": "system", "content": "policy context"})
        self.assertEqual(messages[:-1], chat_body()["messages"])
        (decorated,) = self.interventions()
        self.assertContractLine(decorated, "intervention", "openai/gpt-4o-mini", "policy_decorated")
        # The response gate is told the request as sent.
        gated = self.sidecar.calls("gate-response")[0].json
        self.assertEqual(json.loads(gated["request_body"])["messages"][-1]["content"], "policy context")

    @defer.inlineCallbacks
    def test_anthropic_system_patch(self):
        """TestPolicyDecorationOpenAIAndAnthropic/anthropic: a paragraph after the system prompt."""
        self.sidecar.answer("decorate", decorate(system_patch="policy context"))
        self.h.fake.enqueue(Reply(json=anthropic_message("backend", "claude-sonnet-4-5", 5, 1)))
        response = yield self.h.post("/v1/messages", {
            "model": "anthropic/claude-sonnet-4-5", "max_tokens": 50, "system": "base",
            "messages": [{"role": "user", "content": "hi"}],
        })
        self.assertEqual(response.code, 200, (yield response.text()))
        self.assertEqual(self.h.fake.received[0].json["system"], "base\n\npolicy context")

    @defer.inlineCallbacks
    def test_anthropic_block_system_and_a_named_intervention(self):
        self.sidecar.answer("decorate", decorate(system_patch="rules apply", intervention="contract_reminder"))
        self.h.fake.enqueue(Reply(json=anthropic_message("ok", "claude-sonnet-4-5", 5, 1)))
        response = yield self.h.post("/v1/messages", {
            "model": "anthropic/claude-sonnet-4-5", "max_tokens": 50,
            "system": [{"type": "text", "text": "base"}], "messages": [{"role": "user", "content": "hi"}],
        })
        yield response.content()
        self.assertEqual(
            self.h.fake.received[0].json["system"],
            [{"type": "text", "text": "base"}, {"type": "text", "text": "rules apply"}],
        )
        # The sidecar named its intervention: that one is logged instead of policy_decorated.
        self.assertEqual([line["intervention"] for line in self.interventions()], ["contract_reminder"])

    @defer.inlineCallbacks
    def test_a_failed_decoration_is_skipped(self):
        """Decoration fails open whatever the fail mode: the reference's error line, then the answer."""
        self.sidecar.answer("decorate", PolicyReply(status=500, raw=b"oops"))
        response = yield self.h.chat(chat_body())
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertEqual(self.h.fake.received[0].json["messages"], chat_body()["messages"])
        request, failed, done = self.lines()
        self.assertContractLine(failed, "error", "openai/gpt-4o-mini")
        self.assertEqual(
            (failed["status_code"], failed["latency_ms"], failed["error"]),
            (0, 0, "policy decorate: the sidecar answered HTTP 500"),
        )
        self.assertEqual(done["type"], "response")

    @defer.inlineCallbacks
    def test_responses_input_patch(self):
        self.sidecar.answer("decorate", decorate(messages_patch=[{"role": "system", "content": "be careful"}]))
        self.h.fake.enqueue(Reply(json=responses_response("ok", "gpt-4.1", 5, 1)))
        response = yield self.h.post("/v1/responses", {"model": "openai/gpt-4.1", "input": "hi"})
        self.assertEqual(response.code, 200, (yield response.text()))
        self.assertEqual(
            self.h.fake.received[0].json["input"],
            [{"role": "user", "content": "hi"}, {"role": "system", "content": "be careful"}],
        )


class GateResponse(PolicyHarness):
    @defer.inlineCallbacks
    def test_amend_a_buffered_answer(self):
        """TestPolicyResponseGateAmendsBufferedResponse: the agent gets the amended body, the provider's usage is billed."""
        amended = {"choices": [{"message": {"content": "amended"}}]}
        self.sidecar.answer("gate-response", amend(amended))
        self.h.fake.enqueue(Reply(json=openai_completion("backend", "gpt-4o-mini", 1000, 500)))
        response = yield self.h.chat(chat_body())
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json()), amended)
        scored = yield self.sidecar.arrived("score")
        self.assertEqual(json.loads(scored.json["response_body"]), amended)  # the reference scores what was delivered
        (line,) = self.interventions()
        self.assertContractLine(line, "intervention", "openai/gpt-4o-mini", "policy_amended")
        (row,) = yield self.rows()
        self.assertEqual((row["status"], row["input_tokens"], row["output_tokens"], bool(row["estimated"])), (200, 1000, 500, False))
        self.assertGreater(row["cost_usd"], 0)
        # The session history keeps what was delivered.
        yield self.h.history._when_idle()
        with open(os.path.join(self.h.history_dir, AGENT, "history.jsonl")) as f:
            (entry,) = [json.loads(line) for line in f]
        self.assertEqual(entry["response"], {"format": "json", "json": amended})

    @defer.inlineCallbacks
    def test_amend_with_a_string_body(self):
        text = json.dumps({"id": "x", "choices": []})
        self.sidecar.answer("gate-response", amend(text))
        response = yield self.h.chat(chat_body())
        self.assertEqual(response.length, len(text))  # the length of the body delivered
        self.assertEqual((yield response.text()), text)

    @defer.inlineCallbacks
    def test_deny_a_buffered_answer(self):
        """The answer was paid for: a 403 for the agent, the provider's usage in the ledger."""
        self.sidecar.answer("gate-response", deny("leaks a secret"))
        self.h.fake.enqueue(Reply(json=openai_completion("the password is", "gpt-4o-mini", 1000, 500)))
        response = yield self.h.chat(chat_body())
        self.assertEqual(response.code, 403)
        body = yield response.text()
        self.assertNotIn("password", body)
        self.assertEqual(json.loads(body)["error"]["message"], "policy denied request: leaks a secret")
        (row,) = yield self.rows()
        self.assertEqual((row["status"], row["input_tokens"], row["output_tokens"], bool(row["estimated"])), (403, 1000, 500, False))
        self.assertGreater(row["cost_usd"], 0)
        error = self.lines("error")[0]
        self.assertEqual((error["status_code"], error["tokens_in"], error["tokens_out"]), (403, 1000, 500))
        (denied,) = self.interventions()
        self.assertEqual((denied["intervention"], denied["hook"]), ("policy_denied", "gate-response"))

    @defer.inlineCallbacks
    def test_deny_a_stream_before_its_first_byte(self):
        """TestPolicyResponseGateDeniesStreamBeforeFirstByte: a JSON 403, no SSE byte, the stream closed."""
        self.sidecar.answer("gate-response", deny("stream blocked"))
        self.h.fake.enqueue(Reply(headers=SSE, sse=openai_sse_events(openai_stream_chunks(["secret"], "gpt-4o-mini"))))
        response = yield self.h.chat(chat_body(stream=True))
        self.assertEqual(response.code, 403)
        body = yield response.text()
        self.assertNotIn("data:", body)
        self.assertEqual(json.loads(body)["error"]["message"], "policy denied request: stream blocked")
        (gated,) = self.sidecar.calls("gate-response")
        self.assertIs(gated.json["stream"], True)
        self.assertNotIn("response_body", gated.json)
        self.assertEqual(gated.json["response_header"]["Content-Type"], ["text/event-stream"])
        (row,) = yield self.rows()
        # Cut by the proxy after the provider started: billed as a walk-away, estimated.
        self.assertEqual((row["status"], bool(row["estimated"])), (403, True))
        self.assertGreater(row["input_tokens"], 0)

    @defer.inlineCallbacks
    def test_a_stream_cannot_be_amended(self):
        """ADR-025 v1: a plain stream gets a deny-only gate; an amend is an allow."""
        self.sidecar.answer("gate-response", amend({"replaced": True}))
        self.h.fake.enqueue(Reply(headers=SSE, sse=openai_sse_events(openai_stream_chunks(["Hi", "!"], "gpt-4o-mini"))))
        response = yield self.h.chat(chat_body(stream=True))
        self.assertEqual(response.code, 200)
        body = yield response.text()
        self.assertIn('"Hi"', body)
        self.assertNotIn("replaced", body)
        self.assertEqual(self.interventions(), [])
        scored = yield self.sidecar.arrived("score")
        self.assertEqual((scored.json["stream"], scored.json["response_body"]), (True, body))

    @defer.inlineCallbacks
    def test_an_error_answer_is_not_gated(self):
        self.h.fake.enqueue(Reply(status=400, json={"error": {"message": "bad", "type": "invalid_request_error"}}))
        response = yield self.h.chat(chat_body())
        self.assertEqual(response.code, 400)
        yield response.content()
        self.assertEqual([c.hook for c in self.sidecar.received], ["gate-request", "decorate"])


class Exempt(PolicyHarness):
    @defer.inlineCallbacks
    def test_policy_exempt_skips_every_hook(self):
        """TestPolicyFailOpenAndPolicyExemptSkipGateFailures/policy exempt."""
        self.sidecar.answer("gate-request", deny())
        self.sidecar.answer("gate-response", deny())
        response = yield self.h.chat(chat_body(), token=f"{JUDGE}:{JUDGE_SECRET}")
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertEqual(self.sidecar.received, [])

    @defer.inlineCallbacks
    def test_rules_are_named_by_path_and_digest(self):
        rules = b'{"version":1,"rules":[{"id":"include.safety","mode":"enforce","text":"No secrets."}]}'
        path = os.path.join(self.h.context_root, AGENT, "rules.json")
        with open(path, "wb") as f:
            f.write(rules)
        response = yield self.h.chat(chat_body())
        yield response.content()
        self.assertEqual(
            self.sidecar.received[0].json["rules"], {"path": path, "digest": hashlib.sha256(rules).hexdigest()}
        )


class Unavailable(PolicyHarness):
    policy_timeout = 0.5

    @defer.inlineCallbacks
    def test_a_slow_sidecar_stalls_only_its_own_request(self):
        """
        The sidecar holds one agent's gate for ever: that request waits
        (then fails closed at the timeout) while an exempt agent's request
        and another agent's allowed one complete.
        """
        never = defer.Deferred()
        self.addCleanup(lambda: never.called or never.callback(None))
        self.sidecar.answer(
            "gate-request", lambda call: PolicyReply(json={"verdict": "allow"}, hold_until=never)
            if call.json["agent_id"] == AGENT else allow()
        )
        finished = []
        slow = self.h.chat(chat_body())
        slow.addCallback(lambda response: finished.append("slow") or response)
        yield self.sidecar.arrived("gate-request")
        judged = yield self.h.chat(chat_body(), token=f"{JUDGE}:{JUDGE_SECRET}")
        self.assertEqual(judged.code, 200)
        yield judged.content()
        other = yield self.h.chat(chat_body(), token=f"{OTHER}:{OTHER_SECRET}")
        self.assertEqual(other.code, 200)
        yield other.content()
        self.assertEqual(finished, [])  # both went while the slow one still waits
        response = yield slow
        self.assertEqual(response.code, 403)
        self.assertEqual(
            (yield response.json()),
            {"error": {"message": "policy evaluator unavailable", "type": "permission_error",
                       "code": "policy_unavailable"}},
        )
        (unavailable,) = [line for line in self.interventions() if line["claw_id"] == AGENT]
        self.assertContractLine(unavailable, "intervention", "openai/gpt-4o-mini", "policy_unavailable")
        self.assertEqual((unavailable["hook"], unavailable["reason"]), ("gate-request", "no answer within 500 ms"))
        rows = yield self.rows()
        self.assertEqual(sorted((row["agent"], row["status"]) for row in rows), [(JUDGE, 200), (OTHER, 200), (AGENT, 403)])

    @defer.inlineCallbacks
    def test_an_agent_that_leaves_hangs_up_on_the_sidecar(self):
        """The call is cancelled at once (not at the timeout), the request settled as 499, nothing audited as unavailable."""
        held = defer.Deferred()
        self.addCleanup(lambda: held.called or held.callback(None))
        self.sidecar.answer("gate-request", PolicyReply(json={"verdict": "allow"}, hold_until=held))
        request = self.h.chat(chat_body())
        request.addErrback(lambda failure: None)
        yield self.sidecar.arrived("gate-request")
        dropped = self.sidecar.call_dropped()
        request.cancel()
        yield dropped
        line = yield self.h.wait_for_audit(lambda line: line["type"] == "error")
        self.assertEqual(line["status_code"], 499)
        self.assertEqual(self.interventions(), [])
        self.assertEqual(self.h.fake.received, [])

    @defer.inlineCallbacks
    def test_a_sidecar_that_is_down_fails_closed(self):
        yield self.sidecar.stop()
        response = yield self.h.chat(chat_body())
        self.assertEqual(response.code, 403)
        self.assertEqual((yield response.json())["error"]["code"], "policy_unavailable")
        (line,) = self.interventions()
        self.assertEqual(line["reason"], "connection refused")
        self.assertEqual(self.h.fake.received, [])

    @defer.inlineCallbacks
    def test_answers_that_cannot_be_used(self):
        for reply, reason in [
            (PolicyReply(status=503, json={"verdict": "allow"}), "the sidecar answered HTTP 503"),
            (PolicyReply(raw=b"<html>"), "the answer is not JSON"),
            (PolicyReply(json=["allow"]), "the answer cannot be used: the gate-request answer is not a JSON object"),
            (PolicyReply(json={"verdict": 1}), "the answer cannot be used: 'verdict' is not a string"),
        ]:
            self.sidecar.answer("gate-request", reply)
            response = yield self.h.chat(chat_body())
            self.assertEqual(response.code, 403)
            yield response.content()
            self.assertEqual(self.interventions()[-1]["reason"], reason)

    @defer.inlineCallbacks
    def test_a_wrong_token_is_unavailability(self):
        self.sidecar.token = "another-token"
        response = yield self.h.chat(chat_body())
        self.assertEqual(response.code, 403)
        yield response.content()
        self.assertEqual(self.interventions()[-1]["reason"], "the sidecar answered HTTP 401")

    @defer.inlineCallbacks
    def test_response_gate_timeout_fails_closed_and_bills(self):
        never = defer.Deferred()
        self.addCleanup(lambda: never.called or never.callback(None))
        self.sidecar.answer("gate-response", PolicyReply(json={"verdict": "allow"}, hold_until=never))
        self.h.fake.enqueue(Reply(json=openai_completion("late", "gpt-4o-mini", 100, 50)))
        response = yield self.h.chat(chat_body())
        self.assertEqual(response.code, 403)
        self.assertNotIn("late", (yield response.text()))
        (row,) = yield self.rows()
        self.assertEqual((row["status"], row["input_tokens"], row["output_tokens"]), (403, 100, 50))


class FailOpen(PolicyHarness):
    fail_open = True
    policy_timeout = 0.5

    @defer.inlineCallbacks
    def test_a_sidecar_that_is_down_lets_requests_through(self):
        """TestPolicyFailOpenAndPolicyExemptSkipGateFailures/fail open."""
        yield self.sidecar.stop()
        self.h.fake.enqueue(Reply(json=openai_completion("through", "gpt-4o-mini", 10, 2)))
        response = yield self.h.chat(chat_body())
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json())["choices"][0]["message"]["content"], "through")
        yield self.h.wait_for_audit(lambda line: line.get("error") == "policy score: connection refused")
        kinds = [(line["type"], line.get("error")) for line in self.lines()]
        self.assertEqual(kinds, [
            ("request", None),
            ("error", "policy request gate: connection refused"),
            ("error", "policy decorate: connection refused"),
            ("error", "policy response gate: connection refused"),
            ("response", None),
            ("error", "policy score: connection refused"),
        ])
        self.assertEqual([line["status_code"] for line in self.lines("error")], [0, 0, 0, 0])
        self.assertEqual(self.interventions(), [])

    @defer.inlineCallbacks
    def test_a_denial_still_denies(self):
        self.sidecar.answer("gate-request", deny("still no"))
        response = yield self.h.chat(chat_body())
        self.assertEqual(response.code, 403)
        yield response.content()


class Conformance(TestCase):
    """
    An allow-everything policy changes nothing the provider gets or the
    agent gets (the reference's nil-passthrough conformance, our way).
    """

    timeout = 30

    @defer.inlineCallbacks
    def exchange(self, policy):
        harness = ProxyHarness(self, fake_providers=("openai", "anthropic"), policy=policy)
        yield harness.start()
        harness.fake.enqueue(Reply(json=openai_completion("same", "gpt-4o-mini", 7, 2)))
        harness.fake.enqueue(Reply(headers=SSE, sse=openai_sse_events(openai_stream_chunks(["a", "b"], "gpt-4o-mini"))))
        results = []
        for doc in (chat_body(), chat_body(stream=True)):
            response = yield harness.chat(doc)
            results.append((response.code, (yield response.content())))
        return results, [r.body for r in harness.fake.received]

    @defer.inlineCallbacks
    def test_allow_everything_is_passthrough(self):
        sidecar = FakePolicySidecar(reactor)
        yield sidecar.start()
        self.addCleanup(sidecar.stop)
        client = PolicySidecar(reactor, sidecar.url)
        self.addCleanup(client.pool.closeCachedConnections)
        plain = yield self.exchange(None)
        governed = yield self.exchange(PolicyPlane(client, 2.0))
        self.assertEqual(plain, governed)
        yield sidecar.arrived("score", count=2)
        # gate, decorate, gate-response, score; gate, decorate, stream gate, score
        self.assertEqual(len(sidecar.received), 8)
