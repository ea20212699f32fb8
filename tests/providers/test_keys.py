"""
Tests for L{cllama_tx.providers.keys}.
"""

from __future__ import annotations

import json
from email.utils import formatdate

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.providers.keys import (
    KEYLESS,
    MAX_TRIES,
    KeyPool,
    UnknownKey,
    Verdict,
    classify_failure,
    mask_secret,
    parse_retry_after,
)
from cllama_tx.providers.store import KeyRecord

NOW = 1767323045.0
SECRETS = {
    "a": "sk-aaaa-0000000000000000-wxyz",
    "b": "sk-bbbb-1111111111111111-wxyz",
    "c": "sk-cccc-2222222222222222-wxyz",
}


class ClassifyTests(SynchronousTestCase):
    def test_401_suspect(self):
        """A 401 alone does not condemn a key: it may be about the request."""
        self.assertEqual(
            classify_failure(401, None, b'{"error":"invalid key"}'),
            Verdict("suspect", "unauthorized", None, 401),
        )

    def test_402_dead(self):
        verdict = classify_failure(402, None, b"Insufficient credits")
        self.assertEqual((verdict.action, verdict.status), ("dead", 402))

    def test_429_quota_dead(self):
        bodies = [
            b'{"error":{"code":"insufficient_quota","message":"You exceeded your current quota"}}',
            b'{"error":{"message":"Monthly QUOTA exceeded"}}',
            b'{"error":{"message":"Your billing account is suspended"}}',
            b'{"error":{"message":"You have used all available Credits"}}',
        ]
        for body in bodies:
            verdict = classify_failure(429, None, body)
            self.assertEqual(verdict, Verdict("dead", "quota exhausted", None, 429), body)

    def test_insufficient_quota_dead_even_with_retry_after(self):
        verdict = classify_failure(429, b"5", b'{"error":{"code":"insufficient_quota"}}')
        self.assertEqual(verdict.action, "dead")

    def test_429_quota_with_retry_hint_cools_down(self):
        """
        Gemini's per-minute limit mentions quota and billing but says when to
        retry: a rate limit, not a spent key.
        """
        body = (
            b'{"error":{"code":429,"message":"You exceeded your current quota, please '
            b"check your plan and billing details. Please retry in 38.7s.\","
            b'"status":"RESOURCE_EXHAUSTED"}}'
        )
        self.assertEqual(classify_failure(429, None, body).action, "cooldown")
        self.assertEqual(
            classify_failure(429, b"7", b'{"error":"quota exceeded"}'),
            Verdict("cooldown", "rate limited", 7, 429),
        )

    def test_429_retry_after_seconds(self):
        self.assertEqual(
            classify_failure(429, b"5", b"slow down"),
            Verdict("cooldown", "rate limited", 5, 429),
        )

    def test_429_default(self):
        self.assertEqual(classify_failure(429, None, b"").cooldown_seconds, 10)
        self.assertEqual(classify_failure(429, b"soon", b"").cooldown_seconds, 10)

    def test_429_capped(self):
        self.assertEqual(classify_failure(429, b"3600", b"").cooldown_seconds, 60)

    def test_429_at_least_one_second(self):
        self.assertEqual(classify_failure(429, b"0", b"").cooldown_seconds, 1)
        self.assertEqual(classify_failure(429, b"0.2", b"").cooldown_seconds, 1)

    def test_429_http_date(self):
        date = formatdate(NOW + 30, usegmt=True).encode()
        self.assertEqual(classify_failure(429, date, b"", now=NOW).cooldown_seconds, 30)
        past = formatdate(NOW - 30, usegmt=True).encode()
        self.assertEqual(classify_failure(429, past, b"", now=NOW).cooldown_seconds, 1)

    def test_parse_retry_after(self):
        self.assertEqual(parse_retry_after(b"12", NOW), 12)
        self.assertEqual(parse_retry_after(b"Fri, 02 Jan 2026 03:04:35 GMT", 1767323045.0), 30)
        self.assertIsNone(parse_retry_after(None, NOW))
        self.assertIsNone(parse_retry_after(b"", NOW))
        self.assertIsNone(parse_retry_after(b"nan", NOW))
        self.assertIsNone(parse_retry_after(b"whenever", NOW))

    def test_not_key_problems(self):
        for status in (200, 400, 403, 404, 408, 413, 500, 502, 503, 529):
            self.assertIsNone(classify_failure(status, b"5", b"quota billing"), status)

    def test_max_tries(self):
        self.assertEqual(MAX_TRIES, 5)


