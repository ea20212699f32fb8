"""Model policy (ADR-019): parsing, the decision table in both modes, candidates."""

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.governance import policy as P
from cllama_tx.governance.policy import (
    AllowedModel,
    Decision,
    ModelPolicy,
    PolicyError,
    PolicyRefusal,
    decide,
    models_for,
    parse_policy,
)
from cllama_tx.surfaces.errors import ProxyError
from cllama_tx.surfaces.matrix import ModelRef


def R(text):
    provider, _, model = text.partition("/")
    return ModelRef(provider, model)


def policy(*entries, mode="clamp"):
    return parse_policy(
        {"mode": mode, "allowed": [{"slot": s, "ref": r} for s, r in entries]}
    )


STANDARD = (
    ("primary", "anthropic/claude-sonnet-4"),
    ("fallback", "openai/gpt-4o"),
    ("fallback", "openrouter/google/gemini-2.5-flash"),
    ("vision", "xai/grok-4"),
)


class ParsePolicyTests(SynchronousTestCase):
    def test_none_and_empty_are_no_policy(self):
        self.assertIsNone(parse_policy(None))
        self.assertIsNone(parse_policy({}))
        self.assertIsNone(parse_policy({"mode": "reject"}))
        self.assertIsNone(parse_policy({"mode": "reject", "allowed": []}))
        self.assertIsNone(parse_policy({"allowed": None}))

    def test_parsed_shape(self):
        p = parse_policy(
            {
                "mode": "reject",
                "allowed": [
                    {"slot": "primary", "ref": "openai/gpt-4o"},
                    {"slot": "fallback", "ref": "Z.AI/glm-4.6", "note": "ignored"},
                ],
                "future_key": 1,
            }
        )
        self.assertEqual(
            p,
            ModelPolicy(
                mode="reject",
                allowed=(
                    AllowedModel("primary", R("openai/gpt-4o"), "openai/gpt-4o"),
                    AllowedModel("fallback", R("zai/glm-4.6"), "Z.AI/glm-4.6"),
                ),
            ),
        )

    def test_declared_defaults_to_canonical_spelling(self):
        self.assertEqual(AllowedModel("primary", R("openai/gpt-4o")).declared, "openai/gpt-4o")

    def test_mode_defaults_to_clamp_and_is_case_insensitive(self):
        allowed = [{"slot": "primary", "ref": "openai/gpt-4o"}]
        self.assertEqual(parse_policy({"allowed": allowed}).mode, "clamp")
        self.assertEqual(parse_policy({"mode": None, "allowed": allowed}).mode, "clamp")
        self.assertEqual(parse_policy({"mode": " Reject ", "allowed": allowed}).mode, "reject")
        self.assertEqual(parse_policy({"mode": "CLAMP", "allowed": allowed}).mode, "clamp")

    def test_slot_and_ref_are_stripped_slot_lowered(self):
        p = parse_policy({"allowed": [{"slot": " Primary ", "ref": "  openai/gpt-4o "}]})
        self.assertEqual(p.allowed, (AllowedModel("primary", R("openai/gpt-4o"), "openai/gpt-4o"),))

    def test_aliases_are_resolved_in_refs(self):
        p = policy(("primary", "kimi-code/kimi-k2"), ("fallback", "OpenAI/gpt-4o"))
        self.assertEqual(p.refs, (R("kimi-coding/kimi-k2"), R("openai/gpt-4o")))

    def assertMalformed(self, raw, *fragments):
        e = self.assertRaises(PolicyError, parse_policy, raw)
        for fragment in fragments:
            self.assertIn(fragment, str(e))
        return e

    def test_malformed_policies(self):
        ok = {"slot": "primary", "ref": "openai/gpt-4o"}
        self.assertMalformed([ok], "must be an object")
        self.assertMalformed("clamp", "must be an object")
        self.assertMalformed({"mode": "clamped", "allowed": [ok]}, "mode", "'clamped'")
        self.assertMalformed({"mode": 1, "allowed": [ok]}, "mode")
        self.assertMalformed({"allowed": ok}, "allowed must be a list")
        self.assertMalformed({"allowed": "openai/gpt-4o"}, "allowed must be a list")
        self.assertMalformed({"allowed": [ok, "openai/gpt-4o"]}, "allowed[1]", "object")
        self.assertMalformed({"allowed": [{"ref": "openai/gpt-4o"}]}, "allowed[0].slot")
        self.assertMalformed({"allowed": [{"slot": " ", "ref": "openai/gpt-4o"}]}, "allowed[0].slot")
        self.assertMalformed({"allowed": [{"slot": 1, "ref": "openai/gpt-4o"}]}, "allowed[0].slot")
        self.assertMalformed({"allowed": [{"slot": "primary"}]}, "allowed[0].ref")
        self.assertMalformed({"allowed": [{"slot": "primary", "ref": ""}]}, "allowed[0].ref")
        self.assertMalformed({"allowed": [{"slot": "primary", "ref": ["a/b"]}]}, "allowed[0].ref")
        self.assertMalformed({"allowed": [ok, {"slot": "fallback", "ref": "gpt-4o"}]}, "allowed[1].ref", "'gpt-4o'")
        self.assertMalformed({"allowed": [{"slot": "primary", "ref": "openai/"}]}, "allowed[0].ref")
        self.assertMalformed({"allowed": [{"slot": "primary", "ref": "/gpt-4o"}]}, "allowed[0].ref")
        self.assertMalformed(
            {"allowed": [{"slot": "primary", "ref": "cllama/google/gemini-2.5-flash"}]},
            "allowed[0].ref",
            "synthetic",
        )
        self.assertMalformed(
            {"allowed": [ok, {"slot": "PRIMARY", "ref": "xai/grok-4"}]},
            "allowed[1]",
            "more than one 'primary'",
        )

    def test_policy_error_is_a_value_error(self):
        self.assertTrue(issubclass(PolicyError, ValueError))

    def test_default_is_first_primary(self):
        p = policy(("fallback", "openai/gpt-4o"), ("primary", "xai/grok-4"))
        self.assertEqual(p.default, R("xai/grok-4"))

    def test_default_without_primary_is_first_entry(self):
        p = policy(("vision", "xai/grok-4"), ("fallback", "openai/gpt-4o"))
        self.assertEqual(p.default, R("xai/grok-4"))
        self.assertEqual(p.failover_chain, (R("openai/gpt-4o"),))

    def test_failover_chain_is_primary_then_every_fallback_in_order(self):
        p = policy(
            ("fallback", "openai/gpt-4o"),
            ("vision", "xai/grok-4"),
            ("primary", "anthropic/claude-sonnet-4"),
            ("Fallback", "google/gemini-2.5-flash"),
            ("fallback", "openai/gpt-4o"),
        )
        self.assertEqual(
            p.failover_chain,
            (R("anthropic/claude-sonnet-4"), R("openai/gpt-4o"), R("google/gemini-2.5-flash")),
        )

    def test_refs_are_distinct_in_declaration_order(self):
        p = policy(
            ("primary", "kimi-code/kimi-k2"),
            ("fallback", "kimi-coding/kimi-k2"),
            ("cheap", "openai/gpt-4o-mini"),
        )
        self.assertEqual(p.refs, (R("kimi-coding/kimi-k2"), R("openai/gpt-4o-mini")))
        self.assertEqual(p.failover_chain, (R("kimi-coding/kimi-k2"),))


