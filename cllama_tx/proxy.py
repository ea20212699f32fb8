"""
The pipeline of one inference request: identify the agent, route its model
ref, swap in a provider key, send, and relay the answer back.

This is the per-request hot path.  It reads no file, parses the body once and
serialises it once, and keeps its state in one small L{Exchange}.
"""

from __future__ import annotations

import json
import os

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from .errors import OPENAI, ProxyError, error_body, sse_error_event
from .identity.tokens import MalformedCredentials, parse_credentials
from .providers.catalog import auth_headers, upstream_url
from .providers.keys import MAX_TRIES, classify_failure
from .providers.registry import ProviderNotConfigured, UnknownProvider
from .relay import HOP_BY_HOP, StreamRelay, UpstreamTimeout, copy_response_headers, read_body
from .surfaces.matrix import InvalidModelRef, split_model_ref

log = Logger()

# Request headers that never travel upstream: the agent's credentials, this
# hop's framing, and the pod's internal markers (CONTRACT 3.2).
DROP_UPSTREAM = HOP_BY_HOP | {
    b"authorization",
    b"x-api-key",
    b"host",
    b"content-length",
    b"accept-encoding",
    b"x-claw-consumer-session-epoch",
    b"x-cllama-policy-origin",
}

ANTHROPIC_VERSION = b"2023-06-01"

# The status we record when the agent hangs up before the answer is complete.
CLIENT_CLOSED = 499


@attrs.frozen
class Surface:
    """An ingress surface: its path, its wire format and its error shape."""

    name: str
    path: str
    api_format: str
    shape: str


class AgentGone(Exception):
    """The agent disconnected; nothing more can be written to it."""