class MaskTests(SynchronousTestCase):
    def test_long(self):
        self.assertEqual(mask_secret("sk-abcdefghijklmnopqrstuvwxyz"), "sk-a…wxyz")

    def test_short_fully_masked(self):
        for secret in ("sk-12345", "sk-123456789abc", "x"):
            masked = mask_secret(secret)
            self.assertEqual(masked, "…" * 4)

    def test_empty(self):
        self.assertEqual(mask_secret(""), "")


def _keys(*names, **states):
    return [
        KeyRecord(id=name, label=f"label {name}", secret=SECRETS[name], state=states.get(name, "ready"))
        for name in names
    ]


class PoolTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.events = []
        self.dirty = []

    def pool(self, keys, active=None, keyless=False):
        return KeyPool(
            "openai",
            keys,
            self.clock,
            active_key_id=active,
            keyless=keyless,
            on_change=self.events.append,
            on_dirty=lambda: self.dirty.append(True),
        )

    def assertNoSecrets(self, thing):
        text = json.dumps(thing, ensure_ascii=False)
        for secret in SECRETS.values():
            self.assertNotIn(secret, text)
            self.assertNotIn(secret[5:-5], text)


class AcquireTests(PoolTestCase):
    def test_active_first(self):
        pool = self.pool(_keys("a", "b", "c"), active="b")
        self.assertEqual(pool.acquire(set()).id, "b")

    def test_default_active_is_first(self):
        pool = self.pool(_keys("a", "b"))
        self.assertEqual(pool.active_key_id, "a")
        self.assertEqual(pool.acquire().id, "a")

    def test_unknown_active_falls_back_to_first(self):
        pool = self.pool(_keys("a", "b"), active="gone")
        self.assertEqual(pool.active_key_id, "a")

    def test_next_in_order_after_active(self):
        pool = self.pool(_keys("a", "b", "c"), active="b")
        self.assertEqual(pool.acquire({"b"}).id, "c")
        self.assertEqual(pool.acquire({"b", "c"}).id, "a")
        self.assertIsNone(pool.acquire({"a", "b", "c"}))

    def test_skips_dead_and_disabled(self):
        pool = self.pool(_keys("a", "b", "c", a="dead", b="disabled"))
        self.assertEqual(pool.acquire().id, "c")
        self.assertIsNone(pool.acquire({"c"}))

    def test_empty(self):
        self.assertIsNone(self.pool([]).acquire())

    def test_keyless(self):
        pool = self.pool([], keyless=True)
        self.assertIs(pool.acquire(), KEYLESS)
        self.assertIs(pool.acquire({"keyless"}), KEYLESS)
        self.assertFalse(pool.report(KEYLESS, Verdict("cooldown", "rate limited", 10, 429)))
        self.assertEqual(KEYLESS.state, "ready")
        self.assertEqual(self.events, [])
        self.assertIsNone(pool.retry_after())

    def test_failover_sequence(self):
        """A caller's loop: try, report, exclude, try the next."""
        pool = self.pool(_keys("a", "b", "c"))
        tried = set()
        results = {"a": (401, None, b""), "b": (429, b"5", b""), "c": None}
        for _ in range(MAX_TRIES):
            key = pool.acquire(tried)
            self.assertIsNotNone(key)
            outcome = results[key.id]
            if outcome is None:
                break
            pool.report(key, classify_failure(*outcome))
            if pool.is_suspect(key):
                pool.recheck(key)  # no re-checker: the 401 stands
            tried.add(key.id)
        self.assertEqual(key.id, "c")
        self.assertEqual(
            [(k.id, k.state) for k in pool.keys],
            [("a", "dead"), ("b", "cooldown"), ("c", "ready")],
        )