class LegacyTests(SynchronousTestCase):
    """No policy: the request must name a routable provider/model."""

    def test_prefixed_ref_is_used_as_is(self):
        self.assertEqual(
            decide(None, "openrouter/anthropic/claude-sonnet-4"),
            Decision(
                R("openrouter/anthropic/claude-sonnet-4"),
                None,
                (R("openrouter/anthropic/claude-sonnet-4"),),
            ),
        )

    def test_provider_is_canonicalised(self):
        d = decide(None, " Kimi-Code/kimi-k2 ")
        self.assertEqual(d.ref, R("kimi-coding/kimi-k2"))
        self.assertIsNone(d.intervention)

    def assertInvalid(self, requested, **kw):
        e = self.assertRaises(PolicyRefusal, decide, None, requested, **kw)
        self.assertEqual((e.status, e.code), (400, "invalid_model"))
        return e

    def test_bare_missing_and_synthetic_are_refused(self):
        self.assertIn("'gpt-4o'", self.assertInvalid("gpt-4o").message)
        self.assertIn("names no model", self.assertInvalid(None).message)
        self.assertInvalid("")
        self.assertInvalid("   ")
        self.assertInvalid("cllama/google/gemini-2.5-flash")
        self.assertInvalid("openai/")

    def test_non_string_model_is_refused(self):
        e = self.assertInvalid(["openai/gpt-4o"])
        self.assertIn("must be a string", e.message)

    def test_non_string_model_is_refused_with_a_policy_too(self):
        p = policy(("primary", "openai/gpt-4o"))
        e = self.assertRaises(PolicyRefusal, decide, p, 42)
        self.assertEqual((e.status, e.code), (400, "invalid_model"))

    def test_legacy_bare_provider(self):
        d = decide(None, "claude-sonnet-4", legacy_bare_provider="anthropic")
        self.assertEqual(d, Decision(R("anthropic/claude-sonnet-4"), None, (R("anthropic/claude-sonnet-4"),)))
        # Prefixed names are unaffected, missing ones still refused.
        self.assertEqual(decide(None, "openai/gpt-4o", legacy_bare_provider="anthropic").ref, R("openai/gpt-4o"))
        self.assertInvalid(None, legacy_bare_provider="anthropic")

    def test_refusal_is_a_proxy_error(self):
        self.assertTrue(issubclass(PolicyRefusal, ProxyError))

    def test_long_requested_names_are_shortened_in_messages(self):
        e = self.assertInvalid("x" * 5000)
        self.assertLess(len(e.message), 400)


