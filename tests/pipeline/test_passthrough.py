"""
The passthrough (C{/_proxy/<provider>/<path>}) over real loopback sockets:
a proxy in front of a fake provider speaking the native endpoints
(L{cllama_tx.testing.native}).  Identity, the path's allow-list and its
hostile spellings, the model policy, rate limits and budgets, the key
swap, metering (tokens, images, nothing), the ledger and C{/costs/api},
uploads streamed with backpressure, and the audit lines.
"""

from __future__ import annotations

import hashlib
import json

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.trial.unittest import TestCase
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from cllama_tx.pipeline.passthrough import PassthroughSettings
from cllama_tx.providers.passthrough_rules import parse_allow_list
from cllama_tx.testing.native import NativeProvider, embeddings_response
from tests.secret_scan import SCANNER
from tests.support import (
    AGENT,
    MASTER_KEY,
    PROVIDER_KEY,
    SECRET,
    UI_TOKEN,
    ProxyHarness,
    write_agent,
)

AUTH = {"Authorization": [f"Bearer {AGENT}:{SECRET}"]}
GOOGLE_KEY = "AIza-fake-google-key-000000000000000"
OTHER, OTHER_SECRET = "quill", "7a7a" * 12


class RawClient(protocol.Protocol):
    """Writes exactly what it is told; keeps the answer until the connection closes."""

    def __init__(self) -> None:
        self.data = b""
        self.closed: defer.Deferred = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason=None) -> None:
        self.closed.callback(self.data)


def parse_response(raw: bytes) -> tuple[int, dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


@implementer(IBodyProducer)
class SlowUpload:
    """
    A chunked upload sent in two halves: the second only once C{gate}
    fired (the provider has seen the first half).  C{order} records what
    happened when.
    """

    length = UNKNOWN_LENGTH

    def __init__(self, first: bytes, second: bytes, gate) -> None:
        self.first, self.second, self.gate = first, second, gate
        self.order: list[str] = []

    def startProducing(self, consumer):
        for i in range(0, len(self.first), 64 * 1024):
            consumer.write(self.first[i:i + 64 * 1024])
        self.order.append("first half sent")

        def rest(native):
            self.order.append(f"provider had {native.size} bytes")
            for i in range(0, len(self.second), 64 * 1024):
                consumer.write(self.second[i:i + 64 * 1024])
            self.order.append("second half sent")

        return self.gate().addCallback(rest)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def multipart(boundary: str, audio: bytes) -> bytes:
    return (
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
        "Content-Type: audio/wav\r\n\r\n"
    ).encode() + audio + f"\r\n--{boundary}--\r\n".encode()


class PassthroughTestCase(TestCase):
    timeout = 60
    settings = PassthroughSettings()
    harness_args: dict = {}

    @defer.inlineCallbacks
    def setUp(self):
        self.native = NativeProvider(reactor, keys={PROVIDER_KEY}, google_keys={GOOGLE_KEY})
        yield self.native.start()
        self.addCleanup(self.native.stop)
        env = {
            "OPENAI_BASE_URL": self.native.base_url,
            "GEMINI_API_KEY": GOOGLE_KEY,
            "GOOGLE_BASE_URL": self.native.google_base_url,
        }
        self.h = ProxyHarness(self, env=env, passthrough=self.settings, **self.harness_args)
        yield self.h.start()

    def call(self, path, doc=None, headers=None, method="POST", data=None):
        all_headers = dict(AUTH)
        if doc is not None:
            all_headers["Content-Type"] = ["application/json"]
        all_headers.update(headers or {})
        body = data if data is not None else (json.dumps(doc).encode() if doc is not None else None)
        return self.h.http.request(method, self.h.base_url + path, data=body, headers=all_headers)

    @defer.inlineCallbacks
    def raw(self, request: bytes):
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.h.port.getHost().port)
        client = yield endpoints.connectProtocol(endpoint, RawClient())
        client.transport.write(request)
        raw = yield client.closed
        return parse_response(raw)

    @defer.inlineCallbacks
    def rows(self):
        yield self.h.committed()
        rows = yield self.h.ledger_rows()
        return rows

    def lines(self, kind=None):
        return [line for line in self.h.audit_lines() if kind is None or line["type"] == kind]


