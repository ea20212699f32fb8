"""
Tests for L{cllama_tx.demo.model}.
"""

from __future__ import annotations

import json
import math
import os
import stat

import anthropic.types
import pydantic
import treq
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool

from cllama_tx.demo.model import (
    DEMO_AGENT_ID,
    DEMO_MODEL_REF,
    DEMO_SECRET,
    DEMO_TOKEN,
    DemoModel,
    DemoService,
    banner,
    estimate_tokens,
    write_demo_context,
)
from cllama_tx.testing import ReceivedRequest, parse_sse

STREAM_EVENT = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)

CHAT = {
    "model": "echo-1",
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": [{"type": "text", "text": "second question"}]},
    ],
}
MESSAGES = {
    "model": "echo-1",
    "max_tokens": 100,
    "system": [{"type": "text", "text": "Be brief."}],
    "messages": [{"role": "user", "content": [{"type": "text", "text": "héllo wörld"}]}],
}


def _received(path: str, body: object, headers: dict | None = None) -> ReceivedRequest:
    raw = json.dumps(body).encode()
    return ReceivedRequest(method="POST", path=path, headers=headers or {}, body=raw, json=body)


class ConstantsTests(SynchronousTestCase):
    def test_constants(self) -> None:
        self.assertEqual((DEMO_AGENT_ID, DEMO_SECRET, DEMO_MODEL_REF), ("demo", "cllama-demo", "demo/echo-1"))
        self.assertEqual(DEMO_TOKEN, "demo:cllama-demo")


class DemoModelTests(SynchronousTestCase):
    def test_reply_echoes_last_user_text(self) -> None:
        model = DemoModel()
        self.assertEqual(
            model.reply_text(CHAT), "Hello from the cllama_tx demo model. You said: second question"
        )
        self.assertEqual(model.reply_text(MESSAGES), "Hello from the cllama_tx demo model. You said: héllo wörld")
        self.assertEqual(model.reply_text({"messages": []}), "Hello from the cllama_tx demo model. You said nothing.")

    def test_truncates(self) -> None:
        reply = DemoModel().reply_text({"messages": [{"role": "user", "content": "x" * 500}]})
        self.assertTrue(reply.endswith(": " + "x" * 200 + "..."))

    def test_usage(self) -> None:
        model = DemoModel()
        prompt_text = "Be brief.\nhéllo wörld"
        self.assertEqual(model.prompt_text(MESSAGES), prompt_text)
        self.assertEqual(
            model.usage(MESSAGES),
            (math.ceil(len(prompt_text.encode()) / 4), math.ceil(len(model.reply_text(MESSAGES).encode()) / 4)),
        )
        self.assertEqual(estimate_tokens(""), 0)
        self.assertEqual(estimate_tokens("abcde"), 2)
        self.assertEqual(model.count_tokens(MESSAGES), {"input_tokens": estimate_tokens(prompt_text)})

    def test_deterministic(self) -> None:
        for method, body in [
            ("openai_response", CHAT),
            ("openai_stream", CHAT),
            ("anthropic_response", MESSAGES),
            ("anthropic_stream", MESSAGES),
        ]:
            self.assertEqual(getattr(DemoModel(), method)(body), getattr(DemoModel(), method)(body))
        self.assertNotEqual(DemoModel().openai_response(CHAT)["id"], DemoModel().openai_response(MESSAGES)["id"])

    def test_clock(self) -> None:
        clock = Clock()
        clock.advance(1234)
        self.assertEqual(DemoModel(clock=clock).openai_response(CHAT)["created"], 1234)

    def test_openai_shapes(self) -> None:
        model = DemoModel()
        completion = ChatCompletion.model_validate(model.openai_response(CHAT))
        self.assertEqual(completion.choices[0].message.content, model.reply_text(CHAT))
        self.assertEqual((completion.usage.prompt_tokens, completion.usage.completion_tokens), model.usage(CHAT))
        self.assertEqual(completion.model, "echo-1")
        chunks = model.openai_stream(dict(CHAT, stream=True, stream_options={"include_usage": True}))
        for c in chunks:
            ChatCompletionChunk.model_validate(c)
        pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-2]]
        self.assertGreater(len(pieces), 5)
        self.assertEqual("".join(pieces), model.reply_text(CHAT))
        self.assertEqual(chunks[-1]["usage"]["completion_tokens"], model.usage(CHAT)[1])
        self.assertNotIn("usage", model.openai_stream(CHAT)[-1])

    def test_anthropic_shapes(self) -> None:
        model = DemoModel()
        message = anthropic.types.Message.model_validate(model.anthropic_response(MESSAGES))
        self.assertEqual(message.content[0].text, model.reply_text(MESSAGES))
        self.assertEqual((message.usage.input_tokens, message.usage.output_tokens), model.usage(MESSAGES))
        events = model.anthropic_stream(MESSAGES)
        for name, data in events:
            if name != "ping":
                STREAM_EVENT.validate_python(data)
        text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
        self.assertEqual(text, model.reply_text(MESSAGES))

    def test_respond(self) -> None:
        model = DemoModel()
        self.assertEqual(model.respond(_received("/v1/chat/completions", CHAT)).json, model.openai_response(CHAT))
        streamed = model.respond(_received("/v1/messages", dict(MESSAGES, stream=True)))
        self.assertIsNone(streamed.json)
        names = [n for n, _ in parse_sse(b"".join(streamed.sse))]
        self.assertEqual(names[0], "message_start")
        self.assertEqual(names[-1], "message_stop")
        bad = model.respond(ReceivedRequest("POST", "/v1/messages", {}, b"[]", []))
        self.assertEqual((bad.status, bad.json["type"]), (400, "error"))
        bad = model.respond(ReceivedRequest("POST", "/v1/chat/completions", {}, b"x", None))
        self.assertEqual(bad.status, 400)
        self.assertIn("error", bad.json)
        anthropic_models = model.respond(
            ReceivedRequest("GET", "/v1/models", {"anthropic-version": ["2023-06-01"]}, b"", None)
        )
        self.assertEqual(anthropic_models.json["data"][0]["type"], "model")


