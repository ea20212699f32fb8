"""
The policy sidecar client (ADR-025): each hook is one JSON POST to
C{CLLAMA_POLICY_URL} + C{/policy/<hook>}, with the reference's bodies and
its bearer token, on a connection pool of its own (a slow sidecar never
holds a provider connection, nor the other way round).

It does not time out by itself: the pipeline's hooks bound every call
with the operator's timeout and cancel it, and cancelling a call closes
its connection whether it is waiting for the answer's head or its body.
Any failure (refused connection, non-2xx status, a body that is not JSON
or too large) is a L{PolicyUnavailable} whose message names the cause and
never the URL or the token.
"""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.application import service
from twisted.internet import defer, error
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

from cllama_tx.governance.policy_plane import PARSERS, PATHS, SCORE, PolicyAnswerError
from cllama_tx.interfaces import IRequestPolicy

log = Logger()

# An amended answer is a whole response: as large as the proxy buffers one.
MAX_ANSWER_BYTES = 16 * 1024 * 1024


class PolicyUnavailable(Exception):
    """A hook got no usable answer; the message says why, secret-free."""


@implementer(IBodyProducer)
class _Body:
    """A body already in memory, written at once with its length known."""

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


class _Reader(Protocol):
    """Reads an answer whole, up to a limit; cancelling its Deferred closes the connection."""

    def __init__(self, limit: int) -> None:
        self.done: defer.Deferred = defer.Deferred(lambda _: self._abort())
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0

    def _abort(self) -> None:
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._size > self._limit:
            return  # hanging up already
        self._size += len(data)
        if self._size > self._limit:
            self._parts = []
            self._abort()
            return
        self._parts.append(data)

    def connectionLost(self, reason=None) -> None:
        # Decided here, once the client is done with the connection.
        if self.done.called:
            return
        if self._size > self._limit:
            self.done.errback(PolicyUnavailable(f"answer larger than {self._limit} bytes"))
        elif reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self._parts))
        else:
            self.done.errback(PolicyUnavailable("the connection broke while reading the answer"))


class _Discard(Protocol):
    """Drops an answer that will not be read (and its connection)."""

    def connectionMade(self) -> None:
        cast(IPushProducer, self.transport).stopProducing()


def describe(failure_value: BaseException) -> str:
    """A short, secret-free description of why a call failed."""
    if isinstance(failure_value, PolicyUnavailable):
        return str(failure_value)
    if isinstance(failure_value, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(failure_value, error.DNSLookupError):
        return "host name not found"
    if isinstance(failure_value, (error.TimeoutError, error.ConnectingCancelledError)):
        return "could not connect"
    reasons = getattr(failure_value, "reasons", None)
    if reasons:
        inner = reasons[0].value
        return f"the connection failed ({inner.__class__.__name__})"
    return failure_value.__class__.__name__


@implementer(IRequestPolicy)
class PolicySidecar(service.Service):
    """
    The HTTP evaluator.  A service: stopping it closes its idle connections
    (after the listeners and the drain, like the upstream pool).
    """

    name = "policy-sidecar"

    def __init__(
        self,
        reactor,
        url: str,
        token: str | None = None,
        *,
        tls_policy: IPolicyForHTTPS | None = None,
        connect_timeout: float = 10.0,
        max_per_host: int = 32,
        max_answer: int = MAX_ANSWER_BYTES,
    ) -> None:
        self._url = url.rstrip("/")
        self._max_answer = max_answer
        self._headers = Headers({b"Content-Type": [b"application/json"]})
        if token:
            self._headers.setRawHeaders(b"Authorization", [b"Bearer " + token.encode("utf-8")])
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max_per_host
        self.pool.retryAutomatically = False  # a call is never sent twice
        kwargs: dict[str, Any] = {"pool": self.pool, "connectTimeout": connect_timeout}
        if tls_policy is not None:
            kwargs["contextFactory"] = tls_policy
        import treq  # only with a sidecar configured: not imported by every daemon

        self._client = treq.client.HTTPClient(Agent(reactor, **kwargs), data_to_body_producer=_Body)

    def __repr__(self) -> str:
        return "<PolicySidecar>"  # never the URL: it may carry a path secret

    # IRequestPolicy

    def gate_request(self, call) -> defer.Deferred:
        return self._call(call)

    def decorate(self, call) -> defer.Deferred:
        return self._call(call)

    def gate_response(self, call) -> defer.Deferred:
        return self._call(call)

    def score(self, call) -> defer.Deferred:
        """POST /policy/score (the reference expects a 202); the answer is not read."""
        return self._call(call)

    def stopService(self):
        super().stopService()
        return self.pool.closeCachedConnections()

    # one call

    def _call(self, call) -> defer.Deferred:
        hook = call.hook
        body = json.dumps(call.wire(), separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        headers = self._headers.copy()
        if call.meta.request_id:
            headers.setRawHeaders(b"X-Cllama-Request-Id", [call.meta.request_id.encode("ascii", "replace")])
        d = self._client.post(self._url + PATHS[hook], data=body, headers=headers, allow_redirects=False)
        d.addCallback(self._read, hook)
        if hook != SCORE:
            d.addCallback(self._decode, hook)
        d.addErrback(self._failed)
        return d

    def _read(self, response, hook: str) -> defer.Deferred | None:
        if hook == SCORE and 200 <= response.code < 300:
            response.deliverBody(_Discard())
            return None
        if not 200 <= response.code < 300:
            response.deliverBody(_Discard())
            raise PolicyUnavailable(f"the sidecar answered HTTP {response.code}")
        reader = _Reader(self._max_answer)
        response.deliverBody(reader)
        return reader.done

    @staticmethod
    def _decode(body: bytes, hook: str):
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise PolicyUnavailable("the answer is not JSON") from None
        try:
            return PARSERS[hook](doc)
        except PolicyAnswerError as e:
            raise PolicyUnavailable(f"the answer cannot be used: {e}") from None

    @staticmethod
    def _failed(failure):
        reasons = getattr(failure.value, "reasons", None) or []
        if failure.check(defer.CancelledError) or any(r.check(defer.CancelledError) for r in reasons):
            # The hook's timeout, or the agent left: the caller knows which.
            raise defer.CancelledError()
        raise PolicyUnavailable(describe(failure.value))
