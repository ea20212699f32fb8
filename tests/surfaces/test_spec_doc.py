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
