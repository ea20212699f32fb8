"""
The state of one exchange, and how it is settled: priced, recorded in the
ledger, written to the audit stream and (for successful turns) to the
session history.  Every request ends in exactly one L{Metering.settle}, so
no path (success, refusal, upstream failure, agent gone) can skip the books.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger

from cllama_tx.accounting.history import HistoryEntry, history_usage, json_response, sse_response
from cllama_tx.accounting.usage import estimate_output_tokens, estimate_prompt_tokens
from cllama_tx.governance.engine import Admission
from cllama_tx.pipeline.failover_reasons import EXHAUSTED_FAILOVER, POOL_REASONS, candidate_fallback
from cllama_tx.store.records import LedgerRow, Usage, rfc3339_ms
from cllama_tx.surfaces.bridges import Crossing
from cllama_tx.surfaces.translate_common import chat_id_from_message_id, message_id_from_chat_id

if TYPE_CHECKING:  # the proxy imports this module
    from cllama_tx.pipeline.proxy import Surface

log = Logger()

# The status we record when the agent hangs up before the answer is complete.
CLIENT_CLOSED = 499
# The status we record when a stream is cut because the agent stopped reading
# it for longer than the agent stall timeout (docs/LEDGER.md, stream billing).
AGENT_STALLED = 408


@attrs.define
class Exchange:
    """Everything known about one request, from arrival to settlement."""

    request_id: str
    started: float
    surface: Surface
    claw_id: str | None = None
    model: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    stream: bool = False
    doc: dict | None = None
    original: dict | None = None  # the agent's body, kept only for history
    first_byte_at: float | None = None
    gone: bool = False
    cancel: Callable[[], object] | None = None
    upstream_called: bool = False
    strip_usage_chunk: bool = False
    agent_wants_usage: bool = False
    usage: Usage | None = None
    # Set by the stream tap: the provider's final count arrived (the usage
    # chunk, message_delta's usage), else usage holds at most a part of it
    # (message_start's input).  None: no tap; a usage seen is the whole.
    usage_final: bool | None = None
    output_chars: int = 0
    # Bytes relayed to the agent that could not be read as text.
    unmetered_bytes: int = 0
    # Part of a 2xx answer reached the agent before it ended in an error:
    # the row bills that part whatever the status.
    delivered: bool = False
    response_json: Any = None
    response_sse: list | None = None
    response_sse_size: int = 0
    settled: bool = False
    attempt_started: float = 0.0
    body_size: int = 0
    # Who is billed, for requests made with a virtual key.
    key_id: str | None = None
    team_id: str | None = None
    user_id: str | None = None
    organization_id: str | None = None
    end_user: str | None = None  # the customer the request names in "user" (LiteLLM)
    answer_id: str | None = None  # the answer's "id" as the agent saw it (answer_id())
    admission: Admission | None = None  # what governance held for this request
    # What its budget says once settled (governance.finish): the caller's cost headers.
    budget_report: Any = None
    # Shared store: reservations to release once the row is committed.
    shared_release: tuple | None = None
    # Shared store: a kept Responses conversation being written (awaited before the last byte).
    conversation_kept: Any = None
    crossing: Crossing | None = None  # the surface translation in use, if any
    # What the upstream request left out (named in the x-cllama-dropped header).
    dropped: tuple[str, ...] = ()
    # The Responses surface: the request as sent upstream before any
    # translation (its conversation expanded), and the id the proxy gave
    # its translated answer.
    conversation: dict | None = None
    response_id: str | None = None
    error_code: str | None = None  # the ProxyError code the request ended with, if any
    # The policy plane's state of this request (pipeline/policy_hooks.py), when a policy governs it.
    policy: Any = None
    # A 2xx answer the policy refused to deliver: billed as one the agent walked away from.
    answer_refused: bool = False
    # What the request asks of the LLM resolver (?force, ?prompt=), or None.
    resolve_hints: Any = None
    # A passthrough request (/_proxy/<provider>/<path>, pipeline/passthrough.py):
    # its path, the bytes of its body and its answer, its cost as its answer
    # said it (cost, priced), and its worst case for governance (engine.Ceiling).
    path: str | None = None
    request_bytes: int | None = None
    response_bytes: int | None = None
    priced_as: tuple[float, bool] | None = None
    fixed_worst: Any = None


def answer_id(ex: Exchange, upstream_id: Any, upstream_format: str) -> str | None:
    """
    The id the agent saw on its answer, from the provider's: the same when
    no translation happened, as the translation derives it otherwise
    (C{msg_X} <-> C{chatcmpl-X}); a Responses answer the proxy made has
    its own.  Kept on the ledger row (LiteLLM's spend logs find a request
    by it).
    """
    if ex.response_id is not None:
        return ex.response_id
    if not isinstance(upstream_id, str) or not upstream_id:
        return None
    client = ex.surface.api_format
    if client == "openai" and upstream_format == "anthropic":
        return chat_id_from_message_id(upstream_id)[:200]
    if client == "anthropic" and upstream_format == "openai":
        return message_id_from_chat_id(upstream_id)[:200]
    return upstream_id[:200]


def audit_fields(row: LedgerRow) -> dict:
    """
    A settled request's fields on its C{response}/C{error} audit line.
    Tokens that could not be priced leave C{cost_usd} out (as the
    reference writes it: absent, not 0, so a sum never counts an unknown
    price as free; C{priced} is false); a request that cost nothing
    (refused, free, no usage) says 0.
    """
    fields = {
        "status_code": row.status,
        "latency_ms": row.latency_ms,
        "ttfb_ms": row.ttfb_ms,
        "provider": row.provider,
        "effective_model": row.effective_model,
        "stream": row.stream,
        # The contract's tokens_in is every prompt token (CONTRACT 7); the
        # row keeps plain input apart from the cache tokens.
        "tokens_in": row.prompt_tokens,
        "tokens_out": row.output_tokens,
        "cached_tokens": row.cache_read_tokens,
        "cache_write_tokens": row.cache_write_tokens,
        "reasoning_tokens": row.reasoning_tokens,
        "cost_usd": row.cost_usd,
        "priced": row.priced,
        "estimated": row.estimated,
    }
    if not row.priced and (row.prompt_tokens or row.output_tokens):
        del fields["cost_usd"]
    if row.path is not None:
        # A passthrough request: its provider-native path and its bytes.
        fields.update(path=row.path, request_bytes=row.request_bytes, response_bytes=row.response_bytes)
    return fields


@attrs.frozen
class Settlement:
    """What settling an exchange decided; the cost goes back to the caller."""

    row: LedgerRow
    committed: defer.Deferred


def billed_usage(ex: Exchange, status: int) -> tuple[Usage, bool]:
    """
    The usage a settled exchange is billed for, and whether it is estimated.

    An answer the agent got (2xx), walked away from (499), or got part of
    before it broke (C{ex.delivered}: a provider reset, a close, an idle
    cut, an agent stall cut), or that the policy refused to deliver
    (C{ex.answer_refused}) is billed: with the provider's count when its
    final count arrived; else with what arrived of it (Anthropic's
    C{message_start} input) completed by an estimate, the output never
    below what the relayed text and bytes amount to
    (L{estimate_output_tokens}); else wholly estimated, the input from the
    request.  Anything else (refusals, upstream errors before a byte
    reached the agent) is billed as reported, usually nothing.
    """
    usage = ex.usage if ex.usage is not None else Usage()
    if not (ex.upstream_called and ex.surface.billable):
        return usage, False
    if not (200 <= status < 300 or status == CLIENT_CLOSED or ex.delivered or ex.answer_refused):
        return usage, False
    final = usage.seen if ex.usage_final is None else ex.usage_final
    if final:
        return usage, False
    output = estimate_output_tokens(ex.output_chars, ex.unmetered_bytes)
    if not usage.seen:
        prompt = estimate_prompt_tokens(ex.original or {}, ex.surface.api_format)
        return Usage(input_tokens=prompt, output_tokens=output), True
    partial = attrs.evolve(usage, output_tokens=max(usage.output_tokens, output))
    if partial.prompt_tokens == 0:
        partial.input_tokens = estimate_prompt_tokens(ex.original or {}, ex.surface.api_format)
    return partial, True


class Metering:
    """Prices and records exchanges; one instance per daemon."""

    def __init__(self, *, clock, pricing, ledger, audit, history=None, history_sse_cap: int = 256 << 10) -> None:
        self._clock = clock
        self._pricing = pricing
        self._ledger = ledger
        self._audit = audit
        self._history = history
        self.history_sse_cap = history_sse_cap
        # Called with (exchange, row) when an exchange is settled (governance).
        self.on_settled: list = []
        # Called with (exchange, committed) once its row is handed to the
        # ledger; C{committed} fires when the row is in the store (None: no row).
        self.on_recorded: list = []

    @property
    def keeps_history(self) -> bool:
        return self._history is not None

    def audit_request(self, ex: Exchange) -> None:
        """The C{request} line, once the agent and its model are known."""
        self._audit.emit(
            "request",
            ex.claw_id,
            ex.model,
            request_id=ex.request_id,
            path=ex.surface.path,
            stream=ex.stream,
        )

    def failover(self, ex: Exchange, from_ref, to_ref, reason: str, detail: str = "", slot_index: int = 1) -> None:
        """
        One candidate failed, the next is tried: the lines the reference
        writes for it, in its order (C{provider_candidate_fallback:<reason>}
        unless the key pool failed, the C{failover} line with C{reason} a
        code and C{slot_index} the next candidate's, then
        C{provider_exhausted_failover}); the words are in C{detail}.
        """
        if reason not in POOL_REASONS:
            self.intervention(ex, candidate_fallback(reason))
        self._audit.emit(
            "failover",
            ex.claw_id,
            ex.model,
            request_id=ex.request_id,
            from_provider=from_ref.provider,
            from_model=from_ref.model,
            to_provider=to_ref.provider,
            to_model=to_ref.model,
            reason=reason,
            detail=detail,
            slot_index=slot_index,
            latency_ms=round((self._clock.seconds() - ex.started) * 1000, 3),
        )
        self.intervention(ex, EXHAUSTED_FAILOVER)

    def intervention(self, ex: Exchange, name: str, **details) -> None:
        """An C{intervention} line: the proxy changed what the agent asked for."""
        self._audit.emit(
            "intervention", ex.claw_id, ex.model, request_id=ex.request_id, intervention=name, **details
        )

    def cost_extra(self, ex: Exchange):
        """For an agent that asked for usage: the price, OpenRouter style."""

        def extra(usage: Usage) -> dict:
            cost, priced = self._pricing.cost(ex.provider, ex.upstream_model, usage)
            return {"cost": cost} if priced else {}

        return extra

    def keep_sse(self, ex: Exchange, data: bytes) -> None:
        """Keep a bounded copy of a streamed answer for the session history."""
        if ex.response_sse is None:
            ex.response_sse = []
        if ex.response_sse_size < self.history_sse_cap:
            ex.response_sse.append(data)
        ex.response_sse_size += len(data)

    def settle(self, ex: Exchange, status: int, error: str | None = None) -> Settlement | None:
        """
        Close the books on C{ex}: price its usage (estimating it when the
        provider reported none for an answer the agent got or walked away
        from), record the ledger row, write the audit line.  Returns None
        when it was settled already.
        """
        if ex.settled:
            return None
        ex.settled = True
        now = self._clock.seconds()
        usage, estimated = billed_usage(ex, status)
        if ex.priced_as is not None:
            cost, priced = ex.priced_as
        elif not ex.surface.billable:
            cost, priced = 0.0, False
        elif ex.provider is not None and ex.upstream_model is not None:
            cost, priced = self._pricing.cost(ex.provider, ex.upstream_model, usage)
        else:
            cost, priced = 0.0, False
        latency_ms = round((now - ex.started) * 1000, 3)
        ttfb_ms = None if ex.first_byte_at is None else round((ex.first_byte_at - ex.started) * 1000, 3)
        row = LedgerRow(
            request_id=ex.request_id,
            ts=ex.started,
            agent=ex.claw_id,
            provider=ex.provider,
            requested_model=ex.model,
            effective_model=ex.upstream_model,
            status=status,
            stream=ex.stream,
            latency_ms=latency_ms,
            ttfb_ms=ttfb_ms,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            cost_usd=cost,
            priced=priced,
            estimated=estimated,
            key_id=ex.key_id,
            team_id=ex.team_id,
            user_id=ex.user_id,
            organization_id=ex.organization_id,
            end_user=ex.end_user,
            response_id=ex.answer_id,
            path=ex.path,
            request_bytes=ex.request_bytes,
            response_bytes=ex.response_bytes,
        )
        fields = audit_fields(row)
        if error is None:
            self._audit.emit("response", ex.claw_id, ex.model, request_id=ex.request_id, **fields)
        else:
            self._audit.emit("error", ex.claw_id, ex.model, request_id=ex.request_id, error=error, **fields)
        for observer in self.on_settled:
            observer(ex, row)
        if ex.claw_id is None or not ex.surface.billable:
            # Refused before the agent was known, or a free call (token
            # counting): audited, not billed to anyone.
            for recorded in self.on_recorded:
                recorded(ex, None)
            return Settlement(row, defer.succeed(None))
        committed = self._ledger.record(row)
        committed.addErrback(self._record_failed, ex)
        for recorded in self.on_recorded:
            recorded(ex, committed)
        if error is None and 200 <= status < 300 and self._history is not None and ex.path is None:
            # (A passthrough answer is no turn of a conversation: not in the history.)
            self._write_history(ex, ex.claw_id, status, usage, now)
        return Settlement(row, committed)

    def _record_failed(self, failure, ex: Exchange) -> None:
        log.failure(
            "could not record request {request_id} in the ledger", failure, request_id=ex.request_id
        )

    def _write_history(self, ex: Exchange, claw_id: str, status: int, usage: Usage, now: float) -> None:
        if ex.response_sse is not None:
            response = sse_response(b"".join(ex.response_sse), total_bytes=ex.response_sse_size)
        else:
            response = json_response(ex.response_json)
        entry = HistoryEntry(
            version=1,
            id=ex.request_id,
            ts=rfc3339_ms(now),  # when the turn completed: file order == ts order
            claw_id=claw_id,
            path=ex.surface.path,
            requested_model=ex.model,
            effective_provider=ex.provider,
            effective_model=ex.upstream_model,
            status_code=status,
            stream=ex.stream,
            request_original=ex.original,
            request_effective=ex.doc,
            response=response,
            # reported_cost_usd stays what the provider reported (or null), as
            # in the reference; our own price is in the ledger and the audit.
            usage=history_usage(usage),
        )
        self._history.append(entry).addErrback(
            lambda f: log.failure("could not write session history", f)
        )
