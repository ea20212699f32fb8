"""
End to end over loopback: agent -> proxy -> fake provider, on real sockets.
"""

import json
import re

import treq
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
)
from tests.support import AGENT, PROVIDER_KEY, SECRET, ProxyHarness, chat_body

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class PassthroughTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield ProxyHarness(self).start()

    @defer.inlineCallbacks
    def test_json_round_trip(self):
        """
        The agent gets the provider's body verbatim; the provider gets the
        model without its prefix and the real key instead of the agent's.
        """
        completion = openai_completion("Hi there", "gpt-4o-mini", 11, 3)
        self.h.fake.enqueue(Reply(json=completion))
        sent = chat_body(temperature=0.2)
        response = yield self.h.chat(sent)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        body = yield response.json()
        self.assertEqual(body, completion)
        self.assertRegex(response.headers.getRawHeaders("x-cllama-request-id")[0], r"^[0-9a-f]{16}$")
        [received] = self.h.fake.received
        self.assertEqual(received.path, "/v1/chat/completions")
        expected = dict(sent, model="gpt-4o-mini")
        self.assertEqual(received.json, expected)
        self.assertEqual(received.header("authorization"), f"Bearer {PROVIDER_KEY}")
        self.assertEqual(received.header("content-length"), str(len(received.body)))
        self.assertNotIn(SECRET, json.dumps(received.headers))

    @defer.inlineCallbacks
    def test_stream_is_relayed_unchanged(self):
        """
        An agent that asked for usage gets the stream byte for byte, except
        that the usage chunk also carries the cost (OpenRouter style).
        """
        chunks = openai_stream_chunks(["Hel", "lo", "!"], "gpt-4o-mini", 5, 3)
        events = openai_sse_events(chunks)
        self.h.fake.enqueue(Reply(sse=events, headers={"content-type": "text/event-stream"}))
        response = yield self.h.chat(chat_body(stream=True, stream_options={"include_usage": True}))
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        body = yield response.content()
        usage_event = events[-2]
        self.assertEqual(body[: len(b"".join(events[:-2]))], b"".join(events[:-2]))
        self.assertTrue(body.endswith(b"data: [DONE]\n\n"))
        usage_chunk = json.loads(parse_sse(body)[-2][1])
        self.assertEqual(usage_chunk["usage"]["prompt_tokens"], 5)
        self.assertIn("cost", usage_chunk["usage"])
        self.assertNotEqual(usage_event, body[len(b"".join(events[:-2])) : -len(events[-1])])
        self.assertEqual(self.h.fake.received[0].json["stream"], True)

    @defer.inlineCallbacks
    def test_header_hygiene(self):
        self.h.fake.enqueue(Reply(json=openai_completion("ok", "gpt-4o-mini", 1, 1)))
        yield (yield self.h.chat(
            chat_body(),
            headers={
                "x-api-key": [f"{AGENT}:{SECRET}"],
                "X-Claw-Consumer-Session-Epoch": ["7"],
                "X-Cllama-Policy-Origin": ["pod"],
                "Accept-Encoding": ["gzip"],
                "Connection": ["keep-alive, X-Hop"],
                "X-Hop": ["drop me"],
                "X-Custom-Trace": ["an unknown header"],
                "OpenAI-Organization": ["org-1"],
                "OpenAI-Project": ["proj_1"],
                "Cookie": ["session=1"],
                "X-Forwarded-For": ["10.0.0.7"],
                "X-Agent-ID": ["someone-else"],
                "X-Stainless-OS": ["Linux"],
                "User-Agent": ["OpenAI/Python 1.99.0"],
                "Accept": ["application/json"],
            },
        )).content()
        [received] = self.h.fake.received
        for dropped in (
            "x-api-key",
            "x-claw-consumer-session-epoch",
            "x-cllama-policy-origin",
            "accept-encoding",
            "x-hop",
            # An explicit allow-list: nothing the agent says about the
            # account, nothing unknown.
            "x-custom-trace",
            "openai-organization",
            "openai-project",
            "cookie",
            "x-forwarded-for",
            "x-agent-id",
            "x-stainless-os",
        ):
            self.assertIsNone(received.header(dropped), dropped)
        self.assertEqual(
            sorted(received.headers),
            ["accept", "authorization", "content-length", "content-type", "host", "user-agent"],
        )
        self.assertEqual(received.header("user-agent"), "OpenAI/Python 1.99.0")
        self.assertEqual(received.headers["authorization"], [f"Bearer {PROVIDER_KEY}"])
        self.assertNotIn(SECRET, repr(received.headers))

    @defer.inlineCallbacks
    def test_audit_lines(self):
        self.h.fake.enqueue(Reply(json=openai_completion("ok", "gpt-4o-mini", 1, 1)))
        yield (yield self.h.chat(chat_body())).content()
        request, response = self.h.audit_lines()
        self.assertEqual(request["type"], "request")
        self.assertEqual(response["type"], "response")
        for line in (request, response):
            self.assertEqual(line["claw_id"], AGENT)
            self.assertEqual(line["model"], "openai/gpt-4o-mini")
            self.assertIsNone(line["intervention"])
            self.assertRegex(line["ts"], TS)
        self.assertEqual(request["request_id"], response["request_id"])
        self.assertEqual(response["status_code"], 200)
        self.assertEqual(response["provider"], "openai")
        self.assertEqual(response["effective_model"], "gpt-4o-mini")
        self.assertIsInstance(response["latency_ms"], float)
        self.assertNotIn(SECRET, self.h.audit_text())
        self.assertNotIn(PROVIDER_KEY, self.h.audit_text())

    @defer.inlineCallbacks
    def test_upstream_client_error_passes_through(self):
        error = openai_error("max_tokens is too large", "invalid_request_error", "bad_max")
        self.h.fake.enqueue(Reply(status=400, json=error))
        response = yield self.h.chat(chat_body())
        self.assertEqual(response.code, 400)
        self.assertEqual((yield response.json()), error)

    @defer.inlineCallbacks
    def test_persistent_upstream_connection(self):
        """Two requests in a row reuse one pooled upstream connection."""
        for _ in range(2):
            self.h.fake.enqueue(Reply(json=openai_completion("ok", "gpt-4o-mini", 1, 1)))
            yield (yield self.h.chat(chat_body())).content()
        self.assertEqual(self.h.fake.connections_made, 1)


class IdentityTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield ProxyHarness(self).start()

    @defer.inlineCallbacks
    def assertRefused(self, status, code, **kwargs):
        response = yield self.h.chat(chat_body(), **kwargs)
        self.assertEqual(response.code, status)
        body = yield response.json()
        self.assertEqual(body["error"]["code"], code)
        self.assertEqual(self.h.fake.received, [])
        return body

    @defer.inlineCallbacks
    def test_missing_header_401(self):
        body = yield self.assertRefused(401, "missing_credentials", token=None)
        self.assertEqual(body["error"]["type"], "authentication_error")

    @defer.inlineCallbacks
    def test_malformed_401(self):
        yield self.assertRefused(401, "missing_credentials", token="no-colon-here")
        yield self.assertRefused(401, "missing_credentials", token=f":{SECRET}")

    @defer.inlineCallbacks
    def test_unknown_agent_and_wrong_secret_look_the_same(self):
        wrong = yield self.assertRefused(403, "invalid_credentials", token=f"{AGENT}:{'0' * 48}")
        unknown = yield self.assertRefused(403, "invalid_credentials", token=f"nobody:{SECRET}")
        self.assertEqual(wrong, unknown)
        traversal = yield self.assertRefused(403, "invalid_credentials", token=f"../{AGENT}:{SECRET}")
        self.assertEqual(traversal, wrong)

    @defer.inlineCallbacks
    def test_x_api_key_accepted(self):
        self.h.fake.enqueue(Reply(json=openai_completion("ok", "gpt-4o-mini", 1, 1)))
        response = yield self.h.chat(chat_body(), token=None, headers={"x-api-key": [f"{AGENT}:{SECRET}"]})
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertIsNone(self.h.fake.received[0].header("x-api-key"))

    @defer.inlineCallbacks
    def test_refusals_are_audited(self):
        yield (yield self.h.chat(chat_body(), token=f"{AGENT}:not-the-Secret-42")).content()
        [line] = self.h.audit_lines()
        self.assertEqual(line["type"], "error")
        self.assertEqual(line["status_code"], 403)
        self.assertNotIn("not-the-Secret-42", json.dumps(line))


