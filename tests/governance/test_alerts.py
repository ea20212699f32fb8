"""
Tests for L{cllama_tx.governance.alerts}: webhook parsing and redaction, the
three body shapes, once-per-threshold-per-period bookkeeping, and delivery
(retries, backoff, Retry-After, timeouts, giving up, stopping) against a
local webhook receiver over real loopback sockets with a real treq client.
Backoff delays run on a L{Clock}; the HTTP exchanges on the real reactor,
awaited through the notifier's Deferreds (never a sleep).
"""

from __future__ import annotations

import json
import math

import attrs
from treq.client import HTTPClient
from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import resource, server
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from cllama_tx.governance.alerts import (
    AlertNotifier,
    Webhook,
    WebhookError,
    budget_observation,
    human_text,
    parse_webhooks,
    redact_url,
    render_body,
)
from cllama_tx.governance.budgets import BudgetBook, parse_budget
from tests.secret_scan import SCANNER

SLACK_TOKEN = "T0ALERTS/B0ALERTS/slacksecret4242xyz"
DISCORD_TOKEN = "1234567890/discord-secret-token-5151"
JSON_TOKEN = "json-hook-secret-7373"
SCANNER.register(SLACK_TOKEN, DISCORD_TOKEN, JSON_TOKEN, "slacksecret4242xyz", "discord-secret-token-5151")

START = 1_718_409_600.0  # 2024-06-15T00:00:00Z
DAY = 86400.0

DETAILS = {
    "behavior": "soft_alert",
    "period_start": START,
    "period_end": START + DAY,
    "spent_usd": 8.04,
    "limit_usd": 10.0,
    "requests": 42,
    "max_requests": None,
}


def fields_for(threshold=0.8, **overrides):
    fields = {
        "event": "budget_threshold",
        "agent": "tiverton",
        "threshold": threshold,
        "behavior": "soft_alert",
        "window": "daily",
        "period_start": "2024-06-15T00:00:00.000Z",
        "period_end": "2024-06-16T00:00:00.000Z",
        "spent_usd": 8.04,
        "limit_usd": 10.0,
        "requests": 42,
        "max_requests": None,
        "pod": None,
        "ts": "2024-06-15T10:00:00.000Z",
    }
    fields.update(overrides)
    return fields


class AlertLog:
    """Every event of the alerts namespace, formatted and raw."""

    def __init__(self, testcase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict) -> None:
        if event.get("log_namespace") == "cllama_tx.alerts":
            self.events.append(event)

    def texts(self) -> list[str]:
        return [formatEvent(e) for e in self.events]

    def everything(self) -> str:
        return "\n".join(formatEvent(e) + " " + repr(e) for e in self.events)


# --------------------------------------------------------------------------
# Parsing and redaction


class ParseWebhooksTests(SynchronousTestCase):
    def test_kinds_and_default(self) -> None:
        value = (
            f"slack:https://hooks.slack.com/services/{SLACK_TOKEN},"
            f" https://alerts.example.com/hook/{JSON_TOKEN} ,"
            f"discord:https://discord.com/api/webhooks/{DISCORD_TOKEN},"
            f"json:http://127.0.0.1:9000/x"
        )
        self.assertEqual(
            parse_webhooks(value),
            [
                Webhook(f"https://hooks.slack.com/services/{SLACK_TOKEN}", "slack"),
                Webhook(f"https://alerts.example.com/hook/{JSON_TOKEN}", "json"),
                Webhook(f"https://discord.com/api/webhooks/{DISCORD_TOKEN}", "discord"),
                Webhook("http://127.0.0.1:9000/x", "json"),
            ],
        )

    def test_empty_none_whitespace_and_duplicates(self) -> None:
        self.assertEqual(parse_webhooks(None), [])
        self.assertEqual(parse_webhooks(""), [])
        self.assertEqual(parse_webhooks(" , ,\n"), [])
        self.assertEqual(
            parse_webhooks("https://a.example/1\nSLACK:https://a.example/1,https://a.example/1"),
            [Webhook("https://a.example/1", "json"), Webhook("https://a.example/1", "slack")],
        )

    def test_invalid_entries_never_echo_the_secret(self) -> None:
        cases = {
            f"ftp://files.example/{JSON_TOKEN}": "entry 1 (json:ftp://files.example/…): must be an http",
            f"hooks.slack.com/services/{SLACK_TOKEN}": "entry 1 (json:<invalid URL>): must be an http",
            f"https://ok.example/a,https:///{JSON_TOKEN}": "entry 2 (json:<invalid URL>): the URL has no host",
            f"https://h.example:99999/{JSON_TOKEN}": "invalid port",
            f"teams:https://teams.example/{JSON_TOKEN}": "entry 1: unknown webhook kind 'teams'",
            f"slack:ftp://x.example/{SLACK_TOKEN}": "entry 1 (slack:ftp://x.example/…)",
        }
        for value, expected in cases.items():
            with self.assertRaises(WebhookError) as caught:
                parse_webhooks(value)
            message = str(caught.exception)
            self.assertIn(expected, message)
            self.assertTrue(message.startswith("CLLAMA_ALERT_WEBHOOKS entry"), message)
            for secret in (JSON_TOKEN, SLACK_TOKEN, "slacksecret4242xyz"):
                self.assertNotIn(secret, message)
        self.assertTrue(issubclass(WebhookError, ValueError))

    def test_redact_url(self) -> None:
        self.assertEqual(redact_url(f"https://hooks.slack.com/services/{SLACK_TOKEN}"), "https://hooks.slack.com/…")
        self.assertEqual(redact_url("HTTPS://User:pw@Host.Example:8443/p?token=abc#f"), "https://host.example:8443/…")
        self.assertEqual(redact_url("http://[::1]:80/x"), "http://[::1]:80/…")
        self.assertEqual(redact_url("http://h.example"), "http://h.example/…")
        for junk in ("", "not a url", "/just/a/path", None, 42, "https://h:bad/x"):
            self.assertNotIn("path", redact_url(junk))
        self.assertEqual(redact_url("not a url"), "<invalid URL>")
        self.assertEqual(redact_url(None), "<invalid URL>")

    def test_webhook_repr_is_redacted(self) -> None:
        webhook = Webhook(f"https://discord.com/api/webhooks/{DISCORD_TOKEN}", "discord")
        self.assertEqual(repr(webhook), "Webhook(discord:https://discord.com/…)")
        self.assertEqual(str(webhook), repr(webhook))
        self.assertEqual(webhook.redacted, "https://discord.com/…")
        self.assertNotIn("secret", repr([webhook]))


