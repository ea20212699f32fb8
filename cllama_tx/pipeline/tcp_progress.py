"""
Whether an agent is still reading: the count of bytes its TCP stack has
acknowledged on our connection to it.

Backpressure alone cannot tell a stalled agent from a slow one: the relay
is paused until the agent's connection has drained half a kernel send
buffer (megabytes on a fast link), which a slow reader may take longer
than the stall timeout to do.  The kernel knows better: the peer
acknowledges a byte only once its reader made room for it, so the
acknowledged count stands still exactly while the agent reads nothing.

Linux reports it in C{TCP_INFO} (C{tcpi_bytes_acked}, since 4.1).  Elsewhere
(other systems, TLS or UNIX listeners, a closed socket) there is no count
and the caller falls back to the pause alone.
"""

from __future__ import annotations

import socket
import struct

__all__ = ["acked_bytes"]

_TCP_INFO = getattr(socket, "TCP_INFO", None)
# struct tcp_info: tcpi_bytes_acked is the u64 at offset 120.
_BYTES_ACKED = struct.Struct("=Q")
_OFFSET = 120
_SIZE = 256


def acked_bytes(transport) -> int | None:
    """
    Bytes of what we sent that C{transport}'s peer has acknowledged, or
    None when the platform or the transport cannot say.
    """
    if _TCP_INFO is None:
        return None
    try:
        handle = transport.getHandle()
        info = handle.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _SIZE)
    except (AttributeError, OSError, TypeError, ValueError):
        return None
    if not isinstance(info, bytes) or len(info) < _OFFSET + _BYTES_ACKED.size:
        return None
    return _BYTES_ACKED.unpack_from(info, _OFFSET)[0]