class BadInputTests(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.h = yield ProxyHarness(self, max_body_bytes=4096).start()

    @defer.inlineCallbacks
    def assertBad(self, status, code, response):
        self.assertEqual(response.code, status)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        body = yield response.json()
        self.assertEqual(body["error"]["code"], code)
        self.assertIn("message", body["error"])
        self.assertEqual(self.h.fake.received, [])
        return body

    @defer.inlineCallbacks
    def test_malformed_json(self):
        yield self.assertBad(400, "invalid_json", (yield self.h.chat(None, data=b"{not json")))

    @defer.inlineCallbacks
    def test_not_an_object(self):
        yield self.assertBad(400, "invalid_body", (yield self.h.chat([1, 2])))

    @defer.inlineCallbacks
    def test_missing_or_bad_model(self):
        yield self.assertBad(400, "missing_model", (yield self.h.chat({"messages": []})))
        yield self.assertBad(400, "missing_model", (yield self.h.chat({"model": 42})))

    @defer.inlineCallbacks
    def test_unknown_provider(self):
        response = yield self.h.chat(chat_body(model="opnai/gpt-4o"))
        yield self.assertBad(400, "unknown_provider", response)

    @defer.inlineCallbacks
    def test_bare_and_synthetic_refs(self):
        # A bare name of no known family names no provider on the chat
        # surface: the refusal names what was sent and says what to write.
        response = yield self.h.chat(chat_body(model="my-model"))
        body = yield self.assertBad(400, "invalid_model", response)
        self.assertEqual(
            body["error"]["message"],
            "model 'my-model' names no provider: send '<provider>/<model>' with a configured provider "
            "(ollama, openai), or a name from the operator's model table",
        )
        yield self.assertBad(
            400, "invalid_model", (yield self.h.chat(chat_body(model="cllama/google/gemini-2.5-flash")))
        )

    @defer.inlineCallbacks
    def test_oversized_by_content_length(self):
        doc = chat_body(padding="x" * 5000)
        response = yield self.h.chat(doc)
        yield self.assertBad(413, "request_too_large", response)
        [line] = self.h.audit_lines()
        self.assertEqual(line["status_code"], 413)
        self.assertRegex(line["request_id"], r"^[0-9a-f]{16}$")

    @defer.inlineCallbacks
    def test_oversized_chunked(self):
        """Without a Content-Length the cap is enforced while reading."""
        raw = yield _raw_exchange(
            self.h.port.getHost().port,
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            # Authenticated: an unauthenticated request is refused on its headers (401).
            + f"Authorization: Bearer {AGENT}:{SECRET}\r\n".encode()
            + b"Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n\r\n"
            + (b"1000\r\n" + b"x" * 4096 + b"\r\n") * 3,
        )
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw[:80])
        body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
        self.assertEqual(body["error"]["code"], "request_too_large")

    @defer.inlineCallbacks
    def test_oversized_on_messages_surface_is_anthropic_shaped(self):
        response = yield self.h.post("/v1/messages", {"model": "anthropic/x", "pad": "x" * 5000})
        self.assertEqual(response.code, 413)
        body = yield response.json()
        self.assertEqual(body, {"type": "error", "error": {"type": "request_too_large", "message": body["error"]["message"]}})

    @defer.inlineCallbacks
    def test_wrong_method(self):
        response = yield self.h.http.get(self.h.base_url + "/v1/chat/completions")
        self.assertEqual(response.headers.getRawHeaders("allow"), ["POST"])
        yield self.assertBad(405, "method_not_allowed", response)
        response = yield self.h.http.post(self.h.base_url + "/health", data=b"")
        yield self.assertBad(405, "method_not_allowed", response)

    @defer.inlineCallbacks
    def test_unknown_path(self):
        response = yield self.h.http.get(self.h.base_url + "/v2/nothing")
        yield self.assertBad(404, "not_found", response)

    @defer.inlineCallbacks
    def test_health(self):
        response = yield self.h.http.get(self.h.base_url + "/health")
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json()), {"ok": True})


class _RawClient(protocol.Protocol):
    def __init__(self, payload):
        self.payload = payload
        self.data = []
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.payload)

    def dataReceived(self, data):
        self.data.append(data)

    def connectionLost(self, reason):
        self.done.callback(b"".join(self.data))


@defer.inlineCallbacks
def _raw_exchange(port, payload):
    client = _RawClient(payload)
    yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    result = yield client.done
    return result


__all__ = ["treq"]
