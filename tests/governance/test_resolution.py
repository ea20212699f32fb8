"""
The model resolution order (cllama_tx.governance.resolution): one test per
rule of the module's table, in order, and the rules' interplay.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.governance.policy import parse_policy
from cllama_tx.governance.resolution import (
    DEFAULT,
    FamilyError,
    ProviderView,
    Resolution,
    TableEntry,
    compile_families,
    key_allows,
    resolve,
    visible_models,
)
from cllama_tx.surfaces.errors import ProxyError
from cllama_tx.surfaces.matrix import ModelRef, split_model_ref

R = split_model_ref


class Providers(ProviderView):
    """A registry view: C{configured} providers resolve, C{known} exist."""

    def __init__(self, configured=("openai", "anthropic"), known=("openai", "anthropic", "openrouter", "google", "xai")):
        self._configured = frozenset(configured)
        self._known = frozenset(known) | self._configured

    def configured(self, name):
        return name in self._configured

    def known(self, name):
        return name in self._known

    def names(self):
        return sorted(self._configured)


TABLE = {
    "gpt-4": TableEntry("gpt-4", (R("openai/gpt-4o"),)),
    "fake-openai-endpoint": TableEntry(
        "fake-openai-endpoint", (R("openai@fake-openai-endpoint/fake"), R("openai@fake-openai-endpoint-2/fake"))
    ),
    "gpt-3.5-turbo": TableEntry("gpt-3.5-turbo", (R("openai/gpt-4o"),), alias_of="gpt-4"),
    "broken": TableEntry("broken", (), problem="provider 'bedrock' (LiteLLM's) speaks a wire format cllama_tx does not"),
}


def rules(resolution: Resolution) -> list[str]:
    return [step.rule for step in resolution.steps]


class OrderTests(SynchronousTestCase):
    """Each rule of the table, with the example the docstring gives."""

    def test_1_key_alias_then_table(self):
        r = resolve("smart", key_aliases={"smart": "gpt-4"}, table=TABLE, providers=Providers())
        self.assertEqual(r.ref, R("openai/gpt-4o"))
        self.assertEqual(rules(r), ["key_alias", "model_table"])
        self.assertEqual(dict(r.steps[0].details), {"alias": "smart", "target": "gpt-4"})
        self.assertEqual(r.names, ("smart", "gpt-4"))

    def test_1_team_alias_when_the_key_has_none(self):
        r = resolve("fast", key_aliases={"other": "x"}, team_aliases={"fast": "claude-haiku-4-5"}, providers=Providers())
        self.assertEqual(r.ref, R("anthropic/claude-haiku-4-5"))
        self.assertEqual(rules(r), ["team_alias", "bare_family"])

    def test_1_key_alias_wins_over_team_alias_and_aliases_do_not_chain(self):
        r = resolve("a", key_aliases={"a": "gpt-4o"}, team_aliases={"a": "openai/gpt-4o-mini"}, providers=Providers())
        self.assertEqual((r.ref, rules(r)), (R("openai/gpt-4o"), ["key_alias", "bare_family"]))
        self.assertEqual(r.names, ("a", "gpt-4o"))
        with self.assertRaises(ProxyError) as caught:  # "b" is not followed to "gpt-4o"
            resolve("a", key_aliases={"a": "b", "b": "gpt-4o"}, providers=Providers())
        self.assertIn("model 'a' names no provider", caught.exception.message)

    def test_2_table_entry_and_its_deployments(self):
        r = resolve("fake-openai-endpoint", table=TABLE, providers=Providers(configured=()))
        self.assertEqual(r.ref, R("openai@fake-openai-endpoint/fake"))
        self.assertEqual(r.candidates, TABLE["fake-openai-endpoint"].refs)
        self.assertEqual(
            [(s.rule, dict(s.details)) for s in r.steps],
            [("model_table", {"entry": "fake-openai-endpoint", "chosen": "openai@fake-openai-endpoint/fake"})],
        )

    def test_2_model_group_alias(self):
        r = resolve("gpt-3.5-turbo", table=TABLE, providers=Providers())
        self.assertEqual(r.ref, R("openai/gpt-4o"))
        self.assertEqual(dict(r.steps[0].details)["alias_of"], "gpt-4")

    def test_2_an_entry_that_cannot_serve_says_why(self):
        with self.assertRaises(ProxyError) as caught:
            resolve("broken", table=TABLE, providers=Providers())
        self.assertEqual((caught.exception.status, caught.exception.code), (400, "model_unavailable"))
        self.assertIn("model 'broken' cannot be served: provider 'bedrock'", caught.exception.message)

    def test_3_policy_after_the_table(self):
        policy = parse_policy({"allowed": [{"slot": "primary", "ref": "openai/gpt-4o"}]})
        r = resolve("gpt-4", policy=policy, table=TABLE, providers=Providers())
        self.assertEqual(r.ref, R("openai/gpt-4o"))
        self.assertEqual(rules(r), ["model_table"])  # exact for the policy

    def test_3_policy_dated_id_is_not_clamped(self):
        policy = parse_policy(
            {"allowed": [{"slot": "primary", "ref": "openai/gpt-4o"}, {"slot": "x", "ref": "anthropic/claude-haiku-4-5"}]}
        )
        r = resolve("claude-haiku-4-5-20251001", policy=policy, providers=Providers())
        self.assertEqual(r.ref, R("anthropic/claude-haiku-4-5"))
        self.assertEqual([(s.rule, dict(s.details)) for s in r.steps],
                         [("dated_model_normalized", {"chosen": "anthropic/claude-haiku-4-5"})])

    def test_3_policy_is_final(self):
        policy = parse_policy({"mode": "reject", "allowed": [{"slot": "primary", "ref": "openai/gpt-4o"}]})
        with self.assertRaises(ProxyError) as caught:
            resolve("mistralai/mistral-large", policy=policy, providers=Providers(configured=("openai", "openrouter")))
        self.assertEqual((caught.exception.status, caught.exception.code), (403, "model_not_allowed"))
        clamp = parse_policy({"allowed": [{"slot": "primary", "ref": "openai/gpt-4o"}]})
        r = resolve(None, policy=clamp, providers=Providers())
        self.assertEqual((r.ref, rules(r)), (R("openai/gpt-4o"), ["missing"]))

    def test_4_exact_ref_of_a_configured_provider(self):
        r = resolve(" openai/gpt-4o ", providers=Providers(configured=("openai", "openrouter")))
        self.assertEqual((r.ref, r.candidates, r.steps), (R("openai/gpt-4o"), (R("openai/gpt-4o"),), ()))

    def test_5_bare_family(self):
        for name, provider in [
            ("gpt-4o", "openai"), ("chatgpt-4o-latest", "openai"), ("o1", "openai"), ("o3-mini", "openai"),
            ("o4-mini", "openai"), ("claude-sonnet-4-5-20250929", "anthropic"), ("gemini-2.5-flash", "google"),
            ("grok-4", "xai"),
        ]:
            r = resolve(name, providers=Providers(configured=(provider,)))
            self.assertEqual(r.ref, ModelRef(provider, name))
            self.assertEqual(rules(r), ["bare_family"])
        self.assertEqual(dict(resolve("o4-mini", providers=Providers()).steps[0].details),
                         {"family": "o4*", "provider": "openai"})

    def test_5_family_before_surface(self):
        r = resolve("gpt-4o", bare_provider="anthropic", providers=Providers())
        self.assertEqual(r.ref, R("openai/gpt-4o"))

    def test_6_bare_surface(self):
        r = resolve("my-model", bare_provider="anthropic", providers=Providers())
        self.assertEqual((r.ref, rules(r)), (R("anthropic/my-model"), ["bare_surface"]))

    def test_7_unconfigured_vendor_through_openrouter(self):
        view = Providers(configured=("openrouter",))
        r = resolve("mistralai/mistral-large", providers=view)
        self.assertEqual(r.ref, R("openrouter/mistralai/mistral-large"))
        self.assertEqual([(s.rule, dict(s.details)) for s in r.steps],
                         [("openrouter_fallback", {"provider": "mistralai", "chosen": "openrouter/mistralai/mistral-large"})])
        # A bare family name of an unconfigured provider too, in OpenRouter's vendor spelling.
        self.assertEqual(resolve("grok-4", providers=view).ref, R("openrouter/x-ai/grok-4"))
        self.assertEqual(rules(resolve("gpt-4o", providers=view)), ["bare_family", "openrouter_fallback"])
        self.assertEqual(resolve("openai/gpt-4o", providers=view).ref, R("openrouter/openai/gpt-4o"))

    def test_8_unknown_vendor_without_openrouter(self):
        with self.assertRaises(ProxyError) as caught:
            resolve("mistralai/mistral-large", providers=Providers())
        error = caught.exception
        self.assertEqual((error.status, error.code), (400, "unknown_provider"))
        self.assertEqual(
            error.message,
            "model 'mistralai/mistral-large': 'mistralai' is not a provider configured here, and OpenRouter "
            "(which would carry it) is not configured either; send '<provider>/<model>' with a configured "
            "provider (anthropic, openai) or configure 'mistralai' or OPENROUTER_API_KEY",
        )

    def test_8_bare_without_family_on_chat(self):
        with self.assertRaises(ProxyError) as caught:
            resolve("my-model", providers=Providers())
        self.assertEqual(caught.exception.code, "invalid_model")
        self.assertNotIn("cllama", caught.exception.message)

    def test_8_catalog_provider_without_a_key_is_left_to_the_registry(self):
        r = resolve("google/gemini-2.5-flash", providers=Providers())
        self.assertEqual((r.ref, r.steps), (R("google/gemini-2.5-flash"), ()))

    def test_synthetic_prefix_and_bad_types(self):
        with self.assertRaises(ProxyError) as caught:
            resolve("cllama/google/gemini-2.5-flash", providers=Providers())
        self.assertEqual(caught.exception.code, "invalid_model")
        with self.assertRaises(ProxyError) as caught:
            resolve(42, providers=Providers())
        self.assertEqual(caught.exception.message, "the 'model' field must be a string")


class FamilyTests(SynchronousTestCase):
    def test_operator_families_extend_and_override(self):
        families = compile_families(list(DEFAULT.patterns) + [("mistral-*", "mistral"), ("gpt-*", "openrouter")])
        self.assertEqual(families.match("mistral-large"), ("mistral", "mistral-*"))
        self.assertEqual(families.match("gpt-4o"), ("openrouter", "gpt-*"))
        self.assertIsNone(families.match("llama-3"))

    def test_longest_prefix_and_exact_names(self):
        families = compile_families([("o1", "openai"), ("o*", "other"), ("o1-pro*", "pro")])
        self.assertEqual(families.match("o1"), ("openai", "o1"))
        self.assertEqual(families.match("o1-pro-2025"), ("pro", "o1-pro*"))
        self.assertEqual(families.match("o5"), ("other", "o*"))

    def test_malformed(self):
        for pairs in ([("*", "x")], [("a*b", "x")], [("a/b", "x")], [("a", "")], [("", "x")], [(1, "x")]):
            self.assertRaises(FamilyError, compile_families, pairs)


class ListingTests(SynchronousTestCase):
    def test_policy_lists_declared_refs(self):
        policy = parse_policy({"allowed": [{"slot": "primary", "ref": "anthropic/claude-sonnet-4-5"},
                                           {"slot": "fallback", "ref": "OpenAI/gpt-4o"}]})
        self.assertEqual(visible_models(policy=policy, table_names=["x"], catalog=["openai/gpt-4o"]),
                         ["anthropic/claude-sonnet-4-5", "OpenAI/gpt-4o"])

    def test_everything_for_master_and_open_agents(self):
        self.assertEqual(visible_models(table_names=["gpt-4", "fast"], catalog=["openai/gpt-4o", "openai/gpt-4o-mini"]),
                         ["gpt-4", "fast", "openai/gpt-4o", "openai/gpt-4o-mini"])

    def test_virtual_key_names(self):
        models = ("gpt-4", "anthropic/*", "gpt-4o-mini")

        def allows(name):
            return name in ("gpt-4", "gpt-4o-mini") or name.startswith("anthropic/")

        listed = visible_models(
            key_models=models, allows=allows, aliases={"smart": "gpt-4", "blocked": "openai/o3"},
            table_names=["gpt-4", "other"], catalog=["openai/gpt-4o", "anthropic/claude-haiku-4-5"],
        )
        self.assertEqual(listed, ["smart", "gpt-4", "gpt-4o-mini", "anthropic/claude-haiku-4-5"])
        # No model list: aliases, then everything.
        self.assertEqual(visible_models(key_models=(), allows=lambda n: True, aliases={"smart": "gpt-4"},
                                        table_names=["gpt-4"], catalog=["openai/gpt-4o"]),
                         ["smart", "gpt-4", "openai/gpt-4o"])

    def test_key_allows_any_name_on_the_way(self):
        r = resolve("smart", key_aliases={"smart": "gpt-4"}, table=TABLE, providers=Providers())
        self.assertTrue(key_allows(lambda n: n == "gpt-4", r))
        self.assertTrue(key_allows(lambda n: n == "openai/gpt-4o", r))
        self.assertFalse(key_allows(lambda n: n == "openai/gpt-4o-mini", r))
