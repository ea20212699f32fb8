"""
Counters and histograms kept as plain numbers, exposed as Prometheus
families when scraped.

prometheus_client's own metrics take a lock for every increment and walk
their buckets in Python for every observation: about ten locked
increments a settled request, 2 % of a request's CPU on the hot path.  The
proxy counts on the reactor thread only, so these keep their figures in
dicts and lists, and build the same families (names, labels, C{_total},
C{_bucket}/C{_count}/C{_sum} and C{_created} samples) only when collected.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

__all__ = ["TallyCounter", "TallyHistogram"]


class TallyCounter:
    """A labelled counter: C{inc(labels, amount)} from the reactor thread only."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], namespace: str = "") -> None:
        self.name = f"{namespace}_{name}" if namespace else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        self._created: dict[tuple[str, ...], float] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1) -> None:
        values = self._values
        if labels in values:
            values[labels] += amount
        else:
            values[labels] = amount
            self._created[labels] = time.time()

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in list(self._values.items()):
            family.add_metric(labels, value, created=self._created[labels])
        yield family


class TallyHistogram:
    """A labelled histogram with fixed upper bounds (C{+Inf} added)."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float], namespace: str = ""
    ) -> None:
        self.name = f"{namespace}_{name}" if namespace else name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._bounds = tuple(float(b) for b in buckets)
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        # Per label set: [count in each bucket (not cumulative)..., sum].
        self._series: dict[tuple[str, ...], list[float]] = {}
        self._created: dict[tuple[str, ...], float] = {}

    def observe(self, labels: tuple[str, ...], amount: float) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0] * (len(self._bounds) + 2)
            self._created[labels] = time.time()
        # The first bucket whose bound is at least the amount (le is inclusive).
        series[bisect_left(self._bounds, amount)] += 1
        series[-1] += amount

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, series in list(self._series.items()):
            running, buckets = 0.0, []
            for le, count in zip(self._les, series, strict=False):
                running += count
                buckets.append((le, running))
            family.add_metric(labels, buckets, series[-1])
            family.add_sample(
                self.name + "_created", dict(zip(self.labelnames, labels, strict=True)), self._created[labels]
            )
        yield family
