"""
The policy plane (ADR-025) in the real daemon, `twistd -n cllama` in a
child process: the reference's sidecar behaviours against the fake sidecar
(CLLAMA_POLICY_URL), and an operator's plugin loaded by name
(CLLAMA_POLICY_PLUGIN).  The audit lines are read from the daemon's stdout
and checked field by field against the reference's names.
"""

from __future__ import annotations

import json
import os
import textwrap

import treq
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.testing import (
    FakeProvider,
    Reply,
    openai_completion,
    openai_sse_events,
    openai_stream_chunks,
)
from cllama_tx.testing.policy import FakePolicySidecar, PolicyReply, allow, amend, decorate, deny
from tests.runtime.test_daemon import REPO, spawn_daemon
from tests.secret_scan import SCANNER
from tests.support import AGENT, PROVIDER_KEY, SECRET, chat_body, write_agent

POLICY_TOKEN = "daemon-policy-token-1618"
UI_TOKEN = "policy-daemon-ui-token-99"
SCANNER.register(POLICY_TOKEN, UI_TOKEN)
JUDGE, JUDGE_SECRET = "judge", "7e3a" * 12
MODEL = "openai/gpt-4o-mini"
SSE = {"content-type": "text/event-stream"}

# An operator's plugin, as it would be written: its own module on PYTHONPATH.
PLUGIN = '''
"""Keeps agents off one word, asks for short answers, and hides passwords."""

import json

from zope.interface import implementer

from cllama_tx.governance.policy_plane import GateDecision, ResponseDecision
from cllama_tx.interfaces import IRequestPolicy


@implementer(IRequestPolicy)
class Keeper:
    def __init__(self, host):
        self.word = host.env["KEEPER_WORD"]

    def gate_request(self, call):
        if self.word in json.dumps(call.request):
            return GateDecision(verdict="deny", reason="mentions " + self.word)
        return None

    async def decorate(self, call):
        return {"messages_patch": [{"role": "system", "content": "Answer in one line."}]}

    def gate_response(self, call):
        if "password" in call.response_body:
            body = json.loads(call.response_body)
            body["choices"][0]["message"]["content"] = "[withheld]"
            return ResponseDecision(verdict="amend", amended_body=json.dumps(body).encode())
        return {"verdict": "allow"}


def make(host):
    return Keeper(host)
'''


def said(text):
    """A chat body whose one message says C{text}."""
    return chat_body(messages=[{"role": "user", "content": text}])


class PolicyDaemon(TestCase):
    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        self.fake = FakeProvider(reactor)
        yield self.fake.start()
        self.addCleanup(self.fake.stop)
        base = os.path.abspath(self.mktemp())
        self.context_root = os.path.join(base, "context")
        auth_dir = os.path.join(base, "auth")
        os.makedirs(auth_dir)
        write_agent(self.context_root, AGENT, SECRET)
        write_agent(self.context_root, JUDGE, JUDGE_SECRET, policy_exempt=True)
        self.env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": self.context_root,
            "CLAW_AUTH_DIR": auth_dir,
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.fake.base_url,
            "CLLAMA_UI_TOKEN": UI_TOKEN,
        }
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    def chat(self, api, doc, agent=AGENT, secret=SECRET):
        return self.http.post(api + "/v1/chat/completions", json=doc,
                              headers={"Authorization": f"Bearer {agent}:{secret}"})

    @defer.inlineCallbacks
    def start(self, env):
        process, transport = spawn_daemon(self, {**self.env, **env})
        ports = yield process.ready
        return process, transport, f"http://127.0.0.1:{ports['API']}"

    @defer.inlineCallbacks
    def stop(self, process, transport):
        transport.signalProcess("TERM")
        code = yield process.ended
        self.assertEqual((code, process.signal), (0, None))
        for secret in (SECRET, PROVIDER_KEY, POLICY_TOKEN, UI_TOKEN):
            self.assertNotIn(secret.encode(), process.stdout + process.stderr)

    def story(self, process, request_id):
        """(type, intervention) of a request's audit lines, in order, each with the reference's fields."""
        lines = [line for line in process.audit_lines() if line.get("request_id") == request_id]
        for line in lines:
            for field in ("ts", "claw_id", "type", "model", "intervention"):
                self.assertIn(field, line)
            self.assertEqual((line["claw_id"], line["model"]), (AGENT, MODEL))
            if line["type"] != "intervention":
                self.assertIsNone(line["intervention"])
        return [(line["type"], line["intervention"]) for line in lines]