class EmbeddingsTests(PassthroughTestCase):
    @defer.inlineCallbacks
    def test_embeddings_pass_through_with_the_key_swapped_and_are_billed(self):
        doc = {"model": "text-embedding-3-small", "input": ["the quick brown fox", "jumps over the lazy dog"]}
        response = yield self.call("/_proxy/openai/embeddings", doc, headers={"x-api-key": [f"{AGENT}:{SECRET}"]})
        body = yield response.content()
        self.assertEqual(response.code, 200)
        expected = embeddings_response("text-embedding-3-small", doc["input"])
        self.assertEqual(json.loads(body), expected)
        tokens = expected["usage"]["prompt_tokens"]
        # The provider got the operator's key, never the agent's credentials.
        seen = self.native.requests[0]
        self.assertEqual((seen.method, seen.path), ("POST", "/v1/embeddings"))
        self.assertEqual(seen.header("authorization"), f"Bearer {PROVIDER_KEY}")
        self.assertIsNone(seen.header("x-api-key"))
        self.assertNotIn(SECRET, json.dumps(seen.headers))
        self.assertEqual(seen.header("content-type"), "application/json")
        self.assertEqual(json.loads(seen.body), doc)
        cost = tokens * 0.02 / 1_000_000
        self.assertEqual(response.headers.getRawHeaders("x-cllama-cost-usd"), [f"{cost:.10f}".rstrip("0")])
        [row] = yield self.rows()
        self.assertEqual(
            (row["agent"], row["provider"], row["requested_model"], row["effective_model"], row["status"]),
            (AGENT, "openai", "text-embedding-3-small", "text-embedding-3-small", 200),
        )
        self.assertEqual((row["input_tokens"], row["output_tokens"], row["priced"]), (tokens, 0, True))
        self.assertAlmostEqual(row["cost_usd"], cost, places=12)
        self.assertEqual(row["path"], "/_proxy/openai/embeddings")
        self.assertEqual((row["request_bytes"], row["response_bytes"]), (len(json.dumps(doc)), len(body)))
        request_line, response_line = self.lines("request")[0], self.lines("response")[0]
        self.assertEqual((request_line["claw_id"], request_line["path"], request_line["model"]),
                         (AGENT, "/_proxy/openai/embeddings", "text-embedding-3-small"))
        self.assertEqual((response_line["provider"], response_line["path"], response_line["tokens_in"]),
                         ("openai", "/_proxy/openai/embeddings", tokens))
        self.assertEqual(response_line["request_id"], request_line["request_id"])
        self.assertAlmostEqual(response_line["cost_usd"], cost, places=12)
        costs = yield self.h.ui_client.get("http://ui/costs/api", headers={"Authorization": [f"Bearer {UI_TOKEN}"]})
        view = yield costs.json()
        [model] = view["agents"][AGENT]["models"]
        self.assertEqual((model["provider"], model["model"], model["priced_requests"], model["input_tokens"]),
                         ("openai", "text-embedding-3-small", 1, tokens))
        self.assertAlmostEqual(view["total_cost_usd"], cost, places=12)

    @defer.inlineCallbacks
    def test_a_repeated_version_segment_reaches_the_same_endpoint(self):
        response = yield self.call("/_proxy/openai/v1/embeddings", {"model": "text-embedding-3-small", "input": "hi"})
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json())["object"], "list")
        self.assertEqual(self.native.requests[0].path, "/v1/embeddings")

    @defer.inlineCallbacks
    def test_credentials_are_checked_before_anything_is_sent(self):
        doc = {"model": "text-embedding-3-small", "input": "hi"}
        missing = yield self.call("/_proxy/openai/embeddings", doc, headers={"Authorization": []})
        self.assertEqual(missing.code, 401)
        self.assertEqual((yield missing.json())["error"]["code"], "missing_credentials")
        wrong = yield self.call("/_proxy/openai/embeddings", doc, headers={"Authorization": [f"Bearer {AGENT}:nope"]})
        self.assertEqual(wrong.code, 403)
        self.assertEqual((yield wrong.json())["error"]["code"], "invalid_credentials")
        self.assertEqual(self.native.requests, [])
        errors = self.lines("error")
        self.assertEqual([line["status_code"] for line in errors], [401, 403])
        self.assertEqual([row for row in (yield self.rows())], [])  # no agent known: nothing billed

    @defer.inlineCallbacks
    def test_an_upstream_error_is_passed_on_and_costs_nothing(self):
        error = {"error": {"message": "'input' is too long", "type": "invalid_request_error", "param": "input",
                           "code": None}}
        self.native.responder = lambda native: (400, {"content-type": "application/json"}, json.dumps(error).encode())
        response = yield self.call("/_proxy/openai/embeddings", {"model": "text-embedding-3-small", "input": "x"})
        self.assertEqual(response.code, 400)
        self.assertEqual((yield response.json()), error)
        [row] = yield self.rows()
        self.assertEqual((row["status"], row["cost_usd"], row["path"]), (400, 0.0, "/_proxy/openai/embeddings"))

    @defer.inlineCallbacks
    def test_a_key_the_provider_refuses_is_checked_and_retired(self):
        self.native.keys = set()  # the provider refuses the key (401 invalid_api_key), its re-check too
        response = yield self.call("/_proxy/openai/embeddings", {"model": "text-embedding-3-small", "input": "x"})
        self.assertEqual(response.code, 503)
        self.assertEqual((yield response.json())["error"]["code"], "provider_keys_exhausted")
        self.assertIsNotNone(response.headers.getRawHeaders("retry-after"))
        actions = [line["action"] for line in self.lines("provider_pool")]
        self.assertEqual(actions[0], "suspect")
        self.assertIn("dead", actions)


