"""docs/SPEC.md states the ingress matrix: it must match the code."""

import os
import re

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.surfaces import matrix

SPEC = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "SPEC.md")


def table(text, name):
    block = re.search(rf"<!-- {name}:start -->(.*?)<!-- {name}:end -->", text, re.S).group(1)
    rows = [line.strip().strip("|").split("|") for line in block.strip().splitlines()[2:]]
    return {left.strip(): right.strip() for left, right in rows}


class SpecDocTests(SynchronousTestCase):
    def setUp(self):
        with open(SPEC, encoding="utf-8") as f:
            self.text = f.read()

    def test_matrix_matches_the_code(self):
        self.assertEqual(table(self.text, "matrix"), matrix.describe()["providers"])

    def test_aliases_match_the_code(self):
        self.assertEqual(table(self.text, "aliases"), dict(matrix.ALIASES))

    def test_synthetic_prefixes_are_documented(self):
        for prefix in matrix.SYNTHETIC_PREFIXES:
            self.assertIn(f"`{prefix}/...`", self.text)

    def test_families_match_the_code(self):
        from cllama_tx.governance.resolution import DEFAULT_FAMILIES

        self.assertEqual(table(self.text, "families"), dict(DEFAULT_FAMILIES))

    def test_resolution_order_is_one_table_in_both_documents(self):
        configuration = os.path.join(os.path.dirname(SPEC), "CONFIGURATION.md")
        with open(configuration, encoding="utf-8") as f:
            other = f.read()
        pattern = r"<!-- resolution:start -->(.*?)<!-- resolution:end -->"
        here, there = re.search(pattern, self.text, re.S).group(1), re.search(pattern, other, re.S).group(1)
        self.assertEqual(here, there)
        from cllama_tx.governance import resolution

        for rule in (resolution.KEY_ALIAS, resolution.TEAM_ALIAS, resolution.MODEL_TABLE, resolution.BARE_FAMILY,
                     resolution.BARE_SURFACE, resolution.OPENROUTER_FALLBACK, "dated_model_normalized",
                     resolution.MAPPING, resolution.LLM_MAPPING, "llm_resolver"):
            self.assertIn(f"`{rule}`", here)
