"""
Model mappings in the resolution order (an operator's at rule 2b, the LLM
resolver's at rule 8), and the resolver's pure parts: the hints a request
carries, the question, the judging of answers, the trace ring, the
mapping records.
"""

from __future__ import annotations

import json

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.governance import llm_resolution
from cllama_tx.governance.llm_resolution import (
    ResolveHints,
    answer_text,
    build_request,
    judge,
    read_hints,
)
from cllama_tx.governance.mapping_store import MappingStore
from cllama_tx.governance.mappings import LLM, OPERATOR, MappingError, ModelMapping, check_name
from cllama_tx.governance.policy import parse_policy
from cllama_tx.governance.resolution import (
    DEFAULT,
    LLM_MAPPING,
    MAPPING,
    MAPPINGS_WAIT,
    Router,
    TableEntry,
    Unresolved,
    resolve,
)
from cllama_tx.governance.resolution_trace import ResolutionTrace
from cllama_tx.surfaces.errors import ProxyError
from cllama_tx.surfaces.matrix import split_model_ref
from cllama_tx.surfaces.model_traits import ModelTraits
from tests.governance.test_resolution import Providers

R = split_model_ref
TABLE = {
    "team-default": TableEntry("team-default", (R("openai/gpt-4o"),)),
    "house-default": TableEntry("house-default", (R("openai/gpt-4o"),), alias_of="team-default"),
}


def mapping(name, target, source=OPERATOR, confirmed=True) -> ModelMapping:
    return ModelMapping(name, target, source, 1.0, 1.0, 1.0 if confirmed else None, "tests")


def rules(found) -> list[str]:
    return [step.rule for step in found.steps]


class OperatorMappingTests(SynchronousTestCase):
    """Rule 2b: after the model table, before the policy; its target goes on at rule 2."""

    def resolve(self, name, mappings, **kwargs):
        return resolve(name, table=TABLE, providers=Providers(), mappings=mappings, **kwargs)

    def test_target_is_a_ref(self):
        found = self.resolve("my-llama", {"my-llama": mapping("my-llama", "openai/gpt-4o-mini")})
        self.assertEqual(str(found.ref), "openai/gpt-4o-mini")
        self.assertEqual(rules(found), [MAPPING])
        self.assertEqual(found.steps[0].details, {"mapping": "my-llama", "target": "openai/gpt-4o-mini",
                                                  "source": OPERATOR})
        self.assertEqual(found.names, ("my-llama", "openai/gpt-4o-mini"))

    def test_target_goes_on_at_the_model_table(self):
        found = self.resolve("my-default", {"my-default": mapping("my-default", "house-default")})
        self.assertEqual(str(found.ref), "openai/gpt-4o")
        self.assertEqual(rules(found), [MAPPING, "model_table"])

    def test_the_table_decides_its_names_first(self):
        found = self.resolve("team-default", {"team-default": mapping("team-default", "anthropic/claude-x")})
        self.assertEqual(rules(found), ["model_table"])

    def test_it_comes_before_family_and_exact_rules(self):
        mappings = {"gpt-4": mapping("gpt-4", "anthropic/claude-haiku-4-5"),
                    "openai/gpt-4o": mapping("openai/gpt-4o", "anthropic/claude-sonnet-4-5")}
        self.assertEqual(str(self.resolve("gpt-4", mappings).ref), "anthropic/claude-haiku-4-5")
        self.assertEqual(str(self.resolve("openai/gpt-4o", mappings).ref), "anthropic/claude-sonnet-4-5")

    def test_a_key_alias_target_can_be_mapped(self):
        found = self.resolve("fast", {"house-fast": mapping("house-fast", "openai/gpt-4o-mini")},
                             key_aliases={"fast": "house-fast"})
        self.assertEqual(rules(found), ["key_alias", MAPPING])
        self.assertEqual(found.names, ("fast", "house-fast", "openai/gpt-4o-mini"))

    def test_the_policy_still_decides(self):
        policy = parse_policy({"mode": "clamp", "allowed": [{"slot": "primary", "ref": "openai/gpt-4o-mini"}]})
        found = self.resolve("big", {"big": mapping("big", "openai/gpt-4o")}, policy=policy)
        self.assertEqual(str(found.ref), "openai/gpt-4o-mini")
        self.assertEqual(rules(found), [MAPPING, "disallowed_clamped"])
        reject = parse_policy({"mode": "reject", "allowed": [{"slot": "primary", "ref": "openai/gpt-4o-mini"}]})
        with self.assertRaises(ProxyError) as caught:
            self.resolve("big", {"big": mapping("big", "openai/gpt-4o")}, policy=reject)
        self.assertEqual(caught.exception.status, 403)

    def test_a_target_that_leads_nowhere_is_said_plainly(self):
        with self.assertRaises(ProxyError) as caught:
            self.resolve("odd", {"odd": mapping("odd", "nosuch/model")})
        self.assertNotIsInstance(caught.exception, Unresolved)
        self.assertEqual(caught.exception.code, "unknown_provider")