class PathTests(PassthroughTestCase):
    @defer.inlineCallbacks
    def test_a_path_off_the_allow_list_is_403_naming_the_rules(self):
        response = yield self.call("/_proxy/openai/files", {"purpose": "batch"})
        self.assertEqual(response.code, 403)
        error = (yield response.json())["error"]
        self.assertEqual(error["code"], "path_not_allowed")
        self.assertIn("POST files", error["message"])
        self.assertIn("POST embeddings, POST moderations, POST images/generations, POST audio/*", error["message"])
        self.assertIn("CLLAMA_PASSTHROUGH_PATHS", error["message"])
        get = yield self.call("/_proxy/openai/embeddings", method="GET")
        self.assertEqual(get.code, 403)
        self.assertEqual((yield get.json())["error"]["code"], "path_not_allowed")
        self.assertEqual(self.native.requests, [])
        [line, _] = self.lines("error")
        self.assertEqual((line["status_code"], line["path"], line["claw_id"]), (403, "/_proxy/openai/files", AGENT))
        rows = yield self.rows()
        self.assertEqual([(r["status"], r["cost_usd"]) for r in rows], [(403, 0.0), (403, 0.0)])

    @defer.inlineCallbacks
    def test_traversal_and_encoded_slashes_are_refused(self):
        auth = f"Authorization: Bearer {AGENT}:{SECRET}\r\n".encode()
        for target in (
            b"/_proxy/openai/../anthropic/v1/messages",
            b"/_proxy/openai/%2e%2e/%2e%2e/admin",
            b"/_proxy/openai/images%2fgenerations",
            b"/_proxy/openai//evil.example/v1/embeddings",
            b"/_proxy/openai/embeddings%00",
        ):
            status, _, body = yield self.raw(
                b"POST " + target + b" HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n" + auth
                + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            )
            self.assertEqual(status, 400, target)
            self.assertEqual(json.loads(body)["error"]["code"], "invalid_path", target)
        self.assertEqual(self.native.requests, [])

    @defer.inlineCallbacks
    def test_unknown_and_unconfigured_providers(self):
        unknown = yield self.call("/_proxy/nosuch/embeddings", {"model": "m"})
        self.assertEqual(unknown.code, 400)
        self.assertEqual((yield unknown.json())["error"]["code"], "unknown_provider")
        missing = yield self.call("/_proxy/xai/embeddings", {"model": "m"})
        self.assertEqual(missing.code, 400)
        self.assertEqual((yield missing.json())["error"]["code"], "provider_not_configured")

    @defer.inlineCallbacks
    def test_credential_query_parameters_never_reach_the_provider(self):
        response = yield self.call(
            "/_proxy/openai/embeddings?key=agent-secret&dimensions_hint=3", {"model": "text-embedding-3-small", "input": "x"}
        )
        self.assertEqual(response.code, 200)
        yield response.content()
        self.assertEqual(self.native.requests[0].query, "dimensions_hint=3")