# --------------------------------------------------------------------------
# Bodies


class BodyTests(SynchronousTestCase):
    def test_generic_json(self) -> None:
        fields = fields_for()
        self.assertEqual(json.loads(render_body("json", fields)), fields)

    def test_slack(self) -> None:
        self.assertEqual(
            json.loads(render_body("slack", fields_for())),
            {"text": "cllama_tx: agent tiverton reached 80% of its $10.00 daily budget ($8.04 spent)"},
        )

    def test_discord(self) -> None:
        self.assertEqual(
            json.loads(render_body("discord", fields_for())),
            {
                "content": "cllama_tx: agent tiverton reached 80% of its $10.00 daily budget ($8.04 spent)",
                "allowed_mentions": {"parse": []},
            },
        )

    def test_unknown_kind(self) -> None:
        self.assertRaises(ValueError, render_body, "teams", fields_for())

    def test_human_text_variants(self) -> None:
        self.assertEqual(
            human_text(fields_for(0.5, pod="prod-a", window="24h", spent_usd=1234.5, limit_usd=2000)),
            "cllama_tx (pod prod-a): agent tiverton reached 50% of its $2,000.00 24h budget ($1,234.50 spent)",
        )
        self.assertEqual(
            human_text(fields_for(1.0, behavior="hard_stop", spent_usd=10.0)),
            "cllama_tx: agent tiverton reached 100% of its $10.00 daily budget ($10.00 spent)"
            "; further requests are refused until it resets",
        )
        self.assertEqual(
            human_text(fields_for(1.0, spent_usd=10.2)),
            "cllama_tx: agent tiverton reached 100% of its $10.00 daily budget ($10.20 spent)"
            "; requests continue (soft_alert)",
        )
        # Only a request limit, or the request limit is the nearer one.
        self.assertEqual(
            human_text(fields_for(0.8, limit_usd=None, spent_usd=0.3, requests=80, max_requests=100)),
            "cllama_tx: agent tiverton reached 80% of its 100-request daily budget (80 requests made)",
        )
        self.assertEqual(
            human_text(fields_for(0.8, spent_usd=1.0, requests=90, max_requests=100)),
            "cllama_tx: agent tiverton reached 80% of its 100-request daily budget (90 requests made)",
        )
        self.assertIn("reached 12.5% of", human_text(fields_for(0.125)))

    def test_slack_escapes_markup(self) -> None:
        body = json.loads(render_body("slack", fields_for(pod="<!channel> & co")))
        self.assertEqual(body["text"][:41], "cllama_tx (pod &lt;!channel&gt; &amp; co)")


# --------------------------------------------------------------------------
# Observing (a fake client: no sockets)


@attrs.define
class FakeResponse:
    code: int
    headers: Headers = attrs.Factory(Headers)
    body: bytes = b""

    def content(self):
        return defer.succeed(self.body)


