"""
Model routing end to end, over loopback sockets: a real proxy (the objects
the daemon builds) in front of a fake OpenAI provider, a fake resolver
model on a provider of its own that answers deterministically (it reads
the question as a model would: the requested name, the candidates), the
mappings API and the debug page on the UI site.

What is proven: a name no rule knows is resolved by the resolver, served
by the model it chose and audited as an C{llm_mapping}; an answer outside
the candidates is refused and audited; concurrent requests share one
resolver call; answers of nothing are remembered; C{?prompt=} reaches the
resolver (and never the provider); C{?force} re-resolves (only the
resolver's mappings, at most once per interval); the resolver's call is
billed to C{cllama-resolver}; the mappings API with and without the
token; the debug page (JSON and HTML, LLM mappings marked until
confirmed); policies and key model lists still apply after resolution.
"""

from __future__ import annotations

import json
import os
from urllib.parse import quote

from twisted.application.service import MultiService
from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase
from twisted.web._newclient import ResponseNeverReceived

from cllama_tx.pipeline.model_resolver import RESOLVER_PRINCIPAL
from cllama_tx.runtime.routing import build_routing
from cllama_tx.testing import FakeProvider, Reply, openai_completion
from tests.secret_scan import SCANNER
from tests.sites.ui.support import UiClient
from tests.support import (
    AGENT,
    MASTER_KEY,
    PROVIDER_KEY,
    SECRET,
    UI_TOKEN,
    ProxyHarness,
    chat_body,
    write_agent,
)

RESOLVER_KEY = "sk-resolver-lab-key-000042"
SCANNER.register(RESOLVER_KEY)

PRICES = {"resolverlab": {"judge-1": {"input": 1.0, "output": 4.0}}}


class FakeResolverModel:
    """
    A resolver model that answers deterministically: it reads the
    requested name and the listed models from the question and names the
    model its table gives (or null), as JSON; it keeps every question.
    """

    def __init__(self, answers: dict) -> None:
        self.answers = answers
        self.questions: list[dict] = []
        self.hold: defer.Deferred | None = None

    def __call__(self, received) -> Reply:
        doc = received.json
        text = doc["messages"][-1]["content"]
        name = json.loads(text.splitlines()[0].split(": ", 1)[1])
        listed = [line[2:] for line in text.splitlines() if line.startswith("- ")]
        self.questions.append({"name": name, "listed": listed, "text": text, "doc": doc,
                               "authorization": received.header("authorization")})
        answer = self.answers.get(name)
        content = answer if isinstance(answer, str) and answer.startswith("<raw>") else json.dumps({"model": answer})
        content = content.removeprefix("<raw>")
        return Reply(json=openai_completion(content, doc["model"], 150, 12), hold_until=self.hold)


class DiscoveryStub:
    """What the daemon's discovery object offers the debug page and the resolver: snapshot()."""

    def __init__(self, servers: list[dict]) -> None:
        self.servers = servers

    def snapshot(self) -> list[dict]:
        return [dict(s) for s in self.servers]