@attrs.define
class Exchange:
    """The state of one request, from arrival to the last audit line."""

    request_id: str
    started: float
    surface: Surface
    claw_id: str | None = None
    model: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    stream: bool = False
    first_byte_at: float | None = None
    gone: bool = False
    cancel: object = None


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
        audit,
        first_byte_timeout: float,
        idle_timeout: float,
    ) -> None:
        self._clock = clock
        self._contexts = contexts
        self._providers = providers
        self._upstream = upstream
        self._audit = audit
        self._first_byte_timeout = first_byte_timeout
        self._idle_timeout = idle_timeout

    def handle(self, request, surface: Surface) -> None:
        """Serve C{request}; the response is written asynchronously."""
        ex = Exchange(new_request_id(), self._clock.seconds(), surface)
        request.notifyFinish().addErrback(self._agent_gone, ex)
        defer.ensureDeferred(self._run(request, ex))

    def _agent_gone(self, reason: Failure, ex: Exchange) -> None:
        ex.gone = True
        if ex.cancel is not None:
            ex.cancel()

    async def _run(self, request, ex: Exchange) -> None:
        try:
            await self._serve(request, ex)
        except ProxyError as error:
            self._refuse(request, ex, error)
        except AgentGone:
            self._audit_error(ex, CLIENT_CLOSED, "client disconnected")
        except Exception:
            log.failure("unexpected error serving request {request_id}", request_id=ex.request_id)
            self._refuse(request, ex, ProxyError(500, "internal_error", "internal error"))

    def _refuse(self, request, ex: Exchange, error: ProxyError) -> None:
        """Answer with C{error} in the surface's shape, and audit it."""
        self._audit_error(ex, error.status, error.message)
        if ex.gone:
            return
        if request.startedWriting:
            # Headers are gone already: the body cannot become an error body.
            request.transport.abortConnection()
            return
        body = error_body(error, ex.surface.shape)
        request.responseHeaders = Headers()
        request.setResponseCode(error.status)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.setHeader(b"x-cllama-request-id", ex.request_id.encode())
        if error.retry_after is not None:
            request.setHeader(b"retry-after", b"%d" % error.retry_after)
        request.write(body)
        request.finish()

    def _audit_error(self, ex: Exchange, status: int, message: str) -> None:
        self._audit.emit(
            "error",
            ex.claw_id,
            ex.model,
            request_id=ex.request_id,
            status_code=status,
            latency_ms=self._elapsed_ms(ex),
            error=message,
            provider=ex.provider,
        )

    def _elapsed_ms(self, ex: Exchange, until: float | None = None) -> float:
        end = self._clock.seconds() if until is None else until
        return round((end - ex.started) * 1000, 3)

    async def _serve(self, request, ex: Exchange) -> None:
        context = self._identify(request)
        ex.claw_id = context.agent_id
        doc = self._parse_body(request)
        model = doc.get("model")
        if not isinstance(model, str) or not model.strip():
            raise ProxyError(400, "missing_model", "the request body needs a 'model' string")
        ex.model = model
        ex.stream = doc.get("stream") is True
        self._audit.emit(
            "request",
            ex.claw_id,
            model,
            request_id=ex.request_id,
            path=ex.surface.path,
            stream=ex.stream,
        )
        resolved = self._route(model, ex)
        doc["model"] = ex.upstream_model
        body = json.dumps(doc, separators=(",", ":")).encode("utf-8")
        headers = forward_headers(request.requestHeaders)
        if resolved.spec.api_format == "anthropic" and not headers.hasHeader(b"anthropic-version"):
            headers.setRawHeaders(b"anthropic-version", [ANTHROPIC_VERSION])
        url = upstream_url(resolved.spec.base_url, ex.surface.path).encode("utf-8")
        response, buffered = await self._send_with_pool(resolved, url, headers, body, ex)
        await self._relay(request, response, buffered, ex)

    def _identify(self, request):
        headers = request.requestHeaders
        try:
            agent_id, secret = parse_credentials(
                _first(headers, b"authorization"), _first(headers, b"x-api-key")
            )
        except MalformedCredentials as e:
            raise ProxyError(401, "missing_credentials", str(e)) from None
        context = self._contexts.authenticate(agent_id, secret)
        if context is None:
            raise ProxyError(403, "invalid_credentials", "unknown agent or wrong secret")
        return context

    @staticmethod
    def _parse_body(request) -> dict:
        raw = request.content.read()
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ProxyError(400, "invalid_json", f"the request body is not valid JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ProxyError(400, "invalid_body", "the request body must be a JSON object")
        return doc

    def _route(self, model: str, ex: Exchange):
        try:
            ref = split_model_ref(model)
        except InvalidModelRef as e:
            raise ProxyError(400, "invalid_model", str(e)) from None
        ex.provider = ref.provider
        ex.upstream_model = ref.model
        try:
            resolved = self._providers.resolve(ref.provider)
        except UnknownProvider as e:
            raise ProxyError(400, "unknown_provider", str(e)) from None
        except ProviderNotConfigured as e:
            raise ProxyError(400, "provider_not_configured", str(e)) from None
        if resolved.spec.api_format != ex.surface.api_format:
            raise ProxyError(
                400,
                "wrong_surface",
                f"provider {ref.provider!r} speaks the {resolved.spec.api_format} wire "
                f"format; send this model to the surface for that format",
            )
        return resolved

    async def _send_with_pool(self, resolved, url: bytes, headers: Headers, body: bytes, ex: Exchange):
        """
        Send with the provider's next usable key; a key the provider refuses
        (revoked, out of quota, rate limited) is marked and the next tried.
        """
        pool = resolved.pool
        tried: set[str] = set()
        for _ in range(MAX_TRIES):
            key = pool.acquire(tried)
            if key is None:
                break
            attempt = headers.copy()
            for name, value in auth_headers(resolved.spec.auth, key.secret):
                attempt.setRawHeaders(name, [value])
            response = await self._send(url, attempt, body, ex)
            if response.code not in (401, 402, 429):
                return response, None
            error_bytes = await read_body(response)
            verdict = classify_failure(
                response.code,
                _first(response.headers, b"retry-after"),
                error_bytes,
                now=self._clock.seconds(),
            )
            # Not a key problem, or a keyless provider: the agent hears the
            # provider's answer as it is.
            if verdict is None or not pool.report(key, verdict):
                return response, error_bytes
            tried.add(key.id)
        retry_after = pool.retry_after()
        if retry_after is not None:
            raise ProxyError(
                429,
                "provider_keys_exhausted",
                f"every key of provider {ex.provider!r} is cooling down after rate limits",
                retry_after=max(1, int(retry_after)),
            )
        raise ProxyError(
            503,
            "provider_keys_exhausted",
            f"no usable key left for provider {ex.provider!r}",
            retry_after=60,
        )

    async def _send(self, url: bytes, headers: Headers, body: bytes, ex: Exchange):
        remaining = self._first_byte_timeout - (self._clock.seconds() - ex.started)
        d = self._upstream.request(b"POST", url, headers, body)
        timed_out = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self._clock.callLater(max(remaining, 0.0), expire)
        ex.cancel = d.cancel
        try:
            return await d
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
                f"could not reach provider {ex.provider!r}: {_describe(e)}",
            ) from None
        finally:
            ex.cancel = None
            if timer.active():
                timer.cancel()

    async def _relay(self, request, response, buffered: bytes | None, ex: Exchange) -> None:
        if ex.gone:
            raise AgentGone()
        request.setResponseCode(response.code)
        copy_response_headers(response.headers, request.responseHeaders)
        request.setHeader(b"x-cllama-request-id", ex.request_id.encode())
        if buffered is not None:
            request.responseHeaders.removeHeader(b"content-length")
            request.setHeader(b"content-length", b"%d" % len(buffered))
            request.write(buffered)
            ex.first_byte_at = self._clock.seconds()
            request.finish()
            self._audit_response(ex, response.code)
            return
        content_type = _first(response.headers, b"content-type") or b""
        is_sse = content_type.startswith(b"text/event-stream")
        remaining = self._first_byte_timeout - (self._clock.seconds() - ex.started)

        def first_byte() -> None:
            ex.first_byte_at = self._clock.seconds()

        relay = StreamRelay(
            request,
            self._clock,
            idle_timeout=self._idle_timeout,
            first_byte_timeout=max(remaining, 0.0),
            on_first_byte=first_byte,
        )
        ex.cancel = relay.abort
        response.deliverBody(relay)
        try:
            await relay.done
        except Exception as e:
            if ex.gone:
                raise AgentGone() from None
            error = _relay_error(e, ex)
            if request.startedWriting and is_sse:
                # The agent already has part of a stream: end it with an
                # error event it can parse, then close the stream cleanly.
                request.write(sse_error_event(error, ex.surface.shape))
                request.finish()
                self._audit_error(ex, error.status, error.message)
                return
            raise error from None
        finally:
            ex.cancel = None
        if ex.gone:
            raise AgentGone()
        request.finish()
        self._audit_response(ex, response.code)

    def _audit_response(self, ex: Exchange, status: int) -> None:
        self._audit.emit(
            "response",
            ex.claw_id,
            ex.model,
            request_id=ex.request_id,
            status_code=status,
            latency_ms=self._elapsed_ms(ex),
            ttfb_ms=None if ex.first_byte_at is None else self._elapsed_ms(ex, ex.first_byte_at),
            provider=ex.provider,
            effective_model=ex.upstream_model,
            stream=ex.stream,
        )


