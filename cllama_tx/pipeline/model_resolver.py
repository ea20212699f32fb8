"""
The LLM resolver: asks a model the operator chose what a requested name
that no rule of the resolution order knows means, among the models that
are available here, and keeps the answer as an C{llm} model mapping.

Off unless the operator names a resolver model (C{CLLAMA_RESOLVER_MODEL}).
The call goes through the proxy's own provider registry and key pools (a
key the provider refuses is marked as on any request), with one deadline
for the whole call, and is metered like a request of its own: a ledger
row, a C{request} and a C{response} line under the operator principal
L{RESOLVER_PRINCIPAL}, priced as any model.

What bounds what the operator pays (C{docs/CONFIGURATION.md}):

  - concurrent requests for one name share one call;
  - an answer of "nothing", a refused answer and a failed call are
    remembered for the name (L{ResolverSettings.negative_ttl}, at most
    L{ResolverSettings.max_names} names), so the same junk name never
    costs twice within that time;
  - at most L{ResolverSettings.calls_per_minute} calls in any minute, over
    every name: beyond it a name is refused as if the resolver were off;
  - a caller's C{?force} re-asks about a name only when its mapping was
    made by the resolver (or it has none), and at most once per
    L{ResolverSettings.force_interval} per name.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from cllama_tx.accounting.usage import usage_from_json
from cllama_tx.governance import llm_resolution
from cllama_tx.governance.mappings import LLM, ModelMapping
from cllama_tx.pipeline.metering import Exchange
from cllama_tx.pipeline.proxy import Surface, new_request_id
from cllama_tx.providers.bodies import read_small
from cllama_tx.providers.catalog import auth_headers, upstream_url
from cllama_tx.providers.forwarding import first_header
from cllama_tx.providers.health import VALID
from cllama_tx.providers.keys import classify_failure
from cllama_tx.providers.model_limits import traits_for
from cllama_tx.surfaces.errors import ANTHROPIC, OPENAI
from cllama_tx.surfaces.matrix import InvalidModelRef, split_model_ref
from cllama_tx.surfaces.model_fit import fit_request

__all__ = ["RESOLVER_PRINCIPAL", "LlmResolver", "Outcome", "ResolverSettings"]

log = Logger(namespace="cllama_tx.resolver")

#: Who the resolver's calls are billed to (the ledger's agent, the audit's claw_id).
RESOLVER_PRINCIPAL = "cllama-resolver"

#: The most bytes of a resolver answer read.
_ANSWER_LIMIT = 256 * 1024
#: Keys tried for one call (a refused key is marked and the next one tried).
_TRIES = 3

# Outcomes.
MAPPED = "mapped"
NONE = "none"
REFUSED = "refused"
FAILED = "failed"
RATE_LIMITED = "rate_limited"
REMEMBERED = "remembered"


@attrs.frozen
class ResolverSettings:
    """The operator's choices; C{model} None: the resolver is off."""

    model: str | None = None
    timeout: float = 20.0
    calls_per_minute: int = 20
    negative_ttl: float = 300.0
    force_interval: float = 60.0
    max_names: int = 4096

    @property
    def enabled(self) -> bool:
        return self.model is not None


@attrs.frozen
class Outcome:
    """What the resolver made of one name, for every request that waited on it."""

    name: str
    reason: str
    target: str | None = None
    why: str | None = None
    quoted: str | None = None
    resolver_request_id: str | None = None
    resolver_model: str | None = None

    @property
    def note(self) -> str:
        """Why the name stays unresolved, for the refusal's message."""
        if self.reason == NONE:
            return "the model resolver found no available model it means"
        if self.reason == REFUSED:
            return "the model resolver's answer was refused: it named no available model"
        if self.reason == RATE_LIMITED:
            return "the model resolver was not asked: its calls for this minute are spent"
        if self.reason == REMEMBERED:
            return "the model resolver found nothing for this name a short while ago"
        return "the model resolver could not be asked"

    def audit_fields(self) -> dict:
        """The fields of the C{llm_resolver} intervention line of an unresolved name."""
        fields: dict[str, Any] = {"outcome": self.reason}
        for name in ("why", "quoted", "resolver_request_id", "resolver_model"):
            value = getattr(self, name)
            if value is not None:
                fields["answer" if name == "quoted" else "reason" if name == "why" else name] = value
        return fields

    def mapped_fields(self) -> dict:
        """What the C{llm_mapping} line of a name mapped just now adds."""
        return {"resolver_request_id": self.resolver_request_id, "resolver_model": self.resolver_model}


