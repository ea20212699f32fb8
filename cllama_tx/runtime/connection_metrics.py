"""
The connection guards in Prometheus: read from their counters when
scraped, so the connections themselves pay nothing for it.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cllama_tx.sites.guard import REASONS, ConnectionGuard


class GuardCollector:
    """C{cllama_connections_open}, C{cllama_connections_cap}, C{cllama_connections_closed_total}."""

    def __init__(self, guards: Mapping[str, ConnectionGuard], namespace: str = "cllama") -> None:
        self._guards = guards
        self._ns = namespace

    def collect(self):
        ns = self._ns
        opened = GaugeMetricFamily(
            f"{ns}_connections_open", "Connections open on a listener (counted against its cap).", labels=["listener"]
        )
        cap = GaugeMetricFamily(f"{ns}_connections_cap", "A listener's connection cap.", labels=["listener"])
        closed = CounterMetricFamily(
            f"{ns}_connections_closed",
            "Connections the guard closed: evicted or refused at the cap, or past a deadline.",
            labels=["listener", "reason"],
        )
        for label, guard in self._guards.items():
            listener = label.lower()
            opened.add_metric([listener], guard.live)
            cap.add_metric([listener], guard.limits.max_connections)
            for reason in REASONS:
                closed.add_metric([listener, reason], guard.closed[reason])
        yield opened
        yield cap
        yield closed


def register(registry, guards: Mapping[str, ConnectionGuard]) -> None:
    registry.register(GuardCollector(guards))