class RoutingCase(TestCase):
    answers: dict = {
        "house-fast": "openai/gpt-4o-mini",
        "house-big": "openai/gpt-4o",
        "house-rogue": "openai/gpt-9-ultra",
        "house-prose": "<raw>I think you mean gpt-4o-mini, probably.",
        "house-nothing": None,
        "house-local": "local-ollama-11434/llama3:8b",
    }
    resolver_env: dict = {}
    model_table: str | None = None

    @defer.inlineCallbacks
    def setUp(self):
        self.model = FakeResolverModel(dict(self.answers))
        self.resolver_fake = FakeProvider(reactor, self.model)
        yield self.resolver_fake.start()
        self.addCleanup(self.resolver_fake.stop)
        # A local model server, as discovery registers one: a keyless provider.
        self.local = FakeProvider(reactor)
        yield self.local.start()
        self.addCleanup(self.local.stop)
        prices = os.path.abspath(self.mktemp())
        with open(prices, "w") as f:
            json.dump(PRICES, f)
        providers_json = {"providers": {
            "resolverlab": {"base_url": self.resolver_fake.base_url, "api_key": RESOLVER_KEY, "auth": "bearer",
                            "api_format": "openai"},
            "local-ollama-11434": {"base_url": self.local.base_url, "auth": "none", "api_format": "openai"},
        }}
        self.h = yield ProxyHarness(self, providers_json=providers_json, pricing_file=prices,
                                    model_table=self.table_file()).start()
        self.discovery = DiscoveryStub([{
            "name": "local-ollama-11434", "kind": "ollama", "base_url": self.local.base_url, "found_by": "listed",
            "models": ["llama3:8b", "qwen2.5:7b"], "last_seen": reactor.seconds(), "state": "up",
        }])
        self.services = MultiService()
        env = {"CLLAMA_RESOLVER_MODEL": "resolverlab/judge-1", **self.resolver_env}
        self.routing = build_routing(
            env=env, clock=reactor, database=self.h.keys.database, ledger=self.h.ledger, instance="test",
            router=self.h.router, providers=self.h.providers, upstream=self.h.upstream, metering=self.h.metering,
            parent=self.services, discovery=self.discovery,
        )
        self.services.startService()
        self.addCleanup(self.services.stopService)
        yield self.routing.mappings.when_loaded()
        self.h.ui.routing = self.routing

    def table_file(self) -> str | None:
        if self.model_table is None:
            return None
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(self.model_table)
        return path

    def chat(self, model, path="/v1/chat/completions", token=f"{AGENT}:{SECRET}", headers=None, **extra):
        return self.h.post(path, chat_body(model=model, **extra), token=token, headers=headers)

    @defer.inlineCallbacks
    def chat_json(self, model, **kwargs):
        response = yield self.chat(model, **kwargs)
        body = yield response.json()
        return response, body

    def interventions(self, name):
        return [line for line in self.h.audit_lines() if line["type"] == "intervention" and line["intervention"] == name]

    @defer.inlineCallbacks
    def ui(self, method, path, doc=None, token=UI_TOKEN, accept="application/json", raw=None):
        headers = {"Accept": [accept]}
        if token is not None:
            headers["Authorization"] = [f"Bearer {token}"]
        kwargs = {"headers": headers}
        if doc is not None or raw is not None:
            headers["Content-Type"] = ["application/json"]
            kwargs["data"] = raw if raw is not None else json.dumps(doc).encode()
        response = yield getattr(self.h.ui_client, method)("http://ui" + path, allow_redirects=False, **kwargs)
        text = yield response.text()
        return response, text


