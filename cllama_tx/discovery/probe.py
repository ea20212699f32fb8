"""
Probing one address for a model server: at most three short GETs
(C{/api/tags}, C{/v1/models}, LM Studio's C{/api/v0/models}), each with its
own deadline and a capped body, never a credential.

Whatever is listening, the probe ends with a L{Found} or a L{Miss} and
never fails: a port that is not a model server, that speaks no HTTP, that
asks for a key or that does not answer in time is a miss, said in a few
words (never a body).  A miss is C{lasting} when probing the same socket
again soon would only say the same (no HTTP, no model list, a key
needed); the scheduler remembers those for a while.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from cllama_tx.discovery.servers import (
    LLAMACPP,
    LMSTUDIO,
    LMSTUDIO_PATH,
    MODELS_PATH,
    OLLAMA,
    OPENAI_COMPATIBLE,
    TAGS_PATH,
    is_lmstudio,
    ollama_models,
    openai_models,
)
from cllama_tx.providers.bodies import read_small

#: The largest model list read (an Ollama with hundreds of models sends tens of KiB).
BODY_LIMIT = 1024 * 1024
_NOT_JSON = object()


@attrs.frozen
class Found:
    """A model server: its kind and models."""

    kind: str
    models: tuple[str, ...]


@attrs.frozen
class Miss:
    """Not a model server (now): why, and whether that will last."""

    reason: str
    lasting: bool


class _TimedOut(Exception):
    pass


@implementer(IAgentEndpointFactory)
class _ProbeEndpoints:
    """
    An address given as an IP literal is connected to directly: a
    name's endpoint (Happy Eyeballs) would report a refused connection
    only at its next attempt, 0.3 s later, and the scan meets many.
    """

    def __init__(self, reactor, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = max(1, int(timeout + 0.999))

    def endpointForURI(self, uri):
        host = uri.host.decode("ascii")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return HostnameEndpoint(self._reactor, uri.host, uri.port, timeout=self._timeout)
        kind = TCP4ClientEndpoint if ip.version == 4 else TCP6ClientEndpoint
        return kind(self._reactor, host, uri.port, timeout=self._timeout)


def probe_agent(reactor, pool, timeout: float) -> Agent:
    """The agent probes go through: C{pool} should keep no connection (each address is asked once)."""
    return Agent.usingEndpointFactory(reactor, _ProbeEndpoints(reactor, timeout), pool=pool)


def _url(host: str, port: int, path: str) -> bytes:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{path}".encode("ascii")


class Prober:
    """
    Probes addresses through C{agent} (an L{twisted.web.iweb.IAgent} whose
    pool keeps no connection), each GET bounded by C{timeout} seconds of
    C{clock}, headers and body together.
    """

    def __init__(self, clock, agent, timeout: float, body_limit: int = BODY_LIMIT) -> None:
        self._clock = clock
        self._agent = agent
        self.timeout = timeout
        self._limit = body_limit

    def probe(self, host: str, port: int) -> defer.Deferred:
        """A Deferred firing with a L{Found} or a L{Miss}; it never fails."""
        def failed(failure: Failure) -> Found | Miss:
            return Miss(f"probe failed: {type(failure.value).__name__}", False)

        return defer.ensureDeferred(self._probe(host, port)).addErrback(failed)

    async def _get(self, host: str, port: int, path: str) -> tuple[int, Any]:
        """C{(status, JSON document or _NOT_JSON)}; raises on a transport failure or timeout."""
        headers = Headers({b"accept": [b"application/json"]})
        started = self._clock.seconds()
        d = self._agent.request(b"GET", _url(host, port, path), headers, None)
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            d.cancel()

        timer = self._clock.callLater(self.timeout, expire)
        try:
            response = await d
        except Exception:
            if expired:
                raise _TimedOut() from None
            raise
        finally:
            if timer.active():
                timer.cancel()
        left = max(self.timeout - (self._clock.seconds() - started), 0.0)
        body = await read_small(response, self._clock, left, self._limit + 1)
        if len(body) > self._limit:
            return response.code, _NOT_JSON
        try:
            return response.code, json.loads(body)
        except ValueError:
            return response.code, _NOT_JSON

    async def _probe(self, host: str, port: int) -> Found | Miss:
        try:
            code, doc = await self._get(host, port, TAGS_PATH)
        except _TimedOut:
            return Miss(f"no answer within {self.timeout:g} s", True)
        except (ConnectionRefusedError, ConnectError, DNSLookupError) as e:
            return Miss(f"cannot connect ({type(e).__name__})", False)
        except Exception as e:
            return Miss(f"does not speak HTTP ({type(e).__name__})", True)
        if code == 200:
            models = ollama_models(doc)
            if models is not None:
                return Found(OLLAMA, tuple(models))
            listed = openai_models(doc)
            if listed is not None and listed[1] == LLAMACPP:
                return Found(LLAMACPP, tuple(listed[0]))
        try:
            code, doc = await self._get(host, port, MODELS_PATH)
        except _TimedOut:
            return Miss(f"GET {MODELS_PATH}: no answer within {self.timeout:g} s", True)
        except Exception as e:
            return Miss(f"GET {MODELS_PATH} failed ({type(e).__name__})", False)
        if code in (401, 403):
            return Miss(f"GET {MODELS_PATH} answered {code}: the server wants a key", True)
        if code != 200:
            return Miss(f"GET {MODELS_PATH} answered {code}", code < 500)
        listed = openai_models(doc)
        if listed is None:
            return Miss(f"GET {MODELS_PATH} answered no model list", True)
        models, kind = listed
        if kind is None:
            kind = OPENAI_COMPATIBLE
            try:
                code, native = await self._get(host, port, LMSTUDIO_PATH)
            except Exception:
                code, native = 0, None
            if code == 200 and is_lmstudio(native):
                kind = LMSTUDIO
        return Found(kind, tuple(models))
