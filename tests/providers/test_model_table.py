"""
The operator model table: LiteLLM's model_list as it is written, its
deployments as providers of the registry, their prices, reloads.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.accounting.pricing import Pricing
from cllama_tx.providers.model_table import (
    ModelTableError,
    ModelTableFile,
    parse_model_table,
    read_model_table,
)
from cllama_tx.providers.registry import ProviderNotConfigured, ProviderRegistry, UnknownProvider
from cllama_tx.store.records import Usage
from cllama_tx.surfaces.matrix import split_model_ref
from tests.secret_scan import SCANNER

TABLE_KEY = "sk-table-entry-key-7777"
SCANNER.register(TABLE_KEY)

# A LiteLLM proxy config, as LiteLLM's documentation writes one.
LITELLM_CONFIG = """
model_list:
  - model_name: gpt-4
    litellm_params:
      model: openai/gpt-4o
  - model_name: fake-openai-endpoint
    litellm_params:
      model: openai/fake
      api_base: https://exampleopenaiendpoint-production.up.railway.app/
      api_key: os.environ/FAKE_OPENAI_KEY
  - model_name: fake-openai-endpoint
    litellm_params:
      model: openai/fake
      api_base: http://127.0.0.1:9/v1
  - model_name: claude
    litellm_params:
      model: anthropic/claude-sonnet-4-5
      api_base: http://claude.internal
      input_cost_per_token: 0.000003
      output_cost_per_token: 0.000015
  - model_name: azure-models
    litellm_params:
      model: azure/gpt-4o
      api_base: os.environ/AZURE_API_BASE
      api_key: os.environ/AZURE_API_KEY
  - model_name: local-llama
    litellm_params:
      model: hosted_vllm/meta-llama/Llama-3-8B
      api_base: http://vllm:8000/v1
  - model_name: needs-key
    litellm_params:
      model: openai/gpt-4o-mini
      api_key: os.environ/NOT_SET_ANYWHERE
  - model_name: flash
    litellm_params:
      model: gemini-2.5-flash
router_settings:
  model_group_alias: {gpt-3.5-turbo: gpt-4, legacy: {model: claude, hidden: true}}
litellm_settings:
  drop_params: true
general_settings:
  master_key: os.environ/LITELLM_MASTER_KEY
model_families:
  mistral-*: mistral