class ReportTests(PoolTestCase):
    def test_401_suspect_then_dead_without_a_rechecker(self):
        pool = self.pool(_keys("a", "b"))
        key = pool.acquire()
        self.assertTrue(pool.report(key, classify_failure(401, None, b"")))
        self.assertEqual(key.state, "suspect")
        self.assertTrue(pool.is_suspect(key))
        self.assertEqual(key.last_error_code, 401)
        self.assertEqual(key.last_error_reason, "unauthorized")
        self.assertEqual(key.last_error_at, NOW)
        self.assertEqual(pool.acquire().id, "b")
        self.assertIsNone(pool.checks_pending())
        self.assertEqual(self.successResultOf(pool.recheck(key)), "invalid")
        self.assertEqual(key.state, "dead")
        self.assertEqual(
            self.events,
            [
                {
                    "provider": "openai",
                    "key_id": "a",
                    "action": "suspect",
                    "reason": "unauthorized: re-checking the key",
                    "cooldown_until": None,
                },
                {
                    "provider": "openai",
                    "key_id": "a",
                    "action": "dead",
                    "reason": "unauthorized: re-check confirmed (no re-check available)",
                    "cooldown_until": None,
                },
            ],
        )
        self.assertTrue(self.dirty)

    def test_402_dead(self):
        pool = self.pool(_keys("a"))
        pool.report(pool.acquire(), classify_failure(402, None, b""))
        self.assertEqual(pool.keys[0].state, "dead")
        self.assertIsNone(pool.acquire())

    def test_429_quota_dead(self):
        pool = self.pool(_keys("a"))
        pool.report(pool.acquire(), classify_failure(429, None, b'{"code":"insufficient_quota"}'))
        self.assertEqual(pool.keys[0].state, "dead")

    def test_cooldown_and_expiry(self):
        pool = self.pool(_keys("a", "b"))
        a = pool.acquire()
        pool.report(a, classify_failure(429, b"5", b""))
        self.assertEqual((a.state, a.cooldown_until), ("cooldown", NOW + 5))
        self.assertEqual(
            self.events[-1],
            {
                "provider": "openai",
                "key_id": "a",
                "action": "cooldown",
                "reason": "rate limited",
                "cooldown_until": "2026-01-02T03:04:10.000Z",
            },
        )
        self.assertEqual(pool.acquire().id, "b")
        self.clock.advance(4.9)
        self.assertEqual(pool.acquire().id, "b")
        self.clock.advance(0.1)
        self.assertEqual(pool.acquire().id, "a")
        self.assertEqual((a.state, a.cooldown_until), ("ready", None))
        self.assertEqual(self.events[-1]["action"], "ready")
        self.assertEqual(self.events[-1]["key_id"], "a")

    def test_default_cooldown_10s(self):
        pool = self.pool(_keys("a"))
        pool.report(pool.acquire(), classify_failure(429, None, b""))
        self.assertIsNone(pool.acquire())
        self.clock.advance(9.5)
        self.assertIsNone(pool.acquire())
        self.clock.advance(0.5)
        self.assertEqual(pool.acquire().id, "a")

    def test_capped_cooldown_60s(self):
        pool = self.pool(_keys("a"))
        pool.report(pool.acquire(), classify_failure(429, b"86400", b""))
        self.assertEqual(pool.retry_after(), 60)
        self.clock.advance(60)
        self.assertEqual(pool.acquire().id, "a")

    def test_cooldown_only_extends(self):
        pool = self.pool(_keys("a"))
        a = pool.keys[0]
        pool.report(a, Verdict("cooldown", "rate limited", 30, 429))
        pool.report(a, Verdict("cooldown", "rate limited", 5, 429))
        self.assertEqual(a.cooldown_until, NOW + 30)
        self.assertEqual([e["action"] for e in self.events], ["cooldown"])

    def test_dead_stays_dead(self):
        pool = self.pool(_keys("a"))
        a = pool.keys[0]
        pool.report(a, Verdict("dead", "unauthorized", None, 401))
        pool.report(a, Verdict("cooldown", "rate limited", 5, 429))
        self.assertEqual(a.state, "dead")
        self.assertEqual(a.last_error_code, 429)
        self.assertEqual([e["action"] for e in self.events], ["dead"])

    def test_disabled_stays_disabled(self):
        pool = self.pool(_keys("a", a="disabled"))
        pool.report(pool.keys[0], Verdict("dead", "unauthorized", None, 401))
        self.assertEqual(pool.keys[0].state, "disabled")

    def test_report_says_whether_to_try_another_key(self):
        pool = self.pool(_keys("a", "b"))
        self.assertTrue(pool.report(pool.keys[0], Verdict("dead", "unauthorized", None, 401)))
        self.assertTrue(pool.report(pool.keys[1], Verdict("cooldown", "rate limited", 5, 429)))

    def test_none_verdict_ignored(self):
        pool = self.pool(_keys("a"))
        self.assertFalse(pool.report(pool.keys[0], None))
        self.assertEqual((pool.keys[0].state, self.events, self.dirty), ("ready", [], []))

    def test_deleted_key_report_ignored(self):
        pool = self.pool(_keys("a", "b"))
        a = pool.acquire()
        pool.delete("a")
        del self.events[:]
        pool.report(a, Verdict("dead", "unauthorized", None, 401))
        self.assertEqual(self.events, [])

    def test_events_never_contain_secrets(self):
        pool = self.pool(_keys("a", "b", "c"))
        pool.report(pool.keys[0], Verdict("dead", "unauthorized", None, 401))
        pool.report(pool.keys[1], Verdict("cooldown", "rate limited", 5, 429))
        self.clock.advance(5)
        pool.acquire({"c"})
        pool.add(KeyRecord(id="d", label=None, secret="sk-dddd-3333333333333333-wxyz"))
        pool.activate("a")
        pool.disable("b")
        pool.delete("d")
        self.assertEqual(
            [e["action"] for e in self.events],
            ["dead", "cooldown", "ready", "added", "activated", "disabled", "deleted"],
        )
        for event in self.events:
            self.assertEqual(
                set(event), {"provider", "key_id", "action", "reason", "cooldown_until"}
            )
        self.assertNoSecrets(self.events)
        self.assertNotIn("sk-dddd", json.dumps(self.events))


