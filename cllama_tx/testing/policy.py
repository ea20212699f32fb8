"""
A fake policy sidecar for tests: a real HTTP server on a loopback port that
speaks the reference's protocol (ADR-025) byte for byte: it takes
C{POST /policy/gate-request}, C{/policy/decorate}, C{/policy/gate-response}
and C{/policy/score} with the reference's bodies, records them, and
answers with the reference's answer bodies (a score gets a bare 202).

Each hook answers as told (L{FakePolicySidecar.answer}): a fixed
L{PolicyReply} or a function of the call.  The builders below make the
reference's answers (L{allow}, L{deny}, L{filter_tools}, L{decorate},
L{amend}); L{PolicyReply} also makes a slow sidecar (C{hold_until}: no
answer until a Deferred fires, which may be never) and a broken one
(C{status}, C{raw}).  L{FakePolicySidecar.stop} is a sidecar that is down.
Deferreds fire as calls arrive (L{FakePolicySidecar.arrived}), so tests
never sleep to synchronise.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.protocols.policies import WrappingFactory
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

__all__ = [
    "FakePolicySidecar",
    "PolicyCall",
    "PolicyReply",
    "allow",
    "amend",
    "decorate",
    "deny",
    "filter_tools",
]

HOOKS = ("gate-request", "decorate", "gate-response", "score")


@attrs.frozen
class PolicyCall:
    """One call as the sidecar saw it; C{headers} has lower-cased names."""

    hook: str
    headers: dict[str, list[str]]
    body: bytes
    json: Any = None

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None


@attrs.frozen(eq=False)
class PolicyReply:
    """
    One answer: C{json} (serialised as Go would), else C{raw} bytes; with
    C{hold_until}, only once that Deferred fired (a slow sidecar).
    """

    status: int = 200
    json: Any = None
    raw: bytes | None = None
    hold_until: Deferred | None = None

    def body(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps(self.json, separators=(",", ":")).encode("utf-8")


def _with(doc: dict, intervention: str | None) -> PolicyReply:
    if intervention is not None:
        doc["intervention"] = intervention
    return PolicyReply(json=doc)


def allow(intervention: str | None = None) -> PolicyReply:
    """C{{"verdict": "allow"}}: for either gate."""
    return _with({"verdict": "allow"}, intervention)


def deny(reason: str = "", intervention: str | None = None) -> PolicyReply:
    """C{{"verdict": "deny", "reason": ...}}: for either gate."""
    doc: dict[str, Any] = {"verdict": "deny"}
    if reason:
        doc["reason"] = reason
    return _with(doc, intervention)


def filter_tools(mode: str, tools: list[str], intervention: str | None = None) -> PolicyReply:
    """A gate-request allow with a C{tool_filter} (C{allow_list} or C{deny_list})."""
    return _with({"verdict": "allow", "tool_filter": {"mode": mode, "tools": tools}}, intervention)


def decorate(messages_patch: list | None = None, system_patch: str | None = None,
             intervention: str | None = None) -> PolicyReply:
    """A decorate answer: messages for OpenAI-family requests, a system text for Anthropic ones."""
    doc: dict[str, Any] = {}
    if messages_patch is not None:
        doc["messages_patch"] = messages_patch
    if system_patch is not None:
        doc["system_patch"] = system_patch
    return _with(doc, intervention)


def amend(body: Any, intervention: str | None = None) -> PolicyReply:
    """A gate-response amend: C{body} is the JSON to deliver (a str: that text)."""
    return _with({"verdict": "amend", "amended_body": body}, intervention)


Answer = PolicyReply | Callable[[PolicyCall], PolicyReply]


class _Tracking(WrappingFactory):
    """Knows its open connections, so that stop() can drop them (no dirty reactor)."""

    noisy = False

    def __init__(self, wrapped: Site) -> None:
        super().__init__(wrapped)
        self._gone: dict[Any, list[Deferred]] = {}

    def when_gone(self, protocol: Any) -> Deferred:
        d: Deferred = Deferred()
        self._gone.setdefault(protocol, []).append(d)
        return d

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        for d in self._gone.pop(p, []):
            d.callback(None)


class _QuietSite(Site):
    def log(self, request: Any) -> None:
        pass


class _Hook(Resource):
    isLeaf = True

    def __init__(self, sidecar: FakePolicySidecar, hook: str) -> None:
        super().__init__()
        self._sidecar = sidecar
        self._hook = hook

    def render_POST(self, request):
        return self._sidecar._serve(self._hook, request)


class FakePolicySidecar:
    """
    The fake sidecar.  By default it allows every request and answer and
    decorates nothing (C{{}}).

    @ivar received: every L{PolicyCall}, in arrival order.
    @ivar token: when set, a call without C{Authorization: Bearer <token>}
        gets a 401 (as a sidecar that checks the reference's token would).
    """

    def __init__(self, reactor: Any, token: str | None = None) -> None:
        self._reactor = reactor
        self.token = token
        self.received: list[PolicyCall] = []
        self._answers: dict[str, Answer] = {
            "gate-request": allow(),
            "decorate": PolicyReply(json={}),
            "gate-response": allow(),
            "score": PolicyReply(status=202, raw=b""),
        }
        self._waiters: list[tuple[str | None, int, Deferred]] = []
        # Held calls whose caller hung up (a timeout, an agent gone), and who waits for one.
        self.dropped: list[PolicyCall] = []
        self._drop_waiters: list[Deferred] = []
        self._port: Any = None
        self._factory: _Tracking | None = None

    @property
    def url(self) -> str:
        """C{http://127.0.0.1:<port>}: the value of C{CLLAMA_POLICY_URL}."""
        if self._port is None:
            raise RuntimeError("the fake sidecar is not listening; call start() first")
        return f"http://127.0.0.1:{self._port.getHost().port}"

    def start(self) -> Deferred:
        if self._port is None:
            root = Resource()
            policy = Resource()
            root.putChild(b"policy", policy)
            for hook in HOOKS:
                policy.putChild(hook.encode(), _Hook(self, hook))
            site = _QuietSite(root, reactor=self._reactor)
            site.displayTracebacks = False
            self._factory = _Tracking(site)
            self._port = self._reactor.listenTCP(0, self._factory, interface="127.0.0.1")
        return succeed(self)

    def stop(self) -> Deferred:
        """Stop listening and drop every connection: from now on, a sidecar that is down."""
        if self._port is None:
            return succeed(None)
        port, self._port = self._port, None
        factory, self._factory = self._factory, None
        assert factory is not None
        waits = [maybeDeferred(port.stopListening)]
        for protocol in list(factory.protocols):
            waits.append(factory.when_gone(protocol))
            protocol.transport.abortConnection()
        return gatherResults(waits, consumeErrors=True).addCallback(lambda _: None)

    def answer(self, hook: str, answer: Answer) -> None:
        """From now on, answer C{hook} so (a reply, or a function of the call)."""
        if hook not in HOOKS:
            raise ValueError(f"no hook {hook!r}")
        self._answers[hook] = answer

    def calls(self, hook: str) -> list[PolicyCall]:
        return [call for call in self.received if call.hook == hook]

    def arrived(self, hook: str | None = None, count: int = 1) -> Deferred:
        """Fires once C{count} calls (of C{hook}, or of any hook) have arrived."""
        d: Deferred = Deferred()
        self._waiters.append((hook, count, d))
        self._notify()
        return d

    def call_dropped(self) -> Deferred:
        """Fires with the next held call whose caller hangs up before the answer."""
        d: Deferred = Deferred()
        self._drop_waiters.append(d)
        return d

    @property
    def open_connections(self) -> int:
        return len(self._factory.protocols) if self._factory is not None else 0

    def _notify(self) -> None:
        for waiter in list(self._waiters):
            hook, count, d = waiter
            seen = len(self.received) if hook is None else len(self.calls(hook))
            if seen >= count:
                self._waiters.remove(waiter)
                d.callback(self.received[-1])

    def _serve(self, hook: str, request) -> Any:
        raw = request.content.read()
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = None
        headers = {name.decode().lower(): [v.decode() for v in values]
                   for name, values in request.requestHeaders.getAllRawHeaders()}
        call = PolicyCall(hook, headers, raw, doc)
        self.received.append(call)
        if self.token is not None and call.header("authorization") != f"Bearer {self.token}":
            reply = PolicyReply(status=401, json={"error": "unauthorized"})
        else:
            answer = self._answers[hook]
            reply = answer(call) if callable(answer) else answer
        self._notify()
        if reply.hold_until is None:
            return self._write(request, reply)
        gone: list[bool] = []

        def hung_up(_: Any) -> None:
            gone.append(True)
            self.dropped.append(call)
            waiters, self._drop_waiters = self._drop_waiters, []
            for waiter in waiters:
                waiter.callback(call)

        request.notifyFinish().addErrback(hung_up)

        def release(_: Any) -> None:
            if not gone:
                request.write(self._write(request, reply))
                request.finish()

        reply.hold_until.addCallback(release)
        return NOT_DONE_YET

    @staticmethod
    def _write(request, reply: PolicyReply) -> bytes:
        body = reply.body()
        request.setResponseCode(reply.status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        return body
