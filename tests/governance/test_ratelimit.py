"""The sliding one-minute request and token limiter, on a fake clock."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.governance.ratelimit import SLOTS, WINDOW, Admission, RateLimiter


class RateLimiterTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.limiter = RateLimiter(self.clock)

    def at(self, t):
        self.clock.advance(t - self.clock.seconds())

    def admitted(self, key="a", rpm=None, tpm=None, tokens=0):
        admission = self.limiter.check(key, rpm, tpm, tokens)
        self.assertTrue(admission.allowed, admission)
        self.assertEqual((admission.retry_after, admission.reason, admission.never), (0.0, None, False))
        return admission

    def refused(self, key="a", rpm=None, tpm=None, tokens=0, reason=None, retry_after=None):
        admission = self.limiter.check(key, rpm, tpm, tokens)
        self.assertFalse(admission.allowed, admission)
        if reason is not None:
            self.assertEqual(admission.reason, reason)
        if retry_after is not None:
            self.assertAlmostEqual(admission.retry_after, retry_after, places=6)
        return admission


class RequestLimitTests(RateLimiterTestCase):
    def test_no_limits_admits_everything(self):
        for _ in range(1000):
            self.admitted(tokens=10**6)

    def test_rpm(self):
        for _ in range(3):
            self.admitted(rpm=3)
        a = self.refused(rpm=3, reason="rpm", retry_after=SLOTS)
        self.assertFalse(a.never)
        # Refusals are not counted: the wait does not grow.
        self.refused(rpm=3, reason="rpm", retry_after=SLOTS)

    def test_retry_after_is_exact_as_the_clock_advances(self):
        self.at(0.25)
        self.admitted(rpm=2)
        self.at(10.5)
        self.admitted(rpm=2)
        # Bucket 0 leaves the window at t=61, bucket 10 at t=71.
        self.at(30.0)
        self.refused(rpm=2, retry_after=31.0)
        self.at(60.75)
        self.refused(rpm=2, retry_after=0.25)
        self.at(60.999)
        self.refused(rpm=2)
        self.at(61.0)
        self.admitted(rpm=2)
        self.refused(rpm=2, retry_after=10.0)

    def test_waiting_exactly_retry_after_succeeds(self):
        for start in (0.1, 0.3, 7.7, 59.9, 123.456):
            clock = Clock()
            clock.advance(start)
            limiter = RateLimiter(clock)
            self.assertTrue(limiter.check("k", 1, None, 0).allowed)
            clock.advance(0.6)
            refusal = limiter.check("k", 1, None, 0)
            self.assertFalse(refusal.allowed)
            clock.advance(refusal.retry_after - 0.001)
            self.assertFalse(limiter.check("k", 1, None, 0).allowed)
            clock.advance(0.001)
            self.assertTrue(limiter.check("k", 1, None, 0).allowed, start)

    def test_retry_after_frees_just_enough(self):
        # rpm=4: one request at t=0, t=1, t=2, t=3.  Asking at t=5 must wait
        # for the t=0 bucket only, not the whole window.
        for t in range(4):
            self.at(t)
            self.admitted(rpm=4)
        self.at(5)
        self.refused(rpm=4, retry_after=56.0)
        # With the limit lowered to 2, three requests must leave first.
        self.refused(rpm=2, retry_after=58.0)

    def test_never_more_than_rpm_in_any_sixty_seconds(self):
        times = []
        t = 0.0
        while t < 300:
            self.at(t)
            if self.limiter.check("a", 5, None, 0).allowed:
                times.append(t)
            t = round(t + 0.1, 1)
        for i, start in enumerate(times):
            inside = [x for x in times[i:] if x - start <= WINDOW]
            self.assertLessEqual(len(inside), 5)
        # And the limiter is not stingier than the 61-second bucket window.
        self.assertGreaterEqual(len(times), 5 * (300 // SLOTS))

    def test_keys_are_independent(self):
        self.admitted("a", rpm=1)
        self.refused("a", rpm=1)
        self.admitted("b", rpm=1)

    def test_zero_rpm_never(self):
        a = self.refused(rpm=0, reason="rpm")
        self.assertEqual((a.never, a.retry_after), (True, float(WINDOW)))

    def test_lowered_limit_applies_to_what_is_counted(self):
        for _ in range(5):
            self.admitted(rpm=10)
        self.refused(rpm=5, reason="rpm")
        self.admitted(rpm=6)

    def test_admission_carries_the_time(self):
        self.at(12.5)
        self.assertEqual(self.admitted(rpm=1).at, 12.5)
        self.assertEqual(self.refused(rpm=1).at, 12.5)


class TokenLimitTests(RateLimiterTestCase):
    def test_tpm(self):
        self.admitted(tpm=1000, tokens=600)
        self.admitted(tpm=1000, tokens=400)
        a = self.refused(tpm=1000, tokens=1, reason="tpm", retry_after=SLOTS)
        self.assertFalse(a.never)
        self.admitted(tpm=1000, tokens=0)

    def test_tpm_retry_after_waits_for_enough_tokens(self):
        self.admitted(tpm=1000, tokens=300)  # t=0
        self.at(20)
        self.admitted(tpm=1000, tokens=300)
        self.at(40)
        self.admitted(tpm=1000, tokens=300)
        self.at(50)
        self.refused(tpm=1000, tokens=200, retry_after=11.0)  # t=0 bucket frees enough
        self.refused(tpm=1000, tokens=500, retry_after=31.0)  # needs t=20 too
        self.at(61)
        self.admitted(tpm=1000, tokens=400)

    def test_bigger_than_the_whole_budget_is_never(self):
        a = self.refused(tpm=1000, tokens=1001, reason="tpm")
        self.assertEqual((a.never, a.retry_after), (True, float(WINDOW)))
        # Not counted.
        self.assertEqual(self.limiter.usage("a"), (0, 0))
        self.admitted(tpm=1000, tokens=1000)

    def test_never_wins_over_rpm(self):
        self.admitted(rpm=1, tokens=5)
        a = self.refused(rpm=1, tpm=10, tokens=11)
        self.assertEqual((a.reason, a.never), ("tpm", True))

    def test_reason_is_the_longest_wait(self):
        self.admitted(rpm=2, tpm=100, tokens=10)  # t=0
        self.at(30)
        self.admitted(rpm=2, tpm=100, tokens=80)
        self.at(40)
        # rpm frees at 61; tpm needs both buckets gone: 91.
        a = self.refused(rpm=2, tpm=100, tokens=50, reason="tpm", retry_after=51.0)
        self.assertFalse(a.never)
        # Only rpm blocks.
        self.refused(rpm=2, tpm=100, tokens=0, reason="rpm", retry_after=21.0)
        # Equal waits (the t=0 bucket frees both): rpm is named.
        self.refused(rpm=2, tpm=100, tokens=20, reason="rpm", retry_after=21.0)
        # Only tpm blocks.
        self.refused(rpm=3, tpm=100, tokens=50, reason="tpm", retry_after=51.0)

    def test_float_tokens_round_up(self):
        self.admitted(tpm=10, tokens=9.2)
        self.assertEqual(self.limiter.usage("a"), (1, 10))

    def test_bad_arguments(self):
        for rpm, tpm, tokens in [(-1, None, 0), (None, -5, 0), (1.5, None, 0), (True, None, 0),
                                 (None, None, -1), (None, None, "5"), (None, None, float("inf")),
                                 (None, None, float("nan"))]:
            self.assertRaises(ValueError, self.limiter.check, "a", rpm, tpm, tokens)


class SettleTests(RateLimiterTestCase):
    def test_settle_refund_with_admitted_at(self):
        a = self.admitted(tpm=1000, tokens=800)
        self.at(5)
        self.refused(tpm=1000, tokens=300)
        self.limiter.settle("a", 800, 100, admitted_at=a.at)
        self.assertEqual(self.limiter.usage("a"), (1, 100))
        self.admitted(tpm=1000, tokens=300)

    def test_settle_extra_with_admitted_at_counts_as_of_admission(self):
        a = self.admitted(tpm=1000, tokens=100)
        self.at(30)
        self.limiter.settle("a", 100, 700, admitted_at=a.at)
        self.assertEqual(self.limiter.usage("a"), (1, 700))
        # All 700 leave with the reservation's bucket at t=61.
        self.refused(tpm=1000, tokens=400, reason="tpm", retry_after=31.0)
        self.at(61)
        self.assertEqual(self.limiter.usage("a"), (0, 0))

    def test_settle_after_the_reservation_left_the_window(self):
        a = self.admitted(tpm=1000, tokens=100)
        self.admitted("other", tpm=1000, tokens=0)
        self.at(90)
        self.admitted(tpm=1000, tokens=50)
        # A refund has nothing left to take back.
        self.limiter.settle("a", 100, 0, admitted_at=a.at)
        self.assertEqual(self.limiter.usage("a"), (1, 50))
        # Extra tokens are charged now.
        self.limiter.settle("a", 100, 900, admitted_at=a.at)
        self.assertEqual(self.limiter.usage("a"), (1, 850))
        self.at(150.5)
        self.refused(tpm=1000, tokens=200, retry_after=0.5)

    def test_settle_for_a_forgotten_key(self):
        a = self.admitted(tpm=1000, tokens=10)
        self.at(200)
        self.limiter.settle("a", 10, 0, admitted_at=a.at)
        self.assertEqual(len(self.limiter), 0)
        self.limiter.settle("a", 10, 500, admitted_at=a.at)
        self.assertEqual(self.limiter.usage("a"), (0, 490))
        self.assertEqual(len(self.limiter), 1)

    def test_settle_without_admitted_at(self):
        self.admitted(tpm=1000, tokens=300)  # t=0
        self.at(10)
        self.admitted(tpm=1000, tokens=300)
        self.at(20)
        # A refund comes from the most recent seconds backwards.
        self.limiter.settle("a", 300, 0)
        self.assertEqual(self.limiter.usage("a"), (2, 300))
        self.limiter.settle("a", 1000, 0)
        self.assertEqual(self.limiter.usage("a"), (2, 0))
        # Extra tokens land in the current second.
        self.limiter.settle("a", 0, 1000)
        self.refused(tpm=1000, tokens=1, retry_after=61.0)
        self.at(81)
        self.admitted(tpm=1000, tokens=1000)

    def test_settle_no_change(self):
        self.limiter.settle("a", 5, 5)
        self.assertEqual(len(self.limiter), 0)

    def test_settle_does_not_touch_request_count(self):
        a = self.admitted(rpm=1, tokens=10)
        self.limiter.settle("a", 10, 0, admitted_at=a.at)
        self.refused(rpm=1, reason="rpm")

    def test_refund_never_goes_below_zero(self):
        a = self.admitted(tpm=100, tokens=10)
        self.admitted(tpm=100, tokens=10)
        self.limiter.settle("a", 1000, 0, admitted_at=a.at)
        self.assertEqual(self.limiter.usage("a"), (2, 0))


class MemoryTests(RateLimiterTestCase):
    def test_idle_keys_are_forgotten(self):
        for i in range(1000):
            self.limiter.check(f"agent-{i}", 10, 1000, 5)
        self.assertEqual(len(self.limiter), 1000)
        self.at(SLOTS - 0.5)
        self.assertEqual(len(self.limiter), 1000)
        self.at(SLOTS)
        self.limiter.check("fresh", 10, 1000, 5)
        self.assertEqual(len(self.limiter), 1)

    def test_a_busy_key_is_kept_and_idle_ones_go(self):
        self.admitted("idle", rpm=100)
        for t in range(0, 200, 5):
            self.at(t)
            self.admitted("busy", rpm=100)
        self.assertEqual(list(self.limiter._states), ["busy"])

    def test_forgetting_is_invisible(self):
        self.admitted(rpm=1)
        self.at(SLOTS)
        self.admitted(rpm=1)
        self.refused(rpm=1, retry_after=SLOTS)

    def test_state_does_not_grow_with_calls(self):
        state = None
        for i in range(20000):
            self.at(i * 0.05)
            self.limiter.check("a", 1000000, None, 7)
            if state is None:
                state = self.limiter._states["a"]
        self.assertIs(self.limiter._states["a"], state)
        self.assertEqual((len(state.requests), len(state.tokens)), (SLOTS, SLOTS))
        # 20 requests per second for 61 seconds at most.
        self.assertEqual(self.limiter.usage("a"), (20 * SLOTS, 7 * 20 * SLOTS))

    def test_large_clock_jumps(self):
        self.admitted(rpm=1)
        self.at(10**6 + 0.5)
        self.admitted(rpm=1)
        self.refused(rpm=1, retry_after=SLOTS - 0.5)

    def test_real_epoch_times(self):
        self.at(1_700_000_000.37)
        self.admitted(rpm=1)
        a = self.refused(rpm=1)
        self.clock.advance(a.retry_after)
        self.admitted(rpm=1)

    def test_clock_stepping_back_keeps_counting(self):
        self.at(100)
        self.admitted(rpm=2)
        self.clock.rightNow = 30.0
        self.admitted(rpm=2)
        self.refused(rpm=2)
        self.assertEqual(self.limiter.usage("a"), (2, 0))


class AdmissionTests(SynchronousTestCase):
    def test_defaults(self):
        self.assertEqual(Admission(True, 0.0, None), Admission(True, 0.0, None, never=False, at=0.0))