class ResolutionTests(RoutingCase):
    @defer.inlineCallbacks
    def test_unknown_name_is_resolved_served_billed_and_audited(self):
        response, body = yield self.chat_json("house-fast")
        self.assertEqual(response.code, 200, body)
        self.assertEqual(body["object"], "chat.completion")
        upstream = self.h.fake.received[-1]
        self.assertEqual(upstream.json["model"], "gpt-4o-mini")
        [question] = self.model.questions
        self.assertEqual(question["name"], "house-fast")
        # The candidates: the discovered server's models and the priced catalog.
        self.assertIn("openai/gpt-4o-mini", question["listed"])
        self.assertIn("local-ollama-11434/llama3:8b", question["listed"])
        self.assertIn("Request surface: openai-chat-completions", question["text"])
        self.assertEqual(question["doc"]["temperature"], 0)
        self.assertEqual(question["authorization"], f"Bearer {RESOLVER_KEY}")
        [line] = self.interventions("llm_mapping")
        self.assertEqual(line["requested_model"], "house-fast")
        self.assertEqual((line["mapping"], line["target"], line["source"]), ("house-fast", "openai/gpt-4o-mini", "llm"))
        self.assertEqual((line["confirmed"], line["fresh"], line["resolver_model"]), (False, True, "resolverlab/judge-1"))
        # The resolver's call: a row, a request and a response line of its own, billed to the operator.
        yield self.h.committed()
        rows = yield self.h.ledger_rows()
        [own] = [r for r in rows if r["agent"] == RESOLVER_PRINCIPAL]
        self.assertEqual((own["provider"], own["effective_model"], own["status"]), ("resolverlab", "judge-1", 200))
        self.assertEqual((own["input_tokens"], own["output_tokens"]), (150, 12))
        self.assertAlmostEqual(own["cost_usd"], (150 * 1.0 + 12 * 4.0) / 1e6, places=12)
        self.assertEqual(line["resolver_request_id"], own["request_id"])
        [agent_row] = [r for r in rows if r["agent"] == AGENT]
        self.assertEqual((agent_row["requested_model"], agent_row["provider"], agent_row["effective_model"]),
                         ("house-fast", "openai", "gpt-4o-mini"))
        answered = [entry for entry in self.h.audit_lines()
                    if entry["type"] == "response" and entry["claw_id"] == RESOLVER_PRINCIPAL]
        self.assertEqual(answered[0]["request_id"], own["request_id"])
        # The mapping is kept: the next request is not asked about again.
        again, _ = yield self.chat_json("house-fast")
        self.assertEqual(again.code, 200)
        self.assertEqual(len(self.model.questions), 1)
        second = self.interventions("llm_mapping")[1]
        self.assertNotIn("fresh", second)
        self.assertEqual(second["target"], "openai/gpt-4o-mini")
        stored = self.routing.mappings.get("house-fast")
        self.assertEqual((stored.source, stored.confirmed, stored.created_by), ("llm", False, AGENT))

    @defer.inlineCallbacks
    def test_answer_outside_the_candidates_is_refused_and_audited(self):
        for name, why in (("house-rogue", "not one of the available models"), ("house-prose", "not a JSON object")):
            response, body = yield self.chat_json(name)
            self.assertEqual(response.code, 400)
            self.assertEqual(body["error"]["code"], "invalid_model")
            self.assertIn(f"model '{name}' names no provider", body["error"]["message"])
            self.assertIn("the model resolver's answer was refused", body["error"]["message"])
            [line] = [entry for entry in self.interventions("llm_resolver") if entry["mapping"] == name]
            self.assertEqual(line["outcome"], "refused")
            self.assertIn(why, line["reason"])
            self.assertIn("gpt-9-ultra" if name == "house-rogue" else "I think you mean", line["answer"])
            self.assertIsNone(self.routing.mappings.get(name))
        self.assertEqual(len(self.model.questions), 2)
        # Remembered: asking again costs nothing, and is refused the same way.
        response, body = yield self.chat_json("house-rogue")
        self.assertEqual(response.code, 400)
        self.assertIn("found nothing for this name a short while ago", body["error"]["message"])
        self.assertEqual(len(self.model.questions), 2)
        self.assertEqual(self.interventions("llm_resolver")[-1]["outcome"], "remembered")
        errors = [entry for entry in self.h.audit_lines() if entry["type"] == "error" and entry["model"] == "house-rogue"]
        self.assertEqual([entry["status_code"] for entry in errors], [400, 400])

    @defer.inlineCallbacks
    def test_concurrent_requests_share_one_call_and_nothing_is_remembered(self):
        hold = self.model.hold = defer.Deferred()
        self.addCleanup(lambda: hold.called or hold.callback(None))
        waiting = [self.chat_json("house-fast") for _ in range(3)] + [self.chat_json("house-nothing") for _ in range(3)]
        yield self.resolver_fake.wait_for_request(2)
        # Both calls are in flight (held by the resolver model), the six requests wait on them.
        self.assertEqual(sorted(self.routing.resolver.state()["in_flight"]), ["house-fast", "house-nothing"])
        hold.callback(None)
        results = yield defer.gatherResults(waiting)
        self.assertEqual(sorted(q["name"] for q in self.model.questions), ["house-fast", "house-nothing"])
        self.assertEqual([r.code for r, _ in results], [200, 200, 200, 400, 400, 400])
        self.assertEqual([b["error"]["code"] for _, b in results[3:]], ["invalid_model"] * 3)
        self.assertTrue(all("found no available model" in b["error"]["message"] for _, b in results[3:]))
        self.assertEqual(len(self.model.questions), 2)
        fresh = [line for line in self.interventions("llm_mapping") if line.get("fresh")]
        self.assertEqual(len(fresh), 3)
        # Nothing, remembered: a flood of the same junk name costs nothing more.
        flood = yield defer.gatherResults([self.chat_json("house-nothing") for _ in range(5)])
        self.assertEqual({r.code for r, _ in flood}, {400})
        self.assertEqual(len(self.model.questions), 2)

    @defer.inlineCallbacks
    def test_an_agent_that_leaves_while_the_resolver_thinks_costs_nothing_more(self):
        hold = self.model.hold = defer.Deferred()
        self.addCleanup(lambda: hold.called or hold.callback(None))
        asking = self.chat("house-fast")
        yield self.resolver_fake.wait_for_request(1)
        asking.cancel()  # the agent hangs up
        yield self.assertFailure(asking, ResponseNeverReceived)
        recorded = defer.Deferred()
        self.h.metering.on_recorded.append(
            lambda ex, committed: ex.claw_id == AGENT and not recorded.called and recorded.callback((committed,)))
        hold.callback(None)
        (committed,) = yield recorded
        yield committed
        [line] = [entry for entry in self.h.audit_lines() if entry["type"] == "error" and entry["claw_id"] == AGENT]
        self.assertEqual(line["status_code"], 499)
        self.assertEqual(self.h.fake.received, [])  # the mapped model was never called
        # The resolver's answer is kept all the same, for the next request.
        self.assertEqual(self.routing.mappings.get("house-fast").target, "openai/gpt-4o-mini")
        yield self.h.committed()
        rows = yield self.h.ledger_rows()
        self.assertEqual(sorted((r["agent"], r["status"]) for r in rows), [(RESOLVER_PRINCIPAL, 200), (AGENT, 499)])

    @defer.inlineCallbacks
    def test_prompt_reaches_the_resolver_and_never_the_provider(self):
        response, _ = yield self.chat_json("house-fast", path="/v1/chat/completions?prompt=fast%20and%20cheap&trace=1")
        self.assertEqual(response.code, 200)
        self.assertIn('Caller\'s note: "fast and cheap"', self.model.questions[0]["text"])
        self.assertEqual(self.h.fake.received[-1].query, "trace=1")
        self.assertEqual(self.routing.mappings.get("house-fast").detail["prompt"], "fast and cheap")

    @defer.inlineCallbacks
    def test_force_re_resolves_the_resolvers_mapping_once_per_interval(self):
        yield self.chat_json("house-fast")
        self.model.answers["house-fast"] = "openai/gpt-4o"
        response, _ = yield self.chat_json("house-fast", path="/v1/chat/completions?force&prompt=the%20big%20one")
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.model.questions), 2)
        self.assertIn("the big one", self.model.questions[1]["text"])
        self.assertEqual(self.h.fake.received[-1].json["model"], "gpt-4o")
        self.assertEqual(self.h.fake.received[-1].query, "")
        self.assertEqual(self.routing.mappings.get("house-fast").target, "openai/gpt-4o")
        fresh = self.interventions("llm_mapping")[-1]
        self.assertEqual((fresh["target"], fresh["fresh"]), ("openai/gpt-4o", True))
        # Within the interval (60 s by default) a force is ignored, and says so.
        response, _ = yield self.chat_json("house-fast", headers={"X-Cllama-Resolve": ["force"]})
        self.assertEqual(response.code, 200)
        self.assertEqual(len(self.model.questions), 2)
        ignored = self.interventions("llm_mapping")[-1]
        self.assertIn("re-resolved", ignored["force_ignored"])
        # The header forces too, for another name.
        yield self.chat_json("house-big")
        self.model.answers["house-big"] = "openai/gpt-4o-mini"
        response, _ = yield self.chat_json("house-big", headers={"X-Cllama-Resolve": ["force"]})
        self.assertEqual(response.code, 200)
        self.assertEqual(self.routing.mappings.get("house-big").target, "openai/gpt-4o-mini")
        self.assertEqual(len(self.model.questions), 4)

    @defer.inlineCallbacks
    def test_force_re_asks_about_a_name_found_nothing_for(self):
        response, _ = yield self.chat_json("house-nothing")
        self.assertEqual(response.code, 400)
        self.model.answers["house-nothing"] = "openai/gpt-4o-mini"
        response, _ = yield self.chat_json("house-nothing")
        self.assertEqual((response.code, len(self.model.questions)), (400, 1))  # remembered
        response, _ = yield self.chat_json("house-nothing", path="/v1/chat/completions?force")
        self.assertEqual((response.code, len(self.model.questions)), (200, 2))
        self.assertEqual(self.routing.mappings.get("house-nothing").target, "openai/gpt-4o-mini")

    @defer.inlineCallbacks
    def test_a_forced_re_resolution_that_finds_nothing_keeps_the_mapping(self):
        yield self.chat_json("house-fast")
        self.model.answers["house-fast"] = None
        response, _ = yield self.chat_json("house-fast", path="/v1/chat/completions?force=1")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.fake.received[-1].json["model"], "gpt-4o-mini")
        self.assertEqual(len(self.model.questions), 2)
        self.assertEqual(self.interventions("llm_mapping")[-1]["force_outcome"], "none")

    @defer.inlineCallbacks
    def test_an_operator_mapping_is_never_forced(self):
        response, _ = yield self.ui("put", "/_api/mappings/house-fast", {"target": "openai/gpt-4o"})
        self.assertEqual(response.code, 201)
        response, _ = yield self.chat_json("house-fast", path="/v1/chat/completions?force")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.model.questions, [])
        self.assertEqual(self.h.fake.received[-1].json["model"], "gpt-4o")
        [line] = self.interventions("mapping")
        self.assertEqual((line["mapping"], line["target"], line["source"]), ("house-fast", "openai/gpt-4o", "operator"))

    @defer.inlineCallbacks
    def test_discovered_models_are_candidates(self):
        response, _ = yield self.chat_json("house-local")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.local.received[-1].json["model"], "llama3:8b")
        self.assertEqual(self.local.received[-1].header("authorization"), None)
        # A server discovery lost offers nothing any more.
        self.discovery.servers[0]["state"] = "gone"
        self.assertNotIn("local-ollama-11434/llama3:8b", self.h.router.candidates())

    @defer.inlineCallbacks
    def test_policies_still_apply_after_resolution(self):
        # A virtual key allowed one model: a mapping elsewhere is refused.
        response = yield self.h.http.post(
            self.h.base_url + "/key/generate", json={"models": ["openai/gpt-4o"]},
            headers={"Authorization": [f"Bearer {MASTER_KEY}"]},
        )
        key = (yield response.json())["key"]
        SCANNER.register(key)
        response, body = yield self.chat_json("house-fast", token=key)
        self.assertEqual(response.code, 403, body)
        self.assertEqual((body["error"]["type"], body["error"]["param"]), ("key_model_access_denied", "model"))
        self.assertEqual(self.h.fake.received, [])
        # An agent with a model policy: an operator's mapping to a model it
        # may not use is clamped to its default.
        write_agent(self.h.context_root, "clamped", SECRET, model_policy={
            "mode": "clamp", "allowed": [{"slot": "primary", "ref": "openai/gpt-4o-mini"}]})
        yield self.ui("put", "/_api/mappings/house-big", {"target": "openai/gpt-4o"})
        response, _ = yield self.chat_json("house-big", token=f"clamped:{SECRET}")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.fake.received[-1].json["model"], "gpt-4o-mini")
        rules = [line["intervention"] for line in self.h.audit_lines()
                 if line["type"] == "intervention" and line["claw_id"] == "clamped"]
        self.assertEqual(rules, ["mapping", "disallowed_clamped"])


