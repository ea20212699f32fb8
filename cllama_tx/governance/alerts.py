"""
Budget alerts: a webhook notification when an agent's spend crosses 50 %,
80 % and 100 % of its budget, once per threshold per budget period.

The proxy calls L{AlertNotifier.observe} (or L{AlertNotifier.observe_usage})
after every settled request, for every budget whatever its behaviour; the
call is O(1), does no I/O and never raises.  A threshold crossed for the
first time in the current period queues one notification per webhook; they
are POSTed in the background and retried with exponential backoff.  See
C{docs/ALERTS.md} for the operator's view.

Webhook URLs carry their credentials in the path (Slack, Discord, most
alerting gateways), so they are secrets: nothing here logs, formats or
raises with a full URL.  L{Webhook.redacted} (C{scheme://host[:port]/…}) is
what appears in logs, errors and C{repr}.

Delivery state lives in memory only: an alert queued or retrying when the
process stops is lost, and a restarted process does not remember which
thresholds it already announced in the current period (it announces again
the thresholds that are still crossed at the first request after start).
"""

from __future__ import annotations

import email.utils
import json
import math
import random as _random
import re
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.application import service
from twisted.internet import defer
from twisted.logger import Logger

from cllama_tx.store.records import rfc3339_ms

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ENV_VAR",
    "KINDS",
    "AlertNotifier",
    "Webhook",
    "WebhookError",
    "budget_observation",
    "human_text",
    "parse_webhooks",
    "redact_url",
    "render_body",
]

log = Logger(namespace="cllama_tx.alerts")

ENV_VAR = "CLLAMA_ALERT_WEBHOOKS"
EVENT = "budget_threshold"

JSON = "json"
SLACK = "slack"
DISCORD = "discord"
KINDS = (JSON, SLACK, DISCORD)

DEFAULT_THRESHOLDS = (0.5, 0.8, 1.0)

HEADERS = {"Content-Type": ["application/json"], "User-Agent": ["cllama_tx-alerts"]}

# Statuses worth another attempt; any other non-2xx answer (a revoked or
# deleted webhook: 400, 401, 403, 404, 410) will not get better by itself.
_RETRYABLE_STATUS = frozenset({408, 425, 429})

# Fractions compare with float noise forgiven (8.0 / 10.0 * ... may land a hair under).
_EPSILON = 1e-9

# Discord refuses a message longer than this.
_DISCORD_MAX = 2000


class WebhookError(ValueError):
    """C{CLLAMA_ALERT_WEBHOOKS} is malformed; the message never holds a full URL."""


# --------------------------------------------------------------------------
# Webhooks


def redact_url(url: Any) -> str:
    """
    C{scheme://host[:port]/…}: enough to tell webhooks apart in a log, without
    the path, query, fragment or user info where their tokens live.
    C{<invalid URL>} when there is no scheme or host to show.
    """
    try:
        parts = urlsplit(str(url).strip())
        host = parts.hostname
        scheme = parts.scheme.lower()
        if not scheme or not host or not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
            return "<invalid URL>"
        if ":" in host:
            host = f"[{host}]"
        try:
            port = parts.port
        except ValueError:
            port = None
        netloc = host if port is None else f"{host}:{port}"
        return f"{scheme}://{netloc}/…"
    except Exception:
        return "<invalid URL>"


@attrs.frozen(repr=False)
class Webhook:
    """
    One alert destination: C{url} (a secret) and the body C{kind} it takes
    (C{json}, C{slack} or C{discord}).  C{repr} and C{str} show the
    redacted URL only.
    """

    url: str
    kind: str = JSON

    @property
    def redacted(self) -> str:
        return redact_url(self.url)

    def __repr__(self) -> str:
        return f"Webhook({self.kind}:{self.redacted})"

    __str__ = __repr__


_KIND_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(.*)\Z", re.DOTALL)


