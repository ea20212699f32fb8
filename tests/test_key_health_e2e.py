"""
No agent can harm another through the shared provider key, end to end over
real sockets: a real proxy in front of fake providers that judge keys and
headers as the real ones do.

  - an agent's bogus OpenAI-Organization no longer reaches the provider, and
    a 401 caused by one request no longer kills the key for everyone;
  - a revoked key dies only after a re-check, and comes back by itself after
    a re-probe once the provider accepts it again;
  - a 429 for one model leaves the other models served by the same key;
  - a provider error that echoes the request's headers reaches the agent
    with the key scrubbed out.
"""

from __future__ import annotations

import json

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cllama_tx.demo.model import DemoModel
from cllama_tx.testing import (
    Reply,
    anthropic_error,
    echo_headers_error,
    openai_error,
    presented_key,
    strict_provider,
)
from tests.secret_scan import SCANNER
from tests.support import (
    PROVIDER_KEY,
    UI_TOKEN,
    ProxyHarness,
    chat_body,
    write_agent,
)

OTHER = "atlas"
OTHER_SECRET = "7a2e" * 12
SECOND_KEY = "sk-upstream-second-key-0002"
OPERATOR_ORG = "org-operator-0000000000000007"
NOW = 1767323045.0
SCANNER.register(OTHER_SECRET, SECOND_KEY, OPERATOR_ORG)


def _other_agent(h) -> str:
    write_agent(h.context_root, OTHER, OTHER_SECRET)
    return f"{OTHER}:{OTHER_SECRET}"


def _pool_lines(h):
    return [line for line in h.audit_lines() if line["type"] == "provider_pool"]


class BogusHeaderTests(TestCase):
    @defer.inlineCallbacks
    def test_a_bogus_organization_no_longer_kills_the_only_key(self):
        """The issue's probe: one agent sends a bogus org; everyone keeps being served."""
        h = yield ProxyHarness(self).start()
        h.fake._responder = strict_provider({PROVIDER_KEY})
        other = _other_agent(h)
        hostile = yield h.chat(
            chat_body(),
            headers={
                "OpenAI-Organization": ["org-bogus"],
                "OpenAI-Project": ["proj_bogus"],
                "Cookie": ["session=stolen"],
                "X-Forwarded-For": ["10.9.9.9"],
                "X-Agent-ID": [OTHER],
            },
        )
        # The header never reaches the provider, so the request is simply served.
        self.assertEqual(hostile.code, 200)
        self.assertEqual((yield hostile.json())["object"], "chat.completion")
        [received] = h.fake.received
        for name in ("openai-organization", "openai-project", "cookie", "x-forwarded-for", "x-agent-id"):
            self.assertIsNone(received.header(name), name)
        for _ in range(3):
            response = yield h.chat(chat_body(), token=other)
            self.assertEqual(response.code, 200)
            self.assertEqual((yield response.json())["choices"][0]["message"]["role"], "assistant")
        self.assertEqual(_pool_lines(h), [])
        [key] = h.providers.resolve("openai").pool.keys
        self.assertEqual(key.state, "ready")

    @defer.inlineCallbacks
    def test_the_operators_organization_is_sent_instead(self):
        h = yield ProxyHarness(
            self, providers_json={"version": 2, "providers": {"openai": {"organization": OPERATOR_ORG}}}
        ).start()
        h.fake._responder = strict_provider({PROVIDER_KEY}, organization=OPERATOR_ORG)
        response = yield h.chat(chat_body(), headers={"OpenAI-Organization": ["org-bogus"]})
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertEqual(h.fake.received[0].header("openai-organization"), OPERATOR_ORG)
        self.assertNotIn(OPERATOR_ORG, h.audit_text())

    @defer.inlineCallbacks
    def test_a_401_about_one_request_leaves_the_key_to_everyone(self):
        """
        Defence in depth: a provider that answers 401 to one agent's request
        (not to the key) gets the key re-checked; the re-check passes, the
        agent hears the 401, and the agent waiting meanwhile is served.
        """
        h = yield ProxyHarness(self).start()
        other = _other_agent(h)
        demo = DemoModel().respond
        probe_gate = defer.Deferred()

        def respond(received):
            if received.path.endswith("/models"):
                reply = demo(received)
                return Reply(json=reply.json, hold_until=probe_gate)
            if received.json.get("user") == "poison":
                return Reply(status=401, json=openai_error("You may not do that.", "invalid_request_error", "no_access"))
            return demo(received)

        h.fake._responder = respond
        hostile = h.chat(chat_body(user="poison"))
        yield h.fake.wait_for_request(2)  # the request, then the re-check
        self.assertEqual(h.providers.resolve("openai").pool.keys[0].state, "suspect")
        # Another agent arrives while the key is suspect: it waits for the verdict.
        waiting = h.chat(chat_body(), token=other)
        probe_gate.callback(None)
        hostile, served = yield defer.gatherResults([hostile, waiting])
        self.assertEqual(hostile.code, 401)
        self.assertEqual((yield hostile.json())["error"]["code"], "no_access")
        self.assertEqual(served.code, 200)
        self.assertEqual((yield served.json())["object"], "chat.completion")
        self.assertEqual(
            [(line["action"], line["reason"]) for line in _pool_lines(h)],
            [
                ("suspect", "unauthorized: re-checking the key"),
                ("ready", "re-check passed (GET /v1/models answered 200): the 401 was about the request, not the key"),
            ],
        )
        self.assertEqual([r.path for r in h.fake.received], ["/v1/chat/completions", "/v1/models", "/v1/chat/completions"])
        # Probes carry the key and nothing of any agent's.
        probe = h.fake.received[1]
        self.assertEqual(probe.method, "GET")
        self.assertEqual(presented_key(probe), PROVIDER_KEY)
        self.assertEqual(sorted(probe.headers), ["accept", "authorization", "host"])