class ResolverLimitTests(RoutingCase):
    resolver_env = {"CLLAMA_RESOLVER_CALLS_PER_MINUTE": "2"}

    @defer.inlineCallbacks
    def test_calls_per_minute_bound_what_junk_names_cost(self):
        codes = []
        for index in range(5):
            response, body = yield self.chat_json(f"junk-{index}")
            codes.append((response.code, body["error"]["code"]))
        self.assertEqual(codes, [(400, "invalid_model")] * 5)
        self.assertEqual(len(self.model.questions), 2)
        outcomes = [line["outcome"] for line in self.interventions("llm_resolver")]
        self.assertEqual(outcomes, ["none", "none", "rate_limited", "rate_limited", "rate_limited"])
        self.assertIn("its calls for this minute are spent", body["error"]["message"])


TABLE = """
model_list:
  - model_name: team-default
    litellm_params:
      model: openai/gpt-4o
router_settings:
  model_group_alias:
    house-default: team-default
"""


class MappingsApiTests(RoutingCase):
    model_table = TABLE

    @defer.inlineCallbacks
    def test_without_the_token(self):
        for token in (None, "not-the-token"):
            for method, path, doc in (("get", "/_api/mappings/", None), ("get", "/_api/mappings/x", None),
                                      ("put", "/_api/mappings/x", {"target": "openai/gpt-4o"}),
                                      ("delete", "/_api/mappings/x", None), ("get", "/_debug", None)):
                response, text = yield self.ui(method, path, doc, token=token)
                self.assertEqual(response.code, 401, (method, path, text))
                self.assertEqual(json.loads(text)["error"]["code"], "operator_token_required")
        self.assertEqual(self.routing.mappings.all(), [])
        # A browser without a session is sent to sign in.
        response, _ = yield self.ui("get", "/_debug", token=None, accept="text/html")
        self.assertEqual(response.code, 303)
        self.assertEqual(response.headers.getRawHeaders("location"), ["/signin?next=%2F_debug"])

    @defer.inlineCallbacks
    def test_set_read_use_confirm_and_delete(self):
        response, text = yield self.ui("put", "/_api/mappings/my-llama", {"target": "local-ollama-11434/llama3:8b"})
        self.assertEqual(response.code, 201, text)
        mapping = json.loads(text)
        self.assertEqual((mapping["name"], mapping["target"], mapping["source"], mapping["confirmed"]),
                         ("my-llama", "local-ollama-11434/llama3:8b", "operator", True))
        self.assertEqual(mapping["created_at"], mapping["confirmed_at"])
        self.assertTrue(mapping["created_by"].startswith("operator-token@"))
        # Used at once, by rule 2b, audited.
        response, _ = yield self.chat_json("my-llama")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.local.received[-1].json["model"], "llama3:8b")
        self.assertEqual(self.model.questions, [])
        # A table name's alias target goes on at rule 2.
        yield self.ui("put", "/_api/mappings/my-default", {"target": "team-default"})
        response, _ = yield self.chat_json("my-default")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.fake.received[-1].json["model"], "gpt-4o")
        # The list: stored mappings and the model table's names (alias, read-only).
        yield self.chat_json("house-fast")
        response, text = yield self.ui("get", "/_api/mappings/")
        listed = {m["name"]: m for m in json.loads(text)["mappings"]}
        self.assertEqual(sorted(listed), ["house-default", "house-fast", "my-default", "my-llama", "team-default"])
        self.assertEqual((listed["house-default"]["source"], listed["house-default"]["target"],
                          listed["house-default"]["read_only"]), ("alias", "team-default", True))
        self.assertEqual((listed["team-default"]["source"], listed["team-default"]["target"]),
                         ("alias", "openai/gpt-4o"))
        llm = listed["house-fast"]
        self.assertEqual((llm["source"], llm["confirmed"], llm["confirmed_at"], llm["resolver_model"]),
                         ("llm", False, None, "resolverlab/judge-1"))
        response, text = yield self.ui("get", "/_api/mappings/house-default")
        self.assertEqual((response.code, json.loads(text)["source"]), (200, "alias"))
        # Confirm the resolver's mapping: with PUT, or the page's POST.
        response, text = yield self.ui("put", "/_api/mappings/house-fast", {"confirmed": True})
        self.assertEqual(response.code, 200, text)
        confirmed = json.loads(text)
        self.assertEqual((confirmed["source"], confirmed["confirmed"], confirmed["target"]),
                         ("llm", True, "openai/gpt-4o-mini"))
        self.assertIsNotNone(confirmed["confirmed_at"])
        response, _ = yield self.chat_json("house-fast")
        self.assertTrue(self.interventions("llm_mapping")[-1]["confirmed"])
        # Delete: gone, and a second time 404.
        response, text = yield self.ui("delete", "/_api/mappings/my-llama")
        self.assertEqual((response.code, json.loads(text)), (200, {"name": "my-llama", "deleted": True}))
        response, text = yield self.ui("delete", "/_api/mappings/my-llama")
        self.assertEqual((response.code, json.loads(text)["error"]["code"]), (404, "mapping_not_found"))
        response, body = yield self.chat_json("my-llama")
        self.assertEqual(response.code, 400)  # asked about again: the resolver has no answer for it
        actions = [(line["action"], line["name"]) for line in self.h.audit_lines() if line["type"] == "operator"]
        self.assertEqual(actions, [("mapping_set", "my-llama"), ("mapping_set", "my-default"),
                                   ("mapping_confirm", "house-fast"), ("mapping_delete", "my-llama")])

    @defer.inlineCallbacks
    def test_bad_requests(self):
        cases = [
            ("get", "/_api/mappings/nobody", None, None, 404, "mapping_not_found"),
            ("put", "/_api/mappings/x", None, b"{not json", 400, "invalid_json"),
            ("put", "/_api/mappings/x", ["openai/gpt-4o"], None, 400, "invalid_body"),
            ("put", "/_api/mappings/x", {}, None, 400, "invalid_body"),
            ("put", "/_api/mappings/x", {"target": "openai/gpt-4o", "ttl": 5}, None, 400, "invalid_field"),
            ("put", "/_api/mappings/x", {"target": 7}, None, 400, "invalid_target"),
            ("put", "/_api/mappings/x", {"target": "x"}, None, 400, "invalid_target"),
            ("put", "/_api/mappings/x", {"target": "nosuch/model"}, None, 400, "unknown_target"),
            ("put", "/_api/mappings/x", {"target": "some-bare-name"}, None, 400, "unknown_target"),
            ("put", "/_api/mappings/x", {"target": "openai/gpt-4o", "confirmed": False}, None, 400, "invalid_field"),
            ("put", "/_api/mappings/x", {"confirmed": True}, None, 404, "mapping_not_found"),
            ("put", "/_api/mappings/team-default", {"target": "openai/gpt-4o"}, None, 409, "managed_by_model_table"),
            ("delete", "/_api/mappings/house-default", None, None, 409, "managed_by_model_table"),
            ("delete", "/_api/mappings/nobody", None, None, 404, "mapping_not_found"),
        ]
        for method, path, doc, raw, status, code in cases:
            response, text = yield self.ui(method, path, doc, raw=raw)
            self.assertEqual((response.code, json.loads(text)["error"]["code"]), (status, code), (path, doc, text))
        response, text = yield self.ui("put", "/_api/mappings/x", {"target": "nosuch/model"})
        self.assertIn("'nosuch' is not a provider configured here", json.loads(text)["error"]["message"])
        self.assertEqual(self.routing.mappings.all(), [])
        self.assertEqual([line for line in self.h.audit_lines() if line["type"] == "operator"], [])

    @defer.inlineCallbacks
    def test_names_with_slashes_and_spaces(self):
        name = "mistralai/mistral large"
        response, text = yield self.ui("put", "/_api/mappings/" + quote(name), {"target": "openai/gpt-4o"})
        self.assertEqual(response.code, 201, text)
        response, text = yield self.ui("get", "/_api/mappings/" + quote(name))
        self.assertEqual(json.loads(text)["name"], name)
        response, _ = yield self.chat_json(name)
        self.assertEqual(response.code, 200)
        self.assertEqual(self.h.fake.received[-1].json["model"], "gpt-4o")


