"""
The pipeline of one inference request: identify the agent, route its model
ref, swap in a provider key, send, relay the answer back, settle the books.

This is the per-request hot path.  It reads no file, parses the request body
once and serialises it once, and keeps its state in one small L{Exchange}.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Protocol
from urllib.parse import unquote_to_bytes

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from cllama_tx.accounting.usage import SseTap, output_chars_from_json, usage_from_json
from cllama_tx.governance.engine import Admission
from cllama_tx.governance.llm_resolution import HINT_HEADER, PROXY_QUERY_PARAMS, read_hints
from cllama_tx.governance.output_limit import limit_body
from cllama_tx.identity.authenticate import (
    KeyNotChecked,
    identify,
    identify_stored,
    presented_token,
)
from cllama_tx.identity.operator import OperatorGuard, request_source
from cllama_tx.identity.principals import KeyPrincipal, MasterPrincipal
from cllama_tx.identity.virtual_keys import hash_key, looks_like_virtual_key
from cllama_tx.pipeline import cost_report, failover_reasons
from cllama_tx.pipeline.content_coding import UndecodableBody, decoded
from cllama_tx.pipeline.metering import AGENT_STALLED, Exchange, answer_id
from cllama_tx.pipeline.policy_hooks import PolicyHooks
from cllama_tx.pipeline.refusal import AgentGone, refuse, serve_guarded
from cllama_tx.pipeline.relay import (
    HOP_BY_HOP,
    AgentStalled,
    StreamRelay,
    UpstreamTimeout,
    copy_response_headers,
    read_body,
)
from cllama_tx.pipeline.tcp_progress import acked_bytes
from cllama_tx.pipeline.tls_failures import describe_failure
from cllama_tx.providers.bodies import read_small
from cllama_tx.providers.catalog import (
    auth_headers,
    needs_responses,
    responses_only,
    serves_responses,
    upstream_url,
)
from cllama_tx.providers.forwarding import NEVER_FORWARD, HeaderPolicy, first_header, forward
from cllama_tx.providers.health import INCONCLUSIVE, VALID
from cllama_tx.providers.keys import MAX_TRIES, classify_failure
from cllama_tx.providers.model_limits import traits_for
from cllama_tx.providers.registry import ProviderNotConfigured, UnknownProvider
from cllama_tx.store.conversations import SharedConversations
from cllama_tx.surfaces.bridges import RESPONSES, Call, Crossing, bridge_for
from cllama_tx.surfaces.errors import OPENAI, ProxyError, sse_error_event
from cllama_tx.surfaces.model_fit import fit_request
from cllama_tx.surfaces.responses_shapes import failure_events, minimal_response
from cllama_tx.surfaces.responses_state import ConversationStore, conversation_after, expand
from cllama_tx.surfaces.token_estimate import estimate_input_tokens
from cllama_tx.surfaces.translate import UntranslatableRequest
from cllama_tx.surfaces.validate import check_fields, parse_body

log = Logger()

# Request headers that never travel upstream whatever a provider's
# allow-list says: credentials, account selection, cookies, client identity,
# this hop's framing, the pod's markers.  What does travel is an explicit
# allow-list per provider (cllama_tx.providers.forwarding).
DROP_UPSTREAM = HOP_BY_HOP | NEVER_FORWARD

# A non-stream answer is held whole (its cost goes into a header, and the
# ledger row is committed before its last byte); past this size it is
# passed through unmetered instead, and its usage estimated.
MAX_BUFFERED_BODY = 16 * 1024 * 1024


@attrs.frozen
class Surface:
    """An ingress surface: its path, its wire format and its error shape."""

    name: str
    path: str
    api_format: str
    shape: str
    # Token counting costs nothing: audited, never billed.
    billable: bool = True


class Failover(Exception):
    """
    This candidate failed before anything reached the agent: try the next.
    C{reason} is the audit's code (L{failover_reasons}), C{detail} its words.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


# Failures that move a request to its next candidate model (CONTRACT 4).
FAILOVER_CODES = frozenset(
    {"upstream_unreachable", "upstream_timeout", "upstream_interrupted", "provider_keys_exhausted"}
)


class MasterKey(Protocol):
    """What the proxy asks of the key API to let its master key call inference."""

    guard: OperatorGuard

    def is_master(self, token: str | None) -> bool: ...


def new_request_id() -> str:
    return os.urandom(8).hex()