def _split_kind(entry: str, number: int) -> tuple[str, str]:
    match = _KIND_PREFIX.match(entry)
    if match is None:
        return JSON, entry
    prefix, rest = match.group(1).lower(), match.group(2)
    if prefix in KINDS:
        return prefix, rest
    if prefix in ("http", "https"):
        return JSON, entry
    if rest.lower().startswith(("http://", "https://")):
        raise WebhookError(
            f"{ENV_VAR} entry {number}: unknown webhook kind {prefix[:20]!r} "
            f"(use json:, slack: or discord:, or no prefix for json)"
        )
    return JSON, entry


def _validate(url: str, kind: str, number: int) -> None:
    where = f"{ENV_VAR} entry {number} ({kind}:{redact_url(url)})"
    try:
        parts = urlsplit(url)
    except ValueError:
        raise WebhookError(f"{where}: not a URL") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise WebhookError(f"{where}: must be an http:// or https:// URL")
    if not parts.hostname:
        raise WebhookError(f"{where}: the URL has no host")
    try:
        _ = parts.port  # reading it validates it
    except ValueError:
        raise WebhookError(f"{where}: the URL has an invalid port") from None
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in url):
        raise WebhookError(f"{where}: the URL contains spaces or control characters")


def parse_webhooks(env_value: str | None) -> list[Webhook]:
    """
    The webhooks of C{CLLAMA_ALERT_WEBHOOKS}: URLs separated by commas (or
    whitespace), each optionally prefixed by its body kind: C{slack:https://…},
    C{discord:https://…}, C{json:https://…} (the default).  Duplicates are
    dropped; L{None} or an empty value gives no webhooks.

    @raise WebhookError: an entry is not an http/https URL with a host, or
        has an unknown kind prefix.  The message names the entry by number
        and redacted URL only.
    """
    if env_value is None:
        return []
    webhooks: list[Webhook] = []
    seen: set[tuple[str, str]] = set()
    entries = [e for e in re.split(r"[,\s]+", env_value) if e]
    for number, entry in enumerate(entries, 1):
        kind, url = _split_kind(entry, number)
        _validate(url, kind, number)
        if (kind, url) in seen:
            continue
        seen.add((kind, url))
        webhooks.append(Webhook(url=url, kind=kind))
    return webhooks


# --------------------------------------------------------------------------
# Bodies (pure)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _money(value: Any) -> float | None:
    number = _number(value)
    return None if number is None else round(number, 6)