class DebugPageTests(RoutingCase):
    @defer.inlineCallbacks
    def test_json_twin(self):
        response, _ = yield self.chat_json("house-fast")
        request_id = response.headers.getRawHeaders("x-cllama-request-id")[0]
        yield self.chat_json("openai/gpt-4o")
        yield self.chat_json("house-nothing")
        response, text = yield self.ui("get", "/_debug")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["application/json"])
        view = json.loads(text)
        [server] = view["discovered"]
        self.assertEqual((server["name"], server["models"]), ("local-ollama-11434", ["llama3:8b", "qwen2.5:7b"]))
        self.assertEqual(view["unconfirmed"], 1)
        [mapping] = view["mappings"]
        self.assertEqual((mapping["name"], mapping["source"], mapping["confirmed"]), ("house-fast", "llm", False))
        newest, exact, resolved = view["trace"][:3]
        self.assertEqual((newest["requested"], newest["decided_by"], newest["error"]),
                         ("house-nothing", "refused", "invalid_model"))
        self.assertEqual(newest["note"], "resolver: none")
        self.assertEqual((exact["decided_by"], exact["result"]), ("exact", "openai/gpt-4o"))
        self.assertEqual((resolved["request_id"], resolved["caller"], resolved["decided_by"], resolved["result"]),
                         (request_id, AGENT, "llm_mapping", "openai/gpt-4o-mini"))
        pools = {pool["provider"]: pool for pool in view["pools"]}
        self.assertEqual(pools["openai"]["keys"][0]["state"], "ready")
        self.assertEqual(set(pools["openai"]["keys"][0]), {"id", "state", "active", "cooldown_until", "last_error_code"})
        self.assertTrue(pools["local-ollama-11434"]["keyless"])
        resolver = view["resolver"]
        self.assertEqual((resolver["enabled"], resolver["model"], resolver["principal"], resolver["calls"]),
                         (True, "resolverlab/judge-1", RESOLVER_PRINCIPAL, 2))
        self.assertEqual([r["name"] for r in resolver["remembered"]], ["house-nothing"])
        for secret in (PROVIDER_KEY, RESOLVER_KEY, PROVIDER_KEY[-4:] + '"', "masked_secret"):
            self.assertNotIn(secret, text)

    @defer.inlineCallbacks
    def test_html_marks_the_resolvers_mappings_until_confirmed(self):
        yield self.chat_json("house-fast")
        yield self.ui("put", "/_api/mappings/my-llama", {"target": "local-ollama-11434/llama3:8b"})
        response, page = yield self.ui("get", "/_debug", accept="text/html")
        self.assertEqual(response.code, 200)
        self.assertIn("text/html", response.headers.getRawHeaders("content-type")[0])
        self.assertIn('<tr class="unconfirmed">', page)
        self.assertIn("1 unconfirmed", page)
        self.assertIn('action="/_api/mappings/house-fast/confirm"', page)
        self.assertIn("local-ollama-11434", page)
        self.assertIn("Routing debug", page)
        for secret in (PROVIDER_KEY, RESOLVER_KEY):
            self.assertNotIn(secret, page)
        yield self.ui("post", "/_api/mappings/house-fast/confirm", {})
        response, page = yield self.ui("get", "/_debug", accept="text/html")
        self.assertNotIn('<tr class="unconfirmed">', page)
        self.assertNotIn("unconfirmed</span>", page)

    @defer.inlineCallbacks
    def test_a_browser_confirms_with_its_session_and_csrf_token(self):
        yield self.chat_json("house-fast")
        browser = UiClient(self.h.http, f"http://127.0.0.1:{self.h.ui_port.getHost().port}")
        yield browser.sign_in(name="ada")
        # Without the form token: refused, nothing changed.
        response = yield browser.post("/_api/mappings/house-fast/confirm", {}, headers={"Accept": "text/html"})
        self.assertEqual(response.code, 403)
        self.assertFalse(self.routing.mappings.get("house-fast").confirmed)
        csrf = yield browser.csrf("/_debug")
        response = yield browser.post("/_api/mappings/house-fast/confirm", {"csrf": csrf}, headers={"Accept": "text/html"})
        self.assertEqual((response.code, response.headers.getRawHeaders("location")), (303, ["/_debug#debug-mappings"]))
        confirmed = self.routing.mappings.get("house-fast")
        self.assertTrue(confirmed.confirmed)
        self.assertTrue(confirmed.detail["confirmed_by"].startswith("operator:ada@"))
        page = yield browser.get("/_debug", headers={"Accept": "text/html"})
        html = yield page.text()
        self.assertIn("Mapping of house-fast confirmed.", html)
        response = yield browser.post("/_api/mappings/house-fast/delete", {"csrf": csrf}, headers={"Accept": "text/html"})
        self.assertEqual(response.code, 303)
        self.assertIsNone(self.routing.mappings.get("house-fast"))
        actions = [(line["action"], line["actor"].split("@")[0]) for line in self.h.audit_lines()
                   if line["type"] == "operator" and line["action"].startswith("mapping")]
        self.assertEqual(actions, [("mapping_confirm", "operator:ada"), ("mapping_delete", "operator:ada")])

    @defer.inlineCallbacks
    def test_names_are_escaped(self):
        name = "<script>alert(1)</script>"
        yield self.chat_json(name)
        response, page = yield self.ui("get", "/_debug", accept="text/html")
        self.assertNotIn(name, page)
        self.assertIn("&lt;script&gt;alert(1)&lt;/script&gt;", page)