"""

ENV = {"FAKE_OPENAI_KEY": TABLE_KEY, "AZURE_API_BASE": "https://x.openai.azure.com", "AZURE_API_KEY": "azure-secret-1"}


def parsed():
    import yaml

    return parse_model_table(yaml.safe_load(LITELLM_CONFIG), ENV, "table.yaml")


class ParseTests(SynchronousTestCase):
    def test_litellm_config_as_written(self):
        table = parsed()
        by_name = {d.public_name: d for d in table.deployments if d.public_name != "fake-openai-endpoint"}
        gpt4 = table.entries["gpt-4"]
        self.assertEqual(gpt4.refs, (split_model_ref("openai/gpt-4o"),))  # the registry's openai
        fake = table.entries["fake-openai-endpoint"]
        self.assertEqual([str(r) for r in fake.refs],
                         ["openai@fake-openai-endpoint/fake", "openai@fake-openai-endpoint-2/fake"])
        first = table.deployment("openai@fake-openai-endpoint")
        self.assertEqual(first.api_base, "https://exampleopenaiendpoint-production.up.railway.app")
        self.assertEqual((first.key_source, first.secret), ("env:FAKE_OPENAI_KEY", TABLE_KEY))
        self.assertNotIn(TABLE_KEY, repr(first))
        # LiteLLM's Anthropic api_base has no /v1; ours does.
        self.assertEqual(by_name["claude"].api_base, "http://claude.internal/v1")
        self.assertEqual((by_name["claude"].price.input, by_name["claude"].price.output), (3.0, 15.0))
        self.assertEqual(table.prices, {"anthropic@claude": {"claude-sonnet-4-5": by_name["claude"].price}})
        self.assertEqual(str(by_name["local-llama"].ref), "openai-compatible@local-llama/meta-llama/Llama-3-8B")
        self.assertEqual(str(table.entries["flash"].refs[0]), "google/gemini-2.5-flash")
        self.assertEqual(table.families.match("mistral-large"), ("mistral", "mistral-*"))
        self.assertEqual(table.entries["gpt-3.5-turbo"].alias_of, "gpt-4")
        self.assertEqual(table.entries["legacy"].refs, table.entries["claude"].refs)

    def test_entries_that_cannot_serve_keep_their_problem(self):
        table = parsed()
        self.assertEqual(table.entries["azure-models"].refs, ())
        self.assertIn("provider 'azure' (LiteLLM's) speaks a wire format cllama_tx does not",
                      table.entries["azure-models"].problem)
        self.assertEqual(table.entries["needs-key"].problem,
                         "the environment variable NOT_SET_ANYWHERE (api_key) is not set")
        snapshot_text = repr(table)
        self.assertNotIn("azure-secret-1", snapshot_text)

    def test_malformed_files_are_refused_whole(self):
        for doc, where in [
            ([], "must be a mapping"),
            ({"model_list": {}}, "'model_list' must be a list"),
            ({"model_list": [{"litellm_params": {"model": "openai/x"}}]}, "model_name must be a non-empty string"),
            ({"model_list": [{"model_name": "x"}]}, "litellm_params.model must be a non-empty string"),
            ({"model_list": [{"model_name": "x", "litellm_params": {"model": "openai/x", "input_cost_per_token": -1,
                                                                     "output_cost_per_token": 1}}]}, "non-negative"),
            ({"model_list": [{"model_name": "x", "litellm_params": {"model": "openai/x", "input_cost_per_token": 1}}]},
             "needs both"),
            ({"router_settings": {"model_group_alias": {"a": "nowhere"}}}, "not a model_name"),
            ({"model_families": {"a*b": "x"}}, "model_families"),
        ]:
            with self.assertRaises(ModelTableError) as caught:
                parse_model_table(doc, {}, "t.yaml")
            self.assertIn(where, str(caught.exception))
            self.assertTrue(str(caught.exception).startswith("t.yaml"))

    def test_read_file(self):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(LITELLM_CONFIG)
        self.assertIn("gpt-4", read_model_table(path, ENV).entries)
        with open(path, "w") as f:
            f.write("model_list: [\n")
        with self.assertRaises(ModelTableError) as caught:
            read_model_table(path, ENV)
        self.assertIn("not valid YAML", str(caught.exception))
        self.assertRaises(ModelTableError, read_model_table, path + ".missing", ENV)


class DeploymentRoutingTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.path = self.mktemp()
        with open(self.path, "w") as f:
            f.write(LITELLM_CONFIG)
        self.registry = ProviderRegistry({"OPENAI_API_KEY": "sk-openai-registry-1"}, None, self.clock)
        self.pricing = Pricing(self.clock)
        self.table = ModelTableFile(self.path, ENV, self.clock, registry=self.registry, pricing=self.pricing)

    def test_own_key_and_base_url(self):
        resolved = self.registry.resolve("openai@fake-openai-endpoint")
        self.assertEqual(resolved.spec.base_url, "https://exampleopenaiendpoint-production.up.railway.app")
        self.assertEqual((resolved.spec.api_format, resolved.spec.auth), ("openai", "bearer"))
        self.assertEqual([k.secret for k in resolved.pool.keys], [TABLE_KEY])
        self.assertIsNone(resolved.spec.organization)
        self.assertIs(self.registry.resolve("openai@fake-openai-endpoint"), resolved)  # cached
        # The table's keys are scrubbed from what providers send back.
        self.assertEqual(resolved.scrubber.scrub(f"bad key {TABLE_KEY}".encode()), b"bad key [redacted]")

    def test_borrowed_keys_and_formats(self):
        second = self.registry.resolve("openai@fake-openai-endpoint-2")
        self.assertIs(second.pool, self.registry.resolve("openai").pool)
        self.assertEqual(second.spec.base_url, "http://127.0.0.1:9/v1")
        local = self.registry.resolve("openai-compatible@local-llama")
        self.assertEqual((local.spec.auth, local.spec.base_url, local.pool.keyless), ("none", "http://vllm:8000/v1", True))
        with self.assertRaises(ProviderNotConfigured) as caught:  # borrows anthropic's keys: none
            self.registry.resolve("anthropic@claude")
        self.assertIn("ANTHROPIC_API_KEY", str(caught.exception))
        with self.assertRaises(ProviderNotConfigured) as caught:
            self.registry.resolve("openai@needs-key")
        self.assertIn("NOT_SET_ANYWHERE", str(caught.exception))
        self.assertRaises(UnknownProvider, self.registry.resolve, "openai@nothing")
        self.assertFalse(self.registry.configured("openai@fake-openai-endpoint"))  # not a registry provider

    def test_prices(self):
        usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
        self.assertEqual(self.pricing.cost("anthropic@claude", "claude-sonnet-4-5", usage), (18.0, True))
        # A deployment without a price of its own costs what its provider charges.
        self.assertEqual(self.pricing.cost("openai@fake-openai-endpoint", "gpt-4o", usage),
                         self.pricing.cost("openai", "gpt-4o", usage))

    def test_reload_and_a_broken_file_keeps_the_table(self):
        with open(self.path, "w") as f:
            f.write("model_list:\n  - model_name: only\n    litellm_params: {model: openai/gpt-4o-mini}\n")
        self.assertEqual(self.table.reload(), 1)
        self.assertEqual(list(self.table.current.entries), ["only"])
        self.assertEqual(self.pricing.price("anthropic@claude", "claude-sonnet-4-5"),
                         self.pricing.price("anthropic", "claude-sonnet-4-5"))  # its own price is gone
        with open(self.path, "w") as f:
            f.write("model_list: 3\n")
        self.assertRaises(ModelTableError, self.table.reload)
        self.assertEqual(list(self.table.current.entries), ["only"])

    def test_snapshot_names_key_sources_never_keys(self):
        snapshot = self.table.snapshot()
        text = repr(snapshot)
        self.assertNotIn(TABLE_KEY, text)
        self.assertNotIn("azure-secret-1", text)
        keys = {e["route"]: e["key"] for e in snapshot["entries"]}
        self.assertEqual(keys["openai@fake-openai-endpoint/fake"], "env:FAKE_OPENAI_KEY")
        self.assertEqual(keys["openai/gpt-4o"], "the provider's keys")
        self.assertEqual(snapshot["file"], self.path)
        self.assertTrue(os.path.isabs(self.path) or snapshot["file"])