class DeadKeyTests(TestCase):
    @defer.inlineCallbacks
    def test_a_dead_key_comes_back_after_its_reprobe(self):
        clock = Clock()
        clock.advance(NOW)
        h = yield ProxyHarness(self, provider_clock=clock).start()
        valid = set()  # the provider revoked the key
        h.fake._responder = strict_provider(valid)
        pool = h.providers.resolve("openai").pool

        refused = yield h.chat(chat_body())
        self.assertEqual(refused.code, 503)
        self.assertEqual(refused.headers.getRawHeaders("retry-after"), ["30"])
        body = yield refused.json()
        self.assertEqual(body["error"]["code"], "provider_keys_exhausted")
        self.assertNotIn(PROVIDER_KEY, json.dumps(body))
        actions = [(line["action"], line.get("next_probe_at")) for line in _pool_lines(h)]
        self.assertEqual(actions, [("suspect", None), ("dead", "2026-01-02T03:04:35.000Z")])

        # The first re-probe still finds the key refused: the next one waits twice as long.
        clock.advance(30)
        yield pool.checks_pending()
        [key] = pool.keys
        self.assertEqual((key.state, key.next_probe_at), ("dead", NOW + 30 + 60))
        page = yield h.ui_client.get(
            "http://ui/providers", headers={"Authorization": f"Bearer {UI_TOKEN}", "Accept": "text/html"}
        )
        html = yield page.text()
        self.assertIn("next re-probe", html)
        self.assertIn('datetime="2026-01-02T03:05:35.000Z"', html)
        self.assertIn("unauthorized (GET /v1/models answered 401)", html)
        self.assertNotIn(PROVIDER_KEY, html)
        status = yield (yield h.ui_client.get("http://ui/api/status", headers={"Authorization": f"Bearer {UI_TOKEN}"})).json()
        [openai] = [p for p in status["providers"] if p["name"] == "openai"]
        self.assertEqual(openai["keys"][0]["next_probe_at"], "2026-01-02T03:05:35.000Z")

        # The operator sorts it out at the provider; the key comes back by itself.
        valid.add(PROVIDER_KEY)
        recovered = h.wait_for_audit(lambda line: line.get("action") == "recovered")
        clock.advance(60)
        line = yield recovered
        self.assertEqual(line["reason"], "re-probe passed (GET /v1/models answered 200)")
        self.assertEqual(line["key_id"], "seed:OPENAI_API_KEY")
        served = yield h.chat(chat_body())
        self.assertEqual(served.code, 200)
        self.assertEqual((yield served.json())["object"], "chat.completion")
        self.assertEqual(key.state, "ready")

    @defer.inlineCallbacks
    def test_a_revoked_key_fails_over_after_its_recheck(self):
        h = yield ProxyHarness(self, env={"OPENAI_API_KEY_1": SECOND_KEY}).start()
        h.fake._responder = strict_provider({SECOND_KEY})
        response = yield h.chat(chat_body())
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertEqual(
            [(r.method, presented_key(r)) for r in h.fake.received],
            [("POST", PROVIDER_KEY), ("GET", PROVIDER_KEY), ("POST", SECOND_KEY)],
        )
        self.assertEqual([line["action"] for line in _pool_lines(h)], ["suspect", "dead"])


