"""
Clients as they are configured in the wild, end to end over real sockets:
the official OpenAI and Anthropic SDKs and the LiteLLM SDK sending bare
model names, the operator's aliases from a LiteLLM-style model table,
LiteLLM-style base URLs (no /v1), virtual keys listing their models, the
master key calling inference, Anthropic's ?beta=true, and unknown paths,
each checked at the fake provider, in the ledger and in the audit stream.
"""

from __future__ import annotations

import json
import os

import anthropic
import openai
from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cllama_tx.testing import Reply, anthropic_message, openai_completion
from tests.secret_scan import SCANNER
from tests.support import AGENT, MASTER_KEY, PROVIDER_KEY, SECRET, UI_TOKEN, ProxyHarness

# LiteLLM must not fetch its price map from the network when imported.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

TABLE_KEY = "sk-deployment-key-4242"
SCANNER.register(TABLE_KEY)
CREDENTIALS = f"{AGENT}:{SECRET}"

# A LiteLLM proxy config as LiteLLM users write it.  The fake endpoint's
# api_base is filled in once the fake provider listens (then reloaded).
TABLE = """
model_list:
  - model_name: gpt-4
    litellm_params:
      model: openai/gpt-4o
  - model_name: fake-openai-endpoint
    litellm_params:
      model: openai/fake
      api_base: {fake_base}
      api_key: os.environ/FAKE_ENDPOINT_KEY
router_settings:
  model_group_alias:
    gpt-3.5-turbo: gpt-4
litellm_settings:
  drop_params: true
"""


def intervention_rules(lines, request_id=None):
    return [
        (line["intervention"], line.get("entry") or line.get("family") or line.get("provider") or line.get("alias"))
        for line in lines
        if line["type"] == "intervention" and (request_id is None or line["request_id"] == request_id)
    ]