class DecisionTableTests(SynchronousTestCase):
    """Every row of CONTRACT section 4, clamp mode, then reject mode."""

    mode = "clamp"

    def setUp(self):
        self.p = policy(*STANDARD, mode=self.mode)
        self.default = R("anthropic/claude-sonnet-4")

    def clamped(self, requested, intervention):
        d = decide(self.p, requested)
        self.assertEqual((d.ref, d.intervention), (self.default, intervention))
        return d

    def normalised(self, requested, ref, intervention):
        d = decide(self.p, requested)
        self.assertEqual((d.ref, d.intervention), (R(ref), intervention))
        return d

    def test_missing(self):
        for requested in (None, "", "  "):
            self.clamped(requested, "missing")

    def test_exact(self):
        for _, ref in STANDARD:
            self.normalised(ref, ref, None)
        self.normalised("  openai/gpt-4o\n", "openai/gpt-4o", None)

    def test_bare_unique(self):
        self.normalised("gpt-4o", "openai/gpt-4o", "bare_model_normalized")
        self.normalised("grok-4", "xai/grok-4", "bare_model_normalized")
        # The model part of an openrouter ref, and (reference proxy) its last segment.
        self.normalised("gemini-2.5-flash", "openrouter/google/gemini-2.5-flash", "bare_model_normalized")

    def test_bare_unknown(self):
        self.clamped("gpt-5", "disallowed_clamped")
        # Model ids are case-sensitive.
        self.clamped("GPT-4o", "disallowed_clamped")

    def test_prefixed_same_upstream(self):
        self.normalised("OpenAI/gpt-4o", "openai/gpt-4o", "provider_normalized")
        self.normalised("OPENROUTER/google/gemini-2.5-flash", "openrouter/google/gemini-2.5-flash", "provider_normalized")
        # Vendor bridge: <vendor>/<model> is the gateway's <vendor>/<model>.
        self.normalised("google/gemini-2.5-flash", "openrouter/google/gemini-2.5-flash", "provider_normalized")
        self.normalised("vercel/google/gemini-2.5-flash", "openrouter/google/gemini-2.5-flash", "provider_normalized")
        self.normalised("openrouter/anthropic/claude-sonnet-4", "anthropic/claude-sonnet-4", "provider_normalized")

    def test_prefixed_other(self):
        self.clamped("openai/gpt-4o-mini", "disallowed_clamped")
        self.clamped("xai/gpt-4o", "disallowed_clamped")
        self.clamped("openai/GPT-4o", "disallowed_clamped")
        self.clamped("cllama/openai/gpt-4o", "disallowed_clamped")
        self.clamped("openai/", "disallowed_clamped")
        self.clamped("/gpt-4o", "disallowed_clamped")
        self.clamped("openrouter/openai/gpt-4o-mini", "disallowed_clamped")


class RejectDecisionTableTests(DecisionTableTests):
    mode = "reject"

    def clamped(self, requested, intervention):
        e = self.assertRaises(PolicyRefusal, decide, self.p, requested)
        self.assertEqual((e.status, e.code), (403, "model_not_allowed"))
        for _, ref in STANDARD:
            self.assertIn(ref, e.message)
        if requested and requested.strip():
            self.assertIn(repr(requested.strip()), e.message)
        else:
            self.assertIn("names no model", e.message)
        return e


