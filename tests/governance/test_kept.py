"""KeptByIdentity: one value per object, never shared by an equal object, bounded."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.governance.kept import KeptByIdentity


class KeptByIdentityTests(SynchronousTestCase):
    def test_once_per_object(self) -> None:
        made = []
        kept: KeptByIdentity[tuple, str] = KeptByIdentity(lambda key: made.append(key) or ",".join(key))
        first = ("openai/gpt-4o", "anthropic/claude")
        self.assertEqual(kept(first), "openai/gpt-4o,anthropic/claude")
        self.assertEqual(kept(first), "openai/gpt-4o,anthropic/claude")
        self.assertEqual(made, [first])
        # An equal tuple that is another object is worked out again (its own entry).
        equal = tuple(list(first))
        self.assertIsNot(equal, first)
        kept(equal)
        self.assertEqual(len(made), 2)
        self.assertEqual(len(kept), 2)

    def test_bounded_and_cleared_whole(self) -> None:
        kept: KeptByIdentity[tuple, int] = KeptByIdentity(len, limit=3)
        keys = [tuple(range(n)) for n in range(4)]  # held, so their ids stay theirs
        for key in keys[:3]:
            kept(key)
        self.assertEqual(len(kept), 3)
        self.assertEqual(kept(keys[3]), 3)
        self.assertEqual(len(kept), 1)  # full: cleared, then this one kept
