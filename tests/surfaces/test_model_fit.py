"""
A request sent to another model than the one it names keeps only what that
model takes (C{cllama_tx.surfaces.model_fit}), and the strict fake provider
takes the result.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.providers.model_limits import traits_for
from cllama_tx.surfaces.model_fit import fit_request
from cllama_tx.surfaces.model_traits import UNKNOWN_MODEL
from cllama_tx.testing.strict import anthropic_problems, openai_problems

USER = [{"role": "user", "content": "Hi"}]


class AnthropicFitTests(SynchronousTestCase):
    def fit(self, model, betas=(), **body):
        doc = {"model": model, "messages": USER, **body}
        fitted = fit_request(doc, "anthropic", traits_for("anthropic", model), betas)
        self.assertEqual(anthropic_problems(fitted.request, fitted.betas or ()), [])
        return fitted

    def test_adaptive_thinking_to_a_budget_model(self):
        fitted = self.fit("claude-sonnet-4-5", max_tokens=200000, thinking={"type": "adaptive"}, output_config={"effort": "high"})
        self.assertEqual(fitted.request["max_tokens"], 64000)
        self.assertEqual(fitted.request["thinking"], {"type": "enabled", "budget_tokens": 24576})
        self.assertIn("output_config.effort", fitted.dropped)
        self.assertNotIn("output_config", fitted.request)

    def test_no_thinking_model(self):
        fitted = self.fit(
            "claude-3-5-haiku-20241022", ("context-1m-2025-08-07", "other-beta"), max_tokens=4000,
            thinking={"type": "enabled", "budget_tokens": 2000},
            context_management={"edits": [{"type": "clear_thinking_20251015"}, {"type": "clear_tool_uses_20250919"}]},
        )
        self.assertNotIn("thinking", fitted.request)
        self.assertEqual(fitted.request["context_management"], {"edits": [{"type": "clear_tool_uses_20250919"}]})
        self.assertEqual(fitted.betas, ("other-beta",))

    def test_budget_lowered_below_max_tokens(self):
        fitted = self.fit("claude-opus-4-1", max_tokens=64000, thinking={"type": "enabled", "budget_tokens": 40000})
        self.assertEqual(fitted.request["max_tokens"], 32000)
        self.assertEqual(fitted.request["thinking"]["budget_tokens"], 31999)

    def test_nothing_to_fit_and_unknown_models(self):
        doc = {"model": "claude-sonnet-4-5", "max_tokens": 100, "messages": USER}
        self.assertIs(fit_request(doc, "anthropic", traits_for("anthropic", "claude-sonnet-4-5")).request, doc)
        wild = dict(doc, max_tokens=10**6)
        self.assertIs(fit_request(wild, "anthropic", UNKNOWN_MODEL).request, wild)


class OpenAIFitTests(SynchronousTestCase):
    def test_reasoning_to_a_chat_model_and_back(self):
        doc = {"model": "gpt-4o", "messages": USER, "reasoning_effort": "high", "max_completion_tokens": 100000}
        fitted = fit_request(doc, "openai", traits_for("openai", "gpt-4o"))
        self.assertEqual(fitted.dropped, ("reasoning_effort",))
        self.assertEqual(fitted.request["max_completion_tokens"], 16384)
        self.assertEqual(openai_problems(fitted.request), [])
        doc = {"model": "o3", "messages": USER, "reasoning_effort": "xhigh", "temperature": 0.3}
        fitted = fit_request(doc, "openai", traits_for("openai", "o3"))
        self.assertEqual(fitted.request["reasoning_effort"], "high")
        self.assertEqual(fitted.dropped, ("temperature",))
        self.assertEqual(openai_problems(fitted.request), [])