def forward_headers(incoming: Headers) -> Headers:
    """The agent's headers minus everything that must not travel upstream."""
    out = Headers()
    connection_named = set()
    for value in incoming.getRawHeaders(b"connection") or ():
        connection_named.update(v.strip().lower() for v in value.split(b","))
    for name, values in incoming.getAllRawHeaders():
        lowered = name.lower()
        if lowered in DROP_UPSTREAM or lowered in connection_named:
            continue
        out.setRawHeaders(name, values)
    out.setRawHeaders(b"content-type", [b"application/json"])
    return out


def _first(headers: Headers, name: bytes) -> bytes | None:
    values = headers.getRawHeaders(name)
    return values[0] if values else None


def _describe(error: Exception) -> str:
    """A short, secret-free description of a transport failure."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        error = reasons[0].value
    text = error.__class__.__name__
    detail = str(error).strip()
    if detail and len(detail) < 200:
        text += f": {detail}"
    return text


def _relay_error(error: Exception, ex: Exchange) -> ProxyError:
    if isinstance(error, UpstreamTimeout):
        return ProxyError(504, "upstream_timeout", f"provider {ex.provider!r} {error}")
    reason = error.value if isinstance(error, Failure) else error
    return ProxyError(
        502,
        "upstream_interrupted",
        f"the connection to provider {ex.provider!r} broke mid-response: {_describe(reason)}",
    )


__all__ = ["Proxy", "Surface", "OPENAI"]
