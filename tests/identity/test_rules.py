"""An agent's rules.json, named to the policy sidecar by path and digest."""

from __future__ import annotations

import hashlib
import os

from twisted.internet import task
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.identity.rules import RulesRefs


class Rules(SynchronousTestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "rules.json")
        self.refs = RulesRefs(self.clock)

    def write(self, data: bytes) -> str:
        with open(self.path, "wb") as f:
            f.write(data)
        return hashlib.sha256(data).hexdigest()

    def test_none(self):
        self.assertEqual(self.refs.get(self.directory), ("", ""))

    def test_path_and_digest_kept_fresh(self):
        first = self.write(b'{"version":1,"rules":[]}')
        self.assertEqual(self.refs.get(self.directory), (self.path, first))
        second = self.write(b'{"version":1,"rules":[{"id":"a"}]}')
        # Looked at again at most once a second.
        self.assertEqual(self.refs.get(self.directory), (self.path, first))
        self.clock.advance(1.0)
        self.assertEqual(self.refs.get(self.directory), (self.path, second))
        os.remove(self.path)
        self.clock.advance(1.0)
        self.assertEqual(self.refs.get(self.directory), ("", ""))
