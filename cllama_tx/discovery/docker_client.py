"""
The Docker Engine API over its UNIX socket (only the socket: discovery
never asks a Docker daemon on another host), for the one call discovery
makes: the list of running containers (L{cllama_tx.discovery.docker}).
The request is unversioned, so it speaks the daemon's own API version.
"""

from __future__ import annotations

import json
import os

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from cllama_tx.discovery.docker import containers_path, parse_containers
from cllama_tx.providers.bodies import read_small

#: A container list with hundreds of containers is a few hundred KiB.
BODY_LIMIT = 8 * 1024 * 1024


class DockerUnavailable(Exception):
    """The Docker API could not be asked; the message says why (never a body)."""


@implementer(IAgentEndpointFactory)
class _SocketEndpoints:
    def __init__(self, reactor, path: str, timeout: float) -> None:
        self._reactor = reactor
        self._path = path
        self._timeout = timeout

    def endpointForURI(self, uri):
        return UNIXClientEndpoint(self._reactor, self._path, timeout=max(1, int(self._timeout + 0.999)))


class DockerApi:
    """Lists the running containers through the socket at C{path}."""

    def __init__(self, reactor, path: str, timeout: float, pool=None) -> None:
        self._reactor = reactor
        self.path = path
        self._timeout = timeout
        self._agent = Agent.usingEndpointFactory(reactor, _SocketEndpoints(reactor, path, timeout), pool=pool)

    def present(self) -> bool:
        """Whether the socket is there (mounted) now."""
        return os.path.exists(self.path)

    def containers(self, project: str | None) -> defer.Deferred:
        """
        A Deferred firing with the running L{cllama_tx.discovery.docker.Container}s
        (of C{project} when given), or failing with L{DockerUnavailable}.
        """
        return defer.ensureDeferred(self._containers(project))

    async def _containers(self, project: str | None) -> list:
        url = b"http://docker" + containers_path(project).encode("ascii")
        d = self._agent.request(b"GET", url, Headers({b"accept": [b"application/json"]}), None)
        expired: list[bool] = []

        def expire() -> None:
            expired.append(True)
            d.cancel()

        timer = self._reactor.callLater(self._timeout, expire)
        try:
            response = await d
        except Exception as e:
            if expired:
                raise DockerUnavailable(f"the Docker API at {self.path} did not answer within {self._timeout:g} s") from None
            raise DockerUnavailable(f"cannot reach the Docker API at {self.path}: {type(e).__name__}") from None
        finally:
            if timer.active():
                timer.cancel()
        body = await read_small(response, self._reactor, self._timeout, BODY_LIMIT + 1)
        if response.code != 200:
            raise DockerUnavailable(f"the Docker API at {self.path} answered {response.code} to the container list")
        if len(body) > BODY_LIMIT:
            raise DockerUnavailable(f"the Docker API's container list is larger than {BODY_LIMIT} bytes")
        try:
            doc = json.loads(body)
        except ValueError:
            raise DockerUnavailable(f"the Docker API at {self.path} answered something that is not JSON") from None
        return parse_containers(doc, project)
