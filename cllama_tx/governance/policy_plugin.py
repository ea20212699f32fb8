"""
In-process policy plugins: an operator's Python object that provides
L{IRequestPolicy}, named by C{CLLAMA_POLICY_PLUGIN=package.module:factory}
and built once at start-up by calling C{factory(host)} with a
L{PluginHost} (the reactor and the environment).

The plugin gets the same calls a sidecar gets (L{policy_plane}'s call
objects, the request a deep copy it may keep) and may answer with a
decision object, a dict in the sidecar's wire shape or None, directly, as
a Deferred or as a coroutine.  L{PluginPolicy} turns all of those into a
Deferred of a decision, and an exception into a failure: the pipeline
then treats the policy as unavailable, as it does a sidecar that is down.
"""

from __future__ import annotations

import copy
import importlib
import inspect
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet import defer
from zope.interface import implementer
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from cllama_tx.governance.policy_plane import (
    DECORATE,
    GATE_REQUEST,
    GATE_RESPONSE,
    PARSERS,
    DecorateCall,
    GateRequestCall,
    GateResponseCall,
    PolicyAnswerError,
)
from cllama_tx.interfaces import IRequestPolicy


class PluginError(Exception):
    """The plugin cannot be loaded; the daemon does not start."""


@attrs.frozen
class PluginHost:
    """What a plugin's factory is given."""

    reactor: Any
    # The daemon's environment (after command-line overrides): a plugin's own settings.
    env: Mapping[str, str] = attrs.field(repr=False)


def find_factory(spec: str) -> Any:
    """
    C{package.module:name} (or C{package.module.name}) -> the factory.

    @raise PluginError: it cannot be imported or found, or is not callable.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep:
        module_name, _, attribute = spec.rpartition(".")
    if not module_name or not attribute:
        raise PluginError(f"CLLAMA_POLICY_PLUGIN={spec!r} is not 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise PluginError(f"cannot import {module_name!r}: {e.__class__.__name__}: {e}") from None
    target: Any = module
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise PluginError(f"{module_name!r} has no {attribute!r}") from None
    if not callable(target):
        raise PluginError(f"{spec!r} is not callable")
    return target


def load_plugin(spec: str, host: PluginHost) -> PluginPolicy:
    """
    Import and build the plugin C{spec} names.

    @raise PluginError: it cannot be imported, built, or does not provide
        the three hooks.
    """
    factory = find_factory(spec)
    try:
        policy = factory(host)
    except Exception as e:
        raise PluginError(f"{spec!r} failed: {e.__class__.__name__}: {e}") from None
    try:
        # Declared with @implementer(IRequestPolicy), or at least shaped like it.
        verifyObject(IRequestPolicy, policy, tentative=True)
    except Invalid as e:
        raise PluginError(f"{spec!r} did not build an IRequestPolicy: {e}") from None
    return PluginPolicy(policy)


def _deferred(result: Any) -> defer.Deferred:
    if isinstance(result, defer.Deferred):
        return result
    if inspect.iscoroutine(result):
        return defer.ensureDeferred(result)
    return defer.succeed(result)


@implementer(IRequestPolicy)
class PluginPolicy:
    """An operator's plugin, held to the sidecar's rules."""

    def __init__(self, plugin: Any) -> None:
        self.plugin = plugin
        # Without a score method there is nothing to send after an answer: skipped.
        self.wants_score = callable(getattr(plugin, "score", None))

    def gate_request(self, call: GateRequestCall) -> defer.Deferred:
        return self._call(self.plugin.gate_request, attrs.evolve(call, request=copy.deepcopy(call.request)), GATE_REQUEST)

    def decorate(self, call: DecorateCall) -> defer.Deferred:
        return self._call(self.plugin.decorate, attrs.evolve(call, request=copy.deepcopy(call.request)), DECORATE)

    def gate_response(self, call: GateResponseCall) -> defer.Deferred:
        return self._call(self.plugin.gate_response, call, GATE_RESPONSE)

    def score(self, call: GateResponseCall) -> defer.Deferred:
        """The plugin's C{score(call)} when it has one (optional, as in a sidecar); its result unread."""
        method = getattr(self.plugin, "score", None)
        if method is None:
            return defer.succeed(None)
        return defer.maybeDeferred(method, call).addCallback(_deferred).addCallback(lambda _: None)

    @staticmethod
    def _call(method, call, hook: str) -> defer.Deferred:
        parse = PARSERS[hook]
        d = defer.maybeDeferred(method, call).addCallback(_deferred)

        def decided(answer):
            try:
                return parse(answer)
            except PolicyAnswerError as e:
                raise PolicyAnswerError(f"the plugin's answer cannot be used: {e}") from None

        return d.addCallback(decided)