class FakeClient:
    """Records posts; answers each with the next scripted response (200 by default)."""

    def __init__(self, *script) -> None:
        self.posts: list[tuple[str, dict, dict]] = []
        self.script = list(script)

    def post(self, url, data, headers):
        self.posts.append((url, json.loads(data), headers))
        answer = self.script.pop(0) if self.script else FakeResponse(200)
        if isinstance(answer, Exception):
            return defer.fail(answer)
        if isinstance(answer, defer.Deferred):
            return answer
        return defer.succeed(answer)


def notifier_with(client, webhooks=None, clock=None, **kwargs):
    clock = clock or Clock()
    clock.advance(START + 36000)  # 2024-06-15T10:00:00Z
    if webhooks is None:
        webhooks = [Webhook(f"https://alerts.example/{JSON_TOKEN}")]
    kwargs.setdefault("random", lambda: 0.0)
    return clock, AlertNotifier(clock, client, webhooks, **kwargs)


def thresholds_posted(client) -> list[float]:
    return [body["threshold"] for _, body, _ in client.posts]


class ObserveTests(SynchronousTestCase):
    def test_once_per_threshold_per_period(self) -> None:
        client = FakeClient()
        clock, notifier = notifier_with(client)
        self.assertEqual(notifier.observe("tiverton", "daily", "p1", 0.3, DETAILS), ())
        self.assertEqual(notifier.observe("tiverton", "daily", "p1", 0.5, DETAILS), (0.5,))
        self.assertEqual(notifier.observe("tiverton", "daily", "p1", 0.9, DETAILS), (0.8,))
        self.assertEqual(notifier.observe("tiverton", "daily", "p1", 0.95, DETAILS), ())
        self.assertEqual(notifier.observe("tiverton", "daily", "p1", 0.6, DETAILS), ())
        clock.advance(0)
        self.assertEqual(thresholds_posted(client), [0.5, 0.8])
        # A new period sends again; one jump past several thresholds sends each.
        self.assertEqual(notifier.observe("tiverton", "daily", "p2", 0.9, DETAILS), (0.5, 0.8))
        self.assertEqual(notifier.observe("tiverton", "daily", "p2", 1.2, DETAILS), (1.0,))
        self.assertEqual(notifier.observe("tiverton", "daily", "p2", 2.0, DETAILS), ())
        clock.advance(0)
        self.assertEqual(thresholds_posted(client), [0.5, 0.8, 0.5, 0.8, 1.0])
        self.assertEqual((notifier.sent, notifier.failed, notifier.pending), (5, 0, 0))

    def test_agents_are_independent_and_memory_is_bounded(self) -> None:
        client = FakeClient()
        clock, notifier = notifier_with(client)
        notifier.observe("a", "daily", "p1", 0.85, DETAILS)
        notifier.observe("b", "daily", "p1", 0.55, DETAILS)
        self.assertEqual(len(notifier._marks), 2)
        # A new period under the first threshold forgets the old one.
        notifier.observe("a", "daily", "p2", 0.1, DETAILS)
        self.assertEqual(list(notifier._marks), ["b"])
        for n in range(100):
            notifier.observe("b", "daily", f"p{n + 2}", 0.6, DETAILS)
        self.assertEqual(len(notifier._marks), 1)
        clock.advance(0)

    def test_exactly_at_a_threshold_and_float_noise(self) -> None:
        client = FakeClient()
        clock, notifier = notifier_with(client)
        self.assertEqual(notifier.observe("t", "daily", "p", 0.1 * 3 * 10 / 6 - 1e-12, DETAILS), (0.5,))
        self.assertEqual(notifier.observe("t", "daily", "p", 9.999999999999998 / 10, DETAILS), (0.8, 1.0))
        clock.advance(0)

    def test_custom_thresholds_are_sorted(self) -> None:
        client = FakeClient()
        clock, notifier = notifier_with(client, thresholds=(1.0, 0.25, 0.25))
        self.assertEqual(notifier.thresholds, (0.25, 1.0))
        self.assertEqual(notifier.observe("t", "daily", "p", 0.3, DETAILS), (0.25,))
        clock.advance(0)
        for bad in ((), (0.0,), (-1,), (math.nan,)):
            self.assertRaises(ValueError, AlertNotifier, Clock(), client, [], thresholds=bad)
        self.assertRaises(ValueError, AlertNotifier, Clock(), client, [], max_attempts=0)

    def test_every_webhook_gets_its_own_body(self) -> None:
        client = FakeClient()
        webhooks = [
            Webhook("https://a.example/json-1"),
            Webhook("https://hooks.slack.com/services/x", "slack"),
            Webhook("https://discord.com/api/webhooks/y", "discord"),
        ]
        clock, notifier = notifier_with(client, webhooks, pod="prod")
        notifier.observe("tiverton", "daily", "p", 0.8, DETAILS)
        self.assertEqual(client.posts, [])  # nothing is sent inside observe
        clock.advance(0)
        text = "cllama_tx (pod prod): agent tiverton reached 50% of its $10.00 daily budget ($8.04 spent)"
        self.assertEqual(
            [(url, body) for url, body, _ in client.posts[:3]],
            [
                ("https://a.example/json-1", fields_for(0.5, pod="prod")),
                ("https://hooks.slack.com/services/x", {"text": text}),
                ("https://discord.com/api/webhooks/y", {"content": text, "allowed_mentions": {"parse": []}}),
            ],
        )
        self.assertEqual(client.posts[0][2]["Content-Type"], ["application/json"])
        self.assertEqual(notifier.sent, 6)

    def test_missing_details_are_nulls(self) -> None:
        client = FakeClient()
        clock, notifier = notifier_with(client)
        notifier.observe("tiverton", "24h", "k", 0.5, None)
        notifier.observe("allen", "24h", "k", 0.5, ["not", "a", "dict"])
        notifier.observe("jim", "24h", "k", 0.5, {"period_start": "2024-06-14T10:00:00Z", "limit_usd": "x"})
        clock.advance(0)
        first = client.posts[0][1]
        self.assertEqual(
            first,
            {
                "event": "budget_threshold", "agent": "tiverton", "threshold": 0.5, "behavior": None,
                "window": "24h", "period_start": None, "spent_usd": None, "limit_usd": None,
                "requests": None, "max_requests": None, "pod": None, "ts": "2024-06-15T10:00:00.000Z",
            },
        )
        self.assertNotIn("period_end", first)
        self.assertEqual(client.posts[2][1]["period_start"], "2024-06-14T10:00:00Z")
        self.assertEqual(client.posts[2][1]["limit_usd"], None)

    def test_observe_never_raises(self) -> None:
        client = FakeClient()

        class Exploding:
            @property
            def url(self):
                raise RuntimeError("boom")

            kind = "json"

        good = Webhook("https://a.example/good")
        broken = [None, "https://not-a-webhook-object.example/x", Exploding(), Webhook("https://b.example/x", "teams"), good]
        clock, notifier = notifier_with(client, broken)
        for fraction in (None, math.nan, math.inf, "0.9", object(), True, -1, 0.9):
            notifier.observe("tiverton", "daily", "p", fraction, DETAILS)
        notifier.observe(["unhashable"], "daily", "p", 0.9, DETAILS)
        clock.advance(0)
        # The good webhook got both crossings; each broken entry failed without an exception.
        self.assertEqual([url for url, _, _ in client.posts], ["https://a.example/good"] * 2)
        self.assertEqual(notifier.sent, 2)
        self.assertEqual(notifier.failed, 8)
        self.assertEqual(notifier.errors, 1)  # the unhashable agent
        self.flushLoggedErrors(TypeError)

    def test_observe_swallows_its_own_bugs(self) -> None:
        clock, notifier = notifier_with(FakeClient())

        def broken(*args):
            raise KeyError("bug")

        notifier._notify = broken
        self.assertEqual(notifier.observe("tiverton", "daily", "p", 0.9, DETAILS), ())
        self.assertEqual(notifier.errors, 1)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_a_client_that_raises(self) -> None:
        class Raising:
            def post(self, url, data, headers):
                raise ValueError(f"cannot reach {url}")

        log = AlertLog(self)
        clock, notifier = notifier_with(Raising())
        notifier.observe("tiverton", "daily", "p", 0.5, DETAILS)
        clock.advance(0)
        self.assertEqual((notifier.failed, notifier.pending), (1, 0))
        self.assertNotIn(JSON_TOKEN, log.everything())
        self.assertIn("https://alerts.example/…", log.everything())