class LlmMappingTests(SynchronousTestCase):
    """Rule 8: only where the order would refuse; its target resolved by rules 2 and 4-7."""

    def resolve(self, name, mappings=None, **kwargs):
        return resolve(name, table=TABLE, providers=Providers(), mappings=mappings, **kwargs)

    def test_unknown_names_are_unresolved_with_the_name_after_aliases(self):
        with self.assertRaises(Unresolved) as caught:
            self.resolve("fast", key_aliases={"fast": "house-fast"})
        refused = caught.exception
        self.assertEqual((refused.status, refused.code, refused.name), (400, "invalid_model", "house-fast"))
        self.assertEqual([s.rule for s in refused.steps], ["key_alias"])
        with self.assertRaises(Unresolved) as caught:
            self.resolve("mistralai/mistral-large")
        self.assertEqual((caught.exception.code, caught.exception.name), ("unknown_provider", "mistralai/mistral-large"))

    def test_a_resolver_mapping_resolves_them(self):
        mappings = {"house-fast": mapping("house-fast", "openai/gpt-4o-mini", LLM, confirmed=False),
                    "mistralai/mistral-large": mapping("mistralai/mistral-large", "house-default", LLM)}
        found = self.resolve("fast", mappings, key_aliases={"fast": "house-fast"})
        self.assertEqual(str(found.ref), "openai/gpt-4o-mini")
        self.assertEqual(rules(found), ["key_alias", LLM_MAPPING])
        self.assertEqual(found.steps[1].details, {"mapping": "house-fast", "target": "openai/gpt-4o-mini",
                                                  "source": LLM, "confirmed": False, "chosen": "openai/gpt-4o-mini"})
        self.assertEqual(found.names, ("fast", "house-fast", "openai/gpt-4o-mini"))
        found = self.resolve("mistralai/mistral-large", mappings)
        self.assertEqual((str(found.ref), rules(found)), ("openai/gpt-4o", [LLM_MAPPING, "model_table"]))
        self.assertTrue(found.steps[0].details["confirmed"])

    def test_it_never_overrides_a_rule_that_resolves(self):
        mappings = {"gpt-9": mapping("gpt-9", "anthropic/claude-x", LLM),
                    "team-default": mapping("team-default", "anthropic/claude-x", LLM)}
        self.assertEqual(rules(self.resolve("gpt-9", mappings)), ["bare_family"])
        self.assertEqual(rules(self.resolve("team-default", mappings)), ["model_table"])
        mine = resolve("my-model", bare_provider="anthropic", providers=Providers(),
                       mappings={"my-model": mapping("my-model", "openai/gpt-4o", LLM)})
        self.assertEqual(rules(mine), ["bare_surface"])

    def test_an_agent_with_a_policy_never_reaches_it(self):
        policy = parse_policy({"mode": "clamp", "allowed": [{"slot": "primary", "ref": "openai/gpt-4o-mini"}]})
        found = self.resolve("junk", {"junk": mapping("junk", "openai/gpt-4o", LLM)}, policy=policy)
        self.assertEqual((str(found.ref), rules(found)), ("openai/gpt-4o-mini", ["disallowed_clamped"]))

    def test_a_target_no_longer_served_is_explained(self):
        with self.assertRaises(ProxyError) as caught:
            self.resolve("junk", {"junk": mapping("junk", "gone-server/llama3", LLM)})
        self.assertNotIsInstance(caught.exception, Unresolved)
        self.assertIn("is mapped (by the model resolver) to 'gone-server/llama3'", caught.exception.message)


