"""
The policy plane in the request path (ADR-025), as the reference runs it:

  - after the caller is known, its model resolved and governance admitted
    the request, and before anything is sent upstream: the request gate
    (allow, deny with a reason, or filter the request's tools), then the
    decoration (messages or a system text added, once per request);
  - on a whole JSON answer, before it is delivered: the response gate
    (allow, deny or amend);
  - on a stream, before its first byte reaches the agent: the same gate on
    the answer's head, where only a deny counts.

Every hook call is bounded by the operator's timeout and cancelled when the
agent leaves; waiting for one holds nothing but this request.  A gate that
fails refuses the request (C{policy_unavailable}) unless the operator chose
to fail open; a decoration that fails is skipped.  Agents whose
C{metadata.json} says C{"policy_exempt": true} (the policy's own judge,
say) skip every hook.

A proxy without a policy has no L{PolicyHooks} at all, and an exchange that
is not governed by one has no L{PolicyTurn}: the request path checks one
attribute and pays nothing more.
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import Any, cast

import attrs
from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from cllama_tx.governance.policy_plane import (
    AMEND,
    DECORATE,
    DENY,
    FORMAT_ANTHROPIC,
    FORMAT_OPENAI,
    GATE_REQUEST,
    GATE_RESPONSE,
    PARSERS,
    POLICY_AMENDED,
    POLICY_DECORATED,
    POLICY_DENIED,
    POLICY_TOOLS_FILTERED,
    POLICY_UNAVAILABLE,
    DecorateCall,
    Decoration,
    GateRequestCall,
    GateResponseCall,
    PolicyAnswerError,
    PolicyPlane,
    RequestMeta,
    RulesRef,
    ScoreCall,
    apply_decoration,
    denial_message,
    filter_tools,
    header_map,
)
from cllama_tx.governance.policy_sidecar import PolicyUnavailable
from cllama_tx.identity.rules import RulesRefs
from cllama_tx.surfaces.errors import ProxyError

log = Logger()

# The stage names the reference writes on an error line ("policy request gate: ...").
_STAGES = {
    GATE_REQUEST: "policy request gate",
    DECORATE: "policy decorate",
    GATE_RESPONSE: "policy response gate",
}
_STREAM_STAGE = "policy stream response gate"
_TOOL_FILTER_STAGE = "policy tool filter"
_METHODS = {GATE_REQUEST: "gate_request", DECORATE: "decorate", GATE_RESPONSE: "gate_response"}

UNAVAILABLE_MESSAGE = "policy evaluator unavailable"


def policy_exempt(principal: Any) -> bool:
    """
    C{"policy_exempt": true} (or C{"true"}) in an agent's metadata.json, or
    in a virtual key's metadata: the caller skips every hook.
    """
    key = getattr(principal, "key", None)
    metadata = getattr(key if key is not None else principal, "metadata", None)
    value = metadata.get("policy_exempt") if isinstance(metadata, dict) else None
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


@attrs.define
class PolicyTurn:
    """
    The policy's state of one governed request (C{Exchange.policy}), and
    the proxy's handle on the hooks that come after dispatch.
    """

    hooks: PolicyHooks
    meta: RequestMeta
    api_format: str
    decoration: Decoration | None = None
    # The request as last decorated, in the agent's wire format.
    effective: dict | None = None
    # What the agent got, for the score: the headers, and a whole JSON body
    # (a stream's bytes are in the exchange's bounded copy).
    headers: dict | None = None
    delivered: bytes | None = None

    def decorated(self, doc: dict) -> dict:
        """C{doc} (one candidate's body, before any translation) with the decoration added."""
        if self.decoration is not None:
            doc = apply_decoration(doc, self.api_format, self.decoration)
        self.effective = doc
        return doc

    def gate_response(self, ex, status: int, body: bytes, headers) -> Coroutine[Any, Any, bytes]:
        """See L{PolicyHooks.gate_response}."""
        return self.hooks.gate_response(ex, status, body, headers)

    def gate_stream(self, ex, response, headers) -> Coroutine[Any, Any, None]:
        """See L{PolicyHooks.gate_stream}."""
        return self.hooks.gate_stream(ex, response, headers)


class _Discard(Protocol):
    """Closes an upstream answer that will not be relayed."""

    def connectionMade(self) -> None:
        cast(IPushProducer, self.transport).stopProducing()


class PolicyHooks:
    """Runs the policy's hooks for the proxy; one per daemon."""

    def __init__(self, plane: PolicyPlane, *, clock, metering, audit, rules: RulesRefs | None = None) -> None:
        self.plane = plane
        self._clock = clock
        self._metering = metering
        self._audit = audit
        self._rules = rules if rules is not None else RulesRefs(clock)
        # The score hook, after an answer was delivered (and only when the evaluator has one).
        evaluator = plane.evaluator
        if getattr(evaluator, "score", None) is not None and getattr(evaluator, "wants_score", True):
            metering.on_settled.append(self._settled)

    # -- before dispatch

    async def before_dispatch(self, ex, principal, doc: dict) -> dict:
        """
        Gate and decorate a request (unless its caller is exempt); returns
        the body to send, its tools filtered.  Raises the L{ProxyError} to
        answer with.  The decoration is added to each candidate's body by
        L{PolicyTurn.decorated}.
        """
        if policy_exempt(principal):
            return doc
        turn = ex.policy = PolicyTurn(self, self._meta(ex, principal), ex.surface.api_format)
        gate = await self._ask(ex, GATE_REQUEST, GateRequestCall(turn.meta, doc))
        if gate is not None:
            self._named(ex, GATE_REQUEST, gate.intervention)
            if gate.denied:
                self._deny(ex, GATE_REQUEST, gate.reason)
            if gate.tool_filter is not None:
                try:
                    doc, removed = filter_tools(doc, gate.tool_filter)
                except PolicyAnswerError as e:
                    self._unavailable(ex, GATE_REQUEST, str(e), _TOOL_FILTER_STAGE)
                else:
                    if removed:
                        self._metering.intervention(
                            ex, POLICY_TOOLS_FILTERED, hook=GATE_REQUEST,
                            filter_mode=gate.tool_filter.mode.strip().lower(), removed=list(removed)[:100],
                        )
        decoration = await self._ask(ex, DECORATE, DecorateCall(turn.meta, doc))
        if decoration is not None:
            self._named(ex, DECORATE, decoration.intervention)
            if apply_decoration(doc, turn.api_format, decoration) is not doc:
                if not decoration.intervention:
                    self._metering.intervention(ex, POLICY_DECORATED, hook=DECORATE)
                turn.decoration = decoration
        return doc

    # -- before delivery

    async def gate_response(self, ex, status: int, body: bytes, headers) -> bytes:
        """
        Gate a whole 2xx answer C{body} (in the agent's wire format, with
        the headers it is about to get): the body to deliver, amended or
        not, or the L{ProxyError} of a denial.  A refused answer is billed
        for what the provider reported (it was paid for).
        """
        turn: PolicyTurn = ex.policy
        turn.headers = header_map(headers.getAllRawHeaders())
        call = GateResponseCall(
            attrs.evolve(turn.meta, stream=False),
            request_body=self._effective(ex, turn),
            response_status=status,
            response_header=turn.headers,
            response_body=body.decode("utf-8", "replace"),
        )
        ex.answer_refused = True  # until it is let through
        decision = await self._ask(ex, GATE_RESPONSE, call)
        if decision is not None:
            self._named(ex, GATE_RESPONSE, decision.intervention)
            action = decision.action
            if action == DENY:
                self._deny(ex, GATE_RESPONSE, decision.reason)
            if action == AMEND:
                if not decision.intervention:
                    self._metering.intervention(ex, POLICY_AMENDED, hook=GATE_RESPONSE)
                body = decision.amended_body
                ex.response_json = _readable(body)  # the session history keeps what was delivered
        ex.answer_refused = False
        turn.delivered = body
        return body

    async def gate_stream(self, ex, response, headers) -> None:
        """
        Gate a stream on its head, before its first byte reaches the agent:
        only a deny counts (the reference's v1 streaming rule).  A denied
        stream is closed unread and billed as one the agent walked away
        from.
        """
        turn: PolicyTurn = ex.policy
        if not 200 <= response.code < 300:
            return
        turn.headers = header_map(headers.getAllRawHeaders())
        call = GateResponseCall(
            attrs.evolve(turn.meta, stream=True),
            request_body=self._effective(ex, turn),
            response_status=response.code,
            response_header=turn.headers,
        )
        ex.answer_refused = True
        try:
            decision = await self._ask(ex, GATE_RESPONSE, call, stage=_STREAM_STAGE)
            if decision is not None:
                self._named(ex, GATE_RESPONSE, decision.intervention)
                if decision.verdict.strip().lower() == DENY:
                    self._deny(ex, GATE_RESPONSE, decision.reason)
        except BaseException:
            response.deliverBody(_Discard())
            raise
        ex.answer_refused = False

    # -- after delivery

    def _settled(self, ex, row) -> None:
        """
        The reference's score hook: the answer an agent got, sent to the
        policy once the request is settled, fire and forget (bounded by
        the timeout; a failure is an error line and nothing else).
        """
        turn = ex.policy
        if turn is None or not 200 <= row.status < 300 or ex.gone:
            return
        if turn.delivered is not None:
            body, stream = turn.delivered, False
        elif ex.response_sse is not None:
            body, stream = b"".join(ex.response_sse), True
        else:
            return  # nothing the policy saw (a token count answered here)
        call = ScoreCall(
            attrs.evolve(turn.meta, stream=stream),
            request_body=self._effective(ex, turn),
            response_status=row.status,
            response_header=turn.headers or {},
            response_body=body.decode("utf-8", "replace"),
        )
        d = defer.maybeDeferred(self.plane.evaluator.score, call)
        timer = self._clock.callLater(self.plane.timeout, d.cancel)

        def done(result):
            if timer.active():
                timer.cancel()
            return result

        def failed(failure):
            if failure.check(defer.CancelledError):
                cause = f"no answer within {round(self.plane.timeout * 1000)} ms"
            elif failure.check(PolicyUnavailable):
                cause = str(failure.value)
            else:
                log.failure("The policy's score hook failed", failure)
                cause = f"the policy failed ({failure.type.__name__})"
            self._audit.emit(
                "error", ex.claw_id, ex.model, request_id=ex.request_id,
                status_code=0, latency_ms=0, error=f"policy score: {cause}",
            )

        d.addBoth(done).addErrback(failed)

    # -- the calls

    async def _ask(self, ex, hook: str, call, stage: str | None = None):
        """
        One hook call, bounded by the timeout: its decision, or None when
        the policy failed and the request goes on without it (a decoration;
        a gate failing open).  A gate failing closed raises.
        """
        try:
            d = defer.maybeDeferred(getattr(self.plane.evaluator, _METHODS[hook]), call)
        except Exception:  # pragma: no cover - maybeDeferred catches
            d = defer.fail()
        timed_out: list[bool] = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self._clock.callLater(self.plane.timeout, expire)
        ex.cancel = d.cancel  # the agent leaving cancels the call
        try:
            answer = await d
            return PARSERS[hook](answer)
        except Exception as e:
            if ex.gone:
                raise ProxyError(499, "client_closed", "client disconnected") from None
            if timed_out:
                cause = f"no answer within {round(self.plane.timeout * 1000)} ms"
            elif isinstance(e, (PolicyUnavailable, PolicyAnswerError)):
                cause = str(e)
            else:
                log.failure("The policy's {hook} hook failed", hook=hook)
                cause = f"the policy failed ({e.__class__.__name__})"
            self._unavailable(ex, hook, cause, stage)
            return None
        finally:
            if timer.active():
                timer.cancel()
            ex.cancel = None

    def _unavailable(self, ex, hook: str, cause: str, stage: str | None = None) -> None:
        """
        The policy could not decide.  A decoration goes on undecorated and a
        gate failing open lets the request through, each with the
        reference's C{error} line; a gate failing closed refuses it.
        """
        stage = stage or _STAGES[hook]
        if hook == DECORATE or self.plane.fail_open:
            latency = 0 if hook == DECORATE else round((self._clock.seconds() - ex.started) * 1000, 3)
            self._audit.emit(
                "error", ex.claw_id, ex.model, request_id=ex.request_id,
                status_code=0, latency_ms=latency, error=f"{stage}: {cause}",
            )
            return
        self._metering.intervention(ex, POLICY_UNAVAILABLE, hook=hook, reason=cause)
        raise ProxyError(403, POLICY_UNAVAILABLE, UNAVAILABLE_MESSAGE)

    def _deny(self, ex, hook: str, reason: str) -> None:
        details = {"reason": reason.strip()} if reason.strip() else {}
        self._metering.intervention(ex, POLICY_DENIED, hook=hook, **details)
        raise ProxyError(403, POLICY_DENIED, denial_message(reason))

    def _named(self, ex, hook: str, name: str) -> None:
        """The intervention the policy named itself, if any (logged as it says)."""
        if name:
            self._metering.intervention(ex, name, hook=hook)

    # -- what a call says

    def _meta(self, ex, principal) -> RequestMeta:
        model = ex.model.strip() if isinstance(ex.model, str) else ""
        rules = RulesRef()
        directory = getattr(principal, "path", None)
        if isinstance(directory, str) and getattr(principal, "secret", None) is not None:
            rules = RulesRef(*self._rules.get(directory))  # an agent context, not a key
        return RequestMeta(
            agent_id=ex.claw_id or "",
            format=FORMAT_ANTHROPIC if ex.surface.api_format == "anthropic" else FORMAT_OPENAI,
            stream=ex.stream,
            model=model,
            rules=rules,
            request_id=ex.request_id,
        )

    @staticmethod
    def _effective(ex, turn: PolicyTurn) -> str:
        """The request as sent (in the agent's wire format when it was translated)."""
        doc = ex.doc if ex.crossing is None else turn.effective
        if doc is None:
            return ""
        return json.dumps(doc, separators=(",", ":"), ensure_ascii=False)


def _readable(body: bytes | None) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return body.decode("utf-8", "replace")