class Sidecar(PolicyDaemon):
    @defer.inlineCallbacks
    def test_the_references_behaviours(self):
        sidecar = FakePolicySidecar(reactor, token=POLICY_TOKEN)
        yield sidecar.start()
        self.addCleanup(sidecar.stop)
        held = defer.Deferred()
        self.addCleanup(lambda: held.called or held.callback(None))

        def gate(call):
            text = json.dumps(call.json["request"])
            if "forbidden" in text:
                return deny("off limits")
            if "slowly" in text:
                return PolicyReply(json={"verdict": "allow"}, hold_until=held)
            return allow()

        def gate_response(call):
            if call.json["stream"]:
                return deny("no streams today")
            if "password" in call.json["response_body"]:
                return amend({"choices": [{"message": {"role": "assistant", "content": "[withheld]"}}]})
            return allow()

        sidecar.answer("gate-request", gate)
        sidecar.answer("decorate", decorate(messages_patch=[{"role": "system", "content": "Policy: be kind."}]))
        sidecar.answer("gate-response", gate_response)
        process, transport, api = yield self.start({
            "CLLAMA_POLICY_URL": sidecar.url,
            "CLLAMA_POLICY_TOKEN": POLICY_TOKEN,
            "CLLAMA_POLICY_TIMEOUT_MS": "500",
        })
        yield process.wait_for_stderr(b"Policy: sidecar at http://127.0.0.1:")

        # Denied before dispatch, in the chat surface's shape.
        denied = yield self.chat(api, said("forbidden words"))
        self.assertEqual(denied.code, 403)
        self.assertEqual((yield denied.json()), {"error": {
            "message": "policy denied request: off limits", "type": "permission_error", "code": "policy_denied"}})
        self.assertEqual(self.fake.received, [])
        self.assertEqual(sidecar.received[0].header("authorization"), f"Bearer {POLICY_TOKEN}")

        # Allowed and decorated; the answer amended.
        self.fake.enqueue(Reply(json=openai_completion("the password is hunter2", "gpt-4o-mini", 20, 6)))
        amended = yield self.chat(api, said("what is the password?"))
        self.assertEqual(amended.code, 200)
        self.assertEqual((yield amended.json())["choices"][0]["message"]["content"], "[withheld]")
        sent = self.fake.received[0].json["messages"]
        self.assertEqual(sent[-1], {"role": "system", "content": "Policy: be kind."})

        # A stream denied before its first byte.
        self.fake.enqueue(Reply(headers=SSE, sse=openai_sse_events(openai_stream_chunks(["hi"], "gpt-4o-mini"))))
        streamed = yield self.chat(api, {**said("hello"), "stream": True})
        self.assertEqual(streamed.code, 403)
        self.assertNotIn(b"data:", (yield streamed.content()))

        # A slow sidecar: the exempt judge is served while the held request waits, which then fails closed.
        slow = self.chat(api, said("answer slowly"))
        finished = []
        slow.addCallback(lambda response: finished.append(True) or response)
        yield sidecar.arrived("gate-request", count=4)
        judged = yield self.chat(api, said("judge this"), agent=JUDGE, secret=JUDGE_SECRET)
        self.assertEqual(judged.code, 200)
        yield judged.content()
        self.assertEqual(finished, [])
        unavailable = yield slow
        self.assertEqual(unavailable.code, 403)
        self.assertEqual((yield unavailable.json())["error"]["code"], "policy_unavailable")

        yield process.wait_for_audit(lambda lines: sum(line["type"] in ("response", "error") for line in lines) >= 5)
        yield self.stop(process, transport)
        ids = [response.headers.getRawHeaders("x-cllama-request-id")[0]
               for response in (denied, amended, streamed, unavailable)]
        self.assertEqual(self.story(process, ids[0]), [
            ("request", None), ("intervention", "policy_denied"), ("error", None)])
        self.assertEqual(self.story(process, ids[1]), [
            ("request", None), ("intervention", "policy_decorated"), ("intervention", "policy_amended"),
            ("response", None)])
        self.assertEqual(self.story(process, ids[2]), [
            ("request", None), ("intervention", "policy_decorated"), ("intervention", "policy_denied"),
            ("error", None)])
        self.assertEqual(self.story(process, ids[3]), [
            ("request", None), ("intervention", "policy_unavailable"), ("error", None)])
        by_id = {line["request_id"]: line for line in process.audit_lines() if line["type"] == "error"}
        self.assertEqual([by_id[i]["status_code"] for i in (ids[0], ids[2], ids[3])], [403, 403, 403])
        judge_lines = [line for line in process.audit_lines() if line["claw_id"] == JUDGE]
        self.assertEqual([line["type"] for line in judge_lines], ["request", "response"])
        self.assertNotIn(JUDGE, [call.json["agent_id"] for call in sidecar.received])