class Table:
    """The model table file's object: its parsed table in C{current}."""

    def __init__(self, entries):
        self.current = _Current(entries)
        self.loaded_at = 5.0


class _Current:
    def __init__(self, entries):
        self.entries = entries
        self.families = DEFAULT


class Discovery:
    def __init__(self, servers):
        self.servers = servers

    def snapshot(self):
        return self.servers


class Pricing:
    table = {"openai": {"gpt-4o": {}, "gpt-4o-mini": {}}, "anthropic": {"claude-x": {}}}


class Registry:
    def __init__(self, configured):
        self._configured = set(configured)

    def configured(self, name):
        return name in self._configured

    def known(self, name):
        return name in self._configured

    def names(self):
        return sorted(self._configured)

    def resolve(self, name):
        raise AssertionError("not asked")


class RouterTests(SynchronousTestCase):
    def router(self, configured=("openai", "local-ollama-11434")):
        router = Router(providers=Registry(configured), table=Table(dict(TABLE)), pricing=Pricing())
        return router

    def test_candidates(self):
        router = self.router()
        router.attach(discovery=Discovery([
            {"name": "local-ollama-11434", "state": "up", "models": ["llama3:8b", {"id": "qwen"}, 7]},
            {"name": "local-vllm-8000", "state": "up", "models": ["mistral"]},  # not registered
            {"name": "local-ollama-11500", "state": "gone", "models": ["old"]},
        ]))
        self.assertEqual(router.candidates(), [
            "team-default", "house-default", "local-ollama-11434/llama3:8b", "local-ollama-11434/qwen",
            "openai/gpt-4o", "openai/gpt-4o-mini",
        ])

    def test_target_problems(self):
        router = self.router()
        self.assertIsNone(router.target_problem("openai/gpt-4o"))
        self.assertIsNone(router.target_problem("house-default"))
        self.assertIn("neither a name of the model table", router.target_problem("gpt-4o"))
        self.assertIn("'anthropic' is not a provider configured here", router.target_problem("anthropic/claude-x"))
        self.assertIn("synthetic prefix", router.target_problem("cllama/x"))
        self.assertEqual(router.table_names(), {"team-default": ("openai/gpt-4o", "model_name"),
                                                "house-default": ("team-default", "model_group_alias")})

    def test_a_request_at_start_waits_for_the_stored_mappings(self):
        """A stored mapping is not missed because the store is still loading; a store that never loads is waited for a while only."""
        clock = Clock()
        loads: list[Deferred] = []

        class Database:
            def run(self, function, *args):
                loads.append(Deferred())
                return loads[-1]

        store = MappingStore(Database(), clock)
        store.startService()
        self.addCleanup(store.stopService)
        router = self.router()
        router.attach(mappings=store)
        waiting = router.resolve(None, "my-fast", None, None)
        self.assertIsInstance(waiting, Deferred)
        self.assertNoResult(waiting)
        loads[0].callback([ModelMapping("my-fast", "openai/gpt-4o-mini", OPERATOR, 1.0, 1.0, 1.0, "ops", {}).row()])
        self.assertEqual(str(self.successResultOf(waiting).ref), "openai/gpt-4o-mini")
        self.assertTrue(self.successResultOf(store.loaded_within(0)))
        # Loaded: no waiting at all.
        self.assertEqual(str(router.resolve(None, "my-fast", None, None).ref), "openai/gpt-4o-mini")

        # A database that stays away: after MAPPINGS_WAIT the other rules decide.
        stuck = MappingStore(Database(), clock)
        stuck.startService()
        self.addCleanup(stuck.stopService)
        router.attach(mappings=stuck)
        waiting = router.resolve(None, "openai/gpt-4o", None, None)
        clock.advance(MAPPINGS_WAIT - 0.1)
        self.assertNoResult(waiting)
        clock.advance(0.1)
        self.assertEqual(str(self.successResultOf(waiting).ref), "openai/gpt-4o")
        self.assertFalse(stuck.loaded)

    def test_the_trace_records_every_resolution(self):
        clock = Clock()
        router = self.router()
        trace = ResolutionTrace(clock, size=3)
        router.attach(trace=trace)

        class Ex:
            request_id = "r1"

        class Agent:
            agent_id = "tiverton"

        router.resolve(Agent(), "openai/gpt-4o", None, None, Ex())
        with self.assertRaises(ProxyError) as caught:
            router.resolve(Agent(), "junk", None, None, Ex())
        # Without a resolver, an unresolved name is the plain refusal.
        self.assertNotIsInstance(caught.exception, Unresolved)
        router.resolve(Agent(), "house-default", None, None, Ex())
        newest, refused, exact = trace.entries()
        self.assertEqual((exact["decided_by"], exact["result"], exact["caller"]), ("exact", "openai/gpt-4o", "tiverton"))
        self.assertEqual((refused["decided_by"], refused["error"], refused["result"]), ("refused", "invalid_model", None))
        self.assertEqual((newest["rules"], newest["decided_by"]), (["model_table"], "model_table"))
        for index in range(5):
            router.resolve(Agent(), f"openai/m{index}", None, None, Ex())
        self.assertEqual([e["requested"] for e in trace.entries()], ["openai/m4", "openai/m3", "openai/m2"])
        self.assertEqual(len(trace), 3)