class Proxy:
    """Serves the inference surfaces; one instance per daemon."""

    def __init__(
        self,
        *,
        clock,
        contexts,
        providers,
        upstream,
        metering,
        governance,
        first_byte_timeout: float,
        idle_timeout: float,
        no_stream_options: frozenset[str] = frozenset(),
        keys=None,
        metrics=None,
        inflight=None,
        agent_stall_timeout: float | None = None,
        conversations: ConversationStore | SharedConversations | None = None,
        policy: PolicyHooks | None = None,
    ) -> None:
        self._inflight = inflight
        # The policy plane (ADR-025); None: no policy, and nothing paid for one.
        self._policy = policy
        # The Responses surface's memory of the answers it translated.
        self._conversations = conversations if conversations is not None else ConversationStore(clock)
        # How long an agent may leave a stream unread (None: the idle timeout).
        self._agent_stall_timeout = idle_timeout if agent_stall_timeout is None else agent_stall_timeout
        self._keys = keys
        self._metrics = metrics
        self.clock = clock  # the API site reads it too
        self._contexts = contexts
        self._providers = providers
        self._upstream = upstream
        self._metering = metering
        self._governance = governance
        self._first_byte_timeout = first_byte_timeout
        self._idle_timeout = idle_timeout
        self._no_stream_options = no_stream_options
        self._master: MasterKey | None = None
        self._master_principal = MasterPrincipal()
        # The OR gate's X-Agent-ID on a loopback listener, when the operator
        # opted in (cllama_tx.identity.agent_header); None: authentication only.
        self.agent_header = None

    def handle(self, request, surface: Surface) -> None:
        """Serve C{request}; the response is written asynchronously."""
        ex = Exchange(new_request_id(), self.clock.seconds(), surface)
        if self._inflight is not None:
            self._inflight.track(request)  # a graceful shutdown waits for it
        request.notifyFinish().addErrback(self._agent_gone, ex)
        defer.ensureDeferred(self._run(request, ex))

    def _agent_gone(self, reason: Failure, ex: Exchange) -> None:
        ex.gone = True
        if ex.cancel is not None:
            ex.cancel()

    async def _run(self, request, ex: Exchange) -> None:
        await serve_guarded(self._serve(request, ex), self._metering, request, ex, "request")

    def _refuse(self, request, ex: Exchange, error: ProxyError) -> None:
        refuse(self._metering, request, ex, error)

    async def _serve(self, request, ex: Exchange) -> None:
        context = await self._identify(request, ex)
        ex.claw_id = context.agent_id
        doc = self._parse_body(request, ex)
        model = doc.get("model")
        policy = self._governance.policy(context)
        if self._governance.is_gate_agent(context.agent_id):
            # The OR gate's agents are sent their tier's model: theirs may be anything, or absent.
            model = model if isinstance(model, str) else None
        elif (model is not None or policy is None) and (not isinstance(model, str) or not model.strip()):
            raise ProxyError(400, "missing_model", "the request body needs a 'model' string")
        ex.model = model
        # Before anything is reserved or sent: the fields metering relies on.
        check_fields(doc, ex.surface.api_format, counting=not ex.surface.billable)
        ex.stream = doc.get("stream") is True
        options = doc.get("stream_options")
        ex.agent_wants_usage = ex.stream and isinstance(options, dict) and options.get("include_usage") is True
        ex.original = ex.doc = doc
        ex.resolve_hints = read_hints(request.uri, request.getHeader(HINT_HEADER))
        self._metering.audit_request(ex)
        admitted = self._governance.admit(ex, context, doc)
        if isinstance(admitted, defer.Deferred):
            # Several instances share the store: decided under its locks.
            admitted = await admitted
            if ex.settled or ex.gone:
                # The agent left while the store (or the model resolver) decided: hold nothing.
                self._governance.abandon(ex, admitted)
                if not ex.settled:
                    raise AgentGone()
                return
        admission = ex.admission = admitted
        if self._policy is not None:
            doc = await self._policy.before_dispatch(ex, context, doc)
        candidates = admission.candidates
        for index, ref in enumerate(candidates):
            try:
                await self._attempt(request, ex, admission, doc, ref, last=index == len(candidates) - 1)
                return
            except Failover as hop:
                following = candidates[index + 1]
                self._metering.failover(ex, ref, following, hop.reason, hop.detail, index + 1)
                request.responseHeaders = Headers()
                request.setResponseCode(200)

    async def _attempt(
        self, request, ex: Exchange, admission: Admission, doc: dict, ref, last: bool, adapted: bool = False
    ) -> None:
        """
        One try at one candidate model.  Raises L{Failover} when the next
        candidate should be tried: only while nothing reached the agent.
        C{adapted}: the provider said this model needs the Responses API.
        """
        ex.provider, ex.upstream_model = ref.provider, ref.model
        ex.crossing, ex.strip_usage_chunk, ex.first_byte_at = None, False, None
        ex.dropped = ()
        ex.conversation = ex.response_id = None
        ex.attempt_started = self.clock.seconds()
        resolved = self._resolve(ref.provider, ex)
        if not ex.surface.billable and resolved.spec.api_format != ex.surface.api_format:
            await self._count_locally(request, ex, doc)
            return
        upstream_format = self._upstream_format(ex, resolved.spec, ref, adapted)
        upstream_doc = dict(doc)
        upstream_doc["model"] = ref.model
        if ex.surface.api_format == RESPONSES:
            upstream_doc = await self._continue_conversation(upstream_doc, ex, upstream_format)
        if ex.policy is not None:
            upstream_doc = ex.policy.decorated(upstream_doc)
        upstream_doc, upstream_path = self._translate_request(upstream_doc, ex, upstream_format, request.requestHeaders)
        openrouter_models = admission.openrouter_models
        if openrouter_models and ref.provider == "openrouter":
            upstream_doc["models"] = openrouter_models
            upstream_doc["route"] = "fallback"
        fitted_betas = None
        if ex.crossing is None and _swapped(doc.get("model"), ref):
            upstream_doc, fitted_betas = self._fit_model(upstream_doc, request.requestHeaders, ex, upstream_format)
        if admission.output_limit is not None:
            # The budget pays for no more: in the fields this wire format reads.
            upstream_doc = limit_body(upstream_doc, upstream_format, ref.provider, admission.output_limit)
        ex.doc = upstream_doc
        self._ask_for_stream_usage(upstream_doc, ex, upstream_format)
        body = json.dumps(upstream_doc, separators=(",", ":")).encode("utf-8")
        headers = forward_headers(request.requestHeaders, resolved.headers)
        if fitted_betas is not None:
            if fitted_betas:
                headers.setRawHeaders(b"anthropic-beta", [",".join(fitted_betas).encode()])
            else:
                headers.removeHeader(b"anthropic-beta")
        url = upstream_url(resolved.spec.base_url, upstream_path).encode("utf-8")
        if ex.crossing is None:
            # The agent's query (Anthropic's ?beta=true) belongs to its own
            # wire format: it goes along unless the request is translated.
            url += upstream_query(request.uri)
        try:
            response, buffered = await self._send_with_pool(resolved, url, headers, body, ex)
        except ProxyError as error:
            if not last and error.code in FAILOVER_CODES:
                reason = failover_reasons.reason_for(error, answered=False, stream=ex.stream, got_bytes=False)
                raise Failover(reason, error.message) from None
            raise
        if (
            buffered is not None
            and not adapted
            and upstream_format == "openai"
            and ex.surface.api_format != RESPONSES
            and serves_responses(ref.provider, resolved.spec.api_format)
            and needs_responses(response.code, buffered)
        ):
            # The provider says only its Responses API serves this model:
            # once more that way (nothing reached the agent yet).
            await self._attempt(request, ex, admission, doc, ref, last, adapted=True)
            return
        if response.code >= 500 and not last:
            if buffered is None:
                await read_body(response)
            raise Failover(failover_reasons.http_status(response.code), f"provider {ref.provider!r} answered {response.code}")
        try:
            await self._relay(request, response, buffered, ex, upstream_format)
        except ProxyError as error:
            if not last and not request.startedWriting and error.code in FAILOVER_CODES:
                got_bytes = ex.first_byte_at is not None
                reason = failover_reasons.reason_for(error, answered=True, stream=ex.stream, got_bytes=got_bytes)
                raise Failover(reason, error.message) from None
            raise

    def authenticate(self, headers: Headers, request=None):
        """
        The caller's principal from its headers alone; raises the 401/403
        L{ProxyError}.  A token that is neither an agent's nor a virtual key
        may be the master key (L{accept_master_key}): compared only then, so
        agents and keys pay nothing for it, and throttled per address like
        every operator credential when C{request} tells the address.

        A virtual key this instance has not seen, in a store shared with
        other instances (or still loading), is read from the store first:
        the answer is then a Deferred of the principal, which fails with the
        L{ProxyError} (401, or 503 when the store cannot tell).
        """
        if self.agent_header is not None:
            named = self.agent_header.identify(headers, request)
            if named is not None:
                return named
        try:
            return identify(headers, self._contexts, self._keys)
        except KeyNotChecked as unchecked:
            master = self._master
            # The master key never is a stored key: no query for it.
            if master is not None and self._is_master(master, headers, request, count=False):
                return self._master_principal
            return self._stored_key(unchecked, headers, request)
        except ProxyError as error:
            if error.status != 401 or self._master is None:
                raise
            if self._is_master(self._master, headers, request):
                return self._master_principal
            raise

    def _stored_key(self, unchecked: KeyNotChecked, headers: Headers, request) -> defer.Deferred:
        d = identify_stored(self._keys, unchecked)
        master = self._master
        source = request_source(request) if request is not None else None
        if master is None or source is None:
            return d

        def refused(failure: Failure) -> Failure:
            # A wrong key counts against the address, as when compared with the master key.
            error = failure.value
            if isinstance(error, ProxyError) and error.status == 401 and not self._issued(presented_token(headers)):
                master.guard.failed(source, "inference")
            return failure

        return d.addErrback(refused)

    def models_for(self, principal) -> list[str]:
        """The model names C{principal} may use (C{GET /v1/models})."""
        return self._governance.models_for(principal)

    def accept_master_key(self, keys_api) -> None:
        """Let the master key of C{keys_api} call inference, as C{master}."""
        self._master = keys_api if keys_api.administration_enabled else None

    def _is_master(self, master: MasterKey, headers: Headers, request, count: bool = True) -> bool:
        token = presented_token(headers)
        if token is None:
            return False
        guard = master.guard
        source = request_source(request) if request is not None else None
        if source is not None:
            wait = guard.refusal(source, "inference")
            if wait is not None:
                raise ProxyError(
                    429, "too_many_attempts",
                    f"too many wrong keys from this address: the next one is compared in {wait} s",
                    retry_after=wait,
                )
        if master.is_master(token):
            return True
        if count and source is not None and not self._issued(token):
            guard.failed(source, "inference")
        return False

    def _issued(self, token: str | None) -> bool:
        """A virtual key this proxy issued (expired and blocked ones too): not a guess."""
        if token is None or not looks_like_virtual_key(token) or self._keys is None:
            return False
        return self._keys.get(hash_key(token)) is not None

    def refuse_early(self, surface: Surface, error: ProxyError) -> str:
        """
        Settle (audit, metrics) a request the site refused on its headers,
        before its body was read; the site writes the answer.  Returns the
        request id for the answer's C{x-cllama-request-id}.
        """
        ex = Exchange(new_request_id(), self.clock.seconds(), surface)
        ex.error_code = error.code
        self._metering.settle(ex, error.status, error.message)
        return ex.request_id

    async def _identify(self, request, ex: Exchange):
        # The API site authenticates on the headers, before the body is read,
        # and hands the principal over: once per request.
        principal = getattr(request, "principal", None)
        if principal is None:
            principal = self.authenticate(request.requestHeaders, request)
            if isinstance(principal, defer.Deferred):
                principal = await principal  # a virtual key read from the shared store
        if isinstance(principal, KeyPrincipal):
            key = principal.key
            ex.key_id, ex.team_id, ex.user_id = key.token_hash, key.team_id, key.user_id
        return principal

    @staticmethod
    def _parse_body(request, ex: Exchange) -> dict:
        raw = request.content.read()
        ex.body_size = len(raw)
        return parse_body(raw)

    def _resolve(self, provider: str, ex: Exchange):
        try:
            resolved = self._providers.resolve(provider)
        except UnknownProvider as e:
            raise ProxyError(400, "unknown_provider", str(e)) from None
        except ProviderNotConfigured as e:
            raise ProxyError(400, "provider_not_configured", str(e)) from None
        return resolved

    async def _count_locally(self, request, ex: Exchange, doc: dict) -> None:
        """
        Token counting for a provider with no counting endpoint: an estimate,
        said so in C{x-cllama-token-count}, rather than a refusal.
        """
        body = json.dumps({"input_tokens": estimate_input_tokens(doc)}).encode("utf-8")
        ex.first_byte_at = self.clock.seconds()
        await self._settle_then(request, ex, 200)
        request.setResponseCode(200)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.setHeader(b"x-cllama-request-id", ex.request_id.encode())
        request.setHeader(b"x-cllama-token-count", b"estimate")
        request.write(body)
        request.finish()

    def _fit_model(self, doc: dict, headers: Headers, ex: Exchange, upstream_format: str):
        """
        A request going to another model than the one it names (a clamp, a
        tier, a failover) keeps only what that model takes.  Returns the
        body and the anthropic-beta features to send (None: the agent's).
        """
        betas = _betas(headers)
        fitted = fit_request(doc, upstream_format, traits_for(ex.provider or "", ex.upstream_model or ""), betas)
        if not fitted.dropped and not fitted.adjusted:
            return doc, None
        ex.dropped = fitted.dropped
        self._metering.intervention(
            ex, "model_fitted", provider=ex.provider, effective_model=ex.upstream_model,
            **_notes(fitted.dropped, fitted.adjusted),
        )
        return fitted.request, fitted.betas

    def _upstream_format(self, ex: Exchange, spec, ref, adapted: bool) -> str:
        """
        The wire format this request speaks upstream: the provider's, or
        the Responses API where the provider serves it and the request came
        on the Responses surface, or asks for a model only it serves (the
        upstream adapter: the catalog says so, or the provider did).
        """
        api_format = spec.api_format
        if not ex.surface.billable or not serves_responses(ref.provider, api_format):
            return api_format
        if ex.surface.api_format == RESPONSES:
            return RESPONSES
        if adapted or responses_only(ref.provider, ref.model):
            self._metering.intervention(
                ex, "responses_adapter", provider=ref.provider, effective_model=ref.model,
                reason="the provider said so" if adapted else "the catalog says so",
            )
            return RESPONSES
        return api_format

    async def _continue_conversation(self, doc: dict, ex: Exchange, upstream_format: str) -> dict:
        """
        A Responses request that continues an answer this proxy made
        (C{previous_response_id}) carries that conversation in its input
        from here on, whichever provider answers.  An id the proxy never
        made is the provider's own: it goes along to a provider that serves
        the Responses API, and is a 400 for any other.
        """
        previous = doc.get("previous_response_id")
        if previous is not None:
            earlier = self._conversations.get(ex.claw_id or "", previous)
            if isinstance(earlier, defer.Deferred):
                # Several instances: kept in the shared store.
                try:
                    earlier = await earlier
                except Exception:
                    log.failure("reading a kept conversation failed")
                    raise ProxyError(
                        503, "store_unavailable", "the conversation store cannot be read; try again shortly",
                        retry_after=1,
                    ) from None
            if earlier is not None:
                doc = expand(doc, earlier)
                self._metering.intervention(
                    ex, "conversation_restored", previous_response_id=previous[:200], items=len(earlier)
                )
            elif upstream_format != RESPONSES:
                raise ProxyError(
                    400, "previous_response_not_found",
                    f"Previous response with id {previous[:200]!r} not found: this proxy keeps only the "
                    "responses it translated itself, in memory and for a limited time",
                    param="previous_response_id",
                )
        ex.conversation = doc
        return doc

    def _translate_request(self, doc: dict, ex: Exchange, upstream_format: str, headers: Headers):
        """
        The body and path to send upstream: the agent's own, or, when the
        provider speaks another wire format, its translation.
        """
        bridge = bridge_for(ex.surface.api_format, upstream_format)
        if bridge is None:
            return doc, ex.surface.path
        if ex.surface.api_format == RESPONSES:
            ex.response_id = "resp_" + os.urandom(16).hex()
        call = Call(
            int(self.clock.seconds()), ex.upstream_model, ex.response_id or "", ex.original,
            traits=traits_for(ex.provider or "", ex.upstream_model or ""), betas=_betas(headers),
        )
        try:
            crossing = bridge.open(doc, call)
        except UntranslatableRequest as e:
            raise ProxyError(400, "untranslatable_parameters", str(e), param=",".join(e.params)[:500]) from None
        ex.crossing = crossing
        ex.dropped = crossing.dropped
        self._metering.intervention(
            ex,
            "surface_translated",
            from_surface=ex.surface.name,
            to_format=upstream_format,
            provider=ex.provider,
            **_notes(crossing.dropped, crossing.adjusted),
        )
        return crossing.request, bridge.upstream_path

    def _keep_conversation(self, ex: Exchange) -> None:
        """A translated Responses answer is kept for a follow-up turn, unless C{store} is false."""
        crossing, request = ex.crossing, ex.conversation
        if crossing is None or request is None or ex.response_id is None or request.get("store") is False:
            return
        answer = crossing.answered()
        if answer is not None and answer.get("status") in ("completed", "incomplete"):
            kept = self._conversations.put(ex.claw_id or "", ex.response_id, conversation_after(request, answer))
            if isinstance(kept, defer.Deferred):
                # In the shared store before the answer's last byte (_settle_then waits).
                ex.conversation_kept = kept

    def _ask_for_stream_usage(self, doc: dict, ex: Exchange, api_format: str) -> None:
        """
        OpenAI-format streams carry usage only when asked: ask upstream, and
        hide the extra chunk from an agent that did not ask for it.
        """
        if not ex.stream or api_format != "openai":
            return
        if ex.crossing is not None:
            # A bridge asks for usage itself and consumes the usage chunk.
            if ex.provider in self._no_stream_options:
                doc.pop("stream_options", None)
            return
        if ex.agent_wants_usage or ex.provider in self._no_stream_options:
            return
        options = doc.get("stream_options")
        doc["stream_options"] = {**options, "include_usage": True} if isinstance(options, dict) else {"include_usage": True}
        ex.strip_usage_chunk = True

    async def _send_with_pool(self, resolved, url: bytes, headers: Headers, body: bytes, ex: Exchange):
        """
        Send with the provider's next usable key for this model.  A key the
        provider refuses is marked and the next one tried: out of quota,
        dead; rate limited, cooling down (for this model only where the
        provider limits per model); a 401 makes it suspect, and a re-check
        that carries nothing from any agent decides whether the key is dead
        or the 401 was about this request (then the agent hears it).

        Returns the response and, for any non-2xx answer, its body (read
        whole, bounded); every header and that body have the configured
        secrets scrubbed out before anything reaches the agent.
        """
        pool = resolved.pool
        scrubber = resolved.scrubber
        model = ex.upstream_model
        tried: set[str] = set()
        passthrough = None
        for _ in range(MAX_TRIES):
            key = pool.acquire(tried, model)
            if key is None:
                # A suspect key's re-check may be in flight: wait for it
                # rather than refuse while its fate is unknown.
                pending = pool.checks_pending()
                if pending is None:
                    break
                await pending
                if ex.gone:
                    raise AgentGone()
                key = pool.acquire(tried, model)
                if key is None:
                    break
            attempt = headers.copy()
            for name, value in auth_headers(resolved.spec.auth, key.secret):
                attempt.setRawHeaders(name, [value])
            response = await self._send(url, attempt, body, ex)
            code = response.code
            if scrubber is not None:
                scrubber.scrub_headers(response.headers)
            if 200 <= code < 300:
                pool.succeeded(key)
                return response, None
            error_bytes = await read_small(response, self.clock, self._idle_timeout)
            relayed = scrubber.scrub(error_bytes) if scrubber is not None else error_bytes
            if code not in (401, 402, 429):
                return response, relayed
            verdict = classify_failure(
                code,
                first_header(response.headers, b"retry-after"),
                error_bytes,
                now=self.clock.seconds(),
            )
            # Not a key problem, a 401 about the request, or a keyless
            # provider: the agent hears the provider's answer.
            if verdict is None or not pool.report(key, verdict, model):
                return response, relayed
            if pool.is_suspect(key):
                outcome = await pool.recheck(key)
                if ex.gone:
                    raise AgentGone()
                if outcome == VALID:
                    return response, relayed
                if outcome == INCONCLUSIVE:
                    # Not proven dead: try another key, else pass the 401 on.
                    passthrough = (response, relayed)
            tried.add(key.id)
        if passthrough is not None:
            return passthrough
        retry_after = pool.retry_after(model)
        if retry_after is not None:
            raise failover_reasons.KeysUnavailable(
                429,
                "provider_keys_exhausted",
                f"every key of provider {ex.provider!r} is cooling down after rate limits",
                retry_after=max(1, int(retry_after)),
                reason=failover_reasons.PROVIDER_COOLDOWN,
            )
        # Every key is dead: the next re-probe may bring one back.
        reprobe = pool.next_probe_in()
        raise failover_reasons.KeysUnavailable(
            503,
            "provider_keys_exhausted",
            f"no usable key left for provider {ex.provider!r}",
            retry_after=min(60, reprobe) if reprobe is not None else 60,
            reason=failover_reasons.pool_reason(False, len(tried) >= MAX_TRIES),
        )

    async def _send(self, url: bytes, headers: Headers, body: bytes, ex: Exchange):
        remaining = self._first_byte_timeout - (self.clock.seconds() - ex.attempt_started)
        ex.upstream_called = True
        d = self._upstream.request(b"POST", url, headers, body)
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self.clock.callLater(max(remaining, 0.0), expire)
        ex.cancel = d.cancel
        try:
            # A body compressed anyway is read decoded (content_coding).
            return decoded(await d)
        except Exception as e:
            if ex.gone:
                raise AgentGone() from None
            if timed_out:
                raise ProxyError(
                    504,
                    "upstream_timeout",
                    f"provider {ex.provider!r} sent no response within "
                    f"{self._first_byte_timeout:g} s",
                ) from None
            raise ProxyError(
                502,
                "upstream_unreachable",
                f"could not reach provider {ex.provider!r}: {describe_failure(e)}",
            ) from None
        finally:
            ex.cancel = None
            if timer.active():
                timer.cancel()

    async def _relay(self, request, response, buffered: bytes | None, ex: Exchange, api_format: str) -> None:
        if ex.gone:
            raise AgentGone()
        request.setResponseCode(response.code)
        copy_response_headers(response.headers, request.responseHeaders)
        request.setHeader(b"x-cllama-request-id", ex.request_id.encode())
        cost_report.start_headers(request, ex)
        limit = ex.admission.output_limit if ex.admission is not None else None
        if limit is not None:
            request.setHeader(b"x-cllama-max-tokens-lowered", b"%d" % limit.max_tokens)
        if ex.dropped:
            # What the provider was not sent, named (the intervention line has why).
            request.setHeader(b"x-cllama-dropped", ", ".join(ex.dropped).encode("utf-8", "replace")[:4000])
        if buffered is not None:
            ex.first_byte_at = self.clock.seconds()
            await self._deliver_body(request, response.code, buffered, ex, api_format)
            return
        content_type = first_header(response.headers, b"content-type") or b""
        whole = getattr(response, "whole_body", None)
        if whole is not None and not content_type.startswith(b"text/event-stream") and len(whole) <= MAX_BUFFERED_BODY:
            # The lean client read the whole answer with its head: nothing left to relay.
            ex.first_byte_at = self.clock.seconds()
            await self._deliver_body(request, response.code, whole, ex, api_format)
            return
        if content_type.startswith(b"text/event-stream"):
            if ex.policy is not None:
                # Deny-only, before the first byte reaches the agent.
                await ex.policy.gate_stream(ex, response, request.responseHeaders)
            # inflight_streams: up when the relay starts, down when it ends (any way).
            with self._metrics.streaming() if self._metrics is not None else contextlib.nullcontext():
                await self._relay_stream(request, response, ex, api_format)
        else:
            body = await self._collect(request, response, ex)
            if body is not None:
                await self._deliver_body(request, response.code, body, ex, api_format)

    def _start_relay(self, request, response, ex: Exchange, on_data, passthrough=None) -> StreamRelay:
        remaining = self._first_byte_timeout - (self.clock.seconds() - ex.attempt_started)

        def first_byte() -> None:
            ex.first_byte_at = self.clock.seconds()

        relay = StreamRelay(
            request,
            self.clock,
            idle_timeout=self._idle_timeout,
            first_byte_timeout=max(remaining, 0.0),
            on_data=on_data,
            on_first_byte=first_byte,
            stall_timeout=self._agent_stall_timeout,
            agent_progress=lambda: acked_bytes(request.transport),
            passthrough=passthrough,
        )
        ex.cancel = relay.abort
        response.deliverBody(relay)
        return relay

    async def _relay_stream(self, request, response, ex: Exchange, api_format: str) -> None:
        """
        Pipe an SSE answer through the usage tap; hold its terminal event
        until the ledger row is committed.
        """
        metering = self._metering
        tap = SseTap(
            api_format,
            strip_usage_chunk=ex.strip_usage_chunk,
            usage_chunk_extra=metering.cost_extra(ex) if ex.agent_wants_usage else None,
        )
        # The tap may remove the usage chunk: the length is no longer known.
        request.responseHeaders.removeHeader(b"content-length")
        # Kept (bounded) for the session history, and for the policy's score hook.
        keep = (metering.keeps_history or ex.policy is not None) and 200 <= response.code < 300
        convert = self._stream_converter(ex, tap)

        def emit(out: bytes) -> None:
            if convert is not None and out:
                out = convert.feed(out)
            if out:
                if keep:
                    metering.keep_sse(ex, out)
                request.write(out)

        def on_data(data: bytes) -> None:
            emit(tap.feed(data))

        def take_meter() -> None:
            # What was relayed, for the row: every way the stream ends bills it.
            ex.usage, ex.usage_final = tap.usage, tap.usage_final
            ex.output_chars, ex.unmetered_bytes = tap.output_chars, tap.unmetered_bytes
            ex.answer_id = answer_id(ex, tap.answer_id or tap.response_id, api_format)
            ex.delivered = request.startedWriting and 200 <= response.code < 300
            cost_report.use_answering_model(ex, tap.response_model)

        # An event the tap forwards unchanged is all on_data would write: the
        # relay may pass it on framed as it came (not when it is translated or kept).
        passthrough = tap.forward_whole if convert is None and not keep else None
        relay = self._start_relay(request, response, ex, on_data, passthrough)
        try:
            await relay.done
        except Exception as e:
            take_meter()
            if ex.gone:
                raise AgentGone() from None
            error = _relay_error(e, ex)
            if not request.startedWriting:
                raise error from None
            ex.error_code = error.code
            metering.settle(ex, error.status, error.message)
            if isinstance(e, AgentStalled):
                # It reads nothing: an error event would only queue behind
                # what it did not read.  Cut its connection.
                if request.transport is not None:
                    request.transport.abortConnection()
                return
            # The agent already has part of the stream: end it with an error
            # event it can parse, then close the stream cleanly.
            request.write(self._stream_error(ex, error, tap, convert))
            request.finish()
            return
        finally:
            ex.cancel = None
        emit(tap.finish())
        take_meter()
        held = tap.held()
        if convert is not None:
            held = convert.feed(held) + convert.finish()
            self._keep_conversation(ex)
        if keep and held:
            metering.keep_sse(ex, held)
        await self._settle_then(request, ex, response.code)
        if held:
            request.write(held)
        request.finish()

    def _stream_converter(self, ex: Exchange, tap: SseTap):
        """The stream translator of a bridged request, else None."""
        if ex.crossing is None:
            return None
        cost = self._metering.cost_extra(ex)
        return ex.crossing.stream(ex.agent_wants_usage, lambda: cost(tap.usage))

    def _stream_error(self, ex: Exchange, error: ProxyError, tap: SseTap, convert) -> bytes:
        """
        The event(s) that end a stream the agent already has part of, in its
        surface's shape; on the Responses surface C{error} then
        C{response.failed}, numbered after what it got.
        """
        if ex.surface.api_format != RESPONSES:
            return sse_error_event(error, ex.surface.shape)
        rate_limited = error.status == 429
        if convert is not None:
            return convert.fail(error.code, error.message, rate_limited)
        response = minimal_response(
            tap.response_id, tap.created_at or int(self.clock.seconds()), tap.response_model or ex.upstream_model
        )
        return failure_events(
            tap.sequence_number, response, code=error.code, message=error.message, rate_limited=rate_limited
        )

    async def _collect(self, request, response, ex: Exchange) -> bytes | None:
        """
        Read a non-stream answer whole (bounded).  A body past the bound is
        passed through as it comes instead; None then, the relay finished it.
        """
        parts: list[bytes] = []
        size = [0]
        passthrough: list[bool] = []  # [True] once the body passes through unbuffered

        def on_data(data: bytes) -> None:
            size[0] += len(data)
            if passthrough:
                request.write(data)
                return
            parts.append(data)
            if size[0] > MAX_BUFFERED_BODY:
                passthrough.append(True)
                request.write(b"".join(parts))
                parts.clear()

        relay = self._start_relay(request, response, ex, on_data)
        try:
            await relay.done
        except Exception as e:
            if passthrough:
                # Part of the body reached the agent: billed by its size.
                ex.unmetered_bytes = size[0]
                ex.delivered = 200 <= response.code < 300
            if ex.gone:
                raise AgentGone() from None
            raise _relay_error(e, ex) from None
        finally:
            ex.cancel = None
        if passthrough:
            ex.unmetered_bytes = size[0]
            await self._settle_then(request, ex, response.code)
            request.finish()
            return None
        return b"".join(parts)

    async def _deliver_body(self, request, status: int, body: bytes, ex: Exchange, api_format: str) -> None:
        """Meter a whole JSON answer, commit its row, then send it with its cost."""
        doc = None
        if 200 <= status < 300:
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError):  # not JSON, or nested past the stack
                doc = None
            if isinstance(doc, dict):
                ex.answer_id = answer_id(ex, doc.get("id"), api_format)
                ex.usage = usage_from_json(doc, api_format)
                if not ex.usage.seen:
                    ex.output_chars = output_chars_from_json(doc, api_format)
                ex.response_json = doc
                cost_report.use_answering_model(ex, doc.get("model"))
        if ex.crossing is not None:
            body = self._translate_body(ex.crossing, ex, status, body, doc)
            if 200 <= status < 300:
                self._keep_conversation(ex)
        if ex.policy is not None and 200 <= status < 300:
            body = await ex.policy.gate_response(ex, status, body, request.responseHeaders)
        settlement = await self._settle_then(request, ex, status)
        if settlement is not None:
            request.setHeader(b"x-cllama-cost-usd", _money(settlement.row.cost_usd).encode())
            body = cost_report.finish_json(request, ex, settlement.row.cost_usd, status, doc, body)
        request.responseHeaders.removeHeader(b"content-length")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()

    def _translate_body(self, crossing: Crossing, ex: Exchange, status: int, body: bytes, doc) -> bytes:
        """A whole upstream answer in the agent's wire format."""
        if isinstance(doc, dict):
            try:
                translated = crossing.response(doc)
            except (ValueError, TypeError, AttributeError, KeyError):
                raise ProxyError(
                    502, "upstream_invalid", f"provider {ex.provider!r} sent an answer that is not a valid response"
                ) from None
            ex.response_json = translated
            return json.dumps(translated, separators=(",", ":")).encode("utf-8")
        if status >= 400:
            return crossing.error(status, body)
        return body

    async def _settle_then(self, request, ex: Exchange, status: int):
        """
        Settle and wait until the ledger row is committed, so that no answer
        the agent received completely is missing from the ledger.
        """
        settlement = self._metering.settle(ex, status)
        if settlement is not None:
            try:
                await settlement.committed
            except Exception:
                pass  # logged by Metering; the agent still gets its answer
        kept, ex.conversation_kept = ex.conversation_kept, None
        if kept is not None:
            try:
                await kept
            except Exception:
                # The answer stands; a follow-up on another instance will not find it.
                log.failure("keeping a conversation in the shared store failed")
        if ex.gone:
            raise AgentGone()
        return settlement


