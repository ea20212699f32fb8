"""
Policy plugins for the plugin loader's tests (CLLAMA_POLICY_PLUGIN names
them as tests.governance.policy_plugins:<factory>).
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from cllama_tx.governance.policy_plane import Decoration, GateDecision
from cllama_tx.interfaces import IRequestPolicy


@implementer(IRequestPolicy)
class Recording:
    """Answers in every way a plugin may: a value, a dict, a coroutine, a Deferred, None."""

    def __init__(self, host):
        self.host = host
        self.calls = []

    def gate_request(self, call):
        self.calls.append(call)
        call.request["model"] = "changed by the plugin"  # its own copy
        if "deny" in str(call.request.get("messages")):
            return {"verdict": "deny", "reason": "as a dict"}
        return GateDecision(verdict="allow")

    async def decorate(self, call):
        self.calls.append(call)
        return Decoration(system_patch="from a coroutine")

    def gate_response(self, call):
        self.calls.append(call)
        if call.response_body == "boom":
            raise RuntimeError("the plugin broke")
        if call.response_body == "nonsense":
            return defer.succeed({"verdict": ["x"]})
        return defer.succeed(None)


def recording(host):
    return Recording(host)


class Shapeless:
    """Has no hooks."""


def shapeless(host):
    return Shapeless()


def failing(host):
    raise ValueError("no settings")


NOT_CALLABLE = 3