class _Failed(Exception):
    """The resolver call failed; the message says why (never a secret), C{status} what the row records."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


class LlmResolver:
    """
    @param candidates: the available models now (the router's
        C{candidates}).
    @param mappings: the mapping store the answers are kept in.
    """

    def __init__(self, settings: ResolverSettings, *, clock, providers, upstream, metering, mappings,
                 candidates: Callable[[], list[str]]) -> None:
        self.settings = settings
        self._clock = clock
        self._providers = providers
        self._upstream = upstream
        self._metering = metering
        self._mappings = mappings
        self._candidates = candidates
        # name -> (until, outcome): answers of nothing, refusals, failures.
        self._remembered: collections.OrderedDict[str, tuple[float, Outcome]] = collections.OrderedDict()
        # name -> the waiters of the call in flight.
        self._inflight: dict[str, list[defer.Deferred]] = {}
        self._calls: collections.deque[float] = collections.deque()
        self._forced: collections.OrderedDict[str, float] = collections.OrderedDict()
        self.calls = 0
        self.last_outcome: Outcome | None = None

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def state(self) -> dict:
        """What the debug page shows of the resolver."""
        now = self._clock.seconds()
        self._spent(now)
        return {
            "enabled": self.enabled,
            "model": self.settings.model,
            "principal": RESOLVER_PRINCIPAL,
            "timeout_seconds": self.settings.timeout,
            "calls_per_minute": self.settings.calls_per_minute,
            "calls_last_minute": len(self._calls),
            "calls": self.calls,
            "in_flight": sorted(self._inflight),
            "negative_ttl_seconds": self.settings.negative_ttl,
            "remembered": [
                {"name": name, "outcome": outcome.reason, "for_seconds": round(until - now, 1)}
                for name, (until, outcome) in self._remembered.items() if until > now
            ],
            "force_interval_seconds": self.settings.force_interval,
        }

    # -- what a request may ask

    def force_refusal(self, name: str) -> str | None:
        """
        None when a caller may force the re-resolution of C{name} now (and
        the time is taken), else why not: its mapping is not the
        resolver's, or it was forced less than the interval ago.
        """
        mapping = self._mappings.get(name) if self._mappings is not None else None
        if mapping is not None and mapping.source != LLM:
            return f"the mapping of this name is an {mapping.source}'s: it is never re-resolved on request"
        now = self._clock.seconds()
        last = self._forced.get(name)
        interval = self.settings.force_interval
        if last is not None and now - last < interval:
            return f"this name was re-resolved {now - last:.0f} s ago; at most once every {interval:g} s"
        self._forced[name] = now
        self._forced.move_to_end(name)
        while len(self._forced) > self.settings.max_names:
            self._forced.popitem(last=False)
        return None

    def _spent(self, now: float) -> bool:
        calls = self._calls
        while calls and calls[0] <= now - 60.0:
            calls.popleft()
        return len(calls) >= self.settings.calls_per_minute

    def _remember(self, outcome: Outcome, ttl: float) -> None:
        name = outcome.name
        self._remembered[name] = (self._clock.seconds() + ttl, outcome)
        self._remembered.move_to_end(name)
        while len(self._remembered) > self.settings.max_names:
            self._remembered.popitem(last=False)

    def ask(self, name: str, *, surface: str, caller: str | None, prompt: str | None,
            force: bool = False) -> defer.Deferred:
        """
        A Deferred firing with the L{Outcome} for C{name} (it never fails):
        a mapping stored (C{target} set), or why there is none.
        """
        now = self._clock.seconds()
        remembered = self._remembered.get(name)
        if remembered is not None:
            until, outcome = remembered
            if until <= now:
                del self._remembered[name]
            elif not force:
                return defer.succeed(attrs.evolve(outcome, reason=REMEMBERED, why=outcome.reason))
        waiter: defer.Deferred = defer.Deferred()
        waiting = self._inflight.get(name)
        if waiting is not None:
            waiting.append(waiter)
            return waiter
        if self._spent(now):
            return defer.succeed(Outcome(name, RATE_LIMITED, resolver_model=self.settings.model))
        self._calls.append(now)
        self.calls += 1
        self._inflight[name] = [waiter]
        call = defer.ensureDeferred(self._resolve(name, surface, caller, prompt))

        def deliver(outcome: Any) -> None:
            if not isinstance(outcome, Outcome):  # a bug: never leave the waiters hanging
                log.failure("model resolver: resolving {name!r} failed", outcome, name=name)
                outcome = Outcome(name, FAILED, why="internal error", resolver_model=self.settings.model)
            self.last_outcome = outcome
            for waiting_one in self._inflight.pop(name, []):
                waiting_one.callback(outcome)

        call.addBoth(deliver)
        return waiter

    # -- the call

    async def _resolve(self, name: str, surface: str, caller: str | None, prompt: str | None) -> Outcome:
        model = self.settings.model
        assert model is not None
        ref = split_model_ref(model)
        candidates = self._candidates()[: llm_resolution.MAX_CANDIDATES]
        if not candidates:
            outcome = Outcome(name, NONE, why="no model is available", resolver_model=model)
            self._remember(outcome, self.settings.negative_ttl)
            return outcome
        try:
            resolved = self._providers.resolve(ref.provider)
        except Exception as e:
            outcome = Outcome(name, FAILED, why=f"the resolver's provider cannot be used: {_message(e)}",
                              resolver_model=model)
            self._remember(outcome, min(self.settings.negative_ttl, 30.0))
            return outcome
        api_format = resolved.spec.api_format
        doc = llm_resolution.build_request(api_format, ref.model, name, surface, candidates, prompt,
                                           traits_for(ref.provider, ref.model))
        doc = fit_request(doc, api_format, traits_for(ref.provider, ref.model)).request
        ex = Exchange(new_request_id(), self._clock.seconds(), _surface(api_format))
        ex.claw_id, ex.model, ex.provider, ex.upstream_model = RESOLVER_PRINCIPAL, model, ref.provider, ref.model
        ex.original = ex.doc = doc
        body = json.dumps(doc).encode("utf-8")
        ex.body_size = len(body)
        self._metering.audit_request(ex)
        try:
            answer_doc = await self._send(resolved, ex, body)
        except _Failed as e:
            self._metering.settle(ex, e.status, str(e))
            outcome = Outcome(name, FAILED, why=str(e), resolver_request_id=ex.request_id, resolver_model=model)
            self._remember(outcome, min(self.settings.negative_ttl, 30.0))
            return outcome
        self._metering.settle(ex, 200)
        answer = llm_resolution.judge(llm_resolution.answer_text(answer_doc, api_format), candidates)
        if answer.verdict != llm_resolution.MAPPED or answer.target is None:
            reason = NONE if answer.verdict == llm_resolution.NONE else REFUSED
            outcome = Outcome(name, reason, why=answer.why, quoted=answer.quoted if reason == REFUSED else None,
                              resolver_request_id=ex.request_id, resolver_model=model)
            if reason == REFUSED:
                log.warn("model resolver: refused its answer about {name!r}: {why}", name=name, why=answer.why)
            self._remember(outcome, self.settings.negative_ttl)
            return outcome
        now = self._clock.seconds()
        detail: dict[str, Any] = {"resolver_model": model, "resolver_request_id": ex.request_id, "surface": surface}
        if prompt:
            detail["prompt"] = prompt
        mapping = ModelMapping(name, answer.target, LLM, now, now, None, caller, detail)
        try:
            await self._mappings.put(mapping, only_source=LLM)
        except Exception as e:
            # In memory until the write failed; the request is served by it either way.
            log.error("model resolver: the mapping of {name!r} could not be stored: {error}", name=name,
                      error=_message(e))
        self._remembered.pop(name, None)
        return Outcome(name, MAPPED, target=answer.target, resolver_request_id=ex.request_id, resolver_model=model)

    async def _send(self, resolved, ex: Exchange, body: bytes) -> Any:
        """POST the question with the pool's next usable key; the answer's JSON."""
        spec, pool, model = resolved.spec, resolved.pool, ex.upstream_model
        path = "/v1/messages" if spec.api_format == "anthropic" else "/v1/chat/completions"
        url = upstream_url(spec.base_url, path).encode("utf-8")
        deadline = self._clock.seconds() + self.settings.timeout
        tried: set[str] = set()
        for _ in range(_TRIES):
            key = pool.acquire(tried, model)
            if key is None:
                break
            headers = Headers({b"content-type": [b"application/json"], b"accept": [b"application/json"]})
            for header, value in resolved.headers.defaults + resolved.headers.fixed:
                headers.setRawHeaders(header, [value])
            try:
                for header, value in auth_headers(spec.auth, key.secret):
                    headers.setRawHeaders(header, [value])
            except ValueError:
                tried.add(key.id)
                continue
            response = await self._post(url, headers, body, ex, deadline)
            raw = await read_small(response, self._clock, max(deadline - self._clock.seconds(), 0.1), _ANSWER_LIMIT)
            if resolved.scrubber is not None:
                raw = resolved.scrubber.scrub(raw)
            code = response.code
            if 200 <= code < 300:
                pool.succeeded(key)
                try:
                    doc = json.loads(raw)
                except ValueError:
                    raise _Failed("the resolver model's answer is not JSON", code) from None
                ex.usage = usage_from_json(doc, spec.api_format)
                ex.response_json = doc
                return doc
            verdict = classify_failure(code, first_header(response.headers, b"retry-after"), raw, now=self._clock.seconds())
            if code not in (401, 402, 429) or verdict is None or not pool.report(key, verdict, model):
                raise _Failed(f"the resolver model's provider answered {code}", code)
            if pool.is_suspect(key) and await pool.recheck(key) == VALID:
                raise _Failed(f"the resolver model's provider answered {code}", code)
            tried.add(key.id)
        raise _Failed(f"no usable key for the resolver model's provider {ex.provider!r}", 503)

    async def _post(self, url: bytes, headers: Headers, body: bytes, ex: Exchange, deadline: float) -> Any:
        ex.upstream_called = True
        ex.attempt_started = self._clock.seconds()
        d = self._upstream.request(b"POST", url, headers, body)
        timed_out: list[bool] = []

        def expire() -> None:
            timed_out.append(True)
            d.cancel()

        timer = self._clock.callLater(max(deadline - self._clock.seconds(), 0.0), expire)
        try:
            response = await d
        except Exception as e:
            if timed_out:
                raise _Failed(f"the resolver model did not answer within {self.settings.timeout:g} s", 504) from None
            raise _Failed(f"the resolver model's provider could not be reached: {type(e).__name__}") from None
        finally:
            if timer.active():
                timer.cancel()
        ex.first_byte_at = self._clock.seconds()
        return response


def _surface(api_format: str) -> Surface:
    """The resolver's calls as a surface of their own (metrics, audit, ledger)."""
    if api_format == "anthropic":
        return Surface("llm-resolver", "/v1/messages", "anthropic", ANTHROPIC)
    return Surface("llm-resolver", "/v1/chat/completions", "openai", OPENAI)


def _message(error: Exception) -> str:
    text = str(error.args[0]) if getattr(error, "args", None) else ""
    return text[:300] or type(error).__name__


def parse_settings(model: str | None, **numbers: float) -> ResolverSettings:
    """
    The settings, the model checked (C{<provider>/<model>}).

    @raise ValueError: a malformed model ref or a number out of range.
    """
    if model is not None:
        try:
            split_model_ref(model)
        except InvalidModelRef as e:
            raise ValueError(f"not a '<provider>/<model>' ref: {e}") from None
        if "/" not in model:
            raise ValueError("name the provider too: '<provider>/<model>'")
    for name, value in numbers.items():
        if value <= 0:
            raise ValueError(f"{name} must be positive")
    return ResolverSettings(model=model, **numbers)  # type: ignore[arg-type]
