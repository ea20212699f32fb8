"""
Tests for key health (L{cllama_tx.providers.health} with the pool's
transitions in L{cllama_tx.providers.keys}): a 401 makes a key suspect, a
re-check decides, dead keys are re-probed with backoff and come back.
Time is a L{Clock}; probes are Deferreds the test fires.
"""

from __future__ import annotations

import json
import os

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.providers.health import INCONCLUSIVE, INVALID, VALID, KeyHealth, ProbeResult
from cllama_tx.providers.keys import (
    RECHECK_WINDOW,
    REPROBE_FIRST,
    REPROBE_MAX,
    STRIKES_TO_DEAD,
    KeyPool,
    Verdict,
    classify_failure,
    reprobe_delay,
)
from cllama_tx.providers.registry import ProviderRegistry
from cllama_tx.providers.store import KeyRecord, load

NOW = 1767323045.0
SECRETS = {"a": "sk-aaaa-0000000000000000-wxyz", "b": "sk-bbbb-1111111111111111-wxyz"}
UNAUTHORIZED = classify_failure(401, None, b'{"error":"invalid key"}')


class FakeProber:
    """Records probes; each returns a Deferred the test fires."""

    def __init__(self):
        self.calls: list[tuple[str, Deferred]] = []

    def probe(self, key):
        d = Deferred()
        self.calls.append((key.id, d))
        return d

    def answer(self, outcome, detail="GET /v1/models answered 200", index=-1):
        key_id, d = self.calls[index]
        d.callback(ProbeResult(outcome, detail))
        return key_id


class HealthCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.events = []
        self.prober = FakeProber()

    def pool(self, *names, **states):
        keys = [
            KeyRecord(id=n, label=None, secret=SECRETS[n], state=states.get(n, "ready")) for n in names
        ]
        pool = KeyPool("openai", keys, self.clock, on_change=self.events.append)
        pool.health = KeyHealth(pool, self.prober.probe, self.clock)
        pool.arm_reprobes()
        self.addCleanup(pool.health.stop)
        return pool

    def actions(self):
        return [e["action"] for e in self.events]


class RecheckTests(HealthCase):
    def test_confirmed_401_kills_the_key_and_schedules_a_reprobe(self):
        pool = self.pool("a", "b")
        a = pool.acquire()
        self.assertTrue(pool.report(a, UNAUTHORIZED))
        self.assertEqual(a.state, "suspect")
        # While suspect it is not handed out.
        self.assertEqual(pool.acquire().id, "b")
        outcome = pool.recheck(a)
        self.assertNoResult(outcome)
        self.prober.answer(INVALID, "GET /v1/models answered 401")
        self.assertEqual(self.successResultOf(outcome), INVALID)
        self.assertEqual(a.state, "dead")
        self.assertEqual(a.next_probe_at, NOW + REPROBE_FIRST)
        self.assertEqual(self.actions(), ["suspect", "dead"])
        self.assertEqual(
            self.events[1],
            {
                "provider": "openai",
                "key_id": "a",
                "action": "dead",
                "reason": "unauthorized: re-check confirmed (GET /v1/models answered 401)",
                "cooldown_until": None,
                "next_probe_at": "2026-01-02T03:04:35.000Z",
            },
        )

    def test_valid_recheck_keeps_the_key_and_blames_the_request(self):
        pool = self.pool("a")
        a = pool.acquire()
        pool.report(a, UNAUTHORIZED)
        outcome = pool.recheck(a)
        self.prober.answer(VALID)
        self.assertEqual(self.successResultOf(outcome), VALID)
        self.assertEqual(a.state, "ready")
        self.assertEqual(self.actions(), ["suspect", "ready"])
        self.assertIn("the 401 was about the request", self.events[-1]["reason"])
        self.assertIs(pool.acquire(), a)
        # Another 401 right after is about that request too: no new probe.
        self.clock.advance(RECHECK_WINDOW - 1)
        self.assertFalse(pool.report(a, UNAUTHORIZED))
        self.assertEqual((a.state, len(self.prober.calls)), ("ready", 1))
        self.assertEqual(a.last_error_code, 401)
        # Later, a 401 is re-checked again.
        self.clock.advance(1)
        self.assertTrue(pool.report(a, UNAUTHORIZED))
        self.assertEqual(a.state, "suspect")

    def test_concurrent_rechecks_share_one_probe(self):
        pool = self.pool("a")
        a = pool.acquire()
        pool.report(a, UNAUTHORIZED)
        first = pool.recheck(a)
        # A second request's 401 on the same key while the check runs.
        self.assertTrue(pool.report(a, UNAUTHORIZED))
        second = pool.recheck(a)
        waiting = pool.checks_pending()
        self.assertIsNone(pool.acquire())
        self.assertEqual(len(self.prober.calls), 1)
        self.assertEqual(pool.health.checking(), frozenset({"a"}))
        self.prober.answer(VALID)
        self.assertEqual(self.successResultOf(first), VALID)
        self.assertEqual(self.successResultOf(second), VALID)
        self.successResultOf(waiting)
        self.assertIsNone(pool.checks_pending())
        self.assertIs(pool.acquire(), a)
        self.assertEqual(self.actions(), ["suspect", "ready"])

    def test_inconclusive_recheck_keeps_the_key_until_strikes(self):
        pool = self.pool("a")
        a = pool.keys[0]
        for strike in range(1, STRIKES_TO_DEAD):
            pool.report(a, UNAUTHORIZED)
            pool.recheck(a)
            self.prober.answer(INCONCLUSIVE, "GET /v1/models answered 404")
            self.assertEqual((a.state, a.strikes), ("ready", strike))
        pool.report(a, UNAUTHORIZED)
        pool.recheck(a)
        self.prober.answer(INCONCLUSIVE, "GET /v1/models answered 404")
        self.assertEqual(a.state, "dead")
        self.assertEqual(
            self.events[-1]["reason"],
            f"unauthorized {STRIKES_TO_DEAD} times in a row, re-check inconclusive (GET /v1/models answered 404)",
        )

    def test_a_served_request_clears_the_strikes(self):
        pool = self.pool("a")
        a = pool.keys[0]
        for _ in range(STRIKES_TO_DEAD - 1):
            pool.report(a, UNAUTHORIZED)
            pool.recheck(a)
            self.prober.answer(INCONCLUSIVE, "timeout")
        pool.succeeded(a)
        self.assertEqual(a.strikes, 0)
        pool.report(a, UNAUTHORIZED)
        pool.recheck(a)
        self.prober.answer(INCONCLUSIVE, "timeout")
        self.assertEqual(a.state, "ready")

    def test_a_failed_probe_is_inconclusive(self):
        pool = self.pool("a")
        a = pool.keys[0]
        pool.report(a, UNAUTHORIZED)
        outcome = pool.recheck(a)
        self.prober.calls[0][1].errback(RuntimeError("boom"))
        self.assertEqual(self.successResultOf(outcome), INCONCLUSIVE)
        self.assertEqual(a.state, "ready")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_operator_activation_during_a_recheck_wins(self):
        pool = self.pool("a")
        a = pool.keys[0]
        pool.report(a, UNAUTHORIZED)
        pool.recheck(a)
        pool.activate("a")
        self.prober.answer(INVALID, "GET /v1/models answered 401")
        self.assertEqual(a.state, "ready")