class AliasAndAmbiguityTests(SynchronousTestCase):
    def test_alias_in_request(self):
        p = policy(("primary", "kimi-coding/kimi-k2"))
        d = decide(p, "kimi-code/kimi-k2")
        self.assertEqual((d.ref, d.intervention), (R("kimi-coding/kimi-k2"), "provider_normalized"))

    def test_alias_in_policy_exact_as_declared(self):
        p = policy(("primary", "kimi-code/kimi-k2"), mode="reject")
        d = decide(p, "kimi-code/kimi-k2")
        self.assertEqual((d.ref, d.intervention), (R("kimi-coding/kimi-k2"), None))
        d = decide(p, "kimi-coding/kimi-k2")
        self.assertEqual((d.ref, d.intervention), (R("kimi-coding/kimi-k2"), "provider_normalized"))

    def test_other_aliases(self):
        p = policy(("primary", "zai/glm-4.6"), ("fallback", "volcengine/doubao-pro"), mode="reject")
        for requested, ref in [
            ("z.ai/glm-4.6", "zai/glm-4.6"),
            ("Z-AI/glm-4.6", "zai/glm-4.6"),
            ("bytedance/doubao-pro", "volcengine/doubao-pro"),
            ("doubao/doubao-pro", "volcengine/doubao-pro"),
        ]:
            d = decide(p, requested)
            self.assertEqual((d.ref, d.intervention), (R(ref), "provider_normalized"))

    def test_gateway_vendor_is_canonicalised(self):
        p = policy(("primary", "openrouter/z-ai/glm-4.6"))
        d = decide(p, "z.ai/glm-4.6")
        self.assertEqual((d.ref, d.intervention), (R("openrouter/z-ai/glm-4.6"), "provider_normalized"))

    def test_bare_ambiguous(self):
        p = policy(("fallback", "openai/gpt-4o"), ("primary", "xai/grok-4"), ("cheap", "openrouter/gpt-4o"))
        d = decide(p, "gpt-4o")
        self.assertEqual((d.ref, d.intervention), (R("xai/grok-4"), "ambiguous_clamped"))

    def test_bare_ambiguous_reject(self):
        p = policy(("primary", "openai/gpt-4o"), ("cheap", "openrouter/gpt-4o"), mode="reject")
        e = self.assertRaises(PolicyRefusal, decide, p, "gpt-4o")
        self.assertEqual((e.status, e.code), (403, "model_not_allowed"))
        self.assertIn("several", e.message)
        self.assertIn("openai/gpt-4o, openrouter/gpt-4o", e.message)

    def test_bare_exact_model_part_beats_last_segment(self):
        # Same model, two routes: the exact model part is not ambiguous.
        p = policy(
            ("primary", "openrouter/anthropic/claude-sonnet-4"),
            ("fallback", "anthropic/claude-sonnet-4"),
            mode="reject",
        )
        d = decide(p, "claude-sonnet-4")
        self.assertEqual((d.ref, d.intervention), (R("anthropic/claude-sonnet-4"), "bare_model_normalized"))

    def test_bare_last_segment_ambiguous(self):
        p = policy(
            ("primary", "openai/gpt-4o-mini"),
            ("fallback", "openrouter/openai/gpt-4o"),
            ("fallback", "vercel/openai/gpt-4o"),
        )
        d = decide(p, "gpt-4o")
        self.assertEqual((d.ref, d.intervention), (R("openai/gpt-4o-mini"), "ambiguous_clamped"))

    def test_duplicate_refs_are_not_ambiguous(self):
        p = policy(("primary", "openai/gpt-4o"), ("fallback", "OpenAI/gpt-4o"), mode="reject")
        d = decide(p, "gpt-4o")
        self.assertEqual((d.ref, d.intervention), (R("openai/gpt-4o"), "bare_model_normalized"))

    def test_prefixed_canonical_match_beats_vendor_bridge(self):
        p = policy(("primary", "openrouter/anthropic/claude-sonnet-4"), ("fallback", "anthropic/claude-sonnet-4"))
        d = decide(p, "Anthropic/claude-sonnet-4")
        self.assertEqual((d.ref, d.intervention), (R("anthropic/claude-sonnet-4"), "provider_normalized"))

    def test_prefixed_ambiguous_through_gateways(self):
        p = policy(
            ("primary", "openai/gpt-4o-mini"),
            ("fallback", "openrouter/anthropic/claude-sonnet-4"),
            ("fallback", "vercel/anthropic/claude-sonnet-4"),
        )
        d = decide(p, "anthropic/claude-sonnet-4")
        self.assertEqual((d.ref, d.intervention), (R("openai/gpt-4o-mini"), "ambiguous_clamped"))
        p = parse_policy({"mode": "reject", "allowed": [{"slot": a.slot, "ref": a.declared} for a in p.allowed]})
        e = self.assertRaises(PolicyRefusal, decide, p, "anthropic/claude-sonnet-4")
        self.assertIn("several", e.message)

    def test_non_gateway_nesting_is_not_a_vendor_bridge(self):
        p = policy(("primary", "ollama/library/llama3"))
        d = decide(p, "library/llama3")
        self.assertEqual(d.intervention, "disallowed_clamped")

    def test_first_rule_wins_exact_before_bare(self):
        # A declared ref that is literally reachable as written is exact.
        p = policy(("primary", "openai/gpt-4o"), ("cheap", "openrouter/openai/gpt-4o"))
        d = decide(p, "openrouter/openai/gpt-4o")
        self.assertEqual((d.ref, d.intervention), (R("openrouter/openai/gpt-4o"), None))
        d = decide(p, "openai/gpt-4o")
        self.assertEqual((d.ref, d.intervention), (R("openai/gpt-4o"), None))


