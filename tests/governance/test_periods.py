"""
Tests for L{cllama_tx.governance.periods}: durations, calendar bounds in
timezones (DST days included), the spend timeline and retry times.
"""

from __future__ import annotations

import datetime
from zoneinfo import ZoneInfo

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.governance.budgets import parse_budget
from cllama_tx.governance.periods import (
    BudgetError,
    SpendTimeline,
    parse_window,
    period_bounds,
    quantum_for,
    resolve_timezone,
    retry_after,
    window_bounds,
)


def ts(text: str) -> float:
    """Epoch seconds of an ISO 8601 time with an offset."""
    return datetime.datetime.fromisoformat(text).timestamp()


class ParseWindowTests(SynchronousTestCase):
    def test_go_durations(self) -> None:
        self.assertEqual(parse_window("1h"), 3600.0)
        self.assertEqual(parse_window("24h"), 86400.0)
        self.assertEqual(parse_window("30m"), 1800.0)
        self.assertEqual(parse_window("90s"), 90.0)
        self.assertEqual(parse_window("1h30m"), 5400.0)
        self.assertEqual(parse_window("0.5h"), 1800.0)
        self.assertEqual(parse_window(" 2h "), 7200.0)
        self.assertEqual(parse_window("+1h"), 3600.0)
        self.assertAlmostEqual(parse_window("1500ms"), 1.5)

    def test_days_and_weeks(self) -> None:
        self.assertEqual(parse_window("1d"), 86400.0)
        self.assertEqual(parse_window("2w"), 14 * 86400.0)

    def test_invalid(self) -> None:
        for bad in ("", " ", "1", "h", "1x", "-1h", "0s", "0h0m", "1h 30m", "daily", "1.h.", None, 3600, True):
            with self.subTest(bad=bad):
                self.assertRaises(BudgetError, parse_window, bad)


class TimezoneTests(SynchronousTestCase):
    def test_resolve(self) -> None:
        self.assertIs(resolve_timezone(None), datetime.timezone.utc)
        self.assertIs(resolve_timezone(""), datetime.timezone.utc)
        self.assertIs(resolve_timezone("UTC"), datetime.timezone.utc)
        self.assertEqual(resolve_timezone("Europe/Paris"), ZoneInfo("Europe/Paris"))
        zone = ZoneInfo("Asia/Tokyo")
        self.assertIs(resolve_timezone(zone), zone)

    def test_unknown(self) -> None:
        for bad in ("Mars/Olympus", "../etc/passwd", 5):
            with self.subTest(bad=bad):
                self.assertRaises(BudgetError, resolve_timezone, bad)