class Plugin(PolicyDaemon):
    @defer.inlineCallbacks
    def test_an_operators_plugin(self):
        plugins = os.path.abspath(self.mktemp())
        os.makedirs(plugins)
        with open(os.path.join(plugins, "keeper_policy.py"), "w") as f:
            f.write(textwrap.dedent(PLUGIN))
        process, transport, api = yield self.start({
            "PYTHONPATH": f"{REPO}{os.pathsep}{plugins}",
            "CLLAMA_POLICY_PLUGIN": "keeper_policy:make",
            "KEEPER_WORD": "forbidden",
        })
        yield process.wait_for_stderr(b"Policy: plugin keeper_policy:make, 1000 ms per hook, failing closed")

        denied = yield self.chat(api, said("say something forbidden"))
        self.assertEqual(denied.code, 403)
        self.assertEqual((yield denied.json())["error"]["message"], "policy denied request: mentions forbidden")
        self.assertEqual(self.fake.received, [])

        self.fake.enqueue(Reply(json=openai_completion("my password is hunter2", "gpt-4o-mini", 20, 6)))
        amended = yield self.chat(api, said("tell me"))
        self.assertEqual(amended.code, 200)
        self.assertEqual((yield amended.json())["choices"][0]["message"]["content"], "[withheld]")
        self.assertEqual(self.fake.received[0].json["messages"][-1],
                         {"role": "system", "content": "Answer in one line."})

        yield process.wait_for_audit(lambda lines: sum(line["type"] in ("response", "error") for line in lines) >= 2)
        yield self.stop(process, transport)
        ids = [response.headers.getRawHeaders("x-cllama-request-id")[0] for response in (denied, amended)]
        self.assertEqual(self.story(process, ids[0]), [
            ("request", None), ("intervention", "policy_denied"), ("error", None)])
        self.assertEqual(self.story(process, ids[1]), [
            ("request", None), ("intervention", "policy_decorated"), ("intervention", "policy_amended"),
            ("response", None)])


class Settings(PolicyDaemon):
    @defer.inlineCallbacks
    def refused(self, env, message):
        process, _ = spawn_daemon(self, {**self.env, **env})
        process.ready.addErrback(lambda _: None)
        code = yield process.ended
        self.assertEqual(code, 1)
        self.assertIn(message, process.stdout + process.stderr)  # twistd prints usage errors on stdout

    def test_a_url_without_a_scheme(self):
        return self.refused({"CLLAMA_POLICY_URL": "policy:9000"},
                            b"CLLAMA_POLICY_URL must be an http:// or https:// URL with a host")

    def test_a_plugin_that_cannot_be_imported(self):
        return self.refused({"CLLAMA_POLICY_PLUGIN": "no_such_policy:make"},
                            b"CLLAMA_POLICY_PLUGIN: cannot import 'no_such_policy'")

    def test_both(self):
        return self.refused({"CLLAMA_POLICY_URL": "http://policy:9000", "CLLAMA_POLICY_PLUGIN": "x:y"},
                            b"set CLLAMA_POLICY_URL or CLLAMA_POLICY_PLUGIN, not both")
