"""
HTTP clients that connect from a chosen loopback address (127.0.0.2,
127.0.0.3, ...: Linux routes all of 127/8 to the loopback interface), so
a test can be many clients at once over real sockets.
"""

from __future__ import annotations

import treq
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer


@implementer(IAgentEndpointFactory)
class _BoundEndpoints:
    def __init__(self, reactor, source: str) -> None:
        self._reactor = reactor
        self._source = source

    def endpointForURI(self, uri):
        return TCP4ClientEndpoint(self._reactor, uri.host.decode("ascii"), uri.port, bindAddress=(self._source, 0))


def client_from(testcase, reactor, source: str) -> treq.client.HTTPClient:
    """A treq client whose connections come from C{source}; its pool is closed in cleanup."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    testcase.addCleanup(pool.closeCachedConnections)
    return treq.client.HTTPClient(Agent.usingEndpointFactory(reactor, _BoundEndpoints(reactor, source), pool=pool))