class PeriodBoundsTests(SynchronousTestCase):
    def assertBounds(self, period, now, tz, start, end) -> None:
        self.assertEqual(period_bounds(period, ts(now), tz), (ts(start), ts(end)))

    def test_daily_utc(self) -> None:
        self.assertBounds(
            "daily", "2024-06-15T13:45:00+00:00", None, "2024-06-15T00:00:00+00:00", "2024-06-16T00:00:00+00:00"
        )

    def test_daily_boundary_is_half_open(self) -> None:
        # Exactly midnight belongs to the day that starts there.
        self.assertBounds(
            "daily", "2024-06-16T00:00:00+00:00", None, "2024-06-16T00:00:00+00:00", "2024-06-17T00:00:00+00:00"
        )

    def test_daily_los_angeles_boundary(self) -> None:
        # 06:59:59Z is 23:59:59 the day before in Los Angeles (PDT, UTC-7).
        self.assertBounds(
            "daily",
            "2024-06-15T06:59:59+00:00",
            "America/Los_Angeles",
            "2024-06-14T07:00:00+00:00",
            "2024-06-15T07:00:00+00:00",
        )
        self.assertBounds(
            "daily",
            "2024-06-15T07:00:00+00:00",
            "America/Los_Angeles",
            "2024-06-15T07:00:00+00:00",
            "2024-06-16T07:00:00+00:00",
        )

    def test_dst_start_day_is_23_hours(self) -> None:
        start, end = period_bounds("daily", ts("2024-03-10T12:00:00+00:00"), "America/Los_Angeles")
        self.assertEqual(start, ts("2024-03-10T00:00:00-08:00"))
        self.assertEqual(end, ts("2024-03-11T00:00:00-07:00"))
        self.assertEqual(end - start, 23 * 3600)

    def test_dst_end_day_is_25_hours(self) -> None:
        start, end = period_bounds("daily", ts("2024-11-03T12:00:00+00:00"), "America/Los_Angeles")
        self.assertEqual(start, ts("2024-11-03T00:00:00-07:00"))
        self.assertEqual(end, ts("2024-11-04T00:00:00-08:00"))
        self.assertEqual(end - start, 25 * 3600)

    def test_midnight_in_a_dst_gap(self) -> None:
        # Chile moves its clocks from 00:00 to 01:00: 2024-09-08 starts at
        # 01:00 -03 (04:00Z), the first instant of that day.
        start, end = period_bounds("daily", ts("2024-09-08T05:00:00+00:00"), "America/Santiago")
        self.assertEqual(start, ts("2024-09-08T04:00:00+00:00"))
        self.assertEqual(end, ts("2024-09-09T00:00:00-03:00"))

    def test_weekly_starts_monday(self) -> None:
        # 2024-01-03 is a Wednesday; 2024-01-01 a Monday.
        self.assertBounds(
            "weekly", "2024-01-03T10:00:00+00:00", None, "2024-01-01T00:00:00+00:00", "2024-01-08T00:00:00+00:00"
        )
        # Sunday late evening is still the week that started on Monday.
        self.assertBounds(
            "weekly", "2024-01-07T23:59:59+00:00", None, "2024-01-01T00:00:00+00:00", "2024-01-08T00:00:00+00:00"
        )
        self.assertBounds(
            "weekly", "2024-01-08T00:00:00+00:00", None, "2024-01-08T00:00:00+00:00", "2024-01-15T00:00:00+00:00"
        )

    def test_weekly_across_a_year_in_a_timezone(self) -> None:
        # Monday 2024-12-30 00:00 in Tokyo (UTC+9) is 2024-12-29T15:00Z.
        self.assertBounds(
            "weekly",
            "2024-12-31T12:00:00+00:00",
            "Asia/Tokyo",
            "2024-12-30T00:00:00+09:00",
            "2025-01-06T00:00:00+09:00",
        )

    def test_monthly(self) -> None:
        self.assertBounds(
            "monthly", "2024-02-29T23:00:00+00:00", None, "2024-02-01T00:00:00+00:00", "2024-03-01T00:00:00+00:00"
        )
        self.assertBounds(
            "monthly", "2024-12-31T23:59:59+00:00", None, "2024-12-01T00:00:00+00:00", "2025-01-01T00:00:00+00:00"
        )

    def test_monthly_in_a_timezone(self) -> None:
        # 2024-03-31T23:30Z is already April 1st in Paris (UTC+2).
        self.assertBounds(
            "monthly",
            "2024-03-31T23:30:00+00:00",
            "Europe/Paris",
            "2024-04-01T00:00:00+02:00",
            "2024-05-01T00:00:00+02:00",
        )
        # March in Paris starts at UTC+1 and ends at UTC+2.
        self.assertBounds(
            "monthly",
            "2024-03-15T00:00:00+00:00",
            "Europe/Paris",
            "2024-03-01T00:00:00+01:00",
            "2024-04-01T00:00:00+02:00",
        )

    def test_unknown_period(self) -> None:
        self.assertRaises(BudgetError, period_bounds, "yearly", 0.0, None)

    def test_window_bounds(self) -> None:
        rolling = parse_budget({"limit_usd": 1, "window": "1h"})
        self.assertEqual(window_bounds(rolling, 10_000.0, None), (6_400.0, 10_000.0))
        daily = parse_budget({"limit_usd": 1, "period": "daily"})
        now = ts("2024-06-15T06:00:00+00:00")
        self.assertEqual(
            window_bounds(daily, now, "America/Los_Angeles"),
            (ts("2024-06-14T07:00:00+00:00"), ts("2024-06-15T07:00:00+00:00")),
        )