class CandidateTests(SynchronousTestCase):
    def setUp(self):
        self.p = policy(*STANDARD)
        self.chain = (
            R("anthropic/claude-sonnet-4"),
            R("openai/gpt-4o"),
            R("openrouter/google/gemini-2.5-flash"),
        )

    def test_primary_chosen(self):
        self.assertEqual(decide(self.p, "anthropic/claude-sonnet-4").candidates, self.chain)

    def test_clamped_to_default(self):
        self.assertEqual(decide(self.p, None).candidates, self.chain)
        self.assertEqual(decide(self.p, "openai/o3").candidates, self.chain)

    def test_fallback_chosen_goes_first_then_the_rest_in_chain_order(self):
        self.assertEqual(
            decide(self.p, "gemini-2.5-flash").candidates,
            (R("openrouter/google/gemini-2.5-flash"), R("anthropic/claude-sonnet-4"), R("openai/gpt-4o")),
        )

    def test_named_slot_chosen_then_the_whole_chain(self):
        self.assertEqual(decide(self.p, "grok-4").candidates, (R("xai/grok-4"),) + self.chain)

    def test_no_duplicates(self):
        p = policy(
            ("primary", "kimi-code/kimi-k2"),
            ("fallback", "kimi-coding/kimi-k2"),
            ("fallback", "openai/gpt-4o"),
            ("fallback", "OpenAI/gpt-4o"),
            ("extra", "openai/gpt-4o"),
        )
        self.assertEqual(decide(p, "gpt-4o").candidates, (R("openai/gpt-4o"), R("kimi-coding/kimi-k2")))
        self.assertEqual(decide(p, None).candidates, (R("kimi-coding/kimi-k2"), R("openai/gpt-4o")))

    def test_only_declared_providers(self):
        declared = set(self.p.refs)
        for requested in [None, "x", "gpt-4o", "openai/o3", "grok-4", "google/gemini-2.5-flash", "mistral/large"]:
            d = decide(self.p, requested)
            self.assertTrue(set(d.candidates) <= declared, requested)
            self.assertEqual(d.candidates[0], d.ref)

    def test_no_primary(self):
        p = policy(("cheap", "openai/gpt-4o-mini"), ("fallback", "xai/grok-4"))
        self.assertEqual(decide(p, None).candidates, (R("openai/gpt-4o-mini"), R("xai/grok-4")))
        self.assertEqual(decide(p, "grok-4").candidates, (R("xai/grok-4"),))


class ModelsForTests(SynchronousTestCase):
    def test_no_policy(self):
        self.assertEqual(models_for(None), [])

    def test_default_chain_then_others(self):
        p = policy(
            ("vision", "xai/grok-4"),
            ("fallback", "openai/gpt-4o"),
            ("primary", "anthropic/claude-sonnet-4"),
            ("cheap", "OpenAI/gpt-4o"),
            ("small", "openai/gpt-4o-mini"),
        )
        self.assertEqual(
            models_for(p),
            [R("anthropic/claude-sonnet-4"), R("openai/gpt-4o"), R("xai/grok-4"), R("openai/gpt-4o-mini")],
        )

    def test_default_first_without_primary(self):
        p = policy(("vision", "xai/grok-4"), ("fallback", "openai/gpt-4o"))
        self.assertEqual(models_for(p), [R("xai/grok-4"), R("openai/gpt-4o")])


class ModuleTests(SynchronousTestCase):
    def test_intervention_names(self):
        self.assertEqual(
            {P.MISSING, P.BARE_MODEL_NORMALIZED, P.AMBIGUOUS_CLAMPED, P.PROVIDER_NORMALIZED, P.DISALLOWED_CLAMPED},
            {"missing", "bare_model_normalized", "ambiguous_clamped", "provider_normalized", "disallowed_clamped"},
        )
