"""
The tally counters and histograms expose exactly what prometheus_client's
own metrics expose for the same observations (the C{_created} times aside).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.runtime.metrics import LATENCY_BUCKETS
from cllama_tx.runtime.tally import TallyCounter, TallyHistogram


def exposition(registry: CollectorRegistry) -> list[str]:
    """The exposition lines, without the C{_created} samples' times."""
    lines = []
    for line in generate_latest(registry).decode().splitlines():
        if "_created{" in line or line.endswith("_created"):
            line = line.rpartition(" ")[0] + " <time>"
        lines.append(line)
    return lines


class SameAsPrometheusClient(SynchronousTestCase):
    def test_counter(self) -> None:
        ours, theirs = CollectorRegistry(), CollectorRegistry()
        tally = TallyCounter("tokens", "Tokens metered.", ["provider", "kind"], namespace="cllama")
        ours.register(tally)
        reference = Counter("tokens", "Tokens metered.", ["provider", "kind"], namespace="cllama", registry=theirs)
        for provider, kind, amount in (("openai", "input", 10), ("openai", "output", 5), ("openai", "input", 7),
                                       ("anthropic", "cache_read", 0.5)):
            tally.inc((provider, kind), amount)
            reference.labels(provider, kind).inc(amount)
        self.assertEqual(exposition(ours), exposition(theirs))
        self.assertIn('cllama_tokens_total{kind="input",provider="openai"} 17.0', exposition(ours))

    def test_histogram_bounds_are_inclusive(self) -> None:
        ours, theirs = CollectorRegistry(), CollectorRegistry()
        tally = TallyHistogram("latency_seconds", "Latency.", ["surface"], LATENCY_BUCKETS, namespace="cllama")
        ours.register(tally)
        reference = Histogram("latency_seconds", "Latency.", ["surface"], namespace="cllama", registry=theirs,
                              buckets=LATENCY_BUCKETS)
        # On a bound, between bounds, below the first, past the last.
        for surface, amount in (("chat", 0.025), ("chat", 0.03), ("chat", 0.0), ("chat", 900.0),
                                ("messages", 1), ("chat", 600)):
            tally.observe((surface,), amount)
            reference.labels(surface).observe(amount)
        self.assertEqual(exposition(ours), exposition(theirs))
        lines = exposition(ours)
        self.assertIn('cllama_latency_seconds_bucket{le="0.025",surface="chat"} 2.0', lines)
        self.assertIn('cllama_latency_seconds_bucket{le="600.0",surface="chat"} 4.0', lines)
        self.assertIn('cllama_latency_seconds_bucket{le="+Inf",surface="chat"} 5.0', lines)
        self.assertIn('cllama_latency_seconds_count{surface="chat"} 5.0', lines)
        total = 0.025 + 0.03 + 0.0 + 900.0 + 600
        self.assertIn(f'cllama_latency_seconds_sum{{surface="chat"}} {total!r}', lines)

    def test_nothing_observed(self) -> None:
        ours, theirs = CollectorRegistry(), CollectorRegistry()
        ours.register(TallyCounter("requests", "Requests.", ["surface"]))
        Counter("requests", "Requests.", ["surface"], registry=theirs)
        self.assertEqual(exposition(ours), exposition(theirs))
