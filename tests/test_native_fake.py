"""
The passthrough's fake provider (L{cllama_tx.testing.native}) speaks the
real wire formats: its bodies validate as the official OpenAI SDK's types,
and it refuses a wrong key as OpenAI and Gemini do.
"""

from __future__ import annotations

import json

import treq
from openai.types import CreateEmbeddingResponse, ImagesResponse, ModerationCreateResponse
from openai.types.audio import Transcription
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.testing.native import (
    NativeProvider,
    embeddings_response,
    gemini_response,
    images_response,
    moderation_response,
    token_count,
    transcription_response,
)


class WireTests(SynchronousTestCase):
    def test_bodies_validate_as_the_sdk_types(self) -> None:
        embeddings = CreateEmbeddingResponse.model_validate(embeddings_response("text-embedding-3-small", ["a", "bcdefgh"]))
        self.assertEqual(embeddings.usage.prompt_tokens, token_count("a") + token_count("bcdefgh"))
        self.assertEqual([d.index for d in embeddings.data], [0, 1])
        self.assertEqual(len(ImagesResponse.model_validate(images_response(3)).data), 3)
        moderation = ModerationCreateResponse.model_validate(moderation_response("omni-moderation-2024-09-26"))
        self.assertFalse(moderation.results[0].flagged)
        self.assertEqual(Transcription.model_validate(transcription_response("hi")).text, "hi")

    def test_gemini_shape(self) -> None:
        doc = gemini_response("Hello", 12)
        self.assertEqual(doc["candidates"][0]["content"]["parts"][0]["text"], "Hello")
        meta = doc["usageMetadata"]
        self.assertEqual(meta["totalTokenCount"], meta["promptTokenCount"] + meta["candidatesTokenCount"])


class KeyTests(TestCase):
    timeout = 30

    @defer.inlineCallbacks
    def test_wrong_keys_are_refused(self):
        fake = NativeProvider(reactor, keys={"sk-good"}, google_keys={"g-good"})
        yield fake.start()
        self.addCleanup(fake.stop)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        body = json.dumps({"model": "text-embedding-3-small", "input": "x"}).encode()
        bad = yield http.post(fake.base_url + "/embeddings", data=body, headers={"Authorization": "Bearer sk-bad"})
        self.assertEqual(bad.code, 401)
        self.assertEqual((yield bad.json())["error"]["code"], "invalid_api_key")
        good = yield http.post(fake.base_url + "/embeddings", data=body, headers={"Authorization": "Bearer sk-good"})
        self.assertEqual(good.code, 200)
        self.assertEqual((yield good.json())["object"], "list")
        gemini = fake.google_base_url.replace("/openai", "") + "/models/gemini-2.5-flash:generateContent"
        refused = yield http.post(gemini, data=b"{}", headers={"x-goog-api-key": "g-bad"})
        self.assertEqual((refused.code, (yield refused.json())["error"]["status"]), (400, "INVALID_ARGUMENT"))
        self.assertEqual([(r.method, r.path, r.done) for r in fake.requests][0], ("POST", "/v1/embeddings", True))