class PolicyTests(PassthroughTestCase):
    @defer.inlineCallbacks
    def test_a_model_the_agent_may_not_use_is_refused(self):
        write_agent(self.h.context_root, OTHER, OTHER_SECRET, model_policy={
            "mode": "clamp", "allowed": [{"slot": "primary", "ref": "openai/gpt-4o-mini"}],
        })
        headers = {"Authorization": [f"Bearer {OTHER}:{OTHER_SECRET}"]}
        refused = yield self.call("/_proxy/openai/embeddings", {"model": "text-embedding-3-small", "input": "x"}, headers)
        self.assertEqual(refused.code, 403)
        error = (yield refused.json())["error"]
        self.assertEqual(error["code"], "model_not_allowed")
        self.assertIn("openai/text-embedding-3-small", error["message"])
        self.assertEqual(self.native.requests, [])
        # Allowed once the policy names it.
        write_agent(self.h.context_root, OTHER, OTHER_SECRET, model_policy={
            "mode": "clamp", "allowed": [{"slot": "primary", "ref": "openai/gpt-4o-mini"},
                                         {"slot": "embeddings", "ref": "openai/text-embedding-3-small"}],
        })
        allowed = yield self.call("/_proxy/openai/embeddings", {"model": "text-embedding-3-small", "input": "x"}, headers)
        self.assertEqual(allowed.code, 200)
        yield allowed.content()

    @defer.inlineCallbacks
    def test_a_rate_limited_agent_gets_429(self):
        write_agent(self.h.context_root, OTHER, OTHER_SECRET, rate_limits={"rpm": 1})
        headers = {"Authorization": [f"Bearer {OTHER}:{OTHER_SECRET}"]}
        doc = {"model": "text-embedding-3-small", "input": "x"}
        first = yield self.call("/_proxy/openai/embeddings", doc, headers)
        self.assertEqual(first.code, 200)
        yield first.content()
        second = yield self.call("/_proxy/openai/embeddings", doc, headers)
        self.assertEqual(second.code, 429)
        self.assertEqual((yield second.json())["error"]["code"], "rate_limited")
        self.assertGreaterEqual(int(second.headers.getRawHeaders("retry-after")[0]), 1)
        self.assertEqual(len(self.native.requests), 1)

    @defer.inlineCallbacks
    def test_an_unpriced_request_against_a_dollar_budget_is_refused_by_default(self):
        write_agent(self.h.context_root, OTHER, OTHER_SECRET,
                    budget={"limit_usd": 5.0, "window": "24h", "behavior": "hard_stop"})
        headers = {"Authorization": [f"Bearer {OTHER}:{OTHER_SECRET}"]}
        speech = yield self.call("/_proxy/openai/audio/speech", {"model": "tts-1", "input": "hello"}, headers)
        self.assertEqual(speech.code, 403)
        self.assertEqual((yield speech.json())["error"]["code"], "unpriced_model")
        # A priced request fits the budget.
        embeddings = yield self.call("/_proxy/openai/embeddings", {"model": "text-embedding-3-small", "input": "x"}, headers)
        self.assertEqual(embeddings.code, 200)
        yield embeddings.content()