class RetryAfterTests(PoolTestCase):
    def test_earliest_cooldown(self):
        pool = self.pool(_keys("a", "b", "c", c="dead"))
        pool.report(pool.keys[0], Verdict("cooldown", "rate limited", 20, 429))
        pool.report(pool.keys[1], Verdict("cooldown", "rate limited", 5, 429))
        self.assertEqual(pool.retry_after(), 5)
        self.clock.advance(3.5)
        self.assertEqual(pool.retry_after(), 2)

    def test_all_dead_or_disabled(self):
        pool = self.pool(_keys("a", "b", a="dead", b="disabled"))
        self.assertIsNone(pool.retry_after())
        self.assertIsNone(self.pool([]).retry_after())

    def test_ready_key(self):
        pool = self.pool(_keys("a"))
        self.assertEqual(pool.retry_after(), 1)


class ManagementTests(PoolTestCase):
    def test_add(self):
        pool = self.pool([])
        self.assertIsNone(pool.active_key_id)
        self.assertEqual(pool.enabled_count, 0)
        pool.add(_keys("a")[0])
        self.assertEqual(pool.active_key_id, "a")
        self.assertEqual(pool.enabled_count, 1)
        pool.add(_keys("b")[0])
        self.assertEqual(pool.active_key_id, "a")
        self.assertEqual([k.id for k in pool.keys], ["a", "b"])

    def test_add_duplicates_refused_without_echo(self):
        pool = self.pool(_keys("a"))
        with self.assertRaises(ValueError):
            pool.add(KeyRecord(id="a", label=None, secret="sk-other"))
        with self.assertRaises(ValueError) as caught:
            pool.add(KeyRecord(id="z", label=None, secret=SECRETS["a"]))
        self.assertNotIn(SECRETS["a"], str(caught.exception))
        self.assertEqual(len(pool.keys), 1)

    def test_activate(self):
        pool = self.pool(_keys("a", "b", b="dead"))
        pool.activate("b")
        self.assertEqual(pool.active_key_id, "b")
        self.assertEqual(pool.keys[1].state, "ready")
        self.assertEqual(pool.acquire().id, "b")

    def test_disable(self):
        pool = self.pool(_keys("a", "b"))
        pool.disable("a")
        self.assertEqual(pool.keys[0].state, "disabled")
        self.assertEqual(pool.enabled_count, 1)
        self.assertEqual(pool.acquire().id, "b")

    def test_delete(self):
        pool = self.pool(_keys("a", "b"))
        pool.delete("a")
        self.assertEqual([k.id for k in pool.keys], ["b"])
        self.assertEqual(pool.active_key_id, "b")
        pool.delete("b")
        self.assertIsNone(pool.active_key_id)
        self.assertIsNone(pool.acquire())

    def test_unknown_key(self):
        pool = self.pool(_keys("a"))
        for operation in (pool.activate, pool.disable, pool.delete):
            with self.assertRaises(UnknownKey):
                operation("nope")

    def test_snapshot_masks(self):
        pool = self.pool(_keys("a", "b"))
        pool.report(pool.keys[1], Verdict("cooldown", "rate limited", 5, 429))
        snapshot = pool.snapshot()
        self.assertNoSecrets(snapshot)
        self.assertEqual(snapshot["active_key_id"], "a")
        a, b = snapshot["keys"]
        self.assertEqual(a["masked_secret"], "sk-a…wxyz")
        self.assertTrue(a["active"])
        self.assertEqual(b["state"], "cooldown")
        self.assertEqual(b["cooldown_until"], "2026-01-02T03:04:10.000Z")
        self.assertEqual(b["last_error_code"], 429)
        self.assertEqual(b["last_error_reason"], "rate limited")
        self.assertEqual(b["last_error_at"], "2026-01-02T03:04:05.000Z")

    def test_repr_has_no_secret(self):
        pool = self.pool(_keys("a"))
        self.assertNoSecrets(repr(pool))
        self.assertNoSecrets(repr(pool.keys))