class TimelineTests(SynchronousTestCase):
    def test_quantum(self) -> None:
        self.assertEqual(quantum_for(parse_budget({"limit_usd": 1, "window": "1h"})), 1)
        self.assertEqual(quantum_for(parse_budget({"limit_usd": 1, "window": "24h"})), 60)
        self.assertEqual(quantum_for(parse_budget({"limit_usd": 1, "window": "30d"})), 900)
        self.assertEqual(quantum_for(parse_budget({"limit_usd": 1, "window": "10s"})), 1)
        self.assertEqual(quantum_for(parse_budget({"limit_usd": 1, "period": "daily"})), 60)
        self.assertEqual(quantum_for(parse_budget({"limit_usd": 1, "period": "monthly"})), 900)

    def test_merges_within_a_bucket(self) -> None:
        timeline = SpendTimeline(quantum=60)
        timeline.add(120.0, 0.1)
        timeline.add(150.0, 0.2)
        timeline.add(179.9, 0.3, unknown=1)
        timeline.add(180.0, 0.4)
        self.assertEqual([e[:2] for e in timeline.entries], [[120.0, 179.9], [180.0, 180.0]])
        self.assertAlmostEqual(timeline.cost, 1.0)
        self.assertEqual((timeline.requests, timeline.unknown), (4, 1))

    def test_prune_rolling(self) -> None:
        budget = parse_budget({"limit_usd": 1, "window": "100s"})
        timeline = SpendTimeline(quantum=1)
        timeline.add(10.0, 0.25)
        timeline.add(20.0, 0.5)
        timeline.prune(budget, 109.999)
        self.assertEqual(len(timeline), 2)
        timeline.prune(budget, 110.0)  # the entry at 10 leaves at 10 + 100
        self.assertEqual(len(timeline), 1)
        self.assertEqual((timeline.cost, timeline.requests), (0.5, 1))
        timeline.prune(budget, 120.0)
        self.assertEqual((len(timeline), timeline.cost, timeline.requests), (0, 0.0, 0))

    def test_prune_period(self) -> None:
        budget = parse_budget({"limit_usd": 1, "period": "daily"})
        timeline = SpendTimeline(quantum=60)
        timeline.add(ts("2024-06-14T23:59:59+00:00"), 0.25)
        timeline.add(ts("2024-06-15T00:00:00+00:00"), 0.5)
        timeline.prune(budget, ts("2024-06-15T00:00:01+00:00"))
        self.assertEqual((len(timeline), timeline.cost), (1, 0.5))

    def test_no_entry_straddles_a_period_boundary(self) -> None:
        # A quarter-hour timezone (Nepal, UTC+5:45): local midnight is not a
        # whole UTC hour, but buckets of every quantum still split there.
        zone = "Asia/Kathmandu"
        start, _ = period_bounds("daily", ts("2024-06-15T12:00:00+00:00"), zone)
        budget = parse_budget({"limit_usd": 1, "period": "monthly"})
        timeline = SpendTimeline(quantum=quantum_for(budget))
        timeline.add(start - 1, 0.25)
        timeline.add(start, 0.5)
        self.assertEqual(len(timeline), 2)

    def test_load_sorts_and_merges(self) -> None:
        timeline = SpendTimeline(quantum=60)
        timeline.add(500.0, 1.0)
        timeline.load([(130.0, 0.5, 1, 0), (10.0, 0.25, 1, 1), (125.0, 0.5, 0, 0)])
        self.assertEqual(
            [list(e) for e in timeline.entries],
            [[10.0, 10.0, 0.25, 1, 1], [125.0, 130.0, 1.0, 1, 0], [500.0, 500.0, 1.0, 1, 0]],
        )
        self.assertEqual((timeline.cost, timeline.requests, timeline.unknown), (2.25, 3, 1))

    def test_coarser_quantum_merges(self) -> None:
        timeline = SpendTimeline(quantum=1)
        for t in range(0, 120, 10):
            timeline.add(float(t), 0.1)
        self.assertEqual(len(timeline), 12)
        timeline.set_quantum(60)
        self.assertEqual([e[:2] for e in timeline.entries], [[0.0, 50.0], [60.0, 110.0]])
        self.assertEqual(timeline.requests, 12)

    def test_clock_stepping_back_counts_later(self) -> None:
        timeline = SpendTimeline(quantum=1)
        timeline.add(100.0, 0.1)
        timeline.add(90.0, 0.2)
        self.assertEqual([e[:2] for e in timeline.entries], [[100.0, 100.0]])
        self.assertAlmostEqual(timeline.cost, 0.3)

    def test_bounded_memory(self) -> None:
        budget = parse_budget({"limit_usd": 1, "window": "24h"})
        timeline = SpendTimeline(quantum=quantum_for(budget))
        now = 1_700_000_000.0
        for _ in range(3 * 86400 // 7):  # a request every 7 s for three days
            now += 7
            timeline.prune(budget, now)
            timeline.add(now, 0.001)
        self.assertLessEqual(len(timeline), 1441)
        self.assertEqual(timeline.requests, sum(e[3] for e in timeline.entries))


class RetryAfterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rolling = parse_budget({"limit_usd": 1, "window": "1h"})
        self.daily = parse_budget({"limit_usd": 1, "period": "daily"})

    def test_nothing_needed(self) -> None:
        self.assertEqual(retry_after(self.rolling, [], 0.0), 0.0)

    def test_rolling_exact(self) -> None:
        spend = [(100.0, 0.6, 1), (200.0, 0.3, 1), (250.0, 0.05, 1)]
        # 0.4 must leave: the first entry (0.6) leaves at 100 + 3600.
        self.assertEqual(retry_after(self.rolling, spend, 300.0, free_usd=0.4), 3400.0)
        # 0.85 must leave: the first two together, at 200 + 3600.
        self.assertEqual(retry_after(self.rolling, spend, 300.0, free_usd=0.85), 3500.0)
        # Exactly the first entry's cost is enough.
        self.assertEqual(retry_after(self.rolling, spend, 300.0, free_usd=0.6), 3400.0)
        self.assertEqual(retry_after(self.rolling, spend, 300.0, free_requests=3), 3550.0)
        # More than everything in the window: never.
        self.assertIsNone(retry_after(self.rolling, spend, 300.0, free_usd=2.0))
        self.assertIsNone(retry_after(self.rolling, spend, 300.0, free_requests=4))

    def test_rolling_both_dimensions(self) -> None:
        spend = [(100.0, 0.0, 2), (200.0, 0.9, 0)]
        self.assertEqual(retry_after(self.rolling, spend, 300.0, free_usd=0.5, free_requests=1), 3500.0)

    def test_calendar_is_next_boundary(self) -> None:
        now = ts("2024-06-15T18:00:00+00:00")
        spend = [(now - 60, 0.9, 1)]
        self.assertEqual(retry_after(self.daily, spend, now, free_usd=0.5), 6 * 3600)
        self.assertEqual(
            retry_after(self.daily, spend, now, "America/Los_Angeles", free_usd=0.5),
            ts("2024-06-16T07:00:00+00:00") - now,
        )
        self.assertIsNone(retry_after(self.daily, spend, now, free_usd=1.5))