class AgentGoneTests(TestCase):
    @defer.inlineCallbacks
    def test_an_agent_that_leaves_during_the_recheck_costs_no_further_request(self):
        h = yield ProxyHarness(self, env={"OPENAI_API_KEY_1": SECOND_KEY}).start()
        strict = strict_provider({SECOND_KEY})
        probe_gate = defer.Deferred()

        def respond(received):
            reply = strict(received)
            if received.path.endswith("/models"):
                return Reply(status=reply.status, json=reply.json, hold_until=probe_gate)
            return reply

        h.fake._responder = respond
        noticed = defer.Deferred()
        agent_gone = h.proxy._agent_gone

        def observed(reason, ex):
            agent_gone(reason, ex)
            noticed.callback(None)

        h.proxy._agent_gone = observed
        request = h.chat(chat_body())
        request.addErrback(lambda failure: None)
        yield h.fake.wait_for_request(2)  # the 401, then the re-check
        request.cancel()  # the agent hangs up while the key is re-checked
        yield noticed
        gone = h.wait_for_audit(lambda line: line["type"] == "error")
        probe_gate.callback(None)
        line = yield gone
        self.assertEqual(line["status_code"], 499)
        # The key was still judged, but nothing more was sent for that agent.
        self.assertEqual([(r.method, presented_key(r)) for r in h.fake.received], [("POST", PROVIDER_KEY), ("GET", PROVIDER_KEY)])
        self.assertEqual([line["action"] for line in _pool_lines(h)], ["suspect", "dead"])


class PerModelCooldownTests(TestCase):
    @defer.inlineCallbacks
    def test_a_429_on_one_model_leaves_the_other_served_by_the_same_key(self):
        clock = Clock()
        clock.advance(NOW)
        h = yield ProxyHarness(self, provider_clock=clock).start()
        demo = DemoModel().respond
        limited = {"gpt-4o"}

        def respond(received):
            if received.json and received.json.get("model") in limited:
                return Reply(
                    status=429,
                    headers={"retry-after": "20"},
                    json=openai_error("Rate limit reached for gpt-4o on requests per min (RPM)", "requests", "rate_limit_exceeded"),
                )
            return demo(received)

        h.fake._responder = respond
        refused = yield h.chat(chat_body(model="openai/gpt-4o"))
        self.assertEqual(refused.code, 429)
        self.assertEqual(refused.headers.getRawHeaders("retry-after"), ["20"])
        self.assertEqual((yield refused.json())["error"]["code"], "provider_keys_exhausted")
        [line] = _pool_lines(h)
        self.assertEqual(
            {k: line[k] for k in ("action", "model", "key_id", "cooldown_until")},
            {"action": "cooldown", "model": "gpt-4o", "key_id": "seed:OPENAI_API_KEY", "cooldown_until": "2026-01-02T03:04:25.000Z"},
        )
        served = yield h.chat(chat_body(model="openai/gpt-4o-mini"))
        self.assertEqual(served.code, 200)
        self.assertEqual((yield served.json())["object"], "chat.completion")
        self.assertEqual(presented_key(h.fake.received[-1]), PROVIDER_KEY)
        # The cooled model is refused without asking the provider again.
        sent = len(h.fake.received)
        again = yield h.chat(chat_body(model="openai/gpt-4o"))
        self.assertEqual(again.code, 429)
        yield again.content()
        self.assertEqual(len(h.fake.received), sent)
        # Until its cooldown ends.
        limited.clear()
        clock.advance(20)
        back = yield h.chat(chat_body(model="openai/gpt-4o"))
        self.assertEqual(back.code, 200)
        yield back.content()
        self.assertEqual(h.fake.received[-1].json["model"], "gpt-4o")


