"""
LiteLLM's C{budget_duration} as budget periods
(L{cllama_tx.identity.budget_docs.period_of},
L{cllama_tx.governance.periods.schedule_bounds}): the period that ends at
C{budget_reset_at}, and where LiteLLM aligns resets (midnight, Monday,
the 1st, whole hours within the day) the same instant as LiteLLM's own
C{get_next_standardized_reset_time} gives.  Pure.
"""

from __future__ import annotations

import calendar
import datetime
import os

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.governance.budgets import BudgetBook, parse_budget
from cllama_tx.governance.periods import (
    BudgetError,
    period_bounds,
    schedule_bounds,
    schedule_quantum,
)
from cllama_tx.identity.budget_docs import budget_doc, period_of

UTC = datetime.timezone.utc
# LiteLLM's package would fetch its price list from the network at import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def at(*parts: int) -> float:
    return float(calendar.timegm((*parts, 0, 0, 0)[:6]))


# A Tuesday, 13:20:45 UTC.
NOW = at(2026, 11, 17, 13, 20, 45)


class PeriodOfTests(SynchronousTestCase):
    def test_calendar_durations(self) -> None:
        for duration, period in [
            ("1d", "daily"), ("24h", "daily"), ("daily", "daily"), ("7d", "weekly"), ("1w", "weekly"),
            ("weekly", "weekly"), ("30d", "monthly"), ("1mo", "monthly"), ("monthly", "monthly"),
        ]:
            self.assertEqual(period_of(duration, NOW), {"period": period}, duration)

    def test_schedules(self) -> None:
        midnight = int(at(2026, 11, 17))
        for duration, period in [
            ("6h", "every:6h"), ("30m", "every:30m"), ("10s", "every:10s"), ("hourly", "every:1h"),
            ("14d", f"every:14d@{midnight}"), ("2w", f"every:2w@{midnight}"), ("36h", f"every:36h@{midnight}"),
            ("2mo", f"every:2mo@{midnight}"),
        ]:
            self.assertEqual(period_of(duration, NOW), {"period": period}, duration)

    def test_without_a_duration_the_budget_lasts(self) -> None:
        self.assertEqual(period_of(None, NOW), {"window": "3650d"})

    def test_budget_doc(self) -> None:
        self.assertEqual(budget_doc(5, "1d", NOW), {"limit_usd": 5.0, "behavior": "hard_stop", "period": "daily"})
        self.assertIsNone(budget_doc(0, "1d", NOW))  # nothing may be spent: refused by the caller
        self.assertIsNone(budget_doc(None, "1d", NOW))
        for doc in (budget_doc(5, d, NOW) for d in ("1d", "6h", "14d", "2mo", None)):
            self.assertIsNotNone(parse_budget(doc))


class ScheduleBoundsTests(SynchronousTestCase):
    def test_within_the_day(self) -> None:
        self.assertEqual(schedule_bounds("every:6h", NOW), (at(2026, 11, 17, 12), at(2026, 11, 17, 18)))
        self.assertEqual(schedule_bounds("every:30m", NOW), (at(2026, 11, 17, 13, 0), at(2026, 11, 17, 13, 30)))
        self.assertEqual(schedule_bounds("every:10s", NOW), (at(2026, 11, 17, 13, 20, 40), at(2026, 11, 17, 13, 20, 50)))
        # A length that does not divide the day: the day's last period ends at midnight.
        self.assertEqual(schedule_bounds("every:5h", at(2026, 11, 17, 21)), (at(2026, 11, 17, 20), at(2026, 11, 18)))

    def test_days_from_the_day_it_was_set(self) -> None:
        anchor = int(at(2026, 11, 10))
        spec = f"every:14d@{anchor}"
        self.assertEqual(schedule_bounds(spec, NOW), (at(2026, 11, 10), at(2026, 11, 24)))
        self.assertEqual(schedule_bounds(spec, at(2026, 11, 25)), (at(2026, 11, 24), at(2026, 12, 8)))

    def test_months_from_the_first_of_the_month_it_was_set(self) -> None:
        spec = f"every:2mo@{int(at(2026, 1, 15))}"
        self.assertEqual(schedule_bounds(spec, at(2026, 2, 20)), (at(2026, 1, 1), at(2026, 3, 1)))
        self.assertEqual(schedule_bounds(spec, at(2026, 12, 31)), (at(2026, 11, 1), at(2027, 1, 1)))

    def test_bad_schedules(self) -> None:
        for spec in ("every:6x", "every:0h", "every:14d", "every:", "every:2mo"):
            with self.assertRaises(BudgetError):
                parse_budget({"limit_usd": 1, "period": spec})

    def test_buckets_never_straddle_a_boundary(self) -> None:
        self.assertEqual(schedule_quantum("every:10s"), 1)
        self.assertEqual(schedule_quantum("every:6h"), 15)
        self.assertEqual(schedule_quantum("every:14d@0"), 900)

    def test_a_book_counts_only_the_current_period(self) -> None:
        from twisted.internet.task import Clock

        clock = Clock()
        clock.advance(NOW)
        book = BudgetBook(clock, pricing=None)
        budget = parse_budget(budget_doc(1.0, "6h", NOW))
        book.load("key:x", [(at(2026, 11, 17, 11, 59), 1.0, True)])  # the previous period
        self.assertEqual(book.usage("key:x", budget).cost_usd, 0.0)
        book.load("key:x", [(at(2026, 11, 17, 12, 1), 0.25, True)])
        usage = book.usage("key:x", budget)
        self.assertEqual((usage.cost_usd, usage.end), (0.25, at(2026, 11, 17, 18)))


class LiteLLMAlignmentTests(SynchronousTestCase):
    """The end of the current period is LiteLLM's next reset, where LiteLLM aligns resets."""

    def test_same_reset_instants(self) -> None:
        from litellm.litellm_core_utils.duration_parser import get_next_standardized_reset_time

        moments = [NOW, at(2026, 11, 23, 23, 59, 59), at(2026, 12, 31, 0, 0, 1), at(2027, 2, 28, 6, 0, 0)]
        for duration in ("1d", "24h", "7d", "30d", "1mo", "6h", "2h", "30m", "15m", "10s", "daily", "weekly"):
            for moment in moments:
                period = period_of(duration, moment)["period"]
                _start, end = period_bounds(period, moment)
                litellm = get_next_standardized_reset_time(duration, datetime.datetime.fromtimestamp(moment, UTC))
                self.assertEqual(end, litellm.timestamp(), (duration, moment))

    def test_first_reset_of_a_multi_day_budget(self) -> None:
        from litellm.litellm_core_utils.duration_parser import get_next_standardized_reset_time

        for duration in ("2d", "14d", "2w"):
            period = period_of(duration, NOW)["period"]
            _start, end = period_bounds(period, NOW)
            litellm = get_next_standardized_reset_time(duration, datetime.datetime.fromtimestamp(NOW, UTC))
            self.assertEqual(end, litellm.timestamp(), duration)