class RetryPolicyTests(SynchronousTestCase):
    def delays(self, clock) -> list[float]:
        return [round(call.getTime() - clock.seconds(), 6) for call in clock.getDelayedCalls()]

    def test_exponential_backoff_with_jitter(self) -> None:
        client = FakeClient(*[FakeResponse(500)] * 5)
        jitter = iter([0.0, 0.5, 0.999, 0.0])
        clock, notifier = notifier_with(client, base_delay=2.0, random=lambda: next(jitter))
        notifier.observe("tiverton", "daily", "p", 0.5, DETAILS)
        clock.advance(0)
        seen = []
        for _ in range(4):
            (delay,) = self.delays(clock)
            seen.append(delay)
            clock.advance(delay)
        self.assertEqual(seen, [2.0, 2 * 2 * 1.25, 2 * 4 * 1.4995, 2 * 8.0])
        self.assertEqual((len(client.posts), notifier.retries, notifier.failed, notifier.sent), (5, 4, 1, 0))
        self.assertEqual(self.delays(clock), [])

    def test_max_delay_caps_backoff(self) -> None:
        _, notifier = notifier_with(FakeClient(), base_delay=1.0, max_delay=5.0)
        self.assertEqual([notifier.backoff(n) for n in (1, 2, 3, 4, 10)], [1.0, 2.0, 4.0, 5.0, 5.0])

    def test_retry_after_seconds_and_date(self) -> None:
        date = "Sat, 15 Jun 2024 10:01:30 GMT"  # 90 s after the clock's now
        client = FakeClient(
            FakeResponse(429, Headers({"Retry-After": ["7"]})),
            FakeResponse(429, Headers({"Retry-After": [date]})),
            FakeResponse(429, Headers({"Retry-After": ["999999"]})),
            FakeResponse(429),  # none: ordinary backoff
            FakeResponse(204),
        )
        clock, notifier = notifier_with(client, max_retry_after=600.0)
        notifier.observe("tiverton", "daily", "p", 0.5, DETAILS)
        clock.advance(0)
        seen = []
        for _ in range(4):
            (delay,) = self.delays(clock)
            seen.append(delay)
            clock.advance(delay)
        self.assertEqual(seen, [7.0, 83.0, 600.0, 8.0])  # 90 s after the first call, minus the 7 s waited
        self.assertEqual((notifier.sent, notifier.retries), (1, 4))

    def test_client_errors_are_not_retried(self) -> None:
        log = AlertLog(self)
        client = FakeClient(FakeResponse(404, body=f'{{"message": "Unknown Webhook {JSON_TOKEN}"}}'.encode()))
        clock, notifier = notifier_with(client)
        notifier.observe("tiverton", "daily", "p", 0.5, DETAILS)
        clock.advance(0)
        self.assertEqual((len(client.posts), notifier.failed, notifier.retries), (1, 1, 0))
        self.assertEqual(clock.getDelayedCalls(), [])
        text = log.everything()
        self.assertIn("HTTP 404", text)
        self.assertIn("Unknown Webhook …", text)  # the body is shown, scrubbed
        self.assertNotIn(JSON_TOKEN, text)

    def test_timeout_cancels_the_attempt(self) -> None:
        hanging: defer.Deferred = defer.Deferred()
        client = FakeClient(hanging)
        clock, notifier = notifier_with(client, timeout=5.0)
        notifier.observe("tiverton", "daily", "p", 0.5, DETAILS)
        clock.advance(0)
        self.assertEqual(notifier.in_flight, 1)
        clock.advance(5.0)
        self.assertTrue(hanging.called)  # cancelled
        self.assertEqual((notifier.in_flight, notifier.pending, notifier.retries), (0, 1, 1))
        clock.advance(1.0)
        self.assertEqual((notifier.sent, notifier.pending), (1, 0))

    def test_queue_is_bounded(self) -> None:
        client = FakeClient()
        clock, notifier = notifier_with(client, max_pending=2)
        for agent in "abc":
            notifier.observe(agent, "daily", "p", 0.5, DETAILS)
        self.assertEqual((notifier.pending, notifier.dropped), (2, 1))
        clock.advance(0)
        self.assertEqual(notifier.sent, 2)

    def test_stop_cancels_retries_and_later_alerts_are_dropped(self) -> None:
        client = FakeClient(FakeResponse(503))
        clock, notifier = notifier_with(client)
        notifier.startService()
        notifier.observe("tiverton", "daily", "p", 0.5, DETAILS)
        clock.advance(0)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        d = notifier.stopService()
        self.assertEqual(self.successResultOf(d), None)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual((notifier.dropped, notifier.pending), (1, 0))
        notifier.observe("tiverton", "daily", "p", 0.9, DETAILS)
        self.assertEqual((notifier.dropped, notifier.pending), (2, 0))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_waits_for_attempts_in_flight_then_cancels_them(self) -> None:
        slow: defer.Deferred = defer.Deferred()
        clock, notifier = notifier_with(FakeClient(slow, FakeResponse(200)), stop_grace=2.0)
        notifier.startService()
        notifier.observe("tiverton", "daily", "p", 0.5, DETAILS)
        clock.advance(0)
        d = notifier.stopService()
        self.assertNoResult(d)
        clock.advance(2.0)
        self.successResultOf(d)
        self.assertEqual((notifier.pending, notifier.dropped, notifier.sent), (0, 1, 0))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_lets_a_quick_attempt_finish(self) -> None:
        slow: defer.Deferred = defer.Deferred()
        clock, notifier = notifier_with(FakeClient(slow))
        notifier.startService()
        notifier.observe("tiverton", "daily", "p", 0.5, DETAILS)
        clock.advance(0)
        d = notifier.stopService()
        slow.callback(FakeResponse(200))
        self.successResultOf(d)
        self.assertEqual(notifier.sent, 1)
        self.assertEqual(clock.getDelayedCalls(), [])