def forward_headers(incoming: Headers, policy: HeaderPolicy) -> Headers:
    """
    What the upstream gets of the agent's headers: the provider's allow-list
    only (never credentials, organization, project, cookies or forwarding
    headers), JSON content type, and the operator's provider headers.
    """
    return forward(incoming, policy)


# Query parameters that carry credentials: an agent's never reach a provider.
CREDENTIAL_PARAMS = frozenset({b"key", b"api_key", b"api-key", b"apikey", b"token", b"access_token", b"x-api-key"})
# ... and the model resolver's own (?force, ?prompt=), which are the proxy's.
NOT_UPSTREAM = CREDENTIAL_PARAMS | PROXY_QUERY_PARAMS


def upstream_query(uri: bytes) -> bytes:
    """
    C{?<query>} of the agent's request URI for the upstream URL (empty when
    it has none), without parameters that carry credentials or that the
    model resolver reads (C{force}, C{prompt}).
    """
    _, sep, query = uri.partition(b"?")
    if not sep or not query:
        return b""
    kept = [p for p in query.split(b"&") if p and unquote_to_bytes(p.partition(b"=")[0]).lower() not in NOT_UPSTREAM]
    return b"?" + b"&".join(kept) if kept else b""


def _betas(headers: Headers) -> tuple[str, ...]:
    """The anthropic-beta features a request names."""
    values = headers.getRawHeaders(b"anthropic-beta") or []
    return tuple(b.strip() for v in values for b in v.decode("latin-1").split(",") if b.strip())


