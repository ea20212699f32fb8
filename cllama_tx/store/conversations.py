"""
The Responses surface's conversations with translated providers, kept in
the shared store so that a follow-up turn (C{previous_response_id}) works
whichever instance or worker it lands on.

The instance's own bounded memory (L{cllama_tx.surfaces.responses_state})
stays in front as a cache: a turn answered here is found here without a
query.  A miss is read from the store; a kept answer is written to it
before the answer's last byte is sent (the proxy waits, as it waits for the
ledger row), so a client that sends its next turn at once finds it on any
instance.

Bounds in the store: an entry at most C{max_bytes} (the memory's per-agent
bound), at most C{max_per_agent} per agent (the least recently used go
first), each kept C{retention} seconds after it was last used (pruned every
minute).  C{store: false} keeps nothing, as in memory.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.application import service
from twisted.internet import defer, task
from twisted.logger import Logger

__all__ = ["SharedConversations"]

log = Logger(namespace="cllama_tx.conversations")

PRUNE_INTERVAL = 60.0


class SharedConversations(service.Service):
    """C{get} and C{put} of a conversation store, over the shared database, with C{local} as a cache."""

    name = "conversations"

    def __init__(self, database, clock, local: Any) -> None:
        self.database = database
        self._clock = clock
        self.local = local
        self.max_per_agent = local.max_per_agent
        self.max_bytes = local.max_agent_bytes
        self.retention = local.retention
        self._prune: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._prune = task.LoopingCall(self.prune)
        self._prune.clock = self._clock
        self._prune.start(PRUNE_INTERVAL, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._prune is not None and self._prune.running:
            self._prune.stop()

    def __len__(self) -> int:
        return len(self.local)

    def get(self, agent: str, response_id: Any) -> list | defer.Deferred:
        """The conversation, from memory at once, else a Deferred firing with it (or None)."""
        found = self.local.get(agent, response_id)
        if found is not None or not isinstance(response_id, str):
            return found
        now = self._clock.seconds()

        def stored(items):
            if items is not None:
                self.local.put(agent, response_id, items)
            return items

        return self.database.run(_get, agent, response_id, now, now - self.retention).addCallback(stored)

    def put(self, agent: str, response_id: str, items: list) -> defer.Deferred | bool:
        """Keep C{items} here and in the store; the Deferred fires once it is stored."""
        if not self.local.put(agent, response_id, items):
            return False
        text = json.dumps(items, separators=(",", ":"))
        now = self._clock.seconds()
        return self.database.run(_put, agent, response_id, text, now, self.max_per_agent)

    def prune(self) -> defer.Deferred:
        horizon = self._clock.seconds() - self.retention
        d = self.database.run(lambda tx: tx.execute(
            "DELETE FROM responses_conversations WHERE used_at < ?", (horizon,)))
        return d.addErrback(lambda f: log.warn("pruning kept conversations failed: {e}", e=f.getErrorMessage()))


def _get(tx, agent: str, response_id: str, now: float, horizon: float) -> list | None:
    row = tx.execute(
        "SELECT items FROM responses_conversations WHERE agent = ? AND response_id = ? AND used_at >= ?",
        (agent, response_id, horizon),
    ).fetchone()
    if row is None:
        return None
    tx.execute("UPDATE responses_conversations SET used_at = ? WHERE agent = ? AND response_id = ?",
               (now, agent, response_id))
    return json.loads(row[0])


def _put(tx, agent: str, response_id: str, text: str, now: float, max_per_agent: int) -> bool:
    tx.execute(
        "INSERT INTO responses_conversations (agent, response_id, items, size, used_at) VALUES (?, ?, ?, ?, ?) "
        "ON CONFLICT (agent, response_id) DO UPDATE SET items = excluded.items, size = excluded.size, "
        "used_at = excluded.used_at",
        (agent, response_id, text, len(text), now),
    )
    tx.execute(
        "DELETE FROM responses_conversations WHERE agent = ? AND response_id NOT IN ("
        "SELECT response_id FROM responses_conversations WHERE agent = ? ORDER BY used_at DESC LIMIT ?)",
        (agent, agent, max_per_agent),
    )
    return True