class CompatCase(TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.table_path = os.path.abspath(self.mktemp())
        with open(self.table_path, "w") as f:
            f.write(TABLE.format(fake_base="http://127.0.0.1:9/v1"))
        self.h = yield ProxyHarness(
            self, fake_providers=("openai", "anthropic"), model_table=self.table_path,
            env={"FAKE_ENDPOINT_KEY": TABLE_KEY},
        ).start()
        # Now the fake listens: point the deployment at it and reload, as an operator would.
        with open(self.table_path, "w") as f:
            f.write(TABLE.format(fake_base=self.h.fake.base_url))
        response = yield self.h.ui_client.post(
            "http://ui/api/reload", headers={"Authorization": [f"Bearer {UI_TOKEN}"]}
        )
        body = yield response.json()
        self.assertIn("model_table", body["reloaded"], body)

    def lines(self, type_=None):
        return [line for line in self.h.audit_lines() if type_ is None or line["type"] == type_]

    @defer.inlineCallbacks
    def rows(self):
        yield self.h.committed()
        rows = yield self.h.ledger_rows()
        return rows


class OpenAISdkTests(CompatCase):
    @defer.inlineCallbacks
    def test_bare_name_on_a_base_url_without_v1(self):
        self.h.fake.enqueue(Reply(json=openai_completion("Paris.", "gpt-4o-mini", 9, 2)))
        client = openai.OpenAI(base_url=self.h.base_url, api_key=CREDENTIALS, max_retries=0, timeout=20)
        self.addCleanup(client.close)
        completion = yield deferToThread(
            client.chat.completions.create, model="gpt-4o-mini", messages=[{"role": "user", "content": "Capital?"}]
        )
        self.assertEqual(completion.choices[0].message.content, "Paris.")
        [received] = self.h.fake.received
        self.assertEqual((received.path, received.json["model"]), ("/v1/chat/completions", "gpt-4o-mini"))
        self.assertEqual(received.header("authorization"), f"Bearer {PROVIDER_KEY}")
        self.assertEqual(intervention_rules(self.lines()), [("bare_family", "gpt-*")])
        [row] = yield self.rows()
        self.assertEqual((row["agent"], row["provider"], row["effective_model"], row["requested_model"]),
                         (AGENT, "openai", "gpt-4o-mini", "gpt-4o-mini"))

    @defer.inlineCallbacks
    def test_aliases_from_the_model_table(self):
        client = openai.OpenAI(base_url=self.h.base_url + "/v1", api_key=CREDENTIALS, max_retries=0, timeout=20)
        self.addCleanup(client.close)
        for name in ("gpt-4", "gpt-3.5-turbo", "fake-openai-endpoint"):
            yield deferToThread(client.chat.completions.create, model=name, messages=[{"role": "user", "content": "hi"}])
        first, second, third = self.h.fake.received
        self.assertEqual((first.json["model"], second.json["model"]), ("gpt-4o", "gpt-4o"))
        self.assertEqual(first.header("authorization"), f"Bearer {PROVIDER_KEY}")
        # The deployment with its own api_base and key: the table's key, never the provider's.
        self.assertEqual((third.json["model"], third.header("authorization")), ("fake", f"Bearer {TABLE_KEY}"))
        self.assertEqual(
            intervention_rules(self.lines()),
            [("model_table", "gpt-4"), ("model_table", "gpt-3.5-turbo"), ("model_table", "fake-openai-endpoint")],
        )
        rows = yield self.rows()
        self.assertEqual([(r["provider"], r["effective_model"], r["requested_model"]) for r in rows], [
            ("openai", "gpt-4o", "gpt-4"),
            ("openai", "gpt-4o", "gpt-3.5-turbo"),
            ("openai@fake-openai-endpoint", "fake", "fake-openai-endpoint"),
        ])

    @defer.inlineCallbacks
    def test_master_key_inference_is_attributed_to_master(self):
        self.h.fake.enqueue(Reply(json=openai_completion("hello", "gpt-4o-mini", 12, 3)))
        client = openai.OpenAI(base_url=self.h.base_url + "/v1", api_key=MASTER_KEY, max_retries=0, timeout=20)
        self.addCleanup(client.close)
        completion = yield deferToThread(
            client.chat.completions.create, model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        self.assertEqual(completion.choices[0].message.content, "hello")
        self.assertEqual(self.h.fake.received[0].header("authorization"), f"Bearer {PROVIDER_KEY}")
        [row] = yield self.rows()
        self.assertEqual((row["agent"], row["input_tokens"], row["output_tokens"]), ("master", 12, 3))
        [response] = self.lines("response")
        self.assertEqual((response["claw_id"], response["status_code"]), ("master", 200))
        costs = yield self.h.ui_client.get("http://ui/costs/api", headers={"Authorization": [f"Bearer {UI_TOKEN}"]})
        doc = yield costs.json()
        self.assertEqual(doc["agents"]["master"]["total_requests"], 1)
        # A wrong master key is still a 401, and the model list takes the master key too.
        models = yield deferToThread(lambda: [m.id for m in client.models.list()])
        self.assertIn("gpt-4", models)
        self.assertIn("openai/gpt-4o-mini", models)
        wrong = openai.OpenAI(base_url=self.h.base_url + "/v1", api_key=MASTER_KEY + "x", max_retries=0)
        self.addCleanup(wrong.close)
        error = yield self.assertFailure(
            deferToThread(wrong.chat.completions.create, model="gpt-4o", messages=[{"role": "user", "content": "hi"}]),
            openai.AuthenticationError,
        )
        self.assertEqual(error.status_code, 401)
        self.assertEqual(len(self.h.fake.received), 1)


class AnthropicSdkTests(CompatCase):
    @defer.inlineCallbacks
    def test_claude_code_bare_names_and_beta_query(self):
        self.h.fake.enqueue(Reply(json=anthropic_message("Bonjour", "claude-sonnet-4-5-20250929", 10, 4)))
        client = anthropic.Anthropic(base_url=self.h.base_url, api_key=CREDENTIALS, max_retries=0, timeout=20)
        self.addCleanup(client.close)

        def call():
            # Claude Code's requests: /v1/messages?beta=true, a bare dated id.
            return client.beta.messages.create(
                model="claude-sonnet-4-5-20250929", max_tokens=16, messages=[{"role": "user", "content": "Salut"}],
                betas=["interleaved-thinking-2025-05-14"], extra_query={"beta": "true"},
            )

        message = yield deferToThread(call)
        self.assertEqual(message.content[0].text, "Bonjour")
        [received] = self.h.fake.received
        self.assertEqual((received.path, received.query), ("/v1/messages", "beta=true"))
        self.assertEqual(received.json["model"], "claude-sonnet-4-5-20250929")
        self.assertEqual(received.header("x-api-key"), PROVIDER_KEY)
        self.assertEqual(received.header("anthropic-beta"), "interleaved-thinking-2025-05-14")
        self.assertEqual(intervention_rules(self.lines()), [("bare_family", "claude-*")])
        count = yield deferToThread(
            client.messages.count_tokens, model="claude-haiku-4-5-20251001", messages=[{"role": "user", "content": "x"}]
        )
        self.assertGreater(count.input_tokens, 0)
        self.assertEqual(self.h.fake.received[1].path, "/v1/messages/count_tokens")

    @defer.inlineCallbacks
    def test_policy_with_dated_ids(self):
        from tests.support import write_agent

        write_agent(self.h.context_root, "coder", SECRET, model_policy={"allowed": [
            {"slot": "primary", "ref": "anthropic/claude-sonnet-4-5"},
            {"slot": "background", "ref": "anthropic/claude-haiku-4-5"},
        ]})
        client = anthropic.Anthropic(base_url=self.h.base_url, api_key=f"coder:{SECRET}", max_retries=0, timeout=20)
        self.addCleanup(client.close)
        yield deferToThread(
            client.messages.create, model="claude-haiku-4-5-20251001", max_tokens=8,
            messages=[{"role": "user", "content": "x"}],
        )
        self.assertEqual(self.h.fake.received[0].json["model"], "claude-haiku-4-5")  # not the primary
        self.assertEqual(intervention_rules(self.lines()), [("dated_model_normalized", None)])

    @defer.inlineCallbacks
    def test_unprefixed_messages_path(self):
        response = yield self.h.post(
            "/messages", {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]},
            headers={"anthropic-version": ["2023-06-01"]},
        )
        body = yield response.json()
        self.assertEqual((response.code, body["type"]), (200, "message"))
        self.assertEqual(self.h.fake.received[0].path, "/v1/messages")
        bad = yield self.h.post("/messages", {"model": "nothing/x", "max_tokens": 8, "messages": []})
        body = yield bad.json()
        self.assertEqual((bad.code, body["type"], body["error"]["type"]), (400, "error", "invalid_request_error"))
        self.assertIn("model 'nothing/x'", body["error"]["message"])


class VirtualKeyTests(CompatCase):
    @defer.inlineCallbacks
    def admin(self, path, doc):
        response = yield self.h.post(path, doc, token=MASTER_KEY)
        body = yield response.json()
        self.assertEqual(response.code, 200, body)
        return body

    @defer.inlineCallbacks
    def test_aliases_and_model_list(self):
        yield self.admin("/team/new", {"team_id": "acme", "model_aliases": {"smart": "gpt-4"}})
        minted = yield self.admin("/key/generate", {
            "team_id": "acme", "models": ["gpt-4", "fast", "smart"], "aliases": {"fast": "gpt-4o-mini"},
        })
        key = minted["key"]
        SCANNER.register(key)
        self.assertEqual(minted["aliases"], {"fast": "gpt-4o-mini"})
        client = openai.OpenAI(base_url=self.h.base_url, api_key=key, max_retries=0, timeout=20)
        self.addCleanup(client.close)
        listed = yield deferToThread(lambda: [m.id for m in client.models.list()])
        self.assertEqual(listed, ["fast", "smart", "gpt-4"])
        for name in ("fast", "smart"):
            yield deferToThread(client.chat.completions.create, model=name, messages=[{"role": "user", "content": "hi"}])
        self.assertEqual([r.json["model"] for r in self.h.fake.received], ["gpt-4o-mini", "gpt-4o"])
        self.assertEqual(intervention_rules(self.lines()),
                         [("key_alias", "fast"), ("bare_family", "gpt-*"), ("team_alias", "smart"), ("model_table", "gpt-4")])
        error = yield self.assertFailure(
            deferToThread(client.chat.completions.create, model="openai/o3", messages=[{"role": "user", "content": "x"}]),
            openai.PermissionDeniedError,
        )
        self.assertEqual((error.code, error.type), ("403", "key_model_access_denied"))
        self.assertEqual(len(self.h.fake.received), 2)
        models_lines = [line for line in self.lines() if line.get("path") == "/models"]
        self.assertEqual([(line["type"], line["status_code"]) for line in models_lines], [("response", 200)])


class PathTests(CompatCase):
    @defer.inlineCallbacks
    def test_unknown_path_is_audited(self):
        response = yield self.h.http.get(
            self.h.base_url + "/v1/responses/xyz", headers={"Authorization": [f"Bearer {CREDENTIALS}"]}
        )
        body = yield response.json()
        self.assertEqual((response.code, body["error"]["code"]), (404, "not_found"))
        [line] = [entry for entry in self.lines() if entry.get("path") == "/v1/responses/xyz"]
        self.assertEqual(
            {k: line[k] for k in ("type", "claw_id", "status_code", "path", "method")},
            {"type": "error", "claw_id": AGENT, "status_code": 404, "path": "/v1/responses/xyz", "method": "GET"},
        )
        self.assertEqual(line["error"], "no such endpoint: /v1/responses/xyz")
        response = yield self.h.http.get(self.h.base_url + "/v1/models", headers={"Authorization": [f"Bearer {CREDENTIALS}"]})
        doc = yield response.json()
        self.assertEqual(doc["data"][0]["id"], "gpt-4")  # the table's names first
        line = self.lines()[-1]
        self.assertEqual((line["type"], line["path"], line["claw_id"]), ("response", "/v1/models", AGENT))
        self.assertEqual(self.h.fake.received, [])

    @defer.inlineCallbacks
    def test_query_string_credentials_are_dropped(self):
        yield self.h.post(
            "/v1/messages?beta=true&key=agent-secret-in-query", {"model": "claude-haiku-4-5", "max_tokens": 8,
                                                                  "messages": [{"role": "user", "content": "x"}]},
        )
        self.assertEqual(self.h.fake.received[0].query, "beta=true")


class LiteLLMSdkTests(CompatCase):
    # LiteLLM keeps its clients (and their connections) for the process:
    # ask the proxy to close each one, so that no test leaves a channel open.
    CLOSE = {"Connection": "close"}

    def litellm(self):
        import litellm

        litellm.telemetry = False
        litellm.suppress_debug_info = True
        return litellm

    @defer.inlineCallbacks
    def test_openai_prefix_stripped_and_aliases(self):
        litellm = self.litellm()
        # LiteLLM strips its own openai/ and calls <api_base>/chat/completions (no /v1).
        for model in ("openai/gpt-4o", "openai/gpt-4", "openai/fake-openai-endpoint"):
            response = yield deferToThread(
                litellm.completion, model=model, api_base=self.h.base_url, api_key=CREDENTIALS,
                messages=[{"role": "user", "content": "hi"}], max_retries=0, timeout=20,
                extra_headers=self.CLOSE,
            )
            self.assertTrue(response.choices[0].message.content)
        self.assertEqual([(r.path, r.json["model"]) for r in self.h.fake.received], [
            ("/v1/chat/completions", "gpt-4o"), ("/v1/chat/completions", "gpt-4o"), ("/v1/chat/completions", "fake"),
        ])
        self.assertEqual(self.h.fake.received[2].header("authorization"), f"Bearer {TABLE_KEY}")
        rows = yield self.rows()
        self.assertEqual([r["requested_model"] for r in rows], ["gpt-4o", "gpt-4", "fake-openai-endpoint"])

    @defer.inlineCallbacks
    def test_streaming_with_litellm(self):
        litellm = self.litellm()

        def call():
            stream = litellm.completion(
                model="openai/gpt-4o-mini", api_base=self.h.base_url + "/v1", api_key=CREDENTIALS, stream=True,
                messages=[{"role": "user", "content": "hi"}], max_retries=0, timeout=20,
                extra_headers=self.CLOSE,
            )
            return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

        text = yield deferToThread(call)
        self.assertTrue(text)
        self.assertTrue(self.h.fake.received[0].json["stream"])
        [row] = yield self.rows()
        self.assertEqual((row["provider"], row["effective_model"], row["status"]), ("openai", "gpt-4o-mini", 200))

    @defer.inlineCallbacks
    def test_anthropic_through_litellm(self):
        litellm = self.litellm()
        response = yield deferToThread(
            litellm.completion, model="anthropic/claude-haiku-4-5-20251001", api_base=self.h.base_url,
            api_key=CREDENTIALS, messages=[{"role": "user", "content": "hi"}], max_tokens=8, max_retries=0, timeout=20,
            extra_headers=self.CLOSE,
        )
        self.assertTrue(response.choices[0].message.content)
        [received] = self.h.fake.received
        self.assertEqual((received.path, received.json["model"]), ("/v1/messages", "claude-haiku-4-5-20251001"))
        self.assertEqual(received.header("x-api-key"), PROVIDER_KEY)


class ModelTablePageTests(CompatCase):
    @defer.inlineCallbacks
    def test_the_ui_shows_the_table_never_a_key(self):
        headers = {"Authorization": [f"Bearer {UI_TOKEN}"]}
        response = yield self.h.ui_client.get("http://ui/models", headers={**headers, "Accept": ["application/json"]})
        doc = yield response.json()
        self.assertEqual(doc["file"], self.table_path)
        routes = {e["model_name"]: (e["route"], e["key"], e["api_base"]) for e in doc["entries"]}
        self.assertEqual(routes, {
            "gpt-4": ("openai/gpt-4o", "the provider's keys", None),
            "fake-openai-endpoint": ("openai@fake-openai-endpoint/fake", "env:FAKE_ENDPOINT_KEY", self.h.fake.base_url),
        })
        self.assertEqual(doc["aliases"], {"gpt-3.5-turbo": "gpt-4"})
        self.assertIn({"pattern": "claude-*", "provider": "anthropic"}, doc["families"])
        page = yield self.h.ui_client.get("http://ui/models", headers={**headers, "Accept": ["text/html"]})
        html = (yield page.content()).decode()
        self.assertIn("fake-openai-endpoint", html)
        self.assertIn("env:FAKE_ENDPOINT_KEY", html)
        self.assertNotIn(TABLE_KEY, html + json.dumps(doc))


class DaemonTests(TestCase):
    """The real `twistd -n cllama`: the table from CLLAMA_MODEL_TABLE, reloaded on SIGHUP."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self):
        import treq
        from twisted.internet import reactor
        from twisted.web.client import Agent, HTTPConnectionPool

        from cllama_tx.testing import FakeProvider
        from tests.support import write_agent

        self.fake = FakeProvider(reactor)
        yield self.fake.start()
        self.addCleanup(self.fake.stop)
        base = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(base, "auth"))
        write_agent(os.path.join(base, "context"), AGENT, SECRET)
        self.table = os.path.join(base, "models.yaml")
        with open(self.table, "w") as f:
            f.write("model_list:\n  - model_name: gpt-4\n    litellm_params: {model: openai/gpt-4o}\n")
        self.env = {
            "LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "UI_ADDR": "127.0.0.1:0",
            "CLAW_CONTEXT_ROOT": os.path.join(base, "context"),
            "CLAW_AUTH_DIR": os.path.join(base, "auth"),
            "CLLAMA_STATE_DIR": os.path.join(base, "state"),
            "CLLAMA_MODEL_TABLE": self.table,
            "CLLAMA_MASTER_KEY": MASTER_KEY,
            "OPENAI_API_KEY": PROVIDER_KEY,
            "OPENAI_BASE_URL": self.fake.base_url,
        }
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    def chat(self, ports, model, token=CREDENTIALS, path="/v1/chat/completions"):
        return self.http.post(
            f"http://127.0.0.1:{ports['API']}{path}",
            json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {token}"},
        )

    @defer.inlineCallbacks
    def test_table_master_key_unprefixed_path_and_sighup(self):
        from tests.runtime.test_daemon import spawn_daemon

        process, transport = spawn_daemon(self, self.env)
        ports = yield process.ready
        response = yield self.chat(ports, "gpt-4", path="/chat/completions")
        self.assertEqual(response.code, 200, (yield response.text()))
        response = yield self.chat(ports, "smart")
        self.assertEqual(response.code, 400)
        with open(self.table, "w") as f:
            f.write("model_list:\n  - model_name: smart\n    litellm_params: {model: openai/o3}\n")
        transport.signalProcess("HUP")
        yield process.wait_for_audit(lambda lines: any(line.get("action") == "reload" for line in lines))
        [reload] = [line for line in process.audit_lines() if line.get("action") == "reload"]
        self.assertIn("model_table", reload["reloaded"])
        response = yield self.chat(ports, "smart", token=MASTER_KEY)
        self.assertEqual(response.code, 200, (yield response.text()))
        missing = yield self.http.get(f"http://127.0.0.1:{ports['API']}/v2/nothing")
        self.assertEqual(missing.code, 404)
        yield missing.content()
        yield process.wait_for_audit(lambda lines: any(line.get("path") == "/v2/nothing" for line in lines))
        self.assertEqual([r.json["model"] for r in self.fake.received], ["gpt-4o", "o3"])
        responses = [(line["claw_id"], line["model"]) for line in process.audit_lines() if line["type"] == "response"]
        self.assertEqual(responses, [(AGENT, "gpt-4"), ("master", "smart")])
        [notfound] = [line for line in process.audit_lines() if line.get("path") == "/v2/nothing"]
        self.assertEqual((notfound["type"], notfound["status_code"], notfound["claw_id"]), ("error", 404, None))
