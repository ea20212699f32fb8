"""
The upstream HTTP client: one persistent connection pool shared by every
request, no redirects, no cookies.  The daemon builds it and hands it to
the proxy (C{Proxy(upstream=...)}) and the key prober; it lives here, not
in the pipeline, because it reaches into Twisted's private seams
(L{cllama_tx.runtime.twisted_private}) to do the per-URL work of
C{Agent.request} once per URL.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from cllama_tx.runtime.lean_client import LeanUpstream
from cllama_tx.runtime.twisted_private import agent_steps, quiet_pool


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body that is already in memory: written in one go, with its
    length known up front (no chunked upload, no extra reactor turn).
    """

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body)

    def startProducing(self, consumer):
        consumer.write(self._body)
        return defer.succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


class UpstreamClient:
    """
    The one HTTP client of the daemon: a persistent pool shared by every
    request, no redirects, no cookies.

    @param lean: requests whose body is in memory go through
        L{LeanUpstream} (the default); False, and bodies that stream:
        through twisted.web's C{Agent} and its pool (C{CLLAMA_LEAN_HTTP=0}).
    @param direct: the lean client sends with the socket's C{send()} where
        it can (C{CLLAMA_WRITE_THROUGH}).
    """

    MAX_TARGETS = 256

    def __init__(
        self,
        reactor,
        connect_timeout: float,
        tls_policy: IPolicyForHTTPS | None = None,
        max_per_host: int = 64,
        lean: bool = True,
        direct: bool = True,
    ) -> None:
        self._reactor = reactor
        self.lean: LeanUpstream | None = None
        if lean:
            self.lean = LeanUpstream(
                reactor, connect_timeout, tls_policy=tls_policy, max_per_host=max_per_host, idle_timeout=120,
                direct=direct,
            )
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        quiet_pool(self.pool)
        self.pool.maxPersistentPerHost = max_per_host
        self.pool.cachedConnectionTimeout = 120
        kwargs = {"pool": self.pool, "connectTimeout": connect_timeout}
        if tls_policy is not None:
            kwargs["contextFactory"] = tls_policy
        self._agent = Agent(reactor, **kwargs)
        self._targets: dict[bytes, tuple] = {}
        # Agent's per-URL work is skipped through its two internal steps;
        # should a Twisted release rename them, requests take the public way.
        self._steps = agent_steps(self._agent)

    def request(
        self, method: bytes, url: bytes, headers: Headers, body: bytes | IBodyProducer | None
    ) -> defer.Deferred:
        """
        Send one request; the Deferred fires with the response headers.
        C{body} is bytes, or a producer of a body that streams (the
        passthrough's uploads).
        """
        if self.lean is not None and (body is None or isinstance(body, bytes)):
            return self.lean.request(method, url, headers, body)
        producer = BytesProducer(body) if isinstance(body, bytes) else body
        steps = self._steps
        if steps is None:  # Agent.request raises on a bad URL: a failed Deferred, as below
            return defer.maybeDeferred(self._agent.request, method, url, headers, producer)
        target = self._targets.get(url)
        if target is None:
            try:
                target = self._target(url)
            except Exception:
                return defer.fail()
        return steps.send(target, method, headers, producer)

    def _target(self, url: bytes) -> tuple:
        """
        What C{Agent.request} works out from a URL on every call (validation,
        parsing, a new endpoint object): done once per upstream URL.  The
        URLs are few (providers times paths), the cache is bounded anyway.
        """
        assert self._steps is not None
        target = self._steps.target(url)
        if len(self._targets) >= self.MAX_TARGETS:
            self._targets.clear()
        self._targets[url] = target
        return target

    def close(self) -> defer.Deferred:
        if self.lean is not None:
            return defer.gatherResults([self.lean.close(), self.pool.closeCachedConnections()])
        return self.pool.closeCachedConnections()
