"""
The relay under stress, end to end: upstream failures before and after the
first byte, timeouts, key pools, agents that disconnect or read slowly.
"""

import json

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.trial.unittest import TestCase

from cllama_tx.testing import (
    Reply,
    openai_completion,
    openai_error,
    openai_sse_events,
    openai_stream_chunks,
    parse_sse,
    strict_provider,
)
from tests.secret_scan import SCANNER
from tests.support import AGENT, SECRET, ProxyHarness, chat_body

SSE = {"content-type": "text/event-stream"}


def stream_events(n=3):
    return openai_sse_events(openai_stream_chunks([f"w{i} " for i in range(n)], "gpt-4o-mini"))


class UpstreamFailureTests(TestCase):
    @defer.inlineCallbacks
    def test_unreachable_upstream_is_a_clean_502(self):
        h = yield ProxyHarness(self, env={"OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}).start()
        response = yield h.chat(chat_body())
        self.assertEqual(response.code, 502)
        body = yield response.json()
        self.assertEqual(body["error"]["code"], "upstream_unreachable")
        self.assertEqual(body["error"]["type"], "api_error")
        [_, error] = h.audit_lines()
        self.assertEqual((error["type"], error["status_code"]), ("error", 502))

    @defer.inlineCallbacks
    def test_abort_before_headers_is_a_clean_502(self):
        h = yield ProxyHarness(self).start()
        h.fake.enqueue(Reply(abort_before_headers=True))
        response = yield h.chat(chat_body())
        self.assertEqual(response.code, 502)
        self.assertEqual((yield response.json())["error"]["code"], "upstream_unreachable")

    @defer.inlineCallbacks
    def test_first_byte_timeout_before_headers(self):
        h = yield ProxyHarness(self, first_byte_timeout=0.2).start()
        hold = defer.Deferred()
        h.fake.enqueue(Reply(json=openai_completion("late", "gpt-4o-mini", 1, 1), hold_until=hold))
        response = yield h.chat(chat_body())
        hold.callback(None)
        self.assertEqual(response.code, 504)
        body = yield response.json()
        self.assertEqual(body["error"]["code"], "upstream_timeout")

    @defer.inlineCallbacks
    def test_first_byte_timeout_after_headers_gives_json_error(self):
        """Headers arrived but no body byte: nothing reached the agent yet."""
        h = yield ProxyHarness(self, first_byte_timeout=0.3).start()
        h.fake.enqueue(Reply(sse=stream_events(), headers=SSE, cut_after_chunks=0))
        # cut_after_chunks=0 closes right after headers: that is a broken
        # stream before the first byte, reported as a clean JSON error.
        response = yield h.chat(chat_body(stream=True))
        self.assertEqual(response.code, 502)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual((yield response.json())["error"]["code"], "upstream_interrupted")

    @defer.inlineCallbacks
    def test_cut_mid_stream_ends_with_sse_error_event(self):
        h = yield ProxyHarness(self).start()
        h.fake.enqueue(Reply(sse=stream_events(5), headers=SSE, cut_after_chunks=2))
        response = yield h.chat(chat_body(stream=True))
        self.assertEqual(response.code, 200)
        body = yield response.content()
        events = parse_sse(body)
        self.assertEqual(len(events), 3)
        error = json.loads(events[-1][1])
        self.assertEqual(error["error"]["code"], "upstream_interrupted")
        lines = h.audit_lines()
        self.assertEqual(lines[-1]["type"], "error")
        self.assertEqual(lines[-1]["status_code"], 502)

    @defer.inlineCallbacks
    def test_idle_timeout_mid_stream(self):
        h = yield ProxyHarness(self, idle_timeout=0.2).start()
        h.fake.enqueue(Reply(sse=stream_events(3), headers=SSE, delay_between_chunks=5.0))
        response = yield h.chat(chat_body(stream=True))
        body = yield response.content()
        events = parse_sse(body)
        self.assertEqual(len(events), 2)
        self.assertEqual(json.loads(events[-1][1])["error"]["code"], "upstream_timeout")
        yield h.fake.wait_for_disconnect()


SCANNER.register("sk-key-one-aaaa", "sk-key-two-bbbb")


class KeyPoolTests(TestCase):
    env = {"OPENAI_API_KEY": "sk-key-one-aaaa", "OPENAI_API_KEY_1": "sk-key-two-bbbb"}

    @defer.inlineCallbacks
    def test_revoked_key_fails_over_to_the_next(self):
        """A 401 makes the key suspect; the re-check confirms it; the next key serves."""
        h = yield ProxyHarness(self, env=self.env).start()
        h.fake._responder = strict_provider({"sk-key-two-bbbb"})
        response = yield h.chat(chat_body())
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json())["object"], "chat.completion")
        seen = [(r.method, r.path, r.header("authorization")) for r in h.fake.received]
        self.assertEqual(
            seen,
            [
                ("POST", "/v1/chat/completions", "Bearer sk-key-one-aaaa"),
                ("GET", "/v1/models", "Bearer sk-key-one-aaaa"),  # the re-check
                ("POST", "/v1/chat/completions", "Bearer sk-key-two-bbbb"),
            ],
        )
        pool_lines = [line for line in h.audit_lines() if line["type"] == "provider_pool"]
        self.assertEqual([line["action"] for line in pool_lines], ["suspect", "dead"])
        self.assertEqual({line["provider"] for line in pool_lines}, {"openai"})
        self.assertEqual(pool_lines[1]["reason"], "unauthorized: re-check confirmed (GET /v1/models answered 401)")
        self.assertNotIn("sk-key-one-aaaa", h.audit_text())
        # The dead key is not tried again.
        yield (yield h.chat(chat_body())).content()
        self.assertEqual(h.fake.received[-1].header("authorization"), "Bearer sk-key-two-bbbb")
        self.assertEqual(len(h.fake.received), 4)

    @defer.inlineCallbacks
    def test_all_keys_rate_limited_is_an_honest_429(self):
        h = yield ProxyHarness(self, env=self.env).start()
        limited = Reply(status=429, headers={"retry-after": "7"}, json=openai_error("Rate limit reached", "requests", "rate_limit_exceeded"))
        h.fake.enqueue(limited, limited)
        response = yield h.chat(chat_body())
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["7"])
        body = yield response.json()
        self.assertEqual(body["error"]["code"], "provider_keys_exhausted")
        self.assertEqual(len(h.fake.received), 2)
        actions = [line["action"] for line in h.audit_lines() if line["type"] == "provider_pool"]
        self.assertEqual(actions, ["cooldown", "cooldown"])

    @defer.inlineCallbacks
    def test_all_keys_dead_is_503(self):
        h = yield ProxyHarness(self, env=self.env).start()
        quota = Reply(status=429, json=openai_error("You exceeded your current quota", "insufficient_quota", "insufficient_quota"))
        h.fake.enqueue(quota, quota)
        response = yield h.chat(chat_body())
        self.assertEqual(response.code, 503)
        self.assertTrue(response.headers.getRawHeaders("retry-after"))
        self.assertEqual((yield response.json())["error"]["code"], "provider_keys_exhausted")

    @defer.inlineCallbacks
    def test_plain_429_without_key_problem_passes_through_when_single_key(self):
        """A 429 cools the only key down: the agent hears 429 with Retry-After."""
        h = yield ProxyHarness(self).start()
        h.fake.enqueue(Reply(status=429, headers={"retry-after": "3"}, json=openai_error("slow down", "requests", "rate_limit_exceeded")))
        response = yield h.chat(chat_body())
        self.assertEqual(response.code, 429)
        self.assertEqual(response.headers.getRawHeaders("retry-after"), ["3"])

    @defer.inlineCallbacks
    def test_missing_key_is_a_clear_400(self):
        h = yield ProxyHarness(self).start()
        response = yield h.chat(chat_body(model="xai/grok-4"))
        self.assertEqual(response.code, 400)
        body = yield response.json()
        self.assertEqual(body["error"]["code"], "provider_not_configured")
        self.assertIn("XAI_API_KEY", body["error"]["message"])