class BudgetObservationTests(SynchronousTestCase):
    def test_calendar_period(self) -> None:
        clock = Clock()
        clock.advance(START + 10 * 3600)
        book = BudgetBook(clock)
        budget = parse_budget({"limit_usd": 10, "period": "daily", "behavior": "soft_alert"})
        held = book.reserve("tiverton", budget, 9.0)
        book.settle(held, 8.04)
        label, key, fraction, details = budget_observation(budget, book.usage("tiverton", budget))
        self.assertEqual(label, "daily")
        self.assertAlmostEqual(fraction, 0.804)
        self.assertEqual(
            details,
            {"behavior": "soft_alert", "period_start": START, "period_end": START + DAY,
             "spent_usd": 8.04, "limit_usd": 10.0, "requests": 1, "max_requests": None},
        )
        clock.advance(DAY)
        _, next_key, fraction, _ = budget_observation(budget, book.usage("tiverton", budget))
        self.assertNotEqual(next_key, key)
        self.assertEqual(fraction, 0.0)
        # A changed limit re-arms the thresholds.
        changed = parse_budget({"limit_usd": 20, "period": "daily", "behavior": "soft_alert"})
        self.assertNotEqual(budget_observation(changed, book.usage("tiverton", changed))[1], next_key)

    def test_rolling_window_and_request_limit(self) -> None:
        clock = Clock()
        clock.advance(START + 3600)
        book = BudgetBook(clock)
        budget = parse_budget({"max_requests": 10, "limit_usd": 100, "window": "24h"})
        for _ in range(9):
            book.settle(book.reserve("allen", budget, 0.01), 0.01)
        label, key, fraction, details = budget_observation(budget, book.usage("allen", budget))
        self.assertEqual(label, "24h")
        self.assertAlmostEqual(fraction, 0.9)  # the request limit is the nearer one
        self.assertEqual(details["period_start"], START + 3600 - DAY)
        self.assertNotIn("period_end", details)
        clock.advance(3600)
        self.assertEqual(budget_observation(budget, book.usage("allen", budget))[1], key)
        clock.advance(DAY)  # the next aligned span
        self.assertNotEqual(budget_observation(budget, book.usage("allen", budget))[1], key)

    def test_observe_usage(self) -> None:
        clock = Clock()
        clock.advance(START + 10 * 3600)
        book = BudgetBook(clock)
        budget = parse_budget({"limit_usd": 10, "period": "daily"})
        book.settle(book.reserve("tiverton", budget, 9.0), 8.04)
        client = FakeClient()
        notifier = AlertNotifier(clock, client, [Webhook("https://a.example/x")])
        self.assertEqual(notifier.observe_usage("tiverton", budget, book.usage("tiverton", budget)), (0.5, 0.8))
        self.assertEqual(notifier.observe_usage("tiverton", None, None), ())
        self.assertEqual(notifier.errors, 1)
        self.flushLoggedErrors(AttributeError)
        clock.advance(0)
        self.assertEqual(client.posts[1][1], fields_for(0.8, behavior="hard_stop", requests=1))


