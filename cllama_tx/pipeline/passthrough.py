"""
The second-level passthrough, C{/_proxy/<provider>/<path>}: provider-native
endpoints the surfaces do not translate (embeddings, images, audio, token
counting, Gemini's own API), with the agent's identity and policy checked,
its credentials swapped for the provider's key, the bodies streamed both
ways, audited, rate-limited, budgeted and metered where the answer says
what it cost (docs/SPEC.md, "The passthrough").

One request takes two steps, because its body may be an upload that must
not be held whole:

  1. L{Passthrough.begin}, on the request's headers (before a byte of the
     body is read): the caller is authenticated, the path decoded and
     checked against the operator's allow-list, the provider resolved.  A
     body that is not JSON (audio, files) is admitted by governance now
     and its upstream request started, the body then streamed to it as it
     arrives (L{cllama_tx.pipeline.request_body.StreamingBody}).
  2. L{Passthrough.serve}, once the body is in: a JSON body is parsed (the
     model it names is checked against the agent's policy and key), admitted
     and sent (another key tried when one is refused); then the answer is
     relayed with backpressure, metered as it passes
     (L{cllama_tx.accounting.passthrough_usage}) and settled in the ledger
     before its last chunk.

How budgets treat a request whose price is only known afterwards: one that
names a priced model holds the worst case of its body (embeddings: every
byte a token; images: the images it asks for at their price); any other
holds C{CLLAMA_PASSTHROUGH_RESERVE_USD}, and without that setting counts as
a request of an unpriced model (refused by a dollar budget unless
C{CLLAMA_UNPRICED_BUDGET=allow}).  Each settles with what its answer said
it cost, or as a request of unknown cost.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from cllama_tx.accounting.passthrough_usage import (
    FREE,
    AnswerCopy,
    free_endpoint,
    meter_answer,
    requested_images,
)
from cllama_tx.governance.budgets import worst_case_cost
from cllama_tx.governance.engine import Ceiling
from cllama_tx.governance.policy import decide
from cllama_tx.governance.request_cost import read_request, worst_input_tokens
from cllama_tx.governance.resolution import Resolution
from cllama_tx.identity.principals import KeyPrincipal
from cllama_tx.pipeline.metering import CLIENT_CLOSED, Exchange
from cllama_tx.pipeline.proxy import Surface, new_request_id, upstream_query
from cllama_tx.pipeline.refusal import AgentGone, refuse, serve_guarded
from cllama_tx.pipeline.relay import (
    AgentStalled,
    StreamRelay,
    UpstreamTimeout,
    copy_response_headers,
)
from cllama_tx.pipeline.request_body import StreamingBody
from cllama_tx.pipeline.tcp_progress import acked_bytes
from cllama_tx.pipeline.tls_failures import describe_failure
from cllama_tx.providers.bodies import read_small
from cllama_tx.providers.catalog import ANTHROPIC_FORMAT, auth_headers
from cllama_tx.providers.forwarding import first_header, forward, valid_header_value
from cllama_tx.providers.health import INCONCLUSIVE, VALID
from cllama_tx.providers.keys import MAX_TRIES, classify_failure
from cllama_tx.providers.passthrough_rules import (
    AllowList,
    PathRefused,
    PathRule,
    Target,
    native_base_url,
    native_key_header,
    parse_allow_list,
    parse_target,
    path_model,
    relative_segments,
    upstream_url,
)
from cllama_tx.providers.registry import ProviderNotConfigured, UnknownProvider
from cllama_tx.surfaces.errors import ANTHROPIC, OPENAI, ProxyError
from cllama_tx.surfaces.matrix import ModelRef
from cllama_tx.surfaces.validate import parse_body

__all__ = ["DEFAULT_MAX_BODY", "EarlyAnswer", "Passthrough", "PassthroughSettings"]

log = Logger()

#: The largest upload (a body that is not JSON) streamed through by default.
DEFAULT_MAX_BODY = 64 * 1024 * 1024

PASSTHROUGH = "passthrough"
_JSON_TYPES = (b"application/json", b"text/json")
_BODY_METHODS = (b"POST", b"PUT", b"PATCH")


@attrs.frozen
class PassthroughSettings:
    """
    The operator's settings: the allow-list of paths per provider
    (C{CLLAMA_PASSTHROUGH_PATHS}), the largest streamed upload
    (C{CLLAMA_PASSTHROUGH_MAX_BODY_SIZE}; a JSON body has the API's own cap),
    and what a request that cannot be priced holds against a dollar budget
    (C{CLLAMA_PASSTHROUGH_RESERVE_USD}; None: it counts as unpriced).
    """

    allow: AllowList = attrs.field(factory=lambda: parse_allow_list(None))
    max_body_bytes: int = DEFAULT_MAX_BODY
    reserve_usd: float | None = None


@attrs.frozen
class EarlyAnswer:
    """A request answered on its headers: the error, its request id, the error body's shape."""

    error: ProxyError
    request_id: str
    shape: str


@attrs.define
class Call:
    """One passthrough request, from its headers to its answer."""

    ex: Exchange
    method: bytes
    principal: Any = None
    target: Target | None = None
    resolved: Any = None
    base_url: str = ""
    segments: tuple[str, ...] = ()
    rule: PathRule | None = None
    json_body: bool = False
    # A streamed upload: its body and the upstream request already under way.
    body: StreamingBody | None = None
    sending: defer.Deferred | None = None
    awaited: bool = False  # serve() waits for it (else its failure is nobody's)
    key: Any = None
    images_asked: int = 1


def is_json(headers: Headers) -> bool:
    """Whether a request body is JSON by its C{Content-Type}."""
    kind = (first_header(headers, b"content-type") or b"").split(b";", 1)[0].strip().lower()
    return kind in _JSON_TYPES or kind.endswith(b"+json")


def has_body(method: bytes, length: int | None) -> bool:
    """Whether a request carries a body (a chunked one counts)."""
    return length != 0 and (length is not None or method in _BODY_METHODS)


def passthrough_headers(incoming: Headers, policy, body: bool) -> Headers:
    """
    What the provider gets of the agent's headers: the provider's allow-list
    (never credentials, account or forwarding headers: L{forward}), with the
    agent's own C{Content-Type} for a body (a multipart upload's boundary
    must survive) and none without one.
    """
    out = forward(incoming, policy)
    out.removeHeader(b"content-type")
    if body:
        kind = first_header(incoming, b"content-type")
        if kind is not None and len(kind) <= 512 and all(0x20 <= c < 0x7F for c in kind):
            out.setRawHeaders(b"content-type", [kind])
    return out


class Passthrough:
    """Serves C{/_proxy/<provider>/<path>}; one instance per daemon."""

    def __init__(
        self,
        *,
        clock,
        proxy,
        providers,
        upstream,
        metering,
        governance,
        pricing,
        settings: PassthroughSettings,
        max_json_bytes: int,
        first_byte_timeout: float,
        idle_timeout: float,
        agent_stall_timeout: float | None = None,
        inflight=None,
    ) -> None:
        self.clock = clock
        self._proxy = proxy
        self._providers = providers
        self._upstream = upstream
        self._metering = metering
        self._governance = governance
        self._pricing = pricing
        self.settings = settings
        self._max_json_bytes = max_json_bytes
        self._first_byte_timeout = first_byte_timeout
        self._idle_timeout = idle_timeout
        self._stall_timeout = idle_timeout if agent_stall_timeout is None else agent_stall_timeout
        self._inflight = inflight

    # -- step 1: the headers -------------------------------------------------------

    def body_limit(self, method: bytes, headers: Headers) -> int:
        """The largest body a request may send: the API's cap for JSON, the upload cap otherwise."""
        if is_json(headers):
            return self._max_json_bytes
        return self.settings.max_body_bytes

    def begin(self, request, method: bytes, target: bytes, length: int | None) -> defer.Deferred:
        """
        Decide on a request's headers: a Deferred firing with None (read the
        body; a streamed one is already on its way upstream) or with the
        L{EarlyAnswer} to answer at once.  Sets C{request.passthrough}.
        """
        ex = Exchange(new_request_id(), self.clock.seconds(), Surface(PASSTHROUGH, "/_proxy/", "openai", OPENAI))
        call = Call(ex, method)
        request.passthrough = call
        if self._inflight is not None:
            self._inflight.track(request)  # a graceful shutdown waits for it
        request.notifyFinish().addErrback(self._agent_gone, call)
        return defer.ensureDeferred(self._begin(request, call, target, length))

    async def _begin(self, request, call: Call, target: bytes, length: int | None) -> EarlyAnswer | None:
        ex = call.ex
        try:
            await self._check(request, call, target, length)
            if call.body is not None:
                await self._start_upload(request, call)
        except ProxyError as error:
            return self._early(call, error)
        except Exception:
            log.failure("unexpected error on the headers of passthrough request {request_id}", request_id=ex.request_id)
            return self._early(call, ProxyError(500, "internal_error", "internal error"))
        return None

    def _early(self, call: Call, error: ProxyError) -> EarlyAnswer:
        ex = call.ex
        ex.error_code = error.code
        self._metering.settle(ex, error.status, error.message)
        return EarlyAnswer(error, ex.request_id, ex.surface.shape)

    async def _check(self, request, call: Call, raw_target: bytes, length: int | None) -> None:
        ex = call.ex
        headers = request.requestHeaders
        principal = self._proxy.authenticate(headers, request)
        if isinstance(principal, defer.Deferred):
            principal = await principal  # a virtual key read from the shared store
        call.principal = principal
        ex.claw_id = principal.agent_id
        if isinstance(principal, KeyPrincipal):
            key = principal.key
            ex.key_id, ex.team_id, ex.user_id = key.token_hash, key.team_id, key.user_id
        try:
            target = parse_target(raw_target)
        except PathRefused as refused:
            ex.path = raw_target.split(b"?", 1)[0].decode("latin-1")[:300]
            raise ProxyError(refused.status, refused.code, refused.message) from None
        call.target = target
        ex.path = target.display
        ex.provider = target.provider
        try:
            resolved = self._providers.resolve(target.provider)
        except UnknownProvider:
            raise ProxyError(
                400, "unknown_provider", f"{target.provider!r} is not a provider configured here",
            ) from None
        except ProviderNotConfigured as e:
            raise ProxyError(400, "provider_not_configured", str(e)) from None
        spec = resolved.spec
        shape = ANTHROPIC if spec.api_format == ANTHROPIC_FORMAT else OPENAI
        ex.surface = Surface(PASSTHROUGH, target.display, spec.api_format, shape)
        if not spec.base_url:
            raise ProxyError(400, "provider_not_configured", f"provider {target.provider!r} has no base URL")
        call.resolved = resolved
        call.base_url = native_base_url(target.provider, spec.base_url)
        call.segments = relative_segments(target.segments, call.base_url)
        method = call.method.decode("ascii", "replace")
        rule = self.settings.allow.match(target.provider, method, call.segments)
        if rule is None:
            allowed = ", ".join(str(r) for r in self.settings.allow.for_provider(target.provider)) or "nothing"
            raise ProxyError(
                403, "path_not_allowed",
                f"{method} {'/'.join(call.segments)} is not on the passthrough allow-list of provider "
                f"{target.provider!r} (allowed: {allowed}); the operator sets CLLAMA_PASSTHROUGH_PATHS",
            )
        call.rule = rule
        body = has_body(call.method, length)
        call.json_body = body and is_json(headers)
        limit = self.body_limit(call.method, headers)
        if length is not None and length > limit:
            raise ProxyError(413, "request_too_large", f"the request body is larger than {limit} bytes")
        if body and not call.json_body:
            source = request.channel.transport if request.channel is not None else None
            call.body = StreamingBody(length, source)

    async def _start_upload(self, request, call: Call) -> None:
        """Admit a streamed upload (no model to read) and start its upstream request."""
        ex = call.ex
        self._metering.audit_request(ex)
        await self._admit(call, {}, None, len_hint=0)
        if ex.gone:
            raise AgentGone()
        headers = passthrough_headers(request.requestHeaders, call.resolved.headers, True)
        key = self._key(call, set())
        self._set_key(call, headers, key)
        call.key = key
        ex.attempt_started = self.clock.seconds()
        ex.upstream_called = True
        assert call.target is not None and call.body is not None
        url = upstream_url(call.base_url, call.segments, _query(call.target))
        sending = self._upstream.request(call.method, url, headers, call.body)
        body = call.body

        def failed(failure: Failure) -> Failure:
            body.abandon()  # the agent's rest is read and dropped; it hears the error once sent
            return failure

        sending.addErrback(failed)
        call.sending = sending

    def oversized(self, call: Call, limit: int) -> EarlyAnswer:
        """A streamed upload passed its cap: stop it upstream and answer 413."""
        self._stop_sending(call)
        if call.body is not None:
            call.body.abandon()
        return self._early(call, ProxyError(413, "request_too_large", f"the request body is larger than {limit} bytes"))

    def _agent_gone(self, reason: Failure, call: Call) -> None:
        ex = call.ex
        ex.gone = True
        if call.body is not None:
            call.body.fail(reason)
        self._stop_sending(call)
        if ex.cancel is not None:
            ex.cancel()
        # Settled here when nothing else will (no answer under way); else by it.
        if not ex.settled and ex.first_byte_at is None:
            self._metering.settle(ex, CLIENT_CLOSED, "client disconnected")

    @staticmethod
    def _stop_sending(call: Call) -> None:
        """Cancel a streamed upload's upstream request; its failure is consumed unless serve() waits for it."""
        sending = call.sending
        if sending is None:
            return
        if not call.awaited:
            sending.addErrback(lambda _: None)
        if not sending.called:
            sending.cancel()

    # -- step 2: the body is in ----------------------------------------------------

    def serve(self, request) -> None:
        """Answer a request whose headers L{begin} accepted; written asynchronously."""
        call: Call = request.passthrough
        defer.ensureDeferred(self._run(request, call))

    async def _run(self, request, call: Call) -> None:
        await serve_guarded(self._serve(request, call), self._metering, request, call.ex, "passthrough request")

    def _refuse(self, request, ex: Exchange, error: ProxyError) -> None:
        refuse(self._metering, request, ex, error)

    async def _serve(self, request, call: Call) -> None:
        ex = call.ex
        if ex.gone:
            raise AgentGone()
        if call.body is not None:
            call.body.finish()
            ex.request_bytes = call.body.received
            # Sent once: the body streamed away (a refused key is marked for the next request).
            call.awaited = True
            response = await self._timed(call, call.sending)
            response, error_bytes, _ = await self._checked(call, response, call.key)
            await self._answer(request, call, response, error_bytes)
            return
        raw = request.content.read() if request.content is not None else b""
        ex.request_bytes = len(raw)
        doc: dict = {}
        if raw and call.json_body:
            doc = parse_body(raw)
        model = doc.get("model")
        if model is not None and (not isinstance(model, str) or not model.strip()):
            raise ProxyError(400, "invalid_model", "the 'model' field must be a non-empty string")
        assert call.target is not None
        if model is None:
            model = path_model(call.segments)
        ex.model = ex.upstream_model = model
        ex.stream = doc.get("stream") is True or call.segments[-1].endswith(":streamGenerateContent")
        call.images_asked = requested_images(doc)
        self._check_policy(call, model)
        self._metering.audit_request(ex)
        await self._admit(call, doc, model, len_hint=len(raw))
        has = bool(raw) or call.method in _BODY_METHODS
        headers = passthrough_headers(request.requestHeaders, call.resolved.headers, has)
        url = upstream_url(call.base_url, call.segments, _query(call.target))
        response, error_bytes = await self._send_with_keys(call, url, headers, raw if has else None)
        await self._answer(request, call, response, error_bytes)

    def _check_policy(self, call: Call, model: str | None) -> None:
        """An agent's model policy allows the model its request names, or it is refused."""
        if model is None:
            return
        policy = self._governance.policy(call.principal)
        if policy is None:
            return
        assert call.target is not None
        asked = ModelRef(call.target.provider, model)
        decision = decide(policy, str(asked))  # mode "reject" refuses here
        if decision.ref != asked:
            raise ProxyError(
                403, "model_not_allowed",
                f"this agent's model policy does not allow {str(asked)[:200]!r}",
            )

    def _ceiling(self, call: Call, doc: dict, model: str | None, size: int) -> Ceiling:
        """What a request holds against its budgets while it runs (module docstring)."""
        assert call.target is not None
        provider = call.target.provider
        path = "/".join(call.segments)
        if free_endpoint(provider, path):
            return Ceiling(0.0)
        price = self._pricing.price(provider, model) if model is not None else None
        if price is None:
            return Ceiling(self.settings.reserve_usd)
        if price.per_image is not None and path.startswith("images/"):
            return Ceiling(round(call.images_asked * price.per_image, 10))
        shape = read_request(doc, size)
        worst = worst_case_cost(
            self._pricing, provider, model or "", worst_input_tokens(shape, provider, model or ""),
            shape.max_tokens, choices=shape.choices, min_output_tokens=shape.thinking_budget or 0,
        )
        return Ceiling(worst if worst is not None else self.settings.reserve_usd)

    async def _admit(self, call: Call, doc: dict, model: str | None, len_hint: int) -> None:
        ex = call.ex
        assert call.target is not None
        ex.body_size = len_hint
        ex.fixed_worst = self._ceiling(call, doc, model, len_hint)
        ref = ModelRef(call.target.provider, model or "")
        names = (model, str(ref)) if model else ()
        route = Resolution(ref, (ref,), (), names)
        admitted = self._governance.admit(ex, call.principal, doc, route)
        if isinstance(admitted, defer.Deferred):
            admitted = await admitted  # several instances: decided under the store's locks
            if ex.settled:
                self._governance.abandon(ex, admitted)
                raise AgentGone()
        ex.admission = admitted

    # -- sending ---------------------------------------------------------------------

    def _key(self, call: Call, tried: set):
        pool = call.resolved.pool
        key = pool.acquire(tried, call.ex.upstream_model)
        if key is None:
            self._no_key(call)
        return key

    def _no_key(self, call: Call):
        pool = call.resolved.pool
        ex = call.ex
        retry_after = pool.retry_after(ex.upstream_model)
        if retry_after is not None:
            raise ProxyError(
                429, "provider_keys_exhausted",
                f"every key of provider {ex.provider!r} is cooling down after rate limits",
                retry_after=max(1, int(retry_after)),
            )
        reprobe = pool.next_probe_in()
        raise ProxyError(
            503, "provider_keys_exhausted", f"no usable key left for provider {ex.provider!r}",
            retry_after=min(60, reprobe) if reprobe is not None else 60,
        )

    def _set_key(self, call: Call, headers: Headers, key) -> None:
        assert call.target is not None
        native = native_key_header(call.target.provider)
        if native is not None and key.secret:
            if not valid_header_value(key.secret):
                raise ProxyError(503, "provider_keys_exhausted", "the provider key cannot be sent in a header")
            headers.setRawHeaders(native, [key.secret.encode("ascii")])
            return
        try:
            pairs = auth_headers(call.resolved.spec.auth, key.secret)
        except ValueError:
            raise ProxyError(503, "provider_keys_exhausted", "the provider key cannot be sent") from None
        for name, value in pairs:
            headers.setRawHeaders(name, [value])

    async def _timed(self, call: Call, sending) -> Any:
        """The upstream's answer headers, within the first-byte timeout (counted from now)."""
        ex = call.ex
        timed_out: list[bool] = []

        def expire() -> None:
            timed_out.append(True)
            sending.cancel()

        timer = self.clock.callLater(self._first_byte_timeout, expire)
        ex.cancel = sending.cancel
        try:
            return await sending
        except Exception as e:
            if ex.gone:
                raise AgentGone() from None
            if timed_out:
                raise ProxyError(
                    504, "upstream_timeout",
                    f"provider {ex.provider!r} sent no response within {self._first_byte_timeout:g} s",
                ) from None
            raise ProxyError(502, "upstream_unreachable", f"could not reach provider {ex.provider!r}: {describe_failure(e)}") from None
        finally:
            ex.cancel = None
            if timer.active():
                timer.cancel()

    async def _checked(self, call: Call, response, key) -> tuple[Any, bytes | None, bool]:
        """
        Scrub an answer's headers; read a failure's body (bounded, scrubbed)
        and tell the key pool what a 401, 402 or 429 says of the key.
        Returns the response, a failure's body, and whether the key was
        marked (another may be tried).
        """
        resolved = call.resolved
        scrubber = resolved.scrubber
        if scrubber is not None:
            scrubber.scrub_headers(response.headers)
        code = response.code
        if 200 <= code < 300:
            resolved.pool.succeeded(key)
            return response, None, False
        error_bytes = await read_small(response, self.clock, self._idle_timeout)
        relayed = scrubber.scrub(error_bytes) if scrubber is not None else error_bytes
        marked = False
        if code in (401, 402, 429):
            verdict = classify_failure(code, first_header(response.headers, b"retry-after"), error_bytes, now=self.clock.seconds())
            # Not a key problem, a 401 about the request, or a keyless provider: the agent hears it.
            marked = verdict is not None and resolved.pool.report(key, verdict, call.ex.upstream_model)
        return response, relayed, marked

    async def _send_with_keys(self, call: Call, url: bytes, headers: Headers, body: bytes | None):
        """
        Send a body held in memory with the provider's next usable key; a key
        the provider refuses is marked and the next tried, as on the
        surfaces (L{cllama_tx.pipeline.proxy.Proxy}).
        """
        ex = call.ex
        pool = call.resolved.pool
        tried: set[str] = set()
        passthrough = None
        for _ in range(MAX_TRIES):
            key = pool.acquire(tried, ex.upstream_model)
            if key is None:
                pending = pool.checks_pending()
                if pending is None:
                    break
                await pending
                if ex.gone:
                    raise AgentGone()
                key = pool.acquire(tried, ex.upstream_model)
                if key is None:
                    break
            attempt = headers.copy()
            self._set_key(call, attempt, key)
            ex.attempt_started = self.clock.seconds()
            ex.upstream_called = True
            response = await self._timed(call, self._upstream.request(call.method, url, attempt, body))
            response, relayed, marked = await self._checked(call, response, key)
            if not marked:
                return response, relayed
            if pool.is_suspect(key):
                outcome = await pool.recheck(key)
                if ex.gone:
                    raise AgentGone()
                if outcome == VALID:
                    return response, relayed
                if outcome == INCONCLUSIVE:
                    passthrough = (response, relayed)
            tried.add(key.id)
        if passthrough is not None:
            return passthrough
        self._no_key(call)

    # -- the answer ------------------------------------------------------------------

    async def _answer(self, request, call: Call, response, error_bytes: bytes | None) -> None:
        ex = call.ex
        if ex.gone:
            raise AgentGone()
        request.setResponseCode(response.code)
        copy_response_headers(response.headers, request.responseHeaders)
        request.setHeader(b"x-cllama-request-id", ex.request_id.encode())
        if error_bytes is not None:
            ex.first_byte_at = self.clock.seconds()
            ex.response_bytes = len(error_bytes)
            self._meter(call, response.code, AnswerCopy())
            await self._settle_then(ex, response.code)
            request.responseHeaders.removeHeader(b"content-length")
            request.setHeader(b"content-length", b"%d" % len(error_bytes))
            request.write(error_bytes)
            request.finish()
            return
        copy = AnswerCopy()
        held = [b""]

        def on_data(data: bytes) -> None:
            copy.feed(data)
            if held[0]:
                request.write(held[0])
            held[0] = data

        def first_byte() -> None:
            ex.first_byte_at = self.clock.seconds()

        remaining = self._first_byte_timeout - (self.clock.seconds() - ex.attempt_started)
        relay = StreamRelay(
            request, self.clock, idle_timeout=self._idle_timeout, first_byte_timeout=max(remaining, 0.0),
            on_data=on_data, on_first_byte=first_byte, stall_timeout=self._stall_timeout,
            agent_progress=lambda: acked_bytes(request.transport),
        )
        ex.cancel = relay.abort
        if ex.first_byte_at is None:
            ex.first_byte_at = self.clock.seconds()  # the headers are the first byte the agent can see
        response.deliverBody(relay)
        try:
            await relay.done
        except Exception as e:
            ex.response_bytes = copy.size
            ex.delivered = request.startedWriting
            self._meter(call, response.code, copy)  # what arrived of it: its usage, if it came
            if ex.gone:
                raise AgentGone() from None
            error = _relay_error(e, ex)
            if not request.startedWriting:
                raise error from None
            ex.error_code = error.code
            self._metering.settle(ex, error.status, error.message)
            if request.transport is not None:
                request.transport.abortConnection()
            return
        finally:
            ex.cancel = None
        ex.response_bytes = copy.size
        self._meter(call, response.code, copy)
        settlement = await self._settle_then(ex, response.code)
        if settlement is not None and not request.startedWriting:
            request.setHeader(b"x-cllama-cost-usd", _money(settlement.row.cost_usd).encode())
        if held[0]:
            request.write(held[0])
        request.finish()

    def _meter(self, call: Call, status: int, copy: AnswerCopy) -> None:
        ex = call.ex
        assert call.target is not None
        metered = meter_answer(
            self._pricing, call.target.provider, "/".join(call.segments), ex.upstream_model, status, copy,
            call.images_asked,
        )
        ex.usage = metered.usage
        ex.usage_final = True
        ex.priced_as = (metered.cost_usd, metered.priced)
        if ex.upstream_model is None:
            # No model named (an upload): the books list it by its endpoint,
            # so /costs/api counts it (unpriced) instead of as unrouted.
            ex.upstream_model = "/".join(call.segments)
        if metered.kind == FREE or metered.images:
            # Said on the audit line: what the answer was billed by.
            self._metering.intervention(ex, "passthrough_metered", kind=metered.kind, images=metered.images)

    async def _settle_then(self, ex: Exchange, status: int):
        """Settle, and wait until the ledger row is committed (before the answer's last byte)."""
        settlement = self._metering.settle(ex, status)
        if settlement is not None:
            try:
                await settlement.committed
            except Exception:
                pass  # logged by Metering; the agent still gets its answer
        if ex.gone:
            raise AgentGone()
        return settlement


def _query(target: Target) -> bytes:
    """The agent's query without credential parameters (C{?key=} never reaches a provider)."""
    kept = upstream_query(b"?" + target.query) if target.query else b""
    return kept[1:] if kept else b""


def _money(value: float) -> str:
    return f"{value:.10f}".rstrip("0").rstrip(".") or "0"


def _relay_error(error: Exception, ex: Exchange) -> ProxyError:
    if isinstance(error, UpstreamTimeout):
        return ProxyError(504, "upstream_timeout", f"provider {ex.provider!r} {error}")
    if isinstance(error, AgentStalled):
        return ProxyError(408, "agent_stalled", f"stream cut: {error}")
    reason = error.value if isinstance(error, Failure) and error.value is not None else error
    return ProxyError(
        502, "upstream_interrupted",
        f"the connection to provider {ex.provider!r} broke mid-response: {describe_failure(reason)}",
    )


def parse_settings(allow: str | None, max_body: int | None, reserve: str | None) -> PassthroughSettings:
    """The settings from their environment values (L{ValueError} naming the one that is wrong)."""
    allow_list = parse_allow_list(allow)
    reserve_usd = None
    if reserve is not None and reserve.strip():
        try:
            reserve_usd = float(reserve)
        except ValueError:
            raise ValueError(f"CLLAMA_PASSTHROUGH_RESERVE_USD must be a number of dollars, not {reserve!r}") from None
        if not reserve_usd >= 0 or reserve_usd == float("inf"):
            raise ValueError("CLLAMA_PASSTHROUGH_RESERVE_USD must be a non-negative number of dollars")
    return PassthroughSettings(
        allow=allow_list, max_body_bytes=max_body if max_body is not None else DEFAULT_MAX_BODY, reserve_usd=reserve_usd,
    )

