"""
A listener's site built on its first connection.

Most daemons never see a browser on the operator UI's port, yet building
its site means importing the UI (its pages, Klein and werkzeug) and making
its objects: megabytes held for nothing.  L{LazySite} stands in for the
site as the listener's factory, binds and starts with it as the site
would, and builds the real one when the first connection comes; from then
on every call goes to it.  L{LazyResource} does the same for a resource:
the API site's Klein app, built on the first request to one of its paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.web.resource import Resource
from zope.interface import implementer

log = Logger()


@implementer(IProtocolFactory)
class LazySite:
    """
    @param build: makes the real site (a C{ServerFactory}); called once,
        on the first connection or the first L{site} call.
    @param label: the listener's name, for the log line that says when it was built.
    """

    noisy = False

    def __init__(self, build: Callable[[], Any], label: str = "site") -> None:
        self._build: Callable[[], Any] | None = build
        self._label = label
        self._started = 0  # ports that started this factory and have not stopped it
        self.built: Any = None

    def site(self) -> Any:
        """The real site, built now if it was not yet, and started as often as this stand-in was."""
        if self.built is None:
            build, self._build = self._build, None
            assert build is not None
            site = build()
            for _ in range(self._started):
                site.doStart()
            self.built = site
            log.info("{label} built on its first connection", label=self._label)
        return self.built

    def buildProtocol(self, addr):
        return self.site().buildProtocol(addr)

    def doStart(self) -> None:
        self._started += 1
        if self.built is not None:
            self.built.doStart()

    def doStop(self) -> None:
        if self._started == 0:
            return
        self._started -= 1
        if self.built is not None:
            self.built.doStop()

    def logPrefix(self) -> str:
        return self._label


class LazyResource(Resource):
    """
    A leaf standing in for C{build()}'s resource, built on the first request
    it must answer.  C{exact} maps a request path to a resource that answers
    it instead, built or not (C{/health}: probes must not build the app).
    """

    isLeaf = True

    def __init__(self, build: Callable[[], Resource], label: str = "resource") -> None:
        super().__init__()
        self._build: Callable[[], Resource] | None = build
        self._label = label
        self.exact: dict[bytes, Resource] = {}
        self.built: Resource | None = None

    def resource(self) -> Resource:
        """The real resource, built now if it was not yet."""
        if self.built is None:
            build, self._build = self._build, None
            assert build is not None
            self.built = build()
            log.info("{label} built on its first request", label=self._label)
        return self.built

    def render(self, request):
        answer = self.exact.get(request.path)
        if answer is not None:
            return answer.render(request)
        return self.resource().render(request)