class VirtualKeyTests(PassthroughTestCase):
    @defer.inlineCallbacks
    def mint(self, **fields):
        headers = {"Authorization": [f"Bearer {MASTER_KEY}"], "Content-Type": ["application/json"]}
        response = yield self.h.http.post(self.h.base_url + "/key/generate", data=json.dumps(fields).encode(),
                                          headers=headers)
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        SCANNER.register(body["key"])
        return body["key"]

    @defer.inlineCallbacks
    def test_a_keys_model_list_applies_and_its_spend_is_its_own(self):
        chat_only = yield self.mint(models=["openai/gpt-4o-mini"], key_alias="chat-only")
        any_model = yield self.mint(key_alias="anything", user_id="alice")
        doc = {"model": "text-embedding-3-small", "input": "x"}
        refused = yield self.call("/_proxy/openai/embeddings", doc, {"Authorization": [f"Bearer {chat_only}"]})
        self.assertEqual(refused.code, 403)
        error = (yield refused.json())["error"]
        self.assertEqual((error["type"], error["param"]), ("key_model_access_denied", "model"))
        self.assertEqual(self.native.requests, [])
        allowed = yield self.call("/_proxy/openai/embeddings", doc, {"Authorization": [f"Bearer {any_model}"]})
        self.assertEqual(allowed.code, 200)
        yield allowed.content()
        self.assertEqual(self.native.requests[0].header("authorization"), f"Bearer {PROVIDER_KEY}")
        rows = yield self.rows()
        ok = [r for r in rows if r["status"] == 200]
        self.assertEqual([(r["user_id"], r["priced"], r["path"]) for r in ok],
                         [("alice", True, "/_proxy/openai/embeddings")])
        self.assertIsNotNone(ok[0]["key_id"])


class ReserveTests(PassthroughTestCase):
    settings = PassthroughSettings(reserve_usd=0.25)

    @defer.inlineCallbacks
    def test_a_reserve_admits_unpriced_requests_until_the_budget_is_held(self):
        write_agent(self.h.context_root, OTHER, OTHER_SECRET,
                    budget={"limit_usd": 0.2, "window": "24h", "behavior": "hard_stop"})
        write_agent(self.h.context_root, AGENT, SECRET,
                    budget={"limit_usd": 1.0, "window": "24h", "behavior": "hard_stop"})
        headers = {"Authorization": [f"Bearer {OTHER}:{OTHER_SECRET}"]}
        small = yield self.call("/_proxy/openai/audio/speech", {"model": "tts-1", "input": "hi"}, headers)
        self.assertEqual(small.code, 429)  # USD 0.25 held does not fit USD 0.20
        self.assertEqual((yield small.json())["error"]["type"], "budget_exceeded")
        fits = yield self.call("/_proxy/openai/audio/speech", {"model": "tts-1", "input": "hi"})
        self.assertEqual(fits.code, 200)
        audio = yield fits.content()
        self.assertTrue(audio.startswith(b"ID3"))
        rows = yield self.rows()
        self.assertEqual([(r["agent"], r["status"], r["priced"]) for r in rows],
                         [(OTHER, 429, False), (AGENT, 200, False)])
        # Settled as a request of unknown cost: nothing held, nothing spent.
        budget = self.h.governance.budget(self.h.contexts.get(AGENT))
        usage = self.h.governance.book.usage(AGENT, budget)
        self.assertEqual((usage.cost_usd, usage.reserved_usd, usage.unknown_cost_requests), (0.0, 0.0, 1))


