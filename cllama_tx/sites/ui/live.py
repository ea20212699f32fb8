"""
Live updates over Server-Sent Events.

One timer per UI (running only while somebody watches) computes a cheap
signature of the state the pages show (ledger counters, key pool states,
the operator's changes); when it changes, every open C{/events} stream gets
an C{event: change}, and the page re-fetches itself and swaps its
C{data-live} sections.  A comment line every C{heartbeat} seconds keeps
proxies from closing an idle stream; a stream whose session expired gets
C{event: expired} and is ended by the server.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger(namespace="cllama_tx.sites.ui")


class _Client:
    __slots__ = ("request", "session", "done")

    def __init__(self, request, session) -> None:
        self.request = request
        self.session = session
        self.done: defer.Deferred = defer.Deferred()


class LiveHub:
    def __init__(
        self,
        clock,
        signature: Callable[[], Any],
        *,
        interval: float = 2.0,
        heartbeat: float = 15.0,
        max_clients: int = 64,
        session_valid: Callable[[Any], bool] = lambda session: True,
    ) -> None:
        self._clock = clock
        self._signature = signature
        self.interval = interval
        self.heartbeat = heartbeat
        self.max_clients = max_clients
        self._session_valid = session_valid
        self._clients: list[_Client] = []
        self._loop: task.LoopingCall | None = None
        self._last: Any = None
        self.seq = 0
        self._since_ping = 0.0

    @property
    def available(self) -> bool:
        return hasattr(self._clock, "callLater")

    @property
    def clients(self) -> int:
        return len(self._clients)

    def subscribe(self, request, session) -> defer.Deferred | None:
        """
        Start streaming to C{request}.  The Deferred fires when the server
        ends the stream; None when there are already too many streams.
        """
        if not self.available or len(self._clients) >= self.max_clients:
            return None
        client = _Client(request, session)
        self._clients.append(client)
        if self._loop is None:
            self._last = self._safe_signature()
            self._since_ping = 0.0
            self._loop = task.LoopingCall(self._tick)
            self._loop.clock = self._clock
            self._loop.start(self.interval, now=False)
        self._send(client, b"retry: 3000\n" + _event("hello", {"seq": self.seq}))
        return client.done

    def unsubscribe(self, request) -> None:
        self._clients = [c for c in self._clients if c.request is not request]
        if not self._clients and self._loop is not None:
            loop, self._loop = self._loop, None
            if loop.running:
                loop.stop()

    def stop(self) -> None:
        """End every stream (shutdown)."""
        for client in list(self._clients):
            self._end(client)

    def _safe_signature(self) -> Any:
        try:
            return self._signature()
        except Exception:
            log.failure("live update signature failed")
            return self._last

    def _tick(self) -> None:
        self._since_ping += self.interval
        for client in list(self._clients):
            if client.session is not None and not self._session_valid(client.session):
                self._send(client, _event("expired", {}))
                self._end(client)
        if not self._clients:
            return
        current = self._safe_signature()
        if current != self._last:
            self._last = current
            self.seq += 1
            payload = _event("change", {"seq": self.seq})
            for client in list(self._clients):
                self._send(client, payload)
            self._since_ping = 0.0
        elif self._since_ping >= self.heartbeat:
            self._since_ping = 0.0
            for client in list(self._clients):
                self._send(client, b": ping\n\n")

    def _send(self, client: _Client, data: bytes) -> None:
        try:
            client.request.write(data)
        except Exception:
            self._end(client)

    def _end(self, client: _Client) -> None:
        self.unsubscribe(client.request)
        if not client.done.called:
            client.done.callback(None)


def _event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
