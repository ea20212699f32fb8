"""
Tests for L{cllama_tx.accounting.pricing}: the packaged price table, the
lookup rule, cost arithmetic and the operator override file.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from cllama_tx.accounting import pricing
from cllama_tx.accounting.pricing import (
    LongContext,
    Price,
    Pricing,
    PricingError,
    compute_cost,
    lookup,
    merge_tables,
    packaged_document,
    packaged_table,
    parse_table,
)
from cllama_tx.interfaces import IPricing
from cllama_tx.store.records import Usage

PROVIDERS = ("openai", "anthropic", "google", "xai", "openrouter")


def write_json(path: str, value: Any) -> None:
    with open(path, "w") as f:
        json.dump(value, f)


def bump_mtime(path: str, seconds: int = 10) -> None:
    """
    Move the file's mtime forward, so a rewrite within the file system's
    timestamp granularity is still seen as a change.
    """
    st = os.stat(path)
    new = st.st_mtime_ns + seconds * 1_000_000_000
    os.utime(path, ns=(new, new))


class PackagedTableTests(SynchronousTestCase):
    """
    The table shipped in C{cllama_tx/data/pricing.json}.
    """

    def setUp(self) -> None:
        self.doc = packaged_document()
        self.table = packaged_table()

    def all_prices(self):
        for provider, models in self.table.items():
            for model, price in models.items():
                yield provider, model, price

    def test_parses_and_covers_the_providers(self) -> None:
        """
        The packaged table parses and prices models of every provider the
        contract names, with a documentation source for each.
        """
        for provider in PROVIDERS:
            self.assertTrue(self.table.get(provider), provider)
            self.assertIn(provider, self.doc["sources"])
            self.assertTrue(self.doc["sources"][provider].startswith("https://"))
        self.assertRegex(self.doc["updated"], r"^\d{4}-\d{2}-\d{2}$")

    def test_prices_are_sane(self) -> None:
        """
        Every rate is positive; output costs at least as much as input (a
        swapped column would break this); cache reads are cheaper than
        input and cache writes not cheaper; long-context rules only raise
        prices.
        """
        count = 0
        for provider, model, price in self.all_prices():
            where = f"{provider}/{model}"
            count += 1
            if price.per_image is not None:
                # An image model priced per image (the passthrough): no token rates.
                self.assertGreater(price.per_image, 0, where)
                continue
            if "embedding" in model:
                # Embeddings bill input only.
                self.assertGreater(price.input, 0, where)
                self.assertEqual(price.output, 0, where)
                continue
            self.assertGreater(price.input, 0, where)
            self.assertGreater(price.output, 0, where)
            self.assertGreaterEqual(price.output, price.input, where)
            if price.cache_read is not None:
                self.assertGreater(price.cache_read, 0, where)
                self.assertLess(price.cache_read, price.input, where)
            if price.cache_write is not None:
                self.assertGreaterEqual(price.cache_write, price.input, where)
            if price.long_context is not None:
                self.assertGreater(price.long_context.threshold_input_tokens, 0, where)
                self.assertGreaterEqual(price.long_context.input_multiplier, 1, where)
                self.assertGreaterEqual(price.long_context.output_multiplier, 1, where)
            if price.max_output_tokens is not None:
                self.assertGreater(price.max_output_tokens, 0, where)
        self.assertGreater(count, 50)

    def test_anthropic_cache_rates(self) -> None:
        """
        Anthropic's 5-minute cache writes are 1.25x input; cache reads are
        0.1x input except where Anthropic cut them (Fable 5.1 0.025x, Opus
        5.5 and Sonnet 5.5 0.05x).  Claude Haiku 3 is the documented
        exception ($0.30 writes, $0.03 reads on $0.25 input).
        """
        reduced = {"claude-fable-5-1": 0.025, "claude-mythos-5-1": 0.025,
                   "claude-opus-5-5": 0.05, "claude-sonnet-5-5": 0.05}
        haiku3 = self.table["anthropic"]["claude-3-haiku"]
        self.assertEqual((haiku3.cache_write, haiku3.cache_read), (0.30, 0.03))
        for model, price in self.table["anthropic"].items():
            if model == "claude-3-haiku":
                continue
            self.assertAlmostEqual(price.cache_write, price.input * 1.25, places=9, msg=model)
            factor = reduced.get(model, 0.1)
            self.assertAlmostEqual(price.cache_read, price.input * factor, places=9, msg=model)

    def test_model_ids_are_real_ids(self) -> None:
        """
        Keys are API model ids: Anthropic's are C{claude-<family>-<version>}
        or C{claude-3-...}, never the marketing order (C{claude-haiku-3-5}
        can never match a real id); OpenRouter's are C{vendor/model}.
        """
        for model in self.table["anthropic"]:
            self.assertRegex(
                model, r"^claude-((opus|sonnet|haiku|fable|mythos)-\d|3-)", model
            )
            self.assertNotRegex(model, r"^claude-(opus|sonnet|haiku)-3", model)
        for model in self.table["openrouter"]:
            self.assertRegex(model, r"^[a-z0-9-]+/[A-Za-z0-9._-]+$", model)
        for model in self.table["google"]:
            self.assertTrue(model.startswith("gemini-"), model)
        for model in self.table["xai"]:
            self.assertTrue(model.startswith("grok-"), model)

    def test_real_ids_resolve(self) -> None:
        """
        Ids as providers return them, dated snapshots included, find their
        model's price.
        """
        cases = {
            ("anthropic", "claude-sonnet-4-5-20250929"): "claude-sonnet-4-5",
            ("anthropic", "claude-sonnet-4-5"): "claude-sonnet-4-5",
            ("anthropic", "claude-haiku-4-5-20251001"): "claude-haiku-4-5",
            ("anthropic", "claude-3-5-haiku-20241022"): "claude-3-5-haiku",
            ("anthropic", "claude-3-5-haiku-latest"): "claude-3-5-haiku",
            ("anthropic", "claude-opus-4-1-20250805"): "claude-opus-4-1",
            ("anthropic", "claude-opus-4-20250514"): "claude-opus-4-20250514",
            ("anthropic", "claude-opus-4-5-20251101"): "claude-opus-4-5",
            ("anthropic", "claude-opus-5-5"): "claude-opus-5-5",
            ("anthropic", "claude-3-7-sonnet-20250219"): "claude-3-7-sonnet",
            ("openai", "gpt-4o-2024-08-06"): "gpt-4o",
            ("openai", "gpt-4o-2024-05-13"): "gpt-4o-2024-05-13",
            ("openai", "gpt-4o-mini"): "gpt-4o-mini",
            ("openai", "gpt-4o-mini-2024-07-18"): "gpt-4o-mini",
            ("openai", "gpt-4.1-2025-04-14"): "gpt-4.1",
            ("openai", "gpt-4.1-mini-2025-04-14"): "gpt-4.1-mini",
            ("openai", "gpt-5-nano-2025-08-07"): "gpt-5-nano",
            ("openai", "gpt-5-2025-08-07"): "gpt-5",
            ("openai", "o3-2025-04-16"): "o3",
            ("openai", "o4-mini-2025-04-16"): "o4-mini",
            ("openai", "o3-mini"): "o3-mini",
            ("google", "gemini-2.5-pro"): "gemini-2.5-pro",
            ("google", "gemini-2.5-flash-lite"): "gemini-2.5-flash-lite",
            ("google", "gemini-2.5-flash-preview-09-2025"): "gemini-2.5-flash",
            ("xai", "grok-4-0709"): "grok-4",
            ("xai", "grok-4-fast-reasoning"): "grok-4-fast",
            ("xai", "grok-4-1-fast-non-reasoning"): "grok-4-1-fast",
            ("xai", "grok-3-mini"): "grok-3-mini",
            ("xai", "grok-code-fast-1"): "grok-code-fast-1",
            ("openrouter", "anthropic/claude-sonnet-4.5"): "anthropic/claude-sonnet-4.5",
            ("openrouter", "openai/gpt-4o-mini"): "openai/gpt-4o-mini",
            ("openrouter", "google/gemini-2.5-flash"): "google/gemini-2.5-flash",
        }
        for (provider, model), key in cases.items():
            self.assertIs(
                lookup(self.table, provider, model),
                self.table[provider][key],
                f"{provider}/{model}",
            )

    def test_longest_prefix_never_a_sibling(self) -> None:
        """
        C{gpt-4o-mini} is not priced as C{gpt-4o}, C{gpt-5.5} not as
        C{gpt-5}, C{claude-opus-5-5} not as C{claude-opus-5}.
        """
        t = self.table
        self.assertNotEqual(lookup(t, "openai", "gpt-4o-mini"), t["openai"]["gpt-4o"])
        self.assertEqual(lookup(t, "openai", "gpt-4o-mini").input, 0.15)
        self.assertEqual(lookup(t, "openai", "gpt-5.5").input, 5.0)
        self.assertEqual(lookup(t, "anthropic", "claude-opus-5-5").input, 4.0)
        self.assertEqual(lookup(t, "anthropic", "claude-opus-5").input, 5.0)
        self.assertEqual(lookup(t, "anthropic", "claude-sonnet-4-6").max_output_tokens, 128000)

    def test_unknown_versions_are_not_guessed(self) -> None:
        """
        A model whose id merely starts like a priced one, without a
        separator, is unpriced: the next version must be priced
        explicitly, not billed at its predecessor's rate.
        """
        t = self.table
        for provider, model in [
            ("openai", "gpt-5.9"),
            ("openai", "gpt-4x"),
            ("openai", "o3x-mini"),
            ("anthropic", "claude-opus-4"),
            ("anthropic", "claude-haiku-3-5"),
            ("openrouter", "anthropic/claude-sonnet-4.9"),
            ("google", "gemini-2.5"),
            ("xai", "grok-4.9"),
        ]:
            self.assertIsNone(lookup(t, provider, model), f"{provider}/{model}")


class LookupTests(SynchronousTestCase):
    """
    L{lookup} on a small table.
    """

    table = {
        "openai": {
            "gpt-4o": Price(2.5, 10.0),
            "gpt-4o-mini": Price(0.15, 0.6),
            "gpt-4": Price(30.0, 60.0),
        },
        "openrouter": {"anthropic/claude-sonnet-4": Price(3.0, 15.0), "vendor/": Price(1.0, 1.0)},
    }

    def test_exact(self) -> None:
        self.assertEqual(lookup(self.table, "openai", "gpt-4o"), Price(2.5, 10.0))

    def test_longest_prefix(self) -> None:
        """
        The longest key wins; a dated suffix, a snapshot tag or a variant
        tag all start at a boundary.
        """
        self.assertEqual(lookup(self.table, "openai", "gpt-4o-mini-2024-07-18").input, 0.15)
        self.assertEqual(lookup(self.table, "openai", "gpt-4o-2024-08-06").input, 2.5)
        self.assertEqual(lookup(self.table, "openai", "gpt-4-0613").input, 30.0)
        self.assertEqual(lookup(self.table, "openai", "gpt-4o@2024").input, 2.5)
        self.assertEqual(
            lookup(self.table, "openrouter", "anthropic/claude-sonnet-4:beta").input, 3.0
        )

    def test_not_inside_a_name(self) -> None:
        """
        A key is not a prefix match when the id continues with a letter, a
        digit or a dot.
        """
        self.assertIsNone(lookup(self.table, "openai", "gpt-4.1"))
        self.assertIsNone(lookup(self.table, "openai", "gpt-40"))
        self.assertEqual(lookup(self.table, "openai", "gpt-4o-max").input, 2.5)
        self.assertIsNone(lookup(self.table, "openrouter", "anthropic/claude-sonnet-4.5"))

    def test_key_ending_in_separator(self) -> None:
        """
        An operator key that ends in a separator prices everything under it.
        """
        self.assertEqual(lookup(self.table, "openrouter", "vendor/any-model").input, 1.0)

    def test_provider_case_insensitive_model_case_sensitive(self) -> None:
        self.assertEqual(lookup(self.table, "OpenAI", "gpt-4o").input, 2.5)
        self.assertEqual(lookup(self.table, " openai ", "gpt-4o").input, 2.5)
        self.assertIsNone(lookup(self.table, "openai", "GPT-4o"))

    def test_unknown_and_junk(self) -> None:
        self.assertIsNone(lookup(self.table, "nobody", "gpt-4o"))
        self.assertIsNone(lookup(self.table, "openai", "claude"))
        self.assertIsNone(lookup(self.table, "openai", ""))
        self.assertIsNone(lookup(self.table, None, "gpt-4o"))
        self.assertIsNone(lookup(self.table, "openai", None))
        self.assertIsNone(lookup(self.table, "openai", "gpt"))


class ComputeCostTests(SynchronousTestCase):
    """
    L{compute_cost}, to the cent and beyond, with the packaged prices.
    """

    def setUp(self) -> None:
        self.table = packaged_table()

    def cost(self, provider: str, model: str, **usage: Any) -> tuple[float, bool]:
        return compute_cost(lookup(self.table, provider, model), Usage(seen=True, **usage))

    def test_openai_cached_tokens(self) -> None:
        """
        OpenAI: 10,000 prompt tokens of which 4,000 cached, 500 completion
        tokens on gpt-4o: 6,000 x $2.50 + 4,000 x $1.25 + 500 x $10 per
        million = $0.025.  gpt-5's cache discount is 90%.
        """
        self.assertEqual(
            self.cost("openai", "gpt-4o-2024-08-06", input_tokens=6000,
                      cache_read_tokens=4000, output_tokens=500),
            (0.025, True),
        )
        # 100,000 uncached x 1.25 + 900,000 cached x 0.125 + 10,000 x 10
        self.assertEqual(
            self.cost("openai", "gpt-5", input_tokens=100_000,
                      cache_read_tokens=900_000, output_tokens=10_000),
            (0.125 + 0.1125 + 0.1, True),
        )

    def test_anthropic_cache_read_and_write(self) -> None:
        """
        Anthropic, claude-sonnet-4-5: 1,000 input x $3 + 20,000 cache reads
        x $0.30 + 5,000 cache writes x $3.75 + 800 output x $15 per million
        = $0.03975.
        """
        self.assertEqual(
            self.cost("anthropic", "claude-sonnet-4-5-20250929", input_tokens=1000,
                      cache_read_tokens=20_000, cache_write_tokens=5000, output_tokens=800),
            (0.03975, True),
        )

    def test_gemini_long_context(self) -> None:
        """
        gemini-2.5-pro: above 200,000 prompt tokens the whole request costs
        $2.50 input and $15 output per million instead of $1.25 and $10; at
        exactly 200,000 it does not.
        """
        self.assertEqual(
            self.cost("google", "gemini-2.5-pro", input_tokens=100_000, output_tokens=10_000),
            (0.225, True),
        )
        self.assertEqual(
            self.cost("google", "gemini-2.5-pro", input_tokens=200_000, output_tokens=10_000),
            (0.35, True),
        )
        self.assertEqual(
            self.cost("google", "gemini-2.5-pro", input_tokens=250_000, output_tokens=10_000),
            (0.775, True),
        )

    def test_long_context_counts_cached_tokens(self) -> None:
        """
        The threshold applies to all prompt tokens, cache reads and writes
        included, and the multiplier applies to the cache rates too: Haiku
        5.5 with 50,000 input and 60,000 cache reads is over 100,000, so
        every rate is 5x.
        """
        usage = dict(input_tokens=50_000, cache_read_tokens=60_000, output_tokens=1000)
        # 50,000 x 0.50 + 60,000 x 0.05 + 1,000 x 2.50 per million
        self.assertEqual(self.cost("anthropic", "claude-haiku-5-5", **usage), (0.0305, True))
        usage["cache_read_tokens"] = 50_000
        # At 100,000 exactly, the base rates: 50,000 x 0.10 + 50,000 x 0.01 + 1,000 x 0.50
        self.assertEqual(self.cost("anthropic", "claude-haiku-5-5", **usage), (0.006, True))

    def test_cache_rates_default_to_input(self) -> None:
        price = Price(input=2.0, output=4.0)
        self.assertEqual(
            compute_cost(price, Usage(input_tokens=1, cache_read_tokens=2,
                                      cache_write_tokens=3, output_tokens=4)),
            (round((6 * 2.0 + 4 * 4.0) / 1e6, 10), True),
        )

    def test_long_context_rule(self) -> None:
        price = Price(input=1.0, output=2.0, cache_read=0.5, cache_write=1.5,
                      long_context=LongContext(10, 3.0, 5.0))
        self.assertEqual(
            compute_cost(price, Usage(input_tokens=5, cache_read_tokens=3,
                                      cache_write_tokens=3, output_tokens=1_000_000)),
            (round((5 * 3.0 + 3 * 1.5 + 3 * 4.5) / 1e6 + 10.0, 10), True),
        )

    def test_rounded(self) -> None:
        """
        Float noise (0.1 + 0.2) does not survive: results are rounded to 10
        decimal places.
        """
        price = Price(input=0.1, output=0.2)
        cost, _ = compute_cost(price, Usage(input_tokens=1_000_000, output_tokens=1_000_000))
        self.assertEqual(cost, 0.3)
        self.assertEqual(repr(cost), "0.3")

    def test_reported_cost_wins(self) -> None:
        """
        A provider-reported cost is the cost, priced, whatever the table
        says, even for an unknown model.
        """
        self.assertEqual(
            self.cost("openrouter", "anthropic/claude-sonnet-4.5", input_tokens=1000,
                      output_tokens=1000, reported_cost_usd=0.0123),
            (0.0123, True),
        )
        self.assertEqual(compute_cost(None, Usage(reported_cost_usd=0.5)), (0.5, True))
        self.assertEqual(compute_cost(None, Usage(reported_cost_usd=0)), (0.0, True))

    def test_bad_reported_cost_ignored(self) -> None:
        """
        A negative or non-finite reported cost is ignored: the table prices
        the request, or it is unpriced.
        """
        price = Price(input=1.0, output=1.0)
        for bad in (-1.0, float("nan"), float("inf")):
            self.assertEqual(
                compute_cost(price, Usage(input_tokens=1_000_000, reported_cost_usd=bad)),
                (1.0, True),
            )
            self.assertEqual(compute_cost(None, Usage(reported_cost_usd=bad)), (0.0, False))

    def test_unknown_model_unpriced(self) -> None:
        self.assertEqual(self.cost("openai", "gpt-unknown", input_tokens=10), (0.0, False))
        self.assertEqual(self.cost("nobody", "gpt-4o", input_tokens=10), (0.0, False))

    def test_zero_usage(self) -> None:
        self.assertEqual(self.cost("openai", "gpt-4o", input_tokens=0), (0.0, True))


class ParseTableTests(SynchronousTestCase):
    """
    L{parse_table} validates and names what is wrong.
    """

    def assertProblem(self, doc: Any, *fragments: str) -> None:
        with self.assertRaises(PricingError) as e:
            parse_table(doc, "/etc/prices.json")
        message = str(e.exception)
        self.assertIn("/etc/prices.json", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_minimal(self) -> None:
        self.assertEqual(
            parse_table({"OpenAI": {"m": {"input": 1, "output": 2}}}, "x"),
            {"openai": {"m": Price(1.0, 2.0)}},
        )
        self.assertEqual(parse_table({}, "x"), {})

    def test_full_entry(self) -> None:
        doc = {
            "updated": "2026-01-01",
            "sources": {"p": "https://example"},
            "_comment": "ignored",
            "p": {"m": {"input": 1, "output": 2, "cache_read": 0.1, "cache_write": 1.25,
                        "long_context": {"threshold_input_tokens": 200000,
                                         "input_multiplier": 2, "output_multiplier": 1.5},
                        "max_output_tokens": 8192, "note": "free text", "_why": "comment"}},
        }
        self.assertEqual(
            parse_table(doc, "x")["p"]["m"],
            Price(1.0, 2.0, 0.1, 1.25, LongContext(200000, 2.0, 1.5), 8192),
        )

    def test_zero_allowed(self) -> None:
        """
        A local model can be priced at zero: priced, not unpriced.
        """
        table = parse_table({"ollama": {"llama3": {"input": 0, "output": 0}}}, "x")
        self.assertEqual(
            compute_cost(lookup(table, "ollama", "llama3:8b"), Usage(input_tokens=5)),
            (0.0, True),
        )

    def test_errors_name_source_provider_and_model(self) -> None:
        self.assertProblem([], "JSON object")
        self.assertProblem({"openai": []}, "'openai'")
        self.assertProblem({"openai": {"gpt-x": []}}, "openai/gpt-x", "object")
        self.assertProblem({"openai": {"gpt-x": {"input": 1}}}, "openai/gpt-x", "'output'")
        self.assertProblem({"openai": {"gpt-x": {"output": 1}}}, "openai/gpt-x", "'input'")
        self.assertProblem({"OpenAI": {"gpt-x": {"input": -1, "output": 1}}},
                           "openai/gpt-x", "'input'")
        self.assertProblem({"openai": {"gpt-x": {"input": "1", "output": 1}}}, "'input'")
        self.assertProblem({"openai": {"gpt-x": {"input": True, "output": 1}}}, "'input'")
        self.assertProblem({"openai": {"gpt-x": {"input": 1, "output": float("nan")}}},
                           "'output'")
        self.assertProblem({"openai": {"gpt-x": {"input": 1, "output": 1, "cache_read": -2}}},
                           "'cache_read'")
        self.assertProblem({"openai": {"gpt-x": {"input": 1, "output": 1, "cache_reads": 2}}},
                           "openai/gpt-x", "unknown", "cache_reads")
        self.assertProblem({"openai": {"gpt-x": {"input": 1, "output": 1,
                                                 "max_output_tokens": 1.5}}},
                           "'max_output_tokens'")
        self.assertProblem({"openai": {"gpt-x": {"input": 1, "output": 1, "note": 3}}}, "'note'")
        self.assertProblem({"openai": {"": {"input": 1, "output": 1}}}, "empty")
        self.assertProblem({"openai": {" m": {"input": 1, "output": 1}}}, "spaces")
        self.assertProblem({"openai": {}, "OPENAI": {}}, "twice")
        self.assertProblem({" ": {}}, "empty provider")
        self.assertProblem({"updated": 2026}, "'updated'")
        self.assertProblem({"sources": ["x"]}, "'sources'")

    def test_long_context_errors(self) -> None:
        def doc(rule: Any) -> dict:
            return {"google": {"g": {"input": 1, "output": 1, "long_context": rule}}}

        good = {"threshold_input_tokens": 1, "input_multiplier": 2, "output_multiplier": 2}
        self.assertProblem(doc([]), "google/g", "'long_context'")
        self.assertProblem(doc({**good, "threshold_input_tokens": "200k"}), "threshold")
        self.assertProblem(doc({**good, "threshold_input_tokens": -1}), "threshold")
        self.assertProblem(doc({**good, "input_multiplier": 0}), "input_multiplier")
        self.assertProblem(doc({k: v for k, v in good.items() if k != "output_multiplier"}),
                           "output_multiplier")
        self.assertProblem(doc({**good, "extra": 1}), "extra")

    def test_merge(self) -> None:
        base = {"openai": {"a": Price(1, 1), "b": Price(2, 2)}}
        override = {"openai": {"b": Price(3, 3), "c": Price(4, 4)}, "new": {"x": Price(5, 5)}}
        merged = merge_tables(base, override)
        self.assertEqual(
            merged,
            {"openai": {"a": Price(1, 1), "b": Price(3, 3), "c": Price(4, 4)},
             "new": {"x": Price(5, 5)}},
        )
        self.assertEqual(base, {"openai": {"a": Price(1, 1), "b": Price(2, 2)}})


class PricingServiceTests(SynchronousTestCase):
    """
    L{Pricing}: the packaged table, the override file and its reloading.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[dict] = []
        self.log = Logger(observer=self.events.append)
        self.path = self.mktemp()

    def make(self, path: str | None = "default", interval: float = 5.0) -> Pricing:
        return Pricing(
            self.clock,
            override_path=self.path if path == "default" else path,
            recheck_interval=interval,
            log=self.log,
        )

    def messages(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IPricing, self.make(None)))

    def test_packaged_only(self) -> None:
        p = self.make(None)
        self.assertEqual(p.price("openai", "gpt-4o").input, 2.5)
        self.assertEqual(p.price("OPENAI", "gpt-4o-mini-2024-07-18").input, 0.15)
        self.assertEqual(p.updated, packaged_document()["updated"])
        self.assertIn("anthropic", p.sources)
        self.assertEqual(
            p.cost("anthropic", "claude-sonnet-4-5-20250929",
                   Usage(input_tokens=1000, cache_read_tokens=20_000,
                         cache_write_tokens=5000, output_tokens=800)),
            (0.03975, True),
        )
        self.assertEqual(p.cost("openai", "nope", Usage(input_tokens=5)), (0.0, False))
        self.assertEqual(p.cost("openai", "nope", Usage(reported_cost_usd=0.2)), (0.2, True))
        self.assertEqual(self.events, [])

    def test_max_output_tokens(self) -> None:
        p = self.make(None)
        self.assertEqual(p.max_output_tokens("openai", "gpt-4o-2024-08-06"), 16384)
        self.assertEqual(p.max_output_tokens("anthropic", "claude-haiku-4-5-20251001"), 64000)
        self.assertIsNone(p.max_output_tokens("openai", "nope"))

    def test_unpriced_hint(self) -> None:
        """
        The hint names the model and carries a JSON snippet an operator can
        paste into the override file, which parses as a valid table.
        """
        hint = self.make().unpriced_hint("OpenAI", 'my-"odd"-model')
        self.assertIn("openai/", hint)
        self.assertIn(self.path, hint)
        snippet = json.loads(re.search(r"add (\{.*\}) to", hint).group(1))
        table = parse_table(snippet, "hint")
        self.assertIsNotNone(lookup(table, "openai", 'my-"odd"-model'))
        self.assertIn(pricing.PRICING_FILE_ENV, self.make(None).unpriced_hint("x", "y"))

    def test_override_merged_over_packaged(self) -> None:
        """
        The override adds providers and models and replaces a model's price
        as a whole; the rest of the packaged table stays.
        """
        write_json(self.path, {
            "OpenAI": {"gpt-4o": {"input": 1, "output": 2}, "my-ft": {"input": 3, "output": 4}},
            "Ollama": {"llama3": {"input": 0, "output": 0}},
        })
        p = self.make()
        self.assertEqual(p.price("openai", "gpt-4o-2024-08-06"), Price(1.0, 2.0))
        self.assertEqual(p.price("openai", "my-ft"), Price(3.0, 4.0))
        self.assertEqual(p.price("openai", "gpt-4o-mini").input, 0.15)
        self.assertEqual(p.price("anthropic", "claude-haiku-4-5").input, 1.0)
        self.assertEqual(p.cost("ollama", "llama3:70b", Usage(input_tokens=9)), (0.0, True))
        self.assertTrue(any("loaded" in m for m in self.messages()))

    def test_reload_on_change(self) -> None:
        """
        A changed override is picked up at the first lookup after the
        recheck interval, not before.
        """
        write_json(self.path, {"openai": {"gpt-4o": {"input": 1, "output": 2}}})
        p = self.make()
        self.assertEqual(p.price("openai", "gpt-4o").input, 1.0)
        write_json(self.path, {"openai": {"gpt-4o": {"input": 7, "output": 8}}})
        bump_mtime(self.path)
        self.clock.advance(4.9)
        self.assertEqual(p.price("openai", "gpt-4o").input, 1.0)
        self.clock.advance(0.1)
        self.assertEqual(p.price("openai", "gpt-4o").input, 7.0)
        self.assertEqual(p.cost("openai", "gpt-4o", Usage(output_tokens=1_000_000)), (8.0, True))

    def test_reads_only_on_change(self) -> None:
        """
        Between changes a recheck is a C{stat}; the file is read again only
        when its signature changed.
        """
        write_json(self.path, {"openai": {"gpt-4o": {"input": 1, "output": 2}}})
        reads = []
        original = pricing._read_json_file

        def counting(path: str):
            reads.append(path)
            return original(path)

        self.patch(pricing, "_read_json_file", counting)
        p = self.make()
        for _ in range(5):
            self.clock.advance(10)
            p.price("openai", "gpt-4o")
        self.assertEqual(len(reads), 1)
        bump_mtime(self.path)
        self.clock.advance(10)
        p.price("openai", "gpt-4o")
        self.assertEqual(len(reads), 2)

    def test_lookups_cached(self) -> None:
        """
        A repeated lookup does not scan the table again; a reload drops the
        cache.
        """
        calls = []
        original = pricing.lookup

        def counting(*args: Any):
            calls.append(args[1:])
            return original(*args)

        self.patch(pricing, "lookup", counting)
        write_json(self.path, {})
        p = self.make()
        for _ in range(3):
            p.price("openai", "gpt-4o-2024-08-06")
            p.price("openai", "unknown-model")
        self.assertEqual(len(calls), 2)
        write_json(self.path, {"openai": {"unknown-model": {"input": 1, "output": 1}}})
        bump_mtime(self.path)
        self.clock.advance(5)
        self.assertEqual(p.price("openai", "unknown-model").input, 1.0)
        self.assertEqual(len(calls), 3)

    def test_cache_bounded(self) -> None:
        self.patch(pricing, "MAX_CACHED_LOOKUPS", 10)
        p = self.make(None)
        for i in range(25):
            p.price("openai", f"made-up-{i}")
        self.assertLessEqual(len(p._cache), 10)

    def test_broken_override_keeps_previous_table(self) -> None:
        """
        A broken override is logged once, naming the problem, and the
        previous table stays in force until the file is fixed.
        """
        write_json(self.path, {"openai": {"gpt-4o": {"input": 1, "output": 2}}})
        p = self.make()
        with open(self.path, "w") as f:
            f.write('{"openai": {"gpt-4o": {"input": 5, ')
        bump_mtime(self.path)
        self.clock.advance(5)
        self.assertEqual(p.price("openai", "gpt-4o").input, 1.0)
        errors = [m for m in self.messages() if "ignored" in m]
        self.assertEqual(len(errors), 1)
        self.assertIn("not valid JSON", errors[0])
        self.clock.advance(5)
        p.price("openai", "gpt-4o")
        self.assertEqual(len([m for m in self.messages() if "ignored" in m]), 1)

        write_json(self.path, {"openai": {"gpt-4o": {"input": -5, "output": 2}}})
        bump_mtime(self.path, 20)
        self.clock.advance(5)
        self.assertEqual(p.price("openai", "gpt-4o").input, 1.0)
        self.assertIn("openai/gpt-4o", [m for m in self.messages() if "ignored" in m][-1])

        write_json(self.path, {"openai": {"gpt-4o": {"input": 6, "output": 7}}})
        bump_mtime(self.path, 30)
        self.clock.advance(5)
        self.assertEqual(p.price("openai", "gpt-4o").input, 6.0)

    def test_broken_override_at_start(self) -> None:
        """
        A broken override at start leaves the packaged table; the daemon
        starts.
        """
        with open(self.path, "w") as f:
            f.write("not json")
        p = self.make()
        self.assertEqual(p.price("openai", "gpt-4o").input, 2.5)
        self.assertTrue(any("ignored" in m for m in self.messages()))

    def test_override_not_an_object_or_not_a_file(self) -> None:
        write_json(self.path, [1, 2])
        self.assertEqual(self.make().price("openai", "gpt-4o").input, 2.5)
        os.remove(self.path)
        os.makedirs(self.path)
        self.assertEqual(self.make().price("openai", "gpt-4o").input, 2.5)
        self.assertTrue(any("regular file" in m for m in self.messages()))

    def test_override_too_large(self) -> None:
        self.patch(pricing, "MAX_OVERRIDE_FILE_BYTES", 10)
        write_json(self.path, {"openai": {"gpt-4o": {"input": 1, "output": 2}}})
        self.assertEqual(self.make().price("openai", "gpt-4o").input, 2.5)
        self.assertTrue(any("larger than" in m for m in self.messages()))

    def test_override_appears_and_disappears(self) -> None:
        """
        An override that does not exist yet is picked up when it appears;
        when it is removed the packaged table is back.
        """
        p = self.make()
        self.assertTrue(any("does not exist" in m for m in self.messages()))
        self.assertEqual(p.price("openai", "gpt-4o").input, 2.5)
        write_json(self.path, {"openai": {"gpt-4o": {"input": 1, "output": 2}}})
        self.clock.advance(5)
        self.assertEqual(p.price("openai", "gpt-4o").input, 1.0)
        os.remove(self.path)
        self.clock.advance(5)
        self.assertEqual(p.price("openai", "gpt-4o").input, 2.5)
        self.assertTrue(any("is gone" in m for m in self.messages()))

    def test_no_override_never_stats(self) -> None:
        stats = []
        self.patch(pricing, "file_signature", lambda path: stats.append(path))
        p = self.make(None)
        self.clock.advance(100)
        p.price("openai", "gpt-4o")
        self.assertEqual(stats, [])