class UnmeteredTests(PassthroughTestCase):
    @defer.inlineCallbacks
    def test_speech_is_relayed_and_recorded_unmetered(self):
        response = yield self.call("/_proxy/openai/audio/speech", {"model": "tts-1", "input": "hello there"})
        audio = yield response.content()
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["audio/mpeg"])
        self.assertEqual(audio, b"ID3" + b"\x00\xff" * 88)
        [row] = yield self.rows()
        self.assertEqual((row["priced"], row["cost_usd"], row["path"]), (False, 0.0, "/_proxy/openai/audio/speech"))
        self.assertEqual(row["response_bytes"], len(audio))
        costs = yield self.h.ui_client.get("http://ui/costs/api", headers={"Authorization": [f"Bearer {UI_TOKEN}"]})
        view = yield costs.json()
        self.assertEqual((view["total_requests"], view["unpriced_requests"]), (1, 1))
        [model] = view["agents"][AGENT]["models"]
        self.assertEqual((model["model"], model["pricing_status"]), ("tts-1", "unpriced"))

    @defer.inlineCallbacks
    def test_images_are_billed_per_image_and_moderation_is_free(self):
        images = yield self.call("/_proxy/openai/images/generations", {"model": "dall-e-3", "prompt": "a cat", "n": 3})
        self.assertEqual(len((yield images.json())["data"]), 3)
        moderation = yield self.call("/_proxy/openai/moderations", {"model": "omni-moderation-latest", "input": "hi"})
        self.assertEqual((yield moderation.json())["results"][0]["flagged"], False)
        rows = yield self.rows()
        self.assertEqual([(r["effective_model"], r["priced"]) for r in rows],
                         [("dall-e-3", True), ("omni-moderation-latest", True)])
        self.assertAlmostEqual(rows[0]["cost_usd"], 0.12)
        self.assertEqual(rows[1]["cost_usd"], 0.0)
        notes = [(line["kind"], line["images"]) for line in self.lines("intervention")
                 if line["intervention"] == "passthrough_metered"]
        self.assertEqual(notes, [("images", 3), ("free", 0)])


class GeminiTests(PassthroughTestCase):
    @defer.inlineCallbacks
    def test_gemini_native_generate_content(self):
        doc = {"contents": [{"role": "user", "parts": [{"text": "Say hello"}]}]}
        response = yield self.call("/_proxy/google/v1beta/models/gemini-2.5-flash:generateContent", doc)
        answer = yield response.json()
        self.assertEqual(response.code, 200)
        self.assertEqual(answer["candidates"][0]["content"]["parts"][0]["text"], "Hello from Gemini")
        seen = self.native.requests[0]
        self.assertEqual(seen.path, "/v1beta/models/gemini-2.5-flash:generateContent")
        self.assertEqual(seen.header("x-goog-api-key"), GOOGLE_KEY)
        self.assertIsNone(seen.header("authorization"))
        [row] = yield self.rows()
        meta = answer["usageMetadata"]
        self.assertEqual((row["provider"], row["effective_model"], row["priced"]), ("google", "gemini-2.5-flash", True))
        self.assertEqual((row["input_tokens"], row["output_tokens"]), (meta["promptTokenCount"], meta["candidatesTokenCount"]))
        expected = (meta["promptTokenCount"] * 0.3 + meta["candidatesTokenCount"] * 2.5) / 1_000_000
        self.assertAlmostEqual(row["cost_usd"], expected, places=12)


