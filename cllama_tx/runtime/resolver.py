"""
Upstream host names resolved once in a while, not once per connection.

Twisted's reactor resolves every host of every new TCP connection with
C{getaddrinfo} in its thread pool, an IP address included: a hand-off to a
thread and an answer back through the reactor's waker.  Under load the
thread waits for the GIL the reactor holds, and the reactor for the
answer: with 1,000 concurrent streams that kept opening upstream
connections, the thread pool's wake-ups were about a quarter of the
proxy's profile samples.  This resolver answers an IP address at once and
a name from its last resolution while that is younger than C{ttl} seconds
(only answers with addresses are kept); anything else goes to the
resolver it wraps, as before.  It is installed on the reactor with the
public C{installNameResolver}, once per reactor (L{install}).
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IResolutionReceiver,
)
from zope.interface import implementer

__all__ = ["TTL", "CachingResolver", "install"]

TTL = 30.0
"""Seconds a name's addresses are reused before it is resolved again."""

MAX_NAMES = 256
"""Names kept at most (upstream hosts are few; the cache starts over past this)."""


@implementer(IHostResolution)
class _Resolution:
    """A resolution answered at once: nothing left to cancel."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


@implementer(IResolutionReceiver)
class _Recorder:
    """Passes a resolution on to its receiver and keeps what it found."""

    def __init__(self, receiver: IResolutionReceiver, done) -> None:
        self._receiver = receiver
        self._done = done
        self.addresses: list[IAddress] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        self._receiver.resolutionBegan(resolutionInProgress)

    def addressResolved(self, address: IAddress) -> None:
        self.addresses.append(address)
        self._receiver.addressResolved(address)

    def resolutionComplete(self) -> None:
        self._done(self.addresses)
        self._receiver.resolutionComplete()


@implementer(IHostnameResolver)
class CachingResolver:
    """See the module's docstring; C{inner} is the reactor's resolver."""

    def __init__(self, inner: IHostnameResolver, clock, ttl: float = TTL) -> None:
        self.inner = inner
        self._clock = clock
        self._ttl = ttl
        self._names: dict[tuple, tuple[float, list[IAddress]]] = {}

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        types = frozenset(addressTypes) if addressTypes is not None else None
        if transportSemantics == "TCP":
            literal = self._literal(hostName, portNumber, types)
            if literal is not None:
                return self._answer(resolutionReceiver, hostName, literal)
            key = (hostName, portNumber, types)
            kept = self._names.get(key)
            if kept is not None and self._clock.seconds() - kept[0] < self._ttl:
                return self._answer(resolutionReceiver, hostName, kept[1])

            def done(addresses: list[IAddress]) -> None:
                if addresses:
                    if len(self._names) >= MAX_NAMES:
                        self._names.clear()
                    self._names[key] = (self._clock.seconds(), addresses)

            resolutionReceiver = _Recorder(resolutionReceiver, done)
        return self.inner.resolveHostName(resolutionReceiver, hostName, portNumber, addressTypes, transportSemantics)

    @staticmethod
    def _literal(host: str, port: int, types: frozenset | None) -> list[IAddress] | None:
        """An IP address's own address (none when the caller wants the other family), else None."""
        if isIPAddress(host):
            return [IPv4Address("TCP", host, port)] if types is None or IPv4Address in types else []
        if isIPv6Address(host) and "%" not in host:  # a scoped address is left to getaddrinfo
            return [IPv6Address("TCP", host, port)] if types is None or IPv6Address in types else []
        return None

    @staticmethod
    def _answer(receiver: IResolutionReceiver, host: str, addresses: list[IAddress]) -> IHostResolution:
        resolution = _Resolution(host)
        receiver.resolutionBegan(resolution)
        for address in addresses:
            receiver.addressResolved(address)
        receiver.resolutionComplete()
        return resolution


def install(reactor, ttl: float = TTL) -> CachingResolver | None:
    """Put a L{CachingResolver} in front of C{reactor}'s resolver, once; None if it cannot take one."""
    current = getattr(reactor, "nameResolver", None)
    if isinstance(current, CachingResolver):
        return current
    if current is None or not hasattr(reactor, "installNameResolver"):
        return None
    resolver = CachingResolver(current, reactor, ttl)
    reactor.installNameResolver(resolver)
    return resolver