class ReprobeTests(HealthCase):
    def kill(self, pool, key):
        pool.report(key, UNAUTHORIZED)
        pool.recheck(key)
        self.prober.answer(INVALID, "GET /v1/models answered 401")

    def test_backoff_doubles_to_the_cap_then_recovers(self):
        pool = self.pool("a")
        a = pool.keys[0]
        self.kill(pool, a)
        waits = []
        for _ in range(8):
            wait = a.next_probe_at - self.clock.seconds()
            waits.append(wait)
            self.clock.advance(wait - 0.5)
            calls = len(self.prober.calls)
            self.clock.advance(0.5)
            self.assertEqual(len(self.prober.calls), calls + 1)
            self.assertIsNone(a.next_probe_at)  # probing now: not due again
            self.prober.answer(INVALID, "GET /v1/models answered 401")
            self.assertEqual(a.state, "dead")
        self.assertEqual(waits, [30, 60, 120, 240, 480, 960, 1800, 1800])
        # The key is restored at the provider: the next re-probe brings it back.
        self.clock.advance(a.next_probe_at - self.clock.seconds())
        self.prober.answer(VALID)
        self.assertEqual(a.state, "ready")
        self.assertIsNone(a.next_probe_at)
        self.assertEqual(self.events[-1]["action"], "recovered")
        self.assertEqual(self.events[-1]["reason"], "re-probe passed (GET /v1/models answered 200)")
        self.assertIs(pool.acquire(), a)
        # No timer left.
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_quota_death_comes_back_on_trial_and_backs_off_further(self):
        pool = self.pool("a")
        a = pool.keys[0]
        pool.report(a, classify_failure(402, None, b"Insufficient credits"))
        self.assertEqual((a.state, a.next_probe_at), ("dead", NOW + 30))
        self.clock.advance(30)
        self.prober.answer(VALID)  # the model list needs no credit
        self.assertEqual(a.state, "ready")
        # The trial request still finds the credit gone: a longer wait.
        pool.report(a, classify_failure(402, None, b"Insufficient credits"))
        self.assertEqual(a.next_probe_at, self.clock.seconds() + 60)
        # Until the key serves a request again.
        self.clock.advance(60)
        self.prober.answer(VALID)
        pool.succeeded(a)
        pool.report(a, classify_failure(402, None, b"Insufficient credits"))
        self.assertEqual(a.next_probe_at, self.clock.seconds() + 30)

    def test_inconclusive_reprobe_lets_the_key_back_on_trial(self):
        pool = self.pool("a")
        a = pool.keys[0]
        self.kill(pool, a)
        self.clock.advance(30)
        self.prober.answer(INCONCLUSIVE, "GET /v1/models answered 503")
        self.assertEqual(a.state, "ready")
        self.assertEqual(self.events[-1]["action"], "recovered")
        self.assertIn("on trial", self.events[-1]["reason"])

    def test_keys_loaded_dead_are_reprobed(self):
        pool = self.pool("a", "b", a="dead")
        self.assertEqual(pool.keys[0].next_probe_at, NOW + REPROBE_FIRST)
        self.assertEqual(pool.next_probe_in(), 30)
        self.clock.advance(30)
        self.assertEqual([c[0] for c in self.prober.calls], ["a"])

    def test_disabled_and_deleted_keys_are_not_reprobed(self):
        pool = self.pool("a", "b", a="dead", b="dead")
        pool.disable("a")
        pool.delete("b")
        self.assertIsNone(pool.next_probe_at())
        self.clock.advance(3600)
        self.assertEqual(self.prober.calls, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_cancels_the_timer(self):
        pool = self.pool("a", a="dead")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        pool.health.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(3600)
        self.assertEqual(self.prober.calls, [])

    def test_without_a_rechecker_no_reprobe_is_promised(self):
        pool = KeyPool("openai", [KeyRecord(id="a", label=None, secret=SECRETS["a"])], self.clock,
                       on_change=self.events.append)
        pool.report(pool.keys[0], Verdict("dead", "unauthorized", None, 401))
        self.assertIsNone(pool.keys[0].next_probe_at)
        self.assertNotIn("next_probe_at", self.events[-1])
        self.assertIsNone(pool.next_probe_in())

    def test_delay_formula(self):
        self.assertEqual([reprobe_delay(n) for n in range(8)], [30, 60, 120, 240, 480, 960, 1800, 1800])
        self.assertEqual(reprobe_delay(10_000), REPROBE_MAX)

    def test_snapshot_shows_the_next_reprobe(self):
        pool = self.pool("a", "b")
        self.kill(pool, pool.keys[0])
        a, b = pool.snapshot()["keys"]
        self.assertEqual(a["state"], "dead")
        self.assertEqual(a["next_probe_at"], "2026-01-02T03:04:35.000Z")
        self.assertFalse(a["probing"])
        self.assertEqual(a["last_error_code"], 401)
        self.assertIsNone(b["next_probe_at"])
        self.clock.advance(30)
        self.assertTrue(pool.snapshot()["keys"][0]["probing"])


class RegistryHealthTests(SynchronousTestCase):
    """The registry wires a re-checker into every pool, old and new."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(NOW)
        self.auth_dir = self.mktemp()
        os.makedirs(self.auth_dir)

    def test_a_key_saved_dead_comes_back_by_itself(self):
        with open(os.path.join(self.auth_dir, "providers.json"), "w") as f:
            json.dump(
                {"version": 2, "providers": {"xai": {"keys": [
                    {"id": "runtime:a", "secret": SECRETS["a"], "state": "dead", "last_error_code": 401},
                ]}}},
                f,
            )
        events = []
        registry = ProviderRegistry({}, self.auth_dir, self.clock, on_pool_event=events.append)
        seen = []

        class Prober:
            def probe(self, spec, key):
                seen.append((spec.name, spec.probe_path, key.id))
                return succeed(ProbeResult(VALID, "GET /v1/models answered 200"))

        registry.attach_prober(Prober())
        self.addCleanup(registry.stop_probes)
        pool = registry.resolve("xai").pool
        self.assertEqual(pool.next_probe_in(), 30)
        self.clock.advance(30)
        self.assertEqual(seen, [("xai", "/v1/models", "runtime:a")])
        self.assertEqual(pool.keys[0].state, "ready")
        self.assertEqual([e["action"] for e in events], ["recovered"])
        # The recovery is saved (after the save delay).
        self.clock.advance(5)
        [key] = load(os.path.join(self.auth_dir, "providers.json"))["xai"].keys
        self.assertEqual(key.state, "ready")

    def test_suspect_is_saved_as_ready(self):
        registry = ProviderRegistry({"XAI_API_KEY": SECRETS["a"]}, self.auth_dir, self.clock)
        registry.add_key("xai", SECRETS["b"], "second")
        pool = registry.resolve("xai").pool
        second = pool.keys[1]
        pool.report(second, UNAUTHORIZED)
        self.assertEqual(second.state, "suspect")
        registry.flush()
        [saved] = load(os.path.join(self.auth_dir, "providers.json"))["xai"].keys
        self.assertEqual(saved.state, "ready")
        self.assertEqual(saved.last_error_code, 401)
