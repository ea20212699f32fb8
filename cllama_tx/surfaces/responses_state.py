"""
Conversation state for the Responses surface when the provider does not
keep it: the responses the proxy itself produced (by translation), per
agent, so that a follow-up turn naming one in C{previous_response_id} works.

A stored response is its whole conversation (the input items up to it and
its output items), so each entry stands alone and any one may be forgotten.
Memory only, and bounded: at most L{MAX_PER_AGENT} responses and
L{MAX_AGENT_BYTES} per agent, L{MAX_TOTAL_BYTES} in all, each kept
L{RETENTION} seconds after it was last used; the least recently used goes
first.  A restart forgets everything; with a shared store this memory is
the cache in front of L{cllama_tx.store.conversations}, so several
processes share them (C{docs/TRANSLATION.md}, "Conversation state").  C{store: false} keeps
nothing.  An agent only ever sees its own.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import attrs

__all__ = ["ConversationStore", "conversation_after", "expand", "input_items"]

MAX_PER_AGENT = 256
MAX_AGENT_BYTES = 8 << 20
MAX_TOTAL_BYTES = 128 << 20
RETENTION = 3600.0


def input_items(doc: dict) -> list:
    """A request's C{input} as a list of items (a string is one user message)."""
    value = doc.get("input")
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return list(value) if isinstance(value, list) else []


def expand(doc: dict, earlier: list) -> dict:
    """C{doc} with the stored conversation C{earlier} before its input and no C{previous_response_id}."""
    out = {k: v for k, v in doc.items() if k != "previous_response_id"}
    out["input"] = list(earlier) + input_items(doc)
    return out


#: Output items a later turn sends back as input.
_KEPT_OUTPUT = frozenset({"message", "function_call"})


def conversation_after(request: dict, response: dict) -> list:
    """The conversation a response closes: the request's input items, then its output items."""
    output = [item for item in response.get("output") or () if isinstance(item, dict) and item.get("type") in _KEPT_OUTPUT]
    return input_items(request) + output


@attrs.define
class _Entry:
    items: list
    size: int
    used: float


class ConversationStore:
    """The bounded, per-agent memory of the responses the proxy produced."""

    def __init__(
        self,
        clock,
        *,
        max_per_agent: int = MAX_PER_AGENT,
        max_agent_bytes: int = MAX_AGENT_BYTES,
        max_total_bytes: int = MAX_TOTAL_BYTES,
        retention: float = RETENTION,
    ) -> None:
        self._clock = clock
        self.max_per_agent = max_per_agent
        self.max_agent_bytes = max_agent_bytes
        self.max_total_bytes = max_total_bytes
        self.retention = retention
        self._agents: dict[str, OrderedDict[str, _Entry]] = {}
        self._agent_bytes: dict[str, int] = {}
        self._order: OrderedDict[tuple[str, str], None] = OrderedDict()  # least recently used first
        self.total_bytes = 0

    def __len__(self) -> int:
        return len(self._order)

    def get(self, agent: str, response_id: Any) -> list | None:
        """The conversation C{agent}'s response C{response_id} closed, or None."""
        self._expire()
        entries = self._agents.get(agent)
        entry = entries.get(response_id) if entries is not None and isinstance(response_id, str) else None
        if entry is None:
            return None
        entry.used = self._clock.seconds()
        entries.move_to_end(response_id)  # type: ignore[union-attr]
        self._order.move_to_end((agent, response_id))
        return entry.items

    def put(self, agent: str, response_id: str, items: list) -> bool:
        """Keep C{items} under C{response_id}; False when it is larger than an agent may keep."""
        size = len(json.dumps(items, separators=(",", ":")))
        if size > self.max_agent_bytes or size > self.max_total_bytes:
            return False
        self._drop(agent, response_id)
        entries = self._agents.setdefault(agent, OrderedDict())
        entries[response_id] = _Entry(items, size, self._clock.seconds())
        self._order[(agent, response_id)] = None
        self._agent_bytes[agent] = self._agent_bytes.get(agent, 0) + size
        self.total_bytes += size
        while len(entries) > self.max_per_agent or self._agent_bytes[agent] > self.max_agent_bytes:
            self._drop(agent, next(iter(entries)))
        while self.total_bytes > self.max_total_bytes:
            self._drop(*next(iter(self._order)))
        self._expire()
        return True

    def _expire(self) -> None:
        horizon = self._clock.seconds() - self.retention
        while self._order:
            agent, response_id = next(iter(self._order))
            if self._agents[agent][response_id].used > horizon:
                return
            self._drop(agent, response_id)

    def _drop(self, agent: str, response_id: str) -> None:
        entries = self._agents.get(agent)
        entry = entries.pop(response_id, None) if entries is not None else None
        if entry is None:
            return
        del self._order[(agent, response_id)]
        self._agent_bytes[agent] -= entry.size
        self.total_bytes -= entry.size
        if not entries:
            del self._agents[agent]
            del self._agent_bytes[agent]
