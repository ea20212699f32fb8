"""
Send at once: a write on a plain TCP connection goes to the socket in the
call that makes it when nothing is waiting in the buffer, instead of in the
reactor's next turn.

Why: Twisted's TCP transports buffer every C{write()} and send it when the
reactor next polls the socket for writability.  Under load one reactor turn
handles dozens of requests, so each hop of a proxied request (agent to
proxy, proxy to upstream, back, and to the agent) waits for the rest of the
turn, and the clients fall into lockstep batches: with a 20 ms upstream and
64 clients the proxy sat idle a third of the time while requests queued.
Registering each socket for writability and unregistering it again also
cost about a seventh of the CPU of a request.  With an empty buffer, a
C{send()} now is what the next turn would do anyway.  What the kernel does
not take is buffered the usual way, so backpressure (producers paused when
the buffer fills) works as before.

Only plain TCP connections (L{tcp.Server}, L{tcp.Client}) are changed: the
agents' connections to the API and UI listeners and the upstream
connections, including the ciphertext of upstream TLS, which is written to
a plain TCP transport.  Connections that terminate TLS in the transport
(C{ssl:} listeners) and UNIX sockets keep Twisted's own path.  Twisted's
HTTP server and client set C{TCP_NODELAY}, so a response written in two
calls does not wait for Nagle.

The daemon installs it once at start; C{CLLAMA_WRITE_THROUGH=0} keeps
Twisted's behaviour.
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.internet import tcp

PLAIN = (tcp.Server, tcp.Client)
_saved: dict[type, dict[str, Any]] = {}


def _send_now(transport: Any, data: bytes) -> bytes:
    """Send what the kernel takes now; return the rest (all of it when we may not send)."""
    if (
        type(transport) not in PLAIN
        or transport.TLS
        or not transport.connected
        or transport._writeDisconnected
        or getattr(transport, "_aborting", False)
        or transport._tempDataLen
        or transport.offset != len(transport.dataBuffer)
        # A pull producer is asked for more each time the buffer drains,
        # which only the buffered path notices.
        or (transport.producer is not None and not transport.streamingProducer)
    ):
        return data
    try:
        sent = transport.socket.send(data)
    except OSError:
        # EAGAIN, or a broken connection: the regular path buffers the data
        # and its next writability poll finds out which it was.
        return data
    return data[sent:]


def _original(transport: Any, name: str) -> Any:
    """Twisted's own method C{name} for C{transport} (subclasses included)."""
    for cls in type(transport).__mro__:
        if cls in _saved:
            return _saved[cls][name]
    raise AssertionError(f"{type(transport)!r} is not a patched transport")


def _write(self: Any, data: bytes) -> None:
    if type(data) is bytes and data:
        data = _send_now(self, data)
        if not data:
            return
    _original(self, "write")(self, data)


def _write_sequence(self: Any, iovec: Iterable[bytes]) -> None:
    iovec = list(iovec)
    if iovec and all(type(part) is bytes for part in iovec):
        _write(self, b"".join(iovec))
        return
    _original(self, "writeSequence")(self, iovec)


def install() -> None:
    """Make plain TCP writes send at once.  Idempotent."""
    if _saved:
        return
    for cls in PLAIN:
        _saved[cls] = {
            "write": cls.write,
            "writeSequence": cls.writeSequence,
            "own": {name: cls.__dict__[name] for name in ("write", "writeSequence") if name in cls.__dict__},
        }
        cls.write = _write
        cls.writeSequence = _write_sequence


def uninstall() -> None:
    """Back to Twisted's buffered writes (for tests)."""
    for cls, saved in list(_saved.items()):
        for name in ("write", "writeSequence"):
            if name in saved["own"]:
                setattr(cls, name, saved["own"][name])
            else:
                delattr(cls, name)
    _saved.clear()


def installed() -> bool:
    return bool(_saved)