# --------------------------------------------------------------------------
# Over loopback: a real webhook receiver and a real treq client


class Receiver(resource.Resource):
    """
    Records each POST; answers with the next scripted C{(status, headers)}
    (200 when the script is empty), or never (C{"hang"}).
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[tuple[str, dict, bytes]] = []
        self.script: list = []
        self.hanging: list = []
        self._arrivals: list[tuple[int, defer.Deferred]] = []

    def arrived(self, count: int) -> defer.Deferred:
        """Fires once C{count} requests have arrived."""
        d: defer.Deferred = defer.Deferred()
        self._arrivals.append((count, d))
        self._fire()
        return d

    def _fire(self) -> None:
        ready = [(n, d) for n, d in self._arrivals if len(self.received) >= n]
        for item in ready:
            self._arrivals.remove(item)
            item[1].callback(None)

    def render_POST(self, request):
        headers = {k.decode().lower(): [v.decode() for v in vs] for k, vs in request.requestHeaders.getAllRawHeaders()}
        self.received.append((request.path.decode(), headers, request.content.read()))
        reactor.callLater(0, self._fire)
        answer = self.script.pop(0) if self.script else (200, {})
        if answer == "hang":
            self.hanging.append(request)
            return server.NOT_DONE_YET
        status, extra = answer
        request.setResponseCode(status)
        for name, value in extra.items():
            request.setHeader(name, value)
        return b"ok" if status < 300 else b"invalid_token"

    def bodies(self) -> list:
        return [json.loads(body) for _, _, body in self.received]


class TrackingSite(server.Site):
    """Remembers when each server-side connection closes, for a clean cleanup; keeps no access log."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.closed: list[defer.Deferred] = []

    def log(self, request) -> None:
        """No access log: its request lines hold the webhook tokens."""

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        closed: defer.Deferred = defer.Deferred()
        self.closed.append(closed)
        original = protocol.connectionLost

        def connectionLost(reason):
            try:
                original(reason)
            finally:
                closed.callback(None)

        protocol.connectionLost = connectionLost
        return protocol