class ContextTests(SynchronousTestCase):
    def test_write_demo_context(self) -> None:
        root = os.path.join(self.mktemp(), "context")
        context = write_demo_context(root)
        self.assertEqual(context, os.path.join(root, "demo"))
        with open(os.path.join(context, "metadata.json")) as f:
            metadata = json.load(f)
        self.assertEqual(metadata["token"], "demo:cllama-demo")
        self.assertEqual((metadata["pod"], metadata["service"]), ("demo", "demo"))
        self.assertEqual(
            metadata["model_policy"], {"mode": "reject", "allowed": [{"slot": "primary", "ref": "demo/echo-1"}]}
        )
        for directory in (root, context):
            self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        # idempotent
        write_demo_context(root)
        self.assertEqual(sorted(os.listdir(context)), ["AGENTS.md", "metadata.json"])


class BannerTests(SynchronousTestCase):
    def test_banner(self) -> None:
        text = banner("http://127.0.0.1:8080/")
        self.assertIn("curl -sS http://127.0.0.1:8080/v1/chat/completions", text)
        self.assertIn("-H 'Authorization: Bearer demo:cllama-demo'", text)
        self.assertIn('"model": "demo/echo-1"', text)
        self.assertIn('"stream": true', text)
        self.assertIn('base_url="http://127.0.0.1:8080/v1"', text)
        self.assertIn('api_key="demo:cllama-demo"', text)
        self.assertEqual(banner("http://127.0.0.1:8080/v1"), banner("http://127.0.0.1:8080"))
        self.assertGreater(len(text.splitlines()), 5)


class DemoServiceTests(TestCase):
    async def test_starts_answers_stops(self) -> None:
        service = DemoService(reactor)
        self.assertRaises(RuntimeError, lambda: service.base_url)
        await service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(service.running)
        self.assertRegex(service.base_url, r"^http://127\.0\.0\.1:\d+/v1$")
        pool = HTTPConnectionPool(reactor)
        self.addCleanup(pool.closeCachedConnections)
        body = {"model": "echo-1", "messages": [{"role": "user", "content": "are you there?"}]}
        response = await treq.post(service.base_url + "/chat/completions", json=body, pool=pool)
        self.assertEqual(response.code, 200)
        data = await response.json()
        self.assertEqual(data["choices"][0]["message"]["content"], DemoModel().reply_text(body))
        self.assertGreater(data["created"], 1700000000)  # the reactor's clock
        await service.stopService()
        self.assertFalse(service.running)
        self.assertRaises(RuntimeError, lambda: service.base_url)
