"""The Responses surface's memory of translated answers: per agent, bounded, forgetting on time."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.surfaces.responses_state import (
    ConversationStore,
    conversation_after,
    expand,
    input_items,
)

ITEM = {"type": "message", "role": "user", "content": "x" * 80}


class Helpers(SynchronousTestCase):
    def test_input_items(self):
        self.assertEqual(input_items({"input": "hi"}), [{"type": "message", "role": "user", "content": "hi"}])
        self.assertEqual(input_items({"input": [ITEM]}), [ITEM])
        self.assertEqual(input_items({}), [])

    def test_expand(self):
        doc = {"model": "m", "previous_response_id": "resp_1", "input": "next"}
        out = expand(doc, [ITEM])
        self.assertEqual(out, {"model": "m", "input": [ITEM, {"type": "message", "role": "user", "content": "next"}]})
        self.assertIn("previous_response_id", doc)

    def test_conversation_after_keeps_messages_and_calls(self):
        output = [{"type": "reasoning", "id": "r"}, {"type": "message", "id": "m"}, {"type": "function_call", "id": "f"}]
        self.assertEqual(
            conversation_after({"input": "q"}, {"output": output}),
            [{"type": "message", "role": "user", "content": "q"}, output[1], output[2]],
        )


class Store(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()

    def test_agents_see_only_their_own(self):
        store = ConversationStore(self.clock)
        store.put("a", "resp_1", [ITEM])
        self.assertEqual(store.get("a", "resp_1"), [ITEM])
        self.assertIsNone(store.get("b", "resp_1"))
        self.assertIsNone(store.get("a", "resp_2"))
        self.assertIsNone(store.get("a", None))

    def test_count_per_agent(self):
        store = ConversationStore(self.clock, max_per_agent=3)
        for n in range(5):
            store.put("a", f"resp_{n}", [ITEM])
        store.put("b", "resp_b", [ITEM])
        self.assertEqual([store.get("a", f"resp_{n}") is not None for n in range(5)], [False, False, True, True, True])
        self.assertEqual(len(store), 4)

    def test_least_recently_used_goes_first(self):
        store = ConversationStore(self.clock, max_per_agent=2)
        store.put("a", "resp_1", [ITEM])
        store.put("a", "resp_2", [ITEM])
        store.get("a", "resp_1")
        store.put("a", "resp_3", [ITEM])
        self.assertIsNotNone(store.get("a", "resp_1"))
        self.assertIsNone(store.get("a", "resp_2"))

    def test_bytes_per_agent_and_in_all(self):
        size = len('[{"type":"message","role":"user","content":"' + "x" * 80 + '"}]')
        store = ConversationStore(self.clock, max_agent_bytes=size * 2, max_total_bytes=size * 3)
        for n in range(3):
            store.put("a", f"resp_{n}", [ITEM])
        self.assertIsNone(store.get("a", "resp_0"))
        store.put("b", "resp_b1", [ITEM])
        store.put("b", "resp_b2", [ITEM])
        self.assertLessEqual(store.total_bytes, size * 3)
        self.assertEqual(len(store), 3)
        self.assertIsNone(store.get("a", "resp_1"))  # the oldest anywhere
        self.assertFalse(store.put("a", "resp_big", [ITEM] * 3))  # larger than an agent may keep
        self.assertIsNone(store.get("a", "resp_big"))

    def test_retention_after_last_use(self):
        store = ConversationStore(self.clock, retention=100)
        store.put("a", "resp_1", [ITEM])
        store.put("a", "resp_2", [ITEM])
        self.clock.advance(60)
        store.get("a", "resp_1")
        self.clock.advance(60)
        self.assertIsNotNone(store.get("a", "resp_1"))
        self.assertIsNone(store.get("a", "resp_2"))
        self.clock.advance(101)
        self.assertIsNone(store.get("a", "resp_1"))
        self.assertEqual((len(store), store.total_bytes), (0, 0))

    def test_putting_an_id_again_replaces_it(self):
        store = ConversationStore(self.clock)
        store.put("a", "resp_1", [ITEM])
        store.put("a", "resp_1", [ITEM, ITEM])
        self.assertEqual(store.get("a", "resp_1"), [ITEM, ITEM])
        self.assertEqual(len(store), 1)