class HintTests(SynchronousTestCase):
    def test_nothing_asked(self):
        self.assertIsNone(read_hints(b"/v1/chat/completions", None))
        self.assertIsNone(read_hints(b"/v1/messages?beta=true", None))
        self.assertIsNone(read_hints(b"/v1/chat/completions?force=0&prompt=", b"normal"))

    def test_force(self):
        for uri in (b"/x?force", b"/x?force=1", b"/x?a=b&force=true", b"/x?force=yes"):
            self.assertEqual(read_hints(uri, None), ResolveHints(force=True))
        self.assertEqual(read_hints(b"/x", b"Force"), ResolveHints(force=True))
        self.assertIsNone(read_hints(b"/x?force=off", None))

    def test_prompt(self):
        hints = read_hints(b"/x?prompt=the%20cheap%0Aone%01&force=0", None)
        self.assertEqual(hints, ResolveHints(force=False, prompt="the cheap one"))
        long = read_hints(b"/x?prompt=" + b"a" * 2000, None)
        self.assertEqual(len(long.prompt), llm_resolution.MAX_PROMPT)


class QuestionTests(SynchronousTestCase):
    def test_openai_question(self):
        doc = build_request("openai", "judge-1", "house-fast", "openai-chat-completions", ["a/b", "c"], "cheap",
                            ModelTraits())
        self.assertEqual(doc["model"], "judge-1")
        self.assertEqual((doc["max_tokens"], doc["temperature"]), (300, 0))
        system, user = doc["messages"]
        self.assertEqual(system["role"], "system")
        self.assertIn('{"model": null}', system["content"])
        self.assertEqual(user["content"].splitlines(), [
            'Requested model name: "house-fast"', "Request surface: openai-chat-completions",
            'Caller\'s note: "cheap"', "Available models:", "- a/b", "- c",
        ])

    def test_reasoning_models_get_room_and_no_temperature(self):
        traits = ModelTraits(known=True, reasoning_efforts=frozenset({"low", "high"}), fixed_sampling=True)
        doc = build_request("openai", "o4-mini", "x", "s", ["a/b"], None, traits)
        self.assertNotIn("temperature", doc)
        self.assertNotIn("max_tokens", doc)
        self.assertEqual((doc["max_completion_tokens"], doc["reasoning_effort"]), (4000, "low"))

    def test_anthropic_question(self):
        doc = build_request("anthropic", "claude-haiku-4-5", "x", "s", ["a/b"], None, ModelTraits())
        self.assertEqual(doc["system"], llm_resolution.SYSTEM_PROMPT)
        self.assertEqual((doc["max_tokens"], doc["messages"][0]["role"]), (300, "user"))

    def test_answer_text(self):
        chat = {"choices": [{"message": {"role": "assistant", "content": '{"model": "a/b"}'}}]}
        self.assertEqual(answer_text(chat, "openai"), '{"model": "a/b"}')
        parts = {"choices": [{"message": {"content": [{"type": "text", "text": '{"model":'}, {"text": " null}"}]}}]}
        self.assertEqual(answer_text(parts, "openai"), '{"model": null}')
        messages = {"content": [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": '{"model": "c"}'}]}
        self.assertEqual(answer_text(messages, "anthropic"), '{"model": "c"}')
        for bad in (None, [], {"choices": []}, {"choices": [{"message": {"content": None}}]}, {"content": "x"}):
            self.assertIsNone(answer_text(bad, "openai" if "choices" in (bad or {}) else "anthropic"))


class JudgeTests(SynchronousTestCase):
    CANDIDATES = ["openai/gpt-4o", "local/llama3:8b"]

    def test_a_candidate(self):
        for text in ('{"model": "openai/gpt-4o"}', '```json\n{"model": " openai/gpt-4o "}\n```',
                     'Sure: {"model": "openai/gpt-4o"} is it'):
            answer = judge(text, self.CANDIDATES)
            self.assertEqual((answer.verdict, answer.target), ("mapped", "openai/gpt-4o"), text)

    def test_nothing(self):
        self.assertEqual(judge('{"model": null}', self.CANDIDATES).verdict, "none")

    def test_refusals(self):
        for text, why in (
            ('{"model": "openai/gpt-9"}', "not one of the available models"),
            ('{"model": "OPENAI/GPT-4O"}', "not one of the available models"),
            ('{"model": 3}', "not a string or null"),
            ('{"target": "openai/gpt-4o"}', 'not a JSON object with a "model"'),
            ("openai/gpt-4o", 'not a JSON object with a "model"'),
            ('["openai/gpt-4o"]', 'not a JSON object with a "model"'),
            (None, "has no text"),
        ):
            answer = judge(text, self.CANDIDATES)
            self.assertEqual(answer.verdict, "refused", text)
            self.assertIn(why, answer.why)
        long = judge("x" * 1000, self.CANDIDATES)
        self.assertEqual(len(long.quoted), 200)


class RecordTests(SynchronousTestCase):
    def test_names(self):
        self.assertEqual(check_name("  house-fast "), "house-fast")
        for bad, why in ((3, "string"), ("  ", "empty"), ("x" * 201, "longer"), ("a\nb", "control")):
            with self.assertRaises(MappingError) as caught:
                check_name(bad)
            self.assertIn(why, str(caught.exception))

    def test_json_and_rows(self):
        m = ModelMapping("n", "openai/gpt-4o", LLM, 1700000000.5, 1700000001.0, None, "tiverton",
                         {"resolver_model": "r/m", "prompt": "cheap", "resolver_request_id": "abc"})
        self.assertEqual(ModelMapping.from_row(m.row()), m)
        doc = m.to_json()
        self.assertEqual(doc, {"name": "n", "target": "openai/gpt-4o", "source": "llm", "confirmed": False,
                               "created_at": "2023-11-14T22:13:20.500Z", "updated_at": "2023-11-14T22:13:21.000Z",
                               "confirmed_at": None, "created_by": "tiverton", "resolver_model": "r/m",
                               "prompt": "cheap"})
        json.dumps(doc)
