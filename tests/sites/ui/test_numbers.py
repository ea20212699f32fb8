"""
The UI's compact numbers: three significant digits and a unit, rounded half
up, zeros of the integer part never dropped (docs/UI.md, "Numbers").
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.sites.ui.render import compact


class CompactTests(SynchronousTestCase):
    def assertCompact(self, cases: dict) -> None:
        self.assertEqual({value: compact(value) for value in cases}, cases)

    def test_the_issue_figures(self) -> None:
        # Shown as "1k", "23k" and "2k" before.
        self.assertCompact({100_300: "100k", 229_500: "230k", 200_000: "200k"})

    def test_zeros_of_the_integer_part_stay(self) -> None:
        self.assertCompact({
            10_000: "10k", 20_000: "20k", 100_000: "100k", 110_000: "110k", 500_000: "500k",
            10_000_000: "10M", 100_000_000: "100M", 300_000_000_000: "300B", 1_000: "1k", 1_000_000: "1M",
        })

    def test_three_significant_digits(self) -> None:
        self.assertCompact({
            1_234: "1.23k", 12_345: "12.3k", 123_456: "123k", 1_234_567: "1.23M", 4_560_000: "4.56M",
            1_200_000_000: "1.2B", 1_050: "1.05k", 10_500: "10.5k",
        })

    def test_below_a_thousand_as_is(self) -> None:
        self.assertCompact({0: "0", 7: "7", 999: "999", 999.4: "999"})

    def test_rounding_half_up_and_into_the_next_unit(self) -> None:
        self.assertCompact({
            12_250: "12.3k", 1_005: "1.01k", 999.5: "1k", 9_995: "10k", 99_950: "100k",
            999_499: "999k", 999_500: "1M", 999_950: "1M", 999_950_000: "1B",
        })

    def test_beyond_billions_and_odd_values(self) -> None:
        self.assertEqual(compact(1_234_000_000_000), "1,234B")
        self.assertEqual(compact(-100_300), "-100k")
        self.assertEqual(compact(2.5e6), "2.5M")
        self.assertEqual(compact(None), "–")
        self.assertEqual(compact(float("nan")), "–")
        self.assertEqual(compact(float("inf")), "–")
