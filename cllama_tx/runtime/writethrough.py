"""
Send as soon as the reactor's callback returns: the writes that one I/O
event (or one round of timed calls) makes on a plain TCP connection are
joined and sent with one C{send()} when that callback returns, instead of
in the reactor's next turn.

Why: Twisted's TCP transports buffer every C{write()} and send it when the
reactor next polls the socket for writability.  Under load one reactor turn
handles dozens of requests, so each hop of a proxied request (agent to
proxy, proxy to upstream, back, and to the agent) waits for the rest of the
turn, and the clients fall into lockstep: with a 20 ms upstream and 64
clients the proxy sat idle a quarter of the time while requests queued, at
1,000-1,200 requests/s; with this it runs at full load and 1,600-1,700.
Joining the writes of one callback (a response's headers and body, say)
keeps the number of C{send()} calls at one per connection and callback,
and no socket is registered for writability unless the kernel did not take
everything.  What it did not take is buffered the usual way, so
backpressure (producers paused when the buffer fills) works as before.

Only plain TCP connections (L{tcp.Server}, L{tcp.Client}) are changed: the
agents' connections to the API and UI listeners and the upstream
connections, including the ciphertext of upstream TLS, which is written to
a plain TCP transport.  Connections that terminate TLS in the transport
(C{ssl:} listeners), UNIX sockets and transports with a pull producer keep
Twisted's own path.

The daemon installs it once at start, on its reactor (the reactor's
dispatchers are wrapped on the instance); C{CLLAMA_WRITE_THROUGH=0} keeps
Twisted's behaviour.  The transport state and reactor methods it relies on
are Twisted's private ones, named in L{cllama_tx.runtime.twisted_private}.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from twisted.logger import Logger

from cllama_tx.runtime.twisted_private import (
    PLAIN_TCP,
    may_send_directly,
    send_now,
    unwrap_dispatchers,
    wrap_dispatchers,
)

PLAIN = PLAIN_TCP
_log = Logger()
_saved: dict[type, dict[str, Any]] = {}
_reactors: list[Any] = []
_batch: list[dict[Any, list[bytes]] | None] = [None]  # the writes of the running dispatch


# May a transport's writes skip Twisted's buffer right now; send what the
# kernel takes (both read Twisted's private transport state).
_eligible = may_send_directly
_send = send_now


def _original(transport: Any, name: str) -> Any:
    """Twisted's own method C{name} for C{transport} (subclasses included)."""
    for cls in type(transport).__mro__:
        if cls in _saved:
            return _saved[cls][name]
    raise AssertionError(f"{type(transport)!r} is not a patched transport")


def _write(self: Any, data: bytes) -> None:
    if isinstance(data, bytes) and data:
        batch = _batch[0]
        if batch is not None:  # outside the reactor's callbacks: Twisted's way
            pending = batch.get(self)
            if pending is not None:
                pending.append(data)
                return
            if _eligible(self):
                batch[self] = [data]
                return
    _original(self, "write")(self, data)


def _write_sequence(self: Any, iovec: Iterable[bytes]) -> None:
    iovec = list(iovec)
    if iovec and all(isinstance(part, bytes) for part in iovec):
        _write(self, b"".join(iovec))
        return
    _original(self, "writeSequence")(self, iovec)


def _flush(batch: dict[Any, list[bytes]]) -> None:
    """Send each transport's writes of one dispatch in one call."""
    for transport, parts in batch.items():
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        try:
            if _eligible(transport):
                data = _send(transport, data)
                if not data:
                    continue
            _original(transport, "write")(transport, data)
        except Exception:
            # One transport's trouble must not strand the others' bytes.
            _log.failure("write-through: could not hand {size} bytes to {transport!r}",
                         size=len(data), transport=transport)


def _batched(function: Callable[..., Any]) -> Callable[..., Any]:
    """C{function}, with the writes it makes coalesced per transport and sent when it returns."""

    def run(*args: Any, **kwargs: Any) -> Any:
        if _batch[0] is not None:
            return function(*args, **kwargs)
        batch: dict[Any, list[bytes]] = {}
        _batch[0] = batch
        try:
            return function(*args, **kwargs)
        finally:
            _batch[0] = None
            if batch:
                _flush(batch)

    return run


def install(reactor: Any) -> None:
    """Make plain TCP writes of C{reactor}'s callbacks go out as each returns.  Idempotent."""
    if _saved:
        return
    for cls in PLAIN:
        _saved[cls] = {
            "write": cls.write,
            "writeSequence": cls.writeSequence,
            "own": {name: cls.__dict__[name] for name in ("write", "writeSequence") if name in cls.__dict__},
        }
        # Twisted's own transport classes, patched on purpose (restored by uninstall).
        cls.write = _write  # type: ignore[method-assign]
        cls.writeSequence = _write_sequence  # type: ignore[method-assign]
    # The reactor's entry points into our code: one I/O event, and the
    # timed calls and thread callbacks of a turn.
    wrap_dispatchers(reactor, _batched)
    _reactors.append(reactor)


def uninstall() -> None:
    """Back to Twisted's buffered writes (for tests)."""
    for cls, saved in list(_saved.items()):
        for name in ("write", "writeSequence"):
            if name in saved["own"]:
                setattr(cls, name, saved["own"][name])
            else:
                delattr(cls, name)
    _saved.clear()
    for reactor in _reactors:
        unwrap_dispatchers(reactor)
    _reactors.clear()


def installed() -> bool:
    return bool(_saved)