class ScrubTests(TestCase):
    def assertScrubbed(self, text: str):
        self.assertNotIn(PROVIDER_KEY, text)
        self.assertIn("[redacted]", text)

    @defer.inlineCallbacks
    def test_an_echoed_key_never_reaches_the_agent(self):
        h = yield ProxyHarness(self).start()
        h.fake._responder = echo_headers_error(400)
        for stream in (False, True):
            response = yield h.chat(chat_body(stream=stream))
            self.assertEqual(response.code, 400)
            text = yield response.text()
            body = json.loads(text)
            self.assertEqual(body["error"]["code"], "bad_request")
            self.assertIn("authorization: Bearer [redacted]", body["error"]["message"])
            self.assertScrubbed(text)
            self.assertEqual(response.headers.getRawHeaders("x-echo-key"), ["[redacted]"])
        self.assertNotIn(PROVIDER_KEY, h.audit_text())

    @defer.inlineCallbacks
    def test_an_echoing_401_is_scrubbed_too(self):
        """A 401 the re-check finds is about the request: passed on, scrubbed."""
        h = yield ProxyHarness(self).start()
        h.fake._responder = echo_headers_error(401)
        response = yield h.chat(chat_body())
        self.assertEqual(response.code, 401)
        self.assertScrubbed((yield response.text()))
        self.assertEqual(response.headers.getRawHeaders("x-echo-key"), ["[redacted]"])
        self.assertEqual([line["action"] for line in _pool_lines(h)], ["suspect", "ready"])

    @defer.inlineCallbacks
    def test_an_anthropic_echo_is_scrubbed(self):
        h = yield ProxyHarness(self, fake_providers=("openai", "anthropic")).start()
        h.fake._responder = echo_headers_error(403)
        response = yield h.post(
            "/v1/messages",
            {"model": "anthropic/claude-sonnet-4", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
        )
        self.assertEqual(response.code, 403)
        text = yield response.text()
        self.assertScrubbed(text)
        self.assertIn("x-api-key: [redacted]", json.loads(text)["error"]["message"])

    @defer.inlineCallbacks
    def test_an_operator_organization_echoed_is_scrubbed(self):
        h = yield ProxyHarness(self, env={"OPENAI_ORG_ID": OPERATOR_ORG}).start()
        h.fake._responder = echo_headers_error(400)
        response = yield h.chat(chat_body())
        text = yield response.text()
        self.assertNotIn(OPERATOR_ORG, text)
        self.assertIn("openai-organization: [redacted]", text)
        self.assertEqual(h.fake.received[0].header("openai-organization"), OPERATOR_ORG)


class AnthropicRecheckTests(TestCase):
    @defer.inlineCallbacks
    def test_anthropic_keys_are_rechecked_with_their_own_headers(self):
        h = yield ProxyHarness(self, fake_providers=("anthropic",)).start()
        demo = DemoModel().respond

        def respond(received):
            if received.path.endswith("/models"):
                return demo(received)
            return Reply(status=401, json=anthropic_error("authentication_error", "this request is not allowed"))

        h.fake._responder = respond
        response = yield h.post(
            "/v1/messages",
            {"model": "anthropic/claude-sonnet-4", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]},
        )
        self.assertEqual(response.code, 401)
        self.assertEqual((yield response.json())["error"]["type"], "authentication_error")
        probe = h.fake.received[1]
        self.assertEqual((probe.method, probe.path), ("GET", "/v1/models"))
        self.assertEqual(probe.header("x-api-key"), PROVIDER_KEY)
        self.assertEqual(probe.header("anthropic-version"), "2023-06-01")
        self.assertIsNone(probe.header("authorization"))
        self.assertEqual(h.providers.resolve("anthropic").pool.keys[0].state, "ready")