def _swapped(requested, ref) -> bool:
    """Whether the model sent differs from the one the request names (a clamp, a tier, a failover)."""
    if not isinstance(requested, str):
        return True
    provider, slash, model = requested.partition("/")
    if slash and provider.lower() == ref.provider:
        return model != ref.model
    return requested != ref.model


def _notes(dropped: tuple[str, ...], adjusted: tuple[str, ...]) -> dict:
    """The C{dropped} and C{adjusted} fields of an intervention line, when there are any."""
    fields: dict = {}
    if dropped:
        fields["dropped"] = list(dropped)
    if adjusted:
        fields["adjusted"] = list(adjusted)
    return fields


def _money(value: float) -> str:
    return f"{value:.10f}".rstrip("0").rstrip(".") or "0"


def _relay_error(error: Exception, ex: Exchange) -> ProxyError:
    if isinstance(error, UpstreamTimeout):
        if error.phase == "data":
            # The reference's words for the idle cut, then ours.
            return ProxyError(
                504, "upstream_timeout",
                f"upstream stream idle timeout: provider {ex.provider!r} sent nothing for {error.seconds:g} s",
            )
        return ProxyError(504, "upstream_timeout", f"provider {ex.provider!r} {error}")
    if isinstance(error, AgentStalled):
        return ProxyError(AGENT_STALLED, "agent_stalled", f"stream cut: {error}")
    if isinstance(error, UndecodableBody):
        return ProxyError(502, "upstream_invalid", f"provider {ex.provider!r} sent a compressed body: {error}")
    reason = error.value if isinstance(error, Failure) and error.value is not None else error
    return ProxyError(
        502,
        "upstream_interrupted",
        f"the connection to provider {ex.provider!r} broke mid-response: {describe_failure(reason)}",
    )


__all__ = ["Proxy", "Surface", "OPENAI"]
