"""
aider (PyPI C{aider-chat}, in a virtual environment of its own), headless
(C{aider --message ... --yes-always}), with only C{OPENAI_API_BASE} and
C{OPENAI_API_KEY} pointed at the proxy.  aider's loop is an edit: the model
answers with a SEARCH/REPLACE block and aider applies it to the file.
"""

from __future__ import annotations

import os

from twisted.internet import defer
from twisted.trial.unittest import TestCase

from . import install
from .harness import CREDENTIALS, Expect, Loop, LoopAssertions
from .provider import ScriptedProvider

EDIT = (
    "greet.py\n```python\n<<<<<<< SEARCH\nprint(\"hello\")\n=======\n"
    "print(\"hello through the proxy\")\n>>>>>>> REPLACE\n```\n"
)


class AiderTests(LoopAssertions, TestCase):
    @defer.inlineCallbacks
    def test_edit_with_openai_base_url(self):
        provider = ScriptedProvider(marker="greet.py", choose=lambda tools: None, final_text="", edit_text=EDIT)
        loop = yield Loop(self, provider, ("OPENAI",)).start()
        with open(os.path.join(loop.work, "greet.py"), "w") as f:
            f.write('print("hello")\n')
        env = {"OPENAI_API_BASE": loop.daemon.api + "/v1", "OPENAI_API_KEY": CREDENTIALS}
        result = yield loop.run(install.AIDER, [
            "--model", "openai/gpt-4o", "--no-git", "--yes-always", "--no-check-update", "--analytics-disable",
            # aider keeps its histories at the root of the enclosing git checkout (this one):
            # keep them in the test's own directory.
            "--chat-history-file", os.path.join(loop.work, ".aider.chat.history.md"),
            "--input-history-file", os.path.join(loop.work, ".aider.input.history"),
            "--message", "In greet.py, print hello through the proxy instead.", "greet.py",
        ], env)
        rows = yield loop.finish()
        # aider strips its openai/ prefix and sends the bare name.
        self.check_loop(loop, result, rows, Expect(sent="gpt-4o", provider="openai", rule="bare_family"), kinds=("edit",))
        self.assertIn("Applied edit to greet.py", result.stdout)
        with open(os.path.join(loop.work, "greet.py")) as f:
            self.assertEqual(f.read(), 'print("hello through the proxy")\n')