class UploadTests(PassthroughTestCase):
    settings = PassthroughSettings(allow=parse_allow_list(None), max_body_bytes=8 * 1024 * 1024)

    @defer.inlineCallbacks
    def test_an_upload_streams_to_the_provider_before_the_agent_has_sent_it_all(self):
        boundary = "cllama-boundary-1234"
        body = multipart(boundary, bytes(range(256)) * (12 * 1024))  # about 3 MiB
        half = len(body) // 2
        upload = SlowUpload(body[:half], body[half:], lambda: self.native.wait_for_upload(half))
        response = yield self.call(
            "/_proxy/openai/audio/transcriptions", data=upload,
            headers={"Content-Type": [f"multipart/form-data; boundary={boundary}"]},
        )
        answer = yield response.json()
        self.assertEqual(response.code, 200)
        self.assertEqual(answer, {"text": f"{len(body)} bytes heard"})
        # The provider had half the body while the agent still held the rest.
        self.assertEqual(upload.order[0], "first half sent")
        self.assertTrue(upload.order[1].startswith("provider had "), upload.order)
        self.assertEqual(upload.order[2], "second half sent")
        seen = self.native.requests[0]
        self.assertGreater(seen.chunks, 2)
        self.assertEqual(seen.size, len(body))
        self.assertEqual(seen.sha256, hashlib.sha256(body).hexdigest())
        self.assertEqual(seen.header("content-type"), f"multipart/form-data; boundary={boundary}")
        self.assertEqual(seen.header("authorization"), f"Bearer {PROVIDER_KEY}")
        [row] = yield self.rows()
        self.assertEqual((row["status"], row["priced"], row["request_bytes"]), (200, False, len(body)))
        # No model named: listed by its endpoint.
        self.assertEqual((row["requested_model"], row["effective_model"]), (None, "audio/transcriptions"))

    @defer.inlineCallbacks
    def test_an_agent_that_leaves_mid_upload_aborts_it_and_is_billed_nothing(self):
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.h.port.getHost().port)
        client = yield endpoints.connectProtocol(endpoint, RawClient())
        client.transport.write(
            b"POST /_proxy/openai/audio/transcriptions HTTP/1.1\r\nHost: proxy\r\n"
            + f"Authorization: Bearer {AGENT}:{SECRET}\r\n".encode()
            + b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: %d\r\n\r\n" % (4 * 1024 * 1024)
            + b"a" * (1024 * 1024)
        )
        seen = yield self.native.wait_for_upload(512 * 1024)
        recorded: defer.Deferred = defer.Deferred()
        record = self.h.ledger.record

        def watched(row):
            d = record(row)
            if not recorded.called:
                recorded.callback(None)
            return d

        self.h.ledger.record = watched
        client.transport.abortConnection()
        yield recorded
        [line] = [line for line in self.lines("error")]
        self.assertEqual((line["status_code"], line["path"]), (499, "/_proxy/openai/audio/transcriptions"))
        [row] = yield self.rows()
        self.assertEqual((row["status"], row["cost_usd"]), (499, 0.0))
        self.assertFalse(seen.done)  # the provider never got a whole body

    @defer.inlineCallbacks
    def test_an_upload_over_the_cap_is_cut_with_413(self):
        body = b"x" * (9 * 1024 * 1024)
        upload = SlowUpload(body[:1024], body[1024:], lambda: defer.succeed(type("N", (), {"size": 0})()))
        response = yield self.call(
            "/_proxy/openai/audio/transcriptions", data=upload,
            headers={"Content-Type": ["multipart/form-data; boundary=x"]},
        )
        self.assertEqual(response.code, 413)
        self.assertEqual((yield response.json())["error"]["code"], "request_too_large")
        [row] = yield self.rows()
        self.assertEqual((row["status"], row["path"]), (413, "/_proxy/openai/audio/transcriptions"))
        self.assertLessEqual(self.native.requests[0].size if self.native.requests else 0, 8 * 1024 * 1024)

    @defer.inlineCallbacks
    def test_a_declared_length_over_the_cap_is_refused_before_anything_is_sent(self):
        status, _, body = yield self.raw(
            b"POST /_proxy/openai/audio/transcriptions HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
            + f"Authorization: Bearer {AGENT}:{SECRET}\r\n".encode()
            + b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: %d\r\n\r\n" % (64 * 1024 * 1024)
        )
        self.assertEqual(status, 413)
        self.assertEqual(json.loads(body)["error"]["code"], "request_too_large")
        self.assertEqual(self.native.requests, [])