class LoopbackTests(TestCase):
    def setUp(self) -> None:
        self.receiver = Receiver()
        site = TrackingSite(self.receiver)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.client = HTTPClient(Agent(reactor, pool=self.pool))
        self.log = AlertLog(self)

        async def cleanup() -> None:
            await self.pool.closeCachedConnections()
            await defer.gatherResults(site.closed)
            await self.port.stopListening()

        self.addCleanup(lambda: defer.Deferred.fromCoroutine(cleanup()))

    def notifier(self, webhooks, clock=None, **kwargs) -> AlertNotifier:
        kwargs.setdefault("random", lambda: 0.0)
        notifier = AlertNotifier(clock or reactor, self.client, webhooks, **kwargs)
        notifier.startService()
        self.addCleanup(notifier.stopService)
        return notifier

    async def test_each_body_kind_over_http(self) -> None:
        webhooks = parse_webhooks(
            f"{self.base}/hook/{JSON_TOKEN},"
            f"slack:{self.base}/services/{SLACK_TOKEN},"
            f"discord:{self.base}/api/webhooks/{DISCORD_TOKEN}"
        )
        notifier = self.notifier(webhooks, pod="prod")
        self.assertEqual(notifier.observe("tiverton", "daily", "p1", 0.81, DETAILS), (0.5, 0.8))
        await notifier.when_drained()
        self.assertEqual((notifier.sent, notifier.failed, len(self.receiver.received)), (6, 0, 6))
        by_path: dict = {}
        for path, headers, body in self.receiver.received:
            self.assertEqual(headers["content-type"], ["application/json"])
            by_path.setdefault(path, []).append(json.loads(body))
        # Each threshold is its own POST on its own connection: they may arrive in either order.
        generic = sorted(by_path[f"/hook/{JSON_TOKEN}"], key=lambda b: b["threshold"])
        self.assertEqual([b["threshold"] for b in generic], [0.5, 0.8])
        body = generic[1]
        self.assertRegex(body.pop("ts"), r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
        expected = fields_for(0.8, pod="prod")
        del expected["ts"]
        self.assertEqual(body, expected)
        text = "cllama_tx (pod prod): agent tiverton reached 80% of its $10.00 daily budget ($8.04 spent)"
        slack, discord = by_path[f"/services/{SLACK_TOKEN}"], by_path[f"/api/webhooks/{DISCORD_TOKEN}"]
        self.assertEqual(len(slack), 2)
        self.assertIn({"text": text}, slack)
        self.assertEqual(len(discord), 2)
        self.assertIn({"content": text, "allowed_mentions": {"parse": []}}, discord)
        everything = self.log.everything()
        for secret in (JSON_TOKEN, SLACK_TOKEN, DISCORD_TOKEN, "slacksecret4242xyz"):
            self.assertNotIn(secret, everything)
        self.assertIn(f"delivered to {self.base}/…", everything)

    async def test_once_per_threshold_per_period_over_http(self) -> None:
        notifier = self.notifier([Webhook(f"{self.base}/hook/{JSON_TOKEN}")])
        notifier.observe("tiverton", "daily", "p1", 0.5, DETAILS)
        notifier.observe("tiverton", "daily", "p1", 0.9, DETAILS)
        notifier.observe("tiverton", "daily", "p1", 0.95, DETAILS)
        await notifier.when_drained()
        self.assertEqual(sorted(b["threshold"] for b in self.receiver.bodies()), [0.5, 0.8])
        notifier.observe("tiverton", "daily", "p2", 0.9, DETAILS)
        await notifier.when_drained()
        self.assertEqual(sorted(b["threshold"] for b in self.receiver.bodies()), [0.5, 0.5, 0.8, 0.8])
        self.assertEqual(notifier.sent, 4)

    async def test_retries_with_backoff_then_succeeds(self) -> None:
        clock = Clock()
        self.receiver.script = [(500, {}), (502, {}), (200, {})]
        notifier = self.notifier([Webhook(f"{self.base}/hook/{JSON_TOKEN}")], clock=clock, base_delay=1.5)
        notifier.observe("tiverton", "daily", "p1", 0.5, DETAILS)
        delays = []
        clock.advance(0)
        while notifier.pending:
            await notifier.when_quiet()
            calls = clock.getDelayedCalls()
            if not calls:
                break
            (call,) = calls
            delays.append(call.getTime() - clock.seconds())
            clock.advance(delays[-1])
        self.assertEqual(delays, [1.5, 3.0])
        self.assertEqual((notifier.sent, notifier.retries, notifier.failed), (1, 2, 0))
        bodies = self.receiver.bodies()
        self.assertEqual(len(bodies), 3)
        self.assertTrue(all(b == bodies[0] for b in bodies))  # the same notification each time
        warnings = [t for t in self.log.texts() if "failed (attempt" in t]
        self.assertEqual(len(warnings), 2)
        self.assertIn(f"to {self.base}/… failed (attempt 1 of 5): HTTP 500 'invalid_token'; retrying in 1.5 s", warnings[0])

    async def test_gives_up_after_max_attempts_and_logs_without_the_token(self) -> None:
        clock = Clock()
        self.receiver.script = [(503, {})] * 3
        url = f"{self.base}/services/{SLACK_TOKEN}?token={JSON_TOKEN}"
        notifier = self.notifier([Webhook(url, "slack")], clock=clock, max_attempts=3)
        notifier.observe("tiverton", "daily", "p1", 0.5, DETAILS)
        clock.advance(0)
        while notifier.pending:
            await notifier.when_quiet()
            for call in clock.getDelayedCalls():
                clock.advance(call.getTime() - clock.seconds())
        self.assertEqual((notifier.sent, notifier.failed, notifier.retries), (0, 1, 2))
        self.assertEqual(len(self.receiver.received), 3)
        self.assertEqual(clock.getDelayedCalls(), [])
        texts = self.log.texts()
        final = [t for t in texts if "not delivered" in t]
        self.assertEqual(len(final), 1)
        self.assertIn(f"not delivered to {self.base}/… after 3 attempt(s): HTTP 503", final[0])
        everything = self.log.everything()
        for secret in (SLACK_TOKEN, JSON_TOKEN, "slacksecret4242xyz", "/services/"):
            self.assertNotIn(secret, everything)

    async def test_honours_retry_after_on_429(self) -> None:
        clock = Clock()
        self.receiver.script = [(429, {"Retry-After": "12"}), (200, {})]
        notifier = self.notifier([Webhook(f"{self.base}/hook/{JSON_TOKEN}")], clock=clock)
        notifier.observe("tiverton", "daily", "p1", 0.5, DETAILS)
        clock.advance(0)
        await notifier.when_quiet()
        (call,) = clock.getDelayedCalls()
        self.assertEqual(call.getTime() - clock.seconds(), 12.0)
        clock.advance(11.9)
        self.assertEqual(len(self.receiver.received), 1)
        clock.advance(0.1)
        await notifier.when_drained()
        self.assertEqual((notifier.sent, len(self.receiver.received)), (1, 2))

    async def test_connection_refused_is_retried_then_given_up(self) -> None:
        # A port nobody listens on: bind one, note it, close it.
        spare = reactor.listenTCP(0, server.Site(resource.Resource()), interface="127.0.0.1")
        dead = spare.getHost().port
        await spare.stopListening()
        clock = Clock()
        url = f"http://127.0.0.1:{dead}/hook/{JSON_TOKEN}"
        notifier = self.notifier([Webhook(url)], clock=clock, max_attempts=2)
        notifier.observe("tiverton", "daily", "p1", 0.5, DETAILS)
        clock.advance(0)
        while notifier.pending:
            await notifier.when_quiet()
            for call in clock.getDelayedCalls():
                clock.advance(call.getTime() - clock.seconds())
        self.assertEqual((notifier.failed, notifier.retries), (1, 1))
        final = [t for t in self.log.texts() if "not delivered" in t]
        self.assertIn(f"to http://127.0.0.1:{dead}/… after 2 attempt(s): ", final[0])
        self.assertIn("Connect", final[0])
        self.assertNotIn(JSON_TOKEN, self.log.everything())

    async def test_a_hanging_webhook_times_out_and_is_retried(self) -> None:
        clock = Clock()
        self.receiver.script = ["hang", (200, {})]
        notifier = self.notifier([Webhook(f"{self.base}/hook/{JSON_TOKEN}")], clock=clock, timeout=4.0)
        notifier.observe("tiverton", "daily", "p1", 0.5, DETAILS)
        clock.advance(0)
        await self.receiver.arrived(1)
        self.assertEqual(len(self.receiver.hanging), 1)
        self.assertEqual(notifier.in_flight, 1)
        clock.advance(4.0)
        self.assertEqual((notifier.in_flight, notifier.retries), (0, 1))
        self.assertIn("timed out after 4 s", " ".join(self.log.texts()))
        clock.advance(1.0)
        await notifier.when_drained()
        self.assertEqual((notifier.sent, len(self.receiver.received)), (1, 2))

    async def test_stop_cancels_pending_retries(self) -> None:
        clock = Clock()
        self.receiver.script = [(500, {})]
        notifier = self.notifier([Webhook(f"{self.base}/hook/{JSON_TOKEN}")], clock=clock)
        notifier.observe("tiverton", "daily", "p1", 0.5, DETAILS)
        clock.advance(0)
        await notifier.when_quiet()
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        await notifier.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual((notifier.dropped, notifier.pending, len(self.receiver.received)), (1, 0, 1))