class PerModelCooldownTests(PoolTestCase):
    """Providers that limit each model separately: a 429 cools one model."""

    def pool(self, keys, per_model=True, **kwargs):
        pool = super().pool(keys, **kwargs)
        pool.per_model = per_model
        return pool

    def test_a_429_for_one_model_leaves_the_others(self):
        pool = self.pool(_keys("a"))
        a = pool.acquire(set(), "gpt-4o")
        self.assertTrue(pool.report(a, classify_failure(429, b"20", b"Rate limit reached for gpt-4o"), "gpt-4o"))
        self.assertEqual(a.state, "ready")
        self.assertEqual(a.model_cooldowns, {"gpt-4o": NOW + 20})
        self.assertIsNone(pool.acquire(set(), "gpt-4o"))
        self.assertIs(pool.acquire(set(), "gpt-4o-mini"), a)
        self.assertIs(pool.acquire(), a)
        self.assertEqual(pool.retry_after("gpt-4o"), 20)
        self.assertEqual(pool.retry_after("gpt-4o-mini"), 1)
        self.assertEqual(
            self.events,
            [
                {
                    "provider": "openai",
                    "key_id": "a",
                    "action": "cooldown",
                    "reason": "rate limited",
                    "cooldown_until": "2026-01-02T03:04:25.000Z",
                    "model": "gpt-4o",
                }
            ],
        )
        self.clock.advance(20)
        self.assertIs(pool.acquire(set(), "gpt-4o"), a)
        self.assertEqual(a.model_cooldowns, {})
        self.assertEqual(self.events[-1]["action"], "ready")
        self.assertEqual(self.events[-1]["model"], "gpt-4o")

    def test_other_keys_serve_the_cooled_model(self):
        pool = self.pool(_keys("a", "b"))
        pool.report(pool.keys[0], Verdict("cooldown", "rate limited", 30, 429), "gpt-4o")
        self.assertEqual(pool.acquire(set(), "gpt-4o").id, "b")
        self.assertEqual(pool.acquire(set(), "o3").id, "a")
        pool.report(pool.keys[1], Verdict("cooldown", "rate limited", 5, 429), "gpt-4o")
        self.assertIsNone(pool.acquire(set(), "gpt-4o"))
        self.assertEqual(pool.retry_after("gpt-4o"), 5)

    def test_model_cooldown_only_extends(self):
        pool = self.pool(_keys("a"))
        a = pool.keys[0]
        pool.report(a, Verdict("cooldown", "rate limited", 30, 429), "m")
        pool.report(a, Verdict("cooldown", "rate limited", 5, 429), "m")
        self.assertEqual(a.model_cooldowns, {"m": NOW + 30})
        self.assertEqual([e["action"] for e in self.events], ["cooldown"])

    def test_quota_exhaustion_is_still_the_whole_key(self):
        pool = self.pool(_keys("a"))
        a = pool.keys[0]
        pool.report(a, classify_failure(429, None, b'{"error":{"code":"insufficient_quota"}}'), "gpt-4o")
        self.assertEqual(a.state, "dead")
        self.assertIsNone(pool.acquire(set(), "o3"))

    def test_per_key_providers_cool_the_whole_key(self):
        pool = self.pool(_keys("a"), per_model=False)
        a = pool.keys[0]
        pool.report(a, Verdict("cooldown", "rate limited", 10, 429), "gpt-4o")
        self.assertEqual((a.state, a.model_cooldowns), ("cooldown", {}))
        self.assertIsNone(pool.acquire(set(), "o3"))
        self.assertNotIn("model", self.events[-1])

    def test_a_dead_key_forgets_its_model_cooldowns(self):
        pool = self.pool(_keys("a"))
        a = pool.keys[0]
        pool.report(a, Verdict("cooldown", "rate limited", 30, 429), "m")
        pool.report(a, Verdict("dead", "payment required", None, 402))
        pool.activate("a")
        self.assertEqual(a.model_cooldowns, {})
        self.assertIs(pool.acquire(set(), "m"), a)

    def test_snapshot_lists_model_cooldowns(self):
        pool = self.pool(_keys("a"))
        pool.report(pool.keys[0], Verdict("cooldown", "rate limited", 30, 429), "gpt-4o")
        [key] = pool.snapshot()["keys"]
        self.assertEqual(key["state"], "ready")
        self.assertEqual(key["model_cooldowns"], [{"model": "gpt-4o", "until": "2026-01-02T03:04:35.000Z"}])
        self.clock.advance(30)
        self.assertEqual(pool.snapshot()["keys"][0]["model_cooldowns"], [])
