"""
The upstream resolver: IP addresses answered at once, names from their
last resolution for a while, everything else as the wrapped resolver says;
and a real connection through a HostnameEndpoint that never reaches the
thread pool for an IP address.
"""

from __future__ import annotations

from twisted.internet import defer, protocol, reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ServerEndpoint
from twisted.internet.interfaces import IHostnameResolver, IResolutionReceiver
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from cllama_tx.runtime.resolver import TTL, CachingResolver, install


@implementer(IHostnameResolver)
class CountingResolver:
    """Answers every name with one fixed address, counting the questions."""

    def __init__(self, addresses=None) -> None:
        self.asked: list[str] = []
        self.addresses = addresses

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        for address in self.addresses if self.addresses is not None else [IPv4Address("TCP", "10.0.0.7", portNumber)]:
            receiver.addressResolved(address)
        receiver.resolutionComplete()


@implementer(IResolutionReceiver)
class Receiver:
    def __init__(self) -> None:
        self.addresses: list = []
        self.began = self.complete = False

    def resolutionBegan(self, resolutionInProgress) -> None:
        self.began = True

    def addressResolved(self, address) -> None:
        self.addresses.append(address)

    def resolutionComplete(self) -> None:
        self.complete = True


def resolve(resolver, host, port=443, types=None, semantics="TCP") -> Receiver:
    receiver = Receiver()
    resolver.resolveHostName(receiver, host, port, types, semantics)
    return receiver


class CachingResolverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.inner = CountingResolver()
        self.resolver = CachingResolver(self.inner, self.clock)

    def test_interface(self) -> None:
        verifyObject(IHostnameResolver, self.resolver)

    def test_ip_addresses_are_answered_without_asking(self) -> None:
        got = resolve(self.resolver, "127.0.0.1", 8080)
        self.assertEqual((got.began, got.complete, got.addresses), (True, True, [IPv4Address("TCP", "127.0.0.1", 8080)]))
        self.assertEqual(resolve(self.resolver, "::1", 80).addresses, [IPv6Address("TCP", "::1", 80)])
        self.assertEqual(resolve(self.resolver, "127.0.0.1", 80, [IPv6Address]).addresses, [])
        self.assertEqual(self.inner.asked, [])
        resolve(self.resolver, "fe80::1%eth0", 80)  # scoped: getaddrinfo knows the interface
        self.assertEqual(self.inner.asked, ["fe80::1%eth0"])

    def test_a_name_is_kept_for_the_ttl(self) -> None:
        first = resolve(self.resolver, "api.example.com")
        self.clock.advance(TTL - 1)
        again = resolve(self.resolver, "api.example.com")
        self.assertEqual(again.addresses, first.addresses)
        self.assertTrue(again.complete)
        self.assertEqual(self.inner.asked, ["api.example.com"])
        self.clock.advance(1)
        resolve(self.resolver, "api.example.com")
        self.assertEqual(self.inner.asked, ["api.example.com"] * 2)

    def test_port_and_address_types_are_part_of_the_question(self) -> None:
        resolve(self.resolver, "api.example.com", 443)
        resolve(self.resolver, "api.example.com", 80)
        resolve(self.resolver, "api.example.com", 443, [IPv4Address])
        self.assertEqual(len(self.inner.asked), 3)

    def test_a_failed_resolution_is_asked_again(self) -> None:
        self.inner.addresses = []
        self.assertEqual(resolve(self.resolver, "nowhere.example").addresses, [])
        resolve(self.resolver, "nowhere.example")
        self.assertEqual(self.inner.asked, ["nowhere.example"] * 2)

    def test_other_semantics_go_to_the_wrapped_resolver(self) -> None:
        resolve(self.resolver, "127.0.0.1", 53, semantics="UDP")
        self.assertEqual(self.inner.asked, ["127.0.0.1"])

    def test_install_once(self) -> None:
        class PluggableReactor:
            nameResolver = self.inner

            def installNameResolver(self, resolver):
                previous, self.nameResolver = self.nameResolver, resolver
                return previous

            def seconds(self) -> float:
                return 0.0

        fake = PluggableReactor()
        first = install(fake)
        self.assertIsInstance(fake.nameResolver, CachingResolver)
        self.assertIs(install(fake), first)
        self.assertIs(first.inner, self.inner)
        self.assertIsNone(install(object()))


class RealConnectionTests(TestCase):
    """A HostnameEndpoint to an IP address connects with no thread involved."""

    def test_connects_without_the_thread_pool(self) -> None:
        asking = CountingResolver()
        resolver = CachingResolver(asking, reactor)
        previous = reactor.installNameResolver(resolver)
        self.addCleanup(reactor.installNameResolver, previous)

        class Recorder(protocol.Protocol):
            def connectionMade(self) -> None:
                self.transport.loseConnection()

        server = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        factory = protocol.Factory.forProtocol(Recorder)

        @defer.inlineCallbacks
        def run():
            port = yield server.listen(factory)
            self.addCleanup(port.stopListening)
            endpoint = HostnameEndpoint(reactor, b"127.0.0.1", port.getHost().port)
            client = yield endpoint.connect(protocol.Factory.forProtocol(protocol.Protocol))
            self.assertTrue(client.transport.connected)
            self.assertEqual(client.transport.getPeer().port, port.getHost().port)
            client.transport.loseConnection()
            self.assertEqual(asking.asked, [])

        return run()
