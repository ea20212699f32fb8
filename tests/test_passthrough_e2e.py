"""
The passthrough end to end: a real `twistd -n cllama` in front of a fake
OpenAI provider on a loopback port (L{cllama_tx.testing.native}).  An
embeddings call passes with the key swapped and is billed in the ledger
and /costs/api; a path off the allow-list is 403; a traversal is refused;
a large upload reaches the provider before the agent has sent it all; an
unmetered endpoint is recorded as unmetered; a rate-limited agent gets
429; every request is on the audit stream with its path and provider.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3

import treq
from twisted.internet import defer, endpoints, reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from cllama_tx.testing.native import NativeProvider, embeddings_response
from tests.pipeline.test_passthrough import RawClient, SlowUpload, multipart, parse_response
from tests.runtime.test_daemon import spawn_daemon
from tests.secret_scan import SCANNER
from tests.support import AGENT, PROVIDER_KEY, SECRET, write_agent

UI_TOKEN = "passthrough-e2e-ui-token-4711"
LIMITED, LIMITED_SECRET = "sparrow", "3b3b" * 12
SCANNER.register(UI_TOKEN, LIMITED_SECRET)


class PassthroughDaemonTests(TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def test_the_passthrough_in_the_real_daemon(self):
        native = NativeProvider(reactor, keys={PROVIDER_KEY})
        yield native.start()
        self.addCleanup(native.stop)
        base = os.path.abspath(self.mktemp())
        context_root = os.path.join(base, "context")
        auth_dir = os.path.join(base, "auth")
        state_dir = os.path.join(base, "state")
        os.makedirs(auth_dir)
        write_agent(context_root, AGENT, SECRET)
        write_agent(context_root, LIMITED, LIMITED_SECRET, rate_limits={"rpm": 1})
        env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": context_root,
            "CLAW_AUTH_DIR": auth_dir,
            "CLLAMA_STATE_DIR": state_dir,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": native.base_url,
            "CLLAMA_UI_TOKEN": UI_TOKEN,
            "CLLAMA_PASSTHROUGH_MAX_BODY_SIZE": "16MiB",
        }
        process, transport = spawn_daemon(self, env)
        ports = yield process.ready
        api = f"http://127.0.0.1:{ports['API']}"
        ui = f"http://127.0.0.1:{ports['UI']}"
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        http = treq.client.HTTPClient(Agent(reactor, pool=pool))
        agent_auth = {"Authorization": [f"Bearer {AGENT}:{SECRET}"]}

        def post(path, doc, who=agent_auth):
            return http.post(api + path, data=json.dumps(doc).encode(),
                             headers={**who, "Content-Type": ["application/json"]})

        # 1. Embeddings: the key swapped, the answer as the provider sent it, billed.
        doc = {"model": "text-embedding-3-small", "input": ["a fox", "a dog", "a lazy afternoon"]}
        response = yield post("/_proxy/openai/embeddings", doc)
        self.assertEqual(response.code, 200)
        expected = embeddings_response("text-embedding-3-small", doc["input"])
        self.assertEqual((yield response.json()), expected)
        seen = native.requests[0]
        self.assertEqual(seen.path, "/v1/embeddings")
        self.assertEqual(seen.header("authorization"), f"Bearer {PROVIDER_KEY}")
        self.assertNotIn(SECRET, json.dumps(seen.headers))
        tokens = expected["usage"]["prompt_tokens"]
        cost = tokens * 0.02 / 1_000_000

        # 2. A path off the allow-list: 403 naming the rule; nothing sent.
        response = yield post("/_proxy/openai/files", {"purpose": "batch"})
        self.assertEqual(response.code, 403)
        error = (yield response.json())["error"]
        self.assertEqual(error["code"], "path_not_allowed")
        self.assertIn("not on the passthrough allow-list of provider 'openai'", error["message"])

        # 3. A traversal (sent raw: a client library would normalise it).
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", ports["API"])
        client = yield endpoints.connectProtocol(endpoint, RawClient())
        client.transport.write(
            b"POST /_proxy/openai/%2e%2e/%2e%2e/v1/chat/completions HTTP/1.1\r\nHost: proxy\r\nConnection: close\r\n"
            + f"Authorization: Bearer {AGENT}:{SECRET}\r\n".encode()
            + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        )
        status, _, body = parse_response((yield client.closed))
        self.assertEqual(status, 400)
        self.assertEqual(json.loads(body)["error"]["code"], "invalid_path")
        self.assertEqual(len(native.requests), 1)

        # 4. A large upload: the provider has half of it before the agent sends the rest.
        boundary = "e2e-boundary-77"
        upload_body = multipart(boundary, os.urandom(4 * 1024 * 1024))
        half = len(upload_body) // 2
        upload = SlowUpload(upload_body[:half], upload_body[half:], lambda: native.wait_for_upload(half))
        response = yield http.post(
            api + "/_proxy/openai/audio/transcriptions", data=upload,
            headers={**agent_auth, "Content-Type": [f"multipart/form-data; boundary={boundary}"]},
        )
        self.assertEqual(response.code, 200)
        self.assertEqual((yield response.json()), {"text": f"{len(upload_body)} bytes heard"})
        self.assertEqual(upload.order[0], "first half sent")
        self.assertTrue(upload.order[1].startswith("provider had "))
        transcription = native.requests[-1]
        self.assertEqual(transcription.sha256, hashlib.sha256(upload_body).hexdigest())
        self.assertGreater(transcription.chunks, 2)

        # 5. An endpoint that reports no cost: relayed, recorded as unmetered.
        response = yield post("/_proxy/openai/audio/speech", {"model": "tts-1", "input": "hello"})
        self.assertEqual(response.code, 200)
        speech = yield response.content()
        self.assertTrue(speech.startswith(b"ID3"))

        # 6. A rate-limited agent: its second call is 429.
        limited = {"Authorization": [f"Bearer {LIMITED}:{LIMITED_SECRET}"]}
        first = yield post("/_proxy/openai/embeddings", {"model": "text-embedding-3-small", "input": "x"}, limited)
        self.assertEqual(first.code, 200)
        yield first.content()
        second = yield post("/_proxy/openai/embeddings", {"model": "text-embedding-3-small", "input": "x"}, limited)
        self.assertEqual(second.code, 429)
        self.assertEqual((yield second.json())["error"]["code"], "rate_limited")
        self.assertIsNotNone(second.headers.getRawHeaders("retry-after"))

        # The books: /costs/api bills the embeddings and counts the unmetered calls as unpriced.
        costs = yield http.get(ui + "/costs/api", headers={"Authorization": [f"Bearer {UI_TOKEN}"]})
        view = yield costs.json()
        models = {m["model"]: m for m in view["agents"][AGENT]["models"]}
        self.assertEqual(models["text-embedding-3-small"]["input_tokens"], tokens)
        self.assertEqual(models["text-embedding-3-small"]["pricing_status"], "priced")
        self.assertAlmostEqual(models["text-embedding-3-small"]["cost_usd"], cost, places=12)
        self.assertEqual(models["tts-1"]["pricing_status"], "unpriced")
        # The transcription named no model the proxy could read (a multipart body): listed by its endpoint.
        self.assertEqual(models["audio/transcriptions"]["pricing_status"], "unpriced")
        self.assertEqual(view["agents"][AGENT]["unpriced_requests"], 2)

        # The audit stream: each request with its path and provider.
        yield process.wait_for_audit(
            lambda lines: sum(line["type"] in ("response", "error") and line["claw_id"] is not None for line in lines) >= 7
        )
        lines = process.audit_lines()
        responses = [line for line in lines if line["type"] == "response"]
        self.assertEqual(
            [(line["path"], line["provider"], line["status_code"]) for line in responses],
            [("/_proxy/openai/embeddings", "openai", 200), ("/_proxy/openai/audio/transcriptions", "openai", 200),
             ("/_proxy/openai/audio/speech", "openai", 200), ("/_proxy/openai/embeddings", "openai", 200)],
        )
        errors = [(line["path"], line["status_code"]) for line in lines if line["type"] == "error"]
        self.assertIn(("/_proxy/openai/files", 403), errors)
        self.assertIn(("/_proxy/openai/embeddings", 429), errors)
        self.assertIn(400, [status for _, status in errors])

        transport.signalProcess("TERM")
        self.assertEqual((yield process.ended), 0)
        conn = sqlite3.connect(os.path.join(state_dir, "ledger.sqlite3"))
        try:
            rows = conn.execute(
                "SELECT agent, path, status, priced, cost_usd, input_tokens, request_bytes FROM requests ORDER BY id"
            ).fetchall()
        finally:
            conn.close()
        by_path = {(agent, path, status): (priced, cost_usd, tokens_in, size)
                   for agent, path, status, priced, cost_usd, tokens_in, size in rows}
        priced, row_cost, row_tokens, _ = by_path[(AGENT, "/_proxy/openai/embeddings", 200)]
        self.assertEqual((priced, row_tokens), (1, tokens))
        self.assertAlmostEqual(row_cost, cost, places=12)
        self.assertEqual(by_path[(AGENT, "/_proxy/openai/audio/transcriptions", 200)][0], 0)
        self.assertEqual(by_path[(AGENT, "/_proxy/openai/audio/transcriptions", 200)][3], len(upload_body))
        self.assertEqual(by_path[(AGENT, "/_proxy/openai/audio/speech", 200)][:2], (0, 0.0))
        self.assertIn((LIMITED, "/_proxy/openai/embeddings", 429), by_path)
        for secret in (PROVIDER_KEY, SECRET, LIMITED_SECRET, UI_TOKEN):
            self.assertNotIn(secret.encode(), process.stdout + process.stderr)
