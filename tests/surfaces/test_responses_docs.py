"""docs/SPEC.md and docs/TRANSLATION.md state the Responses surface as the code has it."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.providers.catalog import RESPONSES_PROVIDERS
from cllama_tx.surfaces import matrix, responses_state

DOCS = os.path.join(os.path.dirname(__file__), "..", "..", "docs")


def read(name: str) -> str:
    with open(os.path.join(DOCS, name), encoding="utf-8") as f:
        return f.read()


class ResponsesDocs(SynchronousTestCase):
    def test_the_surface_row(self):
        path = matrix.SURFACE_PATHS[matrix.OPENAI_RESPONSES]
        self.assertIn(f"| `{matrix.OPENAI_RESPONSES}` | `POST {path}` |", read("SPEC.md"))

    def test_retention_is_the_codes(self):
        self.assertEqual(responses_state.RETENTION, 3600.0)
        stated = (
            "an hour",
            f"{responses_state.MAX_PER_AGENT} answers",
            f"{responses_state.MAX_AGENT_BYTES >> 20} MiB per",
            f"{responses_state.MAX_TOTAL_BYTES >> 20} MiB in all",
        )
        for doc in ("SPEC.md", "TRANSLATION.md"):
            text = " ".join(read(doc).split())
            for words in stated:
                self.assertIn(words, text, doc)

    def test_native_providers_are_named(self):
        text = read("TRANSLATION.md")
        for provider in RESPONSES_PROVIDERS:
            self.assertIn(f"(`{provider}`)", text)