def _count(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _time(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    number = _number(value)
    return None if number is None else rfc3339_ms(number)


def _percent(threshold: float) -> str:
    value = threshold * 100
    if abs(value - round(value)) < 1e-6:
        return f"{round(value)}%"
    return f"{value:g}%"


_OUTCOME = {
    "hard_stop": "; further requests are refused until it resets",
    "rate_limit": "; requests are refused until there is room again",
    "soft_alert": "; requests continue (soft_alert)",
}


def human_text(fields: dict) -> str:
    """
    The one-line message of the Slack and Discord bodies, from the generic
    body's C{fields}: "cllama_tx: agent tiverton reached 80% of its $10.00
    daily budget ($8.04 spent)".  Describes the dollar limit, or the request
    limit when there is no dollar limit or it is the nearer one.
    """
    pod = fields.get("pod")
    head = f"cllama_tx (pod {pod})" if pod else "cllama_tx"
    label = fields.get("window")
    label = f"{label} " if label else ""
    spent, limit = fields.get("spent_usd"), fields.get("limit_usd")
    requests, max_requests = fields.get("requests"), fields.get("max_requests")
    use_requests = bool(max_requests) and requests is not None and (
        not limit or spent is None or requests / max_requests > spent / limit
    )
    percent = _percent(fields["threshold"])
    if use_requests:
        made = "1 request" if requests == 1 else f"{requests} requests"
        what = f"{max_requests}-request {label}budget ({made} made)"
    elif limit:
        spent_text = f" (${spent:,.2f} spent)" if spent is not None else ""
        what = f"${limit:,.2f} {label}budget{spent_text}"
    else:
        what = f"{label}budget"
    text = f"{head}: agent {fields.get('agent')} reached {percent} of its {what}"
    if fields["threshold"] >= 1.0 - _EPSILON:
        text += _OUTCOME.get(fields.get("behavior") or "", "")
    return text


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_body(kind: str, fields: dict) -> bytes:
    """
    The POST body for a webhook of C{kind}: C{fields} itself (C{json}),
    C{{"text": …}} (Slack incoming webhook) or C{{"content": …,
    "allowed_mentions": {"parse": []}}} (Discord execute webhook; no
    mention in the text can ping anyone).
    """
    if kind == JSON:
        doc: dict = fields
    elif kind == SLACK:
        doc = {"text": _slack_escape(human_text(fields))}
    elif kind == DISCORD:
        doc = {"content": human_text(fields)[:_DISCORD_MAX], "allowed_mentions": {"parse": []}}
    else:
        raise ValueError(f"unknown webhook kind {kind!r}")
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def budget_fraction(budget: Any, cost_usd: float, requests: int) -> float:
    """What L{budget_observation} reports as used: settled spend or requests over their limit, the higher."""
    limit, max_requests = budget.limit_usd, budget.max_requests
    fraction = 0.0
    if limit:
        fraction = max(fraction, cost_usd / limit)
    if max_requests:
        fraction = max(fraction, requests / max_requests)
    return fraction


def budget_observation(budget: Any, usage: Any) -> tuple[str, str, float, dict]:
    """
    The arguments of L{AlertNotifier.observe} (after C{agent}) for a
    C{budgets.Budget} and its C{BudgetBook.usage()}: C{(budget_label,
    period_key, fraction_used, details)}.

     - C{fraction_used}: settled spend over C{limit_usd} or settled requests
       over C{max_requests}, whichever is higher (reservations in flight
       do not count: an alert reports what was spent).
     - C{period_key}: a calendar period's start; for a rolling window,
       consecutive spans of the window's length (aligned to the Unix epoch,
       so a C{"24h"} window re-arms at 00:00 UTC).  The limits are part of
       the key, so a changed budget re-arms its thresholds.
    """
    limit, max_requests = budget.limit_usd, budget.max_requests
    fraction = budget_fraction(budget, usage.cost_usd, usage.requests)
    details: dict = {
        "behavior": budget.behavior,
        "period_start": usage.start,
        "spent_usd": usage.cost_usd,
        "limit_usd": limit,
        "requests": usage.requests,
        "max_requests": max_requests,
    }
    if budget.period is not None:
        details["period_end"] = usage.end
        span = f"{usage.start:.0f}"
    else:
        span = str(math.floor(usage.end / budget.window_seconds))
    key = f"{budget.label}@{span}/{limit}/{max_requests}"
    return budget.label, key, fraction, details


# --------------------------------------------------------------------------
# The notifier


@attrs.frozen
class _Notification:
    agent: str
    threshold: float
    fields: dict


@attrs.define(eq=False)
class _Delivery:
    notification: _Notification
    webhook: Any
    attempts: int = 0
    call: Any = None  # the IDelayedCall of the next attempt
    request: Any = None  # the Deferred of the attempt in flight
    timed_out: bool = False


def _redacted(webhook: Any) -> str:
    try:
        return redact_url(webhook.url)
    except Exception:
        return "<invalid webhook>"


def _scrub(text: str, webhook: Any) -> str:
    """C{text} without the webhook's URL or the secret parts of it."""
    try:
        url = str(webhook.url)
        parts = urlsplit(url)
        secrets = [
            url,
            parts.path + ("?" + parts.query if parts.query else ""),
            parts.path,
            parts.query,
            parts.fragment,
            parts.username or "",
            parts.password or "",
        ]
        # Each path segment and query value on its own too: a service may
        # quote just the token ("Unknown Webhook <token>").
        secrets += parts.path.split("/") + re.split(r"[&=]", parts.query)
        for secret in sorted(set(secrets), key=len, reverse=True):
            if len(secret) >= 4:
                text = text.replace(secret, "…")
    except Exception:
        pass
    return text


def _snippet(body: bytes, webhook: Any) -> str:
    text = body[:400].decode("utf-8", "replace")
    text = re.sub(r"[\x00-\x1f\x7f]+", " ", text).strip()[:200]
    return _scrub(text, webhook)


def _describe(failure: Any, webhook: Any) -> str:
    value = failure.value
    name = type(value).__name__
    try:
        detail = _scrub(str(value), webhook)[:200]
    except Exception:
        detail = ""
    return f"{name}: {detail}" if detail else name


class AlertNotifier(service.Service):
    """
    Sends budget threshold alerts to webhooks.

    @param reactor: provides C{callLater} and C{seconds} (a L{Clock} in tests);
        every delay, timeout and timestamp comes from it.
    @param http_client: a C{treq.client.HTTPClient}, or anything whose
        C{post(url, data=bytes, headers=dict)} returns a Deferred of a
        response with C{code}, C{headers} (Twisted C{Headers}) and
        optionally C{content()}.
    @param webhooks: L{Webhook}s (L{parse_webhooks}).
    @param pod: the pod name put in bodies and messages (C{CLAW_POD}).
    @param thresholds: fractions of the budget, positive; sorted here.
    @param max_attempts: attempts per webhook per notification, at least 1.
    @param base_delay: the first retry waits C{base_delay} seconds, each
        next one twice as long, times a jitter factor C{1 + random() / 2},
        at most C{max_delay}.
    @param timeout: seconds for one attempt (connect, answer and body).
    @param max_delay: the longest backoff delay.
    @param max_retry_after: the longest C{Retry-After} (of a 429) honoured.
    @param max_pending: notifications waiting or in flight beyond this are
        dropped (counted in C{dropped}), so a dead webhook cannot grow memory.
    @param stop_grace: seconds C{stopService} lets attempts in flight finish.
    @param random: returns a float in C{[0, 1)}; the backoff jitter.

    Counters (per webhook delivery, for metrics): C{sent}, C{failed} (given
    up: attempts exhausted or a status not worth retrying), C{retries},
    C{dropped} (queue full, or cancelled by C{stopService}), C{errors}
    (C{observe} hit a bug and swallowed it).
    """

    def __init__(
        self,
        reactor: Any,
        http_client: Any,
        webhooks: Iterable[Webhook] | None,
        pod: str | None = None,
        thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
        max_attempts: int = 5,
        base_delay: float = 1.0,
        timeout: float = 10.0,
        *,
        max_delay: float = 300.0,
        max_retry_after: float = 3600.0,
        max_pending: int = 1000,
        stop_grace: float = 3.0,
        random: Callable[[], float] = _random.random,
    ) -> None:
        levels = sorted({float(t) for t in thresholds})
        if not levels or any(not math.isfinite(t) or t <= 0 for t in levels):
            raise ValueError("thresholds must be positive numbers")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if base_delay < 0 or timeout <= 0 or max_delay < 0 or max_pending < 0:
            raise ValueError("base_delay, max_delay and max_pending must not be negative, timeout positive")
        self._reactor = reactor
        self._client = http_client
        self._webhooks: tuple = tuple(webhooks) if webhooks is not None else ()
        self.pod = pod
        self.thresholds: tuple[float, ...] = tuple(levels)
        self.max_attempts = int(max_attempts)
        self.base_delay = float(base_delay)
        self.timeout = float(timeout)
        self.max_delay = float(max_delay)
        self.max_retry_after = float(max_retry_after)
        self.max_pending = int(max_pending)
        self.stop_grace = float(stop_grace)
        self._random = random
        # agent -> [period_key, how many thresholds (lowest first) were announced]
        self._marks: dict[str, list] = {}
        self._deliveries: set[_Delivery] = set()
        self._waiters: list[tuple[Callable[[], bool], defer.Deferred]] = []
        self._stopped = False
        self.sent = 0
        self.failed = 0
        self.retries = 0
        self.dropped = 0
        self.errors = 0

    # -- service

    @property
    def webhooks(self) -> tuple:
        return self._webhooks

    def startService(self) -> None:
        super().startService()
        self._stopped = False
        if not self._webhooks:
            log.info("budget alerts: no webhook configured; threshold crossings are logged only")
            return
        shown = ", ".join(f"{getattr(w, 'kind', '?')}:{_redacted(w)}" for w in self._webhooks)
        log.info("budget alerts: {count} webhook(s): {webhooks}", count=len(self._webhooks), webhooks=shown)
        for webhook in self._webhooks:
            try:
                parts = urlsplit(webhook.url)
                if parts.scheme.lower() == "http" and parts.hostname not in ("localhost", "127.0.0.1", "::1"):
                    log.warn(
                        "budget alerts: webhook {webhook} is plain http: "
                        "its token crosses the network in clear",
                        webhook=_redacted(webhook),
                    )
            except Exception:
                pass

    def stopService(self) -> defer.Deferred:
        """
        Cancel every retry waiting for its time; give attempts in flight up
        to C{stop_grace} seconds, then cancel them.  Fires when nothing is
        in flight.  Later crossings are still recorded but not sent.
        """
        super().stopService()
        self._stopped = True
        waiting = [d for d in self._deliveries if d.call is not None]
        for delivery in waiting:
            delivery.call.cancel()
            delivery.call = None
            self.dropped += 1
            self._deliveries.discard(delivery)
        if waiting:
            log.warn(
                "budget alerts: stopping; {count} alert delivery(ies) waiting to retry dropped",
                count=len(waiting),
            )
        done = self._when(lambda: not self._deliveries)
        if not done.called:
            timer = self._reactor.callLater(self.stop_grace, self._cancel_in_flight)

            def cancel_timer(result: Any) -> Any:
                if timer.active():
                    timer.cancel()
                return result

            done.addBoth(cancel_timer)
        return done

    def _cancel_in_flight(self) -> None:
        for delivery in list(self._deliveries):
            if delivery.request is not None:
                delivery.request.cancel()

    # -- observing

    def observe(
        self,
        agent: str,
        budget_label: str,
        period_key: str,
        fraction_used: float,
        details: dict | None = None,
    ) -> tuple[float, ...]:
        """
        Note that C{agent} has used C{fraction_used} of its budget in the
        period C{period_key}; queue one notification per webhook for every
        threshold crossed for the first time in that period.  Returns the
        thresholds newly crossed.  O(1), no I/O, never raises.

        C{details}: C{behavior}, C{period_start}, C{period_end} (optional;
        epoch seconds or RFC 3339 strings), C{spent_usd}, C{limit_usd},
        C{requests}, C{max_requests}; missing ones are C{null} in bodies.
        """
        try:
            fraction = _number(fraction_used)
            if fraction is None:
                return ()
            levels = self.thresholds
            mark = self._marks.get(agent)
            if mark is None or mark[0] != period_key:
                if fraction + _EPSILON < levels[0]:
                    if mark is not None:
                        del self._marks[agent]  # only the current period is kept
                    return ()
                mark = self._marks[agent] = [period_key, 0]
            count = mark[1]
            if count >= len(levels) or fraction + _EPSILON < levels[count]:
                return ()
            crossed = []
            while count < len(levels) and fraction + _EPSILON >= levels[count]:
                crossed.append(levels[count])
                count += 1
            mark[1] = count
            if not isinstance(details, dict):
                details = {}
            for threshold in crossed:
                self._notify(agent, budget_label, threshold, details)
            return tuple(crossed)
        except Exception:
            self.errors += 1
            try:
                log.failure("budget alerts: observe failed for agent {agent}", agent=agent)
            except Exception:
                pass
            return ()

    def quiet(self, agent: str, fraction_used: float) -> bool:
        """
        Whether L{observe} of C{fraction_used} for C{agent} would do nothing
        at all, whatever the period: nothing announced for the agent is
        kept, and the fraction is under the lowest threshold.  The request
        path asks this first and builds a whole usage report only when not.
        """
        return agent not in self._marks and fraction_used + _EPSILON < self.thresholds[0]

    def observe_usage(self, agent: str, budget: Any, usage: Any) -> tuple[float, ...]:
        """L{observe} with L{budget_observation}C{(budget, usage)}; never raises."""
        try:
            label, key, fraction, details = budget_observation(budget, usage)
        except Exception:
            self.errors += 1
            log.failure("budget alerts: cannot read the budget of agent {agent}", agent=agent)
            return ()
        return self.observe(agent, label, key, fraction, details)

    def _notify(self, agent: str, label: str, threshold: float, details: dict) -> None:
        fields: dict = {
            "event": EVENT,
            "agent": agent,
            "threshold": threshold,
            "behavior": details.get("behavior"),
            "window": label,
            "period_start": _time(details.get("period_start")),
        }
        end = _time(details.get("period_end"))
        if end is not None:
            fields["period_end"] = end
        fields["spent_usd"] = _money(details.get("spent_usd"))
        fields["limit_usd"] = _money(details.get("limit_usd"))
        fields["requests"] = _count(details.get("requests"))
        fields["max_requests"] = _count(details.get("max_requests"))
        fields["pod"] = self.pod
        fields["ts"] = rfc3339_ms(self._reactor.seconds())
        log.info(
            "budget alert: {text}",
            text=human_text(fields),
            agent=agent,
            threshold=threshold,
            webhooks=len(self._webhooks),
        )
        notification = _Notification(agent, threshold, fields)
        for webhook in self._webhooks:
            if self._stopped or len(self._deliveries) >= self.max_pending:
                self.dropped += 1
                log.warn(
                    "budget alerts: {reason}; alert {threshold} for agent {agent} to {webhook} dropped",
                    reason="stopped" if self._stopped else f"{len(self._deliveries)} deliveries pending",
                    threshold=threshold,
                    agent=agent,
                    webhook=_redacted(webhook),
                )
                continue
            delivery = _Delivery(notification, webhook)
            self._deliveries.add(delivery)
            delivery.call = self._reactor.callLater(0, self._attempt, delivery)

    # -- delivering

    @property
    def pending(self) -> int:
        """Deliveries not finished: waiting for their (next) attempt or in flight."""
        return len(self._deliveries)

    @property
    def in_flight(self) -> int:
        """Deliveries with an HTTP attempt under way."""
        return sum(1 for d in self._deliveries if d.request is not None)

    def when_drained(self) -> defer.Deferred:
        """Fires when every delivery is finished (sent, given up or dropped)."""
        return self._when(lambda: not self._deliveries)

    def when_quiet(self) -> defer.Deferred:
        """Fires when no attempt is in flight (retries may still be waiting)."""
        return self._when(lambda: self.in_flight == 0)

    def _when(self, predicate: Callable[[], bool]) -> defer.Deferred:
        if predicate():
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((predicate, d))
        return d

    def _changed(self) -> None:
        ready = [(p, d) for p, d in self._waiters if p()]
        if ready:
            self._waiters = [w for w in self._waiters if w not in ready]
            for _, d in ready:
                d.callback(None)

    def _attempt(self, delivery: _Delivery) -> None:
        delivery.call = None
        delivery.attempts += 1
        webhook = delivery.webhook
        try:
            body = render_body(webhook.kind, delivery.notification.fields)
            request = self._client.post(str(webhook.url), data=body, headers=HEADERS)
            if not isinstance(request, defer.Deferred):
                request = defer.succeed(request)
        except Exception as e:
            # A broken webhook entry or client: no attempt will do better.
            self._give_up(delivery, f"cannot send ({type(e).__name__})")
            return
        delivery.timed_out = False
        timer = self._reactor.callLater(self.timeout, self._time_out, delivery)
        delivery.request = request
        request.addCallback(self._read)
        request.addBoth(self._stop_timer, timer)
        request.addCallbacks(self._answered, self._errored, callbackArgs=(delivery,), errbackArgs=(delivery,))
        request.addErrback(self._bug, delivery)

    @staticmethod
    def _stop_timer(result: Any, timer: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    @staticmethod
    def _time_out(delivery: _Delivery) -> None:
        if delivery.request is not None:
            delivery.timed_out = True
            delivery.request.cancel()

    @staticmethod
    def _read(response: Any) -> Any:
        code = response.code
        retry_after = None
        try:
            values = response.headers.getRawHeaders(b"retry-after")
            if values:
                retry_after = values[0].decode("latin-1")
        except Exception:
            pass
        content = getattr(response, "content", None)
        if not callable(content):
            return code, retry_after, b""

        def unread(failure: Any) -> Any:
            if failure.check(defer.CancelledError):
                return failure
            return b""  # the status is what counts

        d = defer.maybeDeferred(content)
        d.addErrback(unread)
        d.addCallback(lambda body: (code, retry_after, body if isinstance(body, bytes) else b""))
        return d

    def _answered(self, result: tuple, delivery: _Delivery) -> None:
        delivery.request = None
        code, retry_after, body = result
        if isinstance(code, int) and 200 <= code < 300:
            self.sent += 1
            log.info(
                "budget alert {threshold} for agent {agent} delivered to {webhook}",
                threshold=delivery.notification.threshold,
                agent=delivery.notification.agent,
                webhook=_redacted(delivery.webhook),
            )
            self._finish(delivery)
            return
        reason = f"HTTP {code}"
        snippet = _snippet(body, delivery.webhook)
        if snippet:
            reason += f" {snippet!r}"
        retryable = code in _RETRYABLE_STATUS or (isinstance(code, int) and code >= 500)
        delay = self._parse_retry_after(retry_after) if code == 429 else None
        self._retry_or_give_up(delivery, reason, retryable, delay)

    def _errored(self, failure: Any, delivery: _Delivery) -> None:
        delivery.request = None
        if delivery.timed_out:
            reason = f"timed out after {self.timeout:g} s"
        else:
            reason = _describe(failure, delivery.webhook)
        self._retry_or_give_up(delivery, reason, True, None)

    def _bug(self, failure: Any, delivery: _Delivery) -> None:
        self.errors += 1
        delivery.request = None
        log.error(
            "budget alerts: internal error delivering to {webhook}: {error}",
            webhook=_redacted(delivery.webhook),
            error=failure.type.__name__,
        )
        self._finish(delivery)

    def _retry_or_give_up(
        self, delivery: _Delivery, reason: str, retryable: bool, delay: float | None
    ) -> None:
        if self._stopped:
            self.dropped += 1
            self._finish(delivery)
            return
        if not retryable or delivery.attempts >= self.max_attempts:
            self._give_up(delivery, reason)
            return
        if delay is None:
            delay = self.backoff(delivery.attempts)
        self.retries += 1
        log.warn(
            "budget alert delivery to {webhook} failed (attempt {attempt} of {max_attempts}): {reason}; "
            "retrying in {delay} s",
            webhook=_redacted(delivery.webhook),
            attempt=delivery.attempts,
            max_attempts=self.max_attempts,
            reason=reason,
            delay=round(delay, 3),
            agent=delivery.notification.agent,
            threshold=delivery.notification.threshold,
        )
        delivery.call = self._reactor.callLater(delay, self._attempt, delivery)
        self._changed()

    def _give_up(self, delivery: _Delivery, reason: str) -> None:
        self.failed += 1
        log.error(
            "budget alert {threshold} for agent {agent} not delivered to {webhook} "
            "after {attempts} attempt(s): {reason}",
            threshold=delivery.notification.threshold,
            agent=delivery.notification.agent,
            webhook=_redacted(delivery.webhook),
            attempts=delivery.attempts,
            reason=reason,
        )
        self._finish(delivery)

    def _finish(self, delivery: _Delivery) -> None:
        self._deliveries.discard(delivery)
        self._changed()

    def backoff(self, attempts: int) -> float:
        """Seconds before the next attempt after C{attempts} failed ones."""
        delay = self.base_delay * 2 ** max(0, attempts - 1) * (1 + self._random() / 2)
        return min(delay, self.max_delay)

    def _parse_retry_after(self, value: str | None) -> float | None:
        if not value:
            return None
        value = value.strip()
        try:
            seconds = float(value)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
                seconds = when.timestamp() - self._reactor.seconds()
            except (TypeError, ValueError, IndexError, OverflowError):
                return None
        if not math.isfinite(seconds):
            return None
        return min(max(seconds, 0.0), self.max_retry_after)
