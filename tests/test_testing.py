"""
Tests for L{cllama_tx.testing}: the wire-format builders (pinned against the
official SDKs' typed models) and the L{FakeProvider} over real loopback
sockets.
"""

from __future__ import annotations

import json
import math

import anthropic.types
import openai.types
import pydantic
import treq
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web._newclient import ResponseFailed, ResponseNeverReceived
from twisted.web.client import Agent, HTTPConnectionPool
from zope.interface.verify import verifyObject

from cllama_tx.demo.model import DemoModel
from cllama_tx.interfaces import IFakeProvider
from cllama_tx.testing import (
    FakeProvider,
    ReceivedRequest,
    Reply,
    anthropic_error,
    anthropic_message,
    anthropic_sse_events,
    anthropic_stream_events,
    openai_completion,
    openai_error,
    openai_sse_events,
    openai_stream_chunks,
    parse_sse,
    sse_encode_anthropic,
    sse_encode_openai,
)

STREAM_EVENT = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)

CHUNK_KEYS = {"id", "object", "created", "model", "service_tier", "system_fingerprint", "choices"}
USAGE_KEYS = {
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "prompt_tokens_details",
    "completion_tokens_details",
}


class OpenAIBuilderTests(SynchronousTestCase):
    def test_completion_shape(self) -> None:
        d = openai_completion("Hi there", "gpt-4o", 10, 3, cached_tokens=4, id="chatcmpl-1")
        self.assertEqual(
            set(d),
            {"id", "object", "created", "model", "choices", "usage", "service_tier", "system_fingerprint"},
        )
        self.assertEqual(d["object"], "chat.completion")
        self.assertEqual(d["id"], "chatcmpl-1")
        (choice,) = d["choices"]
        self.assertEqual(set(choice), {"index", "message", "logprobs", "finish_reason"})
        self.assertEqual(choice["finish_reason"], "stop")
        self.assertEqual(set(choice["message"]), {"role", "content", "refusal", "annotations"})
        self.assertEqual(choice["message"]["role"], "assistant")
        self.assertEqual(choice["message"]["content"], "Hi there")
        self.assertEqual(set(d["usage"]), USAGE_KEYS)
        self.assertEqual(
            (d["usage"]["prompt_tokens"], d["usage"]["completion_tokens"], d["usage"]["total_tokens"]),
            (10, 3, 13),
        )
        self.assertEqual(d["usage"]["prompt_tokens_details"]["cached_tokens"], 4)
        validated = ChatCompletion.model_validate(d)
        self.assertEqual(validated.usage.prompt_tokens_details.cached_tokens, 4)

    def test_completion_tool_calls(self) -> None:
        d = openai_completion(
            None,
            "gpt-4o",
            5,
            7,
            finish_reason="tool_calls",
            tool_calls=[{"id": "call_1", "name": "get_weather", "arguments": {"city": "Paris"}}],
        )
        message = d["choices"][0]["message"]
        self.assertIsNone(message["content"])
        self.assertEqual(
            message["tool_calls"],
            [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        )
        validated = ChatCompletion.model_validate(d)
        self.assertEqual(validated.choices[0].message.tool_calls[0].function.name, "get_weather")

    def test_stream_chunks_with_usage(self) -> None:
        chunks = openai_stream_chunks(["Hel", "lo"], "gpt-4o", 9, 2, cached_tokens=1)
        for c in chunks:
            self.assertEqual(set(c), CHUNK_KEYS | {"usage"})
            self.assertEqual(c["object"], "chat.completion.chunk")
            ChatCompletionChunk.model_validate(c)
        self.assertEqual(chunks[0]["choices"][0]["delta"]["role"], "assistant")
        self.assertEqual(chunks[0]["choices"][0]["delta"]["content"], "")
        self.assertEqual([c["choices"][0]["delta"].get("content") for c in chunks[1:3]], ["Hel", "lo"])
        self.assertEqual(chunks[3]["choices"][0]["delta"], {})
        self.assertEqual(chunks[3]["choices"][0]["finish_reason"], "stop")
        self.assertEqual([c["usage"] for c in chunks[:-1]], [None] * 4)
        last = chunks[-1]
        self.assertEqual(last["choices"], [])
        self.assertEqual(set(last["usage"]), USAGE_KEYS)
        self.assertEqual(last["usage"]["total_tokens"], 11)
        self.assertEqual(last["usage"]["prompt_tokens_details"]["cached_tokens"], 1)
        self.assertEqual(len(chunks), 5)
        self.assertEqual(len({c["id"] for c in chunks}), 1)

    def test_stream_chunks_without_usage(self) -> None:
        chunks = openai_stream_chunks("Hello", "gpt-4o", include_usage=False)
        self.assertEqual(len(chunks), 3)
        for c in chunks:
            self.assertEqual(set(c), CHUNK_KEYS)
            ChatCompletionChunk.model_validate(c)

    def test_stream_tool_calls(self) -> None:
        chunks = openai_stream_chunks(
            [],
            "gpt-4o",
            1,
            1,
            finish_reason="tool_calls",
            tool_calls=[{"id": "call_1", "name": "f", "arguments": '{"a": 1}'}],
        )
        for c in chunks:
            ChatCompletionChunk.model_validate(c)
        calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
        self.assertEqual(calls[0]["id"], "call_1")
        self.assertEqual(calls[0]["function"]["name"], "f")
        self.assertEqual("".join(c["function"]["arguments"] for c in calls), '{"a": 1}')

    def test_sse_encoding(self) -> None:
        chunks = openai_stream_chunks(["a"], "m", 1, 1)
        body = sse_encode_openai(chunks)
        self.assertTrue(body.endswith(b"\n\ndata: [DONE]\n\n"))
        events = body.split(b"\n\n")
        self.assertEqual(events[-1], b"")
        # Every chunk, then [DONE], then the empty tail.
        for raw, chunk in zip(events[:-2], chunks, strict=True):
            self.assertTrue(raw.startswith(b"data: {"))
            self.assertEqual(json.loads(raw[len(b"data: ") :]), chunk)
        self.assertEqual(len(events), len(chunks) + 2)
        self.assertEqual(b"".join(openai_sse_events(chunks)), body)
        self.assertEqual(parse_sse(body)[-1], (None, "[DONE]"))

    def test_error(self) -> None:
        d = openai_error("Rate limit reached", "requests", "rate_limit_exceeded")
        self.assertEqual(set(d), {"error"})
        self.assertEqual(set(d["error"]), {"message", "type", "param", "code"})
        self.assertEqual(d["error"]["code"], "rate_limit_exceeded")
        openai.types.ErrorObject.model_validate(d["error"])


class AnthropicBuilderTests(SynchronousTestCase):
    def test_message_shape(self) -> None:
        d = anthropic_message("Hi", "claude-sonnet-4-5", 12, 4, cache_read_input_tokens=3, cache_creation_input_tokens=2)
        self.assertEqual(
            set(d), {"id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"}
        )
        self.assertEqual((d["type"], d["role"], d["stop_reason"]), ("message", "assistant", "end_turn"))
        self.assertEqual(d["content"], [{"type": "text", "text": "Hi"}])
        self.assertEqual(
            d["usage"],
            {
                "input_tokens": 12,
                "output_tokens": 4,
                "cache_read_input_tokens": 3,
                "cache_creation_input_tokens": 2,
            },
        )
        message = anthropic.types.Message.model_validate(d)
        self.assertEqual(message.usage.cache_read_input_tokens, 3)

    def test_message_tool_use(self) -> None:
        d = anthropic_message(None, "claude", 1, 2, tool_uses=[{"id": "toolu_1", "name": "f", "input": {"a": 1}}])
        self.assertEqual(d["stop_reason"], "tool_use")
        self.assertEqual(d["content"], [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}])
        anthropic.types.Message.model_validate(d)

    def test_stream_events_order(self) -> None:
        events = anthropic_stream_events(["Hel", "lo"], "claude", 25, 7, cache_read_input_tokens=5)
        self.assertEqual(
            [name for name, _ in events],
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ],
        )
        for name, data in events:
            self.assertEqual(data["type"], name)
            if name != "ping":
                STREAM_EVENT.validate_python(data)
        start = events[0][1]["message"]
        self.assertEqual(start["content"], [])
        self.assertIsNone(start["stop_reason"])
        self.assertEqual(start["usage"]["input_tokens"], 25)
        self.assertEqual(start["usage"]["cache_read_input_tokens"], 5)
        self.assertEqual(events[1][1]["content_block"], {"type": "text", "text": ""})
        self.assertEqual(events[2][1], {"type": "ping"})
        self.assertEqual([e[1]["delta"] for e in events[3:5]], [{"type": "text_delta", "text": t} for t in ("Hel", "lo")])
        self.assertEqual(events[6][1]["delta"]["stop_reason"], "end_turn")
        self.assertEqual(events[6][1]["usage"], {"output_tokens": 7})
        self.assertEqual(events[7][1], {"type": "message_stop"})

    def test_stream_tool_use(self) -> None:
        events = anthropic_stream_events(
            ["Let me check."], "claude", 3, 9, tool_uses=[{"id": "toolu_1", "name": "f", "input": {"city": "Paris"}}]
        )
        for name, data in events:
            if name != "ping":
                STREAM_EVENT.validate_python(data)
        starts = [d for n, d in events if n == "content_block_start"]
        self.assertEqual([s["index"] for s in starts], [0, 1])
        self.assertEqual(starts[1]["content_block"], {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}})
        partial = "".join(
            d["delta"]["partial_json"] for n, d in events if n == "content_block_delta" and d["index"] == 1
        )
        self.assertEqual(json.loads(partial), {"city": "Paris"})
        self.assertEqual([n for n, _ in events].count("ping"), 1)
        self.assertEqual(events[-2][1]["delta"]["stop_reason"], "tool_use")

    def test_sse_encoding(self) -> None:
        events = anthropic_stream_events("x", "claude", 1, 1)
        body = sse_encode_anthropic(events)
        self.assertEqual(b"".join(anthropic_sse_events(events)), body)
        parts = body.split(b"\n\n")
        self.assertEqual(parts[-1], b"")
        for raw, (name, data) in zip(parts[:-1], events, strict=True):
            head, payload = raw.split(b"\n")
            self.assertEqual(head, b"event: " + name.encode())
            self.assertEqual(json.loads(payload[len(b"data: ") :]), data)
        self.assertEqual([(n, json.loads(d)) for n, d in parse_sse(body)], events)

    def test_error(self) -> None:
        d = anthropic_error("overloaded_error", "Overloaded")
        self.assertEqual(d, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
        anthropic.types.ErrorResponse.model_validate(d)


class ParseSSETests(SynchronousTestCase):
    def test_comments_crlf_and_multiline(self) -> None:
        body = b": keepalive\r\n\r\nevent: a\r\ndata: 1\r\ndata: 2\r\n\r\ndata:3\n\n"
        self.assertEqual(parse_sse(body), [("a", "1\n2"), (None, "3")])


class InterfaceTests(SynchronousTestCase):
    def test_verify(self) -> None:
        self.assertTrue(verifyObject(IFakeProvider, FakeProvider(reactor)))

    def test_base_url_before_start(self) -> None:
        self.assertIsNone(FakeProvider(reactor).base_url)


class _StalledClient(Protocol):
    """
    Sends one request and never reads: the kernel buffers fill up and TCP
    backpressure reaches the server.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.lost: Deferred = Deferred()

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.transport.write(self.request)

    def connectionLost(self, reason: object) -> None:
        self.lost.callback(None)


def _raw_post(path: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (len(payload),)
    ) + payload


class FakeProviderTests(TestCase):
    """
    End to end over loopback with the real reactor.
    """

    timeout = 60

    def setUp(self) -> Deferred:
        self.fake = FakeProvider(reactor, strict=False)  # its mechanics, with toy bodies
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.client = treq.client.HTTPClient(Agent(reactor, pool=pool))
        self.addCleanup(self.fake.stop)
        self.addCleanup(pool.closeCachedConnections)
        return self.fake.start()

    def url(self, path: str) -> str:
        return self.fake.base_url + path

    def post(self, path: str, body: object, **kwargs: object) -> Deferred:
        return self.client.post(self.url(path), json=body, **kwargs)

    def test_base_url(self) -> None:
        self.assertRegex(self.fake.base_url, r"^http://127\.0\.0\.1:\d+/v1$")
        self.assertEqual(self.fake.base_url, f"http://127.0.0.1:{self.fake.port}/v1")

    async def test_records_requests(self) -> None:
        body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
        response = await self.post(
            "/chat/completions", body, headers={"Authorization": "Bearer sk-1", "X-Multi": ["a", "b"]}
        )
        await response.content()
        (received,) = self.fake.received
        self.assertIsInstance(received, ReceivedRequest)
        self.assertEqual((received.method, received.path), ("POST", "/v1/chat/completions"))
        self.assertEqual(received.headers["authorization"], ["Bearer sk-1"])
        self.assertEqual(received.headers["x-multi"], ["a", "b"])
        self.assertEqual(received.header("Authorization"), "Bearer sk-1")
        self.assertEqual(received.json, body)
        self.assertEqual(json.loads(received.body), body)

    async def test_connections(self) -> None:
        for _ in range(2):
            await (await self.post("/chat/completions", {"model": "echo-1", "messages": []})).content()
        self.assertEqual(self.fake.connections_made, 1)
        self.assertEqual(self.fake.open_connections, 1)
        await self.fake.stop()
        self.assertEqual(self.fake.open_connections, 0)
        self.assertEqual(self.fake.connections_made, 1)

    async def test_non_json_body(self) -> None:
        response = await self.client.post(self.url("/chat/completions"), data=b"not json")
        self.assertEqual(response.code, 400)
        await response.content()
        self.assertIsNone(self.fake.received[0].json)
        self.assertEqual(self.fake.received[0].body, b"not json")

    async def test_scripted_replies_in_order(self) -> None:
        self.fake.enqueue(
            Reply(status=429, headers={"Retry-After": "7"}, json=openai_error("slow down", "requests", "rate_limit_exceeded")),
            lambda request: Reply(json={"echo": request.json["n"]}),
        )
        self.assertEqual(self.fake.pending, 2)
        first = await self.post("/chat/completions", {"n": 1})
        self.assertEqual(first.code, 429)
        self.assertEqual(first.headers.getRawHeaders("retry-after"), ["7"])
        self.assertEqual(first.headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual((await first.json())["error"]["code"], "rate_limit_exceeded")
        second = await self.post("/messages", {"n": 2})
        self.assertEqual(await second.json(), {"echo": 2})
        self.assertEqual(self.fake.pending, 0)
        # then the responder (the demo model) answers
        third = await self.post("/chat/completions", {"model": "echo-1", "messages": []})
        self.assertEqual((await third.json())["object"], "chat.completion")

    async def test_raw_reply(self) -> None:
        self.fake.enqueue(Reply(status=502, raw=b"<html>bad gateway</html>", headers={"Content-Type": "text/html"}))
        response = await self.post("/chat/completions", {})
        self.assertEqual(response.code, 502)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/html"])
        self.assertEqual(await response.content(), b"<html>bad gateway</html>")

    async def test_default_openai_json(self) -> None:
        body = {"model": "echo-1", "messages": [{"role": "user", "content": "ping?"}]}
        response = await self.post("/chat/completions", body)
        self.assertEqual(response.code, 200)
        data = await response.json()
        self.assertEqual(data, DemoModel().openai_response(body))
        completion = ChatCompletion.model_validate(data)
        self.assertIn("ping?", completion.choices[0].message.content)

    async def test_default_openai_stream(self) -> None:
        body = {
            "model": "echo-1",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "stream please"}],
        }
        response = await self.post("/chat/completions", body)
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        raw = await response.content()
        events = parse_sse(raw)
        self.assertEqual(events[-1], (None, "[DONE]"))
        chunks = [json.loads(data) for _, data in events[:-1]]
        for c in chunks:
            ChatCompletionChunk.model_validate(c)
        self.assertEqual(chunks[-1]["choices"], [])
        prompt, completion = DemoModel().usage(body)
        self.assertEqual(chunks[-1]["usage"]["prompt_tokens"], prompt)
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], completion)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        self.assertEqual(text, DemoModel().reply_text(body))

    async def test_default_openai_stream_without_usage(self) -> None:
        body = {"model": "echo-1", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        raw = await (await self.post("/chat/completions", body)).content()
        chunks = [json.loads(d) for _, d in parse_sse(raw)[:-1]]
        self.assertTrue(all(c["choices"] for c in chunks))
        self.assertTrue(all("usage" not in c for c in chunks))

    async def test_default_anthropic_json(self) -> None:
        body = {"model": "echo-1", "max_tokens": 64, "messages": [{"role": "user", "content": "bonjour"}]}
        response = await self.post("/messages", body, headers={"anthropic-version": "2023-06-01"})
        data = await response.json()
        message = anthropic.types.Message.model_validate(data)
        self.assertIn("bonjour", message.content[0].text)
        self.assertEqual(data, DemoModel().anthropic_response(body))

    async def test_default_anthropic_stream(self) -> None:
        body = {"model": "echo-1", "stream": True, "max_tokens": 64, "messages": [{"role": "user", "content": "hey"}]}
        response = await self.post("/messages", body)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream; charset=utf-8"])
        events = [(name, json.loads(data)) for name, data in parse_sse(await response.content())]
        names = [n for n, _ in events]
        self.assertEqual(names[:3], ["message_start", "content_block_start", "ping"])
        self.assertEqual(names[-3:], ["content_block_stop", "message_delta", "message_stop"])
        self.assertEqual(set(names[3:-3]), {"content_block_delta"})
        for name, data in events:
            if name != "ping":
                STREAM_EVENT.validate_python(data)
        self.assertEqual(events[-2][1]["usage"]["output_tokens"], DemoModel().usage(body)[1])

    async def test_count_tokens_and_models(self) -> None:
        body = {"model": "echo-1", "messages": [{"role": "user", "content": "12345678"}]}
        response = await self.post("/messages/count_tokens", body)
        self.assertEqual(await response.json(), {"input_tokens": 2})
        models = await (await self.client.get(self.url("/models"))).json()
        self.assertEqual(models["object"], "list")
        self.assertEqual(models["data"][0]["id"], "echo-1")
        self.assertEqual(self.fake.received[-1].method, "GET")

    async def test_unknown_route(self) -> None:
        response = await self.post("/embeddings", {})
        self.assertEqual(response.code, 404)
        self.assertEqual((await response.json())["error"]["type"], "invalid_request_error")
        response = await self.client.get(self.url("/messages"))
        self.assertEqual(response.code, 405)
        self.assertEqual((await response.json())["type"], "error")

    async def test_wait_for_request(self) -> None:
        second = self.fake.wait_for_request(2)
        await (await self.post("/chat/completions", {"n": 1})).content()
        self.assertFalse(second.called)
        await (await self.post("/chat/completions", {"n": 2})).content()
        received = await second
        self.assertEqual(received.json, {"n": 2})
        self.assertIs(await self.fake.wait_for_request(1), self.fake.received[0])

    async def test_delay_before_headers(self) -> None:
        self.fake.enqueue(Reply(json={"ok": True}, delay_before_headers=0.3))
        started = reactor.seconds()
        pending = _track(self.post("/chat/completions", {}))
        await self.fake.wait_for_request(1)
        self.assertEqual(pending.arrived, [])
        response = await pending
        self.assertGreaterEqual(reactor.seconds() - started, 0.29)
        self.assertEqual(await response.json(), {"ok": True})

    async def test_hold_until(self) -> None:
        gate: Deferred = Deferred()
        self.fake.enqueue(Reply(json={"ok": 1}, hold_until=gate))
        pending = _track(self.post("/chat/completions", {}))
        await self.fake.wait_for_request(1)
        self.assertEqual(pending.arrived, [])
        gate.callback(None)
        self.assertEqual(await (await pending).json(), {"ok": 1})

    async def test_delay_between_chunks(self) -> None:
        chunks = [b"data: {\"n\":%d}\n\n" % (i,) for i in range(3)]
        self.fake.enqueue(Reply(sse=chunks, delay_between_chunks=0.15))
        started = reactor.seconds()
        response = await self.post("/chat/completions", {})
        arrivals: list[float] = []
        received: list[bytes] = []

        def collect(data: bytes) -> None:
            received.append(data)
            arrivals.append(reactor.seconds())

        await treq.collect(response, collect)
        self.assertEqual(b"".join(received), b"".join(chunks))
        self.assertGreaterEqual(reactor.seconds() - started, 0.29)
        self.assertGreaterEqual(len(arrivals), 2)

    async def test_cut_mid_stream(self) -> None:
        chunks = openai_sse_events(openai_stream_chunks(["a", "b", "c"], "m", 1, 1))
        self.fake.enqueue(Reply(sse=chunks, cut_after_chunks=2))
        response = await self.post("/chat/completions", {"stream": True})
        self.assertEqual(response.code, 200)
        received: list[bytes] = []
        failure = await self.assertFailure(ensureDeferred(_collect(response, received.append)), ResponseFailed)
        self.assertTrue(failure)
        self.assertEqual(b"".join(received), b"".join(chunks[:2]))
        await self.fake.wait_for_disconnect()

    async def test_cut_json_after_headers(self) -> None:
        self.fake.enqueue(Reply(json={"a": 1}, cut_after_chunks=0))
        response = await self.post("/chat/completions", {})
        self.assertEqual(response.code, 200)
        await self.assertFailure(response.content(), ResponseFailed)

    async def test_abort_before_headers(self) -> None:
        self.fake.enqueue(Reply(json={"a": 1}, abort_before_headers=True))
        await self.assertFailure(self.post("/chat/completions", {}), ResponseNeverReceived)
        # the next request (on a fresh connection) is answered normally
        response = await self.post("/chat/completions", {"model": "echo-1", "messages": []})
        self.assertEqual(response.code, 200)
        await response.content()

    async def test_wait_for_disconnect_on_client_abort(self) -> None:
        self.fake.enqueue(Reply(json={"never": True}, delay_before_headers=3600))
        disconnected = self.fake.wait_for_disconnect()  # before the request exists
        pending = self.post("/chat/completions", {})
        await self.fake.wait_for_request(1)
        self.assertFalse(disconnected.called)
        pending.cancel()
        await self.assertFailure(pending, CancelledError, ResponseNeverReceived)
        await disconnected
        # also fires at once afterwards
        await self.fake.wait_for_disconnect()

    async def test_wait_for_disconnect_numbered(self) -> None:
        self.fake.enqueue(Reply(json={}, abort_before_headers=True))
        later = self.fake.wait_for_disconnect(2)
        await self.assertFailure(self.post("/chat/completions", {}), ResponseNeverReceived)
        await self.fake.wait_for_disconnect(1)
        self.assertEqual(_track(later).arrived, [])
        self.fake.enqueue(Reply(json={}, cut_after_chunks=0))
        await self.assertFailure((await self.post("/chat/completions", {})).content(), ResponseFailed)
        await later
        await (await self.post("/chat/completions", {"model": "echo-1", "messages": []})).content()
        await self.assertFailure(self.fake.wait_for_disconnect(), AssertionError)
        await self.fake.wait_for_disconnect(2)

    async def test_wait_for_disconnect_fails_when_finished(self) -> None:
        gate: Deferred = Deferred()
        self.fake.enqueue(Reply(json={}, hold_until=gate))
        pending = self.post("/chat/completions", {})
        await self.fake.wait_for_request(1)
        disconnected = self.fake.wait_for_disconnect()
        gate.callback(None)
        await (await pending).content()
        await self.assertFailure(disconnected, AssertionError)

    async def test_firehose_is_paused_by_backpressure(self) -> None:
        self.fake.enqueue(Reply(firehose_bytes=1 << 30))
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.fake.port)
        client = _StalledClient(_raw_post("/v1/chat/completions", {"model": "m", "stream": True}))
        await connectProtocol(endpoint, client)
        self.addCleanup(lambda: client.lost)
        self.addCleanup(client.transport.abortConnection)
        count = await self.fake.paused
        self.assertGreaterEqual(count, 1)
        self.assertEqual(self.fake.pause_count, count)
        disconnected = self.fake.wait_for_disconnect()
        client.transport.abortConnection()
        await disconnected
        await client.lost

    async def test_firehose_complete_stream_is_valid(self) -> None:
        self.fake.enqueue(Reply(firehose_bytes=200_000), Reply(firehose_bytes=200_000))
        raw = await (
            await self.post("/chat/completions", {"model": "m", "stream": True, "stream_options": {"include_usage": True}})
        ).content()
        self.assertGreaterEqual(len(raw), 200_000)
        events = parse_sse(raw)
        self.assertEqual(events[-1], (None, "[DONE]"))
        chunks = [json.loads(d) for _, d in events[:-1]]
        for c in chunks[:3] + chunks[-3:]:
            ChatCompletionChunk.model_validate(c)
        self.assertEqual(chunks[-1]["choices"], [])
        content = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
        generated = "".join(c for c in content if c)
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], math.ceil(len(generated) / 4))

        raw = await (await self.post("/messages", {"model": "m", "stream": True})).content()
        events = [(n, json.loads(d)) for n, d in parse_sse(raw)]
        self.assertEqual([n for n, _ in events[:3]], ["message_start", "content_block_start", "ping"])
        self.assertEqual([n for n, _ in events[-3:]], ["content_block_stop", "message_delta", "message_stop"])
        for _, data in events[:2] + events[-3:]:
            STREAM_EVENT.validate_python(data)

    async def test_stop_with_request_in_flight(self) -> None:
        self.fake.enqueue(Reply(json={}, delay_before_headers=3600))
        pending = self.post("/chat/completions", {})
        await self.fake.wait_for_request(1)
        await self.fake.stop()
        await self.assertFailure(pending, ResponseNeverReceived)
        # stopping twice is fine
        await self.fake.stop()


def _track(d: Deferred) -> Deferred:
    """
    Note when C{d} has a result (C{Deferred.called} is already true while it
    waits on a chained Deferred).
    """
    d.arrived = []  # type: ignore[attr-defined]

    def arrived(result: object) -> object:
        d.arrived.append(result)  # type: ignore[attr-defined]
        return result

    return d.addBoth(arrived)


async def _collect(response: object, collector: object) -> None:
    await treq.collect(response, collector)


class CustomResponderTests(TestCase):
    async def test_responder(self) -> None:
        fake = FakeProvider(reactor, responder=lambda request: Reply(status=201, json={"path": request.path}), strict=False)
        await fake.start()
        self.addCleanup(fake.stop)
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        response = await treq.post(fake.base_url + "/messages", json={}, pool=pool)
        self.assertEqual(response.code, 201)
        self.assertEqual(await response.json(), {"path": "/v1/messages"})
