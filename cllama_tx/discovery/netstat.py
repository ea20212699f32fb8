"""
This host's listening TCP sockets, read from what the OS reports, as C{ss}
and C{netstat} read them: Linux's C{/proc/net/tcp} and C{/proc/net/tcp6},
macOS's C{lsof -F ptn} output.  And which of them the port scan may probe.

The scan never leaves this host: only sockets listening on a loopback
address, or on the wildcard address (which includes loopback), are
probed, always through a loopback address.  A socket bound to one of the
host's other addresses only is left alone.  Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

import attrs

LISTEN = "0A"  # the kernel's TCP_LISTEN, as /proc/net/tcp writes it


@attrs.frozen
class ListeningSocket:
    """One listening socket: its local address (text), port, and identity."""

    address: str
    port: int
    # The socket's inode (/proc) or the owning process (lsof): a probe's
    # verdict is remembered for this identity, so a new listener on the
    # same port is probed afresh.
    inode: int | None = None
    pid: int | None = None


@attrs.frozen
class ScanTarget:
    """A port to probe: the loopback address to reach it by, and the socket it is."""

    host: str
    port: int
    identity: tuple


def _proc_address(text: str) -> str | None:
    """C{0100007F} -> C{127.0.0.1}; 32 hex digits (four little-endian words) -> IPv6."""
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        return None
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    if len(raw) == 16:
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        return str(ipaddress.IPv6Address(words))
    return None


def parse_proc_net_tcp(text: str) -> list[ListeningSocket]:
    """
    The listening sockets of a C{/proc/net/tcp} or C{/proc/net/tcp6} text
    (the header line and unreadable lines are skipped).
    """
    found = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or fields[3] != LISTEN:
            continue
        address_text, _, port_text = fields[1].partition(":")
        address = _proc_address(address_text)
        try:
            port = int(port_text, 16)
            inode = int(fields[9])
        except ValueError:
            continue
        if address is None or not 0 < port <= 65535:
            continue
        found.append(ListeningSocket(address, port, inode=inode))
    return found


def parse_lsof(text: str) -> list[ListeningSocket]:
    """
    The listening sockets of C{lsof -nP -iTCP -sTCP:LISTEN -F ptn} output:
    C{p<pid>}, then per descriptor C{t<type>} (C{IPv4}, C{IPv6}) and
    C{n<address>:<port>} (C{*:11434}, C{127.0.0.1:1234}, C{[::1]:8000}).
    """
    found = []
    pid: int | None = None
    kind = "IPv4"
    for line in text.splitlines():
        if not line:
            continue
        tag, value = line[0], line[1:]
        if tag == "p":
            pid = int(value) if value.isdigit() else None
        elif tag == "f":
            kind = "IPv4"
        elif tag == "t":
            kind = value
        elif tag == "n":
            host, sep, port_text = value.rpartition(":")
            if not sep or not port_text.isdigit() or not 0 < int(port_text) <= 65535:
                continue
            if "->" in value:  # a connection, not a listener
                continue
            if host == "*":
                host = "::" if kind == "IPv6" else "0.0.0.0"
            host = host.strip("[]")
            try:
                ipaddress.ip_address(host)
            except ValueError:
                continue
            found.append(ListeningSocket(host, int(port_text), pid=pid))
    return found


def loopback_for(address: str) -> str | None:
    """
    The address to probe a socket listening on C{address} by, when it is
    reachable from this host's loopback: a loopback address itself, the
    wildcard (through C{127.0.0.1} or C{::1}), an IPv4-mapped loopback.
    None for any other address.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return str(ip)
    if ip.is_unspecified:
        return "127.0.0.1" if ip.version == 4 else "::1"
    return None


def scan_targets(
    sockets: Iterable[ListeningSocket],
    allowed: Callable[[int], bool],
    own_ports: Iterable[int] = (),
) -> list[ScanTarget]:
    """
    The ports to probe, one target per port (IPv4 before IPv6), in port
    order: the sockets reachable from loopback (L{loopback_for}) whose port
    the settings allow and that are not the proxy's own.
    """
    own = set(own_ports)
    by_port: dict[int, ScanTarget] = {}
    for socket in sockets:
        host = loopback_for(socket.address)
        if host is None or socket.port in own or not allowed(socket.port):
            continue
        target = ScanTarget(host, socket.port, (socket.address, socket.port, socket.inode, socket.pid))
        known = by_port.get(socket.port)
        if known is None or (":" in known.host and ":" not in host):
            by_port[socket.port] = target
    return [by_port[port] for port in sorted(by_port)]
