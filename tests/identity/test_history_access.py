"""
L{cllama_tx.identity.history_access}: who may read an agent's history, as
the reference allows it (operator token, the agent's own credentials,
C{service-auth/*.json} replay tokens of service C{cllama-history}).
"""

from __future__ import annotations

import json
import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.identity import history_access
from cllama_tx.identity.contexts import ContextRegistry
from cllama_tx.identity.history_access import history_allowed, presented_token, replay_tokens

SECRET = "ab12" * 12


def write(path: str, doc) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(doc if isinstance(doc, str) else json.dumps(doc))


class PresentedTokenTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(presented_token(b"Bearer history-token", None), "history-token")
        self.assertEqual(presented_token(b"bearer  agent:secret ", None), "agent:secret")
        self.assertEqual(presented_token(None, b"agent:secret"), "agent:secret")
        # Authorization wins over x-api-key, and must be a bearer.
        self.assertIsNone(presented_token(b"Basic dXNlcjpwdw==", b"agent:secret"))
        self.assertIsNone(presented_token(b"Bearer", None))
        self.assertIsNone(presented_token(None, None))
        self.assertIsNone(presented_token(None, b"  "))
        self.assertIsNone(presented_token(b"Bearer \xff\xfe", None))


class AccessTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.root = self.mktemp()
        self.agent_dir = os.path.join(self.root, "tiverton")
        write(os.path.join(self.agent_dir, "metadata.json"), {"token": f"tiverton:{SECRET}"})
        auth = os.path.join(self.agent_dir, "service-auth")
        write(os.path.join(auth, "cllama-history.json"), {
            "service": "cllama-history", "auth_type": "bearer", "token": "history-token", "principal": "team-memory",
        })
        write(os.path.join(auth, "team-memory.json"), {"service": "team-memory", "auth_type": "bearer", "token": "memory-token"})
        write(os.path.join(auth, "basic.json"), {"service": "cllama-history", "auth_type": "basic", "token": "basic-token"})
        write(os.path.join(auth, "broken.json"), "{not json")
        write(os.path.join(auth, "empty.json"), {"service": "cllama-history", "auth_type": "bearer", "token": ""})
        write(os.path.join(auth, "notes.txt"), "history-token-in-a-text-file")
        write(os.path.join(self.root, "other", "metadata.json"), {"token": f"other:{SECRET}"})
        self.contexts = ContextRegistry(self.root, Clock())

    def allowed(self, token, agent="tiverton", operator=b"ui-token"):
        return history_allowed(token, agent, self.contexts, operator)

    def test_replay_tokens_of_the_history_service_only(self) -> None:
        self.assertEqual(replay_tokens(self.agent_dir), ["history-token"])
        self.assertEqual(replay_tokens(os.path.join(self.root, "other")), [])
        self.assertEqual(replay_tokens(os.path.join(self.root, "nobody")), [])

    def test_who_may_read(self) -> None:
        self.assertTrue(self.allowed("ui-token"))
        self.assertTrue(self.allowed(f"tiverton:{SECRET}"))
        self.assertTrue(self.allowed(SECRET))  # a metadata token may be the bare secret
        self.assertTrue(self.allowed("history-token"))
        for refused in ("memory-token", "basic-token", "", "wrong", f"tiverton:{SECRET}x", f"other:{SECRET}",
                        "history-token-in-a-text-file"):
            self.assertFalse(self.allowed(refused), refused)

    def test_another_agents_tokens_read_nothing_here(self) -> None:
        self.assertFalse(self.allowed("history-token", agent="other"))
        self.assertFalse(self.allowed(f"tiverton:{SECRET}", agent="other"))
        self.assertTrue(self.allowed(f"other:{SECRET}", agent="other"))

    def test_an_unknown_agent_is_readable_by_the_operator_only(self) -> None:
        self.assertTrue(self.allowed("ui-token", agent="gone"))
        self.assertFalse(self.allowed("history-token", agent="gone"))
        self.assertFalse(self.allowed(f"gone:{SECRET}", agent="gone"))

    def test_no_operator_token_configured(self) -> None:
        self.assertFalse(self.allowed("", operator=None))
        self.assertTrue(self.allowed("history-token", operator=None))

    def test_a_token_added_or_revoked_counts_at_once(self) -> None:
        path = os.path.join(self.agent_dir, "service-auth", "cllama-history.json")
        write(path, {"service": "cllama-history", "auth_type": "bearer", "token": "rotated-token"})
        self.assertFalse(self.allowed("history-token"))
        self.assertTrue(self.allowed("rotated-token"))
        os.remove(path)
        self.assertFalse(self.allowed("rotated-token"))

    def test_reads_are_bounded(self) -> None:
        self.patch(history_access, "MAX_SERVICE_AUTH_FILES", 2)
        # In name order: basic.json and broken.json fill the bound.
        self.assertEqual(replay_tokens(self.agent_dir), [])
        self.patch(history_access, "MAX_SERVICE_AUTH_FILES", 64)
        self.patch(history_access, "MAX_SERVICE_AUTH_BYTES", 16)
        self.assertEqual(replay_tokens(self.agent_dir), [])
