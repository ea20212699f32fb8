"""
The wrong-guess throttle of operator credentials (pure, on a fake clock)
and its guard's audit lines.
"""

from __future__ import annotations

import io
import json

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.identity.operator import OperatorGuard
from cllama_tx.identity.throttle import FailureThrottle, source_of
from cllama_tx.runtime.audit import AuditLog


class SourceTests(SynchronousTestCase):
    def test_addresses_and_ipv6_networks(self):
        self.assertEqual(source_of("10.0.0.7"), "10.0.0.7")
        self.assertEqual(source_of("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64")
        self.assertEqual(source_of("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::/64")  # the same host's /64
        self.assertEqual(source_of("::ffff:192.0.2.1"), "192.0.2.1")
        self.assertEqual(source_of(None), "unknown")
        self.assertEqual(source_of("/run/cllama/ui.sock"), "/run/cllama/ui.sock")


class ThrottleTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)

    def throttle(self, **kwargs):
        return FailureThrottle(self.clock, **kwargs)

    def test_free_guesses_then_exponential_waits(self):
        throttle = self.throttle()
        for n in range(1, 7):
            self.assertIsNone(throttle.wait("a"), n)  # guesses 1-6 are compared at once
            self.assertEqual(throttle.failed("a"), n)
        # From the 6th wrong guess on: 1 s, 2 s, 4 s, ... before the next is compared.
        for expected in (1, 2, 4, 8, 16, 32, 60, 60):
            self.assertEqual(throttle.retry_after("a"), expected)
            self.clock.advance(expected - 0.01)
            self.assertIsNotNone(throttle.wait("a"))
            self.clock.advance(0.01)
            self.assertIsNone(throttle.wait("a"))
            throttle.failed("a")

    def test_other_sources_are_never_held_back(self):
        throttle = self.throttle()
        for _ in range(20):
            throttle.failed("attacker")
        self.assertIsNotNone(throttle.wait("attacker"))
        self.assertIsNone(throttle.wait("operator"))
        self.assertIsNone(throttle.wait("10.9.9.9"))

    def test_many_sources_within_their_free_guesses_are_always_heard(self):
        # 100 wrong guesses from 25 addresses (4 each) spend the whole
        # global budget, and still nobody waits: no address is past its
        # free guesses, and any other address is unaffected.
        throttle = self.throttle()
        for n in range(100):
            throttle.failed(f"10.0.0.{n % 25}")
        for n in range(25):
            self.assertIsNone(throttle.wait(f"10.0.0.{n}"))
        self.assertIsNone(throttle.wait("192.168.1.1"))

    def test_the_global_budget_binds_sources_past_their_free_guesses(self):
        throttle = self.throttle(global_burst=10, global_rate=0.5)
        for n in range(10):
            throttle.failed(f"bot-{n}")  # the budget is spent
        for _ in range(5):
            throttle.failed("typo")  # its free guesses: never waits
        self.assertIsNone(throttle.wait("typo"))
        for _ in range(6):
            throttle.failed("heavy")  # past its free guesses: own wait 1 s
        self.assertEqual(throttle.retry_after("heavy"), 2)  # one token at 0.5/s
        self.assertIsNone(throttle.wait("bot-1"))
        self.assertIsNone(throttle.wait("fresh"))
        self.clock.advance(2)
        self.assertIsNone(throttle.wait("heavy"))

    def test_forgotten_after_a_quiet_period(self):
        throttle = self.throttle(forget_after=900)
        for _ in range(10):
            throttle.failed("a")
        self.assertEqual(throttle.failures("a"), 10)
        self.clock.advance(899)
        self.assertEqual(throttle.failures("a"), 10)
        self.clock.advance(1)
        self.assertEqual(throttle.failures("a"), 0)
        self.assertIsNone(throttle.wait("a"))
        self.assertEqual(len(throttle), 0)

    def test_memory_is_bounded(self):
        throttle = self.throttle(max_sources=100)
        for n in range(1000):
            throttle.failed(f"s{n}")
        self.assertEqual(len(throttle), 100)
        self.assertEqual(throttle.failures("s999"), 1)
        self.assertEqual(throttle.failures("s0"), 0)

    def test_one_refusal_reported_per_wait(self):
        throttle = self.throttle()
        for _ in range(6):
            throttle.failed("a")
        self.assertTrue(throttle.first_refusal("a"))
        self.assertFalse(throttle.first_refusal("a"))
        throttle.failed("a")
        self.assertTrue(throttle.first_refusal("a"))
        self.assertFalse(throttle.first_refusal("never-failed"))


class GuardTests(SynchronousTestCase):
    def test_audit_lines_name_the_surface_and_source_never_the_guess(self):
        clock = Clock()
        stream = io.StringIO()
        guard = OperatorGuard(FailureThrottle(clock), audit=AuditLog(stream, clock))
        for _ in range(6):
            self.assertIsNone(guard.refusal("10.0.0.1", "key_api"))
            guard.failed("10.0.0.1", "key_api")
        self.assertEqual(guard.refusal("10.0.0.1", "history"), 1)
        self.assertEqual(guard.refusal("10.0.0.1", "history"), 1)  # reported once
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        self.assertEqual([line["action"] for line in lines], ["auth_failed"] * 6 + ["auth_throttled"])
        self.assertEqual({line["type"] for line in lines}, {"operator"})
        self.assertEqual(lines[5]["failures"], 6)
        self.assertEqual(lines[-1]["surface"], "history")
        self.assertEqual(lines[-1]["retry_after"], 1)
        self.assertEqual(lines[-1]["actor"], "anonymous@10.0.0.1")