class KeylessTests(TestCase):
    @defer.inlineCallbacks
    def test_ollama_gets_no_auth_header(self):
        h = ProxyHarness(self)
        yield h.start()
        # Point ollama at the same fake: a keyless provider works.
        h.providers = type(h.providers)(
            {"OLLAMA_BASE_URL": h.fake.base_url}, h.auth_dir, reactor
        )
        h.proxy._providers = h.providers
        h.fake.enqueue(Reply(json=openai_completion("ok", "llama3", 1, 1)))
        response = yield h.chat(chat_body(model="ollama/llama3"))
        self.assertEqual(response.code, 200)
        yield response.content()
        [received] = h.fake.received
        self.assertIsNone(received.header("authorization"))
        self.assertIsNone(received.header("x-api-key"))
        self.assertEqual(received.json["model"], "llama3")


class AgentBehaviourTests(TestCase):
    @defer.inlineCallbacks
    def test_disconnect_closes_upstream_and_is_audited(self):
        h = yield ProxyHarness(self).start()
        h.fake.enqueue(Reply(sse=stream_events(50), headers=SSE, delay_between_chunks=0.05))
        client = _StreamingClient(_request_bytes(stream=True))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", h.port.getHost().port), client)
        yield client.first_data
        client.transport.abortConnection()
        yield h.fake.wait_for_disconnect()
        # The proxy records the request as closed by the client.
        yield h.wait_for_audit(lambda line: line.get("status_code") == 499)
        [line] = [entry for entry in h.audit_lines() if entry["type"] == "error"]
        self.assertEqual(line["error"], "client disconnected")
        self.assertEqual(line["claw_id"], AGENT)

    @defer.inlineCallbacks
    def test_slow_reader_pauses_the_upstream(self):
        """
        An agent that stops reading fills its socket; the proxy then pauses
        the upstream socket, and the fake provider's producer is paused by
        TCP backpressure instead of the proxy buffering the stream.
        """
        h = yield ProxyHarness(self, idle_timeout=30).start()
        h.fake.enqueue(Reply(firehose_bytes=256 * 1024 * 1024, headers=SSE))
        client = _StreamingClient(_request_bytes(stream=True))
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", h.port.getHost().port), client)
        yield client.first_data
        client.transport.pauseProducing()
        yield h.fake.paused
        self.assertGreaterEqual(h.fake.pause_count, 1)
        # Far less than the firehose reached the agent's side.
        self.assertLess(client.received, 64 * 1024 * 1024)
        client.transport.abortConnection()
        yield h.fake.wait_for_disconnect()


def _request_bytes(stream=False, model="openai/gpt-4o-mini"):
    body = json.dumps(chat_body(model=model, stream=stream)).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"
        b"Authorization: Bearer " + f"{AGENT}:{SECRET}".encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    ) + body


class _StreamingClient(protocol.Protocol):
    def __init__(self, payload):
        self.payload = payload
        self.received = 0
        self.first_data = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.payload)

    def dataReceived(self, data):
        self.received += len(data)
        if not self.first_data.called:
            self.first_data.callback(None)
